//! Redis Cluster key slots: CRC16-XMODEM of the key, or of its hash tag,
//! modulo 16384.

/// Number of hash slots in a Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

/// Returns the cluster slot of `key`.
///
/// When the key contains `{`, a later `}` and at least one byte between them,
/// only those bytes are hashed, so `user{42}.name` and `user{42}.mail` share a
/// slot. An empty tag (`foo{}{bar}`) hashes the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key)) % SLOT_COUNT
}

fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let rest = &key[open + 1..];
    match rest.iter().position(|&b| b == b'}') {
        Some(close) if close > 0 => &rest[..close],
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_check_value() {
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOT_COUNT);
    }

    #[test]
    fn hash_tag_selects_substring() {
        assert_eq!(key_slot(b"user{42}.name"), key_slot(b"42"));
        assert_eq!(key_slot(b"{42}"), key_slot(b"42"));
        assert_eq!(key_slot(b"a{b}c{d}"), key_slot(b"b"));
    }

    #[test]
    fn empty_or_open_tag_hashes_whole_key() {
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{bar"), b"foo{bar");
        assert_eq!(hash_tag(b"foo}bar{"), b"foo}bar{");
        assert_eq!(hash_tag(b"foo{{bar}}"), b"{bar");
    }

    #[test]
    fn known_slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.0.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b""), 0);
    }
}
