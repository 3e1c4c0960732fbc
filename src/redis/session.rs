//! One client connection: reads requests, routes each one, and writes the
//! replies back in request order through a bounded queue.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::cache::{self, ClientTracking};
use super::command::{pinning, Pinning};
use super::frame::{parse_request, FrameError, Protocol, Request};
use super::multibulk;
use super::order::{self, MapOrder, Outstanding};
use super::reply;
use super::router::{InFlight, Pending, Router, SessionCtx};
use super::routes::{RouteId, Routes, MAIN};
use super::stop::{StopSignal, StopWatch};
use super::transaction::Transaction;

/// Bytes gathered before the writer flushes to the client.
const MAX_WRITE_BYTES: usize = 64 * 1024;
/// Bytes of ready replies a session gathers before queueing them for its
/// writer as one item.
const MAX_BATCH_BYTES: usize = 16 * 1024;
/// Maximum replies in flight a session keeps before queueing them for its
/// writer as one item.
const MAX_HELD_REPLIES: usize = 64;
/// Maximum permits of a client's reply queue, whatever the value of
/// `client_queue_depth`: far more replies than a client can have
/// outstanding.
const MAX_ROOM: u32 = 1 << 24;
/// Read buffer space for an idle client; kept small because thousands of
/// idle clients each hold one.
const IDLE_READ_BYTES: usize = 4 * 1024;
/// Spare read buffer space below which an idle client gets a new buffer.
/// Requests are cut out of the buffer and keep it alive, so it cannot be
/// reused in place. Reading into what is left of it means one allocation
/// per several reads instead of one per read.
const MIN_IDLE_SPARE: usize = 1024;
/// Read buffer space while a request is partly read; it doubles with the
/// buffered part, so a large value takes few reads.
const MIN_READ_BYTES: usize = 16 * 1024;

/// An item for the session's writer, queued in request order.
pub enum Outgoing {
    Reply(Pending),
    /// Replies of consecutive requests, in request order.
    Replies(Vec<Pending>),
    /// From here on, count replies and interleave the client's
    /// invalidation pushes (`CLIENT TRACKING ON`).
    Track(Arc<ClientTracking>),
    /// Fired once every earlier reply has been written.
    Barrier(oneshot::Sender<()>),
    /// Flush and close the connection.
    Close,
}

impl Outgoing {
    /// Returns the permits of the writer's `room` the item takes: one per
    /// reply, and one for any other item.
    fn replies(&self) -> u32 {
        match self {
            Outgoing::Replies(list) => list.len() as u32,
            _ => 1,
        }
    }
}

/// The client socket's write half, shared by the session and its writer
/// task. The session writes ready replies itself while the writer has
/// nothing left to write, which saves a queue handoff and a task wake-up
/// per reply. Otherwise replies go through the writer, in request order.
pub struct ClientWriter {
    half: OwnedWriteHalf,
    /// Items queued for the writer whose bytes are not all written yet.
    /// The session writes directly only while it is 0.
    queued: AtomicUsize,
    /// Cleared for good once the writer may send invalidation pushes
    /// (`CLIENT TRACKING`), because it writes them whenever they arrive.
    direct: AtomicBool,
    /// One permit per reply the queue may still take: `client_queue_depth`
    /// in all. Closed when the writer stops.
    room: tokio::sync::Semaphore,
    /// All the permits of `room`. No item requests more, since that wait
    /// would never end.
    room_size: u32,
}

impl ClientWriter {
    /// Writes what it can of `bytes` without waiting, if no earlier reply
    /// is still unwritten. Returns the bytes left, all of them when the
    /// session must not write now.
    fn try_write_now(&self, bytes: &Bytes) -> io::Result<Bytes> {
        let written = self.try_write_start(bytes)?;
        Ok(bytes.slice(written..))
    }

