//! Near cache: skiff serves reads of keys under the `[[redis.cache]]`
//! prefixes from a bounded in-process store, and Redis itself reports when
//! a cached key changes. `tracking.rs` explains how; `store.rs` explains
//! why a reply that raced with a change is never stored.
//!
//! The same invalidations serve clients that turn on `CLIENT TRACKING`
//! themselves (`clients.rs`): skiff forwards the pushes they are owed for
//! keys they read through it, cached or not.
//!
//! With no `[[redis.cache]]` entry there is no store, and the router's hot
//! path checks one `Option`.

mod clients;
mod commands;
mod metrics;
mod read;
mod store;
mod tracking;

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;

pub use clients::ClientTracking;
pub use commands::classify;
pub use read::{copy_cached_get, read};

use super::command::CommandTable;
use super::frame::Request;
use super::router::{Nodes, Pending, Router};
use super::topology::ClusterMap;
use super::upstream::UpstreamTls;
use crate::config::RedisConfig;
use clients::ClientTable;
use metrics::Source;
use store::Store;
use tracking::{Scope, Tracker, TrackerEvents, TrackerSettings, Trackers};

/// Most keys one transaction remembers for invalidation after EXEC; past
/// it, EXEC flushes the whole cache instead.
const MAX_TRANSACTION_KEYS: usize = 10_000;

/// A `[[redis.cache]]` entry.
struct Rule {
    prefix: Bytes,
    max_ttl: Duration,
}

/// The near cache, the tracking connections and the tracking clients.
pub struct Cache {
    /// Longest prefix first, so a key gets the most specific `max_ttl`.
    rules: Vec<Rule>,
    store: Option<Store>,
    trackers: Trackers,
    clients: ClientTable,
}

impl Cache {
    pub fn new(config: &RedisConfig, tls: Option<UpstreamTls>) -> Arc<Cache> {
        let mut rules: Vec<Rule> = config
            .cache
            .iter()
            .map(|rule| Rule {
                prefix: Bytes::copy_from_slice(rule.prefix.as_bytes()),
                max_ttl: rule.max_ttl,
            })
            .collect();
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.prefix.len()));
        let store = (!rules.is_empty())
            .then(|| Store::new(config.cache_max_bytes, config.cache_max_entries));
        let prefixes: Vec<String> = config.cache.iter().map(|r| r.prefix.clone()).collect();
        let settings = TrackerSettings {
            username: config.username.clone(),
            password: config.password.clone(),
            connect_timeout: config.connect_timeout,
            max_reply_bytes: config.max_reply_bytes,
            tls,
            prefixes: tracking::broadcast_prefixes(&prefixes),
        };
        let prefixes_enabled = store.is_some();
        Arc::new_cyclic(|weak: &Weak<Cache>| {
            let events: Weak<dyn TrackerEvents> = weak.clone();
            Cache {
                rules,
                store,
                trackers: Trackers::new(settings, prefixes_enabled, events),
                clients: ClientTable::default(),
            }
        })
    }

    /// True when `[[redis.cache]]` configured the near cache.
    pub fn is_enabled(&self) -> bool {
        self.store.is_some()
    }

    /// Returns the `max_ttl` of the most specific rule matching `key`, or
    /// `None` when the key is not cached.
    fn max_ttl(&self, key: &[u8]) -> Option<Duration> {
        self.rules
            .iter()
            .find(|rule| key.starts_with(&rule.prefix))
            .map(|rule| rule.max_ttl)
    }

    /// True when a write may have to invalidate something.
    pub fn watches_writes(&self) -> bool {
        self.store.is_some() || self.clients.active()
    }

    /// Invalidates the keys the write `request` touches before it is sent,
    /// so no read queued behind it is served the value from before it.
    /// Returns what to invalidate again once its reply arrives.
    pub fn before_write(
        &self,
        name: &str,
        request: &Request,
        table: &CommandTable,
    ) -> Option<Invalidation> {
        let flush = matches!(name, "FLUSHALL" | "FLUSHDB" | "SWAPDB");
        let tracking_clients = self.clients.active();
        let keys: Vec<Bytes> = table
            .key_positions(name, request)
            .into_iter()
            .filter_map(|position| request.args.get(position))
            .filter(|key| tracking_clients || self.max_ttl(key).is_some())
            .map(|key| Bytes::copy_from_slice(key))
            .collect();
        if keys.is_empty() && !flush {
            return None;
        }
        let invalidation = Invalidation { keys, flush };
        self.drop_cached(&invalidation);
        Some(invalidation)
    }

    fn drop_cached(&self, invalidation: &Invalidation) {
        let Some(store) = &self.store else {
            return;
        };
        if invalidation.flush {
            store.flush_all();
        }
        for key in &invalidation.keys {
            if self.max_ttl(key).is_some() {
                store.invalidate(key, Source::Write);
            }
        }
    }

    /// Applies a write's invalidation once its reply arrived: the cache
    /// drops the keys again, and tracking clients that read them get an
    /// invalidation push.
    pub fn after_write(&self, invalidation: &Invalidation) {
        self.drop_cached(invalidation);
        if invalidation.flush {
            self.clients.flush();
        } else if self.clients.active() {
            self.clients.invalidate(&invalidation.keys);
        }
    }

    /// Replaces the nodes that tracking connections run on.
    pub fn set_topology(&self, nodes: &[String]) {
        self.trackers.set_topology(nodes);
    }

    /// Drops what was read from `addr`, whose role changed.
    fn role_changed(&self, addr: &str) {
        if let (Some(store), Some(tracker)) =
            (&self.store, self.trackers.find(addr, Scope::Prefixes))
        {
            tracker.bump();
            store.flush_node(tracker.node);
        }
    }

    /// Follows a change of the standalone or sentinel primary and replicas.
    pub fn nodes_changed(&self, old: &Nodes, new: &Nodes) {
        let role = |nodes: &Nodes, addr: &str| -> Option<bool> {
            if nodes.primary == addr {
                Some(true)
            } else {
                nodes.replicas.iter().any(|r| r == addr).then_some(false)
            }
        };
        let mut all: Vec<&String> = vec![&old.primary, &new.primary];
        all.extend(old.replicas.iter().chain(new.replicas.iter()));
        for addr in all {
            if let (Some(before), Some(after)) = (role(old, addr), role(new, addr)) {
                if before != after {
                    self.role_changed(addr);
                }
            }
        }
        let mut nodes = vec![new.primary.clone()];
        nodes.extend(new.replicas.iter().cloned());
        nodes.retain(|addr| !addr.is_empty());
        self.set_topology(&nodes);
    }

    /// Follows a reload of the cluster slot map: replies cached for slots
    /// whose primary changed are dropped, and so is everything read from a
    /// node whose role changed.
    pub fn cluster_map_changed(&self, old: &ClusterMap, new: &ClusterMap) {
        if let Some(store) = &self.store {
            for slot in 0..crate::redis::slot::SLOT_COUNT {
                let before = old.shard(slot).map(|shard| &shard.primary);
                let after = new.shard(slot).map(|shard| &shard.primary);
                if before != after {
                    store.flush_slot(slot);
                }
            }
            let (old_primaries, new_primaries) = (old.primaries(), new.primaries());
            for addr in old.nodes() {
                let was_primary = old_primaries.contains(&addr);
                let is_primary = new_primaries.contains(&addr);
                if new.nodes().contains(&addr) && was_primary != is_primary {
                    self.role_changed(&addr);
                }
            }
        }
        self.set_topology(&new.nodes());
    }

    /// Follows a MOVED reply for `slot`, whose primary is now `addr`.
    pub fn slot_moved(&self, slot: u16, map: &ClusterMap) {
        if let Some(store) = &self.store {
            store.flush_slot(slot);
        }
        self.set_topology(&map.nodes());
    }

    /// Registers a client that turned on `CLIENT TRACKING`.
    pub fn track_client(&self, tracking: Arc<ClientTracking>) {
        self.clients.register(tracking);
        self.trackers.enable_all_scope();
    }

    pub fn untrack_client(&self, id: u64) {
        self.clients.unregister(id);
    }

    /// Records keys that tracking client `id` reads now.
    pub fn client_reads(&self, id: u64, keys: Vec<Bytes>) {
        let covered = self.trackers.all_ready();
        self.clients.record_reads(id, keys, covered);
    }

    /// Stops the tracking connections.
    pub fn stop(&self) {
        self.trackers.stop();
    }

    /// Status for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let Some(store) = &self.store else {
            return serde_json::Value::Null;
        };
        let (entries, bytes) = store.size();
        serde_json::json!({
            "entries": entries,
            "bytes": bytes,
            "tracking": self.trackers.connected(),
        })
    }
}

