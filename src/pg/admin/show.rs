//! SHOW commands: PgBouncer's column names where skiff has the value.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::{mode_name, split_pool_name, text, Table};
use crate::logship::time::utc_from_system;
use crate::pg::cancel::{ClientState, ServerKey};
use crate::pg::Pooler;

pub fn show_pools(pooler: &Pooler) -> Table {
    let rows = pooler
        .all_pools()
        .iter()
        .map(|pool| {
            let (database, user) = split_pool_name(&pool.name);
            // As in PgBouncer: how long the oldest client in the queue has
            // waited so far.
            let max_wait_us = pool.oldest_wait().as_micros() as u64;
            vec![
                text(database),
                text(user),
                text(
                    pool.stats
                        .clients
                        .load(Ordering::Relaxed)
                        .saturating_sub(pool.waiting_count()),
                ),
                text(pool.waiting_count()),
                text(pool.active_count()),
                text(pool.idle_count()),
                text(pool.idle_unchecked_count()),
                text(pool.stats.logins.load(Ordering::Relaxed)),
                text(max_wait_us / 1_000_000),
                text(max_wait_us % 1_000_000),
                text(mode_name(pooler.config().pool_mode)),
            ]
        })
        .collect();
    Table {
        columns: &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_used",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
        ],
        rows,
    }
}

pub fn show_stats(pooler: &Pooler) -> Table {
    let rows = pooler
        .all_pools()
        .iter()
        .map(|pool| {
            let (database, user) = split_pool_name(&pool.name);
            vec![
                text(database),
                text(user),
                text(pool.stats.transactions.load(Ordering::Relaxed)),
                text(pool.stats.queries.load(Ordering::Relaxed)),
                text(pool.stats.wait_us.load(Ordering::Relaxed)),
            ]
        })
        .collect();
    Table {
        columns: &[
            "database",
            "user",
            "total_xact_count",
            "total_query_count",
            "total_wait_time",
        ],
        rows,
    }
}

pub fn show_databases(pooler: &Pooler) -> Table {
    let pools = pooler.all_pools();
    let rows = pooler
        .config()
        .databases
        .iter()
        .map(|db| {
            let prefix = format!("{}/", db.name);
            let connections: usize = pools
                .iter()
                .filter(|pool| pool.name.starts_with(&prefix))
                .map(|pool| pool.active_count() + pool.idle_count())
                .sum();
            vec![
                text(&db.name),
                text(&db.host),
                text(db.port),
                text(db.server_dbname()),
                db.user.clone(),
                text(pooler.config().pool_size(db)),
                text(mode_name(pooler.config().pool_mode)),
                text(connections),
            ]
        })
        .collect();
    Table {
        columns: &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "pool_mode",
            "current_connections",
        ],
        rows,
    }
}

pub fn show_users(pooler: &Pooler) -> Table {
    let mut users: Vec<String> = pooler
        .all_pools()
        .iter()
        .map(|p| split_pool_name(&p.name).1)
        .collect();
    users.sort();
    users.dedup();
    let mode = mode_name(pooler.config().pool_mode);
    Table {
        columns: &["name", "pool_mode"],
        rows: users
            .into_iter()
            .map(|user| vec![text(user), text(mode)])
            .collect(),
    }
}

