//! `[[redis.routes]]` against real servers: a database route in front of a
//! standalone server while `[redis]` is a cluster (Celery's broker in
//! database 1), prefix routes, blocking commands and transactions on a
//! route, config checks, and a route's server restarting.

#[path = "support/redis.rs"]
mod redis_support;

use std::process::Command;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_support::{connect_redis_rs, Cluster, RedisServer, Skiff};
use skiff::redis::frame::Protocol;
use skiff::redis::slot::key_slot;

/// Starts skiff with a standalone `[redis]` on `main` and a route
/// `celery` for the prefixes `celery` and `_kombu.` on `route`.
async fn prefix_skiff(main: &RedisServer, route: &RedisServer) -> Skiff {
    let body = format!(
        "nodes = [\"{}\"]\n\
         [[redis.routes]]\nname = \"celery\"\nprefixes = [\"celery\", \"_kombu.\"]\n\
         nodes = [\"{}\"]\n",
        main.addr(),
        route.addr()
    );
    Skiff::start(&body).await
}

#[tokio::test]
async fn celery_database_route_beside_cluster() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let broker = RedisServer::start(&[]);
    let body = format!(
        "mode = \"cluster\"\nnodes = {}\n\
         [[redis.routes]]\nname = \"celery\"\ndatabase = 1\nnodes = [\"{}\"]\n",
        cluster.seeds_toml(),
        broker.addr()
    );
    let skiff = Skiff::start(&body).await;

    // redis-rs sends SELECT 1 for the /1 in the URL, as Celery's broker
    // URL does.
    let mut celery = connect_redis_rs(&format!("redis://{}/1", skiff.addr)).await;
    let queues = ["celery", "celery\u{6}\u{16}1", "celery\u{6}\u{16}2"];
    let slots: std::collections::HashSet<u16> =
        queues.iter().map(|q| key_slot(q.as_bytes())).collect();
    assert_eq!(slots.len(), 3, "the queues are in different cluster slots");
    for (index, queue) in queues.iter().enumerate() {
        let _: i64 = celery.lpush(queue, format!("task-{index}")).await.unwrap();
    }
    for queue in queues {
        assert_eq!(
            broker.cli(&["LLEN", queue]).trim(),
            "1",
            "{queue:?} on the route"
        );
        let owner = cluster.primary_for_slot(key_slot(queue.as_bytes()));
        assert_eq!(
            owner.cli(&["EXISTS", queue]).trim(),
            "0",
            "{queue:?} not in the cluster"
        );
    }

    // BRPOP over keys of three slots, which a cluster rejects.
    let mut popped = Vec::new();
    for _ in 0..3 {
        let (queue, task): (String, String) = redis::cmd("BRPOP")
            .arg(&queues[..])
            .arg(1)
            .query_async(&mut celery)
            .await
            .unwrap();
        popped.push((queue, task));
    }
    let expected: Vec<(String, String)> = queues
        .iter()
        .enumerate()
        .map(|(index, queue)| (queue.to_string(), format!("task-{index}")))
        .collect();
    assert_eq!(popped, expected);

    // Database 0 is still the cluster.
    let mut cache = skiff.client(Protocol::Resp2).await;
    let _: () = cache.set("cache:key", "v").await.unwrap();
    let owner = cluster.primary_for_slot(key_slot(b"cache:key"));
    assert_eq!(owner.cli(&["GET", "cache:key"]).trim(), "v");
    assert_eq!(broker.cli(&["EXISTS", "cache:key"]).trim(), "0");

    // SELECT of another database is still refused in cluster mode.
    let mut raw = skiff.raw().await;
    assert_eq!(
        raw.call(&["SELECT", "2"]).await,
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
    assert_eq!(raw.call(&["SELECT", "1"]).await, "+OK\r\n");
    let info = raw.call(&["CLIENT", "INFO"]).await;
    assert!(info.contains(" db=1 "), "{info}");

    let status = skiff.status();
    let route = &status["routes"][0];
    assert_eq!(route["name"], "celery");
    assert_eq!(route["primary"], broker.addr());
}

