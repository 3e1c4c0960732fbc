//! PostgreSQL pooler: accepts client connections, authenticates them and
//! multiplexes their transactions onto bounded pools of server connections.

mod admin;
pub mod auth;
mod backend;
mod cancel;
mod capture;
mod exporter;
mod frontend;
mod manage;
mod params;
mod pending;
mod pipeline;
pub mod plan;
mod pool;
mod prepared;
pub mod protocol;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{BoxFuture, Component};
use crate::config::{ClientSslMode, Config, PgConfig, PgDatabase, SslMode};
use crate::control::Control;
use crate::logship::capture::Capture;
use crate::logship::Shipper;
use crate::threads::SessionThreads;
use crate::tls::{self, TlsAcceptor, TlsConnector, Verify};

use self::auth::UserList;
use self::backend::{ServerTarget, ServerTls};
use self::cancel::CancelRegistry;
use self::pool::{Pool, PoolSettings};
use self::prepared::Registry;

/// Failure to set up the pooler.
#[derive(Debug, thiserror::Error)]
pub enum PoolerError {
    #[error(transparent)]
    Users(#[from] auth::UserListError),
    #[error("[postgres] TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("database {database:?}: {source}")]
    DatabaseTls {
        database: String,
        source: crate::tls::TlsError,
    },
}

/// State shared by every client session.
pub struct Pooler {
    /// Replaced by a reload; read with `config()`.
    config: ArcSwap<PgConfig>,
    /// Replaced by a reload; read with `users()`.
    users: ArcSwap<UserList>,
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    cancels: Arc<CancelRegistry>,
    statements: Registry,
    clients: AtomicUsize,
    next_client_id: AtomicU64,
    /// Log-table capture, when `[[logship.capture]]` lists tables.
    capture: Option<Arc<capture::CaptureHook>>,
    /// Held while a new pool's first server login runs.
    pool_creation: tokio::sync::Mutex<()>,
    /// Databases paused by the admin console.
    pauses: Mutex<manage::PauseState>,
    /// Woken when a RESUME lifts a pause, and when shutdown begins.
    pause_lifted: tokio::sync::Notify,
    /// Set when shutdown begins; new pools then end their waits for RESUME.
    stopping: std::sync::atomic::AtomicBool,
    /// Databases DISABLE closed to new clients.
    disabled: Mutex<std::collections::HashSet<String>>,
    /// Reload, shutdown and the other jobs, for the admin console.
    control: std::sync::OnceLock<Weak<Control>>,
    /// TLS of each database's server connections, by database name; absent
    /// for `sslmode` `disable`.
    server_tls: HashMap<String, ServerTls>,
    /// TLS for clients, unless `client_tls_sslmode` is `disable`.
    client_tls: Option<TlsAcceptor>,
}

impl Pooler {
    /// Sets up the pooler; `shipper` receives captured log-table rows.
    pub fn new(
        config: PgConfig,
        root: &Config,
        shipper: Option<Shipper>,
    ) -> Result<Arc<Pooler>, PoolerError> {
        let users = UserList::load(&config, root)?;
        let server_tls = server_tls_settings(&config, root)?;
        let client_tls = client_tls_settings(&config, root)?;
        let captures = root
            .logship
            .as_ref()
            .map(|l| l.capture.as_slice())
            .unwrap_or(&[]);
        let capture = match shipper {
            Some(shipper) if !captures.is_empty() => Some(Arc::new(capture::CaptureHook {
                capture: Capture::new(captures),
                shipper,
            })),
            _ => None,
        };
        Ok(Arc::new(Pooler {
            config: ArcSwap::from_pointee(config),
            users: ArcSwap::from_pointee(users),
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::new(CancelRegistry::default()),
            statements: Registry::default(),
            clients: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(1),
            capture,
            pool_creation: tokio::sync::Mutex::new(()),
            pauses: Mutex::new(manage::PauseState::default()),
            pause_lifted: tokio::sync::Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            disabled: Mutex::new(std::collections::HashSet::new()),
            control: std::sync::OnceLock::new(),
            server_tls,
            client_tls,
        }))
    }

