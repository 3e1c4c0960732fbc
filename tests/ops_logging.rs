//! Logging of the skiff binary: no secret from the config or from a client
//! reaches the log at the most verbose level, each client connection's log
//! lines carry its address, and `--log-format json` writes one JSON object
//! per line.

mod support;

#[path = "support/logship_client.rs"]
mod logship_client;
#[path = "support/mock_sls.rs"]
mod mock_sls;
#[path = "support/redis.rs"]
mod redis_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use logship_client::{log_group, put_logs, PutLogs, Signature};
use mock_sls::{MockSls, MockSlsConfig};
use redis_support::RedisServer;
use support::postgres::{free_port, PgServer, CLEAR_USER, MD5_USER, SCRAM_USER};
use support::process::SkiffProcess;

/// Returns the shared test server, creating the database `opslog` that
/// both tests use.
fn pg() -> &'static PgServer {
    static CREATED: std::sync::Once = std::sync::Once::new();
    let server = support::postgres::shared();
    CREATED.call_once(|| server.create_database("opslog"));
    server
}

const REDIS_UPSTREAM_PASSWORD: &str = "Opslog-Redis-Upstream-3b9e";
const REDIS_CLIENT_PASSWORD: &str = "Opslog-Redis-Client-71cd";
const REDIS_WRONG_PASSWORD: &str = "Opslog-Redis-Wrong-55aa";
const PG_WRONG_PASSWORD: &str = "Opslog-Pg-Wrong-0f12";
const VERIFIER_USER: &str = "opslog_verifier";
const VERIFIER_PASSWORD: &str = "Opslog-Verifier-Pw-9c4d";
const SLS_SECRET: &str = "Opslog-Sls-Secret-2e7f";
const INGEST_SECRET: &str = "Opslog-Ingest-Secret-8d31";
const INGEST_WRONG_SECRET: &str = "Opslog-Ingest-Wrong-6a0b";

/// Runs psql through skiff and returns whether it succeeded, with its
/// output.
fn psql(port: u16, user: &str, password: &str, db: &str, sql: &str) -> (bool, String) {
    let output = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user])
        .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-XAtqw", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--no-auth-warning",
        ])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Waits until `log()` contains every one of `needles`, or panics with the
/// log after 20 seconds.
fn wait_for_log(log: impl Fn() -> String, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = log();
        if needles.iter().all(|needle| text.contains(needle)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "log never showed {needles:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens a TCP connection to skiff's PostgreSQL listener from a known local
/// address, replies to its password request with a wrong md5 password
/// (which a SCRAM exchange rejects as malformed), and closes.
/// Returns the local address skiff saw.
fn pg_failed_login(port: u16, user: &str) -> SocketAddr {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let local = stream.local_addr().unwrap();
    let startup = skiff::pg::protocol::startup_message(&[("user", user), ("database", "opslog")]);
    stream.write_all(&startup).unwrap();
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(header[0], b'R', "skiff asks for a password");
    let length = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; length - 4];
    stream.read_exact(&mut body).unwrap();
    let password = b"md5ffffffffffffffffffffffffffffffff\0";
    let mut message = vec![b'p'];
    message.extend_from_slice(&(password.len() as u32 + 4).to_be_bytes());
    message.extend_from_slice(password);
    stream.write_all(&message).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "a wrong password is refused");
    local
}

/// Sends `AUTH` with a wrong password to skiff's Redis listener from a known
/// local address and closes. Returns that address. The listener may come up
/// after the PostgreSQL one that the start waited for, so the connection is
/// tried again for up to 10 seconds.
fn redis_failed_auth(port: u16) -> SocketAddr {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("skiff's Redis listener on port {port}: {err}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let local = stream.local_addr().unwrap();
    stream
        .write_all(format!("AUTH {REDIS_WRONG_PASSWORD}\r\n").as_bytes())
        .unwrap();
    let mut reply = [0u8; 128];
    let read = stream.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..read]);
    assert!(reply.starts_with("-WRONGPASS"), "{reply}");
    local
}

/// Returns the SCRAM secret that the test's own server stores for
/// `password`.
fn scram_verifier(user: &str, password: &str) -> String {
    pg().psql(&format!(
        "SET password_encryption = 'scram-sha-256'; \
         DROP ROLE IF EXISTS {user}; CREATE ROLE {user} LOGIN PASSWORD '{password}'; \
         SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'"
    ))
}

