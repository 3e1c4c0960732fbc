//! `CLIENT TRACKING` for skiff's own clients, such as redis-py with its
//! client-side cache: which keys each tracking client read through skiff,
//! and the `invalidate` pushes it is owed when they change.
//!
//! A push must reach the client after the reply of every read of the key
//! that Redis may have run before the write; otherwise the client would
//! cache the old value after dropping it. Each push therefore carries the
//! position of the reply it must follow: the reply of the request being
//! handled when it was queued. The session's writer sends it once it has
//! written that many replies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::redis::reply;

/// Keys tracked for all clients together, as Redis's own default
/// `tracking-table-max-keys`. Past it, a tracked key is dropped and its
/// clients get an invalidation for it, as Redis does.
const MAX_TRACKED_KEYS: usize = 1_000_000;
/// Keys waiting in one client's pushes. Past it, the waiting pushes become
/// one push that invalidates everything.
const MAX_QUEUED_PUSH_KEYS: usize = 10_000;

enum Push {
    Keys(Vec<Bytes>),
    All,
}

#[derive(Default)]
struct PushQueue {
    /// Pushes with the reply position each must follow, in position order.
    items: VecDeque<(u64, Push)>,
    keys: usize,
}

/// One client's tracking state, shared by its session, its writer and the
/// table.
pub struct ClientTracking {
    pub id: u64,
    /// Replies the session queued since tracking was turned on.
    queued: AtomicU64,
    /// Position of the reply of the request being handled; pushes queued
    /// now are written after it.
    reserved: AtomicU64,
    pushes: Mutex<PushQueue>,
    notify: Notify,
    closed: AtomicBool,
}

