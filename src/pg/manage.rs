//! Operator actions on a running pooler: the admin console's PAUSE, RESUME,
//! KILL, RECONNECT, WAIT_CLOSE, DISABLE and ENABLE, and applying a reloaded
//! `[postgres]` section.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::auth::UserList;
use super::pool::Pool;
use super::{pool_settings, Pooler, PoolerError};
use crate::config::{Config, PgConfig};

/// How often PAUSE and WAIT_CLOSE look at the pools again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Databases whose checkouts wait for RESUME.
#[derive(Debug, Default)]
pub struct PauseState {
    all: bool,
    databases: HashSet<String>,
    /// Databases `RESUME db` let go while every database is paused.
    resumed: HashSet<String>,
}

impl PauseState {
    pub fn covers(&self, database: &str) -> bool {
        (self.all && !self.resumed.contains(database)) || self.databases.contains(database)
    }
}

impl Pooler {
    /// Pools of `database`, or all pools when it is `None`.
    fn pools_of(&self, database: Option<&str>) -> Vec<Arc<Pool>> {
        let prefix = database.map(|db| format!("{db}/"));
        self.all_pools()
            .into_iter()
            .filter(|pool| prefix.as_ref().is_none_or(|p| pool.name.starts_with(p)))
            .collect()
    }

    /// Fails with the admin console's message when `database` is not
    /// configured.
    pub fn check_database(&self, database: Option<&str>) -> Result<(), String> {
        match database {
            Some(name) if self.database(name).is_none() => {
                Err(format!("database \"{name}\" is not configured"))
            }
            _ => Ok(()),
        }
    }

    fn mark_paused(&self, database: Option<&str>, paused: bool) {
        let mut pauses = self.pauses.lock();
        match (database, paused) {
            (None, true) => {
                pauses.all = true;
                pauses.resumed.clear();
            }
            (None, false) => {
                pauses.all = false;
                pauses.databases.clear();
                pauses.resumed.clear();
            }
            (Some(db), true) => {
                pauses.databases.insert(db.to_string());
                pauses.resumed.remove(db);
            }
            (Some(db), false) => {
                pauses.databases.remove(db);
                if pauses.all {
                    pauses.resumed.insert(db.to_string());
                }
            }
        }
        for pool in self.all_pools() {
            let (pool_db, _) = pool.name.split_once('/').unwrap_or((&pool.name, ""));
            if pauses.covers(pool_db) {
                pool.pause();
            } else {
                pool.resume();
            }
        }
        if !paused {
            self.pause_lifted.notify_waiters();
        }
    }

