//! Subscriptions: SUBSCRIBE, PSUBSCRIBE and SSUBSCRIBE move the client onto a
//! dedicated upstream connection, and every frame on it (replies, messages,
//! pushes) is relayed to the client until no subscription is left.

use bytes::Bytes;

use super::command::{pinning, Pinning};
use super::frame::{Protocol, ReplyKind, Request, Value};
use super::pool::{ConnKey, Dedicated};
use super::reply;
use super::session::{Flow, Session};

/// Something that happened while the client is subscribed.
enum Event {
    Upstream(Result<Bytes, String>),
    Client(Option<Request>),
}

/// Outcome of a subscription relay.
enum RelayEnd {
    /// The last subscription ended: the connection is clean for reuse.
    Unsubscribed,
    /// The session goes on, but the connection must not be reused.
    Abandoned,
    /// The session ends.
    Close,
}

impl Session {
    /// Moves the client onto a dedicated connection for a subscription and
    /// relays until the last subscription ends, the client leaves or the
    /// upstream fails.
    pub(super) async fn run_subscribed(&mut self, request: Request, name: &str) -> Flow {
        if self.drain().await == Flow::Close {
            return Flow::Close;
        }
        let addr = match self.pinned_target(&request, name) {
            Ok(addr) => addr,
            Err(error) => return self.reply(error).await,
        };
        let key = ConnKey {
            addr,
            protocol: self.ctx.protocol,
            db: self.ctx.db,
        };
        // Kept because a RESP3 client's commands while subscribed may go
        // through other routes and change `self.router`.
        let router = self.router.clone();
        let mut dedicated = match router.pool.checkout(&key).await {
            Ok(dedicated) => dedicated,
            Err(err) => return self.reply(reply::error(&format!("ERR {err}"))).await,
        };
        if let Err(err) = dedicated.conn.send(&request.raw).await {
            return self.reply(reply::error(&format!("ERR {err}"))).await;
        }
        // An error instead of a confirmation (such as a missing channel)
        // leaves the connection unsubscribed: no relay starts.
        match dedicated.conn.read_frame().await {
            Ok((frame, ReplyKind::Error)) => {
                router.pool.checkin(dedicated);
                return self.reply(frame).await;
            }
            Ok((frame, _)) => {
                if self.reply(frame).await == Flow::Close {
                    return Flow::Close;
                }
            }
            Err(err) => return self.reply(reply::error(&format!("ERR {err}"))).await,
        }
        match self.relay(&mut dedicated).await {
            RelayEnd::Unsubscribed => {
                router.pool.checkin(dedicated);
                Flow::Continue
            }
            RelayEnd::Abandoned => Flow::Continue,
            RelayEnd::Close => Flow::Close,
        }
    }

    async fn relay(&mut self, dedicated: &mut Dedicated) -> RelayEnd {
        loop {
            let event = tokio::select! {
                frame = dedicated.conn.read_frame() => {
                    Event::Upstream(frame.map(|(frame, _)| frame).map_err(|err| err.to_string()))
                }
                request = self.reader.next() => Event::Client(request.ok().flatten()),
                _ = self.shutdown.cancelled() => return RelayEnd::Close,
            };
            match event {
                Event::Upstream(Ok(frame)) => {
                    let ended = ends_subscriptions(&frame, self.ctx.protocol);
                    if self.reply(frame).await == Flow::Close {
                        return RelayEnd::Close;
                    }
                    if ended {
                        return RelayEnd::Unsubscribed;
                    }
                }
                Event::Upstream(Err(reason)) => {
                    tracing::debug!(client.addr = %self.peer, error = %reason,
                        "subscribed upstream connection failed");
                    // Closing the client connection is how a Redis client
                    // learns that its subscriptions are gone.
                    return RelayEnd::Close;
                }
                Event::Client(None) => return RelayEnd::Close,
                Event::Client(Some(request)) => {
                    if let Some(end) = self.relay_request(dedicated, request).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Forwards a client request while subscribed; QUIT and RESET end the
    /// relay.
    async fn relay_request(
        &mut self,
        dedicated: &mut Dedicated,
        request: Request,
    ) -> Option<RelayEnd> {
        match request.name().as_str() {
            "QUIT" => {
                self.reply(reply::ok()).await;
                Some(RelayEnd::Close)
            }
            "RESET" => {
                let reply = self.reset();
                self.reply(reply).await;
                Some(RelayEnd::Abandoned)
            }
            name if self.routes_while_subscribed(name, &request) => {
                // Boxed because handling a request can lead back here.
                match Box::pin(self.handle(request)).await {
                    Flow::Continue => None,
                    Flow::Close => Some(RelayEnd::Close),
                }
            }
            // NOTE: a SUBSCRIBE here goes on this connection even when its
            // channel starts with another [[redis.routes]] prefix.
            _ => match dedicated.conn.send(&request.raw).await {
                Ok(()) => None,
                Err(_) => Some(RelayEnd::Close),
            },
        }
    }

    /// True for a RESP3 client's ordinary command. It is handled like any
    /// other command, locally or routed, rather than sent on the subscribed
    /// connection, so it reaches the node that serves its key. RESP2 clients may send only
    /// subscription commands and PING here, and the upstream rejects others
    /// with Redis's own error.
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

/// True for an unsubscribe confirmation whose count of remaining
/// subscriptions is zero.
fn ends_subscriptions(frame: &Bytes, protocol: Protocol) -> bool {
    let Some(items) = Value::decode(frame, protocol).and_then(Value::into_items) else {
        return false;
    };
    let kind = items
        .first()
        .and_then(Value::as_bytes)
        .map(|kind| kind.to_ascii_lowercase());
    let is_unsubscribe = matches!(
        kind.as_deref(),
        Some(b"unsubscribe") | Some(b"punsubscribe") | Some(b"sunsubscribe")
    );
    is_unsubscribe && items.get(2).and_then(Value::as_int) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_unsubscribe_ends_subscriptions() {
        let last = Bytes::from_static(b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n");
        assert!(ends_subscriptions(&last, Protocol::Resp2));
        let more = Bytes::from_static(b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:1\r\n");
        assert!(!ends_subscriptions(&more, Protocol::Resp2));
        let push = Bytes::from_static(b">3\r\n$12\r\npunsubscribe\r\n$1\r\np\r\n:0\r\n");
        assert!(ends_subscriptions(&push, Protocol::Resp3));
        let message = Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\n0\r\n");
        assert!(!ends_subscriptions(&message, Protocol::Resp2));
    }
}
