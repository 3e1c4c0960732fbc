//! Queries queued behind a running one on a server connection.
//!
//! In transaction mode, when every server connection of a pool is busy,
//! the request of the client that has waited longest is written to a busy
//! connection right behind the request it runs. That client gets the
//! connection as soon as the first request's ReadyForQuery comes back. A
//! request here is a simple Query, or a Bind, Execute and Sync of one
//! prepared statement that the connection has prepared already. A Describe
//! of the unnamed portal may come between them, as libpq, pgx and
//! tokio-postgres send a prepared query. The text below calls either a
//! Query.
//!
//! PostgreSQL reads the next Query as it finishes the first, instead of
//! going to sleep until skiff has read the reply and written the next
//! request. With 500 pgbench clients on a pool of 20, that sleep and
//! wake-up cost the backends about a fifth of their CPU time.
//!
//! Both Queries must be one plain statement that can neither leave a
//! transaction open nor change session state (see
//! [`statement_may_queue`]), so the second runs exactly as it would have
//! on the idle connection. A cancel request for the first client that the
//! server acts on after the first Query ended would hit the second one.
//! So would the plan change that a Bind of the same statement found just
//! before. In both cases the first client's session reads the second
//! reply ahead before it lets go of the connection. When that reply is the
//! same error, the session drops it and has the Query sent again (see
//! [`super::backend::ServerConn::settle_behind`]).

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::params::Settings;
use super::pool::Checkout;

/// The outcome of a queued Query when its connection is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The Query went to the server; its reply comes next.
    Sent,
    /// A cancel meant for the client before, or the plan change that
    /// client's Bind found, ended the Query before anything of it ran, so
    /// the client sends it again.
    Resend,
}

/// The failure of the connection a queued Query was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

enum State {
    /// The client waits; its Query has not been written anywhere.
    Waiting,
    /// The Query is written behind another client's.
    Queued,
    Handed(Checkout, Delivery),
    /// The connection the Query was written to failed or was closed.
    Lost,
    /// The client has finished waiting.
    Done,
}

/// A waiting client's request, offered to busy server connections: a
/// simple Query, or a Bind, Execute and Sync (a portal Describe between
/// them allowed) of one prepared statement.
pub struct Parked {
    /// The request as the server gets it.
    pub bytes: bytes::Bytes,
    /// The pooler-wide statement the request binds, which the connection
    /// must have prepared.
    pub statement: Option<String>,
    /// The client's session settings: the connection's must be the same.
    pub settings: Settings,
    pub client: u64,
    /// The count of cancel requests sent to the connection's server when
    /// the Query was written behind another; see [`Parked::exposed`].
    cancels_at_queue: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    handed: Notify,
}

impl Parked {
    pub fn new(
        bytes: bytes::Bytes,
        statement: Option<String>,
        settings: Settings,
        client: u64,
    ) -> Arc<Parked> {
        Arc::new(Parked {
            bytes,
            statement,
            settings,
            client,
            cancels_at_queue: Default::default(),
            state: Mutex::new(State::Waiting),
            handed: Notify::new(),
        })
    }

    /// Marks the Query as written behind another client's when the client
    /// still waits; false otherwise. `cancels` is the connection's count of
    /// cancel requests sent, read before the first client's cancel state
    /// was checked.
    pub fn queue(&self, cancels: u64) -> bool {
        let mut state = self.state.lock();
        if !matches!(*state, State::Waiting) {
            return false;
        }
        *state = State::Queued;
        self.cancels_at_queue
            .store(cancels, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// True when a cancel request went to the connection's server after
    /// the Query was written behind another, so it may have hit this one.
    pub fn exposed(&self, cancels_now: u64) -> bool {
        self.cancels_at_queue
            .load(std::sync::atomic::Ordering::Relaxed)
            != cancels_now
    }

    /// Hands the connection to the waiting client.
    pub fn hand(&self, checkout: Checkout, delivery: Delivery) {
        *self.state.lock() = State::Handed(checkout, delivery);
        self.handed.notify_one();
    }

    /// Tells the waiting client that its Query's connection is gone.
    pub fn lose(&self) {
        *self.state.lock() = State::Lost;
        self.handed.notify_one();
    }

    /// Waits until the connection is handed over or lost.
    pub async fn handed(&self) {
        self.handed.notified().await
    }

    /// Ends the client's wait. `Ok(None)`: the Query was never written and
    /// never will be. A Query already written behind another waits here
    /// for its connection, which then comes with what became of it.
    pub async fn finish(&self) -> Result<Option<(Checkout, Delivery)>, Lost> {
        loop {
            {
                let mut state = self.state.lock();
                if !matches!(*state, State::Queued) {
                    return match std::mem::replace(&mut *state, State::Done) {
                        State::Handed(checkout, delivery) => Ok(Some((checkout, delivery))),
                        State::Lost => Err(Lost),
                        _ => Ok(None),
                    };
                }
            }
            self.handed().await;
        }
    }

    /// True while the client still waits with its Query unwritten.
    pub fn is_waiting(&self) -> bool {
        matches!(*self.state.lock(), State::Waiting)
    }
}

/// A request a waiting client offers to be queued behind another's.
#[derive(Clone, Copy)]
pub struct Offer<'a> {
    /// The request as the server gets it.
    pub bytes: &'a [u8],
    /// The pooler-wide statement it binds, if any.
    pub statement: Option<&'a str>,
}

/// A Query written behind the one a connection runs. Dropping it without
/// [`Behind::take`] marks the waiting client's connection as lost, so a
/// connection closed on any path never leaves a client waiting for ever.
pub struct Behind(Option<Arc<Parked>>);

impl Behind {
    pub fn new(parked: Arc<Parked>) -> Behind {
        Behind(Some(parked))
    }

