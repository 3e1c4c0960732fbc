//! Durable spool: one file per batch in `spool_dir`, written to a temporary
//! name, fsynced and renamed before its records count as accepted, and
//! removed only after a sink acknowledges the batch.
//!
//! File layout: the magic `SKIFFSP1`, a 4-byte big-endian header length, the
//! JSON [`BatchHeader`], then the encoded `LogGroup`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::proto::split_log_fields;
use super::record::{now_ns, GroupKey};

const MAGIC: &[u8; 8] = b"SKIFFSP1";
const BATCH_SUFFIX: &str = ".batch";
const TEMP_SUFFIX: &str = ".tmp";
/// Room counted for a batch file's magic and header on top of its log
/// group. A header with long tags can exceed it by the length of the tags.
pub const FILE_OVERHEAD_BYTES: u64 = 1024;
/// Headers are small; a larger length means a damaged file.
const MAX_HEADER_BYTES: u32 = 1 << 20;

/// Metadata of a batch file: the log group's key, record count and time.
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

struct Entry {
    /// Size of the file.
    bytes: u64,
    /// Size of the encoded log group in the file.
    payload_bytes: u64,
    records: usize,
    created_ns: u64,
    /// `None` when the header cannot be read; reading the batch then fails
    /// and delivery moves the file aside.
    key: Option<GroupKey>,
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
    total_bytes: u64,
}

