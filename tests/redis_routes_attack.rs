//! Hard cases of `[[redis.routes]]` against real servers: subscriptions
//! that end and restart in one pipeline, subscriptions on channels of two
//! routes, commands that skiff rejects inside MULTI, scripts loaded for
//! EVALSHA on a route, and a real Celery worker through a route.

#[path = "support/redis.rs"]
mod redis_support;

use std::time::Duration;

use redis_support::{RawClient, RedisServer, Skiff};
use skiff::redis::frame::encode_command;

/// Starts skiff with a standalone `[redis]` on `main` and a route
/// `celery` for database 1 and the prefixes `celery` and `_kombu.` on
/// `route`.
async fn celery_skiff(main: &RedisServer, route: &RedisServer) -> Skiff {
    let body = format!(
        "nodes = [\"{}\"]\n\
         [[redis.routes]]\nname = \"celery\"\ndatabase = 1\n\
         prefixes = [\"celery\", \"_kombu.\"]\nnodes = [\"{}\"]\n",
        main.addr(),
        route.addr()
    );
    Skiff::start(&body).await
}

/// Sends every command of `commands` in one write.
async fn pipeline(client: &mut RawClient, commands: &[&[&str]]) {
    let mut bytes = Vec::new();
    for command in commands {
        bytes.extend_from_slice(&encode_command(command));
    }
    client.send_bytes(&bytes).await;
}

async fn read_text(client: &mut RawClient) -> String {
    String::from_utf8_lossy(&client.read().await).into_owned()
}

/// Asserts that nothing arrives on `client` for a short while.
async fn assert_silent(client: &mut RawClient, what: &str) {
    let read = tokio::time::timeout(Duration::from_millis(300), client.read()).await;
    if let Ok(frame) = read {
        panic!(
            "{what}: unexpected frame {:?}",
            String::from_utf8_lossy(&frame)
        );
    }
}

/// Celery's result consumer unsubscribes from one task's channel and
/// subscribes to the next one's in the same write. The confirmation with
/// count 0 must not end the subscription, or the connection, still
/// subscribed, goes back to the pool.
#[tokio::test]
async fn unsubscribe_then_subscribe_in_one_write() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut subscriber = skiff.raw().await;
    let first = subscriber.call(&["SUBSCRIBE", "celery-task-meta-a"]).await;
    assert!(first.contains("celery-task-meta-a"), "{first}");

    pipeline(
        &mut subscriber,
        &[
            &["UNSUBSCRIBE", "celery-task-meta-a"],
            &["SUBSCRIBE", "celery-task-meta-b"],
        ],
    )
    .await;
    assert_eq!(
        read_text(&mut subscriber).await,
        "*3\r\n$11\r\nunsubscribe\r\n$18\r\ncelery-task-meta-a\r\n:0\r\n"
    );
    assert_eq!(
        read_text(&mut subscriber).await,
        "*3\r\n$9\r\nsubscribe\r\n$18\r\ncelery-task-meta-b\r\n:1\r\n"
    );

    // Another client takes a dedicated connection from the same pool.
    let mut other = skiff.raw().await;
    let other_reply = other.call(&["SUBSCRIBE", "celery-other"]).await;
    assert!(other_reply.contains("celery-other"), "{other_reply}");

    let mut publisher = skiff.raw().await;
    assert_eq!(
        publisher
            .call(&["PUBLISH", "celery-task-meta-b", "done"])
            .await,
        ":1\r\n"
    );
    assert_eq!(
        read_text(&mut subscriber).await,
        "*3\r\n$7\r\nmessage\r\n$18\r\ncelery-task-meta-b\r\n$4\r\ndone\r\n"
    );
    assert_silent(&mut other, "a client subscribed to another channel").await;
}

