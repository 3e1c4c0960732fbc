//! A connection that is plain TCP or TLS over TCP, and its read and write
//! halves. An enum rather than a boxed trait object, so a plain connection
//! costs one branch per call and no allocation.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::{TlsAcceptor, TlsConnector};

type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// A connection, plain or encrypted.
pub enum Stream {
    Plain(TcpStream),
    /// Boxed because a TLS session is large and a plain one is the common
    /// case.
    Tls(Box<TlsStream>),
}

/// The read half of a [`Stream`].
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

/// The write half of a [`Stream`].
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl Stream {
    /// Runs the client side of a TLS handshake on `tcp`.
    pub async fn connect_tls(
        tcp: TcpStream,
        connector: &TlsConnector,
        name: ServerName<'static>,
    ) -> io::Result<Stream> {
        let tls = connector.connect(name, tcp).await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }

    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept_tls(tcp: TcpStream, acceptor: &TlsAcceptor) -> io::Result<Stream> {
        let tls = acceptor.accept(tcp).await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Returns the TCP connection of a plain stream, None for TLS.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self {
            Stream::Plain(tcp) => Some(tcp),
            Stream::Tls(_) => None,
        }
    }

    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(tcp) => {
                let (read, write) = tcp.into_split();
                (ReadHalf::Plain(read), WriteHalf::Plain(write))
            }
            Stream::Tls(tls) => {
                let (read, write) = tokio::io::split(*tls);
                (ReadHalf::Tls(read), WriteHalf::Tls(write))
            }
        }
    }

    /// Writes all of `bytes` and pushes them onto the socket. TLS keeps
    /// written data in its session until flushed; plain TCP has no buffer.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.write_all(bytes).await,
            Stream::Tls(tls) => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
        }
    }

    /// Waits until the socket may have data, without a buffer. Plain only:
    /// a TLS session may hold decrypted data that socket readiness does not
    /// show, so for TLS this returns at once.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => read_ready(tcp).await,
            Stream::Tls(_) => Ok(()),
        }
    }

    /// True when the peer has sent nothing and not closed the connection.
    /// Reads at most one byte, which is lost: use it only on a connection
    /// that is dropped when this returns false.
    pub fn is_idle(&mut self) -> bool {
        match self {
            Stream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(
                    tcp.try_read(&mut probe),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock
                )
            }
            Stream::Tls(tls) => read_is_pending(Pin::new(&mut **tls)),
        }
    }
}

/// Waits for read readiness in the socket's own read slot, which the
/// reads that follow use too. `TcpStream::readable` would queue a waiter
/// in a list that it locks at each wait and wake-up.
async fn read_ready(tcp: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await
}

/// Polls one read with a waker that does nothing: pending means no data
/// and no close.
fn read_is_pending<R: AsyncRead>(reader: Pin<&mut R>) -> bool {
    let mut probe = [0u8; 1];
    let mut buf = ReadBuf::new(&mut probe);
    let mut context = Context::from_waker(Waker::noop());
    reader.poll_read(&mut context, &mut buf).is_pending()
}

impl ReadHalf {
    pub fn is_tls(&self) -> bool {
        matches!(self, ReadHalf::Tls(_))
    }

    /// See [`Stream::readable`].
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            ReadHalf::Plain(read) => read_ready(read.as_ref()).await,
            ReadHalf::Tls(_) => Ok(()),
        }
    }

    /// True when the peer has sent nothing and not closed the connection.
    /// As [`Stream::is_idle`], a byte read here is lost. A plain socket
    /// checks the reactor's readiness first, which costs no system call when
    /// nothing arrived. That check leaves a waker that does nothing in the
    /// socket's read slot, which the next read replaces with its own.
    pub fn is_idle(&mut self) -> bool {
        match self {
            ReadHalf::Plain(read) => {
                let mut context = Context::from_waker(Waker::noop());
                let tcp: &TcpStream = read.as_ref();
                if tcp.poll_read_ready(&mut context).is_pending() {
                    return true;
                }
                let mut probe = [0u8; 1];
                matches!(
                    read.try_read(&mut probe),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock
                )
            }
            ReadHalf::Tls(read) => read_is_pending(Pin::new(read)),
        }
    }
}

impl WriteHalf {
    /// Writes some of `bytes` and returns how many, for a plain socket.
    /// Returns `None` for TLS, whose writes go through [`WriteHalf::send`].
    pub async fn write_some(&mut self, bytes: &[u8]) -> Option<io::Result<usize>> {
        match self {
            WriteHalf::Plain(write) => Some(write.write(bytes).await),
            WriteHalf::Tls(_) => None,
        }
    }

    /// See [`Stream::send`].
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            WriteHalf::Plain(write) => write.write_all(bytes).await,
            WriteHalf::Tls(write) => {
                write.write_all(bytes).await?;
                write.flush().await
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(read) => Pin::new(read).poll_read(cx, buf),
            ReadHalf::Tls(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(write) => Pin::new(write).poll_write(cx, buf),
            WriteHalf::Tls(write) => Pin::new(write).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(write) => Pin::new(write).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(write) => Pin::new(write).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Plain(write) => write.is_write_vectored(),
            WriteHalf::Tls(write) => write.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(write) => Pin::new(write).poll_flush(cx),
            WriteHalf::Tls(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(write) => Pin::new(write).poll_shutdown(cx),
            WriteHalf::Tls(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}
