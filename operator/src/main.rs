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
    let cli = Cli::parse();
    drover_logging::init(drover_logging::LogFormat::Text);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), kubeconfig = ?cli.kubeconfig, "starting");
    tracing::error!("nothing to run yet: controllers for placement, DRS and HA arrive in later issues");
    ExitCode::from(2)
}
