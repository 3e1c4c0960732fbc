//! The built `skiff` binary with a `[redis]` section: the listener, the
//! admin endpoint's /readyz, /status and /metrics, and a clean exit on
//! SIGTERM.

#[path = "support/redis.rs"]
mod redis_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis_support::{free_port, redis_cli, RedisServer};

/// A skiff process, killed on drop if it is still running.
struct SkiffProcess(Child);

impl Drop for SkiffProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends a plain HTTP GET and returns the status line and body.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn binary_serves_redis_and_admin() {
    let upstream = RedisServer::start(&["--requirepass", "right-secret"]);
    let (redis_port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("skiff.toml");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[redis]\n\
         listen = \"127.0.0.1:{redis_port}\"\nnodes = [\"{}\"]\npassword = \"wrong-secret\"\n",
        upstream.addr()
    );
    std::fs::write(&config, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["--config", config.to_str().unwrap()])
        .env("SKIFF_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("skiff binary starts");
    let mut skiff = SkiffProcess(child);

    wait_until("the redis listener", || {
        redis_cli(redis_port, &["PING"]).trim() == "PONG"
    });
    // skiff's upstream password is wrong, so AUTH fails and commands report
    // the rejected handshake.
    let reply = redis_cli(redis_port, &["GET", "binary:k"]);
    assert!(reply.contains("handshake rejected"), "{reply}");

    let ready = http_get(admin_port, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("redis:"), "{ready}");
    let status = http_get(admin_port, "/status");
    assert!(status.contains("\"redis\""), "{status}");
    let metrics = http_get(admin_port, "/metrics");
    assert!(metrics.contains("skiff_redis_commands_total"), "{metrics}");

    let pid = skiff.0.id().to_string();
    let terminated = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(terminated.success());
    let exit = skiff.0.wait().unwrap();
    assert!(exit.success(), "exit status {exit}");
    let mut log = String::new();
    // tracing's formatter writes the log to standard output.
    skiff
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("redis router listening"), "{log}");
    assert!(
        !log.contains("wrong-secret"),
        "the password reached the log"
    );
}
