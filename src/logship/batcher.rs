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
use super::spool::Spool;
use crate::config::OnFull;

/// Submissions waiting for the batcher; a full queue makes `submit` wait.
const QUEUE_CAPACITY: usize = 1024;
/// Open log groups held in memory at once; past this the oldest is flushed.
const MAX_OPEN_GROUPS: usize = 256;
/// Bytes of open log groups held in memory at once (or two batches, if
/// larger); past this the largest group is flushed early.
const MAX_OPEN_BYTES: usize = 32 * 1024 * 1024;
/// Minimum time between two "spool full" warnings.
const FULL_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Submissions taken into one group commit at most.
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
}

struct Submission {
    runs: Vec<Run>,
    ack: Arc<Ack>,
}

/// Consecutive records of one submission that share a log group, each
/// already encoded as a `logs` field of a `LogGroup`. Encoding on the
/// submitting task keeps that work off the single batcher task.
struct Run {
    key: GroupKey,
    logs: Vec<Vec<u8>>,
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
            open_bytes: 0,
            spool: spool.clone(),
            limits: limits.clone(),
            abandon,
        };
        let task = tokio::spawn(batcher.run(receiver, shutdown));
        let shipper = Shipper {
            queue,
            spool,
            on_full: limits.on_full,
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
            let log = if same_group {
                record.into_log()
            } else {
                validate_logstore(&record.logstore).map_err(SubmitError::InvalidRecord)?;
                let (key, log) = record.into_key_and_log();
                runs.push(Run {
                    key,
                    logs: Vec::new(),
                });
                log
            };
            let size = framed_len(&log);
            if size > MAX_REQUEST_BYTES - GROUP_OVERHEAD_BYTES {
                return Err(SubmitError::InvalidRecord(format!(
                    "record of {size} bytes exceeds the {} byte limit of one request",
                    MAX_REQUEST_BYTES - GROUP_OVERHEAD_BYTES
                )));
            }
            total += size;
            let mut encoded = Vec::with_capacity(size);
            encode_log_field(&log, &mut encoded);
            let run = runs.last_mut().expect("every record belongs to a run");
            run.logs.push(encoded);
        }
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

/// Records of one group waiting to be flushed.
struct OpenBatch {
    /// The records, each encoded as a `logs` field of a `LogGroup`.
    logs: Vec<u8>,
    /// Number of records in `logs`.
    count: usize,
    started: Instant,
    acks: Vec<Arc<Ack>>,
    written: bool,
}

impl Drop for OpenBatch {
    fn drop(&mut self) {
        if !self.written {
            for ack in &self.acks {
                ack.fail(SubmitError::Closed);
            }
        }
    }
}

