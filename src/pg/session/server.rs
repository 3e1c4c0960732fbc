//! Messages from the server: passed to the client, dropped when they answer
//! skiff's own requests, and watched for state skiff must track.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Flow, Session, FLUSH_THRESHOLD};
use crate::config::PoolMode;
use crate::pg::params::{self, Settings};
use crate::pg::pending::{Expected, Request, Undo};
use crate::pg::protocol::{backend, read_cstr, ErrorFields, Message};

/// SQLSTATE of "cached plan must not change result type".
const CACHED_PLAN_CHANGED: &str = "0A000";

impl Session {
    pub(super) async fn on_server_message(&mut self, message: Message) -> std::io::Result<Flow> {
        let tag = message.tag();
        match tag {
            backend::NOTICE_RESPONSE | backend::NOTIFICATION_RESPONSE => {
                self.write(&message.raw);
                return self.after_write().await;
            }
            backend::PARAMETER_STATUS => {
                self.track_parameter(&message);
                self.write(&message.raw);
                return self.after_write().await;
            }
            _ => {}
        }
        self.emit_due_replies();
        // Look at the front slot without cloning it: this runs for every
        // row of every result.
        let (forward, completes, is_execute) = match self.pending.front() {
            None => return self.on_unexpected(message).await,
            Some(Expected::Forward(request)) => (
                true,
                request.completed_by(tag),
                *request == Request::Execute,
            ),
            Some(Expected::Injected(request)) => (
                false,
                request.completed_by(tag),
                *request == Request::Execute,
            ),
            Some(Expected::Local(_) | Expected::LocalStatement { .. }) => {
                unreachable!("due replies were emitted")
            }
        };
        self.capture_observe(tag, message.body());
        if tag == backend::ERROR_RESPONSE {
            let request = match self.pending.front() {
                Some(Expected::Forward(request) | Expected::Injected(request)) => request.clone(),
                _ => unreachable!("the front slot awaits the server"),
            };
            self.write(&message.raw);
            self.on_error(&message, &request);
            self.emit_due_replies();
            return self.after_write().await;
        }
        match tag {
            backend::COMMAND_COMPLETE => self.track_command(&message),
            backend::COPY_IN_RESPONSE if is_execute => {
                self.pending.drop_syncs_after_front();
            }
            backend::PARAMETER_DESCRIPTION => self.take_parameter_types(&message),
            _ => {}
        }
        if forward {
            self.write(&message.raw);
        }
        if completes {
            if let Some(Expected::Forward(request) | Expected::Injected(request)) =
                self.pending.pop()
            {
                if let Request::Parse {
                    statement: Some(name),
                    ..
                } = &request
                {
                    self.pool.mark_validated(name);
                }
            }
            if tag == backend::READY_FOR_QUERY {
                self.on_ready(&message).await;
            }
            self.emit_due_replies();
        }
        self.after_write().await
    }

    /// Keeps the parameter types of a captured statement from the server's
    /// ParameterDescription.
    fn take_parameter_types(&mut self, message: &Message) {
        let Some(Expected::Forward(Request::Describe {
            statement: Some(name),
        })) = self.pending.front()
        else {
            return;
        };
        if let Some(capture) = &mut self.capture {
            capture.on_parameter_description(name, message.body());
        }
    }

    async fn after_write(&mut self) -> std::io::Result<Flow> {
        if self.out.len() >= FLUSH_THRESHOLD {
            self.flush_client().await?;
        }
        Ok(Flow::Continue)
    }

    /// A message that answers nothing skiff sent: a server that is going
    /// away (FATAL) or a protocol mix-up; either way the connection is not
    /// trusted any more.
    async fn on_unexpected(&mut self, message: Message) -> std::io::Result<Flow> {
        let detail = if message.tag() == backend::ERROR_RESPONSE {
            ErrorFields::parse(message.body()).message
        } else {
            format!("unexpected message type {:?}", message.tag() as char)
        };
        let err = crate::pg::backend::BackendError::Protocol {
            addr: self.pool.target().address(),
            source: crate::pg::protocol::ProtocolError::Io(std::io::Error::other(detail)),
        };
        self.server_lost(err).await
    }

    fn on_error(&mut self, message: &Message, request: &Request) {
        if request.ends_with_ready() {
            // A simple query or Sync goes on to ReadyForQuery after errors.
            return;
        }
        let fields = ErrorFields::parse(message.body());
        if fields.code == CACHED_PLAN_CHANGED {
            if let Request::Bind {
                statement: Some(statement),
            } = request
            {
                let conn = &mut self.server.as_mut().expect("server attached").conn;
                conn.statements.remove(&statement.name);
                conn.needs_close.insert(statement.name.clone());
            }
        }
        if let Some(failed) = self.pending.pop() {
            self.undo(failed);
        }
        for skipped in self.pending.skip_to_sync() {
            self.undo(skipped);
        }
    }

