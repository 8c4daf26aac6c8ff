use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use clusteros::cli::{Cli, Command};
use clusteros::logging::{DEPENDENCY_WINDOW, RateLimitDependencies};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Logs go to the journal (with structured fields) when stderr is connected to it, else to stderr.
/// openraft's WARN and ERROR lines are rate-limited per source line (see `clusteros::logging`).
fn init_logging() {
    let filter = EnvFilter::try_from_env("CLUSTEROS_LOG").unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let limit = || RateLimitDependencies::new(DEPENDENCY_WINDOW);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if journal && let Ok(layer) = tracing_journald::layer() {
        let layer = layer.with_field_prefix(None).with_syslog_identifier("clusteros".into());
        tracing_subscriber::registry().with(filter).with(layer.with_filter(limit())).init();
        return;
    }
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    tracing_subscriber::registry().with(filter).with(layer.with_filter(limit())).init();
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let socket_given = matches.value_source("socket") != Some(clap::parser::ValueSource::DefaultValue);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let is_agent = matches!(cli.command, Command::Agent(_));
    if is_agent {
        init_logging();
    }
    let rt = if is_agent {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(clusteros::cli::run(cli, socket_given))
}
