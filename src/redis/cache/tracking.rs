//! Tracking connections: one connection per upstream node on which skiff
//! runs `CLIENT TRACKING ON BCAST`, so Redis sends skiff the name of every
//! key written on that node that matches a prefix.
//!
//! Broadcast mode on a connection of its own is used rather than tracking
//! on the shared connections that carry the reads. In broadcast mode Redis
//! keeps no per-read state, so reads need no bookkeeping on either side.
//! RESP2 and RESP3 client connections are covered alike, and a key stays
//! covered when its slot moves to another node that skiff also tracks. The
//! cost is an invalidation for every write under a cached prefix, cached or
//! not. Redis sends the broadcast once per event loop iteration, in the
//! same pass that sends the writer its reply.
//!
//! The safety argument: a reply is stored only when the node's tracking
//! connection was up before the read was sent and stayed up until the
//! reply arrived (its epoch is unchanged). A write that Redis ran after the
//! read then produces an invalidation on that connection, which either
//! arrives before the reply is stored (the store is skipped) or after (the
//! entry is dropped).
//!
//! Two scopes exist per node. `Prefixes` covers the `[[redis.cache]]`
//! prefixes and guards the near cache. `All` covers every key; it is
//! opened once a client turns on `CLIENT TRACKING` itself, because such a
//! client is owed invalidations for any key it reads.
//!
//! Servers that refuse `HELLO 3` get two RESP2 connections instead: one
//! subscribed to `__redis__:invalidate`, and one that turns tracking on
//! with `REDIRECT` to it. Either one closing counts as the tracking
//! connection being lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::redis::frame::{encode_command, error_text, Protocol, ReplyKind, Value};
use crate::redis::upstream::{ConnSettings, RawConn, UpstreamError, UpstreamTls};

/// First pause before reconnecting a lost tracking connection; it doubles
/// up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Pub/Sub channel that carries invalidations to a RESP2 connection.
const INVALIDATE_CHANNEL: &str = "__redis__:invalidate";

/// Key range a tracking connection covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The configured cache prefixes.
    Prefixes,
    /// Every key, for clients that track keys themselves.
    All,
}

/// One tracking connection's state, shared with the reads it covers.
pub struct Tracker {
    pub addr: String,
    /// Small number naming the node in cache entries.
    pub node: u32,
    pub scope: Scope,
    /// Odd while the connection is up. Every connect and every loss adds
    /// one; [`Tracker::bump`] adds two, which keeps the state but makes
    /// every earlier stamp stale.
    epoch: AtomicU64,
    stop: CancellationToken,
}

impl Tracker {
    /// Returns the current epoch when the connection is up.
    pub fn epoch_if_up(&self) -> Option<u64> {
        let epoch = self.epoch.load(Ordering::Acquire);
        (epoch % 2 == 1).then_some(epoch)
    }

    pub fn is_up(&self) -> bool {
        self.epoch_if_up().is_some()
    }

    /// Makes every read stamped so far skip its store.
    pub fn bump(&self) {
        self.epoch.fetch_add(2, Ordering::AcqRel);
    }

    fn set_up(&self) {
        let previous = self.epoch.fetch_add(1, Ordering::AcqRel);
        debug_assert_eq!(previous % 2, 0);
    }

    fn set_down(&self) {
        let previous = self.epoch.fetch_add(1, Ordering::AcqRel);
        debug_assert_eq!(previous % 2, 1);
    }
}

/// Receiver of what tracking connections report.
pub trait TrackerEvents: Send + Sync {
    /// Handles a connection that came up.
    fn tracker_up(&self, tracker: &Tracker);
    /// Handles a lost connection. Called after the epoch changed, so no
    /// read stamped before is stored.
    fn tracker_down(&self, tracker: &Tracker);
    /// Handles an invalidation of `keys`.
    fn keys_invalidated(&self, tracker: &Tracker, keys: Vec<Bytes>);
    /// Handles a flush of the node's data (`FLUSHALL`, `FLUSHDB`, a full
    /// resync).
    fn node_flushed(&self, tracker: &Tracker);
}

