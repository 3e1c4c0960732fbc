//! Delivery to a strict mock SLS: batching, V1 and V4 signatures, retries
//! on every retryable failure, dead-lettering, spool bounds and shutdown.

#[path = "support/logship_harness.rs"]
mod harness;
#[path = "support/mock_sls.rs"]
mod mock_sls;

use std::collections::HashMap;
use std::time::Duration;

use harness::{node_record, sls_config, sorted_ids, start};
use mock_sls::{Fault, MockSls, MockSlsConfig};
use skiff::logship::SubmitError;

fn mock_config(token: Option<&str>) -> MockSlsConfig {
    MockSlsConfig {
        project: "dify-logs".into(),
        access_key_id: "test-ak".into(),
        access_key_secret: "test-secret".into(),
        security_token: token.map(str::to_string),
    }
}

fn expected_ids(range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect()
}

fn ids_of(logs: &[(String, mock_sls::MockLog)]) -> Vec<String> {
    sorted_ids(logs.iter().map(|(_, log)| log.get("id").unwrap()))
}

#[tokio::test]
async fn batches_delivered_and_decoded() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = sls_config(dir.path(), &mock.endpoint(), "max_batch_count = 10", "");
    let logship = start(&text).await;
    let shipper = logship.shipper();
    let mut records: Vec<_> = (0..25)
        .map(|i| node_record("workflow_node_execution", i))
        .collect();
    let mut other = node_record("workflow_execution", 99);
    other.topic = "runs".into();
    other.source = "10.1.2.3".into();
    records.push(other);
    shipper.submit(records).await.unwrap();

    let logs = mock.wait_for_logs(26, Duration::from_secs(10)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    let nodes: Vec<_> = logs
        .iter()
        .filter(|(ls, _)| ls == "workflow_node_execution")
        .cloned()
        .collect();
    assert_eq!(ids_of(&nodes), expected_ids(0..25));
    let first = &nodes
        .iter()
        .find(|(_, log)| log.get("id") == Some(&expected_ids(3..4)[0]))
        .unwrap()
        .1;
    assert_eq!(first.time, 1_700_000_000);
    assert_eq!(first.time_ns, Some(3));
    assert_eq!(first.contents[0].key, "id");
    assert_eq!(
        first.get("process_data"),
        Some(r#"{"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#)
    );

    let accepted = mock.accepted();
    let node_batches: Vec<_> = accepted
        .iter()
        .filter(|a| a.logstore == "workflow_node_execution")
        .collect();
    assert_eq!(node_batches.len(), 3, "25 records at max_batch_count 10");
    assert!(node_batches.iter().all(|a| a.group.logs.len() <= 10));
    let run_batch = accepted
        .iter()
        .find(|a| a.logstore == "workflow_execution")
        .unwrap();
    assert_eq!(run_batch.group.topic.as_deref(), Some("runs"));
    assert_eq!(run_batch.group.source.as_deref(), Some("10.1.2.3"));
    assert!(
        mock.connections() < mock.requests(),
        "connections are reused"
    );
    logship.shutdown().await;
}

#[tokio::test]
async fn batches_stay_under_max_batch_bytes() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = sls_config(dir.path(), &mock.endpoint(), "max_batch_bytes = 2048", "");
    let logship = start(&text).await;
    logship
        .shipper()
        .submit((0..40).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();
    let logs = mock.wait_for_logs(40, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&logs), expected_ids(0..40));
    let accepted = mock.accepted();
    let mut total = 0;
    for batch in &accepted {
        let logs_only = mock_sls::MockLogGroup {
            logs: batch.group.logs.clone(),
            ..Default::default()
        };
        let size = prost::Message::encoded_len(&logs_only);
        assert!(size <= 2048, "batch of {size} bytes");
        total += size;
    }
    assert!(total > 2 * 2048, "the records need several batches");
    assert!(accepted.len() >= total.div_ceil(2048));
    logship.shutdown().await;
}

