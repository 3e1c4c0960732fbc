//! Subscriptions: SUBSCRIBE, PSUBSCRIBE and SSUBSCRIBE move the client onto
//! dedicated upstream connections, one per route whose channels it
//! subscribes to, and every frame on them (replies, messages, pushes) is
//! relayed to the client until no subscription is left.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::select_all;

use super::command::{pinning, Pinning};
use super::frame::{encode_command, Protocol, ReplyKind, Request, Value};
use super::pool::{ConnKey, Dedicated};
use super::reply;
use super::router::Router;
use super::routes::{RouteId, MAIN};
use super::session::{Flow, Session};
use super::upstream::UpstreamError;

/// Argument of the PING that skiff sends on a subscribed connection whose
/// subscriptions reached zero: every frame before its reply belongs to a
/// request sent earlier, so once the reply arrives the connection's count
/// is final.
const SYNC_TOKEN: &[u8] = b"skiff-unsubscribe-sync";

/// One dedicated upstream connection that carries the client's
/// subscriptions on one route.
struct Subscribed {
    route: RouteId,
    /// Kept because a RESP3 client's commands while subscribed may go
    /// through other routes and change the session's router.
    router: Arc<Router>,
    dedicated: Dedicated,
    /// Channels and patterns subscribed on this connection, from its latest
    /// confirmation of that kind.
    count: i64,
    /// Shard channels subscribed on this connection. Redis counts them
    /// apart: `UNSUBSCRIBE` confirms 0 while shard channels remain.
    shard_count: i64,
}

impl Subscribed {
    /// Returns the address of the node the connection is to.
    fn node(&self) -> &str {
        &self.dedicated.conn.addr
    }

    /// True while the connection carries any subscription.
    fn is_subscribed(&self) -> bool {
        self.count != 0 || self.shard_count != 0
    }

    /// Returns the subscriptions of one kind: shard channels when `shard`,
    /// else channels and patterns.
    fn count_of(&self, shard: bool) -> i64 {
        if shard {
            self.shard_count
        } else {
            self.count
        }
    }
}

/// Something that happened while the client is subscribed.
enum Event {
    /// A frame, or a failure, on the connection at this index.
    Upstream(usize, Result<Bytes, UpstreamError>),
    Client(Option<Request>),
}

/// Outcome of a subscription relay.
enum RelayEnd {
    /// The last subscription ended: the connections are back in the pool.
    Unsubscribed,
    /// The session goes on, but the connections must not be reused.
    Abandoned,
    /// The session ends.
    Close,
}

impl Session {
    /// Moves the client onto a dedicated connection for a subscription and
    /// relays until the last subscription ends, the client leaves or an
    /// upstream connection fails.
    pub(super) async fn run_subscribed(&mut self, request: Request, name: &str) -> Flow {
        if self.drain().await == Flow::Close {
            return Flow::Close;
        }
        let mut groups = match self.split_by_route(&request, name) {
            Ok(groups) => groups.into_iter(),
            Err(error) => return self.reply(error).await,
        };
        let (route, first_request) = groups.next().expect("a request has one route at least");
        self.use_route(route);
        let (subscribed, first) = match self.open_subscription(&first_request, name).await {
            Ok(opened) => opened,
            Err(error) => return self.reply(error).await,
        };
        let mut subscriptions = vec![subscribed];
        if let Err(end) = self.relay_frame(&mut subscriptions, 0, first).await {
            return self.end_relay(subscriptions, end);
        }
        for (route, group) in groups {
            if let Err(end) = self
                .subscribe_on(&mut subscriptions, route, &group, name, true)
                .await
            {
                return self.end_relay(subscriptions, end);
            }
        }
        if subscriptions.is_empty() {
            return Flow::Continue;
        }
        let end = self.relay(&mut subscriptions).await;
        self.end_relay(subscriptions, end)
    }