/// Settings for tracking connections.
#[derive(Clone)]
pub struct TrackerSettings {
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    pub max_reply_bytes: usize,
    /// TLS of the upstream connections, when `[redis] tls` is on.
    pub tls: Option<UpstreamTls>,
    /// Prefixes for the `Prefixes` scope, none overlapping another.
    pub prefixes: Vec<String>,
}

impl TrackerSettings {
    fn conn_settings(&self, protocol: Protocol) -> ConnSettings {
        ConnSettings {
            protocol,
            db: 0,
            readonly: false,
            username: self.username.clone(),
            password: self.password.clone(),
            connect_timeout: self.connect_timeout,
            // Tracking connections wait for pushes for as long as they live.
            reply_timeout: Duration::ZERO,
            max_reply_bytes: self.max_reply_bytes,
            tls: self.tls.clone(),
        }
    }
}

#[derive(Default)]
struct Registry {
    node_ids: HashMap<String, u32>,
    /// Nodes of the current topology.
    known: Vec<String>,
    trackers: HashMap<(String, Scope), Arc<Tracker>>,
    prefixes_enabled: bool,
    all_enabled: bool,
}

/// Every tracking connection, started and stopped with the topology.
pub struct Trackers {
    settings: TrackerSettings,
    events: Weak<dyn TrackerEvents>,
    registry: Mutex<Registry>,
    /// True while every known node has an `All` connection up.
    all_ready: AtomicBool,
    shutdown: CancellationToken,
}

impl Trackers {
    pub fn new(
        settings: TrackerSettings,
        prefixes_enabled: bool,
        events: Weak<dyn TrackerEvents>,
    ) -> Trackers {
        Trackers {
            settings,
            events,
            registry: Mutex::new(Registry {
                prefixes_enabled,
                ..Registry::default()
            }),
            all_ready: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
        }
    }

    /// Returns the tracker of `addr` for `scope`, starting it when missing.
    pub fn get(&self, addr: &str, scope: Scope) -> Arc<Tracker> {
        let mut registry = self.registry.lock();
        self.ensure(&mut registry, addr, scope)
    }

    /// Returns the tracker of `addr` for `scope` if one runs.
    pub fn find(&self, addr: &str, scope: Scope) -> Option<Arc<Tracker>> {
        let registry = self.registry.lock();
        registry.trackers.get(&(addr.to_string(), scope)).cloned()
    }

    fn ensure(&self, registry: &mut Registry, addr: &str, scope: Scope) -> Arc<Tracker> {
        let key = (addr.to_string(), scope);
        if let Some(tracker) = registry.trackers.get(&key) {
            return tracker.clone();
        }
        let next = registry.node_ids.len() as u32 + 1;
        let node = *registry.node_ids.entry(addr.to_string()).or_insert(next);
        let tracker = Arc::new(Tracker {
            addr: addr.to_string(),
            node,
            scope,
            epoch: AtomicU64::new(0),
            stop: self.shutdown.child_token(),
        });
        registry.trackers.insert(key, tracker.clone());
        let prefixes = match scope {
            Scope::Prefixes => self.settings.prefixes.clone(),
            Scope::All => Vec::new(),
        };
        let settings = self.settings.clone();
        tokio::spawn(run(
            tracker.clone(),
            settings,
            prefixes,
            self.events.clone(),
        ));
        tracker
    }

    /// Replaces the known nodes: trackers of nodes that left stop, and
    /// wanted scopes start on new nodes.
    pub fn set_topology(&self, nodes: &[String]) {
        let mut registry = self.registry.lock();
        registry.known = nodes.to_vec();
        registry.trackers.retain(|(addr, _), tracker| {
            let keep = nodes.contains(addr);
            if !keep {
                tracker.stop.cancel();
            }
            keep
        });
        for node in nodes {
            if registry.prefixes_enabled {
                self.ensure(&mut registry, node, Scope::Prefixes);
            }
            if registry.all_enabled {
                self.ensure(&mut registry, node, Scope::All);
            }
        }
        self.update_all_ready(&registry);
    }