pub fn show_config(pooler: &Pooler) -> Table {
    let config = pooler.config();
    let entries: Vec<(&str, String)> = vec![
        ("listen", config.listen.clone()),
        ("pool_mode", mode_name(config.pool_mode).to_string()),
        ("default_pool_size", config.default_pool_size.to_string()),
        ("max_client_conn", config.max_client_conn.to_string()),
        (
            "query_wait_timeout",
            format!("{:?}", config.query_wait_timeout),
        ),
        ("server_lifetime", format!("{:?}", config.server_lifetime)),
        (
            "server_idle_timeout",
            format!("{:?}", config.server_idle_timeout),
        ),
        (
            "server_check_delay",
            format!("{:?}", config.server_check_delay),
        ),
        (
            "server_connect_timeout",
            format!("{:?}", config.server_connect_timeout),
        ),
        ("server_reset_query", config.server_reset_query.clone()),
        (
            "max_prepared_statements",
            config.max_prepared_statements.to_string(),
        ),
        ("shutdown_timeout", format!("{:?}", config.shutdown_timeout)),
        ("max_message_bytes", config.max_message_bytes.to_string()),
        ("server_tls_sslmode", config.server_tls_sslmode.to_string()),
        (
            "client_tls_sslmode",
            format!("{:?}", config.client_tls_sslmode).to_lowercase(),
        ),
    ];
    Table {
        columns: &["key", "value", "changeable"],
        rows: entries
            .into_iter()
            .map(|(key, value)| {
                // RELOAD applies every setting here except these, which are
                // fixed at start.
                let fixed = matches!(key, "listen" | "server_tls_sslmode" | "client_tls_sslmode");
                let changeable = if fixed { "no" } else { "yes" };
                vec![text(key), text(value), text(changeable)]
            })
            .collect(),
    }
}

pub fn show_lists(pooler: &Pooler) -> Table {
    let pools = pooler.all_pools();
    let used: usize = pools.iter().map(|p| p.active_count()).sum();
    let free: usize = pools.iter().map(|p| p.idle_count()).sum();
    let items = [
        ("databases", pooler.config().databases.len()),
        ("users", show_users(pooler).rows.len()),
        ("pools", pools.len()),
        ("used_clients", pooler.clients.load(Ordering::Relaxed)),
        ("used_servers", used),
        ("free_servers", free),
        ("prepared_statements", pooler.statements.len()),
    ];
    Table {
        columns: &["list", "items"],
        rows: items
            .iter()
            .map(|(name, count)| vec![text(name), text(count)])
            .collect(),
    }
}

/// `2026-12-04 18:00:00 UTC`, PgBouncer's time format.
fn format_time(time: SystemTime) -> String {
    let t = utc_from_system(time);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

fn state_name(state: ClientState) -> &'static str {
    match state {
        ClientState::Active => "active",
        ClientState::Waiting => "waiting",
        ClientState::Idle => "idle",
    }
}

pub fn show_clients(pooler: &Pooler) -> Table {
    let rows = pooler
        .cancels
        .snapshot()
        .into_iter()
        .map(|client| {
            let info = &client.info;
            vec![
                text("C"),
                text(&info.user),
                text(&info.database),
                text(state_name(client.state)),
                text(info.peer.ip()),
                text(info.peer.port()),
                text(format_time(info.connected_at)),
                client
                    .server
                    .as_ref()
                    .map(|server| server.server_id.to_string()),
                text(client.process_id),
                text(&info.application_name),
                text(info.id),
            ]
        })
        .collect();
    Table {
        columns: &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "link",
            "remote_pid",
            "application_name",
            "id",
        ],
        rows,
    }
}

pub fn show_servers(pooler: &Pooler) -> Table {
    let server_row = |key: &ServerKey, pool: &str, state: &str, link: Option<u64>| {
        let (database, user) = split_pool_name(pool);
        let (host, port) = key.address.rsplit_once(':').unwrap_or((&key.address, ""));
        vec![
            text("S"),
            text(user),
            text(database),
            text(state),
            text(host),
            text(port),
            text(format_time(key.connected_at)),
            link.map(|id| id.to_string()),
            text(key.process_id),
            text(key.server_id),
        ]
    };
    let mut rows = Vec::new();
    for client in pooler.cancels.snapshot() {
        if let Some(server) = &client.server {
            let pool = format!("{}/{}", client.info.database, client.info.user);
            rows.push((
                server.server_id,
                server_row(server, &pool, "active", Some(client.info.id)),
            ));
        }
    }
    for pool in pooler.all_pools() {
        for (server, _idle_for) in pool.idle_servers() {
            rows.push((
                server.server_id,
                server_row(&server, &pool.name, "idle", None),
            ));
        }
    }
    rows.sort_by_key(|(id, _)| *id);
    Table {
        columns: &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "link",
            "remote_pid",
            "id",
        ],
        rows: rows.into_iter().map(|(_, row)| row).collect(),
    }
}

