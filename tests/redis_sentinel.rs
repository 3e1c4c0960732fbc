//! The Redis router in sentinel mode: the primary comes from a real
//! sentinel, and writes follow it through a failover.

#[path = "support/redis.rs"]
mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{RedisServer, Skiff};

const NAME: &str = "skiffgroup";

fn sentinel_body(sentinel: &RedisServer, name: &str) -> String {
    format!(
        "mode = \"sentinel\"\nnodes = [\"{}\"]\nmaster_name = \"{name}\"\n\
         read_from = \"prefer-replica\"\nconnect_timeout = \"1s\"",
        sentinel.addr()
    )
}

fn reported_primary_port(sentinel: &RedisServer) -> u16 {
    redis_support::reported_primary_port(sentinel, NAME)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_sentinel_failover() {
    let (servers, sentinel) =
        tokio::task::spawn_blocking(|| redis_support::start_sentinel_group(NAME))
            .await
            .unwrap();
    let skiff = Skiff::start(&sentinel_body(&sentinel, NAME)).await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SET", "sentinel:a", "1"]).await, "+OK\r\n");
    assert_eq!(servers.primary.cli(&["GET", "sentinel:a"]).trim(), "1");

    // The replicas come from the sentinel too: reads go to them.
    for replica in &servers.replicas {
        replica.wait_for(
            || replica.cli(&["GET", "sentinel:a"]).trim() == "1",
            "replication",
        );
    }
    let replica_reads = || -> u64 {
        servers
            .replicas
            .iter()
            .map(|r| r.command_calls("strlen"))
            .sum()
    };
    let before = replica_reads();
    for _ in 0..10 {
        assert_eq!(client.call(&["STRLEN", "sentinel:a"]).await, ":1\r\n");
    }
    assert_eq!(replica_reads() - before, 10);

    let old_port = servers.primary.port;
    assert_eq!(sentinel.cli(&["SENTINEL", "FAILOVER", NAME]).trim(), "OK");
    sentinel.wait_for(
        || {
            let port = reported_primary_port(&sentinel);
            port != 0 && port != old_port
        },
        "failover to a replica",
    );
    let new_port = reported_primary_port(&sentinel);
    let new_primary = servers
        .replicas
        .iter()
        .find(|r| r.port == new_port)
        .unwrap();

    // Writes may fail while the old primary is demoted, but must reach the
    // new primary soon after the sentinel announces it.
    let started = Instant::now();
    loop {
        let reply = client.call(&["SET", "sentinel:b", "2"]).await;
        if reply == "+OK\r\n" && new_primary.cli(&["GET", "sentinel:b"]).trim() == "2" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "writes still fail after the failover: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(sentinel);
}

#[tokio::test]
async fn unknown_master_name_is_reported() {
    let (servers, sentinel) = tokio::task::spawn_blocking(|| {
        let primary = RedisServer::start(&[]);
        let sentinel = RedisServer::start_sentinel(primary.port, NAME);
        (primary, sentinel)
    })
    .await
    .unwrap();
    let skiff = Skiff::start(&sentinel_body(&sentinel, "no-such-group")).await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["GET", "k"]).await,
        "-ERR no primary known for no-such-group: no sentinel reported one yet\r\n"
    );
    drop(servers);
}

#[tokio::test]
async fn sentinel_password_is_sent() {
    let (primary, sentinel) = tokio::task::spawn_blocking(|| {
        let primary = RedisServer::start(&[]);
        let sentinel =
            RedisServer::start_sentinel_with(primary.port, NAME, "requirepass sentinel-secret");
        (primary, sentinel)
    })
    .await
    .unwrap();

    // Without the sentinels' password skiff learns no primary.
    let skiff = Skiff::start(&sentinel_body(&sentinel, NAME)).await;
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["GET", "k"]).await,
        format!("-ERR no primary known for {NAME}: no sentinel reported one yet\r\n")
    );
    drop(skiff);

    let body = format!(
        "{}\nsentinel_password = \"sentinel-secret\"",
        sentinel_body(&sentinel, NAME)
    );
    let skiff = Skiff::start(&body).await;
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SET", "sentinel:auth", "1"]).await, "+OK\r\n");
    assert_eq!(primary.cli(&["GET", "sentinel:auth"]).trim(), "1");
}
