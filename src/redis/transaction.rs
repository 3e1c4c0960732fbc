//! Session-pinned commands: MULTI/EXEC/WATCH on a dedicated connection to
//! the primary, and blocking commands on a dedicated connection so they never
//! hold up the shared ones.

use std::time::Instant;

use bytes::Bytes;

use super::cache::Invalidation;
use super::frame::{encode_command, error_text, Request};
use super::pool::{ConnKey, Dedicated};
use super::reply;
use super::router::Role;
use super::session::{Flow, Session};
use super::slot::key_slot;
use super::upstream::UpstreamError;

/// Commands a cluster transaction queues before its node is known.
const MAX_DEFERRED_COMMANDS: usize = 4096;

/// A transaction or WATCH in progress.
pub struct Transaction {
    /// The pinned connection; in cluster mode it is opened at the first
    /// command with a key, because that key decides the node.
    conn: Option<Dedicated>,
    in_multi: bool,
    /// Keyless commands queued before the node was known.
    deferred: Vec<Request>,
    /// Keys written by the commands queued since MULTI, invalidated again
    /// once EXEC returns.
    written: Option<Invalidation>,
    /// Set when a command inside MULTI had keys of another route, so EXEC
    /// discards the transaction, as Redis does after a CROSSSLOT error.
    aborted: bool,
}

impl Transaction {
    fn remember(&mut self, invalidation: Option<Invalidation>) {
        let Some(invalidation) = invalidation else {
            return;
        };
        match &mut self.written {
            Some(written) => written.merge(invalidation),
            None => self.written = Some(invalidation),
        }
    }
}

impl Session {
    /// Invalidates the keys the write `request` touches before it is sent
    /// on a pinned connection; the result is applied again after its reply.
    fn write_invalidation(&self, request: &Request, name: &str) -> Option<Invalidation> {
        let cache = &self.router.cache;
        if !cache.watches_writes()
            || matches!(name, "WATCH" | "UNWATCH" | "MULTI" | "EXEC" | "DISCARD")
        {
            return None;
        }
        let table = self.router.commands();
        if table.is_readonly(name, request) {
            return None;
        }
        cache.before_write(name, request, &table)
    }

    fn apply_invalidation(&self, invalidation: Option<Invalidation>) {
        if let Some(invalidation) = invalidation {
            self.router.cache.after_write(&invalidation);
        }
    }

    /// Returns the primary that serves every key of `request`, or the error
    /// reply for the client.
    pub(super) fn pinned_target(&self, request: &Request, name: &str) -> Result<String, Bytes> {
        let Some(cluster) = &self.router.cluster else {
            return self.router.primary();
        };
        let map = cluster.map();
        let positions = match name {
            // Routed by the first channel's slot, as PUBLISH is.
            "SUBSCRIBE" => vec![1],
            _ => self.router.commands().key_positions(name, request),
        };
        let mut slots = positions
            .iter()
            .filter_map(|&i| request.args.get(i))
            .map(|key| key_slot(key));
        let shard = match slots.next() {
            Some(slot) if slots.all(|other| other == slot) => map.shard(slot),
            Some(_) => return Err(reply::error(reply::CROSSSLOT)),
            None => {
                let primaries = map.primaries();
                let index = self.ctx.client_id as usize % primaries.len().max(1);
                return primaries
                    .get(index)
                    .cloned()
                    .ok_or_else(|| reply::error("CLUSTERDOWN Hash slot not served"));
            }
        };
        match shard {
            Some(shard) => Ok(shard.primary.to_string()),
            None => {
                cluster.request_refresh();
                Err(reply::error("CLUSTERDOWN Hash slot not served"))
            }
        }
    }

    async fn checkout(&self, addr: String) -> Result<Dedicated, UpstreamError> {
        let key = ConnKey {
            addr,
            protocol: self.ctx.protocol,
            db: self.ctx.db,
        };
        self.router.pool.checkout(&key).await
    }