impl ClientTracking {
    pub fn new(id: u64) -> Arc<ClientTracking> {
        Arc::new(ClientTracking {
            id,
            queued: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            pushes: Mutex::new(PushQueue::default()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// Marks the start of a request: pushes queued from now on follow its
    /// reply.
    pub fn begin_request(&self) {
        let next = self.queued.load(Ordering::Acquire) + 1;
        self.reserved.fetch_max(next, Ordering::AcqRel);
    }

    /// Counts a reply the session queued for its writer.
    pub fn reply_queued(&self) {
        let queued = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        self.reserved.fetch_max(queued, Ordering::AcqRel);
    }

    fn push(&self, push: Push) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let after = self.reserved.load(Ordering::Acquire);
        {
            let mut queue = self.pushes.lock();
            if let Push::Keys(keys) = &push {
                queue.keys += keys.len();
            }
            queue.items.push_back((after, push));
            if queue.keys > MAX_QUEUED_PUSH_KEYS {
                queue.items.clear();
                queue.keys = 0;
                queue.items.push_back((after, Push::All));
            }
        }
        self.notify.notify_one();
    }

    /// Appends to `out` the pushes due once `written` replies are written.
    pub fn take_due(&self, written: u64, out: &mut BytesMut) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut queue = self.pushes.lock();
        while queue
            .items
            .front()
            .is_some_and(|(after, _)| *after <= written)
        {
            let (_, push) = queue.items.pop_front().expect("front exists");
            if let Push::Keys(keys) = &push {
                queue.keys -= keys.len();
            }
            encode(&push, out);
        }
    }

    /// Waits until a push was queued since the last call.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Stops pushes, after `CLIENT TRACKING OFF` or when the client leaves.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut queue = self.pushes.lock();
        queue.items.clear();
        queue.keys = 0;
    }
}

/// Encodes `>2 invalidate <keys>`, or a null for every key.
fn encode(push: &Push, out: &mut BytesMut) {
    out.put_slice(b">2\r\n");
    out.put_slice(&reply::bulk(b"invalidate"));
    match push {
        Push::Keys(keys) => {
            reply::put_array_header(out, keys.len());
            for key in keys {
                out.put_slice(&reply::bulk(key));
            }
        }
        Push::All => out.put_slice(b"_\r\n"),
    }
}

struct Member {
    tracking: Arc<ClientTracking>,
    keys: HashSet<Bytes>,
}

#[derive(Default)]
struct Table {
    /// Key to the ids of the clients that read it.
    readers: HashMap<Bytes, Vec<u64>>,
    members: HashMap<u64, Member>,
    total: usize,
}

impl Table {
    /// Removes `key` and returns the clients that had read it.
    fn take(&mut self, key: &[u8]) -> Vec<u64> {
        let Some(ids) = self.readers.remove(key) else {
            return Vec::new();
        };
        self.total -= ids.len();
        for id in &ids {
            if let Some(member) = self.members.get_mut(id) {
                member.keys.remove(key);
            }
        }
        ids
    }
}

/// The keys every tracking client read, to route invalidations to them.
#[derive(Default)]
pub struct ClientTable {
    table: Mutex<Table>,
    active: AtomicUsize,
}

impl ClientTable {
    /// True while some client has tracking on.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    pub fn register(&self, tracking: Arc<ClientTracking>) {
        let mut table = self.table.lock();
        let member = Member {
            tracking,
            keys: HashSet::new(),
        };
        if let Some(old) = table.members.insert(member.tracking.id, member) {
            table.total -= old.keys.len();
            for key in old.keys {
                remove_reader(&mut table.readers, &key, old.tracking.id);
            }
        } else {
            self.active.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn unregister(&self, id: u64) {
        let mut table = self.table.lock();
        if let Some(member) = table.members.remove(&id) {
            member.tracking.close();
            table.total -= member.keys.len();
            for key in member.keys {
                remove_reader(&mut table.readers, &key, id);
            }
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Records that client `id` read `keys`. When `covered` is false no
    /// tracking connection is sure to report a change to them, so the
    /// client is told to drop them right after this reply instead.
    pub fn record_reads(&self, id: u64, keys: Vec<Bytes>, covered: bool) {
        let mut table = self.table.lock();
        let Some(member) = table.members.get_mut(&id) else {
            return;
        };
        if !covered {
            member.tracking.push(Push::Keys(keys));
            return;
        }
        let mut added = Vec::new();
        for key in keys {
            if member.keys.insert(key.clone()) {
                added.push(key);
            }
        }
        table.total += added.len();
        for key in added {
            table.readers.entry(key).or_default().push(id);
        }
        while table.total > MAX_TRACKED_KEYS {
            let Some(key) = table.readers.keys().next().cloned() else {
                break;
            };
            let ids = table.take(&key);
            deliver(&table, &ids, &key);
        }
    }

    /// Sends an invalidation for each of `keys` to the clients that read
    /// it, and stops tracking those keys for them.
    pub fn invalidate(&self, keys: &[Bytes]) {
        let mut table = self.table.lock();
        if table.readers.is_empty() {
            return;
        }
        let mut owed: HashMap<u64, Vec<Bytes>> = HashMap::new();
        for key in keys {
            for id in table.take(key) {
                owed.entry(id).or_default().push(key.clone());
            }
        }
        for (id, keys) in owed {
            if let Some(member) = table.members.get(&id) {
                member.tracking.push(Push::Keys(keys));
            }
        }
    }

    /// Tells every tracking client to drop everything it cached.
    pub fn flush(&self) {
        let mut table = self.table.lock();
        table.readers.clear();
        table.total = 0;
        for member in table.members.values_mut() {
            member.keys.clear();
            member.tracking.push(Push::All);
        }
    }
}

fn remove_reader(readers: &mut HashMap<Bytes, Vec<u64>>, key: &[u8], id: u64) {
    if let Some(ids) = readers.get_mut(key) {
        ids.retain(|other| *other != id);
        if ids.is_empty() {
            readers.remove(key);
        }
    }
}

fn deliver(table: &Table, ids: &[u64], key: &Bytes) {
    for id in ids {
        if let Some(member) = table.members.get(id) {
            member.tracking.push(Push::Keys(vec![key.clone()]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(tracking: &ClientTracking, written: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        tracking.take_due(written, &mut out);
        out.to_vec()
    }

    #[test]
    fn push_waits_for_the_reply_of_the_read() {
        let table = ClientTable::default();
        let tracking = ClientTracking::new(7);
        table.register(tracking.clone());
        tracking.begin_request();
        table.record_reads(7, vec![Bytes::from_static(b"k")], true);
        // The invalidation arrives before the read's reply is queued.
        table.invalidate(&[Bytes::from_static(b"k")]);
        assert!(due(&tracking, 0).is_empty());
        tracking.reply_queued();
        assert_eq!(
            due(&tracking, 1),
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n".to_vec()
        );
        // The key is no longer tracked after its invalidation.
        table.invalidate(&[Bytes::from_static(b"k")]);
        assert!(due(&tracking, 1).is_empty());
    }

    #[test]
    fn uncovered_read_is_invalidated_after_its_reply() {
        let table = ClientTable::default();
        let tracking = ClientTracking::new(1);
        table.register(tracking.clone());
        tracking.begin_request();
        table.record_reads(1, vec![Bytes::from_static(b"k")], false);
        tracking.reply_queued();
        assert!(!due(&tracking, 1).is_empty());
    }

    #[test]
    fn flush_and_unregister() {
        let table = ClientTable::default();
        let tracking = ClientTracking::new(3);
        table.register(tracking.clone());
        assert!(table.active());
        table.flush();
        assert_eq!(
            due(&tracking, 0),
            b">2\r\n$10\r\ninvalidate\r\n_\r\n".to_vec()
        );
        table.unregister(3);
        assert!(!table.active());
    }
}
