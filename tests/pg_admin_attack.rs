//! The admin console used the way an operator misuses it: commands racing
//! each other, clients waiting on paused pools, drivers that speak the
//! extended protocol to the console, reloads that drop a database. Run on
//! the skiff binary with psql and tokio-postgres against a real PostgreSQL.

mod support;

use std::time::Duration;

use support::admin_console::{admin_text, psql, rows, runtime};
use support::postgres::{free_port, PgServer};
use support::process::SkiffProcess;
use support::skiff;

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

/// Generous bound for something that should happen at once: long enough
/// for a loaded machine, short next to the waits the bugs caused.
const PROMPTLY: Duration = Duration::from_secs(10);

struct Running {
    skiff: SkiffProcess,
    port: u16,
}

/// Starts skiff with one `[[postgres.databases]]` entry per name, each a
/// database of its own on the shared server.
fn start(databases: &[&str], extra: &str) -> Running {
    let mut entries = String::new();
    for db in databases {
        pg().create_database(db);
        entries.push_str(&database_entry(db));
    }
    let port = free_port();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[postgres]\nlisten = \"127.0.0.1:{port}\"\n\
         admin_users = [\"postgres\"]\ndefault_pool_size = 4\nquery_wait_timeout = \"60s\"\n\
         {extra}\n{entries}",
        free_port()
    );
    Running {
        skiff: SkiffProcess::start(&config, port),
        port,
    }
}

fn database_entry(db: &str) -> String {
    format!(
        "\n[[postgres.databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg().port
    )
}

impl Running {
    fn url(&self, db: &str) -> String {
        self.url_as("postgres", db)
    }

