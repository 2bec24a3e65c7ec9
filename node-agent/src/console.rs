//! The agent's HTTP endpoint: health, and each VM's serial console log (kept by its
//! monitor, bounded and rotated) for `console` clients and people.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;

use crate::Error;
use crate::context::Context;

/// Largest tail served at once.
const MAX_TAIL: usize = 4 << 20;

#[derive(Deserialize)]
struct TailQuery {
    /// Bytes from the end (default 64 KiB).
    bytes: Option<usize>,
}

/// Serves until the process ends.
pub async fn serve(ctx: Arc<Context>) -> Result<(), Error> {
    let address = std::net::SocketAddr::new(ctx.settings.address, ctx.settings.http_port);
    let app = Router::new()
        .route("/healthz", get(health))
        .route("/vms/{namespace}/{name}/console", get(console))
        .with_state(ctx);
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|e| Error::io(format!("HTTP endpoint {address}"), e))?;
    tracing::info!(%address, "HTTP endpoint: /healthz, /vms/NAMESPACE/NAME/console");
    axum::serve(listener, app).await.map_err(|e| Error::io("HTTP endpoint", e))
}

async fn health(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    let body = serde_json::json!({
        "node": ctx.node(),
        "leased": ctx.leased(),
        "kvm": ctx.facts().map(|f| f.kvm.usable),
        "vms": ctx.supervisor.all().len(),
    });
    let code = if ctx.leased() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn console(
    State(ctx): State<Arc<Context>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<TailQuery>,
) -> impl IntoResponse {
    // Names are Kubernetes names: refuse anything that could leave the log directory.
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with('.')
    };
    if !valid(&namespace) || !valid(&name) {
        return (StatusCode::BAD_REQUEST, "namespace and name must be Kubernetes names\n".to_string().into_bytes());
    }
    let path = ctx.settings.serial_log(&namespace, &name);
    if !path.exists() {
        return (
            StatusCode::NOT_FOUND,
            format!("no console log for {namespace}/{name} on {}\n", ctx.node()).into_bytes(),
        );
    }
    let bytes = q.bytes.unwrap_or(64 << 10).min(MAX_TAIL);
    (StatusCode::OK, crate::monitor::read_log_tail(&path, bytes))
}
