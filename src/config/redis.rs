//! `[redis]`: the Redis router's listener and upstream servers.

use std::time::Duration;

use serde::Deserialize;

/// Topology of the upstream Redis servers, which decides how skiff finds
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// `nodes` lists the primary, then its replicas.
    Standalone,
    /// `nodes` lists the sentinels; `master_name` names the group.
    Sentinel,
    /// `nodes` lists seed nodes of a Redis Cluster.
    Cluster,
}

/// Read policy: which nodes serve read-only commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadFrom {
    Primary,
    PreferReplica,
    Replica,
    Any,
}

/// `[redis]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Client listener address. Default `127.0.0.1:6379`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Upstream topology. Default `standalone`.
    #[serde(default = "default_mode")]
    pub mode: RedisMode,
    /// Upstream addresses, `host:port`; their meaning depends on `mode`.
    /// `rediss://host:port` means the same address over TLS and turns `tls`
    /// on; `redis://host:port` is accepted as plain `host:port`.
    pub nodes: Vec<String>,
    /// Sentinel group name, required in sentinel mode.
    pub master_name: Option<String>,
    /// Read policy. Default `primary`.
    #[serde(default = "default_read_from")]
    pub read_from: ReadFrom,
    /// Upstream ACL user name.
    pub username: Option<String>,
    /// Upstream password.
    pub password: Option<String>,
    /// ACL user name skiff sends to the sentinels (sentinel mode). The
    /// servers' `username` is not used for sentinels, because sentinels
    /// keep their own users.
    pub sentinel_username: Option<String>,
    /// Password skiff sends to the sentinels (sentinel mode), their
    /// `requirepass`. Unset means sentinels are contacted without AUTH.
    pub sentinel_password: Option<String>,
    /// Password clients must AUTH with; unset means no client auth.
    pub client_password: Option<String>,
    /// Largest request a client may send, in bytes. Default 512 MiB, Redis's
    /// `proto-max-bulk-len`.
    #[serde(default = "default_max_frame_bytes")]
    pub max_request_bytes: usize,
    /// Largest reply accepted from an upstream, in bytes. Default 512 MiB.
    /// NOTE: a larger reply closes the upstream connection, which fails the
    /// other requests in flight on it too, because a shared connection
    /// cannot skip a reply it has not read.
    #[serde(default = "default_max_frame_bytes")]
    pub max_reply_bytes: usize,
    /// Replies a client may have queued for writing before skiff stops
    /// reading its requests, so a client that does not read cannot grow
    /// memory. Default 1024. The bound counts replies, not bytes. On top of
    /// it, a session keeps up to 64 replies (at most this many) from one
    /// read of a pipelining client before queueing them, and its writer
    /// keeps the item it is writing. The worst case is therefore about
    /// twice this many replies of up to `max_reply_bytes` each.
    #[serde(default = "default_client_queue_depth")]
    pub client_queue_depth: usize,
    /// Client connections accepted at once. Default 10000.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Shared pipelined connections per upstream node, RESP version and
    /// database. Default: one per session thread (`threads`), so a
    /// thread's clients share the connections that thread opened, and
    /// each connection carries as many requests per write as it can.
    #[serde(default)]
    pub upstream_connections: Option<usize>,
    /// Threads serving Redis clients, each running an event loop of its
    /// own; a client, and the shared upstream connections it uses, stay on
    /// one thread. Default: half the CPUs skiff may use, at least 1, so a
    /// sidecar leaves the rest to the application beside it.
    /// At most [`MAX_THREADS`].
    #[serde(default)]
    pub threads: Option<usize>,
    /// Connections held by one client each (transactions, blocking
    /// commands, subscriptions), across all nodes. Default 1024.
    #[serde(default = "default_max_dedicated_connections")]
    pub max_dedicated_connections: usize,
    /// Time allowed to connect and authenticate to an upstream. Default 5s.
    #[serde(default = "default_connect_timeout", with = "super::duration")]
    pub connect_timeout: Duration,
    /// Maximum wait for the next reply on a shared upstream connection
    /// with requests outstanding. Past it the connection is closed and
    /// its requests fail, so a stalled node (stopped, partitioned) cannot
    /// hold clients forever. skiff's own queries (slot map, sentinels,
    /// command table) are bounded by it too. Default 10s; "0s" turns the
    /// limit off for shared connections, and skiff's queries then use
    /// `connect_timeout`.
    #[serde(default = "default_reply_timeout", with = "super::duration")]
    pub reply_timeout: Duration,
    /// How often the cluster slot map is reloaded. Default 30s.
    #[serde(default = "default_refresh_interval", with = "super::duration")]
    pub topology_refresh_interval: Duration,
    /// MOVED and ASK redirects followed for one command. Default 5.
    #[serde(default = "default_max_redirects")]
    pub max_redirects: usize,
    /// On shutdown, how long replies to requests already read may take
    /// before their clients are disconnected. Default 10s.
    #[serde(default = "default_shutdown_timeout", with = "super::duration")]
    pub shutdown_timeout: Duration,
    /// TLS to every upstream: the nodes, the sentinels, and
    /// the nodes that sentinels and cluster topology announce. Default
    /// false. The server's certificate is always checked, against
    /// `tls_ca_file` and against the node's host (or `tls_server_name`).
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA certificates upstream certificates must chain to.
    /// Without it, the Mozilla root set built into skiff is trusted.
    /// Relative paths are relative to the config file.
    pub tls_ca_file: Option<String>,
    /// Name checked in every upstream certificate (and sent as SNI) in
    /// place of the node's host, for nodes known by IP address whose
    /// certificates name a host.
    pub tls_server_name: Option<String>,
    /// Largest size of the near cache, in bytes: cached replies, their keys
    /// and an estimate of the bookkeeping per entry. Default 64 MiB. Used
    /// only when `[[redis.cache]]` lists a prefix. In TOML it goes before
    /// the first `[[redis.cache]]` header. The bytes are split evenly over
    /// up to 16 shards, and a reply larger than a quarter of a shard's
    /// bytes (1 MiB with the defaults) is not cached.
    #[serde(default = "default_cache_max_bytes")]
    pub cache_max_bytes: usize,
    /// Largest number of replies the near cache holds. Default 100000.
    #[serde(default = "default_cache_max_entries")]
    pub cache_max_entries: usize,
    /// `[[redis.cache]]`: key prefixes whose reads skiff answers from its
    /// near cache. Empty (the default) turns the near cache off.
    #[serde(default)]
    pub cache: Vec<CacheRule>,
    /// `[[redis.routes]]`: upstream groups other than this section's, each
    /// serving a database number, key prefixes, or both. Empty by default.
    #[serde(default)]
    pub routes: Vec<RedisRoute>,
}

