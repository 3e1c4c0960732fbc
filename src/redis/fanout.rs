//! Cluster commands that touch more than one node: multi-key commands split
//! by slot and reassembled in the client's order, and keyless commands that
//! cover every primary (SCAN, KEYS, DBSIZE, FLUSHALL, SCRIPT).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::cluster::{submit_to_slot, Retry};
use super::frame::{error_text, Protocol, Request, Value};
use super::reply;
use super::router::{Pending, Role, Router, SessionCtx};
use super::slot::key_slot;
use super::topology::ClusterMap;
use super::upstream::UpstreamError;

/// Bits of a cluster SCAN cursor that carry the primary's index.
const NODE_BITS: u32 = 10;

/// Routes a command without keys.
pub async fn keyless(
    router: &Arc<Router>,
    map: &ClusterMap,
    request: Request,
    name: &str,
    ctx: SessionCtx,
) -> Pending {
    let cluster = router.cluster.as_ref().expect("cluster mode");
    let primaries = map.primaries();
    if primaries.is_empty() {
        cluster.request_refresh();
        return Pending::Ready(reply::error("CLUSTERDOWN Hash slot not served"));
    }
    if name == "PUBLISH" && request.args.len() > 1 {
        // SUBSCRIBE goes to the channel's slot owner too, so PUBLISH returns
        // the count of subscribers that skiff's clients hold on that node.
        let slot = key_slot(&request.args[1]);
        return submit_to_slot(router, map, request, slot, false, ctx).await;
    }
    let router = router.clone();
    let merge = match name {
        "SCAN" => return Pending::Future(Box::pin(scan(router, request, ctx, primaries))),
        "KEYS" => Merge::Concat,
        "DBSIZE" => Merge::Sum,
        "FLUSHALL" | "FLUSHDB" | "SCRIPT" | "FUNCTION" => Merge::First,
        _ => {
            let addr = &primaries[ctx.client_id as usize % primaries.len()];
            return match router.send(addr, &request, ctx).await {
                Ok(receiver) => {
                    let mut in_flight = router.in_flight(receiver, addr.as_str(), Role::Primary);
                    // Kept so that a redirect, if a node sends one for a
                    // key skiff did not recognize, is followed too.
                    in_flight.retry = Some(Retry {
                        request,
                        slot: None,
                        readonly: false,
                        ctx,
                    });
                    Pending::InFlight(in_flight)
                }
                Err(err) => Pending::Ready(router.upstream_failure(&err, Role::Primary)),
            };
        }
    };
    let future = async move {
        let mut replies = Vec::with_capacity(primaries.len());
        for addr in &primaries {
            match call(&router, addr, &request, ctx).await {
                Ok(reply) => replies.push(reply),
                Err(err) => return router.upstream_failure(&err, Role::Primary),
            }
        }
        merge.apply(replies, ctx.protocol)
    };
    Pending::Future(Box::pin(future))
}

async fn call(
    router: &Router,
    addr: &str,
    request: &Request,
    ctx: SessionCtx,
) -> Result<Bytes, UpstreamError> {
    let receiver = router.send(addr, request, ctx).await?;
    receiver
        .await
        .unwrap_or_else(|_| Err(UpstreamError::Closed { addr: addr.into() }))
}

/// Rule for combining the replies of several nodes into one.
#[derive(Debug, Clone, Copy)]
enum Merge {
    /// Arrays appended in node order (KEYS).
    Concat,
    /// Integers added (DBSIZE, DEL, EXISTS).
    Sum,
    /// The first node's reply, after every node succeeded (FLUSHALL, SCRIPT LOAD).
    First,
    /// `+OK` when every part is OK (MSET).
    AllOk,
}

