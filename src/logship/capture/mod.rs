//! Capture: turns INSERTs and primary-key UPDATEs of configured tables into
//! log records, one per row, from the SQL text that passes through the pooler
//! (and, for the extended protocol, the Bind parameters). Pure functions, no I/O.
//!
//! Each record has one content per column written, in statement order.
//! JSON columns keep their JSON text. SLS has no NULL, so a NULL column gets
//! an empty value, for INSERT and UPDATE alike: an UPDATE that sets a column
//! to NULL then differs from one that leaves it out, whose record lacks the
//! key. DEFAULT columns are left out, because the value that PostgreSQL
//! fills in is not in the statement. Then come `__table__`, `__op__`
//! (`insert` or `update`) and `log_version`, the capture time in
//! nanoseconds, so readers can keep the latest version per id.
//!
//! Use from the pooler:
//! 1. [`Capture::new`] once from `[[logship.capture]]`.
//! 2. For a simple Query: [`Capture::capture_query`].
//! 3. For Parse: [`Capture::prepare`], kept with the statement; for each
//!    Bind: [`CapturePlan::records`] with the parameters.
//!
//! Both steps start with [`Capture::may_capture`], a substring test that
//! skips parsing for statements that cannot touch a captured table.

mod binary;
mod lexer;
mod parser;

use crate::config::CaptureConfig;
use crate::logship::record::Record;

pub use binary::{Format, Param};
pub use parser::Operation;
use parser::{Statement, TableName, Value};

/// Reason a statement that names a captured table could not be captured.
/// The pooler should pass such a statement to PostgreSQL uncaptured (also
/// in `divert` mode) and count it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error("capture: syntax error: {0}")]
    Syntax(String),
    #[error("capture: unsupported statement form: {0}")]
    Unsupported(String),
    #[error("capture: INSERT without a column list; name the columns")]
    MissingColumnList,
    #[error("capture: row {row} has {values} values for {columns} columns")]
    ColumnCountMismatch {
        row: usize,
        columns: usize,
        values: usize,
    },
    #[error("capture: parameter ${0} is referenced but was not bound")]
    MissingParam(usize),
    #[error("capture: parameter ${index}: {reason}")]
    InvalidParam { index: usize, reason: String },
    #[error(
        "capture: parameter ${index} has type OID {oid}, which binary format does not support here"
    )]
    UnsupportedType { index: usize, oid: u32 },
}

/// `[[logship.capture]] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// The statement still goes to PostgreSQL.
    Mirror,
    /// skiff acknowledges the statement and never sends it to PostgreSQL.
    Divert,
}

/// One configured table.
#[derive(Debug, Clone)]
struct Target {
    database: String,
    schema: Option<String>,
    table: String,
    logstore: String,
    mode: CaptureMode,
    primary_key: String,
}

/// The configured capture targets.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    targets: Vec<Target>,
}

/// A parsed statement of a captured table, ready to produce records.
#[derive(Debug, Clone)]
pub struct CapturePlan {
    pub logstore: String,
    pub mode: CaptureMode,
    pub operation: Operation,
    table: String,
    rows: Vec<Vec<(String, Value)>>,
}

impl Capture {
    /// Builds the capture from `[[logship.capture]]` entries.
    pub fn new(configs: &[CaptureConfig]) -> Capture {
        let targets = configs
            .iter()
            .map(|config| {
                let (schema, table) = match config.table.split_once('.') {
                    Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
                    None => (None, config.table.clone()),
                };
                Target {
                    database: config.database.clone(),
                    schema,
                    table,
                    logstore: config.logstore.clone(),
                    mode: if config.mode == "divert" {
                        CaptureMode::Divert
                    } else {
                        CaptureMode::Mirror
                    },
                    primary_key: config.primary_key.clone(),
                }
            })
            .collect();
        Capture { targets }
    }

    /// Checks whether no table is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Checks cheaply whether `sql` could write a captured table of
    /// `database`: it must contain `insert` or `update` and a captured
    /// table's name (ASCII case-insensitive). False means: do not parse.
    pub fn may_capture(&self, database: &str, sql: &str) -> bool {
        let bytes = sql.as_bytes();
        let mut names = self
            .targets
            .iter()
            .filter(|t| t.database == database)
            .peekable();
        if names.peek().is_none() {
            return false;
        }
        (contains_ignore_case(bytes, b"insert") || contains_ignore_case(bytes, b"update"))
            && names.any(|t| contains_ignore_case(bytes, t.table.as_bytes()))
    }

    /// Counts the statements of a simple Query, as `;` separates them.
    pub fn statement_count(sql: &str) -> Result<usize, CaptureError> {
        let tokens = lexer::tokenize(sql)?;
        Ok(tokens
            .split(|t| t.kind == lexer::TokenKind::Punct(';'))
            .filter(|statement| !statement.is_empty())
            .count())
    }

