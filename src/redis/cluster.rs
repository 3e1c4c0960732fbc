//! Redis Cluster routing: the slot map and its refresh, the node for each
//! command, and MOVED, ASK, TRYAGAIN and CLUSTERDOWN handled so the client
//! never sees a redirect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cache::Cache;
use super::command::{self, CommandSpec};
use super::fanout;
use super::frame::{encode_command, error_text, Request};
use super::order::RetryHold;
use super::reply;
use super::router::{Pending, Role, Router, SessionCtx};
use super::slot::key_slot;
use super::topology::{self, ClusterMap};
use super::upstream::{ConnSettings, UpstreamError};
use crate::config::ReadFrom;

/// Shortest gap between two slot map reloads triggered by redirects or
/// connection errors.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(500);
/// First wait before retrying after TRYAGAIN, CLUSTERDOWN or a refused
/// connection; it doubles on each try.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// Maximum wait between two retries.
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// The cluster's slot map and the refresh machinery.
pub struct Cluster {
    seeds: Vec<String>,
    map: RwLock<Arc<ClusterMap>>,
    /// The version of `map`, read by sessions before each command.
    version: AtomicU64,
    refresh: Notify,
    last_refresh: Mutex<Option<Instant>>,
    /// Told of every slot map change, to drop cached replies of moved slots.
    cache: Arc<Cache>,
}

impl Cluster {
    pub fn new(seeds: Vec<String>, cache: Arc<Cache>) -> Cluster {
        // Versions start at 1, because a session's 0 means no map.
        let mut empty = ClusterMap::empty();
        empty.version = 1;
        Cluster {
            map: RwLock::new(Arc::new(empty)),
            version: AtomicU64::new(1),
            seeds,
            refresh: Notify::new(),
            last_refresh: Mutex::new(None),
            cache,
        }
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().clone()
    }

    /// Asks the refresh task to reload the slot map soon.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Returns the node a MOVED or ASK reply points to, and whether ASKING
    /// must go first; a MOVED also updates the slot map. `None` for any
    /// other reply.
    pub fn redirect(&self, reply: &[u8], origin: &str) -> Option<(String, bool)> {
        match classify(reply, origin) {
            Next::Moved(slot, addr) => {
                metrics::counter!("skiff_redis_redirects_total", "kind" => "moved").increment(1);
                self.apply_moved(slot, &addr);
                self.request_refresh();
                Some((addr, false))
            }
            Next::Ask(addr) => {
                metrics::counter!("skiff_redis_redirects_total", "kind" => "ask").increment(1);
                Some((addr, true))
            }
            Next::Wait | Next::Done => None,
        }
    }

    fn apply_moved(&self, slot: u16, addr: &str) {
        let moved = {
            let mut map = self.map.write();
            let current = map.shard(slot).is_some_and(|shard| &*shard.primary == addr);
            if current {
                return;
            }
            let moved = map.with_moved(slot, addr);
            self.install(&mut map, moved);
            map.clone()
        };
        self.cache.slot_moved(slot, &moved);
    }

    /// Returns the version of the slot map in force, without a lock.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Replaces the map in `current`, which the write lock guards, by
    /// `map` with the next version.
    fn install(&self, current: &mut Arc<ClusterMap>, mut map: ClusterMap) {
        map.version = current.version + 1;
        self.version.store(map.version, Ordering::Release);
        *current = Arc::new(map);
    }

    /// Reloads the slot map from the known nodes, then the seeds.
    pub async fn refresh(&self, settings: &ConnSettings) -> Result<(), String> {
        *self.last_refresh.lock() = Some(Instant::now());
        let mut candidates = self.map().nodes();
        candidates.extend(self.seeds.iter().cloned());
        candidates.dedup();
        let map = topology::discover(&candidates, settings).await?;
        metrics::counter!("skiff_redis_topology_refreshes_total").increment(1);
        // An unchanged map keeps its version, so that sessions keep
        // sending without waiting for their earlier commands.
        let (old, new) = {
            let mut current = self.map.write();
            if current.routes_like(&map) {
                return Ok(());
            }
            let old = current.clone();
            self.install(&mut current, map);
            (old, current.clone())
        };
        self.cache.cluster_map_changed(&old, &new);
        Ok(())
    }
}