impl Merge {
    fn apply(self, replies: Vec<Bytes>, protocol: Protocol) -> Bytes {
        if let Some(error) = replies.iter().find(|reply| error_text(reply).is_some()) {
            return error.clone();
        }
        match self {
            Merge::First | Merge::AllOk => replies.into_iter().next().unwrap_or_else(reply::ok),
            Merge::Sum => {
                let total = replies
                    .iter()
                    .filter_map(|raw| Value::decode(raw, protocol)?.as_int())
                    .sum();
                reply::integer(total)
            }
            Merge::Concat => {
                let mut items = Vec::new();
                for raw in &replies {
                    let values = Value::decode(raw, protocol).and_then(Value::into_items);
                    items.extend(
                        values
                            .unwrap_or_default()
                            .iter()
                            .map(|v| encode(v, protocol)),
                    );
                }
                reply::array(&items)
            }
        }
    }
}

/// Re-encodes a string or nil element of an array reply.
fn encode(value: &Value, protocol: Protocol) -> Bytes {
    match value {
        Value::Str(data) => reply::bulk(data),
        Value::Int(number) => reply::integer(*number),
        _ => reply::null(protocol),
    }
}

/// Walks every primary in turn. The cursor's low [`NODE_BITS`] bits are the
/// primary's index and the rest is that primary's own cursor.
///
/// NOTE: the index refers to the primaries in slot map order, so a topology
/// change during a scan can skip or repeat a node's keys. A node cursor
/// must fit in 54 bits, which holds for any hash table that fits in memory.
async fn scan(
    router: Arc<Router>,
    request: Request,
    ctx: SessionCtx,
    primaries: Vec<String>,
) -> Bytes {
    let cursor = request
        .args
        .get(1)
        .and_then(|arg| std::str::from_utf8(arg).ok())
        .and_then(|text| text.parse::<u64>().ok());
    let Some(cursor) = cursor else {
        return reply::error("ERR invalid cursor");
    };
    let index = (cursor & ((1 << NODE_BITS) - 1)) as usize;
    if index >= primaries.len() {
        return reply::error("ERR invalid cursor");
    }

    let mut args = request.args.clone();
    args[1] = Bytes::from((cursor >> NODE_BITS).to_string());
    let reply = match call(&router, &primaries[index], &Request::from_args(args), ctx).await {
        Ok(reply) => reply,
        Err(err) => return router.upstream_failure(&err, Role::Primary),
    };
    let parts = Value::decode(&reply, ctx.protocol).and_then(Value::into_items);
    let Some([next, keys]) = parts.and_then(|parts| <[Value; 2]>::try_from(parts).ok()) else {
        // An error reply, passed on as it is.
        return reply;
    };

    let node_cursor = next.as_int().unwrap_or(0) as u64;
    let combined = next_scan_cursor(node_cursor, index, primaries.len());
    let keys: Vec<Bytes> = keys
        .into_items()
        .unwrap_or_default()
        .iter()
        .map(|key| encode(key, ctx.protocol))
        .collect();
    reply::array(&[
        reply::bulk(combined.to_string().as_bytes()),
        reply::array(&keys),
    ])
}

/// Returns the client's next cursor: the same primary while it has more,
/// then the next primary from cursor 0, then 0 after the last primary.
fn next_scan_cursor(node_cursor: u64, index: usize, primaries: usize) -> u64 {
    let index = if node_cursor == 0 { index + 1 } else { index };
    if index >= primaries {
        return 0;
    }
    (node_cursor << NODE_BITS) | index as u64
}

/// Splits a multi-key command whose keys are in several slots: one request
/// per slot, all written before this returns, merged in the client's key
/// order. Returns `None` for commands that cannot be split.
pub async fn split(
    router: &Arc<Router>,
    map: &ClusterMap,
    request: &Request,
    name: &str,
    positions: &[usize],
    slots: &[u16],
    ctx: SessionCtx,
) -> Option<Pending> {
    let (merge, values_per_key) = match name {
        "MGET" => (None, 0),
        "DEL" | "UNLINK" | "EXISTS" | "TOUCH" => (Some(Merge::Sum), 0),
        "MSET" => (Some(Merge::AllOk), 1),
        _ => return None,
    };
    if positions
        .iter()
        .any(|&position| position + values_per_key >= request.args.len())
    {
        return Some(Pending::Ready(reply::error(&reply::wrong_arity(name))));
    }
    let readonly = router.commands().is_readonly(name, request);
    let groups = group_by_slot(slots);

    let mut pending = Vec::with_capacity(groups.len());
    for (slot, members) in &groups {
        let mut args = vec![request.args[0].clone()];
        for &order in members {
            let position = positions[order];
            args.extend_from_slice(&request.args[position..=position + values_per_key]);
        }
        let part = Request::from_args(args);
        pending.push(submit_to_slot(router, map, part, *slot, readonly, ctx).await);
    }

    let router = router.clone();
    let key_count = positions.len();
    let future = async move {
        let mut replies = Vec::with_capacity(pending.len());
        for part in pending {
            replies.push(part.resolve(&router).await);
        }
        match merge {
            Some(merge) => merge.apply(replies, ctx.protocol),
            None => reassemble(&groups, replies, key_count, ctx.protocol),
        }
    };
    Some(Pending::Future(Box::pin(future)))
}

