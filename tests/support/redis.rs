//! Test harness for the Redis router: real `redis-server` processes on free
//! loopback ports (a primary with two replicas, or a six-node cluster), skiff
//! started in-process in front of them, and a raw RESP client for checking
//! exact reply bytes.
//!
//! Servers are killed when their handle is dropped. Shared servers live in
//! statics, which are never dropped, so each server also gets a watchdog
//! shell that kills it once the test process has exited.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use skiff::config::Config;
use skiff::redis::frame::{encode_command, parse_reply, Protocol};
use skiff::redis::RedisRouter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns a free loopback port whose cluster bus port (port + 10000) is
/// free too.
pub fn free_port() -> u16 {
    loop {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().unwrap().port();
        if port > 55_000 {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Runs `redis-cli -p port args...` and returns its standard output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server with `extra` arguments and waits until it replies to
    /// PING.
    pub fn start(extra: &[&str]) -> RedisServer {
        RedisServer::start_with(free_port(), extra)
    }

    /// Starts a plain server on a given port, as a restart would.
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(String::from));
        args.extend(["--dir".into(), dir.path().to_str().unwrap().to_string()]);
        args.extend(extra.iter().map(|arg| arg.to_string()));
        RedisServer::launch(port, dir, args)
    }

    /// Starts a sentinel that monitors the primary on `primary_port` as
    /// `name`, with a quorum of one.
    pub fn start_sentinel(primary_port: u16, name: &str) -> RedisServer {
        RedisServer::start_sentinel_with(primary_port, name, "")
    }

    /// Starts a sentinel as [`RedisServer::start_sentinel`] does, with
    /// `extra` lines in its config file (such as TLS settings).
    pub fn start_sentinel_with(primary_port: u16, name: &str, extra: &str) -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n{extra}\n\
             sentinel monitor {name} 127.0.0.1 {primary_port} 1\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 10000\n",
            dir.path().display()
        );
        std::fs::write(&config, text).expect("write sentinel.conf");
        let args = vec![config.to_str().unwrap().to_string(), "--sentinel".into()];
        RedisServer::launch(port, dir, args)
    }

    fn launch(port: u16, dir: tempfile::TempDir, args: Vec<String>) -> RedisServer {
        let log = dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(&args)
            .args(["--daemonize", "no", "--logfile", log.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts (install the redis-server package)");
        spawn_watchdog(child.id());
        let server = RedisServer { port, child, dir };
        // A server with requirepass replies NOAUTH, which still means it is up.
        let up = || {
            let reply = redis_cli(port, &["PING"]);
            reply.trim() == "PONG" || reply.contains("NOAUTH")
        };
        server.wait_for(up, "PING");
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// Returns a counter from `INFO` such as `total_commands_processed`.
    pub fn info_field(&self, section: &str, field: &str) -> String {
        let info = self.cli(&["INFO", section]);
        let prefix = format!("{field}:");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Returns how many times this server ran `command` (lower case), from
    /// `INFO commandstats`.
    pub fn command_calls(&self, command: &str) -> u64 {
        self.command_stat(command, "calls")
    }

    /// Returns the counter `field` of `command` (lower case) from `INFO
    /// commandstats`, such as `rejected_calls`, which counts redirects.
    pub fn command_stat(&self, command: &str, field: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:");
        let stats = info.lines().find_map(|line| line.strip_prefix(&prefix));
        stats
            .and_then(|stats| {
                stats
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(field)?.strip_prefix('='))
            })
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn wait_for(&self, mut ready: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "redis {} not ready: {what}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops (`STOP`) or resumes (`CONT`) the server process, as a stalled
    /// host would.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Stops the server at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills `pid` once this test process has exited.
fn spawn_watchdog(pid: u32) {
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null",
        std::process::id()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// A primary and two replicas.
pub struct Standalone {
    pub primary: RedisServer,
    pub replicas: Vec<RedisServer>,
}

impl Standalone {
    pub fn start() -> Standalone {
        let primary = RedisServer::start(&[]);
        let replicaof = primary.port.to_string();
        let replicas: Vec<RedisServer> = (0..2)
            .map(|_| RedisServer::start(&["--replicaof", "127.0.0.1", &replicaof]))
            .collect();
        for replica in &replicas {
            replica.wait_for(
                || replica.info_field("replication", "master_link_status") == "up",
                "replication link",
            );
        }
        Standalone { primary, replicas }
    }

    /// `nodes = [...]` for skiff's config: primary, then replicas.
    pub fn nodes_toml(&self) -> String {
        let mut nodes = vec![self.primary.addr()];
        nodes.extend(self.replicas.iter().map(RedisServer::addr));
        toml_list(&nodes)
    }
}

/// Starts a primary with two replicas and a sentinel that monitors them as
/// one group, and returns once the sentinel reports both replicas healthy.
pub fn start_sentinel_group(name: &str) -> (Standalone, RedisServer) {
    let servers = Standalone::start();
    let sentinel = RedisServer::start_sentinel(servers.primary.port, name);
    sentinel.wait_for(
        || {
            // Each replica's "flags" field is "slave" alone once the
            // sentinel is connected to it and considers it up.
            let replicas = sentinel.cli(&["SENTINEL", "replicas", name]);
            let lines: Vec<&str> = replicas.lines().collect();
            let healthy = lines
                .windows(2)
                .filter(|pair| pair[0] == "flags" && pair[1] == "slave")
                .count();
            healthy == 2
        },
        "sentinel sees both replicas",
    );
    (servers, sentinel)
}

/// Returns the port of the primary the sentinel reports for `name`, or 0.
pub fn reported_primary_port(sentinel: &RedisServer, name: &str) -> u16 {
    let reply = sentinel.cli(&["SENTINEL", "get-master-addr-by-name", name]);
    reply
        .lines()
        .nth(1)
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or(0)
}

/// A cluster of three primaries with one replica each.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with_node_timeout(5000)
    }

    /// Starts a cluster whose nodes declare a silent peer failed after
    /// `milliseconds`, which also bounds how soon a replica takes over.
    pub fn start_with_node_timeout(milliseconds: u32) -> Cluster {
        Cluster::start_custom(milliseconds, |_| Vec::new(), &[], |_, node| node.addr())
    }

    /// Starts a cluster whose node `i` gets the extra arguments `extra(i)`,
    /// created by `redis-cli CLI_ARGS --cluster create` with the addresses
    /// `address(i, node)` (such as TLS ports).
    pub fn start_custom(
        milliseconds: u32,
        extra: impl Fn(usize) -> Vec<String>,
        cli_args: &[&str],
        address: impl Fn(usize, &RedisServer) -> String,
    ) -> Cluster {
        let timeout = milliseconds.to_string();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|i| {
                let mut args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                ]
                .map(String::from)
                .to_vec();
                args.extend(extra(i));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                RedisServer::start(&args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| address(i, node))
            .collect();
        let output = Command::new("redis-cli")
            .args(cli_args)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_until_stable();
        cluster
    }

    /// Waits until every node reports the cluster OK with all slots served
    /// and every replica is linked to its primary.
    pub fn wait_until_stable(&self) {
        for node in &self.nodes {
            node.wait_for(
                || {
                    let info = node.cli(&["CLUSTER", "INFO"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                },
                "cluster_state:ok",
            );
            if node.info_field("replication", "role") == "slave" {
                node.wait_for(
                    || node.info_field("replication", "master_link_status") == "up",
                    "replication link",
                );
            }
        }
        // CLUSTER SHARDS reports a replica as "loading" until its
        // replication offset, spread by gossip, is above zero.
        // One write on each primary starts that count.
        let mut warmed = std::collections::HashSet::new();
        for i in 0.. {
            let key = format!("harness:warmup:{i}");
            let owner = self.primary_for_slot(skiff::redis::slot::key_slot(key.as_bytes()));
            if warmed.insert(owner.port) {
                owner.cli(&["SET", &key, "1"]);
            }
            if warmed.len() == 3 {
                break;
            }
        }
        let first = &self.nodes[0];
        first.wait_for(
            || {
                let shards = first.cli(&["CLUSTER", "SHARDS"]);
                !shards
                    .lines()
                    .any(|line| line == "loading" || line == "failed")
            },
            "every node online in CLUSTER SHARDS",
        );
    }

    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|node| node.info_field("replication", "role") == "master")
            .collect()
    }

    pub fn replicas(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|node| node.info_field("replication", "role") == "slave")
            .collect()
    }

    /// Returns the primary whose own `CLUSTER NODES` line lists `slot`.
    pub fn primary_for_slot(&self, slot: u16) -> &RedisServer {
        self.primaries()
            .into_iter()
            .find(|node| {
                let nodes = node.cli(&["CLUSTER", "NODES"]);
                let myself = nodes.lines().find(|l| l.contains("myself")).unwrap_or("");
                myself
                    .split_whitespace()
                    .skip(8)
                    .any(|range| slot_in_range(range, slot))
            })
            .expect("a primary serves the slot")
    }

    pub fn seeds_toml(&self) -> String {
        toml_list(&[self.nodes[0].addr()])
    }
}

fn slot_in_range(range: &str, slot: u16) -> bool {
    if range.starts_with('[') {
        return false;
    }
    let (start, end) = range.split_once('-').unwrap_or((range, range));
    match (start.parse::<u16>(), end.parse::<u16>()) {
        (Ok(start), Ok(end)) => (start..=end).contains(&slot),
        _ => false,
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("\"{item}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// skiff's Redis router running on the current tokio runtime.
pub struct Skiff {
    pub addr: SocketAddr,
    pub router: std::sync::Arc<RedisRouter>,
    shutdown: CancellationToken,
}

impl Skiff {
    /// Starts the router with the `[redis]` section `body` (without
    /// `listen`, which is a free port).
    pub async fn start(body: &str) -> Skiff {
        let text = format!("[redis]\nlisten = \"127.0.0.1:0\"\n{body}\n");
        let config = Config::parse(&text).expect("valid test config");
        let router = RedisRouter::new(config.redis.unwrap()).expect("router starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let threads = router.start_threads().expect("session threads start");
        tokio::spawn(router.clone().serve(listener, threads, shutdown.clone()));
        Skiff {
            addr,
            router,
            shutdown,
        }
    }

    /// Returns the router's `/status` document.
    pub fn status(&self) -> serde_json::Value {
        skiff::admin::Component::status(self.router.as_ref())
    }

    pub fn url(&self, protocol: Protocol) -> String {
        match protocol {
            Protocol::Resp2 => format!("redis://{}/", self.addr),
            Protocol::Resp3 => format!("redis://{}/?protocol=resp3", self.addr),
        }
    }

    pub async fn client(&self, protocol: Protocol) -> redis::aio::MultiplexedConnection {
        connect_redis_rs(&self.url(protocol)).await
    }

    pub async fn raw(&self) -> RawClient {
        RawClient::connect(self.addr).await
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.addr.port(), args)
    }
}

impl Drop for Skiff {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Opens a redis-rs connection whose replies may take up to 10 seconds:
/// the 500 ms default is too short for debug builds on a busy machine.
pub async fn connect_redis_rs(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_connection_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// A client that writes commands and reads reply frames as raw bytes.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    pub protocol: Protocol,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            protocol: Protocol::Resp2,
        }
    }

    pub async fn send(&mut self, args: &[&str]) {
        self.stream.write_all(&encode_command(args)).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one reply frame; panics after 10 seconds without one.
    pub async fn read(&mut self) -> Bytes {
        let read = async {
            loop {
                if let Some((frame, _)) =
                    parse_reply(&mut self.buf, self.protocol, 1 << 30).unwrap()
                {
                    return frame;
                }
                let count = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(count > 0, "connection closed while waiting for a reply");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("reply within 10 seconds")
    }

    /// Reads until skiff closes the connection and returns everything not
    /// read yet, as text; panics after 10 seconds.
    pub async fn read_to_close(&mut self) -> String {
        let read = async { while self.stream.read_buf(&mut self.buf).await.unwrap_or(0) > 0 {} };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the connection closes within 10 seconds");
        String::from_utf8_lossy(&self.buf.split()).into_owned()
    }

    /// Sends a command and returns its reply as text.
    pub async fn call(&mut self, args: &[&str]) -> String {
        self.send(args).await;
        String::from_utf8_lossy(&self.read().await).into_owned()
    }

    /// Reads `key` with GET until a read is not invalidated at once, and
    /// asserts each reply is `expected`. A tracking client needs this
    /// because, until skiff's own tracking connection is up, skiff may
    /// invalidate every read at once, and it invalidates everything when
    /// that connection comes up.
    pub async fn read_until_tracked(&mut self, key: &str, expected: &str) {
        let started = Instant::now();
        loop {
            self.send(&["GET", key]).await;
            // The invalidation of everything can come before the reply too.
            let mut pushes = 0;
            let reply = loop {
                let next = self.read().await;
                if !next.starts_with(b">2\r\n$10\r\ninvalidate\r\n") {
                    break next;
                }
                pushes += 1;
            };
            assert_eq!(String::from_utf8_lossy(&reply), expected);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.send(&["PING"]).await;
            loop {
                let next = self.read().await;
                if &next[..] == b"+PONG\r\n" {
                    break;
                }
                assert!(next.starts_with(b">2\r\n$10\r\ninvalidate\r\n"), "{next:?}");
                pushes += 1;
            }
            if pushes == 0 {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

    /// True when the server closed the connection.
    pub async fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
