//! Messages from the client: forwarded as they are, renamed, or answered by
//! skiff itself.

use std::sync::Arc;

use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::{Flow, Session, FLUSH_THRESHOLD};
use crate::config::PoolMode;
use crate::pg::pending::{Expected, Request, Undo};
use crate::pg::pipeline;
use crate::pg::prepared::{Statement, MAX_CLIENT_STATEMENTS};
use crate::pg::protocol::{
    self, backend, frontend, read_cstr, Bind, Message, Parse, Severity, Target, TARGET_PORTAL,
    TARGET_STATEMENT,
};

impl Session {
    pub(super) async fn on_client_message(&mut self, message: Message) -> std::io::Result<Flow> {
        let tag = message.tag();
        let extended = matches!(
            tag,
            frontend::PARSE
                | frontend::BIND
                | frontend::DESCRIBE
                | frontend::EXECUTE
                | frontend::CLOSE
        );
        if extended && (self.client_skipping || self.pending.skipping_to_sync) {
            return Ok(Flow::Continue);
        }
        let result = match tag {
            frontend::QUERY => self.on_query(message).await,
            frontend::PARSE => self.on_parse(message).await,
            frontend::BIND => self.on_bind(message).await,
            frontend::DESCRIBE => self.on_describe(message).await,
            frontend::CLOSE => self.on_close(message).await,
            frontend::EXECUTE => self.on_execute(message).await,
            frontend::SYNC => self.on_sync(message),
            frontend::FLUSH => {
                self.send(&message.raw);
                Ok(())
            }
            frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {
                self.send(&message.raw);
                Ok(())
            }
            frontend::FUNCTION_CALL => self.forward(&message.raw, Request::Query).await,
            frontend::TERMINATE => return Ok(Flow::Close),
            other => {
                self.write_error(
                    Severity::Fatal,
                    "08P01",
                    &format!("invalid frontend message type {:?}", other as char),
                );
                return Ok(Flow::Close);
            }
        };
        if let Err(malformed) = result {
            self.write_error(Severity::Fatal, "08P01", &malformed);
            return Ok(Flow::Close);
        }
        self.flush_if_large().await?;
        Ok(Flow::Continue)
    }

    async fn flush_if_large(&mut self) -> std::io::Result<()> {
        let queued = self.server.as_ref().map_or(0, |s| s.conn.queued_len());
        if queued >= FLUSH_THRESHOLD {
            if let Some(checkout) = &mut self.server {
                if let Err(err) = checkout.conn.flush().await {
                    tracing::debug!(error = %err, "server write failed");
                }
            }
        }
        if self.out.len() >= FLUSH_THRESHOLD {
            self.flush_client().await?;
        }
        Ok(())
    }

    /// Forwards a message as it is, attaching a server first.
    async fn forward(&mut self, raw: &[u8], request: Request) -> Result<(), String> {
        let simple = request.ends_with_ready();
        if let Err(error) = self.ensure_server().await {
            self.fail_request(error, simple);
            return Ok(());
        }
        self.send(raw);
        self.expect(Expected::Forward(request));
        Ok(())
    }

    /// Forwards a simple Query. With `may_queue` (its SQL is one plain
    /// statement) it may go behind another client's Query on a busy server
    /// connection, and have another client's go behind it.
    async fn forward_query(&mut self, raw: &[u8], may_queue: bool) -> Result<(), String> {
        let queueable =
            may_queue && self.queueing_enabled() && self.pending.is_empty() && !self.unsynced;
        let offer = queueable.then_some(pipeline::Offer {
            bytes: raw,
            statement: None,
        });
        let sent = match self.ensure_server_sending(offer).await {
            Ok(sent) => sent,
            Err(error) => {
                self.fail_request(error, true);
                return Ok(());
            }
        };
        if !sent {
            self.send(raw);
        }
        self.expect(Expected::Forward(Request::Query));
        // A Query that went ahead has most likely run already, so another
        // one written behind it now would find the server asleep.
        if queueable && !sent && self.pending.len() == 1 {
            self.queue_next_behind();
        }
        Ok(())
    }

