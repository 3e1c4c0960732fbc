//! Sentinel mode: the primary and replicas of `master_name` come from the
//! sentinels, and are looked up again on `+switch-master` and other sentinel
//! events, after failures that may mean a failover, and periodically.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;

use super::frame::{encode_command, error_text, Protocol, Value};
use super::router::{Nodes, Router};
use super::topology::host_port;
use super::upstream::{ConnSettings, RawConn};

/// Sentinel events after which the primary or the replicas may differ.
const EVENTS: &[&str] = &["+switch-master", "+slave", "+sdown", "-sdown", "+odown"];
/// Pause before retrying when no sentinel accepts a subscription.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Minimum gap between two discoveries, so a burst of failed commands
/// triggers one lookup rather than one per command.
const MIN_DISCOVERY_GAP: Duration = Duration::from_millis(250);

/// Settings for connections to the sentinels themselves: the servers'
/// settings with the sentinels' own credentials, which `[redis]` gives as
/// `sentinel_username` and `sentinel_password`.
pub fn sentinel_settings(settings: &ConnSettings, config: &RedisConfig) -> ConnSettings {
    ConnSettings {
        protocol: Protocol::Resp2,
        db: 0,
        readonly: false,
        username: config.sentinel_username.clone(),
        password: config.sentinel_password.clone(),
        ..settings.clone()
    }
}

/// Asks the sentinels, in order, for the primary and healthy replicas.
pub async fn discover(
    sentinels: &[String],
    name: &str,
    settings: &ConnSettings,
) -> Result<Nodes, String> {
    let mut failures = Vec::new();
    for addr in sentinels {
        match discover_from(addr, name, settings).await {
            Ok(nodes) => return Ok(nodes),
            Err(reason) => failures.push(format!("{addr}: {reason}")),
        }
    }
    Err(format!(
        "no sentinel reported a primary for {name}: {}",
        failures.join("; ")
    ))
}

async fn discover_from(addr: &str, name: &str, settings: &ConnSettings) -> Result<Nodes, String> {
    let mut conn = RawConn::connect(addr, settings)
        .await
        .map_err(|e| e.to_string())?;
    let primary = query(&mut conn, &["SENTINEL", "get-master-addr-by-name", name]).await?;
    let primary = match primary.into_items() {
        Some(parts) if parts.len() == 2 => {
            let host = parts[0]
                .as_bytes()
                .map(|h| String::from_utf8_lossy(h).into_owned());
            let port = parts[1].as_int();
            match (host, port) {
                (Some(host), Some(port)) => host_port(&host, port),
                _ => return Err("invalid get-master-addr-by-name reply".into()),
            }
        }
        _ => return Err(format!("master {name} is unknown to this sentinel")),
    };
    let replicas = query(&mut conn, &["SENTINEL", "replicas", name]).await?;
    let replicas = replicas
        .into_items()
        .unwrap_or_default()
        .into_iter()
        .filter_map(healthy_replica)
        .collect();
    Ok(Nodes { primary, replicas })
}

async fn query(conn: &mut RawConn, args: &[&str]) -> Result<Value, String> {
    let reply = conn
        .call_bounded(&encode_command(args))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(text) = error_text(&reply) {
        return Err(format!("{} failed: {text}", args.join(" ")));
    }
    Value::decode(&reply, Protocol::Resp2).ok_or_else(|| "invalid reply".to_string())
}

/// Returns `host:port` of a replica entry unless the sentinel flags it as
/// down or disconnected.
fn healthy_replica(entry: Value) -> Option<String> {
    let fields = entry.into_items()?;
    let field = |name: &str| -> Option<String> {
        let index = fields
            .iter()
            .step_by(2)
            .position(|key| key.as_bytes().is_some_and(|k| k == name.as_bytes()))?;
        let value = fields.get(index * 2 + 1)?.as_bytes()?;
        Some(String::from_utf8_lossy(value).into_owned())
    };
    let flags = field("flags").unwrap_or_default();
    let down = ["s_down", "o_down", "disconnected"];
    if down.iter().any(|flag| flags.contains(flag)) {
        return None;
    }
    Some(host_port(&field("ip")?, field("port")?))
}

/// Keeps the router's primary and replicas current until shutdown.
pub async fn watch(router: Arc<Router>, settings: ConnSettings, shutdown: CancellationToken) {
    let settings = sentinel_settings(&settings, &router.config());
    let name = router.config().master_name.clone().unwrap_or_default();
    let sentinels = router.config().nodes.clone();
    let interval = router.config().topology_refresh_interval;
    let mut failing = false;
    loop {
        match discover(&sentinels, &name, &settings).await {
            Ok(nodes) => {
                metrics::counter!("skiff_redis_topology_refreshes_total").increment(1);
                router.set_nodes(nodes);
                if std::mem::take(&mut failing) {
                    tracing::info!("sentinel discovery works again");
                }
            }
            // Warn once per outage; repeats go to debug.
            Err(reason) if !failing => {
                failing = true;
                tracing::warn!(error = %reason, "sentinel discovery failed");
            }
            Err(reason) => tracing::debug!(error = %reason, "sentinel discovery failed"),
        }
        tokio::time::sleep(MIN_DISCOVERY_GAP).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = router.sentinel_refresh.notified() => {}
            _ = next_event(&sentinels, &settings) => {}
        }
    }
}

/// Waits for the next sentinel event on the first sentinel that accepts a
/// subscription.
async fn next_event(sentinels: &[String], settings: &ConnSettings) {
    for addr in sentinels {
        let Ok(mut conn) = RawConn::connect(addr, settings).await else {
            continue;
        };
        let mut subscribe = vec!["SUBSCRIBE"];
        subscribe.extend(EVENTS);
        if conn.send(&encode_command(&subscribe)).await.is_err() {
            continue;
        }
        loop {
            let Ok((frame, _)) = conn.read_frame().await else {
                break;
            };
            let kind = Value::decode(&frame, Protocol::Resp2)
                .and_then(Value::into_items)
                .and_then(|items| items.first().and_then(Value::as_bytes).cloned());
            if kind.as_deref() == Some(b"message") {
                tracing::debug!(sentinel = %addr, "sentinel event");
                return;
            }
        }
    }
    tokio::time::sleep(RETRY_PAUSE).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(pairs: &[(&str, &str)]) -> Value {
        let items = pairs
            .iter()
            .flat_map(|(k, v)| [*k, *v])
            .map(|text| Value::Str(Bytes::copy_from_slice(text.as_bytes())))
            .collect();
        Value::Array(items)
    }

    #[test]
    fn replica_entries_filter_down_ones() {
        let up = entry(&[
            ("name", "r1"),
            ("ip", "127.0.0.1"),
            ("port", "7001"),
            ("flags", "slave"),
        ]);
        assert_eq!(healthy_replica(up), Some("127.0.0.1:7001".into()));
        let down = entry(&[
            ("ip", "127.0.0.1"),
            ("port", "7002"),
            ("flags", "s_down,slave"),
        ]);
        assert_eq!(healthy_replica(down), None);
    }
}