/// skiff rejects SELECT inside MULTI; like any command rejected while
/// queueing, it must make EXEC discard the transaction, or the queued
/// writes run against the database the client meant to leave.
#[tokio::test]
async fn select_inside_multi_aborts_exec() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut raw = skiff.raw().await;

    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    let select = raw.call(&["SELECT", "1"]).await;
    assert!(select.starts_with("-ERR "), "{select}");
    assert_eq!(raw.call(&["SET", "queued", "1"]).await, "+QUEUED\r\n");
    assert_eq!(
        raw.call(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(main.cli(&["EXISTS", "queued"]).trim(), "0");
    assert_eq!(route.cli(&["EXISTS", "queued"]).trim(), "0");

    // The same inside a transaction already pinned to the route.
    assert_eq!(raw.call(&["SELECT", "1"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["SET", "k", "1"]).await, "+QUEUED\r\n");
    let select = raw.call(&["SELECT", "0"]).await;
    assert!(select.starts_with("-ERR "), "{select}");
    assert_eq!(
        raw.call(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(route.cli(&["EXISTS", "k"]).trim(), "0");

    // The session works after the aborted transactions.
    assert_eq!(raw.call(&["SET", "after", "1"]).await, "+OK\r\n");
    assert_eq!(route.cli(&["GET", "after"]).trim(), "1");
}

/// Returns the subscriber count of `channel` on `server`.
fn numsub(server: &RedisServer, channel: &str) -> String {
    let output = server.cli(&["PUBSUB", "NUMSUB", channel]);
    output.lines().nth(1).unwrap_or_default().to_string()
}

/// A subscribed client that subscribes to a channel of another route gets
/// a second upstream connection on that route, and one stream of messages
/// with counts over both.
#[tokio::test]
async fn subscribe_channels_of_two_routes() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut subscriber = skiff.raw().await;
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "celery-task-meta-1"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$18\r\ncelery-task-meta-1\r\n:1\r\n"
    );
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "news"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:2\r\n"
    );
    assert_eq!(
        subscriber.call(&["PSUBSCRIBE", "celery-*"]).await,
        "*3\r\n$10\r\npsubscribe\r\n$8\r\ncelery-*\r\n:3\r\n"
    );
    assert_eq!(numsub(&main, "news"), "1", "news on [redis]'s server");
    assert_eq!(numsub(&route, "news"), "0", "news not on the route's");
    assert_eq!(numsub(&route, "celery-task-meta-1"), "1");

    let mut publisher = skiff.raw().await;
    assert_eq!(publisher.call(&["PUBLISH", "news", "n1"]).await, ":1\r\n");
    assert_eq!(
        read_text(&mut subscriber).await,
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nn1\r\n"
    );
    assert_eq!(
        publisher
            .call(&["PUBLISH", "celery-task-meta-1", "t1"])
            .await,
        ":2\r\n",
        "the channel and the pattern match"
    );
    let mut messages = vec![
        read_text(&mut subscriber).await,
        read_text(&mut subscriber).await,
    ];
    messages.sort();
    assert_eq!(
        messages,
        [
            "*3\r\n$7\r\nmessage\r\n$18\r\ncelery-task-meta-1\r\n$2\r\nt1\r\n",
            "*4\r\n$8\r\npmessage\r\n$8\r\ncelery-*\r\n$18\r\ncelery-task-meta-1\r\n$2\r\nt1\r\n",
        ]
    );

    // The count in confirmations is the total over both connections.
    pipeline(&mut subscriber, &[&["UNSUBSCRIBE", "news", "never"]]).await;
    assert_eq!(
        read_text(&mut subscriber).await,
        "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:2\r\n"
    );
    assert_eq!(
        read_text(&mut subscriber).await,
        "*3\r\n$11\r\nunsubscribe\r\n$5\r\nnever\r\n:2\r\n"
    );
    // One UNSUBSCRIBE with channels of both routes, where [redis] has no
    // subscription left.
    pipeline(
        &mut subscriber,
        &[&["UNSUBSCRIBE", "celery-task-meta-1", "other"]],
    )
    .await;
    let first = read_text(&mut subscriber).await;
    let second = read_text(&mut subscriber).await;
    let route_confirmation = "*3\r\n$11\r\nunsubscribe\r\n$18\r\ncelery-task-meta-1\r\n:1\r\n";
    assert!(
        first == route_confirmation || second == route_confirmation,
        "{first:?} {second:?}"
    );
    assert!(
        first.contains("$5\r\nother\r\n") || second.contains("$5\r\nother\r\n"),
        "{first:?} {second:?}"
    );
    assert_eq!(numsub(&main, "news"), "0");
    assert_eq!(
        subscriber.call(&["PUNSUBSCRIBE", "celery-*"]).await,
        "*3\r\n$12\r\npunsubscribe\r\n$8\r\ncelery-*\r\n:0\r\n"
    );

    // Back to normal commands, on both routes.
    assert_eq!(subscriber.call(&["SET", "plain", "1"]).await, "+OK\r\n");
    assert_eq!(subscriber.call(&["SET", "celery-x", "2"]).await, "+OK\r\n");
    assert_eq!(main.cli(&["GET", "plain"]).trim(), "1");
    assert_eq!(route.cli(&["GET", "celery-x"]).trim(), "2");
}

/// A RESP3 client may subscribe through two routes and run commands
/// between its subscriptions.
#[tokio::test]
async fn resp3_subscribe_two_routes() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut subscriber = skiff.raw().await;
    subscriber.protocol = skiff::redis::frame::Protocol::Resp3;
    let hello = subscriber.call(&["HELLO", "3"]).await;
    assert!(hello.starts_with('%'), "{hello}");
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "news"]).await,
        ">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(subscriber.call(&["SET", "celery-y", "1"]).await, "+OK\r\n");
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "celery-events"]).await,
        ">3\r\n$9\r\nsubscribe\r\n$13\r\ncelery-events\r\n:2\r\n"
    );
    assert_eq!(numsub(&route, "celery-events"), "1");
    assert_eq!(numsub(&main, "celery-events"), "0");
    let mut publisher = skiff.raw().await;
    assert_eq!(
        publisher.call(&["PUBLISH", "celery-events", "e"]).await,
        ":1\r\n"
    );
    assert_eq!(
        read_text(&mut subscriber).await,
        ">3\r\n$7\r\nmessage\r\n$13\r\ncelery-events\r\n$1\r\ne\r\n"
    );
}

