//! Durable spool: an append-only log of segment files in `spool_dir`.
//!
//! Each group commit appends its batches to the open segment with one
//! write and one `fdatasync`, and a batch counts as accepted only after that
//! returns. A segment is closed at a size (a sixteenth of `max_spool_bytes`,
//! 4 KiB to 16 MiB) and deleted once a sink has acknowledged every batch in
//! it. Acknowledgements of batches whose segment stays are appended as
//! small frames without a sync, so a restart resends few delivered batches.
//! Segments of 1 MiB or more are preallocated: when the open segment is
//! half full, the next one is made ready, so syncing frames later written
//! over its old contents records no change of size or allocation. The next
//! segment is a deleted segment's file when delivery emptied one of at
//! least half the size meanwhile, else a new file that a background thread
//! fills with zeros.
//!
//! Segment file `{id:016x}.seg`: the magic `SKIFFSG1`, then frames. A frame
//! is a 4-byte body length, a CRC-32 (IEEE), the 8-byte id of its segment,
//! then the body, all integers little-endian. The CRC covers the length,
//! the id and the body, and the id tells frames left by a reused file's
//! earlier use from this segment's own. The body's first byte is its kind:
//!
//! - batch: `seq` u64, `created_ns` u64, `records` u32, `logs_len` u32, key
//!   length u32, the JSON [`GroupKey`], then the encoded `LogGroup`, whose
//!   first `logs_len` bytes are its `logs` fields;
//! - acknowledgement: a count u32, then that many `seq` u64.
//!
//! On start every segment is scanned. Its frames end at zeros of a
//! preallocated file or at an intact frame of another segment. The newest
//! segment may instead end in a write that a crash interrupted. It is cut
//! off at the first frame that does not check, because no source was told
//! that frame was accepted. In an older segment, which was synced in full
//! before the next one was opened, such a frame is damage: the rest of the
//! file is copied to `corrupt/` and the frames before it are kept.
//!
//! Spools written by earlier versions hold one file per batch,
//! `{seq:016x}.batch`: the magic `SKIFFSP1`, a 4-byte big-endian header
//! length, the JSON [`BatchHeader`], then the encoded `LogGroup`. Such files
//! are read, delivered and deleted as before, and new batches go to segments.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::proto::split_log_fields;
use super::record::{now_ns, GroupKey};

mod frame;
mod legacy;
mod recovery;
mod segment;

use frame::{check_frame, encode_batch_frame, parse_batch_body, FRAME_HEADER_BYTES, KIND_BATCH};
use legacy::parse_legacy;
use recovery::copy_range;

const SEGMENT_MAGIC: &[u8; 8] = b"SKIFFSG1";
const SEGMENT_SUFFIX: &str = ".seg";
const BATCH_SUFFIX: &str = ".batch";
const TEMP_SUFFIX: &str = ".tmp";
/// Room counted for a batch's frame header and group key on top of its
/// log group, and for a new segment's magic. A key with long tags can
/// exceed it by the length of the tags.
pub const BATCH_OVERHEAD_BYTES: u64 = 1024;
/// Bounds of a segment's size.
const MIN_SEGMENT_BYTES: u64 = 4096;
const MAX_SEGMENT_BYTES: u64 = 16 << 20;
/// Segments this large or larger are preallocated.
const PREALLOCATE_MIN_SEGMENT_BYTES: u64 = 1 << 20;
/// Name of the spare segment while it is preallocated and waits for use;
/// the `.tmp` suffix makes a start after a crash delete it.
const SPARE_NAME: &str = "next-segment.tmp";

/// Metadata of a spooled batch: the log group's key, record count and time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchHeader {
    pub key: GroupKey,
    pub records: usize,
    /// When the batch was written, in nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// A batch read back from the spool.
#[derive(Debug, Clone)]
pub struct SpooledBatch {
    pub seq: u64,
    pub header: BatchHeader,
    /// The encoded `LogGroup`, uncompressed.
    pub log_group: Bytes,
}

/// A batch to write: its group, record count and encoded `LogGroup`, whose
/// first `logs_len` bytes are the `logs` fields.
pub struct NewBatch<'a> {
    pub key: &'a GroupKey,
    pub records: usize,
    pub log_group: &'a [u8],
    pub logs_len: usize,
}

/// Storage of a batch: a segment frame or a file of the older format.
#[derive(Clone, Copy)]
enum Location {
    /// A frame of segment `segment` at `offset`, `len` bytes with its header.
    Frame { segment: u64, offset: u64, len: u32 },
    /// A file of the one-file-per-batch format.
    Legacy { bytes: u64 },
}

