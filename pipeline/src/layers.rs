//! The module order that keeps `pipeline` free of import cycles, checked by a test:
//! `cargo test -p ferry-pipeline --lib layers` (part of `ops/test`, so of CI).
//!
//! Every top-level module of the crate is listed once, lowest first; a module may use only
//! modules listed before it (and itself). Shared vocabulary comes first, then the plumbing the
//! stages share, the three stages in data-flow order, the operator's jobs, and last what an
//! operator types and reads. A new module gets its place here, or the test fails.

/// Top-level modules, lowest first.
#[rustfmt::skip]
pub const ORDER: &[&str] = &[
    // vocabulary
    "error", "topics", "config", "wal", "record",
    // plumbing shared by the stages
    "runtime", "inspect", "batch", "store", "throttle",
    // the three stages, in data-flow order
    "capture", "ship", "apply",
    // operator work
    "verify", "jobs",
    // what an operator types and reads
    "cli",
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::ORDER;

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The top-level module a source file belongs to (`None`: the crate root or the binary).
    fn module_of(src: &Path, file: &Path) -> Option<String> {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next()?.as_os_str().to_string_lossy();
        let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        (!matches!(name.as_str(), "lib" | "main" | "layers")).then_some(name)
    }

    /// Modules named by `crate::<name>` outside comment lines, including `use crate::{a, b}`.
    fn uses(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    for item in group[..end].split(',') {
                        let name: String = item
                            .trim()
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if !name.is_empty() {
                            out.insert(name);
                        }
                    }
                } else {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn no_module_uses_one_listed_after_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        files.sort();
        let rank = |m: &str| ORDER.iter().position(|o| *o == m);
        let mut problems = Vec::new();
        for file in &files {
            let Some(module) = module_of(&src, file) else {
                continue;
            };
            let Some(own) = rank(&module) else {
                problems.push(format!(
                    "{}: module {module} has no place in layers::ORDER",
                    file.display()
                ));
                continue;
            };
            let text = std::fs::read_to_string(file).expect("read source");
            for used in uses(&text) {
                match rank(&used) {
                    Some(r) if r <= own => {}
                    Some(_) => problems.push(format!(
                        "{}: {module} uses {used}, which comes after it in layers::ORDER",
                        file.display()
                    )),
                    None => problems.push(format!(
                        "{}: uses crate::{used}, which has no place in layers::ORDER",
                        file.display()
                    )),
                }
            }
        }
        assert!(problems.is_empty(), "layering:\n{}", problems.join("\n"));
    }

    #[test]
    fn every_listed_module_exists_once() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut seen = BTreeSet::new();
        for m in ORDER {
            assert!(seen.insert(*m), "{m} is listed twice");
            assert!(
                src.join(format!("{m}.rs")).is_file() || src.join(m).join("mod.rs").is_file(),
                "{m} is listed but has no source"
            );
        }
    }

    #[test]
    fn the_scanner_sees_every_form_of_use() {
        let u = uses(
            "use crate::config::Config;\nuse crate::{inspect, store::state};\n// crate::jobs in a comment\nlet x = crate::topics::f();",
        );
        let got: Vec<_> = u.iter().map(String::as_str).collect();
        assert_eq!(got, ["config", "inspect", "store", "topics"]);
    }
}