    /// Runs a blocking command on a dedicated connection. The session reads
    /// no further request until it returns, as Redis does for a blocked
    /// client, but notices when the client disconnects. In a cluster, MOVED
    /// and ASK are followed: nothing else ran on the connection yet.
    pub(super) async fn run_blocking(&mut self, request: Request, name: &str) -> Flow {
        if self.drain().await == Flow::Close {
            return Flow::Close;
        }
        let target = match self.pinned_target(&request, name) {
            Ok(addr) => addr,
            Err(error) => return self.reply(error).await,
        };
        let invalidation = self.write_invalidation(&request, name);
        self.note_reads(&request, name);
        let flow = self.run_blocking_on(request, target).await;
        self.apply_invalidation(invalidation);
        flow
    }

    async fn run_blocking_on(&mut self, request: Request, mut target: String) -> Flow {
        let mut asking = false;
        for _ in 0..=self.router.config().max_redirects {
            let mut dedicated = match self.checkout(target).await {
                Ok(dedicated) => dedicated,
                Err(err) => return self.reply(reply::error(&format!("ERR {err}"))).await,
            };
            let started = Instant::now();
            let Some(result) = self.call_blocking(&mut dedicated, &request, asking).await else {
                return Flow::Close;
            };
            let reply = match result {
                Ok(reply) => reply,
                Err(err) => return self.reply(reply::error(&format!("ERR {err}"))).await,
            };
            let origin = dedicated.conn.addr.clone();
            self.router.pool.checkin(dedicated);
            match self
                .router
                .cluster
                .as_ref()
                .and_then(|c| c.redirect(&reply, &origin))
            {
                Some((addr, ask)) => (target, asking) = (addr, ask),
                None => {
                    self.router.record_command(Role::Primary, &reply, started);
                    return self.reply(reply).await;
                }
            }
        }
        let text = "ERR too many cluster redirects for one command";
        self.reply(reply::error(text)).await
    }

    /// Sends a blocking command and waits for its reply. Returns `None` when
    /// the client left or skiff is shutting down. The caller then drops the
    /// connection, and closing it ends the command upstream.
    async fn call_blocking(
        &mut self,
        dedicated: &mut Dedicated,
        request: &Request,
        asking: bool,
    ) -> Option<Result<Bytes, UpstreamError>> {
        if asking {
            let asking_reply = dedicated.conn.call(&encode_command(&["ASKING"])).await;
            if let Err(err) = asking_reply {
                return Some(Err(err));
            }
        }
        tokio::select! {
            result = dedicated.conn.call(&request.raw) => Some(result),
            _ = self.reader.closed() => None,
            _ = self.shutdown.cancelled() => None,
        }
    }

    /// Replaces a redirect on a pinned connection with CROSSSLOT, because
    /// following it would lose the connection's transaction state.
    fn unroutable_redirect(&self, reply: Bytes) -> Bytes {
        let redirected = error_text(&reply)
            .is_some_and(|text| text.starts_with("MOVED ") || text.starts_with("ASK "));
        if redirected {
            if let Some(cluster) = &self.router.cluster {
                cluster.request_refresh();
            }
            return reply::error(reply::CROSSSLOT);
        }
        reply
    }

    /// Handles MULTI or WATCH outside a transaction.
    pub(super) async fn start_transaction(&mut self, request: Request, name: &str) -> Flow {
        if self.drain().await == Flow::Close {
            return Flow::Close;
        }
        // The first command with a key decides the node in a cluster, and
        // the route when routes list prefixes.
        if name == "MULTI" && (self.router.is_cluster() || self.keys_pick_route()) {
            self.transaction = Some(Transaction {
                conn: None,
                in_multi: true,
                deferred: Vec::new(),
                written: None,
                aborted: false,
            });
            return self.reply(reply::ok()).await;
        }
        let (conn, reply) = match self.open_pinned(&request, name, &[]).await {
            Ok(opened) => opened,
            Err(error) => return self.reply(error).await,
        };
        if error_text(&reply).is_some() {
            self.router.pool.checkin(conn);
        } else {
            self.transaction = Some(Transaction {
                conn: Some(conn),
                in_multi: name == "MULTI",
                deferred: Vec::new(),
                written: None,
                aborted: false,
            });
        }
        let reply = self.unroutable_redirect(reply);
        self.reply(reply).await
    }