struct Entry {
    location: Location,
    /// Size of the encoded log group.
    payload_bytes: u64,
    records: usize,
    created_ns: u64,
    /// `None` when the header cannot be read; reading the batch then fails
    /// and delivery moves it aside.
    key: Option<GroupKey>,
}

struct Segment {
    file: Arc<File>,
    /// Bytes written to the file.
    len: u64,
    /// Bytes the file takes on disk: `len`, or more while a preallocated
    /// tail of zeros is not yet written.
    disk: u64,
    /// Batches in it that are not acknowledged, counting those being written.
    live: usize,
}

impl Segment {
    /// Records `bytes` more written; returns how much the file grew on disk.
    fn grow(&mut self, bytes: u64) -> u64 {
        self.len += bytes;
        let grown = self.len.saturating_sub(self.disk);
        self.disk += grown;
        grown
    }
}

/// The next segment, preallocated by a background thread.
enum Spare {
    None,
    Preparing,
    Ready(File),
}

/// Spooled batches of one log group that delivery can send as one request.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// Sequence numbers, oldest first.
    pub seqs: Vec<u64>,
    /// When the oldest of them was written, in nanoseconds since the epoch.
    pub oldest_ns: u64,
    /// Whether the group has at least the request limits' worth of records
    /// spooled, so waiting for more cannot make the request bigger.
    pub full: bool,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    entries: BTreeMap<u64, Entry>,
    segments: BTreeMap<u64, Segment>,
    /// The segment new frames go to; `None` makes the next write open one.
    active: Option<u64>,
    /// Bytes of every segment and batch file in the spool, and of the
    /// spare segment while it is prepared or ready.
    total_bytes: u64,
    /// Log group bytes and records of the batches in `entries`.
    entry_payload_bytes: u64,
    entry_records: usize,
}

impl State {
    fn insert_entry(&mut self, seq: u64, entry: Entry) -> bool {
        self.entry_payload_bytes += entry.payload_bytes;
        self.entry_records += entry.records;
        match self.entries.insert(seq, entry) {
            Some(old) => {
                self.entry_payload_bytes -= old.payload_bytes;
                self.entry_records -= old.records;
                false
            }
            None => true,
        }
    }

    fn remove_entry(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        self.entry_payload_bytes -= entry.payload_bytes;
        self.entry_records -= entry.records;
        Some(entry)
    }

    /// Counts one acknowledged batch of `segment`; returns the segment when
    /// that was its last live batch, after taking it out of the spool.
    fn release(&mut self, segment: u64) -> Option<Segment> {
        let seg = self.segments.get_mut(&segment)?;
        seg.live = seg.live.saturating_sub(1);
        if seg.live > 0 {
            return None;
        }
        let seg = self.segments.remove(&segment)?;
        self.total_bytes -= seg.disk;
        if self.active == Some(segment) {
            self.active = None;
        }
        Some(seg)
    }
}