    /// Starts `All` connections on every known node, once a client turned
    /// on tracking.
    pub fn enable_all_scope(&self) {
        let mut registry = self.registry.lock();
        if registry.all_enabled {
            return;
        }
        registry.all_enabled = true;
        for node in registry.known.clone() {
            self.ensure(&mut registry, &node, Scope::All);
        }
        self.update_all_ready(&registry);
    }

    /// True while every known node has its `All` connection up, so every
    /// key read now is covered.
    pub fn all_ready(&self) -> bool {
        self.all_ready.load(Ordering::Acquire)
    }

    pub fn refresh_all_ready(&self) {
        let registry = self.registry.lock();
        self.update_all_ready(&registry);
    }

    fn update_all_ready(&self, registry: &Registry) {
        let ready = registry.all_enabled
            && !registry.known.is_empty()
            && registry.known.iter().all(|addr| {
                registry
                    .trackers
                    .get(&(addr.clone(), Scope::All))
                    .is_some_and(|tracker| tracker.is_up())
            });
        self.all_ready.store(ready, Ordering::Release);
    }

    /// Stops every tracking connection.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Addresses of the `Prefixes` connections that are up, for status.
    pub fn connected(&self) -> Vec<String> {
        let registry = self.registry.lock();
        let mut up: Vec<String> = registry
            .trackers
            .values()
            .filter(|t| t.scope == Scope::Prefixes && t.is_up())
            .map(|t| t.addr.clone())
            .collect();
        up.sort();
        up
    }
}

/// Keeps one tracking connection open until its tracker is stopped.
async fn run(
    tracker: Arc<Tracker>,
    settings: TrackerSettings,
    prefixes: Vec<String>,
    events: Weak<dyn TrackerEvents>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    let gauge = metrics::gauge!("skiff_redis_cache_tracking_connections",
        "node" => tracker.addr.clone(), "scope" => scope_label(tracker.scope));
    loop {
        let opened = tokio::select! {
            _ = tracker.stop.cancelled() => break,
            opened = Channel::open(&tracker.addr, &settings, &prefixes) => opened,
        };
        match opened {
            Ok(mut channel) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(upstream = %tracker.addr, "redis cache tracking connected again");
                }
                backoff = MIN_BACKOFF;
                tracker.set_up();
                gauge.set(1.0);
                if !notify(&events, |e| e.tracker_up(&tracker)) {
                    break;
                }
                let stopped = follow(&tracker, &mut channel, &events).await;
                tracker.set_down();
                gauge.set(0.0);
                notify(&events, |e| e.tracker_down(&tracker));
                if stopped {
                    return;
                }
            }
            Err(reason) if !failing => {
                failing = true;
                tracing::warn!(upstream = %tracker.addr, error = %reason,
                    "redis cache tracking connection failed; reads from this node are not cached");
            }
            Err(reason) => {
                tracing::debug!(upstream = %tracker.addr, error = %reason,
                    "redis cache tracking connection failed")
            }
        }
        tokio::select! {
            _ = tracker.stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn scope_label(scope: Scope) -> &'static str {
    match scope {
        Scope::Prefixes => "prefixes",
        Scope::All => "all",
    }
}

/// Calls `event` on the events sink; false when the cache is gone.
fn notify(events: &Weak<dyn TrackerEvents>, event: impl FnOnce(&dyn TrackerEvents)) -> bool {
    match events.upgrade() {
        Some(events) => {
            event(events.as_ref());
            true
        }
        None => false,
    }
}

