//! RESP framing: splits client requests and upstream replies off a read
//! buffer as raw `Bytes`, decoding only what routing needs.

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::decode as resp2;
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::decode::complete as resp3;
use redis_protocol::resp3::types::BytesFrame as Resp3Frame;

/// Maximum length of an inline (non-RESP) request line, as in Redis.
const MAX_INLINE_BYTES: usize = 64 * 1024;

/// RESP version a client or upstream connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Resp2,
    Resp3,
}

/// A malformed or oversized frame; the connection cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Text after `Protocol error: ` in Redis's own error reply.
    #[error("Protocol error: {0}")]
    Invalid(String),
    #[error("frame larger than {limit} bytes")]
    TooLarge { limit: usize },
}

/// One client command: its arguments and its RESP encoding.
#[derive(Debug, Clone)]
pub struct Request {
    pub args: Vec<Bytes>,
    pub raw: Bytes,
}

impl Request {
    /// Builds a request from arguments, encoding it as a RESP array.
    pub fn from_args(args: Vec<Bytes>) -> Request {
        let raw = encode_command(&args);
        Request { args, raw }
    }

    /// Returns the command name in upper case, or "" for an empty request.
    pub fn name(&self) -> String {
        self.args
            .first()
            .map(|name| String::from_utf8_lossy(name).to_ascii_uppercase())
            .unwrap_or_default()
    }

    /// Returns argument `index` in upper case, for matching sub-commands.
    pub fn arg_upper(&self, index: usize) -> Option<String> {
        let arg = self.args.get(index)?;
        Some(String::from_utf8_lossy(arg).to_ascii_uppercase())
    }
}

/// Splits one request off `buf`; `Ok(None)` means more bytes are needed.
pub fn parse_request(buf: &mut BytesMut, max_bytes: usize) -> Result<Option<Request>, FrameError> {
    loop {
        match buf.first() {
            None => return Ok(None),
            Some(b'*') => match super::multibulk::parse(buf, max_bytes)? {
                // Redis ignores an empty array without replying, so it must
                // never reach a shared connection, where replies are
                // matched to requests by count.
                Some(request) if request.args.is_empty() => continue,
                found => return Ok(found),
            },
            Some(_) => match parse_inline_request(buf)? {
                Some(Some(request)) => return Ok(Some(request)),
                // An empty line: Redis ignores it.
                Some(None) => continue,
                None => return Ok(None),
            },
        }
    }
}

/// Parses a telnet-style line. `Some(None)` is an empty line.
fn parse_inline_request(buf: &mut BytesMut) -> Result<Option<Option<Request>>, FrameError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE_BYTES {
            return Err(FrameError::Invalid("too big inline request".into()));
        }
        return Ok(None);
    };
    let line = buf.split_to(newline + 1);
    let args = super::inline::split_args(&line)?;
    if args.is_empty() {
        return Ok(Some(None));
    }
    Ok(Some(Some(Request::from_args(args))))
}

/// Kind of a top-level frame from an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A RESP3 push (`>`): never the reply to a request.
    Push,
    Error,
    Other,
}

/// Splits one complete reply off `buf` as raw bytes.
///
/// NOTE: an incomplete frame is parsed again from its start after every
/// read, so a reply with very many elements costs time quadratic in the
/// number of reads it spans.
pub fn parse_reply(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_bytes: usize,
) -> Result<Option<(Bytes, ReplyKind)>, FrameError> {
    let decoded = match protocol {
        Protocol::Resp2 => resp2::decode_range(buf).map(|found| found.map(|(_, len)| len)),
        Protocol::Resp3 => resp3::decode_range(buf).map(|found| found.map(|(_, len)| len)),
    };
    let length = decoded.map_err(|err| FrameError::Invalid(err.details().to_string()))?;
    let Some(length) = length else {
        if buf.len() > max_bytes {
            return Err(FrameError::TooLarge { limit: max_bytes });
        }
        return Ok(None);
    };
    if length > max_bytes {
        return Err(FrameError::TooLarge { limit: max_bytes });
    }
    let kind = match buf[0] {
        b'>' => ReplyKind::Push,
        b'-' | b'!' => ReplyKind::Error,
        _ => ReplyKind::Other,
    };
    Ok(Some((buf.split_to(length).freeze(), kind)))
}

/// A decoded reply, for the few places that look inside one.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(Bytes),
    Int(i64),
    Error(String),
    Nil,
    Array(Vec<Value>),
    /// RESP3 map; RESP2 sends the same data as a flat array.
    Map(Vec<(Value, Value)>),
    /// A RESP3 type routing never looks into (double, boolean, ...).
    Other,
}

