//! The registry of connected clients. It routes CancelRequests: each client
//! gets a key from skiff, and a cancel with that key goes to the server
//! connection the client is using at that moment, or nowhere. The admin
//! console lists and kills clients through it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::backend::ServerTls;
use super::protocol;
use crate::config::SslMode;
use crate::signal::poll_raised;
use crate::tls::Stream;

/// The server process a client is attached to.
#[derive(Debug, Clone)]
pub struct ServerKey {
    pub address: String,
    pub process_id: i32,
    pub secret_key: i32,
    /// skiff's id of the server connection.
    pub server_id: u64,
    pub connected_at: SystemTime,
    /// Pool target generation the connection logged in with; a connection
    /// of an older generation is closed when it is released.
    pub generation: u64,
    /// Set when the server connection is encrypted: its cancel request is
    /// sent over TLS too, so the key never crosses the network in clear.
    pub tls: Option<ServerTls>,
    /// Cancel requests skiff has begun to send for this process, counted
    /// by [`send_cancel`] before each is sent.
    pub cancels: Arc<std::sync::atomic::AtomicU64>,
}

/// Client facts the admin console shows, fixed at login.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    /// Cancelled by the admin console's KILL: the session ends at once.
    pub kill: CancellationToken,
}

/// A client's state as the admin console lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Linked to a server connection.
    Active,
    /// Queued for a server connection.
    Waiting,
    Idle,
}

/// One registered client at one moment.
pub struct ClientSnapshot {
    pub info: Arc<ClientInfo>,
    pub state: ClientState,
    pub server: Option<Arc<ServerKey>>,
    /// The process id skiff gave the client in BackendKeyData.
    pub process_id: i32,
}

/// The destination of a client's cancel request at this moment.
#[derive(Default)]
struct CancelTarget {
    /// The server connection the client is using.
    server: Option<Arc<ServerKey>>,
    /// The signal a cancel request raises while the client waits for a
    /// server connection.
    waiting: Option<Arc<WaitFlag>>,
    /// The signal for the client's next wait, reused to save an
    /// allocation per wait. A cancel request that raises it drops it,
    /// because a raised signal would end the next wait at once.
    next_waiting: Option<Arc<WaitFlag>>,
    /// Cancel requests being sent to `server` right now.
    sending: usize,
    /// Woken when a cancel request to `server` has been processed.
    sent: Arc<Notify>,
    /// A cancel request to `server` ended without the server confirming it
    /// (timeout or error after the request was written), so it may still
    /// arrive and hit whatever query the connection runs then.
    unconfirmed: bool,
}

impl CancelTarget {
    /// Points at no server. Returns false when a cancel request may still
    /// reach the server connection pointed at until now.
    fn clear_server(&mut self) -> bool {
        let reusable = self.sending == 0 && !self.unconfirmed;
        self.server = None;
        self.unconfirmed = false;
        reusable
    }
}

/// A registered client: its login facts and where its cancel goes.
struct ClientEntry {
    info: Arc<ClientInfo>,
    target: Mutex<CancelTarget>,
    stop: StopSignal,
}

/// A flag that ends a client's wait for a server connection: a cancel
/// request raises one, and the pool's wait watchdog another at the wait's
/// deadline. The wait polls it beside the checkout, and an atomic flag and
/// waker cost less than a `Notify`, whose waiter list each poll and drop
/// locks.
#[derive(Default)]
pub struct WaitFlag {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl WaitFlag {
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Lowers the flag for the next wait.
    pub fn lower(&self) {
        self.raised.store(false, Ordering::Relaxed);
    }

