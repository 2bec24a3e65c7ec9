//! `drover-operator`: Drover's operator: placement, DRS and HA for the cluster's VMs.
//!
//! A thin shell for now: it parses its command line and logs; controllers for placement, DRS and HA arrive in later issues.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "drover-operator", version, about = "Drover's operator: placement, DRS and HA for the cluster's VMs")]
struct Cli {
    /// Path of a kubeconfig; without it, the in-cluster configuration or $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs in files (the agent keeps them) stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), kubeconfig = ?cli.kubeconfig, "starting");
    tracing::error!("nothing to run yet: controllers for placement, DRS and HA arrive in later issues");
    ExitCode::from(2)
}