    /// True when requests may be queued behind each other: transaction
    /// mode with `pipeline_queries` on.
    fn queueing_enabled(&self) -> bool {
        self.mode == PoolMode::Transaction && self.pooler.config().pipeline_queries
    }

    /// True when the extended-protocol batch just ended by a Sync may have
    /// another client's request queued behind it. The batch must be one
    /// Bind of a plain prepared statement, perhaps a portal Describe, and
    /// one Execute. Only a Parse or Close that skiff sent may come with it.
    fn batch_may_queue(&self) -> bool {
        if !self.queueing_enabled()
            || self.pooler.capture.is_some()
            || self.client_skipping
            || self.pending.skipping_to_sync
        {
            return false;
        }
        if !self.bind_after_ready {
            return false;
        }
        let (mut binds, mut executes) = (0, 0);
        for expected in self.pending.iter() {
            match expected {
                Expected::Forward(Request::Bind {
                    statement: Some(statement),
                }) if statement.may_queue && !statement.changes_session_state => binds += 1,
                Expected::Forward(Request::Describe { statement: None })
                | Expected::Forward(Request::Sync)
                | Expected::Injected(Request::Parse { .. } | Request::Close) => {}
                Expected::Forward(Request::Execute) => executes += 1,
                _ => return false,
            }
        }
        binds == 1 && executes == 1
    }

    /// Writes the Query of the client that has waited longest behind this
    /// client's, when the server connection is outside a transaction and
    /// no cancel request for this client is on its way.
    fn queue_next_behind(&mut self) {
        let Some(checkout) = &mut self.server else {
            return;
        };
        let conn = &mut checkout.conn;
        if conn.tx_status != b'I' {
            return;
        }
        // Read before the cancel state: a cancel request that starts after
        // this read counts, and one under way now stops the queueing.
        let cancels = conn.cancel_key.cancels.load(Ordering::Acquire);
        if self.cancel.cancel_pending() {
            return;
        }
        self.pool.queue_behind(conn, cancels);
    }

    /// Answers a request skiff could not send with an error: a simple query
    /// also gets ReadyForQuery, an extended one skips to the next Sync.
    fn fail_request(&mut self, error: bytes::Bytes, simple: bool) {
        self.expect(Expected::Local(error));
        if simple {
            let ready = protocol::ready_for_query(self.tx_status());
            self.expect(Expected::Local(ready));
        } else {
            self.client_skipping = true;
        }
    }

    async fn on_query(&mut self, message: Message) -> Result<(), String> {
        self.pool.count_query();
        let body = message.body();
        let end = body
            .iter()
            .position(|&byte| byte == 0)
            .ok_or("malformed Query message")?;
        let sql = &body[..end];
        let changes_session_state = mentions_session_state(sql);
        if changes_session_state {
            self.session_state_changed = true;
        }
        let may_queue = pipeline::statement_may_queue(sql, |_| changes_session_state);
        match classify_statement_sql(sql) {
            StatementSql::DeallocateAll => self.statements.clear(),
            StatementSql::Deallocate(name) if self.statements.contains_key(&name) => {
                self.statements.remove(&name);
                let reply = [
                    protocol::command_complete("DEALLOCATE"),
                    protocol::ready_for_query(self.tx_status()),
                ]
                .concat();
                self.expect(Expected::Local(reply.into()));
                return Ok(());
            }
            _ => {}
        }
        if self.pooler.capture.is_some() {
            // Clients may use any server encoding, so bytes that are not
            // UTF-8 are replaced in the text capture inspects.
            let text = String::from_utf8_lossy(sql);
            if let Some(reply) = self.capture_query(&text).await {
                self.expect(Expected::Local(reply));
                return Ok(());
            }
        }
        self.forward_query(&message.raw, may_queue).await
    }

