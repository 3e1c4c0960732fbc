//! Config reload of the log shipper and the Redis router: settings that
//! can change while running take effect for the next request, without
//! dropping connections or records.

#[path = "support/logship_client.rs"]
mod client;
#[path = "support/logship_harness.rs"]
mod harness;
#[path = "support/mock_sls.rs"]
mod mock_sls;
#[path = "support/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "support/redis.rs"]
mod redis_support;

use std::time::Duration;

use client::{log_group, put_logs, PutLogs};
use mock_sls::{MockSls, MockSlsConfig};
use skiff::config::Config;

async fn mock(access_key_id: &str, access_key_secret: &str) -> MockSls {
    MockSls::start(MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: access_key_id.into(),
        access_key_secret: access_key_secret.into(),
        security_token: None,
    })
    .await
}

/// Ships to `mock` with the given key pair, with an ingest endpoint that
/// clients sign with `ingest_secret`.
fn shipper_config(
    dir: &std::path::Path,
    mock: &MockSls,
    key: (&str, &str),
    ingest_secret: &str,
) -> String {
    let base = harness::sls_config(dir, &mock.endpoint(), "", "");
    let base = base
        .replace(
            "access_key_id = \"test-ak\"",
            &format!("access_key_id = \"{}\"", key.0),
        )
        .replace(
            "access_key_secret = \"test-secret\"",
            &format!("access_key_secret = \"{}\"", key.1),
        );
    format!(
        "{base}[logship.ingest]\nlisten = \"127.0.0.1:0\"\n\
         access_key_id = \"ingest-ak\"\naccess_key_secret = \"{ingest_secret}\"\n"
    )
}

#[tokio::test]
async fn logship_reload_switches_endpoint_and_keys() {
    let old_mock = mock("old-ak", "old-secret").await;
    let new_mock = mock("new-ak", "new-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let old_text = shipper_config(dir.path(), &old_mock, ("old-ak", "old-secret"), "ingest-1");
    let logship = harness::start(&old_text).await;
    logship
        .shipper()
        .submit(vec![harness::node_record("nodes", 1)])
        .await
        .unwrap();
    old_mock.wait_for_logs(1, Duration::from_secs(10)).await;

    let new_text = shipper_config(dir.path(), &new_mock, ("new-ak", "new-secret"), "ingest-1");
    let new_config = Config::parse(&new_text).unwrap();
    let notes = logship
        .reload(new_config.logship.as_ref().unwrap(), &new_config)
        .unwrap();
    assert!(notes.is_empty(), "nothing here needs a restart: {notes:?}");
    logship
        .shipper()
        .submit(vec![harness::node_record("nodes", 2)])
        .await
        .unwrap();
    let delivered = new_mock.wait_for_logs(1, Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), 1);
    assert!(
        new_mock.violations().is_empty(),
        "{:?}",
        new_mock.violations()
    );
    assert_eq!(
        old_mock.logs().len(),
        1,
        "the old endpoint gets nothing more"
    );
    logship.shutdown().await;
}

#[tokio::test]
async fn logship_reload_changes_ingest_keys() {
    let mock = mock("test-ak", "test-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let text = shipper_config(dir.path(), &mock, ("test-ak", "test-secret"), "ingest-1");
    let logship = harness::start(&text).await;
    let addr = logship.ingest_addr().unwrap();
    let mut first = PutLogs::new(addr, "app_logs");
    first.access_key_id = "ingest-ak";
    first.access_key_secret = "ingest-1";
    let mut second = PutLogs::new(addr, "app_logs");
    second.access_key_id = "ingest-ak";
    second.access_key_secret = "ingest-2";
    assert_eq!(put_logs(&first, &log_group("a", 1)).await.status(), 200);
    assert_eq!(put_logs(&second, &log_group("b", 1)).await.status(), 401);

    let rotated = shipper_config(dir.path(), &mock, ("test-ak", "test-secret"), "ingest-2");
    let rotated = rotated.replace("linger = \"50ms\"", "linger = \"10ms\"");
    let config = Config::parse(&rotated).unwrap();
    logship
        .reload(config.logship.as_ref().unwrap(), &config)
        .unwrap();
    assert_eq!(put_logs(&first, &log_group("c", 1)).await.status(), 401);
    assert_eq!(put_logs(&second, &log_group("d", 1)).await.status(), 200);
    let logs = mock.wait_for_logs(2, Duration::from_secs(10)).await;
    assert_eq!(logs.len(), 2);

    let moved = rotated.replace("spool_dir = \"", "spool_dir = \"/nonexistent");
    let config = Config::parse(&moved).unwrap();
    let notes = logship
        .reload(config.logship.as_ref().unwrap(), &config)
        .unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("spool_dir"), "{notes:?}");
    logship.shutdown().await;
}

fn redis_config(listen: u16, admin: u16, nodes: &str, read_from: &str, password: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[redis]\nlisten = \"127.0.0.1:{listen}\"\n\
         nodes = {nodes}\nread_from = \"{read_from}\"\nclient_password = \"{password}\"\n"
    )
}

/// Runs redis-cli against skiff with a password and returns its output.
fn cli_as(port: u16, password: &str, args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--no-auth-warning",
        ])
        .args(["-a", password])
        .args(args)
        .output()
        .expect("redis-cli runs");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.trim().to_string()
}

#[test]
fn redis_reload_applies_password_and_read_policy() {
    let servers = redis_support::Standalone::start();
    let port = redis_support::free_port();
    let admin = redis_support::free_port();
    let nodes = servers.nodes_toml();
    let text = redis_config(port, admin, &nodes, "primary", "first");
    let skiff = process::SkiffProcess::start(&text, port);

    assert_eq!(cli_as(port, "first", &["SET", "k", "v"]), "OK");
    let replica_gets = |servers: &redis_support::Standalone| -> u64 {
        servers
            .replicas
            .iter()
            .map(|r| r.command_calls("get"))
            .sum()
    };
    let before = replica_gets(&servers);
    for _ in 0..20 {
        assert_eq!(cli_as(port, "first", &["GET", "k"]), "v");
    }
    assert_eq!(replica_gets(&servers), before, "read_from = primary");

    // A client that logged in before the reload keeps its session.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = format!("redis://:first@127.0.0.1:{port}");
    let mut connected = runtime.block_on(redis_support::connect_redis_rs(&url));

    let reloaded = redis_config(port, admin, &nodes, "replica", "second") + "max_clients = 50\n";
    std::fs::write(&skiff.config_path, reloaded).unwrap();
    skiff.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !skiff.log().contains("config reloaded") {
        assert!(std::time::Instant::now() < deadline, "{}", skiff.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        skiff
            .log()
            .contains("redis max_clients changes apply after a restart"),
        "{}",
        skiff.log()
    );

    let rejected = cli_as(port, "first", &["GET", "k"]);
    assert!(rejected.contains("WRONGPASS"), "{rejected}");
    assert!(rejected.contains("NOAUTH"), "{rejected}");
    let before = replica_gets(&servers);
    for _ in 0..20 {
        assert_eq!(cli_as(port, "second", &["GET", "k"]), "v");
    }
    assert_eq!(replica_gets(&servers), before + 20, "read_from = replica");

    let value: String = runtime
        .block_on(redis::cmd("GET").arg("k").query_async(&mut connected))
        .expect("the connected client keeps working");
    assert_eq!(value, "v");
}
