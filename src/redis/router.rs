//! Routing: picks the upstream node for each command, writes it on the
//! client's shared pipelined connection to that node, and turns the reply or
//! failure into what the client receives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::oneshot::error::RecvError;

use super::cache::{self, Cache};
use super::cluster::{self, Cluster};
use super::command::{CommandSpec, CommandTable};
use super::frame::{error_text, Protocol, Request};
use super::order::{self, Outstanding};
use super::pool::{Pool, PoolSettings};
use super::reply;
use super::upstream::{ReplyReceiver, UpstreamError, UpstreamTls};
use crate::admin::BoxFuture;
use crate::config::{ReadFrom, RedisConfig, RedisMode};
use arc_swap::ArcSwap;

/// Per-client settings that routing depends on.
#[derive(Debug, Clone, Copy)]
pub struct SessionCtx {
    pub protocol: Protocol,
    pub db: u32,
    pub client_id: u64,
    /// In cluster mode, the slot map version the session's outstanding
    /// commands went by. A command that finds another map in force is
    /// routed after them. 0 when order does not depend on the map.
    pub map_version: u64,
}

/// The node role a command went to, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    fn index(self) -> usize {
        match self {
            Role::Primary => 0,
            Role::Replica => 1,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// A reply the client session waits for, in request order.
pub enum Pending {
    Ready(Bytes),
    InFlight(InFlight),
    Future(BoxFuture<'static, Bytes>),
}

impl Pending {
    /// Waits for the reply.
    pub async fn resolve(self, router: &Arc<Router>) -> Bytes {
        match self {
            Pending::Ready(reply) => reply,
            Pending::InFlight(in_flight) => router.clone().finish(in_flight).await,
            Pending::Future(future) => future.await,
        }
    }
}

/// A request written upstream whose reply has not been read yet.
pub struct InFlight {
    pub(super) receiver: ReplyReceiver,
    pub(super) addr: Arc<str>,
    pub(super) role: Role,
    started: Instant,
    /// Kept in cluster mode to follow a redirect.
    pub(super) retry: Option<cluster::Retry>,
    /// Counts the command among the session's outstanding ones until the
    /// reply, redirects followed, is final.
    pub(super) outstanding: Option<Outstanding>,
}

/// A primary and its replicas, for standalone and sentinel modes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nodes {
    /// Empty until sentinel discovery reports the primary.
    pub primary: String,
    pub replicas: Vec<String>,
}

/// Routes the commands of every client session.
pub struct Router {
    /// The settings in force; a reload replaces those that can change while
    /// running. Read with `config()`.
    config: ArcSwap<RedisConfig>,
    pub pool: Pool,
    commands: RwLock<Arc<CommandTable>>,
    pub(super) cluster: Option<Cluster>,
    /// Near cache and `CLIENT TRACKING` support.
    pub(super) cache: Arc<Cache>,
    nodes: RwLock<Arc<Nodes>>,
    /// The primary's address of `nodes`, shared so that a request to it
    /// does not copy the address.
    primary_addr: RwLock<Arc<str>>,
    /// Wakes sentinel discovery after a failure that may mean a failover.
    pub(super) sentinel_refresh: tokio::sync::Notify,
    next_client_id: AtomicU64,
    /// `redis_version` of the upstream, reported in HELLO.
    pub server_version: RwLock<String>,
    /// `main` for `[redis]`, else the route's name: the `route` label of
    /// the command metrics.
    route: Arc<str>,
    metrics: CommandMetrics,
}

impl Router {
    pub fn config(&self) -> arc_swap::Guard<Arc<RedisConfig>> {
        self.config.load()
    }

    /// Replaces the settings in force; callers keep what cannot change
    /// while running.
    pub fn replace_config(&self, config: RedisConfig) {
        self.config.store(Arc::new(config));
    }

    /// Builds the router of `[redis]` or of route `route`; no connection is
    /// made until the Redis job serves.
    pub fn new(config: RedisConfig, route: &str) -> Result<Router, String> {
        let nodes = match config.mode {
            RedisMode::Standalone => Nodes {
                primary: config.nodes[0].clone(),
                replicas: config.nodes[1..].to_vec(),
            },
            RedisMode::Sentinel | RedisMode::Cluster => Nodes::default(),
        };
        let cluster_mode = config.mode == RedisMode::Cluster;
        let tls = match config.tls {
            true => Some(UpstreamTls::new(
                config.tls_ca_file.as_deref().map(std::path::Path::new),
                config.tls_server_name.as_deref(),
            )?),
            false => None,
        };
        let pool = Pool::new(PoolSettings {
            shared_per_node: config.upstream_connection_count(),
            max_dedicated: config.max_dedicated_connections,
            readonly: cluster_mode,
            username: config.username.clone(),
            password: config.password.clone(),
            connect_timeout: config.connect_timeout,
            reply_timeout: config.reply_timeout,
            max_reply_bytes: config.max_reply_bytes,
            tls,
        });
        let cache = Cache::new(&config, pool.tls());
        let cluster = cluster_mode.then(|| Cluster::new(config.nodes.clone(), cache.clone()));
        Ok(Router {
            config: ArcSwap::from_pointee(config),
            pool,
            commands: RwLock::new(Arc::new(CommandTable::builtin())),
            cluster,
            cache,
            primary_addr: RwLock::new(Arc::from(nodes.primary.as_str())),
            nodes: RwLock::new(Arc::new(nodes)),
            sentinel_refresh: tokio::sync::Notify::new(),
            next_client_id: AtomicU64::new(1),
            server_version: RwLock::new("7.0.0".into()),
            route: Arc::from(route),
            metrics: CommandMetrics::register(route),
        })
    }

    /// Returns `main` for `[redis]`, else the route's name.
    pub fn route_name(&self) -> &str {
        &self.route
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn commands(&self) -> Arc<CommandTable> {
        self.commands.read().clone()
    }

    pub fn set_commands(&self, table: CommandTable) {
        *self.commands.write() = Arc::new(table);
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Returns the standalone or sentinel-reported primary and replicas.
    pub fn nodes(&self) -> Arc<Nodes> {
        self.nodes.read().clone()
    }

    /// Returns every upstream node of the current topology.
    pub fn known_nodes(&self) -> Vec<String> {
        if let Some(cluster) = &self.cluster {
            return cluster.map().nodes();
        }
        let nodes = self.nodes();
        let mut all = vec![nodes.primary.clone()];
        all.extend(nodes.replicas.iter().cloned());
        all.retain(|addr| !addr.is_empty());
        all
    }

    /// Replaces the primary and replicas after sentinel discovery.
    pub fn set_nodes(&self, nodes: Nodes) {
        let mut current = self.nodes.write();
        if **current != nodes {
            tracing::info!(primary = %nodes.primary, replicas = ?nodes.replicas,
                "redis primary and replicas updated");
            let new = Arc::new(nodes);
            *self.primary_addr.write() = Arc::from(new.primary.as_str());
            let old = std::mem::replace(&mut *current, new.clone());
            drop(current);
            self.cache.nodes_changed(&old, &new);
        }
    }

    /// Returns the primary's address, or the error reply when none is known.
    pub fn primary(&self) -> Result<String, Bytes> {
        let nodes = self.nodes();
        if nodes.primary.is_empty() {
            let config = self.config();
            let name = config.master_name.as_deref().unwrap_or_default();
            let text = format!("ERR no primary known for {name}: no sentinel reported one yet");
            return Err(reply::error(&text));
        }
        Ok(nodes.primary.clone())
    }

    /// [`Router::primary`] as a shared address.
    fn primary_addr(&self) -> Result<Arc<str>, Bytes> {
        let primary = self.primary_addr.read().clone();
        if primary.is_empty() {
            return self.primary().map(Arc::from);
        }
        Ok(primary)
    }

    /// Sends `request` towards its node, or answers it from the near
    /// cache, and returns the pending reply.
    pub async fn submit(
        self: &Arc<Self>,
        request: Request,
        name: &str,
        ctx: SessionCtx,
    ) -> Pending {
        if self.cache.is_enabled() {
            if let Some(kind) = cache::classify(name, request.args.len()) {
                return cache::read(self, request, name, kind, ctx).await;
            }
        }
        let table = self.commands();
        let spec = table.get(name, &request).copied();
        let readonly = spec.is_some_and(|spec| spec.readonly);
        if !readonly && self.cache.watches_writes() {
            if let Some(invalidation) = self.cache.before_write(name, &request, &table) {
                let pending = self.route_with(request, name, ctx, spec).await;
                return invalidation.after(pending, self.clone());
            }
        }
        self.route_with(request, name, ctx, spec).await
    }

    /// Sends `request` towards its node, bypassing the near cache.
    pub async fn route(self: &Arc<Self>, request: Request, name: &str, ctx: SessionCtx) -> Pending {
        let spec = self.commands().get(name, &request).copied();
        self.route_with(request, name, ctx, spec).await
    }

    /// Sends `request`, whose entry in the command table is `spec`.
    async fn route_with(
        self: &Arc<Self>,
        request: Request,
        name: &str,
        ctx: SessionCtx,
        spec: Option<CommandSpec>,
    ) -> Pending {
        let readonly = spec.is_some_and(|spec| spec.readonly);
        if self.cluster.is_some() {
            return cluster::submit(self, request, name, ctx, spec).await;
        }
        if !readonly || self.config().read_from == ReadFrom::Primary {
            return self.route_to_primary(&request, ctx).await;
        }
        let targets = match self.standalone_targets(readonly, ctx.client_id) {
            Ok(targets) => targets,
            Err(error) => return Pending::Ready(error),
        };
        let mut last_error = None;
        for (addr, role) in targets {
            match self.send(&addr, &request, ctx).await {
                Ok(receiver) => return Pending::InFlight(self.in_flight(receiver, addr, role)),
                // Only a read is tried on the next node, and only when
                // nothing was written.
                Err(err) if err.nothing_sent() && readonly => last_error = Some((err, role)),
                Err(err) => return Pending::Ready(self.upstream_failure(&err, role)),
            }
        }
        match last_error {
            Some((err, role)) => Pending::Ready(self.upstream_failure(&err, role)),
            None => Pending::Ready(reply::error("ERR no upstream node is available")),
        }
    }

    /// Sends `request` to the standalone or sentinel primary, the only
    /// candidate of a write or of a read with `read_from = "primary"`.
    async fn route_to_primary(&self, request: &Request, ctx: SessionCtx) -> Pending {
        let primary = match self.primary_addr() {
            Ok(primary) => primary,
            Err(error) => return Pending::Ready(error),
        };
        match self.send(&primary, request, ctx).await {
            Ok(receiver) => Pending::InFlight(self.in_flight(receiver, primary, Role::Primary)),
            Err(err) => Pending::Ready(self.upstream_failure(&err, Role::Primary)),
        }
    }

    pub(super) fn in_flight(
        &self,
        receiver: ReplyReceiver,
        addr: impl Into<Arc<str>>,
        role: Role,
    ) -> InFlight {
        InFlight {
            receiver,
            addr: addr.into(),
            role,
            started: Instant::now(),
            retry: None,
            outstanding: None,
        }
    }

    /// Returns the node a read of `key` goes to by the read policy, its
    /// role, and the key's slot (0 outside cluster mode).
    pub(super) fn read_target(&self, key: &[u8], ctx: SessionCtx) -> Option<(String, Role, u16)> {
        match &self.cluster {
            Some(cluster) => {
                let slot = super::slot::key_slot(key);
                let map = cluster.map();
                let (addr, role) = cluster::pick_node(self, &map, slot, true, ctx.client_id)?;
                Some((addr.to_string(), role, slot))
            }
            None => {
                let targets = self.standalone_targets(true, ctx.client_id).ok()?;
                let (addr, role) = targets.into_iter().next()?;
                Some((addr, role, 0))
            }
        }
    }

    /// Candidate nodes for a standalone command, best first.
    fn standalone_targets(
        &self,
        readonly: bool,
        client_id: u64,
    ) -> Result<Vec<(String, Role)>, Bytes> {
        let primary = (self.primary()?, Role::Primary);
        if !readonly {
            return Ok(vec![primary]);
        }
        let nodes = self.nodes();
        let rotate = |addrs: &[String]| -> Vec<(String, Role)> {
            let mut rotated: Vec<(String, Role)> = addrs
                .iter()
                .map(|addr| (addr.clone(), Role::Replica))
                .collect();
            if !rotated.is_empty() {
                let shift = client_id as usize % rotated.len();
                rotated.rotate_left(shift);
            }
            rotated
        };
        let up: Vec<String> = nodes
            .replicas
            .iter()
            .filter(|addr| self.pool.is_up(addr))
            .cloned()
            .collect();
        let targets = match self.config().read_from {
            ReadFrom::Primary => vec![primary],
            ReadFrom::PreferReplica => {
                let mut targets = rotate(&up);
                targets.push(primary);
                targets
            }
            ReadFrom::Replica if up.is_empty() => rotate(&nodes.replicas),
            ReadFrom::Replica => rotate(&up),
            ReadFrom::Any => {
                let mut targets = rotate(&up);
                targets.push(primary);
                let shift = client_id as usize % targets.len();
                targets.rotate_left(shift);
                targets
            }
        };
        Ok(targets)
    }

    /// Writes `request` on the client's shared connection to `addr`.
    pub(super) async fn send(
        &self,
        addr: &str,
        request: &Request,
        ctx: SessionCtx,
    ) -> Result<ReplyReceiver, UpstreamError> {
        let conn = self.shared_conn(addr, ctx).await?;
        match conn.send_one(&request.raw).await {
            // The connection died since the pool handed it out: the pool
            // replaces it, and nothing was written, so one retry is safe.
            Err(UpstreamError::NotSent { .. }) => {
                let conn = self.shared_conn(addr, ctx).await?;
                conn.send_one(&request.raw).await
            }
            result => result,
        }
    }

    /// Writes `count` requests encoded back to back in `bytes` on the
    /// client's shared connection to `addr`, in one write.
    pub(super) async fn send_batch(
        &self,
        addr: &str,
        bytes: &[u8],
        count: usize,
        ctx: SessionCtx,
    ) -> Result<Vec<ReplyReceiver>, UpstreamError> {
        let conn = self.shared_conn(addr, ctx).await?;
        match conn.send(bytes, count).await {
            // As in `send`: nothing was written, so one retry is safe.
            Err(UpstreamError::NotSent { .. }) => {
                let conn = self.shared_conn(addr, ctx).await?;
                conn.send(bytes, count).await
            }
            result => result,
        }
    }

    async fn shared_conn(
        &self,
        addr: &str,
        ctx: SessionCtx,
    ) -> Result<Arc<super::upstream::Pipelined>, UpstreamError> {
        let index = ctx.client_id as usize;
        self.pool.shared_to(addr, ctx.protocol, ctx.db, index).await
    }

    /// Waits for the reply of `in_flight`, following cluster redirects.
    pub async fn finish(self: Arc<Self>, mut in_flight: InFlight) -> Bytes {
        let received = (&mut in_flight.receiver).await;
        self.complete(in_flight, received).await
    }

    /// Finishes `in_flight` with what its receiver gave: counts the reply,
    /// or follows a cluster redirect.
    pub async fn complete(
        self: Arc<Self>,
        mut in_flight: InFlight,
        received: Result<Result<Bytes, UpstreamError>, RecvError>,
    ) -> Bytes {
        let result = received.unwrap_or_else(|_| {
            Err(UpstreamError::Closed {
                addr: in_flight.addr.to_string(),
            })
        });
        if let Some(retry) = in_flight.retry.take() {
            if cluster::needs_retry(&result) {
                let origin = in_flight.addr.to_string();
                let hold = match &in_flight.outstanding {
                    Some(outstanding) => Some(outstanding.hold_for_retry()),
                    None => order::hold_for_nested_retry(),
                };
                let reply = cluster::follow(self, retry, origin, result, hold.as_ref()).await;
                // Released before the command stops counting as outstanding.
                drop(hold);
                return reply;
            }
        }
        match result {
            Ok(reply) => {
                self.record_command(in_flight.role, &reply, in_flight.started);
                // A write on a primary that a failover demoted.
                if reply.starts_with(b"-READONLY ") {
                    self.sentinel_refresh.notify_one();
                }
                reply
            }
            Err(err) => self.upstream_failure(&err, in_flight.role),
        }
    }

    /// Counts a failed upstream exchange and returns the client's error.
    pub(super) fn upstream_failure(&self, err: &UpstreamError, role: Role) -> Bytes {
        self.metrics.outcomes[role.index()][2].increment(1);
        match err {
            // A stalled replica still accepts connections, so only this
            // keeps reads away from it for a while (prefer-replica, any).
            // A primary has no stand-in, so its requests keep trying it.
            UpstreamError::ReplyTimeout { addr, .. } if role == Role::Replica => {
                self.pool.mark_down(addr)
            }
            _ => {}
        }
        tracing::debug!(error = %err, "upstream request failed");
        if let Some(cluster) = &self.cluster {
            cluster.request_refresh();
        }
        self.sentinel_refresh.notify_one();
        reply::error(&format!("ERR {err}"))
    }

    /// Counts a command and its latency by role and outcome.
    pub fn record_command(&self, role: Role, reply: &[u8], started: Instant) {
        let outcome = usize::from(error_text(reply).is_some());
        self.metrics.outcomes[role.index()][outcome].increment(1);
        self.metrics.durations[role.index()].record(started.elapsed().as_secs_f64());
    }
}

/// Handles of `skiff_redis_commands_total` and
/// `skiff_redis_command_duration_seconds`, registered once so that counting
/// a command does not build and look up its labels again.
struct CommandMetrics {
    /// Indexed by [`Role::index`], then ok, error, failed.
    outcomes: [[metrics::Counter; 3]; 2],
    durations: [metrics::Histogram; 2],
}

impl CommandMetrics {
    fn register(route: &str) -> CommandMetrics {
        let route: Arc<str> = Arc::from(route);
        let outcomes = |role: Role| {
            ["ok", "error", "failed"].map(|outcome| {
                metrics::counter!("skiff_redis_commands_total", "role" => role.label(),
                    "outcome" => outcome, "route" => route.clone())
            })
        };
        let duration = |role: Role| {
            metrics::histogram!("skiff_redis_command_duration_seconds", "role" => role.label(),
                "route" => route.clone())
        };
        CommandMetrics {
            outcomes: [outcomes(Role::Primary), outcomes(Role::Replica)],
            durations: [duration(Role::Primary), duration(Role::Replica)],
        }
    }
}
