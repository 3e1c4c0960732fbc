//! Segment files: appending frames, opening and closing segments, and
//! preallocating the next one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::frame::encode_ack_frame;
use super::{with_path, Segment, Spare, Spool, State, SEGMENT_MAGIC, SPARE_NAME};

impl Spool {
    /// Appends `frames` holding `batches` batches to the active segment,
    /// opening a new one when there is none or the frames would take it
    /// past its size. Returns the segment, the offset of the
    /// frames and the file to sync.
    pub(super) fn append(
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
    pub(super) fn abandon_frames(&self, segment: u64, batches: usize) {
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
        self.prepare_spare();
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
    /// it and one more segment.
    pub(super) fn prepare_spare(self: &Arc<Self>) {
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
    pub(super) fn fill_spare(&self) {
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
        let frame = encode_ack_frame(seqs);
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
    pub(super) fn delete_segment(&self, id: u64) {
        let path = self.segment_path(id);
        if let Err(err) = fs::remove_file(&path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::error!(file = %path.display(), error = %err,
                    "cannot delete a delivered spool segment; its batches may be sent again \
                     after a restart");
            }
        }
    }
}
