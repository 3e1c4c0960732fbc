//! The near cache's bounded store: cached replies by key, evicted by CLOCK
//! (second chance), and the counters that decide whether a reply read from
//! Redis may still be stored when it arrives.
//!
//! A read records a [`Stamp`] before it is sent: its key's version, the
//! shard's flush epoch, the slot's generation and the tracking connection's
//! epoch. An invalidation, a flush, a slot move or a lost tracking
//! connection bumps one of them, so a reply that may have raced with an
//! invalidation fails [`Store::insert`] instead of being stored.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::metrics::{CacheMetrics, Skip, Source};
use super::tracking::Tracker;
use crate::redis::frame::Protocol;
use crate::redis::slot::SLOT_COUNT;

/// Version counters per shard. Keys share a counter by hash, so an
/// invalidation of one key can make a concurrent read of another key skip
/// its store, which costs a later miss and nothing else.
const VERSIONS_PER_SHARD: usize = 512;
/// Estimated heap bytes per cached key beyond the key itself: its map slot,
/// its CLOCK queue slot and the entry header.
const KEY_OVERHEAD: usize = 112;
/// Estimated heap bytes per cached reply beyond its reply and argument
/// bytes: the reply record and the argument list.
const REPLY_OVERHEAD: usize = 96;
/// Maximum number of shapes (command and arguments) cached for one key. A
/// new shape beyond this replaces the oldest, so a hash read field by field
/// does not make lookups of its key scan a long list.
const MAX_SHAPES_PER_KEY: usize = 32;
const MAX_SHARDS: usize = 16;
/// Smallest byte budget of a shard when the cache is split.
const MIN_SHARD_BYTES: usize = 256 * 1024;
/// Replies up to this size are copied out of the cache on a hit; larger
/// ones share their buffer. Sharing costs two atomic reference count
/// updates on a cache line that every worker thread touches for a hot
/// key, which costs more than copying a small reply.
const COPY_OUT_BYTES: usize = 512;

/// A shard on cache lines of its own, so threads working on neighbouring
/// shards do not contend for one line.
#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// The request a cached reply belongs to: the command and its arguments
/// after the key, for one database and RESP version.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub db: u32,
    pub protocol: Protocol,
    pub command: &'static str,
    pub args: &'a [Bytes],
}

/// Everything whose change since a read was sent means its reply must not
/// be stored.
pub struct Stamp {
    shard: usize,
    bucket: usize,
    version: u64,
    epoch: u64,
    slot: u16,
    slot_generation: u32,
    tracker: Arc<Tracker>,
    tracker_epoch: u64,
}

impl Stamp {
    pub fn node(&self) -> u32 {
        self.tracker.node
    }
}

struct Cached {
    db: u32,
    protocol: Protocol,
    command: &'static str,
    args: Box<[Bytes]>,
    reply: Bytes,
    deadline: Instant,
    node: u32,
    slot_generation: u32,
    size: usize,
}

impl Cached {
    fn matches(&self, shape: &Shape<'_>) -> bool {
        // Command names are the same static strings, so the pointer
        // comparison usually settles it.
        let same_command =
            std::ptr::eq(self.command, shape.command) || self.command == shape.command;
        self.db == shape.db
            && self.protocol == shape.protocol
            && same_command
            && *self.args == *shape.args
    }
}

struct KeyEntry {
    /// Tells this entry apart from an earlier one of the same key in the
    /// CLOCK queue.
    id: u64,
    referenced: bool,
    slot: u16,
    replies: Vec<Cached>,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Bytes, KeyEntry>,
    clock: VecDeque<(Bytes, u64)>,
    versions: Vec<u64>,
    /// Bumped by a flush of everything.
    epoch: u64,
    next_id: u64,
    bytes: usize,
    entries: usize,
}

/// Counts of what one operation removed, for the metrics and totals.
#[derive(Default)]
struct Removed {
    entries: usize,
    bytes: usize,
}

impl Shard {
    fn remove_key(&mut self, key: &[u8], removed: &mut Removed) {
        if let Some(entry) = self.map.remove(key) {
            let key_size = key.len() + KEY_OVERHEAD;
            let size: usize = entry.replies.iter().map(|c| c.size).sum::<usize>() + key_size;
            self.entries -= entry.replies.len();
            self.bytes -= size;
            removed.entries += entry.replies.len();
            removed.bytes += size;
        }
    }