    /// Writes what it can of `bytes` without waiting, as
    /// [`ClientWriter::try_write_now`] does, and returns how many bytes
    /// were written.
    fn try_write_start(&self, bytes: &[u8]) -> io::Result<usize> {
        if !self.may_write_directly() {
            return Ok(0);
        }
        let mut written = 0;
        while written < bytes.len() {
            match self.half.try_write(&bytes[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(count) => written += count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(err),
            }
        }
        Ok(written)
    }

    /// True when the session may write to the socket itself: no queued
    /// reply is unwritten and the writer sends no invalidation pushes.
    fn may_write_directly(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0 && self.direct.load(Ordering::Relaxed)
    }

    /// Writes all of `bytes`, waiting while the socket is full.
    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.half.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(count) => bytes = &bytes[count..],
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.half.writable().await?,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Returns the permits of `room` that `item` takes while queued, never
    /// more than `room` has.
    fn permits(&self, item: &Outgoing) -> u32 {
        item.replies().min(self.room_size)
    }

    /// Marks `taken` queued items as written.
    fn release(&self, taken: &mut usize) {
        if *taken > 0 {
            self.queued.fetch_sub(*taken, Ordering::Release);
            *taken = 0;
        }
    }
}

/// Whether the session goes on after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

/// Reads requests from the client socket.
pub struct ClientReader {
    half: OwnedReadHalf,
    buf: BytesMut,
    max_request_bytes: usize,
}

impl ClientReader {
    /// Returns the next request, `Ok(None)` at end of stream. Cancel-safe:
    /// bytes read before cancellation stay buffered.
    pub async fn next(&mut self) -> Result<Option<Request>, FrameError> {
        loop {
            if let Some(request) = self.parse_buffered()? {
                return Ok(Some(request));
            }
            if !self.read_more().await {
                return Ok(None);
            }
        }
    }

    /// Returns the next request already buffered, without reading.
    fn parse_buffered(&mut self) -> Result<Option<Request>, FrameError> {
        parse_request(&mut self.buf, self.max_request_bytes)
    }

    /// Reads more bytes; false at end of stream. Cancel-safe.
    async fn read_more(&mut self) -> bool {
        self.reserve();
        matches!(self.half.read_buf(&mut self.buf).await, Ok(read) if read > 0)
    }

    /// True when bytes of a further request are buffered.
    fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    fn reserve(&mut self) {
        let spare = match self.buf.len() {
            0 if self.buf.capacity() >= MIN_IDLE_SPARE => return,
            0 => IDLE_READ_BYTES,
            // Never more than needed to see that a request is too large.
            buffered => {
                let to_limit = self.max_request_bytes.saturating_sub(buffered) + 1;
                buffered
                    .max(MIN_READ_BYTES)
                    .min(to_limit.max(IDLE_READ_BYTES))
            }
        };
        self.buf.reserve(spare);
    }