    /// Opens a pinned connection to the node for `request`, sends
    /// `prelude` and then `request`, and returns the connection and the
    /// reply. A MOVED reply, which a stale slot map causes, is followed on a
    /// new connection, since nothing that matters ran on the old one.
    async fn open_pinned(
        &mut self,
        request: &Request,
        name: &str,
        prelude: &[Request],
    ) -> Result<(Dedicated, Bytes), Bytes> {
        let mut target = self.pinned_target(request, name)?;
        let upstream_error = |err: UpstreamError| reply::error(&format!("ERR {err}"));
        for _ in 0..=self.router.config().max_redirects {
            let mut conn = self.checkout(target).await.map_err(upstream_error)?;
            for earlier in prelude {
                conn.conn.call(&earlier.raw).await.map_err(upstream_error)?;
            }
            let reply = conn.conn.call(&request.raw).await.map_err(upstream_error)?;
            let origin = conn.conn.addr.clone();
            match self
                .router
                .cluster
                .as_ref()
                .and_then(|c| c.redirect(&reply, &origin))
            {
                // The connection may hold a MULTI, so it is dropped.
                Some((addr, false)) => target = addr,
                _ => return Ok((conn, reply)),
            }
        }
        Err(reply::error(
            "ERR too many cluster redirects for one command",
        ))
    }

    /// Handles a request while a transaction or WATCH has a pinned connection.
    pub(super) async fn handle_in_transaction(&mut self, request: Request, name: &str) -> Flow {
        match name {
            "QUIT" => {
                self.transaction = None;
                self.reply(reply::ok()).await;
                return Flow::Close;
            }
            "RESET" => {
                let reply = self.reset();
                return self.reply(reply).await;
            }
            // These change the pinned connection's own state, which would
            // then leak to the next client that uses it: a subscription
            // would hand that client the first one's messages.
            "AUTH" | "HELLO" | "CLIENT" | "SELECT" | "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" => {
                // Inside MULTI, the rejection makes EXEC discard the
                // transaction, as Redis does for a command that fails to
                // queue. Otherwise the queued writes would run in the
                // database that the client meant to leave.
                let transaction = self.transaction.as_mut().expect("transaction in progress");
                if transaction.in_multi {
                    transaction.aborted = true;
                }
                let text = format!("ERR {name} is not allowed inside a transaction or WATCH");
                return self.reply(reply::error(&text)).await;
            }
            _ => {}
        }
        if let Some(flow) = self.check_transaction_route(&request, name).await {
            return flow;
        }
        let transaction = self.transaction.as_mut().expect("transaction in progress");
        if transaction.conn.is_none() {
            return self.handle_deferred(request, name).await;
        }
        self.forward_pinned(request, name).await
    }

    /// Rejects a command whose keys belong to another route than the
    /// transaction's, and ends a transaction that such a command aborted.
    /// Returns `None` when the command goes on as usual.
    async fn check_transaction_route(&mut self, request: &Request, name: &str) -> Option<Flow> {
        let transaction = self.transaction.as_mut().expect("transaction in progress");
        if transaction.aborted && matches!(name, "EXEC" | "DISCARD") {
            let transaction = self.transaction.take()?;
            self.apply_invalidation(transaction.written);
            if let Some(mut conn) = transaction.conn {
                // DISCARD also ends the WATCH, so the connection is clean.
                match conn.conn.call(&encode_command(&["DISCARD"])).await {
                    Ok(_) => self.router.pool.checkin(conn),
                    Err(err) => tracing::debug!(error = %err, "DISCARD failed"),
                }
            }
            let reply = match name {
                "EXEC" => {
                    reply::error("EXECABORT Transaction discarded because of previous errors.")
                }
                _ => reply::ok(),
            };
            return Some(self.reply(reply).await);
        }
        // Before the first key (conn is None), any route may still follow.
        if transaction.conn.is_none() || !self.keys_pick_route() {
            return None;
        }
        let error = match self.routes.route_of_keys(name, request) {
            Ok(Some(route)) if route != self.route => {
                self.routes.cross_route_error(self.route, route)
            }
            Ok(_) => return None,
            Err(error) => error,
        };
        let transaction = self.transaction.as_mut().expect("transaction in progress");
        if transaction.in_multi {
            transaction.aborted = true;
        }
        Some(self.reply(error).await)
    }