/// Relays invalidations until the connection fails (returns false) or the
/// tracker is stopped (returns true).
async fn follow(
    tracker: &Tracker,
    channel: &mut Channel,
    events: &Weak<dyn TrackerEvents>,
) -> bool {
    loop {
        let event = tokio::select! {
            _ = tracker.stop.cancelled() => return true,
            event = channel.next() => event,
        };
        let delivered = match event {
            Ok(Invalidation::Keys(keys)) => notify(events, |e| e.keys_invalidated(tracker, keys)),
            Ok(Invalidation::All) => notify(events, |e| e.node_flushed(tracker)),
            Err(err) => {
                tracing::debug!(upstream = %tracker.addr, error = %err,
                    "redis cache tracking connection lost");
                return false;
            }
        };
        if !delivered {
            return true;
        }
    }
}

/// An invalidation message.
enum Invalidation {
    Keys(Vec<Bytes>),
    /// Every key: the node's data was flushed.
    All,
}

enum Channel {
    /// Invalidations arrive as RESP3 pushes on the tracking connection.
    Resp3(RawConn),
    /// Invalidations arrive as Pub/Sub messages on `messages`. `tracking`
    /// carries the `CLIENT TRACKING ... REDIRECT` state and only has to stay
    /// open.
    Resp2 {
        messages: RawConn,
        tracking: RawConn,
    },
}

impl Channel {
    async fn open(
        addr: &str,
        settings: &TrackerSettings,
        prefixes: &[String],
    ) -> Result<Channel, String> {
        match RawConn::connect(addr, &settings.conn_settings(Protocol::Resp3)).await {
            Ok(mut conn) => {
                enable(&mut conn, prefixes, None).await?;
                Ok(Channel::Resp3(conn))
            }
            Err(UpstreamError::Handshake { message, .. }) if rejects_resp3(&message) => {
                Channel::open_resp2(addr, settings, prefixes).await
            }
            Err(err) => Err(err.to_string()),
        }
    }

    async fn open_resp2(
        addr: &str,
        settings: &TrackerSettings,
        prefixes: &[String],
    ) -> Result<Channel, String> {
        let resp2 = settings.conn_settings(Protocol::Resp2);
        let mut messages = RawConn::connect(addr, &resp2)
            .await
            .map_err(|e| e.to_string())?;
        let id = call_ok(&mut messages, &encode_command(&["CLIENT", "ID"])).await?;
        let id = Value::decode(&id, Protocol::Resp2)
            .and_then(|v| v.as_int())
            .ok_or("CLIENT ID returned no integer")?;
        messages
            .send(&encode_command(&["SUBSCRIBE", INVALIDATE_CHANNEL]))
            .await
            .map_err(|e| e.to_string())?;
        let (confirmation, _) = messages.read_frame().await.map_err(|e| e.to_string())?;
        if let Some(text) = error_text(&confirmation) {
            return Err(format!("SUBSCRIBE {INVALIDATE_CHANNEL} failed: {text}"));
        }
        let mut tracking = RawConn::connect(addr, &resp2)
            .await
            .map_err(|e| e.to_string())?;
        enable(&mut tracking, prefixes, Some(id)).await?;
        Ok(Channel::Resp2 { messages, tracking })
    }

    async fn next(&mut self) -> Result<Invalidation, UpstreamError> {
        loop {
            let message = match self {
                Channel::Resp3(conn) => {
                    let (frame, kind) = conn.read_frame().await?;
                    if kind != ReplyKind::Push {
                        continue;
                    }
                    parse_push(&frame)
                }
                Channel::Resp2 { messages, tracking } => {
                    let frame = tokio::select! {
                        frame = messages.read_frame() => frame?.0,
                        // Nothing is expected here; a read ends only when
                        // the connection closes or sends garbage.
                        other = tracking.read_frame() => {
                            other?;
                            continue;
                        }
                    };
                    parse_message(&frame)
                }
            };
            if let Some(message) = message {
                return Ok(message);
            }
        }
    }
}

/// True when a HELLO 3 rejection means the server has no RESP3.
fn rejects_resp3(message: &str) -> bool {
    message.starts_with("NOPROTO") || message.contains("unknown command")
}

