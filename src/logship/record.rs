//! Log records: what sources submit, and the key that groups them into log
//! groups.

use super::proto::{Log, LogContent, LogTag};

/// SLS accepts at most this many raw bytes in one PutLogs request.
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// SLS accepts at most this many logs in one PutLogs request.
pub const MAX_REQUEST_LOGS: usize = 4096;

/// One log record on its way to a logstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Destination project; `None` means the sink's configured project.
    pub project: Option<String>,
    pub logstore: String,
    pub topic: String,
    pub source: String,
    /// Tags of the log group the record belongs to.
    pub tags: Vec<(String, String)>,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Contents in order; keys may repeat, as SLS allows.
    pub contents: Vec<(String, String)>,
}

impl Record {
    /// Creates a record with no topic, source or tags, for the sink's
    /// configured project.
    pub fn new(logstore: impl Into<String>, time_ns: u64, contents: Vec<(String, String)>) -> Self {
        Record {
            project: None,
            logstore: logstore.into(),
            topic: String::new(),
            source: String::new(),
            tags: Vec::new(),
            time_ns,
            contents,
        }
    }

    /// Returns the key of the log group this record belongs to.
    pub fn group_key(&self) -> GroupKey {
        GroupKey {
            project: self.project.clone(),
            logstore: self.logstore.clone(),
            topic: self.topic.clone(),
            source: self.source.clone(),
            tags: self.tags.clone(),
        }
    }

    /// Converts the record into its protobuf log, leaving the group fields.
    pub fn into_log(self) -> Log {
        Log {
            time: u32::try_from(self.time_ns / 1_000_000_000).unwrap_or(u32::MAX),
            time_ns: Some((self.time_ns % 1_000_000_000) as u32),
            contents: self
                .contents
                .into_iter()
                .map(|(key, value)| LogContent { key, value })
                .collect(),
        }
    }

    /// Splits the record into its group key and protobuf log without
    /// copying the strings.
    pub fn into_key_and_log(mut self) -> (GroupKey, Log) {
        let key = GroupKey {
            project: self.project.take(),
            logstore: std::mem::take(&mut self.logstore),
            topic: std::mem::take(&mut self.topic),
            source: std::mem::take(&mut self.source),
            tags: std::mem::take(&mut self.tags),
        };
        (key, self.into_log())
    }
}

/// Key of a log group: the fields that records in one group share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct GroupKey {
    pub project: Option<String>,
    pub logstore: String,
    pub topic: String,
    pub source: String,
    pub tags: Vec<(String, String)>,
}

impl GroupKey {
    /// Checks whether `record` belongs to this log group.
    pub fn matches(&self, record: &Record) -> bool {
        self.logstore == record.logstore
            && self.project == record.project
            && self.topic == record.topic
            && self.source == record.source
            && self.tags == record.tags
    }

    /// Converts the group's tags to protobuf tags.
    pub fn log_tags(&self) -> Vec<LogTag> {
        self.tags
            .iter()
            .map(|(key, value)| LogTag {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

/// Checks a logstore name against SLS's naming rule: 2 to 63 characters of
/// lowercase letters, digits, `-` and `_`, starting and ending with a letter
/// or digit. The rule also keeps the name safe as a file name.
pub fn validate_logstore(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_';
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if bytes.len() < 2 || bytes.len() > 63 {
        return Err(format!(
            "invalid logstore name {name:?}: length must be 2 to 63"
        ));
    }
    if !bytes.iter().all(allowed) || !edge(bytes.first()) || !edge(bytes.last()) {
        return Err(format!(
            "invalid logstore name {name:?}: use lowercase letters, digits, '-' and '_', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Current time in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn into_log_splits_seconds_and_nanoseconds() {
        let record = Record::new(
            "ls",
            1_700_000_000_123_456_789,
            vec![("k".into(), "v".into())],
        );
        let log = record.into_log();
        assert_eq!(log.time, 1_700_000_000);
        assert_eq!(log.time_ns, Some(123_456_789));
        assert_eq!(log.contents[0].key, "k");
    }

    #[test]
    fn into_key_and_log_keeps_group_fields() {
        let mut record = Record::new("ls", 1_000_000_007, vec![("k".into(), "v".into())]);
        record.topic = "t".into();
        record.tags = vec![("tag".into(), "x".into())];
        let expected_key = record.group_key();
        assert!(expected_key.matches(&record));
        let (key, log) = record.clone().into_key_and_log();
        assert_eq!(key, expected_key);
        assert_eq!(log, record.into_log());
    }

    #[test]
    fn group_key_matches_only_its_group() {
        let record = Record::new("ls", 0, vec![]);
        let key = record.group_key();
        let mut other = record.clone();
        other.source = "10.0.0.1".into();
        assert!(key.matches(&record));
        assert!(!key.matches(&other));
    }

    #[test]
    fn logstore_names() {
        assert!(validate_logstore("workflow_node_execution").is_ok());
        assert!(validate_logstore("a1").is_ok());
        assert!(validate_logstore("../etc").is_err());
        assert!(validate_logstore("Upper").is_err());
        assert!(validate_logstore("x").is_err());
        assert!(validate_logstore("-leading").is_err());
        assert!(validate_logstore(&"a".repeat(64)).is_err());
    }
}