    /// Waits until the client closes its connection, buffering what it sends
    /// meanwhile up to the request size limit.
    pub async fn closed(&mut self) {
        loop {
            if self.buf.len() > self.max_request_bytes {
                std::future::pending::<()>().await;
            }
            self.reserve();
            match self.half.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// State of one client connection.
pub struct Session {
    /// The routers of `[redis]` and of every route.
    pub(super) routes: Arc<Routes>,
    /// The router of the current request, or of the pinned connection
    /// during a transaction or WATCH. `route` is its index.
    pub(super) router: Arc<Router>,
    pub(super) route: RouteId,
    /// `ctx.db` is the database selected upstream through `router`.
    pub(super) ctx: SessionCtx,
    /// The database the client selected, which `CLIENT INFO` reports and
    /// which decides its database route.
    pub(super) client_db: u32,
    pub(super) peer: SocketAddr,
    pub(super) authenticated: bool,
    pub(super) name: Option<Bytes>,
    pub(super) reader: ClientReader,
    /// Bounded by the writer's `room`, counted in replies.
    pub(super) queue: mpsc::UnboundedSender<Outgoing>,
    /// Maximum entries of a list of held replies: [`MAX_HELD_REPLIES`], or
    /// `client_queue_depth` when smaller, since the list takes a permit of
    /// the writer's `room` per entry.
    max_held: usize,
    writer: Arc<ClientWriter>,
    pub(super) transaction: Option<Transaction>,
    /// Holds back a command routed by a new cluster slot map until the
    /// commands routed by the old one have their final replies.
    map_order: MapOrder,
    /// Ready replies not yet queued for the writer. While the client has
    /// more requests buffered, their replies are gathered here and queued
    /// as one item, which saves a queue handoff and often a write per
    /// request for pipelining clients.
    batch: parking_lot::Mutex<BytesMut>,
    /// Replies not yet ready, held while the client has more requests
    /// buffered and queued for the writer as one item, with the replies
    /// gathered in `batch` after them. A pipelining client's requests then
    /// cost one queue handoff per read instead of one each.
    held_replies: parking_lot::Mutex<Vec<Pending>>,
    /// True while replies may be gathered: set for each request the read
    /// loop handles, cleared by [`Session::drain`] before a pinned
    /// connection relays replies outside the read loop.
    batching: std::sync::atomic::AtomicBool,
    /// Set while the client has `CLIENT TRACKING` on.
    pub(super) tracking: Option<Arc<ClientTracking>>,
    /// Cancelled when skiff shuts down; blocked and subscribed sessions end.
    pub(super) shutdown: CancellationToken,
    /// Fires when `shutdown` is cancelled. Made once and polled by the read
    /// loop, because a new wait per read registers and unregisters again.
    stopping: StopWatch,
}

/// Serves one client until it disconnects or skiff shuts down. `client_id`
/// is its CLIENT ID and picks its shared upstream connections.
pub async fn run(
    routes: Arc<Routes>,
    stream: TcpStream,
    peer: SocketAddr,
    client_id: u64,
    shutdown: CancellationToken,
    stop: Arc<StopSignal>,
) {
    let _ = stream.set_nodelay(true);
    let router = routes.main().clone();
    let (read_half, write_half) = stream.into_split();
    let depth = router.config().client_queue_depth;
    let (queue, replies) = mpsc::unbounded_channel();
    let room_size = u32::try_from(depth).unwrap_or(u32::MAX).min(MAX_ROOM);
    let client_writer = Arc::new(ClientWriter {
        half: write_half,
        queued: AtomicUsize::new(0),
        direct: AtomicBool::new(true),
        room: tokio::sync::Semaphore::new(room_size as usize),
        room_size,
    });
    let writer = tokio::spawn(write_replies(
        client_writer.clone(),
        replies,
        router.clone(),
    ));
    let mut session = Session {
        ctx: SessionCtx {
            protocol: Protocol::Resp2,
            db: 0,
            client_id,
            map_version: 0,
        },
        client_db: 0,
        route: MAIN,
        routes,
        peer,
        authenticated: router.config().client_password.is_none(),
        name: None,
        reader: ClientReader {
            half: read_half,
            buf: BytesMut::new(),
            max_request_bytes: router.config().max_request_bytes,
        },
        queue,
        max_held: MAX_HELD_REPLIES.min(depth),
        writer: client_writer,
        transaction: None,
        map_order: MapOrder::default(),
        batch: parking_lot::Mutex::new(BytesMut::new()),
        held_replies: parking_lot::Mutex::new(Vec::new()),
        batching: std::sync::atomic::AtomicBool::new(false),
        tracking: None,
        stopping: stop.watch(),
        shutdown,
        router,
    };
    session.read_loop().await;
    session.stop_tracking();
    session.flush_batch().await;
    let _ = session.enqueue(Outgoing::Close).await;
    drop(session);
    let _ = writer.await;
}

impl Session {
    async fn read_loop(&mut self) {
        loop {
            if self.serve_cached_get() {
                if self.batch.lock().len() >= MAX_BATCH_BYTES
                    && self.flush_batch().await == Flow::Close
                {
                    return;
                }
                continue;
            }
            let request = match self.reader.parse_buffered() {
                Ok(Some(request)) => request,
                Ok(None) => {
                    // Nothing more buffered: what was gathered goes out
                    // before waiting for the client.
                    if self.flush_batch().await == Flow::Close {
                        return;
                    }
                    let more = tokio::select! {
                        _ = &mut self.stopping => return,
                        more = self.reader.read_more() => more,
                    };
                    if !more {
                        return;
                    }
                    continue;
                }
                Err(err) => {
                    tracing::debug!(client.addr = %self.peer, error = %err, "invalid request");
                    let text = match err {
                        FrameError::TooLarge { .. } => {
                            "ERR Protocol error: invalid bulk length".into()
                        }
                        FrameError::Invalid(_) => format!("ERR {err}"),
                    };
                    self.reply(reply::error(&text)).await;
                    return;
                }
            };
            self.batching.store(true, Ordering::Relaxed);
            if self.handle(request).await == Flow::Close {
                return;
            }
        }
    }

    /// Serves the next buffered request from the near cache when it is a
    /// `GET` of a cached key, copying the reply straight into the batch
    /// without building a request or a reply buffer. Returns false, having
    /// changed nothing, for any other request, which then takes the usual
    /// path through [`Session::handle`].
    fn serve_cached_get(&mut self) -> bool {
        // The usual path does more than look up the cache in these cases.
        if self.transaction.is_some()
            || self.tracking.is_some()
            || !self.authenticated
            || !self.routes.is_empty()
            || !self.router.cache.is_enabled()
        {
            return false;
        }
        let Some((length, name, key)) =
            multibulk::peek_two_args(&self.reader.buf, self.reader.max_request_bytes)
        else {
            return false;
        };
        if !name.eq_ignore_ascii_case(b"GET") {
            return false;
        }
        let mut batch = self.batch.lock();
        if !cache::copy_cached_get(&self.router, key, self.ctx, &mut batch) {
            return false;
        }
        drop(batch);
        self.reader.buf.advance(length);
        true
    }

    pub(super) async fn handle(&mut self, request: Request) -> Flow {
        // Borrowed once: every use below takes the name as `&str`.
        let command = request.name();
        let name = command.as_str();
        if let Some(tracking) = &self.tracking {
            tracking.begin_request();
        }
        if self.transaction.is_some() {
            return self.handle_in_transaction(request, name).await;
        }
        if !self.authenticated && !matches!(name, "AUTH" | "HELLO" | "QUIT" | "RESET") {
            return self.reply(reply::error(reply::NOAUTH)).await;
        }
        if let Some(flow) = self.handle_local(&request, name).await {
            return flow;
        }
        if matches!(name, "MONITOR" | "SYNC" | "PSYNC" | "REPLCONF") {
            // These turn a connection into a stream that is no longer
            // request and reply, which would break a shared connection.
            let text = format!("ERR {name} is not supported through skiff");
            return self.reply(reply::error(&text)).await;
        }
        if !self.routes.is_empty() {
            match self.pick_route(&request, name) {
                Ok(route) => self.use_route(route),
                // Split per route when the client subscribes.
                Err(_) if matches!(name, "SUBSCRIBE" | "PSUBSCRIBE") => {}
                Err(error) => return self.reply(error).await,
            }
        }
        match pinning(name, &request) {
            Pinning::Blocking => self.run_blocking(request, name).await,
            Pinning::Subscribe => self.run_subscribed(request, name).await,
            Pinning::Transaction => self.start_transaction(request, name).await,
            Pinning::None if self.loads_scripts_everywhere(&request, name) => {
                let pending = self.submit_to_every_route(request, name).await;
                self.send(Outgoing::Reply(pending)).await
            }
            Pinning::None => {
                self.note_reads(&request, name);
                let Some((ctx, outstanding)) = self.keep_map_order().await else {
                    return Flow::Close;
                };
                let mut pending = self.router.submit(request, name, ctx).await;
                if let Some(outstanding) = outstanding {
                    order::track(&mut pending, outstanding);
                }
                match pending {
                    Pending::InFlight(in_flight) if self.may_wait_inline() => {
                        self.wait_inline(in_flight).await
                    }
                    pending => {
                        self.send(Outgoing::Reply(self.resolved_by_route(pending)))
                            .await
                    }
                }
            }
        }
    }

    /// Returns the context of a command routed now and, in cluster mode,
    /// its count among the outstanding commands. In cluster mode it first
    /// waits while the writer retries a command, or until every command
    /// routed by an earlier slot map has its final reply. Returns `None`
    /// when the client is gone.
    async fn keep_map_order(&mut self) -> Option<(SessionCtx, Option<Outstanding>)> {
        loop {
            let Some(cluster) = &self.router.cluster else {
                return Some((self.ctx, None));
            };
            let version = cluster.version();
            if let Some(outstanding) = self.map_order.reserve(self.route, version) {
                let ctx = SessionCtx {
                    map_version: version,
                    ..self.ctx
                };
                return Some((ctx, Some(outstanding)));
            }
            // Held replies are outstanding too, so the writer must have
            // them.
            if self.flush_batch().await == Flow::Close {
                return None;
            }
            self.map_order.all_replied(self.route).await;
        }
    }

    /// Returns the route for `request`: the client's database route, else
    /// the route of its keys, else `[redis]`'s.
    pub(super) fn pick_route(&self, request: &Request, name: &str) -> Result<RouteId, Bytes> {
        if let Some(route) = self.routes.database_route(self.client_db) {
            return Ok(route);
        }
        Ok(self.routes.route_of_keys(name, request)?.unwrap_or(MAIN))
    }

    /// True when the keys of a command decide its route: some route lists
    /// prefixes and the client's database is not a route's.
    pub(super) fn keys_pick_route(&self) -> bool {
        self.routes.any_prefixes() && self.routes.database_route(self.client_db).is_none()
    }

    /// Sends the following requests through route `route`.
    pub(super) fn use_route(&mut self, route: RouteId) {
        if route != self.route {
            self.router = self.routes.router(route).clone();
            self.route = route;
        }
        self.ctx.db = self.routes.upstream_db(route, self.client_db);
    }

    /// True for `SCRIPT LOAD`, `SCRIPT FLUSH` and `SCRIPT EXISTS` when keys
    /// pick the route. They have no keys, but a later `EVALSHA` goes to the
    /// route of its keys, so every route must hold the same scripts.
    fn loads_scripts_everywhere(&self, request: &Request, name: &str) -> bool {
        name == "SCRIPT"
            && self.keys_pick_route()
            && matches!(
                request.arg_upper(1).as_deref(),
                Some("LOAD" | "FLUSH" | "EXISTS")
            )
    }

    /// Sends `request` through every route and returns `[redis]`'s reply
    /// once all have replied, or the first error among them. For
    /// `SCRIPT EXISTS`, a script exists only where every route has it, since
    /// `EVALSHA` may run on any of them.
    async fn submit_to_every_route(&mut self, request: Request, name: &str) -> Pending {
        let exists = request.arg_upper(1).as_deref() == Some("EXISTS");
        let protocol = self.ctx.protocol;
        let mut replies = Vec::new();
        let ids: Vec<RouteId> = (0..self.routes.all().count()).collect();
        for id in ids {
            self.use_route(id);
            let pending = self.router.submit(request.clone(), name, self.ctx).await;
            replies.push((self.router.clone(), pending));
        }
        self.use_route(MAIN);
        Pending::Future(Box::pin(async move {
            let mut first = None;
            let mut all_have = Vec::new();
            for (router, pending) in replies {
                let reply = pending.resolve(&router).await;
                if super::frame::error_text(&reply).is_some() {
                    return reply;
                }
                if exists {
                    let Some(flags) = script_flags(&reply, protocol) else {
                        return reply::error("ERR unexpected reply to SCRIPT EXISTS");
                    };
                    if first.is_none() {
                        all_have = flags;
                    } else {
                        for (have, flag) in all_have.iter_mut().zip(flags) {
                            *have = *have && flag;
                        }
                    }
                }
                first.get_or_insert(reply);
            }
            match first {
                Some(_) if exists => {
                    let flags: Vec<Bytes> = all_have
                        .into_iter()
                        .map(|have| reply::integer(i64::from(have)))
                        .collect();
                    reply::array(&flags)
                }
                Some(reply) => reply,
                None => reply::error("ERR no upstream node is available"),
            }
        }))
    }

    /// True when the session may wait for a reply itself and write it: the
    /// client has sent nothing more, no earlier reply is waiting to be
    /// written, and no invalidation push can come between. A client that
    /// sends one request at a time then costs no hand-off to the writer
    /// task.
    fn may_wait_inline(&self) -> bool {
        self.tracking.is_none()
            && !self.reader.has_buffered()
            && self.writer.may_write_directly()
            && self.batch.lock().is_empty()
            && self.held_replies.lock().is_empty()
    }

    /// Waits for the reply of `in_flight` and writes it, unless the client
    /// sends more first: the reply then goes to the writer task, in order,
    /// and the session goes back to reading requests.
    async fn wait_inline(&mut self, mut in_flight: InFlight) -> Flow {
        let received = tokio::select! {
            biased;
            received = &mut in_flight.receiver => Some(received),
            // The socket's own read slot, which the next read uses too,
            // instead of a waiter queued in a locked list by `readable`.
            _ = std::future::poll_fn(|cx| self.reader.half.as_ref().poll_read_ready(cx)) => None,
            _ = &mut self.stopping => None,
        };
        let Some(received) = received else {
            let pending = self.resolved_by_route(Pending::InFlight(in_flight));
            return self.send(Outgoing::Reply(pending)).await;
        };
        let reply = self.router.clone().complete(in_flight, received).await;
        self.send(Outgoing::Reply(Pending::Ready(reply))).await
    }

    /// Makes a reply in flight on a route's connection resolve through
    /// that route's router, because the writer resolves the rest through
    /// `[redis]`'s.
    fn resolved_by_route(&self, pending: Pending) -> Pending {
        match pending {
            Pending::InFlight(in_flight) if self.route != MAIN => {
                let router = self.router.clone();
                Pending::Future(Box::pin(router.finish(in_flight)))
            }
            pending => pending,
        }
    }

    /// Queues a reply skiff wrote itself.
    pub(super) async fn reply(&self, bytes: Bytes) -> Flow {
        self.send(Outgoing::Reply(Pending::Ready(bytes))).await
    }

    pub(super) async fn send(&self, mut item: Outgoing) -> Flow {
        match item {
            Outgoing::Reply(Pending::Ready(ref bytes)) if self.gather(bytes) => {
                return Flow::Continue;
            }
            Outgoing::Reply(Pending::Ready(_)) => {}
            Outgoing::Reply(pending) => match self.hold(pending) {
                Some(pending) => item = Outgoing::Reply(pending),
                None => return Flow::Continue,
            },
            _ => {}
        }
        if self.flush_batch().await == Flow::Close {
            return Flow::Close;
        }
        if let (Outgoing::Reply(Pending::Ready(bytes)), None) = (&item, &self.tracking) {
            match self.writer.try_write_now(bytes) {
                Ok(rest) if rest.is_empty() => return Flow::Continue,
                Ok(rest) => item = Outgoing::Reply(Pending::Ready(rest)),
                Err(_) => return Flow::Close,
            }
        }
        let is_reply = matches!(item, Outgoing::Reply(_));
        if self.enqueue(item).await == Flow::Close {
            return Flow::Close;
        }
        if let (true, Some(tracking)) = (is_reply, &self.tracking) {
            tracking.reply_queued();
        }
        Flow::Continue
    }

    /// Queues `item` for the writer task, waiting while the queue contains
    /// `client_queue_depth` replies.
    async fn enqueue(&self, item: Outgoing) -> Flow {
        match self
            .writer
            .room
            .acquire_many(self.writer.permits(&item))
            .await
        {
            Ok(permits) => permits.forget(),
            // The writer stopped: the client is gone.
            Err(_) => return Flow::Close,
        }
        self.writer.queued.fetch_add(1, Ordering::Relaxed);
        match self.queue.send(item) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }

    /// True while replies may wait in the session: the read loop handles
    /// requests, no invalidation push can come between replies, and the
    /// client has more requests buffered.
    fn may_gather(&self) -> bool {
        self.batching.load(Ordering::Relaxed)
            && self.tracking.is_none()
            && self.reader.has_buffered()
    }

    /// Holds a reply not yet ready when the client has more requests
    /// buffered; returns it when it must be queued now.
    fn hold(&self, pending: Pending) -> Option<Pending> {
        if !self.may_gather() {
            return Some(pending);
        }
        let mut held = self.held_replies.lock();
        let mut batch = self.batch.lock();
        // The list takes the gathered batch, this reply, and at the flush
        // the replies gathered after it: all within `max_held`.
        let entries = held.len() + usize::from(!batch.is_empty()) + 2;
        if entries > self.max_held {
            return Some(pending);
        }
        move_batch(&mut held, &mut batch);
        held.push(pending);
        None
    }

    /// Adds a ready reply to the batch when the client has more requests
    /// buffered; false when it must be queued now.
    fn gather(&self, reply: &Bytes) -> bool {
        if !self.may_gather() {
            return false;
        }
        let mut batch = self.batch.lock();
        if batch.len() + reply.len() > MAX_BATCH_BYTES {
            return false;
        }
        batch.extend_from_slice(reply);
        true
    }

    /// Queues the gathered replies for the writer.
    pub(super) async fn flush_batch(&self) -> Flow {
        let held = {
            let mut held = self.held_replies.lock();
            if !held.is_empty() {
                move_batch(&mut held, &mut self.batch.lock());
            }
            std::mem::take(&mut *held)
        };
        if !held.is_empty() {
            return self.enqueue(Outgoing::Replies(held)).await;
        }
        // Gathering is off while tracking is on, so no reply here counts
        // for a tracking client's pushes. The batch is written in place, so
        // its buffer is kept for the next one unless part of it must be
        // queued.
        let rest = {
            let mut batch = self.batch.lock();
            if batch.is_empty() {
                return Flow::Continue;
            }
            match self.writer.try_write_start(&batch) {
                Ok(written) if written == batch.len() => {
                    batch.clear();
                    return Flow::Continue;
                }
                Ok(written) => {
                    batch.advance(written);
                    batch.split().freeze()
                }
                Err(_) => return Flow::Close,
            }
        };
        self.enqueue(Outgoing::Reply(Pending::Ready(rest))).await
    }

    /// Records the keys of a read for a client with tracking on.
    pub(super) fn note_reads(&self, request: &Request, name: &str) {
        let Some(tracking) = &self.tracking else {
            return;
        };
        let table = self.router.commands();
        if !table.is_readonly(name, request) {
            return;
        }
        let keys: Vec<Bytes> = table
            .key_positions(name, request)
            .into_iter()
            .filter_map(|position| request.args.get(position))
            .map(|key| Bytes::copy_from_slice(key))
            .collect();
        if !keys.is_empty() {
            self.router.cache.client_reads(tracking.id, keys);
        }
    }

    /// Turns `CLIENT TRACKING` off, if it was on.
    pub(super) fn stop_tracking(&mut self) {
        if let Some(tracking) = self.tracking.take() {
            for router in self.routes.all() {
                router.cache.untrack_client(tracking.id);
            }
        }
    }

    /// Waits until every earlier reply has been written, so every earlier
    /// request has run before a pinned connection takes over.
    pub(super) async fn drain(&self) -> Flow {
        self.batching.store(false, Ordering::Relaxed);
        let (done, written) = oneshot::channel();
        if self.send(Outgoing::Barrier(done)).await == Flow::Close {
            return Flow::Close;
        }
        match written.await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }
}

/// Moves the replies gathered in `batch`, if any, to the end of `held`, so
/// they keep their place after the replies held before them.
fn move_batch(held: &mut Vec<Pending>, batch: &mut BytesMut) {
    if !batch.is_empty() {
        held.push(Pending::Ready(batch.split().freeze()));
    }
}

/// Returns, from a `SCRIPT EXISTS` reply, whether each script exists.
fn script_flags(reply: &Bytes, protocol: Protocol) -> Option<Vec<bool>> {
    let items = super::frame::Value::decode(reply, protocol)?.into_items()?;
    items
        .iter()
        .map(|item| item.as_int().map(|flag| flag == 1))
        .collect()
}

/// Closes the writer's `room` when the writer stops, so a session waiting
/// for room hears that the client is gone.
struct CloseRoom(Arc<ClientWriter>);

impl Drop for CloseRoom {
    fn drop(&mut self) {
        self.0.room.close();
    }
}

async fn write_replies(
    writer: Arc<ClientWriter>,
    mut replies: mpsc::UnboundedReceiver<Outgoing>,
    router: Arc<Router>,
) {
    let _close = CloseRoom(writer.clone());
    let mut out = BytesMut::new();
    // Set once the client turns on tracking; `written` counts the replies
    // written since, to place its invalidation pushes.
    let mut tracking: Option<Arc<ClientTracking>> = None;
    let mut written: u64 = 0;
    // Items taken off the queue whose bytes are not all written yet.
    let mut taken: usize = 0;
    loop {
        let item = match &tracking {
            None => replies.recv().await,
            Some(pushes) => tokio::select! {
                biased;
                item = replies.recv() => item,
                _ = pushes.notified() => {
                    pushes.take_due(written, &mut out);
                    if replies.is_empty() && !out.is_empty() {
                        if writer.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                        writer.release(&mut taken);
                    }
                    continue;
                }
            },
        };
        let Some(item) = item else {
            break;
        };
        // Room for more, as a bounded channel frees a slot on receipt.
        writer.room.add_permits(writer.permits(&item) as usize);
        taken += 1;
        match item {
            Outgoing::Reply(pending) => {
                let bytes = pending.resolve(&router).await;
                let alone = bytes.len() >= MAX_WRITE_BYTES || replies.is_empty();
                if out.is_empty() && alone && tracking.is_none() {
                    // A large reply, or one with nothing queued behind it,
                    // goes out as it is, without a copy.
                    if writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                    writer.release(&mut taken);
                    continue;
                }
                out.extend_from_slice(&bytes);
                if let Some(pushes) = &tracking {
                    written += 1;
                    pushes.take_due(written, &mut out);
                }
            }
            // Never queued while tracking is on, so no push goes between.
            Outgoing::Replies(list) => {
                for pending in list {
                    let bytes = pending.resolve(&router).await;
                    out.extend_from_slice(&bytes);
                    if out.len() >= MAX_WRITE_BYTES {
                        if writer.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
            }
            Outgoing::Track(pushes) => {
                // From now on pushes are written whenever they arrive, so
                // the session must stop writing directly.
                writer.direct.store(false, Ordering::Relaxed);
                tracking = Some(pushes);
                written = 0;
                continue;
            }
            Outgoing::Barrier(done) => {
                if writer.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
                writer.release(&mut taken);
                let _ = done.send(());
                continue;
            }
            Outgoing::Close => break,
        }
        if replies.is_empty() || out.len() >= MAX_WRITE_BYTES {
            if writer.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            writer.release(&mut taken);
        }
    }
    // The socket's write side shuts down when the session and this task
    // have both dropped it.
    let _ = writer.write_all(&out).await;
}
