//! `drover-operator`: see the library's documentation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use drover_operator::metrics::Metrics;
use drover_operator::settings::{Cli, Settings};
use drover_operator::{Error, http, leader, run};

async fn client(kubeconfig: Option<PathBuf>) -> Result<kube::Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| Error::Config(format!("no cluster configuration: {e}")))?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn serve(cli: Cli) -> Result<(), Error> {
    let settings = Arc::new(Settings::from_cli(&cli)?);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), identity = %settings.identity, "starting");
    let client = client(cli.kubeconfig.clone()).await?;
    let metrics = Arc::new(Metrics::new());
    let http = tokio::spawn(http::serve(settings.http_address, metrics.clone()));
    let lead = {
        let (client, settings, metrics) = (client.clone(), settings.clone(), metrics.clone());
        move || run::lead(client.clone(), settings.clone(), metrics.clone())
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