/// Reloads the slot map every `interval`, and soon after a redirect or a
/// connection error. Triggered reloads wait until [`MIN_REFRESH_GAP`] has
/// passed since the previous one.
pub async fn refresh_loop(
    router: Arc<Router>,
    settings: ConnSettings,
    shutdown: CancellationToken,
) {
    let Some(cluster) = &router.cluster else {
        return;
    };
    let interval = router.config().topology_refresh_interval;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = cluster.refresh.notified() => {
                let last = *cluster.last_refresh.lock();
                if let Some(wait) = last.and_then(|at| MIN_REFRESH_GAP.checked_sub(at.elapsed())) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        match cluster.refresh(&settings).await {
            Ok(()) => {
                router.pool.retain_nodes(&cluster.map().nodes());
                if std::mem::take(&mut failing) {
                    tracing::info!("cluster slot map refresh works again");
                }
            }
            // Warn once per outage; repeats go to debug.
            Err(reason) if !failing => {
                failing = true;
                tracing::warn!(error = %reason, "cluster slot map refresh failed");
            }
            Err(reason) => tracing::debug!(error = %reason, "cluster slot map refresh failed"),
        }
    }
}

/// Picks the node for `slot` by the read policy.
pub(super) fn pick_node(
    router: &Router,
    map: &ClusterMap,
    slot: u16,
    readonly: bool,
    client_id: u64,
) -> Option<(Arc<str>, Role)> {
    let shard = map.shard(slot)?;
    let primary = (shard.primary.clone(), Role::Primary);
    let read_from = router.config().read_from;
    if !readonly || shard.replicas.is_empty() || read_from == ReadFrom::Primary {
        return Some(primary);
    }
    let is_up = |addr: &&Arc<str>| router.pool.is_up(addr);
    let up = shard.replicas.iter().filter(is_up).count();
    // Picks the client's replica among the `count` replicas that `filter` keeps.
    let replica = |count: usize, filter: &dyn Fn(&&Arc<str>) -> bool| {
        let index = client_id as usize % count.max(1);
        let addr = shard.replicas.iter().filter(filter).nth(index)?;
        Some((addr.clone(), Role::Replica))
    };
    match read_from {
        ReadFrom::Primary => Some(primary),
        ReadFrom::PreferReplica => replica(up, &is_up).or(Some(primary)),
        ReadFrom::Replica => {
            replica(up, &is_up).or_else(|| replica(shard.replicas.len(), &|_| true))
        }
        ReadFrom::Any if client_id % (up as u64 + 1) == 0 => Some(primary),
        ReadFrom::Any => replica(up, &is_up).or(Some(primary)),
    }
}

/// Routes one command in cluster mode.
pub async fn submit(
    router: &Arc<Router>,
    request: Request,
    name: &str,
    ctx: SessionCtx,
    spec: Option<CommandSpec>,
) -> Pending {
    let map = router.cluster.as_ref().expect("cluster mode").map();
    if ctx.map_version != 0 && ctx.map_version != map.version {
        return route_in_order(router, request, name, ctx, spec);
    }
    let readonly = spec.is_some_and(|spec| spec.readonly);
    let mut positions = command::key_positions(spec.as_ref(), name, &request);
    let Some(first) = positions.next() else {
        return fanout::keyless(router, &map, request, name, ctx).await;
    };
    let slot = key_slot(&request.args[first]);
    let same_slot = positions.all(|i| key_slot(&request.args[i]) == slot);
    if !same_slot {
        let positions: Vec<usize> = command::key_positions(spec.as_ref(), name, &request).collect();
        let slots: Vec<u16> = positions
            .iter()
            .map(|&i| key_slot(&request.args[i]))
            .collect();
        return match fanout::split(router, &map, &request, name, &positions, &slots, ctx).await {
            Some(pending) => pending,
            None => Pending::Ready(reply::error(reply::CROSSSLOT)),
        };
    }
    submit_to_slot(router, &map, request, slot, readonly, ctx).await
}

/// Routes a command once the writer reaches its reply, after the final
/// replies of the session's earlier commands. Those went by the map of
/// version `ctx.map_version`, which has changed since. Sent now, the command
/// could reach a slot's new owner before an earlier command to the same
/// slot, redirected from the old owner, is sent there again.
fn route_in_order(
    router: &Arc<Router>,
    request: Request,
    name: &str,
    ctx: SessionCtx,
    spec: Option<CommandSpec>,
) -> Pending {
    let ctx = SessionCtx {
        map_version: 0,
        ..ctx
    };
    let router = router.clone();
    let name = name.to_string();
    Pending::Future(Box::pin(async move {
        let pending = Box::pin(submit(&router, request, &name, ctx, spec)).await;
        pending.resolve(&router).await
    }))
}

