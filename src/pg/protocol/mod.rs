//! PostgreSQL wire protocol 3.0: framing, message tags and the few message
//! bodies the pooler reads or writes.
//!
//! Messages are kept as their original bytes (tag, length and body) so that
//! forwarding never re-encodes; only routing-relevant fields are decoded.

mod builders;
mod extended;
pub mod spare;
mod startup;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use builders::*;
pub use extended::*;
pub use startup::*;

/// Frontend (client to server) message tags.
pub mod frontend {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PASSWORD: u8 = b'p';
}

/// Backend (server to client) message tags.
pub mod backend {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const NO_DATA: u8 = b'n';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Failure to read a protocol message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid message length {0}")]
    BadLength(usize),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// One tagged protocol message, kept as the bytes that arrived.
#[derive(Debug, Clone)]
pub struct Message {
    /// Tag byte, length and body.
    pub raw: Bytes,
}

impl Message {
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message body after the tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// A source that can wait for data without a buffer, so an idle connection
/// holds no read buffer.
pub trait WaitReadable {
    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl WaitReadable for crate::tls::ReadHalf {
    async fn wait_readable(&self) -> std::io::Result<()> {
        self.readable().await
    }
}

impl WaitReadable for crate::tls::Stream {
    async fn wait_readable(&self) -> std::io::Result<()> {
        self.readable().await
    }
}

impl WaitReadable for &[u8] {
    async fn wait_readable(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Buffered reader of tagged messages from one socket.
pub struct MessageReader<R> {
    inner: R,
    buffer: BytesMut,
    max_message_bytes: usize,
    /// Bytes to make room for before the next read.
    read_size: usize,
    /// The buffer is kept while waiting for data. Off by default, so
    /// thousands of idle clients hold no read buffers.
    keep_buffer: bool,
}

/// Maximum bytes [`MessageReader::discard_before_close`] reads and drops.
const DISCARD_LIMIT_BYTES: usize = 4 * 1024 * 1024;
/// Maximum time [`MessageReader::discard_before_close`] waits for the peer
/// to stop sending.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Smallest read buffer: small enough for the allocator's fast path, and
/// the room a spare buffer offers, so a read buffer can be a spare one.
const MIN_READ: usize = spare::SPARE_ROOM;
/// Largest read buffer.
const MAX_READ: usize = 64 * 1024;

impl<R: AsyncRead + WaitReadable + Unpin> MessageReader<R> {
    pub fn new(inner: R, max_message_bytes: usize) -> Self {
        MessageReader {
            inner,
            buffer: BytesMut::new(),
            max_message_bytes,
            read_size: MIN_READ,
            keep_buffer: false,
        }
    }

    /// A reader whose first bytes are `buffered`, read earlier from the
    /// same connection.
    pub fn with_buffered(inner: R, buffered: BytesMut, max_message_bytes: usize) -> Self {
        MessageReader {
            inner,
            buffer: buffered,
            max_message_bytes,
            read_size: MIN_READ,
            keep_buffer: false,
        }
    }

    /// The source and the bytes read from it but not returned yet.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buffer)
    }

    /// Keeps the read buffer while waiting for data, for a connection that
    /// is busy most of the time. Once the messages read into it are dropped,
    /// the next read reuses its memory instead of allocating.
    pub fn keep_buffer(&mut self) {
        self.keep_buffer = true;
    }

    /// Changes the largest message accepted from now on.
    pub fn set_max_message_bytes(&mut self, max_message_bytes: usize) {
        self.max_message_bytes = max_message_bytes;
    }

    /// True when a whole message is already buffered, so reading it will
    /// not wait on the socket.
    pub fn has_buffered_message(&self) -> bool {
        matches!(frame_length(&self.buffer), Some(Ok(len)) if self.buffer.len() >= len)
    }

    /// Reads the next whole message.
    pub async fn read(&mut self) -> Result<Message, ProtocolError> {
        loop {
            if let Some(length) = frame_length(&self.buffer) {
                let length = length?;
                if length > self.max_message_bytes {
                    return Err(ProtocolError::TooLarge {
                        size: length,
                        limit: self.max_message_bytes,
                    });
                }
                if self.buffer.len() >= length {
                    let raw = self.buffer.split_to(length).freeze();
                    if length > MAX_READ {
                        // The rest shares the large message's allocation,
                        // and a later reserve would take all of it back and
                        // keep it while the connection is idle.
                        self.buffer = BytesMut::from(&self.buffer[..]);
                    }
                    return Ok(Message { raw });
                }
                self.buffer.reserve(length - self.buffer.len());
            }
            self.fill().await?;
        }
    }

    /// Reads whatever the socket has into the buffer without returning a
    /// message, so a peer blocked on writing to us can go on.
    pub async fn read_ahead(&mut self) -> Result<(), ProtocolError> {
        if self.buffer.is_empty() || self.buffer.capacity() - self.buffer.len() < MIN_READ {
            // Waits before the buffer is let go of or grown: a request
            // split off it is usually still alive while it waits, so the
            // buffer could neither go back to the spare list nor grow in
            // place yet.
            self.inner.wait_readable().await?;
        }
        self.fill().await
    }

    /// Reads and drops what the peer still sends, until it closes,
    /// `DISCARD_LIMIT_BYTES` or `DISCARD_TIMEOUT`. Called after a fatal
    /// error: a socket closed with unread data is reset, and the reset can
    /// reach the peer before the error written just before it.
    pub async fn discard_before_close(&mut self) {
        self.buffer.clear();
        // A heap buffer, because an array here would enlarge every future
        // that can reach this call, the session's included.
        let mut scratch = vec![0u8; 8192];
        let mut left = DISCARD_LIMIT_BYTES;
        let inner = &mut self.inner;
        let discard = async {
            while left > 0 {
                match inner.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => left = left.saturating_sub(read),
                }
            }
        };
        let _ = tokio::time::timeout(DISCARD_TIMEOUT, discard).await;
    }

