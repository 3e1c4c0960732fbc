//! The Redis router's upstream connections over TLS, against real
//! redis-server processes with a `tls-port` and certificates from a CA the
//! test makes. Each server also keeps a plain port for the harness's own
//! checks; skiff is pointed at the TLS port only.

#[path = "support/redis.rs"]
mod redis_support;
#[path = "support/tls.rs"]
mod tls_support;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use redis_support::{free_port, Cluster, RedisServer, Skiff};
use skiff::redis::frame::Protocol;
use tls_support::TestCa;

/// Certificates shared by the tests of this binary.
struct TlsFiles {
    ca: PathBuf,
    other_ca: PathBuf,
    /// Names 127.0.0.1 and localhost.
    ip_cert: (PathBuf, PathBuf),
    /// Names only redis.test.
    named_cert: (PathBuf, PathBuf),
    _dir: tempfile::TempDir,
}

fn files() -> &'static TlsFiles {
    static FILES: OnceLock<TlsFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("skiff test CA");
        let other = TestCa::new("some other CA");
        TlsFiles {
            ca: ca.write_cert(dir.path(), "ca.crt"),
            other_ca: other.write_cert(dir.path(), "other-ca.crt"),
            ip_cert: ca
                .server_cert(&["localhost", "127.0.0.1"])
                .write(dir.path(), "ip"),
            named_cert: ca.server_cert(&["redis.test"]).write(dir.path(), "named"),
            _dir: dir,
        }
    })
}

/// Starts a redis-server with a plain port and a TLS port, and returns the
/// server and its TLS port.
fn start_tls_server(cert: &(PathBuf, PathBuf), extra: &[&str]) -> (RedisServer, u16) {
    let tls_port = free_port();
    let mut args = tls_args(cert, tls_port);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (RedisServer::start(&args), tls_port)
}

/// Arguments that add a TLS port serving `cert`, without client
/// certificates.
fn tls_args(cert: &(PathBuf, PathBuf), tls_port: u16) -> Vec<String> {
    [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        cert.0.to_str().unwrap(),
        "--tls-key-file",
        cert.1.to_str().unwrap(),
        "--tls-ca-cert-file",
        files().ca.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]
    .map(String::from)
    .to_vec()
}

