//! Which reads the near cache may answer, and the reply shapes it reads or
//! builds for them.

use bytes::{Bytes, BytesMut};

use crate::redis::frame::{parse_reply, Protocol};
use crate::redis::reply;

/// How the near cache answers a read command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cacheable {
    /// A read of the one key at argument 1 whose reply depends only on that
    /// key and the other arguments. The name is the command's canonical
    /// spelling.
    Single(&'static str),
    /// MGET or EXISTS: each key is looked up, and fetched, on its own.
    PerKey(PerKey),
}

/// Multi-key reads the near cache answers key by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerKey {
    Mget,
    Exists,
}

impl PerKey {
    /// The name under which one key's part is cached and fetched.
    pub fn name(self) -> &'static str {
        match self {
            PerKey::Mget => "MGET",
            PerKey::Exists => "EXISTS",
        }
    }
}

/// Returns how `name` (upper case) with `argc` arguments, the name
/// included, may be cached, or `None` when it must go to Redis each time.
///
/// Left out on purpose: commands with side effects (GETEX, GETDEL, TOUCH,
/// PFCOUNT, which may rewrite its key), replies that change with time or
/// chance (TTL, PTTL, OBJECT, SRANDMEMBER, HRANDFIELD, ZRANDMEMBER, SCAN
/// cursors, XPENDING idle times) and reads of more than one key (SINTER,
/// SORT_RO with BY or GET, LCS). A wrong argument count is never cached,
/// so Redis returns its own error.
pub fn classify(name: &str, argc: usize) -> Option<Cacheable> {
    let (canonical, min, max): (&'static str, usize, Option<usize>) = match name {
        "MGET" if argc >= 2 => return Some(Cacheable::PerKey(PerKey::Mget)),
        "EXISTS" if argc >= 2 => return Some(Cacheable::PerKey(PerKey::Exists)),
        "GET" => ("GET", 2, Some(2)),
        "GETRANGE" => ("GETRANGE", 4, Some(4)),
        "SUBSTR" => ("SUBSTR", 4, Some(4)),
        "STRLEN" => ("STRLEN", 2, Some(2)),
        "TYPE" => ("TYPE", 2, Some(2)),
        "GETBIT" => ("GETBIT", 3, Some(3)),
        "BITCOUNT" => ("BITCOUNT", 2, None),
        "BITPOS" => ("BITPOS", 3, None),
        "HGET" => ("HGET", 3, Some(3)),
        "HMGET" => ("HMGET", 3, None),
        "HGETALL" => ("HGETALL", 2, Some(2)),
        "HKEYS" => ("HKEYS", 2, Some(2)),
        "HVALS" => ("HVALS", 2, Some(2)),
        "HLEN" => ("HLEN", 2, Some(2)),
        "HEXISTS" => ("HEXISTS", 3, Some(3)),
        "HSTRLEN" => ("HSTRLEN", 3, Some(3)),
        "LRANGE" => ("LRANGE", 4, Some(4)),
        "LLEN" => ("LLEN", 2, Some(2)),
        "LINDEX" => ("LINDEX", 3, Some(3)),
        "LPOS" => ("LPOS", 3, None),
        "SMEMBERS" => ("SMEMBERS", 2, Some(2)),
        "SISMEMBER" => ("SISMEMBER", 3, Some(3)),
        "SMISMEMBER" => ("SMISMEMBER", 3, None),
        "SCARD" => ("SCARD", 2, Some(2)),
        "ZCARD" => ("ZCARD", 2, Some(2)),
        "ZSCORE" => ("ZSCORE", 3, Some(3)),
        "ZMSCORE" => ("ZMSCORE", 3, None),
        "ZRANGE" => ("ZRANGE", 4, None),
        "ZRANGEBYSCORE" => ("ZRANGEBYSCORE", 4, None),
        "ZREVRANGE" => ("ZREVRANGE", 4, None),
        "ZREVRANGEBYSCORE" => ("ZREVRANGEBYSCORE", 4, None),
        "ZRANGEBYLEX" => ("ZRANGEBYLEX", 4, None),
        "ZREVRANGEBYLEX" => ("ZREVRANGEBYLEX", 4, None),
        "ZRANK" => ("ZRANK", 3, None),
        "ZREVRANK" => ("ZREVRANK", 3, None),
        "ZCOUNT" => ("ZCOUNT", 4, Some(4)),
        "ZLEXCOUNT" => ("ZLEXCOUNT", 4, Some(4)),
        "XRANGE" => ("XRANGE", 4, None),
        "XREVRANGE" => ("XREVRANGE", 4, None),
        "XLEN" => ("XLEN", 2, Some(2)),
        "GEOPOS" => ("GEOPOS", 2, None),
        "GEODIST" => ("GEODIST", 4, None),
        "GEOHASH" => ("GEOHASH", 2, None),
        _ => return None,
    };
    let fits = argc >= min && max.is_none_or(|max| argc <= max);
    fits.then_some(Cacheable::Single(canonical))
}

/// The reply to a read that found nothing: a null, zero, an empty
/// collection or the type `none`. Only such a reply may be cached when
/// `PTTL` says the key does not exist.
pub fn is_absent_reply(reply: &[u8]) -> bool {
    matches!(
        reply,
        b"$-1\r\n"
            | b"*-1\r\n"
            | b"_\r\n"
            | b":0\r\n"
            | b"*0\r\n"
            | b"%0\r\n"
            | b"~0\r\n"
            | b"+none\r\n"
    )
}

