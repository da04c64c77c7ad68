//! Project automation: toolchain set-up, tests, benchmarks. Every command installs what it
//! needs first (idempotently), so the README's two commands work on a fresh machine.

mod bench;
mod bench_connect;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "interceptor project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and system tools the build and tests need (idempotent).
    Setup {
        /// Only what building needs (nightly rust-src, bpf-linker): no apt, no pip. The image
        /// build (deploy/Dockerfile) uses it.
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, build, and run the demo: a node in network namespaces, the agent on the file
    /// source, one gRPC channel balanced over a Service's pods (needs root; no cluster).
    Demo,
    /// Set up, build, and run the balancer demo on loopback (no cluster needed; installing missing tools needs root).
    ProxyDemo,
    /// Set up, build everything (eBPF object included) and run the whole test suite.
    /// The end-to-end tests load the real eBPF object: run as root.
    Test {
        /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Compare interceptor with client-side round robin, kube-proxy, nginx and HAProxy on this
    /// machine, in network namespaces (needs root). Writes target/bench/summary.json and a
    /// results folder (table, chart).
    Bench {
        /// Reduced sweep (under 5 minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Measure connect() latency with the hook attached vs detached (needs root).
    BenchConnect {
        /// Connects per measurement; each of the 101 rounds measures every path once
        /// detached and once attached (2000 x 101 = 202k connects per path and state).
        #[arg(long, default_value_t = 2_000)]
        connects: u32,
    },
}

/// The tests crate's feature that enables the end-to-end tests.
const E2E: &str = "interceptor-tests/e2e";

/// The agent's feature that makes the streams engine its default HTTP/2 engine.
const STREAMS_ENGINE: &str = "streams-default";

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { build_only: true } => setup::build_tools(),
        Cmd::Setup { build_only: false } => setup::run(),
        Cmd::Test { args } => {
            setup::run()?;
            setup::require_root(
                "the end-to-end tests load eBPF programs and create network namespaces",
            )?;
            // Default members only: the eBPF crate is built by the agent's build.rs for the BPF
            // target, never for the host. `e2e` adds the privileged end-to-end tests, which a
            // plain `cargo test` leaves out.
            setup::cargo(&["build", "--all-targets", "--features", E2E])?;
            let mut test = vec!["test", "--features", E2E, "--"];
            test.extend(args.iter().map(String::as_str));
            setup::cargo(&test)?;
            // The proxy tests once more on the fallback HTTP/2 engine (`--h2-engine streams`):
            // the same contract holds for both.
            let mut fallback = vec![
                "test",
                "-p",
                "interceptor",
                "--tests",
                "--features",
                STREAMS_ENGINE,
                "--",
            ];
            fallback.extend(args.iter().map(String::as_str));
            setup::cargo(&fallback)
        }
        Cmd::Demo => {
            setup::run()?;
            setup::require_root(
                "the demo builds network namespaces and cgroups and loads eBPF programs",
            )?;
            build_and_run_bin("demo", false)
        }
        Cmd::ProxyDemo => {
            setup::run()?;
            build_and_run_bin("proxy-demo", true)
        }
        Cmd::Bench { quick } => {
            setup::run()?;
            setup::require_root(
                "the benchmark builds network namespaces and cgroups and loads eBPF programs",
            )?;
            bench::run(quick)
        }
        Cmd::BenchConnect { connects } => {
            setup::run()?;
            setup::require_root("the benchmark attaches eBPF programs to a cgroup")?;
            bench_connect::run(connects)
        }
    }
}

/// Builds the agent and the test programs, then runs the program `name` of the tests crate.
fn build_and_run_bin(name: &str, release: bool) -> Result<()> {
    let mut build = vec!["build"];
    if release {
        build.push("--release");
    }
    build.extend(["-p", "interceptor", "-p", "interceptor-tests", "--bins"]);
    setup::cargo(&build)?;
    let profile = if release { "release" } else { "debug" };
    let bin = setup::workspace_root().join(format!("target/{profile}/{name}"));
    setup::run_cmd(&mut std::process::Command::new(bin))
}