/// `[[redis.routes]]`: an upstream group of its own for the clients that
/// SELECT `database`, and for commands whose keys start with one of
/// `prefixes`. The limits and timeouts of `[redis]` apply to it too.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisRoute {
    /// Name used in logs, metrics (`route` label) and `SHOW REDIS_NODES`.
    /// Letters, digits, `-` and `_`. The name `main` is reserved for `[redis]`.
    pub name: String,
    /// Database number whose clients this route serves: after `SELECT n`,
    /// every command of the client goes here, whatever its keys. Not 0,
    /// which is `[redis]`'s.
    pub database: Option<u32>,
    /// Key prefixes, matched against the raw key bytes, whose commands go
    /// here from clients of any database that is not a route's.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Upstream topology, as in `[redis]`. Default `standalone`.
    #[serde(default = "default_mode")]
    pub mode: RedisMode,
    /// Upstream addresses, as in `[redis]`.
    pub nodes: Vec<String>,
    /// Sentinel group name, required in sentinel mode.
    pub master_name: Option<String>,
    /// Read policy. Default `primary`.
    #[serde(default = "default_read_from")]
    pub read_from: ReadFrom,
    /// Upstream ACL user name.
    pub username: Option<String>,
    /// Upstream password.
    pub password: Option<String>,
    /// ACL user name for the route's sentinels, as in `[redis]`.
    pub sentinel_username: Option<String>,
    /// Password for the route's sentinels, as in `[redis]`.
    pub sentinel_password: Option<String>,
    /// Database skiff selects on the route's upstream connections, whatever
    /// the client selected. Default 0, the only value a cluster route allows.
    #[serde(default)]
    pub upstream_database: u32,
    /// TLS to this route's upstreams, as `tls` in `[redis]`.
    #[serde(default)]
    pub tls: bool,
    /// As `tls_ca_file` in `[redis]`.
    pub tls_ca_file: Option<String>,
    /// As `tls_server_name` in `[redis]`.
    pub tls_server_name: Option<String>,
}

/// `[[redis.cache]]`: one key prefix whose reads the near cache serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// Key prefix, matched against the raw key bytes; `""` matches every key.
    pub prefix: String,
    /// Longest time a cached reply is served before skiff reads the key from
    /// Redis again, whatever the key's own TTL. Default 60s.
    #[serde(default = "default_cache_max_ttl", with = "super::duration")]
    pub max_ttl: Duration,
}

