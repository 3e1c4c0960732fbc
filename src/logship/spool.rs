//! Durable spool: an append-only log of segment files in `spool_dir`.
//!
//! Each group commit appends its batches to the open segment with one
//! write and one `fdatasync`, and a batch counts as accepted only after that
//! returns. A segment is closed at a size (a sixteenth of `max_spool_bytes`,
//! 4 KiB to 64 MiB) and deleted once a sink has acknowledged every batch in
//! it. Acknowledgements of batches whose segment stays are appended as
//! small frames without a sync, so a restart resends few delivered batches.
//! Segments of 1 MiB or more are preallocated: a background thread writes
//! the next one full of zeros and syncs it before it is needed, so syncing
//! frames written over the zeros records no change of size or allocation.
//!
//! Segment file `{id:016x}.seg`: the magic `SKIFFSG1`, then frames. A frame
//! is a 4-byte little-endian body length, a CRC-32 (IEEE) of those 4 bytes
//! and the body, then the body. The body's first byte is its kind:
//!
//! - batch: `seq` u64, `created_ns` u64, `records` u32, `logs_len` u32, key
//!   length u32, the JSON [`GroupKey`], then the encoded `LogGroup`, whose
//!   first `logs_len` bytes are its `logs` fields;
//! - acknowledgement: a count u32, then that many `seq` u64.
//!
//! On start every segment is scanned, and zeros after the last frame are
//! the unwritten part of a preallocated segment. The newest segment may end
//! in a write that a crash interrupted. It is cut off at the first frame
//! that does not check, because no source was told that frame was
//! accepted. In an older segment, which was synced in full before the next
//! one was created, such a frame is damage: the rest of the file is copied
//! to `corrupt/` and the frames before it are kept.
//!
//! Spools written by earlier versions hold one file per batch,
//! `{seq:016x}.batch`: the magic `SKIFFSP1`, a 4-byte big-endian header
//! length, the JSON [`BatchHeader`], then the encoded `LogGroup`. Such files
//! are read, delivered and deleted as before, and new batches go to segments.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::proto::split_log_fields;
use super::record::{now_ns, GroupKey};