    async fn on_execute(&mut self, message: Message) -> Result<(), String> {
        self.pool.count_query();
        let mut body = message.body();
        let portal = read_cstr(&mut body).ok_or("malformed Execute message")?;
        if let Some(reply) = self.execute_diverted(portal).await {
            let failed = reply.first() == Some(&backend::ERROR_RESPONSE);
            self.expect(Expected::Local(reply));
            self.client_skipping = failed;
            return Ok(());
        }
        self.forward(&message.raw, Request::Execute).await
    }

    /// Marks the server connection for a reset before another client uses
    /// it when SQL can change session state without a SET command tag:
    /// set_config(), advisory locks, temporary tables and held cursors.
    /// Returns true when the SQL may change session state, so that later
    /// Executes of the statement mark the connection too.
    fn note_session_state_sql(&mut self, sql: &str) -> bool {
        let mentioned = mentions_session_state(sql.as_bytes());
        if mentioned {
            self.session_state_changed = true;
        }
        mentioned
    }

    fn tracking(&self) -> bool {
        self.pooler.config().max_prepared_statements > 0
    }

    async fn on_parse(&mut self, message: Message) -> Result<(), String> {
        let parse = Parse::decode(&message).map_err(|e| e.to_string())?;
        let changes_session_state = self.note_session_state_sql(&parse.query);
        if parse.name.is_empty() {
            self.unnamed_changes_session_state = changes_session_state;
        }
        if let (Some(hook), Some(capture)) = (&self.pooler.capture, &mut self.capture) {
            if parse.name.is_empty() || !self.statements.contains_key(&parse.name) {
                let (database, types) = (&self.database, &parse.param_types);
                capture.on_parse(hook, database, &parse.name, &parse.query, types);
            }
        }
        if parse.name.is_empty() || !self.tracking() {
            let request = Request::Parse {
                statement: None,
                client_name: None,
            };
            return self.forward(&message.raw, request).await;
        }
        if self.tx_status() == b'E' {
            // PostgreSQL rejects every Parse in a failed transaction.
            let request = Request::Parse {
                statement: None,
                client_name: None,
            };
            return self.forward(&message.raw, request).await;
        }
        if self.statements.contains_key(&parse.name) {
            let text = format!("prepared statement \"{}\" already exists", parse.name);
            self.fail_request(
                protocol::error_response(Severity::Error, "42P05", &text),
                false,
            );
            return Ok(());
        }
        if self.statements.len() >= MAX_CLIENT_STATEMENTS {
            let text = format!(
                "too many prepared statements on this connection (limit {MAX_CLIENT_STATEMENTS})"
            );
            self.fail_request(
                protocol::error_response(Severity::Error, "53400", &text),
                false,
            );
            return Ok(());
        }
        let search_path = self.settings.get("search_path").map(String::as_str);
        let statements = &self.pooler.statements;
        let may_queue =
            pipeline::statement_may_queue(parse.query.as_bytes(), mentions_session_state);
        let statement = statements.intern(&parse, search_path, changes_session_state, may_queue);
        if self.pool.is_validated(&statement.name) && self.tx_status() != b'E' {
            // A server of this pool parsed the same statement before, so the
            // Parse is answered now and sent to a server only when a Bind or
            // Describe needs it there. In a failed transaction it goes to
            // the server, which rejects it as PostgreSQL would.
            self.statements.insert(parse.name.clone(), statement);
            self.expect(Expected::LocalStatement {
                reply: protocol::empty_message(backend::PARSE_COMPLETE),
                undo: Undo::Forget {
                    client_name: parse.name,
                },
            });
            return Ok(());
        }
        if let Err(error) = self.ensure_server().await {
            self.fail_request(error, false);
            return Ok(());
        }
        self.statements
            .insert(parse.name.clone(), statement.clone());
        let conn = &mut self.server.as_mut().expect("server attached").conn;
        if conn.statements.touch(&statement.name) {
            let reply = protocol::empty_message(backend::PARSE_COMPLETE);
            self.expect(Expected::Local(reply));
        } else {
            let request = Request::Parse {
                statement: Some(statement.name.clone()),
                client_name: Some(parse.name),
            };
            self.prepare_on_server(&statement, Expected::Forward(request));
        }
        Ok(())
    }