#[tokio::test]
async fn prefix_route_splits_keys() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = prefix_skiff(&main, &route).await;
    let mut conn = skiff.client(Protocol::Resp2).await;

    let _: () = conn.set("celery-task-meta-x", "done").await.unwrap();
    let _: () = conn.set("user:1", "alice").await.unwrap();
    let value: String = conn.get("celery-task-meta-x").await.unwrap();
    assert_eq!(value, "done");
    assert_eq!(route.cli(&["GET", "celery-task-meta-x"]).trim(), "done");
    assert_eq!(main.cli(&["EXISTS", "celery-task-meta-x"]).trim(), "0");
    assert_eq!(main.cli(&["GET", "user:1"]).trim(), "alice");
    assert_eq!(route.cli(&["EXISTS", "user:1"]).trim(), "0");

    let mut raw = skiff.raw().await;
    let across = raw.call(&["MGET", "celery-task-meta-x", "user:1"]).await;
    assert!(across.starts_with("-CROSSSLOT "), "{across}");
    assert!(across.contains("\"celery\" and \"main\""), "{across}");
    let _: () = conn.set("_kombu.binding.celery", "b").await.unwrap();
    let within = raw
        .call(&["MGET", "celery-task-meta-x", "_kombu.binding.celery"])
        .await;
    assert_eq!(within, "*2\r\n$4\r\ndone\r\n$1\r\nb\r\n");

    // Keyless commands go to [redis].
    assert_eq!(raw.call(&["DBSIZE"]).await, ":1\r\n");
}

#[tokio::test]
async fn prefix_route_carries_pubsub() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = prefix_skiff(&main, &route).await;
    let mut subscriber = skiff.raw().await;
    let confirmation = subscriber.call(&["SUBSCRIBE", "celery-task-meta-7"]).await;
    assert!(confirmation.contains("subscribe"), "{confirmation}");
    let numsub = route.cli(&["PUBSUB", "NUMSUB", "celery-task-meta-7"]);
    assert_eq!(numsub.lines().nth(1), Some("1"), "subscribed on the route");

    let mut publisher = skiff.raw().await;
    assert_eq!(
        publisher
            .call(&["PUBLISH", "celery-task-meta-7", "ready"])
            .await,
        ":1\r\n"
    );
    let message = String::from_utf8_lossy(&subscriber.read().await).into_owned();
    assert!(message.contains("ready"), "{message}");
}

