//! PostgreSQL pooler (placeholder while the pooler is written).
pub mod auth;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{BoxFuture, Component};
use crate::config::{Config, PgConfig};

pub struct Pooler;

impl Pooler {
    pub fn new(_config: PgConfig, _root: &Config) -> Result<Arc<Pooler>, String> {
        Ok(Arc::new(Pooler))
    }
    pub async fn serve(self: Arc<Self>, _listener: TcpListener, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }
}

impl Component for Pooler {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn readiness(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
