//! The Redis near cache against real servers: hits that never reach Redis,
//! invalidations from Redis itself when another client writes, TTLs,
//! bounded memory, lost tracking connections, cluster resharding and
//! failover, sentinel failover, and redis-py's client-side cache through
//! skiff.
//!
//! The staleness tests print the longest time a value changed by a direct
//! client was still served by skiff (`cargo test --test redis_cache --
//! --nocapture` shows it); they assert only that the new value arrives and
//! that the old one never comes back.

#[path = "support/redis.rs"]
mod redis_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_support::{Cluster, RawClient, RedisServer, Skiff};
use skiff::redis::frame::Protocol;
use skiff::redis::slot::key_slot;

/// Returns the standalone server most tests share. Each test uses keys of
/// its own.
fn server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| RedisServer::start(&[]))
}

const CACHE_RULE: &str = "[[redis.cache]]\nprefix = \"cache:\"\nmax_ttl = \"30s\"\n";

async fn skiff_for(server: &RedisServer, extra: &str) -> Skiff {
    let body = format!(
        "mode = \"standalone\"\nnodes = [\"{}\"]\n{extra}\n{CACHE_RULE}",
        server.addr()
    );
    let skiff = Skiff::start(&body).await;
    wait_for_tracking(&skiff, 1).await;
    skiff
}

async fn skiff(extra: &str) -> Skiff {
    let server = tokio::task::spawn_blocking(server).await.unwrap();
    skiff_for(server, extra).await
}

/// Waits until skiff's tracking connections to `nodes` nodes are up, so
/// the first reads of a test can be cached.
async fn wait_for_tracking(skiff: &Skiff, nodes: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = skiff.status();
        let up = status["cache"]["tracking"].as_array().map_or(0, Vec::len);
        if up >= nodes {
            return;
        }
        assert!(Instant::now() < deadline, "tracking not up: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `key` until a read is served from the cache, which Redis does
/// not see, and returns that reply. The invalidation of a write made just
/// before can still be on its way, and a read that races with it is not
/// stored.
async fn read_until_cached(client: &mut RawClient, server: &RedisServer, key: &str) -> String {
    let started = Instant::now();
    loop {
        let first = client.call(&["GET", key]).await;
        let gets = server.command_calls("get");
        let second = client.call(&["GET", key]).await;
        if server.command_calls("get") == gets {
            assert_eq!(first, second);
            return second;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{key} is never cached"
        );
    }
}

fn cache_size(skiff: &Skiff) -> (u64, u64) {
    let cache = &skiff.status()["cache"];
    (
        cache["entries"].as_u64().unwrap(),
        cache["bytes"].as_u64().unwrap(),
    )
}

/// Reads `key` through `conn` until it returns `expected`, and returns how
/// long that took; fails after 5 seconds.
async fn wait_for_value(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    expected: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let value: Option<String> = conn.get(key).await.unwrap();
        if value.as_deref() == Some(expected) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{key} still reads {value:?}, expected {expected}"
        );
    }
}

/// Writes `key` straight on `direct` for `rounds` rounds while readers
/// hammer it through skiff, and checks after each write that skiff serves
/// the new value soon and never the old one again. Returns the staleness
/// window of each round: from the write's reply to the first read of the
/// new value.
async fn staleness_rounds(
    skiff: &Skiff,
    direct: &mut redis::aio::MultiplexedConnection,
    key: &str,
    rounds: usize,
) -> Vec<Duration> {
    // Readers keep reads in flight, so fills race with invalidations.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut conn = skiff.client(Protocol::Resp2).await;
        let (stop, reads, key) = (stop.clone(), reads.clone(), key.to_string());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _: Option<String> = conn.get(&key).await.unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut conn = skiff.client(Protocol::Resp2).await;
    let mut windows = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let value = format!("v{round}");
        let _: () = direct.set(key, &value).await.unwrap();
        windows.push(wait_for_value(&mut conn, key, &value).await);
        for _ in 0..3 {
            let again: String = conn.get(key).await.unwrap();
            assert_eq!(again, value, "round {round}: an older value came back");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > rounds as u64);
    windows
}

