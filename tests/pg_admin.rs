//! The admin console's commands and config reload, run on the skiff binary
//! with psql and tokio-postgres against a real PostgreSQL.

mod support;

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::admin_console::{admin_text, psql, rows, runtime};
use support::postgres::{free_port, PgServer};
use support::process::SkiffProcess;
use support::skiff;

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

/// Builds a skiff config with one database on the shared server; `pool_size` is
/// the only line the reload tests rewrite.
fn config(listen: u16, admin: u16, db: &str, pool_size: usize) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[postgres]\nlisten = \"127.0.0.1:{listen}\"\n\
         admin_users = [\"postgres\"]\nquery_wait_timeout = \"20s\"\nshutdown_timeout = \"30s\"\n\
         default_pool_size = {pool_size}\n\n\
         [[postgres.databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg().port
    )
}

struct Running {
    skiff: SkiffProcess,
    port: u16,
    db: String,
}

fn start(db: &str, pool_size: usize) -> Running {
    pg().create_database(db);
    let port = free_port();
    let skiff = SkiffProcess::start(&config(port, free_port(), db, pool_size), port);
    Running {
        skiff,
        port,
        db: db.to_string(),
    }
}

impl Running {
    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.port, self.db
        )
    }

    /// Runs admin console commands with psql: unaligned rows, `|` between
    /// columns, no header.
    fn admin(&self, sql: &str) -> Output {
        psql(self.port, "skiff", sql)
    }

    fn admin_text(&self, sql: &str) -> String {
        admin_text(self.port, sql)
    }

    /// Rewrites the pool size in the config file.
    fn write_pool_size(&self, size: usize) {
        let path = &self.skiff.config_path;
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for line in &mut lines {
            if line.starts_with("default_pool_size") {
                *line = format!("default_pool_size = {size}");
            }
        }
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }
}

#[test]
fn show_clients_and_servers_link_up() {
    let skiff = start("adm_show", 4);
    runtime().block_on(async {
        let client = skiff::connect(&skiff.url()).await;
        client.batch_execute("BEGIN").await.unwrap();
        let backend_pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);

        let clients = rows(&skiff.admin_text("SHOW CLIENTS"));
        let active: Vec<&Vec<String>> = clients
            .iter()
            .filter(|row| row[3] == "active" && row[2] == "adm_show")
            .collect();
        assert_eq!(active.len(), 1, "{clients:?}");
        let client_row = active[0];
        assert_eq!(client_row[0], "C");
        assert_eq!(client_row[1], "postgres");
        assert_eq!(client_row[4], "127.0.0.1");
        let link = &client_row[7];
        let client_id = &client_row[10];

        let servers = rows(&skiff.admin_text("SHOW SERVERS"));
        let server_row = servers
            .iter()
            .find(|row| &row[9] == link)
            .unwrap_or_else(|| panic!("server {link} listed: {servers:?}"));
        assert_eq!(server_row[3], "active");
        assert_eq!(&server_row[7], client_id, "server links back to the client");
        assert_eq!(server_row[8], backend_pid.to_string());
        assert_eq!(server_row[5], pg().port.to_string());

        client.batch_execute("COMMIT").await.unwrap();
        let servers = rows(&skiff.admin_text("SHOW SERVERS"));
        assert!(
            servers
                .iter()
                .any(|row| &row[9] == link && row[3] == "idle"),
            "{servers:?}"
        );

        let mem = skiff.admin_text("SHOW MEM");
        assert!(mem.contains("client_connections|1|"), "{mem}");
        assert!(mem.contains("server_connections|1|"), "{mem}");
        let help = skiff.admin_text("SHOW HELP");
        for command in ["PAUSE [db]", "RELOAD", "SHOW CLIENTS", "WAIT_CLOSE [db]"] {
            assert!(help.contains(command), "{help}");
        }
    });
}