/// Prints the section with both passwords replaced by `<redacted>`, so a
/// logged config does not show them.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("RedisConfig")
            .field("listen", &self.listen)
            .field("mode", &self.mode)
            .field("nodes", &self.nodes)
            .field("master_name", &self.master_name)
            .field("read_from", &self.read_from)
            .field("username", &self.username)
            .field("password", &redact(&self.password))
            .field("client_password", &redact(&self.client_password))
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &redact(&self.sentinel_password))
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("client_queue_depth", &self.client_queue_depth)
            .field("max_clients", &self.max_clients)
            .field("upstream_connections", &self.upstream_connections)
            .field("max_dedicated_connections", &self.max_dedicated_connections)
            .field("threads", &self.threads)
            .field("connect_timeout", &self.connect_timeout)
            .field("reply_timeout", &self.reply_timeout)
            .field("topology_refresh_interval", &self.topology_refresh_interval)
            .field("max_redirects", &self.max_redirects)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_server_name", &self.tls_server_name)
            .field("cache_max_bytes", &self.cache_max_bytes)
            .field("cache_max_entries", &self.cache_max_entries)
            .field("cache", &self.cache)
            .field("routes", &self.routes)
            .finish()
    }
}

/// Prints the route with its password replaced by `<redacted>`.
impl std::fmt::Debug for RedisRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRoute")
            .field("name", &self.name)
            .field("database", &self.database)
            .field("prefixes", &self.prefixes)
            .field("mode", &self.mode)
            .field("nodes", &self.nodes)
            .field("master_name", &self.master_name)
            .field("read_from", &self.read_from)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sentinel_username", &self.sentinel_username)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "<redacted>"),
            )
            .field("upstream_database", &self.upstream_database)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_server_name", &self.tls_server_name)
            .finish()
    }
}

impl RedisConfig {
    /// Strips `redis://` and `rediss://` from node addresses, in `[redis]`
    /// and in every route. `rediss://` turns `tls` on; a group cannot mix
    /// the two.
    pub(super) fn normalize_nodes(&mut self) -> Result<(), String> {
        normalize_nodes("[redis]", &mut self.nodes, &mut self.tls)?;
        for route in &mut self.routes {
            let section = format!("[[redis.routes]] {:?}", route.name);
            normalize_nodes(&section, &mut route.nodes, &mut route.tls)?;
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        validate_upstream(
            "[redis]",
            &UpstreamFields {
                mode: self.mode,
                nodes: &self.nodes,
                master_name: self.master_name.as_deref(),
                tls: self.tls,
                tls_ca_file: self.tls_ca_file.as_deref(),
                tls_server_name: self.tls_server_name.as_deref(),
            },
        )?;
        for (name, value) in [
            ("max_request_bytes", self.max_request_bytes),
            ("max_reply_bytes", self.max_reply_bytes),
            ("client_queue_depth", self.client_queue_depth),
            ("max_clients", self.max_clients),
            (
                "upstream_connections",
                self.upstream_connections.unwrap_or(1),
            ),
            ("max_dedicated_connections", self.max_dedicated_connections),
            ("cache_max_bytes", self.cache_max_bytes),
            ("cache_max_entries", self.cache_max_entries),
            ("threads", self.threads.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(format!("[redis] {name} must be at least 1"));
            }
        }
        if let Some(threads) = self.threads.filter(|&threads| threads > MAX_THREADS) {
            return Err(format!(
                "[redis] threads is {threads}, more than the maximum of {MAX_THREADS}"
            ));
        }
        self.validate_cache()?;
        super::redis_routes::validate_routes(self)
    }

    fn validate_cache(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for rule in &self.cache {
            if !seen.insert(rule.prefix.as_str()) {
                return Err(format!(
                    "[[redis.cache]] prefix {:?} is listed twice",
                    rule.prefix
                ));
            }
            if rule.max_ttl < Duration::from_millis(1) {
                return Err(format!(
                    "[[redis.cache]] prefix {:?}: max_ttl must be at least 1ms",
                    rule.prefix
                ));
            }
        }
        Ok(())
    }
}

/// Strips `redis://` and `rediss://` from `nodes` of `section`, turning
/// `tls` on for `rediss://`.
fn normalize_nodes(section: &str, nodes: &mut [String], tls: &mut bool) -> Result<(), String> {
    let mut any_tls = false;
    let mut any_plain = false;
    for (index, node) in nodes.iter_mut().enumerate() {
        let address = if let Some(rest) = node.strip_prefix("rediss://") {
            any_tls = true;
            rest
        } else if let Some(rest) = node.strip_prefix("redis://") {
            any_plain = true;
            rest
        } else {
            continue;
        };
        let address = address.strip_suffix('/').unwrap_or(address);
        if address.contains(['@', '/', '?']) {
            // The address is not printed: it may contain a password.
            return Err(format!(
                "{section} nodes[{index}] has credentials, a database or options in its URL, \
                 which skiff does not read; write rediss://host:port and set username \
                 and password"
            ));
        }
        *node = address.to_string();
    }
    if any_tls && any_plain {
        return Err(format!(
            "{section} nodes mix redis:// and rediss:// addresses; TLS applies to all \
             upstreams or to none"
        ));
    }
    if any_plain && *tls {
        return Err(format!(
            "{section} nodes: redis:// addresses contradict tls = true"
        ));
    }
    *tls |= any_tls;
    Ok(())
}

/// The settings `[redis]` and each route use to reach their upstream.
pub(super) struct UpstreamFields<'a> {
    pub mode: RedisMode,
    pub nodes: &'a [String],
    pub master_name: Option<&'a str>,
    pub tls: bool,
    pub tls_ca_file: Option<&'a str>,
    pub tls_server_name: Option<&'a str>,
}

