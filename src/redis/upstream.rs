//! Upstream server connections: the connection handshake, a plain
//! request/reply connection for pinned sessions, and a pipelined connection
//! shared by many clients with replies matched to requests in FIFO order.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use super::frame::{encode_command, error_text, parse_reply, FrameError, Protocol, ReplyKind};
use crate::tls::{self, ReadHalf, Stream, TlsConnector, WriteHalf};

/// Bytes of requests queued on one pipelined connection above which a
/// sender waits for the writer. One request of any size may always be
/// queued below it.
const MAX_QUEUED_BYTES: usize = 1024 * 1024;
/// Queued bytes from which a sender writes to a plain connection itself
/// when the writer is not writing.
const DIRECT_WRITE_BYTES: usize = 4 * 1024;
/// Replies from this size up are copied out of the read buffer.
const OWN_ALLOCATION_BYTES: usize = 64 * 1024;
/// Capacity of a write buffer kept for the next write; a larger one, left
/// by a large request, is let go.
const MAX_KEPT_BYTES: usize = 256 * 1024;

/// Failure talking to an upstream server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: connect failed: {message}")]
    Connect { addr: String, message: String },
    #[error("upstream {addr}: connect timed out")]
    ConnectTimeout { addr: String },
    #[error("upstream {addr}: handshake rejected: {message}")]
    Handshake { addr: String, message: String },
    #[error("upstream {addr}: TLS handshake failed: {message}")]
    Tls { addr: String, message: String },
    #[error("upstream {addr}: connection closed")]
    Closed { addr: String },
    /// The connection closed before the request was queued for writing.
    #[error("upstream {addr}: connection closed before the request was sent")]
    NotSent { addr: String },
    #[error("upstream {addr}: {message}")]
    Io { addr: String, message: String },
    #[error("upstream {addr}: no reply within {timeout:?}; the command may have run")]
    ReplyTimeout { addr: String, timeout: Duration },
}

impl UpstreamError {
    /// True when the request was never written, so sending it again elsewhere
    /// cannot run it twice.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Handshake { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::NotSent { .. }
        )
    }
}

/// How to set up a new upstream connection.
#[derive(Clone)]
pub struct ConnSettings {
    pub protocol: Protocol,
    pub db: u32,
    /// Send READONLY so a cluster replica serves reads.
    pub readonly: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// Maximum wait for a reply: see `[redis] reply_timeout`. Zero turns
    /// the watch of a shared connection off.
    pub reply_timeout: Duration,
    pub max_reply_bytes: usize,
    /// None for plain TCP.
    pub tls: Option<UpstreamTls>,
}

/// TLS settings of upstream connections, cheap to clone.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: TlsConnector,
    /// Name checked in every certificate in place of the node's host.
    pub server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Builds the settings from `[redis]`: certificates are checked against
    /// `ca_file` (or the built-in roots) and the node's name.
    pub fn new(
        ca_file: Option<&std::path::Path>,
        server_name: Option<&str>,
    ) -> Result<Self, String> {
        let roots = tls::load_roots(ca_file).map_err(|err| format!("[redis] {err}"))?;
        let config = tls::client_config(tls::Verify::ChainAndName, roots)
            .map_err(|err| format!("[redis] {err}"))?;
        let server_name = server_name
            .map(tls::server_name)
            .transpose()
            .map_err(|err| format!("[redis] tls_server_name: {err}"))?;
        Ok(UpstreamTls {
            connector: TlsConnector::from(config),
            server_name,
        })
    }

    /// Runs the TLS handshake with the node at `addr` (`host:port`).
    async fn connect(&self, tcp: TcpStream, addr: &str) -> Result<Stream, UpstreamError> {
        let tls_error = |message: String| UpstreamError::Tls {
            addr: addr.to_string(),
            message,
        };
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
                tls::server_name(host).map_err(|err| tls_error(err.to_string()))?
            }
        };
        Stream::connect_tls(tcp, &self.connector, name.clone())
            .await
            .map_err(|err| tls_error(tls::describe_handshake_error(&err, &name)))
    }
}

