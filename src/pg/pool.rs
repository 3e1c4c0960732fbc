//! One pool of server connections per (database, user).
//!
//! A fair semaphore with `pool_size` permits bounds the connections: a
//! permit is taken before a connection is reused or opened and given back
//! when it returns to the pool or is closed, so the bound holds during
//! reconnect storms too. Waiters are served first come, first served.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::backend::{BackendError, ServerConn, ServerTarget};
use super::cancel::{ServerKey, WaitFlag};
use super::params::{self, Settings};
use super::pipeline::{Behind, Delivery, Parked};
use super::protocol;

/// Timeouts and limits of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: usize,
    pub connect_timeout: Duration,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
    pub check_delay: Duration,
    pub max_prepared_statements: usize,
    /// Maximum wait for a server connection (`query_wait_timeout`), or
    /// zero for no limit. A reload applies it to the waits under way too.
    pub wait_timeout: Duration,
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
    #[error("skiff is shutting down and the database is paused")]
    ShuttingDown,
}

/// A server connection lent to one client, with the permit that counts it.
pub struct Checkout {
    pub conn: Box<ServerConn>,
    permit: OwnedSemaphorePermit,
}

/// ParameterStatus values a server sent at login, also encoded as the
/// messages that a client login overriding none of them gets.
pub struct ServerParams {
    pub pairs: Vec<(String, String)>,
    pub encoded: Bytes,
}

impl ServerParams {
    fn new(pairs: Vec<(String, String)>) -> ServerParams {
        let encoded = encode_parameters(&pairs);
        ServerParams { pairs, encoded }
    }
}

/// Encodes one ParameterStatus message per value.
fn encode_parameters(pairs: &[(String, String)]) -> Bytes {
    let mut encoded = BytesMut::new();
    for (name, value) in pairs {
        encoded.extend_from_slice(&protocol::parameter_status(name, value));
    }
    encoded.freeze()
}

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Metric handles of one pool, labelled `pool="database/user"`.
struct PoolMetrics {
    active: Gauge,
    idle: Gauge,
    waiting: Gauge,
    wait_seconds: Histogram,
    connects: Counter,
    /// Requests written behind another client's on a busy connection.
    queued: Counter,
    queries: Counter,
    transactions: Counter,
}

/// Running totals of one pool, for the admin console's SHOW commands and
/// the PgBouncer-compatible metrics.
#[derive(Default)]
pub struct PoolStats {
    pub clients: AtomicUsize,
    pub queries: AtomicU64,
    pub transactions: AtomicU64,
    pub wait_us: AtomicU64,
    pub max_wait_us: AtomicU64,
    /// Bytes read from this pool's clients.
    pub received_bytes: AtomicU64,
    /// Bytes written to this pool's clients.
    pub sent_bytes: AtomicU64,
    /// Time servers spent on requests, from the first request sent to the
    /// ReadyForQuery after the last one.
    pub query_us: AtomicU64,
    /// Time from the first request of a transaction to its end.
    pub transaction_us: AtomicU64,
    /// Server connections logging in now.
    pub logins: AtomicUsize,
    /// The clients waiting for a server connection.
    waits: Mutex<Waits>,
}

/// Clients waiting for a permit, and the state of the pool's wait
/// watchdog. One watchdog task per pool ends waits past their deadline,
/// instead of a timer per wait.
#[derive(Default)]
struct Waits {
    /// At most one entry per waiting client, ordered by ticket. Waits end
    /// mostly in ticket order, because permits are handed out first come,
    /// first served, so entries are removed near the front.
    queue: VecDeque<Wait>,
    /// The time the watchdog wakes up at next, when it sleeps until one.
    /// A wait whose deadline is earlier wakes it up.
    watched_until: Option<Instant>,
    /// The watchdog task was started.
    watchdog: bool,
}

/// One client's wait for a permit. Its deadline is `started` plus the
/// pool's current `wait_timeout`.
struct Wait {
    ticket: u64,
    started: Instant,
    /// Raised by the watchdog once the deadline passed, and taken then.
    expiry: Option<Arc<WaitFlag>>,
    /// The client's simple Query, when it may be written behind another.
    parked: Option<Arc<Parked>>,
}

