//! Attacks on the PostgreSQL relay with real clients and a real server:
//! cancel requests that race server connection reuse, and session state
//! that could pass from one client to the next.

mod support;

use std::time::Duration;

use support::postgres::PgServer;
use support::raw::{self, RawClient};
use support::skiff::{self, Skiff};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

/// The CancelRequest code of the PostgreSQL startup packet.
const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Starts a TCP relay to the shared server that delays every CancelRequest
/// by `delay` before passing it on, as a loaded server or network would.
/// Other connections pass at once. Returns the relay's port.
async fn start_cancel_delaying_relay(server_port: u16, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(relay_connection(client, server_port, delay));
        }
    });
    port
}

async fn relay_connection(mut client: TcpStream, server_port: u16, delay: Duration) {
    let mut head = [0u8; 8];
    if client.read_exact(&mut head).await.is_err() {
        return;
    }
    let code = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let mut first = head.to_vec();
    if code == CANCEL_REQUEST_CODE {
        let mut key = [0u8; 8];
        if client.read_exact(&mut key).await.is_err() {
            return;
        }
        first.extend_from_slice(&key);
        // The request goes on even when the sender stopped waiting, as it
        // would from a server's listen queue.
        tokio::time::sleep(delay).await;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", server_port)).await else {
        return;
    };
    if server.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// Starts skiff with one server connection for a new database and connects
/// two clients, which share that connection.
async fn two_clients_one_server(
    db: &str,
) -> (Skiff, tokio_postgres::Client, tokio_postgres::Client) {
    pg().create_database(db);
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 1")).await;
    let owner = skiff.connect("postgres", db).await;
    let other = skiff.connect("postgres", db).await;
    (skiff, owner, other)
}

/// Returns the session's statement_timeout setting as SHOW prints it.
async fn statement_timeout(client: &tokio_postgres::Client) -> String {
    let row = client.query_one("SHOW statement_timeout", &[]).await;
    row.unwrap().get(0)
}

/// A cancel request that skiff stopped waiting for can still reach the
/// server later. The server connection it targeted must not go to another
/// client, or that client's query is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_cancel_never_hits_next_client() {
    let db = "slow_cancel";
    pg().create_database(db);
    let relay_port = start_cancel_delaying_relay(pg().port, Duration::from_secs(4)).await;
    let skiff = Skiff::start(&skiff::config(relay_port, db, "default_pool_size = 1")).await;
    let target = skiff.connect("postgres", db).await;
    let bystander = skiff.connect("postgres", db).await;

    let token = target.cancel_token();
    let query = tokio::spawn(async move { target.simple_query("SELECT pg_sleep(0.5)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancel = tokio::spawn(async move { token.cancel_query(tokio_postgres::NoTls).await });

    // The bystander waits for the only server connection and then runs
    // past the moment the held cancel request reaches the server.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let result = bystander.simple_query("SELECT pg_sleep(5)").await;
    assert!(
        result.is_ok(),
        "a cancel meant for another client hit this one: {:?}",
        result.err()
    );
    let _ = query.await.unwrap();
    let _ = cancel.await;
}

/// A prepared statement whose SQL changes session state without a SET
/// command tag changes it again at every Execute, also in a later
/// transaction on a server connection that was reset in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_set_config_never_leaks() {
    let (_skiff, owner, other) = two_clients_one_server("prepared_set_config").await;
    let default = statement_timeout(&other).await;

    let set = owner
        .prepare("SELECT set_config('statement_timeout', $1, false)")
        .await
        .unwrap();
    owner.query_one(&set, &[&"1234"]).await.unwrap();
    // The other client's query resets the server connection first.
    let seen = statement_timeout(&other).await;
    assert_eq!(seen, default, "the first set_config leaked");

    owner.query_one(&set, &[&"4321"]).await.unwrap();
    let seen = statement_timeout(&other).await;
    assert_eq!(seen, default, "set_config of a second Execute leaked");
}

/// DEALLOCATE ALL and DISCARD ALL drop the client's prepared statements
/// however the SQL is written, so their names can be prepared again, as
/// PostgreSQL allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_with_comments() {
    let db = "deallocate_all_comments";
    pg().create_database(db);
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 1")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", db, &[]).await;
    let statements = [
        "/* drop them */ DEALLOCATE ALL",
        "-- drop them\nDISCARD ALL",
        "SELECT 1; DEALLOCATE ALL",
        "deallocate all -- now",
    ];
    for sql in statements {
        client
            .send(&[raw::parse("kept", "SELECT 1"), raw::sync()])
            .await;
        let parsed = raw::tags(&client.recv_until_ready().await);
        assert_eq!(parsed, "1Z", "Parse before {sql:?}");

        client.send(&[raw::query(sql)]).await;
        let replies = client.recv_until_ready().await;
        assert!(
            replies.iter().all(|reply| reply.tag != b'E'),
            "{sql:?} failed: {replies:?}"
        );
    }
    client
        .send(&[raw::parse("kept", "SELECT 1"), raw::sync()])
        .await;
    let parsed = raw::tags(&client.recv_until_ready().await);
    assert_eq!(parsed, "1Z");
}