/// One upstream connection used directly: a request, then its reply.
pub struct RawConn {
    pub addr: String,
    gauge: ConnGauge,
    stream: Stream,
    buf: BytesMut,
    protocol: Protocol,
    max_reply_bytes: usize,
    /// From [`ConnSettings`]: zero when off.
    reply_timeout: Duration,
    connect_timeout: Duration,
}

impl RawConn {
    /// Connects to `addr`, runs the TLS handshake when TLS is configured,
    /// and runs HELLO/AUTH, SELECT and READONLY.
    pub async fn connect(addr: &str, settings: &ConnSettings) -> Result<RawConn, UpstreamError> {
        let connect = TcpStream::connect(addr);
        let tcp = tokio::time::timeout(settings.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { addr: addr.into() })?
            .map_err(|err| UpstreamError::Connect {
                addr: addr.into(),
                message: err.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = match &settings.tls {
            Some(tls) => tokio::time::timeout(settings.connect_timeout, tls.connect(tcp, addr))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout { addr: addr.into() })??,
            None => Stream::Plain(tcp),
        };
        let mut conn = RawConn {
            addr: addr.to_string(),
            gauge: ConnGauge::new(addr),
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            protocol: settings.protocol,
            max_reply_bytes: settings.max_reply_bytes,
            reply_timeout: settings.reply_timeout,
            connect_timeout: settings.connect_timeout,
        };
        let handshake = tokio::time::timeout(settings.connect_timeout, conn.handshake(settings));
        handshake
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { addr: addr.into() })??;
        Ok(conn)
    }

    async fn handshake(&mut self, settings: &ConnSettings) -> Result<(), UpstreamError> {
        let mut commands: Vec<Vec<String>> = Vec::new();
        let user = settings
            .username
            .clone()
            .unwrap_or_else(|| "default".into());
        match (settings.protocol, &settings.password) {
            (Protocol::Resp3, Some(password)) => commands.push(vec![
                "HELLO".into(),
                "3".into(),
                "AUTH".into(),
                user,
                password.clone(),
            ]),
            (Protocol::Resp3, None) => commands.push(vec!["HELLO".into(), "3".into()]),
            (Protocol::Resp2, Some(password)) => {
                commands.push(vec!["AUTH".into(), user, password.clone()])
            }
            (Protocol::Resp2, None) => {}
        }
        if settings.db != 0 {
            commands.push(vec!["SELECT".into(), settings.db.to_string()]);
        }
        if settings.readonly {
            commands.push(vec!["READONLY".into()]);
        }
        for command in &commands {
            let reply = self.call(&encode_command(command)).await?;
            if let Some(text) = error_text(&reply) {
                return Err(UpstreamError::Handshake {
                    addr: self.addr.clone(),
                    message: text.to_string(),
                });
            }
        }
        Ok(())
    }

    /// True when the connection is idle and still open: nothing is buffered
    /// and the server has neither sent data nor closed it. Checked before an
    /// idle connection is reused, because servers with a `timeout` setting
    /// close idle clients.
    pub fn is_reusable(&mut self) -> bool {
        self.buf.is_empty() && self.stream.is_idle()
    }

    /// Writes raw request bytes.
    pub async fn send(&mut self, raw: &[u8]) -> Result<(), UpstreamError> {
        self.stream
            .send(raw)
            .await
            .map_err(|err| UpstreamError::Io {
                addr: self.addr.clone(),
                message: err.to_string(),
            })
    }

    /// Reads the next frame, push or reply.
    pub async fn read_frame(&mut self) -> Result<(Bytes, ReplyKind), UpstreamError> {
        read_frame(
            &mut self.stream,
            &mut self.buf,
            self.protocol,
            self.max_reply_bytes,
            &self.addr,
        )
        .await
    }