fn stop(mut skiff: SkiffProcess) -> String {
    skiff.signal(libc::SIGTERM);
    let status = skiff.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "skiff did not exit cleanly: {status:?}\n{}",
        skiff.log()
    );
    skiff.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_log_shows_no_secret() {
    let pg = pg();
    let verifier = scram_verifier(VERIFIER_USER, VERIFIER_PASSWORD);
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let upstream = RedisServer::start(&["--requirepass", REDIS_UPSTREAM_PASSWORD]);
    let mock = MockSls::start(MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: "opslog-ak".into(),
        access_key_secret: SLS_SECRET.into(),
        security_token: None,
    })
    .await;
    let (pg_port, redis_port, ingest_port, admin_port) =
        (free_port(), free_port(), free_port(), free_port());
    let spool = tempfile::tempdir().unwrap();
    let config = format!(
        r#"[admin]
listen = "127.0.0.1:{admin_port}"

[postgres]
listen = "127.0.0.1:{pg_port}"
admin_users = ["{scram_user}"]

[postgres.auth]
type = "scram-sha-256"
users = {{ {scram_user} = "{scram_password}", {clear_user} = "{clear_password}", {VERIFIER_USER} = "{verifier}" }}

[[postgres.databases]]
name = "opslog"
port = {server_port}

[[postgres.databases]]
name = "opslog_md5"
dbname = "opslog"
port = {server_port}
user = "{md5_user}"
password = "{md5_password}"

[redis]
listen = "127.0.0.1:{redis_port}"
nodes = ["{redis_upstream}"]
password = "{REDIS_UPSTREAM_PASSWORD}"
client_password = "{REDIS_CLIENT_PASSWORD}"

[logship]
spool_dir = "{spool}"
linger = "50ms"

[logship.sls]
endpoint = "{endpoint}"
project = "dify-logs"
access_key_id = "opslog-ak"
access_key_secret = "{SLS_SECRET}"

[logship.ingest]
listen = "127.0.0.1:{ingest_port}"
access_key_id = "opslog-ingest-ak"
access_key_secret = "{INGEST_SECRET}"
"#,
        scram_user = SCRAM_USER.0,
        scram_password = SCRAM_USER.1,
        clear_user = CLEAR_USER.0,
        clear_password = CLEAR_USER.1,
        md5_user = MD5_USER.0,
        md5_password = MD5_USER.1,
        server_port = pg.port,
        redis_upstream = upstream.addr(),
        spool = spool.path().display(),
        endpoint = mock.endpoint(),
    );
    let skiff = SkiffProcess::start_with(&config, pg_port, &[], "trace");

    let (pg_client, redis_client) = tokio::task::spawn_blocking(move || {
        // PostgreSQL: SCRAM logins that skiff forwards to the server as
        // SCRAM, cleartext and md5, a stored SCRAM secret, a wrong password.
        for (user, password, db) in [
            (SCRAM_USER.0, SCRAM_USER.1, "opslog"),
            (CLEAR_USER.0, CLEAR_USER.1, "opslog"),
            (VERIFIER_USER, VERIFIER_PASSWORD, "opslog"),
            (SCRAM_USER.0, SCRAM_USER.1, "opslog_md5"),
        ] {
            let (ok, output) = psql(pg_port, user, password, db, "SELECT current_user");
            assert!(ok, "{user}@{db}: {output}");
        }
        let (ok, output) = psql(
            pg_port,
            SCRAM_USER.0,
            PG_WRONG_PASSWORD,
            "opslog",
            "SELECT 1",
        );
        assert!(
            !ok && output.contains("password authentication failed"),
            "{output}"
        );
        let (ok, output) = psql(pg_port, SCRAM_USER.0, SCRAM_USER.1, "skiff", "SHOW CONFIG");
        assert!(ok, "{output}");
        // Redis: AUTH in both forms, HELLO with AUTH, and a wrong password.
        let set = redis_cli(
            redis_port,
            &["-a", REDIS_CLIENT_PASSWORD, "SET", "opslog:k", "v"],
        );
        assert_eq!(set, "OK");
        let get = redis_cli(
            redis_port,
            &[
                "--user",
                "default",
                "--pass",
                REDIS_CLIENT_PASSWORD,
                "GET",
                "opslog:k",
            ],
        );
        assert_eq!(get, "v");
        let hello = redis_cli(
            redis_port,
            &["HELLO", "3", "AUTH", "default", REDIS_CLIENT_PASSWORD],
        );
        assert!(hello.contains("redis"), "{hello}");
        let wrong = redis_cli(redis_port, &["-a", REDIS_WRONG_PASSWORD, "GET", "opslog:k"]);
        assert!(
            wrong.contains("WRONGPASS") || wrong.contains("NOAUTH"),
            "{wrong}"
        );
        (
            pg_failed_login(pg_port, SCRAM_USER.0),
            redis_failed_auth(redis_port),
        )
    })
    .await
    .unwrap();

    // Log shipping: requests signed with the ingest secret, one signed with
    // a wrong secret, and delivery to SLS signed with the SLS secret.
    let ingest: SocketAddr = format!("127.0.0.1:{ingest_port}").parse().unwrap();
    for (index, signature) in [Signature::V1, Signature::V4].into_iter().enumerate() {
        let mut request = PutLogs::new(ingest, "opslog_store");
        request.access_key_id = "opslog-ingest-ak";
        request.access_key_secret = INGEST_SECRET;
        request.signature = signature;
        let response = put_logs(&request, &log_group(&format!("opslog{index}"), 2)).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    let mut forged = PutLogs::new(ingest, "opslog_store");
    forged.access_key_id = "opslog-ingest-ak";
    forged.access_key_secret = INGEST_WRONG_SECRET;
    let response = put_logs(&forged, &log_group("forged", 1)).await;
    assert_eq!(response.status(), 401);
    mock.wait_for_logs(4, Duration::from_secs(20)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());

    // Connection events name the client's address, in the connection's span.
    let pg_line = format!("peer={pg_client}");
    let redis_line = format!("peer={redis_client}");
    wait_for_log(|| skiff.log(), &[&pg_line, &redis_line]);
    let log = tokio::task::spawn_blocking(move || stop(skiff))
        .await
        .unwrap();
    for (event, peer) in [
        ("client connected", &pg_line),
        ("client disconnected", &pg_line),
        ("login rejected", &pg_line),
        ("client connected", &redis_line),
        ("client disconnected", &redis_line),
        ("client AUTH failed", &redis_line),
    ] {
        assert!(
            log.lines()
                .any(|line| line.contains(event) && line.contains(peer.as_str())),
            "no {event:?} line with {peer}:\n{log}"
        );
    }

    let mut secrets = vec![
        SCRAM_USER.1.to_string(),
        CLEAR_USER.1.to_string(),
        MD5_USER.1.to_string(),
        PG_WRONG_PASSWORD.to_string(),
        VERIFIER_PASSWORD.to_string(),
        REDIS_UPSTREAM_PASSWORD.to_string(),
        REDIS_CLIENT_PASSWORD.to_string(),
        REDIS_WRONG_PASSWORD.to_string(),
        SLS_SECRET.to_string(),
        INGEST_SECRET.to_string(),
        INGEST_WRONG_SECRET.to_string(),
        verifier.clone(),
    ];
    // The salt, StoredKey and ServerKey of the stored SCRAM secret.
    secrets.extend(
        verifier
            .split(['$', ':'])
            .filter(|part| part.len() >= 16)
            .map(str::to_string),
    );
    // md5 hashes skiff computes for the server login are password
    // equivalents too.
    secrets.push(skiff::pg::auth::md5_password_hash(MD5_USER.0, MD5_USER.1));
    assert!(log.lines().count() > 50, "trace logging is on:\n{log}");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "the log shows the secret {secret:?}:\n{log}"
        );
    }
}

