//! Idempotent installation of everything the build and the tests need. Each step checks first
//! and only installs what is missing, so running it twice is cheap.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The bpf-linker release that emits BTF this kernel accepts (docs/design.md: 0.10.1 does not).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// kubernetes-validate bundles the Kubernetes JSON schemas (1.33, which the tests validate
/// against, among them), so tests/tests/deploy.rs validates deploy/ offline. This release
/// installs with pip on the project's Python 3.11.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// The interop tests' gRPC peers (tests/interop): the C-core Python package, and grpc-js as
/// pinned in tests/interop/package.json and package-lock.json.
const GRPCIO_VERSION: &str = "1.85.3";
/// The HTTP/1.1 tests' keep-alive REST client (tests/http1/keepalive_client.py).
const REQUESTS_VERSION: &str = "2.34.2";
const GRPC_JS_VERSION: &str = "1.14.7";

/// Debian packages and the command each one provides.
const APT_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("h2load", "nghttp2-client"),
    ("curl", "curl"),
    // The benchmark's contenders; run in the foreground with the benchmark's own configs.
    ("nginx", "nginx-light"),
    ("haproxy", "haproxy"),
    ("taskset", "util-linux"),
    // The metrics test scrapes the agent with a real Prometheus, run by the test itself.
    ("prometheus", "prometheus"),
];

/// Debian packages that provide files rather than commands: the benchmark chart's font.
const APT_FILES: &[(&str, &str)] = &[(
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "fonts-dejavu-core",
)];

/// Everything: what building needs, plus the tools the tests run.
pub fn run() -> Result<()> {
    build_tools()?;
    apt_tools()?;
    kubernetes_validate()?;
    interop_peers()?;
    pip_package(
        "requests",
        REQUESTS_VERSION,
        "requests",
        "the HTTP/1.1 tests run a requests.Session keep-alive client",
    )?;
    Ok(())
}

/// Only what building the agent needs (its build.rs compiles the eBPF object): the nightly's
/// rust-src and bpf-linker. No apt, no pip: this is what the image build runs.
pub fn build_tools() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

/// The toolchain that builds the eBPF crate: `nightly`, or the one INTERCEPTOR_EBPF_TOOLCHAIN
/// names (the image build pins a dated nightly; the agent's build.rs reads the same variable).
fn nightly() -> String {
    std::env::var("INTERCEPTOR_EBPF_TOOLCHAIN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "nightly".into())
}

pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions; called through `id -u` to avoid a libc dependency.
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running `id -u`")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("must run as root: {why}");
    }
    Ok(())
}

/// Runs cargo from the workspace root, failing with the command line on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // What xtask builds always carries its eBPF object: a build that cannot compile it fails
    // (a plain `cargo build` leaves it out with a warning instead; see interceptor/build.rs).
    cmd.args(args)
        .current_dir(workspace_root())
        .env("INTERCEPTOR_REQUIRE_EBPF", "1");
    run_cmd(&mut cmd)
}

/// Where cargo puts build output: $CARGO_TARGET_DIR, or target/ in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .map(|d| {
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src() -> Result<()> {
    let nightly = nightly();
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{nightly}"))
            .args(["--print", "sysroot"]),
    )
    .with_context(|| {
        format!(
            "the {nightly} toolchain is missing: the eBPF crate needs it \
             (install it with `rustup toolchain install {nightly}`)"
        )
    })?;
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the {nightly} toolchain");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &nightly]))
}