/// The spool directory and an index of the batches in it.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Whether new segments are preallocated: written to their full size
    /// and synced ahead of need, so a later `fdatasync` of frames written
    /// over the old contents has no file size or block allocation to record.
    preallocate: bool,
    spare: Mutex<Spare>,
    state: Mutex<State>,
    /// Held by a batch write from start to end, so writes (and segment
    /// changes) happen one at a time.
    writer: Mutex<()>,
    changed: Notify,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and indexes the batches
    /// left by an earlier run. Temporary files are partial writes that no
    /// source received an acknowledgement for, so they are deleted.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        let segment_bytes = (max_bytes / 16).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        let preallocate = segment_bytes >= PREALLOCATE_MIN_SEGMENT_BYTES;
        Spool::open_with(dir, max_bytes, segment_bytes, preallocate)
    }

    /// Returns the directory of the spool.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the configured bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Checks whether `batches` batches whose log groups have `bytes` in all
    /// fit under the bound now, counting [`BATCH_OVERHEAD_BYTES`] for each.
    pub fn has_room_for(&self, bytes: u64, batches: usize) -> bool {
        let state = self.state.lock();
        state.total_bytes + bytes + BATCH_OVERHEAD_BYTES * batches as u64 <= self.max_bytes
    }

    /// Checks whether one batch whose log group has `bytes` fits now.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.has_room_for(bytes, 1)
    }

    /// Waits until a batch of `bytes` fits under the bound.
    pub async fn wait_for_room(&self, bytes: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room(bytes) {
                return;
            }
            notified.await;
        }
    }

    /// Writes one batch durably and returns its sequence number. Blocking.
    pub fn write(
        self: &Arc<Self>,
        key: &GroupKey,
        records: usize,
        log_group: &[u8],
    ) -> io::Result<u64> {
        let batch = NewBatch {
            key,
            records,
            log_group,
            logs_len: 0,
        };
        Ok(self.write_batches(&[batch])?[0])
    }

    /// Writes batches durably with one write and one `fdatasync`, and
    /// returns their sequence numbers. Blocking. On error none of them
    /// counts as written.
    pub fn write_batches(self: &Arc<Self>, batches: &[NewBatch<'_>]) -> io::Result<Vec<u64>> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let _writer = self.writer.lock();
        let created_ns = now_ns();
        let first_seq = {
            let mut state = self.state.lock();
            state.next_seq += batches.len() as u64;
            state.next_seq - batches.len() as u64
        };
        let mut frames = Vec::new();
        let mut spans = Vec::with_capacity(batches.len());
        for (i, batch) in batches.iter().enumerate() {
            let start = frames.len();
            encode_batch_frame(&mut frames, first_seq + i as u64, created_ns, batch)?;
            spans.push((start as u64, (frames.len() - start) as u32));
        }
        let (segment, offset, file) = self.append(&mut frames, &spans, batches.len())?;
        if let Err(err) = file.sync_data() {
            // What the failed sync left on disk is unknown: nothing more
            // goes to this segment, and these batches do not count.
            self.abandon_frames(segment, batches.len());
            return Err(with_path(err, "sync", &self.segment_path(segment)));
        }
        {
            let mut state = self.state.lock();
            for (i, (batch, (start, len))) in batches.iter().zip(spans).enumerate() {
                state.insert_entry(
                    first_seq + i as u64,
                    Entry {
                        location: Location::Frame {
                            segment,
                            offset: offset + start,
                            len,
                        },
                        payload_bytes: batch.log_group.len() as u64,
                        records: batch.records,
                        created_ns,
                        key: Some(batch.key.clone()),
                    },
                );
            }
        }
        self.changed.notify_waiters();
        self.update_gauges();
        Ok((first_seq..first_seq + batches.len() as u64).collect())
    }

    /// Checks whether the spooled batches hold at least `bytes` of log
    /// groups or `records` records in all, which one log group needs to
    /// fill a request.
    pub fn holds_at_least(&self, bytes: u64, records: usize) -> bool {
        let state = self.state.lock();
        state.entry_payload_bytes >= bytes || state.entry_records >= records
    }

    /// Returns the oldest batch's sequence number, if any.
    pub fn first(&self) -> Option<u64> {
        self.state.lock().entries.keys().next().copied()
    }

    /// Returns a future that completes on the next write or removal; call
    /// `enable` on it before checking the spool to miss no change.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Plans the next request: the oldest batch and the younger batches of
    /// the same log group, in order, while they fit in `max_bytes` and
    /// `max_records` together. Returns `None` when the spool is empty.
    pub fn plan(&self, max_bytes: u64, max_records: usize) -> Option<SendPlan> {
        let state = self.state.lock();
        let (&first_seq, first) = state.entries.iter().next()?;
        let mut plan = SendPlan {
            seqs: vec![first_seq],
            oldest_ns: first.created_ns,
            full: false,
        };
        let Some(key) = &first.key else {
            return Some(plan);
        };
        let (mut bytes, mut records) = (first.payload_bytes, first.records);
        let same_group = state
            .entries
            .range(first_seq + 1..)
            .filter(|(_, entry)| entry.key.as_ref() == Some(key));
        for (&seq, entry) in same_group {
            if bytes + entry.payload_bytes > max_bytes || records + entry.records > max_records {
                plan.full = true;
                break;
            }
            bytes += entry.payload_bytes;
            records += entry.records;
            plan.seqs.push(seq);
        }
        if bytes >= max_bytes || records >= max_records {
            plan.full = true;
        }
        Some(plan)
    }

    /// Reads the batches of `seqs` (one log group) and merges them into one
    /// batch. On failure it returns the sequence number that failed.
    pub fn read_merged(&self, seqs: &[u64]) -> Result<SpooledBatch, (u64, io::Error)> {
        let first_seq = *seqs.first().expect("a plan has at least one batch");
        let (first, first_logs_len) = self.read_parts(first_seq).map_err(|e| (first_seq, e))?;
        if seqs.len() == 1 {
            return Ok(first);
        }
        // Splices the encoded logs without decoding them: the logs fields of
        // every batch in order, then the first batch's group fields (topic,
        // source, tags), which all batches of one group share.
        let mut logs = Vec::new();
        let mut group_fields = Vec::new();
        self.split(&first, first_logs_len, &mut logs, Some(&mut group_fields))?;
        let mut records = first.header.records;
        for &seq in &seqs[1..] {
            let (batch, logs_len) = self.read_parts(seq).map_err(|err| (seq, err))?;
            self.split(&batch, logs_len, &mut logs, None)?;
            records += batch.header.records;
        }
        logs.extend_from_slice(&group_fields);
        Ok(SpooledBatch {
            seq: first_seq,
            header: BatchHeader {
                key: first.header.key,
                records,
                created_ns: first.header.created_ns,
            },
            log_group: Bytes::from(logs),
        })
    }

    /// Appends the `logs` fields of `batch` to `logs`, and its other fields
    /// to `rest` when given. A known `logs_len` saves walking the fields.
    fn split(
        &self,
        batch: &SpooledBatch,
        logs_len: Option<usize>,
        logs: &mut Vec<u8>,
        rest: Option<&mut Vec<u8>>,
    ) -> Result<(), (u64, io::Error)> {
        if let Some(len) = logs_len {
            logs.extend_from_slice(&batch.log_group[..len]);
            if let Some(rest) = rest {
                rest.extend_from_slice(&batch.log_group[len..]);
            }
            return Ok(());
        }
        split_log_fields(&batch.log_group, logs, rest).map_err(|err| {
            let err = io::Error::new(io::ErrorKind::InvalidData, err);
            (batch.seq, with_seq(err, "decode", batch.seq))
        })
    }

    /// Reads a batch back. A damaged batch gives `InvalidData`.
    pub fn read(&self, seq: u64) -> io::Result<SpooledBatch> {
        self.read_parts(seq).map(|(batch, _)| batch)
    }

    /// Reads a batch and, when the format records it, the length of its
    /// `logs` fields.
    fn read_parts(&self, seq: u64) -> io::Result<(SpooledBatch, Option<usize>)> {
        let (location, file) = {
            let state = self.state.lock();
            let entry = state
                .entries
                .get(&seq)
                .ok_or_else(|| with_seq(io::ErrorKind::NotFound.into(), "read", seq))?;
            let file = match entry.location {
                Location::Frame { segment, .. } => {
                    state.segments.get(&segment).map(|seg| seg.file.clone())
                }
                Location::Legacy { .. } => None,
            };
            (entry.location, file)
        };
        match (location, file) {
            (
                Location::Frame {
                    segment,
                    offset,
                    len,
                },
                Some(file),
            ) => {
                let mut frame = vec![0u8; len as usize];
                file.read_exact_at(&mut frame, offset)
                    .map_err(|err| with_seq(err, "read", seq))?;
                let invalid = || with_seq(io::ErrorKind::InvalidData.into(), "check", seq);
                let body_len = check_frame(&frame, segment).ok_or_else(invalid)?;
                if body_len as usize + FRAME_HEADER_BYTES != frame.len() {
                    return Err(invalid());
                }
                let body = Bytes::from(frame).slice(FRAME_HEADER_BYTES..);
                let (found_seq, header) = parse_batch_body(&body);
                let key = header
                    .key
                    .filter(|_| found_seq == seq && body[0] == KIND_BATCH);
                let key = key.ok_or_else(invalid)?;
                let log_group = body.slice(body.len() - header.log_group_len..);
                let batch = SpooledBatch {
                    seq,
                    header: BatchHeader {
                        key,
                        records: header.records,
                        created_ns: header.created_ns,
                    },
                    log_group,
                };
                Ok((batch, header.logs_len))
            }
            (Location::Frame { .. }, None) => {
                Err(with_seq(io::ErrorKind::NotFound.into(), "read", seq))
            }
            (Location::Legacy { .. }, _) => {
                let path = self.batch_path(seq);
                let data = fs::read(&path).map_err(|err| with_path(err, "read", &path))?;
                let (header, body_start) = parse_legacy(&data)
                    .ok_or_else(|| with_path(io::ErrorKind::InvalidData.into(), "parse", &path))?;
                let batch = SpooledBatch {
                    seq,
                    header,
                    log_group: Bytes::from(data).slice(body_start..),
                };
                Ok((batch, None))
            }
        }
    }

    /// Removes acknowledged (or dead-lettered) batches and wakes sources
    /// that wait for room. A segment is deleted once all its batches are
    /// removed. Removals from segments that stay are appended to the active
    /// segment without a sync, so after a crash some may be sent again.
    pub fn remove(self: &Arc<Self>, seqs: &[u64]) -> io::Result<()> {
        let mut legacy = Vec::new();
        let mut deleted = Vec::new();
        {
            let mut state = self.state.lock();
            let mut acks = Vec::new();
            for &seq in seqs {
                let Some(entry) = state.remove_entry(seq) else {
                    continue;
                };
                match entry.location {
                    Location::Legacy { bytes } => {
                        state.total_bytes -= bytes;
                        legacy.push(seq);
                    }
                    Location::Frame { segment, .. } => match state.release(segment) {
                        Some(seg) => deleted.push((segment, seg.disk)),
                        None => acks.push((segment, seq)),
                    },
                }
            }
            acks.retain(|(segment, _)| !deleted.iter().any(|(id, _)| id == segment));
            if !acks.is_empty() {
                self.append_acks(&mut state, acks.iter().map(|(_, seq)| *seq));
            }
        }
        for (segment, disk) in deleted {
            self.delete_segment(segment, disk);
        }
        let mut result = Ok(());
        for seq in legacy {
            let path = self.batch_path(seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => result = Err(with_path(err, "remove", &path)),
            }
        }
        self.changed.notify_waiters();
        self.update_gauges();
        result
    }

    /// Moves a batch that cannot be parsed to `corrupt/` under the spool
    /// directory, so an operator can look at it, and drops it from the
    /// index. A batch in a segment is copied out as its frame.
    pub fn quarantine(self: &Arc<Self>, seq: u64) -> io::Result<PathBuf> {
        let location = self.state.lock().entries.get(&seq).map(|e| e.location);
        let target = match location {
            Some(Location::Frame {
                segment,
                offset,
                len,
            }) => {
                let target = self.corrupt_path(&format!("{seq:016x}.frame"))?;
                let file = self
                    .state
                    .lock()
                    .segments
                    .get(&segment)
                    .map(|seg| seg.file.clone());
                if let Some(file) = file {
                    copy_range(&file, offset, u64::from(len), &target)?;
                }
                target
            }
            _ => {
                let target = self.corrupt_path(&format!("{seq:016x}{BATCH_SUFFIX}"))?;
                fs::rename(self.batch_path(seq), &target)?;
                target
            }
        };
        self.remove(&[seq])?;
        Ok(target)
    }

    /// Returns the bytes and batches in the spool, and the age of the oldest
    /// batch in seconds.
    pub fn usage(&self) -> (u64, usize, f64) {
        let state = self.state.lock();
        let oldest = state.entries.values().map(|e| e.created_ns).min();
        let age = oldest
            .map(|ns| now_ns().saturating_sub(ns) as f64 / 1e9)
            .unwrap_or(0.0);
        (state.total_bytes, state.entries.len(), age)
    }

    /// Publishes the spool gauges.
    pub fn update_gauges(&self) {
        let (bytes, batches, age) = self.usage();
        metrics::gauge!("skiff_logship_spool_bytes").set(bytes as f64);
        metrics::gauge!("skiff_logship_spool_max_bytes").set(self.max_bytes as f64);
        metrics::gauge!("skiff_logship_spool_batches").set(batches as f64);
        metrics::gauge!("skiff_logship_spool_oldest_batch_age_seconds").set(age);
    }

    fn batch_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}{BATCH_SUFFIX}"))
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}{SEGMENT_SUFFIX}"))
    }

    /// Returns `corrupt/{name}` under the spool directory, creating the
    /// directory.
    fn corrupt_path(&self, name: &str) -> io::Result<PathBuf> {
        let dir = self.dir.join("corrupt");
        fs::create_dir_all(&dir).map_err(|err| with_path(err, "create", &dir))?;
        Ok(dir.join(name))
    }
}

fn parse_name(name: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_suffix(suffix)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn with_path(err: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{action} {}: {err}", path.display()))
}

fn with_seq(err: io::Error, action: &str, seq: u64) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("{action} spooled batch {seq:016x}: {err}"),
    )
}

#[cfg(test)]
mod tests;
