//! Batch files of the one-file-per-batch format that earlier versions
//! wrote: `{seq:016x}.batch`, holding the magic `SKIFFSP1`, a 4-byte
//! big-endian header length, the JSON [`BatchHeader`], then the encoded
//! `LogGroup`.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

use super::{BatchHeader, Entry, Location, State};
use crate::logship::record::now_ns;

pub(super) const LEGACY_MAGIC: &[u8; 8] = b"SKIFFSP1";
/// Headers are small; a larger length means a damaged file.
pub(super) const MAX_HEADER_BYTES: u32 = 1 << 20;

/// Indexes a batch file of the one-file-per-batch format.
pub(super) fn index_legacy(state: &mut State, path: &Path, seq: u64) -> io::Result<()> {
    let bytes = fs::metadata(path)?.len();
    let entry = match read_legacy_header(path) {
        Ok((header, header_bytes)) => Entry {
            location: Location::Legacy { bytes },
            payload_bytes: bytes.saturating_sub(header_bytes),
            records: header.records,
            created_ns: header.created_ns,
            key: Some(header.key),
        },
        Err(_) => Entry {
            location: Location::Legacy { bytes },
            payload_bytes: bytes,
            records: 0,
            created_ns: now_ns(),
            key: None,
        },
    };
    state.insert_entry(seq, entry);
    state.total_bytes += bytes;
    state.next_seq = state.next_seq.max(seq + 1);
    Ok(())
}

pub(super) fn parse_legacy(data: &[u8]) -> Option<(BatchHeader, usize)> {
    let rest = data.strip_prefix(LEGACY_MAGIC.as_slice())?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    if len > MAX_HEADER_BYTES {
        return None;
    }
    let header_end = 4 + len as usize;
    let header = serde_json::from_slice(rest.get(4..header_end)?).ok()?;
    Some((header, LEGACY_MAGIC.len() + header_end))
}

/// Reads a legacy batch file's header and returns it with the bytes before
/// the log group.
pub(super) fn read_legacy_header(path: &Path) -> io::Result<(BatchHeader, u64)> {
    let mut file = OpenOptions::new().read(true).open(path)?;
    let mut prefix = [0u8; 12];
    file.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
    if &prefix[..8] != LEGACY_MAGIC || len > MAX_HEADER_BYTES {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header).map_err(io::Error::other)?;
    Ok((header, 12 + u64::from(len)))
}