    /// Returns the whole messages buffered, without taking them, up to and
    /// including the first one tagged `last`; `None` when no such message
    /// is buffered whole.
    pub fn peek_to(&self, last: u8) -> Option<Vec<&[u8]>> {
        let mut rest = &self.buffer[..];
        let mut messages = Vec::new();
        while let Some(Ok(length)) = frame_length(rest) {
            if rest.len() < length {
                return None;
            }
            let (message, after) = rest.split_at(length);
            messages.push(message);
            if message[0] == last {
                return Some(messages);
            }
            rest = after;
        }
        None
    }

    /// Looks through the whole messages buffered, without taking them, up
    /// to the first one tagged `last`. Returns how many messages that is,
    /// `last` included, and whether `matches` held for any of them; `None`
    /// when no `last` message is buffered whole.
    pub fn scan_to(&self, last: u8, matches: impl Fn(u8, &[u8]) -> bool) -> Option<(usize, bool)> {
        let messages = self.peek_to(last)?;
        let found = messages
            .iter()
            .any(|message| matches(message[0], &message[5..]));
        Some((messages.len(), found))
    }

    /// Number of bytes read but not returned yet.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len()
    }

    /// True when no unread bytes are buffered.
    pub fn buffered_is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    async fn fill(&mut self) -> Result<(), ProtocolError> {
        if self.buffer.is_empty() && !self.keep_buffer {
            // Let go of the buffer while waiting, so thousands of idle
            // clients cost no read buffers.
            spare::give(std::mem::take(&mut self.buffer));
            self.inner.wait_readable().await?;
            self.buffer = spare::take(self.read_size);
        } else if self.buffer.is_empty() {
            self.buffer.reserve(self.read_size);
        } else if self.buffer.capacity() - self.buffer.len() < MIN_READ {
            self.buffer.reserve(self.read_size.max(self.buffer.len()));
        }
        let room = self.buffer.capacity() - self.buffer.len();
        let read = self.inner.read_buf(&mut self.buffer).await?;
        if read == 0 {
            return Err(ProtocolError::Closed);
        }
        // Size the next read from this one: small request-response traffic
        // stays in small, cheap allocations, a stream of rows gets large
        // reads and so fewer system calls.
        if read == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if read < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(MIN_READ);
        }
        Ok(())
    }

