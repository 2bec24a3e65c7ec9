//! `/metrics`, `/healthz` and `/readyz`.
//!
//! `/healthz` answers 200 while the process serves; `/readyz` 200 once this
//! replica is ready to act: a standby is ready (it only waits for the lease), a
//! leader once its stores have synced.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// Serves the endpoints on `address` until the process ends.
pub async fn serve(address: std::net::SocketAddr, metrics: Arc<Metrics>) -> Result<(), crate::Error> {
    let app = Router::new()
        .route("/metrics", get(|State(m): State<Arc<Metrics>>| async move { m.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                let leader = m.leader.get() == 1;
                if !leader || m.is_synced() {
                    (StatusCode::OK, if leader { "leader, synced" } else { "standby" })
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "leader, stores not synced yet")
                }
            }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| crate::Error::Io(format!("cannot listen on {address}: {e}")))?;
    tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await.map_err(|e| crate::Error::Io(format!("HTTP server: {e}")))
}
