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

/// Appends rejected batches to the dead-letter file, up to `max_bytes`.
/// Past the bound `append` fails, so the batch stays in the spool and the
/// spool's own bound applies: nothing is dropped.
pub struct DeadLetter {
    path: PathBuf,
    max_bytes: u64,
}

impl DeadLetter {
    /// Creates the writer for the dead-letter file in `spool_dir`.
    pub fn new(spool_dir: &Path, max_bytes: u64) -> DeadLetter {
        DeadLetter {
            path: spool_dir.join(FILE_NAME),
            max_bytes,
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
        let line = format!("{line}\n");
        let current = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if current + line.len() as u64 > self.max_bytes {
            return Err(io::Error::other(format!(
                "dead-letter file is full (max_dead_letter_bytes = {}); move it away to accept more",
                self.max_bytes
            )));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(line.as_bytes())?;
        file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::record::GroupKey;
    use crate::logship::spool::BatchHeader;

    fn batch() -> SpooledBatch {
        SpooledBatch {
            seq: 1,
            header: BatchHeader {
                key: GroupKey {
                    project: None,
                    logstore: "workflow_node_execution".into(),
                    topic: String::new(),
                    source: String::new(),
                    tags: Vec::new(),
                },
                records: 0,
                created_ns: 0,
            },
            log_group: bytes::Bytes::new(),
        }
    }

    #[test]
    fn full_file_rejects_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let dead_letter = DeadLetter::new(dir.path(), 600);
        dead_letter.append(&batch(), "400 PostBodyInvalid").unwrap();
        let size = std::fs::metadata(dead_letter.path()).unwrap().len();
        assert!(size < 600, "one line is {size} bytes");
        let mut appended = 1;
        let err = loop {
            match dead_letter.append(&batch(), "400 PostBodyInvalid") {
                Ok(()) => appended += 1,
                Err(err) => break err,
            }
            assert!(appended < 100, "the bound was never reached");
        };
        assert!(err.to_string().contains("max_dead_letter_bytes"), "{err}");
        assert!(std::fs::metadata(dead_letter.path()).unwrap().len() <= 600);
    }
}
