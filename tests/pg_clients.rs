//! The skiff binary driven by real PostgreSQL client programs (psql,
//! pgbench), plus its command line, metrics, SIGTERM drain and a
//! PostgreSQL restart.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::postgres::{free_port, PgServer};
use support::process::SkiffProcess;
use support::skiff;

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

struct Ports {
    pg: u16,
    admin: u16,
}

fn binary_config(pg_port: u16, db: &str, extra: &str) -> (String, Ports) {
    let ports = Ports {
        pg: free_port(),
        admin: free_port(),
    };
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[postgres]\nlisten = \"127.0.0.1:{}\"\n{extra}\n\n\
         [[postgres.databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {pg_port}\n",
        ports.admin, ports.pg
    );
    (config, ports)
}

fn psql(port: u16, db: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-XAtq", "-c", sql])
        .output()
        .expect("psql runs")
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn version_and_check_commands() {
    let version = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
    let text = String::from_utf8_lossy(&version.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, binary_config(5432, "x", "").0).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[postgres]\nlisten = \"127.0.0.1:1\"\npool_szie = 3\n",
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("pool_szie") && stderr.contains("line 3"),
        "{stderr}"
    );
}

#[test]
fn psql_through_skiff() {
    pg().create_database("psql_db");
    let (config, ports) = binary_config(pg().port, "psql_db", "");
    let _skiff = SkiffProcess::start(&config, ports.pg);
    let output = psql(
        ports.pg,
        "psql_db",
        "CREATE TABLE p (v int); INSERT INTO p SELECT generate_series(1, 5); SELECT sum(v) FROM p",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "15");

    let copy = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &ports.pg.to_string(),
            "-U",
            "postgres",
            "-d",
            "psql_db",
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-XAtq", "-c", "\\copy p TO STDOUT"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&copy.stdout), "1\n2\n3\n4\n5\n");
}

#[test]
fn pgbench_all_protocols_more_clients_than_pool() {
    pg().create_database("bench_db");
    let init = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg().port.to_string(),
            "-U",
            "postgres",
            "-i",
            "-q",
            "-s",
            "1",
            "bench_db",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let (config, ports) = binary_config(pg().port, "bench_db", "default_pool_size = 4");
    let skiff = SkiffProcess::start(&config, ports.pg);
    for mode in ["simple", "extended", "prepared"] {
        let run = Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &ports.pg.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-c", "16", "-j", "2", "-t", "40", "-M", mode, "bench_db"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            run.status.success(),
            "pgbench -M {mode}: {stdout}{stderr}\n{}",
            skiff.log()
        );
        assert!(
            stdout.contains("number of transactions actually processed: 640/640"),
            "-M {mode}: {stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "-M {mode}: {stdout}"
        );
    }
}

