//! The relay between one logged-in client and the server connections it
//! borrows: checkout, forwarding, prepared statement renaming and release.

mod capture;
mod client;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::backend::BackendError;
use super::cancel::{CancelHandle, ClientInfo, WaitFlag};
use super::capture::SessionCapture;
use super::frontend::LoggedIn;
use super::params::{self, Settings};
use super::pending::{Expected, Pending};
use super::pipeline::{Delivery, Offer, Parked};
use super::pool::{Checkout, CheckoutError, Pool};
use super::prepared::Statement;
use super::protocol::{self, Message, MessageReader, ProtocolError, Severity};
use super::Pooler;
use crate::config::PoolMode;
use crate::tls::{ReadHalf, WriteHalf};

/// Output is written once this many bytes are buffered, even mid-batch.
const FLUSH_THRESHOLD: usize = 64 * 1024;

/// Size of a client's write buffer when a reply starts, which is the size
/// of a spare buffer. Larger replies grow it.
const INITIAL_WRITE_BUFFER: usize = protocol::spare::SPARE_ROOM;

/// Maximum time skiff waits for a ROLLBACK of a disconnected client's
/// transaction before it closes the server connection instead.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of client messages read ahead while the client waits for a server
/// connection, to see whether it closed behind them.
const WAIT_READ_AHEAD_BYTES: usize = 64 * 1024;

/// The FATAL message of a session ended by KILL or KILL_CLIENT.
const KILLED: &str = "terminating connection due to administrator command";

/// The FATAL message of a session ended by shutdown.
const SHUTTING_DOWN: &str = "terminating connection because skiff is shutting down";

/// Whether the session goes on after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

enum Event {
    Client(Result<Message, ProtocolError>),
    Server(Result<Message, BackendError>),
    Shutdown,
}

/// One client's session after login.
pub struct Session {
    pooler: Arc<Pooler>,
    id: u64,
    pool: Arc<Pool>,
    mode: PoolMode,
    reader: MessageReader<ReadHalf>,
    writer: WriteHalf,
    out: BytesMut,
    server: Option<Checkout>,
    pending: Pending,
    /// skiff answered a request with an error itself, so the rest of the
    /// client's messages up to Sync are dropped, as PostgreSQL would.
    client_skipping: bool,
    /// The client's prepared statement names.
    statements: HashMap<String, Arc<Statement>>,
    /// Session settings the client expects on any server connection.
    settings: Settings,
    /// Session settings from the client's startup packet.
    startup_settings: Settings,
    cancel: CancelHandle,
    /// The database name the client connected to.
    database: String,
    /// Log-table capture state, when capture is configured.
    capture: Option<SessionCapture>,
    /// Extended-protocol requests went to the server since its last
    /// ReadyForQuery, so its transaction status is not known.
    unsynced: bool,
    /// The client ran SQL that may change session state without a command
    /// tag that shows it.
    session_state_changed: bool,
    /// The SQL of the client's last unnamed Parse may change session state
    /// without a command tag that shows it.
    unnamed_changes_session_state: bool,
    /// Shutdown began while a transaction was open; the session stops when
    /// it ends.
    stop_deferred: bool,
    /// Bytes read from the client and not yet added to the pool's stats.
    received_bytes: u64,
    /// When the first request sent since the server's last ReadyForQuery
    /// went out.
    query_started: Option<Instant>,
    /// When the current transaction's first request went to the server.
    transaction_started: Option<Instant>,
    /// The client already got the FATAL error that ends the session.
    fatal_sent: bool,
    /// The output contains a server reply not yet flushed to the client.
    reply_from_server: bool,
    /// Raised by the pool when a wait for a server connection lasted
    /// `query_wait_timeout`; one for all the session's waits.
    wait_expiry: Arc<WaitFlag>,
    /// Client messages still to come whose bytes went to the server
    /// already, queued behind another client's request.
    sent_ahead: usize,
    /// The current extended-protocol batch went to the server queued
    /// behind another client's, so nothing is queued behind it.
    batch_sent_ahead: bool,
    /// The last Bind came first after a ReadyForQuery, with no request in
    /// flight and none since.
    bind_after_ready: bool,
}

