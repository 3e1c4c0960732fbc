//! Log-table capture in the PostgreSQL stream. Writes to the tables in
//! `[[logship.capture]]` become log records. In `mirror` mode they go to the
//! shipper once their transaction commits. In `divert` mode skiff
//! acknowledges them in place of PostgreSQL once they are durable in the
//! spool.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::counter;

use crate::logship::capture::{Capture, CaptureMode, CapturePlan, Format, Operation, Param};
use crate::logship::{Record, Shipper};

/// Captured rows one transaction may hold before skiff stops capturing it,
/// so a huge transaction cannot grow memory without bound.
pub const MAX_TRANSACTION_RECORDS: usize = 100_000;

/// The configured capture and the shipper records go to.
pub struct CaptureHook {
    pub capture: Capture,
    pub shipper: Shipper,
}

/// A statement skiff answers itself because its table is diverted.
pub struct Diverted {
    pub records: Vec<Record>,
    /// CommandComplete tag, such as `INSERT 0 3`.
    pub tag: String,
}

/// Capture state of one client session.
#[derive(Default)]
pub struct SessionCapture {
    /// Records of requests sent since the last ReadyForQuery.
    pub statement: Vec<Record>,
    /// Records of statements that completed in the open transaction.
    pub transaction: Vec<Record>,
    /// Capture plans of the client's statements by client name; `""` is
    /// the unnamed statement.
    plans: HashMap<String, (Arc<CapturePlan>, bool)>,
    /// Parameter type OIDs by client statement name, from Parse or from the
    /// server's ParameterDescription.
    param_types: HashMap<String, Vec<u32>>,
    /// Mirrored records of bound portals, waiting for their Execute.
    portals: HashMap<String, Vec<Record>>,
    /// Portals bound to a diverted statement.
    pub diverted_portals: HashMap<String, Diverted>,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    pub error_seen: bool,
    /// The last command tag was ROLLBACK.
    pub rolled_back: bool,
    /// The transaction outgrew `MAX_TRANSACTION_RECORDS`.
    overflowed: bool,
}

/// Counts a statement that names a captured table but was not captured.
pub fn count_skipped(reason: &'static str) {
    counter!("skiff_pg_capture_skipped_total", "reason" => reason).increment(1);
}

impl SessionCapture {
    /// Remembers the capture plan of a Parse, or forgets an old one.
    pub fn on_parse(
        &mut self,
        hook: &CaptureHook,
        database: &str,
        name: &str,
        sql: &str,
        types: &[u8],
    ) {
        self.plans.remove(name);
        self.param_types.remove(name);
        if !hook.capture.may_capture(database, sql) {
            return;
        }
        match hook.capture.prepare(database, sql) {
            Ok(Some(plan)) => {
                self.plans
                    .insert(name.to_string(), (Arc::new(plan), divertible(sql)));
                self.param_types
                    .insert(name.to_string(), decode_oids(types));
            }
            Ok(None) => {}
            Err(err) => {
                tracing::debug!(error = %err, "statement not captured");
                count_skipped("unsupported");
            }
        }
    }

    pub fn has_plan(&self, name: &str) -> bool {
        self.plans.contains_key(name)
    }

    pub fn forget(&mut self, name: &str) {
        self.plans.remove(name);
        self.param_types.remove(name);
    }

    /// Takes parameter types from the server's ParameterDescription where
    /// Parse left them unspecified.
    pub fn on_parameter_description(&mut self, name: &str, body: &[u8]) {
        if let Some(types) = self.param_types.get_mut(name) {
            let described = decode_oids(body);
            if described.len() >= types.len() {
                *types = described;
            }
        }
    }

    /// Builds records for a Bind of a captured statement. Returns the mode
    /// and records, or `None` when the statement is not captured or its
    /// parameters cannot be read.
    pub fn on_bind(
        &mut self,
        statement: &str,
        portal: &str,
        bind_rest: &[u8],
    ) -> Option<(CaptureMode, Vec<Record>, Operation)> {
        let (plan, sql_is_divertible) = self.plans.get(statement)?.clone();
        let types = self.param_types.get(statement).cloned().unwrap_or_default();
        let params = match decode_bind_params(bind_rest, &types) {
            Some(params) => params,
            None => {
                count_skipped("malformed_bind");
                return None;
            }
        };
        let records = match plan.records(&params, crate::logship::record::now_ns()) {
            Ok(records) => records,
            Err(err) => {
                tracing::debug!(error = %err, "bound statement not captured");
                count_skipped("unsupported");
                return None;
            }
        };
        let mode = if sql_is_divertible {
            plan.mode
        } else {
            CaptureMode::Mirror
        };
        if mode == CaptureMode::Mirror {
            self.portals.insert(portal.to_string(), records.clone());
        }
        Some((mode, records, plan.operation))
    }

    /// Moves a portal's mirrored records to the statement at Execute.
    pub fn on_execute(&mut self, portal: &str) {
        if let Some(records) = self.portals.remove(portal) {
            self.statement.extend(records);
        }
    }

