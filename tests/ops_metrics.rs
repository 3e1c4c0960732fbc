//! The PgBouncer-exporter-compatible metrics under a known load, the
//! catalog in docs/METRICS.md, and the Grafana dashboard that ships with
//! skiff.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::postgres::{free_port, PgServer};
use support::process::SkiffProcess;

const DB: &str = "opsmetrics";

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

/// Returns the body of `GET /metrics` on the admin port.
fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Label names and values of one sample.
type Labels = Vec<(String, String)>;

/// Parses one sample line of the text format into name, labels and value.
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), Vec::new()),
        Some((name, rest)) => {
            let rest = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            for pair in rest.split("\",").filter(|pair| !pair.is_empty()) {
                let (key, value) = pair.split_once("=\"")?;
                labels.push((key.to_string(), value.trim_end_matches('"').to_string()));
            }
            (name.to_string(), labels)
        }
    };
    Some((name, labels, value))
}

/// Returns the value of the sample `name` whose labels are exactly
/// `labels`.
fn value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut wanted: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    wanted.sort();
    for (sample_name, mut sample_labels, sample_value) in metrics.lines().filter_map(parse_sample) {
        sample_labels.sort();
        if sample_name == name && sample_labels == wanted {
            return sample_value;
        }
    }
    panic!("no sample {name}{labels:?} in:\n{metrics}");
}

fn pool_value(metrics: &str, name: &str) -> f64 {
    value(metrics, name, &[("database", DB), ("user", "postgres")])
}

fn stats_value(metrics: &str, name: &str) -> f64 {
    value(metrics, name, &[("database", DB)])
}

/// Scrapes until `ready` holds for the metrics, or panics after 20 s.
fn wait_for_metrics(port: u16, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape(port);
        if ready(&metrics) {
            return metrics;
        }
        assert!(Instant::now() < deadline, "never saw {what}:\n{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Length of a simple Query message carrying `sql`.
fn query_bytes(sql: &str) -> f64 {
    (1 + 4 + sql.len() + 1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_names_show_a_known_load() {
    pg().create_database(DB);
    let (pg_port, admin_port) = (free_port(), free_port());
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
         [postgres]\nlisten = \"127.0.0.1:{pg_port}\"\npool_mode = \"transaction\"\n\n\
         [[postgres.databases]]\nname = \"{DB}\"\nport = {}\npool_size = 1\n",
        pg().port
    );
    let skiff = SkiffProcess::start(&config, pg_port);
    let url = format!("host=127.0.0.1 port={pg_port} user=postgres dbname={DB}");
    let holder = support::skiff::connect(&url).await;
    let waiter = support::skiff::connect(&url).await;
    let canceller = support::skiff::connect(&url).await;

    // One client keeps the only server connection in a transaction.
    let held = ["BEGIN", "SELECT pg_sleep(0.2)"];
    for sql in held {
        holder.simple_query(sql).await.unwrap();
    }
    let metrics = scrape(admin_port);
    let gauge = |name: &str| pool_value(&metrics, name);
    assert_eq!(gauge("pgbouncer_pools_server_active_connections"), 1.0);
    assert_eq!(gauge("pgbouncer_pools_server_idle_connections"), 0.0);
    assert_eq!(gauge("pgbouncer_pools_server_used_connections"), 0.0);
    assert_eq!(gauge("pgbouncer_pools_server_login_connections"), 0.0);
    assert_eq!(gauge("pgbouncer_pools_client_active_connections"), 3.0);
    assert_eq!(gauge("pgbouncer_pools_client_waiting_connections"), 0.0);
    assert_eq!(gauge("pgbouncer_pools_client_maxwait_seconds"), 0.0);

    // Two more clients queue for it; one of them gives up with a cancel
    // request, which must end its wait in the gauges too.
    let waiting =
        tokio::spawn(async move { waiter.simple_query("SELECT 2").await.map(|_| waiter) });
    let cancel_token = canceller.cancel_token();
    let cancelled = tokio::spawn(async move {
        let result = canceller.simple_query("SELECT 3").await;
        (canceller, result)
    });
    wait_for_metrics(admin_port, "two waiting clients", |m| {
        pool_value(m, "pgbouncer_pools_client_waiting_connections") == 2.0
    });
    let waiting_seen = Instant::now();
    cancel_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (canceller, result) = cancelled.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = scrape(admin_port);
    let gauge = |name: &str| pool_value(&metrics, name);
    assert_eq!(gauge("pgbouncer_pools_client_waiting_connections"), 1.0);
    assert_eq!(gauge("pgbouncer_pools_client_active_connections"), 2.0);
    assert_eq!(gauge("pgbouncer_pools_server_active_connections"), 1.0);
    let max_wait = gauge("pgbouncer_pools_client_maxwait_seconds");
    assert!(
        max_wait >= waiting_seen.elapsed().as_secs_f64() - 0.05 && max_wait < 20.0,
        "maxwait {max_wait}"
    );

    // The transaction ends; the waiting client gets the connection and
    // returns it.
    let held_for = waiting_seen.elapsed().as_secs_f64();
    holder.simple_query("COMMIT").await.unwrap();
    let waiter = waiting.await.unwrap().unwrap();
    let metrics = wait_for_metrics(admin_port, "an idle pool", |m| {
        pool_value(m, "pgbouncer_pools_server_active_connections") == 0.0
    });
    let gauge = |name: &str| pool_value(&metrics, name);
    assert_eq!(gauge("pgbouncer_pools_server_idle_connections"), 1.0);
    assert_eq!(gauge("pgbouncer_pools_client_waiting_connections"), 0.0);
    assert_eq!(gauge("pgbouncer_pools_client_maxwait_seconds"), 0.0);
    assert_eq!(gauge("pgbouncer_pools_client_active_connections"), 3.0);

    let counter = |name: &str| stats_value(&metrics, name);
    // BEGIN, pg_sleep, COMMIT, SELECT 2, and the cancelled SELECT 3.
    assert_eq!(counter("pgbouncer_stats_queries_pooled_total"), 5.0);
    assert_eq!(
        counter("pgbouncer_stats_queries_pooled_total"),
        value(
            &metrics,
            "skiff_pg_queries_total",
            &[("pool", "opsmetrics/postgres")]
        )
    );
    assert_eq!(
        counter("pgbouncer_stats_sql_transactions_pooled_total"),
        2.0
    );
    let query_seconds = counter("pgbouncer_stats_queries_duration_seconds_total");
    assert!(query_seconds >= 0.2, "query time {query_seconds}");
    let transaction_seconds = counter("pgbouncer_stats_server_in_transaction_seconds_total");
    assert!(
        transaction_seconds >= 0.2 + held_for,
        "transaction time {transaction_seconds}, held for {held_for}"
    );
    let wait_seconds = counter("pgbouncer_stats_client_wait_seconds_total");
    assert!(wait_seconds >= held_for, "wait {wait_seconds}");
    let sent = [
        "BEGIN",
        "SELECT pg_sleep(0.2)",
        "COMMIT",
        "SELECT 2",
        "SELECT 3",
    ];
    assert_eq!(
        counter("pgbouncer_stats_received_bytes_total"),
        sent.iter().map(|sql| query_bytes(sql)).sum::<f64>()
    );
    assert!(counter("pgbouncer_stats_sent_bytes_total") > 0.0);

    let database = [
        ("name", DB),
        ("host", "127.0.0.1"),
        ("port", &pg().port.to_string()),
        ("database", DB),
        ("force_user", ""),
        ("pool_mode", "transaction"),
    ];
    assert_eq!(
        value(&metrics, "pgbouncer_databases_pool_size", &database),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "pgbouncer_databases_current_connections",
            &database
        ),
        1.0
    );
    assert_eq!(value(&metrics, "pgbouncer_pools", &[]), 1.0);
    assert_eq!(value(&metrics, "pgbouncer_used_clients", &[]), 3.0);
    assert_eq!(value(&metrics, "pgbouncer_used_servers", &[]), 1.0);
    assert_eq!(value(&metrics, "pgbouncer_up", &[]), 1.0);
    assert_eq!(
        value(&metrics, "pgbouncer_config_max_client_connections", &[]),
        10000.0
    );
    drop((holder, waiter, canceller));

    // Every family skiff serves is in the catalog.
    let catalog = documented_metrics();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap();
            assert!(
                catalog.contains(name),
                "{name} is served but not documented in docs/METRICS.md"
            );
        }
    }
    drop(skiff);
}