    /// Completes once the flag is raised, at once if it is already.
    pub async fn raised(&self) {
        std::future::poll_fn(|cx| {
            poll_raised(&self.waker, cx, || self.raised.load(Ordering::Acquire))
        })
        .await
    }
}

/// Shutdown and KILL requests for one session. The session polls it at
/// every step of its relay loop, which costs an atomic load and a waker
/// registration instead of a lock.
#[derive(Default)]
pub struct StopSignal {
    /// `SHUTDOWN` and `KILLED` bits.
    state: AtomicU8,
    waker: AtomicWaker,
}

const SHUTDOWN: u8 = 1;
const KILLED: u8 = 2;

impl StopSignal {
    fn raise(&self, bit: u8) {
        self.state.fetch_or(bit, Ordering::AcqRel);
        self.waker.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.state.load(Ordering::Acquire) & KILLED != 0
    }

    /// Polls for a KILL, or also for shutdown when `shutdown_counts`.
    pub fn poll_stop(&self, cx: &mut Context<'_>, shutdown_counts: bool) -> Poll<()> {
        let mask = if shutdown_counts {
            SHUTDOWN | KILLED
        } else {
            KILLED
        };
        poll_raised(&self.waker, cx, || {
            self.state.load(Ordering::Acquire) & mask != 0
        })
    }
}

type Slot = Arc<ClientEntry>;

/// Every connected client, keyed by its cancel key.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<(i32, i32), Slot>>,
    /// Shutdown began: clients registered from now on get the shutdown
    /// signal at once. Written with `clients` locked.
    stopping: AtomicBool,
}

/// A client's registration; removed from the registry on drop.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub process_id: i32,
    pub secret_key: i32,
    slot: Slot,
}

impl CancelRegistry {
    /// Registers a new client under a fresh random key.
    pub fn register(self: &Arc<Self>, info: Arc<ClientInfo>) -> CancelHandle {
        let slot: Slot = Arc::new(ClientEntry {
            info,
            target: Mutex::new(CancelTarget::default()),
            stop: StopSignal::default(),
        });
        let mut rng = rand::thread_rng();
        let mut clients = self.clients.lock();
        loop {
            let key = (rng.gen_range(1..i32::MAX), rng.gen::<i32>());
            if let std::collections::hash_map::Entry::Vacant(entry) = clients.entry(key) {
                entry.insert(slot.clone());
                if self.stopping.load(Ordering::Acquire) {
                    slot.stop.raise(SHUTDOWN);
                }
                return CancelHandle {
                    registry: self.clone(),
                    process_id: key.0,
                    secret_key: key.1,
                    slot,
                };
            }
        }
    }

    /// Forwards a cancel to the server the client uses now; an unknown key
    /// or an idle client is ignored, as PostgreSQL ignores a stale key.
    pub async fn cancel(&self, process_id: i32, secret_key: i32) {
        let (target, slot) = {
            let clients = self.clients.lock();
            let Some(slot) = clients.get(&(process_id, secret_key)) else {
                tracing::debug!("cancel request with unknown key ignored");
                return;
            };
            let mut target = slot.target.lock();
            if let Some(waiting) = target.waiting.clone() {
                metrics::counter!("skiff_pg_cancel_requests_total").increment(1);
                waiting.raise();
                target.next_waiting = None;
                return;
            }
            let Some(server) = target.server.clone() else {
                tracing::debug!("cancel request for an idle client ignored");
                return;
            };
            // The client keeps this server connection until the cancel is
            // processed, so the cancel cannot reach the next client's query.
            target.sending += 1;
            (server, slot.clone())
        };
        send_tracked(target, slot).await;
    }
}

/// Sends a cancel request for `target` on behalf of the client of `slot`,
/// which counted it in `sending` already, and counts it done.
async fn send_tracked(target: Arc<ServerKey>, slot: Slot) {
    metrics::counter!("skiff_pg_cancel_requests_total").increment(1);
    let outcome = send_cancel(&target).await;
    let mut state = slot.target.lock();
    state.sending -= 1;
    let same_server = state
        .server
        .as_ref()
        .is_some_and(|server| server.server_id == target.server_id);
    if outcome == CancelOutcome::Unconfirmed && same_server {
        state.unconfirmed = true;
    }
    state.sent.notify_waiters();
}

