//! `[logship]`: batching, spooling and delivery of log records.

use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// `[logship]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogshipConfig {
    /// Directory of the durable spool. Default `./skiff-spool`.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// A batch is flushed at least this often. Default 2s.
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    /// A batch is flushed when its raw size reaches this many bytes.
    /// Default 524288.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// A batch is flushed when it holds this many records. Default 4096.
    #[serde(default = "default_max_batch_count")]
    pub max_batch_count: usize,
    /// SLS sink; without it records go to the file sink.
    pub sls: Option<SlsConfig>,
    /// File sink.
    pub file: Option<FileSinkConfig>,
    /// SLS PutLogs-compatible endpoint.
    pub ingest: Option<IngestConfig>,
    /// Tables whose INSERTed rows become log records.
    #[serde(default)]
    pub capture: Vec<CaptureConfig>,
}

/// `[logship.sls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlsConfig {
    /// Region endpoint such as `cn-hangzhou.log.aliyuncs.com`, or a URL.
    pub endpoint: String,
    /// SLS project.
    pub project: String,
    pub access_key_id: String,
    pub access_key_secret: String,
}

/// `[logship.file]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Directory of the NDJSON files. Default `./skiff-logs`.
    #[serde(default = "default_file_path")]
    pub path: String,
}

/// `[logship.ingest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// HTTP listener address. Default `127.0.0.1:9931`.
    #[serde(default = "default_ingest_listen")]
    pub listen: String,
}

/// `[[logship.capture]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Database name as clients connect to it.
    pub database: String,
    /// Table name, optionally schema-qualified.
    pub table: String,
    /// Destination logstore.
    pub logstore: String,
    /// `mirror` or `divert`. Default `mirror`.
    #[serde(default = "default_capture_mode")]
    pub mode: String,
}

impl LogshipConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.max_batch_count == 0 || self.max_batch_count > 4096 {
            return Err("[logship] max_batch_count must be between 1 and 4096".into());
        }
        if self.max_batch_bytes == 0 || self.max_batch_bytes > 5 * 1024 * 1024 {
            return Err("[logship] max_batch_bytes must be between 1 and 5242880".into());
        }
        for capture in &self.capture {
            if capture.mode != "mirror" && capture.mode != "divert" {
                return Err(format!(
                    "[[logship.capture]] table {:?}: mode must be \"mirror\" or \"divert\"",
                    capture.table
                ));
            }
        }
        Ok(())
    }
}

fn default_spool_dir() -> String {
    "./skiff-spool".into()
}
fn default_linger() -> Duration {
    Duration::from_secs(2)
}
fn default_max_batch_bytes() -> usize {
    524288
}
fn default_max_batch_count() -> usize {
    4096
}
fn default_file_path() -> String {
    "./skiff-logs".into()
}
fn default_ingest_listen() -> String {
    "127.0.0.1:9931".into()
}
fn default_capture_mode() -> String {
    "mirror".into()
}
