//! Slot migration under the Redis router: MOVED after a slot changes owner,
//! ASK while a slot is migrating, and `redis-cli --cluster reshard` while
//! clients write. These tests move slots, so they get a cluster of their own.

#[path = "support/redis.rs"]
mod redis_support;

use std::sync::OnceLock;
use std::time::Duration;

use redis::AsyncCommands;
use redis_support::{Cluster, RedisServer, Skiff};
use skiff::redis::frame::Protocol;
use skiff::redis::slot::key_slot;

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::start)
}

/// Serializes the tests, because each one moves slots of the shared cluster.
fn serial() -> &'static tokio::sync::Mutex<()> {
    static SERIAL: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    SERIAL.get_or_init(|| tokio::sync::Mutex::new(()))
}

async fn skiff() -> Skiff {
    let cluster = tokio::task::spawn_blocking(cluster).await.unwrap();
    // A long refresh interval keeps skiff's slot map stale, so only the
    // redirect can send the command to the new owner.
    let body = format!(
        "mode = \"cluster\"\nnodes = {}\ntopology_refresh_interval = \"1h\"",
        cluster.seeds_toml()
    );
    Skiff::start(&body).await
}

fn node_id(node: &RedisServer) -> String {
    node.cli(&["CLUSTER", "MYID"]).trim().to_string()
}

/// Returns the owner of `key`'s slot and another primary.
fn owner_and_other<'a>(cluster: &'a Cluster, key: &str) -> (&'a RedisServer, &'a RedisServer) {
    let owner = cluster.primary_for_slot(key_slot(key.as_bytes()));
    let other = cluster
        .primaries()
        .into_iter()
        .find(|node| node.port != owner.port)
        .expect("a second primary");
    (owner, other)
}

/// Marks `slot` as moving from `source` to `target`, as `redis-cli
/// --cluster reshard` does before it moves keys.
fn start_migration(source: &RedisServer, target: &RedisServer, slot: &str) {
    let (source_id, target_id) = (node_id(source), node_id(target));
    let importing = target.cli(&["CLUSTER", "SETSLOT", slot, "IMPORTING", &source_id]);
    assert_eq!(importing.trim(), "OK");
    let migrating = source.cli(&["CLUSTER", "SETSLOT", slot, "MIGRATING", &target_id]);
    assert_eq!(migrating.trim(), "OK");
}

/// Gives `slot` to `target` on every primary, target first so it bumps its
/// config epoch, then waits until every node agrees.
fn finish_migration(cluster: &Cluster, target: &RedisServer, slot: &str) {
    let target_id = node_id(target);
    let reply = target.cli(&["CLUSTER", "SETSLOT", slot, "NODE", &target_id]);
    assert_eq!(reply.trim(), "OK");
    for node in cluster.primaries() {
        node.cli(&["CLUSTER", "SETSLOT", slot, "NODE", &target_id]);
    }
    wait_for_agreement(cluster);
}

/// Moves `key`, the last key of its slot on `source`, to `target` after
/// 150 ms and gives the slot to `target`, on a blocking thread.
fn finish_migration_soon(
    source: &RedisServer,
    target: &RedisServer,
    key: &str,
) -> tokio::task::JoinHandle<()> {
    let (source_port, target_port, key) = (source.port, target.port, key.to_string());
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(150));
        let port = target_port.to_string();
        let args = ["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", &key];
        assert_eq!(redis_support::redis_cli(source_port, &args).trim(), "OK");
        let cluster = self::cluster();
        let target = cluster
            .nodes
            .iter()
            .find(|node| node.port == target_port)
            .unwrap();
        finish_migration(cluster, target, &key_slot(key.as_bytes()).to_string());
    })
}

fn wait_for_agreement(cluster: &Cluster) {
    let seed = cluster.nodes[0].addr();
    cluster.nodes[0].wait_for(
        || {
            let output = std::process::Command::new("redis-cli")
                .args(["--cluster", "check", &seed])
                .output()
                .expect("redis-cli --cluster check runs");
            let text = String::from_utf8_lossy(&output.stdout);
            output.status.success() && !text.contains("[ERR]") && !text.contains("[WARNING]")
        },
        "nodes agree on the slot map",
    );
}

