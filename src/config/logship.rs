//! `[logship]`: batching, spooling and delivery of log records.

use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// `[logship]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogshipConfig {
    /// Directory of the durable spool. Default `./skiff-spool`.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Maximum time spooled records wait for more records of their log
    /// group before they are sent. Sources do not wait for it: their
    /// records are accepted once written to the spool. Default 2s.
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    /// Upper bound of a batch's and a request's raw (uncompressed) size in
    /// bytes. Once a group has this much spooled, its request is sent
    /// without waiting for `linger`. Default 524288.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Upper bound of the records in a batch and in a request. Once a group
    /// has this many spooled, its request is sent without waiting for
    /// `linger`. Default 4096.
    #[serde(default = "default_max_batch_count")]
    pub max_batch_count: usize,
    /// Upper bound of the spool on disk, in bytes. Default 1073741824 (1 GiB).
    #[serde(default = "default_max_spool_bytes")]
    pub max_spool_bytes: u64,
    /// Upper bound of the dead-letter file, in bytes. Once it is reached,
    /// rejected batches stay in the spool until an operator moves the file
    /// away. Default 1073741824 (1 GiB).
    #[serde(default = "default_max_spool_bytes")]
    pub max_dead_letter_bytes: u64,
    /// Behavior of a full spool towards new records: `block` makes the
    /// source wait for room, `reject` fails the submission with an error.
    /// Default `block`.
    #[serde(default)]
    pub on_full: OnFull,
    /// On shutdown, how long delivery of spooled batches may go on before
    /// the rest is left in the spool for the next start. Default 5s.
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
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

/// `[logship.sls]`. Its `Debug` output leaves out the secret and the token.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlsConfig {
    /// Region endpoint such as `cn-hangzhou.log.aliyuncs.com`, or a URL.
    pub endpoint: String,
    /// SLS project.
    pub project: String,
    /// AccessKey ID that signs requests.
    pub access_key_id: String,
    /// AccessKey secret that signs requests; never logged.
    pub access_key_secret: String,
    /// STS security token sent as `x-acs-security-token`; never logged.
    pub security_token: Option<String>,
    /// Request signature: `v1` (HMAC-SHA1) or `v4` (SLS4-HMAC-SHA256, needs
    /// `region`). Default `v1`.
    #[serde(default)]
    pub signature: SignatureVersion,
    /// Region such as `cn-hangzhou`, used in the V4 signing scope.
    pub region: Option<String>,
    /// Timeout of one PutLogs request, connect included. Default 30s.
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// First delay before a failed batch is sent again; it doubles on each
    /// failure. Default 100ms.
    #[serde(default = "default_retry_initial_backoff", with = "duration")]
    pub retry_initial_backoff: Duration,
    /// Cap of the delay between attempts. Default 50s.
    #[serde(default = "default_retry_max_backoff", with = "duration")]
    pub retry_max_backoff: Duration,
}

/// `[logship] on_full`: what a full spool does to new records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// The source waits until delivery frees room.
    #[default]
    Block,
    /// The submission fails with an error that names the limit.
    Reject,
}

/// `[logship.sls] signature`: how PutLogs requests are signed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureVersion {
    /// `LOG {ak}:{signature}` with HMAC-SHA1.
    #[default]
    V1,
    /// `SLS4-HMAC-SHA256` with a region scope.
    V4,
}

/// `[logship.file]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Directory of the NDJSON files. Default `./skiff-logs`.
    #[serde(default = "default_file_path")]
    pub path: String,
    /// A logstore's file is rotated when it reaches this many bytes.
    /// Default 104857600 (100 MiB).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
}

impl Default for FileSinkConfig {
    fn default() -> Self {
        FileSinkConfig {
            path: default_file_path(),
            max_file_bytes: default_max_file_bytes(),
        }
    }
}

/// `[logship.ingest]`. Its `Debug` output leaves out the secret.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// HTTP listener address. Default `127.0.0.1:9931`.
    #[serde(default = "default_ingest_listen")]
    pub listen: String,
    /// AccessKey ID clients sign with; default `[logship.sls]`'s.
    pub access_key_id: Option<String>,
    /// AccessKey secret clients sign with; default `[logship.sls]`'s.
    pub access_key_secret: Option<String>,
    /// Largest request body accepted, compressed or not, in bytes.
    /// Default 10485760 (10 MiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests handled at once; more wait for a turn before their body is
    /// read, which bounds ingest memory to about this times
    /// `max_body_bytes`. Default 64.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Open client connections at once; more wait to be accepted.
    /// Default 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection that sends and receives nothing for this long is
    /// closed, so idle clients cannot hold every connection slot.
    /// Default 60s.
    #[serde(default = "default_ingest_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// Time a request has for its headers (from their first byte), and
    /// then for its turn and its whole body. A late body gets 408, a
    /// request that found no free slot in time 503, and late headers close
    /// the connection. This keeps clients that send a few bytes at a time
    /// from holding connections and request slots for good. Default 60s.
    #[serde(default = "default_ingest_body_timeout", with = "duration")]
    pub body_timeout: Duration,
}

fn default_ingest_body_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_ingest_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

impl std::fmt::Debug for SlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlsConfig")
            .field("endpoint", &self.endpoint)
            .field("project", &self.project)
            .field("access_key_id", &self.access_key_id)
            .field("signature", &self.signature)
            .field("region", &self.region)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for IngestConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestConfig")
            .field("listen", &self.listen)
            .field("access_key_id", &self.access_key_id)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("max_connections", &self.max_connections)
            .field("idle_timeout", &self.idle_timeout)
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

