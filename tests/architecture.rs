//! ARCHITECTURE.md's import rules, checked on the source: no import cycle between sibling
//! modules of the Celery engine, the two transports, `src/source` and the protocol crate; the
//! engine imports no transport, and neither transport imports the other. Imports are read from
//! the text (`use super::...`, `crate::source::<dir>::...`, outside comments and test modules),
//! which is how this codebase writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A module's source without its comments and its `#[cfg(test)]` part.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers in `s`.
fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// The text after each `prefix` up to the end of its path (a `{...}` group included).
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    code.match_indices(prefix)
        .map(|(at, _)| {
            let rest = &code[at + prefix.len()..];
            let end = match rest.starts_with('{') {
                true => rest.find('}').map_or(rest.len(), |e| e + 1),
                false => rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len()),
            };
            &rest[..end]
        })
        .collect()
}

/// The sibling modules each module of `dir` uses. `crate_path` is how the code names `dir`
/// from the crate root (`crate::source::engine`).
fn graph(dir: &str, crate_path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let dir = repo().join(dir);
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() && path.join("mod.rs").exists() {
            files.insert(name, path.join("mod.rs"));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "mod" && name != "lib" {
            files.insert(name, path);
        }
    }
    let names: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(name, path)| {
            let code = code(path);
            let mut used = paths_after(&code, "super::");
            used.extend(paths_after(&code, &format!("{crate_path}::")));
            let deps = used
                .iter()
                .flat_map(|p| words(p))
                .filter(|w| names.contains(*w) && *w != name)
                .map(str::to_string)
                .collect();
            (name.clone(), deps)
        })
        .collect()
}

/// A cycle in `g`, if there is one, as the modules along it.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if !done.insert(n.to_string()) {
            return None;
        }
        path.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn sibling_modules_import_each_other_in_one_direction_only() {
    for (dir, path) in [
        ("src/source/engine", "crate::source::engine"),
        ("src/source/amqp", "crate::source::amqp"),
        ("src/source/redis_broker", "crate::source::redis_broker"),
        ("src/source", "crate::source"),
        ("plugin-protocol/src", "crate"),
    ] {
        let g = graph(dir, path);
        assert!(g.len() > 3, "{dir}: modules found: {g:?}");
        if dir == "src/source/engine" {
            assert!(g["delivery"].contains("worker"), "imports are read: {g:?}");
        }
        if let Some(c) = cycle(&g) {
            panic!("{dir}: import cycle {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_engine_imports_no_transport_and_transports_not_each_other() {
    let uses = |dir: &str, other: &str| -> Vec<String> {
        let mut found = Vec::new();
        let root = repo().join(dir);
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs")
                && code(&path).contains(&format!("source::{other}::"))
            {
                found.push(path.display().to_string());
            }
        }
        found
    };
    for (dir, other) in [
        ("src/source/engine", "amqp"),
        ("src/source/engine", "redis_broker"),
        ("src/source/amqp", "redis_broker"),
        ("src/source/redis_broker", "amqp"),
    ] {
        assert_eq!(
            uses(dir, other),
            Vec::<String>::new(),
            "{dir} imports {other}"
        );
    }
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(n, d)| (n.to_string(), d.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(
        paths_after("use super::{ledger, rules::X};", "super::"),
        ["{ledger, rules::X}"]
    );
}