#[tokio::test]
async fn moved_after_setslot_is_followed() {
    let _serial = serial().lock().await;
    let metrics = skiff::admin::install_recorder();
    let skiff = skiff().await;
    let cluster = cluster();
    let key = "migrate:moved";
    let slot = key_slot(key.as_bytes()).to_string();
    let (owner, target) = owner_and_other(cluster, key);
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["GET", key]).await, "$-1\r\n");

    start_migration(owner, target, &slot);
    finish_migration(cluster, target, &slot);
    assert_eq!(client.call(&["SET", key, "v"]).await, "+OK\r\n");
    assert_eq!(client.call(&["GET", key]).await, "$1\r\nv\r\n");
    assert_eq!(
        target.cli(&["GET", key]).trim(),
        "v",
        "the key is on the new owner"
    );
    let rendered = metrics.render();
    for series in [
        "skiff_redis_redirects_total{kind=\"moved\"}",
        "skiff_redis_commands_total{role=\"primary\",outcome=\"ok\",route=\"main\"}",
        "skiff_redis_upstream_connections{node=\"127.0.0.1:",
        "skiff_redis_topology_refreshes_total",
        "skiff_redis_command_duration_seconds_bucket{role=\"primary\",route=\"main\",le=\"0.0005\"}",
    ] {
        assert!(
            rendered.contains(series),
            "{series} missing from\n{rendered}"
        );
    }
}

