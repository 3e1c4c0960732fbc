//! The Redis router in cluster mode against a real six-node cluster (three
//! primaries, three replicas): slot routing, multi-key commands split across
//! slots, CROSSSLOT, SCAN over every primary, replica reads, and pinned
//! sessions. Tests share one cluster and use distinct key prefixes.

#[path = "support/redis.rs"]
mod redis_support;

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_support::{Cluster, Skiff};
use skiff::redis::frame::Protocol;
use skiff::redis::slot::key_slot;

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::start)
}

async fn skiff(extra: &str) -> Skiff {
    let cluster = tokio::task::spawn_blocking(cluster).await.unwrap();
    let body = format!(
        "mode = \"cluster\"\nnodes = {}\n{extra}",
        cluster.seeds_toml()
    );
    Skiff::start(&body).await
}

#[tokio::test]
async fn key_slot_matches_cluster_keyslot() {
    let node = &cluster().nodes[0];
    for key in [
        "foo",
        "bar",
        "user{42}.name",
        "foo{}{bar}",
        "{a}b",
        "123456789",
    ] {
        let expected: u16 = node
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        assert_eq!(key_slot(key.as_bytes()), expected, "slot of {key}");
    }
}

#[tokio::test]
async fn keys_land_on_owning_primary() {
    let skiff = skiff("").await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    for i in 0..30 {
        let key = format!("route:{i}");
        let _: () = conn.set(&key, i).await.unwrap();
        let owner = cluster().primary_for_slot(key_slot(key.as_bytes()));
        // A direct GET on the owner succeeds only if the key lives there.
        assert_eq!(owner.cli(&["GET", &key]).trim(), i.to_string(), "{key}");
        let value: i64 = conn.get(&key).await.unwrap();
        assert_eq!(value, i);
    }
}

#[tokio::test]
async fn mget_across_slots_keeps_key_order() {
    let skiff = skiff("").await;
    for protocol in [Protocol::Resp2, Protocol::Resp3] {
        let mut conn = skiff.client(protocol).await;
        let keys: Vec<String> = (0..20).map(|i| format!("mget:{i}")).collect();
        let slots: HashSet<u16> = keys.iter().map(|k| key_slot(k.as_bytes())).collect();
        assert!(slots.len() > 3, "keys spread over several slots");
        let pairs: Vec<(String, String)> = keys
            .iter()
            .filter(|k| !k.ends_with('7'))
            .map(|k| (k.clone(), format!("v-{k}")))
            .collect();
        let _: () = conn.mset(&pairs).await.unwrap();
        let _: () = conn.del("mget:7").await.unwrap();
        let values: Vec<Option<String>> = conn.mget(&keys).await.unwrap();
        for (key, value) in keys.iter().zip(&values) {
            let expected = (!key.ends_with('7')).then(|| format!("v-{key}"));
            assert_eq!(value, &expected, "{key}");
        }
    }
}

#[tokio::test]
async fn del_exists_touch_sum_across_slots() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    let keys = ["count:a", "count:b", "count:c", "count:d", "count:e"];
    for key in keys {
        assert_eq!(client.call(&["SET", key, "1"]).await, "+OK\r\n");
    }
    let mut args = vec!["EXISTS"];
    args.extend(keys);
    args.push("count:missing");
    assert_eq!(client.call(&args).await, ":5\r\n");
    args[0] = "TOUCH";
    assert_eq!(client.call(&args).await, ":5\r\n");
    args[0] = "UNLINK";
    assert_eq!(client.call(&args[..3]).await, ":2\r\n");
    args[0] = "DEL";
    assert_eq!(client.call(&args).await, ":3\r\n");
    args[0] = "EXISTS";
    assert_eq!(client.call(&args).await, ":0\r\n");
}

