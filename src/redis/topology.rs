//! Redis Cluster topology: which primary and replicas serve each slot, read
//! from `CLUSTER SHARDS` (Redis 7) or `CLUSTER SLOTS` (older servers).

use std::sync::Arc;

use bytes::Bytes;

use super::frame::{encode_command, error_text, Protocol, Value};
use super::slot::SLOT_COUNT;
use super::upstream::{ConnSettings, RawConn, UpstreamError};

/// Marks a slot that no shard serves.
const UNASSIGNED: u16 = u16::MAX;

/// A primary and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub primary: Arc<str>,
    pub replicas: Vec<Arc<str>>,
}

/// The slot map of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterMap {
    shards: Vec<Shard>,
    /// Index into `shards` for every slot.
    slots: Vec<u16>,
    /// Tells the maps a cluster installs apart, so that a session can see
    /// whether routing changed since it sent its earlier commands. The
    /// cluster numbers its maps from 1. A map it never installed has 0.
    pub version: u64,
}

impl ClusterMap {
    pub fn empty() -> ClusterMap {
        ClusterMap {
            shards: Vec::new(),
            slots: vec![UNASSIGNED; SLOT_COUNT as usize],
            version: 0,
        }
    }

    /// True when both maps send every slot to the same nodes.
    pub fn routes_like(&self, other: &ClusterMap) -> bool {
        self.slots == other.slots && self.shards == other.shards
    }

    pub fn shard(&self, slot: u16) -> Option<&Shard> {
        let index = *self.slots.get(slot as usize)?;
        self.shards.get(index as usize)
    }

    /// Returns the primaries in slot map order.
    pub fn primaries(&self) -> Vec<String> {
        self.shards
            .iter()
            .map(|shard| shard.primary.to_string())
            .collect()
    }

    /// Returns every node, primaries first.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes = self.primaries();
        for shard in &self.shards {
            nodes.extend(shard.replicas.iter().map(|addr| addr.to_string()));
        }
        nodes
    }

    /// Returns a copy with `slot` moved to the shard whose primary is `addr`,
    /// as a `-MOVED` reply
    /// reports.
    pub fn with_moved(&self, slot: u16, addr: &str) -> ClusterMap {
        let mut map = self.clone();
        let index = match map.shards.iter().position(|shard| &*shard.primary == addr) {
            Some(index) => index,
            None => {
                map.shards.push(Shard {
                    primary: Arc::from(addr),
                    replicas: Vec::new(),
                });
                map.shards.len() - 1
            }
        };
        if let Some(entry) = map.slots.get_mut(slot as usize) {
            *entry = index as u16;
        }
        map
    }

    fn assign(&mut self, shard: Shard, ranges: &[(i64, i64)]) {
        let index = self.shards.len() as u16;
        self.shards.push(shard);
        for &(start, end) in ranges {
            let start = start.clamp(0, SLOT_COUNT as i64 - 1) as usize;
            let end = end.clamp(0, SLOT_COUNT as i64 - 1) as usize;
            for slot in start..=end {
                self.slots[slot] = index;
            }
        }
    }

    /// Parses a `CLUSTER SHARDS` reply. `origin_host` replaces an empty host.
    /// With `tls`, a node's `tls-port` is used before its plaintext `port`.
    pub fn from_shards_reply(reply: Value, origin_host: &str, tls: bool) -> Option<ClusterMap> {
        let mut map = ClusterMap::empty();
        for shard in reply.into_items()? {
            let fields = pairs(shard)?;
            let ranges = field(&fields, "slots")?.clone().into_items()?;
            let ranges: Vec<(i64, i64)> = ranges
                .chunks(2)
                .filter_map(|pair| Some((pair.first()?.as_int()?, pair.get(1)?.as_int()?)))
                .collect();
            // After a failover Redis 7.0 still lists the failed old primary
            // as a master, so an online master wins over one that is not.
            let mut primary = None;
            let mut failed_primary = None;
            let mut replicas = Vec::new();
            for node in field(&fields, "nodes")?.clone().into_items()? {
                let node = pairs(node)?;
                let addr = shard_node_addr(&node, origin_host, tls)?;
                let online = text(field(&node, "health")?) == "online";
                match text(field(&node, "role")?).as_str() {
                    "master" if online => primary = Some(addr),
                    "master" => failed_primary = Some(addr),
                    _ if online => replicas.push(Arc::from(addr)),
                    _ => {}
                }
            }
            let primary = primary.or(failed_primary);
            if ranges.is_empty() {
                continue;
            }
            map.assign(
                Shard {
                    primary: primary?.into(),
                    replicas,
                },
                &ranges,
            );
        }
        Some(map)
    }

    /// Parses a `CLUSTER SLOTS` reply. `origin_host` replaces an empty host.
    pub fn from_slots_reply(reply: Value, origin_host: &str) -> Option<ClusterMap> {
        let mut map = ClusterMap::empty();
        for range in reply.into_items()? {
            let items = range.into_items()?;
            let start = items.first()?.as_int()?;
            let end = items.get(1)?.as_int()?;
            let mut addrs = items[2..]
                .iter()
                .filter_map(|node| slots_node_addr(node, origin_host));
            let primary = addrs.next()?;
            let shard = Shard {
                primary: primary.into(),
                replicas: addrs.map(Arc::from).collect(),
            };
            // Ranges of one primary share one shard entry.
            match map
                .shards
                .iter()
                .position(|known| known.primary == shard.primary)
            {
                Some(index) => {
                    for slot in start.max(0) as usize..=(end as usize).min(SLOT_COUNT as usize - 1)
                    {
                        map.slots[slot] = index as u16;
                    }
                }
                None => map.assign(shard, &[(start, end)]),
            }
        }
        Some(map)
    }
}

