//! The pool metrics under the names and labels that the Prometheus
//! community PgBouncer exporter (prometheus-community/pgbouncer_exporter)
//! publishes, so dashboards and alerts written for PgBouncer work with
//! skiff unchanged. They are computed from the pools at each scrape.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::Pooler;
use crate::config::PoolMode;

/// One pool's row, as PgBouncer's `SHOW POOLS` has it.
struct PoolRow {
    database: String,
    user: String,
    client_active: usize,
    client_waiting: usize,
    server_active: usize,
    server_idle: usize,
    server_used: usize,
    server_login: usize,
    max_wait_seconds: f64,
}

/// One database's totals over its pools, as PgBouncer's `SHOW STATS` has
/// them.
#[derive(Default)]
struct StatsRow {
    queries: u64,
    transactions: u64,
    query_us: u64,
    transaction_us: u64,
    wait_us: u64,
    received_bytes: u64,
    sent_bytes: u64,
}

/// Appends the `pgbouncer_*` metric families to `out`.
pub fn render(pooler: &Pooler, out: &mut String) {
    let pools = pooler.all_pools();
    let mut rows = Vec::with_capacity(pools.len());
    let mut stats: BTreeMap<String, StatsRow> = pooler
        .config()
        .databases
        .iter()
        .map(|db| (db.name.clone(), StatsRow::default()))
        .collect();
    for pool in &pools {
        let (database, user) = pool.name.split_once('/').unwrap_or((&pool.name, ""));
        let waiting = pool.waiting_count();
        let idle = pool.idle_count();
        let unchecked = pool.idle_unchecked_count().min(idle);
        rows.push(PoolRow {
            database: database.to_string(),
            user: user.to_string(),
            client_active: pool
                .stats
                .clients
                .load(Ordering::Relaxed)
                .saturating_sub(waiting),
            client_waiting: waiting,
            server_active: pool.active_count(),
            server_idle: idle - unchecked,
            server_used: unchecked,
            server_login: pool.stats.logins.load(Ordering::Relaxed),
            max_wait_seconds: pool.oldest_wait().as_secs_f64(),
        });
        let row = stats.entry(database.to_string()).or_default();
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        row.queries += load(&pool.stats.queries);
        row.transactions += load(&pool.stats.transactions);
        row.query_us += load(&pool.stats.query_us);
        row.transaction_us += load(&pool.stats.transaction_us);
        row.wait_us += load(&pool.stats.wait_us);
        row.received_bytes += load(&pool.stats.received_bytes);
        row.sent_bytes += load(&pool.stats.sent_bytes);
    }

    render_pools(&rows, out);
    render_stats(&stats, out);
    render_databases(pooler, &rows, out);

    let mut users: Vec<&str> = rows.iter().map(|row| row.user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let servers: usize = rows
        .iter()
        .map(|row| row.server_active + row.server_idle + row.server_used)
        .sum();
    let lists = [
        (
            "databases",
            "Databases configured",
            pooler.config().databases.len(),
        ),
        ("users", "Users with a pool", users.len()),
        ("pools", "Pools of (database, user)", rows.len()),
        (
            "used_clients",
            "Client connections open, including those logging in",
            pooler.clients.load(Ordering::Relaxed),
        ),
        ("used_servers", "Server connections open", servers),
    ];
    for (name, help, value) in lists {
        let name = format!("pgbouncer_{name}");
        header(out, &name, "gauge", help);
        sample(out, &name, &[], value as f64);
    }
    header(
        out,
        "pgbouncer_config_max_client_connections",
        "gauge",
        "Configured max_client_conn",
    );
    let max_client_conn = pooler.config().max_client_conn as f64;
    sample(
        out,
        "pgbouncer_config_max_client_connections",
        &[],
        max_client_conn,
    );
    header(
        out,
        "pgbouncer_version_info",
        "gauge",
        "The pooler version, as SHOW VERSION reports it",
    );
    let version = concat!("skiff ", env!("CARGO_PKG_VERSION"));
    sample(out, "pgbouncer_version_info", &[("version", version)], 1.0);
    header(
        out,
        "pgbouncer_up",
        "gauge",
        "1 while the pooler serves metrics",
    );
    sample(out, "pgbouncer_up", &[], 1.0);
}

fn render_pools(rows: &[PoolRow], out: &mut String) {
    type Field = fn(&PoolRow) -> f64;
    let families: [(&str, &str, Field); 7] = [
        (
            "client_active_connections",
            "Client connections not waiting for a server connection",
            |row| row.client_active as f64,
        ),
        (
            "client_waiting_connections",
            "Client connections waiting for a server connection",
            |row| row.client_waiting as f64,
        ),
        (
            "server_active_connections",
            "Server connections lent to a client",
            |row| row.server_active as f64,
        ),
        (
            "server_idle_connections",
            "Idle server connections ready for a client",
            |row| row.server_idle as f64,
        ),
        (
            "server_used_connections",
            "Idle server connections unused for longer than server_check_delay, checked before reuse",
            |row| row.server_used as f64,
        ),
        (
            "server_login_connections",
            "Server connections logging in",
            |row| row.server_login as f64,
        ),
        (
            "client_maxwait_seconds",
            "How long the longest-waiting client has waited so far",
            |row| row.max_wait_seconds,
        ),
    ];
    for (suffix, help, field) in families {
        let name = format!("pgbouncer_pools_{suffix}");
        header(out, &name, "gauge", help);
        for row in rows {
            let labels = [("database", row.database.as_str()), ("user", &row.user)];
            sample(out, &name, &labels, field(row));
        }
    }
}

fn render_stats(stats: &BTreeMap<String, StatsRow>, out: &mut String) {
    type Field = fn(&StatsRow) -> f64;
    let families: [(&str, &str, Field); 7] = [
        (
            "queries_pooled_total",
            "Queries (simple Query and extended Execute messages)",
            |row| row.queries as f64,
        ),
        (
            "sql_transactions_pooled_total",
            "Transactions ended",
            |row| row.transactions as f64,
        ),
        (
            "queries_duration_seconds_total",
            "Time servers spent running client requests",
            |row| row.query_us as f64 / 1e6,
        ),
        (
            "server_in_transaction_seconds_total",
            "Time from each transaction's first request to its end",
            |row| row.transaction_us as f64 / 1e6,
        ),
        (
            "client_wait_seconds_total",
            "Time clients waited for a server connection",
            |row| row.wait_us as f64 / 1e6,
        ),
        (
            "received_bytes_total",
            "Bytes received from clients",
            |row| row.received_bytes as f64,
        ),
        ("sent_bytes_total", "Bytes sent to clients", |row| {
            row.sent_bytes as f64
        }),
    ];
    for (suffix, help, field) in families {
        let name = format!("pgbouncer_stats_{suffix}");
        header(out, &name, "counter", help);
        for (database, row) in stats {
            sample(out, &name, &[("database", database)], field(row));
        }
    }
}

fn render_databases(pooler: &Pooler, rows: &[PoolRow], out: &mut String) {
    let mode = match pooler.config().pool_mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    };
    let families = [
        ("pool_size", "Server connections allowed per pool"),
        (
            "current_connections",
            "Server connections open to this database",
        ),
    ];
    for (index, (suffix, help)) in families.into_iter().enumerate() {
        let name = format!("pgbouncer_databases_{suffix}");
        header(out, &name, "gauge", help);
        for db in &pooler.config().databases {
            let value = if index == 0 {
                pooler.config().pool_size(db)
            } else {
                rows.iter()
                    .filter(|row| row.database == db.name)
                    .map(|row| row.server_active + row.server_idle + row.server_used)
                    .sum()
            };
            let port = db.port.to_string();
            let labels = [
                ("name", db.name.as_str()),
                ("host", &db.host),
                ("port", &port),
                ("database", db.server_dbname()),
                ("force_user", db.user.as_deref().unwrap_or("")),
                ("pool_mode", mode),
            ];
            sample(out, &name, &labels, value as f64);
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (index, (key, value)) in labels.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            escape_label_value(value, out);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value as the Prometheus text format requires.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("database", "a\"b\\c\nd")], 2.0);
        assert_eq!(out, "m{database=\"a\\\"b\\\\c\\nd\"} 2\n");
    }
}
