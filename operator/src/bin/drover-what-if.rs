//! `drover-what-if`: what one DRS pass would do on the live cluster (or on a dump
//! of it), and why, without doing it. See `drover_operator::drs::what_if`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use drover_operator::Error;
use drover_operator::drs::what_if::{self, Dump};

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "drover-what-if", version, about = "What one DRS pass would do, and why, without doing it")]
struct Cli {
    /// Path of a kubeconfig; without it, the in-cluster configuration or $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the hosts' heartbeat Leases.
    #[arg(long, env = "DROVER_HEARTBEAT_NAMESPACE", default_value = drover_crds::contract::heartbeat::DEFAULT_NAMESPACE)]
    heartbeat_namespace: String,
    /// Read the cluster from this dump (JSON, as --dump writes it) instead of the API server.
    #[arg(long, conflicts_with = "dump")]
    from: Option<PathBuf>,
    /// Also write what was read from the API server to this file (JSON).
    #[arg(long)]
    dump: Option<PathBuf>,
}

async fn run(cli: Cli) -> Result<String, Error> {
    let dump = match &cli.from {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
            serde_json::from_str::<Dump>(&text)
                .map_err(|e| Error::Config(format!("{}: not a dump: {e}", path.display())))?
        }
        None => {
            let client =
                drover_kube::client(cli.kubeconfig.as_deref()).await.map_err(|e| Error::Config(e.to_string()))?;
            what_if::live(client, &cli.heartbeat_namespace).await?
        }
    };
    if let Some(path) = &cli.dump {
        std::fs::write(path, serde_json::to_string_pretty(&dump)?)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    }
    Ok(what_if::report(&what_if::passes(&dump)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-what-if: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drover-what-if: {e}");
            ExitCode::FAILURE
        }
    }
}
