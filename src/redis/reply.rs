//! Replies skiff writes itself, encoded for the client's RESP version, and
//! the exact error strings Redis uses.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{put_bulk, Protocol};

pub const NOAUTH: &str = "NOAUTH Authentication required.";
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
pub const NOPASS_CONFIGURED: &str = "ERR AUTH <password> called without any password \
     configured for the default user. Are you sure your configuration is correct?";
pub const NOPROTO: &str = "NOPROTO unsupported protocol version";
pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";
pub const SELECT_IN_CLUSTER: &str = "ERR SELECT is not allowed in cluster mode";
pub const DB_OUT_OF_RANGE: &str = "ERR DB index is out of range";
pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const SYNTAX: &str = "ERR syntax error";
pub const BAD_CLIENT_NAME: &str =
    "ERR Client names cannot contain spaces, newlines or special characters.";

/// `-ERR wrong number of arguments for 'name' command`.
pub fn wrong_arity(name: &str) -> String {
    format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    )
}

/// Encodes a `-` error; `text` starts with the error code.
pub fn error(text: &str) -> Bytes {
    // Line breaks would end the frame early, so Redis replaces them.
    let clean = text.replace(['\r', '\n'], " ");
    Bytes::from(format!("-{clean}\r\n"))
}

pub fn simple(text: &str) -> Bytes {
    Bytes::from(format!("+{text}\r\n"))
}

pub fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

pub fn integer(value: i64) -> Bytes {
    Bytes::from(format!(":{value}\r\n"))
}

pub fn bulk(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 16);
    put_bulk(&mut out, data);
    out.freeze()
}

pub fn null(protocol: Protocol) -> Bytes {
    match protocol {
        Protocol::Resp2 => Bytes::from_static(b"$-1\r\n"),
        Protocol::Resp3 => Bytes::from_static(b"_\r\n"),
    }
}

/// Appends an array header for `len` elements.
pub fn put_array_header(out: &mut BytesMut, len: usize) {
    out.put_slice(format!("*{len}\r\n").as_bytes());
}

/// Appends a map header; RESP2 has no maps, so it becomes a flat array.
pub fn put_map_header(out: &mut BytesMut, protocol: Protocol, pairs: usize) {
    match protocol {
        Protocol::Resp2 => put_array_header(out, pairs * 2),
        Protocol::Resp3 => out.put_slice(format!("%{pairs}\r\n").as_bytes()),
    }
}

/// Encodes an array of already encoded elements.
pub fn array(elements: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    put_array_header(&mut out, elements.len());
    for element in elements {
        out.put_slice(element);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::frame::Value;

    #[test]
    fn error_replaces_line_breaks() {
        assert_eq!(&error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
    }

    #[test]
    fn map_header_per_protocol() {
        let mut resp2 = BytesMut::new();
        put_map_header(&mut resp2, Protocol::Resp2, 2);
        assert_eq!(&resp2[..], b"*4\r\n");
        let mut resp3 = BytesMut::new();
        put_map_header(&mut resp3, Protocol::Resp3, 2);
        assert_eq!(&resp3[..], b"%2\r\n");
    }

    #[test]
    fn array_round_trips_through_decoder() {
        let encoded = array(&[bulk(b"a"), integer(7), null(Protocol::Resp2)]);
        let value = Value::decode(&encoded, Protocol::Resp2).unwrap();
        assert_eq!(
            value,
            Value::Array(vec![
                Value::Str(Bytes::from_static(b"a")),
                Value::Int(7),
                Value::Nil
            ])
        );
    }

    #[test]
    fn wrong_arity_uses_lower_case_name() {
        assert_eq!(
            wrong_arity("GET"),
            "ERR wrong number of arguments for 'get' command"
        );
    }
}