/// Resident set size of this process in bytes, from /proc on Linux.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // 4 KiB pages: the page size on x86_64 and the usual one on arm64.
    Some(pages * 4096)
}

pub fn show_mem(pooler: &Pooler) -> Table {
    let pools = pooler.all_pools();
    let servers: usize = pools
        .iter()
        .map(|pool| pool.active_count() + pool.idle_count())
        .sum();
    let rows = vec![
        vec![
            text("process_rss"),
            None,
            resident_bytes().map(|b| b.to_string()),
        ],
        vec![text("client_connections"), text(pooler.cancels.len()), None],
        vec![text("server_connections"), text(servers), None],
        vec![text("pools"), text(pools.len()), None],
        vec![
            text("prepared_statements"),
            text(pooler.statements.len()),
            None,
        ],
    ];
    Table {
        columns: &["name", "used", "memtotal"],
        rows,
    }
}

/// Upstream Redis nodes and their roles, from the last discovery of the
/// router of `[redis]` (route `main`) and of each route.
pub fn show_redis_nodes(pooler: &Pooler) -> Table {
    let status = pooler.control().and_then(|control| control.redis_status());
    let mut rows = Vec::new();
    if let Some(status) = status {
        add_redis_nodes(&mut rows, &status, "main");
        for route in status["routes"].as_array().into_iter().flatten() {
            let name = route["name"].as_str().unwrap_or_default();
            add_redis_nodes(&mut rows, route, name);
        }
    }
    Table {
        columns: &["node", "role", "mode", "route"],
        rows,
    }
}

/// Adds a row per node of one router's `/status` entry.
fn add_redis_nodes(rows: &mut Vec<Vec<Option<String>>>, status: &serde_json::Value, route: &str) {
    let mode = status["mode"].as_str().unwrap_or("").to_string();
    let mut add = |node: &serde_json::Value, role: &str| {
        if let Some(address) = node.as_str() {
            rows.push(vec![text(address), text(role), text(&mode), text(route)]);
        }
    };
    add(&status["primary"], "primary");
    for list in ["replicas", "primaries"] {
        let role = if list == "replicas" {
            "replica"
        } else {
            "primary"
        };
        for node in status[list].as_array().into_iter().flatten() {
            add(node, role);
        }
    }
}

/// Lists the log shipper's spool and sink, one key per row.
pub fn show_logship(pooler: &Pooler) -> Table {
    let status = pooler
        .control()
        .and_then(|control| control.logship_status());
    let rows = match status {
        Some(serde_json::Value::Object(entries)) => entries
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    serde_json::Value::String(text) => Some(text),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                };
                vec![text(key), value]
            })
            .collect(),
        _ => Vec::new(),
    };
    Table {
        columns: &["key", "value"],
        rows,
    }
}

pub fn show_help() -> Table {
    let commands = [
        "SHOW POOLS",
        "SHOW STATS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW DATABASES",
        "SHOW USERS",
        "SHOW CONFIG",
        "SHOW LISTS",
        "SHOW MEM",
        "SHOW REDIS_NODES",
        "SHOW LOGSHIP",
        "SHOW VERSION",
        "SHOW HELP",
        "PAUSE [db]",
        "RESUME [db]",
        "KILL [db]",
        "KILL_CLIENT id",
        "RECONNECT [db]",
        "WAIT_CLOSE [db]",
        "DISABLE db",
        "ENABLE db",
        "RELOAD",
        "SHUTDOWN",
    ];
    Table {
        columns: &["command"],
        rows: commands.iter().map(|c| vec![text(c)]).collect(),
    }
}
