//! Redis router: applications talk to skiff as to one plain Redis server
//! (RESP2 or RESP3), and skiff routes each command to a standalone primary
//! and its replicas or to the nodes of a Redis Cluster.

mod builtin;
mod cache;
mod cluster;
pub mod command;
mod fanout;
pub mod frame;
mod inline;
mod local;
mod multibulk;
mod order;
mod pool;
mod pubsub;
mod reload;
pub mod reply;
mod router;
mod routes;
mod sentinel;
mod session;
pub mod slot;
mod stop;
mod topology;
mod transaction;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admin::{BoxFuture, Component};
use crate::config::{RedisConfig, RedisMode};
use crate::threads::SessionThreads;
use command::CommandTable;
use frame::{encode_command, error_text, Protocol, Value};
use router::Router;
use routes::Routes;
use upstream::{ConnSettings, RawConn};

/// The Redis job: a listener and the routers behind it, of `[redis]` and of
/// each `[[redis.routes]]` entry.
pub struct RedisRouter {
    /// The router of `[redis]`.
    router: Arc<Router>,
    routes: Arc<Routes>,
    clients: Arc<Semaphore>,
}

impl RedisRouter {
    pub fn new(config: RedisConfig) -> Result<Arc<RedisRouter>, String> {
        let clients = Arc::new(Semaphore::new(config.max_clients));
        let routes = Arc::new(Routes::new(config)?);
        let router = routes.main().clone();
        Ok(Arc::new(RedisRouter {
            router,
            routes,
            clients,
        }))
    }

    /// Starts the `[redis] threads` threads that [`RedisRouter::serve`] runs
    /// client sessions on.
    pub fn start_threads(&self) -> std::io::Result<SessionThreads> {
        SessionThreads::start("skiff-redis", self.router.config().thread_count())
    }

    /// Accepts clients on `listener` and runs their sessions on `threads`
    /// until `shutdown` is cancelled, then waits for sessions to finish and
    /// stops the threads.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        threads: SessionThreads,
        shutdown: CancellationToken,
    ) {
        let mut refresh_tasks = Vec::new();
        for router in self.routes.all() {
            load_upstream_state(router).await;
            router.cache.set_topology(&router.known_nodes());
            let settings = discovery_settings(router);
            let task = match router.config().mode {
                RedisMode::Cluster => Some(tokio::spawn(cluster::refresh_loop(
                    router.clone(),
                    settings,
                    shutdown.clone(),
                ))),
                RedisMode::Sentinel => Some(tokio::spawn(sentinel::watch(
                    router.clone(),
                    settings,
                    shutdown.clone(),
                ))),
                RedisMode::Standalone => None,
            };
            refresh_tasks.extend(task);
        }
        // Tells the sessions to stop reading requests once skiff shuts down.
        let stop = stop::StopSignal::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (mut stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "redis accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.clients.clone().try_acquire_owned() else {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                continue;
            };
            // The session moves to a session thread's runtime, which must
            // register the socket with its own reactor.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "redis accept failed");
                    continue;
                }
            };
            let routes = self.routes.clone();
            let shutdown = shutdown.clone();
            let stop = stop.clone();
            // Clients whose ids are equal modulo the thread count share a
            // thread, and ids pick the shared upstream connection, so a
            // thread's sessions use the connections that thread opened when
            // upstream_connections is a multiple of the thread count. With
            // other counts, sessions of several threads share a connection.
            let client_id = self.router.next_client_id();
            // At info level, so warnings and errors about this client name its
            // address.
            let span = tracing::info_span!("redis_client", peer = %peer);
            let session = async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        tracing::debug!("client connected");
                        session::run(routes, stream, peer, client_id, shutdown, stop).await;
                        tracing::debug!("client disconnected");
                    }
                    Err(err) => tracing::warn!(error = %err, "redis accept failed"),
                }
                drop(permit);
            };
            threads.spawn(client_id, session.instrument(span));
        }
        stop.stop();
        let all = self.router.config().max_clients as u32;
        let drain = self.router.config().shutdown_timeout;
        if tokio::time::timeout(drain, self.clients.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?drain,
                "redis shutdown_timeout reached with replies still pending"
            );
        }
        for task in refresh_tasks {
            task.abort();
        }
        for router in self.routes.all() {
            router.cache.stop();
        }
    }
}

/// Settings of the connections that discover `router`'s topology.
fn discovery_settings(router: &Router) -> ConnSettings {
    let config = router.config();
    ConnSettings {
        protocol: Protocol::Resp2,
        db: 0,
        readonly: false,
        username: config.username.clone(),
        password: config.password.clone(),
        connect_timeout: config.connect_timeout,
        reply_timeout: config.reply_timeout,
        max_reply_bytes: config.max_reply_bytes,
        tls: router.pool.tls(),
    }
}

