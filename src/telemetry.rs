//! Structured logging. Log lines carry names, reasons and token hashes, never token plaintext.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter, except for
/// [`never_above_error`].
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn,kube_lease_manager=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => {
            registry.with(fmt::layer().json().flatten_event(true).with_filter(never_above_error())).init()
        }
        LogFormat::Text => registry.with(fmt::layer().with_ansi(false).with_filter(never_above_error())).init(),
    }
}

/// kube-client logs the whole body of a response it cannot decode (at WARN, and at DEBUG/TRACE for
/// some others), and a response can be a Secret. Nothing but its errors is ever printed, whatever
/// `RUST_LOG` says.
fn never_above_error() -> Targets {
    Targets::new().with_default(LevelFilter::TRACE).with_target("kube_client::client", LevelFilter::ERROR)
}