    /// Splits a `SUBSCRIBE` or `PSUBSCRIBE` into one request per route of
    /// its channels, in the order of each route's first channel. The
    /// channels of a route keep their order. Other requests stay whole, and
    /// one whose keys span routes gives the routes' error.
    fn split_by_route(
        &self,
        request: &Request,
        name: &str,
    ) -> Result<Vec<(RouteId, Request)>, Bytes> {
        if self.routes.is_empty() {
            return Ok(vec![(self.route, request.clone())]);
        }
        if !matches!(name, "SUBSCRIBE" | "PSUBSCRIBE") || request.args.len() < 3 {
            return Ok(vec![(self.pick_route(request, name)?, request.clone())]);
        }
        let groups = self.channels_by_route(request, name);
        if let [(route, _)] = groups.as_slice() {
            return Ok(vec![(*route, request.clone())]);
        }
        Ok(groups
            .into_iter()
            .map(|(route, channels)| {
                let mut args = vec![request.args[0].clone()];
                args.extend(channels);
                (route, Request::from_args(args))
            })
            .collect())
    }

    /// Groups the channels (or patterns) of a subscription command by
    /// route, in the order of each route's first channel, keeping their
    /// order within a route.
    fn channels_by_route(&self, request: &Request, name: &str) -> Vec<(RouteId, Vec<Bytes>)> {
        let mut groups: Vec<(RouteId, Vec<Bytes>)> = Vec::new();
        for channel in &request.args[1..] {
            let single = Request::from_args(vec![request.args[0].clone(), channel.clone()]);
            // One channel always has one route.
            let route = self.pick_route(&single, name).unwrap_or(MAIN);
            match groups.iter_mut().find(|(id, _)| *id == route) {
                Some((_, channels)) => channels.push(channel.clone()),
                None => groups.push((route, vec![channel.clone()])),
            }
        }
        groups
    }

    fn end_relay(&self, subscriptions: Vec<Subscribed>, end: RelayEnd) -> Flow {
        match end {
            RelayEnd::Unsubscribed => Flow::Continue,
            // Dropping the connections closes them, which ends their
            // subscriptions upstream.
            RelayEnd::Abandoned => {
                drop(subscriptions);
                Flow::Continue
            }
            RelayEnd::Close => Flow::Close,
        }
    }

    /// Opens a dedicated connection on the session's current route, sends
    /// `request` on it and returns it with the first reply. An error
    /// instead of a confirmation (such as a missing channel) leaves the
    /// connection unsubscribed, so it goes back to the pool and the error
    /// is returned.
    async fn open_subscription(
        &mut self,
        request: &Request,
        name: &str,
    ) -> Result<(Subscribed, Bytes), Bytes> {
        let upstream_error = |err: UpstreamError| reply::error(&format!("ERR {err}"));
        let addr = self.pinned_target(request, name)?;
        let key = ConnKey {
            addr,
            protocol: self.ctx.protocol,
            db: self.ctx.db,
        };
        let router = self.router.clone();
        let mut dedicated = router.pool.checkout(&key).await.map_err(upstream_error)?;
        dedicated
            .conn
            .send(&request.raw)
            .await
            .map_err(upstream_error)?;
        let (frame, kind) = dedicated.conn.read_frame().await.map_err(upstream_error)?;
        if kind == ReplyKind::Error {
            router.pool.checkin(dedicated);
            return Err(frame);
        }
        let subscribed = Subscribed {
            route: self.route,
            router,
            dedicated,
            count: 0,
            shard_count: 0,
        };
        Ok((subscribed, frame))
    }