    pub fn parked(&self) -> &Parked {
        self.0.as_ref().expect("taken only on drop or handover")
    }

    /// Takes the waiting client out, for the handover.
    pub fn take(mut self) -> Arc<Parked> {
        self.0.take().expect("taken once")
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        if let Some(parked) = self.0.take() {
            parked.lose();
        }
    }
}

/// True for the SQL of a simple Query that may have another client's
/// Query queued behind it, or be queued itself. It must be one statement
/// (a trailing semicolon aside) that starts with SELECT, INSERT, UPDATE,
/// DELETE, WITH, VALUES or TABLE, because such a statement runs in a
/// transaction of its own that it cannot leave open, and starts no COPY.
/// It must also neither mention pg_settings nor match
/// `changes_session_state`, so it sets nothing that outlives it. A semicolon inside a string fails the check, which only
/// means the Query is not queued.
pub fn statement_may_queue(sql: &[u8], changes_session_state: impl Fn(&[u8]) -> bool) -> bool {
    let text = sql.trim_ascii();
    let text = text.strip_suffix(b";").unwrap_or(text);
    if text.contains(&b';') {
        return false;
    }
    let word_end = text
        .iter()
        .position(|byte| !byte.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let word = &text[..word_end];
    let plain = [
        &b"select"[..],
        b"insert",
        b"update",
        b"delete",
        b"with",
        b"values",
        b"table",
    ]
    .iter()
    .any(|keyword| word.eq_ignore_ascii_case(keyword));
    // An UPDATE of pg_settings is a SET in disguise.
    let touches_settings = sql
        .windows(b"pg_settings".len())
        .any(|window| window.eq_ignore_ascii_case(b"pg_settings"));
    plain && !touches_settings && !changes_session_state(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &[u8]) -> bool {
        false
    }

    #[test]
    fn plain_statements_may_queue() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "  select 1",
            "INSERT INTO t VALUES (1) RETURNING id",
            "update t set a = 1 where id = 2",
            "DELETE FROM t",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "VALUES (1), (2)",
            "TABLE t;  ",
        ] {
            assert!(statement_may_queue(sql.as_bytes(), never), "{sql}");
        }
    }

    #[test]
    fn other_statements_do_not() {
        for sql in [
            "BEGIN",
            "START TRANSACTION",
            "SET search_path = x",
            "RESET ALL",
            "COPY t FROM STDIN",
            "SELECT 1; SET work_mem = '1MB'",
            "SELECT 1; BEGIN",
            "SELECT ';'",
            "/* note */ SELECT 1",
            "-- note\nSET x = 1",
            "selector",
            "CALL p()",
            "DO $$ BEGIN END $$",
            "LISTEN c",
            "DISCARD ALL",
            "PREPARE p AS SELECT 1",
            "UPDATE pg_settings SET setting = 'UTC' WHERE name = 'TimeZone'",
            "",
        ] {
            assert!(!statement_may_queue(sql.as_bytes(), never), "{sql}");
        }
    }

    #[test]
    fn session_state_hints_stop_queueing() {
        let mentions_temp = |sql: &[u8]| sql.windows(4).any(|w| w.eq_ignore_ascii_case(b"temp"));
        assert!(!statement_may_queue(
            b"SELECT * INTO TEMP t FROM x",
            mentions_temp
        ));
        assert!(statement_may_queue(b"SELECT * FROM x", mentions_temp));
    }
}