    /// Settles captured records at ReadyForQuery; returns the records that
    /// committed and must be shipped now.
    pub fn on_ready(&mut self, status: u8) -> Vec<Record> {
        self.portals.clear();
        let failed = std::mem::take(&mut self.error_seen);
        let rolled_back = std::mem::take(&mut self.rolled_back);
        match status {
            b'T' => {
                let records = std::mem::take(&mut self.statement);
                self.add_to_transaction(records);
                Vec::new()
            }
            b'E' => {
                self.statement.clear();
                self.transaction.clear();
                Vec::new()
            }
            _ => {
                let mut committed = std::mem::take(&mut self.transaction);
                committed.append(&mut self.statement);
                let overflowed = std::mem::take(&mut self.overflowed);
                if failed || rolled_back || overflowed {
                    return Vec::new();
                }
                committed
            }
        }
    }

    /// Adds records to the open transaction, unless it grew too large.
    pub fn add_to_transaction(&mut self, records: Vec<Record>) -> bool {
        if self.overflowed {
            return false;
        }
        if self.transaction.len() + records.len() > MAX_TRANSACTION_RECORDS {
            tracing::warn!(
                limit = MAX_TRANSACTION_RECORDS,
                "transaction captures too many rows; its rows are not shipped"
            );
            count_skipped("transaction_too_large");
            self.transaction.clear();
            self.overflowed = true;
            return false;
        }
        self.transaction.extend(records);
        true
    }
}

/// Builds the CommandComplete tag PostgreSQL sends for `rows` rows.
pub fn command_tag(operation: Operation, rows: usize) -> String {
    match operation {
        Operation::Insert => format!("INSERT 0 {rows}"),
        Operation::Update => format!("UPDATE {rows}"),
    }
}

/// True when skiff may answer a statement itself: RETURNING needs rows
/// that only PostgreSQL can produce.
pub fn divertible(sql: &str) -> bool {
    !sql.to_ascii_lowercase().contains("returning")
}

fn decode_oids(body: &[u8]) -> Vec<u32> {
    if body.len() < 2 {
        return Vec::new();
    }
    let count = i16::from_be_bytes([body[0], body[1]]).max(0) as usize;
    body[2..]
        .chunks_exact(4)
        .take(count)
        .map(|chunk| u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect()
}

/// Reads the parameters of a Bind body after its portal and statement names.
fn decode_bind_params<'a>(mut rest: &'a [u8], types: &[u32]) -> Option<Vec<Param<'a>>> {
    let format_count = take_i16(&mut rest)?.max(0) as usize;
    let mut formats = Vec::with_capacity(format_count);
    for _ in 0..format_count {
        formats.push(take_i16(&mut rest)?);
    }
    let param_count = take_i16(&mut rest)?.max(0) as usize;
    let mut params = Vec::with_capacity(param_count);
    for index in 0..param_count {
        let length = take_i32(&mut rest)?;
        let value = if length < 0 {
            None
        } else {
            let length = length as usize;
            if rest.len() < length {
                return None;
            }
            let (value, tail) = rest.split_at(length);
            rest = tail;
            Some(value)
        };
        let code = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => *formats.get(index)?,
        };
        params.push(Param {
            type_oid: types.get(index).copied().unwrap_or(0),
            format: if code == 1 {
                Format::Binary
            } else {
                Format::Text
            },
            value,
        });
    }
    Some(params)
}

fn take_i16(rest: &mut &[u8]) -> Option<i16> {
    let (head, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    Some(i16::from_be_bytes(*head))
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_be_bytes(*head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_params_with_one_format_for_all() {
        let mut rest = Vec::new();
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&2i16.to_be_bytes());
        rest.extend_from_slice(&4i32.to_be_bytes());
        rest.extend_from_slice(&7i32.to_be_bytes());
        rest.extend_from_slice(&(-1i32).to_be_bytes());
        rest.extend_from_slice(&0i16.to_be_bytes());
        let params = decode_bind_params(&rest, &[23, 25]).unwrap();
        assert_eq!(params.len(), 2);
        assert_eq!(params[0].type_oid, 23);
        assert_eq!(params[0].format, Format::Binary);
        assert_eq!(params[0].value, Some(&7i32.to_be_bytes()[..]));
        assert_eq!(params[1].value, None);
    }

    #[test]
    fn truncated_bind_is_rejected() {
        let rest = [0u8, 0, 0, 1, 0, 0, 0, 9, b'x'];
        assert!(decode_bind_params(&rest, &[]).is_none());
    }

    #[test]
    fn rollback_drops_and_commit_ships() {
        let record = || Record::new("logstore", 1, vec![("k".into(), "v".into())]);
        let mut capture = SessionCapture::default();
        capture.statement.push(record());
        assert!(capture.on_ready(b'T').is_empty());
        capture.rolled_back = true;
        assert!(capture.on_ready(b'I').is_empty());

        capture.statement.push(record());
        assert!(capture.on_ready(b'T').is_empty());
        capture.statement.push(record());
        assert_eq!(capture.on_ready(b'I').len(), 2);

        capture.statement.push(record());
        capture.error_seen = true;
        assert!(capture.on_ready(b'I').is_empty());
    }

    #[test]
    fn returning_is_not_divertible() {
        assert!(divertible("INSERT INTO t (a) VALUES (1)"));
        assert!(!divertible("insert into t (a) values (1) RETURNING id"));
    }
}
