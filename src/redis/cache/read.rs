//! The near cache's read path. A hit is served at once. A miss is sent to
//! the node the router picks, followed by `PTTL` of the key in the same
//! write, and the reply is stored if nothing invalidated the key meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::commands::{self, Cacheable, PerKey};
use super::metrics::Skip;
use super::store::{Shape, Stamp};
use super::tracking::Scope;
use crate::redis::cluster::{self, Retry};
use crate::redis::frame::{encode_command, Request};
use crate::redis::reply;
use crate::redis::router::{Pending, Role, Router, SessionCtx};
use crate::redis::upstream::{ReplyReceiver, UpstreamError};

/// The part of a fetched reply that is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The whole reply.
    Whole,
    /// The element of a one-key `MGET` reply.
    MgetElement,
}

impl Part {
    fn of(self, reply: &Bytes) -> Option<Bytes> {
        match self {
            Part::Whole => Some(reply.clone()),
            Part::MgetElement => commands::mget_element(reply),
        }
    }
}

/// Serves a cacheable read from the near cache or from Redis. Called only
/// when the near cache is enabled.
pub async fn read(
    router: &Arc<Router>,
    request: Request,
    name: &str,
    kind: Cacheable,
    ctx: SessionCtx,
) -> Pending {
    match kind {
        Cacheable::Single(command) => read_single(router, request, name, command, ctx).await,
        Cacheable::PerKey(kind) => read_per_key(router, request, name, kind, ctx).await,
    }
}

async fn read_single(
    router: &Arc<Router>,
    request: Request,
    name: &str,
    command: &'static str,
    ctx: SessionCtx,
) -> Pending {
    let cache = &router.cache;
    let Some(max_ttl) = cache.max_ttl(&request.args[1]) else {
        return router.route(request, name, ctx).await;
    };
    let store = cache.store.as_ref().expect("the near cache is enabled");
    let shape = Shape {
        db: ctx.db,
        protocol: ctx.protocol,
        command,
        args: &request.args[2..],
    };
    if let Some(reply) = store.get(&request.args[1], &shape, Instant::now()) {
        store.metrics.hit();
        return Pending::Ready(reply);
    }
    store.metrics.misses.increment(1);
    fill(router, request, command, max_ttl, ctx, Part::Whole).await
}

/// Appends the cached reply of `GET key` to `out` and counts a hit.
/// Returns false, leaving `out` as it is and counting nothing, when the
/// key is not cached or no live reply is stored, so the request then takes
/// the usual path through [`read`].
pub fn copy_cached_get(router: &Router, key: &[u8], ctx: SessionCtx, out: &mut BytesMut) -> bool {
    let cache = &router.cache;
    let Some(store) = cache.store.as_ref() else {
        return false;
    };
    if cache.max_ttl(key).is_none() {
        return false;
    }
    let shape = Shape {
        db: ctx.db,
        protocol: ctx.protocol,
        command: "GET",
        args: &[],
    };
    if !store.get_into(key, &shape, Instant::now(), out) {
        return false;
    }
    store.metrics.hit();
    true
}

/// Sends a read of one key and `PTTL` of it, and stores the reply when it
/// arrives unless the key changed meanwhile. Falls back to the plain route
/// when no tracking connection covers the node yet.
async fn fill(
    router: &Arc<Router>,
    request: Request,
    command: &'static str,
    max_ttl: Duration,
    ctx: SessionCtx,
    part: Part,
) -> Pending {
    let cache = &router.cache;
    let store = cache.store.as_ref().expect("the near cache is enabled");
    let key = request.args[1].clone();
    let Some((addr, role, slot)) = router.read_target(&key, ctx) else {
        return router.route(request, command, ctx).await;
    };
    let tracker = cache.trackers.get(&addr, Scope::Prefixes);
    let Some(stamp) = store.stamp(&key, slot, &tracker) else {
        store.metrics.skipped(Skip::Untracked);
        return router.route(request, command, ctx).await;
    };

    let pttl = encode_command(&[&b"PTTL"[..], &key[..]]);
    let mut batch = BytesMut::with_capacity(request.raw.len() + pttl.len());
    batch.extend_from_slice(&request.raw);
    batch.extend_from_slice(&pttl);
    let sent_at = Instant::now();
    let mut receivers = match router.send_batch(&addr, &batch, 2, ctx).await {
        Ok(receivers) => receivers,
        Err(err) if err.nothing_sent() => return router.route(request, command, ctx).await,
        Err(err) => return Pending::Ready(router.upstream_failure(&err, role)),
    };
    let ttl_receiver = receivers.pop().expect("two receivers");
    let value_receiver = receivers.pop().expect("two receivers");

    let router = router.clone();
    Pending::Future(Box::pin(async move {
        let sent = Sent {
            addr,
            role,
            slot,
            request,
            ctx,
            sent_at,
        };
        let (reply, request) = match read_reply(&router, value_receiver, sent).await {
            Ok(read) => read,
            Err(reply) => return reply,
        };
        if !commands::is_error(&reply) {
            let pttl = match ttl_receiver.await {
                Ok(Ok(ttl)) => commands::parse_pttl(&ttl),
                _ => None,
            };
            let shape = Shape {
                db: ctx.db,
                protocol: ctx.protocol,
                command,
                args: &request.args[2..],
            };
            let fetched = Fetched {
                reply: &reply,
                part,
                pttl,
                sent_at,
                max_ttl,
            };
            store_fetched(&router, &key, &stamp, &shape, fetched);
        }
        reply
    }))
}