impl CancelRegistry {
    /// Returns every registered client with its state now, ordered by
    /// client id.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        let slots: Vec<((i32, i32), Slot)> = self
            .clients
            .lock()
            .iter()
            .map(|(key, slot)| (*key, slot.clone()))
            .collect();
        let mut clients: Vec<ClientSnapshot> = slots
            .into_iter()
            .map(|(key, slot)| {
                let target = slot.target.lock();
                let state = if target.server.is_some() {
                    ClientState::Active
                } else if target.waiting.is_some() {
                    ClientState::Waiting
                } else {
                    ClientState::Idle
                };
                ClientSnapshot {
                    info: slot.info.clone(),
                    state,
                    server: target.server.clone(),
                    process_id: key.0,
                }
            })
            .collect();
        clients.sort_by_key(|client| client.info.id);
        clients
    }

    /// Ends the sessions of the clients `select` picks; returns how many.
    pub fn kill(&self, select: impl Fn(&ClientInfo) -> bool) -> usize {
        let clients = self.clients.lock();
        let mut killed = 0;
        for slot in clients.values() {
            if select(&slot.info) {
                slot.info.kill.cancel();
                slot.stop.raise(KILLED);
                killed += 1;
            }
        }
        killed
    }

    /// Signals shutdown to every session, and to sessions registered later.
    pub fn shut_down(&self) {
        let clients = self.clients.lock();
        self.stopping.store(true, Ordering::Release);
        for slot in clients.values() {
            slot.stop.raise(SHUTDOWN);
        }
    }

    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }
}

/// The state of a cancel request when skiff stopped waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The server closed the cancel connection, which it does after it has
    /// signalled the process, or the request was never written.
    Settled,
    /// The request was written but the server did not confirm it in time,
    /// so it may still reach the process later.
    Unconfirmed,
}

