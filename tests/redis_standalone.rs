//! The Redis router in standalone mode against a real primary with two
//! replicas: session commands, exact error strings, ordering under
//! concurrent pipelined clients, read routing, limits.

#[path = "support/process.rs"]
#[allow(dead_code)]
mod process_support;
#[path = "support/redis.rs"]
mod redis_support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_support::{Skiff, Standalone};
use skiff::redis::frame::Protocol;

fn servers() -> &'static Standalone {
    static SERVERS: OnceLock<Standalone> = OnceLock::new();
    SERVERS.get_or_init(Standalone::start)
}

async fn skiff(extra: &str) -> Skiff {
    let body = format!(
        "mode = \"standalone\"\nnodes = {}\n{extra}",
        servers().nodes_toml()
    );
    Skiff::start(&body).await
}

#[tokio::test]
async fn ping_echo_and_inline_commands() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(client.call(&["PING", "hi"]).await, "$2\r\nhi\r\n");
    assert_eq!(client.call(&["ECHO", "a b"]).await, "$3\r\na b\r\n");
    assert_eq!(
        client.call(&["ECHO"]).await,
        "-ERR wrong number of arguments for 'echo' command\r\n"
    );
    client.send_bytes(b"PING\r\n").await;
    assert_eq!(&client.read().await[..], b"+PONG\r\n");
    assert_eq!(client.call(&["QUIT"]).await, "+OK\r\n");
    assert!(client.is_closed().await);
}