    /// Sends a statement's Parse to the attached server, closing the
    /// statement the server cache evicts for it.
    fn prepare_on_server(&mut self, statement: &Statement, expected: Expected) {
        let conn = &mut self.server.as_mut().expect("server attached").conn;
        let mut closes = Vec::new();
        if conn.needs_close.remove(&statement.name) {
            closes.push(statement.name.clone());
        }
        if let Some(evicted) = conn.statements.insert(&statement.name) {
            closes.push(evicted);
        }
        for name in closes {
            self.send(&protocol::close(TARGET_STATEMENT, &name));
            self.expect(Expected::Injected(Request::Close));
        }
        self.send(&statement.parse);
        self.expect(expected);
    }

    /// Prepares a statement on the attached server unless it is there.
    fn ensure_prepared(&mut self, statement: &Arc<Statement>) {
        let conn = &mut self.server.as_mut().expect("server attached").conn;
        if !conn.statements.touch(&statement.name) {
            let request = Request::Parse {
                statement: Some(statement.name.clone()),
                client_name: None,
            };
            self.prepare_on_server(statement, Expected::Injected(request));
        }
    }

    async fn on_bind(&mut self, message: Message) -> Result<(), String> {
        let bind = Bind::decode(&message).map_err(|e| e.to_string())?;
        if self.capture_bind(bind.statement, bind.portal, bind.rest) {
            let reply = protocol::empty_message(backend::BIND_COMPLETE);
            self.expect(Expected::Local(reply));
            return Ok(());
        }
        let statement = match bind.statement {
            "" => None,
            name => self.statements.get(name).cloned(),
        };
        // Nothing since the last ReadyForQuery: the batch this Bind starts
        // runs outside any transaction the client opened.
        self.bind_after_ready = self.pending.is_empty() && !self.unsynced;
        // A server connection reset since the Parse loses the state again.
        // NOTE: a named statement that skiff does not track (with
        // max_prepared_statements = 0) is not checked here.
        let changes_session_state = match &statement {
            Some(statement) => statement.changes_session_state,
            None => bind.statement.is_empty() && self.unnamed_changes_session_state,
        };
        if changes_session_state {
            self.session_state_changed = true;
        }
        let Some(statement) = statement.filter(|_| self.tracking()) else {
            let request = Request::Bind { statement: None };
            return self.forward(&message.raw, request).await;
        };
        // A Bind, Execute and Sync of one plain statement, buffered whole,
        // may be queued behind another client's request while this client
        // waits.
        let batch = self.queueable_batch(&bind, &statement);
        let offer = batch.as_ref().map(|(bytes, _)| pipeline::Offer {
            bytes,
            statement: Some(&statement.name),
        });
        let sent = match self.ensure_server_sending(offer).await {
            Ok(sent) => sent,
            Err(error) => {
                self.fail_request(error, false);
                return Ok(());
            }
        };
        if sent {
            // The connection had the statement when the Bind was queued,
            // and nothing may go to the server after the Bind now. The
            // messages after the Bind went with it.
            if let Some(checkout) = &mut self.server {
                checkout.conn.statements.touch(&statement.name);
            }
            self.sent_ahead = batch.map_or(0, |(_, after)| after);
            self.batch_sent_ahead = true;
        } else {
            self.ensure_prepared(&statement);
            if let Some(checkout) = &mut self.server {
                bind.encode_with_statement(&statement.name, checkout.conn.out_mut());
            }
        }
        self.expect(Expected::Forward(Request::Bind {
            statement: Some(statement),
        }));
        Ok(())
    }

