//! Delivery: takes spooled batches oldest first and merges those of one
//! log group into requests of up to `max_batch_bytes` and
//! `max_batch_count`, sent once the oldest is `linger` old. Retryable
//! failures are retried with capped exponential backoff and jitter for as
//! long as it takes, and rejected batches go to the dead-letter file.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::deadletter::DeadLetter;
use super::record::{now_ns, MAX_REQUEST_LOGS};
use super::sink::{SendError, Sink};
use super::spool::{Spool, SpooledBatch};

/// Retry delays: `initial`, doubling up to `max`, each drawn at random from
/// its upper half.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Returns the delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        let capped = self.initial.saturating_mul(factor).min(self.max);
        let half = capped / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

/// Delivery settings a config reload may replace. The loop reads them for
/// each request and each retry.
pub struct DeliverySettings {
    pub sink: Arc<Sink>,
    pub backoff: Backoff,
    /// A request waits until its oldest record is this old, unless it is
    /// full or `drain` fired.
    pub linger: Duration,
    pub max_batch_bytes: usize,
    pub max_batch_count: usize,
}

/// The delivery loop's parts.
pub struct Delivery {
    pub spool: Arc<Spool>,
    pub dead_letter: DeadLetter,
    pub settings: Arc<ArcSwap<DeliverySettings>>,
    /// Fired on shutdown: send what is spooled without waiting for linger.
    pub drain: CancellationToken,
}

