//! The PutLogs-compatible ingest endpoint: hand-signed requests in every
//! accepted form, SLS-style errors for bad ones, and the official Python
//! SDK's `put_logs` against skiff on 127.0.0.2:80.

#[path = "support/logship_client.rs"]
mod client;
#[path = "support/logship_harness.rs"]
mod harness;
#[path = "support/mock_sls.rs"]
mod mock_sls;

use std::time::{Duration, SystemTime};

use client::{log_group, put_logs, send_raw, Compression, PutLogs, Signature};
use mock_sls::{MockSls, MockSlsConfig};

async fn mock() -> MockSls {
    MockSls::start(MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: "test-ak".into(),
        access_key_secret: "test-secret".into(),
        security_token: None,
    })
    .await
}

fn ingest_config(dir: &std::path::Path, mock: &MockSls, listen: &str, extra: &str) -> String {
    let base = harness::sls_config(dir, &mock.endpoint(), "", "");
    format!("{base}[logship.ingest]\nlisten = \"{listen}\"\nmax_body_bytes = 65536\n{extra}\n")
}

/// Starts an ingest endpoint on a free loopback port in front of a new
/// mock SLS, with `extra` in `[logship.ingest]`. The spool is in the
/// directory, which must outlive the endpoint.
async fn ingest(
    extra: &str,
) -> (
    MockSls,
    tempfile::TempDir,
    std::sync::Arc<skiff::logship::Logship>,
    std::net::SocketAddr,
) {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let logship = harness::start(&ingest_config(dir.path(), &mock, "127.0.0.1:0", extra)).await;
    let addr = logship.ingest_addr().unwrap();
    (mock, dir, logship, addr)
}

/// Sends one log within 5 s and checks that it is accepted.
/// `panic_message` names what freed the way for it.
async fn assert_served(addr: std::net::SocketAddr, topic: &str, panic_message: &str) {
    let request = PutLogs::new(addr, "app_logs");
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        put_logs(&request, &log_group(topic, 1)),
    )
    .await
    .expect(panic_message);
    assert_eq!(response.status(), 200);
}

