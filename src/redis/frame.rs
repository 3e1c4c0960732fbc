//! RESP framing: splits client requests and upstream replies off a read
//! buffer as raw `Bytes`, decoding only what routing needs.

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::decode as resp2;
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::decode::complete as resp3;
use redis_protocol::resp3::types::BytesFrame as Resp3Frame;

use super::multibulk::parse_integer;

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
    pub fn name(&self) -> CommandName {
        CommandName::new(self.args.first().map_or(&[][..], |name| &name[..]))
    }

    /// Returns argument `index` in upper case, for matching sub-commands.
    pub fn arg_upper(&self, index: usize) -> Option<String> {
        let arg = self.args.get(index)?;
        Some(String::from_utf8_lossy(arg).to_ascii_uppercase())
    }
}

/// Command names up to this many bytes are kept without a heap
/// allocation. Redis's longest, `GEORADIUSBYMEMBER_RO`, has 20.
const INLINE_NAME_BYTES: usize = 30;

/// A command name in upper case. Names of ASCII letters up to
/// [`INLINE_NAME_BYTES`] long, which is every real command, are kept
/// inline, so naming a request allocates nothing.
pub enum CommandName {
    Inline {
        bytes: [u8; INLINE_NAME_BYTES],
        len: u8,
    },
    Heap(String),
}

impl CommandName {
    /// Upper-cases `name`; bytes that are not UTF-8 become U+FFFD.
    pub fn new(name: &[u8]) -> CommandName {
        if name.len() <= INLINE_NAME_BYTES && name.is_ascii() {
            let mut bytes = [0; INLINE_NAME_BYTES];
            for (to, from) in bytes.iter_mut().zip(name) {
                *to = from.to_ascii_uppercase();
            }
            return CommandName::Inline {
                bytes,
                len: name.len() as u8,
            };
        }
        CommandName::Heap(String::from_utf8_lossy(name).to_ascii_uppercase())
    }

    pub fn as_str(&self) -> &str {
        match self {
            // `new` stores only ASCII inline, which is valid UTF-8.
            CommandName::Inline { bytes, len } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            CommandName::Heap(name) => name,
        }
    }
}

impl std::ops::Deref for CommandName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for CommandName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
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
    let length = match scalar_reply_length(buf, protocol) {
        Some(length) => length,
        None => decoded_length(buf, protocol)?,
    };
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

/// Measures the frame at the start of `buf` with the full decoder. Returns
/// `Ok(None)` while the frame is incomplete.
fn decoded_length(buf: &[u8], protocol: Protocol) -> Result<Option<usize>, FrameError> {
    let decoded = match protocol {
        Protocol::Resp2 => resp2::decode_range(buf).map(|found| found.map(|(_, len)| len)),
        Protocol::Resp3 => resp3::decode_range(buf).map(|found| found.map(|(_, len)| len)),
    };
    decoded.map_err(|err| FrameError::Invalid(err.details().to_string()))
}

/// Measures the most common replies without the full decoder: a simple
/// string, an error, an integer or a bulk string at the start of `buf`.
/// Returns `Some(None)` when such a reply is not complete yet, and `None`
/// for any other frame and for anything malformed, which the full decoder
/// then measures or rejects.
fn scalar_reply_length(buf: &[u8], protocol: Protocol) -> Option<Option<usize>> {
    let first = *buf.first()?;
    if !matches!(first, b'+' | b'-' | b':' | b'$') {
        return None;
    }
    let Some(cr) = buf.iter().position(|&byte| byte == b'\r') else {
        // A line feed before any carriage return is malformed.
        return (!buf.contains(&b'\n')).then_some(None);
    };
    let line_end = cr + 2;
    if buf.len() < line_end {
        return Some(None);
    }
    let line = &buf[1..cr];
    if buf[cr + 1] != b'\n' || line.contains(&b'\n') {
        return None;
    }
    match first {
        b'+' | b'-' => Some(Some(line_end)),
        b':' => parse_integer(line).map(|_| Some(line_end)),
        _ => {
            if line == b"-1" && protocol == Protocol::Resp2 {
                return Some(Some(line_end));
            }
            if line.first() == Some(&b'-') {
                return None;
            }
            let length = usize::try_from(parse_integer(line)?).ok()?;
            let end = line_end.checked_add(length)?.checked_add(2)?;
            if buf.len() < end {
                return Some(None);
            }
            (&buf[end - 2..end] == b"\r\n").then_some(Some(end))
        }
    }
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
    fn scalar_reply_scan_matches_decoder() {
        let frames: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR wrong number of arguments\r\n",
            b":0\r\n",
            b":-42\r\n",
            b"$5\r\nhello\r\n",
            b"$0\r\n\r\n",
            b"$4\r\na\r\nb\r\n",
            b"$-1\r\n",
        ];
        for protocol in [Protocol::Resp2, Protocol::Resp3] {
            for frame in frames {
                // Every prefix, the frame alone, and the frame with the
                // start of the next reply behind it.
                let mut inputs: Vec<Vec<u8>> =
                    (1..frame.len()).map(|n| frame[..n].to_vec()).collect();
                inputs.push(frame.to_vec());
                inputs.push([*frame, b"+OK\r".as_slice()].concat());
                for input in inputs {
                    let Some(fast) = scalar_reply_length(&input, protocol) else {
                        assert!(
                            *frame == b"$-1\r\n" && protocol == Protocol::Resp3,
                            "{:?} left to the decoder",
                            String::from_utf8_lossy(&input)
                        );
                        continue;
                    };
                    assert_eq!(
                        Some(fast),
                        decoded_length(&input, protocol).ok(),
                        "{:?} with {protocol:?}",
                        String::from_utf8_lossy(&input)
                    );
                }
            }
        }
        // Malformed replies go to the decoder, which judges them as before.
        for bad in [&b":12x\r\n"[..], b"$3\r\nabcd\r\n", b"+O\nK\r\n", b"$x\r\n"] {
            assert_eq!(scalar_reply_length(bad, Protocol::Resp2), None);
            let mut buf = BytesMut::from(bad);
            let parsed = parse_reply(&mut buf, Protocol::Resp2, 1024);
            let decoded = decoded_length(bad, Protocol::Resp2);
            assert_eq!(parsed.is_err(), decoded.is_err());
        }
        // Other kinds are left to the decoder.
        assert_eq!(scalar_reply_length(b"*1\r\n+OK\r\n", Protocol::Resp2), None);
        assert_eq!(scalar_reply_length(b"_\r\n", Protocol::Resp3), None);
    }

    #[test]
    fn command_name_upper_cases() {
        assert_eq!(CommandName::new(b"get"), "GET");
        assert_eq!(CommandName::new(b"Client"), "CLIENT");
        assert!(matches!(
            CommandName::new(b"hget"),
            CommandName::Inline { .. }
        ));
        assert_eq!(CommandName::new(b""), "");
        // A longer name, and names that are not plain ASCII, are named as
        // before: upper-cased ASCII, other characters kept, bytes that are
        // not UTF-8 replaced.
        let long = "x".repeat(INLINE_NAME_BYTES + 1);
        let name = CommandName::new(long.as_bytes());
        assert!(matches!(name, CommandName::Heap(_)));
        assert_eq!(name, long.to_ascii_uppercase().as_str());
        assert_eq!(CommandName::new("gét".as_bytes()), "GéT");
        assert_eq!(CommandName::new(b"g\xffx"), "G\u{fffd}X");
        assert_eq!(CommandName::new(b"set").to_string(), "SET");
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
