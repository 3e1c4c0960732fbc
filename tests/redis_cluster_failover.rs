//! A cluster primary dies and its replica takes over: skiff must notice
//! through connection errors, reload the slot map and send writes to the
//! new primary. This test kills a node, so it has a cluster of its own.

#[path = "support/redis.rs"]
mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{Cluster, Skiff};
use skiff::redis::slot::key_slot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_move_to_promoted_replica() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start_with_node_timeout(1000))
        .await
        .unwrap();
    let body = format!(
        "mode = \"cluster\"\nnodes = {}\ntopology_refresh_interval = \"1h\"\nconnect_timeout = \"1s\"",
        cluster.seeds_toml()
    );
    let skiff = Skiff::start(&body).await;
    let mut client = skiff.raw().await;
    // A key whose primary is not the seed, so the seed stays up.
    let key = (0..)
        .map(|i| format!("failover:{i}"))
        .find(|key| {
            cluster.primary_for_slot(key_slot(key.as_bytes())).port != cluster.nodes[0].port
        })
        .unwrap();
    assert_eq!(client.call(&["SET", &key, "before"]).await, "+OK\r\n");

    let victim = cluster.primary_for_slot(key_slot(key.as_bytes())).port;
    let replica_ports: Vec<u16> = cluster
        .replicas()
        .iter()
        .filter(|node| node.info_field("replication", "master_port") == victim.to_string())
        .map(|node| node.port)
        .collect();
    assert_eq!(replica_ports.len(), 1, "the victim has one replica");
    let victim_node = cluster
        .nodes
        .iter_mut()
        .find(|node| node.port == victim)
        .unwrap();
    victim_node.kill();

    let started = Instant::now();
    loop {
        let reply = client.call(&["SET", &key, "after"]).await;
        if reply == "+OK\r\n" {
            break;
        }
        assert!(reply.starts_with('-'), "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "writes still fail after the failover: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let promoted = cluster
        .nodes
        .iter()
        .find(|node| node.port == replica_ports[0])
        .unwrap();
    assert_eq!(promoted.info_field("replication", "role"), "master");
    assert_eq!(promoted.cli(&["GET", &key]).trim(), "after");
    assert_eq!(client.call(&["GET", &key]).await, "$5\r\nafter\r\n");
}
