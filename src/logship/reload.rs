//! Applying a reloaded `[logship]` section to the running shipper.

use std::sync::Arc;

use super::{build_sink, deliver, Logship, LogshipError};
use crate::config::{Config, LogshipConfig};

impl Logship {
    /// Applies a reloaded `[logship]` section: the sink (endpoint,
    /// credentials, timeouts, retry delays), `linger`, the request limits
    /// and the ingest credentials change for the next request. Returns the
    /// changes that need a restart, which are not applied.
    pub fn reload(&self, new: &LogshipConfig, root: &Config) -> Result<Vec<String>, LogshipError> {
        let mut current = self.config.lock();
        let notes = restart_notes(&current, new);

        let settings = self.delivery_settings.load_full();
        let sink_changed = current.sls != new.sls || current.file != new.file;
        let same_kind = current.sls.is_some() == new.sls.is_some();
        let (sink, backoff) = if sink_changed && same_kind {
            let (sink, backoff) = build_sink(new, root)?;
            (Arc::new(sink), backoff)
        } else {
            (settings.sink.clone(), settings.backoff)
        };
        self.delivery_settings
            .store(Arc::new(deliver::DeliverySettings {
                sink,
                backoff,
                linger: new.linger,
                max_batch_bytes: new.max_batch_bytes,
                max_batch_count: new.max_batch_count,
            }));
        if let (Some(state), Some(ingest)) = (&self.ingest_state, &new.ingest) {
            state.reload_credentials(ingest, new.sls.as_ref());
        }

        *current = applied_config(&current, new);
        Ok(notes)
    }
}

/// Names the changes from `current` to `new` that only a restart applies.
fn restart_notes(current: &LogshipConfig, new: &LogshipConfig) -> Vec<String> {
    let ingest_listen = |config: &LogshipConfig| config.ingest.as_ref().map(|i| i.listen.clone());
    let fixed = [
        ("spool_dir", current.spool_dir != new.spool_dir),
        (
            "max_spool_bytes",
            current.max_spool_bytes != new.max_spool_bytes,
        ),
        (
            "max_dead_letter_bytes",
            current.max_dead_letter_bytes != new.max_dead_letter_bytes,
        ),
        ("on_full", current.on_full != new.on_full),
        ("capture", current.capture != new.capture),
        (
            "ingest.listen",
            ingest_listen(current) != ingest_listen(new),
        ),
        ("sink type", current.sls.is_some() != new.sls.is_some()),
    ];
    let mut notes: Vec<String> = fixed
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| format!("logship {name} changes apply after a restart"))
        .collect();
    if current.max_batch_bytes != new.max_batch_bytes
        || current.max_batch_count != new.max_batch_count
    {
        notes.push(
            "logship max_batch_bytes and max_batch_count apply to requests now and to \
             new spool batches after a restart"
                .to_string(),
        );
    }
    notes
}

/// Returns `new` with the settings only a restart applies kept from
/// `current`, so the next reload reports them again.
fn applied_config(current: &LogshipConfig, new: &LogshipConfig) -> LogshipConfig {
    let mut applied = new.clone();
    applied.spool_dir = current.spool_dir.clone();
    applied.max_spool_bytes = current.max_spool_bytes;
    applied.max_dead_letter_bytes = current.max_dead_letter_bytes;
    applied.on_full = current.on_full;
    applied.capture = current.capture.clone();
    if let (Some(old), Some(ingest)) = (&current.ingest, &mut applied.ingest) {
        ingest.listen = old.listen.clone();
    }
    if current.sls.is_some() != new.sls.is_some() {
        applied.sls = current.sls.clone();
        applied.file = current.file.clone();
    }
    applied
}