fn report_windows(label: &str, mut windows: Vec<Duration>) {
    windows.sort();
    let at = |fraction: f64| windows[((windows.len() - 1) as f64 * fraction) as usize];
    eprintln!(
        "{label}: {} rounds, staleness window median {:?}, p99 {:?}, worst {:?}",
        windows.len(),
        at(0.5),
        at(0.99),
        windows.last().unwrap()
    );
}

#[tokio::test]
async fn repeated_get_is_served_from_cache() {
    let recorder = skiff::admin::install_recorder();
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["SET", "cache:hit", "v1"]);
    let mut client = skiff.raw().await;
    assert_eq!(
        read_until_cached(&mut client, server, "cache:hit").await,
        "$2\r\nv1\r\n"
    );
    let gets = server.command_calls("get");
    for _ in 0..20 {
        assert_eq!(client.call(&["GET", "cache:hit"]).await, "$2\r\nv1\r\n");
    }
    assert_eq!(
        server.command_calls("get"),
        gets,
        "hits must not reach Redis"
    );
    assert!(cache_size(&skiff).0 >= 1);

    // Keys outside the prefixes always go to Redis.
    server.cli(&["SET", "plain:key", "p"]);
    for _ in 0..3 {
        assert_eq!(client.call(&["GET", "plain:key"]).await, "$1\r\np\r\n");
    }
    assert_eq!(server.command_calls("get"), gets + 3);

    let rendered = recorder.render();
    for series in [
        "skiff_redis_cache_hits_total",
        "skiff_redis_cache_misses_total",
        "skiff_redis_cache_entries",
        "skiff_redis_cache_bytes",
        "skiff_redis_cache_tracking_connections{node=\"127.0.0.1:",
    ] {
        assert!(
            rendered.contains(series),
            "{series} missing from\n{rendered}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_invalidate_standalone() {
    let skiff = skiff("").await;
    let mut direct =
        redis_support::connect_redis_rs(&format!("redis://{}/", server().addr())).await;
    let windows = staleness_rounds(&skiff, &mut direct, "cache:stale", 300).await;
    report_windows("standalone", windows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_that_raced_a_write_is_not_stored() {
    // With one upstream connection, a read queued behind a large reply
    // reaches skiff long after Redis ran it. A direct write in between is
    // reported on the tracking connection first, so the reply that arrives
    // later carries the old value and must not be stored.
    let server = tokio::task::spawn_blocking(|| RedisServer::start(&[]))
        .await
        .unwrap();
    let skiff = skiff_for(&server, "upstream_connections = 1").await;
    let mut direct = redis_support::connect_redis_rs(&format!("redis://{}/", server.addr())).await;
    let big = vec![b'x'; 64 * 1024 * 1024];
    let _: () = direct.set("plain:big", big).await.unwrap();
    let mut raced = 0;
    for pause in [2, 5, 10, 20, 40] {
        let _: () = direct.set("cache:race", "old").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut large = skiff.raw().await;
        let mut small = skiff.raw().await;
        large.send(&["GET", "plain:big"]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        small.send(&["GET", "cache:race"]).await;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let _: () = direct.set("cache:race", "new").await.unwrap();
        let reply = small.read().await;
        assert_eq!(large.read().await.len(), 64 * 1024 * 1024 + 13);
        if &reply[..] != b"$3\r\nold\r\n" {
            // Redis ran the read after the write: no race this time.
            continue;
        }
        raced += 1;
        let mut client = skiff.raw().await;
        let started = Instant::now();
        while client.call(&["GET", "cache:race"]).await != "$3\r\nnew\r\n" {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the reply read before the write was stored after its invalidation"
            );
        }
    }
    assert!(raced > 0, "the read never ran before the write");
}

#[tokio::test]
async fn writes_through_skiff_are_read_back() {
    let skiff = skiff("").await;
    let mut writer = skiff.raw().await;
    let mut reader = skiff.raw().await;
    assert_eq!(writer.call(&["SET", "cache:ryw", "1"]).await, "+OK\r\n");
    for round in 2..20 {
        reader.call(&["GET", "cache:ryw"]).await;
        let value = round.to_string();
        assert_eq!(writer.call(&["SET", "cache:ryw", &value]).await, "+OK\r\n");
        // Another connection, after the writer saw +OK.
        let expected = format!("${}\r\n{value}\r\n", value.len());
        assert_eq!(reader.call(&["GET", "cache:ryw"]).await, expected);
    }

    // Pipelined on one connection: the read queued behind the write returns
    // its value.
    writer.send(&["GET", "cache:ryw"]).await;
    writer.send(&["SET", "cache:ryw", "piped"]).await;
    writer.send(&["GET", "cache:ryw"]).await;
    writer.read().await;
    assert_eq!(&writer.read().await[..], b"+OK\r\n");
    assert_eq!(&writer.read().await[..], b"$5\r\npiped\r\n");

    // Hashes, deletes and EXISTS.
    writer.call(&["DEL", "cache:h"]).await;
    assert_eq!(writer.call(&["HSET", "cache:h", "f", "a"]).await, ":1\r\n");
    assert_eq!(reader.call(&["HGET", "cache:h", "f"]).await, "$1\r\na\r\n");
    assert_eq!(reader.call(&["HGET", "cache:h", "f"]).await, "$1\r\na\r\n");
    assert_eq!(writer.call(&["HSET", "cache:h", "f", "b"]).await, ":0\r\n");
    assert_eq!(reader.call(&["HGET", "cache:h", "f"]).await, "$1\r\nb\r\n");
    assert_eq!(reader.call(&["EXISTS", "cache:h"]).await, ":1\r\n");
    assert_eq!(writer.call(&["DEL", "cache:h"]).await, ":1\r\n");
    assert_eq!(reader.call(&["EXISTS", "cache:h"]).await, ":0\r\n");
    assert_eq!(reader.call(&["HGET", "cache:h", "f"]).await, "$-1\r\n");

    // A transaction's writes are visible once EXEC returns.
    assert_eq!(reader.call(&["GET", "cache:tx"]).await, "$-1\r\n");
    assert_eq!(writer.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(writer.call(&["SET", "cache:tx", "t"]).await, "+QUEUED\r\n");
    assert_eq!(writer.call(&["EXEC"]).await, "*1\r\n+OK\r\n");
    assert_eq!(reader.call(&["GET", "cache:tx"]).await, "$1\r\nt\r\n");
}

#[tokio::test]
async fn pipeline_of_hits_and_misses_keeps_order() {
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["SET", "cache:order", "hot"]);
    let mut client = skiff.raw().await;
    read_until_cached(&mut client, server, "cache:order").await;
    // One write of many requests: cache hits, replies skiff makes itself,
    // and replies from Redis, interleaved.
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for i in 0..300 {
        let value = i.to_string();
        let (command, reply): (Vec<&str>, String) = match i % 4 {
            0 => (vec!["GET", "cache:order"], "$3\r\nhot\r\n".into()),
            1 => (
                vec!["ECHO", &value],
                format!("${}\r\n{value}\r\n", value.len()),
            ),
            2 => (vec!["SET", "plain:order", &value], "+OK\r\n".into()),
            _ => (
                vec!["GET", "plain:order"],
                format!("${}\r\n{}\r\n", (i - 1).to_string().len(), i - 1),
            ),
        };
        batch.extend_from_slice(&skiff::redis::frame::encode_command(&command));
        expected.push(reply);
    }
    client.send_bytes(&batch).await;
    for (i, reply) in expected.iter().enumerate() {
        let got = client.read().await;
        assert_eq!(String::from_utf8_lossy(&got), *reply, "reply {i}");
    }
}

#[tokio::test]
async fn large_hits_keep_order_when_client_lags() {
    let skiff = skiff("").await;
    let server = server();
    // Larger than a socket buffer, so writes to a client that does not
    // read yet stop part way and the rest must follow in order.
    let big = "b".repeat(900 * 1024);
    let mut client = skiff.raw().await;
    // Through skiff: the value is too long for a command-line argument.
    assert_eq!(client.call(&["SET", "cache:big", &big]).await, "+OK\r\n");
    read_until_cached(&mut client, server, "cache:big").await;
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for i in 0..36 {
        let value = i.to_string();
        let (command, reply): (Vec<&str>, String) = if i % 2 == 0 {
            let reply = format!("${}\r\n{big}\r\n", big.len());
            (vec!["GET", "cache:big"], reply)
        } else {
            let reply = format!("${}\r\n{value}\r\n", value.len());
            (vec!["ECHO", &value], reply)
        };
        requests.push(skiff::redis::frame::encode_command(&command));
        expected.push(reply);
    }
    // Sent one request at a time, so most replies are written alone
    // rather than gathered, while the client reads nothing. No reply
    // comes from Redis, so the session writes every one itself.
    for request in &requests {
        client.send_bytes(request).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, reply) in expected.iter().enumerate() {
        let got = client.read().await;
        assert_eq!(got.len(), reply.len(), "length of reply {i}");
        assert!(got == reply.as_bytes(), "reply {i} differs");
    }
}

#[tokio::test]
async fn mget_and_exists_answer_key_by_key() {
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["MSET", "cache:m1", "a", "cache:m2", "b", "plain:m3", "c"]);
    server.cli(&["DEL", "cache:m4"]);
    let mut client = skiff.raw().await;
    let expected = "*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$-1\r\n";
    let mget = ["MGET", "cache:m1", "cache:m2", "plain:m3", "cache:m4"];
    assert_eq!(client.call(&mget).await, expected);
    let before = server.command_calls("mget");
    assert_eq!(client.call(&mget).await, expected);
    // Only the key outside the prefixes went to Redis again.
    assert_eq!(server.command_calls("mget"), before + 1);

    let exists = ["EXISTS", "cache:m1", "cache:m4", "cache:m1"];
    assert_eq!(client.call(&exists).await, ":2\r\n");
    assert_eq!(client.call(&exists).await, ":2\r\n");
    server.cli(&["SET", "cache:m4", "d"]);
    let started = Instant::now();
    while client.call(&exists).await != ":3\r\n" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "EXISTS stays stale"
        );
    }
    assert_eq!(
        client.call(&["MGET", "cache:m4", "cache:m1"]).await,
        "*2\r\n$1\r\nd\r\n$1\r\na\r\n"
    );
    assert_eq!(
        client.call(&["MGET", "cache:m1", "cache:m1"]).await,
        "*2\r\n$1\r\na\r\n$1\r\na\r\n"
    );
}