#[test]
fn metrics_and_health_endpoints() {
    pg().create_database("metrics_db");
    let (config, ports) = binary_config(pg().port, "metrics_db", "");
    let _skiff = SkiffProcess::start(&config, ports.pg);
    let output = psql(ports.pg, "metrics_db", "SELECT 1");
    assert!(output.status.success());
    let missing = psql(ports.pg, "no_such_db", "SELECT 1");
    assert!(!missing.status.success());

    let metrics = http_get(ports.admin, "/metrics");
    for expected in [
        "skiff_pg_queries_total{pool=\"metrics_db/postgres\"} 1",
        "skiff_pg_transactions_total{pool=\"metrics_db/postgres\"} 1",
        "skiff_pg_server_connections{pool=\"metrics_db/postgres\",state=\"idle\"} 1",
        "skiff_pg_errors_total{kind=\"unknown_database\"} 1",
        "skiff_pg_checkout_wait_seconds_bucket",
        "skiff_pg_client_connections",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }
    assert!(http_get(ports.admin, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(ports.admin, "/readyz").starts_with("HTTP/1.1 200"));
    let status = http_get(ports.admin, "/status");
    assert!(
        status.contains("\"pool\":\"metrics_db/postgres\""),
        "{status}"
    );
}

#[test]
fn sigterm_lets_running_transaction_finish() {
    pg().create_database("drain_db");
    let (config, ports) = binary_config(pg().port, "drain_db", "shutdown_timeout = \"10s\"");
    let mut skiff = SkiffProcess::start(&config, ports.pg);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=drain_db",
            ports.pg
        );
        let busy = skiff::connect(&url).await;
        let idle = skiff::connect(&url).await;
        busy.batch_execute("CREATE TABLE d (v int); BEGIN; INSERT INTO d VALUES (1)")
            .await
            .unwrap();
        skiff.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // New clients are turned away while the transaction runs on.
        assert!(skiff::try_connect(&url).await.is_err());
        busy.batch_execute("INSERT INTO d VALUES (2); COMMIT")
            .await
            .unwrap();
        // The idle client was told skiff is going away.
        assert!(idle.simple_query("SELECT 1").await.is_err());
    });
    let status = skiff
        .wait_exit(Duration::from_secs(10))
        .expect("skiff exits after drain");
    assert!(status.success(), "exit status {status}: {}", skiff.log());
    assert_eq!(
        pg().psql("SELECT count(*) FROM pg_database WHERE datname = 'drain_db'"),
        "1"
    );
    let committed = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg().port.to_string(),
            "-U",
            "postgres",
            "-d",
            "drain_db",
        ])
        .args(["-XAtqc", "SELECT count(*) FROM d"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&committed.stdout).trim(), "2");
}

#[test]
fn postgres_restart_mid_run() {
    let server = PgServer::start();
    server.create_database("restart_db");
    let (config, ports) = binary_config(server.port, "restart_db", "default_pool_size = 2");
    let skiff = SkiffProcess::start(&config, ports.pg);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=restart_db",
            ports.pg
        );
        let in_flight = skiff::connect(&url).await;
        let idle = skiff::connect(&url).await;
        idle.simple_query("SELECT 1").await.unwrap();
        let query =
            tokio::spawn(async move { in_flight.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.stop();
        let result = tokio::time::timeout(Duration::from_secs(10), query).await;
        let err = result
            .expect("in-flight client told promptly")
            .unwrap()
            .unwrap_err();
        assert!(!err.to_string().is_empty());

        // While the server is down, a query fails with a clear error and
        // the client stays connected.
        let down = idle.simple_query("SELECT 1").await.unwrap_err();
        let message = down
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("connect"), "{down:?}");

        server.start_again();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match idle.simple_query("SELECT 2").await {
                Ok(_) => break,
                Err(err) => assert!(
                    Instant::now() < deadline,
                    "not served after restart: {err:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let fresh = skiff::connect(&url).await;
        fresh.simple_query("SELECT 3").await.unwrap();
    });
    drop(skiff);
    server.stop();
}

#[test]
fn admin_console_show_commands() {
    pg().create_database("admin_db");
    let extra = "admin_users = [\"postgres\"]";
    let (config, ports) = binary_config(pg().port, "admin_db", extra);
    let _skiff = SkiffProcess::start(&config, ports.pg);
    assert!(psql(ports.pg, "admin_db", "SELECT 1").status.success());

    let pools = psql(ports.pg, "skiff", "SHOW POOLS");
    assert!(
        pools.status.success(),
        "{}",
        String::from_utf8_lossy(&pools.stderr)
    );
    let text = String::from_utf8_lossy(&pools.stdout);
    assert!(text.contains("admin_db|postgres|"), "{text}");
    assert!(text.trim_end().ends_with("|transaction"), "{text}");

    let stats = psql(ports.pg, "pgbouncer", "SHOW STATS");
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("admin_db|postgres|1|1|"), "{text}");
    let version = psql(ports.pg, "skiff", "SHOW VERSION");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("skiff "));
    let unknown = psql(ports.pg, "skiff", "SHOW NONSENSE");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("SHOW HELP"));

    // Only admin_users get in.
    let denied = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &ports.pg.to_string(),
            "-U",
            "intruder",
            "-d",
            "skiff",
        ])
        .args(["-XAtqc", "SHOW POOLS"])
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("admin_users"));
}