    /// Reads an untagged startup-phase packet (length then body).
    pub async fn read_startup(&mut self) -> Result<Bytes, ProtocolError> {
        loop {
            if self.buffer.len() >= 4 {
                let length = (&self.buffer[..4]).get_u32() as usize;
                if !(8..=10_000).contains(&length) {
                    return Err(ProtocolError::BadLength(length));
                }
                if self.buffer.len() >= length {
                    return Ok(self.buffer.split_to(length).freeze());
                }
            }
            self.fill().await?;
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Total length (tag included) of the message at the start of `buffer`, once
/// its header is buffered.
fn frame_length(buffer: &[u8]) -> Option<Result<usize, ProtocolError>> {
    if buffer.len() < 5 {
        return None;
    }
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if length < 4 {
        return Some(Err(ProtocolError::BadLength(length)));
    }
    Some(Ok(length.saturating_add(1)))
}

/// Reads a NUL-terminated string from the front of `body`, replacing bytes
/// that are not UTF-8, because clients may use any server-supported
/// encoding (LATIN1, GBK, ...). Use it for text skiff only inspects.
pub fn read_cstr_lossy<'a>(body: &mut &'a [u8]) -> Option<std::borrow::Cow<'a, str>> {
    let end = body.iter().position(|&b| b == 0)?;
    let text = String::from_utf8_lossy(&body[..end]);
    *body = &body[end + 1..];
    Some(text)
}

/// Reads a NUL-terminated string from the front of `body`.
pub fn read_cstr<'a>(body: &mut &'a [u8]) -> Option<&'a str> {
    let end = body.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&body[..end]).ok()?;
    *body = &body[end + 1..];
    Some(text)
}

/// Write buffer capacity that a connection keeps between messages.
const KEPT_WRITE_BUFFER: usize = 64 * 1024;

/// Empties a write buffer after its bytes were sent. A buffer grown past
/// `KEPT_WRITE_BUFFER` by a large message is freed, so an idle connection
/// does not keep the largest message it ever relayed.
pub fn clear_write_buffer(out: &mut BytesMut) {
    if out.capacity() > KEPT_WRITE_BUFFER {
        *out = BytesMut::new();
    } else {
        out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_buffer_freed_after_large_message() {
        let mut out = BytesMut::with_capacity(8192);
        out.extend_from_slice(&[b'x'; 100]);
        clear_write_buffer(&mut out);
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 8192);

        out.extend_from_slice(&vec![b'x'; 4 << 20]);
        clear_write_buffer(&mut out);
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 0);
    }

    #[tokio::test]
    async fn reader_splits_pipelined_messages() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&query("select 1"));
        wire.extend_from_slice(&sync());
        let mut reader = MessageReader::new(&wire[..], 1 << 20);
        let first = reader.read().await.unwrap();
        assert_eq!(first.tag(), frontend::QUERY);
        assert_eq!(first.body(), b"select 1\0");
        assert!(reader.has_buffered_message());
        let second = reader.read().await.unwrap();
        assert_eq!(second.tag(), frontend::SYNC);
        assert!(matches!(reader.read().await, Err(ProtocolError::Closed)));
    }

    #[tokio::test]
    async fn kept_buffer_lets_go_of_large_message() {
        let large = query(&"x".repeat(4 << 20));
        let mut wire = large.to_vec();
        wire.extend_from_slice(&sync());
        let mut reader = MessageReader::new(&wire[..], 8 << 20);
        reader.keep_buffer();
        let first = reader.read().await.unwrap();
        assert_eq!(first.raw.len(), large.len());
        drop(first);
        let second = reader.read().await.unwrap();
        assert_eq!(second.tag(), frontend::SYNC);
        assert!(
            reader.buffer.capacity() <= MAX_READ,
            "an idle reader kept {} bytes",
            reader.buffer.capacity()
        );
    }

    #[tokio::test]
    async fn reader_rejects_oversized_message() {
        let wire = [b'Q', 0, 0, 1, 0, b'x'];
        let mut reader = MessageReader::new(&wire[..], 100);
        assert!(matches!(
            reader.read().await,
            Err(ProtocolError::TooLarge {
                size: 257,
                limit: 100
            })
        ));
    }

    #[tokio::test]
    async fn reader_rejects_length_below_four() {
        let wire = [b'Q', 0, 0, 0, 3];
        let mut reader = MessageReader::new(&wire[..], 100);
        assert!(matches!(
            reader.read().await,
            Err(ProtocolError::BadLength(3))
        ));
    }
}