#[test]
fn pause_waits_for_transactions_and_resume_releases() {
    let skiff = start("adm_pause", 4);
    runtime().block_on(async {
        let busy = skiff::connect(&skiff.url()).await;
        let later = skiff::connect(&skiff.url()).await;
        busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

        let port = skiff.port;
        let pause = tokio::task::spawn_blocking(move || psql(port, "skiff", "PAUSE adm_pause"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !pause.is_finished(),
            "PAUSE returned with a transaction open"
        );
        busy.batch_execute("COMMIT").await.unwrap();
        let paused = pause.await.unwrap();
        assert!(paused.status.success());
        assert_eq!(pg().client_backends("adm_pause"), 0, "PAUSE closes servers");

        // A query during the pause waits for RESUME instead of failing.
        let waiting =
            tokio::spawn(
                async move { later.simple_query("SELECT 1").await.map(|_| Instant::now()) },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "query ran while paused");
        // One client idle, one waiting, no server connection.
        let pools = skiff.admin_text("SHOW POOLS");
        assert!(pools.contains("adm_pause|postgres|1|1|0|0|"), "{pools}");
        let row = &rows(&pools)[0];
        let waited_us: u64 =
            row[8].parse::<u64>().unwrap() * 1_000_000 + row[9].parse::<u64>().unwrap();
        assert!(
            waited_us >= 200_000,
            "maxwait counts the queued client: {row:?}"
        );
        let resumed_at = Instant::now();
        skiff.admin_text("RESUME");
        let finished = waiting.await.unwrap().expect("query succeeds after RESUME");
        assert!(finished >= resumed_at);
    });
}

#[test]
fn kill_ends_sessions_and_pauses() {
    let skiff = start("adm_kill", 4);
    runtime().block_on(async {
        let victim = skiff::connect(&skiff.url()).await;
        victim.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let other = skiff::connect(&skiff.url()).await;

        skiff.admin_text("KILL adm_kill");
        let err = victim.simple_query("SELECT 1").await.unwrap_err();
        // The FATAL error can arrive before the client sees the close, and
        // the error's text is in its DbError, not in its Display.
        let killed_by_admin = err
            .as_db_error()
            .is_some_and(|db| db.message().contains("administrator command"));
        assert!(victim.is_closed() || killed_by_admin, "{err:?}");
        let pools = skiff.admin_text("SHOW POOLS");
        assert!(!pools.contains("adm_kill|postgres|1|"), "{pools}");

        // The pool stays paused after KILL until RESUME.
        let url = skiff.url();
        let late = tokio::spawn(async move {
            let client = skiff::connect(&url).await;
            client.simple_query("SELECT 1").await.map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!late.is_finished());
        skiff.admin_text("RESUME");
        late.await.unwrap().expect("new client runs after RESUME");
        assert!(other.is_closed(), "KILL ends every session of the database");
    });
}

#[test]
fn kill_client_ends_one_session() {
    let skiff = start("adm_killone", 4);
    runtime().block_on(async {
        let victim = skiff::connect(&skiff.url()).await;
        let bystander = skiff::connect(&skiff.url()).await;
        victim.simple_query("SELECT 1").await.unwrap();
        let clients = rows(&skiff.admin_text("SHOW CLIENTS"));
        let ids: Vec<&String> = clients
            .iter()
            .filter(|row| row[2] == "adm_killone")
            .map(|row| &row[10])
            .collect();
        assert_eq!(ids.len(), 2);
        let first = ids
            .iter()
            .min_by_key(|id| id.parse::<u64>().unwrap())
            .unwrap();
        skiff.admin_text(&format!("KILL_CLIENT {first}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(victim.simple_query("SELECT 1").await.is_err());
        bystander.simple_query("SELECT 1").await.unwrap();

        let missing = skiff.admin("KILL_CLIENT 999999");
        assert!(!missing.status.success());
        assert!(String::from_utf8_lossy(&missing.stderr).contains("no client with id"));
    });
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    let row = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    row.get(0)
}

#[test]
fn reconnect_replaces_servers_after_release() {
    let skiff = start("adm_reconnect", 4);
    runtime().block_on(async {
        let client = skiff::connect(&skiff.url()).await;
        client.batch_execute("BEGIN").await.unwrap();
        let before = backend_pid(&client).await;
        skiff.admin_text("RECONNECT adm_reconnect");

        let port = skiff.port;
        let wait_close =
            tokio::task::spawn_blocking(move || psql(port, "skiff", "WAIT_CLOSE adm_reconnect"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!wait_close.is_finished(), "WAIT_CLOSE returned early");
        // The transaction keeps its server until it ends.
        assert_eq!(backend_pid(&client).await, before);
        client.batch_execute("COMMIT").await.unwrap();
        assert!(wait_close.await.unwrap().status.success());
        let after = backend_pid(&client).await;
        assert_ne!(after, before, "a new server connection after RECONNECT");
    });
}

#[test]
fn disable_rejects_new_clients_until_enable() {
    let skiff = start("adm_disable", 4);
    runtime().block_on(async {
        let connected = skiff::connect(&skiff.url()).await;
        skiff.admin_text("DISABLE adm_disable");
        let err = skiff::try_connect(&skiff.url()).await.unwrap_err();
        let db_error = err.as_db_error().expect("an ErrorResponse");
        assert_eq!(db_error.code().code(), "55000");
        assert!(
            db_error.message().contains("not currently accepting"),
            "{db_error:?}"
        );
        connected.simple_query("SELECT 1").await.unwrap();
        skiff.admin_text("ENABLE adm_disable");
        skiff::connect(&skiff.url()).await;

        let unknown = skiff.admin("PAUSE no_such_db");
        assert!(!unknown.status.success());
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("not configured"));
    });
}

/// Runs clients that each loop short transactions until `stop`; returns the
/// number of errors they saw.
fn spawn_load(
    url: String,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|_| {
            let url = url.clone();
            let stop = stop.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let client = skiff::connect(&url).await;
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client
                        .batch_execute("BEGIN; SELECT pg_sleep(0.002); COMMIT")
                        .await
                    {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => errors.push(err.to_string()),
                    }
                }
                errors
            })
        })
        .collect()
}