fn ca_line(path: &std::path::Path) -> String {
    format!("tls_ca_file = \"{}\"", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_commands_over_tls() {
    let (server, tls_port) = start_tls_server(&files().ip_cert, &[]);
    let body = format!(
        "nodes = [\"rediss://127.0.0.1:{tls_port}\"]\n{}",
        ca_line(&files().ca)
    );
    let skiff = Skiff::start(&body).await;

    // Shared pipelined connections.
    let mut client = skiff.client(Protocol::Resp2).await;
    let _: () = redis::cmd("SET")
        .arg("tls:key")
        .arg("value")
        .query_async(&mut client)
        .await
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg("tls:key")
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!(value, "value");
    let mut pipe = redis::pipe();
    for _ in 0..200 {
        pipe.cmd("INCR").arg("tls:counter");
    }
    let counts: Vec<i64> = pipe.query_async(&mut client).await.unwrap();
    assert_eq!(counts.last(), Some(&200));
    assert_eq!(server.cli(&["GET", "tls:counter"]).trim(), "200");

    // A transaction runs on a dedicated connection.
    let mut raw = skiff.raw().await;
    assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["INCR", "tls:counter"]).await, "+QUEUED\r\n");
    assert_eq!(raw.call(&["EXEC"]).await, "*1\r\n:201\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_idle_tls_connection_is_replaced() {
    // The server closes clients idle for a second, so the dedicated
    // connection parked after the first transaction is gone by the second.
    let (_server, tls_port) = start_tls_server(&files().ip_cert, &["--timeout", "1"]);
    let body = format!(
        "nodes = [\"rediss://127.0.0.1:{tls_port}\"]\n{}",
        ca_line(&files().ca)
    );
    let skiff = Skiff::start(&body).await;
    let mut raw = skiff.raw().await;
    for round in 1..=2 {
        assert_eq!(raw.call(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(raw.call(&["INCR", "tls:idle"]).await, "+QUEUED\r\n");
        assert_eq!(
            raw.call(&["EXEC"]).await,
            format!("*1\r\n:{round}\r\n"),
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_is_reported() {
    let (_server, tls_port) = start_tls_server(&files().ip_cert, &[]);
    let body = format!(
        "nodes = [\"rediss://127.0.0.1:{tls_port}\"]\n{}\nconnect_timeout = \"2s\"",
        ca_line(&files().other_ca)
    );
    let skiff = Skiff::start(&body).await;
    let mut raw = skiff.raw().await;
    let reply = raw.call(&["GET", "tls:key"]).await;
    assert!(reply.starts_with("-ERR"), "{reply}");
    assert!(reply.contains("TLS handshake failed"), "{reply}");
    assert!(reply.contains("not signed by a trusted CA"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_name_overrides_ip_host() {
    let (_server, tls_port) = start_tls_server(&files().named_cert, &[]);
    let nodes = format!(
        "nodes = [\"127.0.0.1:{tls_port}\"]\ntls = true\n{}",
        ca_line(&files().ca)
    );

    let skiff = Skiff::start(&nodes).await;
    let mut raw = skiff.raw().await;
    let reply = raw.call(&["GET", "tls:name"]).await;
    assert!(
        reply.contains("does not name the host \"127.0.0.1\""),
        "{reply}"
    );

    let skiff = Skiff::start(&format!("{nodes}\ntls_server_name = \"redis.test\"")).await;
    let mut raw = skiff.raw().await;
    assert_eq!(raw.call(&["SET", "tls:name", "x"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["GET", "tls:name"]).await, "$1\r\nx\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_and_primary_over_tls() {
    const NAME: &str = "tlsgroup";
    let (primary, primary_tls_port) = start_tls_server(&files().ip_cert, &[]);
    let (cert, key) = &files().ip_cert;
    let sentinel_tls_port = free_port();
    // tls-replication makes the sentinel reach the primary over TLS, so it
    // monitors (and reports) the primary's TLS port.
    let sentinel_conf = format!(
        "tls-port {sentinel_tls_port}\ntls-cert-file {}\ntls-key-file {}\n\
         tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
        cert.display(),
        key.display(),
        files().ca.display()
    );
    let sentinel = RedisServer::start_sentinel_with(primary_tls_port, NAME, &sentinel_conf);
    let reported = sentinel.cli(&["SENTINEL", "get-master-addr-by-name", NAME]);
    assert!(
        reported.contains(&primary_tls_port.to_string()),
        "{reported}"
    );

    let body = format!(
        "mode = \"sentinel\"\nmaster_name = \"{NAME}\"\n\
         nodes = [\"rediss://127.0.0.1:{sentinel_tls_port}\"]\n{}",
        ca_line(&files().ca)
    );
    let skiff = Skiff::start(&body).await;
    let mut raw = skiff.raw().await;
    assert_eq!(raw.call(&["SET", "tls:sentinel", "y"]).await, "+OK\r\n");
    assert_eq!(primary.cli(&["GET", "tls:sentinel"]).trim(), "y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls() {
    // With tls-cluster, nodes announce their TLS ports to TLS clients, and
    // the cluster bus runs on the TLS port + 10000.
    let tls_ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let ca = files().ca.to_str().unwrap().to_string();
    let cluster = Cluster::start_custom(
        5000,
        |i| {
            let mut args = tls_args(&files().ip_cert, tls_ports[i]);
            args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
            args
        },
        &["--tls", "--cacert", &ca],
        |i, _| format!("127.0.0.1:{}", tls_ports[i]),
    );
    let body = format!(
        "mode = \"cluster\"\nnodes = [\"rediss://127.0.0.1:{}\"]\n{}",
        tls_ports[0],
        ca_line(&files().ca)
    );
    let skiff = Skiff::start(&body).await;
    let mut raw = skiff.raw().await;
    // Keys in different slots: MSET is split across the primaries.
    let keys: Vec<String> = (0..20).map(|i| format!("tls:cluster:{i}")).collect();
    let mut mset = vec!["MSET"];
    for key in &keys {
        mset.extend([key.as_str(), "v"]);
    }
    assert_eq!(raw.call(&mset).await, "+OK\r\n");
    for key in &keys {
        assert_eq!(raw.call(&["GET", key]).await, "$1\r\nv\r\n", "{key}");
        let slot = skiff::redis::slot::key_slot(key.as_bytes());
        let owner = cluster.primary_for_slot(slot);
        assert_eq!(owner.cli(&["GET", key]).trim(), "v", "{key} on its primary");
    }
}
