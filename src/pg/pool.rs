//! One pool of server connections per (database, user).
//!
//! A fair semaphore with `pool_size` permits bounds the connections: a
//! permit is taken before a connection is reused or opened and given back
//! when it returns to the pool or is closed, so the bound holds during
//! reconnect storms too. Waiters are served first come, first served.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::backend::{BackendError, ServerConn, ServerTarget};

/// Timeouts and limits of a pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub connect_timeout: Duration,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
    pub check_delay: Duration,
    pub max_prepared_statements: usize,
}

/// Failure to get a server connection.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("timed out after {0:?} waiting for a server connection (query_wait_timeout)")]
    Timeout(Duration),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("pool is closed")]
    Closed,
}

/// A server connection lent to one client, with the permit that counts it.
pub struct Checkout {
    pub conn: ServerConn,
    permit: OwnedSemaphorePermit,
}

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Metric handles of one pool, labelled `pool="database/user"`.
struct PoolMetrics {
    active: Gauge,
    idle: Gauge,
    waiting: Gauge,
    wait_seconds: Histogram,
    connects: Counter,
    queries: Counter,
    transactions: Counter,
}

/// Running totals of one pool, for the admin console's SHOW commands.
#[derive(Default)]
pub struct PoolStats {
    pub clients: AtomicUsize,
    pub queries: AtomicU64,
    pub transactions: AtomicU64,
    pub wait_us: AtomicU64,
    pub max_wait_us: AtomicU64,
}

/// Server connections for one (database, user).
pub struct Pool {
    pub stats: PoolStats,
    pub name: String,
    pub target: ServerTarget,
    pub settings: PoolSettings,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<ServerConn>>,
    active: AtomicUsize,
    waiting: AtomicUsize,
    /// ParameterStatus values of the server, learned from the first login
    /// and sent to each client at its login.
    server_params: Mutex<Option<Vec<(String, String)>>>,
    /// Pooler-wide statement names a server of this pool has parsed without
    /// error; a client's Parse of one is answered without a server.
    validated: Mutex<HashSet<String>>,
    metrics: PoolMetrics,
}

/// Upper bound on validated statement names remembered per pool.
const MAX_VALIDATED: usize = 100_000;

impl Pool {
    pub fn new(name: String, target: ServerTarget, settings: PoolSettings) -> Pool {
        let label = [("pool", name.clone())];
        let metrics = PoolMetrics {
            active: gauge!(
                "skiff_pg_server_connections",
                &[("pool", name.clone()), ("state", "active".into())]
            ),
            idle: gauge!(
                "skiff_pg_server_connections",
                &[("pool", name.clone()), ("state", "idle".into())]
            ),
            waiting: gauge!("skiff_pg_clients_waiting", &label),
            wait_seconds: histogram!("skiff_pg_checkout_wait_seconds", &label),
            connects: counter!("skiff_pg_server_connects_total", &label),
            queries: counter!("skiff_pg_queries_total", &label),
            transactions: counter!("skiff_pg_transactions_total", &label),
        };
        Pool {
            stats: PoolStats::default(),
            permits: Arc::new(Semaphore::new(settings.size)),
            name,
            target,
            settings,
            idle: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            server_params: Mutex::new(None),
            validated: Mutex::new(HashSet::new()),
            metrics,
        }
    }

    /// Waits up to `wait` for a server connection, reusing an idle one when
    /// it is still healthy and opening one otherwise.
    pub async fn checkout(&self, wait: Duration) -> Result<Checkout, CheckoutError> {
        let permit = match self.try_permit() {
            Some(permit) => permit,
            None => self.wait_for_permit(wait).await?,
        };
        self.checkout_with(permit).await
    }