/// Sends a CancelRequest for a server process, then waits up to 2 s for the
/// server to close that connection. The server closes it once it has
/// signalled the process. Each call counts in the process's `cancels`.
pub async fn send_cancel(target: &ServerKey) -> CancelOutcome {
    target.cancels.fetch_add(1, Ordering::AcqRel);
    let request = protocol::cancel_request(target.process_id, target.secret_key);
    let mut written = false;
    let send = async {
        let tcp = TcpStream::connect(&target.address).await?;
        let mut stream = match &target.tls {
            Some(tls) => encrypt(tcp, tls).await?,
            None => Stream::Plain(tcp),
        };
        // Set before the write: a write cut short may still deliver it.
        written = true;
        stream.send(&request).await?;
        let mut rest = [0u8; 64];
        loop {
            match stream.read(&mut rest).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // A TLS server may close without a close_notify alert; the
                // request was written by then.
                Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    };
    let result = tokio::time::timeout(std::time::Duration::from_secs(2), send).await;
    match result {
        Ok(Ok(())) => return CancelOutcome::Settled,
        Ok(Err(err)) => {
            tracing::warn!(server = %target.address, error = %err, "cannot send cancel request");
        }
        Err(_) => tracing::warn!(server = %target.address, "timed out sending cancel request"),
    }
    if written {
        CancelOutcome::Unconfirmed
    } else {
        CancelOutcome::Settled
    }
}

/// Sends SSLRequest on a new cancel connection and runs the handshake. A
/// server that now declines TLS gets the request in clear only when the
/// `sslmode` (`prefer`) allowed a plain server connection in the first place.
async fn encrypt(mut tcp: TcpStream, tls: &ServerTls) -> std::io::Result<Stream> {
    tcp.write_all(&protocol::ssl_request()).await?;
    match tcp.read_u8().await? {
        b'S' => Stream::connect_tls(tcp, &tls.connector, tls.server_name.clone()).await,
        b'N' if tls.mode == SslMode::Prefer => Ok(Stream::Plain(tcp)),
        _ => Err(std::io::Error::other(
            "the server declined SSL for the cancel request",
        )),
    }
}

impl CancelHandle {
    /// Points the client's key at a server process, or at none.
    pub fn attach(&self, server: Option<Arc<ServerKey>>) {
        let mut target = self.slot.target.lock();
        target.server = server;
        target.unconfirmed = false;
    }

    /// Points the client's key at no server, after any cancel request being
    /// sent to its current server has been processed (at most 3 s).
    /// Returns false when a cancel request may still reach that server
    /// connection, so the caller closes it instead of reusing it.
    pub async fn detach(&self) -> bool {
        {
            let mut target = self.slot.target.lock();
            if target.sending == 0 {
                return target.clear_server();
            }
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let sent = {
                let mut target = self.slot.target.lock();
                if target.sending == 0 || tokio::time::Instant::now() >= deadline {
                    return target.clear_server();
                }
                target.sent.clone()
            };
            let notified = sent.notified();
            // Re-checked after registering, so a notification between the
            // check and here is not missed.
            if self.slot.target.lock().sending == 0 {
                continue;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Marks the client as waiting for a server connection; a cancel request
    /// raises the returned signal.
    pub fn begin_wait(&self) -> Arc<WaitFlag> {
        let mut target = self.slot.target.lock();
        let signal = target.next_waiting.get_or_insert_with(Arc::default).clone();
        target.waiting = Some(signal.clone());
        signal
    }

    pub fn end_wait(&self) {
        self.slot.target.lock().waiting = None;
    }

    /// True while a cancel request for the client is being sent, or one
    /// sent to its server was not confirmed and may still arrive.
    pub fn cancel_pending(&self) -> bool {
        let target = self.slot.target.lock();
        target.sending > 0 || target.unconfirmed
    }

    /// Sends a cancel request to the attached server as a client's cancel
    /// request would, for one that came while the client's Query was
    /// queued behind another client's. [`CancelHandle::detach`] waits for
    /// it like for any other.
    pub fn cancel_attached(&self) {
        let server = {
            let mut target = self.slot.target.lock();
            let Some(server) = target.server.clone() else {
                return;
            };
            target.sending += 1;
            server
        };
        tokio::spawn(send_tracked(server, self.slot.clone()));
    }

    pub fn info(&self) -> &Arc<ClientInfo> {
        &self.slot.info
    }

    pub fn stop(&self) -> &StopSignal {
        &self.slot.stop
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry
            .clients
            .lock()
            .remove(&(self.process_id, self.secret_key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: u64) -> Arc<ClientInfo> {
        Arc::new(ClientInfo {
            id,
            peer: "127.0.0.1:1".parse().unwrap(),
            user: "u".into(),
            database: "d".into(),
            application_name: String::new(),
            connected_at: SystemTime::now(),
            kill: CancellationToken::new(),
        })
    }

    fn stopped(handle: &CancelHandle, shutdown_counts: bool) -> bool {
        let mut context = Context::from_waker(std::task::Waker::noop());
        handle
            .stop()
            .poll_stop(&mut context, shutdown_counts)
            .is_ready()
    }

    #[test]
    fn shutdown_reaches_clients_registered_before_and_after() {
        let registry = Arc::new(CancelRegistry::default());
        let before = registry.register(client(1));
        assert!(!stopped(&before, true));
        registry.shut_down();
        let after = registry.register(client(2));
        assert!(stopped(&before, true));
        assert!(stopped(&after, true));
        // A session that defers shutdown waits for KILL only.
        assert!(!stopped(&after, false));
        assert!(!after.stop().is_killed());
    }

    #[test]
    fn kill_stops_only_selected_clients() {
        let registry = Arc::new(CancelRegistry::default());
        let first = registry.register(client(1));
        let second = registry.register(client(2));
        assert_eq!(registry.kill(|info| info.id == 2), 1);
        assert!(!stopped(&first, true));
        assert!(stopped(&second, false));
        assert!(second.stop().is_killed());
        assert!(second.info().kill.is_cancelled());
    }
}