#[tokio::test]
async fn crossslot_error_is_exact() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_ne!(key_slot(b"cross:a"), key_slot(b"cross:b"));
    assert_eq!(
        client.call(&["SUNION", "cross:a", "cross:b"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(
        client
            .call(&["EVAL", "return 1", "2", "cross:a", "cross:b"])
            .await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(
        client
            .call(&["EVAL", "return #KEYS", "2", "{cross}a", "{cross}b"])
            .await,
        ":2\r\n"
    );
    assert_eq!(
        client.call(&["RENAME", "cross:a", "cross:b"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
}

#[tokio::test]
async fn select_nonzero_is_rejected() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SELECT", "0"]).await, "+OK\r\n");
    assert_eq!(
        client.call(&["SELECT", "1"]).await,
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
}

#[tokio::test]
async fn scan_keys_dbsize_cover_every_primary() {
    let skiff = skiff("").await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    let expected: HashSet<String> = (0..120).map(|i| format!("scan:{i}")).collect();
    for key in &expected {
        let _: () = conn.set(key, 1).await.unwrap();
    }
    let mut found = HashSet::new();
    let mut cursor: u64 = 0;
    let mut rounds = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("scan:*")
            .arg("COUNT")
            .arg(50)
            .query_async(&mut conn)
            .await
            .unwrap();
        found.extend(keys);
        cursor = next;
        rounds += 1;
        assert!(rounds < 1000, "SCAN terminates");
        if cursor == 0 {
            break;
        }
    }
    assert_eq!(found, expected);
    let keys: Vec<String> = conn.keys("scan:*").await.unwrap();
    assert_eq!(keys.into_iter().collect::<HashSet<_>>(), expected);
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert!(size >= 120, "DBSIZE {size} counts every primary");
}

#[tokio::test]
async fn replica_reads_hit_replicas() {
    let cluster = tokio::task::spawn_blocking(cluster).await.unwrap();
    let skiff = skiff("read_from = \"replica\"").await;
    let mut conn = skiff.client(Protocol::Resp2).await;
    for i in 0..10 {
        let _: () = conn.set(format!("rr:{i}"), i).await.unwrap();
    }
    let before: u64 = cluster
        .replicas()
        .iter()
        .map(|n| n.command_calls("strlen"))
        .sum();
    let primaries_before: u64 = cluster
        .primaries()
        .iter()
        .map(|n| n.command_calls("strlen"))
        .sum();
    for i in 0..10 {
        // A replica without READONLY would reply MOVED, which skiff would
        // follow to the primary and the primary count would grow.
        let _: i64 = conn.strlen(format!("rr:{i}")).await.unwrap();
    }
    let after: u64 = cluster
        .replicas()
        .iter()
        .map(|n| n.command_calls("strlen"))
        .sum();
    let primaries_after: u64 = cluster
        .primaries()
        .iter()
        .map(|n| n.command_calls("strlen"))
        .sum();
    assert_eq!(after - before, 10);
    assert_eq!(primaries_after, primaries_before);
}

#[tokio::test]
async fn multi_exec_on_slot_primary() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(client.call(&["PING"]).await, "+QUEUED\r\n");
    assert_eq!(client.call(&["SET", "{tx}n", "1"]).await, "+QUEUED\r\n");
    assert_eq!(client.call(&["INCR", "{tx}n"]).await, "+QUEUED\r\n");
    assert_eq!(client.call(&["EXEC"]).await, "*3\r\n+PONG\r\n+OK\r\n:2\r\n");

    assert_eq!(client.call(&["WATCH", "{tx}n"]).await, "+OK\r\n");
    assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(client.call(&["INCR", "{tx}n"]).await, "+QUEUED\r\n");
    assert_eq!(client.call(&["EXEC"]).await, "*1\r\n:3\r\n");
}

#[tokio::test]
async fn brpop_waits_without_blocking_others() {
    let skiff = skiff("").await;
    let mut blocked = skiff.raw().await;
    blocked.send(&["BRPOP", "cq:1", "cq:2", "5"]).await;
    let mut other = skiff.raw().await;
    let started = Instant::now();
    for i in 0..20 {
        assert_eq!(
            other.call(&["SET", &format!("cq:other:{i}"), "x"]).await,
            "+OK\r\n"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // BRPOP over two keys in different slots cannot run on one node.
    if key_slot(b"cq:1") != key_slot(b"cq:2") {
        let reply = String::from_utf8_lossy(&blocked.read().await).into_owned();
        assert_eq!(
            reply,
            "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
        );
    }
    blocked.send(&["BRPOP", "{cq}1", "{cq}2", "5"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(other.call(&["LPUSH", "{cq}2", "job"]).await, ":1\r\n");
    let popped = String::from_utf8_lossy(&blocked.read().await).into_owned();
    assert_eq!(popped, "*2\r\n$5\r\n{cq}2\r\n$3\r\njob\r\n");
}

#[tokio::test]
async fn publish_reaches_subscriber() {
    let skiff = skiff("").await;
    let mut subscriber = skiff.raw().await;
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "events"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$6\r\nevents\r\n:1\r\n"
    );
    let mut publisher = skiff.raw().await;
    // skiff sends SUBSCRIBE and PUBLISH to the channel's slot owner, so the
    // subscriber is counted on the node that takes the PUBLISH.
    assert_eq!(publisher.call(&["PUBLISH", "events", "e1"]).await, ":1\r\n");
    let message = String::from_utf8_lossy(&subscriber.read().await).into_owned();
    assert_eq!(
        message,
        "*3\r\n$7\r\nmessage\r\n$6\r\nevents\r\n$2\r\ne1\r\n"
    );

    let mut shard = skiff.raw().await;
    assert_eq!(
        shard.call(&["SSUBSCRIBE", "orders"]).await,
        "*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n"
    );
    assert_eq!(
        publisher.call(&["SPUBLISH", "orders", "o1"]).await,
        ":1\r\n"
    );
    let message = String::from_utf8_lossy(&shard.read().await).into_owned();
    assert_eq!(
        message,
        "*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$2\r\no1\r\n"
    );
}

#[tokio::test]
async fn shard_channels_on_several_nodes() {
    let skiff = skiff("").await;
    let cluster = cluster();
    // One channel on each primary.
    let mut channels: Vec<String> = Vec::new();
    let mut owners = Vec::new();
    for i in 0.. {
        let channel = format!("shardch:{i}");
        let owner = cluster.primary_for_slot(key_slot(channel.as_bytes())).port;
        if !owners.contains(&owner) {
            owners.push(owner);
            channels.push(channel);
        }
        if owners.len() == 3 {
            break;
        }
    }

    let mut subscriber = skiff.raw().await;
    for (count, channel) in channels.iter().enumerate() {
        let expected = format!(
            "*3\r\n$10\r\nssubscribe\r\n${}\r\n{channel}\r\n:{}\r\n",
            channel.len(),
            count + 1
        );
        assert_eq!(subscriber.call(&["SSUBSCRIBE", channel]).await, expected);
    }

    let mut publisher = skiff.raw().await;
    for channel in &channels {
        assert_eq!(
            publisher.call(&["SPUBLISH", channel, "m"]).await,
            ":1\r\n",
            "{channel} has its subscriber"
        );
        let expected = format!(
            "*3\r\n$8\r\nsmessage\r\n${}\r\n{channel}\r\n$1\r\nm\r\n",
            channel.len()
        );
        assert_eq!(String::from_utf8_lossy(&subscriber.read().await), expected);
    }

    let last = &channels[2];
    let expected = format!(
        "*3\r\n$12\r\nsunsubscribe\r\n${}\r\n{last}\r\n:2\r\n",
        last.len()
    );
    assert_eq!(subscriber.call(&["SUNSUBSCRIBE", last]).await, expected);
    assert_eq!(publisher.call(&["SPUBLISH", last, "m"]).await, ":0\r\n");
}

#[tokio::test]
async fn redis_cli_without_cluster_flag() {
    let skiff = skiff("").await;
    let port = skiff.addr.port();
    let output = tokio::task::spawn_blocking(move || {
        for i in 0..10 {
            redis_support::redis_cli(port, &["SET", &format!("cli:{i}"), &i.to_string()]);
        }
        (0..10)
            .map(|i| redis_support::redis_cli(port, &["GET", &format!("cli:{i}")]))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (i, value) in output.iter().enumerate() {
        assert_eq!(value.trim(), i.to_string());
    }
}

#[tokio::test]
async fn script_load_reaches_every_primary() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    let loaded = client.call(&["SCRIPT", "LOAD", "return KEYS[1]"]).await;
    let sha = loaded
        .lines()
        .nth(1)
        .expect("bulk reply with the SHA1")
        .to_string();
    assert_eq!(sha.len(), 40, "{loaded}");
    for primary in tokio::task::spawn_blocking(cluster)
        .await
        .unwrap()
        .primaries()
    {
        assert_eq!(primary.cli(&["SCRIPT", "EXISTS", &sha]).trim(), "1");
    }
    for key in ["script:a", "script:b", "script:c", "script:d"] {
        let reply = client.call(&["EVALSHA", &sha, "1", key]).await;
        assert_eq!(reply, format!("${}\r\n{key}\r\n", key.len()));
    }
}

#[tokio::test]
async fn command_info_and_ping_in_cluster() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
    let info = client.call(&["INFO", "server"]).await;
    assert!(info.contains("redis_mode:cluster"), "{info}");
    let count = client.call(&["COMMAND", "COUNT"]).await;
    assert!(count.starts_with(':'), "{count}");
}

#[tokio::test]
async fn resp3_subscriber_commands_reach_key_owner() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    client.protocol = Protocol::Resp3;
    assert!(client.call(&["HELLO", "3"]).await.starts_with('%'));
    let confirmed = client.call(&["SUBSCRIBE", "r3sub"]).await;
    assert_eq!(confirmed, ">3\r\n$9\r\nsubscribe\r\n$5\r\nr3sub\r\n:1\r\n");
    // Keys on every primary: none may come back as a raw MOVED.
    for i in 0..12 {
        let key = format!("r3sub:{i}");
        assert_eq!(client.call(&["SET", &key, &i.to_string()]).await, "+OK\r\n");
        let expected = format!("${}\r\n{i}\r\n", i.to_string().len());
        assert_eq!(client.call(&["GET", &key]).await, expected);
    }
    assert_eq!(client.call(&["ECHO", "still"]).await, "$5\r\nstill\r\n");
    let mut publisher = skiff.raw().await;
    assert_eq!(publisher.call(&["PUBLISH", "r3sub", "m"]).await, ":1\r\n");
    let message = String::from_utf8_lossy(&client.read().await).into_owned();
    assert_eq!(message, ">3\r\n$7\r\nmessage\r\n$5\r\nr3sub\r\n$1\r\nm\r\n");
}

#[tokio::test]
async fn malformed_commands_get_errors_not_hangs() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    client.send_bytes(b"*0\r\n*-1\r\n").await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["MSET", "bad:a", "1", "bad:b"],
            "-ERR wrong number of arguments for 'mset' command\r\n",
        ),
        (
            &["SUBSCRIBE"],
            "-ERR wrong number of arguments for 'subscribe' command\r\n",
        ),
        (
            &["SSUBSCRIBE"],
            "-ERR wrong number of arguments for 'ssubscribe' command\r\n",
        ),
        (
            &["WATCH"],
            "-ERR wrong number of arguments for 'watch' command\r\n",
        ),
        (
            &["BRPOP"],
            "-ERR wrong number of arguments for 'brpop' command\r\n",
        ),
        (&["SCAN", "x"], "-ERR invalid cursor\r\n"),
        (
            &["EVAL", "return 1", "99", "a"],
            "-ERR Number of keys can't be greater than number of args\r\n",
        ),
        (
            &["GET"],
            "-ERR wrong number of arguments for 'get' command\r\n",
        ),
    ];
    for (args, expected) in cases {
        assert_eq!(client.call(args).await, *expected, "{args:?}");
    }
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn subcommand_keys_route_to_owner() {
    let skiff = skiff("").await;
    let mut client = skiff.raw().await;
    for i in 0..9 {
        let key = format!("sub:{i}");
        client.call(&["XADD", &key, "*", "f", "v"]).await;
        let info = client.call(&["XINFO", "STREAM", &key]).await;
        assert!(info.starts_with('*'), "XINFO STREAM {key}: {info}");
        let encoding = client.call(&["OBJECT", "ENCODING", &key]).await;
        assert_eq!(encoding, "$6\r\nstream\r\n", "OBJECT ENCODING {key}");
        let usage = client.call(&["MEMORY", "USAGE", &key]).await;
        assert!(usage.starts_with(':'), "MEMORY USAGE {key}: {usage}");
    }
}

#[tokio::test]
async fn large_mget_mset_across_many_slots() {
    let skiff = skiff("").await;
    let mut conn = skiff.client(Protocol::Resp3).await;
    let pairs: Vec<(String, usize)> = (0..2000).map(|i| (format!("big:{i}"), i)).collect();
    let started = Instant::now();
    let _: () = conn.mset(&pairs).await.unwrap();
    let keys: Vec<&String> = pairs.iter().map(|(key, _)| key).collect();
    let values: Vec<usize> = conn.mget(&keys).await.unwrap();
    assert_eq!(values, (0..2000).collect::<Vec<_>>());
    let deleted: usize = conn.del(&keys).await.unwrap();
    assert_eq!(deleted, 2000);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pipelines_across_nodes_keep_order() {
    let skiff = skiff("").await;
    let mut tasks = Vec::new();
    for client in 0..8 {
        let protocol = if client % 2 == 0 {
            Protocol::Resp2
        } else {
            Protocol::Resp3
        };
        let url = skiff.url(protocol);
        tasks.push(tokio::spawn(async move {
            let mut conn = redis_support::connect_redis_rs(&url).await;
            let mut pipe = redis::pipe();
            for i in 0..150 {
                let key = format!("pipe:{client}:{i}");
                pipe.set(&key, i).incr(&key, 1).get(&key);
            }
            let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.unwrap();
            for i in 0..150 {
                let incr: i64 = redis::from_redis_value(replies[i * 3 + 1].clone()).unwrap();
                let get: i64 = redis::from_redis_value(replies[i * 3 + 2].clone()).unwrap();
                assert_eq!(incr, i as i64 + 1, "client {client} INCR {i}");
                assert_eq!(get, i as i64 + 1, "client {client} GET {i}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
