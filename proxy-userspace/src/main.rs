//! The `switchyard` binary.
use std::io::IsTerminal as _;

use anyhow::Result;
use clap::Parser;
use proxy_userspace::{
    agent,
    cli::{Cli, Command, LogFormat},
    monitor, offline,
};
use tracing_subscriber::EnvFilter;

/// A bare level applies to Switchyard itself; dependencies (aya's relocation chatter) stay at
/// info at most. Anything else is used as a tracing filter as given.
fn log_filter(level: &str) -> String {
    match level {
        "debug" | "trace" => format!("info,proxy_userspace={level},switchyard={level}"),
        other => other.to_owned(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(log_filter(&cli.log_level))
        .map_err(|error| anyhow::anyhow!("invalid --log-level {:?}: {error}", cli.log_level))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(agent::run(*args)),
        Command::Cleanup(args) => offline::cleanup(&args),
        Command::Dump(args) => offline::dump(&args),
        Command::Inspect(args) => offline::inspect(&args),
        Command::Monitor(args) => monitor::run(&args),
    }
}