    /// Sends a request on the transaction's connection and ends the
    /// transaction after EXEC, DISCARD or UNWATCH.
    async fn forward_pinned(&mut self, request: Request, name: &str) -> Flow {
        let invalidation = self.write_invalidation(&request, name);
        self.note_reads(&request, name);
        let transaction = self.transaction.as_mut().expect("transaction in progress");
        let in_multi = transaction.in_multi;
        let conn = transaction.conn.as_mut().expect("pinned connection");
        let started = Instant::now();
        let result = conn.conn.call(&request.raw).await;
        let reply = match result {
            Ok(reply) => reply,
            Err(err) => {
                // EXEC may have run before the connection failed.
                let written = self.transaction.take().and_then(|t| t.written);
                self.apply_invalidation(written);
                self.apply_invalidation(invalidation);
                return self.reply(reply::error(&format!("ERR {err}"))).await;
            }
        };
        self.router.record_command(Role::Primary, &reply, started);
        if in_multi && !matches!(name, "EXEC" | "DISCARD") {
            // Queued: it runs at EXEC.
            transaction.remember(invalidation);
        } else {
            self.apply_invalidation(invalidation);
        }
        if in_multi && name == "EXEC" {
            let written = self.transaction.as_mut().and_then(|t| t.written.take());
            self.apply_invalidation(written);
        }
        let transaction = self.transaction.as_mut().expect("transaction in progress");

        let failed = error_text(&reply).is_some();
        let finished = match name {
            "MULTI" if !in_multi && !failed => {
                transaction.in_multi = true;
                false
            }
            "EXEC" | "DISCARD" => in_multi,
            "UNWATCH" => !in_multi,
            _ => false,
        };
        // EXEC, DISCARD and UNWATCH leave the connection without a
        // transaction or watched keys, so another client may use it.
        if finished {
            if let Some(transaction) = self.transaction.take() {
                if let Some(conn) = transaction.conn {
                    self.router.pool.checkin(conn);
                }
            }
        }
        let reply = self.unroutable_redirect(reply);
        self.reply(reply).await
    }

    /// MULTI before any key has named the node (in a cluster) or the route
    /// (when routes list prefixes).
    async fn handle_deferred(&mut self, request: Request, name: &str) -> Flow {
        let invalidation = self.write_invalidation(&request, name);
        let transaction = self.transaction.as_mut().expect("transaction in progress");
        transaction.remember(invalidation);
        match name {
            "MULTI" => {
                return self
                    .reply(reply::error("ERR MULTI calls can not be nested"))
                    .await
            }
            "WATCH" => {
                return self
                    .reply(reply::error("ERR WATCH inside MULTI is not allowed"))
                    .await
            }
            "DISCARD" => {
                self.transaction = None;
                return self.reply(reply::ok()).await;
            }
            _ => {}
        }
        let has_keys = !self
            .router
            .commands()
            .key_positions(name, &request)
            .is_empty();
        if !has_keys && name != "EXEC" {
            if transaction.deferred.len() >= MAX_DEFERRED_COMMANDS {
                self.transaction = None;
                return self
                    .reply(reply::error("ERR too many commands in one transaction"))
                    .await;
            }
            transaction.deferred.push(request);
            return self.reply(reply::simple("QUEUED")).await;
        }
        if self.keys_pick_route() {
            match self.pick_route(&request, name) {
                Ok(route) => self.use_route(route),
                Err(error) => {
                    if let Some(transaction) = self.transaction.as_mut() {
                        transaction.aborted = true;
                    }
                    return self.reply(error).await;
                }
            }
        }
        let transaction = self.transaction.as_mut().expect("transaction in progress");
        // MULTI and the queued commands go first; the client already had
        // +OK and +QUEUED for them.
        let mut prelude = vec![Request::from_args(vec![Bytes::from_static(b"MULTI")])];
        prelude.append(&mut transaction.deferred);
        match self.open_pinned(&request, name, &prelude).await {
            Ok((conn, reply)) => {
                let finished = name == "EXEC";
                if finished {
                    let written = self.transaction.take().and_then(|t| t.written);
                    self.apply_invalidation(written);
                    self.router.pool.checkin(conn);
                } else if let Some(transaction) = self.transaction.as_mut() {
                    transaction.conn = Some(conn);
                }
                let reply = self.unroutable_redirect(reply);
                self.reply(reply).await
            }
            Err(error) => {
                let written = self.transaction.take().and_then(|t| t.written);
                self.apply_invalidation(written);
                self.reply(error).await
            }
        }
    }
}