impl Session {
    pub fn new(
        pooler: Arc<Pooler>,
        id: u64,
        peer: SocketAddr,
        logged_in: LoggedIn,
        reader: MessageReader<ReadHalf>,
        writer: WriteHalf,
    ) -> Session {
        let info = ClientInfo {
            id,
            peer,
            user: logged_in.user.clone(),
            database: logged_in.database.clone(),
            application_name: logged_in
                .params
                .get("application_name")
                .unwrap_or_default()
                .to_string(),
            connected_at: SystemTime::now(),
            kill: CancellationToken::new(),
        };
        let cancel = pooler.cancels.register(Arc::new(info));
        let capture = pooler.capture.as_ref().map(|_| SessionCapture::default());
        Session {
            database: logged_in.database,
            capture,
            unsynced: false,
            session_state_changed: false,
            unnamed_changes_session_state: false,
            received_bytes: 0,
            query_started: None,
            transaction_started: None,
            mode: pooler.config().pool_mode,
            settings: logged_in.settings.clone(),
            startup_settings: logged_in.settings,
            pool: logged_in.pool,
            pooler,
            id,
            reader,
            writer,
            out: BytesMut::new(),
            server: None,
            pending: Pending::default(),
            client_skipping: false,
            statements: HashMap::new(),
            cancel,
            stop_deferred: false,
            fatal_sent: false,
            reply_from_server: false,
            wait_expiry: Arc::default(),
            sent_ahead: 0,
            batch_sent_ahead: false,
            bind_after_ready: false,
        }
    }

