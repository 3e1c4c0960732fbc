//! `skiff plan`: the pool sizes it prints keep every sidecar's server
//! connections plus the reserve within max_connections, for fixed numbers
//! and for numbers read from a real server with `--query`.

mod support;

use std::process::{Command, Output};

use support::postgres::SCRAM_USER;

/// Writes `config` to a file and runs `skiff plan` on it with `args`.
fn plan(config: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skiff.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("plan")
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .expect("skiff runs")
}

/// Returns a config with one database per (name, host, pool_size).
fn config(databases: &[(&str, &str, u32)]) -> String {
    let mut text = String::from("[postgres]\nlisten = \"127.0.0.1:6432\"\n");
    for (name, host, pool_size) in databases {
        text.push_str(&format!(
            "\n[[postgres.databases]]\nname = \"{name}\"\nhost = \"{host}\"\npool_size = {pool_size}\n"
        ));
    }
    text
}

/// Returns the (name, host, pool_size) entries of a plan's output, which
/// must parse as TOML.
fn planned(stdout: &str) -> Vec<(String, String, u32)> {
    let value: toml::Value =
        toml::from_str(stdout).unwrap_or_else(|err| panic!("not TOML ({err}):\n{stdout}"));
    value["postgres"]["databases"]
        .as_array()
        .expect("[[postgres.databases]] entries")
        .iter()
        .map(|db| {
            (
                db["name"].as_str().unwrap().to_string(),
                db["host"].as_str().unwrap().to_string(),
                db["pool_size"].as_integer().unwrap() as u32,
            )
        })
        .collect()
}

/// Returns the default reserve when the server's settings are
/// PostgreSQL's defaults: 3 superuser slots plus 10% of max_connections, at least 5.
fn default_reserve(max_connections: u32) -> u32 {
    3 + max_connections.div_ceil(10).max(5)
}

