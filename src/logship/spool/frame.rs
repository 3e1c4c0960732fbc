//! Frames of a segment: a 4-byte little-endian body length, a CRC-32
//! (IEEE) of those 4 bytes and the body, then the body, whose first byte is
//! its kind. The layout of each kind is in the spool module's documentation.

use std::io::{self, Read};

use super::NewBatch;
use crate::logship::record::{now_ns, GroupKey};

/// Body length and CRC in front of every frame.
pub(super) const FRAME_HEADER_BYTES: usize = 8;
/// A batch body before its key: kind, seq, created_ns, records, logs_len,
/// key length.
pub(super) const BATCH_FIXED_BYTES: usize = 1 + 8 + 8 + 4 + 4 + 4;
/// Bodies are at most a request (5 MiB) and a key; a longer length is damage.
pub(super) const MAX_FRAME_BODY_BYTES: u32 = 16 << 20;
pub(super) const KIND_BATCH: u8 = 1;
pub(super) const KIND_ACKS: u8 = 2;

/// Appends a batch frame to `out`.
pub(super) fn encode_batch_frame(
    out: &mut Vec<u8>,
    seq: u64,
    created_ns: u64,
    batch: &NewBatch<'_>,
) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    out.push(KIND_BATCH);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&created_ns.to_le_bytes());
    let records = u32::try_from(batch.records).map_err(io::Error::other)?;
    out.extend_from_slice(&records.to_le_bytes());
    out.extend_from_slice(&(batch.logs_len.min(batch.log_group.len()) as u32).to_le_bytes());
    let key_len_at = out.len();
    out.extend_from_slice(&[0u8; 4]);
    serde_json::to_writer(&mut *out, batch.key).map_err(io::Error::other)?;
    let key_len = (out.len() - key_len_at - 4) as u32;
    out[key_len_at..key_len_at + 4].copy_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(batch.log_group);
    if out.len() - start - FRAME_HEADER_BYTES > MAX_FRAME_BODY_BYTES as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "batch too large for a spool frame",
        ));
    }
    seal_frame_at(out, start);
    Ok(())
}

/// Encodes an acknowledgement frame for `seqs`.
pub(super) fn encode_ack_frame(seqs: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    frame.push(KIND_ACKS);
    frame.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for seq in seqs {
        frame.extend_from_slice(&seq.to_le_bytes());
    }
    seal_frame_at(&mut frame, 0);
    frame
}

/// Fills in the length and CRC of the frame from `start` to the end.
pub(super) fn seal_frame_at(buf: &mut [u8], start: usize) {
    let body_len = (buf.len() - start - FRAME_HEADER_BYTES) as u32;
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    let crc = frame_crc(&buf[start..start + 4], &buf[start + FRAME_HEADER_BYTES..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn frame_crc(len: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(body);
    hasher.finalize()
}

/// Checks a whole frame's header and CRC; returns the body length.
pub(super) fn check_frame(frame: &[u8]) -> Option<u32> {
    let len = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(frame.get(4..8)?.try_into().ok()?);
    let body = frame.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len as usize)?;
    (len > 0 && frame_crc(&frame[..4], body) == crc).then_some(len)
}

/// Reads the frame at `offset` into `body`. Returns its body length, or
/// `None` at the end of the file or at a frame that does not check.
pub(super) fn read_frame(
    reader: &mut impl Read,
    offset: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<Option<u32>> {
    if offset + FRAME_HEADER_BYTES as u64 > file_len {
        return Ok(None);
    }
    let mut header = [0u8; FRAME_HEADER_BYTES];
    reader.read_exact(&mut header)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let end = offset + FRAME_HEADER_BYTES as u64 + u64::from(len);
    if len == 0 || len > MAX_FRAME_BODY_BYTES || end > file_len {
        return Ok(None);
    }
    body.resize(len as usize, 0);
    reader.read_exact(body)?;
    if frame_crc(&header[..4], body) != crc || !body_is_well_formed(body) {
        return Ok(None);
    }
    Ok(Some(len))
}

/// Checks that a body whose CRC matched has the fields its kind needs.
pub(super) fn body_is_well_formed(body: &[u8]) -> bool {
    match body[0] {
        KIND_BATCH => {
            let Some(fixed) = body.get(..BATCH_FIXED_BYTES) else {
                return false;
            };
            let key_len = u32::from_le_bytes(fixed[BATCH_FIXED_BYTES - 4..].try_into().unwrap());
            let logs_len = u32::from_le_bytes(fixed[21..25].try_into().unwrap());
            let rest = (body.len() - BATCH_FIXED_BYTES) as u64;
            u64::from(key_len) <= rest && u64::from(logs_len) <= rest - u64::from(key_len)
        }
        KIND_ACKS => body.get(1..5).is_some_and(|count| {
            let count = u32::from_le_bytes(count.try_into().unwrap());
            body.len() as u64 == 5 + 8 * u64::from(count)
        }),
        _ => true,
    }
}

/// Fields of a batch frame's body.
pub(super) struct BatchFields {
    pub(super) created_ns: u64,
    pub(super) records: usize,
    /// `None` when the key does not parse.
    pub(super) key: Option<GroupKey>,
    /// Length of the `logs` fields at the start of the log group; `None`
    /// when not recorded.
    pub(super) logs_len: Option<usize>,
    pub(super) log_group_len: usize,
}

/// Parses a batch body that [`body_is_well_formed`] accepted; returns the
/// sequence number and the fields.
pub(super) fn parse_batch_body(body: &[u8]) -> (u64, BatchFields) {
    if !body_is_well_formed(body) || body[0] != KIND_BATCH {
        let fields = BatchFields {
            created_ns: now_ns(),
            records: 0,
            key: None,
            logs_len: None,
            log_group_len: 0,
        };
        return (u64::MAX, fields);
    }
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
    let key_len = u32_at(25);
    let key_end = BATCH_FIXED_BYTES + key_len;
    let logs_len = u32_at(21);
    let fields = BatchFields {
        created_ns: u64_at(9),
        records: u32_at(17),
        key: serde_json::from_slice(&body[BATCH_FIXED_BYTES..key_end]).ok(),
        logs_len: (logs_len > 0).then_some(logs_len),
        log_group_len: body.len() - key_end,
    };
    (u64_at(1), fields)
}

/// Returns the sequence numbers of an acknowledgement body that
/// [`body_is_well_formed`] accepted.
pub(super) fn parse_ack_body(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    body[5..]
        .chunks_exact(8)
        .map(|seq| u64::from_le_bytes(seq.try_into().unwrap()))
}
