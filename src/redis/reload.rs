//! Applying a reloaded `[redis]` section to the running router of
//! `[redis]`. Routes keep the settings they started with.

use super::router::Nodes;
use super::RedisRouter;
use crate::config::{RedisConfig, RedisMode};

impl RedisRouter {
    /// Applies a reloaded `[redis]` section: `read_from`, `client_password`,
    /// `max_redirects`, and a standalone primary and replica list apply at
    /// once, the client limits to new clients. Returns the changes that need
    /// a restart, which are not applied.
    pub fn reload(&self, new: &RedisConfig) -> Vec<String> {
        let current = self.router.config();
        let (mut applied, notes) = split_reload(&current, new);
        let standalone = current.mode == RedisMode::Standalone && new.mode == RedisMode::Standalone;
        if standalone && current.nodes != new.nodes {
            self.router.set_nodes(Nodes {
                primary: new.nodes[0].clone(),
                replicas: new.nodes[1..].to_vec(),
            });
            applied.nodes = new.nodes.clone();
        }
        drop(current);
        self.router.replace_config(applied);
        notes
    }
}

/// Returns `new` with the settings only a restart applies kept from
/// `current` (the node list too), and a note for each such change.
fn split_reload(current: &RedisConfig, new: &RedisConfig) -> (RedisConfig, Vec<String>) {
    let mut notes = Vec::new();
    let mut note = |name: &str, changed: bool| {
        if changed {
            notes.push(format!("redis {name} changes apply after a restart"));
        }
    };
    note("listen", current.listen != new.listen);
    note("mode", current.mode != new.mode);
    note("master_name", current.master_name != new.master_name);
    note(
        "upstream username and password",
        current.username != new.username || current.password != new.password,
    );
    note(
        "sentinel_username and sentinel_password",
        current.sentinel_username != new.sentinel_username
            || current.sentinel_password != new.sentinel_password,
    );
    note(
        "connect_timeout",
        current.connect_timeout != new.connect_timeout,
    );
    note("reply_timeout", current.reply_timeout != new.reply_timeout);
    note(
        "max_reply_bytes",
        current.max_reply_bytes != new.max_reply_bytes,
    );
    note(
        "upstream_connections",
        current.upstream_connections != new.upstream_connections,
    );
    note(
        "max_dedicated_connections",
        current.max_dedicated_connections != new.max_dedicated_connections,
    );
    note("max_clients", current.max_clients != new.max_clients);
    note("threads", current.threads != new.threads);
    note(
        "topology_refresh_interval",
        current.topology_refresh_interval != new.topology_refresh_interval,
    );
    note(
        "near cache ([[redis.cache]], cache_max_bytes, cache_max_entries)",
        current.cache != new.cache
            || current.cache_max_bytes != new.cache_max_bytes
            || current.cache_max_entries != new.cache_max_entries,
    );
    note(
        "tls, tls_ca_file and tls_server_name",
        current.tls != new.tls
            || current.tls_ca_file != new.tls_ca_file
            || current.tls_server_name != new.tls_server_name,
    );
    let standalone = current.mode == RedisMode::Standalone && new.mode == RedisMode::Standalone;
    note("nodes", !standalone && current.nodes != new.nodes);
    // Each route has its own router, pools and topology tasks, built at
    // start, so none of its settings changes while running.
    note("[[redis.routes]]", current.routes != new.routes);

    let mut applied = new.clone();
    applied.listen = current.listen.clone();
    applied.mode = current.mode;
    applied.master_name = current.master_name.clone();
    applied.username = current.username.clone();
    applied.password = current.password.clone();
    applied.sentinel_username = current.sentinel_username.clone();
    applied.sentinel_password = current.sentinel_password.clone();
    applied.connect_timeout = current.connect_timeout;
    applied.reply_timeout = current.reply_timeout;
    applied.max_reply_bytes = current.max_reply_bytes;
    applied.upstream_connections = current.upstream_connections;
    applied.threads = current.threads;
    applied.max_dedicated_connections = current.max_dedicated_connections;
    applied.max_clients = current.max_clients;
    applied.topology_refresh_interval = current.topology_refresh_interval;
    applied.nodes = current.nodes.clone();
    applied.cache = current.cache.clone();
    applied.cache_max_bytes = current.cache_max_bytes;
    applied.cache_max_entries = current.cache_max_entries;
    applied.tls = current.tls;
    applied.tls_ca_file = current.tls_ca_file.clone();
    applied.tls_server_name = current.tls_server_name.clone();
    applied.routes = current.routes.clone();
    (applied, notes)
}

#[cfg(test)]
mod tests {
    use super::split_reload;
    use crate::config::Config;

    fn redis(text: &str) -> crate::config::RedisConfig {
        Config::parse(text).unwrap().redis.unwrap()
    }

    #[test]
    fn route_changes_wait_for_restart() {
        let main = "[redis]\nnodes = [\"127.0.0.1:7000\"]\n";
        let current = redis(&format!(
            "{main}[[redis.routes]]\nname = \"celery\"\ndatabase = 1\nnodes = [\"127.0.0.1:7001\"]\n"
        ));
        let new = redis(&format!(
            "{main}[[redis.routes]]\nname = \"celery\"\ndatabase = 2\nnodes = [\"127.0.0.1:7001\"]\n"
        ));
        let (applied, notes) = split_reload(&current, &new);
        assert_eq!(
            notes,
            ["redis [[redis.routes]] changes apply after a restart"]
        );
        assert_eq!(applied.routes, current.routes);
    }
}