const SEGMENT_MAGIC: &[u8; 8] = b"SKIFFSG1";
const SEGMENT_SUFFIX: &str = ".seg";
const LEGACY_MAGIC: &[u8; 8] = b"SKIFFSP1";
const BATCH_SUFFIX: &str = ".batch";
const TEMP_SUFFIX: &str = ".tmp";
/// Room counted for a batch's frame header and group key on top of its
/// log group, and for a new segment's magic. A key with long tags can
/// exceed it by the length of the tags.
pub const BATCH_OVERHEAD_BYTES: u64 = 1024;
/// Headers are small; a larger length means a damaged file.
const MAX_HEADER_BYTES: u32 = 1 << 20;
/// Body length and CRC in front of every frame.
const FRAME_HEADER_BYTES: usize = 8;
/// A batch body before its key: kind, seq, created_ns, records, logs_len,
/// key length.
const BATCH_FIXED_BYTES: usize = 1 + 8 + 8 + 4 + 4 + 4;
/// Bodies are at most a request (5 MiB) and a key; a longer length is damage.
const MAX_FRAME_BODY_BYTES: u32 = 16 << 20;
const KIND_BATCH: u8 = 1;
const KIND_ACKS: u8 = 2;
/// Bounds of a segment's size.
const MIN_SEGMENT_BYTES: u64 = 4096;
const MAX_SEGMENT_BYTES: u64 = 64 << 20;
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
    /// Whether new segments are preallocated: written full of zeros and
    /// synced ahead of need, so a later `fdatasync` of frames written over
    /// the zeros has no file size or block allocation to record.
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
        // Drop acknowledged batches, then segments with nothing left.
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
            let path = spool.segment_path(id);
            fs::remove_file(&path).map_err(|err| with_path(err, "remove", &path))?;
        }
        let highest_ack = acked.iter().max().map_or(0, |seq| seq + 1);
        state.next_seq = state.next_seq.max(highest_ack);
        *spool.state.lock() = state;
        spool.update_gauges();
        Ok(spool)
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
        while let Some(len) = read_frame(&mut reader, offset, file_len, &mut body)? {
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
        }
        drop(reader);
        if offset < file_len && is_zero(&file, offset, file_len)? {
            // The unwritten rest of a preallocated segment.
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
        let (segment, offset, file) = self.append(&frames, batches.len())?;
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

    /// Appends `frames` holding `batches` batches to the active segment,
    /// opening a new one when there is none or the frames would take it
    /// past its size. Returns the segment, the offset of the
    /// frames and the file to sync.
    fn append(
        self: &Arc<Self>,
        frames: &[u8],
        batches: usize,
    ) -> io::Result<(u64, u64, Arc<File>)> {
        loop {
            {
                // A segment that grows as it is written gives way to the
                // spare as soon as that is ready.
                let spare_ready = self.preallocate && matches!(*self.spare.lock(), Spare::Ready(_));
                let mut state = self.state.lock();
                let active = state.active;
                let seg = active.and_then(|id| state.segments.get_mut(&id));
                let fits = seg.as_ref().is_some_and(|seg| {
                    let grows = seg.disk <= seg.len;
                    let empty = seg.len == SEGMENT_MAGIC.len() as u64;
                    empty
                        || (seg.len + frames.len() as u64 <= self.segment_bytes
                            && !(grows && spare_ready))
                });
                if let (Some(id), Some(seg), true) = (active, seg, fits) {
                    let offset = seg.len;
                    if let Err(err) = seg.file.write_all_at(frames, offset) {
                        // Part of the frames may be in the file; the next
                        // write starts a new segment so nothing follows them.
                        state.active = None;
                        return Err(with_path(err, "write", &self.segment_path(id)));
                    }
                    let grown = seg.grow(frames.len() as u64);
                    seg.live += batches;
                    let file = seg.file.clone();
                    state.total_bytes += grown;
                    return Ok((id, offset, file));
                }
            }
            // A segment just opened takes any frames, so this loops again
            // only when an acknowledgement write failed meanwhile.
            self.open_segment()?;
        }
    }

    /// Stops writing to `segment` after a failed sync and drops the
    /// `batches` batches appended to it last from its count.
    fn abandon_frames(&self, segment: u64, batches: usize) {
        let deleted = {
            let mut state = self.state.lock();
            if state.active == Some(segment) {
                state.active = None;
            }
            let mut deleted = None;
            for _ in 0..batches {
                deleted = deleted.or(state.release(segment));
            }
            deleted
        };
        if deleted.is_some() {
            self.delete_segment(segment);
        }
    }

    /// Syncs and closes the active segment, then opens a new one, named by
    /// the next sequence number: the spare when one is ready, else a new
    /// file. Its magic and directory entry are synced before any frame
    /// goes in, so only the newest segment can end in an interrupted write.
    fn open_segment(self: &Arc<Self>) -> io::Result<()> {
        let (id, previous) = {
            let mut state = self.state.lock();
            let id = state.next_seq;
            state.next_seq += 1;
            let active = state.active.take();
            let previous = active.and_then(|id| Some((id, state.segments.get(&id)?.file.clone())));
            (id, previous)
        };
        if let Some((previous, file)) = previous {
            self.close_segment(previous, &file);
        }
        let path = self.segment_path(id);
        let spare = {
            let mut slot = self.spare.lock();
            match std::mem::replace(&mut *slot, Spare::None) {
                Spare::Ready(file) => Some(file),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        let (file, disk) = match spare {
            Some(file) => {
                let spare_path = self.dir.join(SPARE_NAME);
                let renamed =
                    fs::rename(&spare_path, &path).and_then(|()| File::open(&self.dir)?.sync_all());
                if let Err(err) = renamed {
                    self.state.lock().total_bytes -= self.segment_bytes;
                    return Err(with_path(err, "rename", &spare_path));
                }
                (file, self.segment_bytes)
            }
            None => {
                let mut file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|err| with_path(err, "create", &path))?;
                file.write_all(SEGMENT_MAGIC)
                    .and_then(|()| file.sync_all())
                    .and_then(|()| File::open(&self.dir)?.sync_all())
                    .map_err(|err| with_path(err, "create", &path))?;
                self.state.lock().total_bytes += SEGMENT_MAGIC.len() as u64;
                (file, SEGMENT_MAGIC.len() as u64)
            }
        };
        {
            let mut state = self.state.lock();
            state.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    len: SEGMENT_MAGIC.len() as u64,
                    disk,
                    live: 0,
                },
            );
            state.active = Some(id);
        }
        self.prepare_spare();
        Ok(())
    }

    /// Syncs a segment that no longer takes frames and gives back its
    /// unwritten preallocated tail.
    fn close_segment(&self, id: u64, file: &File) {
        // Only acknowledgement frames can be unsynced here; losing them
        // resends batches, so a failure is not fatal.
        if let Err(err) = file.sync_data() {
            tracing::warn!(error = %err, "cannot sync a closed spool segment");
        }
        let mut state = self.state.lock();
        let State {
            segments,
            total_bytes,
            ..
        } = &mut *state;
        let Some(seg) = segments.get_mut(&id) else {
            return;
        };
        if seg.disk > seg.len && file.set_len(seg.len).is_ok() {
            *total_bytes -= seg.disk - seg.len;
            seg.disk = seg.len;
        }
    }

    /// Starts preallocating the next segment on a thread of its own, when
    /// preallocation is on, no spare exists and the bound leaves room for
    /// it and one more segment.
    fn prepare_spare(self: &Arc<Self>) {
        if !self.preallocate {
            return;
        }
        let mut spare = self.spare.lock();
        if !matches!(*spare, Spare::None) {
            return;
        }
        {
            let mut state = self.state.lock();
            if state.total_bytes + 2 * self.segment_bytes > self.max_bytes {
                return;
            }
            state.total_bytes += self.segment_bytes;
        }
        *spare = Spare::Preparing;
        drop(spare);
        let spool = self.clone();
        let started = std::thread::Builder::new()
            .name("skiff-spool-prealloc".into())
            .spawn(move || spool.fill_spare());
        if let Err(err) = started {
            tracing::warn!(error = %err, "cannot start preallocating a spool segment");
            self.drop_spare();
        }
    }

    /// Writes the spare segment: the magic, then zeros up to the segment
    /// size, synced. Blocking.
    fn fill_spare(&self) {
        let path = self.dir.join(SPARE_NAME);
        let filled = (|| {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            file.write_all(SEGMENT_MAGIC)?;
            let zeros = vec![0u8; 1 << 20];
            let mut left = self.segment_bytes - SEGMENT_MAGIC.len() as u64;
            while left > 0 {
                let chunk = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..chunk])?;
                left -= chunk as u64;
            }
            file.sync_all()?;
            Ok::<File, io::Error>(file)
        })();
        match filled {
            Ok(file) => *self.spare.lock() = Spare::Ready(file),
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err,
                    "cannot preallocate a spool segment; the next one grows as it is written");
                let _ = fs::remove_file(&path);
                self.drop_spare();
            }
        }
    }

    /// Waits until no spare is being prepared.
    #[cfg(test)]
    fn wait_for_spare(&self) {
        while matches!(*self.spare.lock(), Spare::Preparing) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Drops the spare and gives back its room.
    fn drop_spare(&self) {
        *self.spare.lock() = Spare::None;
        self.state.lock().total_bytes -= self.segment_bytes;
        self.changed.notify_waiters();
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
            (Location::Frame { offset, len, .. }, Some(file)) => {
                let mut frame = vec![0u8; len as usize];
                file.read_exact_at(&mut frame, offset)
                    .map_err(|err| with_seq(err, "read", seq))?;
                let invalid = || with_seq(io::ErrorKind::InvalidData.into(), "check", seq);
                let body_len = check_frame(&frame).ok_or_else(invalid)?;
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
    pub fn remove(&self, seqs: &[u64]) -> io::Result<()> {
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
                        Some(_) => deleted.push(segment),
                        None => acks.push((segment, seq)),
                    },
                }
            }
            acks.retain(|(segment, _)| !deleted.contains(segment));
            if !acks.is_empty() {
                self.append_acks(&mut state, acks.iter().map(|(_, seq)| *seq));
            }
        }
        for &segment in &deleted {
            self.delete_segment(segment);
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

    /// Appends an acknowledgement frame to the active segment when there
    /// is room for it under the bound. Not synced.
    fn append_acks(&self, state: &mut State, seqs: impl ExactSizeIterator<Item = u64>) {
        let mut frame = vec![0u8; FRAME_HEADER_BYTES];
        frame.push(KIND_ACKS);
        frame.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
        for seq in seqs {
            frame.extend_from_slice(&seq.to_le_bytes());
        }
        seal_frame(&mut frame);
        let Some(id) = state.active else {
            return;
        };
        let Some(seg) = state.segments.get_mut(&id) else {
            return;
        };
        let growth = (seg.len + frame.len() as u64).saturating_sub(seg.disk);
        if state.total_bytes + growth > self.max_bytes {
            return;
        }
        match seg.file.write_all_at(&frame, seg.len) {
            Ok(()) => {
                let grown = seg.grow(frame.len() as u64);
                state.total_bytes += grown;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot record delivered batches in the spool");
                state.active = None;
            }
        }
    }

    /// Deletes the file of a segment that has left the index.
    fn delete_segment(&self, id: u64) {
        let path = self.segment_path(id);
        if let Err(err) = fs::remove_file(&path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::error!(file = %path.display(), error = %err,
                    "cannot delete a delivered spool segment; its batches may be sent again \
                     after a restart");
            }
        }
    }

    /// Moves a batch that cannot be parsed to `corrupt/` under the spool
    /// directory, so an operator can look at it, and drops it from the
    /// index. A batch in a segment is copied out as its frame.
    pub fn quarantine(&self, seq: u64) -> io::Result<PathBuf> {
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

/// Indexes a batch file of the one-file-per-batch format.
fn index_legacy(state: &mut State, path: &Path, seq: u64) -> io::Result<()> {
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

fn parse_name(name: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_suffix(suffix)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Appends a batch frame to `out`.
fn encode_batch_frame(
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

/// Fills in the length and CRC of the frame that makes up all of `frame`.
fn seal_frame(frame: &mut [u8]) {
    seal_frame_at(frame, 0);
}

/// Fills in the length and CRC of the frame from `start` to the end.
fn seal_frame_at(buf: &mut [u8], start: usize) {
    let body_len = (buf.len() - start - FRAME_HEADER_BYTES) as u32;
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    let crc = frame_crc(&buf[start..start + 4], &buf[start + FRAME_HEADER_BYTES..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn frame_crc(len: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(body);
    hasher.finalize()
}

/// Checks a whole frame's header and CRC; returns the body length.
fn check_frame(frame: &[u8]) -> Option<u32> {
    let len = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(frame.get(4..8)?.try_into().ok()?);
    let body = frame.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len as usize)?;
    (len > 0 && frame_crc(&frame[..4], body) == crc).then_some(len)
}

/// Reads the frame at `offset` into `body`. Returns its body length, or
/// `None` at the end of the file or at a frame that does not check.
fn read_frame(
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
fn body_is_well_formed(body: &[u8]) -> bool {
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
struct BatchFields {
    created_ns: u64,
    records: usize,
    /// `None` when the key does not parse.
    key: Option<GroupKey>,
    /// Length of the `logs` fields at the start of the log group; `None`
    /// when not recorded.
    logs_len: Option<usize>,
    log_group_len: usize,
}

/// Parses a batch body that [`body_is_well_formed`] accepted; returns the
/// sequence number and the fields.
fn parse_batch_body(body: &[u8]) -> (u64, BatchFields) {
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
fn parse_ack_body(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    body[5..]
        .chunks_exact(8)
        .map(|seq| u64::from_le_bytes(seq.try_into().unwrap()))
}

/// Checks whether `file` holds only zeros from `from` to `to`.
fn is_zero(file: &File, from: u64, to: u64) -> io::Result<bool> {
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
fn copy_range(file: &File, offset: u64, len: u64, target: &Path) -> io::Result<()> {
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

fn parse_legacy(data: &[u8]) -> Option<(BatchHeader, usize)> {
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
fn read_legacy_header(path: &Path) -> io::Result<(BatchHeader, u64)> {
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