    /// Sends one request of skiff's own and returns its reply, as
    /// [`RawConn::call`] does, failing after `reply_timeout` (or
    /// `connect_timeout` when that is off).
    pub async fn call_bounded(&mut self, raw: &[u8]) -> Result<Bytes, UpstreamError> {
        let timeout = match self.reply_timeout {
            Duration::ZERO => self.connect_timeout,
            timeout => timeout,
        };
        match tokio::time::timeout(timeout, self.call(raw)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ReplyTimeout {
                addr: self.addr.clone(),
                timeout,
            }),
        }
    }

    /// Sends one request and returns its reply, skipping pushes.
    pub async fn call(&mut self, raw: &[u8]) -> Result<Bytes, UpstreamError> {
        self.send(raw).await?;
        loop {
            let (frame, kind) = self.read_frame().await?;
            if kind != ReplyKind::Push {
                return Ok(frame);
            }
        }
    }
}

/// Counts an open upstream connection in `skiff_redis_upstream_connections`
/// for as long as it lives.
struct ConnGauge {
    node: String,
}

impl ConnGauge {
    fn new(node: &str) -> ConnGauge {
        metrics::gauge!("skiff_redis_upstream_connections", "node" => node.to_string())
            .increment(1.0);
        ConnGauge {
            node: node.to_string(),
        }
    }
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        metrics::gauge!("skiff_redis_upstream_connections", "node" => self.node.clone())
            .decrement(1.0);
    }
}

async fn read_frame<R: AsyncReadExt + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    protocol: Protocol,
    max_bytes: usize,
    addr: &str,
) -> Result<(Bytes, ReplyKind), UpstreamError> {
    loop {
        let parsed =
            parse_reply(buf, protocol, max_bytes).map_err(|err: FrameError| UpstreamError::Io {
                addr: addr.to_string(),
                message: err.to_string(),
            })?;
        if let Some((frame, kind)) = parsed {
            // A large reply gets an allocation of its own: cut out of the
            // read buffer, it would keep the whole buffer, often twice its
            // size, for as long as it waits for its client.
            if frame.len() >= OWN_ALLOCATION_BYTES {
                return Ok((Bytes::copy_from_slice(&frame), kind));
            }
            return Ok((frame, kind));
        }
        let read = stream
            .read_buf(buf)
            .await
            .map_err(|err| UpstreamError::Io {
                addr: addr.to_string(),
                message: err.to_string(),
            })?;
        if read == 0 {
            return Err(UpstreamError::Closed { addr: addr.into() });
        }
    }
}

type ReplySender = oneshot::Sender<Result<Bytes, UpstreamError>>;
/// A pending reply, resolved when the upstream's reply arrives.
pub type ReplyReceiver = oneshot::Receiver<Result<Bytes, UpstreamError>>;

/// State shared by the clients of a pipelined connection and its task.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer when requests are queued on an empty queue.
    queued: Notify,
    /// Wakes senders that wait for room once the writer takes the queue.
    room: Notify,
    /// Cleared with `Queue::closed`, read without the lock.
    alive: AtomicBool,
}

struct Queue {
    /// Requests not yet taken by the writer, back to back.
    out: BytesMut,
    /// One sender per request queued or written whose reply has not
    /// arrived, in request order. Requests are added to `out` and their
    /// senders here under one lock, so the two orders agree.
    pending: VecDeque<ReplySender>,
    /// Set when the connection has failed; nothing more is queued.
    closed: bool,
    /// Set while the writer has bytes taken from `out` not yet written;
    /// senders then must not write directly.
    writing: bool,
    /// The write half of a plain TCP connection, which senders may write
    /// to directly (see [`DIRECT_WRITE_BYTES`]). None for TLS, and once
    /// the connection has closed, so the socket closes with the task.
    plain: Option<Arc<OwnedWriteHalf>>,
    /// Replies handed out so far, which the stall watch compares.
    replies: u64,
}

/// The socket half the writer task writes to.
enum Output {
    Plain(Arc<OwnedWriteHalf>),
    Tls(WriteHalf),
}

/// A connection shared by many clients: requests are written in the order
/// they are queued, and replies are handed out in the same order.
pub struct Pipelined {
    pub addr: String,
    shared: Arc<Shared>,
}