    /// Returns the server's bytes of a Bind of `statement` with the
    /// Describe, Execute and Sync buffered after it, and the count of those
    /// messages, when they may be queued behind another client's request.
    /// That takes one plain statement, the unnamed portal, and nothing else
    /// before the Sync.
    fn queueable_batch(&self, bind: &Bind, statement: &Statement) -> Option<(BytesMut, usize)> {
        let queueable = self.queueing_enabled()
            && self.pooler.capture.is_none()
            && statement.may_queue
            && !statement.changes_session_state
            && bind.portal.is_empty()
            && self.server.is_none()
            && self.pending.is_empty()
            && !self.unsynced;
        if !queueable {
            return None;
        }
        let after = self.reader.peek_to(frontend::SYNC)?;
        let plain = match after.as_slice() {
            [describe, execute, _sync] => {
                describe[0] == frontend::DESCRIBE
                    && &describe[5..] == b"P\0"
                    && execute[0] == frontend::EXECUTE
                    && execute.get(5) == Some(&0)
            }
            [execute, _sync] => execute[0] == frontend::EXECUTE && execute.get(5) == Some(&0),
            _ => false,
        };
        if !plain {
            return None;
        }
        let mut bytes = BytesMut::new();
        bind.encode_with_statement(&statement.name, &mut bytes);
        for message in &after {
            bytes.extend_from_slice(message);
        }
        Some((bytes, after.len()))
    }

    async fn on_describe(&mut self, message: Message) -> Result<(), String> {
        let target = Target::decode(&message).map_err(|e| e.to_string())?;
        if target.kind == TARGET_PORTAL && self.is_diverted_portal(&target.name) {
            // A diverted INSERT or UPDATE returns no rows.
            self.expect(Expected::Local(protocol::empty_message(backend::NO_DATA)));
            return Ok(());
        }
        let captured = target.kind == TARGET_STATEMENT
            && self
                .capture
                .as_ref()
                .is_some_and(|c| c.has_plan(&target.name));
        let request = Request::Describe {
            statement: captured.then(|| target.name.clone()),
        };
        let statement = if target.kind == TARGET_STATEMENT && !target.name.is_empty() {
            self.statements.get(&target.name).cloned()
        } else {
            None
        };
        let Some(statement) = statement.filter(|_| self.tracking()) else {
            return self.forward(&message.raw, request).await;
        };
        if let Err(error) = self.ensure_server().await {
            self.fail_request(error, false);
            return Ok(());
        }
        self.ensure_prepared(&statement);
        self.send(&target.encode_as(frontend::DESCRIBE, &statement.name));
        self.expect(Expected::Forward(request));
        Ok(())
    }

    async fn on_close(&mut self, message: Message) -> Result<(), String> {
        let target = Target::decode(&message).map_err(|e| e.to_string())?;
        let named_statement = target.kind == TARGET_STATEMENT && !target.name.is_empty();
        if named_statement {
            if let Some(capture) = &mut self.capture {
                capture.forget(&target.name);
            }
        }
        if named_statement && self.tracking() {
            // The server keeps the statement for other clients; only this
            // client's name goes away.
            let reply = protocol::empty_message(backend::CLOSE_COMPLETE);
            match self.statements.remove(&target.name) {
                Some(statement) => self.expect(Expected::LocalStatement {
                    reply,
                    undo: Undo::Restore {
                        client_name: target.name,
                        statement,
                    },
                }),
                None => self.expect(Expected::Local(reply)),
            }
            return Ok(());
        }
        if self.server.is_none() {
            // Portals and the unnamed statement do not outlive a
            // transaction, so without a server there is nothing to close.
            let reply = protocol::empty_message(backend::CLOSE_COMPLETE);
            self.expect(Expected::Local(reply));
            return Ok(());
        }
        self.send(&message.raw);
        self.expect(Expected::Forward(Request::Close));
        Ok(())
    }

    fn on_sync(&mut self, message: Message) -> Result<(), String> {
        self.client_skipping = false;
        if self.server.is_some() {
            self.send(&message.raw);
            self.expect(Expected::Forward(Request::Sync));
            let sent_ahead = std::mem::take(&mut self.batch_sent_ahead);
            if !sent_ahead && self.batch_may_queue() {
                self.queue_next_behind();
            }
        } else {
            let ready = protocol::ready_for_query(b'I');
            self.expect(Expected::Local(ready));
        }
        Ok(())
    }
}