/// Loads `router`'s slot map (cluster mode) or primary (sentinel mode) and
/// its command table. Failures are logged, not fatal: the upstream may
/// come up after skiff.
async fn load_upstream_state(router: &Router) {
    let route = router.route_name();
    let settings = discovery_settings(router);
    let mut seed = router.config().nodes[0].clone();
    if let Some(cluster) = &router.cluster {
        match cluster.refresh(&settings).await {
            Ok(()) => seed = cluster.map().primaries().first().cloned().unwrap_or(seed),
            Err(reason) => tracing::warn!(route, error = %reason, "cluster discovery failed"),
        }
    }
    let config = router.config();
    if config.mode == RedisMode::Sentinel {
        let sentinels = &config.nodes;
        let name = config.master_name.as_deref().unwrap_or_default();
        let sentinel_settings = sentinel::sentinel_settings(&settings, &config);
        match sentinel::discover(sentinels, name, &sentinel_settings).await {
            Ok(nodes) => {
                seed = nodes.primary.clone();
                router.set_nodes(nodes);
            }
            Err(reason) => tracing::warn!(route, error = %reason, "sentinel discovery failed"),
        }
    }
    match RawConn::connect(&seed, &settings).await {
        Ok(mut conn) => load_from(router, &mut conn).await,
        Err(err) => {
            tracing::warn!(route, error = %err,
                "cannot load the command table; using the built-in one")
        }
    }
}

async fn load_from(router: &Router, conn: &mut RawConn) {
    if let Ok(reply) = conn.call_bounded(&encode_command(&["COMMAND"])).await {
        let mut table = CommandTable::builtin();
        let loaded = Value::decode(&reply, Protocol::Resp2)
            .map(|value| table.merge_command_reply(value))
            .unwrap_or(0);
        tracing::info!(
            route = router.route_name(),
            commands = loaded,
            "loaded command table from upstream"
        );
        if loaded > 0 {
            router.set_commands(table);
        }
    }
    if let Ok(reply) = conn
        .call_bounded(&encode_command(&["INFO", "server"]))
        .await
    {
        let text = String::from_utf8_lossy(&reply);
        let version = text
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"));
        if let Some(version) = version {
            *router.server_version.write() = version.trim().to_string();
        }
    }
}

/// Connects to every primary of `router` and checks that it replies to PING.
async fn ping_primaries(router: &Router) -> Result<(), String> {
    let route = router.route_name();
    let nodes = match &router.cluster {
        Some(cluster) => cluster.map().primaries(),
        None => vec![router
            .primary()
            .map_err(|_| format!("route {route}: no primary known"))?],
    };
    if nodes.is_empty() {
        return Err(format!("route {route}: no cluster slot map loaded"));
    }
    let settings = discovery_settings(router);
    for addr in nodes {
        let mut conn = RawConn::connect(&addr, &settings)
            .await
            .map_err(|e| format!("route {route}: {e}"))?;
        let reply = conn
            .call_bounded(&encode_command(&["PING"]))
            .await
            .map_err(|e| format!("route {route}: {e}"))?;
        if let Some(text) = error_text(&reply) {
            return Err(format!("route {route}: {addr}: PING failed: {text}"));
        }
    }
    Ok(())
}

/// Returns the nodes of `router` for `/status`.
fn node_status(router: &Router, status: &mut serde_json::Value) {
    if let Some(cluster) = &router.cluster {
        status["primaries"] = cluster.map().primaries().into();
    } else {
        let nodes = router.nodes();
        status["primary"] = nodes.primary.clone().into();
        status["replicas"] = nodes.replicas.clone().into();
    }
}

impl Component for RedisRouter {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn readiness(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for router in self.routes.all() {
                ping_primaries(router).await?;
            }
            Ok(())
        })
    }

    fn status(&self) -> serde_json::Value {
        let config = self.router.config();
        let clients = config.max_clients - self.clients.available_permits();
        let mut status = serde_json::json!({
            "mode": format!("{:?}", config.mode).to_lowercase(),
            "clients": clients,
            "commands_known": self.router.commands().len(),
        });
        node_status(&self.router, &mut status);
        let cache = self.router.cache.status();
        if !cache.is_null() {
            status["cache"] = cache;
        }
        if !self.routes.is_empty() {
            let routes: Vec<serde_json::Value> = self
                .routes
                .all()
                .skip(1)
                .map(|router| {
                    let config = router.config();
                    let mut route = serde_json::json!({
                        "name": router.route_name(),
                        "mode": format!("{:?}", config.mode).to_lowercase(),
                    });
                    node_status(router, &mut route);
                    route
                })
                .collect();
            status["routes"] = routes.into();
        }
        status
    }
}