impl Pipelined {
    /// Takes over `conn`, running its reader and writer on a task.
    pub fn spawn(conn: RawConn) -> Pipelined {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                out: BytesMut::new(),
                pending: VecDeque::new(),
                closed: false,
                writing: false,
                plain: None,
                replies: 0,
            }),
            queued: Notify::new(),
            room: Notify::new(),
            alive: AtomicBool::new(true),
        });
        let addr = conn.addr.clone();
        tokio::spawn(run_pipelined(conn, shared.clone()));
        Pipelined { addr, shared }
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Relaxed)
    }

    /// Queues `bytes`, which hold `count` requests, and returns one receiver
    /// per request. The requests are written back to back, so ASKING and the
    /// command after it cannot be split by another client's request.
    pub async fn send(
        &self,
        bytes: &[u8],
        count: usize,
    ) -> Result<Vec<ReplyReceiver>, UpstreamError> {
        let mut senders = Vec::with_capacity(count);
        let mut receivers = Vec::with_capacity(count);
        for _ in 0..count {
            let (sender, receiver) = oneshot::channel();
            senders.push(sender);
            receivers.push(receiver);
        }
        self.queue(bytes, senders).await?;
        Ok(receivers)
    }

    /// Queues `bytes`, which hold one request, and returns its receiver.
    pub async fn send_one(&self, bytes: &[u8]) -> Result<ReplyReceiver, UpstreamError> {
        let (sender, receiver) = oneshot::channel();
        self.queue(bytes, std::iter::once(sender)).await?;
        Ok(receiver)
    }

    /// Appends `bytes` to the queue and `senders` to the pending replies,
    /// waiting while more than [`MAX_QUEUED_BYTES`] wait to be written.
    async fn queue(
        &self,
        bytes: &[u8],
        senders: impl IntoIterator<Item = ReplySender>,
    ) -> Result<(), UpstreamError> {
        loop {
            // Made before the check, so a wake-up between the two is kept.
            let room = self.shared.room.notified();
            {
                let mut queue = self.shared.queue.lock();
                if queue.closed {
                    return Err(UpstreamError::NotSent {
                        addr: self.addr.clone(),
                    });
                }
                if queue.out.len() < MAX_QUEUED_BYTES {
                    let was_empty = queue.out.is_empty();
                    queue.out.extend_from_slice(bytes);
                    queue.pending.extend(senders);
                    let wrote = self.write_directly(&mut queue);
                    let wake = !queue.out.is_empty() && (was_empty || wrote);
                    drop(queue);
                    if wake {
                        self.shared.queued.notify_one();
                    }
                    return Ok(());
                }
            }
            room.await;
        }
    }
}

impl Pipelined {
    /// Writes what the socket takes of a queue of at least
    /// [`DIRECT_WRITE_BYTES`], when the writer is not writing, and returns
    /// true if it wrote anything. The server then starts on these requests
    /// while the sessions still parse the rest of a burst, instead of
    /// receiving the whole burst in one write at the end.
    fn write_directly(&self, queue: &mut Queue) -> bool {
        if queue.writing || queue.out.len() < DIRECT_WRITE_BYTES {
            return false;
        }
        let Some(half) = &queue.plain else {
            return false;
        };
        match half.try_write(&queue.out) {
            Ok(written) => {
                queue.out.advance(written);
                written > 0
            }
            // A full socket, or an error the writer meets and reports.
            Err(_) => false,
        }
    }
}

