//! The file sink: one NDJSON file per logstore, `{logstore}.ndjson`, rotated
//! to `{logstore}.{n}.ndjson` (n counting up from 1) when it reaches
//! `max_file_bytes`. A batch counts as delivered once its lines are fsynced.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;

use super::SendError;
use crate::logship::proto::LogGroup;
use crate::logship::spool::SpooledBatch;

/// Writes batches as NDJSON lines.
pub struct FileSink {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_file_bytes: u64,
    files: Mutex<HashMap<String, OpenFile>>,
}

struct OpenFile {
    file: File,
    bytes: u64,
}

impl FileSink {
    /// Creates the sink, creating `dir` if needed.
    pub fn new(dir: &Path, max_file_bytes: u64) -> io::Result<FileSink> {
        fs::create_dir_all(dir)?;
        Ok(FileSink {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                max_file_bytes,
                files: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Appends the batch's records to its logstore's file and fsyncs it.
    pub async fn send(&self, batch: &SpooledBatch) -> Result<(), SendError> {
        let group = LogGroup::decode(batch.log_group.clone())
            .map_err(|err| SendError::Rejected(format!("batch is not a valid LogGroup: {err}")))?;
        let mut text = String::new();
        for log in &group.logs {
            text.push_str(&ndjson_line(&group, log));
            text.push('\n');
        }
        let inner = self.inner.clone();
        let logstore = batch.header.key.logstore.clone();
        tokio::task::spawn_blocking(move || inner.append(&logstore, text.as_bytes()))
            .await
            .map_err(|err| SendError::Retryable(format!("file sink task failed: {err}")))?
            .map_err(|err| SendError::Retryable(format!("file sink: {err}")))
    }
}

impl Inner {
    fn append(&self, logstore: &str, data: &[u8]) -> io::Result<()> {
        let mut files = self.files.lock();
        if !files.contains_key(logstore) {
            files.insert(logstore.to_string(), self.open(logstore)?);
        }
        let open = files.get_mut(logstore).expect("inserted above");
        if open.bytes > 0 && open.bytes + data.len() as u64 > self.max_file_bytes {
            files.remove(logstore);
            self.rotate(logstore)?;
            files.insert(logstore.to_string(), self.open(logstore)?);
        }
        let open = files.get_mut(logstore).expect("inserted above");
        open.file.write_all(data)?;
        open.file.sync_data()?;
        open.bytes += data.len() as u64;
        Ok(())
    }

    fn active_path(&self, logstore: &str) -> PathBuf {
        self.dir.join(format!("{logstore}.ndjson"))
    }

    fn open(&self, logstore: &str) -> io::Result<OpenFile> {
        let path = self.active_path(logstore);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let bytes = file.metadata()?.len();
        Ok(OpenFile { file, bytes })
    }

    /// Renames the active file to the next free `{logstore}.{n}.ndjson`.
    fn rotate(&self, logstore: &str) -> io::Result<()> {
        let prefix = format!("{logstore}.");
        let mut last = 0u64;
        for item in fs::read_dir(&self.dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            let number = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".ndjson"))
                .and_then(|n| n.parse::<u64>().ok());
            last = last.max(number.unwrap_or(0));
        }
        let target = self.dir.join(format!("{logstore}.{}.ndjson", last + 1));
        fs::rename(self.active_path(logstore), &target)?;
        File::open(&self.dir)?.sync_all()?;
        tracing::info!(logstore, file = %target.display(), "file sink rotated");
        Ok(())
    }
}

/// Formats one record as a JSON object: `__time__`, `__time_ns__`, `__topic__`,
/// `__source__`, `__tag__:{key}` for each tag, then the contents in order.
fn ndjson_line(group: &LogGroup, log: &crate::logship::proto::Log) -> String {
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let mut fields = vec![
        format!("\"__time__\":{}", log.time),
        format!("\"__time_ns__\":{}", log.time_ns.unwrap_or(0)),
        format!(
            "\"__topic__\":{}",
            quote(group.topic.as_deref().unwrap_or(""))
        ),
        format!(
            "\"__source__\":{}",
            quote(group.source.as_deref().unwrap_or(""))
        ),
    ];
    for tag in &group.log_tags {
        fields.push(format!(
            "{}:{}",
            quote(&format!("__tag__:{}", tag.key)),
            quote(&tag.value)
        ));
    }
    for content in &log.contents {
        fields.push(format!("{}:{}", quote(&content.key), quote(&content.value)));
    }
    format!("{{{}}}", fields.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::proto::{Log, LogContent, LogTag};

    #[test]
    fn line_keeps_content_order_and_escapes() {
        let group = LogGroup {
            topic: Some("t".into()),
            source: Some("s".into()),
            log_tags: vec![LogTag {
                key: "k".into(),
                value: "v".into(),
            }],
            ..LogGroup::default()
        };
        let log = Log {
            time: 5,
            time_ns: Some(6),
            contents: vec![
                LogContent {
                    key: "z".into(),
                    value: "{\"a\":\"1\"}".into(),
                },
                LogContent {
                    key: "a".into(),
                    value: "line\nbreak".into(),
                },
            ],
        };
        let line = ndjson_line(&group, &log);
        assert_eq!(
            line,
            r#"{"__time__":5,"__time_ns__":6,"__topic__":"t","__source__":"s","__tag__:k":"v","z":"{\"a\":\"1\"}","a":"line\nbreak"}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["a"], "line\nbreak");
    }

    #[test]
    fn rotation_numbers_files_upward() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path(), 10).unwrap();
        for _ in 0..3 {
            sink.inner.append("ls", b"0123456789\n").unwrap();
        }
        assert!(dir.path().join("ls.1.ndjson").exists());
        assert!(dir.path().join("ls.2.ndjson").exists());
        assert_eq!(
            fs::read(dir.path().join("ls.ndjson")).unwrap(),
            b"0123456789\n"
        );
    }
}
