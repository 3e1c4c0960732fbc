//! Log shipping: records from the PostgreSQL capture and from the PutLogs
//! ingest endpoint are batched into log groups, made durable in the spool,
//! and delivered to SLS (or NDJSON files) at least once.
//!
//! Data path: [`Shipper::submit`] → [`batcher`] → [`spool`] → [`deliver`] →
//! [`sink`]. [`ingest`] and [`capture`] are the sources.

pub mod batcher;
pub mod capture;
pub mod deadletter;
pub mod deliver;
pub mod ingest;
pub mod proto;
pub mod record;
mod reload;
pub mod sign;
pub mod sink;
pub mod spool;
pub mod time;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{BoxFuture, Component};
use crate::config::{Config, LogshipConfig};

pub use batcher::{Shipper, SubmitError};
pub use record::Record;

/// Failure to start the log shipper.
#[derive(Debug, thiserror::Error)]
pub enum LogshipError {
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
    #[error("file sink {dir}: {source}")]
    FileSink { dir: String, source: std::io::Error },
    #[error("[logship.sls]: {0}")]
    Sls(String),
    #[error("[logship.ingest] cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// The running log shipper.
pub struct Logship {
    shipper: Shipper,
    spool: Arc<spool::Spool>,
    /// The section in force, which a reload compares against.
    config: Mutex<LogshipConfig>,
    delivery_settings: Arc<ArcSwap<deliver::DeliverySettings>>,
    ingest_state: Option<Arc<ingest::IngestState>>,
    ingest_addr: Option<SocketAddr>,
    shutdown_timeout: Duration,
    ingest_shutdown: CancellationToken,
    batcher_shutdown: CancellationToken,
    abandon: CancellationToken,
    stop_delivery: CancellationToken,
    /// Makes delivery send spooled batches without waiting for `linger`.
    drain: CancellationToken,
    tasks: Mutex<Option<Tasks>>,
}

struct Tasks {
    ingest: Option<JoinHandle<()>>,
    batcher: JoinHandle<()>,
    delivery: JoinHandle<()>,
}

impl Logship {
    /// Opens the spool, builds the sink, and starts the batcher, delivery
    /// and (when configured) the ingest endpoint.
    pub async fn start(
        config: &LogshipConfig,
        root: &Config,
    ) -> Result<Arc<Logship>, LogshipError> {
        let spool_dir = root.resolve_path(&config.spool_dir);
        let spool = spool::Spool::open(&spool_dir, config.max_spool_bytes).map_err(|source| {
            LogshipError::Spool {
                dir: spool_dir.display().to_string(),
                source,
            }
        })?;
        let spool = Arc::new(spool);
        let (sink, backoff) = build_sink(config, root)?;
        let sink_name = sink.name();
        let delivery_settings = Arc::new(ArcSwap::from_pointee(deliver::DeliverySettings {
            sink: Arc::new(sink),
            backoff,
            linger: config.linger,
            max_batch_bytes: config.max_batch_bytes,
            max_batch_count: config.max_batch_count,
        }));
        let ingest_listener = match &config.ingest {
            Some(ingest) => Some(
                tokio::net::TcpListener::bind(&ingest.listen)
                    .await
                    .map_err(|source| LogshipError::Bind {
                        addr: ingest.listen.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let ingest_addr = ingest_listener.as_ref().and_then(|l| l.local_addr().ok());

        let batcher_shutdown = CancellationToken::new();
        let abandon = CancellationToken::new();
        let stop_delivery = CancellationToken::new();
        let drain = CancellationToken::new();
        let ingest_shutdown = CancellationToken::new();
        let limits = batcher::BatchLimits {
            max_batch_bytes: config.max_batch_bytes,
            max_batch_count: config.max_batch_count,
            on_full: config.on_full,
        };
        let (shipper, batcher_task) = Shipper::start(
            spool.clone(),
            limits,
            batcher_shutdown.clone(),
            abandon.clone(),
        );
        let delivery = deliver::Delivery {
            spool: spool.clone(),
            dead_letter: deadletter::DeadLetter::new(&spool_dir, config.max_dead_letter_bytes),
            settings: delivery_settings.clone(),
            drain: drain.clone(),
        };
        let delivery_task = tokio::spawn(delivery.run(stop_delivery.clone()));
        let mut ingest_state = None;
        let ingest_task = match (ingest_listener, &config.ingest) {
            (Some(listener), Some(ingest_config)) => {
                let state =
                    ingest::IngestState::new(ingest_config, config.sls.as_ref(), shipper.clone());
                ingest_state = Some(state.clone());
                tracing::info!(listen = %ingest_config.listen, "logship ingest listening");
                Some(tokio::spawn(ingest::serve(
                    listener,
                    ingest_config.max_connections,
                    ingest_config.idle_timeout,
                    state,
                    ingest_shutdown.clone(),
                )))
            }
            _ => None,
        };
        let (bytes, batches, _) = spool.usage();
        tracing::info!(spool = %spool_dir.display(), sink = sink_name, spooled_batches = batches,
            spooled_bytes = bytes, "log shipper started");
        Ok(Arc::new(Logship {
            shipper,
            spool,
            config: Mutex::new(config.clone()),
            delivery_settings,
            ingest_state,
            ingest_addr,
            shutdown_timeout: config.shutdown_timeout,
            ingest_shutdown,
            batcher_shutdown,
            abandon,
            stop_delivery,
            drain,
            tasks: Mutex::new(Some(Tasks {
                ingest: ingest_task,
                batcher: batcher_task,
                delivery: delivery_task,
            })),
        }))
    }

    /// Returns the handle that sources submit records through.
    pub fn shipper(&self) -> Shipper {
        self.shipper.clone()
    }

    /// Returns the address the ingest endpoint listens on, when configured.
    pub fn ingest_addr(&self) -> Option<SocketAddr> {
        self.ingest_addr
    }

    /// Stops the sources, flushes open batches to the spool, and delivers
    /// spooled batches for up to `shutdown_timeout`. Batches still
    /// undelivered then stay in the spool for the next start.
    pub async fn shutdown(&self) {
        let Some(tasks) = self.tasks.lock().take() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let abandon = self.abandon.clone();
        let stop = self.stop_delivery.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            abandon.cancel();
            stop.cancel();
        });
        self.drain.cancel();
        self.ingest_shutdown.cancel();
        if let Some(ingest) = tasks.ingest {
            let _ = ingest.await;
        }
        self.batcher_shutdown.cancel();
        let _ = tasks.batcher.await;
        while self.spool.first().is_some() && !self.stop_delivery.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_delivery.cancel();
        let _ = tasks.delivery.await;
        timer.abort();
        let (bytes, batches, _) = self.spool.usage();
        tracing::info!(
            spooled_batches = batches,
            spooled_bytes = bytes,
            "log shipper stopped"
        );
    }
}

fn build_sink(
    config: &LogshipConfig,
    root: &Config,
) -> Result<(sink::Sink, deliver::Backoff), LogshipError> {
    if let Some(sls) = &config.sls {
        let backoff = deliver::Backoff {
            initial: sls.retry_initial_backoff,
            max: sls.retry_max_backoff,
        };
        let sink = sink::SlsSink::new(sls).map_err(LogshipError::Sls)?;
        return Ok((sink::Sink::Sls(Box::new(sink)), backoff));
    }
    let file_config = config.file.clone().unwrap_or_default();
    let dir = root.resolve_path(&file_config.path);
    let sink = sink::FileSink::new(&dir, file_config.max_file_bytes).map_err(|source| {
        LogshipError::FileSink {
            dir: dir.display().to_string(),
            source,
        }
    })?;
    let backoff = deliver::Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };
    Ok((sink::Sink::File(sink), backoff))
}

impl Component for Logship {
    fn name(&self) -> &'static str {
        "logship"
    }

    fn readiness(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let (bytes, _, _) = self.spool.usage();
            if bytes >= self.spool.max_bytes() {
                return Err(format!("spool is full ({bytes} bytes)"));
            }
            Ok(())
        })
    }

    fn status(&self) -> serde_json::Value {
        let (bytes, batches, age) = self.spool.usage();
        serde_json::json!({
            "sink": self.delivery_settings.load().sink.name(),
            "spool_bytes": bytes,
            "spool_max_bytes": self.spool.max_bytes(),
            "spool_batches": batches,
            "spool_oldest_batch_age_seconds": age,
            "ingest_listen": self.ingest_addr.map(|a| a.to_string()),
        })
    }
}