fn pairs(value: Value) -> Option<Vec<(String, Value)>> {
    let items = value.into_items()?;
    let mut pairs = Vec::with_capacity(items.len() / 2);
    for pair in items.chunks(2) {
        pairs.push((text(pair.first()?), pair.get(1)?.clone()));
    }
    Some(pairs)
}

fn field<'a>(pairs: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

fn text(value: &Value) -> String {
    match value {
        Value::Str(data) => String::from_utf8_lossy(data).into_owned(),
        Value::Int(number) => number.to_string(),
        _ => String::new(),
    }
}

fn join_addr(host: &str, port: i64, origin_host: &str) -> Option<String> {
    if port <= 0 || host == "?" {
        return None;
    }
    let host = if host.is_empty() { origin_host } else { host };
    Some(host_port(host, port))
}

/// Joins a host and port, bracketing an IPv6 address (`[::1]:7000`) so the
/// result parses as a socket address.
pub fn host_port(host: &str, port: impl std::fmt::Display) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn shard_node_addr(node: &[(String, Value)], origin_host: &str, tls: bool) -> Option<String> {
    let host = field(node, "endpoint")
        .or_else(|| field(node, "ip"))
        .map(text)?;
    // A node that serves both plain and TLS clients lists both ports.
    let (first, second) = match tls {
        true => ("tls-port", "port"),
        false => ("port", "tls-port"),
    };
    let port = field(node, first)
        .or_else(|| field(node, second))?
        .as_int()?;
    join_addr(&host, port, origin_host)
}

fn slots_node_addr(node: &Value, origin_host: &str) -> Option<String> {
    let Value::Array(fields) = node else {
        return None;
    };
    let host = text(fields.first()?);
    join_addr(&host, fields.get(1)?.as_int()?, origin_host)
}

/// Reads the slot map from the first of `nodes` that replies.
pub async fn discover(nodes: &[String], settings: &ConnSettings) -> Result<ClusterMap, String> {
    let mut failures = Vec::new();
    for addr in nodes {
        match discover_from(addr, settings).await {
            Ok(map) => return Ok(map),
            Err(reason) => failures.push(reason),
        }
    }
    Err(format!("no cluster node answered: {}", failures.join("; ")))
}

async fn discover_from(addr: &str, settings: &ConnSettings) -> Result<ClusterMap, String> {
    let mut settings = settings.clone();
    settings.protocol = Protocol::Resp2;
    settings.db = 0;
    let mut conn = RawConn::connect(addr, &settings)
        .await
        .map_err(|err: UpstreamError| err.to_string())?;
    let origin_host = addr.rsplit_once(':').map(|(host, _)| host).unwrap_or(addr);
    let shards = call(&mut conn, &["CLUSTER", "SHARDS"]).await?;
    if error_text(&shards).is_none() {
        let value = Value::decode(&shards, Protocol::Resp2);
        let tls = settings.tls.is_some();
        if let Some(map) = value.and_then(|v| ClusterMap::from_shards_reply(v, origin_host, tls)) {
            return Ok(map);
        }
    }
    let slots = call(&mut conn, &["CLUSTER", "SLOTS"]).await?;
    if let Some(text) = error_text(&slots) {
        return Err(format!("{addr}: CLUSTER SLOTS failed: {text}"));
    }
    Value::decode(&slots, Protocol::Resp2)
        .and_then(|value| ClusterMap::from_slots_reply(value, origin_host))
        .ok_or_else(|| format!("{addr}: invalid CLUSTER SLOTS reply"))
}