impl Delivery {
    /// Delivers batches until `stop` is cancelled. A batch being sent when
    /// `stop` fires stays in the spool and is sent again on the next start.
    // NOTE: one request is in flight at a time, so a logstore that keeps
    // failing with a retryable error (such as its own write quota) holds
    // back batches of every other logstore until it recovers.
    pub async fn run(self, stop: CancellationToken) {
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            let settings = self.settings.load_full();
            let max_count = settings.max_batch_count.min(MAX_REQUEST_LOGS);
            let notified = self.spool.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let plan = self.spool.plan(settings.max_batch_bytes as u64, max_count);
            let wait = match &plan {
                None => None,
                Some(plan) if plan.full || self.drain.is_cancelled() => Some(Duration::ZERO),
                Some(plan) => {
                    let age = Duration::from_nanos(now_ns().saturating_sub(plan.oldest_ns));
                    Some(settings.linger.saturating_sub(age))
                }
            };
            let waiting_for_linger = plan.is_some();
            let Some(plan) = plan.filter(|_| wait == Some(Duration::ZERO)) else {
                let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
                loop {
                    tokio::select! {
                        _ = &mut notified => {
                            // While the oldest batch lingers, a write matters only
                            // if the spool now holds a full request's worth.
                            let may_fill = |spool: &Spool| {
                                spool.holds_at_least(settings.max_batch_bytes as u64, max_count)
                            };
                            if !waiting_for_linger || may_fill(&self.spool) {
                                break;
                            }
                            notified.set(self.spool.notified());
                            notified.as_mut().enable();
                            if may_fill(&self.spool) {
                                break;
                            }
                        }
                        _ = sleep_until_some(deadline) => break,
                        _ = gauges.tick() => self.spool.update_gauges(),
                        _ = self.drain.cancelled(), if !self.drain.is_cancelled() => break,
                        _ = stop.cancelled() => return,
                    }
                }
                continue;
            };
            match self.spool.read_merged(&plan.seqs) {
                Ok(batch) => {
                    if !self.deliver(&batch, &plan.seqs, &stop).await {
                        return;
                    }
                }
                Err((seq, err)) if err.kind() == io::ErrorKind::InvalidData => {
                    metrics::counter!("skiff_logship_batches_corrupt_total").increment(1);
                    match self.spool.quarantine(seq) {
                        Ok(path) => tracing::error!(file = %path.display(), error = %err,
                            "damaged spool file moved aside; its records were not sent"),
                        Err(err) => {
                            tracing::error!(error = %err, "cannot move damaged spool file aside");
                            if !sleep_or_stop(Duration::from_secs(1), &stop).await {
                                return;
                            }
                        }
                    }
                }
                Err((_, err)) => {
                    tracing::error!(error = %err, "cannot read spooled batch; retrying");
                    if !sleep_or_stop(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sends one (merged) batch until it is delivered or dead-lettered, then
    /// removes the spooled batches `seqs` it was made of. Returns false when
    /// `stop` fired first.
    async fn deliver(&self, batch: &SpooledBatch, seqs: &[u64], stop: &CancellationToken) -> bool {
        let key = &batch.header.key;
        let mut attempt = 0u32;
        loop {
            let settings = self.settings.load_full();
            let sink = settings.sink.name();
            let result = tokio::select! {
                result = settings.sink.send(batch) => result,
                _ = stop.cancelled() => return false,
            };
            match result {
                Ok(()) => {
                    let labels = [("logstore", key.logstore.clone())];
                    metrics::counter!("skiff_logship_records_out_total", &labels)
                        .increment(batch.header.records as u64);
                    metrics::counter!("skiff_logship_bytes_out_total", &labels)
                        .increment(batch.log_group.len() as u64);
                    metrics::counter!("skiff_logship_batches_sent_total", "sink" => sink)
                        .increment(1);
                    if attempt > 0 {
                        tracing::info!(logstore = %key.logstore, attempts = attempt + 1, "batch delivered after retries");
                    }
                    return self.remove(seqs, stop).await;
                }
                Err(SendError::Retryable(reason)) => {
                    attempt += 1;
                    self.spool.update_gauges();
                    metrics::counter!("skiff_logship_batches_retried_total", "sink" => sink)
                        .increment(1);
                    // The first failure and then every tenth, so a long outage
                    // does not flood the log.
                    if attempt == 1 || attempt % 10 == 0 {
                        tracing::warn!(logstore = %key.logstore, attempt, error = %reason, "batch not delivered; retrying");
                    }
                    if !sleep_or_stop(settings.backoff.delay(attempt), stop).await {
                        return false;
                    }
                }
                Err(SendError::Rejected(reason)) => {
                    return self.dead_letter(batch, seqs, &reason, stop).await;
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        batch: &SpooledBatch,
        seqs: &[u64],
        reason: &str,
        stop: &CancellationToken,
    ) -> bool {
        let key = &batch.header.key;
        let mut attempts = 0u64;
        loop {
            match self.dead_letter.append(batch, reason) {
                Ok(()) => break,
                Err(err) => {
                    // Retried every second; logged once a minute.
                    if attempts % 60 == 0 {
                        tracing::error!(error = %err, file = %self.dead_letter.path().display(),
                            "cannot write dead-letter file; batch kept in spool");
                    }
                    attempts += 1;
                    if !sleep_or_stop(Duration::from_secs(1), stop).await {
                        return false;
                    }
                }
            }
        }
        let sink = self.settings.load().sink.name();
        metrics::counter!("skiff_logship_batches_dead_lettered_total", "sink" => sink).increment(1);
        tracing::warn!(logstore = %key.logstore, records = batch.header.records, error = %reason,
            file = %self.dead_letter.path().display(), "batch rejected by sink; written to dead-letter file");
        self.remove(seqs, stop).await
    }

    async fn remove(&self, seqs: &[u64], stop: &CancellationToken) -> bool {
        loop {
            match self.spool.remove(seqs) {
                Ok(()) => return true,
                Err(err) => {
                    tracing::error!(error = %err, "cannot remove delivered batch from spool");
                    if !sleep_or_stop(Duration::from_secs(1), stop).await {
                        return false;
                    }
                }
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sleeps for `delay`; returns false if `stop` fired first.
async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    let deadline = Instant::now() + delay;
    tokio::select! {
        _ = tokio::time::sleep_until(deadline.into()) => true,
        _ = stop.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let first = backoff.delay(1);
            assert!(first >= Duration::from_millis(50), "{first:?}");
            assert!(first <= Duration::from_millis(100), "{first:?}");
            let third = backoff.delay(3);
            assert!(third >= Duration::from_millis(200), "{third:?}");
            assert!(third <= Duration::from_millis(400), "{third:?}");
            let late = backoff.delay(40);
            assert!(late >= Duration::from_millis(500), "{late:?}");
            assert!(late <= Duration::from_secs(1), "{late:?}");
        }
    }
}