    async fn relay(&mut self, subscriptions: &mut Vec<Subscribed>) -> RelayEnd {
        loop {
            let reads = subscriptions.iter_mut().enumerate().map(|(index, sub)| {
                Box::pin(async move { (index, sub.dedicated.conn.read_frame().await) })
            });
            let event = tokio::select! {
                ((index, frame), _, _) = select_all(reads) => {
                    Event::Upstream(index, frame.map(|(frame, _)| frame))
                }
                request = self.reader.next() => Event::Client(request.ok().flatten()),
                _ = self.shutdown.cancelled() => return RelayEnd::Close,
            };
            let result = match event {
                Event::Upstream(index, Ok(frame)) => {
                    self.relay_frame(subscriptions, index, frame).await
                }
                Event::Upstream(_, Err(err)) => {
                    tracing::debug!(client.addr = %self.peer, error = %err,
                        "subscribed upstream connection failed");
                    // Closing the client connection is how a Redis client
                    // learns that its subscriptions are gone.
                    return RelayEnd::Close;
                }
                Event::Client(None) => return RelayEnd::Close,
                Event::Client(Some(request)) => self.relay_request(subscriptions, request).await,
            };
            if let Err(end) = result {
                return end;
            }
            if subscriptions.is_empty() {
                return RelayEnd::Unsubscribed;
            }
        }
    }

    /// Relays one frame of connection `index` to the client. A connection
    /// whose count of subscriptions reaches zero is released when no
    /// further confirmation follows.
    async fn relay_frame(
        &mut self,
        subscriptions: &mut Vec<Subscribed>,
        index: usize,
        frame: Bytes,
    ) -> Result<(), RelayEnd> {
        let (frame, counted) = self.count_subscriptions(subscriptions, index, frame);
        self.relay_to_client(frame).await?;
        if counted && !subscriptions[index].is_subscribed() {
            self.release_if_unsubscribed(subscriptions, index).await?;
        }
        Ok(())
    }

    /// Records the count of a confirmation frame on connection `index`, and
    /// returns the frame with the count replaced by the client's total of
    /// that kind over all its connections, and whether it was a
    /// confirmation.
    fn count_subscriptions(
        &self,
        subscriptions: &mut [Subscribed],
        index: usize,
        frame: Bytes,
    ) -> (Bytes, bool) {
        let Some((shard, count)) = confirmation_count(&frame, self.ctx.protocol) else {
            return (frame, false);
        };
        if shard {
            subscriptions[index].shard_count = count;
        } else {
            subscriptions[index].count = count;
        }
        if subscriptions.len() == 1 {
            return (frame, true);
        }
        let total = subscriptions.iter().map(|sub| sub.count_of(shard)).sum();
        (with_count(&frame, total), true)
    }

    async fn relay_to_client(&self, frame: Bytes) -> Result<(), RelayEnd> {
        match self.reply(frame).await {
            Flow::Continue => Ok(()),
            Flow::Close => Err(RelayEnd::Close),
        }
    }

    /// Sends a PING on connection `index` and relays what arrives before
    /// its reply, since a pipelined SUBSCRIBE may add subscriptions again.
    /// If the count is still zero after the reply, the connection has no
    /// subscription and no reply pending, so it goes back to the pool.
    async fn release_if_unsubscribed(
        &mut self,
        subscriptions: &mut Vec<Subscribed>,
        index: usize,
    ) -> Result<(), RelayEnd> {
        let peer = self.peer;
        let failed = move |err: UpstreamError| {
            tracing::debug!(client.addr = %peer, error = %err,
                "subscribed upstream connection failed");
            RelayEnd::Close
        };
        let ping = encode_command(&[&b"PING"[..], SYNC_TOKEN]);
        let conn = &mut subscriptions[index].dedicated.conn;
        conn.send(&ping).await.map_err(failed)?;
        loop {
            let conn = &mut subscriptions[index].dedicated.conn;
            let (frame, _) = conn.read_frame().await.map_err(failed)?;
            if is_sync_reply(&frame, self.ctx.protocol) {
                break;
            }
            let (frame, _) = self.count_subscriptions(subscriptions, index, frame);
            self.relay_to_client(frame).await?;
        }
        if !subscriptions[index].is_subscribed() {
            let released = subscriptions.remove(index);
            released.router.pool.checkin(released.dedicated);
        }
        Ok(())
    }