    /// Forgets statements whose Parse failed or was skipped by the server,
    /// and reverts skiff's own replies that the server would have skipped.
    fn undo(&mut self, expected: Expected) {
        let request = match expected {
            Expected::Forward(request) | Expected::Injected(request) => request,
            Expected::LocalStatement { undo, .. } => {
                match undo {
                    Undo::Forget { client_name } => {
                        self.statements.remove(&client_name);
                    }
                    Undo::Restore {
                        client_name,
                        statement,
                    } => {
                        self.statements.insert(client_name, statement);
                    }
                }
                return;
            }
            Expected::Local(_) => return,
        };
        let Request::Parse {
            statement: Some(name),
            client_name,
        } = request
        else {
            return;
        };
        if let Some(checkout) = &mut self.server {
            checkout.conn.statements.remove(&name);
        }
        self.pool.forget_validated(&name);
        if let Some(client_name) = client_name {
            if self
                .statements
                .get(&client_name)
                .is_some_and(|s| s.name == name)
            {
                self.statements.remove(&client_name);
            }
        }
    }

    async fn on_ready(&mut self, message: &Message) {
        let status = message.body().first().copied().unwrap_or(b'I');
        self.unsynced = false;
        self.capture_settle(status).await;
        let Some(checkout) = &mut self.server else {
            return;
        };
        checkout.conn.tx_status = status;
        // One clock read serves both durations.
        let now = Instant::now();
        // The query and the transaction mostly start with the same request,
        // so their durations are the same and computed once.
        let mut query_elapsed = None;
        if !self.pending.awaits_server() {
            if let Some(started) = self.query_started.take() {
                let elapsed = now.duration_since(started);
                query_elapsed = Some((started, elapsed));
                self.pool
                    .stats
                    .query_us
                    .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
            }
        }
        if status != b'I' || self.pending.awaits_server() || self.pending.skipping_to_sync {
            return;
        }
        if let Some(started) = self.transaction_started.take() {
            let elapsed = match query_elapsed {
                Some((query_started, elapsed)) if query_started == started => elapsed,
                _ => now.duration_since(started),
            };
            let elapsed = elapsed.as_micros() as u64;
            let stats = &self.pool.stats;
            stats.transaction_us.fetch_add(elapsed, Ordering::Relaxed);
        }
        self.pool.count_transaction();
        if self.mode == PoolMode::Transaction {
            self.release().await;
        }
    }

    /// Follows changes the client made to reported settings, so they go with
    /// it to the next server connection.
    fn track_parameter(&mut self, message: &Message) {
        let mut body = message.body();
        let (Some(name), Some(value)) = (read_cstr(&mut body), read_cstr(&mut body)) else {
            return;
        };
        let lowercase = name.to_lowercase();
        if params::reported_name(&lowercase).is_none() {
            return;
        }
        Arc::make_mut(&mut self.settings).insert(lowercase.clone(), value.to_string());
        if let Some(checkout) = &mut self.server {
            Arc::make_mut(&mut checkout.conn.applied).insert(lowercase, value.to_string());
        }
    }

    /// Watches command tags that change session state on the server.
    fn track_command(&mut self, message: &Message) {
        // The tag is matched as bytes: the tags tracked here are ASCII, so
        // skipping the UTF-8 check of every CommandComplete changes nothing.
        let body = message.body();
        let Some(end) = body.iter().position(|&byte| byte == 0) else {
            return;
        };
        let tag = &body[..end];
        let Some(checkout) = &mut self.server else {
            return;
        };
        let conn = &mut checkout.conn;
        match tag {
            b"RESET" => {
                // RESET returns settings to their session defaults, which for
                // this client are its startup settings, not the server's.
                // NOTE: RESET of one setting also reverts the others.
                conn.dirty_by = Some(self.id);
                conn.applied = Settings::default();
                self.settings = self.startup_settings.clone();
            }
            b"SET" | b"LISTEN" | b"DECLARE CURSOR" => conn.dirty_by = Some(self.id),
            // A DO block may run SET or LISTEN through EXECUTE, which sends
            // no tag of its own.
            // NOTE: functions and procedures can do the same unseen.
            b"DO" => conn.dirty_by = Some(self.id),
            b"PREPARE" => {
                conn.dirty_by = Some(self.id);
                conn.sql_prepared = true;
            }
            // The tags also come from SQL that the Query check misses, such
            // as one after a comment or another statement, so the client's
            // statements go too.
            b"DISCARD ALL" => {
                conn.statements.clear();
                conn.applied = Settings::default();
                conn.dirty_by = Some(self.id);
                self.statements.clear();
            }
            b"DEALLOCATE ALL" => {
                conn.statements.clear();
                self.statements.clear();
            }
            _ => {}
        }
    }
}
