//! Spare buffers of the current thread. A client session lets go of its
//! read and write buffers whenever it waits for its client, so thousands of
//! idle clients hold none. A busy session would then allocate and free both
//! on every transaction, so the buffers it lets go of are kept here for the
//! next session on the same thread that needs one.

use std::cell::RefCell;

use bytes::BytesMut;

/// Room a buffer must offer to be kept, without allocating: enough for a
/// typical request or reply.
pub const SPARE_ROOM: usize = 1024;

/// Largest buffer kept: larger ones were grown by large messages and are
/// freed.
const MAX_SPARE_CAPACITY: usize = 4096;

/// Buffers kept per thread, at most.
const MAX_SPARES: usize = 64;

thread_local! {
    static SPARES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Returns an empty buffer with room for at least `min` bytes: a spare one
/// when the thread has one that large, else a new one.
pub fn take(min: usize) -> BytesMut {
    let spare = SPARES.with(|spares| {
        let mut spares = spares.borrow_mut();
        match spares.last() {
            Some(last) if last.capacity() >= min => spares.pop(),
            _ => None,
        }
    });
    spare.unwrap_or_else(|| BytesMut::with_capacity(min))
}

/// Keeps `buffer`, emptied, for a later [`take`] when it can offer
/// `SPARE_ROOM` bytes without allocating and is not large; otherwise frees
/// it. A buffer that messages were split off regains the memory they used
/// only when none of them is alive any more.
pub fn give(mut buffer: BytesMut) {
    buffer.clear();
    if buffer.capacity() > MAX_SPARE_CAPACITY || !buffer.try_reclaim(SPARE_ROOM) {
        return;
    }
    SPARES.with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < MAX_SPARES {
            spares.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns how many spare buffers this thread keeps.
    fn kept() -> usize {
        SPARES.with(|spares| spares.borrow().len())
    }

    #[test]
    fn spare_given_is_taken_again() {
        let mut buffer = BytesMut::with_capacity(SPARE_ROOM);
        buffer.extend_from_slice(b"reply");
        give(buffer);
        assert_eq!(kept(), 1);
        let again = take(SPARE_ROOM);
        assert_eq!(kept(), 0);
        assert!(again.is_empty());
        assert!(again.capacity() >= SPARE_ROOM);
    }

    #[test]
    fn spare_shared_with_live_message_freed() {
        let mut buffer = BytesMut::with_capacity(SPARE_ROOM);
        buffer.extend_from_slice(&[7u8; 900]);
        let message = buffer.split_to(900).freeze();
        give(buffer);
        assert_eq!(kept(), 0);
        assert_eq!(message[..], [7u8; 900][..]);
    }

    #[test]
    fn spare_after_messages_dropped_kept_whole() {
        let mut buffer = BytesMut::with_capacity(SPARE_ROOM);
        buffer.extend_from_slice(&[7u8; 900]);
        drop(buffer.split_to(900).freeze());
        give(buffer);
        assert_eq!(kept(), 1);
        assert!(take(SPARE_ROOM).capacity() >= SPARE_ROOM);
    }

    /// A client's read buffer, after a request was split off it and
    /// dropped, is kept for the next read.
    #[test]
    fn spare_read_buffer_reused() {
        let mut buffer = take(super::super::MIN_READ);
        buffer.extend_from_slice(&[b'Q'; 60]);
        drop(buffer.split_to(60).freeze());
        give(buffer);
        assert_eq!(kept(), 1);
        take(super::super::MIN_READ);
        assert_eq!(kept(), 0);
    }

    #[test]
    fn spare_too_large_freed() {
        give(BytesMut::with_capacity(MAX_SPARE_CAPACITY * 2));
        assert_eq!(kept(), 0);
    }

    #[test]
    fn spare_list_bounded() {
        for _ in 0..MAX_SPARES + 10 {
            give(BytesMut::with_capacity(SPARE_ROOM));
        }
        assert_eq!(kept(), MAX_SPARES);
    }
}