#[tokio::test]
async fn mget_misses_share_one_read() {
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["MSET", "cache:g1", "a", "cache:g2", "b", "cache:g3", "c"]);
    server.cli(&["DEL", "cache:g4"]);
    let mut client = skiff.raw().await;
    let mget = ["MGET", "cache:g1", "cache:g2", "cache:g3", "cache:g4"];
    let expected = "*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$-1\r\n";
    let (mgets, pttls) = (server.command_calls("mget"), server.command_calls("pttl"));
    assert_eq!(client.call(&mget).await, expected);
    // One MGET for the four misses, and PTTL of each key with it.
    assert_eq!(server.command_calls("mget"), mgets + 1);
    assert_eq!(server.command_calls("pttl"), pttls + 4);

    // Every value read by the shared MGET was stored.
    let mgets = server.command_calls("mget");
    assert_eq!(client.call(&mget).await, expected);
    assert_eq!(client.call(&["GET", "cache:g2"]).await, "$1\r\nb\r\n");
    assert_eq!(server.command_calls("mget"), mgets);

    // A key changed by another client is read again.
    server.cli(&["SET", "cache:g3", "z"]);
    let started = Instant::now();
    let changed = "*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nz\r\n$-1\r\n";
    while client.call(&mget).await != changed {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "MGET stays stale"
        );
    }
}