/// Writes `request` to the node serving `slot`; failures before anything
/// was written become a retry on the slower path.
pub async fn submit_to_slot(
    router: &Arc<Router>,
    map: &ClusterMap,
    request: Request,
    slot: u16,
    readonly: bool,
    ctx: SessionCtx,
) -> Pending {
    let Some((addr, role)) = pick_node(router, map, slot, readonly, ctx.client_id) else {
        let retry = Retry {
            request,
            slot: Some(slot),
            readonly,
            ctx,
        };
        let pending = follow(
            router.clone(),
            retry,
            String::new(),
            Ok(clusterdown()),
            None,
        );
        return Pending::Future(Box::pin(pending));
    };
    match router.send(&addr, &request, ctx).await {
        Ok(receiver) => {
            let mut in_flight = router.in_flight(receiver, addr, role);
            in_flight.retry = Some(Retry {
                request,
                slot: Some(slot),
                readonly,
                ctx,
            });
            Pending::InFlight(in_flight)
        }
        Err(err) if err.nothing_sent() => {
            let retry = Retry {
                request,
                slot: Some(slot),
                readonly,
                ctx,
            };
            // NOTE: this command is sent once the writer reaches its reply,
            // without the session's retry hold, so later commands of a
            // pipeline that reach the node first run before it.
            Pending::Future(Box::pin(follow(
                router.clone(),
                retry,
                addr.to_string(),
                Err(err),
                None,
            )))
        }
        Err(err) => Pending::Ready(router.upstream_failure(&err, role)),
    }
}

fn clusterdown() -> Bytes {
    reply::error("CLUSTERDOWN Hash slot not served")
}

/// Next step the router takes after a reply.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Done,
    Moved(u16, String),
    Ask(String),
    Wait,
}

fn classify(reply: &[u8], origin: &str) -> Next {
    let Some(text) = error_text(reply) else {
        return Next::Done;
    };
    let mut words = text.split(' ');
    let code = words.next().unwrap_or_default();
    if code == "TRYAGAIN" || code == "CLUSTERDOWN" {
        return Next::Wait;
    }
    let slot = words.next().and_then(|slot| slot.parse::<u16>().ok());
    let Some((slot, target)) = slot.zip(words.next()) else {
        return Next::Done;
    };
    // An empty host means the host of the node that replied.
    let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
    let host = match host {
        "" => origin.rsplit_once(':').map_or(origin, |(host, _)| host),
        host => host,
    };
    let target = topology::host_port(host.trim_start_matches('[').trim_end_matches(']'), port);
    match code {
        "MOVED" => Next::Moved(slot, target),
        "ASK" => Next::Ask(target),
        _ => Next::Done,
    }
}

/// True when `result` is a redirect, a retryable cluster error or a failure
/// before anything was written.
pub fn needs_retry(result: &Result<Bytes, UpstreamError>) -> bool {
    match result {
        Ok(reply) => classify(reply, "").ne(&Next::Done),
        Err(err) => err.nothing_sent(),
    }
}

/// The request of a command whose redirects are being followed.
pub struct Retry {
    pub request: Request,
    /// `None` for a command without keys, which goes back to the node that
    /// last replied when it must be retried.
    pub slot: Option<u16>,
    pub readonly: bool,
    pub ctx: SessionCtx,
}