/// True for a reply that is never cached: an error of either RESP version.
pub fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-') | Some(b'!'))
}

/// Parses a `PTTL` reply: milliseconds left, -1 for no expiry, -2 for no key.
pub fn parse_pttl(reply: &[u8]) -> Option<i64> {
    let body = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// Returns the single element of a one-key `MGET` reply (`*1\r\n` and the
/// element), or `None` when the reply has another shape.
pub fn mget_element(reply: &Bytes) -> Option<Bytes> {
    reply
        .starts_with(b"*1\r\n")
        .then(|| reply.slice(4..))
        .filter(|element| !element.is_empty())
}

/// Splits an array reply into the raw bytes of its elements; `None` when
/// `reply` is not one complete array.
pub fn array_elements(reply: &Bytes, protocol: Protocol) -> Option<Vec<Bytes>> {
    let header_end = reply.iter().position(|&b| b == b'\n')? + 1;
    let count: usize = reply
        .strip_prefix(b"*")?
        .get(..header_end.checked_sub(3)?)
        .and_then(|digits| std::str::from_utf8(digits).ok())?
        .parse()
        .ok()?;
    let mut rest = BytesMut::from(&reply[header_end..]);
    let mut elements = Vec::with_capacity(count);
    for _ in 0..count {
        let (element, _) = parse_reply(&mut rest, protocol, usize::MAX).ok()??;
        elements.push(element);
    }
    rest.is_empty().then_some(elements)
}

/// Builds the reply to a multi-key MGET or EXISTS from the parts of its
/// keys, in key order: MGET elements, or one-key EXISTS counts.
pub fn assemble(kind: PerKey, parts: &[Bytes]) -> Bytes {
    match kind {
        PerKey::Mget => {
            let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum::<usize>() + 16);
            reply::put_array_header(&mut out, parts.len());
            for part in parts {
                out.extend_from_slice(part);
            }
            out.freeze()
        }
        PerKey::Exists => {
            let total: i64 = parts.iter().filter_map(|part| parse_integer(part)).sum();
            reply::integer(total)
        }
    }
}

fn parse_integer(reply: &[u8]) -> Option<i64> {
    let body = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_elements_split_raw_replies() {
        let reply = Bytes::from_static(b"*3\r\n$1\r\na\r\n$-1\r\n$2\r\nbc\r\n");
        let elements = array_elements(&reply, Protocol::Resp2).unwrap();
        assert_eq!(
            elements,
            vec![&b"$1\r\na\r\n"[..], b"$-1\r\n", b"$2\r\nbc\r\n"]
        );
        let resp3 = Bytes::from_static(b"*2\r\n_\r\n$1\r\nx\r\n");
        assert_eq!(array_elements(&resp3, Protocol::Resp3).unwrap().len(), 2);
        for invalid in [
            &b"*2\r\n$1\r\na\r\n"[..],
            b"*-1\r\n",
            b"*\n",
            b"$1\r\na\r\n",
        ] {
            let invalid = Bytes::copy_from_slice(invalid);
            assert_eq!(
                array_elements(&invalid, Protocol::Resp2),
                None,
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn classify_checks_name_and_arity() {
        assert_eq!(classify("GET", 2), Some(Cacheable::Single("GET")));
        assert_eq!(classify("GET", 3), None);
        assert_eq!(classify("HGET", 3), Some(Cacheable::Single("HGET")));
        assert_eq!(classify("MGET", 4), Some(Cacheable::PerKey(PerKey::Mget)));
        assert_eq!(
            classify("EXISTS", 2),
            Some(Cacheable::PerKey(PerKey::Exists))
        );
        assert_eq!(classify("MGET", 1), None);
        assert_eq!(classify("SET", 3), None);
        assert_eq!(classify("TTL", 2), None);
        assert_eq!(classify("GETEX", 2), None);
    }

    #[test]
    fn absent_replies() {
        assert!(is_absent_reply(b"$-1\r\n"));
        assert!(is_absent_reply(b"_\r\n"));
        assert!(is_absent_reply(b":0\r\n"));
        assert!(is_absent_reply(b"%0\r\n"));
        assert!(!is_absent_reply(b"$1\r\nx\r\n"));
        assert!(!is_absent_reply(b":1\r\n"));
    }

    #[test]
    fn pttl_and_mget_parts() {
        assert_eq!(parse_pttl(b":1500\r\n"), Some(1500));
        assert_eq!(parse_pttl(b":-2\r\n"), Some(-2));
        assert_eq!(parse_pttl(b"-ERR x\r\n"), None);
        let reply = Bytes::from_static(b"*1\r\n$1\r\nv\r\n");
        assert_eq!(mget_element(&reply).as_deref(), Some(&b"$1\r\nv\r\n"[..]));
        assert_eq!(mget_element(&Bytes::from_static(b"-ERR x\r\n")), None);
    }

    #[test]
    fn assemble_mget_and_exists() {
        let parts = [
            Bytes::from_static(b"$1\r\na\r\n"),
            Bytes::from_static(b"$-1\r\n"),
        ];
        let mget = assemble(PerKey::Mget, &parts);
        assert_eq!(&mget[..], b"*2\r\n$1\r\na\r\n$-1\r\n");
        let counts = [Bytes::from_static(b":1\r\n"), Bytes::from_static(b":1\r\n")];
        assert_eq!(&assemble(PerKey::Exists, &counts)[..], b":2\r\n");
    }
}