/// Returns the metric names in docs/METRICS.md: every backquoted word that starts with
/// `skiff_` or `pgbouncer_`.
fn documented_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/METRICS.md"))
        .expect("docs/METRICS.md is readable");
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| word.starts_with("skiff_") || word.starts_with("pgbouncer_"))
        .map(str::to_string)
        .collect()
}

/// Returns the metric names in a PromQL expression: identifiers that start with
/// `skiff_` or `pgbouncer_`, with the histogram suffixes taken off.
fn metrics_in_expression(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let word = &tail[..end];
        let preceded_by_word = rest[..start]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '$');
        if !preceded_by_word && (word.starts_with("skiff_") || word.starts_with("pgbouncer_")) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word);
            names.push(base.to_string());
        }
        rest = &tail[end..];
    }
    names
}

fn collect_expressions(value: &serde_json::Value, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            // A data source variable's query names a plugin, not a metric.
            if map.get("type").and_then(|t| t.as_str()) == Some("datasource") {
                return;
            }
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expression)) => {
                        found.push(expression.clone())
                    }
                    ("query", serde_json::Value::Object(query)) => {
                        if let Some(serde_json::Value::String(expression)) = query.get("query") {
                            found.push(expression.clone());
                        }
                    }
                    ("query", serde_json::Value::String(expression)) => {
                        found.push(expression.clone())
                    }
                    _ => collect_expressions(value, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_expressions(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn grafana_dashboard_uses_documented_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana/skiff-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard file is readable");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    collect_expressions(&dashboard, &mut expressions);
    assert!(
        expressions.len() >= 10,
        "only {} expressions",
        expressions.len()
    );
    let catalog = documented_metrics();
    for expression in &expressions {
        let names = metrics_in_expression(expression);
        assert!(!names.is_empty(), "{expression:?} names no skiff metric");
        for name in names {
            assert!(
                catalog.contains(&name),
                "{expression:?} uses {name}, which docs/METRICS.md does not list"
            );
        }
    }
    let panels = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels");
    for panel in panels {
        assert!(panel["title"].is_string(), "a panel has no title: {panel}");
    }
}

#[test]
fn expression_parser_finds_metric_names() {
    let names = metrics_in_expression(
        "histogram_quantile(0.99, sum by (le) (rate(skiff_pg_checkout_wait_seconds_bucket{pool=~\"$pool\"}[5m]))) \
         / on() pgbouncer_up",
    );
    assert_eq!(names, ["skiff_pg_checkout_wait_seconds", "pgbouncer_up"]);
}
