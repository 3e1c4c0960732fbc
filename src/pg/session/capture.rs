//! The session's side of log-table capture: captures rows from Query and
//! Bind messages, and replies to diverted statements without PostgreSQL.

use bytes::Bytes;
use metrics::counter;

use super::Session;
use crate::logship::capture::{Capture, CaptureMode};
use crate::logship::Record;
use crate::pg::capture::{command_tag, count_skipped, divertible, Diverted};
use crate::pg::protocol::{self, backend, Severity};

/// SQLSTATE and message PostgreSQL sends for a command in a failed
/// transaction.
const IN_FAILED_TRANSACTION: (&str, &str) = (
    "25P02",
    "current transaction is aborted, commands ignored until end of transaction block",
);

impl Session {
    /// Captures the rows of a simple Query. Returns skiff's own reply when
    /// the Query is one diverted statement; `None` means forward it.
    pub(super) async fn capture_query(&mut self, sql: &str) -> Option<Bytes> {
        let hook = self.pooler.capture.clone()?;
        if !hook.capture.may_capture(&self.database, sql) {
            return None;
        }
        let now = crate::logship::record::now_ns();
        let captured = match hook.capture.capture_query(&self.database, sql, now) {
            Ok(captured) => captured,
            Err(err) => {
                tracing::debug!(error = %err, "query not captured");
                count_skipped("unsupported");
                return None;
            }
        };
        if captured.is_empty() {
            return None;
        }
        let single = captured.len() == 1 && Capture::statement_count(sql).ok() == Some(1);
        let (plan, _) = &captured[0];
        if single
            && plan.mode == CaptureMode::Divert
            && divertible(sql)
            && !self.pending.awaits_server()
        {
            let (plan, records) = captured.into_iter().next().expect("one statement");
            let tag = command_tag(plan.operation, records.len());
            let mut reply = self.divert(records, &tag).await;
            reply.extend_from_slice(&protocol::ready_for_query(self.tx_status()));
            return Some(reply.into());
        }
        let capture = self.capture.as_mut()?;
        for (plan, records) in captured {
            if plan.mode == CaptureMode::Divert {
                count_skipped("not_divertible");
            }
            count_rows("mirror", records.len());
            capture.statement.extend(records);
        }
        None
    }

    /// Records a diverted statement: shipped now outside a transaction, at
    /// COMMIT inside one. Returns CommandComplete, or an ErrorResponse.
    async fn divert(&mut self, records: Vec<Record>, tag: &str) -> Vec<u8> {
        let status = self.tx_status();
        let rows = records.len();
        let outcome = match status {
            b'E' => Err(IN_FAILED_TRANSACTION),
            b'T' => {
                let capture = self.capture.as_mut().expect("capture is configured");
                if capture.add_to_transaction(records) {
                    Ok(())
                } else {
                    Err(("53400", "transaction captures too many rows to divert"))
                }
            }
            _ => {
                let hook = self.pooler.capture.clone().expect("capture is configured");
                match hook.shipper.submit(records).await {
                    Ok(()) => Ok(()),
                    Err(err) => {
                        tracing::warn!(error = %err, "diverted rows not accepted by the spool");
                        return protocol::error_response(
                            Severity::Error,
                            "53400",
                            &format!("diverted rows were not stored: {err}"),
                        )
                        .to_vec();
                    }
                }
            }
        };
        match outcome {
            Ok(()) => {
                count_rows("divert", rows);
                protocol::command_complete(tag).to_vec()
            }
            Err((code, message)) => {
                protocol::error_response(Severity::Error, code, message).to_vec()
            }
        }
    }

    /// Captures the rows of a Bind. Returns true when skiff answered the
    /// Bind itself because its statement is diverted.
    pub(super) fn capture_bind(&mut self, statement: &str, portal: &str, rest: &[u8]) -> bool {
        let awaits_server = self.pending.awaits_server();
        let Some(capture) = self.capture.as_mut() else {
            return false;
        };
        if !capture.has_plan(statement) {
            return false;
        }
        let Some((mode, records, operation)) = capture.on_bind(statement, portal, rest) else {
            return false;
        };
        if mode == CaptureMode::Mirror || awaits_server {
            if mode == CaptureMode::Divert {
                count_skipped("not_divertible");
            }
            count_rows("mirror", records.len());
            return false;
        }
        let tag = command_tag(operation, records.len());
        capture
            .diverted_portals
            .insert(portal.to_string(), Diverted { records, tag });
        true
    }

    /// True when `portal` is bound to a diverted statement.
    pub(super) fn is_diverted_portal(&self, portal: &str) -> bool {
        self.capture
            .as_ref()
            .is_some_and(|c| c.diverted_portals.contains_key(portal))
    }

    /// Answers Execute of a diverted portal; `None` when it is not one.
    pub(super) async fn execute_diverted(&mut self, portal: &str) -> Option<Bytes> {
        let capture = self.capture.as_mut()?;
        let Some(diverted) = capture.diverted_portals.remove(portal) else {
            capture.on_execute(portal);
            return None;
        };
        let reply = self.divert(diverted.records, &diverted.tag).await;
        Some(reply.into())
    }

    /// Notes server replies that decide whether captured rows commit.
    pub(super) fn capture_observe(&mut self, tag: u8, body: &[u8]) {
        let Some(capture) = self.capture.as_mut() else {
            return;
        };
        match tag {
            backend::ERROR_RESPONSE => capture.error_seen = true,
            backend::COMMAND_COMPLETE => capture.rolled_back = body.starts_with(b"ROLLBACK\0"),
            _ => {}
        }
    }

    /// Ships the rows a transaction committed, before the client sees its
    /// ReadyForQuery.
    pub(super) async fn capture_settle(&mut self, status: u8) {
        let Some(capture) = self.capture.as_mut() else {
            return;
        };
        if status == b'I' {
            capture.diverted_portals.clear();
        }
        let committed = capture.on_ready(status);
        if committed.is_empty() {
            return;
        }
        let hook = self.pooler.capture.clone().expect("capture is configured");
        let rows = committed.len() as u64;
        if let Err(err) = hook.shipper.submit(committed).await {
            // NOTE: the commit already succeeded, so the client is not told.
            // Mirrored rows are still in PostgreSQL; diverted rows committed
            // in an explicit transaction are lost unless on_full = "block".
            tracing::warn!(error = %err, rows, "committed rows not accepted by the spool");
            counter!("skiff_pg_capture_unshipped_rows_total").increment(rows);
        }
    }
}

fn count_rows(mode: &'static str, rows: usize) {
    counter!("skiff_pg_captured_rows_total", "mode" => mode).increment(rows as u64);
}
