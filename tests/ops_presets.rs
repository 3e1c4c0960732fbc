//! The per-tier presets in config/: each passes `skiff check` with the
//! environment variables it names, and each keeps the settings its comments
//! promise.

use std::collections::BTreeMap;
use std::process::Command;

use skiff::config::{Config, PoolMode, ReadFrom, RedisMode};

const PRESETS: [&str; 3] = ["tier-test", "tier-ha", "tier-performance"];

/// Values for every environment variable the presets may reference.
fn environment() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("DB_HOST", "db.internal"),
        ("DB_PORT", "5432"),
        ("DB_USERNAME", "postgres"),
        ("DB_PASSWORD", "preset-db-password"),
        ("REDIS_HOST", "redis.internal"),
        ("REDIS_PORT", "6379"),
        ("REDIS_PASSWORD", "preset-redis-password"),
        ("REDIS_SENTINEL_1", "sentinel-1.internal:26379"),
        ("REDIS_SENTINEL_2", "sentinel-2.internal:26379"),
        ("REDIS_SENTINEL_3", "sentinel-3.internal:26379"),
        ("REDIS_SENTINEL_SERVICE_NAME", "mymaster"),
        ("REDIS_SENTINEL_PASSWORD", "preset-sentinel-password"),
        ("REDIS_CLUSTER_SEED_1", "redis-0.internal:6379"),
        ("REDIS_CLUSTER_SEED_2", "redis-1.internal:6379"),
        ("REDIS_CLUSTER_SEED_3", "redis-2.internal:6379"),
        ("REDIS_CLUSTERS_PASSWORD", "preset-cluster-password"),
        ("ALIYUN_SLS_ENDPOINT", "cn-hangzhou.log.aliyuncs.com"),
        ("ALIYUN_SLS_PROJECT", "dify-logs"),
        ("ALIYUN_SLS_ACCESS_KEY_ID", "preset-ak"),
        ("ALIYUN_SLS_ACCESS_KEY_SECRET", "preset-sk"),
    ])
}

fn path(preset: &str) -> String {
    format!("{}/config/{preset}.toml", env!("CARGO_MANIFEST_DIR"))
}

/// Returns the names of the `${NAME}` references in `text`.
fn references(text: &str) -> Vec<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_string()))
        .collect()
}

/// Loads a preset with the test environment substituted, the way skiff
/// expands it.
fn load(preset: &str) -> Config {
    let mut text = std::fs::read_to_string(path(preset)).unwrap();
    for (name, value) in environment() {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    Config::parse(&text).unwrap_or_else(|err| panic!("{preset}: {err}"))
}

#[test]
fn presets_pass_skiff_check() {
    let environment = environment();
    for preset in PRESETS {
        let text = std::fs::read_to_string(path(preset)).unwrap();
        for name in references(&text) {
            assert!(
                environment.contains_key(name.as_str()),
                "{preset} reads ${{{name}}}, which the test does not set"
            );
        }
        let output = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["check", "--config", &path(preset)])
            .env_clear()
            .envs(&environment)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{preset}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn presets_fail_without_their_variables() {
    for preset in PRESETS {
        let output = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["check", "--config", &path(preset)])
            .env_clear()
            .output()
            .unwrap();
        assert!(
            !output.status.success(),
            "{preset} passed with no environment"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("environment variable"),
            "{preset}: {stderr}"
        );
    }
}

#[test]
fn every_preset_pools_both_dify_databases() {
    for preset in PRESETS {
        let config = load(preset);
        let pg = config.postgres.as_ref().unwrap();
        assert_eq!(pg.pool_mode, PoolMode::Transaction, "{preset}");
        let names: Vec<&str> = pg.databases.iter().map(|db| db.name.as_str()).collect();
        assert_eq!(names, ["dify", "dify_plugin"], "{preset}");
        assert!(
            pg.databases
                .iter()
                .all(|db| db.host == "db.internal" && db.port == 5432),
            "{preset}"
        );
        assert!(pg.auth.users.contains_key("postgres"), "{preset}");
        let redis = config.redis.as_ref().unwrap();
        assert_eq!(
            redis.client_password, redis.password,
            "{preset}: clients AUTH with the upstream password"
        );
    }
}

#[test]
fn tiers_differ_as_documented() {
    let test = load("tier-test");
    let ha = load("tier-ha");
    let performance = load("tier-performance");
    let pool = |config: &Config| config.postgres.as_ref().unwrap().databases[0].pool_size;
    assert!(pool(&test) < pool(&ha), "the HA tier has larger pools");
    assert!(
        pool(&ha) < pool(&performance),
        "the performance tier has the largest pools"
    );

    let redis = |config: &Config| config.redis.clone().unwrap();
    assert_eq!(redis(&test).mode, RedisMode::Standalone);
    assert_eq!(redis(&test).read_from, ReadFrom::Primary);
    assert_eq!(redis(&ha).mode, RedisMode::Sentinel);
    assert_eq!(redis(&ha).master_name.as_deref(), Some("mymaster"));
    assert_eq!(redis(&ha).read_from, ReadFrom::Primary);
    assert_eq!(redis(&performance).mode, RedisMode::Cluster);
    assert_eq!(redis(&performance).read_from, ReadFrom::PreferReplica);

    assert!(test.logship.is_none(), "the test tier ships no logs");
    for config in [&ha, &performance] {
        let logship = config.logship.as_ref().unwrap();
        assert_eq!(logship.capture.len(), 1);
        assert_eq!(logship.capture[0].mode, "mirror");
        assert!(logship.sls.is_some());
    }
    let pg_ha = ha.postgres.as_ref().unwrap();
    assert_eq!(pg_ha.server_check_delay.as_secs(), 5);
    assert_eq!(pg_ha.query_wait_timeout.as_secs(), 60);
    let pg_test = test.postgres.as_ref().unwrap();
    assert_eq!(pg_test.query_wait_timeout.as_secs(), 30);
}
