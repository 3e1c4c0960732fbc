//! Admin console: `psql -p 6432 -U <admin user> skiff` (or database
//! `pgbouncer`) runs PgBouncer-style SHOW commands over the simple query
//! protocol, with PgBouncer's column names where skiff has the value.

use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::protocol::{self, frontend, read_cstr_lossy, MessageReader, Severity};
use super::Pooler;
use crate::config::PoolMode;
use crate::tls::{ReadHalf, WriteHalf};

/// Database names that open the admin console.
pub const ADMIN_DATABASES: &[&str] = &["skiff", "pgbouncer"];

/// A result set: column names and rows of text values.
struct Table {
    columns: &'static [&'static str],
    rows: Vec<Vec<Option<String>>>,
}

/// Serves admin commands until the client leaves.
pub async fn serve(
    pooler: &Pooler,
    mut reader: MessageReader<ReadHalf>,
    mut writer: WriteHalf,
) -> std::io::Result<()> {
    let mut greeting = BytesMut::new();
    greeting.extend_from_slice(&protocol::authentication(0, &[]));
    for (name, value) in [
        (
            "server_version",
            concat!("15.0 (skiff ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        greeting.extend_from_slice(&protocol::parameter_status(name, value));
    }
    greeting.extend_from_slice(&protocol::backend_key_data(0, 0));
    greeting.extend_from_slice(&protocol::ready_for_query(b'I'));
    writer.send(&greeting).await?;
    loop {
        let Ok(message) = reader.read().await else {
            return Ok(());
        };
        let mut out = BytesMut::new();
        match message.tag() {
            frontend::QUERY => {
                let mut body = message.body();
                let sql = read_cstr_lossy(&mut body).unwrap_or_default();
                run_command(pooler, &sql, &mut out);
            }
            frontend::TERMINATE => return Ok(()),
            frontend::SYNC => {}
            _ => out.extend_from_slice(&protocol::error_response(
                Severity::Error,
                "08P01",
                "the admin console supports only the simple query protocol",
            )),
        }
        out.extend_from_slice(&protocol::ready_for_query(b'I'));
        writer.send(&out).await?;
    }
}

/// Runs one command, possibly several separated by `;`.
fn run_command(pooler: &Pooler, sql: &str, out: &mut BytesMut) {
    for command in sql.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let words: Vec<String> = command.split_whitespace().map(str::to_uppercase).collect();
        let table = match words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["SHOW", "POOLS"] => show_pools(pooler),
            ["SHOW", "STATS"] => show_stats(pooler),
            ["SHOW", "DATABASES"] => show_databases(pooler),
            ["SHOW", "USERS"] => show_users(pooler),
            ["SHOW", "CONFIG"] => show_config(pooler),
            ["SHOW", "LISTS"] => show_lists(pooler),
            ["SHOW", "VERSION"] => Table {
                columns: &["version"],
                rows: vec![vec![Some(format!("skiff {}", env!("CARGO_PKG_VERSION")))]],
            },
            ["SHOW", "HELP"] | ["SHOW"] => show_help(),
            _ => {
                let message = format!(
                    "unknown or unsupported admin command {command:?}; SHOW HELP lists the commands"
                );
                out.extend_from_slice(&protocol::error_response(
                    Severity::Error,
                    "42601",
                    &message,
                ));
                return;
            }
        };
        write_table(&table, out);
    }
}

fn write_table(table: &Table, out: &mut BytesMut) {
    out.extend_from_slice(&protocol::row_description(table.columns));
    for row in &table.rows {
        let values: Vec<Option<&str>> = row.iter().map(Option::as_deref).collect();
        out.extend_from_slice(&protocol::data_row(&values));
    }
    out.extend_from_slice(&protocol::command_complete("SHOW"));
}

fn text(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

fn split_pool_name(name: &str) -> (String, String) {
    let (database, user) = name.split_once('/').unwrap_or((name, ""));
    (database.to_string(), user.to_string())
}

fn show_pools(pooler: &Pooler) -> Table {
    let rows = pooler
        .all_pools()
        .iter()
        .map(|pool| {
            let (database, user) = split_pool_name(&pool.name);
            let max_wait_us = pool.stats.max_wait_us.load(Ordering::Relaxed);
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
                text(max_wait_us / 1_000_000),
                text(max_wait_us % 1_000_000),
                text(mode_name(pooler.config.pool_mode)),
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
            "maxwait",
            "maxwait_us",
            "pool_mode",
        ],
        rows,
    }
}

fn show_stats(pooler: &Pooler) -> Table {
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

fn show_databases(pooler: &Pooler) -> Table {
    let pools = pooler.all_pools();
    let rows = pooler
        .config
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
                text(pooler.config.pool_size(db)),
                text(mode_name(pooler.config.pool_mode)),
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

fn show_users(pooler: &Pooler) -> Table {
    let mut users: Vec<String> = pooler
        .all_pools()
        .iter()
        .map(|p| split_pool_name(&p.name).1)
        .collect();
    users.sort();
    users.dedup();
    let mode = mode_name(pooler.config.pool_mode);
    Table {
        columns: &["name", "pool_mode"],
        rows: users
            .into_iter()
            .map(|user| vec![text(user), text(mode)])
            .collect(),
    }
}

fn show_config(pooler: &Pooler) -> Table {
    let config = &pooler.config;
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
            .map(|(key, value)| vec![text(key), text(value), text("no")])
            .collect(),
    }
}

fn show_lists(pooler: &Pooler) -> Table {
    let pools = pooler.all_pools();
    let used: usize = pools.iter().map(|p| p.active_count()).sum();
    let free: usize = pools.iter().map(|p| p.idle_count()).sum();
    let items = [
        ("databases", pooler.config.databases.len()),
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

fn show_help() -> Table {
    let commands = [
        "SHOW POOLS",
        "SHOW STATS",
        "SHOW DATABASES",
        "SHOW USERS",
        "SHOW CONFIG",
        "SHOW LISTS",
        "SHOW VERSION",
        "SHOW HELP",
    ];
    Table {
        columns: &["command"],
        rows: commands.iter().map(|c| vec![text(c)]).collect(),
    }
}