#[tokio::test]
async fn resp2_and_resp3_replies_are_cached_apart() {
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["DEL", "cache:proto"]);
    server.cli(&["HSET", "cache:proto", "f", "v"]);
    let mut resp2 = skiff.raw().await;
    let mut resp3 = skiff.raw().await;
    resp3.protocol = Protocol::Resp3;
    resp3.call(&["HELLO", "3"]).await;
    for _ in 0..3 {
        assert_eq!(
            resp2.call(&["HGETALL", "cache:proto"]).await,
            "*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
        );
        assert_eq!(
            resp3.call(&["HGETALL", "cache:proto"]).await,
            "%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
        );
        assert_eq!(resp2.call(&["GET", "cache:proto:none"]).await, "$-1\r\n");
        assert_eq!(resp3.call(&["GET", "cache:proto:none"]).await, "_\r\n");
    }
}

#[tokio::test]
async fn key_ttl_and_max_ttl_are_honoured() {
    // Without active expiry Redis deletes an expired key only when it is
    // read, and skiff serves hits without reading it: only skiff's own
    // deadline can end the entry.
    let server =
        tokio::task::spawn_blocking(|| RedisServer::start(&["--enable-debug-command", "yes"]))
            .await
            .unwrap();
    assert_eq!(
        server.cli(&["DEBUG", "SET-ACTIVE-EXPIRE", "0"]).trim(),
        "OK"
    );
    let rule = "[[redis.cache]]\nprefix = \"short:\"\nmax_ttl = \"300ms\"\n";
    let skiff = skiff_for(&server, "").await;
    let mut client = skiff.raw().await;

    server.cli(&["SET", "cache:ttl", "v", "PX", "600"]);
    let set_at = Instant::now();
    assert_eq!(
        read_until_cached(&mut client, &server, "cache:ttl").await,
        "$1\r\nv\r\n"
    );
    assert!(
        set_at.elapsed() < Duration::from_millis(500),
        "the test ran too slowly"
    );
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(set_at.elapsed())).await;
    assert_eq!(client.call(&["GET", "cache:ttl"]).await, "$-1\r\n");

    drop(skiff);
    let body = format!(
        "mode = \"standalone\"\nnodes = [\"{}\"]\n{rule}",
        server.addr()
    );
    let skiff = Skiff::start(&body).await;
    wait_for_tracking(&skiff, 1).await;
    let mut client = skiff.raw().await;
    server.cli(&["SET", "short:k", "v"]);
    assert_eq!(
        read_until_cached(&mut client, &server, "short:k").await,
        "$1\r\nv\r\n"
    );
    let gets = server.command_calls("get");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.call(&["GET", "short:k"]).await, "$1\r\nv\r\n");
    assert_eq!(
        server.command_calls("get"),
        gets + 1,
        "read again after max_ttl"
    );
}