/// The spool directory and an index of the batches in it.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    changed: Notify,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and indexes the batches
    /// left by an earlier run. Temporary files are partial writes that no
    /// source received an acknowledgement for, so they are deleted.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir).map_err(|err| with_path(err, "create spool directory", dir))?;
        let mut state = State::default();
        for item in fs::read_dir(dir).map_err(|err| with_path(err, "read spool directory", dir))? {
            let path = item?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(TEMP_SUFFIX) {
                fs::remove_file(&path)?;
                continue;
            }
            let Some(seq) = parse_batch_name(name) else {
                continue;
            };
            let bytes = fs::metadata(&path)?.len();
            let entry = match read_header(&path) {
                Ok((header, header_bytes)) => Entry {
                    bytes,
                    payload_bytes: bytes.saturating_sub(header_bytes),
                    records: header.records,
                    created_ns: header.created_ns,
                    key: Some(header.key),
                },
                Err(_) => Entry {
                    bytes,
                    payload_bytes: bytes,
                    records: 0,
                    created_ns: now_ns(),
                    key: None,
                },
            };
            state.entries.insert(seq, entry);
            state.total_bytes += bytes;
            state.next_seq = state.next_seq.max(seq + 1);
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            changed: Notify::new(),
        };
        spool.update_gauges();
        Ok(spool)
    }

    /// Returns the directory of the spool.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the configured bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Checks whether a batch whose log group has `bytes` fits under the bound now,
    /// counting [`FILE_OVERHEAD_BYTES`] for its file's header.
    pub fn has_room(&self, bytes: u64) -> bool {
        let state = self.state.lock();
        state.total_bytes + bytes + FILE_OVERHEAD_BYTES <= self.max_bytes
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

    /// Writes a batch durably and returns its sequence number. Blocking: it
    /// fsyncs the file and the directory.
    pub fn write(&self, key: &GroupKey, records: usize, log_group: &[u8]) -> io::Result<u64> {
        let seq = {
            let mut state = self.state.lock();
            state.next_seq += 1;
            state.next_seq - 1
        };
        let header = BatchHeader {
            key: key.clone(),
            records,
            created_ns: now_ns(),
        };
        let header_json = serde_json::to_vec(&header).map_err(io::Error::other)?;
        let temp = self.dir.join(format!("{seq:016x}{TEMP_SUFFIX}"));
        let path = self.batch_path(seq);
        let mut file = File::create(&temp).map_err(|err| with_path(err, "create", &temp))?;
        file.write_all(MAGIC)?;
        file.write_all(&(header_json.len() as u32).to_be_bytes())?;
        file.write_all(&header_json)?;
        file.write_all(log_group)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, &path).map_err(|err| with_path(err, "rename", &temp))?;
        File::open(&self.dir)?.sync_all()?;
        let bytes = (MAGIC.len() + 4 + header_json.len() + log_group.len()) as u64;
        let entry = Entry {
            bytes,
            payload_bytes: log_group.len() as u64,
            records,
            created_ns: header.created_ns,
            key: Some(header.key),
        };
        {
            let mut state = self.state.lock();
            state.entries.insert(seq, entry);
            state.total_bytes += bytes;
        }
        self.changed.notify_waiters();
        self.update_gauges();
        Ok(seq)
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
        let first = self.read(first_seq).map_err(|err| (first_seq, err))?;
        if seqs.len() == 1 {
            return Ok(first);
        }
        // Splices the encoded logs without decoding them: the logs fields of
        // every batch in order, then the first batch's group fields (topic,
        // source, tags), which all batches of one group share.
        let split =
            |seq: u64, batch: &SpooledBatch, logs: &mut Vec<u8>, rest: Option<&mut Vec<u8>>| {
                split_log_fields(&batch.log_group, logs, rest).map_err(|err| {
                    (
                        seq,
                        with_path(
                            io::Error::new(io::ErrorKind::InvalidData, err),
                            "decode",
                            &self.batch_path(seq),
                        ),
                    )
                })
            };
        let mut logs = Vec::new();
        let mut group_fields = Vec::new();
        split(first_seq, &first, &mut logs, Some(&mut group_fields))?;
        let mut records = first.header.records;
        for &seq in &seqs[1..] {
            let batch = self.read(seq).map_err(|err| (seq, err))?;
            split(seq, &batch, &mut logs, None)?;
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

    /// Reads a batch back. A damaged file gives `InvalidData`.
    pub fn read(&self, seq: u64) -> io::Result<SpooledBatch> {
        let path = self.batch_path(seq);
        let data = fs::read(&path).map_err(|err| with_path(err, "read", &path))?;
        let (header, body_start) = parse_file(&data)
            .ok_or_else(|| with_path(io::ErrorKind::InvalidData.into(), "parse", &path))?;
        Ok(SpooledBatch {
            seq,
            header,
            log_group: Bytes::from(data).slice(body_start..),
        })
    }

    /// Removes an acknowledged (or dead-lettered) batch and wakes sources
    /// that wait for room.
    pub fn remove(&self, seq: u64) -> io::Result<()> {
        let path = self.batch_path(seq);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(with_path(err, "remove", &path)),
        }
        {
            let mut state = self.state.lock();
            if let Some(entry) = state.entries.remove(&seq) {
                state.total_bytes -= entry.bytes;
            }
        }
        self.changed.notify_waiters();
        self.update_gauges();
        Ok(())
    }

    /// Moves a batch file that cannot be parsed to `corrupt/` under the
    /// spool directory, so an operator can look at it, and drops it from
    /// the index.
    pub fn quarantine(&self, seq: u64) -> io::Result<PathBuf> {
        let corrupt_dir = self.dir.join("corrupt");
        fs::create_dir_all(&corrupt_dir)?;
        let target = corrupt_dir.join(format!("{seq:016x}{BATCH_SUFFIX}"));
        fs::rename(self.batch_path(seq), &target)?;
        self.remove(seq)?;
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
}

fn parse_batch_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(BATCH_SUFFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn parse_file(data: &[u8]) -> Option<(BatchHeader, usize)> {
    let rest = data.strip_prefix(MAGIC.as_slice())?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    if len > MAX_HEADER_BYTES {
        return None;
    }
    let header_end = 4 + len as usize;
    let header = serde_json::from_slice(rest.get(4..header_end)?).ok()?;
    Some((header, MAGIC.len() + header_end))
}

/// Reads a batch file's header and returns it with the bytes before the
/// log group.
fn read_header(path: &Path) -> io::Result<(BatchHeader, u64)> {
    let mut file = OpenOptions::new().read(true).open(path)?;
    let mut prefix = [0u8; 12];
    file.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
    if &prefix[..8] != MAGIC || len > MAX_HEADER_BYTES {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::proto::{Log, LogGroup, LogTag};
    use prost::Message;

    fn key(logstore: &str) -> GroupKey {
        GroupKey {
            project: None,
            logstore: logstore.into(),
            topic: String::new(),
            source: String::new(),
            tags: vec![],
        }
    }

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let seq = spool.write(&key("ls"), 2, b"payload").unwrap();
        let batch = spool.read(seq).unwrap();
        assert_eq!(batch.header.key.logstore, "ls");
        assert_eq!(batch.header.records, 2);
        assert_eq!(&batch.log_group[..], b"payload");
        assert!(spool.usage().0 > 7);
        spool.remove(seq).unwrap();
        assert_eq!(spool.usage().0, 0);
        assert_eq!(spool.first(), None);
    }

    #[test]
    fn reopen_finds_batches_and_drops_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let first = spool.write(&key("a1"), 1, b"one").unwrap();
        let second = spool.write(&key("b1"), 1, b"two").unwrap();
        drop(spool);
        fs::write(dir.path().join("0000000000000009.tmp"), b"partial").unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.first(), Some(first));
        assert_eq!(spool.usage().1, 2);
        assert!(!dir.path().join("0000000000000009.tmp").exists());
        let third = spool.write(&key("c1"), 1, b"three").unwrap();
        assert!(third > second);
    }

    #[test]
    fn damaged_file_reads_as_invalid_data() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let seq = spool.write(&key("ls"), 1, b"x").unwrap();
        fs::write(spool.batch_path(seq), b"garbage").unwrap();
        let err = spool.read(seq).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let moved = spool.quarantine(seq).unwrap();
        assert!(moved.exists());
        assert_eq!(spool.first(), None);
    }

    #[test]
    fn room_follows_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 4000).unwrap();
        assert!(spool.has_room(4000 - FILE_OVERHEAD_BYTES));
        assert!(!spool.has_room(4001 - FILE_OVERHEAD_BYTES));
        spool.write(&key("ls"), 1, &[0u8; 100]).unwrap();
        let used = spool.usage().0;
        assert!(used > 100);
        assert!(spool.has_room(4000 - used - FILE_OVERHEAD_BYTES));
        assert!(!spool.has_room(4001 - used - FILE_OVERHEAD_BYTES));
    }

    fn encoded(ids: &[u32]) -> Vec<u8> {
        let logs = ids
            .iter()
            .map(|id| Log {
                time: *id,
                contents: vec![],
                time_ns: None,
            })
            .collect();
        LogGroup {
            logs,
            topic: Some(String::new()),
            ..LogGroup::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn plan_merges_one_group_within_limits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let a1 = spool.write(&key("aa"), 2, &encoded(&[1, 2])).unwrap();
        let b1 = spool.write(&key("bb"), 1, &encoded(&[3])).unwrap();
        let a2 = spool.write(&key("aa"), 1, &encoded(&[4])).unwrap();
        let a3 = spool.write(&key("aa"), 2, &encoded(&[5, 6])).unwrap();

        let plan = spool.plan(1 << 20, 3).unwrap();
        assert_eq!(plan.seqs, vec![a1, a2], "a3 would pass 3 records");
        assert!(plan.full);
        let merged = spool.read_merged(&plan.seqs).unwrap();
        assert_eq!(merged.header.records, 3);
        let times: Vec<u32> = LogGroup::decode(merged.log_group)
            .unwrap()
            .logs
            .iter()
            .map(|log| log.time)
            .collect();
        assert_eq!(times, vec![1, 2, 4]);

        let roomy = spool.plan(1 << 20, 100).unwrap();
        assert_eq!(roomy.seqs, vec![a1, a2, a3]);
        assert!(!roomy.full);
        spool.remove(a1).unwrap();
        spool.remove(a2).unwrap();
        spool.remove(a3).unwrap();
        assert_eq!(spool.plan(1 << 20, 100).unwrap().seqs, vec![b1]);
    }

    #[test]
    fn merged_batch_encodes_like_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let group = |ids: &[u32]| LogGroup {
            logs: ids
                .iter()
                .map(|id| Log {
                    time: *id,
                    contents: vec![],
                    time_ns: Some(*id),
                })
                .collect(),
            reserved: None,
            topic: Some("topic".into()),
            source: Some("10.0.0.1".into()),
            log_tags: vec![LogTag {
                key: "tenant".into(),
                value: "t1".into(),
            }],
        };
        let first = spool
            .write(&key("aa"), 2, &group(&[1, 2]).encode_to_vec())
            .unwrap();
        let second = spool
            .write(&key("aa"), 1, &group(&[3]).encode_to_vec())
            .unwrap();
        let merged = spool.read_merged(&[first, second]).unwrap();
        assert_eq!(merged.header.records, 3);
        assert_eq!(
            merged.log_group.as_ref(),
            group(&[1, 2, 3]).encode_to_vec().as_slice()
        );
    }
}
