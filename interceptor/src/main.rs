use clap::Parser;
use interceptor::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = interceptor::telemetry::init(&cli.log) {
        eprintln!("interceptor: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(args) => interceptor::app::run(args),
        Command::Status(args) => interceptor::app::status(&args),
        Command::Explain(args) => interceptor::app::explain(&args),
        Command::Uninstall(args) => interceptor::app::uninstall(&args),
        Command::Proxy(args) => interceptor::app::standalone_proxy(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on: what failed and why.
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
