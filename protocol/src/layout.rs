//! Checks each crate's tests run on its own source: the crate doc's
//! Layout list names every module, and, where the list is the crate's
//! layers, no module imports one listed below it.

/// The modules a crate root or folder module (`lib.rs` or `mod.rs` text)
/// declares but its doc's layout list does not name as ``[`module`]``.
pub fn undocumented_modules(lib_rs: &str) -> Vec<String> {
    let documented = doc_lines(lib_rs).collect::<Vec<_>>().join("\n");
    lib_rs
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = ["pub mod ", "pub(crate) mod ", "mod "]
                .iter()
                .find_map(|declared| line.strip_prefix(declared))?;
            rest.strip_suffix(';')
        })
        .filter(|module| !documented.contains(&format!("[`{module}`]")))
        .map(str::to_owned)
        .collect()
}

/// The imports that go up: `(module, imported)` where `module` (whose
/// source `read` returns) uses `{path}imported`, which the Layout list
/// of `lib_rs` (items `//! - [`module`]: …`, lowest first) puts below
/// it, or does not list. `path` is `crate::` for a crate root and, say,
/// `crate::worker::` for a folder's `mod.rs`. `{path}{…}` groups count as
/// violations too, so that every import is visible to the check.
pub fn upward_imports(
    lib_rs: &str,
    path: &str,
    read: impl Fn(&str) -> String,
) -> Vec<(String, String)> {
    let layers = layers(lib_rs);
    let group = format!("{path}{{");
    let mut upward = Vec::new();
    for (layer, module) in layers.iter().enumerate() {
        let source = read(module);
        let code = source.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code {
            if line.contains(&group) {
                upward.push(((*module).to_owned(), "{…}".to_owned()));
            }
            for (at, _) in line.match_indices(path) {
                let used: String = line[at + path.len()..]
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

/// [`upward_imports`] of the crate at `manifest_dir`, between the modules
/// of `src/lib.rs`'s list (a folder module counts with all its files), and
/// within each folder between the modules of its `mod.rs` list (reported
/// as `folder/module`). Also each folder's [`undocumented_modules`], as
/// `(folder, "undocumented: module")`.
pub fn upward_imports_of_crate(manifest_dir: &str) -> Vec<(String, String)> {
    let src = std::path::Path::new(manifest_dir).join("src");
    let lib_rs = read_file(&src.join("lib.rs")).expect("the crate has a src/lib.rs");
    let mut upward = upward_imports(&lib_rs, "crate::", |module| {
        read_file(&src.join(format!("{module}.rs")))
            .or_else(|| read_folder(&src.join(module)))
            .unwrap_or_else(|| panic!("no source for the module {module}"))
    });
    for folder in layers(&lib_rs) {
        let dir = src.join(folder);
        let Some(mod_rs) = read_file(&dir.join("mod.rs")) else {
            continue;
        };
        for module in undocumented_modules(&mod_rs) {
            upward.push((folder.to_owned(), format!("undocumented: {module}")));
        }
        let path = format!("crate::{folder}::");
        let inner = upward_imports(&mod_rs, &path, |module| {
            read_file(&dir.join(format!("{module}.rs")))
                .or_else(|| read_folder(&dir.join(module)))
                .unwrap_or_else(|| panic!("no source for the module {folder}::{module}"))
        });
        upward.extend(
            inner
                .into_iter()
                .map(|(module, used)| (format!("{folder}/{module}"), used)),
        );
    }
    upward
}

fn layers(lib_rs: &str) -> Vec<&str> {
    doc_lines(lib_rs)
        .filter_map(|line| line.trim_start_matches("//!").trim().strip_prefix("- [`"))
        .filter_map(|item| item.split_once("`]").map(|(module, _)| module))
        .collect()
}

fn read_file(path: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Every `.rs` file under `dir`, concatenated; `None` if it is no folder.
fn read_folder(dir: &std::path::Path) -> Option<String> {
    let mut text = String::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|entry| entry.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&read_folder(&path).unwrap_or_default());
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            text.push_str(&read_file(&path).unwrap_or_default());
            text.push('\n');
        }
    }
    Some(text)
}

fn doc_lines(lib_rs: &str) -> impl Iterator<Item = &str> {
    lib_rs.lines().filter(|line| line.starts_with("//!"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIB: &str = "//! - [`low`]: one.\n//! - [`high`]: two.\npub mod high;\npub(crate) mod low;\nmod hidden;\npub(crate) mod unlisted;\n";

    #[test]
    fn names_a_module_the_list_leaves_out() {
        assert_eq!(
            undocumented_modules(LIB),
            vec!["hidden".to_owned(), "unlisted".to_owned()]
        );
    }

    #[test]
    fn finds_an_import_of_a_module_listed_below() {
        let read = |module: &str| match module {
            "low" => "use crate::high::Thing;\n// crate::high in a comment\n".to_owned(),
            _ => "use crate::low::Other;\nuse crate::{low};\n".to_owned(),
        };
        assert_eq!(
            upward_imports(LIB, "crate::", read),
            vec![
                ("high".to_owned(), "{…}".to_owned()),
                ("low".to_owned(), "high".to_owned())
            ]
        );
    }

    #[test]
    fn finds_an_upward_import_within_a_folder() {
        let read = |module: &str| match module {
            "low" => "use crate::folder::high::Thing;\nuse crate::high::Other;\n".to_owned(),
            _ => "use crate::folder::low::Other;\n".to_owned(),
        };
        assert_eq!(
            upward_imports(LIB, "crate::folder::", read),
            vec![("low".to_owned(), "high".to_owned())]
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