/// One count in a gauge of things in progress, taken back on drop, so a
/// dropped future does not leave it behind.
struct InProgress<'a>(&'a AtomicUsize);

impl<'a> InProgress<'a> {
    fn start(count: &'a AtomicUsize) -> InProgress<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        InProgress(count)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

static NEXT_WAIT_TICKET: AtomicU64 = AtomicU64::new(1);

/// One client's wait for a permit. Dropping it ends the wait, also when
/// the client gives up and the waiting future is dropped.
struct Waiter<'a> {
    pool: &'a Pool,
    ticket: u64,
    started: Instant,
}

impl<'a> Waiter<'a> {
    /// Queues a wait that `expiry` ends at `deadline` (none for no limit),
    /// and starts the pool's watchdog or wakes it up when it would wake up
    /// later.
    fn start(
        pool: &'a Arc<Pool>,
        now: Instant,
        deadline: Option<Instant>,
        expiry: &Arc<WaitFlag>,
        parked: Option<&Arc<Parked>>,
    ) -> Waiter<'a> {
        let ticket = NEXT_WAIT_TICKET.fetch_add(1, Ordering::Relaxed);
        let wait = Wait {
            ticket,
            started: now,
            expiry: Some(expiry.clone()),
            parked: parked.cloned(),
        };
        let (start_watchdog, wake_watchdog) = {
            let mut waits = pool.stats.waits.lock();
            insert_by_ticket(&mut waits.queue, wait);
            let earlier = deadline
                .is_some_and(|deadline| waits.watched_until.is_none_or(|until| deadline < until));
            if earlier {
                waits.watched_until = deadline;
            }
            let start = !std::mem::replace(&mut waits.watchdog, true);
            (start, earlier)
        };
        if start_watchdog {
            tokio::spawn(watch_waits(Arc::downgrade(pool), pool.wait_added.clone()));
        } else if wake_watchdog {
            pool.wait_added.notify_one();
        }
        pool.set_waiting(1);
        Waiter {
            pool,
            ticket,
            started: now,
        }
    }
}

/// Inserts a wait in ticket order. Tickets are taken before the lock, so a
/// later ticket may be queued already, but rarely more than a few.
fn insert_by_ticket(queue: &mut VecDeque<Wait>, wait: Wait) {
    let later = queue
        .iter()
        .rev()
        .take_while(|queued| queued.ticket > wait.ticket)
        .count();
    queue.insert(queue.len() - later, wait);
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut waits = self.pool.stats.waits.lock();
        let queue = &mut waits.queue;
        // Waits mostly end in ticket order, so the front is tried first.
        if queue.front().is_some_and(|wait| wait.ticket == self.ticket) {
            queue.pop_front();
        } else if let Ok(index) = queue.binary_search_by_key(&self.ticket, |wait| wait.ticket) {
            queue.remove(index);
        }
        drop(waits);
        self.pool.set_waiting(-1);
        self.pool.record_wait(self.started);
    }
}

