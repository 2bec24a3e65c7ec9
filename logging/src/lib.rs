//! The one tracing set-up of Drover's programs (`drover-vmm`, `drover-agent`,
//! `drover-monitor`, `drover-operator`): the filter from `RUST_LOG` (default
//! `info`), lines on stderr, colours only on a terminal (logs kept in files stay
//! plain), as text for people or JSON for log pipelines.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for collectors.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`; a second call
/// (or a subscriber installed by someone else) is left as it is.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