/// Name of tracking connections in `CLIENT LIST`.
pub const CONNECTION_NAME: &str = "skiff-cache-tracking";

/// Names the connection and sends `CLIENT TRACKING ON BCAST`, with the
/// prefixes and a redirect.
async fn enable(
    conn: &mut RawConn,
    prefixes: &[String],
    redirect: Option<i64>,
) -> Result<(), String> {
    call_ok(
        conn,
        &encode_command(&["CLIENT", "SETNAME", CONNECTION_NAME]),
    )
    .await?;
    let mut args: Vec<String> = ["CLIENT", "TRACKING", "ON", "BCAST"]
        .map(String::from)
        .into();
    for prefix in prefixes {
        args.push("PREFIX".into());
        args.push(prefix.clone());
    }
    if let Some(id) = redirect {
        args.push("REDIRECT".into());
        args.push(id.to_string());
    }
    call_ok(conn, &encode_command(&args)).await.map(drop)
}

async fn call_ok(conn: &mut RawConn, command: &[u8]) -> Result<Bytes, String> {
    let reply = conn.call(command).await.map_err(|e| e.to_string())?;
    match error_text(&reply) {
        Some(text) => Err(text.to_string()),
        None => Ok(reply),
    }
}

/// Reads `>2 invalidate <keys or null>`; `None` for other pushes.
fn parse_push(frame: &Bytes) -> Option<Invalidation> {
    let items = Value::decode(frame, Protocol::Resp3)?.into_items()?;
    if items.first()?.as_bytes()?.as_ref() != b"invalidate" {
        return None;
    }
    payload(items.get(1)?)
}

/// Reads `message __redis__:invalidate <keys or null>` from Pub/Sub.
fn parse_message(frame: &Bytes) -> Option<Invalidation> {
    let items = Value::decode(frame, Protocol::Resp2)?.into_items()?;
    if items.first()?.as_bytes()?.as_ref() != b"message" {
        return None;
    }
    payload(items.get(2)?)
}

fn payload(value: &Value) -> Option<Invalidation> {
    match value {
        Value::Nil => Some(Invalidation::All),
        Value::Array(keys) => Some(Invalidation::Keys(
            keys.iter().filter_map(|k| k.as_bytes().cloned()).collect(),
        )),
        _ => None,
    }
}

/// Removes prefixes that another listed prefix already covers: Redis
/// rejects overlapping prefixes in one `CLIENT TRACKING` call. An empty
/// prefix covers every key, which `BCAST` without `PREFIX` means.
pub fn broadcast_prefixes(prefixes: &[String]) -> Vec<String> {
    let mut sorted: Vec<&String> = prefixes.iter().collect();
    sorted.sort_by_key(|p| p.len());
    let mut kept: Vec<String> = Vec::new();
    for prefix in sorted {
        if !kept
            .iter()
            .any(|shorter| prefix.starts_with(shorter.as_str()))
        {
            kept.push(prefix.clone());
        }
    }
    if kept.iter().any(String::is_empty) {
        return Vec::new();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_prefixes_are_merged() {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            broadcast_prefixes(&list(&["plugin:install:", "plugin:", "session:"])),
            list(&["plugin:", "session:"])
        );
        assert!(broadcast_prefixes(&list(&["a", ""])).is_empty());
    }

    #[test]
    fn pushes_and_messages_are_parsed() {
        let push = Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n");
        match parse_push(&push) {
            Some(Invalidation::Keys(keys)) => assert_eq!(keys, vec![Bytes::from_static(b"k")]),
            _ => panic!("keys expected"),
        }
        let flush = Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n_\r\n");
        assert!(matches!(parse_push(&flush), Some(Invalidation::All)));
        let message = Bytes::from_static(
            b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n",
        );
        assert!(matches!(
            parse_message(&message),
            Some(Invalidation::Keys(_))
        ));
        let null =
            Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n");
        assert!(matches!(parse_message(&null), Some(Invalidation::All)));
    }
}
