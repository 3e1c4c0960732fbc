//! The spool survives a SIGKILL: records acknowledged by the skiff binary
//! before it is killed reach SLS after it restarts.

#[path = "support/logship_client.rs"]
mod client;
#[path = "support/mock_sls.rs"]
mod mock_sls;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use client::{log_group, put_logs, PutLogs};
use mock_sls::{Fault, MockSls, MockSlsConfig};
use skiff::logship::proto::LogGroup;

struct Skiff(Child);

impl Drop for Skiff {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the skiff binary with debug logging into `log`.
fn spawn_skiff(config: &std::path::Path, log: &std::path::Path) -> Skiff {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--config")
        .arg(config)
        .env("SKIFF_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Skiff(child)
}

async fn wait_for_listener(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "skiff did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spool files that contain batches: segments, and batch files of the older
/// one-file-per-batch format.
fn spool_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".seg") || name.ends_with(".batch")
        })
        .count()
}

#[tokio::test]
async fn spool_survives_sigkill() {
    let mock = MockSls::start(MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: "test-ak".into(),
        access_key_secret: "test-secret".into(),
        security_token: Some("sts-token-value".into()),
    })
    .await;
    mock.fail_all(Some(Fault::Status(503, "ServerBusy", "unavailable")));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let ingest: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path().join("skiff.log");
    let config = dir.path().join("skiff.toml");
    let text = format!(
        "[admin]\nlisten = \"{admin}\"\n\
         [logship]\nspool_dir = \"{spool}\"\nlinger = \"30ms\"\n\
         [logship.sls]\nendpoint = \"{endpoint}\"\nproject = \"dify-logs\"\n\
         access_key_id = \"test-ak\"\naccess_key_secret = \"test-secret\"\n\
         security_token = \"sts-token-value\"\n\
         retry_initial_backoff = \"20ms\"\nretry_max_backoff = \"100ms\"\n\
         [logship.ingest]\nlisten = \"{ingest}\"\n",
        admin = admin,
        spool = spool.display(),
        endpoint = mock.endpoint(),
    );
    std::fs::write(&config, text).unwrap();

    let mut first = spawn_skiff(&config, &log);
    wait_for_listener(ingest).await;
    let request = PutLogs::new(ingest, "workflow_node_execution");
    for round in 0..5 {
        let response = put_logs(&request, &log_group(&format!("r{round}"), 4)).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    assert!(spool_files(&spool) >= 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Kill only after skiff has had a request fail and logged its retry.
    while !std::fs::read_to_string(&log).unwrap().contains("retrying") {
        assert!(Instant::now() < deadline, "skiff logged no retry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(
        mock.logs().is_empty(),
        "SLS failed every request before the kill"
    );

    mock.fail_all(None);
    let mut second = spawn_skiff(&config, &log);
    let logs = mock.wait_for_logs(20, Duration::from_secs(20)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let mut ids: Vec<String> = logs
        .iter()
        .map(|(_, log)| log.get("id").unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "every acknowledged record arrives: {ids:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    while spool_files(&spool) > 0 {
        assert!(
            Instant::now() < deadline,
            "spool not emptied after delivery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = http_get(admin, "/metrics").await;
    for expected in [
        "skiff_logship_records_out_total{logstore=\"workflow_node_execution\"} 20",
        "skiff_logship_spool_bytes 0",
        "skiff_logship_batches_sent_total{sink=\"sls\"}",
        "skiff_logship_putlogs_duration_seconds_bucket",
        "skiff_logship_spool_oldest_batch_age_seconds",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }
    let status = http_get(admin, "/status").await;
    assert!(status.contains("\"logship\""), "{status}");

    // SIGTERM: a clean stop.
    Command::new("kill")
        .arg(second.0.id().to_string())
        .status()
        .unwrap();
    let exit = second.0.wait().unwrap();
    assert!(exit.success(), "{exit:?}");

    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("log shipper started"), "{log_text}");
    assert!(!log_text.contains("test-secret"), "secret in the log");
    assert!(
        !log_text.contains("sts-token-value"),
        "security token in the log"
    );
}

/// Writes the config of a skiff with only an ingest endpoint and a spool
/// of `max_spool_bytes`, and returns the ingest address.
fn write_ingest_config(
    config: &std::path::Path,
    spool: &std::path::Path,
    endpoint: &str,
    max_spool_bytes: u64,
) -> SocketAddr {
    let ingest: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // An admin port of its own: the default one may be taken by another
    // skiff on the machine.
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [logship]\nspool_dir = \"{spool}\"\nlinger = \"30ms\"\n\
         max_spool_bytes = {max_spool_bytes}\n\
         [logship.sls]\nendpoint = \"{endpoint}\"\nproject = \"dify-logs\"\n\
         access_key_id = \"test-ak\"\naccess_key_secret = \"test-secret\"\n\
         retry_initial_backoff = \"20ms\"\nretry_max_backoff = \"100ms\"\n\
         [logship.ingest]\nlisten = \"{ingest}\"\n",
        spool = spool.display(),
        admin = free_port(),
    );
    std::fs::write(config, text).unwrap();
    ingest
}

/// Builds a log group of `count` logs with ids `{prefix}-{i}` and a 200-byte
/// message each, so a few hundred requests fill several spool segments.
fn large_log_group(prefix: &str, count: usize) -> LogGroup {
    let mut group = log_group(prefix, count);
    for log in &mut group.logs {
        log.contents[1].value = "x".repeat(200);
    }
    group
}

#[tokio::test]
async fn sigkill_during_writes_loses_nothing() {
    let mock = MockSls::start(MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: "test-ak".into(),
        access_key_secret: "test-secret".into(),
        security_token: None,
    })
    .await;
    mock.fail_all(Some(Fault::Status(503, "ServerBusy", "unavailable")));
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let config = dir.path().join("skiff.toml");
    let log = dir.path().join("skiff.log");
    // 32 MiB gives preallocated segments of 2 MiB.
    let ingest = write_ingest_config(&config, &spool, &mock.endpoint(), 32 << 20);

    let mut first = spawn_skiff(&config, &log);
    wait_for_listener(ingest).await;
    // Four clients send until skiff is killed under them. Only requests
    // that get 200 count as accepted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for client in 0..4 {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            let request = PutLogs::new(ingest, "workflow_node_execution");
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let prefix = format!("c{client}-r{round}");
                let group = large_log_group(&prefix, 50);
                let response = client::try_put_logs(&request, &group).await;
                if response.is_ok_and(|response| response.status() == 200) {
                    let mut accepted = accepted.lock().unwrap();
                    accepted.extend((0..50).map(|i| format!("{prefix}-{i}")));
                }
                round += 1;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.lock().unwrap().len() < 20_000 {
        assert!(Instant::now() < deadline, "skiff accepted too little");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        mock.logs().is_empty(),
        "SLS failed every request before the kill"
    );
    assert!(spool_files(&spool) > 1, "the records span several segments");

    mock.fail_all(None);
    let _second = spawn_skiff(&config, &log);
    let logs = mock
        .wait_for_logs(accepted.len(), Duration::from_secs(60))
        .await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let delivered: std::collections::HashSet<&str> =
        logs.iter().map(|(_, log)| log.get("id").unwrap()).collect();
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !delivered.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted records missing, such as {:?}",
        missing.len(),
        accepted.len(),
        missing.first()
    );
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.text().await.unwrap()
}
