//! Checks each crate's tests run on its own source: the crate doc's
//! Layout list names every module, and, where the list is the crate's
//! layers, no module imports one listed below it.

/// The modules a crate root (`lib.rs` text) declares but its doc's layout
/// list does not name as ``[`module`]``.
pub fn undocumented_modules(lib_rs: &str) -> Vec<String> {
    let documented = doc_lines(lib_rs).collect::<Vec<_>>().join("\n");
    lib_rs
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))?;
            rest.strip_suffix(';')
        })
        .filter(|module| !documented.contains(&format!("[`{module}`]")))
        .map(str::to_owned)
        .collect()
}

/// The imports that go up: `(module, imported)` where `module` (whose
/// source `read` returns) uses `crate::imported`, which the Layout list
/// of `lib_rs` (items `//! - [`module`]: …`, lowest first) puts below
/// it, or does not list. `crate::{…}` groups count as violations too, so
/// that every import is visible to the check.
pub fn upward_imports(lib_rs: &str, read: impl Fn(&str) -> String) -> Vec<(String, String)> {
    let layers: Vec<&str> = doc_lines(lib_rs)
        .filter_map(|line| line.trim_start_matches("//!").trim().strip_prefix("- [`"))
        .filter_map(|item| item.split_once("`]").map(|(module, _)| module))
        .collect();
    let mut upward = Vec::new();
    for (layer, module) in layers.iter().enumerate() {
        let source = read(module);
        let code = source.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code {
            if line.contains("crate::{") {
                upward.push(((*module).to_owned(), "{…}".to_owned()));
            }
            for (at, _) in line.match_indices("crate::") {
                let used: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used.is_empty() || used == *module {
                    continue;
                }
                if !layers[..layer].contains(&used.as_str()) {
                    upward.push(((*module).to_owned(), used));
                }
            }
        }
    }
    upward.sort();
    upward.dedup();
    upward
}

/// [`upward_imports`] of the crate at `manifest_dir`, from its
/// `src/lib.rs` and each `src/<module>.rs` (or `src/<module>/mod.rs`).
pub fn upward_imports_of_crate(manifest_dir: &str) -> Vec<(String, String)> {
    let src = std::path::Path::new(manifest_dir).join("src");
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).ok();
    let lib_rs = read(src.join("lib.rs")).expect("the crate has a src/lib.rs");
    upward_imports(&lib_rs, |module| {
        read(src.join(format!("{module}.rs")))
            .or_else(|| read(src.join(module).join("mod.rs")))
            .unwrap_or_else(|| panic!("no source for the module {module}"))
    })
}

fn doc_lines(lib_rs: &str) -> impl Iterator<Item = &str> {
    lib_rs.lines().filter(|line| line.starts_with("//!"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIB: &str =
        "//! - [`low`]: one.\n//! - [`high`]: two.\npub mod high;\npub mod low;\nmod hidden;\n";

    #[test]
    fn names_a_module_the_list_leaves_out() {
        assert_eq!(undocumented_modules(LIB), vec!["hidden".to_owned()]);
    }

    #[test]
    fn finds_an_import_of_a_module_listed_below() {
        let read = |module: &str| match module {
            "low" => "use crate::high::Thing;\n// crate::high in a comment\n".to_owned(),
            _ => "use crate::low::Other;\nuse crate::{low};\n".to_owned(),
        };
        assert_eq!(
            upward_imports(LIB, read),
            vec![
                ("high".to_owned(), "{…}".to_owned()),
                ("low".to_owned(), "high".to_owned())
            ]
        );
    }

    #[test]
    fn this_crate_lists_every_module() {
        assert_eq!(
            undocumented_modules(include_str!("lib.rs")),
            Vec::<String>::new()
        );
    }
}
