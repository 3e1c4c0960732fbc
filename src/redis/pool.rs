//! Upstream connection pool: a few shared pipelined connections per node,
//! RESP version and database, dedicated connections for pinned sessions,
//! and which nodes failed recently.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::frame::Protocol;
use super::upstream::{ConnSettings, Pipelined, RawConn, UpstreamError, UpstreamTls};

/// Idle dedicated connections kept per node, RESP version and database.
const MAX_IDLE_DEDICATED: usize = 8;
/// How long a node that refused a connection counts as down.
const DOWN_PERIOD: Duration = Duration::from_secs(2);

/// Identity of interchangeable upstream connections: node, RESP version
/// and database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub addr: String,
    pub protocol: Protocol,
    pub db: u32,
}

/// One shared connection of a node.
#[derive(Default)]
struct SharedSlot {
    /// The connection, read without waiting while it is open.
    conn: Mutex<Option<Arc<Pipelined>>>,
    /// Held while the connection is opened, so one connect runs at a time.
    connecting: tokio::sync::Mutex<()>,
}

/// The shared connections of one node, by RESP version and database.
type NodeSlots = Vec<(Protocol, u32, Arc<[SharedSlot]>)>;

/// Settings every upstream connection shares.
#[derive(Clone)]
pub struct PoolSettings {
    pub shared_per_node: usize,
    pub max_dedicated: usize,
    /// Send READONLY on every connection (cluster mode, for replica reads).
    pub readonly: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    pub max_reply_bytes: usize,
    pub tls: Option<UpstreamTls>,
}

/// A dedicated connection and its share of the dedicated-connection limit.
pub struct Dedicated {
    pub conn: RawConn,
    key: ConnKey,
    _permit: OwnedSemaphorePermit,
}

