//! TLS between skiff and PostgreSQL (`sslmode`) and between clients and
//! skiff, against a real PostgreSQL 15 started with `ssl = on` and a
//! certificate from a CA the test makes.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::postgres::{PgOptions, PgServer};
use support::skiff::{self, Skiff};
use support::tls::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS-enabled server, the CA that signed its certificate, and a CA that
/// did not.
struct TlsEnv {
    server: PgServer,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    /// Certificate and key skiff presents to its own clients.
    skiff_cert: (PathBuf, PathBuf),
    _dir: tempfile::TempDir,
}

/// Starts, once per test binary, a server that listens on 127.0.0.1 and
/// 127.0.0.2 with a certificate naming only 127.0.0.1 and localhost, so
/// 127.0.0.2 is a wrong host name. Its pg_hba.conf rejects plain
/// connections to database `sslonly` and encrypted ones to `plainonly`.
fn env() -> &'static TlsEnv {
    static ENV: OnceLock<TlsEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("skiff test CA");
        let other = TestCa::new("some other CA");
        let server_cert = ca.server_cert(&["localhost", "127.0.0.1"]);
        let options = PgOptions {
            conf: "listen_addresses = '127.0.0.1,127.0.0.2'\nssl = on\n\
                   ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                .into(),
            hba: Some(
                "hostssl plainonly all 127.0.0.0/8 reject\n\
                 hostssl all all 127.0.0.0/8 trust\n\
                 hostnossl sslonly all 127.0.0.0/8 reject\n\
                 hostnossl all all 127.0.0.0/8 trust\n"
                    .into(),
            ),
            files: vec![
                ("server.crt".into(), server_cert.cert_pem.clone(), 0o644),
                ("server.key".into(), server_cert.key_pem.clone(), 0o600),
            ],
        };
        let server = PgServer::start_with(&options);
        server.create_database("sslonly");
        server.create_database("plainonly");
        let skiff_cert = ca
            .server_cert(&["localhost", "127.0.0.1"])
            .write(dir.path(), "skiff");
        TlsEnv {
            server,
            ca_file: ca.write_cert(dir.path(), "ca.crt"),
            other_ca_file: other.write_cert(dir.path(), "other-ca.crt"),
            skiff_cert,
            _dir: dir,
        }
    })
}

/// Builds a skiff config with one database `db` on `host` of the TLS server.
fn config(host: &str, dbname: &str, postgres_extra: &str, database_extra: &str) -> String {
    format!(
        "[postgres]\nlisten = \"127.0.0.1:0\"\n{postgres_extra}\n\
         [[postgres.databases]]\nname = \"db\"\nhost = \"{host}\"\nport = {}\n\
         dbname = \"{dbname}\"\n{database_extra}\n",
        env().server.port
    )
}

fn ca_line(path: &std::path::Path) -> String {
    format!("server_tls_ca_file = \"{}\"", path.display())
}