/// An error in the middle of a pipeline with a Flush skips the rest up to
/// Sync, as PostgreSQL does, and leaves the server connection usable by the
/// next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_error_after_flush() {
    let db = "pipeline_error_flush";
    pg().create_database(db);
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 1")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", db, &[]).await;
    client
        .send(&[
            raw::parse("", "SELECT 1"),
            raw::bind("", "", &[]),
            raw::execute(""),
            raw::flush(),
        ])
        .await;
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(client.recv().await);
    }
    assert_eq!(raw::tags(&replies), "12DC");

    let mut pipeline = Vec::new();
    for sql in ["SELECT 2", "SELECT 1/0", "SELECT 3"] {
        pipeline.push(raw::parse("", sql));
        pipeline.push(raw::bind("", "", &[]));
        pipeline.push(raw::execute(""));
    }
    pipeline.push(raw::sync());
    client.send(&pipeline).await;
    let replies = client.recv_until_ready().await;
    // PostgreSQL folds 1/0 when it plans the statement at Bind.
    assert_eq!(raw::tags(&replies), "12DC1EZ");
    assert_eq!(replies[5].code(), "22012");
    assert_eq!(replies.last().unwrap().body[0], b'I');

    let mut next = RawClient::connect(skiff.port, "postgres", db, &[]).await;
    next.send(&[raw::query("SELECT 4")]).await;
    let replies = next.recv_until_ready().await;
    assert_eq!(raw::tags(&replies), "TDCZ");
    assert_eq!(replies[1].first_value().as_deref(), Some("4"));
}

/// Large requests and large results pipelined together: skiff writes to the
/// server while the server writes results back, and neither may wait for
/// the other forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_large_requests_and_results() {
    let db = "pipelined_large";
    pg().create_database(db);
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 1")).await;
    let client = skiff.connect("postgres", db).await;
    let statement = client
        .prepare("SELECT length($1::text), repeat('y', 200000)")
        .await
        .unwrap();
    let payload = "x".repeat(200_000);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&payload];
    let queries = (0..200).map(|_| client.query_one(&statement, &params));
    let all = futures_util::future::join_all(queries);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("the pipeline finished within 60 s");
    for result in results {
        let row = result.unwrap();
        assert_eq!(row.get::<_, i32>(0), 200_000);
        assert_eq!(row.get::<_, String>(1).len(), 200_000);
    }
}

/// A DO block can run SET through EXECUTE, which sends no SET command tag
/// and mentions none of the words skiff looks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_block_set_never_leaks() {
    let (_skiff, owner, other) = two_clients_one_server("do_block_set").await;
    let default = statement_timeout(&other).await;

    owner
        .batch_execute("DO $$ BEGIN EXECUTE 'SET statement_timeout = 4321'; END $$")
        .await
        .unwrap();
    let seen = statement_timeout(&other).await;
    assert_eq!(seen, default);
}

/// A flood of NOTICE messages reaches the client in full and leaves the
/// server connection clean for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_flood_passes_through() {
    let db = "notice_flood";
    pg().create_database(db);
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 1")).await;
    let mut client = RawClient::connect(skiff.port, "postgres", db, &[]).await;
    let flood = "DO $$ BEGIN FOR i IN 1..50000 LOOP RAISE NOTICE 'notice %', i; END LOOP; END $$";
    client.send(&[raw::query(flood)]).await;
    let replies = client.recv_until_ready().await;
    let notices = replies.iter().filter(|reply| reply.tag == b'N').count();
    assert_eq!(notices, 50_000);
    assert_eq!(replies.last().unwrap().body[0], b'I');

    let next = skiff.connect("postgres", db).await;
    let row = next.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// In session mode a client that ran LISTEN gets NOTIFY messages while it
/// is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_in_session_mode() {
    let db = "listen_session";
    pg().create_database(db);
    let extra = "pool_mode = \"session\"\ndefault_pool_size = 2";
    let skiff = Skiff::start(&skiff::config(pg().port, db, extra)).await;
    let mut listener = RawClient::connect(skiff.port, "postgres", db, &[]).await;
    listener.send(&[raw::query("LISTEN news")]).await;
    let replies = listener.recv_until_ready().await;
    assert_eq!(raw::tags(&replies), "CZ");

    let sender = skiff.connect("postgres", db).await;
    for index in 0..100 {
        let sql = format!("NOTIFY news, 'item {index}'");
        sender.batch_execute(&sql).await.unwrap();
    }
    for index in 0..100 {
        let reply = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10 s");
        assert_eq!(reply.tag, b'A');
        let payload = format!("item {index}");
        let body = String::from_utf8_lossy(&reply.body);
        assert!(body.contains(&payload), "{body:?} lacks {payload:?}");
    }
}

/// Several clients flood their own queries with cancel requests while
/// others share the same two server connections: no cancel may reach a
/// client that sent none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_storm_spares_bystanders() {
    let db = "cancel_storm";
    pg().create_database(db);
    let skiff = Skiff::start(&skiff::config(pg().port, db, "default_pool_size = 2")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut targets = Vec::new();
    for _ in 0..4 {
        let client = skiff.connect("postgres", db).await;
        let token = client.cancel_token();
        targets.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
            }
        }));
        targets.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let _ = client.simple_query("SELECT pg_sleep(0.001)").await;
            }
        }));
    }
    let mut bystanders = Vec::new();
    for _ in 0..4 {
        let client = skiff.connect("postgres", db).await;
        bystanders.push(tokio::spawn(async move {
            let mut queries = 0;
            while tokio::time::Instant::now() < deadline {
                let result = client.query_one("SELECT pg_sleep(0.001)", &[]).await;
                if let Err(err) = result {
                    return Err(err.to_string());
                }
                queries += 1;
            }
            Ok(queries)
        }));
    }
    for bystander in bystanders {
        let queries = bystander.await.unwrap();
        assert!(queries.is_ok(), "bystander query failed: {queries:?}");
        assert!(queries.unwrap() > 0);
    }
    for target in targets {
        target.await.unwrap();
    }
}
