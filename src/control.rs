//! Process-wide operator actions shared by signals and the admin console:
//! reloading the config file, requesting shutdown, and the state of the
//! Redis and log shipping jobs for SHOW commands.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::admin::Component;
use crate::config::Config;
use crate::logship::Logship;
use crate::pg::Pooler;
use crate::redis::RedisRouter;

/// Handles on the running jobs, and the config they run with.
pub struct Control {
    config_path: PathBuf,
    /// The config in force; a reload replaces it only when it is valid.
    config: Mutex<Config>,
    pooler: Option<Arc<Pooler>>,
    redis: Option<Arc<RedisRouter>>,
    logship: Option<Arc<Logship>>,
    /// Cancelled by the admin console's SHUTDOWN.
    shutdown: CancellationToken,
    /// Serializes reloads from SIGHUP and RELOAD.
    reloading: tokio::sync::Mutex<()>,
}

impl Control {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        pooler: Option<Arc<Pooler>>,
        redis: Option<Arc<RedisRouter>>,
        logship: Option<Arc<Logship>>,
    ) -> Arc<Control> {
        Arc::new(Control {
            config_path,
            config: Mutex::new(config),
            pooler,
            redis,
            logship,
            shutdown: CancellationToken::new(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Reads the config file again and applies what can change while
    /// running. An invalid file changes nothing. Returns notes on settings
    /// that keep their old value until a restart.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let new = Config::load(&self.config_path).map_err(|err| err.to_string())?;
        crate::server::check(&new)?;
        let mut notes = section_notes(&self.config.lock(), &new);
        // The log shipper first: building its sink is the step most likely
        // to fail, and nothing has changed yet when it does. The user list
        // was loaded by the check above.
        if let (Some(logship), Some(logship_config)) = (&self.logship, &new.logship) {
            notes.extend(
                logship
                    .reload(logship_config, &new)
                    .map_err(|err| err.to_string())?,
            );
        }
        if let (Some(pooler), Some(pg)) = (&self.pooler, &new.postgres) {
            notes.extend(
                pooler
                    .reload(pg.clone(), &new)
                    .map_err(|err| err.to_string())?,
            );
        }
        if let (Some(redis), Some(redis_config)) = (&self.redis, &new.redis) {
            notes.extend(redis.reload(redis_config));
        }
        *self.config.lock() = new;
        Ok(notes)
    }

    /// Asks the process to shut down as SIGTERM does.
    pub fn request_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn shutdown_requested(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Returns the Redis router's status, when it runs.
    pub fn redis_status(&self) -> Option<serde_json::Value> {
        self.redis.as_ref().map(|redis| redis.status())
    }

    /// Returns the log shipper's status, when it runs.
    pub fn logship_status(&self) -> Option<serde_json::Value> {
        self.logship.as_ref().map(|logship| logship.status())
    }
}

/// Notes on changes between `old` and `new` that no job can apply while
/// running: the admin address, and a job section added or removed.
fn section_notes(old: &Config, new: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    if old.admin.listen != new.admin.listen {
        notes.push(format!(
            "admin.listen stays {} until restart",
            old.admin.listen
        ));
    }
    let sections = [
        ("postgres", old.postgres.is_some(), new.postgres.is_some()),
        ("redis", old.redis.is_some(), new.redis.is_some()),
        ("logship", old.logship.is_some(), new.logship.is_some()),
    ];
    for (name, was, is) in sections {
        if was != is {
            notes.push(format!(
                "[{name}] was {} and is {}: starting or stopping a job needs a restart",
                if was { "present" } else { "absent" },
                if is { "present" } else { "absent" },
            ));
        }
    }
    notes
}
