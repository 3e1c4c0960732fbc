//! Extended-protocol messages whose statement names the pooler rewrites:
//! Parse, Bind, Describe and Close.

use bytes::{BufMut, Bytes, BytesMut};

use super::{frontend, read_cstr, read_cstr_lossy, Message, ProtocolError};

/// A decoded Parse message.
#[derive(Debug, Clone)]
pub struct Parse {
    pub name: String,
    /// Query text for inspection; bytes that are not UTF-8 are replaced.
    pub query: String,
    /// Query text exactly as the client sent it, in its client_encoding.
    pub query_bytes: Bytes,
    /// Parameter count and type OIDs, as sent.
    pub param_types: Bytes,
}

impl Parse {
    pub fn decode(message: &Message) -> Result<Parse, ProtocolError> {
        let mut body = message.body();
        let name = read_cstr_lossy(&mut body).ok_or(ProtocolError::Malformed("Parse"))?;
        let query_start = body;
        let query = read_cstr_lossy(&mut body).ok_or(ProtocolError::Malformed("Parse"))?;
        let query_bytes =
            Bytes::copy_from_slice(&query_start[..query_start.len() - body.len() - 1]);
        if body.len() < 2 {
            return Err(ProtocolError::Malformed("Parse"));
        }
        let count = i16::from_be_bytes([body[0], body[1]]);
        if count < 0 || body.len() != 2 + 4 * count as usize {
            return Err(ProtocolError::Malformed("Parse"));
        }
        Ok(Parse {
            name: name.into_owned(),
            query: query.into_owned(),
            query_bytes,
            param_types: Bytes::copy_from_slice(body),
        })
    }

    /// Encodes this Parse under another statement name.
    pub fn encode_as(&self, name: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(self.query_bytes.len() + name.len() + 16);
        out.put_u8(frontend::PARSE);
        out.put_u32(0);
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.put_slice(&self.query_bytes);
        out.put_u8(0);
        out.put_slice(&self.param_types);
        let length = (out.len() - 1) as u32;
        out[1..5].copy_from_slice(&length.to_be_bytes());
        out.freeze()
    }
}

/// The names in a Bind message; the rest of the body is kept as sent.
#[derive(Debug, Clone)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Everything after the statement name.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(message: &'a Message) -> Result<Bind<'a>, ProtocolError> {
        let mut body = message.body();
        let portal = read_cstr(&mut body).ok_or(ProtocolError::Malformed("Bind"))?;
        let statement = read_cstr(&mut body).ok_or(ProtocolError::Malformed("Bind"))?;
        Ok(Bind {
            portal,
            statement,
            rest: body,
        })
    }

    /// Appends this Bind to `out` with another statement name.
    pub fn encode_with_statement(&self, statement: &str, out: &mut BytesMut) {
        let start = out.len();
        out.reserve(self.rest.len() + self.portal.len() + statement.len() + 7);
        out.put_u8(frontend::BIND);
        out.put_u32(0);
        out.put_slice(self.portal.as_bytes());
        out.put_u8(0);
        out.put_slice(statement.as_bytes());
        out.put_u8(0);
        out.put_slice(self.rest);
        let length = (out.len() - start - 1) as u32;
        out[start + 1..start + 5].copy_from_slice(&length.to_be_bytes());
    }
}

/// Describe or Close target: a prepared statement (`S`) or a portal (`P`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: u8,
    pub name: String,
}

pub const TARGET_STATEMENT: u8 = b'S';
pub const TARGET_PORTAL: u8 = b'P';

impl Target {
    /// Decodes the body of a Describe or Close message.
    pub fn decode(message: &Message) -> Result<Target, ProtocolError> {
        let body = message.body();
        let (&kind, mut rest) = body
            .split_first()
            .ok_or(ProtocolError::Malformed("Describe"))?;
        if kind != TARGET_STATEMENT && kind != TARGET_PORTAL {
            return Err(ProtocolError::Malformed("Describe"));
        }
        let name = read_cstr(&mut rest).ok_or(ProtocolError::Malformed("Describe"))?;
        Ok(Target {
            kind,
            name: name.to_string(),
        })
    }

    /// Encodes a Describe (`tag` = 'D') or Close (`tag` = 'C') of this target
    /// under another name.
    pub fn encode_as(&self, tag: u8, name: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(name.len() + 7);
        out.put_u8(tag);
        out.put_u32((name.len() + 6) as u32);
        out.put_u8(self.kind);
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(raw: Bytes) -> Message {
        Message { raw }
    }

    fn parse_bytes(name: &str, query: &str, types: &[u32]) -> Bytes {
        let parse = Parse {
            name: name.into(),
            query: query.into(),
            query_bytes: Bytes::copy_from_slice(query.as_bytes()),
            param_types: {
                let mut t = BytesMut::new();
                t.put_i16(types.len() as i16);
                for oid in types {
                    t.put_u32(*oid);
                }
                t.freeze()
            },
        };
        parse.encode_as(name)
    }

    #[test]
    fn parse_round_trip_and_rename() {
        let raw = parse_bytes("s1", "select $1::int", &[23]);
        let parse = Parse::decode(&message(raw.clone())).unwrap();
        assert_eq!(parse.name, "s1");
        assert_eq!(parse.query, "select $1::int");
        assert_eq!(parse.encode_as("s1"), raw);
        let renamed = Parse::decode(&message(parse.encode_as("skiff_7"))).unwrap();
        assert_eq!(renamed.name, "skiff_7");
        assert_eq!(renamed.param_types, parse.param_types);
    }

    #[test]
    fn parse_with_wrong_type_count_is_malformed() {
        let mut raw = BytesMut::from(&parse_bytes("", "select 1", &[23])[..]);
        raw.truncate(raw.len() - 2);
        let length = (raw.len() - 1) as u32;
        raw[1..5].copy_from_slice(&length.to_be_bytes());
        assert!(Parse::decode(&message(raw.freeze())).is_err());
    }

    #[test]
    fn bind_rename_keeps_parameters() {
        let mut raw = BytesMut::new();
        raw.put_u8(b'B');
        raw.put_u32(0);
        raw.put_slice(b"p1\0s1\0");
        raw.put_slice(&[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
        let length = (raw.len() - 1) as u32;
        raw[1..5].copy_from_slice(&length.to_be_bytes());
        let original = message(raw.freeze());
        let bind = Bind::decode(&original).unwrap();
        assert_eq!(bind.portal, "p1");
        assert_eq!(bind.statement, "s1");
        let mut out = BytesMut::from(&b"queued before"[..]);
        bind.encode_with_statement("skiff_1", &mut out);
        assert_eq!(&out[..13], b"queued before");
        let renamed = message(out.split_off(13).freeze());
        let decoded = Bind::decode(&renamed).unwrap();
        assert_eq!(decoded.statement, "skiff_1");
        assert_eq!(decoded.rest, bind.rest);
    }

    #[test]
    fn describe_round_trip() {
        let target = Target {
            kind: TARGET_STATEMENT,
            name: "s1".into(),
        };
        let raw = target.encode_as(b'D', "s1");
        assert_eq!(Target::decode(&message(raw)).unwrap(), target);
    }
}
