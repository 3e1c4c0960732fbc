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
use crate::redis::router::{Pending, Router, SessionCtx};
use crate::redis::upstream::UpstreamError;

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
    let mut receivers = match router.send_batch(&addr, batch.freeze(), 2, ctx).await {
        Ok(receivers) => receivers,
        Err(err) if err.nothing_sent() => return router.route(request, command, ctx).await,
        Err(err) => return Pending::Ready(router.upstream_failure(&err, role)),
    };
    let ttl_receiver = receivers.pop().expect("two receivers");
    let value_receiver = receivers.pop().expect("two receivers");

    let router = router.clone();
    Pending::Future(Box::pin(async move {
        let closed = || Err(UpstreamError::Closed { addr: addr.clone() });
        let result = value_receiver.await.unwrap_or_else(|_| closed());
        if router.is_cluster() && cluster::needs_retry(&result) {
            let retry = Retry {
                request,
                slot: Some(slot),
                readonly: true,
                ctx,
            };
            return cluster::follow(router, retry, addr, result).await;
        }
        let reply = match result {
            Ok(reply) => reply,
            Err(err) => return router.upstream_failure(&err, role),
        };
        router.record_command(role, &reply, sent_at);
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

/// Answers MGET or EXISTS key by key: hits from the store, the other keys
/// with one-key reads sent together, then the reply in key order.
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
    // Each part is the cached part itself (true), or the pending whole
    // reply of a one-key read (false).
    let mut parts: Vec<(Pending, bool)> = Vec::with_capacity(keys.len());
    for key in keys {
        let cached = cache
            .max_ttl(key)
            .map(|max_ttl| (max_ttl, store.get(key, &shape, now)));
        let one = || Request::from_args(vec![request.args[0].clone(), key.clone()]);
        let pending = match cached {
            Some((_, Some(hit))) => {
                store.metrics.hit();
                parts.push((Pending::Ready(hit), true));
                continue;
            }
            Some((max_ttl, None)) => {
                store.metrics.misses.increment(1);
                fill(router, one(), command, max_ttl, ctx, part).await
            }
            None => router.route(one(), command, ctx).await,
        };
        parts.push((pending, false));
    }
    if parts.iter().all(|(_, is_part)| *is_part) {
        let ready: Vec<Bytes> = parts
            .into_iter()
            .filter_map(|(pending, _)| match pending {
                Pending::Ready(part) => Some(part),
                _ => None,
            })
            .collect();
        return Pending::Ready(commands::assemble(kind, &ready));
    }
    let router = router.clone();
    Pending::Future(Box::pin(async move {
        let mut ready = Vec::with_capacity(parts.len());
        for (pending, is_part) in parts {
            let reply = pending.resolve(&router).await;
            if is_part {
                ready.push(reply);
                continue;
            }
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
