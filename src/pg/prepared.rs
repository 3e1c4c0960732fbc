//! Named prepared statements in transaction mode.
//!
//! A statement name belongs to one server connection, but a client in
//! transaction mode may run each transaction on another one. skiff therefore
//! gives every distinct (query, parameter types) a pooler-wide name such as
//! `skiff_42`, maps each client's own names onto those, and prepares a
//! statement on a server connection the first time a client there needs it.
//! Each server connection keeps a bounded cache of what it has prepared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::protocol::Parse;

/// Upper bound on distinct statements the registry remembers; beyond it,
/// statements no client holds are forgotten.
const MAX_REGISTERED_STATEMENTS: usize = 100_000;

/// Upper bound on named statements one client may hold.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;

/// One distinct statement, shared by every client that prepared it.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// Pooler-wide name used on server connections.
    pub name: String,
    /// The Parse message under the pooler-wide name.
    pub parse: Bytes,
    /// Its SQL may change session state without a SET command tag, so
    /// every Execute of it does so again.
    pub changes_session_state: bool,
    /// Its SQL is one plain statement that may have another client's
    /// request queued behind it, or be queued itself; see
    /// `pipeline::statement_may_queue`.
    pub may_queue: bool,
}

/// Identity of a statement across Parse messages: query bytes, parameter
/// types, and the client's search_path, because the same text can name
/// different tables under another search_path.
type StatementKey = (Bytes, Bytes, Option<String>);

/// Pooler-wide statement names, keyed by query text and parameter types.
///
/// NOTE: a server keeps a shared statement's plan from before a DDL change,
/// so a client that prepares the statement after the change still gets
/// "cached plan must not change result type" (0A000) once before skiff
/// prepares it afresh on that server.
#[derive(Default)]
pub struct Registry {
    by_key: Mutex<HashMap<StatementKey, Arc<Statement>>>,
    next_id: AtomicU64,
}

impl Registry {
    /// Returns the shared statement for a client's Parse, creating it on
    /// first sight. `changes_session_state` and `may_queue` must depend on
    /// the query alone.
    pub fn intern(
        &self,
        parse: &Parse,
        search_path: Option<&str>,
        changes_session_state: bool,
        may_queue: bool,
    ) -> Arc<Statement> {
        let key = (
            parse.query_bytes.clone(),
            parse.param_types.clone(),
            search_path.map(str::to_string),
        );
        let mut map = self.by_key.lock();
        if let Some(statement) = map.get(&key) {
            return statement.clone();
        }
        if map.len() >= MAX_REGISTERED_STATEMENTS {
            map.retain(|_, statement| Arc::strong_count(statement) > 1);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("skiff_{id}");
        let statement = Arc::new(Statement {
            parse: parse.encode_as(&name),
            name,
            changes_session_state,
            may_queue,
        });
        map.insert(key, statement.clone());
        statement
    }

    pub fn len(&self) -> usize {
        self.by_key.lock().len()
    }
}

/// The statements prepared on one server connection, least recently used
/// first out.
pub struct ServerStatements {
    capacity: usize,
    tick: u64,
    used: HashMap<String, u64>,
}

impl ServerStatements {
    pub fn new(capacity: usize) -> Self {
        ServerStatements {
            capacity,
            tick: 0,
            used: HashMap::new(),
        }
    }

    /// Marks `name` used; returns false when it is not prepared here.
    pub fn touch(&mut self, name: &str) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(tick) => {
                *tick = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `name` as prepared; returns the name evicted to make room,
    /// which the caller must Close on the server.
    pub fn insert(&mut self, name: &str) -> Option<String> {
        self.tick += 1;
        let mut evicted = None;
        if self.used.len() >= self.capacity.max(1) && !self.used.contains_key(name) {
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, tick)| **tick)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                self.used.remove(&oldest);
                evicted = Some(oldest);
            }
        }
        self.used.insert(name.to_string(), self.tick);
        evicted
    }

    pub fn remove(&mut self, name: &str) {
        self.used.remove(name);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// True when `name` is prepared here, without marking it used.
    pub fn contains(&self, name: &str) -> bool {
        self.used.contains_key(name)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn parse(query: &str) -> Parse {
        let mut types = bytes::BytesMut::new();
        types.put_i16(0);
        Parse {
            name: "client_name".into(),
            query: query.into(),
            query_bytes: Bytes::copy_from_slice(query.as_bytes()),
            param_types: types.freeze(),
        }
    }

    #[test]
    fn same_query_gets_same_name() {
        let registry = Registry::default();
        let a = registry.intern(&parse("select 1"), None, false, false);
        let b = registry.intern(&parse("select 1"), None, false, false);
        let c = registry.intern(&parse("select 2"), None, false, false);
        let d = registry.intern(&parse("select 1"), Some("tenant_a"), false, false);
        assert_eq!(a.name, b.name);
        assert_ne!(a.name, c.name);
        assert_ne!(a.name, d.name);
        let decoded = Parse::decode(&super::super::protocol::Message {
            raw: a.parse.clone(),
        });
        assert_eq!(decoded.unwrap().name, a.name);
    }

    #[test]
    fn server_cache_evicts_least_recently_used() {
        let mut cache = ServerStatements::new(2);
        assert_eq!(cache.insert("a"), None);
        assert_eq!(cache.insert("b"), None);
        assert!(cache.touch("a"));
        assert_eq!(cache.insert("c"), Some("b".to_string()));
        assert!(cache.touch("a"));
        assert!(!cache.touch("b"));
        assert_eq!(cache.len(), 2);
    }
}