    /// Removes the replies of `key` that `drop` selects, and the key when
    /// none is left.
    fn remove_replies(
        &mut self,
        key: &[u8],
        mut drop: impl FnMut(&Cached) -> bool,
        removed: &mut Removed,
    ) {
        let Some(entry) = self.map.get_mut(key) else {
            return;
        };
        let before = entry.replies.len();
        let mut freed = 0;
        entry.replies.retain(|cached| {
            let gone = drop(cached);
            if gone {
                freed += cached.size;
            }
            !gone
        });
        let count = before - entry.replies.len();
        self.entries -= count;
        self.bytes -= freed;
        removed.entries += count;
        removed.bytes += freed;
        if entry.replies.is_empty() {
            self.remove_key(key, removed);
        }
    }

    /// Evicts keys by CLOCK until the shard is within its limits.
    fn evict(&mut self, max_bytes: usize, max_entries: usize, removed: &mut Removed) {
        // Every live key has one queue slot, and a key whose bit is set is
        // passed over once, so two rounds of the queue evict enough.
        let mut budget = self.clock.len() * 2 + 2;
        while (self.bytes > max_bytes || self.entries > max_entries) && budget > 0 {
            budget -= 1;
            let Some((key, id)) = self.clock.pop_front() else {
                break;
            };
            let Some(entry) = self.map.get_mut(&key) else {
                continue;
            };
            if entry.id != id {
                continue;
            }
            if entry.referenced {
                entry.referenced = false;
                self.clock.push_back((key, id));
                continue;
            }
            self.remove_key(&key, removed);
        }
    }

    /// Drops queue slots of keys that are gone or were stored again, so
    /// the queue stays within a small multiple of the live keys.
    fn compact_clock(&mut self) {
        if self.clock.len() <= self.map.len() * 2 + 64 {
            return;
        }
        let map = &self.map;
        self.clock
            .retain(|(key, id)| map.get(key).is_some_and(|entry| entry.id == *id));
    }
}

/// The sharded store with its limits.
pub struct Store {
    shards: Box<[Padded]>,
    hasher: RandomState,
    slot_generations: Box<[AtomicU32]>,
    shard_max_bytes: usize,
    shard_max_entries: usize,
    bytes: AtomicI64,
    entries: AtomicI64,
    pub metrics: CacheMetrics,
}

impl Store {
    /// Splits `max_bytes` and `max_entries` evenly over the shards, so the
    /// totals never exceed them.
    pub fn new(max_bytes: usize, max_entries: usize) -> Store {
        let count = (max_entries / 64)
            .min(max_bytes / MIN_SHARD_BYTES)
            .clamp(1, MAX_SHARDS);
        let shards = (0..count)
            .map(|_| {
                Padded(Mutex::new(Shard {
                    versions: vec![0; VERSIONS_PER_SHARD],
                    ..Shard::default()
                }))
            })
            .collect();
        let slot_generations = (0..SLOT_COUNT).map(|_| AtomicU32::new(0)).collect();
        Store {
            shards,
            hasher: RandomState::new(),
            slot_generations,
            shard_max_bytes: (max_bytes / count).max(1),
            shard_max_entries: (max_entries / count).max(1),
            bytes: AtomicI64::new(0),
            entries: AtomicI64::new(0),
            metrics: CacheMetrics::register(),
        }
    }

    fn locate(&self, key: &[u8]) -> (usize, usize) {
        let hash = self.hasher.hash_one(key);
        let shard = (hash as usize) % self.shards.len();
        let bucket = ((hash >> 32) as usize) % VERSIONS_PER_SHARD;
        (shard, bucket)
    }

    fn slot_generation(&self, slot: u16) -> u32 {
        self.slot_generations[slot as usize].load(Ordering::Acquire)
    }

    /// Returns the cached reply for `key` and `shape`, dropping it when it
    /// expired or its slot moved since it was stored.
    pub fn get(&self, key: &[u8], shape: &Shape<'_>, now: Instant) -> Option<Bytes> {
        self.find(key, shape, now, |reply| {
            if reply.len() <= COPY_OUT_BYTES {
                Bytes::copy_from_slice(reply)
            } else {
                reply.clone()
            }
        })
    }