/// A read sent by [`fill`] or [`fill_mget`].
struct Sent {
    addr: String,
    role: Role,
    slot: u16,
    request: Request,
    ctx: SessionCtx,
    sent_at: Instant,
}

/// Waits for the reply to `sent` and returns it with the request. Returns
/// `Err` with the client's reply when it must not be stored, because a
/// cluster redirect was followed or the upstream failed.
async fn read_reply(
    router: &Arc<Router>,
    receiver: ReplyReceiver,
    sent: Sent,
) -> Result<(Bytes, Request), Bytes> {
    let closed = || {
        let addr = sent.addr.clone();
        Err(UpstreamError::Closed { addr })
    };
    let result = receiver.await.unwrap_or_else(|_| closed());
    if router.is_cluster() && cluster::needs_retry(&result) {
        let retry = Retry {
            request: sent.request,
            slot: Some(sent.slot),
            readonly: true,
            ctx: sent.ctx,
        };
        return Err(cluster::follow(router.clone(), retry, sent.addr, result, None).await);
    }
    let reply = match result {
        Ok(reply) => reply,
        Err(err) => return Err(router.upstream_failure(&err, sent.role)),
    };
    router.record_command(sent.role, &reply, sent.sent_at);
    Ok((reply, sent.request))
}

/// A reply read by [`fill`] and what decides how long it may be cached.
struct Fetched<'a> {
    reply: &'a Bytes,
    part: Part,
    pttl: Option<i64>,
    sent_at: Instant,
    max_ttl: Duration,
}

fn store_fetched(
    router: &Router,
    key: &[u8],
    stamp: &Stamp,
    shape: &Shape<'_>,
    fetched: Fetched<'_>,
) {
    let store = router
        .cache
        .store
        .as_ref()
        .expect("the near cache is enabled");
    let Some(value) = fetched.part.of(fetched.reply) else {
        return;
    };
    let stored = deadline(&value, fetched.pttl, fetched.sent_at, fetched.max_ttl)
        .and_then(|deadline| store.insert(key, stamp, shape, &value, deadline));
    if let Err(skip) = stored {
        store.metrics.skipped(skip);
    }
}

/// Returns when a reply must stop being served: at `max_ttl` after the
/// read was sent, or earlier when the key expires. The key's remaining
/// time is counted from when the read was sent, which is no later than
/// when Redis measured it.
fn deadline(
    value: &[u8],
    pttl: Option<i64>,
    sent_at: Instant,
    max_ttl: Duration,
) -> Result<Instant, Skip> {
    let cap = sent_at + max_ttl;
    match pttl {
        Some(-1) => Ok(cap),
        // No key: only a reply that reports nothing found may be cached,
        // not a value read just before the key expired or was deleted.
        Some(-2) if commands::is_absent_reply(value) => Ok(cap),
        Some(millis) if millis > 0 => Ok(cap.min(sent_at + Duration::from_millis(millis as u64))),
        _ => Err(Skip::Expiring),
    }
}

