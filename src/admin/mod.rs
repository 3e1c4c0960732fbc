//! HTTP admin endpoint: `/metrics` (Prometheus), `/healthz`, `/readyz` and
//! `/status`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds shared by every `_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// A boxed future, used so components can be held as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A running job (PostgreSQL pooler, Redis router, log shipper) as the admin
/// endpoint sees it.
pub trait Component: Send + Sync {
    /// Short name used as the key in `/status` and `/readyz`.
    fn name(&self) -> &'static str;
    /// Checks that every configured upstream is reachable.
    fn readiness(&self) -> BoxFuture<'_, Result<(), String>>;
    /// JSON summary for `/status`.
    fn status(&self) -> serde_json::Value;
    /// Appends metrics in Prometheus text format that are computed at
    /// scrape time instead of recorded as they happen.
    fn render_metrics(&self, _out: &mut String) {}
}

/// Installs the global Prometheus recorder, once per process.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty");
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is already installed (tests run several
                // servers in one process): render from a private recorder.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    prometheus: PrometheusHandle,
    components: Arc<Vec<Arc<dyn Component>>>,
}

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    prometheus: PrometheusHandle,
    components: Vec<Arc<dyn Component>>,
    shutdown: CancellationToken,
) {
    let state = AdminState {
        prometheus,
        components: Arc::new(components),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "admin endpoint failed");
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = state.prometheus.render();
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    for component in state.components.iter() {
        component.render_metrics(&mut body);
    }
    ([("content-type", "text/plain; version=0.0.4")], body)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let mut failures = Vec::new();
    for component in state.components.iter() {
        if let Err(reason) = component.readiness().await {
            failures.push(format!("{}: {reason}", component.name()));
        }
    }
    if failures.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failures.join("\n")),
        )
    }
}

async fn status(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = serde_json::Map::new();
    body.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    for component in state.components.iter() {
        body.insert(component.name().into(), component.status());
    }
    Json(serde_json::Value::Object(body))
}