impl Value {
    /// Decodes one complete frame; `None` when `raw` is not one.
    pub fn decode(raw: &Bytes, protocol: Protocol) -> Option<Value> {
        match protocol {
            Protocol::Resp2 => resp2::decode_bytes(raw).ok()?.map(|(f, _)| from_resp2(f)),
            Protocol::Resp3 => resp3::decode_bytes(raw).ok()?.map(|(f, _)| from_resp3(f)),
        }
    }

    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Str(data) => Some(data),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            Value::Str(data) => std::str::from_utf8(data).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// Returns the elements of an array, or of a map flattened as RESP2 does.
    pub fn into_items(self) -> Option<Vec<Value>> {
        match self {
            Value::Array(items) => Some(items),
            Value::Map(pairs) => Some(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
            _ => None,
        }
    }
}

fn from_resp2(frame: Resp2Frame) -> Value {
    match frame {
        Resp2Frame::SimpleString(data) | Resp2Frame::BulkString(data) => Value::Str(data),
        Resp2Frame::Error(text) => Value::Error(text.to_string()),
        Resp2Frame::Integer(value) => Value::Int(value),
        Resp2Frame::Array(items) => Value::Array(items.into_iter().map(from_resp2).collect()),
        Resp2Frame::Null => Value::Nil,
    }
}

fn from_resp3(frame: Resp3Frame) -> Value {
    match frame {
        Resp3Frame::BlobString { data, .. } | Resp3Frame::SimpleString { data, .. } => {
            Value::Str(data)
        }
        Resp3Frame::VerbatimString { data, .. } => Value::Str(data),
        Resp3Frame::SimpleError { data, .. } => Value::Error(data.to_string()),
        Resp3Frame::BlobError { data, .. } => {
            Value::Error(String::from_utf8_lossy(&data).into_owned())
        }
        Resp3Frame::Number { data, .. } => Value::Int(data),
        Resp3Frame::Null => Value::Nil,
        Resp3Frame::Array { data, .. } | Resp3Frame::Push { data, .. } => {
            Value::Array(data.into_iter().map(from_resp3).collect())
        }
        Resp3Frame::Set { data, .. } => Value::Array(data.into_iter().map(from_resp3).collect()),
        Resp3Frame::Map { data, .. } => Value::Map(
            data.into_iter()
                .map(|(key, value)| (from_resp3(key), from_resp3(value)))
                .collect(),
        ),
        _ => Value::Other,
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        put_bulk(&mut out, arg.as_ref());
    }
    out.freeze()
}

/// Appends a bulk string to `out`.
pub fn put_bulk(out: &mut BytesMut, data: &[u8]) {
    out.put_slice(format!("${}\r\n", data.len()).as_bytes());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Returns the text of an error reply without its `-` and line end.
pub fn error_text(raw: &[u8]) -> Option<&str> {
    let body = raw.strip_prefix(b"-")?;
    let end = body.iter().position(|&b| b == b'\r').unwrap_or(body.len());
    std::str::from_utf8(&body[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<Vec<String>> {
        let mut buf = BytesMut::from(input);
        let mut requests = Vec::new();
        while let Some(request) = parse_request(&mut buf, 1024).unwrap() {
            let args = request
                .args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned());
            requests.push(args.collect());
        }
        requests
    }

    #[test]
    fn array_request_keeps_raw_bytes() {
        let raw = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let mut buf = BytesMut::from(&raw[..]);
        let request = parse_request(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&request.raw[..], &raw[..]);
        assert_eq!(request.name(), "GET");
        assert!(buf.is_empty());
    }

    #[test]
    fn inline_requests_and_empty_lines() {
        let requests = parse_all(b"\r\nPING\r\nSET  k   v\n");
        assert_eq!(requests, vec![vec!["PING"], vec!["SET", "k", "v"]]);
        let rebuilt = Request::from_args(vec![Bytes::from_static(b"PING")]);
        assert_eq!(&rebuilt.raw[..], b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn empty_and_null_arrays_are_skipped() {
        let requests = parse_all(b"*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n");
        assert_eq!(requests, vec![vec!["PING"]]);
    }

    #[test]
    fn partial_request_waits_for_more_bytes() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r"[..]);
        assert!(parse_request(&mut buf, 1024).unwrap().is_none());
        buf.extend_from_slice(b"\nk\r\n");
        assert!(parse_request(&mut buf, 1024).unwrap().is_some());
    }

    #[test]
    fn oversized_and_malformed_requests_fail() {
        let mut big = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$2000\r\n"[..]);
        big.extend_from_slice(&[b'x'; 1100]);
        assert!(matches!(
            parse_request(&mut big, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        let mut count = BytesMut::from(&b"*99999999999\r\n"[..]);
        assert!(matches!(
            parse_request(&mut count, 1024),
            Err(FrameError::Invalid(_))
        ));
        let mut integer = BytesMut::from(&b"*1\r\n:1\r\n"[..]);
        assert!(matches!(
            parse_request(&mut integer, 1024),
            Err(FrameError::Invalid(_))
        ));
    }

    #[test]
    fn reply_kinds_per_protocol() {
        let mut buf = BytesMut::from(&b">2\r\n$4\r\npush\r\n:1\r\n-ERR x\r\n$-1\r\n"[..]);
        let (push, kind) = parse_reply(&mut buf, Protocol::Resp3, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(kind, ReplyKind::Push);
        assert_eq!(&push[..], b">2\r\n$4\r\npush\r\n:1\r\n");
        let (_, kind) = parse_reply(&mut buf, Protocol::Resp3, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(kind, ReplyKind::Error);
        // RESP2 null bulk string: the RESP3 decoder would read it as a stream.
        let (null, kind) = parse_reply(&mut buf, Protocol::Resp2, 1024)
            .unwrap()
            .unwrap();
        assert_eq!((&null[..], kind), (&b"$-1\r\n"[..], ReplyKind::Other));
    }

    #[test]
    fn value_decodes_resp3_map() {
        let raw = Bytes::from_static(b"%1\r\n$1\r\nf\r\n:2\r\n");
        let value = Value::decode(&raw, Protocol::Resp3).unwrap();
        let items = value.into_items().unwrap();
        assert_eq!(
            items,
            vec![Value::Str(Bytes::from_static(b"f")), Value::Int(2)]
        );
    }

    #[test]
    fn error_text_strips_marker_and_line_end() {
        assert_eq!(error_text(b"-MOVED 1 h:1\r\n"), Some("MOVED 1 h:1"));
        assert_eq!(error_text(b"+OK\r\n"), None);
    }
}