async fn run_pipelined(conn: RawConn, shared: Arc<Shared>) {
    let RawConn {
        addr,
        gauge,
        stream,
        buf,
        protocol,
        max_reply_bytes,
        reply_timeout,
        connect_timeout: _,
    } = conn;
    let (reader, writer) = stream.into_split();
    let output = match writer {
        WriteHalf::Plain(half) => {
            let half = Arc::new(half);
            shared.queue.lock().plain = Some(half.clone());
            Output::Plain(half)
        }
        tls => Output::Tls(tls),
    };
    // The pending replies have no bound of their own: each is one that a
    // client's bounded reply queue waits for (a split multi-key command
    // waits for one per slot), so the client limit and
    // `client_queue_depth` bound the total.
    let reading = read_replies(reader, buf, protocol, max_reply_bytes, &addr, &shared);
    let writing = write_requests(output, &addr, &shared);
    let stalled = watch_replies(&addr, &shared, reply_timeout);
    let error = tokio::select! {
        error = reading => error,
        error = writing => error,
        error = stalled => error,
    };
    match error {
        UpstreamError::ReplyTimeout { .. } => {
            tracing::warn!(upstream = %addr, error = %error, "closed a stalled upstream connection")
        }
        _ => tracing::debug!(upstream = %addr, error = %error, "upstream connection closed"),
    }
    let pending = {
        let mut queue = shared.queue.lock();
        queue.closed = true;
        shared.alive.store(false, Ordering::Relaxed);
        queue.out = BytesMut::new();
        queue.plain = None;
        std::mem::take(&mut queue.pending)
    };
    shared.room.notify_waiters();
    for sender in pending {
        let _ = sender.send(Err(error.clone()));
    }
    drop(gauge);
}

async fn read_replies(
    mut reader: ReadHalf,
    mut buf: BytesMut,
    protocol: Protocol,
    max_bytes: usize,
    addr: &str,
    shared: &Shared,
) -> UpstreamError {
    loop {
        let (frame, kind) = match read_frame(&mut reader, &mut buf, protocol, max_bytes, addr).await
        {
            Ok(frame) => frame,
            Err(error) => return error,
        };
        if kind == ReplyKind::Push {
            continue;
        }
        let sender = {
            let mut queue = shared.queue.lock();
            queue.replies += 1;
            queue.pending.pop_front()
        };
        let Some(sender) = sender else {
            return UpstreamError::Io {
                addr: addr.to_string(),
                message: "reply without a pending request".into(),
            };
        };
        // The client may have gone away; its reply is dropped.
        let _ = sender.send(Ok(frame));
    }
}

/// Returns an error once the connection's requests have waited `timeout`
/// with no reply, checking four times per `timeout`. Never returns when
/// `timeout` is zero.
async fn watch_replies(addr: &str, shared: &Shared, timeout: Duration) -> UpstreamError {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let mut was_waiting = false;
    let mut last_replies = 0;
    let mut stalled_checks = 0;
    loop {
        tokio::time::sleep(timeout / 4).await;
        let (waiting, replies) = {
            let queue = shared.queue.lock();
            (!queue.pending.is_empty(), queue.replies)
        };
        // The oldest request of a stalled check was already waiting at
        // the check before, so four in a row mean it waited `timeout`.
        if waiting && was_waiting && replies == last_replies {
            stalled_checks += 1;
        } else {
            stalled_checks = 0;
        }
        if stalled_checks == 4 {
            return UpstreamError::ReplyTimeout {
                addr: addr.to_string(),
                timeout,
            };
        }
        (was_waiting, last_replies) = (waiting, replies);
    }
}

/// Writes all of `bytes` to the plain connection's write half.
async fn write_plain(half: &OwnedWriteHalf, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match half.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => half.writable().await?,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Writes the queued requests to `output`.
async fn write_requests(mut output: Output, addr: &str, shared: &Shared) -> UpstreamError {
    // The writer swaps this buffer with the queue's, so neither is
    // allocated again while their size stays ordinary.
    let mut out = BytesMut::new();
    loop {
        shared.queued.notified().await;
        // Let the runtime poll for I/O and run the sessions it wakes before
        // writing, so requests from many clients leave in one write.
        tokio::task::yield_now().await;
        loop {
            {
                let mut queue = shared.queue.lock();
                if queue.out.is_empty() {
                    queue.writing = false;
                    break;
                }
                std::mem::swap(&mut queue.out, &mut out);
                queue.writing = true;
            }
            shared.room.notify_waiters();
            let written = match &mut output {
                Output::Plain(half) => write_plain(half, &out).await,
                Output::Tls(tls) => tls.send(&out).await,
            };
            if let Err(err) = written {
                return UpstreamError::Io {
                    addr: addr.to_string(),
                    message: err.to_string(),
                };
            }
            out.clear();
            if out.capacity() > MAX_KEPT_BYTES {
                out = BytesMut::new();
            }
        }
    }
}