#[tokio::test]
async fn ask_during_migration_is_followed() {
    let _serial = serial().lock().await;
    let skiff = skiff().await;
    let cluster = cluster();
    let key = "migrate:ask";
    let slot = key_slot(key.as_bytes()).to_string();
    let (source, target) = owner_and_other(cluster, key);
    start_migration(source, target, &slot);

    // The key is not on the source, so the source replies ASK and the
    // command must reach the target after ASKING.
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SET", key, "asked"]).await, "+OK\r\n");
    assert_eq!(client.call(&["GET", key]).await, "$5\r\nasked\r\n");
    let on_target = target.cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot]);
    assert_eq!(on_target.trim(), "1");

    finish_migration(cluster, target, &slot);
    assert_eq!(client.call(&["GET", key]).await, "$5\r\nasked\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_while_writing_loses_nothing() {
    let _serial = serial().lock().await;
    let skiff = skiff().await;
    let cluster = cluster();
    let mut conn = skiff.client(Protocol::Resp2).await;
    for i in 0..300 {
        let _: () = conn.set(format!("reshard:{i}"), i).await.unwrap();
    }
    wait_for_agreement(cluster);
    let primaries = cluster.primaries();
    let (from, to) = (node_id(primaries[0]), node_id(primaries[1]));
    let seed = primaries[0].addr();
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &seed])
            .args(["--cluster-from", &from, "--cluster-to", &to])
            .args(["--cluster-slots", "600", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard runs")
    });

    let mut round = 0u64;
    while !reshard.is_finished() || round < 3 {
        for i in 0..300 {
            let key = format!("reshard:{i}");
            let value: i64 = conn.incr(&key, 1).await.unwrap();
            assert_eq!(value, i + round as i64 + 1, "{key} in round {round}");
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let output = reshard.await.unwrap();
    assert!(
        output.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let keys: Vec<String> = (0..300).map(|i| format!("reshard:{i}")).collect();
    let values: Vec<i64> = conn.mget(&keys).await.unwrap();
    for (i, value) in values.iter().enumerate() {
        assert_eq!(
            *value,
            i as i64 + round as i64,
            "reshard:{i} after the reshard"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tryagain_during_migration_is_retried() {
    let _serial = serial().lock().await;
    let skiff = skiff().await;
    let cluster = cluster();
    let (first, second) = ("{retry}a", "{retry}b");
    let slot = key_slot(first.as_bytes()).to_string();
    let mut client = skiff.raw().await;
    assert_eq!(
        client.call(&["MSET", first, "1", second, "2"]).await,
        "+OK\r\n"
    );

    // Half of the slot's keys move: the source now replies TRYAGAIN to a
    // command that needs both keys.
    let (source, target) = owner_and_other(cluster, first);
    start_migration(source, target, &slot);
    let target_port = target.port.to_string();
    let migrate = |key: &str| {
        let args = [
            "MIGRATE",
            "127.0.0.1",
            &target_port,
            "",
            "0",
            "5000",
            "KEYS",
            key,
        ];
        source.cli(&args)
    };
    assert_eq!(migrate(second).trim(), "OK");
    assert!(source.cli(&["MGET", first, second]).starts_with("TRYAGAIN"));

    // The migration finishes while skiff is retrying.
    let finish = finish_migration_soon(source, target, first);
    let reply = client.call(&["MGET", first, second]).await;
    assert_eq!(reply, "*2\r\n$1\r\n1\r\n$1\r\n2\r\n");
    finish.await.unwrap();
}

#[tokio::test]
async fn blocking_pop_follows_moved_slot() {
    let _serial = serial().lock().await;
    let skiff = skiff().await;
    let cluster = cluster();
    let queue = "migrate:queue";
    let slot = key_slot(queue.as_bytes()).to_string();
    let (owner, target) = owner_and_other(cluster, queue);
    let mut consumer = skiff.raw().await;
    // Loads skiff's slot map before the slot moves.
    assert_eq!(consumer.call(&["LLEN", queue]).await, ":0\r\n");
    start_migration(owner, target, &slot);
    finish_migration(cluster, target, &slot);

    consumer.send(&["BRPOP", queue, "5"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut producer = skiff.raw().await;
    assert_eq!(producer.call(&["LPUSH", queue, "job"]).await, ":1\r\n");
    let popped = String::from_utf8_lossy(&consumer.read().await).into_owned();
    assert_eq!(popped, "*2\r\n$13\r\nmigrate:queue\r\n$3\r\njob\r\n");
}

#[tokio::test]
async fn transaction_follows_moved_slot() {
    let _serial = serial().lock().await;
    // One skiff per case: the first MOVED makes a skiff reload its map, so
    // a second case on the same skiff would no longer see a stale map.
    let (watch_skiff, multi_skiff) = (skiff().await, skiff().await);
    let cluster = cluster();
    let mut watcher = watch_skiff.raw().await;
    let mut multi = multi_skiff.raw().await;
    assert_eq!(
        watcher.call(&["SET", "{txmove}watched", "1"]).await,
        "+OK\r\n"
    );
    assert_eq!(
        multi.call(&["SET", "{txmulti}counter", "1"]).await,
        "+OK\r\n"
    );
    for key in ["{txmove}watched", "{txmulti}counter"] {
        let slot = key_slot(key.as_bytes()).to_string();
        let (owner, target) = owner_and_other(cluster, key);
        start_migration(owner, target, &slot);
        let port = target.port.to_string();
        let args = ["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key];
        assert_eq!(owner.cli(&args).trim(), "OK");
        finish_migration(cluster, target, &slot);
    }

    assert_eq!(watcher.call(&["WATCH", "{txmove}watched"]).await, "+OK\r\n");
    assert_eq!(watcher.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(
        watcher.call(&["INCR", "{txmove}watched"]).await,
        "+QUEUED\r\n"
    );
    assert_eq!(watcher.call(&["EXEC"]).await, "*1\r\n:2\r\n");

    assert_eq!(multi.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(multi.call(&["PING"]).await, "+QUEUED\r\n");
    assert_eq!(
        multi.call(&["INCR", "{txmulti}counter"]).await,
        "+QUEUED\r\n"
    );
    assert_eq!(multi.call(&["EXEC"]).await, "*2\r\n+PONG\r\n:2\r\n");
}

/// skiff learns a slot's new owner from another client while a pipelined
/// write waits on the old owner. The next write of the pipeline must not
/// reach the new owner before the first one is redirected there.
#[tokio::test]
async fn pipeline_order_survives_map_change() {
    let _serial = serial().lock().await;
    let cluster = tokio::task::spawn_blocking(cluster).await.unwrap();
    // Reads go to replicas, so a read learns of the move from the old
    // owner's replica while the old owner is stopped.
    let body = format!(
        "mode = \"cluster\"\nnodes = {}\ntopology_refresh_interval = \"1h\"\nread_from = \"replica\"",
        cluster.seeds_toml()
    );
    let skiff = Skiff::start(&body).await;
    let key = "migrate:order";
    let slot = key_slot(key.as_bytes()).to_string();
    let (owner, target) = owner_and_other(cluster, key);
    let owner_replica = cluster
        .replicas()
        .into_iter()
        .find(|node| node.info_field("replication", "master_port") == owner.port.to_string())
        .expect("the owner has a replica");
    let mut writer = skiff.raw().await;
    let mut reader = skiff.raw().await;
    assert_eq!(writer.call(&["DEL", key]).await, ":0\r\n");
    assert_eq!(reader.call(&["GET", key]).await, "$-1\r\n");

    start_migration(owner, target, &slot);
    finish_migration(cluster, target, &slot);
    owner.signal("STOP");
    let resumed = Resume(owner);
    // Sent to the old owner, where it waits.
    writer.send(&["SET", key, "first"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The old owner's replica replies MOVED, and skiff's map now names the
    // new owner for the slot.
    let redirected = || owner_replica.command_stat("get", "rejected_calls");
    let replica_redirects = redirected();
    assert_eq!(reader.call(&["GET", key]).await, "$-1\r\n");
    assert_eq!(
        redirected(),
        replica_redirects + 1,
        "the old owner's replica redirected the read"
    );
    writer.send(&["APPEND", key, "+second"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(resumed);

    assert_eq!(String::from_utf8_lossy(&writer.read().await), "+OK\r\n");
    assert_eq!(
        String::from_utf8_lossy(&writer.read().await),
        ":12\r\n",
        "APPEND ran after SET"
    );
    assert_eq!(target.cli(&["GET", key]).trim(), "first+second");
}

/// Resumes a stopped server when dropped, also when a test fails.
struct Resume<'a>(&'a RedisServer);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

/// A pipelined command that gets TRYAGAIN has later commands of its
/// pipeline already sent, which a retry would follow instead of precede.
/// It gets the error, as from Redis directly, and the rest run in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tryagain_in_pipeline_is_returned() {
    let _serial = serial().lock().await;
    check_tryagain_in_pipeline("{pipetry}a", "{pipetry}b", &[]).await;
}

/// As above, for an MSET that skiff splits by slot: the part that gets
/// TRYAGAIN is not retried either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tryagain_in_split_pipeline_is_returned() {
    let _serial = serial().lock().await;
    let other = ["split:other", "1"];
    check_tryagain_in_pipeline("{splittry}a", "{splittry}b", &other).await;
}

/// Sends `MSET first 1 second 1 EXTRA...`, `INCR first` and `GET first` in
/// one pipeline while `second` has moved and `first` has not, and checks
/// that MSET gets TRYAGAIN and never runs.
async fn check_tryagain_in_pipeline(first: &str, second: &str, extra: &[&str]) {
    let skiff = skiff().await;
    let cluster = cluster();
    let slot = key_slot(first.as_bytes()).to_string();
    let mut client = skiff.raw().await;
    assert_eq!(client.call(&["SET", first, "10"]).await, "+OK\r\n");
    assert_eq!(client.call(&["SET", second, "0"]).await, "+OK\r\n");

    // The second key moves first, so the source replies TRYAGAIN to a
    // command that needs both.
    let (source, target) = owner_and_other(cluster, first);
    start_migration(source, target, &slot);
    let port = target.port.to_string();
    let args = [
        "MIGRATE",
        "127.0.0.1",
        &port,
        "",
        "0",
        "5000",
        "KEYS",
        second,
    ];
    assert_eq!(source.cli(&args).trim(), "OK");

    // The migration finishes soon, so a retry of MSET would succeed after
    // INCR ran.
    let finish = finish_migration_soon(source, target, first);

    let mut mset = vec!["MSET", first, "1", second, "1"];
    mset.extend_from_slice(extra);
    let mut pipeline = Vec::new();
    for args in [&mset[..], &["INCR", first][..], &["GET", first][..]] {
        pipeline.extend_from_slice(&skiff::redis::frame::encode_command(args));
    }
    client.send_bytes(&pipeline).await;
    let mset = String::from_utf8_lossy(&client.read().await).into_owned();
    assert!(mset.starts_with("-TRYAGAIN"), "MSET got {mset:?}");
    assert_eq!(String::from_utf8_lossy(&client.read().await), ":11\r\n");
    assert_eq!(
        String::from_utf8_lossy(&client.read().await),
        "$2\r\n11\r\n"
    );

    finish.await.unwrap();
    assert_eq!(target.cli(&["GET", first]).trim(), "11", "MSET never ran");
}
