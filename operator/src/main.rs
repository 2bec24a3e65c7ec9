//! `drover-operator`: see the library's documentation.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use drover_operator::metrics::Metrics;
use drover_operator::settings::{Cli, Settings};
use drover_operator::{Error, heartbeats, http, leader, run};

async fn serve(cli: Cli) -> Result<(), Error> {
    let settings = Arc::new(Settings::from_cli(&cli)?);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), identity = %settings.identity, "starting");
    let client = drover_kube::client(cli.kubeconfig.as_deref()).await.map_err(|e| Error::Config(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let http = tokio::spawn(http::serve(settings.http_address, metrics.clone()));
    // Standbys time the hosts' heartbeats too: a new leader knows how long each
    // host has been silent.
    let heartbeats = heartbeats::Heartbeats::start(client.clone(), settings.heartbeat_namespace.clone());
    let lead = {
        let (client, settings, metrics) = (client.clone(), settings.clone(), metrics.clone());
        move || run::lead(client.clone(), settings.clone(), metrics.clone(), heartbeats.clone())
    };
    tokio::select! {
        result = leader::run(client, &settings, metrics, lead) => result,
        result = http => result.map_err(|e| Error::Io(e.to_string()))?,
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: stopping");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    drover_logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
