//! CancelRequest routing: each client gets a key from skiff, and a cancel
//! with that key goes to the server connection the client is using at that
//! moment, or nowhere.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::backend::ServerTls;
use super::protocol;
use crate::config::SslMode;
use crate::tls::Stream;

/// The server process a client is attached to.
#[derive(Debug, Clone)]
pub struct ServerKey {
    pub address: String,
    pub process_id: i32,
    pub secret_key: i32,
    /// Set when the server connection is encrypted: its cancel request is
    /// sent over TLS too, so the key never crosses the network in clear.
    pub tls: Option<ServerTls>,
}

/// The destination of a client's cancel request at this moment.
#[derive(Default)]
struct CancelTarget {
    /// The server connection the client is using.
    server: Option<Arc<ServerKey>>,
    /// Woken when the client waits for a server connection.
    waiting: Option<Arc<Notify>>,
    /// Cancel requests being sent to `server` right now.
    sending: usize,
    /// Woken when a cancel request to `server` has been processed.
    sent: Arc<Notify>,
}

type Slot = Arc<Mutex<CancelTarget>>;

/// Client cancel keys of every connected client.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<(i32, i32), Slot>>,
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
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let slot: Slot = Arc::new(Mutex::new(CancelTarget::default()));
        let mut rng = rand::thread_rng();
        let mut clients = self.clients.lock();
        loop {
            let key = (rng.gen_range(1..i32::MAX), rng.gen::<i32>());
            if let std::collections::hash_map::Entry::Vacant(entry) = clients.entry(key) {
                entry.insert(slot.clone());
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
            let mut target = slot.lock();
            if let Some(waiting) = &target.waiting {
                metrics::counter!("skiff_pg_cancel_requests_total").increment(1);
                waiting.notify_one();
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
        metrics::counter!("skiff_pg_cancel_requests_total").increment(1);
        send_cancel(&target).await;
        let mut state = slot.lock();
        state.sending -= 1;
        state.sent.notify_waiters();
    }
}

/// Sends a CancelRequest for a server process, then waits up to 2 s for the
/// server to close that connection. The server closes it once it has
/// signalled the process.
pub async fn send_cancel(target: &ServerKey) {
    let request = protocol::cancel_request(target.process_id, target.secret_key);
    let send = async {
        let tcp = TcpStream::connect(&target.address).await?;
        let mut stream = match &target.tls {
            Some(tls) => encrypt(tcp, tls).await?,
            None => Stream::Plain(tcp),
        };
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
    match tokio::time::timeout(std::time::Duration::from_secs(2), send).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(server = %target.address, error = %err, "cannot send cancel request");
        }
        Err(_) => tracing::warn!(server = %target.address, "timed out sending cancel request"),
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
        self.slot.lock().server = server;
    }

    /// Points the client's key at no server, after any cancel request being
    /// sent to its current server has been processed (at most 3 s).
    pub async fn detach(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let sent = {
                let mut target = self.slot.lock();
                if target.sending == 0 || tokio::time::Instant::now() >= deadline {
                    target.server = None;
                    return;
                }
                target.sent.clone()
            };
            let notified = sent.notified();
            // Re-checked after registering, so a notification between the
            // check and here is not missed.
            if self.slot.lock().sending == 0 {
                continue;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Marks the client as waiting for a server connection; a cancel request
    /// wakes the returned notifier.
    pub fn begin_wait(&self) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.slot.lock().waiting = Some(notify.clone());
        notify
    }

    pub fn end_wait(&self) {
        self.slot.lock().waiting = None;
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
