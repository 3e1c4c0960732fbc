//! CancelRequest routing: each client gets a key from skiff, and a cancel
//! with that key goes to the server connection the client is using at that
//! moment, or nowhere.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::protocol;

/// The server process a client is attached to.
#[derive(Debug, Clone)]
pub struct ServerKey {
    pub address: String,
    pub process_id: i32,
    pub secret_key: i32,
}

type Slot = Arc<Mutex<Option<Arc<ServerKey>>>>;

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
        let slot: Slot = Arc::new(Mutex::new(None));
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
        let target = {
            let clients = self.clients.lock();
            clients
                .get(&(process_id, secret_key))
                .and_then(|slot| slot.lock().clone())
        };
        let Some(target) = target else {
            tracing::debug!("cancel request with unknown key or idle client ignored");
            return;
        };
        metrics::counter!("skiff_pg_cancel_requests_total").increment(1);
        let request = protocol::cancel_request(target.process_id, target.secret_key);
        match TcpStream::connect(&target.address).await {
            Ok(mut stream) => {
                let _ = stream.write_all(&request).await;
                let _ = stream.shutdown().await;
            }
            Err(err) => {
                tracing::warn!(server = %target.address, error = %err, "cannot forward cancel request");
            }
        }
    }
}

impl CancelHandle {
    /// Points the client's key at a server process, or at none.
    pub fn attach(&self, server: Option<Arc<ServerKey>>) {
        *self.slot.lock() = server;
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