    /// PAUSE: new checkouts wait; returns once every server connection of
    /// the pools has been released, then closes them. Fails when a RESUME
    /// lifts the pause first, since the connections are then in use again.
    pub async fn pause(&self, database: Option<&str>) -> Result<(), String> {
        self.mark_paused(database, true);
        loop {
            let pools = self.pools_of(database);
            if let Some(resumed) = pools.iter().find(|pool| !pool.is_paused()) {
                return Err(format!(
                    "PAUSE did not complete: a RESUME let pool {} go on first",
                    resumed.name
                ));
            }
            if pools.iter().all(|pool| pool.active_count() == 0) {
                for pool in &pools {
                    pool.close_idle();
                }
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits while `database` is paused, for a login that would open the
    /// first server connection of a new pool: a paused database gets no
    /// new server connections. Fails at `deadline` or when shutdown begins.
    pub async fn wait_until_unpaused(
        &self,
        database: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        loop {
            let lifted = self.pause_lifted.notified();
            tokio::pin!(lifted);
            lifted.as_mut().enable();
            if !self.pauses.lock().covers(database) {
                return Ok(());
            }
            if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                return Err("skiff is shutting down and the database is paused".into());
            }
            if tokio::time::timeout_at(deadline, lifted).await.is_err() {
                return Err(format!(
                    "timed out waiting for RESUME of database \"{database}\" (query_wait_timeout)"
                ));
            }
        }
    }

    /// Ends every wait for RESUME, as shutdown begins.
    pub fn stop_pause_waits(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for pool in self.all_pools() {
            pool.stop_waiting();
        }
        self.pause_lifted.notify_waiters();
    }

    /// RESUME: waiting checkouts go on.
    pub fn resume(&self, database: Option<&str>) {
        self.mark_paused(database, false);
    }

    /// KILL: ends every client session of the database (or of all
    /// databases) at once, closes their server connections, and pauses the
    /// pools so new clients wait for RESUME. Returns the clients killed.
    pub fn kill(&self, database: Option<&str>) -> usize {
        self.mark_paused(database, true);
        let killed = self
            .cancels
            .kill(|client| database.is_none_or(|db| client.database == db));
        for pool in self.pools_of(database) {
            pool.reconnect();
        }
        killed
    }

    /// KILL_CLIENT: ends one client's session; false when no client has
    /// that id.
    pub fn kill_client(&self, id: u64) -> bool {
        self.cancels.kill(|client| client.id == id) > 0
    }

    /// RECONNECT: server connections close once released and new ones
    /// are opened as needed.
    pub fn reconnect(&self, database: Option<&str>) {
        for pool in self.pools_of(database) {
            pool.reconnect();
        }
    }

    /// WAIT_CLOSE: returns once no client uses a server connection from
    /// before the last RECONNECT or target change.
    pub async fn wait_close(&self, database: Option<&str>) {
        loop {
            let pools = self.pools_of(database);
            let stale = self.cancels.snapshot().into_iter().any(|client| {
                let Some(server) = &client.server else {
                    return false;
                };
                let name = format!("{}/{}", client.info.database, client.info.user);
                pools
                    .iter()
                    .any(|pool| pool.name == name && server.generation != pool.target().generation)
            });
            if !stale {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// DISABLE and ENABLE: whether new clients may log in to a database.
    pub fn set_enabled(&self, database: &str, enabled: bool) {
        let mut disabled = self.disabled.lock();
        if enabled {
            disabled.remove(database);
        } else {
            disabled.insert(database.to_string());
        }
    }

    pub fn is_disabled(&self, database: &str) -> bool {
        self.disabled.lock().contains(database)
    }

    /// Applies a reloaded `[postgres]` section: users, timeouts and pool
    /// sizes at once, a changed server address or login for connections
    /// opened from now on. Returns the changes that need a restart, which
    /// are not applied.
    pub fn reload(&self, config: PgConfig, root: &Config) -> Result<Vec<String>, PoolerError> {
        let users = UserList::load(&config, root)?;
        let mut notes = Vec::new();
        let mut config = config;
        let current = self.config();
        if config.listen != current.listen {
            notes.push(format!(
                "postgres.listen stays {} until restart",
                current.listen
            ));
            config.listen = current.listen.clone();
        }
        notes.extend(tls_notes(&current, &config));
        // Pools of a database the new config drops keep serving the clients
        // still connected, on new server connections: idle ones close now
        // and busy ones when released, so none lingers until idle timeout.
        let dropped: Vec<String> = current
            .databases
            .iter()
            .filter(|old| !config.databases.iter().any(|db| db.name == old.name))
            .map(|old| format!("{}/", old.name))
            .collect();
        drop(current);
        for pool in self.all_pools() {
            if dropped.iter().any(|prefix| pool.name.starts_with(prefix)) {
                pool.reconnect();
            }
        }
        self.users.store(Arc::new(users));
        self.config.store(Arc::new(config));
        let config = self.config();
        for pool in self.all_pools() {
            let (database, user) = pool.name.split_once('/').unwrap_or((&pool.name, ""));
            // A pool of a database that is no longer configured keeps
            // serving its connected clients; new clients are rejected.
            let Some(db) = config.databases.iter().find(|db| db.name == database) else {
                continue;
            };
            pool.apply(pool_settings(&config, db), self.target_for(db, user));
        }
        Ok(notes)
    }
}

/// Notes on databases whose server TLS settings changed: the TLS settings
/// are built once at start.
fn tls_notes(current: &PgConfig, new: &PgConfig) -> Vec<String> {
    new.databases
        .iter()
        .filter(|db| {
            let old = current.databases.iter().find(|old| old.name == db.name);
            let old_tls = old.map(|old| current.server_tls(old));
            let new_tls = new.server_tls(db);
            match old_tls {
                Some(old_tls) => old_tls != new_tls,
                None => new_tls.mode != crate::config::SslMode::Disable,
            }
        })
        .map(|db| {
            format!(
                "postgres TLS settings of database {} apply after a restart",
                db.name
            )
        })
        .collect()
}