    /// Handles a client request while subscribed. QUIT and RESET end the
    /// relay. Subscription commands go to the connection of their
    /// channels' route, which is opened at the first one.
    async fn relay_request(
        &mut self,
        subscriptions: &mut Vec<Subscribed>,
        request: Request,
    ) -> Result<(), RelayEnd> {
        let name = request.name();
        match name.as_str() {
            "QUIT" => {
                self.reply(reply::ok()).await;
                Err(RelayEnd::Close)
            }
            "RESET" => {
                let reply = self.reset();
                self.reply(reply).await;
                Err(RelayEnd::Abandoned)
            }
            "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" => {
                self.subscribe_more(subscriptions, request, &name).await
            }
            "UNSUBSCRIBE" | "PUNSUBSCRIBE" | "SUNSUBSCRIBE" => {
                self.unsubscribe_some(subscriptions, request, &name).await
            }
            _ if self.routes_while_subscribed(&name, &request) => {
                // Boxed because handling a request can lead back here.
                match Box::pin(self.handle(request)).await {
                    Flow::Continue => Ok(()),
                    Flow::Close => Err(RelayEnd::Close),
                }
            }
            // PING, and commands that Redis rejects in this state with its
            // own error.
            _ => send_on(&mut subscriptions[0], &request.raw).await,
        }
    }

    /// Subscribes on the connection of the route of the request's
    /// channels, opening it when the client has none there yet.
    async fn subscribe_more(
        &mut self,
        subscriptions: &mut Vec<Subscribed>,
        request: Request,
        name: &str,
    ) -> Result<(), RelayEnd> {
        let groups = match self.split_by_route(&request, name) {
            Ok(groups) => groups,
            Err(error) => return self.relay_to_client(error).await,
        };
        let split = groups.len() > 1;
        for (route, group) in groups {
            self.subscribe_on(subscriptions, route, &group, name, split)
                .await?;
        }
        Ok(())
    }

    /// Sends `request` on the client's subscribed connection to `route`,
    /// opening that connection when the client has none there yet. When
    /// the request is one part of a request split across routes (`split`),
    /// a route that cannot be opened closes the client after the error.
    /// Other parts may have subscribed, and a client left half subscribed
    /// would wait for messages that never come, where one that reconnects
    /// subscribes again to all of its channels.
    async fn subscribe_on(
        &mut self,
        subscriptions: &mut Vec<Subscribed>,
        route: RouteId,
        request: &Request,
        name: &str,
        split: bool,
    ) -> Result<(), RelayEnd> {
        self.use_route(route);
        let node = match self.shard_channel_node(request, name) {
            Ok(node) => node,
            Err(error) => return self.relay_to_client(error).await,
        };
        if let Some(sub) = find_subscription(subscriptions, route, node.as_deref()) {
            return send_on(sub, &request.raw).await;
        }
        match self.open_subscription(request, name).await {
            Ok((subscribed, first)) => {
                subscriptions.push(subscribed);
                let index = subscriptions.len() - 1;
                self.relay_frame(subscriptions, index, first).await
            }
            Err(error) => {
                self.relay_to_client(error).await?;
                if split {
                    tracing::debug!(client.addr = %self.peer,
                        "closing a client whose subscription across routes failed on one");
                    return Err(RelayEnd::Close);
                }
                Ok(())
            }
        }
    }