/// Checks the node list, TLS settings and sentinel name of `section`.
pub(super) fn validate_upstream(section: &str, fields: &UpstreamFields<'_>) -> Result<(), String> {
    if fields.nodes.is_empty() {
        return Err(format!("{section} nodes must list at least one host:port"));
    }
    for node in fields.nodes {
        let port = node.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
        if !matches!(port, Some(Ok(port)) if port > 0) {
            return Err(format!(
                "{section} nodes: invalid address {node:?}, expected host:port"
            ));
        }
    }
    if !fields.tls && (fields.tls_ca_file.is_some() || fields.tls_server_name.is_some()) {
        return Err(format!(
            "{section} tls_ca_file and tls_server_name need tls = true (or rediss:// nodes)"
        ));
    }
    if fields.mode == RedisMode::Sentinel && fields.master_name.is_none() {
        return Err(format!("{section} mode \"sentinel\" needs master_name"));
    }
    Ok(())
}

fn default_listen() -> String {
    "127.0.0.1:6379".into()
}
fn default_mode() -> RedisMode {
    RedisMode::Standalone
}
fn default_read_from() -> ReadFrom {
    ReadFrom::Primary
}
fn default_max_frame_bytes() -> usize {
    512 * 1024 * 1024
}
fn default_client_queue_depth() -> usize {
    1024
}
fn default_max_clients() -> usize {
    10_000
}
impl RedisConfig {
    /// Threads serving clients: `threads`, or half the CPUs skiff may use.
    pub fn thread_count(&self) -> usize {
        self.threads
            .unwrap_or_else(crate::threads::half_the_cpus)
            .clamp(1, MAX_THREADS)
    }

    /// Shared connections per node: `upstream_connections`, or one per
    /// session thread.
    pub fn upstream_connection_count(&self) -> usize {
        self.upstream_connections
            .unwrap_or_else(|| self.thread_count())
    }
}

/// Largest `[redis] threads`. Each thread has a stack and an event loop's
/// file descriptors, so a mistyped count would exhaust them at startup.
pub const MAX_THREADS: usize = 1024;

