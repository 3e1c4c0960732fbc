//! Capture tests with the shapes Dify writes: psycopg2 simple queries with
//! interpolated literals (api) and pgx extended-protocol statements with
//! binary parameters (plugin daemon).

use super::*;
use crate::config::CaptureConfig;

const NOW_NS: u64 = 1_714_557_600_123_456_789;
const NODE_ID: &str = "6f1e2c3a-0b4d-4e5f-8a9b-0c1d2e3f4a5b";

fn capture() -> Capture {
    let config = |table: &str, logstore: &str, mode: &str| CaptureConfig {
        database: "dify".into(),
        table: table.into(),
        logstore: logstore.into(),
        mode: mode.into(),
        primary_key: "id".into(),
    };
    Capture::new(&[
        config(
            "workflow_node_executions",
            "workflow_node_execution",
            "mirror",
        ),
        config("public.workflow_runs", "workflow_execution", "divert"),
    ])
}

fn get<'a>(record: &'a Record, key: &str) -> Option<&'a str> {
    record
        .contents
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn keys(record: &Record) -> Vec<&str> {
    record.contents.iter().map(|(k, _)| k.as_str()).collect()
}

#[test]
fn psycopg2_node_insert() {
    let sql = format!(
        "INSERT INTO workflow_node_executions (id, tenant_id, app_id, workflow_id, triggered_from, \
         workflow_run_id, index, predecessor_node_id, node_execution_id, node_id, node_type, title, \
         inputs, process_data, outputs, status, error, elapsed_time, execution_metadata, created_at, \
         created_by_role, created_by, finished_at) VALUES ('{NODE_ID}'::uuid, \
         'a0000000-0000-4000-8000-000000000001'::uuid, 'a0000000-0000-4000-8000-000000000002'::uuid, \
         'a0000000-0000-4000-8000-000000000003'::uuid, 'workflow-run', \
         'a0000000-0000-4000-8000-000000000004'::uuid, 2, 'start', 'exec-1', 'llm-1', 'llm', 'LLM', \
         '{{\"query\": \"What''s new?\"}}', NULL, NULL, 'running', NULL, 0.0, NULL, \
         '2024-05-01T10:00:00'::timestamp, 'account', 'a0000000-0000-4000-8000-000000000005'::uuid, NULL)"
    );
    let captured = capture().capture_query("dify", &sql, NOW_NS).unwrap();
    assert_eq!(captured.len(), 1);
    let (plan, records) = &captured[0];
    assert_eq!(plan.logstore, "workflow_node_execution");
    assert_eq!(plan.mode, CaptureMode::Mirror);
    assert_eq!(plan.operation, Operation::Insert);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.logstore, "workflow_node_execution");
    assert_eq!(record.time_ns, NOW_NS);
    assert_eq!(get(record, "id"), Some(NODE_ID));
    assert_eq!(get(record, "index"), Some("2"));
    assert_eq!(get(record, "inputs"), Some(r#"{"query": "What's new?"}"#));
    assert_eq!(get(record, "created_at"), Some("2024-05-01T10:00:00"));
    assert_eq!(
        get(record, "process_data"),
        Some(""),
        "a NULL column has an empty value"
    );
    assert_eq!(get(record, "__table__"), Some("workflow_node_executions"));
    assert_eq!(get(record, "__op__"), Some("insert"));
    assert_eq!(get(record, "log_version"), Some("1714557600123456789"));
    assert_eq!(keys(record)[0], "id");
    assert_eq!(keys(record).len(), 23 + 3);
}

#[test]
fn sqlalchemy_node_update_by_primary_key() {
    let process_data = r#"{"usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150, "total_price": "0.00045", "currency": "USD", "latency": 1.92, "time_to_first_token": 0.41}, "model_provider": "openai", "model_name": "gpt-4o"}"#;
    let sql = format!(
        "UPDATE workflow_node_executions SET process_data='{process_data}', \
         outputs='{{\"text\": \"Hello\"}}', status='succeeded', elapsed_time=1.92, \
         finished_at='2024-05-01T10:00:01.920000'::timestamp WHERE workflow_node_executions.id = \
         '{NODE_ID}'::uuid"
    );
    let captured = capture().capture_query("dify", &sql, NOW_NS).unwrap();
    let (plan, records) = &captured[0];
    assert_eq!(plan.operation, Operation::Update);
    let record = &records[0];
    assert_eq!(keys(record)[0], "id", "the primary key comes first");
    assert_eq!(get(record, "id"), Some(NODE_ID));
    assert_eq!(get(record, "process_data"), Some(process_data));
    let parsed: serde_json::Value =
        serde_json::from_str(get(record, "process_data").unwrap()).unwrap();
    assert_eq!(parsed["usage"]["total_tokens"], 150);
    assert_eq!(get(record, "outputs"), Some(r#"{"text": "Hello"}"#));
    assert_eq!(get(record, "status"), Some("succeeded"));
    assert_eq!(get(record, "elapsed_time"), Some("1.92"));
    assert_eq!(get(record, "__op__"), Some("update"));
}

#[test]
fn pgx_insert_with_binary_params() {
    let sql = "INSERT INTO \"workflow_node_executions\" (\"id\",\"index\",\"node_type\",\"process_data\",\
               \"elapsed_time\",\"created_at\",\"error\") VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT DO NOTHING";
    let plan = capture()
        .prepare("dify", sql)
        .unwrap()
        .expect("captured table");
    let uuid: [u8; 16] = [
        0x6f, 0x1e, 0x2c, 0x3a, 0x0b, 0x4d, 0x4e, 0x5f, 0x8a, 0x9b, 0x0c, 0x1d, 0x2e, 0x3f, 0x4a,
        0x5b,
    ];
    let index = 3i32.to_be_bytes();
    let jsonb = b"\x01{\"usage\": {\"total_tokens\": 9}}";
    let elapsed = 0.25f64.to_be_bytes();
    let created = 768_182_400_000_000i64.to_be_bytes();
    let binary = |type_oid, value: &'static [u8]| Param {
        type_oid,
        format: Format::Binary,
        value: Some(value),
    };
    let leak = |bytes: &[u8]| -> &'static [u8] { Box::leak(bytes.to_vec().into_boxed_slice()) };
    let params = [
        binary(binary::UUID, leak(&uuid)),
        binary(binary::INT4, leak(&index)),
        Param {
            type_oid: 0,
            format: Format::Text,
            value: Some(b"llm"),
        },
        binary(binary::JSONB, jsonb),
        binary(binary::FLOAT8, leak(&elapsed)),
        binary(binary::TIMESTAMP, leak(&created)),
        Param {
            type_oid: binary::TEXT,
            format: Format::Binary,
            value: None,
        },
    ];
    let records = plan.records(&params, NOW_NS).unwrap();
    let record = &records[0];
    assert_eq!(get(record, "id"), Some(NODE_ID));
    assert_eq!(get(record, "index"), Some("3"));
    assert_eq!(get(record, "node_type"), Some("llm"));
    assert_eq!(
        get(record, "process_data"),
        Some(r#"{"usage": {"total_tokens": 9}}"#)
    );
    assert_eq!(get(record, "elapsed_time"), Some("0.25"));
    assert_eq!(get(record, "created_at"), Some("2024-05-05 00:00:00"));
    assert_eq!(get(record, "error"), Some(""), "a NULL parameter");

    let short = [params[0], params[1]];
    assert_eq!(
        plan.records(&short, NOW_NS).unwrap_err(),
        CaptureError::MissingParam(3)
    );
    let mut bad = params;
    bad[1] = binary(binary::INT4, b"\x00\x01");
    assert!(matches!(
        plan.records(&bad, NOW_NS),
        Err(CaptureError::InvalidParam { index: 2, .. })
    ));
}

#[test]
fn update_to_null_differs_from_untouched_column() {
    let sql = "UPDATE workflow_node_executions SET error = NULL, status = 'failed', \
               finished_at = DEFAULT WHERE id = 'n1'";
    let captured = capture().capture_query("dify", sql, NOW_NS).unwrap();
    let record = &captured[0].1[0];
    assert_eq!(get(record, "error"), Some(""), "set to NULL");
    assert_eq!(get(record, "status"), Some("failed"));
    assert_eq!(get(record, "outputs"), None, "not touched");
    assert_eq!(get(record, "finished_at"), None, "DEFAULT: value unknown");

    let plan = capture()
        .prepare(
            "dify",
            "UPDATE workflow_node_executions SET outputs = $1, status = $2 WHERE id = $3",
        )
        .unwrap()
        .expect("captured table");
    let text = |value: Option<&'static [u8]>| Param {
        type_oid: 0,
        format: Format::Text,
        value,
    };
    let params = [text(None), text(Some(b"succeeded")), text(Some(b"n1"))];
    let record = &plan.records(&params, NOW_NS).unwrap()[0];
    assert_eq!(keys(record)[..3], ["id", "outputs", "status"]);
    assert_eq!(get(record, "outputs"), Some(""), "NULL parameter");
    assert_eq!(get(record, "error"), None);
}

#[test]
fn multi_row_insert_gives_one_record_per_row() {
    let sql = "INSERT INTO public.workflow_runs (id, status, total_tokens, created_at) VALUES \
               ('r1', 'running', 0, now()), ('r2', 'succeeded', 42, DEFAULT)";
    let captured = capture().capture_query("dify", sql, NOW_NS).unwrap();
    let (plan, records) = &captured[0];
    assert_eq!(plan.mode, CaptureMode::Divert);
    assert_eq!(records.len(), 2);
    assert_eq!(
        get(&records[0], "created_at"),
        Some("2024-05-01 10:00:00.123456")
    );
    assert_eq!(get(&records[1], "total_tokens"), Some("42"));
    assert_eq!(get(&records[1], "created_at"), None);
    assert!(records.iter().all(|r| r.logstore == "workflow_execution"));
}

#[test]
fn table_names_match_with_schema_and_quotes() {
    let capture = capture();
    let matches = |sql: &str| {
        !capture
            .capture_query("dify", sql, NOW_NS)
            .unwrap()
            .is_empty()
    };
    assert!(matches("INSERT INTO workflow_runs (id) VALUES ('1')"));
    assert!(matches(
        "INSERT INTO \"public\".\"workflow_runs\" (id) VALUES ('1')"
    ));
    assert!(matches(
        "insert into PUBLIC.Workflow_Runs (id) values ('1')"
    ));
    assert!(
        !matches("INSERT INTO \"Workflow_Runs\" (id) VALUES ('1')"),
        "quoted names keep case"
    );
    assert!(!matches(
        "INSERT INTO audit.workflow_runs (id) VALUES ('1')"
    ));
    assert!(!matches(
        "INSERT INTO workflow_runs_archive (id) VALUES ('1')"
    ));
    assert!(capture
        .capture_query(
            "other_db",
            "INSERT INTO workflow_runs (id) VALUES ('1')",
            NOW_NS
        )
        .unwrap()
        .is_empty());
}

#[test]
fn several_statements_in_one_query() {
    let sql = "BEGIN; INSERT INTO workflow_runs (id) VALUES ('1'); \
               UPDATE workflow_node_executions SET status = 'failed' WHERE id = 'n1'; COMMIT";
    let captured = capture().capture_query("dify", sql, NOW_NS).unwrap();
    assert_eq!(captured.len(), 2);
    assert_eq!(captured[0].0.logstore, "workflow_execution");
    assert_eq!(get(&captured[1].1[0], "id"), Some("n1"));
}

#[test]
fn precheck_skips_unrelated_statements() {
    let capture = capture();
    assert!(!capture.may_capture("dify", "SELECT * FROM workflow_runs WHERE id = $1"));
    assert!(!capture.may_capture("dify", "INSERT INTO accounts (id) VALUES ('1')"));
    assert!(!capture.may_capture("other", "INSERT INTO workflow_runs (id) VALUES ('1')"));
    assert!(capture.may_capture("dify", "insert into WORKFLOW_RUNS (id) values ('1')"));
    assert!(capture.prepare("dify", "SELECT 1").unwrap().is_none());
    // Names the table but does not write it: parsed, not captured.
    assert!(capture
        .prepare(
            "dify",
            "UPDATE accounts SET note = 'workflow_runs' WHERE id = '1'"
        )
        .unwrap()
        .is_none());
}

#[test]
fn update_not_pinned_by_primary_key_is_unsupported() {
    let sql = "UPDATE workflow_runs SET status = 'stopped' WHERE status = 'running'";
    let err = capture().capture_query("dify", sql, NOW_NS).unwrap_err();
    assert!(
        matches!(err, CaptureError::Unsupported(ref m) if m.contains("primary key")),
        "{err}"
    );
}

#[test]
fn malformed_sql_returns_errors() {
    let capture = capture();
    for sql in [
        "INSERT INTO workflow_runs (id VALUES ('1')",
        "INSERT INTO workflow_runs (id) VALUES ('1'",
        "INSERT INTO workflow_runs (id) VALUES ('unterminated)",
        "UPDATE workflow_runs SET = 1 WHERE id = '1'",
        "INSERT INTO workflow_runs",
        "UPDATE workflow_runs",
    ] {
        assert!(capture.capture_query("dify", sql, NOW_NS).is_err(), "{sql}");
    }
}

#[test]
fn every_prefix_and_byte_flip_is_handled() {
    let capture = capture();
    let sql = "INSERT INTO workflow_runs (id, graph, n) VALUES (E'a\\'b', $q${\"x\": 1}$q$, -2.5e3::numeric(10,2)) \
               ON CONFLICT (id) DO UPDATE SET graph = excluded.graph";
    assert_eq!(capture.capture_query("dify", sql, NOW_NS).unwrap().len(), 1);
    for end in (0..=sql.len()).filter(|i| sql.is_char_boundary(*i)) {
        let _ = capture.capture_query("dify", &sql[..end], NOW_NS);
        let _ = capture.prepare("dify", &sql[..end]);
    }
    for position in 0..sql.len() {
        let mut bytes = sql.as_bytes().to_vec();
        for replacement in [b'\'', b'"', b'$', b'(', b')', b',', b';', b'\\', b'/', b'*'] {
            bytes[position] = replacement;
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = capture.capture_query("dify", text, NOW_NS);
            }
        }
    }
}