#[test]
fn fixed_numbers_never_exceed_max_connections() {
    let layouts: [&[(&str, &str, u32)]; 3] = [
        &[("dify", "10.0.0.5", 30), ("dify_plugin", "10.0.0.5", 10)],
        &[("a", "10.0.0.5", 20)],
        &[
            ("a", "10.0.0.5", 50),
            ("b", "10.0.0.5", 5),
            ("c", "10.0.0.5", 1),
        ],
    ];
    let mut checked = 0;
    for layout in layouts {
        for instances in [1u32, 2, 3, 7, 16, 40] {
            for max_connections in [100u32, 200, 501, 5000] {
                for reserve in [None, Some(0u32), Some(37)] {
                    for users in [1u32, 2] {
                        let reserve_arg = reserve.map(|r| r.to_string());
                        let mut args = vec![
                            "--instances".to_string(),
                            instances.to_string(),
                            "--max-connections".to_string(),
                            max_connections.to_string(),
                            "--users".to_string(),
                            users.to_string(),
                        ];
                        if let Some(reserve) = &reserve_arg {
                            args.extend(["--reserve".to_string(), reserve.clone()]);
                        }
                        let args: Vec<&str> = args.iter().map(String::as_str).collect();
                        let output = plan(&config(layout), &args);
                        let reserve = reserve.unwrap_or_else(|| default_reserve(max_connections));
                        let per_sidecar = (max_connections - reserve) / instances;
                        let case = format!(
                            "{layout:?} instances {instances} max {max_connections} \
                             reserve {reserve} users {users}"
                        );
                        let stdout = String::from_utf8_lossy(&output.stdout);
                        let stderr = String::from_utf8_lossy(&output.stderr);
                        if per_sidecar / users < layout.len() as u32 {
                            assert_eq!(output.status.code(), Some(2), "{case}: {stdout}");
                            assert!(stderr.contains("max_connections"), "{case}: {stderr}");
                            assert!(stderr.contains("lower --instances"), "{case}: {stderr}");
                            continue;
                        }
                        assert!(output.status.success(), "{case}: {stderr}");
                        let pools = planned(&stdout);
                        assert_eq!(pools.len(), layout.len(), "{case}");
                        let sum: u32 = pools.iter().map(|(_, _, size)| size).sum();
                        assert!(pools.iter().all(|(_, _, size)| *size >= 1), "{case}");
                        assert!(
                            instances * users * sum + reserve <= max_connections,
                            "{case}: {instances} × {users} × {sum} + {reserve} > {max_connections}"
                        );
                        // Only rounding is left unused.
                        assert_eq!(sum, per_sidecar / users, "{case}");
                        // A larger configured pool never gets a smaller share.
                        for (i, a) in layout.iter().enumerate() {
                            for (j, b) in layout.iter().enumerate() {
                                if a.2 > b.2 {
                                    assert!(pools[i].2 >= pools[j].2, "{case}: {pools:?}");
                                }
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} feasible cases");
}

#[test]
fn each_server_gets_its_own_budget() {
    let layout = [
        ("dify", "10.0.0.5", 30),
        ("dify_plugin", "10.0.0.5", 10),
        ("other", "10.0.0.6", 20),
    ];
    let output = plan(
        &config(&layout),
        &[
            "--instances",
            "4",
            "--max-connections",
            "100",
            "--reserve",
            "20",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pools = planned(&stdout);
    // 80 connections left on each server, 20 per sidecar: 15 and 5 on the
    // first server by the 3:1 configured sizes, all 20 on the second.
    let sizes: Vec<(&str, u32)> = pools.iter().map(|(n, _, s)| (n.as_str(), *s)).collect();
    assert_eq!(sizes, [("dify", 15), ("dify_plugin", 5), ("other", 20)]);
    assert!(
        stdout.contains("4 sidecars × 20 + reserve 20 = 100 <= 100"),
        "{stdout}"
    );
    assert!(
        stdout.contains("4 sidecars × 40 + reserve 20 = 180 > 100"),
        "{stdout}"
    );
}

#[test]
fn secrets_stay_out_of_the_plan() {
    let text = "[postgres]\n[[postgres.databases]]\nname = \"d\"\nuser = \"app\"\n\
                password = \"Plan-Secret-Pw\"\n";
    let output = plan(text, &["--instances", "2", "--max-connections", "100"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("Plan-Secret-Pw"), "{stdout}");
    assert!(stdout.contains("user = \"app\""), "{stdout}");
    assert!(stdout.contains("# password = ..."), "{stdout}");
}

#[test]
fn query_reads_the_server_settings() {
    let pg = support::postgres::shared();
    let expected_max: u32 = pg.psql("SHOW max_connections").parse().unwrap();
    let reserved: u32 = pg
        .psql("SHOW superuser_reserved_connections")
        .parse()
        .unwrap();
    // Logs in with the database's own user and password over SCRAM.
    let text = format!(
        "[postgres]\n[[postgres.databases]]\nname = \"postgres\"\nport = {}\n\
         user = \"{}\"\npassword = \"{}\"\npool_size = 20\n",
        pg.port, SCRAM_USER.0, SCRAM_USER.1
    );
    let output = plan(&text, &["--instances", "5", "--query"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "max_connections {expected_max} (read from the server)"
        )),
        "{stdout}"
    );
    let reserve = reserved + expected_max.div_ceil(10).max(5);
    let pools = planned(&stdout);
    assert_eq!(pools[0].2, (expected_max - reserve) / 5, "{stdout}");

    // A database without a user needs --user.
    let text = format!(
        "[postgres]\n[[postgres.databases]]\nname = \"postgres\"\nport = {}\n",
        pg.port
    );
    let output = plan(&text, &["--instances", "5", "--query"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--user"), "{stderr}");
    let output = plan(
        &text,
        &["--instances", "5", "--query", "--user", "postgres"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A server that rejects the login is reported with its address.
    let text = format!(
        "[postgres]\n[[postgres.databases]]\nname = \"postgres\"\nport = {}\n\
         user = \"{}\"\npassword = \"Plan-Wrong-Pw\"\n",
        pg.port, SCRAM_USER.0
    );
    let output = plan(&text, &["--instances", "5", "--query"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", pg.port)),
        "{stderr}"
    );
    assert!(!stderr.contains("Plan-Wrong-Pw"), "{stderr}");
}