/// Returns whether the server connection behind `client` is encrypted, as
/// the server itself reports it.
async fn server_side_ssl(client: &tokio_postgres::Client) -> bool {
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

/// Returns the message of the error a login through skiff gets.
async fn login_error(skiff: &Skiff) -> String {
    match skiff::try_connect(&skiff.url("postgres", "db")).await {
        Ok(_) => panic!("login through skiff succeeded"),
        Err(err) => err
            .as_db_error()
            .map(|db| db.message().to_string())
            .unwrap_or_else(|| err.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_is_encrypted() {
    let extra = format!(
        "server_tls_sslmode = \"verify-full\"\n{}",
        ca_line(&env().ca_file)
    );
    let skiff = Skiff::start(&config("127.0.0.1", "postgres", &extra, "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(server_side_ssl(&client).await);

    // A cancel request reaches the server over TLS as well.
    let token = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = query.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_without_the_ca_fails_clearly() {
    let extra = "server_tls_sslmode = \"verify-full\"";
    let skiff = Skiff::start(&config("127.0.0.1", "postgres", extra, "")).await;
    let message = login_error(&skiff).await;
    assert!(message.contains("database \"db\""), "{message}");
    assert!(message.contains("not signed by a trusted CA"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_a_wrong_host_name_fails() {
    let extra = format!(
        "server_tls_sslmode = \"verify-full\"\n{}",
        ca_line(&env().ca_file)
    );
    let skiff = Skiff::start(&config("127.0.0.2", "postgres", &extra, "")).await;
    let message = login_error(&skiff).await;
    assert!(message.contains("database \"db\""), "{message}");
    assert!(
        message.contains("does not name the host \"127.0.0.2\""),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_accepts_any_host_name() {
    let extra = format!(
        "server_tls_sslmode = \"verify-ca\"\n{}",
        ca_line(&env().ca_file)
    );
    let skiff = Skiff::start(&config("127.0.0.2", "postgres", &extra, "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_works_without_a_ca() {
    let extra = "server_tls_sslmode = \"require\"";
    let skiff = Skiff::start(&config("127.0.0.2", "postgres", extra, "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_with_a_root_cert_checks_the_chain() {
    // libpq: with a root certificate, require behaves as verify-ca. The
    // database's sslmode and sslrootcert override the [postgres] ones.
    let database = format!(
        "sslmode = \"require\"\nsslrootcert = \"{}\"",
        env().other_ca_file.display()
    );
    let skiff = Skiff::start(&config("127.0.0.1", "postgres", "", &database)).await;
    let message = login_error(&skiff).await;
    assert!(message.contains("not signed by a trusted CA"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_uses_tls_when_the_server_has_it() {
    // prefer is the default.
    let skiff = Skiff::start(&config("127.0.0.1", "postgres", "", "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_falls_back_to_plain_without_server_ssl() {
    let plain = support::postgres::shared();
    let skiff = Skiff::start(&skiff::config(
        plain.port,
        "postgres",
        "server_tls_sslmode = \"prefer\"",
    ))
    .await;
    let client = skiff.connect("postgres", "postgres").await;
    assert!(!server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_retries_plain_after_a_refused_tls_login() {
    // libpq's prefer: a login refused over TLS is tried again without it.
    let skiff = Skiff::start(&config("127.0.0.1", "plainonly", "", "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(!server_side_ssl(&client).await);
    // require has no such fallback.
    let extra = "server_tls_sslmode = \"require\"";
    let skiff = Skiff::start(&config("127.0.0.1", "plainonly", extra, "")).await;
    let message = login_error(&skiff).await;
    assert!(
        message.contains("pg_hba.conf rejects connection"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_fails_without_server_ssl() {
    let plain = support::postgres::shared();
    let skiff = Skiff::start(&skiff::config(
        plain.port,
        "postgres",
        "server_tls_sslmode = \"require\"",
    ))
    .await;
    let Err(err) = skiff::try_connect(&skiff.url("postgres", "postgres")).await else {
        panic!("login through skiff succeeded");
    };
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("does not support SSL, and sslmode is require"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_stays_plain() {
    let extra = "server_tls_sslmode = \"disable\"";
    let skiff = Skiff::start(&config("127.0.0.1", "postgres", extra, "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(!server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_never_sends_ssl_request() {
    // A fake server records the first packet skiff sends it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_packet = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut header = [0u8; 8];
        socket.read_exact(&mut header).await.unwrap();
        header
    });
    let skiff = Skiff::start(&skiff::config(
        port,
        "postgres",
        "server_tls_sslmode = \"disable\"",
    ))
    .await;
    let _ = skiff::try_connect(&skiff.url("postgres", "postgres")).await;
    let header = first_packet.await.unwrap();
    let code = u32::from_be_bytes(header[4..8].try_into().unwrap());
    assert_eq!(code, 196608, "first packet is the StartupMessage (3.0)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostssl_only_server_with_disable_fails_clearly() {
    let extra = "server_tls_sslmode = \"disable\"";
    let skiff = Skiff::start(&config("127.0.0.1", "sslonly", extra, "")).await;
    let message = login_error(&skiff).await;
    assert!(message.contains("server login failed"), "{message}");
    assert!(message.contains("no encryption"), "{message}");

    // The same database through TLS works.
    let extra = "server_tls_sslmode = \"require\"";
    let skiff = Skiff::start(&config("127.0.0.1", "sslonly", extra, "")).await;
    let client = skiff.connect("postgres", "db").await;
    assert!(server_side_ssl(&client).await);
}

/// Runs psql against skiff with a libpq connection string; returns its
/// exit success, standard output and standard error.
fn psql(conninfo: &str, sql: &str) -> (bool, String, String) {
    let output = Command::new("psql")
        .args([conninfo, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
        String::from_utf8_lossy(&output.stderr).trim().to_string(),
    )
}

fn client_tls_lines(mode: &str) -> String {
    let (cert, key) = &env().skiff_cert;
    format!(
        "client_tls_sslmode = \"{mode}\"\nclient_tls_cert_file = \"{}\"\n\
         client_tls_key_file = \"{}\"",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_with_verify_full() {
    let skiff = Skiff::start(&config(
        "127.0.0.1",
        "postgres",
        &client_tls_lines("require"),
        "",
    ))
    .await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=db sslmode=verify-full sslrootcert={}",
        skiff.port,
        env().ca_file.display()
    );
    let check = tokio::task::spawn_blocking(move || {
        (
            psql(&conninfo, "SELECT 40 + 2"),
            psql(&conninfo, "\\conninfo"),
        )
    })
    .await
    .unwrap();
    let ((ok, out, err), (_, info, _)) = check;
    assert!(ok, "{err}");
    assert_eq!(out, "42");
    assert!(info.contains("SSL connection"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_require_refuses_plain_logins() {
    let skiff = Skiff::start(&config(
        "127.0.0.1",
        "postgres",
        &client_tls_lines("require"),
        "",
    ))
    .await;
    let plain = format!(
        "host=127.0.0.1 port={} user=postgres dbname=db sslmode=disable",
        skiff.port
    );
    let encrypted = format!(
        "host=127.0.0.1 port={} user=postgres dbname=db sslmode=require",
        skiff.port
    );
    let (plain, encrypted) = tokio::task::spawn_blocking(move || {
        (psql(&plain, "SELECT 1"), psql(&encrypted, "SELECT 1"))
    })
    .await
    .unwrap();
    assert!(!plain.0);
    assert!(plain.2.contains("SSL required"), "{}", plain.2);
    assert!(encrypted.0, "{}", encrypted.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_prefer_accepts_both() {
    let skiff = Skiff::start(&config(
        "127.0.0.1",
        "postgres",
        &client_tls_lines("prefer"),
        "",
    ))
    .await;
    let base = format!("host=127.0.0.1 port={} user=postgres dbname=db", skiff.port);
    let (plain, encrypted) = tokio::task::spawn_blocking(move || {
        (
            psql(&format!("{base} sslmode=disable"), "\\conninfo"),
            psql(&format!("{base} sslmode=require"), "\\conninfo"),
        )
    })
    .await
    .unwrap();
    assert!(plain.0, "{plain:?}");
    assert!(!plain.1.contains("SSL connection"), "{plain:?}");
    assert!(encrypted.0, "{encrypted:?}");
    assert!(encrypted.1.contains("SSL connection"), "{encrypted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_encrypted_on_both_sides() {
    // TLS from the clients and to the server, with more clients than
    // server connections, in both query protocols.
    env().server.create_database("bench");
    let init = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &env().server.port.to_string()])
        .args(["-U", "postgres", "-i", "-q", "-s", "1", "bench"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let extra = format!(
        "{}\nserver_tls_sslmode = \"verify-full\"\n{}\ndefault_pool_size = 4",
        client_tls_lines("require"),
        ca_line(&env().ca_file)
    );
    let skiff = Skiff::start(&config("127.0.0.1", "bench", &extra, "")).await;
    let port = skiff.port.to_string();
    let ca = env().ca_file.display().to_string();
    for mode in ["simple", "prepared"] {
        let (port, ca) = (port.clone(), ca.clone());
        let run = tokio::task::spawn_blocking(move || {
            Command::new("pgbench")
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .args(["-c", "8", "-j", "2", "-t", "50", "-M", mode, "db"])
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", &ca)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "-M {mode}: {stdout}{stderr}");
        assert!(
            stdout.contains("number of transactions actually processed: 400/400"),
            "-M {mode}: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unencrypted_bytes_after_ssl_request_are_refused() {
    let skiff = Skiff::start(&config(
        "127.0.0.1",
        "postgres",
        &client_tls_lines("prefer"),
        "",
    ))
    .await;
    // SSLRequest and a StartupMessage in one write: the StartupMessage was
    // sent before any TLS, so it must not be taken as encrypted data.
    let mut wire = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608u32.to_be_bytes());
    startup.extend_from_slice(b"user\0postgres\0database\0db\0\0");
    wire.extend_from_slice(&((startup.len() + 4) as u32).to_be_bytes());
    wire.extend_from_slice(&startup);
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", skiff.port))
        .await
        .unwrap();
    socket.write_all(&wire).await.unwrap();

    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut reply))
        .await
        .expect("skiff closes the connection")
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("received unencrypted data after SSL request"),
        "{text}"
    );
}

#[test]
fn unreadable_tls_files_fail_the_config_check() {
    let text = "[postgres]\nserver_tls_sslmode = \"verify-full\"\n\
                server_tls_ca_file = \"/nonexistent/ca.pem\"\n\
                [[postgres.databases]]\nname = \"db\"\n";
    let config = ::skiff::config::Config::parse(text).unwrap();
    let err = ::skiff::server::check(&config).unwrap_err();
    assert!(err.contains("database \"db\""), "{err}");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");

    let text = "[postgres]\nclient_tls_sslmode = \"require\"\n\
                [[postgres.databases]]\nname = \"db\"\n";
    let err = ::skiff::config::Config::parse(text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("client_tls_cert_file"), "{err}");
}
