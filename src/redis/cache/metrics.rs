//! Handles of the `skiff_redis_cache_*` metrics, registered once so the
//! hot path does not look them up by name.

use std::cell::Cell;

use metrics::{Counter, Gauge};

/// Hits counted on one thread before they are added to the shared counter,
/// so worker threads do not contend for its cache line on every hit.
const HITS_PER_UPDATE: u64 = 64;

thread_local! {
    static UNCOUNTED_HITS: Cell<u64> = const { Cell::new(0) };
}

/// Why a cached reply was dropped before a size eviction or expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An invalidation message from Redis.
    Redis,
    /// A write that went through skiff.
    Write,
    /// A lost tracking connection, a role or slot change, or a flush.
    Flush,
}

/// Why a reply read from Redis was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// An invalidation or flush touched the key while the read was in flight.
    Raced,
    /// No tracking connection covered the node when the read was sent.
    Untracked,
    /// The reply is larger than a quarter of a shard's byte budget.
    TooLarge,
    /// The key expires too soon, or its TTL could not be read.
    Expiring,
}

pub struct CacheMetrics {
    hits: Counter,
    pub misses: Counter,
    invalidated_redis: Counter,
    invalidated_write: Counter,
    invalidated_flush: Counter,
    pub evicted_size: Counter,
    pub evicted_expired: Counter,
    skipped_raced: Counter,
    skipped_untracked: Counter,
    skipped_too_large: Counter,
    skipped_expiring: Counter,
    pub bytes: Gauge,
    pub entries: Gauge,
}

impl CacheMetrics {
    pub fn register() -> CacheMetrics {
        let invalidated = |source: &'static str| metrics::counter!("skiff_redis_cache_invalidations_total", "source" => source);
        let evicted = |reason: &'static str| metrics::counter!("skiff_redis_cache_evictions_total", "reason" => reason);
        let skipped = |reason: &'static str| metrics::counter!("skiff_redis_cache_skipped_stores_total", "reason" => reason);
        CacheMetrics {
            hits: metrics::counter!("skiff_redis_cache_hits_total"),
            misses: metrics::counter!("skiff_redis_cache_misses_total"),
            invalidated_redis: invalidated("redis"),
            invalidated_write: invalidated("write"),
            invalidated_flush: invalidated("flush"),
            evicted_size: evicted("size"),
            evicted_expired: evicted("expired"),
            skipped_raced: skipped("raced"),
            skipped_untracked: skipped("untracked"),
            skipped_too_large: skipped("too_large"),
            skipped_expiring: skipped("expiring"),
            bytes: metrics::gauge!("skiff_redis_cache_bytes"),
            entries: metrics::gauge!("skiff_redis_cache_entries"),
        }
    }

    /// Counts a hit. The counter trails by fewer than 64 hits per worker
    /// thread.
    pub fn hit(&self) {
        UNCOUNTED_HITS.with(|uncounted| {
            let hits = uncounted.get() + 1;
            if hits >= HITS_PER_UPDATE {
                self.hits.increment(hits);
                uncounted.set(0);
            } else {
                uncounted.set(hits);
            }
        });
    }

    pub fn invalidated(&self, source: Source, count: usize) {
        if count == 0 {
            return;
        }
        let counter = match source {
            Source::Redis => &self.invalidated_redis,
            Source::Write => &self.invalidated_write,
            Source::Flush => &self.invalidated_flush,
        };
        counter.increment(count as u64);
    }

    pub fn skipped(&self, reason: Skip) {
        let counter = match reason {
            Skip::Raced => &self.skipped_raced,
            Skip::Untracked => &self.skipped_untracked,
            Skip::TooLarge => &self.skipped_too_large,
            Skip::Expiring => &self.skipped_expiring,
        };
        counter.increment(1);
    }
}
