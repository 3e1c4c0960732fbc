//! A TCP listener for the ingest endpoint that bounds open connections:
//! past the limit, new connections wait in the kernel's accept queue until
//! one closes. A connection idle for longer than the idle timeout is closed,
//! where a connection whose request skiff is still handling is not idle, and
//! so is one whose request headers take longer than the head timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Duration, Instant, Sleep};

use std::future::Future;

/// Accepts connections while fewer than the limit are open.
pub struct LimitedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
    head_timeout: Duration,
}

impl LimitedListener {
    /// Accepts up to `max_connections` at once. A connection idle for
    /// `idle_timeout`, or whose request head takes `head_timeout` from its
    /// first bytes, is closed.
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        idle_timeout: Duration,
        head_timeout: Duration,
    ) -> Self {
        LimitedListener {
            listener,
            permits: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
            head_timeout,
        }
    }
}

/// The requests of one connection that skiff is handling. The HTTP server
/// reads from a connection while its handler runs, to notice a client that
/// hangs up. A handler slower than the idle timeout (a slow disk, or a full
/// spool with on_full = "block") would otherwise lose its connection.
#[derive(Clone, Default)]
pub struct Activity(Arc<ActivityState>);

#[derive(Default)]
struct ActivityState {
    handling: AtomicUsize,
    /// Requests whose handling began, so the listener can tell when the
    /// head of a request it reads has arrived in full.
    begun: AtomicU64,
    /// When the last request ended, which the idle time counts from.
    ended_at: Mutex<Option<Instant>>,
}

impl Activity {
    /// Marks a request as being handled until the guard is dropped.
    pub fn begin(&self) -> Handling {
        self.0.handling.fetch_add(1, Ordering::AcqRel);
        self.0.begun.fetch_add(1, Ordering::AcqRel);
        Handling(self.clone())
    }

    fn begun(&self) -> u64 {
        self.0.begun.load(Ordering::Acquire)
    }

    fn is_handling(&self) -> bool {
        self.0.handling.load(Ordering::Acquire) > 0
    }

    fn ended_at(&self) -> Option<Instant> {
        *self.0.ended_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request being handled, which ends when this is dropped.
pub struct Handling(Activity);

impl Drop for Handling {
    fn drop(&mut self) {
        let state = &(self.0).0;
        *state.ended_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        state.handling.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connected<IncomingStream<'_, LimitedListener>> for Activity {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        stream.io().activity.clone()
    }
}

/// A connection that gives its permit back when dropped, and fails its next
/// read or write once it has been idle for `idle_timeout` with no request
/// being handled, or once a request's head has taken `head_timeout`.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    head_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    activity: Activity,
    /// The deadline of the request head being read, and the count of
    /// requests begun when its first bytes came: once that count grows,
    /// the head has arrived.
    head: Option<(Instant, u64)>,
}

impl LimitedStream {
    /// Notes that bytes moved: the idle time starts again, and bytes read
    /// between requests start the head deadline. A request that began, or
    /// a response written (for a request skiff rejected before handling
    /// it), ends the head.
    fn touch(&mut self, read: bool) {
        let now = Instant::now();
        if !read || self.head_deadline().is_none() {
            self.head = None;
        }
        if read && self.head.is_none() && !self.activity.is_handling() {
            self.head = Some((now + self.head_timeout, self.activity.begun()));
        }
        let mut deadline = now + self.idle_timeout;
        if let Some((head_deadline, _)) = self.head {
            deadline = deadline.min(head_deadline);
        }
        self.idle.as_mut().reset(deadline);
    }

    /// Returns the deadline of the head being read, while no request has
    /// begun since its first bytes came.
    fn head_deadline(&self) -> Option<Instant> {
        let (deadline, at) = self.head?;
        (at == self.activity.begun() && !self.activity.is_handling()).then_some(deadline)
    }

    /// Returns the idle error once the deadline has passed with no request
    /// being handled, or the head error once a request's head is late. The
    /// timer stays armed in every other case: the HTTP server may not read
    /// again after a response until the socket is readable, so only the
    /// timer can end an idle connection.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let head_deadline = self.head_deadline();
            if head_deadline.is_some_and(|deadline| deadline <= now) {
                let message = "logship ingest request headers did not arrive within body_timeout";
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)));
            }
            let mut deadline = None;
            if self.activity.is_handling() {
                deadline = Some(now + self.idle_timeout);
            } else if let Some(ended) = self.activity.ended_at() {
                deadline = Some(ended + self.idle_timeout).filter(|&deadline| deadline > now);
            }
            if let Some(mut deadline) = deadline {
                if let Some(head_deadline) = head_deadline {
                    deadline = deadline.min(head_deadline);
                }
                self.idle.as_mut().reset(deadline);
                continue;
            }
            let message = "logship ingest connection idle for longer than idle_timeout";
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)));
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let stream = LimitedStream {
                        stream,
                        _permit: permit,
                        idle_timeout: self.idle_timeout,
                        head_timeout: self.head_timeout,
                        idle: Box::pin(tokio::time::sleep(self.idle_timeout)),
                        activity: Activity::default(),
                        head: None,
                    };
                    return (stream, addr);
                }
                Err(err) => {
                    // Such as EMFILE: wait instead of spinning on the error.
                    tracing::warn!(error = %err, "logship ingest accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Pending => self.poll_idle(cx),
            Poll::Ready(result) => {
                if buf.filled().len() > filled {
                    self.touch(true);
                }
                Poll::Ready(result)
            }
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        match result {
            Poll::Ready(Ok(written)) if written > 0 => self.touch(false),
            // A client that reads no responses stops the HTTP server
            // reading too, so the idle timer must be checked here.
            Poll::Pending => return self.poll_idle(cx).map(|result| result.map(|()| 0)),
            _ => {}
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::AsyncReadExt;

    const IDLE: Duration = Duration::from_millis(200);

    /// Accepts one connection from a client that then sends nothing.
    async fn quiet_connection() -> (LimitedStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut limited = LimitedListener::new(listener, 1, IDLE, IDLE * 10);
        let client = TcpStream::connect(address).await.unwrap();
        let (stream, _) = limited.accept().await;
        (stream, client)
    }

    /// Reads until the idle error and returns how long that took.
    async fn time_until_idle_error(stream: &mut LimitedStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let result = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        let error = result.expect("the idle timeout ends the read").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        started.elapsed()
    }

    #[tokio::test]
    async fn idle_connection_closed_after_timeout() {
        let (mut stream, _client) = quiet_connection().await;

        let waited = time_until_idle_error(&mut stream).await;

        assert!(waited >= IDLE - Duration::from_millis(20), "{waited:?}");
        assert!(waited < IDLE * 2, "{waited:?}");
    }

    #[tokio::test]
    async fn long_request_then_idle_closed() {
        let (mut stream, _client) = quiet_connection().await;
        let handling = stream.activity.begin();
        let activity = stream.activity.clone();
        let ender = tokio::spawn(async move {
            tokio::time::sleep(IDLE * 3).await;
            drop(handling);
            Instant::now()
        });

        let started = Instant::now();
        let waited = time_until_idle_error(&mut stream).await;
        let ended = ender.await.unwrap();

        assert!(activity.ended_at().is_some());
        // Not closed while the request was handled, then closed one idle
        // timeout after it ended, with no read in between to rearm it.
        assert!(
            waited >= (ended - started) + IDLE - Duration::from_millis(20),
            "{waited:?}"
        );
        assert!(waited < (ended - started) + IDLE * 2, "{waited:?}");
    }
}