fn bpf_linker() -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against the nightly's libLLVM \
         (found: {})",
        if have.is_empty() { "none" } else { have.trim() }
    );
    let nightly = nightly();
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{nightly}"))
            .args(["--print", "sysroot"]),
    )
    .with_context(|| format!("rustc +{nightly} --print sysroot"))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // bpf-linker's build links `-lLLVM` from $LLVM_PREFIX/lib: give it the nightly's own
    // libLLVM under the plain name, so the linker and rustc agree on the LLVM version.
    let prefix = std::env::temp_dir().join(format!("icp-llvm-prefix-{}", std::process::id()));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let mut main_lib = None;
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("libLLVM") {
            continue;
        }
        let link = prefix_lib.join(&name);
        if !link.exists() {
            std::os::unix::fs::symlink(entry.path(), &link)?;
        }
        if name.starts_with("libLLVM.so.") {
            main_lib = Some(entry.path());
        }
    }
    let main_lib = main_lib.with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain is incomplete",
            lib.display()
        )
    })?;
    let plain = prefix_lib.join("libLLVM.so");
    if !plain.exists() {
        std::os::unix::fs::symlink(&main_lib, &plain)?;
    }
    let llvm_major = main_lib
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read the LLVM version from the nightly's libLLVM name")?
        .to_string();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let result = run_cmd(
        Command::new(cargo)
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            // The installed binary finds libLLVM through this rpath-free path at run time.
            .env(
                "RUSTFLAGS",
                format!("-C link-args=-Wl,-rpath,{}", lib.display()),
            ),
    );
    let _ = std::fs::remove_dir_all(&prefix);
    result.context("installing bpf-linker (needs crates.io)")?;
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        bail!("bpf-linker {BPF_LINKER_VERSION} installed but `bpf-linker --version` says {have:?}: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn apt_tools() -> Result<()> {
    let mut missing: Vec<&str> = APT_TOOLS
        .iter()
        .filter(|(cmd, _)| {
            // nginx and haproxy live in /usr/sbin, which a non-root PATH may lack.
            output(Command::new("sh").args([
                "-c",
                &format!("command -v {cmd} || test -x /usr/sbin/{cmd}"),
            ]))
            .is_none()
        })
        .map(|(_, pkg)| *pkg)
        .chain(
            APT_FILES
                .iter()
                .filter(|(file, _)| !Path::new(file).exists())
                .map(|(_, pkg)| *pkg),
        )
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    require_root("installing Debian packages with apt-get")?;
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    // nginx and haproxy must not start as system services (the benchmark runs them itself,
    // in the foreground): a policy-rc.d that denies every start, unless one is already there.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts during install\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install (needs Debian's package mirror)");
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn kubernetes_validate() -> Result<()> {
    pip_package(
        "kubernetes-validate",
        KUBERNETES_VALIDATE_VERSION,
        "kubernetes_validate",
        "the deploy/ tests validate the manifests with it",
    )
}

/// Installs `package==version` with pip unless that version is importable as `module`.
fn pip_package(package: &str, version: &str, module: &str, why: &str) -> Result<()> {
    let have = output(Command::new("python3").args([
        "-c",
        &format!(
            "import importlib.metadata, {module}; print(importlib.metadata.version('{package}'))"
        ),
    ]))
    .unwrap_or_default();
    if have.trim() == version {
        return Ok(());
    }
    eprintln!(
        "setup: installing the Python package {package} {version} (found: {})",
        if have.trim().is_empty() {
            "none"
        } else {
            have.trim()
        }
    );
    if output(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
        bail!(
            "python3 with pip is missing: {why} (Python package {package}; on Debian: \
             apt-get install python3-pip)"
        );
    }
    run_cmd(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{package}=={version}"),
    ]))
    .with_context(|| {
        format!(
            "pip install {package} (needs PyPI; a Python that pip calls \"externally \
             managed\" needs a virtualenv on PATH first)"
        )
    })
}

/// The interop tests' gRPC peers: grpcio (C-core) for Python, @grpc/grpc-js for Node.
fn interop_peers() -> Result<()> {
    pip_package(
        "grpcio",
        GRPCIO_VERSION,
        "grpc",
        "the interop tests run grpcio (gRPC C-core) clients and servers",
    )?;
    let dir = workspace_root().join("tests/interop");
    let installed = std::fs::read_to_string(dir.join("node_modules/@grpc/grpc-js/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    if installed.as_deref() == Some(GRPC_JS_VERSION) {
        return Ok(());
    }
    if output(Command::new("node").arg("--version")).is_none()
        || output(Command::new("npm").arg("--version")).is_none()
    {
        bail!(
            "node and npm are missing: the interop tests run @grpc/grpc-js clients and servers \
             (on Debian: apt-get install nodejs npm)"
        );
    }
    eprintln!(
        "setup: installing @grpc/grpc-js {GRPC_JS_VERSION} into tests/interop/node_modules \
         (found: {})",
        installed.as_deref().unwrap_or("none")
    );
    // Exactly what package-lock.json records; no install scripts (none is needed).
    run_cmd(
        Command::new("npm")
            .args([
                "ci",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ])
            .current_dir(&dir),
    )
    .context("npm ci in tests/interop (needs the npm registry)")
}