/// Words whose presence in SQL means it may change session state without a
/// SET command tag: set_config(), advisory locks, temporary tables, held
/// cursors and LISTEN. Each is at least `PREFIX` bytes long, and no two end
/// their first `PREFIX` bytes with the same byte.
const SESSION_STATE_HINTS: [&[u8]; 5] = [b"set_config", b"advisory", b"temp", b"hold", b"listen"];

/// Length of the hint prefixes the scan compares first.
const PREFIX: usize = 4;

/// For each byte, in either case: how far a `PREFIX`-byte window whose last
/// byte it is can move before a hint's prefix could fit it, or, when it
/// ends a hint's prefix, 0 and that hint's index in `SKIP_HINT`.
const SKIP: [u8; 256] = skip_table().0;
const SKIP_HINT: [u8; 256] = skip_table().1;

const fn skip_table() -> ([u8; 256], [u8; 256]) {
    let mut skip = [PREFIX as u8; 256];
    let mut hint_of = [0u8; 256];
    let mut hint = 0;
    while hint < SESSION_STATE_HINTS.len() {
        let mut at = 0;
        while at < PREFIX {
            let byte = SESSION_STATE_HINTS[hint][at];
            let distance = (PREFIX - 1 - at) as u8;
            let mut case = 0;
            while case < 2 {
                let key = if case == 0 {
                    byte
                } else {
                    byte.to_ascii_uppercase()
                } as usize;
                if distance == 0 {
                    assert!(
                        skip[key] != 0 || hint_of[key] as usize == hint,
                        "two hints end their prefixes with one byte"
                    );
                    hint_of[key] = hint as u8;
                }
                if distance < skip[key] {
                    skip[key] = distance;
                }
                case += 1;
            }
            at += 1;
        }
        hint += 1;
    }
    (skip, hint_of)
}

/// Checks for any of the hints, ignoring ASCII case. It runs on every
/// Query, so it looks at the last byte of a `PREFIX`-byte window and skips
/// as far as that byte allows (Horspool's method for several words, which
/// works here because a byte ends the prefix of at most one hint).
fn mentions_session_state(sql: &[u8]) -> bool {
    let mut end = PREFIX - 1;
    while end < sql.len() {
        let last = sql[end] as usize;
        let skip = SKIP[last];
        if skip != 0 {
            end += skip as usize;
            continue;
        }
        let hint = SESSION_STATE_HINTS[SKIP_HINT[last] as usize];
        let start = end + 1 - PREFIX;
        let matched = sql
            .get(start..start + hint.len())
            .is_some_and(|window| window.eq_ignore_ascii_case(hint));
        if matched {
            return true;
        }
        end += 1;
    }
    false
}

/// Simple-protocol statements that change prepared statements.
#[derive(Debug, PartialEq, Eq)]
enum StatementSql {
    /// `DEALLOCATE [PREPARE] ALL` or `DISCARD ALL`.
    DeallocateAll,
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate(String),
    Other,
}

/// Classifies a simple Query's SQL. Most queries are distinguished by their
/// first keyword alone, so only DISCARD and DEALLOCATE are split into words.
fn classify_statement_sql(sql: &[u8]) -> StatementSql {
    let start = sql
        .iter()
        .position(|byte| !byte.is_ascii_whitespace())
        .unwrap_or(sql.len());
    let first = &sql[start..];
    let starts_with = |keyword: &[u8]| {
        first
            .get(..keyword.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(keyword))
    };
    if !starts_with(b"discard") && !starts_with(b"deallocate") {
        return StatementSql::Other;
    }
    classify_statement_words(&String::from_utf8_lossy(sql))
}