    /// Accepts clients until `shutdown` and runs their sessions on
    /// `threads`, then waits for running transactions to finish, at most
    /// `shutdown_timeout`, closes the idle server connections and stops
    /// the threads.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        threads: SessionThreads,
        shutdown: CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        let mut next_thread = 0u64;
        let reaper = tokio::spawn(self.clone().reap_idle(shutdown.clone()));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        // The session moves to a session thread's runtime,
                        // which registers the socket with its own reactor.
                        let stream = match stream.into_std() {
                            Ok(stream) => stream,
                            Err(err) => {
                                tracing::warn!(error = %err, "accept failed");
                                continue;
                            }
                        };
                        let pooler = self.clone();
                        let token = shutdown.clone();
                        let session = tracker.track_future(async move {
                            match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => {
                                    frontend::handle_client(pooler, stream, peer, token).await;
                                }
                                Err(err) => tracing::warn!(error = %err, "accept failed"),
                            }
                        });
                        threads.spawn(next_thread, session);
                        next_thread = next_thread.wrapping_add(1);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(listener);
        self.cancels.shut_down();
        // No RESUME can come now: clients waiting on a paused pool are in
        // no transaction, so they end instead of holding up the drain.
        self.stop_pause_waits();
        tracker.close();
        let drained = tokio::time::timeout(self.config().shutdown_timeout, tracker.wait()).await;
        if drained.is_err() {
            tracing::warn!(
                clients = self.clients.load(Ordering::Relaxed),
                "shutdown timeout reached with clients still in a transaction"
            );
        }
        reaper.abort();
        // Server connections are registered with the session threads'
        // reactors, so they are closed before the threads stop.
        let pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
        for pool in pools {
            pool.close_idle_now().await;
        }
        drop(threads);
    }

    async fn reap_idle(self: Arc<Self>, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        while !shutdown.is_cancelled() {
            interval.tick().await;
            let pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
            for pool in pools {
                pool.reap();
            }
        }
    }

    /// Gives the admin console access to process-wide actions.
    pub fn set_control(&self, control: &Arc<Control>) {
        let _ = self.control.set(Arc::downgrade(control));
    }

    fn control(&self) -> Option<Arc<Control>> {
        self.control.get().and_then(Weak::upgrade)
    }

    fn config(&self) -> arc_swap::Guard<Arc<PgConfig>> {
        self.config.load()
    }

    fn users(&self) -> arc_swap::Guard<Arc<UserList>> {
        self.users.load()
    }

    fn database(&self, name: &str) -> Option<PgDatabase> {
        self.config()
            .databases
            .iter()
            .find(|db| db.name == name)
            .cloned()
    }

    /// The pool for a (database, user), if one exists.
    fn existing_pool(&self, db: &PgDatabase, user: &str) -> Option<Arc<Pool>> {
        let key = (db.name.clone(), user.to_string());
        self.pools.lock().get(&key).cloned()
    }

    /// Where and as whom the pool of a (database, user) logs in.
    fn target_for(&self, db: &PgDatabase, user: &str) -> ServerTarget {
        ServerTarget {
            host: db.host.clone(),
            port: db.port,
            database: db.name.clone(),
            tls: self.server_tls.get(&db.name).cloned(),
            dbname: db.server_dbname().to_string(),
            user: db.user.clone().unwrap_or_else(|| user.to_string()),
            password: db
                .password
                .clone()
                .or_else(|| self.users().plain_password(user).map(str::to_string)),
            generation: 0,
        }
    }

    /// The pool for a (database, user), created on first use.
    fn pool_for(&self, db: &PgDatabase, user: &str) -> Arc<Pool> {
        let key = (db.name.clone(), user.to_string());
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get(&key) {
            return pool.clone();
        }
        let target = self.target_for(db, user);
        let settings = pool_settings(&self.config(), db);
        let pool = Arc::new(Pool::new(format!("{}/{}", db.name, user), target, settings));
        if self.pauses.lock().covers(&db.name) {
            pool.pause();
        }
        if self.stopping.load(Ordering::Acquire) {
            pool.stop_waiting();
        }
        pools.insert(key, pool.clone());
        pool
    }

    fn all_pools(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools
    }
}