impl TrackerEvents for Cache {
    fn tracker_up(&self, tracker: &Tracker) {
        self.trackers.refresh_all_ready();
        if tracker.scope == Scope::All {
            // Keys read through a node skiff did not track yet (one just
            // learned from a redirect) may have changed unnoticed.
            self.clients.flush();
        }
    }

    fn tracker_down(&self, tracker: &Tracker) {
        self.trackers.refresh_all_ready();
        match tracker.scope {
            Scope::Prefixes => {
                if let Some(store) = &self.store {
                    store.flush_node(tracker.node);
                }
            }
            Scope::All => self.clients.flush(),
        }
    }

    fn keys_invalidated(&self, tracker: &Tracker, keys: Vec<Bytes>) {
        if let Some(store) = &self.store {
            for key in &keys {
                if self.max_ttl(key).is_some() {
                    store.invalidate(key, Source::Redis);
                }
            }
        }
        if tracker.scope == Scope::All || self.clients.active() {
            self.clients.invalidate(&keys);
        }
    }

    fn node_flushed(&self, tracker: &Tracker) {
        match tracker.scope {
            Scope::Prefixes => {
                if let Some(store) = &self.store {
                    tracker.bump();
                    store.flush_node(tracker.node);
                }
            }
            Scope::All => self.clients.flush(),
        }
    }
}

/// Keys a write touches, invalidated before it is sent and again after its
/// reply.
pub struct Invalidation {
    keys: Vec<Bytes>,
    flush: bool,
}

impl Invalidation {
    /// Wraps `pending` so the invalidation is applied before the client
    /// sees the write's reply.
    pub fn after(self, pending: Pending, router: Arc<Router>) -> Pending {
        Pending::Future(Box::pin(async move {
            let reply = pending.resolve(&router).await;
            router.cache.after_write(&self);
            reply
        }))
    }

    /// Adds a later write of the same transaction.
    pub fn merge(&mut self, other: Invalidation) {
        self.flush |= other.flush;
        self.keys.extend(other.keys);
        if self.keys.len() > MAX_TRANSACTION_KEYS {
            self.keys.clear();
            self.flush = true;
        }
    }
}
