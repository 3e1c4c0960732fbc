//! The queue of responses a session still expects from its server, in the
//! order the requests went out, with skiff's own replies slotted in between.
//!
//! Extended-protocol clients pipeline many messages before one Sync. Some of
//! them skiff answers itself (Close of a prepared statement, Parse of a
//! statement the server already has) and some it adds (a Parse before a
//! Bind on a server that lacks the statement). The queue keeps the client's
//! view of the replies in order.

use std::collections::VecDeque;

use bytes::Bytes;

use super::protocol::backend;

/// A request sent to the server, by the kind of responses it produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Parse; `statement` is the pooler-wide name, `client_name` the name
    /// the client gave it.
    Parse {
        statement: Option<String>,
        client_name: Option<String>,
    },
    /// Bind of a pooler-wide statement, if any.
    Bind {
        statement: Option<std::sync::Arc<super::prepared::Statement>>,
    },
    /// Describe; `statement` is the client's name of a captured statement
    /// whose parameter types skiff takes from the reply.
    Describe {
        statement: Option<String>,
    },
    Execute,
    Close,
    /// Sync: ends with ReadyForQuery.
    Sync,
    /// Simple Query or FunctionCall: ends with ReadyForQuery.
    Query,
}

impl Request {
    /// True when `tag` is the last response to this request (an
    /// ErrorResponse is handled separately).
    pub fn completed_by(&self, tag: u8) -> bool {
        match self {
            Request::Parse { .. } => tag == backend::PARSE_COMPLETE,
            Request::Bind { .. } => tag == backend::BIND_COMPLETE,
            Request::Describe { .. } => tag == backend::ROW_DESCRIPTION || tag == backend::NO_DATA,
            Request::Execute => matches!(
                tag,
                backend::COMMAND_COMPLETE
                    | backend::EMPTY_QUERY_RESPONSE
                    | backend::PORTAL_SUSPENDED
            ),
            Request::Close => tag == backend::CLOSE_COMPLETE,
            Request::Sync | Request::Query => tag == backend::READY_FOR_QUERY,
        }
    }

    /// True for requests that end with ReadyForQuery.
    pub fn ends_with_ready(&self) -> bool {
        matches!(self, Request::Sync | Request::Query)
    }
}

/// One slot in the expected-response queue.
#[derive(Debug, Clone)]
pub enum Expected {
    /// Responses go to the client.
    Forward(Request),
    /// skiff sent this request itself; its responses are dropped, except an
    /// ErrorResponse, which the client gets in place of its own request's.
    Injected(Request),
    /// Bytes skiff sends the client when this slot is reached.
    Local(Bytes),
    /// A reply skiff sends for a client's Parse or Close of a named
    /// statement. `undo` reverts its bookkeeping when an earlier error makes
    /// the server skip to Sync, because PostgreSQL would skip the message.
    LocalStatement { reply: Bytes, undo: Undo },
}

/// How to revert a locally answered Parse or Close.
#[derive(Debug, Clone)]
pub enum Undo {
    /// Forget the client's name again (a Parse that did not happen).
    Forget { client_name: String },
    /// Give the client's name back its statement (a Close that did not
    /// happen).
    Restore {
        client_name: String,
        statement: std::sync::Arc<super::prepared::Statement>,
    },
}

impl Expected {
    /// True for replies skiff sends itself.
    pub fn is_local(&self) -> bool {
        matches!(self, Expected::Local(_) | Expected::LocalStatement { .. })
    }
}

/// The expected-response queue of one session.
#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<Expected>,
    /// The server hit an error and skips messages until the next Sync, but
    /// that Sync has not been sent yet.
    pub skipping_to_sync: bool,
}

impl Pending {
    pub fn push(&mut self, expected: Expected) {
        if self.skipping_to_sync {
            match &expected {
                Expected::Forward(Request::Sync) => self.skipping_to_sync = false,
                _ => return,
            }
        }
        self.queue.push_back(expected);
    }

    pub fn front(&self) -> Option<&Expected> {
        self.queue.front()
    }

    pub fn pop(&mut self) -> Option<Expected> {
        self.queue.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Expected> {
        self.queue.iter()
    }

    /// True when some slot still waits for the server.
    pub fn awaits_server(&self) -> bool {
        self.queue.iter().any(|slot| !slot.is_local())
    }

    /// Pops every slot up to the next Sync after an ErrorResponse, because
    /// the server skips those requests. Returns the dropped slots so the
    /// caller can undo their bookkeeping.
    pub fn skip_to_sync(&mut self) -> Vec<Expected> {
        let mut dropped = Vec::new();
        while let Some(front) = self.queue.front() {
            if matches!(front, Expected::Forward(Request::Sync)) {
                return dropped;
            }
            dropped.push(self.queue.pop_front().expect("front exists"));
        }
        self.skipping_to_sync = true;
        dropped
    }

    /// Removes Sync slots queued right behind the front slot: a server in
    /// COPY FROM STDIN mode ignores a Sync that arrives during the copy.
    pub fn drop_syncs_after_front(&mut self) {
        let mut index = 1;
        while index < self.queue.len() {
            if matches!(self.queue[index], Expected::Forward(Request::Sync)) {
                self.queue.remove(index);
            } else {
                index += 1;
            }
        }
    }

    pub fn clear(&mut self) {
        self.queue.clear();
        self.skipping_to_sync = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_stops_at_sync() {
        let mut pending = Pending::default();
        pending.push(Expected::Forward(Request::Bind { statement: None }));
        pending.push(Expected::Local(Bytes::from_static(b"x")));
        pending.push(Expected::Forward(Request::Execute));
        pending.push(Expected::Forward(Request::Sync));
        let dropped = pending.skip_to_sync();
        assert_eq!(dropped.len(), 3);
        assert!(matches!(
            pending.front(),
            Some(Expected::Forward(Request::Sync))
        ));
        assert!(!pending.skipping_to_sync);
    }

    #[test]
    fn skip_without_sync_drops_later_requests_until_sync() {
        let mut pending = Pending::default();
        pending.push(Expected::Forward(Request::Execute));
        pending.skip_to_sync();
        assert!(pending.skipping_to_sync);
        pending.push(Expected::Forward(Request::Execute));
        assert!(pending.is_empty());
        pending.push(Expected::Forward(Request::Sync));
        assert!(!pending.skipping_to_sync);
        assert!(matches!(
            pending.pop(),
            Some(Expected::Forward(Request::Sync))
        ));
    }

    #[test]
    fn completion_tags() {
        let describe = Request::Describe { statement: None };
        assert!(describe.completed_by(backend::NO_DATA));
        assert!(!describe.completed_by(backend::PARAMETER_DESCRIPTION));
        assert!(Request::Execute.completed_by(backend::PORTAL_SUSPENDED));
        assert!(!Request::Execute.completed_by(backend::DATA_ROW));
        assert!(Request::Query.ends_with_ready());
    }
}