struct Batcher {
    /// When the last "spool full" warning was logged.
    last_full_warning: Option<Instant>,
    open: HashMap<GroupKey, OpenBatch>,
    /// Sum of the encoded sizes of the batches in `open`.
    open_bytes: usize,
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
            // this one, so one fsync acknowledges many submissions.
            for _ in 0..MAX_SUBMISSIONS_PER_COMMIT {
                match receiver.try_recv() {
                    Ok(submission) => self.add(submission).await,
                    Err(_) => break,
                }
            }
            self.flush_all().await;
        }
        receiver.close();
        while let Some(submission) = receiver.recv().await {
            self.add(submission).await;
        }
        self.flush_all().await;
    }

    async fn flush_all(&mut self) {
        let keys: Vec<GroupKey> = self.open.keys().cloned().collect();
        for key in keys {
            self.flush(&key).await;
        }
    }

    async fn add(&mut self, submission: Submission) {
        let Submission { runs, ack } = submission;
        let max_bytes = self.limits.max_batch_bytes;
        let max_count = self.limits.max_batch_count.min(MAX_REQUEST_LOGS);
        let max_open_bytes = MAX_OPEN_BYTES.max(2 * max_bytes);
        for Run { key, logs } in runs {
            let mut logs = logs.into_iter().peekable();
            while let Some(first) = logs.next() {
                if let Some(batch) = self.open.get(&key) {
                    let over_bytes = batch.logs.len() + first.len() > max_bytes;
                    let over_count = batch.count + 1 > max_count;
                    if over_bytes || over_count {
                        self.flush(&key).await;
                    }
                }
                if !self.open.contains_key(&key) {
                    if self.open.len() >= MAX_OPEN_GROUPS {
                        self.flush_oldest().await;
                    }
                    let batch = OpenBatch {
                        logs: Vec::new(),
                        count: 0,
                        started: Instant::now(),
                        acks: Vec::new(),
                        written: false,
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
                // The following records of the run go into the same batch
                // without another lookup while no flush would be due.
                let mut next = Some(first);
                while let Some(log) = next.take() {
                    batch.logs.extend_from_slice(&log);
                    batch.count += 1;
                    self.open_bytes += log.len();
                    let full = batch.logs.len() >= max_bytes || batch.count >= max_count;
                    let fits = |log: &&Vec<u8>| {
                        !full
                            && batch.logs.len() + log.len() <= max_bytes
                            && batch.count < max_count
                            && self.open_bytes + log.len() <= max_open_bytes
                    };
                    if logs.peek().is_some_and(|log| fits(&log)) {
                        next = logs.next();
                    }
                }
                let full = batch.logs.len() >= max_bytes || batch.count >= max_count;
                if full {
                    self.flush(&key).await;
                }
                while self.open_bytes > max_open_bytes {
                    self.flush_largest().await;
                }
            }
        }
    }

    async fn flush_largest(&mut self) {
        let largest = self
            .open
            .iter()
            .max_by_key(|(_, b)| b.logs.len())
            .map(|(k, _)| k.clone());
        if let Some(key) = largest {
            self.flush(&key).await;
        }
    }

    async fn flush_oldest(&mut self) {
        let oldest = self
            .open
            .iter()
            .min_by_key(|(_, b)| b.started)
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            self.flush(&key).await;
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

    /// Writes one group's batch to the spool and completes its acks.
    async fn flush(&mut self, key: &GroupKey) {
        let Some(mut batch) = self.open.remove(key) else {
            return;
        };
        self.open_bytes -= batch.logs.len();
        let records = batch.count;
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
        encoded.extend_from_slice(&group_fields.encode_to_vec());
        let size = encoded.len() as u64;
        match self.limits.on_full {
            OnFull::Reject if !self.spool.has_room(size) => {
                self.warn_spool_full(&key.logstore, "rejecting new records");
                metrics::counter!("skiff_logship_batches_rejected_total").increment(1);
                let max_bytes = self.spool.max_bytes();
                batch
                    .acks
                    .iter()
                    .for_each(|a| a.fail(SubmitError::SpoolFull { max_bytes }));
                return;
            }
            OnFull::Block if !self.spool.has_room(size) => {
                self.warn_spool_full(&key.logstore, "sources wait for room");
                tokio::select! {
                    _ = self.spool.wait_for_room(size) => {}
                    _ = self.abandon.cancelled() => return,
                }
            }
            OnFull::Reject | OnFull::Block => {}
        }
        let spool = self.spool.clone();
        let write_key = key.clone();
        let written =
            tokio::task::spawn_blocking(move || spool.write(&write_key, records, &encoded)).await;
        match written {
            Ok(Ok(_seq)) => {
                batch.written = true;
                let labels = [("logstore", key.logstore.clone())];
                metrics::counter!("skiff_logship_records_in_total", &labels)
                    .increment(records as u64);
                metrics::counter!("skiff_logship_bytes_in_total", &labels).increment(size);
            }
            Ok(Err(err)) => {
                tracing::error!(logstore = %key.logstore, error = %err, "spool write failed");
                batch
                    .acks
                    .iter()
                    .for_each(|a| a.fail(SubmitError::Spool(err.to_string())));
            }
            Err(err) => {
                tracing::error!(logstore = %key.logstore, error = %err, "spool write task failed");
                batch
                    .acks
                    .iter()
                    .for_each(|a| a.fail(SubmitError::Spool(err.to_string())));
            }
        }
    }
}