/// Why Celery cannot be run here, if it cannot.
fn celery_missing() -> Option<String> {
    let output = std::process::Command::new("python3")
        .args(["-c", "import celery, redis, kombu.transport.redis"])
        .output();
    match output {
        Err(err) => Some(format!("python3 not runnable: {err}")),
        Ok(out) if !out.status.success() => Some(format!(
            "celery or redis-py not installed (pip install celery redis packaging): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// A real Celery worker and producer through skiff: tasks with results, a
/// retry, a group and a chord, with the broker in database 1 and the
/// results under the `celery` prefix, all on the route's server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_worker_through_route() {
    if let Some(reason) = celery_missing() {
        println!("skipped: {reason}");
        return;
    }
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/celery_through_skiff.py"
    );
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .env("SKIFF_PORT", skiff.addr.port().to_string())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("Celery run finished within 60 s")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in ["add ok", "retry ok", "group ok", "chord ok"] {
        assert!(stdout.contains(line), "{line} missing:\n{stdout}\n{stderr}");
    }

    let main_keys = main.cli(&["--scan"]);
    assert_eq!(main_keys.trim(), "", "keys on [redis]'s server");
    assert_eq!(route.cli(&["EXISTS", "_kombu.binding.celery"]).trim(), "1");
    let results = route.cli(&["--scan", "--pattern", "celery-task-meta-*"]);
    assert!(results.lines().count() >= 11, "results: {results}");
}

/// `SCRIPT LOAD` has no keys, but the `EVALSHA` that follows runs where
/// its keys are, so the script must reach every route (Celery's chord
/// counter is such a script).
#[tokio::test]
async fn script_load_reaches_every_route() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut raw = skiff.raw().await;
    let loaded = raw
        .call(&["SCRIPT", "LOAD", "return redis.call('INCR', KEYS[1])"])
        .await;
    assert!(loaded.starts_with("$40\r\n"), "{loaded}");
    let sha = loaded.lines().nth(1).unwrap().to_string();
    assert_eq!(
        raw.call(&["EVALSHA", &sha, "1", "celery-chord"]).await,
        ":1\r\n"
    );
    assert_eq!(raw.call(&["EVALSHA", &sha, "1", "plain"]).await, ":1\r\n");
    assert_eq!(route.cli(&["GET", "celery-chord"]).trim(), "1");
    assert_eq!(main.cli(&["GET", "plain"]).trim(), "1");

    // A script counts as loaded only when every route has it, since an
    // EVALSHA of it may go to any of them.
    let main_only = main.cli(&["SCRIPT", "LOAD", "return 7"]);
    let main_only = main_only.trim();
    assert_eq!(main.cli(&["SCRIPT", "EXISTS", main_only]).trim(), "1");
    assert_eq!(
        raw.call(&["SCRIPT", "EXISTS", &sha, main_only]).await,
        "*2\r\n:1\r\n:0\r\n"
    );

    assert_eq!(raw.call(&["SCRIPT", "FLUSH"]).await, "+OK\r\n");
    let flushed = raw.call(&["EVALSHA", &sha, "1", "celery-chord"]).await;
    assert!(flushed.starts_with("-NOSCRIPT"), "{flushed}");
    assert_eq!(raw.call(&["SCRIPT", "EXISTS", &sha]).await, "*1\r\n:0\r\n");
}

/// One `SUBSCRIBE` with channels of two routes subscribes each channel on
/// its route, and the counts in the confirmations run over all of them.
#[tokio::test]
async fn subscribe_across_routes() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut subscriber = skiff.raw().await;
    subscriber
        .send(&["SUBSCRIBE", "plain-a", "celery-task-meta-1", "plain-b"])
        .await;
    let mut confirmed = Vec::new();
    for _ in 0..3 {
        confirmed.push(read_text(&mut subscriber).await);
    }
    // Each route confirms its own channels in order; the counts follow
    // the order in which the confirmations reach the client.
    for (index, confirmation) in confirmed.iter().enumerate() {
        assert!(
            confirmation.starts_with("*3\r\n$9\r\nsubscribe\r\n"),
            "{confirmation}"
        );
        assert!(
            confirmation.ends_with(&format!(":{}\r\n", index + 1)),
            "{confirmed:?}"
        );
    }
    let position = |channel: &str| {
        confirmed
            .iter()
            .position(|c| c.contains(&format!("\r\n{channel}\r\n")))
            .unwrap_or_else(|| panic!("{channel} confirmed: {confirmed:?}"))
    };
    assert!(position("plain-a") < position("plain-b"));
    position("celery-task-meta-1");
    let numsub = |server: &RedisServer, channel: &str| {
        server
            .cli(&["PUBSUB", "NUMSUB", channel])
            .lines()
            .nth(1)
            .map(str::to_string)
    };
    assert_eq!(numsub(&main, "plain-a").as_deref(), Some("1"));
    assert_eq!(numsub(&main, "plain-b").as_deref(), Some("1"));
    assert_eq!(numsub(&route, "celery-task-meta-1").as_deref(), Some("1"));
    assert_eq!(numsub(&main, "celery-task-meta-1").as_deref(), Some("0"));

    let mut publisher = skiff.raw().await;
    for channel in ["plain-b", "celery-task-meta-1"] {
        assert_eq!(publisher.call(&["PUBLISH", channel, "hi"]).await, ":1\r\n");
        let message = read_text(&mut subscriber).await;
        assert!(message.contains(channel), "{message}");
    }

    // A later SUBSCRIBE across routes reuses both connections.
    subscriber
        .send(&["SUBSCRIBE", "celery-task-meta-2", "plain-c"])
        .await;
    let mut counts: Vec<String> = Vec::new();
    for _ in 0..2 {
        counts.push(read_text(&mut subscriber).await);
    }
    assert!(counts.iter().any(|c| c.ends_with(":4\r\n")), "{counts:?}");
    assert!(counts.iter().any(|c| c.ends_with(":5\r\n")), "{counts:?}");
    assert_eq!(numsub(&route, "celery-task-meta-2").as_deref(), Some("1"));
    assert_eq!(numsub(&main, "plain-c").as_deref(), Some("1"));
}

