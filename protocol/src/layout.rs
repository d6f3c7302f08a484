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

/// The functions of `source` (one file's text) longer than `limit` lines,
/// as `name (n lines)`, outside its `#[cfg(test)]` module. A function
/// runs from its `fn` line to the first line after it that is its
/// indentation followed by `}`, as rustfmt lays it out.
pub fn long_functions(source: &str, limit: usize) -> Vec<String> {
    let lines: Vec<&str> = source
        .lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .collect();
    let mut long = Vec::new();
    let mut at = 0;
    while at < lines.len() {
        let line = lines[at];
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let declared = ["pub(crate) ", "pub ", ""]
            .iter()
            .filter_map(|visibility| code.strip_prefix(visibility))
            .find_map(|rest| {
                let rest = rest.strip_prefix("async ").unwrap_or(rest);
                let rest = rest.strip_prefix("const ").unwrap_or(rest);
                rest.strip_prefix("fn ")
            });
        let Some(declared) = declared.filter(|_| !line.trim_end().ends_with(';')) else {
            at += 1;
            continue;
        };
        let name: String = declared
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let end = (at..lines.len())
            .find(|&i| lines[i].strip_prefix(indent) == Some("}"))
            .unwrap_or(lines.len() - 1);
        let length = end - at + 1;
        if length > limit {
            long.push(format!("{name} ({length} lines)"));
        }
        at = end + 1;
    }
    long
}

/// [`long_functions`] of every `.rs` file under the crate's `src/`, as
/// `path: name (n lines)`.
pub fn long_functions_of_crate(manifest_dir: &str, limit: usize) -> Vec<String> {
    let src = std::path::Path::new(manifest_dir).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut long = Vec::new();
    for file in files {
        let source = read_file(&file).unwrap_or_default();
        let path = file
            .strip_prefix(&src)
            .unwrap_or(&file)
            .display()
            .to_string();
        long.extend(
            long_functions(&source, limit)
                .into_iter()
                .map(|function| format!("{path}: {function}")),
        );
    }
    long
}

fn rust_files(dir: &std::path::Path, into: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push(path);
        }
    }
}

/// Whether a crate's Layout list is its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layering {
    /// Each module imports only those listed above it ([`upward_imports_of_crate`]).
    Checked,
    /// The list only names the modules.
    Unchecked,
}

/// Longest production function a crate may have, in lines.
pub const LONGEST_FUNCTION: usize = 80;

/// Everything the checks of this module find wrong in the crate at
/// `manifest_dir`, one line each: modules its Layout list leaves out,
/// imports that go up (with `Layering::Checked`), and functions longer
/// than [`LONGEST_FUNCTION`] lines. Each crate's test asserts it is empty.
pub fn problems_of_crate(manifest_dir: &str, layering: Layering) -> Vec<String> {
    let lib_rs = std::path::Path::new(manifest_dir)
        .join("src")
        .join("lib.rs");
    let lib_rs = read_file(&lib_rs).expect("the crate has a src/lib.rs");
    let mut problems: Vec<String> = undocumented_modules(&lib_rs)
        .into_iter()
        .map(|module| format!("the Layout list does not name `{module}`"))
        .collect();
    if layering == Layering::Checked {
        problems.extend(
            upward_imports_of_crate(manifest_dir)
                .into_iter()
                .map(|(module, used)| format!("`{module}` imports `{used}`, listed below it")),
        );
    }
    problems.extend(
        long_functions_of_crate(manifest_dir, LONGEST_FUNCTION)
            .into_iter()
            .map(|function| format!("longer than {LONGEST_FUNCTION} lines: {function}")),
    );
    problems
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
    fn finds_a_function_longer_than_the_limit_and_skips_the_tests() {
        let body = "    x();\n".repeat(5);
        let source = format!(
            "fn short() {{\n    x();\n}}\n\nimpl A {{\n    pub async fn long(\n        a: u8,\n    ) {{\n{body}    }}\n}}\n\n#[cfg(test)]\nmod tests {{\n    fn long_test() {{\n{body}    }}\n}}\n"
        );
        assert_eq!(
            long_functions(&source, 5),
            vec!["long (9 lines)".to_owned()]
        );
        assert_eq!(long_functions(&source, 9), Vec::<String>::new());
    }

    #[test]
    fn this_crate_has_no_layout_problems() {
        assert_eq!(
            problems_of_crate(env!("CARGO_MANIFEST_DIR"), Layering::Unchecked),
            Vec::<String>::new()
        );
    }
}
