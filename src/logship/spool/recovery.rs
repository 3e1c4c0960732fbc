//! Opening a spool: indexing the segments and batch files an earlier run
//! left, cutting off a torn tail and moving damage aside.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::frame::{
    parse_ack_body, parse_batch_body, read_frame, FrameRead, FRAME_HEADER_BYTES, KIND_ACKS,
    KIND_BATCH,
};
use super::legacy::index_legacy;
use super::{
    parse_name, with_path, Entry, Location, Segment, Spare, Spool, State, BATCH_SUFFIX,
    SEGMENT_MAGIC, SEGMENT_SUFFIX, TEMP_SUFFIX,
};

impl Spool {
    /// Opens the spool with segments of `segment_bytes`, preallocated or not.
    pub(crate) fn open_with(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        preallocate: bool,
    ) -> io::Result<Spool> {
        fs::create_dir_all(dir).map_err(|err| with_path(err, "create spool directory", dir))?;
        let mut state = State::default();
        let mut segment_ids = Vec::new();
        for item in fs::read_dir(dir).map_err(|err| with_path(err, "read spool directory", dir))? {
            let path = item?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(TEMP_SUFFIX) {
                fs::remove_file(&path)?;
            } else if let Some(id) = parse_name(name, SEGMENT_SUFFIX) {
                segment_ids.push(id);
            } else if let Some(seq) = parse_name(name, BATCH_SUFFIX) {
                index_legacy(&mut state, &path, seq)?;
            }
        }
        segment_ids.sort_unstable();
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            preallocate,
            spare: Mutex::new(Spare::None),
            state: Mutex::new(State::default()),
            writer: Mutex::new(()),
            changed: Notify::new(),
        };
        // A segment cut short while it was being created held no frame.
        let mut recovered = Vec::new();
        for &id in &segment_ids {
            let path = spool.segment_path(id);
            if fs::metadata(&path)?.len() < SEGMENT_MAGIC.len() as u64 {
                fs::remove_file(&path).map_err(|err| with_path(err, "remove", &path))?;
            } else {
                recovered.push(id);
            }
        }
        let newest = recovered.last().copied();
        let mut acked = HashSet::new();
        for &id in &recovered {
            spool.recover_segment(&mut state, id, Some(id) == newest, &mut acked)?;
        }
        spool.drop_acknowledged(&mut state, &acked)?;
        let highest_ack = acked.iter().max().map_or(0, |seq| seq + 1);
        state.next_seq = state.next_seq.max(highest_ack);
        *spool.state.lock() = state;
        spool.update_gauges();
        Ok(spool)
    }

    /// Drops the batches that acknowledgement frames name, then deletes
    /// the segments left with no batch.
    fn drop_acknowledged(&self, state: &mut State, acked: &HashSet<u64>) -> io::Result<()> {
        let acked_entries: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|seq| {
                state
                    .entries
                    .get(seq)
                    .is_some_and(|entry| matches!(entry.location, Location::Frame { .. }))
            })
            .collect();
        for seq in acked_entries {
            if let Some(Entry {
                location: Location::Frame { segment, .. },
                ..
            }) = state.remove_entry(seq)
            {
                if let Some(seg) = state.segments.get_mut(&segment) {
                    seg.live -= 1;
                }
            }
        }
        let empty: Vec<u64> = state
            .segments
            .iter()
            .filter(|(_, seg)| seg.live == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in empty {
            if let Some(seg) = state.segments.remove(&id) {
                state.total_bytes -= seg.disk;
            }
            let path = self.segment_path(id);
            fs::remove_file(&path).map_err(|err| with_path(err, "remove", &path))?;
        }
        Ok(())
    }

    /// Indexes the frames of segment `id`, collecting acknowledged sequence
    /// numbers into `acked`, and cuts off a torn or damaged tail.
    fn recover_segment(
        &self,
        state: &mut State,
        id: u64,
        newest: bool,
        acked: &mut HashSet<u64>,
    ) -> io::Result<()> {
        let path = self.segment_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| with_path(err, "open", &path))?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(256 * 1024, &file);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic)?;
        if &magic != SEGMENT_MAGIC {
            drop(reader);
            drop(file);
            let target = self.corrupt_path(&format!("{id:016x}{SEGMENT_SUFFIX}"))?;
            fs::rename(&path, &target).map_err(|err| with_path(err, "move", &path))?;
            metrics::counter!("skiff_logship_batches_corrupt_total").increment(1);
            tracing::error!(file = %target.display(),
                "spool segment without its magic moved aside; its records were not sent");
            return Ok(());
        }
        let mut offset = SEGMENT_MAGIC.len() as u64;
        let mut body = Vec::new();
        let mut live = 0usize;
        let end = loop {
            let len = match read_frame(&mut reader, id, offset, file_len, &mut body)? {
                FrameRead::Frame(len) => len,
                other => break other,
            };
            let frame_len = FRAME_HEADER_BYTES as u32 + len;
            match body[0] {
                KIND_BATCH => {
                    let (seq, header) = parse_batch_body(&body);
                    let entry = Entry {
                        location: Location::Frame {
                            segment: id,
                            offset,
                            len: frame_len,
                        },
                        payload_bytes: header.log_group_len as u64,
                        records: header.records,
                        created_ns: header.created_ns,
                        key: header.key,
                    };
                    if state.insert_entry(seq, entry) {
                        live += 1;
                    }
                    state.next_seq = state.next_seq.max(seq + 1);
                }
                KIND_ACKS => acked.extend(parse_ack_body(&body)),
                // A kind this version does not know is skipped.
                _ => {}
            }
            offset += u64::from(frame_len);
        };
        drop(reader);
        // After the last frame come zeros of a preallocated file, or frames
        // of a recycled file's earlier use: neither is damage.
        let clean = match end {
            FrameRead::End { zeros } => !zeros || is_zero(&file, offset, file_len)?,
            FrameRead::Stale => true,
            FrameRead::Frame(_) | FrameRead::Invalid => false,
        };
        if offset < file_len && clean {
            file.set_len(offset)
                .map_err(|err| with_path(err, "truncate", &path))?;
        } else if offset < file_len {
            let dropped = file_len - offset;
            if newest {
                tracing::warn!(segment = %path.display(), bytes = dropped,
                    "spool segment ends in an interrupted write; cut off");
            } else {
                let target = self.corrupt_path(&format!("{id:016x}{SEGMENT_SUFFIX}.{offset}"))?;
                copy_range(&file, offset, dropped, &target)?;
                metrics::counter!("skiff_logship_batches_corrupt_total").increment(1);
                tracing::error!(segment = %path.display(), file = %target.display(),
                    bytes = dropped, "damaged spool segment: the frames from the damage on \
                    were moved aside and not sent; earlier frames are kept");
            }
            file.set_len(offset)
                .map_err(|err| with_path(err, "truncate", &path))?;
            file.sync_all()?;
        }
        state.next_seq = state.next_seq.max(id + 1);
        state.total_bytes += offset;
        state.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len: offset,
                disk: offset,
                live,
            },
        );
        Ok(())
    }
}

/// Checks whether `file` holds only zeros from `from` to `to`.
pub(super) fn is_zero(file: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = from;
    while at < to {
        let chunk = (to - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..chunk], at)?;
        if buf[..chunk].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += chunk as u64;
    }
    Ok(true)
}

/// Copies `len` bytes of `file` from `offset` into a new file at `target`
/// and syncs it.
pub(super) fn copy_range(file: &File, offset: u64, len: u64, target: &Path) -> io::Result<()> {
    let mut out = File::create(target).map_err(|err| with_path(err, "create", target))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..chunk], offset + done)?;
        out.write_all(&buf[..chunk])?;
        done += chunk as u64;
    }
    out.sync_all()
}
