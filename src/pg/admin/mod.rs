//! Admin console: `psql -p 6432 -U <admin user> skiff` (or database
//! `pgbouncer`) runs PgBouncer-style SHOW commands over the simple query
//! protocol, with PgBouncer's column names where skiff has the value.

mod show;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use super::protocol::{
    self, backend, frontend, read_cstr_lossy, MessageReader, ProtocolError, Severity,
};
use super::Pooler;
use crate::config::PoolMode;
use crate::tls::{ReadHalf, WriteHalf};

/// Database names that open the admin console.
pub const ADMIN_DATABASES: &[&str] = &["skiff", "pgbouncer"];

/// Maximum message size the admin console reads. Its commands are short.
pub const MAX_ADMIN_MESSAGE: usize = 64 * 1024;

/// Characters of an unknown command quoted back in the error.
const MAX_QUOTED: usize = 100;

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
    shutdown: &CancellationToken,
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
    // After an extended-protocol message is refused, the rest up to Sync
    // is dropped and Sync alone gets ReadyForQuery, as PostgreSQL does.
    let mut skipping = false;
    loop {
        // An admin session does not hold up shutdown.
        let message = tokio::select! {
            message = reader.read() => message,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let message = match message {
            Ok(message) => message,
            Err(err @ ProtocolError::TooLarge { .. }) => {
                let error = protocol::error_response(Severity::Fatal, "54000", &err.to_string());
                writer.send(&error).await?;
                reader.discard_before_close().await;
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        let mut out = BytesMut::new();
        match message.tag() {
            frontend::TERMINATE => return Ok(()),
            frontend::SYNC => {
                skipping = false;
                out.extend_from_slice(&protocol::ready_for_query(b'I'));
            }
            _ if skipping => {}
            frontend::QUERY => {
                let mut body = message.body();
                let sql = read_cstr_lossy(&mut body).unwrap_or_default();
                run_command(pooler, &sql, &mut out).await;
                out.extend_from_slice(&protocol::ready_for_query(b'I'));
            }
            frontend::FLUSH => {}
            _ => {
                skipping = true;
                out.extend_from_slice(&protocol::error_response(
                    Severity::Error,
                    "08P01",
                    "the admin console supports only the simple query protocol",
                ));
            }
        }
        writer.send(&out).await?;
    }
}

/// Runs one command, possibly several separated by `;`.
async fn run_command(pooler: &Pooler, sql: &str, out: &mut BytesMut) {
    if sql.trim().trim_matches(';').trim().is_empty() {
        out.extend_from_slice(&protocol::empty_message(backend::EMPTY_QUERY_RESPONSE));
        return;
    }
    for command in sql.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let words: Vec<String> = command.split_whitespace().map(str::to_uppercase).collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let reply = match words.as_slice() {
            ["SHOW", what] => show(pooler, what).map(Reply::Table),
            ["SHOW"] => Ok(Reply::Table(show::show_help())),
            [verb, rest @ ..] => act(pooler, verb, rest, command).await,
            [] => continue,
        };
        match reply {
            Ok(Reply::Table(table)) => write_table(&table, out),
            Ok(Reply::Done(tag)) => out.extend_from_slice(&protocol::command_complete(tag)),
            Err(AdminError { code, message }) => {
                out.extend_from_slice(&protocol::error_response(Severity::Error, code, &message));
                return;
            }
        }
    }
}

/// A command's response to the client.
enum Reply {
    Table(Table),
    /// CommandComplete with this tag.
    Done(&'static str),
}

/// An ErrorResponse for the admin client.
struct AdminError {
    code: &'static str,
    message: String,
}

fn unknown(command: &str) -> AdminError {
    let quoted: String = command.chars().take(MAX_QUOTED).collect();
    let more = if quoted.len() < command.len() {
        "..."
    } else {
        ""
    };
    AdminError {
        code: "42601",
        message: format!(
            "unknown or unsupported admin command {quoted:?}{more}; SHOW HELP lists the commands"
        ),
    }
}

fn show(pooler: &Pooler, what: &str) -> Result<Table, AdminError> {
    Ok(match what {
        "POOLS" => show::show_pools(pooler),
        "STATS" => show::show_stats(pooler),
        "DATABASES" => show::show_databases(pooler),
        "USERS" => show::show_users(pooler),
        "CONFIG" => show::show_config(pooler),
        "LISTS" => show::show_lists(pooler),
        "CLIENTS" => show::show_clients(pooler),
        "SERVERS" => show::show_servers(pooler),
        "MEM" => show::show_mem(pooler),
        "REDIS_NODES" => show::show_redis_nodes(pooler),
        "LOGSHIP" => show::show_logship(pooler),
        "VERSION" => Table {
            columns: &["version"],
            rows: vec![vec![Some(format!("skiff {}", env!("CARGO_PKG_VERSION")))]],
        },
        "HELP" => show::show_help(),
        _ => return Err(unknown(&format!("SHOW {what}"))),
    })
}

/// Runs a command that changes state: `rest` contains its arguments in upper
/// case, `command` the original text, whose case database names keep.
async fn act(
    pooler: &Pooler,
    verb: &str,
    rest: &[&str],
    command: &str,
) -> Result<Reply, AdminError> {
    let argument = command.split_whitespace().nth(1);
    let database = match (rest.len(), argument) {
        (0, _) => None,
        (1, Some(name)) => Some(name.trim_matches('"')),
        _ => return Err(unknown(command)),
    };
    let configured = |pooler: &Pooler| {
        pooler
            .check_database(database)
            .map_err(|message| AdminError {
                code: "3D000",
                message,
            })
    };
    match verb {
        "PAUSE" => {
            configured(pooler)?;
            pooler.pause(database).await.map_err(|message| AdminError {
                code: "55000",
                message,
            })?;
            Ok(Reply::Done("PAUSE"))
        }
        "RESUME" => {
            configured(pooler)?;
            pooler.resume(database);
            Ok(Reply::Done("RESUME"))
        }
        "KILL" => {
            configured(pooler)?;
            let killed = pooler.kill(database);
            tracing::info!(database = database.unwrap_or("*"), killed, "admin KILL");
            Ok(Reply::Done("KILL"))
        }
        "KILL_CLIENT" => {
            let id = database
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or_else(|| AdminError {
                    code: "42601",
                    message: "KILL_CLIENT needs a client id from SHOW CLIENTS".into(),
                })?;
            if !pooler.kill_client(id) {
                return Err(AdminError {
                    code: "42704",
                    message: format!("no client with id {id}"),
                });
            }
            Ok(Reply::Done("KILL_CLIENT"))
        }
        "RECONNECT" => {
            configured(pooler)?;
            pooler.reconnect(database);
            Ok(Reply::Done("RECONNECT"))
        }
        "WAIT_CLOSE" => {
            configured(pooler)?;
            pooler.wait_close(database).await;
            Ok(Reply::Done("WAIT_CLOSE"))
        }
        "DISABLE" | "ENABLE" => {
            let Some(name) = database else {
                return Err(AdminError {
                    code: "42601",
                    message: format!("{verb} needs a database name"),
                });
            };
            configured(pooler)?;
            pooler.set_enabled(name, verb == "ENABLE");
            Ok(Reply::Done(if verb == "ENABLE" {
                "ENABLE"
            } else {
                "DISABLE"
            }))
        }
        "RELOAD" if database.is_none() => {
            let control = control(pooler)?;
            match control.reload().await {
                Ok(notes) => {
                    for note in notes {
                        tracing::warn!(%note, "config reload: setting not applied");
                    }
                    tracing::info!("config reloaded by the admin console");
                    Ok(Reply::Done("RELOAD"))
                }
                Err(message) => {
                    tracing::error!(error = %message, "config reload rejected; the old config stays in force");
                    Err(AdminError {
                        code: "F0000",
                        message: format!(
                            "reload rejected, the old config stays in force: {message}"
                        ),
                    })
                }
            }
        }
        "SHUTDOWN" if database.is_none() => {
            tracing::info!("shutdown requested by the admin console");
            control(pooler)?.request_shutdown();
            Ok(Reply::Done("SHUTDOWN"))
        }
        _ => Err(unknown(command)),
    }
}

fn control(pooler: &Pooler) -> Result<std::sync::Arc<crate::control::Control>, AdminError> {
    pooler.control().ok_or_else(|| AdminError {
        code: "55000",
        message: "this pooler runs without process control".into(),
    })
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