async fn call(conn: &mut RawConn, args: &[&str]) -> Result<Bytes, String> {
    conn.call_bounded(&encode_command(args))
        .await
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::Str(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn slots_reply_fills_ranges_and_empty_host() {
        let node = |host: &str, port| Value::Array(vec![s(host), Value::Int(port), s("id")]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("", 7000),
                node("h", 7003),
            ]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node("h", 7001)]),
        ]);
        let map = ClusterMap::from_slots_reply(reply, "seed").unwrap();
        assert_eq!(&*map.shard(0).unwrap().primary, "seed:7000");
        assert_eq!(
            map.shard(8191).unwrap().replicas,
            vec![Arc::<str>::from("h:7003")]
        );
        assert_eq!(&*map.shard(16383).unwrap().primary, "h:7001");
    }

    /// Builds a node entry of a `CLUSTER SHARDS` reply.
    fn shard_node(port: i64, role: &str, health: &str) -> Value {
        Value::Array(vec![
            s("endpoint"),
            s("127.0.0.1"),
            s("port"),
            Value::Int(port),
            s("role"),
            s(role),
            s("health"),
            s(health),
        ])
    }

    #[test]
    fn shards_reply_skips_failed_replicas() {
        let node = shard_node;
        let shard = Value::Array(vec![
            s("slots"),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(100),
                Value::Int(200),
                Value::Int(300),
            ]),
            s("nodes"),
            Value::Array(vec![
                node(7000, "master", "online"),
                node(7003, "replica", "online"),
                node(7004, "replica", "failed"),
            ]),
        ]);
        let map = ClusterMap::from_shards_reply(Value::Array(vec![shard]), "x", false).unwrap();
        let shard = map.shard(250).unwrap();
        assert_eq!(&*shard.primary, "127.0.0.1:7000");
        assert_eq!(shard.replicas, vec![Arc::<str>::from("127.0.0.1:7003")]);
        assert!(map.shard(150).is_none());
    }

    /// After a failover, the shard lists the promoted replica and the
    /// failed old primary, both as masters, in either order.
    #[test]
    fn shards_reply_skips_failed_primary() {
        let node = |port, health| shard_node(port, "master", health);
        let orders = [
            vec![node(7003, "online"), node(7000, "failed")],
            vec![node(7000, "failed"), node(7003, "online")],
        ];
        for nodes in orders {
            let shard = Value::Array(vec![
                s("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(100)]),
                s("nodes"),
                Value::Array(nodes),
            ]);
            let map = ClusterMap::from_shards_reply(Value::Array(vec![shard]), "x", false).unwrap();
            assert_eq!(&*map.shard(50).unwrap().primary, "127.0.0.1:7003");
        }
        let lone = Value::Array(vec![
            s("slots"),
            Value::Array(vec![Value::Int(0), Value::Int(100)]),
            s("nodes"),
            Value::Array(vec![node(7000, "failed")]),
        ]);
        let map = ClusterMap::from_shards_reply(Value::Array(vec![lone]), "x", false).unwrap();
        assert_eq!(
            &*map.shard(50).unwrap().primary,
            "127.0.0.1:7000",
            "a failed primary is kept when the shard has no other"
        );
    }

    #[test]
    fn shards_reply_tls_port_over_tls() {
        let shard = Value::Array(vec![
            s("slots"),
            Value::Array(vec![Value::Int(0), Value::Int(16383)]),
            s("nodes"),
            Value::Array(vec![Value::Array(vec![
                s("endpoint"),
                s("10.0.0.1"),
                s("port"),
                Value::Int(6379),
                s("tls-port"),
                Value::Int(6380),
                s("role"),
                s("master"),
                s("health"),
                s("online"),
            ])]),
        ]);
        let reply = Value::Array(vec![shard]);
        let plain = ClusterMap::from_shards_reply(reply.clone(), "x", false).unwrap();
        assert_eq!(&*plain.shard(0).unwrap().primary, "10.0.0.1:6379");
        let tls = ClusterMap::from_shards_reply(reply, "x", true).unwrap();
        assert_eq!(&*tls.shard(0).unwrap().primary, "10.0.0.1:6380");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(host_port("::1", 7000), "[::1]:7000");
        assert_eq!(host_port("[::1]", 7000), "[::1]:7000");
        assert_eq!(host_port("10.0.0.5", 7000), "10.0.0.5:7000");
    }

    #[test]
    fn moved_reassigns_one_slot() {
        let mut map = ClusterMap::empty();
        map.assign(
            Shard {
                primary: "a:1".into(),
                replicas: vec![],
            },
            &[(0, 16383)],
        );
        let moved = map.with_moved(42, "b:2");
        assert_eq!(&*moved.shard(42).unwrap().primary, "b:2");
        assert_eq!(&*moved.shard(43).unwrap().primary, "a:1");
    }
}