/// Groups key indexes by slot, keeping the order in which slots first
/// appear and the keys' order within each slot.
fn group_by_slot(slots: &[u16]) -> Vec<(u16, Vec<usize>)> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    let mut group_of_slot = std::collections::HashMap::new();
    for (order, &slot) in slots.iter().enumerate() {
        let group = *group_of_slot.entry(slot).or_insert_with(|| {
            groups.push((slot, Vec::new()));
            groups.len() - 1
        });
        groups[group].1.push(order);
    }
    groups
}

/// Puts the values of per-slot MGET replies back in the client's key order.
fn reassemble(
    groups: &[(u16, Vec<usize>)],
    replies: Vec<Bytes>,
    key_count: usize,
    protocol: Protocol,
) -> Bytes {
    if let Some(error) = replies.iter().find(|reply| error_text(reply).is_some()) {
        return error.clone();
    }
    let mut values = vec![reply::null(protocol); key_count];
    for ((_, members), raw) in groups.iter().zip(&replies) {
        let items = Value::decode(raw, protocol).and_then(Value::into_items);
        let Some(items) = items.filter(|items| items.len() == members.len()) else {
            return reply::error("ERR invalid MGET reply from upstream");
        };
        for (&order, item) in members.iter().zip(&items) {
            values[order] = encode(item, protocol);
        }
    }
    let mut out = BytesMut::new();
    reply::put_array_header(&mut out, key_count);
    for value in values {
        out.extend_from_slice(&value);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_cursor_walks_primaries_in_order() {
        assert_eq!(next_scan_cursor(17, 0, 3), 17 << NODE_BITS);
        assert_eq!(next_scan_cursor(0, 0, 3), 1);
        assert_eq!(next_scan_cursor(5, 2, 3), (5 << NODE_BITS) | 2);
        assert_eq!(next_scan_cursor(0, 2, 3), 0);
    }

    #[test]
    fn keys_grouped_by_slot_in_first_seen_order() {
        let groups = group_by_slot(&[7, 3, 7, 9, 3]);
        assert_eq!(groups, vec![(7, vec![0, 2]), (3, vec![1, 4]), (9, vec![3])]);
    }

    #[test]
    fn reassemble_restores_key_order() {
        let groups = vec![(1, vec![0, 2]), (2, vec![1])];
        let replies = vec![
            Bytes::from_static(b"*2\r\n$1\r\na\r\n$-1\r\n"),
            Bytes::from_static(b"*1\r\n$1\r\nb\r\n"),
        ];
        let merged = reassemble(&groups, replies, 3, Protocol::Resp2);
        assert_eq!(&merged[..], b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n");
    }

    #[test]
    fn merge_returns_first_error() {
        let replies = vec![
            Bytes::from_static(b":1\r\n"),
            Bytes::from_static(b"-ERR x\r\n"),
        ];
        assert_eq!(
            &Merge::Sum.apply(replies, Protocol::Resp2)[..],
            b"-ERR x\r\n"
        );
        let counts = vec![Bytes::from_static(b":1\r\n"), Bytes::from_static(b":2\r\n")];
        assert_eq!(&Merge::Sum.apply(counts, Protocol::Resp2)[..], b":3\r\n");
    }
}
