//! The Redis near cache against real servers: hits that never reach Redis,
//! invalidations from Redis itself when another client writes, TTLs,
//! bounded memory, lost tracking connections, and redis-py's client-side
//! cache through skiff.

#[path = "support/redis.rs"]
mod redis_support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis_support::{RedisServer, Skiff};

/// The standalone server these tests share; each test uses keys of its own.
fn server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| RedisServer::start(&[]))
}

async fn skiff(extra: &str) -> Skiff {
    let server = tokio::task::spawn_blocking(server).await.unwrap();
    let body = format!(
        "mode = \"standalone\"\nnodes = [\"{}\"]\n{extra}\n\
         [[redis.cache]]\nprefix = \"cache:\"\nmax_ttl = \"30s\"\n",
        server.addr()
    );
    let skiff = Skiff::start(&body).await;
    wait_for_tracking(&skiff, 1).await;
    skiff
}

/// Waits until skiff's tracking connections to `nodes` nodes are up, so
/// the first reads of a test can be cached.
async fn wait_for_tracking(skiff: &Skiff, nodes: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
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

fn cache_entries(skiff: &Skiff) -> u64 {
    skiff.status()["cache"]["entries"].as_u64().unwrap()
}

#[tokio::test]
async fn repeated_get_is_served_from_cache() {
    let skiff = skiff("").await;
    let server = server();
    server.cli(&["SET", "cache:hit", "v1"]);
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["GET", "cache:hit"]).await, "$2\r\nv1\r\n");
    let gets = server.command_calls("get");
    for _ in 0..20 {
        assert_eq!(client.call(&["GET", "cache:hit"]).await, "$2\r\nv1\r\n");
    }
    assert_eq!(
        server.command_calls("get"),
        gets,
        "hits must not reach Redis"
    );
    assert!(cache_entries(&skiff) >= 1);
}