#[test]
fn reload_resizes_pool_under_load() {
    let mut skiff = start("adm_reload", 6);
    runtime().block_on(async {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let load = spawn_load(skiff.url(), 12, stop.clone(), done.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Shrink with RELOAD, then grow with SIGHUP, while clients run.
        skiff.write_pool_size(2);
        let reload = skiff.admin("RELOAD");
        assert!(reload.status.success(), "{reload:?}");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let databases = skiff.admin_text("SHOW DATABASES");
        assert!(databases.contains("|2|transaction|"), "{databases}");
        let mut over = 0;
        for _ in 0..10 {
            if pg().client_backends("adm_reload") > 2 {
                over += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(over, 0, "server connections above the reloaded pool size");

        skiff.write_pool_size(5);
        skiff.skiff.signal(libc::SIGHUP);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let databases = skiff.admin_text("SHOW DATABASES");
        assert!(databases.contains("|5|transaction|"), "{databases}");
        assert!(pg().client_backends("adm_reload") > 2, "pool grew again");

        stop.store(true, Ordering::Relaxed);
        for task in load {
            let errors = task.await.unwrap();
            assert!(errors.is_empty(), "client errors during reload: {errors:?}");
        }
        assert!(done.load(Ordering::Relaxed) > 100);
    });
    assert!(skiff.skiff.log().contains("config reloaded"));
    assert!(skiff.skiff.wait_exit(Duration::from_millis(10)).is_none());
}

#[test]
fn invalid_reload_keeps_old_config() {
    let mut skiff = start("adm_badreload", 3);
    let path = skiff.skiff.config_path.clone();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("default_pool_size = 3", "default_pool_size = \"many\""),
    )
    .unwrap();

    let reload = skiff.admin("RELOAD");
    assert!(!reload.status.success());
    let stderr = String::from_utf8_lossy(&reload.stderr);
    assert!(stderr.contains("old config stays in force"), "{stderr}");
    assert!(stderr.contains("line 9"), "{stderr}");

    skiff.skiff.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let log = skiff.skiff.log();
    assert!(log.contains("config reload rejected"), "{log}");
    assert!(skiff
        .admin_text("SHOW DATABASES")
        .contains("|3|transaction|"));
    runtime().block_on(async {
        skiff::connect(&skiff.url())
            .await
            .simple_query("SELECT 1")
            .await
            .unwrap();
    });
    assert!(skiff.skiff.wait_exit(Duration::from_millis(10)).is_none());
}

#[test]
fn second_sigterm_exits_without_drain() {
    let mut skiff = start("adm_sigterm", 3);
    runtime().block_on(async {
        let busy = skiff::connect(&skiff.url()).await;
        busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
        skiff.skiff.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            skiff.skiff.wait_exit(Duration::from_millis(10)).is_none(),
            "the first SIGTERM waits for the open transaction"
        );
        skiff.skiff.signal(libc::SIGTERM);
    });
    let status = skiff.skiff.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some(),
        "second SIGTERM exits: {}",
        skiff.skiff.log()
    );
}

#[test]
fn shutdown_command_drains_and_exits() {
    let mut skiff = start("adm_shutdown", 3);
    let done = skiff.admin("SHUTDOWN");
    assert!(done.status.success());
    let status = skiff.skiff.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{}", skiff.skiff.log());
}