#[tokio::test]
async fn memory_stays_within_max_bytes() {
    const MAX_BYTES: u64 = 64 * 1024;
    let skiff = skiff(&format!("cache_max_bytes = {MAX_BYTES}")).await;
    let server = server();
    let value = "x".repeat(200);
    let mut direct = redis_support::connect_redis_rs(&format!("redis://{}/", server.addr())).await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let mut highest = 0;
    for batch in 0..20 {
        let keys: Vec<String> = (0..100).map(|i| format!("cache:mem:{batch}:{i}")).collect();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), value.as_str())).collect();
        let _: () = direct.mset(&pairs).await.unwrap();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.get(key);
        }
        let values: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
        assert!(values.iter().all(|v| *v == value));
        let (entries, bytes) = cache_size(&skiff);
        assert!(bytes <= MAX_BYTES, "cache holds {bytes} bytes");
        assert!(entries > 0);
        highest = highest.max(bytes);
    }
    let (entries, _) = cache_size(&skiff);
    assert!(
        entries < 2000,
        "{entries} of 2000 replies kept: nothing was evicted"
    );
    assert!(
        highest > MAX_BYTES / 2,
        "the cache filled up to {highest} bytes"
    );
}

/// Returns the ids of skiff's tracking connections on `server`.
fn tracking_connection_ids(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|line| line.contains("name=skiff-cache-tracking"))
        .filter_map(|line| {
            line.split(' ')
                .next()?
                .strip_prefix("id=")
                .map(String::from)
        })
        .collect()
}

