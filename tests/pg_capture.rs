//! Log-table capture in the PostgreSQL stream, against a real PostgreSQL
//! and the strict mock SLS: mirrored rows ship after COMMIT only, diverted
//! rows are acknowledged by skiff and never reach PostgreSQL.

#[path = "support/logship_harness.rs"]
mod harness;
#[path = "support/mock_sls.rs"]
mod mock_sls;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mock_sls::{MockLog, MockSls, MockSlsConfig};
use skiff::config::Config;
use skiff::logship::Logship;
use support::postgres::PgServer;
use support::skiff::{self as skiff_support, Skiff};

fn pg() -> &'static PgServer {
    support::postgres::shared()
}

const TABLE: &str = "CREATE TABLE workflow_node_executions (
    id uuid PRIMARY KEY, workflow_run_id uuid, index integer NOT NULL,
    node_type varchar(255) NOT NULL, title varchar(255) NOT NULL,
    process_data text, status varchar(255) NOT NULL,
    elapsed_time double precision NOT NULL DEFAULT 0, created_at timestamp NOT NULL DEFAULT now())";

struct Setup {
    skiff: Skiff,
    mock: MockSls,
    _logship: Arc<Logship>,
    _dir: tempfile::TempDir,
    db: String,
}

async fn setup(db: &str, mode: &str) -> Setup {
    pg().create_database(db);
    let direct = skiff_support::connect(&pg().direct(db)).await;
    direct.batch_execute(TABLE).await.unwrap();
    let mock = MockSls::start(MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: "test-ak".into(),
        access_key_secret: "test-secret".into(),
        security_token: None,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut text = harness::sls_config(dir.path(), &mock.endpoint(), "", "");
    text.push_str(&format!(
        "[[logship.capture]]\ndatabase = \"{db}\"\ntable = \"workflow_node_executions\"\n\
         logstore = \"workflow_node_execution\"\nmode = \"{mode}\"\n\n\
         [postgres]\nlisten = \"127.0.0.1:0\"\ndefault_pool_size = 2\n\n\
         [[postgres.databases]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\n",
        pg().port
    ));
    let config = Config::parse(&text).unwrap();
    let logship = Logship::start(config.logship.as_ref().unwrap(), &config)
        .await
        .unwrap();
    let skiff = Skiff::start_with_shipper(&text, Some(logship.shipper())).await;
    Setup {
        skiff,
        mock,
        _logship: logship,
        _dir: dir,
        db: db.to_string(),
    }
}

fn contents(log: &MockLog) -> HashMap<String, String> {
    log.contents
        .iter()
        .map(|c| (c.key.clone(), c.value.clone()))
        .collect()
}

/// Rows shipped so far, keyed by id, after waiting for `count` of them.
async fn shipped(mock: &MockSls, count: usize) -> Vec<HashMap<String, String>> {
    let logs = mock.wait_for_logs(count, Duration::from_secs(10)).await;
    logs.iter().map(|(_, log)| contents(log)).collect()
}

fn rows_in_postgres(db: &str) -> i64 {
    let output = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg().port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .args(["-XAtqc", "SELECT count(*) FROM workflow_node_executions"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

const ID1: &str = "00000000-0000-4000-8000-000000000001";
const ID2: &str = "00000000-0000-4000-8000-000000000002";
const ID3: &str = "00000000-0000-4000-8000-000000000003";
const PROCESS_DATA: &str =
    r#"{"usage": {"prompt_tokens": 12, "total_tokens": 20}, "model_name": "gpt-4o"}"#;

fn insert_sql(id: &str, status: &str) -> String {
    format!(
        "INSERT INTO workflow_node_executions (id, index, node_type, title, process_data, status) \
         VALUES ('{id}', 1, 'llm', 'LLM', '{PROCESS_DATA}', '{status}')"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_ships_committed_rows_only() {
    let setup = setup("capture_mirror", "mirror").await;
    let client = setup.skiff.connect("postgres", &setup.db).await;

    client
        .batch_execute(&insert_sql(ID1, "running"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("BEGIN; {}; ROLLBACK", insert_sql(ID2, "running")))
        .await
        .unwrap();
    let failed = client
        .batch_execute(&format!("{}; SELECT 1/0", insert_sql(ID2, "running")))
        .await;
    assert!(failed.is_err());
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "UPDATE workflow_node_executions SET status = $1, elapsed_time = $2, \
             process_data = $3 WHERE id = $4",
            &[&"succeeded", &1.5f64, &None::<&str>, &uuid_param(ID1)],
        )
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();

    let rows = shipped(&setup.mock, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(setup.mock.logs().len(), 2, "rolled-back rows were shipped");
    let insert = &rows[0];
    assert_eq!(insert["id"], ID1);
    assert_eq!(insert["__op__"], "insert");
    assert_eq!(insert["__table__"], "workflow_node_executions");
    assert_eq!(insert["process_data"], PROCESS_DATA);
    assert!(insert["log_version"].parse::<u64>().is_ok());
    let update = &rows[1];
    assert_eq!(update["id"], ID1);
    assert_eq!(update["__op__"], "update");
    assert_eq!(update["status"], "succeeded");
    assert_eq!(update["elapsed_time"], "1.5");
    assert_eq!(update["process_data"], "", "set to NULL: an empty value");
    assert!(!update.contains_key("title"), "not set: no key");
    assert!(update["log_version"] > insert["log_version"]);
    // Mirrored rows reach PostgreSQL as well.
    assert_eq!(rows_in_postgres(&setup.db), 1);
}

/// A uuid, sent in binary format as pgx and tokio-postgres send it.
fn uuid_param(id: &str) -> uuid::Uuid {
    id.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divert_acknowledges_without_postgres() {
    let setup = setup("capture_divert", "divert").await;
    let client = setup.skiff.connect("postgres", &setup.db).await;

    let inserted = client
        .execute(
            &format!(
                "INSERT INTO workflow_node_executions (id, index, node_type, title, status) \
                 VALUES ('{ID1}', 1, 'llm', 'LLM', 'running'), ('{ID2}', 2, 'tool', 'Search', 'running')"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 2);

    // Extended protocol with binary parameters, as pgx sends them.
    let statement = client
        .prepare("INSERT INTO workflow_node_executions (id, index, node_type, title, status, elapsed_time) VALUES ($1::uuid, $2, $3, $4, $5, $6)")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let inserted = client
        .execute(
            &statement,
            &[
                &uuid_param(ID3),
                &7i32,
                &"code",
                &"Code",
                &"succeeded",
                &0.25f64,
            ],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    client.batch_execute("ROLLBACK").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            &statement,
            &[
                &uuid_param(ID3),
                &8i32,
                &"code",
                &"Code",
                &"succeeded",
                &0.5f64,
            ],
        )
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();

    let rows = shipped(&setup.mock, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        setup.mock.logs().len(),
        3,
        "rolled-back diverted rows were shipped"
    );
    assert_eq!(rows[0]["id"], ID1);
    assert_eq!(rows[1]["node_type"], "tool");
    assert_eq!(rows[2]["id"], ID3);
    assert_eq!(rows[2]["index"], "8");
    assert_eq!(rows[2]["elapsed_time"], "0.5");
    assert_eq!(
        rows_in_postgres(&setup.db),
        0,
        "diverted rows reached PostgreSQL"
    );

    // RETURNING needs PostgreSQL, so that statement goes through.
    let row = client
        .query_one(
            &format!(
                "INSERT INTO workflow_node_executions (id, index, node_type, title, status) \
                 VALUES ('{ID2}', 1, 'llm', 'LLM', 'running') RETURNING index"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(rows_in_postgres(&setup.db), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncaptured_statements_pass_untouched() {
    let setup = setup("capture_untouched", "divert").await;
    let client = setup.skiff.connect("postgres", &setup.db).await;
    client
        .batch_execute("CREATE TABLE other (v int); INSERT INTO other VALUES (1)")
        .await
        .unwrap();
    let row = client
        .query_one("SELECT count(*) FROM other", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    let rows = client
        .query("SELECT id FROM workflow_node_executions", &[])
        .await
        .unwrap();
    assert!(rows.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(setup.mock.logs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divert_insert_then_update_like_dify() {
    let setup = setup("capture_divert_update", "divert").await;
    let client = setup.skiff.connect("postgres", &setup.db).await;

    // The node starts: psycopg2-style INSERT with interpolated values.
    let inserted = client
        .execute(&insert_sql(ID1, "running"), &[])
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    // The node finishes: pgx-style UPDATE by primary key with parameters.
    let updated = client
        .execute(
            "UPDATE workflow_node_executions SET status = $1, process_data = $2 WHERE id = $3",
            &[&"succeeded", &PROCESS_DATA, &uuid_param(ID1)],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1, "a diverted UPDATE reports the row it replaced");

    // INSERT ... SELECT cannot be diverted and reaches PostgreSQL.
    client
        .batch_execute(&format!(
            "INSERT INTO workflow_node_executions (id, index, node_type, title, status) \
             SELECT '{ID2}', 2, 'tool', 'Search', 'running'"
        ))
        .await
        .unwrap();

    let rows = shipped(&setup.mock, 2).await;
    assert_eq!(rows[0]["__op__"], "insert");
    assert_eq!(rows[0]["status"], "running");
    assert_eq!(rows[1]["__op__"], "update");
    assert_eq!(rows[1]["id"], ID1);
    assert_eq!(rows[1]["status"], "succeeded");
    assert_eq!(rows[1]["process_data"], PROCESS_DATA);
    assert!(rows[1]["log_version"] > rows[0]["log_version"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(setup.mock.logs().len(), 2);
    assert_eq!(
        rows_in_postgres(&setup.db),
        1,
        "only the INSERT ... SELECT row is in PostgreSQL"
    );
}