#[tokio::test]
async fn route_brpop_leaves_main_free() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = prefix_skiff(&main, &route).await;
    let mut setup = skiff.client(Protocol::Resp2).await;
    let _: () = setup.set("plain", "1").await.unwrap();
    let _: () = setup.set("celery-meta", "2").await.unwrap();

    let mut blocked = skiff.raw().await;
    blocked.send(&["BRPOP", "celery-empty", "5"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(route.info_field("clients", "blocked_clients"), "1");

    let started = Instant::now();
    let mut other = skiff.raw().await;
    assert_eq!(other.call(&["GET", "plain"]).await, "$1\r\n1\r\n");
    assert_eq!(other.call(&["GET", "celery-meta"]).await, "$1\r\n2\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "GETs waited {:?} behind BRPOP",
        started.elapsed()
    );

    assert_eq!(
        other.call(&["LPUSH", "celery-empty", "job"]).await,
        ":1\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&blocked.read().await),
        "*2\r\n$12\r\ncelery-empty\r\n$3\r\njob\r\n"
    );
}

#[tokio::test]
async fn transaction_on_route_and_across_routes() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = prefix_skiff(&main, &route).await;
    let mut raw = skiff.raw().await;

    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["SET", "celery-a", "1"]).await, "+QUEUED\r\n");
    assert_eq!(raw.call(&["INCR", "celery-a"]).await, "+QUEUED\r\n");
    assert_eq!(raw.call(&["EXEC"]).await, "*2\r\n+OK\r\n:2\r\n");
    assert_eq!(route.cli(&["GET", "celery-a"]).trim(), "2");
    assert_eq!(main.cli(&["EXISTS", "celery-a"]).trim(), "0");

    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["SET", "celery-b", "1"]).await, "+QUEUED\r\n");
    let across = raw.call(&["SET", "plain-b", "1"]).await;
    assert!(across.starts_with("-CROSSSLOT "), "{across}");
    assert_eq!(
        raw.call(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(route.cli(&["EXISTS", "celery-b"]).trim(), "0");
    assert_eq!(main.cli(&["EXISTS", "plain-b"]).trim(), "0");

    // WATCH pins the route of its key; the session works normally after.
    assert_eq!(raw.call(&["WATCH", "celery-a"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["INCR", "celery-a"]).await, "+QUEUED\r\n");
    assert_eq!(raw.call(&["EXEC"]).await, "*1\r\n:3\r\n");
    assert_eq!(raw.call(&["SET", "plain-c", "1"]).await, "+OK\r\n");
    assert_eq!(main.cli(&["GET", "plain-c"]).trim(), "1");
}

#[tokio::test]
async fn database_route_with_upstream_database() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let body = format!(
        "nodes = [\"{}\"]\n\
         [[redis.routes]]\nname = \"jobs\"\ndatabase = 3\nupstream_database = 5\n\
         nodes = [\"{}\"]\n",
        main.addr(),
        route.addr()
    );
    let skiff = Skiff::start(&body).await;
    let mut raw = skiff.raw().await;
    assert_eq!(raw.call(&["SELECT", "3"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["SET", "job", "x"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["INCR", "count"]).await, "+QUEUED\r\n");
    assert_eq!(raw.call(&["EXEC"]).await, "*1\r\n:1\r\n");
    assert_eq!(route.cli(&["-n", "5", "GET", "job"]).trim(), "x");
    assert_eq!(route.cli(&["-n", "5", "GET", "count"]).trim(), "1");
    assert_eq!(main.cli(&["-n", "3", "EXISTS", "job"]).trim(), "0");

    // Database 2 is [redis]'s own, selected upstream as usual.
    assert_eq!(raw.call(&["SELECT", "2"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["SET", "job", "y"]).await, "+OK\r\n");
    assert_eq!(main.cli(&["-n", "2", "GET", "job"]).trim(), "y");
}

#[tokio::test]
async fn route_server_restart_recovers() {
    let main = RedisServer::start(&[]);
    let mut route = RedisServer::start(&[]);
    let port = route.port;
    let skiff = prefix_skiff(&main, &route).await;
    let mut raw = skiff.raw().await;
    assert_eq!(raw.call(&["SET", "celery-r", "1"]).await, "+OK\r\n");

    route.kill();
    let failed = raw.call(&["GET", "celery-r"]).await;
    assert!(failed.starts_with("-ERR "), "{failed}");
    // [redis] keeps working while the route is down.
    assert_eq!(raw.call(&["SET", "plain-r", "1"]).await, "+OK\r\n");

    let _restarted = tokio::task::spawn_blocking(move || RedisServer::start_on(port))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = raw.call(&["SET", "celery-r", "2"]).await;
        if reply == "+OK\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "route did not recover: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(raw.call(&["GET", "celery-r"]).await, "$1\r\n2\r\n");
}

/// Runs `skiff check` on `text` and returns its exit success and stderr.
fn skiff_check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skiff.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

#[test]
fn check_rejects_bad_routes() {
    let main = "[redis]\nmode = \"cluster\"\nnodes = [\"127.0.0.1:7000\"]\n";
    let cases = [
        (
            "[[redis.routes]]\nname = \"a\"\nprefixes = [\"celery\"]\nnodes = [\"127.0.0.1:1\"]\n\
             [[redis.routes]]\nname = \"b\"\nprefixes = [\"cel\"]\nnodes = [\"127.0.0.1:2\"]\n",
            "prefix \"cel\" overlaps prefix \"celery\" of route \"a\"",
        ),
        (
            "[[redis.routes]]\nname = \"a\"\ndatabase = 1\nnodes = [\"127.0.0.1:1\"]\n\
             [[redis.routes]]\nname = \"b\"\ndatabase = 1\nnodes = [\"127.0.0.1:2\"]\n",
            "database 1 is already routed to \"a\"",
        ),
        (
            "[[redis.routes]]\nname = \"a\"\ndatabase = 1\nmode = \"cluster\"\n\
             upstream_database = 2\nnodes = [\"127.0.0.1:1\"]\n",
            "upstream_database = 2 is impossible in cluster mode",
        ),
        (
            "[[redis.routes]]\nname = \"a\"\nnodes = [\"127.0.0.1:1\"]\n",
            "needs database, prefixes or both",
        ),
    ];
    for (routes, expected) in cases {
        let (ok, stderr) = skiff_check(&format!("{main}{routes}"));
        assert!(!ok, "accepted: {routes}");
        assert!(stderr.contains(expected), "{routes}: {stderr}");
    }
    let good = "[[redis.routes]]\nname = \"celery\"\ndatabase = 1\n\
                prefixes = [\"celery\"]\nnodes = [\"127.0.0.1:1\"]\n";
    let (ok, stderr) = skiff_check(&format!("{main}{good}"));
    assert!(ok, "{stderr}");
}

#[tokio::test]
async fn client_tracking_covers_route_keys() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = prefix_skiff(&main, &route).await;
    route.cli(&["SET", "celery-tracked", "1"]);
    let mut client = skiff.raw().await;
    client.protocol = Protocol::Resp3;
    client.call(&["HELLO", "3"]).await;
    assert_eq!(client.call(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n");
    client
        .read_until_tracked("celery-tracked", "$1\r\n1\r\n")
        .await;
    // A write straight to the route's server, not through skiff.
    route.cli(&["SET", "celery-tracked", "2"]);
    let push = client.read().await;
    assert_eq!(
        &push[..],
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$14\r\ncelery-tracked\r\n"
    );
}
