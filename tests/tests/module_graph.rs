//! No import cycles in the agent's crate: between its top-level modules, and between the
//! sibling modules of any directory (`proxy/`, `app/`, ...). A child using its parent's
//! shared items, or a parent using its children, is not a cycle; two siblings that use each
//! other, or `admin` -> `app` -> `admin`, are. (No privileges needed: part of a plain
//! `cargo test`.)
//!
//! References are read from the source text: `crate::a::b` and `super::x` paths, in `use`
//! items (braced groups too) and inline, outside comments and outside `#[cfg(test)]` modules
//! (a unit test may use what it likes).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path from the crate root (`["proxy", "pool"]`).
type ModPath = Vec<String>;

/// `src/proxy/pool.rs` -> `["proxy", "pool"]`; `src/lib.rs` -> `[]`.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "lib" | "main" | "mod") {
        parts.push(stem.to_string());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The production part of a file: line comments removed, `#[cfg(test)]` modules cut.
fn production_text(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        if code.trim() == "#[cfg(test)]" {
            // Skip the item that follows: to the end of its braces.
            let mut depth = 0i32;
            let mut opened = false;
            for next in lines.by_ref() {
                depth += next.matches('{').count() as i32;
                depth -= next.matches('}').count() as i32;
                opened |= next.contains('{');
                if (opened && depth <= 0) || (!opened && next.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// The paths of a use tree or an inline path at the start of `s`: `a::b`, `a::{b, c::d}`.
fn use_tree(s: &str) -> Vec<Vec<String>> {
    let s = s.trim_start();
    if let Some(inner) = s.strip_prefix('{') {
        let mut depth = 1;
        let mut end = inner.len();
        let mut members = Vec::new();
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                ',' if depth == 1 => {
                    members.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        members.push(&inner[start..end]);
        return members
            .into_iter()
            .filter(|m| !m.trim().is_empty())
            .flat_map(use_tree)
            .collect();
    }
    let Some(id) = ident_at(s) else {
        return vec![Vec::new()];
    };
    let rest = s[id.len()..].trim_start();
    match rest.strip_prefix("::") {
        Some(more) => use_tree(more)
            .into_iter()
            .map(|mut p| {
                p.insert(0, id.to_string());
                p
            })
            .collect(),
        None => vec![vec![id.to_string()]],
    }
}

/// Every path that starts with `prefix` (`crate::` or `super::`), as its segments; a braced
/// group (`crate::{a, b::c}`) yields one path per member.
fn paths_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        out.extend(use_tree(rest));
    }
    out
}

/// The longest prefix of `path` that is a module.
fn resolve(modules: &BTreeSet<ModPath>, path: &[String]) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_default()
}

/// Where `from` using `to` is an edge between two siblings: the two children of their
/// common ancestor on each side, or `None` when one contains the other.
fn sibling_edge(from: &[String], to: &[String]) -> Option<(ModPath, ModPath)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

/// Edges between sibling modules, each with a reason (file and path) for the message.
fn module_edges(src: &Path) -> BTreeMap<(ModPath, ModPath), String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(src, f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let text = production_text(&std::fs::read_to_string(file).expect("read source"));
        let mut targets: Vec<(ModPath, String)> = paths_after(&text, "crate::")
            .into_iter()
            .map(|p| (resolve(&modules, &p), format!("crate::{}", p.join("::"))))
            .collect();
        // `super::` from a file module is its parent (chains of `super::super::` too).
        for p in paths_after(&text, "super::") {
            let mut base = module.clone();
            base.pop();
            let mut rest = p.as_slice();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            let mut full = base;
            full.extend(rest.iter().cloned());
            targets.push((resolve(&modules, &full), format!("super::{}", p.join("::"))));
        }
        for (to, how) in targets {
            if let Some(edge) = sibling_edge(&module, &to) {
                edges.entry(edge).or_insert_with(|| {
                    format!(
                        "{} uses {how}",
                        file.strip_prefix(src).unwrap_or(file).display()
                    )
                });
            }
        }
    }
    edges
}

/// Cycles, as lists of modules, found by a depth-first search from each module.
fn cycles(edges: &BTreeMap<(ModPath, ModPath), String>) -> Vec<Vec<ModPath>> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    let mut found: Vec<Vec<ModPath>> = Vec::new();
    let mut seen_sets: BTreeSet<BTreeSet<ModPath>> = BTreeSet::new();
    fn walk<'a>(
        at: &'a ModPath,
        next: &BTreeMap<&'a ModPath, Vec<&'a ModPath>>,
        stack: &mut Vec<&'a ModPath>,
        found: &mut Vec<Vec<ModPath>>,
        seen_sets: &mut BTreeSet<BTreeSet<ModPath>>,
    ) {
        if let Some(i) = stack.iter().position(|m| *m == at) {
            let cycle: Vec<ModPath> = stack[i..].iter().map(|m| (*m).clone()).collect();
            if seen_sets.insert(cycle.iter().cloned().collect()) {
                found.push(cycle);
            }
            return;
        }
        if stack.len() > 32 {
            return;
        }
        stack.push(at);
        for to in next.get(at).into_iter().flatten() {
            walk(to, next, stack, found, seen_sets);
        }
        stack.pop();
    }
    for start in next.keys() {
        walk(start, &next, &mut Vec::new(), &mut found, &mut seen_sets);
    }
    found
}