/// Follows redirects and retries for one command, at most `max_redirects`
/// hops, and returns the final reply. A redirect is never returned raw.
/// The writer resolves a client's replies in order, so redirects of one
/// client are followed in its order. The session's map order (`order.rs`)
/// keeps later commands from reaching the new node first. With `hold`, a
/// command that must wait to be retried while later commands of its
/// client were sent gets its error instead, since they would run first.
pub async fn follow(
    router: Arc<Router>,
    retry: Retry,
    origin: String,
    mut result: Result<Bytes, UpstreamError>,
    hold: Option<&RetryHold>,
) -> Bytes {
    let cluster = router.cluster.as_ref().expect("cluster mode");
    let started = Instant::now();
    let mut origin = origin;
    let mut backoff = RETRY_BACKOFF;
    for _ in 0..=router.config().max_redirects {
        let later_sent = || hold.is_some_and(RetryHold::later_commands_sent);
        let reply = match result {
            Ok(reply) => reply,
            Err(err) if err.nothing_sent() && !later_sent() => {
                cluster.request_refresh();
                clusterdown()
            }
            Err(err) => return router.upstream_failure(&err, Role::Primary),
        };
        let next = classify(&reply, &origin);
        if next == Next::Done || (next == Next::Wait && later_sent()) {
            router.record_command(Role::Primary, &reply, started);
            return reply;
        }
        if next == Next::Wait {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
        }
        let hop = match cluster.redirect(&reply, &origin) {
            Some(hop) => Some(hop),
            None => retry_target(&router, cluster, &retry, &origin),
        };
        let Some((addr, asking)) = hop else {
            result = Ok(reply);
            continue;
        };
        origin = addr.clone();
        result = call(&router, &addr, &retry.request, asking, retry.ctx).await;
    }
    match result {
        Ok(reply) if !matches!(classify(&reply, ""), Next::Moved(..) | Next::Ask(_)) => reply,
        Ok(_) => reply::error("ERR too many cluster redirects for one command"),
        Err(err) => router.upstream_failure(&err, Role::Primary),
    }
}

/// Returns the node to retry after TRYAGAIN or CLUSTERDOWN, or `None`
/// when no node serves the slot yet.
fn retry_target(
    router: &Router,
    cluster: &Cluster,
    retry: &Retry,
    origin: &str,
) -> Option<(String, bool)> {
    let Some(slot) = retry.slot else {
        return (!origin.is_empty()).then(|| (origin.to_string(), false));
    };
    let map = cluster.map();
    let picked = pick_node(router, &map, slot, retry.readonly, retry.ctx.client_id);
    if picked.is_none() {
        cluster.request_refresh();
    }
    picked.map(|(addr, _)| (addr.to_string(), false))
}

/// Sends `request` to `addr` and waits for its reply; with `asking`, ASKING
/// goes first on the same connection, in the same write.
async fn call(
    router: &Router,
    addr: &str,
    request: &Request,
    asking: bool,
    ctx: SessionCtx,
) -> Result<Bytes, UpstreamError> {
    if !asking {
        let receiver = router.send(addr, request, ctx).await?;
        return receiver
            .await
            .unwrap_or_else(|_| Err(UpstreamError::Closed { addr: addr.into() }));
    }
    let key = super::pool::ConnKey {
        addr: addr.to_string(),
        protocol: ctx.protocol,
        db: ctx.db,
    };
    let conn = router.pool.shared(&key, ctx.client_id as usize).await?;
    let mut batch = encode_command(&["ASKING"]).to_vec();
    batch.extend_from_slice(&request.raw);
    let mut receivers = conn.send(&batch, 2).await?;
    let reply = receivers.pop().expect("two receivers");
    reply
        .await
        .unwrap_or_else(|_| Err(UpstreamError::Closed { addr: addr.into() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_redirects() {
        let moved = b"-MOVED 3999 127.0.0.1:6381\r\n";
        assert_eq!(
            classify(moved, ""),
            Next::Moved(3999, "127.0.0.1:6381".into())
        );
        let ask = b"-ASK 3999 127.0.0.1:6381\r\n";
        assert_eq!(classify(ask, ""), Next::Ask("127.0.0.1:6381".into()));
        assert_eq!(classify(b"-TRYAGAIN Multiple keys\r\n", ""), Next::Wait);
        assert_eq!(
            classify(b"-CLUSTERDOWN The cluster is down\r\n", ""),
            Next::Wait
        );
        assert_eq!(classify(b"+OK\r\n", ""), Next::Done);
        assert_eq!(classify(b"-ERR wrong type\r\n", ""), Next::Done);
    }

    #[test]
    fn classify_brackets_ipv6_targets() {
        let moved = b"-MOVED 12 ::1:7002\r\n";
        assert_eq!(classify(moved, ""), Next::Moved(12, "[::1]:7002".into()));
        let empty_host = b"-ASK 12 :7002\r\n";
        assert_eq!(
            classify(empty_host, "[::1]:7000"),
            Next::Ask("[::1]:7002".into())
        );
    }

    #[test]
    fn classify_empty_host_uses_origin() {
        let moved = b"-MOVED 12 :7002\r\n";
        assert_eq!(
            classify(moved, "10.1.1.1:7000"),
            Next::Moved(12, "10.1.1.1:7002".into())
        );
    }
}