async fn error_code(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    assert!(response.headers().contains_key("x-log-requestid"));
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    (
        status,
        body["errorCode"].as_str().unwrap().to_string(),
        body["errorMessage"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn signed_requests_in_every_form_are_forwarded() {
    let (mock, _dir, logship, addr) = ingest("").await;
    let forms = [
        (Signature::V1, Compression::Lz4),
        (Signature::V1, Compression::Deflate),
        (Signature::V4, Compression::Lz4),
        (Signature::V4, Compression::None),
    ];
    for (index, (signature, compression)) in forms.into_iter().enumerate() {
        let mut request = PutLogs::new(addr, "app_logs");
        request.signature = signature;
        request.compression = compression;
        let response = put_logs(&request, &log_group(&format!("form{index}"), 3)).await;
        assert_eq!(
            response.status(),
            200,
            "form {index}: {:?}",
            response.text().await
        );
        assert_eq!(response.headers()["x-log-requestid"].len(), 24);
    }
    let logs = mock.wait_for_logs(12, Duration::from_secs(10)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let mut ids: Vec<&str> = logs.iter().map(|(_, log)| log.get("id").unwrap()).collect();
    ids.sort();
    assert_eq!(ids.len(), 12);
    assert_eq!(ids[0], "form0-0");
    assert!(logs.iter().all(|(ls, _)| ls == "app_logs"));
    let group = &mock.accepted()[0].group;
    assert_eq!(group.topic.as_deref(), Some("sdk"));
    assert_eq!(group.logs[0].time, 1_700_000_000);
    logship.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_sls_errors() {
    let (mock, _dir, logship, addr) = ingest("").await;
    let group = log_group("bad", 2);

    let mut wrong_secret = PutLogs::new(addr, "app_logs");
    wrong_secret.access_key_secret = "not-the-secret";
    let (status, code, _) = error_code(put_logs(&wrong_secret, &group).await).await;
    assert_eq!((status, code.as_str()), (401, "SignatureNotMatch"));

    let mut wrong_v4 = PutLogs::new(addr, "app_logs");
    wrong_v4.signature = Signature::V4;
    wrong_v4.access_key_secret = "not-the-secret";
    let (status, code, _) = error_code(put_logs(&wrong_v4, &group).await).await;
    assert_eq!((status, code.as_str()), (401, "SignatureNotMatch"));

    let mut unknown_key = PutLogs::new(addr, "app_logs");
    unknown_key.access_key_id = "someone-else";
    let (status, code, _) = error_code(put_logs(&unknown_key, &group).await).await;
    assert_eq!((status, code.as_str()), (401, "InvalidAccessKeyId"));

    let mut json = PutLogs::new(addr, "app_logs");
    json.content_type = "application/json";
    let (status, code, _) = error_code(put_logs(&json, &group).await).await;
    assert_eq!((status, code.as_str()), (400, "InvalidContentType"));

    let mut stale = PutLogs::new(addr, "app_logs");
    stale.date = SystemTime::now() - Duration::from_secs(3600);
    let (status, code, _) = error_code(put_logs(&stale, &group).await).await;
    assert_eq!((status, code.as_str()), (403, "RequestTimeTooSkewed"));

    let large = log_group(&"x".repeat(1000), 100);
    let mut uncompressed = PutLogs::new(addr, "app_logs");
    uncompressed.compression = Compression::None;
    let (status, code, _) = error_code(put_logs(&uncompressed, &large).await).await;
    assert_eq!((status, code.as_str()), (413, "PostBodyTooLarge"));

    let request = PutLogs::new(addr, "app_logs");
    let (status, code, message) =
        error_code(send_raw(&request, b"\xff\xff not protobuf").await).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "PostBodyInvalid"),
        "{message}"
    );

    let bad_logstore = PutLogs::new(addr, "Bad.Store");
    let (status, code, _) = error_code(put_logs(&bad_logstore, &group).await).await;
    assert_eq!((status, code.as_str()), (400, "ParameterInvalid"));

    let unsupported = reqwest::get(format!("http://{addr}/logstores"))
        .await
        .unwrap();
    let (status, code, _) = error_code(unsupported).await;
    assert_eq!((status, code.as_str()), (404, "RequestNotSupported"));

    // None of the bad requests reached SLS, and a good one still works.
    let response = put_logs(&PutLogs::new(addr, "app_logs"), &log_group("good", 1)).await;
    assert_eq!(response.status(), 200);
    let logs = mock.wait_for_logs(1, Duration::from_secs(10)).await;
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].1.get("id"), Some("good-0"));
    logship.shutdown().await;
}

#[tokio::test]
async fn ingest_credentials_override_sls_ones() {
    let extra = "access_key_id = \"ingest-ak\"\naccess_key_secret = \"ingest-secret\"";
    let (mock, _dir, logship, addr) = ingest(extra).await;
    let sls_keys = PutLogs::new(addr, "app_logs");
    let (status, code, _) = error_code(put_logs(&sls_keys, &log_group("a", 1)).await).await;
    assert_eq!((status, code.as_str()), (401, "InvalidAccessKeyId"));
    let mut ingest_keys = PutLogs::new(addr, "app_logs");
    ingest_keys.access_key_id = "ingest-ak";
    ingest_keys.access_key_secret = "ingest-secret";
    assert_eq!(
        put_logs(&ingest_keys, &log_group("b", 1)).await.status(),
        200
    );
    mock.wait_for_logs(1, Duration::from_secs(10)).await;
    logship.shutdown().await;
}

/// Why the SDK test cannot run here, if it cannot.
fn python_sdk_missing() -> Option<String> {
    let output = std::process::Command::new("python3")
        .args(["-c", "import aliyun.log"])
        .output();
    match output {
        Err(err) => Some(format!("python3 not runnable: {err}")),
        Ok(out) if !out.status.success() => Some(format!(
            "aliyun-log-python-sdk not installed (pip install aliyun-log-python-sdk): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// The official SDK treats an endpoint as an IP address only without a
/// port, and then connects to port 80; with a port it prefixes the project
/// to the host name, which does not resolve. So skiff listens on port 80
/// of 127.0.0.2, a loopback address of its own (binding port 80 needs
/// root), and the SDK's endpoint is "127.0.0.2".
#[tokio::test]
async fn python_sdk_put_logs() {
    if let Some(reason) = python_sdk_missing() {
        println!("skipped: {reason}");
        return;
    }
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let logship = harness::start(&ingest_config(dir.path(), &mock, "127.0.0.2:80", "")).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/logship_sdk_put_logs.py"
    );
    let run = move |auth: &str, secret: &str, prefix: &str, mode: &str| {
        std::process::Command::new("python3")
            .args([
                script,
                "127.0.0.2",
                "test-ak",
                secret,
                "dify-logs",
                "workflow_app_log",
                auth,
                prefix,
                mode,
            ])
            .output()
            .unwrap()
    };
    let runs = [
        ("v1", "sdkv1", "lb"),
        ("v4", "sdkv4", "lb"),
        ("v1", "sdkroute", "route"),
    ];
    for (auth, prefix, mode) in runs {
        let output = tokio::task::spawn_blocking(move || run(auth, "test-secret", prefix, mode))
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{auth}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("request_id="), "{stdout}");
    }
    let logs = mock.wait_for_logs(9, Duration::from_secs(10)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let mut ids: Vec<&str> = logs.iter().map(|(_, log)| log.get("id").unwrap()).collect();
    ids.sort();
    let expected = [
        "sdkroute-0",
        "sdkroute-1",
        "sdkroute-2",
        "sdkv1-0",
        "sdkv1-1",
        "sdkv1-2",
        "sdkv4-0",
        "sdkv4-1",
        "sdkv4-2",
    ];
    assert_eq!(ids, expected);
    let routed = mock
        .accepted()
        .into_iter()
        .find(|a| {
            a.group
                .logs
                .iter()
                .any(|log| log.get("id") == Some("sdkroute-0"))
        })
        .unwrap();
    assert_eq!(routed.group.log_tags.len(), 1);
    assert_eq!(routed.group.log_tags[0].key, "tenant");
    assert_eq!(routed.group.log_tags[0].value, "t-1");
    let first = logs
        .iter()
        .find(|(_, log)| log.get("id") == Some("sdkv1-1"))
        .unwrap();
    assert_eq!(first.0, "workflow_app_log");
    assert_eq!(first.1.get("outputs"), Some(r#"{"text": "hello"}"#));
    assert_eq!(first.1.time, 1_700_000_001);

    let output = tokio::task::spawn_blocking(move || run("v1", "wrong-secret", "bad", "lb"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stdout.contains("error_code=SignatureNotMatch"), "{stdout}");
    logship.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_limit_wait() {
    let (_mock, _dir, logship, addr) = ingest("max_connections = 2").await;
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = PutLogs::new(addr, "app_logs");
    let group = log_group("limit", 1);
    let waiting =
        tokio::time::timeout(Duration::from_millis(500), put_logs(&request, &group)).await;
    assert!(
        waiting.is_err(),
        "a third connection waits while two are open"
    );

    drop(first);
    let response = tokio::time::timeout(Duration::from_secs(5), put_logs(&request, &group))
        .await
        .expect("accepted once a connection closed");
    assert_eq!(response.status(), 200);
    drop(second);
    logship.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    let (_mock, _dir, logship, addr) =
        ingest("max_connections = 1\nidle_timeout = \"300ms\"").await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut probe = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut probe)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection is closed after idle_timeout: {closed:?}"
    );

    // Its slot is free again for a client that sends a request.
    assert_served(addr, "after-idle", "served once the idle connection closed").await;
    logship.shutdown().await;
}

const STALLED_HEAD: &[u8] = b"POST /logstores/app_logs/shards/lb HTTP/1.1\r\n\
                              Host: dify-logs.127.0.0.1\r\nContent-Length: 1000\r\n\r\n";

/// Reads until the end of a response head, or until the connection ends.
async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn slow_body_times_out_and_frees_its_slot() {
    use tokio::io::AsyncWriteExt;
    let (_mock, _dir, logship, addr) =
        ingest("max_concurrent_requests = 1\nidle_timeout = \"5s\"\nbody_timeout = \"400ms\"")
            .await;

    // One body byte every 100 ms: never idle, and never done.
    let slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = slow.into_split();
    writer.write_all(STALLED_HEAD).await.unwrap();
    let trickle = async move {
        for _ in 0..1000 {
            if writer.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            _ = trickle => String::new(),
            head = read_head(&mut reader) => head,
        }
    })
    .await
    .expect("the slow body is answered");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");

    // The only request slot is free again.
    assert_served(addr, "after-slow", "served once the slow body timed out").await;
    logship.shutdown().await;
}

/// Sends one log until it is accepted, retrying ServerBusy as SDKs do;
/// panics when that takes longer than `limit`.
async fn served_within(addr: std::net::SocketAddr, limit: Duration) {
    let request = PutLogs::new(addr, "app_logs");
    let serve = async {
        loop {
            let response = put_logs(&request, &log_group("normal", 1)).await;
            match response.status().as_u16() {
                200 => return,
                503 => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("status {other}"),
            }
        }
    };
    tokio::time::timeout(limit, serve)
        .await
        .expect("a normal client is served in time");
}

#[tokio::test]
async fn stalled_body_gets_request_timeout() {
    use tokio::io::AsyncWriteExt;
    // The body stalls. Whichever of the two timeouts ends it, the reply is
    // 408, and the connection closes.
    let (_mock, _dir, logship, addr) =
        ingest("idle_timeout = \"300ms\"\nbody_timeout = \"300ms\"").await;
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(STALLED_HEAD).await.unwrap();
    stalled.write_all(b"only part of the body").await.unwrap();

    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stalled))
        .await
        .expect("the stalled body is answered");

    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    logship.shutdown().await;
}

#[tokio::test]
async fn slow_headers_do_not_hold_every_connection() {
    use tokio::io::AsyncWriteExt;
    let (_mock, _dir, logship, addr) =
        ingest("max_connections = 2\nidle_timeout = \"300ms\"\nbody_timeout = \"300ms\"").await;
    // Two clients send a header byte every 100 ms: never idle, and their
    // requests never reach a handler.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /logstores/app_logs/shards/lb HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            for stream in &mut slow {
                let _ = stream.write_all(b"a").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    served_within(addr, Duration::from_secs(5)).await;
    trickle.abort();
    logship.shutdown().await;
}

#[tokio::test]
async fn queued_stalled_requests_do_not_add_up() {
    use tokio::io::AsyncWriteExt;
    let (_mock, _dir, logship, addr) =
        ingest("max_concurrent_requests = 1\nidle_timeout = \"5s\"\nbody_timeout = \"300ms\"")
            .await;
    // Twenty clients send headers and no body. Each may hold the only slot
    // for body_timeout, but their waits for it count against the same
    // deadline, so they do not queue up one after the other.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(STALLED_HEAD).await.unwrap();
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // One after the other they would take 20 x 300 ms.
    served_within(addr, Duration::from_secs(3)).await;
    drop(stalled);
    logship.shutdown().await;
}

#[tokio::test]
async fn unread_responses_do_not_hold_connection() {
    use tokio::io::AsyncWriteExt;
    let (_mock, _dir, logship, addr) =
        ingest("max_connections = 1\nidle_timeout = \"300ms\"").await;
    // The client pipelines requests and reads no response. Once the socket
    // buffers fill, skiff cannot write and stops reading, so no byte moves.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    let requests = b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".repeat(1000);
    let fill = async { while stuck.write_all(&requests).await.is_ok() {} };
    let _ = tokio::time::timeout(Duration::from_secs(3), fill).await;

    served_within(addr, Duration::from_secs(5)).await;
    drop(stuck);
    logship.shutdown().await;
}

/// Starts an ingest endpoint in front of an SLS that fails every request,
/// so its 8 kB spool fills. `on_full` goes into `[logship]` and `extra`
/// into `[logship.ingest]`. SLS recovers with `mock.fail_all(None)`.
async fn full_spool_ingest(
    dir: &std::path::Path,
    on_full: &str,
    extra: &str,
) -> (MockSls, std::sync::Arc<skiff::logship::Logship>) {
    let mock = mock().await;
    mock.fail_all(Some(mock_sls::Fault::Status(
        500,
        "InternalServerError",
        "down",
    )));
    let spool = format!("max_spool_bytes = 8192\nmax_batch_bytes = 2048\non_full = \"{on_full}\"");
    let base = harness::sls_config(dir, &mock.endpoint(), &spool, "");
    let text = format!("{base}[logship.ingest]\nlisten = \"127.0.0.1:0\"\n{extra}\n");
    let logship = harness::start(&text).await;
    (mock, logship)
}

#[tokio::test]
async fn blocked_request_keeps_its_connection() {
    // A request waits for room in the full spool (on_full = "block") far
    // longer than the idle timeout.
    let dir = tempfile::tempdir().unwrap();
    let (mock, logship) = full_spool_ingest(dir.path(), "block", "idle_timeout = \"300ms\"").await;
    let addr = logship.ingest_addr().unwrap();

    let mut blocked = None;
    for round in 0..100 {
        let request = tokio::spawn(async move {
            let request = PutLogs::new(addr, "app_logs");
            client::try_put_logs(&request, &log_group(&format!("r{round}"), 5))
                .await
                .map(|response| response.status())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !request.is_finished() {
            blocked = Some(request);
            break;
        }
        let status = request.await.unwrap().expect("the request is answered");
        assert_eq!(status, 200);
    }
    let blocked = blocked.expect("a request waits for room in the full spool");
    tokio::time::sleep(Duration::from_secs(1)).await;

    mock.fail_all(None);
    let status = tokio::time::timeout(Duration::from_secs(30), blocked)
        .await
        .expect("the blocked request is answered once SLS recovers")
        .unwrap()
        .expect("the connection of a request being handled is not idle");
    assert_eq!(status, 200);
    logship.shutdown().await;
}

#[tokio::test]
async fn full_spool_answers_server_busy() {
    let dir = tempfile::tempdir().unwrap();
    let (mock, logship) = full_spool_ingest(dir.path(), "reject", "").await;
    let addr = logship.ingest_addr().unwrap();
    let request = PutLogs::new(addr, "app_logs");
    let mut accepted = 0;
    let mut busy = None;
    for round in 0..100 {
        let response = put_logs(&request, &log_group(&format!("r{round}"), 5)).await;
        if response.status() == 200 {
            accepted += 1;
            continue;
        }
        busy = Some(error_code(response).await);
        break;
    }
    let (status, code, message) = busy.expect("a full spool is reported");
    assert_eq!((status, code.as_str()), (503, "ServerBusy"));
    assert!(message.contains("max_spool_bytes"), "{message}");
    assert!(accepted > 0);

    mock.fail_all(None);
    let logs = mock
        .wait_for_logs(accepted * 5, Duration::from_secs(10))
        .await;
    assert!(logs.len() >= accepted * 5);
    logship.shutdown().await;
}

/// Encodes a `LogGroup` by hand: each log as given, then the topic.
fn raw_group(logs: &[&[u8]], topic: &str) -> Vec<u8> {
    let mut raw = Vec::new();
    for log in logs {
        raw.push(0x0a);
        raw.push(log.len() as u8);
        raw.extend_from_slice(log);
    }
    raw.push(0x1a);
    raw.push(topic.len() as u8);
    raw.extend_from_slice(topic.as_bytes());
    raw
}

#[tokio::test]
async fn logs_in_unusual_forms_are_forwarded() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let logship = harness::start(&ingest_config(dir.path(), &mock, "127.0.0.1:0", "")).await;
    let request = PutLogs::new(logship.ingest_addr().unwrap(), "app_logs");
    // time 7, time_ns before the content, then content {id: a}: sent on as is.
    let plain: &[u8] = &[
        0x08, 0x07, 0x25, 0x05, 0, 0, 0, 0x12, 0x07, 0x0a, 0x02, b'i', b'd', 0x12, 0x01, b'a',
    ];
    // No time, and an unknown field 3: decoded, so the time becomes 0.
    let no_time: &[u8] = &[
        0x12, 0x07, 0x0a, 0x02, b'i', b'd', 0x12, 0x01, b'b', 0x18, 0x01,
    ];
    // A content without its value: decoded, so the value becomes empty.
    let no_value: &[u8] = &[0x08, 0x09, 0x12, 0x04, 0x0a, 0x02, b'i', b'd'];
    for logs in [vec![plain], vec![plain, no_time], vec![no_value]] {
        let response = send_raw(&request, &raw_group(&logs, "t")).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    let logs = mock.wait_for_logs(4, Duration::from_secs(10)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let found: Vec<(u32, Option<u32>, Option<&str>)> = logs
        .iter()
        .map(|(_, log)| (log.time, log.time_ns, log.get("id")))
        .collect();
    assert!(found.contains(&(7, Some(5), Some("a"))), "{found:?}");
    assert!(found.contains(&(0, Some(0), Some("b"))), "{found:?}");
    assert!(found.contains(&(9, Some(0), Some(""))), "{found:?}");
    let accepted = mock.accepted();
    assert!(accepted
        .iter()
        .all(|group| group.group.topic.as_deref() == Some("t")));
    logship.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_log_is_rejected() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let logship = harness::start(&ingest_config(dir.path(), &mock, "127.0.0.1:0", "")).await;
    let request = PutLogs::new(logship.ingest_addr().unwrap(), "app_logs");
    let bad: &[u8] = &[0x08, 0x01, 0x12, 0x06, 0x0a, 0x01, 0xff, 0x12, 0x01, b'v'];
    let (status, code, message) =
        error_code(send_raw(&request, &raw_group(&[bad], "t")).await).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "PostBodyInvalid"),
        "{message}"
    );
    logship.shutdown().await;
    assert!(mock.logs().is_empty());
}