    /// Parses a statement from a Parse message. `Ok(None)` means the
    /// statement does not write a captured table.
    pub fn prepare(&self, database: &str, sql: &str) -> Result<Option<CapturePlan>, CaptureError> {
        if !self.may_capture(database, sql) {
            return Ok(None);
        }
        let tokens = lexer::tokenize(sql)?;
        let end = tokens
            .iter()
            .position(|t| t.kind == lexer::TokenKind::Punct(';'))
            .unwrap_or(tokens.len());
        if tokens[end..].len() > 1 {
            return Err(CaptureError::Unsupported(
                "several statements in one Parse".into(),
            ));
        }
        self.plan(database, &tokens[..end], sql)
    }

    /// Captures every statement of a simple Query (statements separated by
    /// `;`) that writes a captured table, with literal values only.
    /// `now_ns` is the capture time in nanoseconds since the Unix epoch.
    pub fn capture_query(
        &self,
        database: &str,
        sql: &str,
        now_ns: u64,
    ) -> Result<Vec<(CapturePlan, Vec<Record>)>, CaptureError> {
        if !self.may_capture(database, sql) {
            return Ok(Vec::new());
        }
        let tokens = lexer::tokenize(sql)?;
        let mut captured = Vec::new();
        for statement in tokens.split(|t| t.kind == lexer::TokenKind::Punct(';')) {
            if let Some(plan) = self.plan(database, statement, sql)? {
                let records = plan.records(&[], now_ns)?;
                captured.push((plan, records));
            }
        }
        Ok(captured)
    }

    fn plan(
        &self,
        database: &str,
        tokens: &[lexer::Token],
        sql: &str,
    ) -> Result<Option<CapturePlan>, CaptureError> {
        let Some(statement) = parser::parse(tokens, sql)? else {
            return Ok(None);
        };
        let Some(target) = self.find(database, &statement.table) else {
            return Ok(None);
        };
        Ok(Some(target.plan(statement)?))
    }

    fn find(&self, database: &str, table: &TableName) -> Option<&Target> {
        self.targets.iter().find(|t| {
            let schema_matches = match (&t.schema, &table.schema) {
                (Some(configured), Some(written)) => configured == written,
                (Some(configured), None) => configured == "public",
                (None, Some(written)) => written == "public",
                (None, None) => true,
            };
            t.database == database && t.table == table.name && schema_matches
        })
    }
}

impl Target {
    fn plan(&self, statement: Statement) -> Result<CapturePlan, CaptureError> {
        let mut rows = statement.rows;
        if let Some((column, value)) = statement.key {
            if column != self.primary_key {
                return Err(CaptureError::Unsupported(format!(
                    "UPDATE whose WHERE clause pins {column:?}, not the primary key {:?}",
                    self.primary_key
                )));
            }
            let row = &mut rows[0];
            row.retain(|(name, _)| *name != column);
            row.insert(0, (column, value));
        }
        Ok(CapturePlan {
            logstore: self.logstore.clone(),
            mode: self.mode,
            operation: statement.operation,
            table: self.table.clone(),
            rows,
        })
    }
}

impl CapturePlan {
    /// Produces one record per row with `params` bound (empty for a simple
    /// Query). `now_ns` stamps the records and `log_version`.
    pub fn records(&self, params: &[Param<'_>], now_ns: u64) -> Result<Vec<Record>, CaptureError> {
        let mut resolved: Vec<Option<Option<String>>> = vec![None; params.len()];
        let mut records = Vec::with_capacity(self.rows.len());
        for row in &self.rows {
            let mut contents = Vec::with_capacity(row.len() + 3);
            for (column, value) in row {
                let text = match value {
                    Value::Literal(text) => Some(text.clone()),
                    Value::Null => Some(String::new()),
                    Value::Default => None,
                    Value::Now => Some(now_text(now_ns)),
                    Value::Param(n) => {
                        let param = params.get(n - 1).ok_or(CaptureError::MissingParam(*n))?;
                        let slot = &mut resolved[n - 1];
                        if slot.is_none() {
                            *slot = Some(binary::param_text(*n, param)?);
                        }
                        // A NULL parameter is NULL too.
                        Some(slot.clone().flatten().unwrap_or_default())
                    }
                };
                if let Some(text) = text {
                    contents.push((column.clone(), text));
                }
            }
            contents.push(("__table__".to_string(), self.table.clone()));
            contents.push(("__op__".to_string(), self.operation.as_str().to_string()));
            contents.push(("log_version".to_string(), now_ns.to_string()));
            records.push(Record::new(self.logstore.clone(), now_ns, contents));
        }
        Ok(records)
    }
}

/// Formats the capture time as PostgreSQL prints a UTC timestamp.
fn now_text(now_ns: u64) -> String {
    let micros = (now_ns / 1_000) as i64 - 946_684_800_000_000;
    binary::timestamp_text(micros, "")
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests;