    fn url_as(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    fn admin_text(&self, sql: &str) -> String {
        admin_text(self.port, sql)
    }

    /// Polls SHOW CLIENTS until one client of `db` is in `state`, and
    /// returns its id.
    async fn client_id(&self, db: &str, state: &str) -> String {
        let deadline = tokio::time::Instant::now() + PROMPTLY;
        loop {
            let clients = self.admin_text("SHOW CLIENTS");
            let found: Vec<String> = rows(&clients)
                .into_iter()
                .filter(|row| row[2] == db && row[3] == state)
                .map(|row| row[10].clone())
                .collect();
            if let [id] = found.as_slice() {
                return id.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no single {state} client of {db}: {clients}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns SHOW POOLS's cl_waiting for the pool of `db`.
    fn waiting(&self, db: &str) -> String {
        let pools = self.admin_text("SHOW POOLS");
        rows(&pools)
            .into_iter()
            .find(|row| row[0] == db)
            .unwrap_or_else(|| panic!("pool of {db} listed: {pools}"))[3]
            .clone()
    }
}

/// Runs `sql` on a new client in the background.
fn spawn_query(
    url: String,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    tokio::spawn(async move {
        let client = skiff::try_connect(&url).await?;
        client.batch_execute(sql).await
    })
}

/// Opens the pool of `db` with a first query: the login that creates a
/// pool waits while the database is paused.
async fn warm(url: &str) {
    skiff::connect(url)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

/// The server's message of an error, or the error itself.
fn message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

async fn finished<T>(task: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(PROMPTLY, task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
        .unwrap()
}

/// A driver that prepares statements (tokio-postgres, JDBC, pgx) sends
/// Parse, Describe and Sync. The console must answer that with one error
/// and one ReadyForQuery, or the driver reads stale replies afterwards.
#[test]
fn extended_protocol_gets_one_error_per_sync() {
    let skiff = start(&["atk_ext"], "");
    runtime().block_on(async {
        let admin = skiff::connect(&skiff.url("skiff")).await;
        let err = admin.query("SHOW VERSION", &[]).await.unwrap_err();
        let db_error = err.as_db_error().expect("an ErrorResponse");
        assert_eq!(db_error.code().code(), "08P01");
        assert!(db_error.message().contains("simple query"), "{db_error:?}");

        for _ in 0..3 {
            let version = admin.simple_query("SHOW VERSION").await.unwrap();
            let row = version
                .iter()
                .find_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0)),
                    _ => None,
                })
                .flatten();
            assert!(row.is_some_and(|v| v.starts_with("skiff ")), "{row:?}");
        }
        // An empty query is answered as PostgreSQL answers it.
        admin.simple_query("").await.unwrap();
        admin.simple_query(";").await.unwrap();
    });
}

/// An unknown command is quoted back only in part, and a command larger
/// than the console reads is refused with an error, not a silent close.
#[test]
fn long_admin_commands_are_bounded() {
    let skiff = start(&["atk_long"], "");
    runtime().block_on(async {
        let admin = skiff::connect(&skiff.url("skiff")).await;
        let long = format!("SHOW {}", "x".repeat(50_000));
        let err = admin.simple_query(&long).await.unwrap_err();
        let message = err.as_db_error().expect("an ErrorResponse").message();
        assert!(message.contains("unknown or unsupported"), "{message}");
        assert!(message.len() < 1000, "{} bytes quoted back", message.len());
        admin.simple_query("SHOW VERSION").await.unwrap();

        let huge = format!("SHOW {}", "x".repeat(1 << 20));
        let err = admin.simple_query(&huge).await.unwrap_err();
        let db_error = err
            .as_db_error()
            .expect("an ErrorResponse before the close");
        assert_eq!(db_error.code().code(), "54000", "{db_error:?}");
    });
}

/// KILL_CLIENT and KILL end a client that waits on a paused pool at once;
/// its statement must never run, not even after RESUME.
#[test]
fn kill_ends_clients_waiting_on_a_paused_pool() {
    let db = "atk_killwait";
    let skiff = start(&[db], "");
    runtime().block_on(async {
        skiff::connect(&pg().direct(db))
            .await
            .batch_execute("CREATE TABLE marks (who text)")
            .await
            .unwrap();
        warm(&skiff.url(db)).await;
        skiff.admin_text(&format!("PAUSE {db}"));
        let first = spawn_query(skiff.url(db), "INSERT INTO marks VALUES ('killed one')");
        let id = skiff.client_id(db, "waiting").await;
        skiff.admin_text(&format!("KILL_CLIENT {id}"));
        let err = finished(first, "the waiting client after KILL_CLIENT")
            .await
            .unwrap_err();
        assert!(message(&err).contains("administrator"), "{err:?}");

        let second = spawn_query(skiff.url(db), "INSERT INTO marks VALUES ('killed all')");
        skiff.client_id(db, "waiting").await;
        skiff.admin_text(&format!("KILL {db}"));
        let err = finished(second, "the waiting client after KILL")
            .await
            .unwrap_err();
        assert!(message(&err).contains("administrator"), "{err:?}");
        assert_eq!(skiff.waiting(db), "0", "no client counted as waiting");

        skiff.admin_text("RESUME");
        let client = skiff::connect(&skiff.url(db)).await;
        let rows = client.query("SELECT who FROM marks", &[]).await.unwrap();
        let ran: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        assert!(ran.is_empty(), "killed clients' statements ran: {ran:?}");
    });
}

/// A client that cancels its wait on a paused pool leaves the wait: it is
/// no longer counted in cl_waiting.
#[test]
fn cancelled_wait_leaves_the_waiting_count() {
    let db = "atk_cancelwait";
    let skiff = start(&[db], "");
    runtime().block_on(async {
        let client = std::sync::Arc::new(skiff::connect(&skiff.url(db)).await);
        client.simple_query("SELECT 1").await.unwrap();
        skiff.admin_text(&format!("PAUSE {db}"));
        let waiter = client.clone();
        let query = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
        skiff.client_id(db, "waiting").await;
        assert_eq!(skiff.waiting(db), "1");
        client
            .cancel_token()
            .cancel_query(tokio_postgres::NoTls)
            .await
            .unwrap();
        let err = finished(query, "the cancelled query").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
        assert_eq!(skiff.waiting(db), "0", "{}", skiff.admin_text("SHOW POOLS"));
        skiff.admin_text("RESUME");
        client.simple_query("SELECT 1").await.unwrap();
    });
}

/// After PAUSE of every database, RESUME of one lets that one go on and
/// keeps the others paused.
#[test]
fn resume_one_database_after_pause_of_all() {
    let skiff = start(&["atk_res_a", "atk_res_b"], "");
    runtime().block_on(async {
        warm(&skiff.url("atk_res_a")).await;
        warm(&skiff.url("atk_res_b")).await;
        skiff.admin_text("PAUSE");
        let a = spawn_query(skiff.url("atk_res_a"), "SELECT 1");
        let b = spawn_query(skiff.url("atk_res_b"), "SELECT 1");
        skiff.client_id("atk_res_a", "waiting").await;
        skiff.client_id("atk_res_b", "waiting").await;
        skiff.admin_text("RESUME atk_res_a");
        finished(a, "the query on the resumed database")
            .await
            .expect("runs after RESUME of its database");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!b.is_finished(), "the other database stays paused");
        skiff.admin_text("RESUME");
        finished(b, "the query after RESUME of all").await.unwrap();
    });
}

/// A PAUSE still waiting for a transaction when another console resumes
/// the database must not report that it paused.
#[test]
fn pause_overtaken_by_resume_fails() {
    let db = "atk_pauseresume";
    let skiff = start(&[db], "");
    runtime().block_on(async {
        let busy = skiff::connect(&skiff.url(db)).await;
        busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let port = skiff.port;
        let command = format!("PAUSE {db}");
        let pause = tokio::task::spawn_blocking(move || psql(port, "skiff", &command));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pause.is_finished(), "PAUSE waits for the transaction");
        skiff.admin_text(&format!("RESUME {db}"));
        let paused = finished(pause, "PAUSE after RESUME").await;
        assert!(
            !paused.status.success(),
            "PAUSE reported success after RESUME"
        );
        let stderr = String::from_utf8_lossy(&paused.stderr);
        assert!(stderr.contains("RESUME"), "{stderr}");
        busy.batch_execute("COMMIT").await.unwrap();
        skiff::connect(&skiff.url(db))
            .await
            .simple_query("SELECT 1")
            .await
            .unwrap();
    });
}