/// Pool settings of a database under a config.
fn pool_settings(config: &PgConfig, db: &PgDatabase) -> PoolSettings {
    PoolSettings {
        size: config.pool_size(db),
        connect_timeout: config.server_connect_timeout,
        lifetime: config.server_lifetime,
        idle_timeout: config.server_idle_timeout,
        check_delay: config.server_check_delay,
        max_prepared_statements: config.max_prepared_statements,
        wait_timeout: config.query_wait_timeout,
    }
}

/// Builds the TLS settings of each database's server connections, loading
/// each CA file once.
pub fn server_tls_settings(
    config: &PgConfig,
    root: &Config,
) -> Result<HashMap<String, ServerTls>, PoolerError> {
    let mut connectors: HashMap<(Verify, Option<String>), TlsConnector> = HashMap::new();
    let mut settings = HashMap::new();
    for db in &config.databases {
        let requested = config.server_tls(db);
        let verify = match requested.mode {
            SslMode::Disable => continue,
            SslMode::Prefer => Verify::Nothing,
            // libpq: a root certificate makes `require` check the chain.
            SslMode::Require if requested.ca_file.is_some() => Verify::Chain,
            SslMode::Require => Verify::Nothing,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::VerifyFull => Verify::ChainAndName,
        };
        let in_database = |source| PoolerError::DatabaseTls {
            database: db.name.clone(),
            source,
        };
        let server_name = match tls::server_name(&db.host) {
            Ok(name) => name,
            Err(err) if verify == Verify::ChainAndName => return Err(in_database(err)),
            // Only SNI uses the name when the certificate's name is not
            // checked.
            Err(_) => tls::server_name("localhost").map_err(in_database)?,
        };
        let key = (verify, requested.ca_file.clone());
        let connector = match connectors.get(&key) {
            Some(connector) => connector.clone(),
            None => {
                let roots = match (&requested.ca_file, verify) {
                    (_, Verify::Nothing) => Arc::new(rustls::RootCertStore::empty()),
                    (Some(file), _) => {
                        tls::load_roots(Some(&root.resolve_path(file))).map_err(in_database)?
                    }
                    (None, _) => tls::load_roots(None).map_err(in_database)?,
                };
                let client = tls::client_config(verify, roots).map_err(in_database)?;
                let connector = TlsConnector::from(client);
                connectors.insert(key, connector.clone());
                connector
            }
        };
        settings.insert(
            db.name.clone(),
            ServerTls {
                mode: requested.mode,
                connector,
                server_name,
            },
        );
    }
    Ok(settings)
}

/// Loads the certificate and key skiff presents to clients, unless client
/// TLS is off.
pub fn client_tls_settings(
    config: &PgConfig,
    root: &Config,
) -> Result<Option<TlsAcceptor>, PoolerError> {
    if config.client_tls_sslmode == ClientSslMode::Disable {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&config.client_tls_cert_file, &config.client_tls_key_file)
    else {
        return Ok(None);
    };
    let server = tls::server_config(&root.resolve_path(cert), &root.resolve_path(key))?;
    Ok(Some(TlsAcceptor::from(server)))
}

impl Component for Pooler {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn readiness(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for db in &self.config().databases {
                let addr = format!("{}:{}", db.host, db.port);
                let connect = tokio::net::TcpStream::connect(&addr);
                match tokio::time::timeout(Duration::from_secs(2), connect).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Err(format!("database {}: {addr}: {err}", db.name)),
                    Err(_) => return Err(format!("database {}: {addr}: timed out", db.name)),
                }
            }
            Ok(())
        })
    }

    fn status(&self) -> serde_json::Value {
        let pools: Vec<serde_json::Value> = self
            .all_pools()
            .iter()
            .map(|pool| {
                serde_json::json!({
                    "pool": pool.name,
                    "server_active": pool.active_count(),
                    "server_idle": pool.idle_count(),
                    "clients_waiting": pool.waiting_count(),
                    "pool_size": pool.settings().size,
                })
            })
            .collect();
        serde_json::json!({
            "clients": self.clients.load(Ordering::Relaxed),
            "prepared_statements": self.statements.len(),
            "pools": pools,
        })
    }

    fn render_metrics(&self, out: &mut String) {
        exporter::render(self, out);
    }
}
