//! `cargo xtask bench-connect`: builds and runs the connect() benchmark (tests/src/bin/bench-connect.rs).
use anyhow::Result;

use crate::setup;

pub fn run(connects: u32) -> Result<()> {
    setup::cargo(&["build", "--release", "-p", "interceptor-tests", "--bins"])?;
    let bin = setup::workspace_root().join("target/release/bench-connect");
    setup::run_cmd(std::process::Command::new(bin).arg(connects.to_string()))
}
