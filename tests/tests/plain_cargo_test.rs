//! A developer's `cargo test`, as a normal user on a fresh clone, passes: the unit tests, the
//! proxy tests, the kube API server tests and the repository checks, with no root, no eBPF
//! toolchain (bpf-linker is left off the PATH) and no tool `cargo xtask setup` installs.
//!
//! The clone is of HEAD (what a user gets), built by uid 65534 in a directory of its own. The
//! toolchain is lent read-only through bind mounts in a private mount namespace, which vanish
//! with the command; the crates come from a copy of this machine's registry, offline.
//!
//! The clone and its build (several GiB) live under this workspace's target directory, on the
//! disk that holds the main build, and are seen by the build at a path under /tmp through a
//! bind mount: /tmp may be a small tmpfs, where a full build dies in the linker (SIGBUS when a
//! mapped output file cannot grow), and the target directory's parents need not be
//! searchable by uid 65534.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use interceptor_tests::*;

const NOBODY: u32 = 65534;

/// Free space this test's clone, registry copy and debug build take, with room to spare
/// (measured 2026-12-07: 3.1 GiB, with line tables only and no incremental state).
const NEEDED_BYTES: u64 = 5 << 30;

/// The scratch storage and the empty directory it is mounted on for the build; both removed
/// on drop, also when the test fails.
struct Scratch {
    storage: PathBuf,
    view: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.storage);
        let _ = std::fs::remove_dir(&self.view);
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: statvfs only writes the struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        panic!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The directory the `cargo` on PATH lives in (rustup's proxies), and rustup's home.
fn toolchain_dirs() -> (PathBuf, PathBuf) {
    let cargo = run("sh", &["-c", "command -v cargo"]);
    let bin = Path::new(cargo.trim())
        .parent()
        .expect("cargo has a directory")
        .to_path_buf();
    let home = run("rustup", &["show", "home"]);
    (bin, PathBuf::from(home.trim()))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cargo"))
}

#[test]
fn plain_cargo_test_passes_as_a_normal_user_on_a_fresh_clone() {
    require_root();
    let id = unique_id();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&tmp).expect("the target directory's tmp");
    let free = free_bytes(&tmp);
    assert!(
        free >= NEEDED_BYTES,
        "this test builds a fresh clone and needs {} GiB free under {}; {:.1} GiB are",
        NEEDED_BYTES >> 30,
        tmp.display(),
        free as f64 / (1u64 << 30) as f64
    );
    let scratch = Scratch {
        storage: tmp.join(format!("plain-{id}")),
        view: PathBuf::from(format!("/tmp/icp-plain-{id}")),
    };
    std::fs::create_dir_all(&scratch.view).expect("mount point under /tmp");
    // Written to through `s`, seen by the build through `w`.
    let (s, w) = (&scratch.storage, &scratch.view);
    for d in ["home", "cargo", "bin", "mnt/cargo-bin", "mnt/rustup"] {
        std::fs::create_dir_all(s.join(d)).expect("scratch dirs");
    }
    let repo = s.join("repo");
    run(
        "git",
        &[
            "clone",
            "--quiet",
            &workspace_root().display().to_string(),
            &repo.display().to_string(),
        ],
    );
    run(
        "cp",
        &[
            "-r",
            &cargo_home().join("registry").display().to_string(),
            &s.join("cargo/registry").display().to_string(),
        ],
    );
    let (bin, rustup_home) = toolchain_dirs();
    // rustup's proxies, seen through the bind mount, without bpf-linker.
    let mut linked = 0;
    for entry in std::fs::read_dir(&bin).expect("cargo's bin dir") {
        let name = entry.expect("entry").file_name();
        if name == "bpf-linker" {
            continue;
        }
        std::os::unix::fs::symlink(
            w.join("mnt/cargo-bin").join(&name),
            s.join("bin").join(&name),
        )
        .expect("symlink a toolchain proxy");
        linked += 1;
    }
    assert!(
        linked >= 3,
        "no cargo/rustc/rustup found in {}",
        bin.display()
    );
    run(
        "chown",
        &[
            "-R",
            &format!("{NOBODY}:{NOBODY}"),
            &s.display().to_string(),
        ],
    );

    let log = s.join("cargo-test.log");
    let script = format!(
        "set -e
mount --bind {s} {w}
mount --bind -o ro {rustup} {w}/mnt/rustup
mount --bind -o ro {bin} {w}/mnt/cargo-bin
cd {w}/repo
exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- \
  env -i HOME={w}/home PATH={w}/bin:/usr/bin:/bin RUSTUP_HOME={w}/mnt/rustup \
  CARGO_HOME={w}/cargo CARGO_NET_OFFLINE=true CARGO_INCREMENTAL=0 LANG=C.UTF-8 \
  timeout 1800 cargo test > {log} 2>&1",
        rustup = rustup_home.display(),
        bin = bin.display(),
        s = s.display(),
        w = w.display(),
        log = w.join("cargo-test.log").display(),
    );
    let started = Instant::now();
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .status()
        .expect("run unshare (util-linux)");
    let took = started.elapsed();
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = out.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let used = run("du", &["-sb", &s.display().to_string()]);
    let used: u64 = used
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    note(&format!(
        "plain cargo test as uid {NOBODY}: {status} in {:.0?}, {:.1} GiB on disk (NEEDED_BYTES {} GiB)",
        took,
        used as f64 / (1u64 << 30) as f64,
        NEEDED_BYTES >> 30
    ));
    assert!(
        status.success(),
        "cargo test as a normal user failed ({status}):\n{}",
        tail.join("\n")
    );
    let passed: usize = out
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    note(&format!("{passed} tests passed"));
    assert!(!out.contains("FAILED"), "{}", tail.join("\n"));
    // The proxy suites ran (they are what a developer changes most).
    for suite in [
        "tests/proxy_abuse.rs",
        "tests/proxy_failures.rs",
        "tests/repository.rs",
    ] {
        assert!(
            out.contains(suite),
            "{suite} did not run:\n{}",
            tail.join("\n")
        );
    }
    assert!(passed >= 100, "only {passed} tests passed");
    assert!(
        out.contains("WITHOUT its eBPF object"),
        "the build should have said it left the eBPF object out (no bpf-linker on PATH)"
    );
}
