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
/// The eBPF programs' records (`--bpf-log-level`) pass at their own level: asking for them is
/// enough to see them.
fn log_filter(level: &str, bpf_records: Option<&str>) -> String {
    let mut filter = match level {
        "debug" | "trace" => format!("info,proxy_userspace={level},switchyard={level}"),
        other => other.to_owned(),
    };
    if let Some(directive) = bpf_records {
        filter.push(',');
        filter.push_str(directive);
    }
    filter
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bpf_records = match &cli.command {
        Command::Run(args) => args.bpf_log_level.tracing_directive(),
        _ => None,
    };
    let filter = EnvFilter::try_new(log_filter(&cli.log_level, bpf_records))
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

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing_subscriber::EnvFilter;

    #[test]
    fn bpf_records_pass_at_their_own_level_whatever_the_agents_level() {
        assert_eq!(log_filter("info", None), "info");
        assert_eq!(
            log_filter("warn", Some("switchyard::bpf=debug")),
            "warn,switchyard::bpf=debug"
        );
        assert_eq!(
            log_filter("debug", Some("switchyard::bpf=trace")),
            "info,proxy_userspace=debug,switchyard=debug,switchyard::bpf=trace"
        );
        for filter in [
            log_filter("error", Some("switchyard::bpf=debug")),
            log_filter("switchyard=trace", Some("switchyard::bpf=warn")),
        ] {
            assert!(EnvFilter::try_new(&filter).is_ok(), "{filter}");
        }
    }
}
