//! Sinks: where spooled batches go. `sls` sends PutLogs requests; `file`
//! writes NDJSON files and is the default without `[logship.sls]`.

pub mod file;
pub mod sls;

use super::spool::SpooledBatch;

pub use file::FileSink;
pub use sls::SlsSink;

/// Reason a batch was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth sending again later: throttling, server errors, timeouts,
    /// connection failures, a full disk.
    #[error("{0}")]
    Retryable(String),
    /// The batch itself was rejected, so sending it again fails the same way.
    #[error("{0}")]
    Rejected(String),
}

/// A configured destination for batches.
pub enum Sink {
    File(FileSink),
    Sls(Box<SlsSink>),
}

impl Sink {
    /// Short name for logs, metrics and `/status`.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::File(_) => "file",
            Sink::Sls(_) => "sls",
        }
    }

    /// Delivers one batch; `Ok` means the destination has it.
    pub async fn send(&self, batch: &SpooledBatch) -> Result<(), SendError> {
        match self {
            Sink::File(sink) => sink.send(batch).await,
            Sink::Sls(sink) => sink.send(batch).await,
        }
    }
}