fn default_max_dedicated_connections() -> usize {
    1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_reply_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_refresh_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_max_redirects() -> usize {
    5
}
fn default_cache_max_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_cache_max_entries() -> usize {
    100_000
}
fn default_cache_max_ttl() -> Duration {
    Duration::from_secs(60)
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn defaults_and_redacted_debug() {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\npassword = \"up-secret\"\n\
                    client_password = \"client-secret\"\n";
        let config = Config::parse(text).unwrap().redis.unwrap();
        assert_eq!(config.max_request_bytes, 512 * 1024 * 1024);
        assert_eq!(config.client_queue_depth, 1024);
        assert_eq!(config.connect_timeout, std::time::Duration::from_secs(5));
        assert_eq!(config.reply_timeout, std::time::Duration::from_secs(10));
        let printed = format!("{config:?}");
        assert!(!printed.contains("up-secret"), "{printed}");
        assert!(!printed.contains("client-secret"), "{printed}");
    }

    #[test]
    fn upstream_connections_default_to_one_per_thread() {
        let parse = |extra: &str| {
            let text = format!("[redis]\nnodes = [\"127.0.0.1:7000\"]\n{extra}");
            Config::parse(&text).unwrap().redis.unwrap()
        };
        assert_eq!(parse("threads = 3\n").upstream_connection_count(), 3);
        let both = parse("threads = 3\nupstream_connections = 5\n");
        assert_eq!(both.upstream_connection_count(), 5);
        let config = parse("");
        assert_eq!(config.upstream_connection_count(), config.thread_count());
        let err =
            Config::parse("[redis]\nnodes = [\"127.0.0.1:7000\"]\nupstream_connections = 0\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("upstream_connections must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn thread_count_defaults_to_half_the_cpus() {
        let config = Config::parse("[redis]\nnodes = [\"127.0.0.1:7000\"]\n")
            .unwrap()
            .redis
            .unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(config.thread_count(), (cpus / 2).max(1));
        let config = Config::parse("[redis]\nnodes = [\"127.0.0.1:7000\"]\nthreads = 3\n")
            .unwrap()
            .redis
            .unwrap();
        assert_eq!(config.thread_count(), 3);
        let err = Config::parse("[redis]\nnodes = [\"127.0.0.1:7000\"]\nthreads = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[redis] threads must be at least 1"), "{err}");
        let err = Config::parse("[redis]\nnodes = [\"127.0.0.1:7000\"]\nthreads = 1025\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than the maximum of 1024"), "{err}");
    }

    #[test]
    fn node_without_port_is_rejected() {
        let text = "[redis]\nnodes = [\"127.0.0.1\"]\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("invalid address \"127.0.0.1\""), "{err}");
    }

    #[test]
    fn cache_rules_and_limits() {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\ncache_max_bytes = 1048576\n\
                    [[redis.cache]]\nprefix = \"plugin:\"\nmax_ttl = \"5s\"\n\
                    [[redis.cache]]\nprefix = \"session:\"\n";
        let config = Config::parse(text).unwrap().redis.unwrap();
        assert_eq!(config.cache_max_bytes, 1024 * 1024);
        assert_eq!(config.cache_max_entries, 100_000);
        assert_eq!(config.cache.len(), 2);
        assert_eq!(config.cache[0].prefix, "plugin:");
        assert_eq!(config.cache[0].max_ttl, std::time::Duration::from_secs(5));
        assert_eq!(config.cache[1].max_ttl, std::time::Duration::from_secs(60));
    }

    #[test]
    fn duplicate_cache_prefix_is_rejected() {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\n\
                    [[redis.cache]]\nprefix = \"a:\"\n[[redis.cache]]\nprefix = \"a:\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("prefix \"a:\" is listed twice"), "{err}");
    }

    #[test]
    fn zero_max_ttl_is_rejected() {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\n\
                    [[redis.cache]]\nprefix = \"a:\"\nmax_ttl = \"0s\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("max_ttl must be at least 1ms"), "{err}");
    }

    #[test]
    fn zero_limits_are_rejected() {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\nclient_queue_depth = 0\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(
            err.contains("client_queue_depth must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn rediss_nodes_turn_tls_on() {
        let text = "[redis]\nnodes = [\"rediss://10.0.0.1:6380\", \"rediss://10.0.0.2:6380/\"]\n";
        let config = Config::parse(text).unwrap().redis.unwrap();
        assert!(config.tls);
        assert_eq!(config.nodes, ["10.0.0.1:6380", "10.0.0.2:6380"]);

        let text = "[redis]\nnodes = [\"redis://10.0.0.1:6379\"]\n";
        let config = Config::parse(text).unwrap().redis.unwrap();
        assert!(!config.tls);
        assert_eq!(config.nodes, ["10.0.0.1:6379"]);
    }

    #[test]
    fn mixed_or_credentialed_node_urls_are_rejected() {
        let text = "[redis]\nnodes = [\"rediss://a:6380\", \"redis://b:6379\"]\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("mix redis:// and rediss://"), "{err}");

        let text = "[redis]\nnodes = [\"rediss://user:secret@a:6380\"]\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("nodes[0] has credentials"), "{err}");
        assert!(!err.contains("secret"), "{err}");

        let text = "[redis]\nnodes = [\"redis://a:6379\"]\ntls = true\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("contradict tls = true"), "{err}");

        let text = "[redis]\nnodes = [\"a:6379\"]\ntls_ca_file = \"ca.pem\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("need tls = true"), "{err}");
    }
}
