//! The repository stands alone: users clone only it, so no file may depend on or cite files
//! outside it, and every relative link in its Markdown resolves to a file inside it.
//! (No privileges needed: part of a plain `cargo test`.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .canonicalize()
        .expect("workspace root")
}

/// Files git tracks (what a clone gets).
fn tracked() -> Vec<PathBuf> {
    let root = root();
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
        .expect("run git ls-files (git must be installed)");
    assert!(
        out.status.success(),
        "git ls-files failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
        .collect()
}

fn text(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

#[test]
fn no_file_cites_the_planners_files_outside_the_repository() {
    // Built at run time so this file does not match itself.
    let outside = [
        format!("../{}/", "shared"),
        format!("{}.md", "DESIGN"),
        format!("{}.md", "HOUSE-STYLE"),
    ];
    let mut hits = Vec::new();
    for path in tracked() {
        let Some(body) = text(&path) else { continue };
        for (n, line) in body.lines().enumerate() {
            for needle in &outside {
                if line.contains(needle.as_str()) {
                    hits.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        hits.is_empty(),
        "files cite documents outside the repository (the design record is docs/design.md):\n{}",
        hits.join("\n")
    );
}

/// Targets of inline Markdown links `[text](target)` in `body`.
fn link_targets(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

#[test]
fn markdown_links_resolve_inside_the_repository() {
    let root = root();
    let mut broken = Vec::new();
    let mut checked = 0;
    for path in tracked() {
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let Some(body) = text(&path) else { continue };
        for target in link_targets(&body) {
            let target = target.split_whitespace().next().unwrap_or("");
            let file = target.split('#').next().unwrap_or("");
            if file.is_empty() || file.contains("://") || file.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let dir = path.parent().expect("a file has a folder");
            match dir.join(file).canonicalize() {
                Ok(p) if p.starts_with(&root) => {}
                Ok(p) => broken.push(format!(
                    "{}: {target} points outside the repository ({})",
                    path.display(),
                    p.display()
                )),
                Err(e) => broken.push(format!("{}: {target}: {e}", path.display())),
            }
        }
    }
    println!("{checked} relative links checked");
    assert!(
        checked > 0,
        "no relative link found: the link parser is broken"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn link_parser_finds_inline_links() {
    assert_eq!(
        link_targets("see [a](docs/a.md) and [b](https://x.y/z) [c](../c.md#top)"),
        vec!["docs/a.md", "https://x.y/z", "../c.md#top"]
    );
}
