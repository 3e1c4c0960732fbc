//! The batcher: groups submitted records into log groups by (project,
//! logstore, topic, source, tags) of at most `max_batch_bytes` and
//! `max_batch_count`, and writes them to the spool before telling the
//! sources their records are accepted.
//!
//! Writes are group commits: each write takes every submission queued
//! meanwhile, so a source waits about one fsync, not `linger`. Delivery
//! merges spooled batches of one group into requests and applies `linger`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::proto::{encode_log_field, framed_len, LogGroup};
use super::record::{validate_logstore, GroupKey, Record, MAX_REQUEST_BYTES, MAX_REQUEST_LOGS};
use super::spool::{NewBatch, Spool};
use crate::config::OnFull;

/// Submissions waiting for the batcher; a full queue makes `submit` wait.
const QUEUE_CAPACITY: usize = 1024;
/// Open log groups held in memory at once; past this the oldest is sealed.
const MAX_OPEN_GROUPS: usize = 256;
/// Bytes of open and sealed batches held in memory at once (or two
/// batches, if larger); past this they are all written early.
const MAX_OPEN_BYTES: usize = 32 * 1024 * 1024;
/// Minimum time between two "spool full" warnings.
const FULL_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Submissions received into one group commit at most.
const MAX_SUBMISSIONS_PER_COMMIT: usize = 1024;
/// Room left in a request for the group's topic, source and tags.
const GROUP_OVERHEAD_BYTES: usize = 64 * 1024;

/// Reason a submission was not accepted. A failed submission may still
/// have parts that were spooled and get delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("spool is full (max_spool_bytes = {max_bytes}); records were not accepted")]
    SpoolFull { max_bytes: u64 },
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("log shipper is shutting down; records were not accepted")]
    Closed,
    #[error("spool write failed: {0}")]
    Spool(String),
}

/// Limits the batcher works with.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_batch_bytes: usize,
    pub max_batch_count: usize,
    pub on_full: OnFull,
}

/// Handle that sources use to submit records. Cheap to clone.
#[derive(Clone)]
pub struct Shipper {
    queue: mpsc::Sender<Submission>,
    spool: Arc<Spool>,
    on_full: OnFull,
    /// The group key submitted last through any clone. Records of the same
    /// group share it, so the batcher compares keys by address and the
    /// strings of each record's key are freed by the source that made them.
    recent_key: Arc<Mutex<Option<SharedKey>>>,
}

/// A group key shared between submissions. Equal keys are usually the same
/// allocation, which makes comparing them cheap.
#[derive(Clone, Debug)]
struct SharedKey(Arc<GroupKey>);

impl PartialEq for SharedKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for SharedKey {}

impl std::ops::Deref for SharedKey {
    type Target = GroupKey;

    fn deref(&self) -> &GroupKey {
        &self.0
    }
}

impl std::hash::Hash for SharedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

struct Submission {
    runs: Vec<Run>,
    ack: Arc<Ack>,
}

/// Consecutive records of one submission that share a log group, each
/// already encoded as a `logs` field of a `LogGroup`. Encoding on the
/// submitting task keeps that work off the single batcher task.
struct Run {
    key: SharedKey,
    /// The `logs` fields, back to back.
    logs: Vec<u8>,
    /// End offset of each log in `logs`.
    ends: Vec<usize>,
}

/// Logs of one log group, already encoded as `logs` fields of a `LogGroup`,
/// as a PutLogs request carries them.
pub struct EncodedLogs {
    pub key: GroupKey,
    /// The `logs` fields, back to back.
    pub logs: Vec<u8>,
    /// End offset of each log in `logs`, in increasing order.
    pub ends: Vec<usize>,
}

/// Completion of one submission: the result goes to the source once every
/// batch holding a part of it is written (or failed) and dropped.
struct Ack {
    result: Mutex<Result<(), SubmitError>>,
    reply: Mutex<Option<oneshot::Sender<Result<(), SubmitError>>>>,
}

impl Ack {
    fn fail(&self, err: SubmitError) {
        let mut result = self.result.lock();
        if result.is_ok() {
            *result = Err(err);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.lock().take() {
            let _ = reply.send(self.result.lock().clone());
        }
    }
}

impl Shipper {
    /// Starts the batcher task; it runs until `shutdown` is cancelled, then
    /// flushes every open group to the spool. `abandon` cancels a flush that
    /// waits for room in a full spool.
    pub fn start(
        spool: Arc<Spool>,
        limits: BatchLimits,
        shutdown: CancellationToken,
        abandon: CancellationToken,
    ) -> (Shipper, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let batcher = Batcher {
            last_full_warning: None,
            open: HashMap::new(),
            sealed: Vec::new(),
            held_bytes: 0,
            spool: spool.clone(),
            limits: limits.clone(),
            abandon,
        };
        let task = tokio::spawn(batcher.run(receiver, shutdown));
        let shipper = Shipper {
            queue,
            spool,
            on_full: limits.on_full,
            recent_key: Arc::new(Mutex::new(None)),
        };
        (shipper, task)
    }

