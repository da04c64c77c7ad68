//! `cargo xtask bench [--quick]`: builds the release binaries and runs the benchmark program
//! (tests/src/bin/bench.rs), which writes target/bench/summary.json and target/bench/<time>/.
use anyhow::Result;

use crate::setup;

pub fn run(quick: bool) -> Result<()> {
    setup::cargo(&[
        "build",
        "--release",
        "-p",
        "interceptor",
        "-p",
        "interceptor-tests",
        "--bins",
    ])?;
    let bin = setup::target_dir().join("release/bench");
    let out = setup::workspace_root().join("target/bench");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--out").arg(out);
    if quick {
        cmd.arg("--quick");
    }
    setup::run_cmd(&mut cmd)
}
