//! The dead-letter file: batches a sink rejected for good, one JSON line
//! per batch with the error and every record, in `dead-letter.ndjson` under
//! the spool directory.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::json;

use super::proto::LogGroup;
use super::record::now_ns;
use super::spool::SpooledBatch;

/// File name of the dead-letter file inside the spool directory.
pub const FILE_NAME: &str = "dead-letter.ndjson";

/// Appends rejected batches to the dead-letter file.
// NOTE: the file is not rotated or bounded; only batches that SLS rejected
// for good land here, and an operator is expected to clear it.
pub struct DeadLetter {
    path: PathBuf,
}

impl DeadLetter {
    /// Creates the writer for the dead-letter file in `spool_dir`.
    pub fn new(spool_dir: &Path) -> DeadLetter {
        DeadLetter {
            path: spool_dir.join(FILE_NAME),
        }
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line for `batch` and fsyncs it. Blocking.
    pub fn append(&self, batch: &SpooledBatch, error: &str) -> io::Result<()> {
        let key = &batch.header.key;
        let records = match LogGroup::decode(batch.log_group.clone()) {
            Ok(group) => group
                .logs
                .iter()
                .map(|log| {
                    let contents: Vec<[&str; 2]> = log
                        .contents
                        .iter()
                        .map(|c| [c.key.as_str(), c.value.as_str()])
                        .collect();
                    let time_ns =
                        u64::from(log.time) * 1_000_000_000 + u64::from(log.time_ns.unwrap_or(0));
                    json!({ "time_ns": time_ns, "contents": contents })
                })
                .collect::<Vec<_>>(),
            Err(err) => vec![json!({ "undecodable_log_group": err.to_string() })],
        };
        let line = json!({
            "dead_lettered_at_ns": now_ns(),
            "error": error,
            "project": key.project,
            "logstore": key.logstore,
            "topic": key.topic,
            "source": key.source,
            "tags": key.tags,
            "records": records,
        });
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(format!("{line}\n").as_bytes())?;
        file.sync_data()
    }
}