pub struct Pool {
    settings: PoolSettings,
    /// By node address, so a lookup needs no owned key.
    /// Looked up on every request. Node addresses come from the config and
    /// the cluster, not from clients, so a fast hash is safe here.
    shared: RwLock<HashMap<String, NodeSlots, foldhash::fast::RandomState>>,
    idle: Mutex<HashMap<ConnKey, Vec<RawConn>>>,
    dedicated_limit: Arc<Semaphore>,
    down_since: Mutex<HashMap<String, Instant>>,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        Pool {
            dedicated_limit: Arc::new(Semaphore::new(settings.max_dedicated)),
            settings,
            shared: RwLock::default(),
            idle: Mutex::default(),
            down_since: Mutex::default(),
        }
    }

    fn conn_settings(&self, key: &ConnKey) -> ConnSettings {
        ConnSettings {
            protocol: key.protocol,
            db: key.db,
            readonly: self.settings.readonly,
            username: self.settings.username.clone(),
            password: self.settings.password.clone(),
            connect_timeout: self.settings.connect_timeout,
            reply_timeout: self.settings.reply_timeout,
            max_reply_bytes: self.settings.max_reply_bytes,
            tls: self.settings.tls.clone(),
        }
    }

    /// TLS settings of upstream connections; None for plain TCP.
    pub fn tls(&self) -> Option<UpstreamTls> {
        self.settings.tls.clone()
    }

    /// Opens a connection, recording whether the node is reachable.
    pub async fn connect(&self, key: &ConnKey) -> Result<RawConn, UpstreamError> {
        match RawConn::connect(&key.addr, &self.conn_settings(key)).await {
            Ok(conn) => {
                self.down_since.lock().remove(&key.addr);
                Ok(conn)
            }
            Err(err) => {
                // A rejected login or certificate is a setup error, not
                // a node that is down.
                if !matches!(
                    err,
                    UpstreamError::Handshake { .. } | UpstreamError::Tls { .. }
                ) {
                    self.mark_down(&key.addr);
                }
                Err(err)
            }
        }
    }

    /// Returns shared connection number `index` (modulo the pool size) to
    /// the node in `key`, connecting when it is missing or broken. A client
    /// always uses the same index, so its requests to one node stay in order.
    pub async fn shared(
        &self,
        key: &ConnKey,
        index: usize,
    ) -> Result<Arc<Pipelined>, UpstreamError> {
        self.shared_to(&key.addr, key.protocol, key.db, index).await
    }

    /// [`Pool::shared`] for a key given in parts. An open connection is
    /// returned without allocating or waiting.
    pub async fn shared_to(
        &self,
        addr: &str,
        protocol: Protocol,
        db: u32,
        index: usize,
    ) -> Result<Arc<Pipelined>, UpstreamError> {
        let slots = {
            let shared = self.shared.read();
            let slots = shared.get(addr).and_then(|node| {
                node.iter()
                    .find(|(p, d, _)| *p == protocol && *d == db)
                    .map(|(_, _, slots)| slots)
            });
            if let Some(slots) = slots {
                let slot = &slots[index % slots.len()];
                if let Some(conn) = slot.conn.lock().as_ref().filter(|conn| conn.is_alive()) {
                    return Ok(conn.clone());
                }
            }
            slots.cloned()
        };
        let slots = match slots {
            Some(slots) => slots,
            None => self.add_slots(addr, protocol, db),
        };
        let slot = &slots[index % slots.len()];
        let _connecting = slot.connecting.lock().await;
        if let Some(conn) = slot.conn.lock().as_ref().filter(|conn| conn.is_alive()) {
            return Ok(conn.clone());
        }
        // Fail fast while the node is down, so requests queued behind this
        // slot do not each wait for a connect timeout.
        if !self.is_up(addr) {
            return Err(UpstreamError::Connect {
                addr: addr.to_string(),
                message: "node is down after a failed connection attempt".into(),
            });
        }
        let key = ConnKey {
            addr: addr.to_string(),
            protocol,
            db,
        };
        let conn = Arc::new(Pipelined::spawn(self.connect(&key).await?));
        *slot.conn.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Returns the shared connection slots of a node, RESP version and
    /// database, adding empty ones when there are none yet.
    fn add_slots(&self, addr: &str, protocol: Protocol, db: u32) -> Arc<[SharedSlot]> {
        let mut shared = self.shared.write();
        let node = shared.entry(addr.to_string()).or_default();
        if let Some((_, _, slots)) = node.iter().find(|(p, d, _)| *p == protocol && *d == db) {
            return slots.clone();
        }
        let per_node = self.settings.shared_per_node.max(1);
        let slots: Arc<[SharedSlot]> = (0..per_node).map(|_| SharedSlot::default()).collect();
        node.push((protocol, db, slots.clone()));
        slots
    }

    /// Checks out a connection that only one client uses until it is
    /// returned with [`Pool::checkin`] or dropped.
    pub async fn checkout(&self, key: &ConnKey) -> Result<Dedicated, UpstreamError> {
        let permit = self
            .dedicated_limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| UpstreamError::Connect {
                addr: key.addr.clone(),
                message: format!(
                    "all {} dedicated upstream connections are in use",
                    self.settings.max_dedicated
                ),
            })?;
        let conn = match self.take_idle(key) {
            Some(conn) => conn,
            None => self.connect(key).await?,
        };
        Ok(Dedicated {
            conn,
            key: key.clone(),
            _permit: permit,
        })
    }

    /// Takes an idle dedicated connection that is still open, dropping the
    /// ones the server closed meanwhile.
    fn take_idle(&self, key: &ConnKey) -> Option<RawConn> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        while let Some(mut conn) = list.pop() {
            if conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a dedicated connection whose session state is clean (no
    /// transaction, subscription or blocked command) for reuse.
    pub fn checkin(&self, mut dedicated: Dedicated) {
        if !dedicated.conn.is_reusable() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(dedicated.key).or_default();
        if list.len() < MAX_IDLE_DEDICATED {
            list.push(dedicated.conn);
        }
    }

    pub fn mark_down(&self, addr: &str) {
        self.down_since
            .lock()
            .insert(addr.to_string(), Instant::now());
    }

    /// True unless the node refused a connection within the last moments.
    pub fn is_up(&self, addr: &str) -> bool {
        match self.down_since.lock().get(addr) {
            Some(since) => since.elapsed() > DOWN_PERIOD,
            None => true,
        }
    }

    /// Drops pooled connections to nodes no longer in the topology.
    pub fn retain_nodes(&self, nodes: &[String]) {
        self.shared.write().retain(|addr, _| nodes.contains(addr));
        self.idle.lock().retain(|key, _| nodes.contains(&key.addr));
    }
}