    /// Unsubscribes each channel on the connection of its route. Without
    /// channels, every connection unsubscribes from all of its own.
    ///
    /// NOTE: without channels, each connection confirms on its own, so a
    /// client subscribed through two routes may get a confirmation with a
    /// null channel from a route where it had none of that kind, which a
    /// single Redis server would not send.
    async fn unsubscribe_some(
        &mut self,
        subscriptions: &mut [Subscribed],
        request: Request,
        name: &str,
    ) -> Result<(), RelayEnd> {
        if request.args.len() == 1 {
            for sub in subscriptions.iter_mut() {
                send_on(sub, &request.raw).await?;
            }
            return Ok(());
        }
        let groups = self.channels_by_route(&request, name);
        let shard = name == "SUNSUBSCRIBE";
        let total: i64 = subscriptions.iter().map(|sub| sub.count_of(shard)).sum();
        for (route, channels) in groups {
            self.use_route(route);
            let mut args = vec![request.args[0].clone()];
            args.extend(channels.iter().cloned());
            let part = Request::from_args(args);
            let node = match self.shard_channel_node(&part, name) {
                Ok(node) => node,
                Err(error) => {
                    self.relay_to_client(error).await?;
                    continue;
                }
            };
            let Some(sub) = find_subscription(subscriptions, route, node.as_deref()) else {
                // Not subscribed there: confirmed with the unchanged total,
                // as Redis confirms a channel the client never subscribed.
                let kind = name.to_ascii_lowercase();
                for channel in &channels {
                    let confirmation = unsubscribe_confirmation(
                        kind.as_bytes(),
                        Some(channel),
                        total,
                        self.ctx.protocol,
                    );
                    self.relay_to_client(confirmation).await?;
                }
                continue;
            };
            send_on(sub, &part.raw).await?;
        }
        Ok(())
    }

    /// Returns the node that serves the shard channels of an `SSUBSCRIBE`
    /// or `SUNSUBSCRIBE` in cluster mode, `None` for other commands and
    /// modes. A client's shard channels on different nodes each need a
    /// connection to their node, where other subscriptions of a route
    /// share one.
    fn shard_channel_node(&self, request: &Request, name: &str) -> Result<Option<String>, Bytes> {
        let shard = matches!(name, "SSUBSCRIBE" | "SUNSUBSCRIBE");
        if !shard || self.router.cluster.is_none() {
            return Ok(None);
        }
        self.pinned_target(request, name).map(Some)
    }

    /// True for a RESP3 client's ordinary command. It is handled like any
    /// other command, locally or routed, rather than sent on a subscribed
    /// connection, so it reaches the node that serves its key. RESP2
    /// clients may send only subscription commands and PING here, and the
    /// upstream rejects others with Redis's own error.
    fn routes_while_subscribed(&self, name: &str, request: &Request) -> bool {
        let subscription_command = matches!(
            name,
            "SUBSCRIBE"
                | "PSUBSCRIBE"
                | "SSUBSCRIBE"
                | "UNSUBSCRIBE"
                | "PUNSUBSCRIBE"
                | "SUNSUBSCRIBE"
                | "PING"
        );
        self.ctx.protocol == Protocol::Resp3
            && !subscription_command
            && pinning(name, request) == Pinning::None
    }
}

/// Returns the client's subscribed connection on `route`, to `node` when
/// given (shard channels in cluster mode).
fn find_subscription<'a>(
    subscriptions: &'a mut [Subscribed],
    route: RouteId,
    node: Option<&str>,
) -> Option<&'a mut Subscribed> {
    subscriptions
        .iter_mut()
        .find(|sub| sub.route == route && node.is_none_or(|addr| sub.node() == addr))
}

async fn send_on(sub: &mut Subscribed, raw: &[u8]) -> Result<(), RelayEnd> {
    sub.dedicated
        .conn
        .send(raw)
        .await
        .map_err(|_| RelayEnd::Close)
}

/// Returns the count of a subscribe or unsubscribe confirmation, `None` for
/// any other frame.
fn confirmation_count(frame: &Bytes, protocol: Protocol) -> Option<(bool, i64)> {
    let items = Value::decode(frame, protocol).and_then(Value::into_items)?;
    let kind = items.first()?.as_bytes()?.to_ascii_lowercase();
    let shard = match &kind[..] {
        b"subscribe" | b"psubscribe" | b"unsubscribe" | b"punsubscribe" => false,
        b"ssubscribe" | b"sunsubscribe" => true,
        _ => return None,
    };
    if items.len() != 3 {
        return None;
    }
    match items.get(2)? {
        Value::Int(count) => Some((shard, *count)),
        _ => None,
    }
}