    /// Appends the cached reply for `key` and `shape` to `out`, as
    /// [`Store::get`] finds it. Returns false when there is none.
    pub fn get_into(
        &self,
        key: &[u8],
        shape: &Shape<'_>,
        now: Instant,
        out: &mut BytesMut,
    ) -> bool {
        self.find(key, shape, now, |reply| out.extend_from_slice(reply))
            .is_some()
    }

    /// Passes the live cached reply for `key` and `shape` to `take` under
    /// the shard lock, dropping the reply when it expired or its slot moved
    /// since it was stored.
    fn find<T>(
        &self,
        key: &[u8],
        shape: &Shape<'_>,
        now: Instant,
        take: impl FnOnce(&Bytes) -> T,
    ) -> Option<T> {
        let (index, _) = self.locate(key);
        let mut shard = self.shards[index].0.lock();
        let entry = shard.map.get_mut(key)?;
        let position = entry.replies.iter().position(|c| c.matches(shape))?;
        let cached = &entry.replies[position];
        if cached.deadline > now && cached.slot_generation == self.slot_generation(entry.slot) {
            // Written only when it changes, so hits on a hot key leave its
            // cache line shared between threads.
            if !entry.referenced {
                entry.referenced = true;
            }
            return Some(take(&cached.reply));
        }
        let mut removed = Removed::default();
        let mut index = 0;
        shard.remove_replies(
            key,
            |_| {
                index += 1;
                index == position + 1
            },
            &mut removed,
        );
        drop(shard);
        self.metrics
            .evicted_expired
            .increment(removed.entries as u64);
        self.account(&removed, 0, 0);
        None
    }

    /// Records what a read of `key` in `slot` must find unchanged for its
    /// reply to be stored. `None` when `tracker` is not connected, because
    /// then no invalidation would reach skiff.
    pub fn stamp(&self, key: &[u8], slot: u16, tracker: &Arc<Tracker>) -> Option<Stamp> {
        let tracker_epoch = tracker.epoch_if_up()?;
        let (index, bucket) = self.locate(key);
        let shard = self.shards[index].0.lock();
        Some(Stamp {
            shard: index,
            bucket,
            version: shard.versions[bucket],
            epoch: shard.epoch,
            slot,
            slot_generation: self.slot_generation(slot),
            tracker: tracker.clone(),
            tracker_epoch,
        })
    }

    /// Stores `reply` unless something in `stamp` changed since the read
    /// was sent. Copies the key, arguments and reply, so the cache never
    /// holds on to a larger network buffer they were cut from.
    pub fn insert(
        &self,
        key: &[u8],
        stamp: &Stamp,
        shape: &Shape<'_>,
        reply: &Bytes,
        deadline: Instant,
    ) -> Result<(), Skip> {
        let args_size: usize = shape.args.iter().map(Bytes::len).sum();
        let size = reply.len() + args_size + REPLY_OVERHEAD;
        if size + key.len() + KEY_OVERHEAD > self.shard_max_bytes / 4 {
            return Err(Skip::TooLarge);
        }

        let mut shard = self.shards[stamp.shard].0.lock();
        let unchanged = shard.versions[stamp.bucket] == stamp.version
            && shard.epoch == stamp.epoch
            && self.slot_generation(stamp.slot) == stamp.slot_generation
            && stamp.tracker.epoch_if_up() == Some(stamp.tracker_epoch);
        if !unchanged {
            return Err(Skip::Raced);
        }
        let cached = Cached {
            db: shape.db,
            protocol: shape.protocol,
            command: shape.command,
            args: shape
                .args
                .iter()
                .map(|a| Bytes::copy_from_slice(a))
                .collect(),
            reply: Bytes::copy_from_slice(reply),
            deadline,
            node: stamp.node(),
            slot_generation: stamp.slot_generation,
            size,
        };

        let mut removed = Removed::default();
        // The same shape stored by an earlier read is replaced.
        shard.remove_replies(key, |c| c.matches(shape), &mut removed);
        let (added_entries, mut added_bytes) = (1, size);
        match shard.map.get_mut(key) {
            Some(entry) => {
                if entry.replies.len() >= MAX_SHAPES_PER_KEY {
                    let oldest = entry.replies.remove(0);
                    removed.entries += 1;
                    removed.bytes += oldest.size;
                    shard.entries -= 1;
                    shard.bytes -= oldest.size;
                }
                let entry = shard.map.get_mut(key).expect("entry still present");
                entry.replies.push(cached);
            }
            None => {
                let owned = Bytes::copy_from_slice(key);
                shard.next_id += 1;
                let id = shard.next_id;
                shard.clock.push_back((owned.clone(), id));
                shard.map.insert(
                    owned,
                    KeyEntry {
                        id,
                        referenced: false,
                        slot: stamp.slot,
                        replies: vec![cached],
                    },
                );
                added_bytes += key.len() + KEY_OVERHEAD;
            }
        }
        shard.entries += added_entries;
        shard.bytes += added_bytes;

        let evicted_before = removed.entries;
        shard.evict(self.shard_max_bytes, self.shard_max_entries, &mut removed);
        shard.compact_clock();
        drop(shard);
        let evicted = removed.entries - evicted_before;
        self.metrics.evicted_size.increment(evicted as u64);
        self.account(&removed, added_entries, added_bytes);
        Ok(())
    }