    /// Sends BackendKeyData and the first ReadyForQuery, then relays until
    /// either side closes.
    pub async fn run(mut self) {
        let pool = self.pool.clone();
        pool.stats
            .clients
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.relay().await;
        pool.stats
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn relay(&mut self) {
        self.write(&protocol::backend_key_data(
            self.cancel.process_id,
            self.cancel.secret_key,
        ));
        self.write(&protocol::ready_for_query(b'I'));
        if self.flush_client().await.is_err() {
            return;
        }
        while let Ok(Flow::Continue) = self.step().await {}
        let _ = self.flush_client().await;
        self.finish().await;
    }

    async fn step(&mut self) -> std::io::Result<Flow> {
        // While another client's Query is queued behind this client's, the
        // client's next messages wait: they would go behind that Query.
        let client_held = self.holds_queue();
        if client_held || !self.reader.has_buffered_message() {
            if let Err(err) = self.flush_server().await {
                return self.server_lost(err).await;
            }
        }
        let server_busy = self
            .server
            .as_ref()
            .is_some_and(|s| s.conn.has_buffered_message());
        if !server_busy {
            if std::mem::take(&mut self.reply_from_server) && !self.out.is_empty() {
                // Yield so the other sessions woken by the same poll take
                // their replies first and the replies leave in a burst. A
                // client process with many connections then finds several
                // ready per poll instead of one.
                tokio::task::yield_now().await;
            }
            self.flush_client().await?;
        }
        if self.server.is_none() && self.out.capacity() > 0 {
            // An idle client keeps no write buffer.
            protocol::spare::give(std::mem::take(&mut self.out));
        }
        let can_stop = self.can_stop_now();
        let event = {
            let reader = &mut self.reader;
            let server = &mut self.server;
            let server_read = async {
                match server {
                    Some(checkout) => checkout.conn.read().await,
                    None => std::future::pending().await,
                }
            };
            // One branch serves shutdown and KILL: a shutdown waits for the
            // open transaction to end, a KILL does not.
            let signal = self.cancel.stop();
            let deferred = self.stop_deferred;
            let stop = std::future::poll_fn(|cx| {
                if deferred && can_stop {
                    return std::task::Poll::Ready(());
                }
                signal.poll_stop(cx, !deferred)
            });
            tokio::select! {
                biased;
                message = server_read => Event::Server(message),
                _ = stop => Event::Shutdown,
                message = reader.read(), if !client_held => Event::Client(message),
            }
        };
        if let Event::Server(Ok(m)) = &event {
            tracing::trace!(tag = %(m.tag() as char), "server message");
        }
        match event {
            Event::Server(Ok(message)) => {
                self.reply_from_server = true;
                let flow = self.on_server_message(message).await?;
                self.drain_server(flow).await
            }
            Event::Server(Err(err)) => self.server_lost(err).await,
            Event::Client(result) => {
                let flow = self.on_client_read(result).await?;
                self.drain_client(flow).await
            }
            Event::Shutdown if self.cancel.stop().is_killed() => {
                if !self.fatal_sent {
                    self.write_error(Severity::Fatal, "57P01", KILLED);
                }
                Ok(Flow::Close)
            }
            Event::Shutdown if !can_stop => {
                self.stop_deferred = true;
                Ok(Flow::Continue)
            }
            Event::Shutdown => {
                if !self.fatal_sent {
                    self.write_error(Severity::Fatal, "57P01", SHUTTING_DOWN);
                }
                Ok(Flow::Close)
            }
        }
    }

    /// Handles the result of one read from the client.
    async fn on_client_read(
        &mut self,
        result: Result<Message, ProtocolError>,
    ) -> std::io::Result<Flow> {
        match result {
            Ok(message) => {
                self.received_bytes += message.raw.len() as u64;
                tracing::trace!(tag = %(message.tag() as char), "client message");
                self.on_client_message(message).await
            }
            Err(ProtocolError::Closed) => Ok(Flow::Close),
            Err(ProtocolError::Io(err)) => {
                tracing::debug!(error = %err, "client read failed");
                Ok(Flow::Close)
            }
            Err(err) => {
                self.write_error(Severity::Fatal, "08P01", &err.to_string());
                self.flush_client().await?;
                self.reader.discard_before_close().await;
                Ok(Flow::Close)
            }
        }
    }

    /// Handles the client messages already buffered after one (a pipelined
    /// Bind, Execute and Sync arrive in one read) without a new select for
    /// each. It stops when a server message is buffered, which then goes
    /// first, as in the select. Server bytes still in the socket are read
    /// after the batch, and the pending queue keeps replies in order.
    async fn drain_client(&mut self, mut flow: Flow) -> std::io::Result<Flow> {
        while flow == Flow::Continue && self.reader.has_buffered_message() && !self.holds_queue() {
            let server_busy = self
                .server
                .as_ref()
                .is_some_and(|s| s.conn.has_buffered_message());
            // Messages that went to the server ahead are taken first: the
            // replies to them need their expectations queued.
            if server_busy && self.sent_ahead == 0 {
                break;
            }
            let result = self.reader.read().await;
            flow = self.on_client_read(result).await?;
        }
        Ok(flow)
    }

    /// Handles the server messages already buffered after one, without a
    /// new select over every source for each: a result's rows usually
    /// arrive in one read. Shutdown and KILL are seen after the batch.
    async fn drain_server(&mut self, mut flow: Flow) -> std::io::Result<Flow> {
        while flow == Flow::Continue {
            let Some(checkout) = &mut self.server else {
                break;
            };
            if !checkout.conn.has_buffered_message() {
                break;
            }
            flow = match checkout.conn.read().await {
                Ok(message) => {
                    tracing::trace!(tag = %(message.tag() as char), "server message");
                    self.on_server_message(message).await?
                }
                Err(err) => return self.server_lost(err).await,
            };
        }
        Ok(flow)
    }

    /// True when the attached server connection has another client's Query
    /// queued behind this client's.
    fn holds_queue(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(|checkout| checkout.conn.behind.is_some())
    }

    /// True when the client can be disconnected for shutdown without
    /// cutting a transaction short.
    fn can_stop_now(&self) -> bool {
        match &self.server {
            None => self.pending.is_empty(),
            Some(checkout) => checkout.conn.tx_status == b'I' && self.pending.is_empty(),
        }
    }

    /// Ends the session after its server connection failed.
    async fn server_lost(&mut self, err: BackendError) -> std::io::Result<Flow> {
        metrics::counter!("skiff_pg_errors_total", "kind" => "server_lost").increment(1);
        tracing::info!(error = %err, pool = %self.pool.name, "server connection lost");
        if let Some(checkout) = self.server.take() {
            self.cancel.attach(None);
            self.pool.discard(checkout);
        }
        self.pending.clear();
        self.query_started = None;
        self.transaction_started = None;
        self.write_error(
            Severity::Fatal,
            "08006",
            &format!("server connection lost: {err}"),
        );
        Ok(Flow::Close)
    }

    /// Attaches a server connection if none is attached, bringing its
    /// session settings in line with the client's. On failure returns the
    /// ErrorResponse the client should get.
    async fn ensure_server(&mut self) -> Result<(), Bytes> {
        self.ensure_server_sending(None).await.map(|_| ())
    }

    /// [`Session::ensure_server`] for a request that may be queued behind
    /// another client's while this client waits (`offer`). Returns true
    /// when the connection comes with the request sent already.
    async fn ensure_server_sending(&mut self, offer: Option<Offer<'_>>) -> Result<bool, Bytes> {
        if self.server.is_some() {
            return Ok(false);
        }
        let (mut checkout, handed) = self.wait_for_server(offer).await?;
        if let Some(handed) = handed {
            self.cancel.attach(Some(checkout.conn.cancel_key.clone()));
            self.server = Some(checkout);
            if handed.cancelled {
                self.cancel.cancel_attached();
            }
            return Ok(handed.delivery == Delivery::Sent);
        }
        let conn = &mut checkout.conn;
        let mut sql = String::new();
        if conn.dirty_by.is_some_and(|id| id != self.id) {
            // Another client changed session state here: reset it all.
            sql = conn.take_reset_sql(&self.pooler.config().server_reset_query);
        }
        // Connections and clients of a pool mostly share one settings map,
        // which saves comparing the maps entry by entry.
        if !Arc::ptr_eq(&conn.applied, &self.settings) {
            if let Some(sync) = params::sync_sql(&conn.applied, &self.settings, false) {
                if !sql.is_empty() {
                    sql.push_str("; ");
                }
                sql.push_str(&sync);
            } else if sql.is_empty() {
                conn.applied = self.settings.clone();
            }
        }
        if !sql.is_empty() {
            // Boxed, because this rare step would otherwise enlarge the
            // future of every checkout, which is moved on each call.
            match Box::pin(conn.run_internal(&sql)).await {
                Ok(None) => {
                    conn.applied = self.settings.clone();
                    conn.dirty_by = None;
                }
                Ok(Some(fields)) => {
                    conn.dirty_by = Some(u64::MAX);
                    self.pool.checkin(checkout);
                    return Err(protocol::error_response(
                        Severity::Error,
                        &fields.code,
                        &fields.message,
                    ));
                }
                Err(err) => {
                    self.pool.discard(checkout);
                    return Err(protocol::error_response(
                        Severity::Error,
                        "08006",
                        &format!("server connection failed: {err}"),
                    ));
                }
            }
        }
        self.cancel.attach(Some(checkout.conn.cancel_key.clone()));
        self.server = Some(checkout);
        Ok(false)
    }

    /// Checks out a server connection; a cancel request from the client
    /// ends the wait, as it would end a running query, and a KILL ends it
    /// before the request reaches a server. With `offer`, a busy connection
    /// may take the client's request on while the client waits. That
    /// connection then comes with the request's outcome.
    async fn wait_for_server(
        &mut self,
        offer: Option<Offer<'_>>,
    ) -> Result<(Checkout, Option<Handed>), Bytes> {
        let pool = self.pool.clone();
        if let Some(permit) = pool.try_permit() {
            return pool
                .checkout_with(permit)
                .await
                .map(|checkout| (checkout, None))
                .map_err(|err| self.checkout_error(err));
        }
        let parked = offer.map(|offer| {
            Parked::new(
                Bytes::copy_from_slice(offer.bytes),
                offer.statement.map(str::to_string),
                self.settings.clone(),
                self.id,
            )
        });
        let cancelled = self.cancel.begin_wait();
        let stop = self.cancel.stop();
        let killed = std::future::poll_fn(|cx| stop.poll_stop(cx, false));
        // A client that hangs up while queued leaves the queue at once: its
        // request must not run on a server after it gave up. What it sends
        // meanwhile (the rest of a pipeline, or the Terminate that libpq
        // sends before closing) is read ahead, so the close behind it is
        // seen, up to WAIT_READ_AHEAD_BYTES.
        let reader = &mut self.reader;
        let hung_up = async {
            while reader.buffered_len() < WAIT_READ_AHEAD_BYTES {
                if reader.read_ahead().await.is_err() {
                    return;
                }
            }
            // NOTE: a client that sent more than this while queued is not
            // watched any more, so its requests run even if it hangs up.
            std::future::pending::<()>().await
        };
        let handed = async {
            match &parked {
                Some(parked) => parked.handed().await,
                None => std::future::pending().await,
            }
        };
        // The checkout is polled first: when a server connection is handed
        // over, the other waits are not polled again for nothing.
        let result = tokio::select! {
            biased;
            _ = handed => Err(WaitEnded::Handed),
            result = pool.checkout(&self.wait_expiry, parked.as_ref()) => Ok(result),
            _ = cancelled.raised() => Err(WaitEnded::Cancelled),
            _ = killed => Err(WaitEnded::Killed),
            _ = hung_up => Err(WaitEnded::HungUp),
        };
        self.cancel.end_wait();
        // A Query written behind another's runs whatever ended the wait, so
        // the wait goes on until its connection is handed over.
        let queued = match &parked {
            Some(parked) => parked.finish().await,
            None => Ok(None),
        };
        match queued {
            Ok(None) => {}
            Ok(Some((checkout, delivery))) => {
                let cancelled = matches!(result, Err(WaitEnded::Cancelled));
                match result {
                    // A permit came too: that connection goes back.
                    Ok(Ok(extra)) => pool.checkin(extra),
                    Err(ended @ (WaitEnded::Killed | WaitEnded::HungUp)) => {
                        self.fatal_sent = true;
                        match delivery {
                            Delivery::Sent => pool.discard_running(checkout),
                            Delivery::Resend => pool.checkin(checkout),
                        }
                        return Err(ended.fatal_error());
                    }
                    Err(WaitEnded::Cancelled) if delivery == Delivery::Resend => {
                        pool.checkin(checkout);
                        return Err(WaitEnded::Cancelled.error());
                    }
                    _ => {}
                }
                return Ok((
                    checkout,
                    Some(Handed {
                        delivery,
                        cancelled,
                    }),
                ));
            }
            Err(_lost) => {
                if let Ok(Ok(extra)) = result {
                    pool.checkin(extra);
                }
                metrics::counter!("skiff_pg_errors_total", "kind" => "server_lost").increment(1);
                return Err(queued_request_lost());
            }
        }
        match result {
            Ok(Ok(checkout)) => Ok((checkout, None)),
            Ok(Err(err)) => Err(self.checkout_error(err)),
            Err(WaitEnded::Handed) => Err(queued_request_lost()),
            Err(ended @ WaitEnded::Cancelled) => Err(ended.error()),
            Err(ended) => {
                if matches!(ended, WaitEnded::HungUp) {
                    tracing::debug!("client closed the connection while waiting for a server");
                }
                self.fatal_sent = true;
                Err(ended.fatal_error())
            }
        }
    }

    fn checkout_error(&mut self, err: CheckoutError) -> Bytes {
        if let CheckoutError::ShuttingDown = err {
            self.fatal_sent = true;
            return protocol::error_response(Severity::Fatal, "57P01", SHUTTING_DOWN);
        }
        let (kind, code) = match &err {
            CheckoutError::Timeout(_) => ("query_wait_timeout", "53400"),
            CheckoutError::Backend(BackendError::Login { .. }) => ("server_login", "08004"),
            _ => ("server_connect", "08006"),
        };
        metrics::counter!("skiff_pg_errors_total", "kind" => kind).increment(1);
        protocol::error_response(Severity::Error, code, &err.to_string())
    }

    /// Gives the server connection back to the pool.
    async fn release(&mut self) {
        let Some(mut checkout) = self.server.take() else {
            return;
        };
        if !self.cancel.detach().await {
            if checkout.conn.behind.is_none() {
                // A late cancel request could hit the next client's query.
                self.pool.discard(checkout);
                return;
            }
            // The queued request is on the server already, so its client
            // still gets the connection, which then closes.
            // NOTE: the late cancel can still end that request after the
            // reply read-ahead gave up on it.
            checkout.conn.retire = true;
        }
        if std::mem::take(&mut self.session_state_changed) {
            checkout.conn.dirty_by = Some(self.id);
        }
        if checkout.conn.flush().await.is_err() {
            self.pool.discard(checkout);
            return;
        }
        self.check_in(checkout).await;
    }

    /// Gives a connection back once the Query queued behind, if any, is
    /// settled.
    async fn check_in(&self, mut checkout: Checkout) {
        if let Err(err) = Self::settle_behind(&mut checkout).await {
            tracing::debug!(error = %err, "server failed before a queued query's reply");
            self.pool.discard(checkout);
            return;
        }
        self.pool.checkin(checkout);
    }

    /// Before a connection with another client's Query queued behind is
    /// handed over: reads that Query's reply ahead when a cancel request
    /// went to the server after the Query was queued, or when the plan of
    /// the statement it binds changed.
    async fn settle_behind(checkout: &mut Checkout) -> Result<(), BackendError> {
        let conn = &mut checkout.conn;
        let cancels = conn.cancel_key.cancels.load(Ordering::Acquire);
        let exposed = conn.behind.as_ref().is_some_and(|behind| {
            let parked = behind.parked();
            let plan_changed = parked
                .statement
                .as_ref()
                .is_some_and(|name| conn.needs_close.contains(name));
            parked.exposed(cancels) || plan_changed
        });
        if exposed {
            conn.delivery = Some(conn.settle_behind().await?);
        }
        Ok(())
    }

    /// Returns the server connection when the client leaves: rolled back
    /// or reset when it is safe, closed otherwise.
    async fn finish(&mut self) {
        let Some(mut checkout) = self.server.take() else {
            return;
        };
        let reusable = self.cancel.detach().await;
        let killed = self.cancel.info().kill.is_cancelled();
        if self.pending.awaits_server() && checkout.conn.behind.is_some() {
            // Another client's Query waits behind the running one: this
            // one's reply is read and dropped, and the connection goes on
            // to that client. A KILL still cancels the running query; the
            // reply read-ahead keeps that cancel off the queued one.
            let conn = &mut checkout.conn;
            if killed {
                super::cancel::send_cancel(&conn.cancel_key).await;
            }
            conn.retire |= !reusable;
            let drained = tokio::time::timeout(ROLLBACK_TIMEOUT, async {
                conn.flush().await?;
                loop {
                    let message = conn.read().await?;
                    if message.tag() == super::protocol::backend::READY_FOR_QUERY {
                        conn.tx_status = message.body().first().copied().unwrap_or(b'E');
                        return Ok::<(), BackendError>(());
                    }
                }
            })
            .await;
            // The drained reply ended the client's one request, a simple
            // Query or a batch up to its Sync. The connection is then as
            // clean as its transaction status shows, which checkin checks.
            if !matches!(drained, Ok(Ok(()))) {
                self.pool.discard(checkout);
                return;
            }
            self.check_in(checkout).await;
            return;
        }
        if killed {
            // KILL closes the server connection too, so nothing the client
            // left running goes on.
            self.pool.discard_running(checkout);
            return;
        }
        if self.pending.awaits_server() {
            // A query is still running: cancel it so the server process
            // ends before its pool slot is reused.
            self.pool.discard_running(checkout);
            return;
        }
        if self.unsynced || !reusable {
            // Requests since the last Sync left an implicit transaction of
            // unknown state, or a cancel request may still reach the
            // connection. Closing the connection settles both.
            self.pool.discard(checkout);
            return;
        }
        let conn = &mut checkout.conn;
        if std::mem::take(&mut self.session_state_changed) {
            conn.dirty_by = Some(self.id);
        }
        let cleanup = match (self.mode, conn.tx_status) {
            (PoolMode::Session, b'I') => {
                Some(conn.take_reset_sql(&self.pooler.config().server_reset_query))
            }
            (_, b'I') => None,
            _ => Some("ROLLBACK".to_string()),
        };
        if let Some(sql) = cleanup {
            let run = Box::pin(conn.run_internal(&sql));
            let run = tokio::time::timeout(ROLLBACK_TIMEOUT, run).await;
            if !matches!(run, Ok(Ok(_))) || conn.tx_status != b'I' {
                self.pool.discard(checkout);
                return;
            }
            if self.mode == PoolMode::Session {
                conn.dirty_by = Some(self.id);
            }
        }
        self.pool.checkin(checkout);
    }

    /// Queues a slot and sends any of skiff's own replies now due.
    fn expect(&mut self, expected: Expected) {
        if let Expected::Forward(request) | Expected::Injected(request) = &expected {
            if !request.ends_with_ready() {
                self.unsynced = true;
            }
            if self.query_started.is_none() {
                let now = Instant::now();
                self.query_started = Some(now);
                self.transaction_started.get_or_insert(now);
            }
        }
        self.pending.push(expected);
        self.emit_due_replies();
    }

    fn emit_due_replies(&mut self) {
        while self.pending.front().is_some_and(Expected::is_local) {
            match self.pending.pop() {
                Some(Expected::Local(bytes)) => self.write(&bytes),
                Some(Expected::LocalStatement { reply, .. }) => self.write(&reply),
                _ => {}
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.out.capacity() == 0 {
            // One buffer that fits a typical reply, instead of one
            // allocation per doubling from the first message's size.
            self.out = protocol::spare::take(bytes.len().max(INITIAL_WRITE_BUFFER));
        }
        self.out.extend_from_slice(bytes);
    }

    fn write_error(&mut self, severity: Severity, code: &str, message: &str) {
        self.write(&protocol::error_response(severity, code, message));
    }

    async fn flush_client(&mut self) -> std::io::Result<()> {
        if self.received_bytes > 0 {
            let received = std::mem::take(&mut self.received_bytes);
            let stats = &self.pool.stats;
            stats.received_bytes.fetch_add(received, Ordering::Relaxed);
        }
        if self.out.is_empty() {
            return Ok(());
        }
        let stats = &self.pool.stats;
        stats
            .sent_bytes
            .fetch_add(self.out.len() as u64, Ordering::Relaxed);
        let result = self.writer.send(&self.out).await;
        protocol::clear_write_buffer(&mut self.out);
        result
    }

    async fn flush_server(&mut self) -> Result<(), BackendError> {
        match &mut self.server {
            Some(checkout) => checkout.conn.flush().await,
            None => Ok(()),
        }
    }

    /// Queues bytes for the attached server connection, unless they are
    /// those of a client message that went to the server queued behind
    /// another client's request.
    fn send(&mut self, bytes: &[u8]) {
        if self.sent_ahead > 0 {
            self.sent_ahead -= 1;
            return;
        }
        if let Some(checkout) = &mut self.server {
            checkout.conn.queue(bytes);
        }
    }

    /// The transaction status to report when skiff answers Sync itself.
    fn tx_status(&self) -> u8 {
        self.server
            .as_ref()
            .map(|checkout| checkout.conn.tx_status)
            .unwrap_or(b'I')
    }
}

/// The reason a client stopped waiting for a server connection early.
enum WaitEnded {
    /// A busy connection took on the client's Query and was handed over,
    /// or lost.
    Handed,
    /// A cancel request for the client arrived.
    Cancelled,
    /// An admin KILL or a shutdown ended the client.
    Killed,
    /// The client closed its connection.
    HungUp,
}

impl WaitEnded {
    /// Builds the ErrorResponse for a wait that a cancel request ended.
    fn error(&self) -> Bytes {
        protocol::error_response(
            Severity::Error,
            "57014",
            "canceling statement due to user request",
        )
    }

    /// Builds the FATAL ErrorResponse for a wait that ends the session.
    fn fatal_error(&self) -> Bytes {
        match self {
            WaitEnded::HungUp => protocol::error_response(
                Severity::Fatal,
                "08006",
                "client closed the connection while waiting for a server",
            ),
            _ => protocol::error_response(Severity::Fatal, "57P01", KILLED),
        }
    }
}

/// Builds the ErrorResponse for a queued request whose connection failed:
/// the request was on the server, so it may have run.
fn queued_request_lost() -> Bytes {
    protocol::error_response(
        Severity::Error,
        "08006",
        "server connection lost after the query was sent to it, so the query may have run",
    )
}

/// A connection handed over with the client's Query on it.
struct Handed {
    delivery: Delivery,
    /// A cancel request for the client came while its Query was queued.
    /// It is sent once the connection is attached to the client.
    cancelled: bool,
}
