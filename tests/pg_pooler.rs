//! The PostgreSQL pooler against a real PostgreSQL 15: login, auth, pool
//! bounds, transaction pooling, session state and cancel.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::postgres::{PgServer, CLEAR_USER, MD5_USER, SCRAM_USER};
use support::raw::{self, tags, RawClient};
use support::skiff::{self, Skiff};

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

/// Creates a database on the shared server, named after the test.
fn database(name: &str) -> String {
    pg().create_database(name);
    name.to_string()
}

/// Counts the server connections skiff has open to a database.
fn server_connections(db: &str) -> usize {
    pg().client_backends(db)
}

fn db_error_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

fn db_error_code(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.code().code().to_string())
        .unwrap_or_else(|| format!("not a database error: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let db = database("simple_and_extended");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "")).await;
    let client = skiff.connect("postgres", &db).await;
    let messages = client.simple_query("SELECT 1 AS one").await.unwrap();
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("one row");
    assert_eq!(row.get("one"), Some("1"));
    let row = client
        .query_one("SELECT $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_client_auth() {
    let db = database("scram_client_auth");
    let extra = "[postgres.auth]\ntype = \"scram-sha-256\"\nusers = { postgres = \"right pw\" }\n";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let ok = skiff::try_connect(&format!(
        "{} password='right pw'",
        skiff.url("postgres", &db)
    ))
    .await;
    let client = ok.expect("right password logs in");
    client.simple_query("SELECT 1").await.unwrap();

    let wrong = skiff::try_connect(&format!("{} password=wrong", skiff.url("postgres", &db))).await;
    assert_eq!(db_error_code(&wrong.unwrap_err()), "28P01");
    let unknown = skiff::try_connect(&format!("{} password=x", skiff.url("mallory", &db))).await;
    assert_eq!(db_error_code(&unknown.unwrap_err()), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_client_auth_and_server_auth_methods() {
    let db = database("auth_methods");
    let extra = format!(
        "[postgres.auth]\ntype = \"md5\"\nusers = {{ {} = \"{}\", {} = \"{}\", {} = \"{}\" }}\n",
        MD5_USER.0, MD5_USER.1, SCRAM_USER.0, SCRAM_USER.1, CLEAR_USER.0, CLEAR_USER.1
    );
    let skiff = Skiff::start(&skiff::config(pg().port, &db, &extra)).await;
    for (user, password) in [MD5_USER, SCRAM_USER, CLEAR_USER] {
        let url = format!(
            "{} password='{}'",
            skiff.url(user, &db),
            password.replace('\'', "\\'")
        );
        let client = skiff::connect(&url).await;
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user, "server login as {user}");
    }
    let wrong = skiff::try_connect(&format!("{} password=nope", skiff.url(MD5_USER.0, &db))).await;
    assert_eq!(db_error_code(&wrong.unwrap_err()), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_file_in_pgbouncer_format() {
    let db = database("auth_file");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("userlist.txt");
    std::fs::write(&file, "; users\n\"bob\" \"bob\"\"pw\"\n").unwrap();
    let extra = format!(
        "[postgres.auth]\ntype = \"scram-sha-256\"\nauth_file = \"{}\"\n",
        file.display()
    );
    // bob has no role on the server, so the pool logs in as postgres.
    let config = skiff::config(pg().port, &db, &extra) + "user = \"postgres\"\n";
    let skiff = Skiff::start(&config).await;
    let ok = skiff::try_connect(&format!("{} password='bob\"pw'", skiff.url("bob", &db))).await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    let wrong = skiff::try_connect(&format!("{} password=bob", skiff.url("bob", &db))).await;
    assert_eq!(db_error_code(&wrong.unwrap_err()), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_and_too_many_clients() {
    let db = database("login_errors");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "max_client_conn = 2")).await;
    let missing = skiff::try_connect(&skiff.url("postgres", "nosuchdb")).await;
    assert_eq!(db_error_code(&missing.unwrap_err()), "3D000");

    let _first = skiff.connect("postgres", &db).await;
    let _second = skiff.connect("postgres", &db).await;
    let third = skiff::try_connect(&skiff.url("postgres", &db)).await;
    let err = third.unwrap_err();
    assert_eq!(db_error_code(&err), "53300");
    assert!(
        db_error_message(&err).contains("too many clients"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_answered_no() {
    let db = database("ssl_request");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "")).await;
    let url = format!("{} sslmode=prefer", skiff.url("postgres", &db));
    let client = skiff::connect(&url).await;
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_reports_error() {
    let db = database("wait_timeout");
    let extra = "default_pool_size = 1\nquery_wait_timeout = \"300ms\"";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let holder = skiff.connect("postgres", &db).await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = skiff.connect("postgres", &db).await;
    let started = Instant::now();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        db_error_message(&err).contains("query_wait_timeout"),
        "{err:?}"
    );
    // The waiter stays usable once a server connection is free.
    holder.simple_query("COMMIT").await.unwrap();
    waiter.simple_query("SELECT 1").await.unwrap();
}

/// Waits for `future`, at most 10 s: a queued client's wait that does not
/// end fails the test instead of hanging it.
async fn within_10s<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("the wait ends")
}

/// Runs a query on a client queued for a server connection and returns
/// how long it waited and the error message it got.
async fn queued_query_error(client: &tokio_postgres::Client) -> (Duration, String) {
    let started = Instant::now();
    let err = within_10s(client.simple_query("SELECT 1"))
        .await
        .unwrap_err();
    (started.elapsed(), db_error_message(&err))
}

/// Each queued client gets its timeout error at its own deadline: clients
/// that start waiting one after another time out one after another, and a
/// client that starts waiting after an earlier one was served still times
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_per_waiter() {
    let db = database("wait_timeout_each");
    let extra = "default_pool_size = 1\nquery_wait_timeout = \"600ms\"";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let holder = skiff.connect("postgres", &db).await;
    holder.simple_query("BEGIN").await.unwrap();

    let mut waits = Vec::new();
    for _ in 0..3 {
        let waiter = skiff.connect("postgres", &db).await;
        waits.push(tokio::spawn(
            async move { queued_query_error(&waiter).await },
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for wait in waits {
        let (elapsed, message) = wait.await.unwrap();
        assert!(message.contains("query_wait_timeout"), "{message}");
        assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    }

    // A client served before its deadline leaves the watchdog an earlier
    // wake-up than the next client's deadline.
    let served = skiff.connect("postgres", &db).await;
    let serve = tokio::spawn(async move { served.simple_query("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder.simple_query("COMMIT").await.unwrap();
    serve.await.unwrap().unwrap();
    holder.simple_query("BEGIN").await.unwrap();
    let late = skiff.connect("postgres", &db).await;
    let (elapsed, message) = queued_query_error(&late).await;
    assert!(message.contains("query_wait_timeout"), "{message}");
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    holder.simple_query("COMMIT").await.unwrap();
}

/// A reload that shortens query_wait_timeout ends the waits under way at
/// the new deadline, counted from when each began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_reload_applies_to_queued() {
    let db = database("wait_timeout_reload");
    let extra = "default_pool_size = 1\nquery_wait_timeout = \"30s\"";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let holder = skiff.connect("postgres", &db).await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = skiff.connect("postgres", &db).await;
    let started = Instant::now();
    let wait = tokio::spawn(async move { waiter.simple_query("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let shorter = "default_pool_size = 1\nquery_wait_timeout = \"800ms\"";
    let config = skiff::config(pg().port, &db, shorter);
    let root = ::skiff::config::Config::parse(&config).unwrap();
    skiff
        .pooler
        .reload(root.postgres.clone().unwrap(), &root)
        .unwrap();
    let err = within_10s(wait).await.unwrap().unwrap_err();
    assert!(
        db_error_message(&err).contains("query_wait_timeout"),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(started.elapsed() < Duration::from_secs(5));
    holder.simple_query("COMMIT").await.unwrap();
}

/// query_wait_timeout = "0s" means no limit, as in PgBouncer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_zero_waits() {
    let db = database("wait_timeout_zero");
    let extra = "default_pool_size = 1\nquery_wait_timeout = \"0s\"";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let holder = skiff.connect("postgres", &db).await;
    holder.simple_query("BEGIN").await.unwrap();
    let waiter = skiff.connect("postgres", &db).await;
    let wait = tokio::spawn(async move { waiter.simple_query("SELECT 1").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!wait.is_finished());
    holder.simple_query("COMMIT").await.unwrap();
    let rows = within_10s(wait).await.unwrap();
    assert!(rows.is_ok(), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_served_first_come_first_served() {
    let db = database("fair_queue");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let holder = skiff.connect("postgres", &db).await;
    holder
        .simple_query("CREATE TABLE served (seq serial, waiter int)")
        .await
        .unwrap();
    holder.simple_query("BEGIN").await.unwrap();
    let mut tasks = Vec::new();
    for index in 0..5 {
        let client = skiff.connect("postgres", &db).await;
        tasks.push(tokio::spawn(async move {
            let sql = format!("INSERT INTO served (waiter) VALUES ({index})");
            client.simple_query(&sql).await.unwrap();
        }));
        // Each waiter queues before the next one starts. A fixed pause is
        // not enough on a busy machine, where a spawned client can start
        // late and queue behind a later one.
        wait_until_waiting(&skiff, index + 1).await;
    }
    holder.simple_query("COMMIT").await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    // The order the server ran the waiters' statements in, which with one
    // server connection is the order they got it. The order their replies
    // reach the test's tasks is up to the scheduler.
    let rows = holder
        .query("SELECT waiter FROM served ORDER BY seq", &[])
        .await
        .unwrap();
    let order: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
}

/// Queues a client behind a holder of the pool's only server connection,
/// has it send `messages` and close, and checks that it leaves the queue
/// while the connection is still held and that none of its INSERTs into
/// `gave_up` ran. Returns skiff for further checks.
async fn queued_client_closes(db: &str, messages: &[bytes::Bytes]) -> Skiff {
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 1")).await;
    let holder = skiff.connect("postgres", db).await;
    holder
        .simple_query("CREATE TABLE gave_up (n int)")
        .await
        .unwrap();
    holder.simple_query("BEGIN").await.unwrap();

    let mut quitter = RawClient::connect(skiff.port, "postgres", db, &[]).await;
    quitter.send(&messages[..1]).await;
    wait_until_waiting(&skiff, 1).await;
    quitter.send(&messages[1..]).await;
    drop(quitter);
    // It leaves the queue while the only server connection is still busy.
    wait_until_waiting(&skiff, 0).await;

    holder.simple_query("COMMIT").await.unwrap();
    let rows = holder
        .query_one("SELECT count(*) FROM gave_up", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 0, "the closed client's INSERTs ran");
    skiff
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_hang_up_runs_nothing() {
    let insert = raw::query("INSERT INTO gave_up VALUES (1)");
    queued_client_closes(&database("hang_up_queue"), &[insert]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_terminate_runs_nothing() {
    let db = database("terminate_queue");
    // libpq's PQfinish sends Terminate before closing, even while a query
    // waits for its reply.
    let messages = [
        raw::query("INSERT INTO gave_up VALUES (1)"),
        raw::terminate(),
    ];
    let skiff = queued_client_closes(&db, &messages).await;

    let after = skiff.connect("postgres", &db).await;
    let row = after.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1, "the pool stopped serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_pipeline_hang_up_runs_nothing() {
    // Twenty batches of about 1 kB: more than skiff reads before the
    // first one queues, so the rest are still unread when the client
    // closes. They are sent in one write, before the client queues.
    let padding = "x".repeat(1000);
    let mut batches = bytes::BytesMut::new();
    for _ in 0..20 {
        let sql = format!("INSERT INTO gave_up VALUES (1) -- {padding}");
        batches.extend_from_slice(&raw::parse("", &sql));
        batches.extend_from_slice(&raw::bind("", "", &[]));
        batches.extend_from_slice(&raw::execute(""));
        batches.extend_from_slice(&raw::sync());
    }
    let db = database("pipeline_hang_up_queue");
    queued_client_closes(&db, &[batches.freeze()]).await;
}

/// Waits until `count` clients wait for a server connection, as the
/// pooler's status reports, or panics after 10 s.
async fn wait_until_waiting(skiff: &Skiff, count: usize) {
    use ::skiff::admin::Component;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = skiff.pooler.status();
        let waiting: u64 = status["pools"]
            .as_array()
            .expect("pools array")
            .iter()
            .filter_map(|pool| pool["clients_waiting"].as_u64())
            .sum();
        if waiting == count as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} clients waiting, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_never_exceeded() {
    let db = database("pool_bound");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 3")).await;
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done, db) = (peak.clone(), done.clone(), db.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(server_connections(&db), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let url = skiff.url("postgres", &db);
        tasks.push(tokio::spawn(async move {
            let client = skiff::connect(&url).await;
            for _ in 0..10 {
                client.simple_query("SELECT pg_sleep(0.005)").await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak >= 1, "sampler saw no server connection");
    assert!(peak <= 3, "pool of 3 opened {peak} server connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_on_pool_of_ten() {
    let db = database("thousand_clients");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 10")).await;
    let mut tasks = Vec::new();
    for index in 0..1000i32 {
        let url = skiff.url("postgres", &db);
        tasks.push(tokio::spawn(async move {
            let client = skiff::connect(&url).await;
            let row = client
                .query_one("SELECT $1::int * 2", &[&index])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), index * 2);
            client
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    assert!(server_connections(&db) <= 10);
    // Every client is still connected and served.
    for (index, client) in clients.iter().enumerate().step_by(97) {
        let row = client
            .query_one("SELECT $1::text", &[&index.to_string()])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), index.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_across_server_connections() {
    let db = database("prepared_across");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 2")).await;
    let clients = vec![
        skiff.connect("postgres", &db).await,
        skiff.connect("postgres", &db).await,
        skiff.connect("postgres", &db).await,
    ];
    let mut statements = Vec::new();
    for client in &clients {
        statements.push(client.prepare("SELECT $1::int + 100").await.unwrap());
    }
    // Interleave executions so each client lands on different servers.
    let mut tasks = Vec::new();
    for (client, statement) in clients.into_iter().zip(statements) {
        tasks.push(tokio::spawn(async move {
            for value in 0..50i32 {
                let row = client.query_one(&statement, &[&value]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), value + 100);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx_style_pipeline_with_named_statements() {
    let db = database("pgx_pipeline");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let mut a = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    let mut b = RawClient::connect(skiff.port, "postgres", &db, &[]).await;

    // Prepare: Parse + Describe statement + Sync, as pgx does.
    a.send(&[
        raw::parse("stmtcache_1", "SELECT $1::int * 3"),
        raw::describe(b'S', "stmtcache_1"),
        raw::sync(),
    ])
    .await;
    assert_eq!(tags(&a.recv_until_ready().await), "1tTZ");

    // Another client takes the only server and prepares other statements.
    b.send(&[
        raw::parse("other", "SELECT 'b'"),
        raw::bind("", "other", &[]),
        raw::execute(""),
        raw::sync(),
    ])
    .await;
    assert_eq!(tags(&b.recv_until_ready().await), "12DCZ");

    // Many Bind/Execute pairs before one Sync.
    let mut batch = Vec::new();
    for value in 1..=5 {
        batch.push(raw::bind("", "stmtcache_1", &[&value.to_string()]));
        batch.push(raw::describe(b'P', ""));
        batch.push(raw::execute(""));
    }
    batch.push(raw::sync());
    a.send(&batch).await;
    let replies = a.recv_until_ready().await;
    assert_eq!(tags(&replies), "2TDC2TDC2TDC2TDC2TDCZ");
    let values: Vec<String> = replies
        .iter()
        .filter(|r| r.tag == b'D')
        .filter_map(|r| r.first_value())
        .collect();
    assert_eq!(values, vec!["3", "6", "9", "12", "15"]);

    // A standalone Describe of the statement works on any server.
    a.send(&[raw::describe(b'S', "stmtcache_1"), raw::sync()])
        .await;
    assert_eq!(tags(&a.recv_until_ready().await), "tTZ");

    // Flush delivers replies without ReadyForQuery.
    a.send(&[
        raw::bind("", "stmtcache_1", &["7"]),
        raw::execute(""),
        raw::flush(),
    ])
    .await;
    assert_eq!(a.recv().await.tag, b'2');
    let row = a.recv().await;
    assert_eq!(row.first_value().as_deref(), Some("21"));
    assert_eq!(a.recv().await.tag, b'C');
    a.send(&[raw::sync()]).await;
    assert_eq!(tags(&a.recv_until_ready().await), "Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_statement_name_and_close() {
    let db = database("duplicate_name");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    client
        .send(&[raw::parse("s1", "SELECT 1"), raw::sync()])
        .await;
    assert_eq!(tags(&client.recv_until_ready().await), "1Z");

    // A second Parse under the same name fails; the rest up to Sync is
    // skipped and the connection stays usable.
    client
        .send(&[
            raw::parse("s1", "SELECT 2"),
            raw::bind("", "s1", &[]),
            raw::execute(""),
            raw::sync(),
        ])
        .await;
    let replies = client.recv_until_ready().await;
    assert_eq!(tags(&replies), "EZ");
    assert_eq!(replies[0].code(), "42P05");

    // Close is answered, and the name can be reused afterwards.
    client.send(&[raw::close(b'S', "s1"), raw::sync()]).await;
    assert_eq!(tags(&client.recv_until_ready().await), "3Z");
    client
        .send(&[
            raw::parse("s1", "SELECT 2"),
            raw::bind("", "s1", &[]),
            raw::execute(""),
            raw::sync(),
        ])
        .await;
    let replies = client.recv_until_ready().await;
    assert_eq!(tags(&replies), "12DCZ");
    assert_eq!(replies[2].first_value().as_deref(), Some("2"));

    // A closed name is unknown to the server, as after a real Close.
    client
        .send(&[
            raw::close(b'S', "s1"),
            raw::bind("", "s1", &[]),
            raw::sync(),
        ])
        .await;
    let replies = client.recv_until_ready().await;
    assert_eq!(tags(&replies), "3EZ");
    assert_eq!(replies[1].code(), "26000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_keep_tracking_consistent() {
    let db = database("deallocate");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    client
        .send(&[
            raw::parse("s1", "SELECT 10"),
            raw::parse("s2", "SELECT 20"),
            raw::sync(),
        ])
        .await;
    assert_eq!(tags(&client.recv_until_ready().await), "11Z");

    client.send(&[raw::query("DEALLOCATE s1")]).await;
    assert_eq!(tags(&client.recv_until_ready().await), "CZ");
    client.send(&[raw::bind("", "s1", &[]), raw::sync()]).await;
    assert_eq!(client.recv_until_ready().await[0].code(), "26000");

    client.send(&[raw::query("DISCARD ALL")]).await;
    assert_eq!(tags(&client.recv_until_ready().await), "CZ");
    client.send(&[raw::bind("", "s2", &[]), raw::sync()]).await;
    assert_eq!(client.recv_until_ready().await[0].code(), "26000");

    // The same query prepared again works on the server that discarded it.
    client
        .send(&[
            raw::parse("s3", "SELECT 20"),
            raw::bind("", "s3", &[]),
            raw::execute(""),
            raw::sync(),
        ])
        .await;
    let replies = client.recv_until_ready().await;
    assert_eq!(tags(&replies), "12DCZ");
    assert_eq!(replies[2].first_value().as_deref(), Some("20"));

    // Another client preparing the same query is not disturbed.
    let other = skiff.connect("postgres", &db).await;
    let row = other.query_one("SELECT 20", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_statement_cache_is_bounded() {
    let db = database("statement_cache");
    let extra = "default_pool_size = 1\nmax_prepared_statements = 3";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let client = skiff.connect("postgres", &db).await;
    let mut statements = Vec::new();
    for value in 0..8i32 {
        statements.push(
            client
                .prepare(&format!("SELECT {value}::int + $1::int"))
                .await
                .unwrap(),
        );
    }
    for _ in 0..2 {
        for (value, statement) in statements.iter().enumerate() {
            let row = client.query_one(statement, &[&1i32]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), value as i32 + 1);
        }
    }
    // The only server connection has no more than the configured three.
    let row = client
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap();
    let prepared = row.get::<_, i64>(0);
    assert!(
        (1..=3).contains(&prepared),
        "{prepared} statements on the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_plan_change_recovers() {
    let db = database("cached_plan");
    let direct = skiff::connect(&pg().direct(&db)).await;
    direct
        .batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    client
        .send(&[
            raw::parse("q", "SELECT * FROM t"),
            raw::bind("", "q", &[]),
            raw::execute(""),
            raw::sync(),
        ])
        .await;
    assert_eq!(tags(&client.recv_until_ready().await), "12DCZ");

    direct
        .batch_execute("ALTER TABLE t ADD COLUMN b int DEFAULT 5")
        .await
        .unwrap();
    client
        .send(&[raw::bind("", "q", &[]), raw::execute(""), raw::sync()])
        .await;
    let replies = client.recv_until_ready().await;
    assert_eq!(tags(&replies), "EZ");
    assert_eq!(replies[0].code(), "0A000");

    // The next use prepares the statement afresh and sees the new column.
    client
        .send(&[
            raw::bind("", "q", &[]),
            raw::describe(b'P', ""),
            raw::execute(""),
            raw::sync(),
        ])
        .await;
    let replies = client.recv_until_ready().await;
    assert_eq!(tags(&replies), "2TDCZ");
    let columns = i16::from_be_bytes([replies[1].body[0], replies[1].body[1]]);
    assert_eq!(columns, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_follow_each_client() {
    let db = database("startup_settings");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let tokyo = skiff::connect(&format!(
        "{} application_name=alpha options='-c timezone=Asia/Tokyo -c search_path=alpha_schema'",
        skiff.url("postgres", &db)
    ))
    .await;
    let plain = skiff.connect("postgres", &db).await;
    let show = "SELECT current_setting('TimeZone'), current_setting('application_name'), current_setting('search_path')";
    for _ in 0..3 {
        let row = tokyo.query_one(show, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "Asia/Tokyo");
        assert_eq!(row.get::<_, String>(1), "alpha");
        assert_eq!(row.get::<_, String>(2), "alpha_schema");
        let row = plain.query_one(show, &[]).await.unwrap();
        assert_ne!(row.get::<_, String>(0), "Asia/Tokyo");
        assert_eq!(row.get::<_, String>(1), "");
        assert_eq!(row.get::<_, String>(2), "\"$user\", public");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_set_does_not_leak() {
    let db = database("session_set");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let setter = skiff.connect("postgres", &db).await;
    let other = skiff.connect("postgres", &db).await;
    setter
        .simple_query("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    setter
        .simple_query("SET application_name = 'carried'")
        .await
        .unwrap();
    let row = other
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "0");
    assert_eq!(row.get::<_, String>(1), "");
    // A reported setting goes with the client that set it.
    let row = setter
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "carried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_its_own_query() {
    let db = database("cancel_own");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 2")).await;
    let victim = skiff.connect("postgres", &db).await;
    let bystander = skiff.connect("postgres", &db).await;
    let token = victim.cancel_token();
    let bystander_task = tokio::spawn(async move {
        bystander
            .simple_query("SELECT pg_sleep(1.5)")
            .await
            .map(|_| ())
    });
    let victim_task = tokio::spawn(async move {
        let started = Instant::now();
        let result = victim.simple_query("SELECT pg_sleep(30)").await;
        (result.map(|_| ()), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, elapsed) = victim_task.await.unwrap();
    assert_eq!(db_error_code(&result.unwrap_err()), "57014");
    assert!(elapsed < Duration::from_secs(10), "cancel took {elapsed:?}");
    bystander_task
        .await
        .unwrap()
        .expect("the other client's query is not cancelled");

    // A stale key after the client left is ignored.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_leaves_nothing_open() {
    let db = database("killed_client");
    let direct = skiff::connect(&pg().direct(&db)).await;
    direct
        .batch_execute("CREATE TABLE k (v int)")
        .await
        .unwrap();
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let mut doomed = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    doomed
        .send(&[raw::query("BEGIN; INSERT INTO k VALUES (1)")])
        .await;
    let replies = doomed.recv_until_ready().await;
    assert_eq!(replies.last().unwrap().body[0], b'T');
    drop(doomed);

    let next = skiff.connect("postgres", &db).await;
    let row = next.query_one("SELECT count(*) FROM k", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    let open: i64 = pg()
        .psql(&format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in transaction%'"))
        .parse()
        .unwrap();
    assert_eq!(open, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    use futures_util::{SinkExt, StreamExt};
    let db = database("copy_in_out");
    let direct = skiff::connect(&pg().direct(&db)).await;
    direct
        .batch_execute("CREATE TABLE c (id int, name text)")
        .await
        .unwrap();
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let client = skiff.connect("postgres", &db).await;
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for id in 0..1000 {
        data.push_str(&format!("{id}\tname {id}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1000);

    let stream = client.copy_out("COPY c TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // The server went back to the pool in a clean state.
    let other = skiff.connect("postgres", &db).await;
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_and_parameter_status_pass_through() {
    let db = database("notice_status");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    client
        .send(&[raw::query(
            "DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$; SET application_name = 'x'",
        )])
        .await;
    let replies = client.recv_until_ready().await;
    let notice = replies
        .iter()
        .find(|r| r.tag == b'N')
        .expect("notice relayed");
    assert_eq!(notice.message(), "hello from plpgsql");
    let status = replies
        .iter()
        .find(|r| r.tag == b'S')
        .expect("parameter status relayed");
    assert!(status.body.starts_with(b"application_name\0x\0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_stream_through() {
    let db = database("large_rows");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "")).await;
    let client = skiff.connect("postgres", &db).await;
    let rows = client
        .query(
            "SELECT repeat('x', 20 * 1024 * 1024) FROM generate_series(1, 3)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row.get::<_, String>(0).len(), 20 * 1024 * 1024);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_idle_connection_replaced() {
    let db = database("stale_idle");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let client = skiff.connect("postgres", &db).await;
    client.simple_query("SELECT 1").await.unwrap();
    pg().psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let row = client.query_one("SELECT 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_closed_after_timeout() {
    let db = database("idle_timeout");
    let extra = "default_pool_size = 4\nserver_idle_timeout = \"1s\"";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = skiff.url("postgres", &db);
        tasks.push(tokio::spawn(async move {
            let client = skiff::connect(&url).await;
            client.simple_query("SELECT pg_sleep(0.2)").await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(server_connections(&db) >= 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server_connections(&db) > 0 {
        assert!(
            Instant::now() < deadline,
            "idle server connections were not closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_server_for_client() {
    let db = database("session_mode");
    let extra = "pool_mode = \"session\"\ndefault_pool_size = 2";
    let skiff = Skiff::start(&skiff::config(pg().port, &db, extra)).await;
    let client = skiff.connect("postgres", &db).await;
    let first: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let other = skiff.connect("postgres", &db).await;
    other.simple_query("SELECT 1").await.unwrap();
    let second: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, second);
    client.simple_query("SET work_mem = '7MB'").await.unwrap();
    drop(client);
    drop(other);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next client of that server sees it reset.
    let third = skiff.connect("postgres", &db).await;
    let fourth = skiff.connect("postgres", &db).await;
    for client in [&third, &fourth] {
        let row = client
            .query_one("SELECT current_setting('work_mem')", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "4MB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_cancels_never_hit_another_client() {
    let db = database("late_cancels");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let target = skiff.connect("postgres", &db).await;
    let bystander = skiff.connect("postgres", &db).await;
    let token = target.cancel_token();
    let deadline = Instant::now() + Duration::from_secs(3);

    let canceller = tokio::spawn(async move {
        let mut sent = 0;
        while Instant::now() < deadline {
            let _ = token.cancel_query(tokio_postgres::NoTls).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sent
    });
    let targeted = tokio::spawn(async move {
        let mut cancelled = 0;
        while Instant::now() < deadline {
            if target.simple_query("SELECT pg_sleep(0.002)").await.is_err() {
                cancelled += 1;
            }
        }
        cancelled
    });
    let mut bystander_queries = 0;
    while Instant::now() < deadline {
        let result = bystander.simple_query("SELECT pg_sleep(0.001)").await;
        if let Err(err) = &result {
            panic!("a cancel meant for another client hit this one: {err:?}");
        }
        bystander_queries += 1;
    }
    let sent = canceller.await.unwrap();
    let cancelled = targeted.await.unwrap();
    assert!(sent > 100, "only {sent} cancel requests were sent");
    assert!(
        cancelled > 0,
        "no cancel reached the client it was meant for"
    );
    assert!(bystander_queries > 10);
}