#[tokio::test]
async fn v4_signature_and_security_token() {
    let mock = MockSls::start(mock_config(Some("sts-token"))).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "signature = \"v4\"\nregion = \"cn-hangzhou\"\nsecurity_token = \"sts-token\"";
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), "", extra)).await;
    logship
        .shipper()
        .submit((0..5).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();
    let logs = mock.wait_for_logs(5, Duration::from_secs(10)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    assert_eq!(ids_of(&logs), expected_ids(0..5));
    logship.shutdown().await;
}

#[tokio::test]
async fn retries_every_retryable_failure() {
    let mock = MockSls::start(mock_config(None)).await;
    let faults = vec![
        Fault::Status(500, "InternalServerError", "internal error"),
        Fault::Status(502, "", "bad gateway"),
        Fault::Status(429, "ServerBusy", "too many requests"),
        Fault::Status(403, "WriteQuotaExceed", "write quota exceeded"),
        Fault::Status(403, "ShardWriteQuotaExceed", "shard write quota exceeded"),
        Fault::Status(403, "ProjectQuotaExceed", "Inflow Quota Exceed"),
        Fault::Status(503, "ServerBusy", "server busy"),
        Fault::Drop,
        Fault::Slow(Duration::from_millis(1500)),
    ];
    let fault_count = faults.len();
    mock.push_faults(faults);
    let dir = tempfile::tempdir().unwrap();
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), "", "")).await;
    logship
        .shipper()
        .submit((0..20).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();

    // The slow reply is accepted after the client timed out, so its batch
    // arrives twice: at least once, never lost.
    let logs = mock.wait_for_logs(40, Duration::from_secs(20)).await;
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    assert_eq!(mock.requests(), fault_count + 1);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, log) in &logs {
        *counts
            .entry(log.get("id").unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 20);
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.logs().len(), 40, "no further copies");
    assert_eq!(logship_spool_batches(&logship), 0);
    logship.shutdown().await;
}

fn logship_spool_batches(logship: &skiff::logship::Logship) -> u64 {
    use skiff::admin::Component;
    logship.status()["spool_batches"].as_u64().unwrap()
}

fn spool_bytes(logship: &skiff::logship::Logship) -> u64 {
    use skiff::admin::Component;
    logship.status()["spool_bytes"].as_u64().unwrap()
}

#[tokio::test]
async fn rejected_batch_goes_to_dead_letter() {
    let mock = MockSls::start(mock_config(None)).await;
    mock.push_faults([Fault::Status(
        400,
        "PostBodyInvalid",
        "log has an invalid field",
    )]);
    let dir = tempfile::tempdir().unwrap();
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), "", "")).await;
    let shipper = logship.shipper();
    shipper
        .submit((0..3).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    shipper
        .submit((3..5).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();

    let logs = mock.wait_for_logs(2, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&logs), expected_ids(3..5));
    let text = std::fs::read_to_string(dir.path().join("spool/dead-letter.ndjson")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1);
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert!(
        line["error"].as_str().unwrap().contains("PostBodyInvalid"),
        "{line}"
    );
    assert_eq!(line["logstore"], "nodes");
    let records = line["records"].as_array().unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["contents"][0][1], expected_ids(0..1)[0]);
    assert_eq!(logship_spool_batches(&logship), 0);
    logship.shutdown().await;
}

#[tokio::test]
async fn spool_full_rejects_with_error() {
    let mock = MockSls::start(mock_config(None)).await;
    mock.fail_all(Some(Fault::Status(503, "ServerBusy", "down")));
    let dir = tempfile::tempdir().unwrap();
    let extra = "max_spool_bytes = 8192\nmax_batch_bytes = 2048\non_full = \"reject\"";
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), extra, "")).await;
    let shipper = logship.shipper();
    let mut accepted = Vec::new();
    let mut rejection = None;
    for i in 0..200 {
        match shipper.submit(vec![node_record("nodes", i)]).await {
            Ok(()) => accepted.push(i),
            Err(err) => {
                rejection = Some(err);
                break;
            }
        }
    }
    let rejection = rejection.expect("a full spool rejects");
    assert_eq!(rejection, SubmitError::SpoolFull { max_bytes: 8192 });
    assert!(rejection.to_string().contains("max_spool_bytes"));
    assert!(!accepted.is_empty());

    mock.fail_all(None);
    let logs = mock
        .wait_for_logs(accepted.len(), Duration::from_secs(10))
        .await;
    let delivered = ids_of(&logs);
    for i in &accepted {
        assert!(
            delivered.contains(&expected_ids(*i..*i + 1)[0]),
            "record {i} was accepted but not delivered"
        );
    }
    logship.shutdown().await;
}