fn describe(cycle: &[ModPath], edges: &BTreeMap<(ModPath, ModPath), String>) -> String {
    let mut lines = Vec::new();
    for (i, from) in cycle.iter().enumerate() {
        let to = &cycle[(i + 1) % cycle.len()];
        lines.push(format!(
            "  {} -> {}: {}",
            from.join("::"),
            to.join("::"),
            edges
                .get(&(from.clone(), to.clone()))
                .map(String::as_str)
                .unwrap_or("?")
        ));
    }
    lines.join("\n")
}

#[test]
fn the_agent_crate_has_no_module_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("interceptor/src");
    let edges = module_edges(&src);
    assert!(
        edges
            .keys()
            .any(|(a, b)| a == &vec!["app".to_string()] && b == &vec!["proxy".to_string()]),
        "the reader found no app -> proxy edge: it is broken, not the code clean ({} edges)",
        edges.len()
    );
    let found = cycles(&edges);
    let text: Vec<String> = found.iter().map(|c| describe(c, &edges)).collect();
    assert!(
        found.is_empty(),
        "{} module cycle(s) in interceptor/src:\n{}",
        found.len(),
        text.join("\n\n")
    );
}

#[test]
fn the_reader_sees_grouped_super_and_inline_paths_and_finds_a_planted_cycle() {
    let dir = std::env::temp_dir().join(format!("icp-module-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("net")).expect("mkdir");
    std::fs::write(dir.join("lib.rs"), "pub mod net;\npub mod app;\n").expect("write");
    std::fs::write(dir.join("app.rs"), "use crate::{net::{a, b}};\n").expect("write");
    std::fs::write(
        dir.join("net.rs"),
        "pub mod a;\npub mod b;\n// crate::app in a comment does not count\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("net/a.rs"),
        "use super::b::Thing;\nfn f() { super::Shared::new(); }\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("net/b.rs"),
        "pub fn g() { crate::net::a::f() }\n#[cfg(test)]\nmod tests {\n    use crate::app::X;\n}\n",
    )
    .expect("write");
    let edges = module_edges(&dir);
    let names: BTreeSet<(String, String)> = edges
        .keys()
        .map(|(a, b)| (a.join("::"), b.join("::")))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let want: BTreeSet<(String, String)> =
        [("app", "net"), ("net::a", "net::b"), ("net::b", "net::a")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(
        names, want,
        "the child -> parent use, the comment and the test module are not edges"
    );
    let found = cycles(&edges);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].len(), 2);
}