#[test]
fn json_log_is_one_object_per_line() {
    let pg = pg();
    let upstream = RedisServer::start(&[]);
    let (pg_port, redis_port, admin_port) = (free_port(), free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
         [postgres]\nlisten = \"127.0.0.1:{pg_port}\"\n\
         [postgres.auth]\ntype = \"md5\"\nusers = {{ jsonuser = \"Opslog-Json-Pw\" }}\n\
         [[postgres.databases]]\nname = \"opslog\"\nport = {}\n\n\
         [redis]\nlisten = \"127.0.0.1:{redis_port}\"\nnodes = [\"{}\"]\n\
         client_password = \"Opslog-Json-Redis\"\n",
        pg.port,
        upstream.addr()
    );
    // At info level: the connection spans are enabled there, so an info
    // event inside a connection carries the client's address.
    let skiff = SkiffProcess::start_with(&config, pg_port, &["--log-format", "json"], "info");
    let pg_client = pg_failed_login(pg_port, "jsonuser");
    let redis_client = redis_failed_auth(redis_port);
    let (pg_peer, redis_peer) = (pg_client.to_string(), redis_client.to_string());
    wait_for_log(|| skiff.log(), &[&pg_peer, &redis_peer]);
    let log = stop(skiff);

    let mut events = Vec::new();
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line:?}\n{log}"));
        for key in ["timestamp", "level", "message"] {
            assert!(value.get(key).is_some(), "no {key} in {line}");
        }
        events.push(value);
    }
    let find = |message: &str, span: &str, peer: &str| {
        events.iter().any(|event| {
            event["message"] == message
                && event["span"]["name"] == span
                && event["span"]["peer"] == peer
        })
    };
    assert!(
        find("client password authentication failed", "client", &pg_peer),
        "no PostgreSQL auth failure in span client with peer {pg_peer}:\n{log}"
    );
    assert!(
        find("client AUTH failed", "redis_client", &redis_peer),
        "no Redis AUTH failure in span redis_client with peer {redis_peer}:\n{log}"
    );
    assert!(events
        .iter()
        .any(|event| event["message"] == "postgres pooler listening" && event["level"] == "INFO"));
    // Debug events stay out at info level.
    assert!(!events
        .iter()
        .any(|event| event["message"] == "client connected"));
}