#[tokio::test]
async fn spool_full_blocks_until_room() {
    let mock = MockSls::start(mock_config(None)).await;
    mock.fail_all(Some(Fault::Status(500, "InternalServerError", "down")));
    let dir = tempfile::tempdir().unwrap();
    let extra = "max_spool_bytes = 8192\nmax_batch_bytes = 2048\non_full = \"block\"";
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), extra, "")).await;
    let shipper = logship.shipper();
    // A submit counts as blocked when it has not returned after 2s while
    // the spool has no room for another batch. A slow machine only makes
    // the loop take longer.
    let mut blocked_at = None;
    for i in 0..200 {
        let submit = shipper.submit(vec![node_record("nodes", i)]);
        let timed_out = tokio::time::timeout(Duration::from_secs(2), submit)
            .await
            .is_err();
        if timed_out && spool_bytes(&logship) + 2048 > 8192 {
            blocked_at = Some(i);
            break;
        }
    }
    let blocked_at = blocked_at.expect("a full spool blocks the source");
    let waiting = tokio::spawn({
        let shipper = shipper.clone();
        async move { shipper.submit(vec![node_record("nodes", 1000)]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "submit waits while the spool is full"
    );

    mock.fail_all(None);
    let result = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result, Ok(()));
    // Records 0..=blocked_at were queued (the timed-out submit was already
    // queued when it was dropped) and record 1000 came last.
    let logs = mock
        .wait_for_logs(blocked_at + 2, Duration::from_secs(10))
        .await;
    let delivered = ids_of(&logs);
    assert!(delivered.contains(&expected_ids(1000..1001)[0]));
    for i in 0..blocked_at {
        assert!(
            delivered.contains(&expected_ids(i..i + 1)[0]),
            "record {i} missing"
        );
    }
    logship.shutdown().await;
}

#[tokio::test]
async fn undelivered_batches_survive_restart() {
    let mock = MockSls::start(mock_config(None)).await;
    mock.fail_all(Some(Fault::Status(500, "InternalServerError", "down")));
    let dir = tempfile::tempdir().unwrap();
    let text = sls_config(
        dir.path(),
        &mock.endpoint(),
        "shutdown_timeout = \"300ms\"",
        "",
    );
    let logship = start(&text).await;
    logship
        .shipper()
        .submit((0..10).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();
    logship.shutdown().await;
    assert_eq!(
        logship_spool_batches(&logship),
        1,
        "undelivered batch stays spooled"
    );
    assert!(mock.logs().is_empty());

    mock.fail_all(None);
    let restarted = start(&text).await;
    let logs = mock.wait_for_logs(10, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&logs), expected_ids(0..10));
    restarted.shutdown().await;
    assert_eq!(logship_spool_batches(&restarted), 0);
}

#[tokio::test]
async fn submit_returns_before_linger() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = sls_config(dir.path(), &mock.endpoint(), "linger = \"1h\"", "");
    let logship = start(&text).await;
    let shipper = logship.shipper();
    let submit = shipper.submit(vec![node_record("nodes", 1)]);
    let result = tokio::time::timeout(Duration::from_secs(5), submit).await;
    assert_eq!(
        result,
        Ok(Ok(())),
        "durable after one spool write, not after linger"
    );
    assert_eq!(logship_spool_batches(&logship), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mock.logs().is_empty(), "the request waits for linger");

    // Shutdown sends what is spooled without waiting for linger.
    logship.shutdown().await;
    assert_eq!(ids_of(&mock.logs()), expected_ids(1..2));
    assert_eq!(logship_spool_batches(&logship), 0);
    let after = logship
        .shipper()
        .submit(vec![node_record("nodes", 2)])
        .await;
    assert_eq!(after, Err(SubmitError::Closed));
}