    /// Drops every cached reply of `key`, in every database, and makes
    /// reads of it in flight skip their store.
    pub fn invalidate(&self, key: &[u8], source: Source) {
        let (index, bucket) = self.locate(key);
        let mut removed = Removed::default();
        {
            let mut shard = self.shards[index].0.lock();
            shard.versions[bucket] += 1;
            shard.remove_key(key, &mut removed);
        }
        self.metrics.invalidated(source, removed.entries);
        self.account(&removed, 0, 0);
    }

    /// Drops everything, and makes every read in flight skip its store.
    pub fn flush_all(&self) {
        let mut removed = Removed::default();
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock();
            shard.epoch += 1;
            removed.entries += shard.entries;
            removed.bytes += shard.bytes;
            shard.map.clear();
            shard.clock.clear();
            shard.entries = 0;
            shard.bytes = 0;
        }
        self.metrics.invalidated(Source::Flush, removed.entries);
        self.account(&removed, 0, 0);
    }

    /// Drops every reply read from `node`. The caller bumps the node's
    /// tracking epoch first, so reads in flight from it skip their store.
    pub fn flush_node(&self, node: u32) {
        let mut removed = Removed::default();
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock();
            let keys: Vec<Bytes> = shard
                .map
                .iter()
                .filter(|(_, entry)| entry.replies.iter().any(|c| c.node == node))
                .map(|(key, _)| key.clone())
                .collect();
            for key in keys {
                shard.remove_replies(&key, |c| c.node == node, &mut removed);
            }
        }
        self.metrics.invalidated(Source::Flush, removed.entries);
        self.account(&removed, 0, 0);
    }

    /// Makes every reply cached for `slot`, and every read of it in flight,
    /// stale. Replies are dropped when next looked up or evicted.
    pub fn flush_slot(&self, slot: u16) {
        if let Some(generation) = self.slot_generations.get(slot as usize) {
            generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn account(&self, removed: &Removed, added_entries: usize, added_bytes: usize) {
        if added_entries == 0 && removed.entries == 0 {
            return;
        }
        // Signed, because another thread's removal can be counted before
        // this thread's addition that it undid.
        let entries_delta = added_entries as i64 - removed.entries as i64;
        let bytes_delta = added_bytes as i64 - removed.bytes as i64;
        let entries = self.entries.fetch_add(entries_delta, Ordering::Relaxed) + entries_delta;
        let bytes = self.bytes.fetch_add(bytes_delta, Ordering::Relaxed) + bytes_delta;
        self.metrics.entries.set(entries.max(0) as f64);
        self.metrics.bytes.set(bytes.max(0) as f64);
    }

    /// Cached replies and their estimated bytes.
    pub fn size(&self) -> (usize, usize) {
        let entries = self.entries.load(Ordering::Relaxed).max(0) as usize;
        let bytes = self.bytes.load(Ordering::Relaxed).max(0) as usize;
        (entries, bytes)
    }
}