#[tokio::test]
async fn lost_tracking_connection_flushes() {
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["SET", "cache:lost", "v1"]);
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["GET", "cache:lost"]).await, "$2\r\nv1\r\n");
    assert_eq!(client.call(&["GET", "cache:lost"]).await, "$2\r\nv1\r\n");

    // The tracking connection is closed in the same transaction as the
    // write, so its invalidation is never sent: only the loss of the
    // connection can tell skiff.
    let ids = tracking_connection_ids(server);
    assert!(!ids.is_empty(), "no tracking connection on the server");
    let mut admin = RawClient::connect(server.addr().parse().unwrap()).await;
    assert_eq!(admin.call(&["MULTI"]).await, "+OK\r\n");
    for id in &ids {
        admin.call(&["CLIENT", "KILL", "ID", id]).await;
    }
    admin.call(&["SET", "cache:lost", "v2"]).await;
    let exec = admin.call(&["EXEC"]).await;
    assert!(exec.ends_with("+OK\r\n"), "{exec}");

    let started = Instant::now();
    loop {
        let value = client.call(&["GET", "cache:lost"]).await;
        if value == "$2\r\nv2\r\n" {
            break;
        }
        assert_eq!(value, "$2\r\nv1\r\n");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the old value is still served after the tracking connection closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Tracking comes back, and with it caching.
    wait_for_tracking(&skiff, 1).await;
    let tracked = Instant::now();
    while tracking_connection_ids(server).is_empty() {
        assert!(tracked.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn resp2_only_server_uses_redirect() {
    // A server that rejects HELLO, as some proxies do: skiff tracks through
    // a RESP2 connection subscribed to the invalidation channel.
    let server =
        tokio::task::spawn_blocking(|| RedisServer::start(&["--rename-command", "HELLO", ""]))
            .await
            .unwrap();
    let skiff = skiff_for(&server, "").await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let mut direct = redis_support::connect_redis_rs(&format!("redis://{}/", server.addr())).await;
    let windows = staleness_rounds(&skiff, &mut direct, "cache:resp2", 50).await;
    report_windows("RESP2 redirect", windows);
    let gets = server.command_calls("get");
    for _ in 0..5 {
        let _: Option<String> = conn.get("cache:resp2").await.unwrap();
    }
    assert_eq!(server.command_calls("get"), gets, "reads are cached");
}

/// Why redis-py's client-side cache cannot be tested here, if it cannot.
fn redis_py_missing() -> Option<String> {
    let output = std::process::Command::new("python3")
        .args(["-c", "from redis.cache import CacheConfig"])
        .output();
    match output {
        Err(err) => Some(format!("python3 not runnable: {err}")),
        Ok(out) if !out.status.success() => Some(format!(
            "redis-py 5.1 or later not installed (pip install redis): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_client_cache_sees_invalidations() {
    if let Some(reason) = redis_py_missing() {
        println!("skipped: {reason}");
        return;
    }
    let skiff = skiff("").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/redis_py_client_cache.py"
    );
    let skiff_port = skiff.addr.port().to_string();
    let redis_port = server().port.to_string();
    // One key under a near cache prefix, one outside.
    let output = tokio::process::Command::new("python3")
        .args([script, &skiff_port, &redis_port, "cache:csc", "csc:plain"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "redis-py failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in ["cache:csc", "csc:plain"] {
        assert_eq!(
            result[key]["reads_reaching_redis"], 0,
            "redis-py's own cache answers repeated reads of {key}: {result}"
        );
        let stale = result[key]["stale_ms"].as_f64().unwrap();
        eprintln!("redis-py through skiff, {key}: new value after {stale:.2} ms");
    }

    // A RESP2 client gets an error that says why tracking is rejected.
    let mut client = skiff.raw().await;
    let refused = client.call(&["CLIENT", "TRACKING", "ON"]).await;
    assert!(
        refused.starts_with("-ERR CLIENT TRACKING through skiff needs RESP3"),
        "{refused}"
    );
}

#[tokio::test]
async fn client_tracking_pushes_invalidations() {
    // A server of its own: another test that kills the shared server's
    // tracking connections would flush this client's tracked keys at any
    // moment.
    let server = tokio::task::spawn_blocking(|| RedisServer::start(&[]))
        .await
        .unwrap();
    let skiff = skiff_for(&server, "").await;
    server.cli(&["SET", "track:k", "1"]);
    let mut client = skiff.raw().await;
    client.protocol = Protocol::Resp3;
    client.call(&["HELLO", "3"]).await;
    assert_eq!(client.call(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n");
    // skiff flushes every tracked key when its own tracking connection
    // comes up, which can come before the reply.
    client.send(&["CLIENT", "TRACKINGINFO"]).await;
    let info = loop {
        let next = client.read().await;
        if !next.starts_with(b">2\r\n$10\r\ninvalidate\r\n_") {
            break String::from_utf8_lossy(&next).into_owned();
        }
    };
    assert!(info.contains("$5\r\nflags\r\n*1\r\n$2\r\non\r\n"), "{info}");
    client.read_until_tracked("track:k", "$1\r\n1\r\n").await;
    server.cli(&["SET", "track:k", "2"]);
    let push = client.read().await;
    assert_eq!(
        &push[..],
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\ntrack:k\r\n"
    );
    // A write through skiff by the tracking client itself.
    assert_eq!(client.call(&["GET", "track:k"]).await, "$1\r\n2\r\n");
    assert_eq!(client.call(&["SET", "track:k", "3"]).await, "+OK\r\n");
    let push = client.read().await;
    assert!(push.starts_with(b">2\r\n$10\r\ninvalidate\r\n"), "{push:?}");
    assert_eq!(client.call(&["CLIENT", "TRACKING", "OFF"]).await, "+OK\r\n");
    assert_eq!(client.call(&["CLIENT", "GETREDIR"]).await, ":-1\r\n");
}

#[tokio::test]
async fn no_cache_rules_open_no_tracking() {
    let server = tokio::task::spawn_blocking(|| RedisServer::start(&[]))
        .await
        .unwrap();
    let body = format!("mode = \"standalone\"\nnodes = [\"{}\"]\n", server.addr());
    let skiff = Skiff::start(&body).await;
    let mut client = skiff.raw().await;
    server.cli(&["SET", "cache:none", "v"]);
    for _ in 0..3 {
        assert_eq!(client.call(&["GET", "cache:none"]).await, "$1\r\nv\r\n");
    }
    assert_eq!(server.command_calls("get"), 3);
    assert!(tracking_connection_ids(&server).is_empty());
    assert!(skiff.status().get("cache").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_cache_fresh() {
    const NAME: &str = "cachegroup";
    let (servers, sentinel) =
        tokio::task::spawn_blocking(|| redis_support::start_sentinel_group(NAME))
            .await
            .unwrap();
    let body = format!(
        "mode = \"sentinel\"\nnodes = [\"{}\"]\nmaster_name = \"{NAME}\"\nconnect_timeout = \"1s\"\n\
         {CACHE_RULE}",
        sentinel.addr()
    );
    let skiff = Skiff::start(&body).await;
    wait_for_tracking(&skiff, 3).await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let primary_url = format!("redis://{}/", servers.primary.addr());
    let mut direct = redis_support::connect_redis_rs(&primary_url).await;
    let windows = staleness_rounds(&skiff, &mut direct, "cache:sentinel", 50).await;
    report_windows("sentinel", windows);

    let old_port = servers.primary.port;
    assert_eq!(sentinel.cli(&["SENTINEL", "FAILOVER", NAME]).trim(), "OK");
    let new_primary = loop {
        let port = redis_support::reported_primary_port(&sentinel, NAME);
        if port != 0 && port != old_port {
            break servers.replicas.iter().find(|r| r.port == port).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    new_primary.wait_for(
        || new_primary.info_field("replication", "role") == "master",
        "promotion",
    );
    let new_url = format!("redis://{}/", new_primary.addr());
    let mut direct = redis_support::connect_redis_rs(&new_url).await;
    let _: () = direct.set("cache:sentinel", "after").await.unwrap();
    // Until skiff learns of the failover, reads still go to the old
    // primary, which serves the old value until it replicates from the new
    // one; that can take seconds on a busy machine.
    let started = Instant::now();
    loop {
        let value: redis::RedisResult<Option<String>> = conn.get("cache:sentinel").await;
        if matches!(&value, Ok(Some(value)) if value == "after") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "cache:sentinel still reads {value:?} after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "sentinel: value written on the new primary served after {:?}",
        started.elapsed()
    );
    drop(sentinel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_resharding_and_failover() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start_with_node_timeout(1000))
        .await
        .unwrap();
    let body = format!(
        "mode = \"cluster\"\nnodes = {}\nconnect_timeout = \"1s\"\n{CACHE_RULE}",
        cluster.seeds_toml()
    );
    let skiff = Skiff::start(&body).await;
    wait_for_tracking(&skiff, 6).await;
    let mut conn = skiff.client(Protocol::Resp2).await;

    // Invalidations from each key's own primary.
    let mut all_windows = Vec::new();
    for i in 0..3 {
        let key = format!("cache:cluster:{i}");
        let owner = cluster.primary_for_slot(key_slot(key.as_bytes()));
        let mut direct =
            redis_support::connect_redis_rs(&format!("redis://{}/", owner.addr())).await;
        all_windows.extend(staleness_rounds(&skiff, &mut direct, &key, 100).await);
    }
    report_windows("cluster", all_windows);

    // Resharding: the slot of a cached key, and of a cached missing key,
    // moves to another primary; writes there must reach skiff's cache.
    let key = "cache:{moving}:a";
    let missing = "cache:{moving}:b";
    let slot = key_slot(key.as_bytes());
    let source = cluster.primary_for_slot(slot);
    let target = cluster
        .primaries()
        .into_iter()
        .find(|node| node.port != source.port)
        .unwrap();
    source.cli(&["SET", key, "before"]);
    let _: Option<String> = conn.get(missing).await.unwrap();
    wait_for_value(&mut conn, key, "before").await;
    let (source_id, target_id) = (
        source.cli(&["CLUSTER", "MYID"]).trim().to_string(),
        target.cli(&["CLUSTER", "MYID"]).trim().to_string(),
    );
    let slot_text = slot.to_string();
    target.cli(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id]);
    source.cli(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id]);
    let port = target.port.to_string();
    let migrated = source.cli(&["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key]);
    assert_eq!(migrated.trim(), "OK");
    for node in [target, source] {
        node.cli(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]);
    }
    for node in cluster.primaries() {
        node.cli(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]);
    }
    target.cli(&["SET", key, "moved"]);
    target.cli(&["SET", missing, "appeared"]);
    wait_for_value(&mut conn, key, "moved").await;
    wait_for_value(&mut conn, missing, "appeared").await;

    // Failover: the primary of a cached key dies; its replica takes over.
    let key = "cache:failover";
    let victim = cluster.primary_for_slot(key_slot(key.as_bytes())).port;
    let victim_node = cluster
        .nodes
        .iter()
        .find(|node| node.port == victim)
        .unwrap();
    victim_node.cli(&["SET", key, "before"]);
    assert_eq!(victim_node.cli(&["WAIT", "1", "5000"]).trim(), "1");
    wait_for_value(&mut conn, key, "before").await;
    let replica_port = cluster
        .replicas()
        .iter()
        .find(|node| node.info_field("replication", "master_port") == victim.to_string())
        .map(|node| node.port)
        .unwrap();
    cluster
        .nodes
        .iter_mut()
        .find(|node| node.port == victim)
        .unwrap()
        .kill();
    let promoted = cluster
        .nodes
        .iter()
        .find(|node| node.port == replica_port)
        .unwrap();
    promoted.wait_for(
        || promoted.info_field("replication", "role") == "master",
        "promotion",
    );
    promoted.cli(&["SET", key, "after"]);
    let started = Instant::now();
    loop {
        let value: redis::RedisResult<Option<String>> = conn.get(key).await;
        if let Ok(Some(value)) = &value {
            if value == "after" {
                break;
            }
            assert_eq!(value, "before");
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the failed-over key still reads {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "cluster failover: new value served {:?} after the write",
        started.elapsed()
    );
}