#[tokio::test]
async fn small_submissions_merge_into_one_request() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = sls_config(dir.path(), &mock.endpoint(), "linger = \"500ms\"", "");
    let logship = start(&text).await;
    let shipper = logship.shipper();
    for i in 0..10 {
        shipper.submit(vec![node_record("nodes", i)]).await.unwrap();
    }
    assert_eq!(
        logship_spool_batches(&logship),
        10,
        "one spool write per submit"
    );
    let logs = mock.wait_for_logs(10, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&logs), expected_ids(0..10));
    assert_eq!(mock.requests(), 1, "merged into one PutLogs request");
    let times: Vec<u32> = logs.iter().map(|(_, log)| log.time_ns.unwrap()).collect();
    assert_eq!(times, (0..10).collect::<Vec<u32>>(), "order kept");
    logship.shutdown().await;
}

#[tokio::test]
async fn invalid_records_are_rejected() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), "", "")).await;
    let shipper = logship.shipper();
    let bad_name = shipper.submit(vec![node_record("../etc", 1)]).await;
    assert!(
        matches!(bad_name, Err(SubmitError::InvalidRecord(ref m)) if m.contains("logstore")),
        "{bad_name:?}"
    );
    let huge = skiff::logship::Record::new("nodes", 1, vec![("k".into(), "x".repeat(6 << 20))]);
    let too_large = shipper.submit(vec![huge]).await;
    assert!(
        matches!(too_large, Err(SubmitError::InvalidRecord(ref m)) if m.contains("limit")),
        "{too_large:?}"
    );
    logship.shutdown().await;
}

#[tokio::test]
async fn file_sink_writes_and_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[logship]\nspool_dir = \"{}\"\nlinger = \"20ms\"\nmax_batch_count = 5\n\
         [logship.file]\npath = \"{}\"\nmax_file_bytes = 2000\n",
        dir.path().join("spool").display(),
        dir.path().join("out").display()
    );
    let logship = start(&text).await;
    logship
        .shipper()
        .submit((0..30).map(|i| node_record("nodes", i)).collect())
        .await
        .unwrap();
    logship.shutdown().await;

    let out = dir.path().join("out");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.contains(&"nodes.ndjson".to_string()));
    assert!(names.contains(&"nodes.1.ndjson".to_string()), "{names:?}");
    let mut ids = Vec::new();
    for name in &names {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(text.len() <= 2000, "{name} is {} bytes", text.len());
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["__time__"], 1_700_000_000);
            ids.push(value["id"].as_str().unwrap().to_string());
        }
    }
    ids.sort();
    assert_eq!(ids, expected_ids(0..30));
}

