//! Helpers shared by the logship integration tests: config text, starting
//! a shipper in-process, and sample records shaped like Dify's workflow
//! node executions.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use skiff::config::Config;
use skiff::logship::{Logship, Record};

/// Config text for a shipper with its spool in `dir` that ships to
/// `endpoint`. `extra_logship` goes into `[logship]`, `extra_sls` into
/// `[logship.sls]`.
pub fn sls_config(dir: &Path, endpoint: &str, extra_logship: &str, extra_sls: &str) -> String {
    let mut defaults = String::new();
    for (key, value) in [("linger", "\"50ms\""), ("shutdown_timeout", "\"2s\"")] {
        if !extra_logship.contains(key) {
            defaults.push_str(&format!("{key} = {value}\n"));
        }
    }
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [logship]\nspool_dir = \"{spool}\"\n{defaults}{extra_logship}\n\
         [logship.sls]\nendpoint = \"{endpoint}\"\nproject = \"dify-logs\"\n\
         access_key_id = \"test-ak\"\naccess_key_secret = \"test-secret\"\n\
         retry_initial_backoff = \"20ms\"\nretry_max_backoff = \"200ms\"\nrequest_timeout = \"1s\"\n{extra_sls}\n",
        spool = dir.join("spool").display(),
    )
}

/// Starts a shipper from config text.
pub async fn start(text: &str) -> Arc<Logship> {
    let config = Config::parse(text).unwrap_or_else(|err| panic!("config: {err}\n{text}"));
    Logship::start(config.logship.as_ref().unwrap(), &config)
        .await
        .unwrap()
}

/// Builds a workflow node execution record numbered `index`.
pub fn node_record(logstore: &str, index: usize) -> Record {
    let contents = vec![
        (
            "id".to_string(),
            format!("00000000-0000-4000-8000-{index:012}"),
        ),
        ("node_type".to_string(), "llm".to_string()),
        ("title".to_string(), "LLM".to_string()),
        ("status".to_string(), "succeeded".to_string()),
        (
            "process_data".to_string(),
            format!(
                r#"{{"usage":{{"prompt_tokens":{index},"completion_tokens":7,"total_tokens":{}}}}}"#,
                index + 7
            ),
        ),
    ];
    Record::new(logstore, 1_700_000_000_000_000_000 + index as u64, contents)
}

/// Sorts ids, for comparing what arrived with what was sent.
pub fn sorted_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut ids: Vec<String> = ids.map(str::to_string).collect();
    ids.sort();
    ids
}