/// Returns a confirmation frame with its count, the last element, replaced.
fn with_count(frame: &Bytes, count: i64) -> Bytes {
    let Some(colon) = frame.iter().rposition(|&byte| byte == b':') else {
        return frame.clone();
    };
    let mut out = BytesMut::with_capacity(colon + 24);
    out.extend_from_slice(&frame[..colon]);
    out.extend_from_slice(&reply::integer(count));
    out.freeze()
}

/// True for the reply to skiff's sync PING: a bulk string while
/// unsubscribed or in RESP3, `pong` and the argument while subscribed in
/// RESP2.
fn is_sync_reply(frame: &Bytes, protocol: Protocol) -> bool {
    match Value::decode(frame, protocol) {
        Some(Value::Str(data)) => &data[..] == SYNC_TOKEN,
        Some(value) => value.into_items().is_some_and(|items| {
            items.len() == 2
                && items[1]
                    .as_bytes()
                    .is_some_and(|data| &data[..] == SYNC_TOKEN)
        }),
        None => false,
    }
}

/// Encodes an unsubscribe confirmation of `kind` (`unsubscribe`,
/// `punsubscribe` or `sunsubscribe`) for `channel`, null when the client
/// had none, with `count` subscriptions left.
pub(super) fn unsubscribe_confirmation(
    kind: &[u8],
    channel: Option<&Bytes>,
    count: i64,
    protocol: Protocol,
) -> Bytes {
    let mut out = BytesMut::new();
    match protocol {
        Protocol::Resp2 => reply::put_array_header(&mut out, 3),
        Protocol::Resp3 => out.extend_from_slice(b">3\r\n"),
    }
    out.extend_from_slice(&reply::bulk(kind));
    match channel {
        Some(channel) => out.extend_from_slice(&reply::bulk(channel)),
        None => out.extend_from_slice(&reply::null(protocol)),
    }
    out.extend_from_slice(&reply::integer(count));
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_counts_are_read() {
        let last = Bytes::from_static(b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n");
        assert_eq!(confirmation_count(&last, Protocol::Resp2), Some((false, 0)));
        let more = Bytes::from_static(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:2\r\n");
        assert_eq!(confirmation_count(&more, Protocol::Resp2), Some((false, 2)));
        let shard = Bytes::from_static(b"*3\r\n$10\r\nssubscribe\r\n$2\r\nch\r\n:1\r\n");
        assert_eq!(confirmation_count(&shard, Protocol::Resp2), Some((true, 1)));
        let push = Bytes::from_static(b">3\r\n$12\r\npunsubscribe\r\n$1\r\np\r\n:0\r\n");
        assert_eq!(confirmation_count(&push, Protocol::Resp3), Some((false, 0)));
        let message = Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\n0\r\n");
        assert_eq!(confirmation_count(&message, Protocol::Resp2), None);
    }

    #[test]
    fn count_is_replaced() {
        let frame = Bytes::from_static(b"*3\r\n$9\r\nsubscribe\r\n$4\r\na:b:\r\n:1\r\n");
        assert_eq!(
            &with_count(&frame, 12)[..],
            b"*3\r\n$9\r\nsubscribe\r\n$4\r\na:b:\r\n:12\r\n"
        );
    }

    #[test]
    fn sync_reply_is_recognised() {
        let subscribed =
            Bytes::from_static(b"*2\r\n$4\r\npong\r\n$22\r\nskiff-unsubscribe-sync\r\n");
        assert!(is_sync_reply(&subscribed, Protocol::Resp2));
        let plain = Bytes::from_static(b"$22\r\nskiff-unsubscribe-sync\r\n");
        assert!(is_sync_reply(&plain, Protocol::Resp2));
        assert!(is_sync_reply(&plain, Protocol::Resp3));
        let other = Bytes::from_static(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        assert!(!is_sync_reply(&other, Protocol::Resp2));
    }
}
