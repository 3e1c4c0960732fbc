//! Frames of a segment: a 4-byte body length, a CRC-32 (IEEE), the 8-byte
//! id of the segment the frame was written to, then the body, whose first
//! byte is its kind. The CRC covers the length, the id and the body, and
//! all integers are little-endian. The layout of each kind is in the spool
//! module's documentation.
//!
//! The id distinguishes a frame from one left by an earlier use of a reused
//! segment file, which is intact but names another segment.

use std::io::{self, Read};

use super::NewBatch;
use crate::logship::record::{now_ns, GroupKey};

/// Body length, CRC and segment id in front of every frame.
pub(super) const FRAME_HEADER_BYTES: usize = 16;
/// A batch body before its key: kind, seq, created_ns, records, logs_len,
/// key length.
pub(super) const BATCH_FIXED_BYTES: usize = 1 + 8 + 8 + 4 + 4 + 4;
/// Bodies are at most a request (5 MiB) and a key; a longer length is damage.
pub(super) const MAX_FRAME_BODY_BYTES: u32 = 16 << 20;
pub(super) const KIND_BATCH: u8 = 1;
pub(super) const KIND_ACKS: u8 = 2;

/// Appends a batch frame to `out`, with its header left for
/// [`seal_frame_at`] to fill in.
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
    Ok(())
}

/// Encodes an acknowledgement frame for `seqs`, with its header left for
/// [`seal_frame_at`] to fill in.
pub(super) fn encode_ack_frame(seqs: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    frame.push(KIND_ACKS);
    frame.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for seq in seqs {
        frame.extend_from_slice(&seq.to_le_bytes());
    }
    frame
}

/// Fills in the header of the frame from `start` to `end` of `buf` for
/// segment `segment`.
pub(super) fn seal_frame_at(buf: &mut [u8], start: usize, end: usize, segment: u64) {
    let body_len = (end - start - FRAME_HEADER_BYTES) as u32;
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&segment.to_le_bytes());
    let crc = frame_crc(&buf[start..start + 4], &buf[start + 8..end]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// CRC of a frame: over its length field, then its segment id and body.
fn frame_crc(len: &[u8], segment_and_body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(segment_and_body);
    hasher.finalize()
}

/// The fields of a frame header.
struct Header {
    len: u32,
    crc: u32,
    segment: u64,
}

impl Header {
    fn parse(bytes: &[u8; FRAME_HEADER_BYTES]) -> Header {
        Header {
            len: u32::from_le_bytes(bytes[..4].try_into().unwrap()),
            crc: u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
            segment: u64::from_le_bytes(bytes[8..].try_into().unwrap()),
        }
    }

    /// Checks the CRC against `body`.
    fn matches(&self, body: &[u8]) -> bool {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.len.to_le_bytes());
        hasher.update(&self.segment.to_le_bytes());
        hasher.update(body);
        hasher.finalize() == self.crc
    }
}

/// Checks a whole frame read back from segment `segment`; returns the body
/// length.
pub(super) fn check_frame(frame: &[u8], segment: u64) -> Option<u32> {
    let header = Header::parse(frame.get(..FRAME_HEADER_BYTES)?.try_into().ok()?);
    let body = frame.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + header.len as usize)?;
    let valid = header.len > 0 && header.segment == segment && header.matches(body);
    valid.then_some(header.len)
}

/// Contents found at a frame position of a segment.
pub(super) enum FrameRead {
    /// A frame of this segment whose body, this many bytes, is now in the
    /// body buffer.
    Frame(u32),
    /// The end of the file, or a header of zeros as a preallocated file
    /// has after its last frame.
    End { zeros: bool },
    /// An intact frame of another segment, left by an earlier use of the
    /// file: this segment's frames ended before it.
    Stale,
    /// Bytes that are no intact frame: a torn write or damage.
    Invalid,
}

/// Reads the frame at `offset` of segment `segment` into `body`.
pub(super) fn read_frame(
    reader: &mut impl Read,
    segment: u64,
    offset: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<FrameRead> {
    if offset == file_len {
        return Ok(FrameRead::End { zeros: false });
    }
    if offset + FRAME_HEADER_BYTES as u64 > file_len {
        return Ok(FrameRead::Invalid);
    }
    let mut bytes = [0u8; FRAME_HEADER_BYTES];
    reader.read_exact(&mut bytes)?;
    if bytes == [0u8; FRAME_HEADER_BYTES] {
        return Ok(FrameRead::End { zeros: true });
    }
    let header = Header::parse(&bytes);
    let end = offset + FRAME_HEADER_BYTES as u64 + u64::from(header.len);
    if header.len == 0 || header.len > MAX_FRAME_BODY_BYTES || end > file_len {
        return Ok(FrameRead::Invalid);
    }
    body.resize(header.len as usize, 0);
    reader.read_exact(body)?;
    Ok(match (header.matches(body), header.segment == segment) {
        (true, true) if body_is_well_formed(body) => FrameRead::Frame(header.len),
        (true, false) => FrameRead::Stale,
        _ => FrameRead::Invalid,
    })
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