/// Serves MGET or EXISTS key by key: hits from the store, then the
/// other keys read from Redis, then the reply in key order. MGET misses
/// that go to the same node and slot are read with one MGET, EXISTS
/// misses with one-key reads sent together.
async fn read_per_key(
    router: &Arc<Router>,
    request: Request,
    name: &str,
    kind: PerKey,
    ctx: SessionCtx,
) -> Pending {
    let cache = &router.cache;
    let keys = &request.args[1..];
    if keys.iter().all(|key| cache.max_ttl(key).is_none()) {
        return router.route(request, name, ctx).await;
    }
    let store = cache.store.as_ref().expect("the near cache is enabled");
    let command = kind.name();
    let part = match kind {
        PerKey::Mget => Part::MgetElement,
        PerKey::Exists => Part::Whole,
    };
    let shape = Shape {
        db: ctx.db,
        protocol: ctx.protocol,
        command,
        args: &[],
    };
    let now = Instant::now();
    let mut parts: Vec<KeyPart> = Vec::with_capacity(keys.len());
    let mut misses: Vec<Miss> = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let cached = cache
            .max_ttl(key)
            .map(|max_ttl| (max_ttl, store.get(key, &shape, now)));
        let one = || Request::from_args(vec![request.args[0].clone(), key.clone()]);
        let pending = match cached {
            Some((_, Some(hit))) => {
                store.metrics.hit();
                parts.push(KeyPart::Cached(hit));
                continue;
            }
            Some((max_ttl, None)) => {
                store.metrics.misses.increment(1);
                let target = match kind {
                    PerKey::Mget => router.read_target(key, ctx),
                    PerKey::Exists => None,
                };
                if let Some(target) = target {
                    parts.push(KeyPart::Missed);
                    misses.push(Miss {
                        index,
                        key: key.clone(),
                        max_ttl,
                        target,
                    });
                    continue;
                }
                fill(router, one(), command, max_ttl, ctx, part).await
            }
            None => router.route(one(), command, ctx).await,
        };
        parts.push(KeyPart::Whole(pending));
    }
    let mut groups = Vec::new();
    for group in group_by_target(misses) {
        if let [miss] = &group[..] {
            let one = Request::from_args(vec![request.args[0].clone(), miss.key.clone()]);
            let pending = fill(router, one, command, miss.max_ttl, ctx, part).await;
            parts[miss.index] = KeyPart::Whole(pending);
            continue;
        }
        for (position, miss) in group.iter().enumerate() {
            parts[miss.index] = KeyPart::Grouped(groups.len(), position);
        }
        groups.push(fill_mget(router, group, ctx).await);
    }
    if groups.is_empty() && parts.iter().all(|part| matches!(part, KeyPart::Cached(_))) {
        let ready: Vec<Bytes> = parts
            .into_iter()
            .filter_map(|part| match part {
                KeyPart::Cached(value) => Some(value),
                _ => None,
            })
            .collect();
        return Pending::Ready(commands::assemble(kind, &ready));
    }
    let router = router.clone();
    Pending::Future(Box::pin(async move {
        let mut elements = Vec::with_capacity(groups.len());
        for group in groups {
            let reply = group.resolve(&router).await;
            if commands::is_error(&reply) {
                return reply;
            }
            match commands::array_elements(&reply, ctx.protocol) {
                Some(values) => elements.push(values),
                None => return reply::error("ERR invalid MGET reply from upstream"),
            }
        }
        let mut ready = Vec::with_capacity(parts.len());
        for key_part in parts {
            let reply = match key_part {
                KeyPart::Cached(value) => {
                    ready.push(value);
                    continue;
                }
                KeyPart::Grouped(group, position) => {
                    match elements[group].get(position) {
                        Some(value) => ready.push(value.clone()),
                        None => return reply::error("ERR invalid MGET reply from upstream"),
                    }
                    continue;
                }
                KeyPart::Whole(pending) => pending.resolve(&router).await,
                // Not reached: every miss was given a read above.
                KeyPart::Missed => return reply::error("ERR MGET key was not read"),
            };
            if commands::is_error(&reply) {
                return reply;
            }
            match part.of(&reply) {
                Some(value) => ready.push(value),
                None => return reply::error("ERR invalid MGET reply from upstream"),
            }
        }
        commands::assemble(kind, &ready)
    }))
}

/// The source of one key's part of a multi-key read's reply.
enum KeyPart {
    /// The cached part itself.
    Cached(Bytes),
    /// The pending whole reply of a one-key read.
    Whole(Pending),
    /// Element `.1` of the reply of grouped read `.0`.
    Grouped(usize, usize),
    /// A miss not yet given its read.
    Missed,
}

/// A cache miss of an MGET, with the node and slot it is read from.
struct Miss {
    index: usize,
    key: Bytes,
    max_ttl: Duration,
    target: (String, Role, u16),
}