/// A client waiting on a paused pool is in no transaction: shutdown ends
/// it with an error instead of waiting out shutdown_timeout for a RESUME
/// that cannot come.
#[test]
fn shutdown_does_not_wait_for_paused_waiters() {
    let db = "atk_pausedstop";
    let mut skiff = start(&[db], "shutdown_timeout = \"60s\"");
    runtime().block_on(async {
        warm(&skiff.url(db)).await;
        skiff.admin_text(&format!("PAUSE {db}"));
        let waiting = spawn_query(skiff.url(db), "SELECT 1");
        skiff.client_id(db, "waiting").await;
        skiff.skiff.signal(libc::SIGTERM);
        let err = finished(waiting, "the waiting client at shutdown")
            .await
            .unwrap_err();
        assert!(message(&err).contains("shutting down"), "{err:?}");
    });
    let status = skiff.skiff.wait_exit(PROMPTLY);
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        skiff.skiff.log()
    );
}

/// PAUSE is what an operator runs before restarting PostgreSQL: once it
/// returns, no server connection is opened until RESUME, not even by the
/// login of a user that has no pool yet.
#[test]
fn login_of_a_new_user_waits_while_paused() {
    let db = "atk_pauselogin";
    let skiff = start(&[db], "");
    pg().psql("CREATE ROLE atk_late LOGIN");
    runtime().block_on(async {
        warm(&skiff.url(db)).await;
        skiff.admin_text(&format!("PAUSE {db}"));
        assert_eq!(pg().client_backends(db), 0, "PAUSE closed the servers");
        let late = spawn_query(skiff.url_as("atk_late", db), "SELECT 1");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            pg().client_backends(db),
            0,
            "a login opened a server connection to a paused database"
        );
        assert!(!late.is_finished(), "the new user's query waits");
        skiff.admin_text(&format!("RESUME {db}"));
        finished(late, "the new user's query after RESUME")
            .await
            .expect("runs after RESUME");
    });
}

/// A reload that drops a database leaves its connected clients served,
/// but the idle server connections of its pools close at once instead of
/// outliving it until server_idle_timeout.
#[test]
fn reload_closes_idle_servers_of_a_dropped_database() {
    let skiff = start(&["atk_drop_old", "atk_drop_new"], "");
    runtime().block_on(async {
        let stays = skiff::connect(&skiff.url("atk_drop_old")).await;
        stays.simple_query("SELECT 1").await.unwrap();
        assert_eq!(pg().client_backends("atk_drop_old"), 1);

        let path = &skiff.skiff.config_path;
        let text = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, text.replace(&database_entry("atk_drop_old"), "")).unwrap();
        skiff.admin_text("RELOAD");
        let err = skiff::try_connect(&skiff.url("atk_drop_old"))
            .await
            .unwrap_err();
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("3D000"),
            "{err}"
        );
        let deadline = tokio::time::Instant::now() + PROMPTLY;
        while pg().client_backends("atk_drop_old") > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the dropped database's idle server connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The client that was connected goes on, on a new connection.
        stays.simple_query("SELECT 1").await.unwrap();
    });
}
