//! Process lifecycle: starts every configured listener, handles signals and
//! drains on shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Component};
use crate::config::Config;
use crate::control::Control;
use crate::logship::Logship;
use crate::pg;
use crate::redis::RedisRouter;
use crate::threads::SessionThreads;

/// Failure to start skiff.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

/// Format of the log lines written to standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event, with the spans it happened in.
    #[default]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `message`, the
    /// event's fields, and the current span (such as the client
    /// connection with its `peer` address) under `span`.
    Json,
}

/// Sets up logging from `SKIFF_LOG` (or `RUST_LOG`), default `info`.
pub fn init_tracing(format: LogFormat) {
    let filter = std::env::var("SKIFF_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let filter = tracing_subscriber::EnvFilter::new(filter);
    // Colours only on a terminal: container runtimes and log collectors
    // store the escape codes as they are.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Checks what `skiff check` can check beyond parsing: files the config
/// refers to exist and parse.
pub fn check(config: &Config) -> Result<(), String> {
    if let Some(pg_config) = &config.postgres {
        pg::auth::UserList::load(pg_config, config).map_err(|err| err.to_string())?;
        pg::server_tls_settings(pg_config, config).map_err(|err| err.to_string())?;
        pg::client_tls_settings(pg_config, config).map_err(|err| err.to_string())?;
    }
    if let Some(redis_config) = &config.redis {
        RedisRouter::new(redis_config_for(config, redis_config))?;
    }
    Ok(())
}

/// Returns the `[redis]` section, routes included, with its file paths resolved against the config
/// file's directory.
fn redis_config_for(
    config: &Config,
    redis: &crate::config::RedisConfig,
) -> crate::config::RedisConfig {
    let mut redis = redis.clone();
    if let Some(file) = &redis.tls_ca_file {
        redis.tls_ca_file = Some(config.resolve_path(file).display().to_string());
    }
    for route in &mut redis.routes {
        if let Some(file) = &route.tls_ca_file {
            route.tls_ca_file = Some(config.resolve_path(file).display().to_string());
        }
    }
    redis
}

/// Binds a TCP listener, naming the address on failure.
pub async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Runs every configured job until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), ServerError> {
    let prometheus = admin::install_recorder();
    // Histogram samples pile up until the next scrape; upkeep folds them in
    // so memory stays bounded when nothing scrapes /metrics.
    let upkeep_handle = prometheus.clone();
    let upkeep = tokio::spawn(async move {
        let mut interval = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            interval.tick().await;
            upkeep_handle.run_upkeep();
        }
    });
    let shutdown = CancellationToken::new();
    let mut components: Vec<Arc<dyn Component>> = Vec::new();
    let mut jobs = Vec::new();
    let mut pooler_handle = None;
    let mut redis_handle = None;

    // Before the pooler, so the capture can submit through its shipper.
    let mut logship = None;
    if let Some(logship_config) = &config.logship {
        let shipper = Logship::start(logship_config, &config)
            .await
            .map_err(|err| ServerError::Setup(err.to_string()))?;
        components.push(shipper.clone());
        logship = Some(shipper);
    }

    if let Some(pg_config) = &config.postgres {
        let shipper = logship.as_ref().map(|l| l.shipper());
        let pooler = pg::Pooler::new(pg_config.clone(), &config, shipper)
            .map_err(|err| ServerError::Setup(err.to_string()))?;
        let threads =
            SessionThreads::start("skiff-pg", crate::threads::worker_threads()).map_err(|err| {
                ServerError::Setup(format!("cannot start the postgres session threads: {err}"))
            })?;
        let listener = bind(&pg_config.listen).await?;
        tracing::info!(listen = %pg_config.listen, "postgres pooler listening");
        components.push(pooler.clone());
        pooler_handle = Some(pooler.clone());
        jobs.push(tokio::spawn(pooler.serve(
            listener,
            threads,
            shutdown.clone(),
        )));
    }

    if let Some(redis_config) = &config.redis {
        let router = RedisRouter::new(redis_config_for(&config, redis_config))
            .map_err(ServerError::Setup)?;
        // Started before the listener, so skiff exits when the session
        // threads cannot start (too few file descriptors, for example)
        // instead of running without its Redis listener.
        let threads = router.start_threads().map_err(|err| {
            ServerError::Setup(format!("cannot start the redis session threads: {err}"))
        })?;
        let listener = bind(&redis_config.listen).await?;
        tracing::info!(listen = %redis_config.listen, "redis router listening");
        components.push(router.clone());
        redis_handle = Some(router.clone());
        jobs.push(tokio::spawn(router.serve(
            listener,
            threads,
            shutdown.clone(),
        )));
    }

    let admin_listener = bind(&config.admin.listen).await?;
    tracing::info!(listen = %config.admin.listen, "admin endpoint listening");
    let admin_shutdown = CancellationToken::new();
    let admin_job = tokio::spawn(admin::serve(
        admin_listener,
        prometheus,
        components,
        admin_shutdown.clone(),
    ));

    let control = Control::new(
        config_path,
        config.clone(),
        pooler_handle.clone(),
        redis_handle,
        logship.clone(),
    );
    if let Some(pooler) = &pooler_handle {
        pooler.set_control(&control);
    }
    let mut signals = Signals::new()?;
    signals.wait_for_stop(&control).await;
    tracing::info!("shutting down: no new connections, draining");
    shutdown.cancel();
    // A second SIGTERM or SIGINT during the drain exits at once.
    tokio::spawn(async move {
        signals.wait_for_second_stop().await;
        tracing::warn!("second stop signal: exiting without finishing the drain");
        std::process::exit(0);
    });
    for job in jobs {
        let _ = job.await;
    }
    // After the pooler, so records it captured while draining reach the
    // spool; what delivery cannot finish in time stays spooled.
    if let Some(logship) = logship {
        logship.shutdown().await;
    }
    admin_shutdown.cancel();
    let _ = admin_job.await;
    upkeep.abort();
    tracing::info!("shutdown complete");
    Ok(())
}

/// The signals skiff reacts to.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, ServerError> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).map_err(ServerError::Signal)?,
            interrupt: signal(SignalKind::interrupt()).map_err(ServerError::Signal)?,
            hangup: signal(SignalKind::hangup()).map_err(ServerError::Signal)?,
        })
    }

    /// Waits for SIGTERM, SIGINT or the admin console's SHUTDOWN, and
    /// reloads the config on each SIGHUP meanwhile.
    async fn wait_for_stop(&mut self, control: &Arc<Control>) {
        let shutdown = control.shutdown_requested();
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return,
                _ = self.interrupt.recv() => return,
                _ = shutdown.cancelled() => return,
                _ = self.hangup.recv() => reload(control).await,
            }
        }
    }

    async fn wait_for_second_stop(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Reloads the config file, logging the outcome.
pub async fn reload(control: &Control) {
    match control.reload().await {
        Ok(notes) => {
            tracing::info!("config reloaded");
            for note in notes {
                tracing::warn!(%note, "config reload: setting not applied");
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "config reload rejected; the old config stays in force")
        }
    }
}