/// Splits misses into groups that share a node and slot, in key order.
fn group_by_target(misses: Vec<Miss>) -> Vec<Vec<Miss>> {
    let mut groups: Vec<Vec<Miss>> = Vec::new();
    for miss in misses {
        let same = |group: &&mut Vec<Miss>| {
            let (addr, _, slot) = &group[0].target;
            *addr == miss.target.0 && *slot == miss.target.2
        };
        match groups.iter_mut().find(same) {
            Some(group) => group.push(miss),
            None => groups.push(vec![miss]),
        }
    }
    groups
}

/// Reads the keys of `group` with one MGET followed by `PTTL` of each key,
/// in one write, and stores each value unless its key changed meanwhile.
/// Returns the pending MGET reply.
async fn fill_mget(router: &Arc<Router>, group: Vec<Miss>, ctx: SessionCtx) -> Pending {
    let cache = &router.cache;
    let store = cache.store.as_ref().expect("the near cache is enabled");
    let (addr, role, slot) = group[0].target.clone();
    let mut args = vec![Bytes::from_static(b"MGET")];
    args.extend(group.iter().map(|miss| miss.key.clone()));
    let request = Request::from_args(args);
    let tracker = cache.trackers.get(&addr, Scope::Prefixes);
    // Taken before the write, so an invalidation that arrives while the
    // read is in flight keeps its reply out of the store.
    let stamps: Vec<Option<Stamp>> = group
        .iter()
        .map(|miss| store.stamp(&miss.key, slot, &tracker))
        .collect();
    let mut batch = BytesMut::from(&request.raw[..]);
    for miss in &group {
        batch.extend_from_slice(&encode_command(&[&b"PTTL"[..], &miss.key[..]]));
    }
    let sent_at = Instant::now();
    let count = group.len() + 1;
    let mut receivers = match router.send_batch(&addr, &batch, count, ctx).await {
        Ok(receivers) => receivers.into_iter(),
        Err(err) if err.nothing_sent() => return router.route(request, "MGET", ctx).await,
        Err(err) => return Pending::Ready(router.upstream_failure(&err, role)),
    };
    let value_receiver = receivers.next().expect("one receiver per request");
    let ttl_receivers: Vec<_> = receivers.collect();

    let router = router.clone();
    Pending::Future(Box::pin(async move {
        let sent = Sent {
            addr,
            role,
            slot,
            request,
            ctx,
            sent_at,
        };
        let (reply, _) = match read_reply(&router, value_receiver, sent).await {
            Ok(read) => read,
            Err(reply) => return reply,
        };
        let values = match commands::array_elements(&reply, ctx.protocol) {
            Some(values) if values.len() == group.len() => values,
            _ => return reply,
        };
        let shape = Shape {
            db: ctx.db,
            protocol: ctx.protocol,
            command: "MGET",
            args: &[],
        };
        let store = router
            .cache
            .store
            .as_ref()
            .expect("the near cache is enabled");
        let parts = group
            .iter()
            .zip(stamps)
            .zip(values.iter())
            .zip(ttl_receivers);
        for (((miss, stamp), value), ttl_receiver) in parts {
            let Some(stamp) = stamp else {
                store.metrics.skipped(Skip::Untracked);
                continue;
            };
            let pttl = match ttl_receiver.await {
                Ok(Ok(ttl)) => commands::parse_pttl(&ttl),
                _ => None,
            };
            let fetched = Fetched {
                reply: value,
                part: Part::Whole,
                pttl,
                sent_at,
                max_ttl: miss.max_ttl,
            };
            store_fetched(&router, &miss.key, &stamp, &shape, fetched);
        }
        reply
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_follows_key_ttl_and_max_ttl() {
        let now = Instant::now();
        let max = Duration::from_secs(60);
        assert_eq!(deadline(b"$1\r\nv\r\n", Some(-1), now, max), Ok(now + max));
        let short = deadline(b"$1\r\nv\r\n", Some(1500), now, max).unwrap();
        assert_eq!(short, now + Duration::from_millis(1500));
        assert_eq!(deadline(b"$-1\r\n", Some(-2), now, max), Ok(now + max));
        assert_eq!(
            deadline(b"$1\r\nv\r\n", Some(-2), now, max),
            Err(Skip::Expiring)
        );
        assert_eq!(
            deadline(b"$1\r\nv\r\n", None, now, max),
            Err(Skip::Expiring)
        );
    }
}