#[tokio::test]
async fn captured_rows_reach_sls_intact() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let capture_section = "[[logship.capture]]\ndatabase = \"dify\"\n\
                           table = \"workflow_node_executions\"\nlogstore = \"workflow_node_execution\"\n";
    let text = format!(
        "{}{capture_section}",
        sls_config(dir.path(), &mock.endpoint(), "", "")
    );
    let config = skiff::config::Config::parse(&text).unwrap();
    let capture = skiff::logship::capture::Capture::new(&config.logship.as_ref().unwrap().capture);
    let logship = start(&text).await;

    let process_data = r#"{"usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "time_to_first_token": 0.2}, "model_name": "gpt-4o"}"#;
    let sql = format!(
        "UPDATE workflow_node_executions SET status = 'succeeded', process_data = '{process_data}', \
         outputs = E'{{\"text\": \"line one\\\\nline two\"}}' WHERE id = 'n-1'"
    );
    let captured = capture
        .capture_query("dify", &sql, 1_714_557_600_000_000_000)
        .unwrap();
    assert_eq!(captured.len(), 1);
    let (_, records) = captured.into_iter().next().unwrap();
    logship.shipper().submit(records).await.unwrap();

    let logs = mock.wait_for_logs(1, Duration::from_secs(10)).await;
    let (logstore, log) = &logs[0];
    assert_eq!(logstore, "workflow_node_execution");
    assert_eq!(log.get("id"), Some("n-1"));
    assert_eq!(log.get("process_data"), Some(process_data));
    let outputs: serde_json::Value = serde_json::from_str(log.get("outputs").unwrap()).unwrap();
    assert_eq!(outputs["text"], "line one\nline two");
    assert_eq!(log.get("__op__"), Some("update"));
    assert_eq!(log.get("log_version"), Some("1714557600000000000"));
    assert_eq!(log.time, 1_714_557_600);
    logship.shutdown().await;
}

/// Writes a batch file as versions before the segment log did: the magic
/// `SKIFFSP1`, a 4-byte big-endian header length, the JSON header, then
/// the encoded `LogGroup`.
fn write_one_file_batch(spool: &std::path::Path, seq: u64, records: &[skiff::logship::Record]) {
    use prost::Message;
    let key = records[0].group_key();
    let group = skiff::logship::proto::LogGroup {
        logs: records.iter().map(|r| r.clone().into_log()).collect(),
        reserved: None,
        topic: Some(key.topic.clone()),
        source: Some(key.source.clone()),
        log_tags: vec![],
    };
    let header = skiff::logship::spool::BatchHeader {
        key,
        records: records.len(),
        created_ns: 1_700_000_000_000_000_000,
    };
    let header = serde_json::to_vec(&header).unwrap();
    let mut data = b"SKIFFSP1".to_vec();
    data.extend_from_slice(&(header.len() as u32).to_be_bytes());
    data.extend_from_slice(&header);
    data.extend_from_slice(&group.encode_to_vec());
    std::fs::write(spool.join(format!("{seq:016x}.batch")), data).unwrap();
}

#[tokio::test]
async fn spool_of_older_format_delivered() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let records: Vec<_> = (0..5).map(|i| node_record("nodes", i)).collect();
    write_one_file_batch(&spool, 7, &records[..3]);
    write_one_file_batch(&spool, 9, &records[3..]);

    let logship = start(&sls_config(dir.path(), &mock.endpoint(), "", "")).await;
    assert_eq!(logship_spool_batches(&logship), 2);
    logship
        .shipper()
        .submit(vec![node_record("nodes", 5)])
        .await
        .unwrap();
    let logs = mock.wait_for_logs(6, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&logs), expected_ids(0..6));
    logship.shutdown().await;
    assert_eq!(logship_spool_batches(&logship), 0);
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".batch"))
        .collect();
    assert!(left.is_empty(), "batch files left: {left:?}");
}

#[tokio::test]
async fn alternating_groups_stay_apart() {
    let mock = MockSls::start(mock_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let logship = start(&sls_config(dir.path(), &mock.endpoint(), "", "")).await;
    // One record per submit, from several tasks, switching between two
    // groups of the same logstore that differ only in their topic.
    let mut tasks = Vec::new();
    for task in 0..4 {
        let shipper = logship.shipper();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let index = task * 25 + i;
                let mut record = node_record("nodes", index);
                record.topic = if index % 2 == 0 { "even" } else { "odd" }.into();
                shipper.submit(vec![record]).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let logs = mock.wait_for_logs(100, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&logs), expected_ids(0..100));
    for accepted in mock.accepted() {
        let topic = accepted.group.topic.clone().unwrap();
        for log in &accepted.group.logs {
            let index: usize = log.get("id").unwrap()[24..].parse().unwrap();
            let expected = if index % 2 == 0 { "even" } else { "odd" };
            assert_eq!(topic, expected, "record {index}");
        }
    }
    logship.shutdown().await;
}