    /// Submits records and returns once every one of them is durable in the
    /// spool, or with the reason some were not accepted.
    pub async fn submit(&self, records: Vec<Record>) -> Result<(), SubmitError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut total = 0usize;
        for record in records {
            let same_group = runs.last().is_some_and(|run| run.key.matches(&record));
            if !same_group {
                validate_logstore(&record.logstore).map_err(SubmitError::InvalidRecord)?;
                runs.push(Run {
                    key: self.shared_key(&record),
                    logs: Vec::new(),
                    ends: Vec::new(),
                });
            }
            let log = record.into_log();
            let size = framed_len(&log);
            check_log_size(size)?;
            total += size;
            let run = runs.last_mut().expect("every record belongs to a run");
            run.logs.reserve(size);
            encode_log_field(&log, &mut run.logs);
            run.ends.push(run.logs.len());
        }
        self.submit_runs(runs, total).await
    }

    /// Submits logs that are already encoded, such as those of a PutLogs
    /// request, without decoding them again. The caller has checked that
    /// each is a well-formed `Log`.
    pub async fn submit_encoded(&self, logs: EncodedLogs) -> Result<(), SubmitError> {
        if logs.ends.is_empty() {
            return Ok(());
        }
        validate_logstore(&logs.key.logstore).map_err(SubmitError::InvalidRecord)?;
        let mut start = 0;
        for &end in &logs.ends {
            if end <= start || end > logs.logs.len() {
                return Err(SubmitError::InvalidRecord(
                    "log boundaries out of order".into(),
                ));
            }
            check_log_size(end - start)?;
            start = end;
        }
        let total = logs.logs.len();
        let run = Run {
            key: self.share(logs.key),
            logs: logs.logs,
            ends: logs.ends,
        };
        self.submit_runs(vec![run], total).await
    }

    /// Returns the shared key of `record`'s group.
    fn shared_key(&self, record: &Record) -> SharedKey {
        let mut recent = self.recent_key.lock();
        match recent.as_ref() {
            Some(key) if key.matches(record) => key.clone(),
            _ => {
                let key = SharedKey(Arc::new(record.group_key()));
                *recent = Some(key.clone());
                key
            }
        }
    }

    /// Returns `key` as a shared key, the recent one when they are equal.
    fn share(&self, key: GroupKey) -> SharedKey {
        let mut recent = self.recent_key.lock();
        match recent.as_ref() {
            Some(shared) if *shared.0 == key => shared.clone(),
            _ => {
                let shared = SharedKey(Arc::new(key));
                *recent = Some(shared.clone());
                shared
            }
        }
    }

    async fn submit_runs(&self, runs: Vec<Run>, total: usize) -> Result<(), SubmitError> {
        if self.on_full == OnFull::Reject && !self.spool.has_room(total as u64) {
            return Err(SubmitError::SpoolFull {
                max_bytes: self.spool.max_bytes(),
            });
        }
        let (reply, done) = oneshot::channel();
        let ack = Arc::new(Ack {
            result: Mutex::new(Ok(())),
            reply: Mutex::new(Some(reply)),
        });
        let submission = Submission { runs, ack };
        self.queue
            .send(submission)
            .await
            .map_err(|_| SubmitError::Closed)?;
        done.await.unwrap_or(Err(SubmitError::Closed))
    }
}

/// Rejects a log that cannot fit in one request with its group's fields.
fn check_log_size(size: usize) -> Result<(), SubmitError> {
    if size > MAX_REQUEST_BYTES - GROUP_OVERHEAD_BYTES {
        return Err(SubmitError::InvalidRecord(format!(
            "record of {size} bytes exceeds the {} byte limit of one request",
            MAX_REQUEST_BYTES - GROUP_OVERHEAD_BYTES
        )));
    }
    Ok(())
}

/// Records of one group waiting to be sealed.
struct OpenBatch {
    /// The records, each encoded as a `logs` field of a `LogGroup`.
    logs: Vec<u8>,
    /// Number of records in `logs`.
    count: usize,
    started: Instant,
    acks: Vec<Arc<Ack>>,
}

/// A finished batch waiting for the round's spool write.
struct Sealed {
    key: SharedKey,
    /// The encoded `LogGroup`: `logs_len` bytes of `logs` fields, then the
    /// group's own fields.
    encoded: Vec<u8>,
    logs_len: usize,
    records: usize,
    acks: Vec<Arc<Ack>>,
}