#[tokio::test]
async fn client_name_and_id() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["CLIENT", "GETNAME"]).await, "$-1\r\n");
    assert_eq!(
        client.call(&["CLIENT", "SETNAME", "worker-1"]).await,
        "+OK\r\n"
    );
    assert_eq!(
        client.call(&["CLIENT", "GETNAME"]).await,
        "$8\r\nworker-1\r\n"
    );
    assert_eq!(
        client.call(&["CLIENT", "SETNAME", "a b"]).await,
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert!(client.call(&["CLIENT", "ID"]).await.starts_with(':'));
    let setinfo = client
        .call(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"])
        .await;
    assert_eq!(setinfo, "+OK\r\n");
}

#[tokio::test]
async fn auth_required_when_client_password_set() {
    let skiff = skiff("client_password = \"s3cret\"").await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["GET", "auth:k"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        client.call(&["AUTH", "wrong"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        client.call(&["AUTH", "nobody", "s3cret"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(client.call(&["AUTH", "s3cret"]).await, "+OK\r\n");
    assert_eq!(client.call(&["GET", "auth:k"]).await, "$-1\r\n");

    let mut other = skiff.raw().await;
    assert_eq!(other.call(&["AUTH", "default", "s3cret"]).await, "+OK\r\n");

    let url = format!("redis://:s3cret@{}/", skiff.addr);
    let mut conn = redis_support::connect_redis_rs(&url).await;
    let _: () = conn.set("auth:rs", "1").await.unwrap();
    let value: String = conn.get("auth:rs").await.unwrap();
    assert_eq!(value, "1");
}

#[tokio::test]
async fn auth_without_client_password_is_redis_error() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["AUTH", "x"]).await,
        "-ERR AUTH <password> called without any password configured for the default user. \
         Are you sure your configuration is correct?\r\n"
    );
}

#[tokio::test]
async fn hello_3_with_auth_and_setname() {
    let skiff = skiff("client_password = \"pw\"").await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["HELLO", "3", "AUTH", "default", "bad"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        client.call(&["HELLO", "4"]).await,
        "-NOPROTO unsupported protocol version\r\n"
    );
    client.protocol = Protocol::Resp3;
    let hello = client
        .call(&["HELLO", "3", "AUTH", "default", "pw", "SETNAME", "api"])
        .await;
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    assert!(hello.contains("proto\r\n:3\r\n"), "{hello}");
    assert_eq!(client.call(&["CLIENT", "GETNAME"]).await, "$3\r\napi\r\n");
    client.call(&["DEL", "hello:h"]).await;
    client.call(&["HSET", "hello:h", "f", "v"]).await;
    // RESP3 replies come from a RESP3 upstream connection: a map, not an array.
    assert_eq!(
        client.call(&["HGETALL", "hello:h"]).await,
        "%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(client.call(&["GET", "hello:none"]).await, "_\r\n");
}

#[tokio::test]
async fn resp3_client_through_redis_rs() {
    let skiff = skiff("").await;
    let mut conn = skiff.client(Protocol::Resp3).await;
    let _: () = conn.hset("r3:h", "a", "1").await.unwrap();
    let _: () = conn.hset("r3:h", "b", "2").await.unwrap();
    let all: std::collections::HashMap<String, String> = conn.hgetall("r3:h").await.unwrap();
    assert_eq!(all.get("a").map(String::as_str), Some("1"));
    assert_eq!(all.get("b").map(String::as_str), Some("2"));
    let ttl: i64 = conn.ttl("r3:h").await.unwrap();
    assert_eq!(ttl, -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pipelines_keep_reply_order() {
    // Three shared connections over two session threads: clients on both
    // threads share some of them.
    let skiff = skiff("upstream_connections = 3\nthreads = 2").await;
    let mut tasks = Vec::new();
    for client in 0..16 {
        let url = skiff.url(if client % 2 == 0 {
            Protocol::Resp2
        } else {
            Protocol::Resp3
        });
        tasks.push(tokio::spawn(async move {
            let mut conn = redis_support::connect_redis_rs(&url).await;
            let mut pipe = redis::pipe();
            for i in 0..200 {
                let key = format!("order:{client}:{i}");
                pipe.set(&key, i).get(&key).incr(&key, 1);
            }
            let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.unwrap();
            for i in 0..200 {
                let get: i64 = redis::from_redis_value(replies[i * 3 + 1].clone()).unwrap();
                let incr: i64 = redis::from_redis_value(replies[i * 3 + 2].clone()).unwrap();
                assert_eq!(get, i as i64, "client {client} GET {i}");
                assert_eq!(incr, i as i64 + 1, "client {client} INCR {i}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn stalled_upstream_holds_requests_in_order() {
    // A server of its own, stopped while clients pipeline far more than
    // the loopback buffers and skiff's queue per connection hold.
    let server = redis_support::RedisServer::start(&[]);
    let body = format!(
        "mode = \"standalone\"\nnodes = [\"{}\"]\nupstream_connections = 1",
        server.addr()
    );
    let skiff = Skiff::start(&body).await;
    let mut warm = skiff.client(Protocol::Resp2).await;
    let _: () = warm.set("stall:warm", 1).await.unwrap();

    server.signal("STOP");
    let mut tasks = Vec::new();
    for client in 0..8 {
        let url = skiff.url(Protocol::Resp2);
        tasks.push(tokio::spawn(async move {
            let mut conn = redis_support::connect_redis_rs(&url).await;
            let mut pipe = redis::pipe();
            for i in 0..40 {
                let key = format!("stall:{client}:{i}");
                let value = format!("{client}:{i}:").repeat(20_000);
                pipe.set(&key, &value).ignore().get(&key);
            }
            let values: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
            for (i, value) in values.iter().enumerate() {
                assert_eq!(*value, format!("{client}:{i}:").repeat(20_000));
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        tasks.iter().all(|task| !task.is_finished()),
        "a pipeline finished while the server was stopped"
    );

    server.signal("CONT");
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("every pipeline finishes once the server resumes")
            .unwrap();
    }
    let warm_value: i64 = warm.get("stall:warm").await.unwrap();
    assert_eq!(warm_value, 1);
}

#[tokio::test]
async fn stalled_upstream_times_out() {
    let server = redis_support::RedisServer::start(&[]);
    let body = format!(
        "mode = \"standalone\"\nnodes = [\"{}\"]\nreply_timeout = \"400ms\"",
        server.addr()
    );
    let skiff = Skiff::start(&body).await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SET", "timeout:key", "1"]).await, "+OK\r\n");

    server.signal("STOP");
    let started = std::time::Instant::now();
    let reply = client.call(&["GET", "timeout:key"]).await;
    let waited = started.elapsed();
    server.signal("CONT");
    let expected = format!(
        "-ERR upstream {}: no reply within 400ms; the command may have run\r\n",
        server.addr()
    );
    assert_eq!(reply, expected);
    assert!(
        waited >= Duration::from_millis(400),
        "failed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "failed after {waited:?}");

    // skiff closed the stalled connection, so a new one serves the client.
    assert_eq!(client.call(&["GET", "timeout:key"]).await, "$1\r\n1\r\n");
}

#[tokio::test]
async fn small_queue_depth_serves_mixed_pipelines() {
    // Replies skiff writes itself (PING) between replies from the server
    // (GET), in one write, with reply queues of one, two and three replies.
    for depth in [1, 2, 3] {
        let skiff = skiff(&format!("client_queue_depth = {depth}\nthreads = 2")).await;
        let mut client = skiff.raw().await;
        assert_eq!(client.call(&["SET", "mixed:a", "1"]).await, "+OK\r\n");
        let mut pipeline = Vec::new();
        for _ in 0..100 {
            pipeline.extend_from_slice(&skiff::redis::frame::encode_command(&["PING"]));
            pipeline.extend_from_slice(&skiff::redis::frame::encode_command(&["GET", "mixed:a"]));
        }
        client.send_bytes(&pipeline).await;
        for i in 0..100 {
            assert_eq!(client.read().await, "+PONG\r\n", "depth {depth}, PING {i}");
            assert_eq!(client.read().await, "$1\r\n1\r\n", "depth {depth}, GET {i}");
        }
    }
}

#[tokio::test]
async fn replica_policy_sends_reads_to_replicas() {
    let servers = servers();
    let skiff = skiff("read_from = \"replica\"").await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let _: () = conn.set("replica:k", "v").await.unwrap();
    let primary_before = servers.primary.command_calls("strlen");
    let replicas_before: u64 = servers
        .replicas
        .iter()
        .map(|r| r.command_calls("strlen"))
        .sum();
    for _ in 0..40 {
        let _: i64 = conn.strlen("replica:k").await.unwrap();
    }
    let primary_after = servers.primary.command_calls("strlen");
    let replicas_after: u64 = servers
        .replicas
        .iter()
        .map(|r| r.command_calls("strlen"))
        .sum();
    assert_eq!(primary_after, primary_before, "no STRLEN on the primary");
    assert_eq!(
        replicas_after - replicas_before,
        40,
        "every STRLEN on a replica"
    );
}

#[tokio::test]
async fn primary_policy_keeps_reads_on_primary() {
    let servers = servers();
    let skiff = skiff("read_from = \"primary\"").await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let replicas_before: u64 = servers
        .replicas
        .iter()
        .map(|r| r.command_calls("hstrlen"))
        .sum();
    let primary_before = servers.primary.command_calls("hstrlen");
    for _ in 0..10 {
        // HSTRLEN: no other test in this file sends it, so the counts are
        // this test's alone.
        let _: i64 = redis::cmd("HSTRLEN")
            .arg("primary:h")
            .arg("f")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let replicas_after: u64 = servers
        .replicas
        .iter()
        .map(|r| r.command_calls("hstrlen"))
        .sum();
    assert_eq!(replicas_after, replicas_before);
    assert_eq!(
        servers.primary.command_calls("hstrlen") - primary_before,
        10
    );
}

#[tokio::test]
async fn prefer_replica_falls_back_to_primary() {
    let mut own = Standalone::start();
    let body = format!(
        "mode = \"standalone\"\nnodes = {}\nread_from = \"prefer-replica\"\nconnect_timeout = \"1s\"",
        own.nodes_toml()
    );
    let skiff = Skiff::start(&body).await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let _: () = conn.set("fallback:k", "v").await.unwrap();
    for replica in &mut own.replicas {
        replica.kill();
    }
    for _ in 0..5 {
        let value: String = conn.get("fallback:k").await.unwrap();
        assert_eq!(value, "v");
    }
}

#[tokio::test]
async fn prefer_replica_avoids_stalled_replica() {
    let own = Standalone::start();
    let body = format!(
        "mode = \"standalone\"\nnodes = {}\nread_from = \"prefer-replica\"\nreply_timeout = \"300ms\"",
        own.nodes_toml()
    );
    let skiff = Skiff::start(&body).await;
    let mut writer = skiff.raw().await;
    assert_eq!(writer.call(&["SET", "stalled:k", "v"]).await, "+OK\r\n");
    for replica in &own.replicas {
        replica.wait_for(
            || replica.cli(&["GET", "stalled:k"]).trim() == "v",
            "replicated",
        );
    }

    // A stopped replica still accepts connections. After one read times
    // out on it, reads go to the other replica or the primary.
    own.replicas[0].signal("STOP");
    let mut timeouts = 0;
    for _ in 0..6 {
        let mut reader = skiff.raw().await;
        match reader.call(&["GET", "stalled:k"]).await.as_str() {
            "$1\r\nv\r\n" => {}
            reply if reply.contains("no reply within 300ms") => timeouts += 1,
            reply => panic!("unexpected reply {reply:?}"),
        }
    }
    own.replicas[0].signal("CONT");
    assert!(timeouts <= 1, "{timeouts} reads timed out");
}

#[tokio::test]
async fn oversized_request_is_rejected_alone() {
    let skiff = skiff("max_request_bytes = 4096").await;
    let mut bad = skiff.raw().await;
    let mut good = skiff.raw().await;
    let big = "x".repeat(10_000);
    bad.send(&["SET", "big:k", &big]).await;
    assert_eq!(
        &bad.read().await[..],
        b"-ERR Protocol error: invalid bulk length\r\n"
    );
    assert!(bad.is_closed().await);
    assert_eq!(good.call(&["SET", "big:ok", "1"]).await, "+OK\r\n");
}

#[tokio::test]
async fn malformed_request_gets_protocol_error() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    client.send_bytes(b"*2\r\n$3\r\nGET\r\n:12\r\n").await;
    let reply = String::from_utf8_lossy(&client.read().await).into_owned();
    assert!(reply.starts_with("-ERR Protocol error"), "{reply}");
    assert!(client.is_closed().await);
}

#[tokio::test]
async fn blocking_pop_does_not_delay_other_clients() {
    let skiff = skiff("upstream_connections = 1").await;
    let mut blocked = skiff.raw().await;
    blocked.call(&["DEL", "block:q"]).await;
    blocked.send(&["BRPOP", "block:q", "5"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut conn = skiff.client(Protocol::Resp2).await;
    let started = Instant::now();
    for i in 0..50 {
        let _: () = conn.set("block:other", i).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "other clients waited"
    );
    let _: () = conn.lpush("block:q", "job").await.unwrap();
    let popped = String::from_utf8_lossy(&blocked.read().await).into_owned();
    assert_eq!(popped, "*2\r\n$7\r\nblock:q\r\n$3\r\njob\r\n");
    // The session is usable after the blocking command.
    assert_eq!(blocked.call(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn multi_exec_and_watch() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    client.call(&["SET", "tx:n", "1"]).await;
    assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(client.call(&["INCR", "tx:n"]).await, "+QUEUED\r\n");
    assert_eq!(client.call(&["INCR", "tx:n"]).await, "+QUEUED\r\n");
    assert_eq!(client.call(&["EXEC"]).await, "*2\r\n:2\r\n:3\r\n");

    let mut other = skiff.raw().await;
    assert_eq!(client.call(&["WATCH", "tx:n"]).await, "+OK\r\n");
    assert_eq!(other.call(&["SET", "tx:n", "100"]).await, "+OK\r\n");
    assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(client.call(&["INCR", "tx:n"]).await, "+QUEUED\r\n");
    assert_eq!(
        client.call(&["EXEC"]).await,
        "*-1\r\n",
        "watched key changed"
    );
    assert_eq!(client.call(&["GET", "tx:n"]).await, "$3\r\n100\r\n");
    assert_eq!(client.call(&["EXEC"]).await, "-ERR EXEC without MULTI\r\n");
}

#[tokio::test]
async fn subscribe_relays_messages_resp2_and_resp3() {
    let skiff = skiff("").await;
    let mut publisher = skiff.raw().await;
    for protocol in [Protocol::Resp2, Protocol::Resp3] {
        let mut subscriber = skiff.raw().await;
        if protocol == Protocol::Resp3 {
            subscriber.protocol = Protocol::Resp3;
            subscriber.call(&["HELLO", "3"]).await;
        }
        let head = if protocol == Protocol::Resp3 {
            ">"
        } else {
            "*"
        };
        assert_eq!(
            subscriber.call(&["SUBSCRIBE", "news"]).await,
            format!("{head}3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
        );
        assert_eq!(
            publisher.call(&["PUBLISH", "news", "hello"]).await,
            ":1\r\n"
        );
        let message = String::from_utf8_lossy(&subscriber.read().await).into_owned();
        assert_eq!(
            message,
            format!("{head}3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n")
        );
        assert_eq!(
            subscriber.call(&["UNSUBSCRIBE"]).await,
            format!("{head}3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n")
        );
        // After the last unsubscribe the session routes commands again.
        assert_eq!(subscriber.call(&["SET", "sub:k", "1"]).await, "+OK\r\n");
    }
}

#[tokio::test]
async fn select_switches_database() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SELECT", "3"]).await, "+OK\r\n");
    assert_eq!(client.call(&["SET", "db:k", "three"]).await, "+OK\r\n");
    assert_eq!(client.call(&["SELECT", "0"]).await, "+OK\r\n");
    assert_eq!(client.call(&["GET", "db:k"]).await, "$-1\r\n");
    assert_eq!(
        client.call(&["SELECT", "99"]).await,
        "-ERR DB index is out of range\r\n"
    );
    assert_eq!(
        client.call(&["SELECT", "x"]).await,
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        servers().primary.cli(&["-n", "3", "GET", "db:k"]).trim(),
        "three"
    );
}

#[tokio::test]
async fn upstream_errors_pass_through() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    client.call(&["SET", "err:s", "x"]).await;
    assert_eq!(
        client.call(&["INCR", "err:s"]).await,
        "-ERR value is not an integer or out of range\r\n"
    );
    let unknown = client.call(&["NOSUCHCOMMAND", "a"]).await;
    assert!(
        unknown.starts_with("-ERR unknown command 'NOSUCHCOMMAND'"),
        "{unknown}"
    );
}

#[tokio::test]
async fn redis_cli_talks_to_skiff() {
    let skiff = skiff("").await;
    let port = skiff.addr.port();
    let output = tokio::task::spawn_blocking(move || {
        redis_support::redis_cli(port, &["SET", "cli:k", "from-cli"]);
        redis_support::redis_cli(port, &["GET", "cli:k"])
    })
    .await
    .unwrap();
    assert_eq!(output.trim(), "from-cli");
}

#[tokio::test]
async fn dify_command_set_round_trips() {
    let skiff = skiff("read_from = \"primary\"").await;
    let mut client = skiff.raw().await;
    // Pairs a command with its exact expected reply.
    let expect = |args: &'static [&'static str], expected: &'static str| (args, expected);
    let strings = [
        expect(&["SET", "dify:lock", "1", "EX", "10", "NX"], "+OK\r\n"),
        expect(&["SET", "dify:lock", "1", "PX", "10000", "NX"], "$-1\r\n"),
        expect(&["SETNX", "dify:lock", "2"], ":0\r\n"),
        expect(&["SETEX", "dify:ex", "10", "v"], "+OK\r\n"),
        expect(&["GETDEL", "dify:ex"], "$1\r\nv\r\n"),
        expect(&["EXISTS", "dify:ex"], ":0\r\n"),
        expect(&["INCR", "dify:n"], ":1\r\n"),
        expect(&["DECR", "dify:n"], ":0\r\n"),
        expect(&["EXPIRE", "dify:n", "100"], ":1\r\n"),
        expect(&["TTL", "dify:n"], ":100\r\n"),
        expect(&["DEL", "dify:n", "dify:lock"], ":2\r\n"),
    ];
    let hashes = [
        expect(&["HSET", "dify:h", "a", "1", "b", "2"], ":2\r\n"),
        expect(&["HMSET", "dify:h", "c", "3"], "+OK\r\n"),
        expect(&["HGET", "dify:h", "c"], "$1\r\n3\r\n"),
        expect(&["HDEL", "dify:h", "a"], ":1\r\n"),
        expect(&["HLEN", "dify:h"], ":2\r\n"),
        expect(
            &["HGETALL", "dify:h"],
            "*4\r\n$1\r\nb\r\n$1\r\n2\r\n$1\r\nc\r\n$1\r\n3\r\n",
        ),
        expect(
            &["HSCAN", "dify:h", "0", "COUNT", "32"],
            "*2\r\n$1\r\n0\r\n*4\r\n$1\r\nb\r\n$1\r\n2\r\n$1\r\nc\r\n$1\r\n3\r\n",
        ),
    ];
    let lists_and_sets = [
        expect(&["ZADD", "dify:z", "1", "a", "2", "b"], ":2\r\n"),
        expect(&["ZREMRANGEBYSCORE", "dify:z", "0", "1"], ":1\r\n"),
        expect(&["ZCARD", "dify:z"], ":1\r\n"),
        expect(&["RPUSH", "dify:l", "a", "b"], ":2\r\n"),
        expect(
            &["LRANGE", "dify:l", "0", "-1"],
            "*2\r\n$1\r\na\r\n$1\r\nb\r\n",
        ),
        expect(&["LPUSH", "dify:celery", "task"], ":1\r\n"),
        expect(
            &["BRPOP", "dify:other", "dify:celery", "1"],
            "*2\r\n$11\r\ndify:celery\r\n$4\r\ntask\r\n",
        ),
    ];
    for (args, expected) in strings.iter().chain(&hashes).chain(&lists_and_sets) {
        assert_eq!(client.call(args).await, *expected, "{args:?}");
    }

    let script = "return redis.call('HGET', KEYS[1], ARGV[1])";
    let loaded = client.call(&["SCRIPT", "LOAD", script]).await;
    let sha = loaded.lines().nth(1).unwrap().to_string();
    let evalsha = client.call(&["EVALSHA", &sha, "1", "dify:h", "b"]).await;
    assert_eq!(evalsha, "$1\r\n2\r\n");

    let id = client
        .call(&["XADD", "dify:s", "MAXLEN", "~", "100", "*", "f", "v"])
        .await;
    assert!(id.starts_with('$'), "{id}");
    let read = client
        .call(&[
            "XREAD", "COUNT", "1", "BLOCK", "100", "STREAMS", "dify:s", "0",
        ])
        .await;
    assert!(read.contains("dify:s"), "{read}");
}

#[tokio::test]
async fn command_and_info_come_from_upstream() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    let count = client.call(&["COMMAND", "COUNT"]).await;
    let count: i64 = count.trim_start_matches(':').trim().parse().unwrap();
    assert!(count > 100, "COMMAND COUNT {count}");
    let info = client.call(&["INFO", "server"]).await;
    assert!(info.contains("redis_version:"), "{info}");
    let hello = client.call(&["HELLO"]).await;
    let version = servers().primary.info_field("server", "redis_version");
    assert!(
        hello.contains(&version),
        "HELLO reports the upstream version: {hello}"
    );
}

/// Returns this process's resident memory in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kilobytes: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kilobytes * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_is_bounded() {
    use tokio::io::AsyncWriteExt;

    let skiff = skiff("client_queue_depth = 16").await;
    let mut setup = skiff.raw().await;
    let value = "v".repeat(256 * 1024);
    assert_eq!(setup.call(&["SET", "slow:big", &value]).await, "+OK\r\n");
    let before = resident_bytes();

    // Each pair requests 320 KiB of replies, and the client never reads them.
    let padding = "p".repeat(64 * 1024);
    let mut pair = skiff::redis::frame::encode_command(&["ECHO", &padding]).to_vec();
    pair.extend_from_slice(&skiff::redis::frame::encode_command(&["GET", "slow:big"]));
    let mut stream = tokio::net::TcpStream::connect(skiff.addr).await.unwrap();
    let mut pairs_sent = 0;
    loop {
        let write = stream.write_all(&pair);
        match tokio::time::timeout(Duration::from_secs(1), write).await {
            Ok(result) => result.unwrap(),
            Err(_) => break,
        }
        pairs_sent += 1;
        assert!(
            pairs_sent < 3000,
            "skiff kept reading from a client that reads nothing"
        );
    }
    let growth = resident_bytes().saturating_sub(before);
    assert!(growth < 200 * 1024 * 1024, "memory grew by {growth} bytes");

    let mut other = skiff.raw().await;
    assert_eq!(other.call(&["GET", "slow:missing"]).await, "$-1\r\n");
}

#[tokio::test]
async fn monitor_is_rejected_and_session_continues() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["MONITOR"]).await,
        "-ERR MONITOR is not supported through skiff\r\n"
    );
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn upstream_restart_is_survived() {
    let mut own = tokio::task::spawn_blocking(|| redis_support::RedisServer::start(&[]))
        .await
        .unwrap();
    let body = format!("nodes = [\"{}\"]\nconnect_timeout = \"1s\"", own.addr());
    let skiff = Skiff::start(&body).await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SET", "restart:k", "1"]).await, "+OK\r\n");
    let port = own.port.to_string();
    own.kill();
    let failed = client.call(&["GET", "restart:k"]).await;
    assert!(failed.starts_with("-ERR upstream"), "{failed}");
    // A new server on the same port: skiff reconnects on its own.
    let restarted = tokio::task::spawn_blocking(move || {
        redis_support::RedisServer::start_on(port.parse().unwrap())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.call(&["GET", "restart:k"]).await, "$-1\r\n");
    drop(restarted);
}

#[tokio::test]
async fn upstream_password_and_acl_user() {
    let secured = tokio::task::spawn_blocking(|| {
        let server = redis_support::RedisServer::start(&["--requirepass", "up-secret"]);
        let acl = ["ACL", "SETUSER", "app", "on", ">app-secret", "~*", "+@all"];
        let mut args = vec!["-a", "up-secret", "--no-auth-warning"];
        args.extend(acl);
        assert_eq!(server.cli(&args).trim(), "OK");
        server
    })
    .await
    .unwrap();
    let nodes = format!("nodes = [\"{}\"]", secured.addr());
    let default_user = Skiff::start(&format!("{nodes}\npassword = \"up-secret\"")).await;
    let acl_user = Skiff::start(&format!(
        "{nodes}\nusername = \"app\"\npassword = \"app-secret\""
    ))
    .await;
    for skiff in [&default_user, &acl_user] {
        for protocol in [Protocol::Resp2, Protocol::Resp3] {
            let mut conn = skiff.client(protocol).await;
            let _: () = conn.set("acl:k", "v").await.unwrap();
            let value: String = conn.get("acl:k").await.unwrap();
            assert_eq!(value, "v");
        }
    }

    let wrong = Skiff::start(&format!("{nodes}\npassword = \"not-it\"")).await;
    let mut client = wrong.raw().await;
    let reply = client.call(&["GET", "acl:k"]).await;
    assert!(reply.starts_with("-ERR upstream"), "{reply}");
    assert!(reply.contains("WRONGPASS"), "{reply}");
    assert!(
        !reply.contains("not-it"),
        "the password leaked into {reply}"
    );
}

#[tokio::test]
async fn readiness_reflects_primary() {
    use skiff::admin::Component;

    let servers = tokio::task::spawn_blocking(servers).await.unwrap();
    let text = format!("[redis]\nnodes = {}\n", servers.nodes_toml());
    let config = skiff::config::Config::parse(&text).unwrap().redis.unwrap();
    let router = skiff::redis::RedisRouter::new(config).unwrap();
    assert_eq!(router.readiness().await, Ok(()));

    let port = redis_support::free_port();
    let text = format!("[redis]\nnodes = [\"127.0.0.1:{port}\"]\nconnect_timeout = \"1s\"\n");
    let config = skiff::config::Config::parse(&text).unwrap().redis.unwrap();
    let router = skiff::redis::RedisRouter::new(config).unwrap();
    let error = router.readiness().await.unwrap_err();
    assert!(error.contains(&port.to_string()), "{error}");
}

#[tokio::test]
async fn shutdown_closes_idle_and_blocked_clients() {
    let skiff = skiff("").await;
    let mut idle = skiff.raw().await;
    assert_eq!(idle.call(&["PING"]).await, "+PONG\r\n");
    let mut blocked = skiff.raw().await;
    blocked.send(&["BLPOP", "shutdown:q", "0"]).await;
    let mut subscribed = skiff.raw().await;
    subscribed.call(&["SUBSCRIBE", "shutdown:ch"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(skiff);
    assert!(idle.is_closed().await, "idle client closed");
    assert!(blocked.is_closed().await, "blocked client closed");
    assert!(subscribed.is_closed().await, "subscribed client closed");
}

#[tokio::test]
async fn max_clients_rejects_extra_connections() {
    let skiff = skiff("max_clients = 2").await;
    let mut first = skiff.raw().await;
    let mut second = skiff.raw().await;
    assert_eq!(first.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(second.call(&["PING"]).await, "+PONG\r\n");
    let mut third = skiff.raw().await;
    assert_eq!(
        &third.read().await[..],
        b"-ERR max number of clients reached\r\n"
    );
    assert!(third.is_closed().await);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = skiff.raw().await;
    assert_eq!(fourth.call(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn idle_dedicated_connection_closed_by_server() {
    let own =
        tokio::task::spawn_blocking(|| redis_support::RedisServer::start(&["--timeout", "1"]))
            .await
            .unwrap();
    let skiff = Skiff::start(&format!("nodes = [\"{}\"]", own.addr())).await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["BLPOP", "idle:q", "0.1"]).await, "*-1\r\n");
    // The server closes the idle dedicated connection after one second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(client.call(&["BLPOP", "idle:q", "0.1"]).await, "*-1\r\n");
    assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(client.call(&["EXEC"]).await, "*0\r\n");
}

#[tokio::test]
async fn empty_requests_do_not_shift_replies() {
    let skiff = skiff("upstream_connections = 1").await;
    let mut client = skiff.raw().await;
    let mut other = skiff.raw().await;
    // Redis sends nothing back for an empty array; if one reached the shared
    // connection, every later reply on it would go to the wrong request.
    client.send_bytes(b"*0\r\n*-1\r\n").await;
    assert_eq!(client.call(&["SET", "empty:k", "1"]).await, "+OK\r\n");
    assert_eq!(other.call(&["GET", "empty:k"]).await, "$1\r\n1\r\n");
    assert_eq!(
        client.call(&["SUBSCRIBE"]).await,
        "-ERR wrong number of arguments for 'subscribe' command\r\n"
    );
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn failed_subscribe_leaves_session_routed() {
    let skiff = skiff("read_from = \"replica\"").await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["SUBSCRIBE"]).await,
        "-ERR wrong number of arguments for 'subscribe' command\r\n"
    );
    // A session still relaying would send this read to the primary.
    let replicas_before: u64 = servers()
        .replicas
        .iter()
        .map(|r| r.command_calls("getrange"))
        .sum();
    assert_eq!(
        client.call(&["GETRANGE", "subfail:k", "0", "1"]).await,
        "$0\r\n\r\n"
    );
    let replicas_after: u64 = servers()
        .replicas
        .iter()
        .map(|r| r.command_calls("getrange"))
        .sum();
    assert_eq!(replicas_after - replicas_before, 1);
}

#[tokio::test]
async fn inline_quoted_arguments() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    client.send_bytes(b"SET inline:k \"two words\"\r\n").await;
    assert_eq!(&client.read().await[..], b"+OK\r\n");
    assert_eq!(
        client.call(&["GET", "inline:k"]).await,
        "$9\r\ntwo words\r\n"
    );
    client.send_bytes(b"SET inline:k \"open\r\n").await;
    assert_eq!(
        &client.read().await[..],
        b"-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    assert!(client.is_closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_use_little_memory() {
    let skiff = skiff("").await;
    let before = resident_bytes();
    let mut clients = Vec::new();
    for _ in 0..2000 {
        let mut client = skiff.raw().await;
        client.send(&["PING"]).await;
        clients.push(client);
    }
    for client in &mut clients {
        assert_eq!(&client.read().await[..], b"+PONG\r\n");
    }
    // The test's own client sockets and buffers are counted too.
    let per_client = resident_bytes().saturating_sub(before) / 2000;
    assert!(per_client < 48 * 1024, "{per_client} bytes per idle client");
}

/// A thread count beyond the maximum used to pass `skiff check`, then
/// exhausted file descriptors or overflowed an allocation when the router
/// started, leaving skiff running with no Redis listener.
#[test]
fn check_rejects_huge_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    for threads in ["1025", "100000", "18446744073709551615"] {
        let path = dir.path().join("skiff.toml");
        let text = format!("[redis]\nnodes = [\"127.0.0.1:7000\"]\nthreads = {threads}\n");
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "threads = {threads} passed check");
        assert!(
            stderr.contains(&format!(
                "[redis] threads is {threads}, more than the maximum"
            )),
            "threads = {threads}: {stderr}"
        );
    }
}

/// Session threads that cannot start are a startup error: skiff used to
/// log it and keep running with no Redis listener while reporting ready.
#[test]
fn skiff_exits_when_threads_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skiff.toml");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\
         [redis]\nlisten = \"127.0.0.1:{}\"\nnodes = [\"127.0.0.1:{}\"]\nthreads = 1000\n",
        redis_support::free_port(),
        redis_support::free_port(),
        redis_support::free_port(),
    );
    std::fs::write(&path, text).unwrap();

    // Each thread's event loop uses file descriptors, so 64 of them run
    // out long before the thousandth thread.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_skiff"))
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = process_support::wait_exit(&mut child, Duration::from_secs(10));
    if status.is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = status.unwrap_or_else(|| panic!("skiff still running after 10 s: {stderr}"));
    assert!(!status.success(), "skiff exited with success: {stderr}");
    assert!(
        stderr.contains("cannot start the redis session threads"),
        "{stderr}"
    );
}
