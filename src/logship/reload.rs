//! Applying a reloaded `[logship]` section to the running shipper.

use std::sync::Arc;

use super::{build_sink, deliver, Logship, LogshipError};
use crate::config::{Config, LogshipConfig};

impl Logship {
    /// Applies a reloaded `[logship]` section: the sink (endpoint,
    /// credentials, timeouts, retry delays), `linger`, the batch limits of
    /// requests and the ingest credentials change for the next request.
    /// Returns the changes that need a restart, which are not applied.
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
    // The ingest endpoint takes these when it starts.
    let ingest_limits = |config: &LogshipConfig| {
        config.ingest.as_ref().map(|ingest| {
            (
                ingest.max_body_bytes,
                ingest.max_concurrent_requests,
                ingest.max_connections,
                ingest.idle_timeout,
                ingest.body_timeout,
            )
        })
    };
    let mut notes: Vec<String> = fixed
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| format!("logship {name} changes apply after a restart"))
        .collect();
    if current.ingest.is_some()
        && new.ingest.is_some()
        && ingest_limits(current) != ingest_limits(new)
    {
        notes.push(
            "logship ingest max_body_bytes, max_concurrent_requests, max_connections, \
             idle_timeout and body_timeout changes apply after a restart"
                .to_string(),
        );
    }
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
        ingest.max_body_bytes = old.max_body_bytes;
        ingest.max_concurrent_requests = old.max_concurrent_requests;
        ingest.max_connections = old.max_connections;
        ingest.idle_timeout = old.idle_timeout;
        ingest.body_timeout = old.body_timeout;
    }
    if current.sls.is_some() != new.sls.is_some() {
        applied.sls = current.sls.clone();
        applied.file = current.file.clone();
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logship(ingest: &str) -> LogshipConfig {
        let text = format!(
            "[logship]\n[logship.file]\n[logship.ingest]\n\
             access_key_id = \"ak\"\naccess_key_secret = \"secret\"\n{ingest}\n"
        );
        Config::parse(&text).unwrap().logship.unwrap()
    }

    #[test]
    fn ingest_limits_need_a_restart() {
        let current = logship("body_timeout = \"60s\"");
        let new = logship("body_timeout = \"5s\"\nmax_body_bytes = 1000");

        let notes = restart_notes(&current, &new);

        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("body_timeout"), "{notes:?}");
        // Kept as running, so the next reload names them again.
        let applied = applied_config(&current, &new);
        let ingest = applied.ingest.unwrap();
        assert_eq!(ingest.body_timeout, std::time::Duration::from_secs(60));
        assert_eq!(ingest.max_body_bytes, 10485760);
        assert!(restart_notes(&current, &current).is_empty());
    }
}