fn classify_statement_words(sql: &str) -> StatementSql {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = trimmed.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    match upper
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["DISCARD", "ALL"] | ["DEALLOCATE", "ALL"] | ["DEALLOCATE", "PREPARE", "ALL"] => {
            StatementSql::DeallocateAll
        }
        ["DEALLOCATE", _] => StatementSql::Deallocate(unquote(words[1])),
        ["DEALLOCATE", "PREPARE", _] => StatementSql::Deallocate(unquote(words[2])),
        _ => StatementSql::Other,
    }
}

/// Applies SQL identifier rules: quoted names keep their case, others fold
/// to lower case.
fn unquote(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_hints() {
        assert!(mentions_session_state(
            b"SELECT set_config('work_mem', '8MB', false)"
        ));
        assert!(mentions_session_state(b"CREATE TEMP TABLE t (a int)"));
        assert!(mentions_session_state(b"select PG_ADVISORY_LOCK(1)"));
        assert!(mentions_session_state(b"LISTEN jobs"));
        assert!(mentions_session_state(
            b"declare c cursor with Hold for select 1"
        ));
        assert!(!mentions_session_state(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        ));
        assert!(!mentions_session_state(b"select 'tem'"));
        assert!(!mentions_session_state(b""));
        assert!(!mentions_session_state(b"t"));
        assert!(mentions_session_state(b"TEMP"));
        assert!(!mentions_session_state(b"select 'hol'"));
        assert!(mentions_session_state(b"x temporary"));
        assert!(mentions_session_state(b"select pg_try_advisory_lock(1)"));
        assert!(!mentions_session_state(b"select 'set_conf'"));
        assert!(!mentions_session_state(b"adv"));
    }

    /// The skipping scan agrees with a plain search at every offset, in
    /// both cases, with each hint cut short and whole.
    #[test]
    fn session_state_scan_matches_plain_search() {
        let plain = |sql: &[u8]| {
            SESSION_STATE_HINTS.iter().any(|hint| {
                sql.windows(hint.len())
                    .any(|window| window.eq_ignore_ascii_case(hint))
            })
        };
        // Random strings over the hints' own letters, so near misses abound.
        let letters = b"setconfigadvisorytemphldlisn_ SETAD";
        let mut seed = 0x2545_f491_u32;
        for _ in 0..20_000 {
            let mut sql = Vec::new();
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            for _ in 0..(seed >> 16) % 24 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                sql.push(letters[(seed >> 16) as usize % letters.len()]);
            }
            assert_eq!(mentions_session_state(&sql), plain(&sql), "{sql:?}");
        }
        for hint in SESSION_STATE_HINTS {
            for cut in 1..=hint.len() {
                for pad in 0..6 {
                    for upper in [false, true] {
                        let mut sql = b"x t_l".repeat(pad);
                        let part = &hint[..cut];
                        if upper {
                            sql.extend(part.to_ascii_uppercase());
                        } else {
                            sql.extend_from_slice(part);
                        }
                        sql.extend_from_slice(&b"dpi"[..pad % 4]);
                        assert_eq!(mentions_session_state(&sql), plain(&sql), "{sql:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn classifies_deallocate_forms() {
        assert_eq!(
            classify_statement_sql(b"discard all;"),
            StatementSql::DeallocateAll
        );
        assert_eq!(
            classify_statement_sql(b" DEALLOCATE PREPARE ALL "),
            StatementSql::DeallocateAll
        );
        assert_eq!(
            classify_statement_sql(b"deallocate \"Stmt1\""),
            StatementSql::Deallocate("Stmt1".into())
        );
        assert_eq!(
            classify_statement_sql(b"DEALLOCATE PREPARE S2"),
            StatementSql::Deallocate("s2".into())
        );
        assert_eq!(classify_statement_sql(b"select 1"), StatementSql::Other);
        assert_eq!(
            classify_statement_sql(b"\n\tdiscard ALL"),
            StatementSql::DeallocateAll
        );
        assert_eq!(classify_statement_sql(b"DISCARD TEMP"), StatementSql::Other);
    }
}
