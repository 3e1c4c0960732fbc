//! Segment files: appending frames, opening and closing segments, and
//! preallocating the next one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::frame::{encode_ack_frame, seal_frame_at};
use super::{with_path, Segment, Spare, Spool, State, SEGMENT_MAGIC, SPARE_NAME};

impl Spool {
    /// Appends `frames` holding `batches` batches to the active segment,
    /// opening a new one when there is none or the frames would take it
    /// past its size. `spans` are the offset and length of each frame in
    /// `frames`, whose headers are filled in for the segment. Returns the
    /// segment, the offset of the frames and the file to sync.
    pub(super) fn append(
        self: &Arc<Self>,
        frames: &mut [u8],
        spans: &[(u64, u32)],
        batches: usize,
    ) -> io::Result<(u64, u64, Arc<File>)> {
        loop {
            let (spare_ready, spare_none) = match *self.spare.lock() {
                Spare::Ready(_) => (true, false),
                Spare::Preparing => (false, false),
                Spare::None => (false, true),
            };
            let written = {
                // A segment that grows as it is written gives way to the
                // spare as soon as that is ready.
                let spare_ready = self.preallocate && spare_ready;
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
                    for &(start, len) in spans {
                        let start = start as usize;
                        seal_frame_at(frames, start, start + len as usize, id);
                    }
                    let offset = seg.len;
                    if let Err(err) = seg.file.write_all_at(frames, offset) {
                        // Part of the frames may be in the file; the next
                        // write starts a new segment so nothing follows them.
                        state.active = None;
                        return Err(with_path(err, "write", &self.segment_path(id)));
                    }
                    let grown = seg.grow(frames.len() as u64);
                    seg.live += batches;
                    let half_full = seg.len >= self.segment_bytes / 2;
                    let file = seg.file.clone();
                    state.total_bytes += grown;
                    Some((id, offset, file, half_full))
                } else {
                    None
                }
            };
            if let Some((id, offset, file, half_full)) = written {
                // The next segment is usually one that delivery emptied
                // meanwhile. Zeros are written for it only when none was
                // emptied by the time this one is half full.
                if half_full && spare_none {
                    self.prepare_spare(None);
                }
                return Ok((id, offset, file));
            }
            // A segment just opened takes any frames, so this loops again
            // only when an acknowledgement write failed meanwhile.
            self.open_segment()?;
        }
    }

    /// Stops writing to `segment` after a failed sync and drops the
    /// `batches` batches appended to it last from its count.
    pub(super) fn abandon_frames(self: &Arc<Self>, segment: u64, batches: usize) {
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
        if let Some(seg) = deleted {
            self.delete_segment(segment, seg.disk);
        }
    }

    /// Syncs and closes the active segment, then opens a new one, named by
    /// the next sequence number: the spare when one is ready, else a new
    /// file. Its magic and directory entry are synced before any frame
    /// goes in, so only the newest segment can end in an interrupted write.
    pub(super) fn open_segment(self: &Arc<Self>) -> io::Result<()> {
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
        Ok(())
    }

    /// Syncs a segment that no longer takes frames and gives back its
    /// unwritten preallocated tail.
    pub(super) fn close_segment(&self, id: u64, file: &File) {
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
    /// it and one more segment. With `recycled`, the spare is that file of
    /// a deleted segment, whose blocks are already written, else a new one.
    /// Returns whether it started.
    pub(super) fn prepare_spare(self: &Arc<Self>, recycled: Option<&Path>) -> bool {
        if !self.preallocate {
            return false;
        }
        let mut spare = self.spare.lock();
        if !matches!(*spare, Spare::None) {
            return false;
        }
        {
            let mut state = self.state.lock();
            if state.total_bytes + 2 * self.segment_bytes > self.max_bytes {
                return false;
            }
            state.total_bytes += self.segment_bytes;
        }
        let spare_path = self.dir.join(SPARE_NAME);
        if let Some(path) = recycled {
            if let Err(err) = fs::rename(path, &spare_path) {
                tracing::warn!(file = %path.display(), error = %err,
                    "cannot reuse a delivered spool segment");
                drop(spare);
                self.drop_spare();
                return false;
            }
        }
        *spare = Spare::Preparing;
        drop(spare);
        let spool = self.clone();
        let fresh = recycled.is_none();
        let started = std::thread::Builder::new()
            .name("skiff-spool-prealloc".into())
            .spawn(move || spool.fill_spare(fresh));
        if let Err(err) = started {
            tracing::warn!(error = %err, "cannot start preallocating a spool segment");
            let _ = fs::remove_file(&spare_path);
            self.drop_spare();
        }
        true
    }

    /// Makes the spare file the segment size with the magic in front and
    /// zeros after whatever an earlier use left, and syncs it. A `fresh`
    /// file starts empty. Blocking.
    fn fill_spare(&self, fresh: bool) {
        let path = self.dir.join(SPARE_NAME);
        let filled = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(fresh)
                .open(&path)?;
            let used = file.metadata()?.len().min(self.segment_bytes);
            file.set_len(used)?;
            file.write_all_at(SEGMENT_MAGIC, 0)?;
            let zeros = vec![0u8; 1 << 20];
            let mut at = used.max(SEGMENT_MAGIC.len() as u64);
            while at < self.segment_bytes {
                let chunk = (self.segment_bytes - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..chunk], at)?;
                at += chunk as u64;
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
    pub(super) fn wait_for_spare(&self) {
        while matches!(*self.spare.lock(), Spare::Preparing) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Drops the spare and gives back its room.
    pub(super) fn drop_spare(&self) {
        *self.spare.lock() = Spare::None;
        self.state.lock().total_bytes -= self.segment_bytes;
        self.changed.notify_waiters();
    }

    /// Appends an acknowledgement frame to the active segment when there
    /// is room for it under the bound. Not synced.
    pub(super) fn append_acks(&self, state: &mut State, seqs: impl ExactSizeIterator<Item = u64>) {
        let mut frame = encode_ack_frame(seqs);
        let Some(id) = state.active else {
            return;
        };
        let len = frame.len();
        seal_frame_at(&mut frame, 0, len, id);
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

    /// Deletes the file of a segment that has left the index, or keeps it
    /// as the next spare when at least half of it is written (`disk`
    /// bytes), so that preparing it writes less than a new spare.
    pub(super) fn delete_segment(self: &Arc<Self>, id: u64, disk: u64) {
        let path = self.segment_path(id);
        if disk >= self.segment_bytes / 2 && self.prepare_spare(Some(&path)) {
            return;
        }
        if let Err(err) = fs::remove_file(&path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::error!(file = %path.display(), error = %err,
                    "cannot delete a delivered spool segment; its batches may be sent again \
                     after a restart");
            }
        }
    }
}