/// Submissions whose records were dropped before being written fail.
impl Drop for OpenBatch {
    fn drop(&mut self) {
        self.acks
            .iter()
            .for_each(|ack| ack.fail(SubmitError::Closed));
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        self.acks
            .iter()
            .for_each(|ack| ack.fail(SubmitError::Closed));
    }
}

struct Batcher {
    /// When the last "spool full" warning was logged.
    last_full_warning: Option<Instant>,
    open: HashMap<SharedKey, OpenBatch>,
    /// Batches sealed since the last spool write.
    sealed: Vec<Sealed>,
    /// Sum of the encoded sizes of the batches in `open` and `sealed`.
    held_bytes: usize,
    spool: Arc<Spool>,
    limits: BatchLimits,
    abandon: CancellationToken,
}

impl Batcher {
    async fn run(mut self, mut receiver: mpsc::Receiver<Submission>, shutdown: CancellationToken) {
        loop {
            let submission = tokio::select! {
                received = receiver.recv() => match received {
                    Some(submission) => submission,
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            };
            self.add(submission).await;
            // Group commit: whatever queued up during the last write joins
            // this one, so one fdatasync acknowledges many submissions.
            // Yielding lets the sources that the last write woke submit
            // again and join too, until a yield brings no more.
            let mut received = 1;
            while received < MAX_SUBMISSIONS_PER_COMMIT {
                tokio::task::yield_now().await;
                let before = received;
                while received < MAX_SUBMISSIONS_PER_COMMIT {
                    match receiver.try_recv() {
                        Ok(submission) => self.add(submission).await,
                        Err(_) => break,
                    }
                    received += 1;
                }
                if received == before {
                    break;
                }
            }
            self.commit_all().await;
        }
        receiver.close();
        while let Some(submission) = receiver.recv().await {
            self.add(submission).await;
        }
        self.commit_all().await;
    }

    /// Seals every open batch and writes all sealed ones to the spool.
    async fn commit_all(&mut self) {
        let keys: Vec<SharedKey> = self.open.keys().cloned().collect();
        for key in keys {
            self.seal(&key);
        }
        self.commit().await;
    }

    async fn add(&mut self, submission: Submission) {
        let Submission { runs, ack } = submission;
        let max_bytes = self.limits.max_batch_bytes;
        let max_count = self.limits.max_batch_count.min(MAX_REQUEST_LOGS);
        let max_held_bytes = MAX_OPEN_BYTES.max(2 * max_bytes);
        for Run { key, logs, ends } in runs {
            let mut start = 0;
            let mut next = 0;
            while next < ends.len() {
                let first_len = ends[next] - start;
                let fits = |batch: &OpenBatch| {
                    batch.logs.len() + first_len <= max_bytes && batch.count < max_count
                };
                if !self.open.get(&key).is_some_and(fits) {
                    self.seal(&key);
                    if self.open.len() >= MAX_OPEN_GROUPS {
                        self.seal_oldest();
                    }
                    let batch = OpenBatch {
                        logs: Vec::new(),
                        count: 0,
                        started: Instant::now(),
                        acks: Vec::new(),
                    };
                    self.open.insert(key.clone(), batch);
                }
                let batch = self
                    .open
                    .get_mut(&key)
                    .expect("the group has an open batch");
                if !batch
                    .acks
                    .last()
                    .is_some_and(|last| Arc::ptr_eq(last, &ack))
                {
                    batch.acks.push(ack.clone());
                }
                // The following logs of the run go into the same batch, in
                // one copy, while no seal would be due.
                let mut end = ends[next];
                let mut count = 1;
                next += 1;
                while next < ends.len() {
                    let added = end - start;
                    let log_len = ends[next] - end;
                    let full =
                        batch.logs.len() + added >= max_bytes || batch.count + count >= max_count;
                    let fits = batch.logs.len() + added + log_len <= max_bytes
                        && self.held_bytes + added + log_len <= max_held_bytes;
                    if full || !fits {
                        break;
                    }
                    end = ends[next];
                    count += 1;
                    next += 1;
                }
                batch.logs.extend_from_slice(&logs[start..end]);
                batch.count += count;
                self.held_bytes += end - start;
                start = end;
                let full = batch.logs.len() >= max_bytes || batch.count >= max_count;
                if full {
                    self.seal(&key);
                }
                if self.held_bytes > max_held_bytes {
                    self.commit_all().await;
                } else if self.sealed_bytes() >= 2 * max_bytes {
                    // Sealed batches wait for the round's write only while
                    // they are few, which keeps the memory of one write small.
                    self.commit().await;
                }
            }
        }
    }

    fn sealed_bytes(&self) -> usize {
        self.sealed.iter().map(|batch| batch.encoded.len()).sum()
    }

    fn seal_oldest(&mut self) {
        let oldest = self
            .open
            .iter()
            .min_by_key(|(_, b)| b.started)
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            self.seal(&key);
        }
    }

