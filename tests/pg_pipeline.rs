//! Queries queued behind a running one (`pipeline_queries`): with every
//! server connection busy, the simple Query of the client that has waited
//! longest is written behind another client's, and that client gets the
//! connection when the first Query ends. Each client must still get its
//! own reply, and nothing that happens to the first Query may reach it.

mod support;

use std::time::Duration;

use support::postgres::PgServer;
use support::raw::{self, RawClient};
use support::skiff::{self, Skiff};
use tokio_postgres::SimpleQueryMessage;

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

fn database(name: &str) -> String {
    pg().create_database(name);
    name.to_string()
}

/// Reads `skiff_pg_queued_queries_total` for the pool of `db` and the
/// postgres user.
fn queued_queries(db: &str) -> u64 {
    let text = skiff::metrics_text();
    let prefix = format!("skiff_pg_queued_queries_total{{pool=\"{db}/postgres\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.trim().parse().expect("a counter value"))
}

/// Returns the first column of the first row of a simple query's reply.
fn first_value(messages: &[SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

fn error_code(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|db| db.code().code().to_string())
        .unwrap_or_else(|| format!("not a database error: {err}"))
}

async fn within_20s<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("finishes in time")
}

/// Waits for every task, at most 20 s in all, and fails on a panic in any.
async fn join_within_20s(tasks: Vec<tokio::task::JoinHandle<()>>) {
    within_20s(async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_its_own_reply() {
    let db = database("pipeline_replies");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 2")).await;
    let mut tasks = Vec::new();
    for id in 0..60 {
        let client = skiff.connect("postgres", &db).await;
        tasks.push(tokio::spawn(async move {
            for round in 0..30 {
                let sql = format!("SELECT '{id}:{round}:' || pg_backend_pid()");
                let messages = client.simple_query(&sql).await.unwrap();
                let value = first_value(&messages);
                assert!(
                    value.starts_with(&format!("{id}:{round}:")),
                    "client {id} round {round} got {value}"
                );
            }
        }));
    }
    join_within_20s(tasks).await;
    assert!(
        queued_queries(&db) > 0,
        "no query was queued behind another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_stay_with_their_query() {
    let db = database("pipeline_errors");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let failing = skiff.connect("postgres", &db).await;
    let failing_task = tokio::spawn(async move {
        for _ in 0..100 {
            let err = failing.simple_query("SELECT 1/0").await.unwrap_err();
            assert_eq!(error_code(&err), "22012");
        }
    });
    let mut tasks = vec![failing_task];
    for id in 0..4 {
        let client = skiff.connect("postgres", &db).await;
        tasks.push(tokio::spawn(async move {
            for round in 0..100 {
                let sql = format!("SELECT {id} * 1000 + {round}");
                let messages = client.simple_query(&sql).await.unwrap();
                assert_eq!(first_value(&messages), (id * 1000 + round).to_string());
            }
        }));
    }
    join_within_20s(tasks).await;
    assert!(
        queued_queries(&db) > 0,
        "no query was queued behind another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_spare_queued_queries() {
    let db = database("pipeline_cancels");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let sleeper = skiff.connect("postgres", &db).await;
    let token = sleeper.cancel_token();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Cancels at uneven gaps, so some land while the short sleep runs and
    // some as it ends, when the queued Query starts right after it.
    let canceller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut gap = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
                gap = gap % 9 + 1;
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
        })
    };

    let sleeper_task = tokio::spawn(async move {
        for _ in 0..150 {
            match sleeper.simple_query("SELECT pg_sleep(0.003)").await {
                Ok(_) => {}
                Err(err) => assert_eq!(error_code(&err), "57014"),
            }
        }
    });

    let mut tasks = Vec::new();
    for id in 0..3 {
        let client = skiff.connect("postgres", &db).await;
        tasks.push(tokio::spawn(async move {
            for round in 0..150 {
                let sql = format!("SELECT {id} * 1000 + {round} FROM pg_sleep(0.001)");
                let messages = client
                    .simple_query(&sql)
                    .await
                    .unwrap_or_else(|err| panic!("client {id} round {round}: {err}"));
                assert_eq!(first_value(&messages), (id * 1000 + round).to_string());
            }
        }));
    }

    tasks.push(sleeper_task);
    join_within_20s(tasks).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    canceller.await.unwrap();
    assert!(
        queued_queries(&db) > 0,
        "no query was queued behind another"
    );
}

/// Runs `sql` on a new client in the background. On a pool of one,
/// clients started this way in turn queue up in that order.
async fn start_query(
    skiff: &Skiff,
    db: &str,
    sql: &'static str,
) -> tokio::task::JoinHandle<Result<String, tokio_postgres::Error>> {
    let client = skiff.connect("postgres", db).await;
    let task = tokio::spawn(async move {
        let result = client.simple_query(sql).await;
        result.map(|messages| first_value(&messages))
    });
    // Long enough for the query to reach skiff before the next one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_query_outlives_leaving_client() {
    let db = database("pipeline_leaver");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    // The holder keeps the one connection while the next two queue up; the
    // leaver then gets it, and the waiter's query goes behind the leaver's.
    let holder = start_query(&skiff, &db, "SELECT 1 FROM pg_sleep(0.3)").await;
    let leaver = start_query(&skiff, &db, "SELECT 2 FROM pg_sleep(1)").await;
    let waiter = start_query(&skiff, &db, "SELECT 42").await;
    assert_eq!(within_20s(holder).await.unwrap().unwrap(), "1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(queued_queries(&db) > 0, "the query was not queued");
    // Dropping the task drops the client, which closes its connection
    // while its query still runs.
    leaver.abort();
    assert_eq!(within_20s(waiter).await.unwrap().unwrap(), "42");
    // The connection went on to the waiter and back to the pool.
    let next = skiff.connect("postgres", &db).await;
    let messages = within_20s(next.simple_query("SELECT 7")).await.unwrap();
    assert_eq!(first_value(&messages), "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_query_server_dies() {
    let db = database("pipeline_server_lost");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let holder = start_query(&skiff, &db, "SELECT 1 FROM pg_sleep(0.3)").await;
    let doomed = start_query(&skiff, &db, "SELECT 2 FROM pg_sleep(5)").await;

    let queued = skiff.connect("postgres", &db).await;
    let queued_task = tokio::spawn(async move {
        let result = queued
            .simple_query("SELECT 42")
            .await
            .map(|m| first_value(&m));
        (result, queued)
    });

    assert_eq!(within_20s(holder).await.unwrap().unwrap(), "1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(queued_queries(&db) > 0, "the query was not queued");

    let direct = skiff::connect(&pg().direct(&db)).await;
    direct
        .simple_query(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{db}' AND pid <> pg_backend_pid()"
        ))
        .await
        .unwrap();

    assert!(within_20s(doomed).await.unwrap().is_err());
    let (result, queued) = within_20s(queued_task).await.unwrap();
    // The Query was queued behind the killed one, so it never ran: the
    // client hears that the server connection went, and its next query
    // works on a new one.
    assert_eq!(error_code(&result.unwrap_err()), "08006");
    let messages = within_20s(queued.simple_query("SELECT 43")).await.unwrap();
    assert_eq!(first_value(&messages), "43");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_queued_behind_transactions() {
    let db = database("pipeline_ineligible");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let first = skiff.connect("postgres", &db).await;
    let second = skiff.connect("postgres", &db).await;
    // A transaction keeps the connection; the other client's plain query
    // must wait for its end, not run inside it.
    first.simple_query("BEGIN").await.unwrap();
    first
        .simple_query("CREATE TEMP TABLE t (v int) ON COMMIT DROP")
        .await
        .unwrap();
    let probe = tokio::spawn(async move {
        let messages = second
            .simple_query(
                "SELECT count(*) FROM pg_class WHERE relname = 't' AND relpersistence = 't'",
            )
            .await
            .unwrap();
        first_value(&messages)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !probe.is_finished(),
        "the query ran inside the open transaction"
    );
    first.simple_query("COMMIT").await.unwrap();
    assert_eq!(within_20s(probe).await.unwrap(), "0");
    assert_eq!(queued_queries(&db), 0, "a query went behind a transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_get_own_replies() {
    let db = database("pipeline_prepared");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 2")).await;
    let mut tasks = Vec::new();
    for id in 0..40i32 {
        let client = skiff.connect("postgres", &db).await;
        tasks.push(tokio::spawn(async move {
            let statement = client
                .prepare("SELECT $1::int * 1000 + $2::int, pg_backend_pid()")
                .await
                .unwrap();
            for round in 0..40i32 {
                let row = client.query_one(&statement, &[&id, &round]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), id * 1000 + round, "client {id}");
            }
        }));
    }
    join_within_20s(tasks).await;
    assert!(
        queued_queries(&db) > 0,
        "no request was queued behind another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_errors_stay_with_their_request() {
    let db = database("pipeline_prepared_errors");
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let mut tasks = Vec::new();
    for id in 0..5i32 {
        let client = skiff.connect("postgres", &db).await;
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare("SELECT 100 / $1::int").await.unwrap();
            for round in 0..60i32 {
                // Client 0 divides by zero every time; the others never do.
                let divisor = if id == 0 { 0 } else { 1 + (round % 5) };
                match client.query_one(&statement, &[&divisor]).await {
                    Ok(row) => {
                        assert_ne!(id, 0, "client 0 got a row");
                        assert_eq!(row.get::<_, i32>(0), 100 / divisor);
                    }
                    Err(err) => {
                        assert_eq!(id, 0, "client {id} got {err}");
                        assert_eq!(error_code(&err), "22012");
                    }
                }
            }
        }));
    }
    join_within_20s(tasks).await;
    assert!(
        queued_queries(&db) > 0,
        "no request was queued behind another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_bind_survives_a_plan_change() {
    let db = database("pipeline_plan_change");
    let direct = skiff::connect(&pg().direct(&db)).await;
    direct
        .batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    let first = skiff.connect("postgres", &db).await;
    let second = skiff.connect("postgres", &db).await;
    let sql = "SELECT a FROM t";
    let (first_statement, second_statement) = (
        first.prepare(sql).await.unwrap(),
        second.prepare(sql).await.unwrap(),
    );
    first.query(&first_statement, &[]).await.unwrap();
    second.query(&second_statement, &[]).await.unwrap();

    // The server's cached plan now returns another type. The column
    // count stays, so the client takes the rows without decoding them.
    direct
        .batch_execute("ALTER TABLE t ALTER COLUMN a TYPE text")
        .await
        .unwrap();
    let before = queued_queries(&db);

    // A holder keeps the connection until both Binds wait, so the second
    // one is queued behind the first.
    let holder = start_query(&skiff, &db, "SELECT 1 FROM pg_sleep(0.3)").await;
    let first_task = tokio::spawn(async move { first.query(&first_statement, &[]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second_task = tokio::spawn(async move { second.query(&second_statement, &[]).await });
    assert_eq!(within_20s(holder).await.unwrap().unwrap(), "1");

    // The first Bind may get the error once, as without queueing; the
    // queued one is sent again on a fresh prepare instead.
    if let Err(err) = within_20s(first_task).await.unwrap() {
        assert_eq!(error_code(&err), "0A000");
    }
    let second_result = within_20s(second_task).await.unwrap();
    assert!(
        second_result.is_ok(),
        "the queued Bind failed: {:?}",
        second_result.err()
    );
    assert!(queued_queries(&db) > before, "the Bind was not queued");

    // Nothing of either request is left on the connection for the next
    // client.
    let next = skiff.connect("postgres", &db).await;
    let messages = within_20s(next.simple_query("SELECT 7")).await.unwrap();
    assert_eq!(first_value(&messages), "7");
    let statement = next.prepare(sql).await.unwrap();
    let rows = within_20s(next.query(&statement, &[])).await.unwrap();
    assert_eq!(rows.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_queued_inside_extended_begin() {
    let db = database("pipeline_extended_begin");
    let direct = skiff::connect(&pg().direct(&db)).await;
    direct
        .batch_execute("CREATE TABLE acks (client int)")
        .await
        .unwrap();
    let skiff = Skiff::start(&skiff::config(pg().port, &db, "default_pool_size = 1")).await;
    // Two clients with the same startup settings, so either one's request
    // fits a connection the other used.
    let mut queued = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    queued
        .send(&[raw::parse("q", "INSERT INTO acks VALUES (2)"), raw::sync()])
        .await;
    within_20s(queued.recv_until_ready()).await;
    let mut running = RawClient::connect(skiff.port, "postgres", &db, &[]).await;
    running
        .send(&[
            raw::parse("b", "BEGIN"),
            raw::parse("i", "INSERT INTO acks VALUES (1)"),
            raw::sync(),
        ])
        .await;
    within_20s(running.recv_until_ready()).await;

    // BEGIN through Bind, Execute and Flush: the transaction is open, but
    // no ReadyForQuery has reported it yet.
    running
        .send(&[raw::bind("", "b", &[]), raw::execute(""), raw::flush()])
        .await;
    for _ in 0..2 {
        within_20s(running.recv()).await;
    }
    let queued_task = tokio::spawn(async move {
        queued
            .send(&[raw::bind("", "q", &[]), raw::execute(""), raw::sync()])
            .await;
        raw::tags(&queued.recv_until_ready().await)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // This batch ends the BEGIN's extended run; the waiting client's
    // INSERT must not go behind it, into the open transaction.
    running
        .send(&[raw::bind("", "i", &[]), raw::execute(""), raw::sync()])
        .await;
    let replies = within_20s(running.recv_until_ready()).await;
    assert_eq!(raw::tags(&replies), "2CZ");
    assert_eq!(&replies.last().unwrap().body[..], b"T");
    running.send(&[raw::query("COMMIT")]).await;
    assert_eq!(
        raw::tags(&within_20s(running.recv_until_ready()).await),
        "CZ"
    );

    assert_eq!(within_20s(queued_task).await.unwrap(), "2CZ");
    let rows = direct
        .query_one("SELECT count(*) FROM acks", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 2);
    assert_eq!(
        queued_queries(&db),
        0,
        "a request went into the transaction"
    );
}