/// A plain UNSUBSCRIBE leaves shard channels subscribed, as in Redis, so
/// the connection that carries them must not go back to the pool, where
/// another client would get their messages.
#[tokio::test]
async fn shard_subscription_never_reaches_another_client() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut first = skiff.raw().await;
    pipeline(
        &mut first,
        &[
            &["SUBSCRIBE", "plain-channel"],
            &["SSUBSCRIBE", "plain-shard"],
        ],
    )
    .await;
    assert!(read_text(&mut first).await.ends_with(":1\r\n"));
    let shard = read_text(&mut first).await;
    assert!(
        shard.contains("ssubscribe") && shard.ends_with(":1\r\n"),
        "{shard}"
    );
    first.send(&["UNSUBSCRIBE"]).await;
    let unsubscribed = read_text(&mut first).await;
    assert!(unsubscribed.ends_with(":0\r\n"), "{unsubscribed}");

    let mut other = skiff.raw().await;
    let other_reply = other.call(&["SUBSCRIBE", "plain-other"]).await;
    assert!(other_reply.contains("plain-other"), "{other_reply}");
    let mut publisher = skiff.raw().await;
    assert_eq!(
        publisher
            .call(&["SPUBLISH", "plain-shard", "for the first client"])
            .await,
        ":1\r\n"
    );
    let message = read_text(&mut first).await;
    assert!(message.contains("for the first client"), "{message}");
    assert_silent(&mut other, "a client subscribed to another channel").await;
}