/// Runs the pool's wait watchdog: sleeps until the earliest deadline of
/// the queued waits, raises the expiry of each wait past its deadline, and
/// sleeps again. A wait with an earlier deadline than the one it sleeps
/// until wakes it up through `added`. It ends with its pool.
async fn watch_waits(pool: Weak<Pool>, added: Arc<Notify>) {
    loop {
        let notified = added.notified();
        tokio::pin!(notified);
        // Registered before the queue is read, so a wait queued after the
        // read wakes this loop up.
        notified.as_mut().enable();
        let next = match pool.upgrade() {
            Some(pool) => pool.expire_waits(Instant::now()),
            None => return,
        };
        match next {
            Some(deadline) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Server connections for one (database, user).
pub struct Pool {
    pub stats: PoolStats,
    pub name: String,
    /// Replaced by a reload or RECONNECT; see `ServerTarget::generation`.
    target: ArcSwap<ServerTarget>,
    /// The generation of `target`, read at every checkin without loading
    /// the target. Raised before `target` is replaced, so a connection
    /// opened with the old target in between counts as stale.
    generation: AtomicU64,
    /// Replaced by a reload.
    settings: ArcSwap<PoolSettings>,
    permits: Arc<Semaphore>,
    /// Permits to forget when they are released, because `pool_size`
    /// shrank while they were in use.
    permit_debt: AtomicUsize,
    /// Set by the admin console's PAUSE and KILL: checkouts wait for RESUME.
    paused: AtomicBool,
    /// Set when shutdown begins. A wait for RESUME then ends, because no
    /// RESUME can come any more.
    stopping: AtomicBool,
    resumed: Notify,
    /// Wakes the wait watchdog up for a wait that ends before the time it
    /// sleeps until, and when the pool is dropped.
    wait_added: Arc<Notify>,
    /// Boxed, because a connection moves in and out at every checkout and
    /// a box moves as one pointer.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    active: AtomicUsize,
    waiting: AtomicUsize,
    /// ParameterStatus values of the server, learned from the first login
    /// and sent to each client at its login.
    server_params: Mutex<Option<Arc<ServerParams>>>,
    /// The startup settings of the pool's last client to log in, shared
    /// with the next clients whose settings are equal.
    shared_settings: Mutex<Settings>,
    /// The login ParameterStatus messages last built for settings that
    /// override server values, with those settings.
    login_parameters: Mutex<Option<(Settings, Bytes)>>,
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
            queued: counter!("skiff_pg_queued_queries_total", &label),
            queries: counter!("skiff_pg_queries_total", &label),
            transactions: counter!("skiff_pg_transactions_total", &label),
        };
        Pool {
            stats: PoolStats::default(),
            permits: Arc::new(Semaphore::new(settings.size)),
            permit_debt: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            resumed: Notify::new(),
            wait_added: Arc::new(Notify::new()),
            name,
            generation: AtomicU64::new(target.generation),
            target: ArcSwap::from_pointee(target),
            settings: ArcSwap::from_pointee(settings),
            idle: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            server_params: Mutex::new(None),
            shared_settings: Mutex::new(Settings::default()),
            login_parameters: Mutex::new(None),
            validated: Mutex::new(HashSet::new()),
            metrics,
        }
    }

    /// Waits up to `query_wait_timeout` for a server connection, reusing
    /// an idle one when it is still healthy and opening one otherwise. A
    /// paused pool makes the wait last until RESUME, within the same
    /// timeout. The pool's wait watchdog raises `expiry` once the timeout
    /// has passed.
    pub async fn checkout(
        self: &Arc<Self>,
        expiry: &Arc<WaitFlag>,
        parked: Option<&Arc<Parked>>,
    ) -> Result<Checkout, CheckoutError> {
        let permit = match self.try_permit() {
            Some(permit) => permit,
            None => self.wait_for_permit(expiry, parked).await?,
        };
        self.checkout_with(permit).await
    }

    /// A permit when one is free now and the pool is not paused. It never
    /// overtakes queued waiters: tokio hands a released permit to the first
    /// waiter, not the pool.
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        if self.paused.load(Ordering::Acquire) {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.metrics.wait_seconds.record(0.0);
        Some(permit)
    }

    /// Gives a permit back, or forgets it while the pool is above a
    /// shrunken `pool_size`; returns true when it was forgotten, so the
    /// caller closes the connection that held it.
    fn release_permit(&self, permit: OwnedSemaphorePermit) -> bool {
        let owed = self
            .permit_debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                debt.checked_sub(1)
            });
        if owed.is_ok() {
            permit.forget();
            return true;
        }
        drop(permit);
        false
    }

    /// Returns the target new connections log in to.
    pub fn target(&self) -> Arc<ServerTarget> {
        self.target.load_full()
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Applies reloaded settings and target. A changed target starts a new
    /// generation: idle connections close now, busy ones when released.
    pub fn apply(&self, settings: PoolSettings, mut target: ServerTarget) {
        let current = self.target.load();
        target.generation = current.generation;
        let target_changed = !current.same_login(&target);
        drop(current);
        self.resize(settings.size);
        self.settings.store(Arc::new(settings));
        // The watchdog applies a new query_wait_timeout to the queued waits.
        self.wait_added.notify_one();
        if target_changed {
            target.generation += 1;
            self.generation.store(target.generation, Ordering::Release);
            self.target.store(Arc::new(target));
            self.close_idle();
        }
    }

    /// Starts a new generation with the same target, as RECONNECT does.
    pub fn reconnect(&self) {
        let mut target = (*self.target.load_full()).clone();
        target.generation += 1;
        self.generation.store(target.generation, Ordering::Release);
        self.target.store(Arc::new(target));
        self.close_idle();
    }

    /// Changes the number of permits. Permits in use above a smaller size
    /// are forgotten as they come back.
    fn resize(&self, size: usize) {
        let old = self.settings.load().size;
        if size > old {
            let mut grow = size - old;
            let repaid = self
                .permit_debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    Some(debt - debt.min(grow))
                })
                .map(|before| before.min(grow))
                .unwrap_or(0);
            grow -= repaid;
            self.permits.add_permits(grow);
        } else if size < old {
            let shrink = old - size;
            let forgotten = self.permits.forget_permits(shrink);
            self.permit_debt
                .fetch_add(shrink - forgotten, Ordering::AcqRel);
            let keep = size.saturating_sub(self.active_count());
            let surplus: Vec<Box<ServerConn>> = {
                let mut idle = self.idle.lock();
                let excess = idle.len().saturating_sub(keep);
                idle.drain(..excess).collect()
            };
            for conn in surplus {
                tokio::spawn(conn.terminate());
            }
            self.update_gauges();
        }
    }

    /// Makes new checkouts wait until `resume`.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.resumed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Ends the waits for RESUME, for shutdown: a client waiting on a
    /// paused pool is in no transaction and would only hold up the drain.
    pub fn stop_waiting(&self) {
        self.stopping.store(true, Ordering::Release);
        self.resumed.notify_waiters();
    }

    /// Waits while the pool is paused, until `expiry` is raised or
    /// shutdown.
    async fn wait_while_paused(&self, expiry: &WaitFlag) -> Result<(), CheckoutError> {
        // Most waits find the pool running: skip registering with `resumed`,
        // which takes its lock. A PAUSE right after this check is the same
        // as one just before the checkout began.
        if !self.is_paused() {
            return Ok(());
        }
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused() {
                return Ok(());
            }
            if self.stopping.load(Ordering::Acquire) {
                return Err(CheckoutError::ShuttingDown);
            }
            tokio::select! {
                _ = resumed => {}
                _ = expiry.raised() => return Err(self.timed_out()),
            }
        }
    }

    /// Finishes a checkout once a permit is held.
    pub async fn checkout_with(
        &self,
        permit: OwnedSemaphorePermit,
    ) -> Result<Checkout, CheckoutError> {
        let conn = match self.take_idle().await {
            Some(conn) => conn,
            // Boxed, because opening a connection is rare and its future
            // is large, and every checkout future is moved on each call.
            None => Box::pin(self.open()).await?,
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        self.update_gauges();
        Ok(Checkout { conn, permit })
    }

    /// Queues for a permit behind earlier waiters, until the watchdog
    /// raises `expiry`. The wait may be dropped midway (a cancel request or
    /// KILL ends it), so the waiting count is kept by a guard.
    async fn wait_for_permit(
        self: &Arc<Self>,
        expiry: &Arc<WaitFlag>,
        parked: Option<&Arc<Parked>>,
    ) -> Result<OwnedSemaphorePermit, CheckoutError> {
        let started = Instant::now();
        let timeout = self.settings.load().wait_timeout;
        let deadline = (!timeout.is_zero()).then(|| started + timeout);
        // No raise of an earlier wait can come any more: the watchdog
        // raises only waits still queued, and that one left the queue.
        expiry.lower();
        let waiter = Waiter::start(self, started, deadline, expiry, parked);
        let acquired = async {
            self.wait_while_paused(expiry).await?;
            tokio::select! {
                biased;
                permit = self.permits.clone().acquire_owned() => {
                    permit.map_err(|_| CheckoutError::Closed)
                }
                _ = expiry.raised() => Err(self.timed_out()),
            }
        }
        .await;
        drop(waiter);
        acquired
    }

    /// Counts a finished wait for a server connection.
    fn record_wait(&self, started: Instant) {
        let waited = started.elapsed();
        self.metrics.wait_seconds.record(waited.as_secs_f64());
        let waited_us = waited.as_micros() as u64;
        self.stats.wait_us.fetch_add(waited_us, Ordering::Relaxed);
        self.stats
            .max_wait_us
            .fetch_max(waited_us, Ordering::Relaxed);
    }

    async fn take_idle(&self) -> Option<Box<ServerConn>> {
        loop {
            let mut conn = self.idle.lock().pop()?;
            let now = Instant::now();
            let settings = self.settings.load();
            if now.duration_since(conn.created) >= settings.lifetime
                || conn.cancel_key.generation != self.generation.load(Ordering::Acquire)
                || conn.closed_while_idle()
            {
                tracing::debug!(server = conn.id, "closing stale server connection");
                continue;
            }
            if now.duration_since(conn.last_used) >= settings.check_delay
                && !Box::pin(conn.check(settings.connect_timeout)).await
            {
                tracing::debug!(server = conn.id, "server connection failed its check");
                continue;
            }
            return Some(conn);
        }
    }

    async fn open(&self) -> Result<Box<ServerConn>, CheckoutError> {
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        self.metrics.connects.increment(1);
        let settings = self.settings.load_full();
        let login = InProgress::start(&self.stats.logins);
        let conn = ServerConn::connect(
            id,
            &self.target.load_full(),
            settings.connect_timeout,
            settings.max_prepared_statements,
        )
        .await;
        drop(login);
        let conn = conn.inspect_err(|err| {
            counter!("skiff_pg_errors_total", "kind" => "server_connect").increment(1);
            tracing::warn!(pool = %self.name, error = %err, "server login failed");
        })?;
        tracing::debug!(pool = %self.name, server = id, tls = conn.tls, "server connection opened");
        self.learn_server_params(&conn);
        Ok(conn)
    }

    /// Takes a connection opened outside the pool as an idle one, or closes
    /// it when the pool is full.
    pub fn adopt(&self, mut conn: Box<ServerConn>) {
        conn.id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        let mut key = (*conn.cancel_key).clone();
        key.server_id = conn.id;
        conn.cancel_key = Arc::new(key);
        self.learn_server_params(&conn);
        match self.permits.clone().try_acquire_owned().ok() {
            Some(permit) => {
                self.active.fetch_add(1, Ordering::Relaxed);
                self.checkin(Checkout { conn, permit });
            }
            None => {
                tokio::spawn(conn.terminate());
            }
        }
    }

    /// Writes the simple Query of the client that has waited longest behind
    /// the Query `conn` runs now, when that client parked one that fits the
    /// connection's settings. `cancels` is the connection's count of cancel
    /// requests sent, read before the running client's cancel state was
    /// checked. The client gets the connection at [`Pool::checkin`].
    pub fn queue_behind(&self, conn: &mut ServerConn, cancels: u64) {
        if conn.behind.is_some() || self.is_paused() {
            return;
        }
        let Some(parked) = self.first_parked(conn) else {
            return;
        };
        if parked.queue(cancels) {
            self.metrics.queued.increment(1);
            conn.queue(&parked.bytes);
            conn.behind = Some(Behind::new(parked.clone()));
        }
    }

    /// Finds the parked Query of the client that has waited longest, when
    /// that client parked one and it fits `conn`'s settings. Waits whose
    /// Query went to a connection already are passed over. The first other
    /// wait decides, so no client is served before an older one.
    fn first_parked(&self, conn: &ServerConn) -> Option<Arc<Parked>> {
        let waits = self.stats.waits.lock();
        let next = waits.queue.iter().find(|wait| {
            wait.parked
                .as_ref()
                .is_none_or(|parked| parked.is_waiting())
        });
        let parked = next.and_then(|wait| wait.parked.clone())?;
        let prepared = parked
            .statement
            .as_ref()
            .is_none_or(|name| conn.statements.contains(name) && !conn.needs_close.contains(name));
        let fits = prepared
            && Arc::ptr_eq(&conn.applied, &parked.settings)
            && conn.dirty_by.is_none_or(|id| id == parked.client);
        fits.then_some(parked)
    }

    /// Gives a connection back; it is closed instead when it is too old.
    /// A connection with a Query queued behind goes to that Query's client
    /// instead, as long as no transaction was left open.
    pub fn checkin(&self, mut checkout: Checkout) {
        if let Some(behind) = checkout.conn.behind.take() {
            if checkout.conn.tx_status == b'I' {
                let delivery = checkout.conn.delivery.take().unwrap_or(Delivery::Sent);
                behind.take().hand(checkout, delivery);
                return;
            }
            // The queued Query ran inside the open transaction, which ends
            // with the connection, so nothing of it stays.
            drop(behind);
            self.discard(checkout);
            return;
        }
        let conn = &mut checkout.conn;
        let now = Instant::now();
        conn.last_used = now;
        let expired = now.duration_since(conn.created) >= self.settings.load().lifetime
            || conn.cancel_key.generation != self.generation.load(Ordering::Acquire)
            || conn.retire;
        self.active.fetch_sub(1, Ordering::Relaxed);
        let Checkout { conn, permit } = checkout;
        if conn.tx_status == b'I' && !expired {
            // Idle before the permit goes back, so the waiter it wakes
            // finds this connection.
            self.idle.lock().push(conn);
            if self.release_permit(permit) {
                // The pool shrank: one connection fewer.
                if let Some(surplus) = self.idle.lock().pop() {
                    tokio::spawn(surplus.terminate());
                }
            }
        } else {
            tokio::spawn(conn.terminate());
            self.release_permit(permit);
        }
        self.update_gauges();
    }

    /// Drops a connection that is broken or in an unknown state.
    pub fn discard(&self, mut checkout: Checkout) {
        drop(checkout.conn.behind.take());
        self.active.fetch_sub(1, Ordering::Relaxed);
        tokio::spawn(checkout.conn.terminate());
        self.release_permit(checkout.permit);
        self.update_gauges();
    }

    /// Drops a connection whose query is still running: sends the server a
    /// cancel request first and keeps the pool slot until the connection is
    /// closed, so the server process is gone before the slot is reused.
    pub fn discard_running(self: &Arc<Self>, mut checkout: Checkout) {
        drop(checkout.conn.behind.take());
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.update_gauges();
        let Checkout { conn, permit } = checkout;
        let pool = self.clone();
        tokio::spawn(async move {
            let key = conn.cancel_key.clone();
            super::cancel::send_cancel(&key).await;
            conn.terminate().await;
            // The server process exits once it sees the cancel and the
            // closed socket; give it a moment before the slot is reused.
            tokio::time::sleep(Duration::from_millis(100)).await;
            pool.release_permit(permit);
        });
    }

    /// Closes idle connections past `server_idle_timeout` or
    /// `server_lifetime`.
    pub fn reap(&self) {
        let now = Instant::now();
        let settings = self.settings.load_full();
        let mut closed = Vec::new();
        {
            let mut idle = self.idle.lock();
            let mut index = 0;
            while index < idle.len() {
                let conn = &idle[index];
                if now.duration_since(conn.last_used) >= settings.idle_timeout
                    || now.duration_since(conn.created) >= settings.lifetime
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
        for conn in self.take_all_idle() {
            tokio::spawn(conn.terminate());
        }
    }

    /// Closes every idle connection and waits until each has sent its
    /// Terminate (at most 100 ms each, all at once), for the end of a
    /// shutdown.
    pub async fn close_idle_now(&self) {
        let drained = self.take_all_idle();
        futures_util::future::join_all(drained.into_iter().map(|conn| conn.terminate())).await;
    }

    /// Removes every idle connection from the pool and returns them, boxed
    /// as the idle list keeps them.
    #[allow(clippy::vec_box)]
    fn take_all_idle(&self) -> Vec<Box<ServerConn>> {
        let drained: Vec<Box<ServerConn>> = self.idle.lock().drain(..).collect();
        self.update_gauges();
        drained
    }

    /// Server ParameterStatus values, once a connection has logged in.
    pub fn server_params(&self) -> Option<Arc<ServerParams>> {
        self.server_params.lock().clone()
    }

    /// Returns the ParameterStatus messages a client with `settings` gets at
    /// login: the server's values, overridden by the client's settings.
    pub fn login_parameters(&self, settings: &Settings) -> Bytes {
        let Some(server) = self.server_params() else {
            return encode_parameters(&params::client_visible(&[], settings));
        };
        if !params::overrides_reported(settings) {
            return server.encoded.clone();
        }
        // Clients of a pool mostly share one settings map, so the messages
        // built for the last one usually fit the next. The server's values
        // never change once learned.
        let mut cached = self.login_parameters.lock();
        if let Some((key, encoded)) = &*cached {
            if Arc::ptr_eq(key, settings) {
                return encoded.clone();
            }
        }
        let encoded = encode_parameters(&params::client_visible(&server.pairs, settings));
        *cached = Some((settings.clone(), encoded.clone()));
        encoded
    }

    /// Stores the ParameterStatus values of the pool's first login.
    fn learn_server_params(&self, conn: &ServerConn) {
        let mut params = self.server_params.lock();
        if params.is_none() {
            *params = Some(Arc::new(ServerParams::new(conn.login_params.clone())));
        }
    }

    /// Returns `settings` in a map shared with earlier clients that have the
    /// same settings, so that their server connections compare as equal by
    /// pointer.
    pub fn share_settings(&self, settings: BTreeMap<String, String>) -> Settings {
        let mut shared = self.shared_settings.lock();
        if **shared != settings {
            *shared = Arc::new(settings);
        }
        shared.clone()
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

    /// Keys and idle times of the idle connections, for SHOW SERVERS.
    pub fn idle_servers(&self) -> Vec<(Arc<ServerKey>, Duration)> {
        self.idle
            .lock()
            .iter()
            .map(|conn| (conn.cancel_key.clone(), conn.last_used.elapsed()))
            .collect()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts idle connections unused for longer than `server_check_delay`,
    /// which are checked before they are handed out again.
    pub fn idle_unchecked_count(&self) -> usize {
        let now = Instant::now();
        let check_delay = self.settings.load().check_delay;
        self.idle
            .lock()
            .iter()
            .filter(|conn| now.duration_since(conn.last_used) >= check_delay)
            .count()
    }

    /// Returns how long the longest-waiting client has waited so far, or
    /// zero when no client waits.
    pub fn oldest_wait(&self) -> Duration {
        self.stats
            .waits
            .lock()
            .queue
            .front()
            .map(|wait| wait.started.elapsed())
            .unwrap_or_default()
    }

    /// Raises the expiry of each queued wait whose deadline is not after
    /// `now`, and returns the earliest deadline of the others, which the
    /// watchdog sleeps until. No wait has a deadline when `wait_timeout`
    /// is zero.
    fn expire_waits(&self, now: Instant) -> Option<Instant> {
        let timeout = self.settings.load().wait_timeout;
        let mut waits = self.stats.waits.lock();
        let mut next: Option<Instant> = None;
        if !timeout.is_zero() {
            for wait in waits.queue.iter_mut() {
                if wait.expiry.is_none() {
                    continue;
                }
                let deadline = wait.started + timeout;
                if deadline <= now {
                    if let Some(expiry) = wait.expiry.take() {
                        expiry.raise();
                    }
                } else if next.is_none_or(|next| deadline < next) {
                    next = Some(deadline);
                }
            }
        }
        waits.watched_until = next;
        next
    }

    /// Returns the error of a wait the watchdog ended.
    fn timed_out(&self) -> CheckoutError {
        CheckoutError::Timeout(self.settings.load().wait_timeout)
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

impl Drop for Pool {
    fn drop(&mut self) {
        // The watchdog finds the pool gone and ends.
        self.wait_added.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_in_ticket_order() {
        let now = Instant::now();
        let mut queue = VecDeque::new();
        for ticket in [1, 3, 2, 5, 4] {
            let wait = Wait {
                ticket,
                started: now,
                expiry: None,
                parked: None,
            };
            insert_by_ticket(&mut queue, wait);
        }
        let tickets: Vec<u64> = queue.iter().map(|wait| wait.ticket).collect();
        assert_eq!(tickets, [1, 2, 3, 4, 5]);
    }
}