/// `[[logship.capture]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// Column that an UPDATE's WHERE clause must pin for the UPDATE to be
    /// captured. Default `id`.
    #[serde(default = "default_primary_key")]
    pub primary_key: String,
}

impl LogshipConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.max_batch_count == 0 || self.max_batch_count > 4096 {
            return Err("[logship] max_batch_count must be between 1 and 4096".into());
        }
        if self.max_batch_bytes == 0 || self.max_batch_bytes > 5 * 1024 * 1024 {
            return Err("[logship] max_batch_bytes must be between 1 and 5242880".into());
        }
        if self.max_spool_bytes < 2 * self.max_batch_bytes as u64 {
            return Err(format!(
                "[logship] max_spool_bytes ({}) must be at least twice max_batch_bytes ({})",
                self.max_spool_bytes, self.max_batch_bytes
            ));
        }
        if let Some(sls) = &self.sls {
            if sls.signature == SignatureVersion::V4 && sls.region.is_none() {
                return Err("[logship.sls] signature = \"v4\" needs region".into());
            }
            if sls.project.is_empty() {
                return Err("[logship.sls] project must not be empty".into());
            }
            crate::logship::sink::sls::Endpoint::parse(&sls.endpoint)
                .map_err(|err| format!("[logship.sls] {err}"))?;
        }
        if let Some(ingest) = &self.ingest {
            if ingest.access_key_id.is_some() != ingest.access_key_secret.is_some() {
                return Err(
                    "[logship.ingest] access_key_id and access_key_secret go together".into(),
                );
            }
            if ingest.access_key_id.is_none() && self.sls.is_none() {
                return Err(
                    "[logship.ingest] needs access_key_id and access_key_secret \
                     when [logship.sls] is not configured"
                        .into(),
                );
            }
        }
        if let Some(ingest) = &self.ingest {
            if ingest.max_concurrent_requests == 0
                || ingest.max_body_bytes == 0
                || ingest.max_connections == 0
            {
                return Err(
                    "[logship.ingest] max_connections, max_concurrent_requests and \
                     max_body_bytes must be positive"
                        .into(),
                );
            }
            if ingest.idle_timeout.is_zero() || ingest.body_timeout.is_zero() {
                return Err(
                    "[logship.ingest] idle_timeout and body_timeout must be positive".into(),
                );
            }
        }
        for capture in &self.capture {
            crate::logship::record::validate_logstore(&capture.logstore)
                .map_err(|err| format!("[[logship.capture]] table {:?}: {err}", capture.table))?;
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
fn default_max_spool_bytes() -> u64 {
    1 << 30
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retry_initial_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_max_backoff() -> Duration {
    Duration::from_secs(50)
}
fn default_max_file_bytes() -> u64 {
    100 << 20
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_concurrent_requests() -> usize {
    64
}
fn default_max_body_bytes() -> usize {
    10 << 20
}
fn default_file_path() -> String {
    "./skiff-logs".into()
}
fn default_ingest_listen() -> String {
    "127.0.0.1:9931".into()
}
fn default_primary_key() -> String {
    "id".into()
}
fn default_capture_mode() -> String {
    "mirror".into()
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, OnFull, SignatureVersion};

    fn parse(logship: &str) -> Result<Config, String> {
        Config::parse(&format!("[logship]\n{logship}")).map_err(|err| err.to_string())
    }

    const SLS: &str = "[logship.sls]\nendpoint = \"http://127.0.0.1:1\"\nproject = \"p1\"\n\
                       access_key_id = \"ak\"\naccess_key_secret = \"sk\"\n";

    #[test]
    fn defaults() {
        let config = parse(SLS).unwrap();
        let logship = config.logship.unwrap();
        assert_eq!(logship.max_spool_bytes, 1 << 30);
        assert_eq!(logship.on_full, OnFull::Block);
        let sls = logship.sls.unwrap();
        assert_eq!(sls.signature, SignatureVersion::V1);
        assert_eq!(sls.security_token, None);
    }

    #[test]
    fn invalid_combinations_are_rejected() {
        let cases = [
            (format!("{SLS}signature = \"v4\"\n"), "needs region"),
            (format!("max_spool_bytes = 1000\n{SLS}"), "max_spool_bytes"),
            ("[logship.ingest]\nlisten = \"127.0.0.1:0\"\n".to_string(), "access_key_id"),
            (format!("on_full = \"drop\"\n{SLS}"), "expected `block` or `reject`"),
            (SLS.replace("http://127.0.0.1:1", "ftp://x"), "scheme must be http or https"),
            (
                format!("{SLS}[[logship.capture]]\ndatabase = \"d\"\ntable = \"t\"\nlogstore = \"Bad Name\"\n"),
                "invalid logstore name",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn debug_output_leaves_out_secrets() {
        let text = format!(
            "{SLS}security_token = \"token-value\"\n[logship.ingest]\n\
             access_key_id = \"ingest-ak\"\naccess_key_secret = \"ingest-secret\"\n"
        );
        let debug = format!("{:?}", parse(&text).unwrap().logship.unwrap());
        assert!(debug.contains("ingest-ak"));
        assert!(!debug.contains("\"sk\""), "{debug}");
        assert!(!debug.contains("token-value"), "{debug}");
        assert!(!debug.contains("ingest-secret"), "{debug}");
    }
}