/// A SUBSCRIBE split across routes whose second route cannot be reached
/// gets the error, and then the connection closes. So the client does not
/// stay subscribed to half of its channels, and once it reconnects it
/// subscribes to all of them again.
#[tokio::test]
async fn subscribe_with_route_down_closes_client() {
    let main = RedisServer::start(&[]);
    let mut route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    route.kill();
    let mut client = skiff.raw().await;
    client
        .send(&["SUBSCRIBE", "plain-a", "celery-task-meta-1", "plain-b"])
        .await;
    let first = read_text(&mut client).await;
    assert!(first.contains("plain-a"), "{first}");
    let rest = client.read_to_close().await;
    assert!(rest.starts_with("-ERR"), "{rest}");
}

/// A subscription inside MULTI or after WATCH is rejected: the pinned
/// connection goes back to the pool afterwards, and a subscription left on
/// it would hand the next client that uses it this client's messages.
#[tokio::test]
async fn subscribe_inside_transaction_is_rejected() {
    let main = RedisServer::start(&[]);
    let route = RedisServer::start(&[]);
    let skiff = celery_skiff(&main, &route).await;
    let mut raw = skiff.raw().await;

    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["SET", "queued", "1"]).await, "+QUEUED\r\n");
    let subscribe = raw.call(&["SUBSCRIBE", "plain-tx"]).await;
    assert!(subscribe.starts_with("-ERR SUBSCRIBE "), "{subscribe}");
    assert_eq!(
        raw.call(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(raw.call(&["WATCH", "queued"]).await, "+OK\r\n");
    let subscribe = raw.call(&["SSUBSCRIBE", "plain-tx"]).await;
    assert!(subscribe.starts_with("-ERR SSUBSCRIBE "), "{subscribe}");
    assert_eq!(raw.call(&["UNWATCH"]).await, "+OK\r\n");

    let numsub = main.cli(&["PUBSUB", "NUMSUB", "plain-tx"]);
    assert_eq!(numsub.lines().nth(1), Some("0"), "{numsub}");
    assert_eq!(
        main.cli(&["PUBSUB", "SHARDNUMSUB", "plain-tx"])
            .lines()
            .nth(1),
        Some("0")
    );
}