    /// A permit when one is free now. It never overtakes queued waiters:
    /// tokio hands a released permit to the first waiter, not the pool.
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.metrics.wait_seconds.record(0.0);
        Some(permit)
    }

    /// Finishes a checkout once a permit is held.
    pub async fn checkout_with(
        &self,
        permit: OwnedSemaphorePermit,
    ) -> Result<Checkout, CheckoutError> {
        let conn = match self.take_idle().await {
            Some(conn) => conn,
            None => self.open().await?,
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        self.update_gauges();
        Ok(Checkout { conn, permit })
    }

    /// Queues for a permit behind earlier waiters, at most `wait`.
    async fn wait_for_permit(&self, wait: Duration) -> Result<OwnedSemaphorePermit, CheckoutError> {
        let started = Instant::now();
        self.set_waiting(1);
        let acquired = tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await;
        self.set_waiting(-1);
        let waited = started.elapsed();
        self.metrics.wait_seconds.record(waited.as_secs_f64());
        let waited_us = waited.as_micros() as u64;
        self.stats.wait_us.fetch_add(waited_us, Ordering::Relaxed);
        self.stats
            .max_wait_us
            .fetch_max(waited_us, Ordering::Relaxed);
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(CheckoutError::Closed),
            Err(_) => Err(CheckoutError::Timeout(wait)),
        }
    }

    async fn take_idle(&self) -> Option<ServerConn> {
        loop {
            let mut conn = self.idle.lock().pop()?;
            let now = Instant::now();
            if now.duration_since(conn.created) >= self.settings.lifetime
                || conn.closed_while_idle()
            {
                tracing::debug!(server = conn.id, "closing stale server connection");
                continue;
            }
            if now.duration_since(conn.last_used) >= self.settings.check_delay
                && !conn.check(self.settings.connect_timeout).await
            {
                tracing::debug!(server = conn.id, "server connection failed its check");
                continue;
            }
            return Some(conn);
        }
    }

    async fn open(&self) -> Result<ServerConn, CheckoutError> {
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        self.metrics.connects.increment(1);
        let conn = ServerConn::connect(
            id,
            &self.target,
            self.settings.connect_timeout,
            self.settings.max_prepared_statements,
        )
        .await
        .inspect_err(|err| {
            counter!("skiff_pg_errors_total", "kind" => "server_connect").increment(1);
            tracing::warn!(pool = %self.name, error = %err, "server login failed");
        })?;
        tracing::debug!(pool = %self.name, server = id, tls = conn.tls, "server connection opened");
        let mut params = self.server_params.lock();
        if params.is_none() {
            *params = Some(conn.login_params.clone());
        }
        Ok(conn)
    }

    /// Takes a connection opened outside the pool as an idle one, or closes
    /// it when the pool is full.
    pub fn adopt(&self, mut conn: ServerConn) {
        conn.id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        {
            let mut params = self.server_params.lock();
            if params.is_none() {
                *params = Some(conn.login_params.clone());
            }
        }
        match self.try_permit() {
            Some(permit) => {
                self.active.fetch_add(1, Ordering::Relaxed);
                self.checkin(Checkout { conn, permit });
            }
            None => {
                tokio::spawn(conn.terminate());
            }
        }
    }

    /// Gives a connection back; it is closed instead when it is too old.
    pub fn checkin(&self, mut checkout: Checkout) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        let conn = &mut checkout.conn;
        conn.last_used = Instant::now();
        let expired = conn.created.elapsed() >= self.settings.lifetime;
        if conn.tx_status == b'I' && !expired {
            self.idle.lock().push(checkout.conn);
        } else {
            tokio::spawn(checkout.conn.terminate());
        }
        drop(checkout.permit);
        self.update_gauges();
    }

    /// Drops a connection that is broken or in an unknown state.
    pub fn discard(&self, checkout: Checkout) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        tokio::spawn(checkout.conn.terminate());
        drop(checkout.permit);
        self.update_gauges();
    }

    /// Drops a connection whose query is still running: sends the server a
    /// cancel request first and keeps the pool slot until the connection is
    /// closed, so the server process is gone before the slot is reused.
    pub fn discard_running(&self, checkout: Checkout) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.update_gauges();
        let Checkout { conn, permit } = checkout;
        tokio::spawn(async move {
            let key = conn.cancel_key.clone();
            super::cancel::send_cancel(&key).await;
            conn.terminate().await;
            // The server process exits once it sees the cancel and the
            // closed socket; give it a moment before the slot is reused.
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(permit);
        });
    }

    /// Closes idle connections past `server_idle_timeout` or
    /// `server_lifetime`.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut closed = Vec::new();
        {
            let mut idle = self.idle.lock();
            let mut index = 0;
            while index < idle.len() {
                let conn = &idle[index];
                if now.duration_since(conn.last_used) >= self.settings.idle_timeout
                    || now.duration_since(conn.created) >= self.settings.lifetime
                {
                    closed.push(idle.swap_remove(index));
                } else {
                    index += 1;
                }
            }
        }
        for conn in closed {
            tokio::spawn(conn.terminate());
        }
        self.update_gauges();
    }

    /// Closes every idle connection, for shutdown and after a server restart.
    pub fn close_idle(&self) {
        let drained: Vec<ServerConn> = self.idle.lock().drain(..).collect();
        for conn in drained {
            tokio::spawn(conn.terminate());
        }
        self.update_gauges();
    }

    /// Server ParameterStatus values, once a connection has logged in.
    pub fn server_params(&self) -> Option<Vec<(String, String)>> {
        self.server_params.lock().clone()
    }

    /// Records that `statement` parsed without error on this pool's server.
    pub fn mark_validated(&self, statement: &str) {
        let mut validated = self.validated.lock();
        if validated.len() >= MAX_VALIDATED {
            validated.clear();
        }
        validated.insert(statement.to_string());
    }

    pub fn forget_validated(&self, statement: &str) {
        self.validated.lock().remove(statement);
    }

    pub fn is_validated(&self, statement: &str) -> bool {
        self.validated.lock().contains(statement)
    }

    pub fn count_query(&self) {
        self.metrics.queries.increment(1);
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_transaction(&self) {
        self.metrics.transactions.increment(1);
        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn active_count(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn set_waiting(&self, delta: isize) {
        if delta > 0 {
            self.waiting.fetch_add(1, Ordering::Relaxed);
        } else {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.metrics.waiting.set(self.waiting_count() as f64);
    }

    fn update_gauges(&self) {
        self.metrics.active.set(self.active_count() as f64);
        self.metrics.idle.set(self.idle_count() as f64);
    }
}
