//! psql against skiff's admin console, and the pieces the admin console
//! tests share.

use std::process::{Command, Output};

/// Runs `sql` with psql as user postgres: unaligned rows, `|` between
/// columns, no header.
pub fn psql(port: u16, db: &str, sql: &str) -> Output {
    Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", db, "-XAtq", "-c", sql])
        .output()
        .expect("psql runs")
}

/// Runs `sql` on the admin console and returns its output, failing the
/// test when psql reports an error.
pub fn admin_text(port: u16, sql: &str) -> String {
    let output = psql(port, "skiff", sql);
    assert!(
        output.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Splits unaligned psql output into rows of columns.
pub fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| line.split('|').map(str::to_string).collect())
        .collect()
}

/// Builds a two-thread runtime for a test's clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