    /// Logs that the spool is full, at most once per [`FULL_WARNING_INTERVAL`].
    fn warn_spool_full(&mut self, logstore: &str, action: &str) {
        let now = Instant::now();
        if self
            .last_full_warning
            .is_some_and(|last| now - last < FULL_WARNING_INTERVAL)
        {
            return;
        }
        self.last_full_warning = Some(now);
        let (bytes, batches, age) = self.spool.usage();
        tracing::warn!(
            logstore,
            spool_bytes = bytes,
            spooled_batches = batches,
            oldest_batch_age_seconds = age,
            max_spool_bytes = self.spool.max_bytes(),
            "spool full: {action}"
        );
    }

    /// Finishes one group's open batch and queues it for the next write.
    fn seal(&mut self, key: &SharedKey) {
        let Some((key, mut batch)) = self.open.remove_entry(key) else {
            return;
        };
        // The logs fields come first, as prost would write them, then the
        // group's own fields.
        let group_fields = LogGroup {
            logs: Vec::new(),
            reserved: None,
            topic: Some(key.topic.clone()),
            source: Some(key.source.clone()),
            log_tags: key.log_tags(),
        };
        let mut encoded = std::mem::take(&mut batch.logs);
        let logs_len = encoded.len();
        group_fields.encode(&mut encoded).expect("a Vec grows");
        self.held_bytes += encoded.len() - logs_len;
        self.sealed.push(Sealed {
            key,
            encoded,
            logs_len,
            records: batch.count,
            acks: std::mem::take(&mut batch.acks),
        });
    }

    /// Writes the sealed batches to the spool, as few writes as the bound
    /// allows, and completes their acks. A batch that does not fit waits
    /// (`block`) or fails (`reject`); batches before it are written first.
    async fn commit(&mut self) {
        self.held_bytes -= self.sealed_bytes();
        let sealed = std::mem::take(&mut self.sealed);
        let mut chunk: Vec<Sealed> = Vec::new();
        let mut chunk_bytes = 0u64;
        for batch in sealed {
            let size = batch.encoded.len() as u64;
            if !self.spool.has_room_for(chunk_bytes + size, chunk.len() + 1) {
                if !chunk.is_empty() {
                    self.write(std::mem::take(&mut chunk)).await;
                    chunk_bytes = 0;
                }
                match self.limits.on_full {
                    OnFull::Reject if !self.spool.has_room(size) => {
                        self.warn_spool_full(&batch.key.logstore, "rejecting new records");
                        metrics::counter!("skiff_logship_batches_rejected_total").increment(1);
                        let max_bytes = self.spool.max_bytes();
                        batch
                            .acks
                            .iter()
                            .for_each(|a| a.fail(SubmitError::SpoolFull { max_bytes }));
                        continue;
                    }
                    OnFull::Block if !self.spool.has_room(size) => {
                        self.warn_spool_full(&batch.key.logstore, "sources wait for room");
                        tokio::select! {
                            _ = self.spool.wait_for_room(size) => {}
                            // Dropping the rest fails their submissions.
                            _ = self.abandon.cancelled() => return,
                        }
                    }
                    OnFull::Reject | OnFull::Block => {}
                }
            }
            chunk_bytes += size;
            chunk.push(batch);
        }
        if !chunk.is_empty() {
            self.write(chunk).await;
        }
    }

    /// Writes batches with one spool write and completes their acks.
    async fn write(&mut self, mut chunk: Vec<Sealed>) {
        let acks: Vec<Vec<Arc<Ack>>> = chunk
            .iter_mut()
            .map(|batch| std::mem::take(&mut batch.acks))
            .collect();
        let spool = self.spool.clone();
        let written = tokio::task::spawn_blocking(move || {
            let batches: Vec<NewBatch<'_>> = chunk
                .iter()
                .map(|batch| NewBatch {
                    key: &batch.key,
                    records: batch.records,
                    log_group: &batch.encoded,
                    logs_len: batch.logs_len,
                })
                .collect();
            let result = spool.write_batches(&batches).map(|_| ());
            (chunk, result)
        })
        .await;
        let error = match written {
            Ok((chunk, Ok(()))) => {
                for batch in &chunk {
                    let labels = [("logstore", batch.key.logstore.clone())];
                    metrics::counter!("skiff_logship_records_in_total", &labels)
                        .increment(batch.records as u64);
                    metrics::counter!("skiff_logship_bytes_in_total", &labels)
                        .increment(batch.encoded.len() as u64);
                }
                return;
            }
            Ok((_, Err(err))) => {
                tracing::error!(error = %err, "spool write failed");
                err.to_string()
            }
            Err(err) => {
                tracing::error!(error = %err, "spool write task failed");
                err.to_string()
            }
        };
        for ack in acks.iter().flatten() {
            ack.fail(SubmitError::Spool(error.clone()));
        }
    }
}
