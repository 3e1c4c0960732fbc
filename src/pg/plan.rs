//! The server settings `skiff plan --query` reads, over a login made the
//! way a pool would make it.

use std::time::Duration;

use super::backend::ServerConn;
use super::protocol::{self, backend};
use super::Pooler;
use crate::config::{Config, PgDatabase};

/// Connection settings of a PostgreSQL server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    pub max_connections: u32,
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16 and later), 0 before that.
    pub reserved_connections: u32,
}

const SETTINGS_SQL: &str = "SELECT current_setting('max_connections'), \
     current_setting('superuser_reserved_connections'), \
     coalesce(current_setting('reserved_connections', true), '0')";

/// Logs in to `db`'s server as `user`, with the credentials the pool for
/// that user would use, and reads its connection settings.
pub async fn server_settings(
    config: &Config,
    db: &PgDatabase,
    user: &str,
) -> Result<ServerSettings, String> {
    let pg = config.postgres.clone().ok_or("no [postgres] section")?;
    let timeout = pg.server_connect_timeout;
    let pooler = Pooler::new(pg, config, None).map_err(|err| err.to_string())?;
    let target = pooler.target_for(db, user);
    let mut conn = ServerConn::connect(0, &target, timeout, 0)
        .await
        .map_err(|err| err.to_string())?;
    conn.queue(&protocol::query(SETTINGS_SQL));
    let values = tokio::time::timeout(timeout.max(Duration::from_secs(1)), async {
        conn.flush().await.map_err(|err| err.to_string())?;
        read_row(&mut conn).await
    })
    .await
    .map_err(|_| format!("timed out after {timeout:?} reading the server settings"))??;
    conn.terminate().await;
    let number = |index: usize, name: &str| -> Result<u32, String> {
        values
            .get(index)
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| format!("the server returned no number for {name}: {values:?}"))
    };
    Ok(ServerSettings {
        max_connections: number(0, "max_connections")?,
        superuser_reserved_connections: number(1, "superuser_reserved_connections")?,
        reserved_connections: number(2, "reserved_connections")?,
    })
}

/// Reads the reply to a simple query up to ReadyForQuery and returns the
/// text values of its only row.
async fn read_row(conn: &mut ServerConn) -> Result<Vec<String>, String> {
    let mut row = None;
    loop {
        let message = conn.read().await.map_err(|err| err.to_string())?;
        match message.tag() {
            backend::DATA_ROW => row = Some(decode_data_row(message.body())?),
            backend::ERROR_RESPONSE => {
                let fields = protocol::ErrorFields::parse(message.body());
                return Err(format!(
                    "reading the server settings failed: {} ({})",
                    fields.message, fields.code
                ));
            }
            backend::READY_FOR_QUERY => {
                return row.ok_or_else(|| "the settings query returned no row".to_string())
            }
            _ => {}
        }
    }
}

fn decode_data_row(mut body: &[u8]) -> Result<Vec<String>, String> {
    let malformed = || "malformed DataRow from the server".to_string();
    let take = |body: &mut &[u8], count: usize| -> Result<Vec<u8>, String> {
        if body.len() < count {
            return Err(malformed());
        }
        let (head, rest) = body.split_at(count);
        *body = rest;
        Ok(head.to_vec())
    };
    let columns = i16::from_be_bytes(take(&mut body, 2)?.try_into().map_err(|_| malformed())?);
    let mut values = Vec::with_capacity(columns.max(0) as usize);
    for _ in 0..columns {
        let length = i32::from_be_bytes(take(&mut body, 4)?.try_into().map_err(|_| malformed())?);
        if length < 0 {
            values.push(String::new());
        } else {
            let bytes = take(&mut body, length as usize)?;
            values.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    Ok(values)
}
