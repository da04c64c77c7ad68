//! Builds the eBPF object (interceptor-ebpf) with the nightly toolchain and bpf-linker, so a
//! plain `cargo build` produces an agent with its kernel programs embedded.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest)
        .parent()
        .expect("the agent crate sits in the workspace");
    let ebpf_dir = root.join("interceptor-ebpf");
    // aya-build watches the eBPF crate; the shared types change the object too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("interceptor-common/src").display()
    );
    let ebpf_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");
    let package = aya_build::Package {
        name: "interceptor-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    // `nightly` unless INTERCEPTOR_EBPF_TOOLCHAIN names another: the image build pins a dated
    // nightly (deploy/Dockerfile), which rustup cannot install under the plain name.
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_EBPF_TOOLCHAIN");
    let pinned = std::env::var("INTERCEPTOR_EBPF_TOOLCHAIN").unwrap_or_default();
    let toolchain = if pinned.is_empty() {
        aya_build::Toolchain::Nightly
    } else {
        aya_build::Toolchain::Custom(&pinned)
    };
    // xtask and the image build set this: their agent must carry its kernel programs.
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_REQUIRE_EBPF");
    let required = std::env::var("INTERCEPTOR_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    match aya_build::build_ebpf([package], toolchain) {
        Ok(()) => Ok(()),
        Err(e) if required => Err(anyhow::anyhow!(
            "building the eBPF object failed: {e:#}\n\
             it needs the nightly toolchain with rust-src and bpf-linker 0.13.0: run `cargo xtask setup`"
        )),
        Err(e) => {
            // A plain `cargo build`/`cargo test` by a developer without the eBPF toolchain
            // still builds the agent, the proxy and their tests; only loading the datapath
            // fails, at run time, naming what is missing (bpf::BpfError::NotBuilt).
            println!("cargo:warning=building the agent WITHOUT its eBPF object: {e:#}");
            println!("cargo:warning=the proxy and its tests work; `interceptor run` will refuse to start. Install the toolchain with `cargo xtask setup` (nightly rust-src, bpf-linker 0.13.0) and rebuild");
            let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("interceptor");
            std::fs::write(out, [])?;
            Ok(())
        }
    }
}
