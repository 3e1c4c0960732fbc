//! The deployment files in docker/, checked as data because there is no
//! Docker engine here. The Compose overlay points every Dify service it
//! touches at its own skiff, and the mounted config passes `skiff check`
//! with the environment the overlay gives it. The Kubernetes example does
//! the same, and the Dockerfile builds in stages and runs as a non-root
//! user.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;
use skiff::config::Config;

/// Dify services that use PostgreSQL and Redis, with whether they also
/// use Celery's broker and the keys of their definition in Dify 1.13's
/// docker-compose.yaml that `network_mode` forbids.
const DIFY_SERVICES: [(&str, bool, &[&str]); 4] = [
    ("api", true, &["networks"]),
    ("worker", true, &["networks"]),
    ("worker_beat", true, &["networks"]),
    ("plugin_daemon", false, &["ports"]),
];

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(docker_dir().join(name))
        .unwrap_or_else(|err| panic!("docker/{name}: {err}"))
}

/// Replaces Compose's `${NAME:-default}` with its default, the value it has
/// when Dify's .env leaves NAME unset.
fn compose_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        let (_, default) = inner
            .split_once(":-")
            .unwrap_or_else(|| panic!("${{{inner}}} has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// Returns an `environment:` mapping as names and values.
fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .expect("environment is a mapping")
        .iter()
        .map(|(name, value)| (scalar(name), scalar(value)))
        .collect()
}

/// Runs `skiff check` on `config` with exactly the environment `env`.
fn skiff_check(config: &Path, env: &BTreeMap<String, String>) {
    let output = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "skiff check {}: {}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Listen ports of a config's PostgreSQL and Redis listeners, read with
/// `env` substituted.
fn listen_ports(config_text: &str, env: &BTreeMap<String, String>) -> (u16, u16) {
    let mut text = config_text.to_string();
    for (name, value) in env {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    let config = Config::parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
    let port = |listen: &str| listen.rsplit_once(':').unwrap().1.parse().unwrap();
    (
        port(&config.postgres.unwrap().listen),
        port(&config.redis.unwrap().listen),
    )
}

fn is_loopback(host: &str) -> bool {
    host == "127.0.0.1" || host == "localhost"
}

/// Checks that a Dify service's variables point at skiff's listeners.
fn assert_points_at_skiff(
    service: &str,
    env: &BTreeMap<String, String>,
    uses_celery: bool,
    ports: (u16, u16),
) {
    let get = |name: &str| {
        env.get(name)
            .unwrap_or_else(|| panic!("{service} does not set {name}"))
            .as_str()
    };
    assert!(is_loopback(get("DB_HOST")), "{service} DB_HOST");
    assert_eq!(get("DB_PORT"), ports.0.to_string(), "{service} DB_PORT");
    assert!(is_loopback(get("REDIS_HOST")), "{service} REDIS_HOST");
    assert_eq!(
        get("REDIS_PORT"),
        ports.1.to_string(),
        "{service} REDIS_PORT"
    );
    assert_eq!(get("REDIS_USE_SSL"), "false", "{service} REDIS_USE_SSL");
    if uses_celery {
        let url = get("CELERY_BROKER_URL");
        let authority = url
            .strip_prefix("redis://")
            .and_then(|rest| rest.rsplit_once('@'))
            .map(|(_, host)| host.split('/').next().unwrap())
            .unwrap_or_else(|| panic!("{service} CELERY_BROKER_URL {url:?}"));
        let (host, port) = authority.rsplit_once(':').unwrap();
        assert!(is_loopback(host), "{service} CELERY_BROKER_URL {url:?}");
        assert_eq!(port, ports.1.to_string(), "{service} CELERY_BROKER_URL");
    }
}

#[test]
fn compose_overlay_points_dify_at_skiff() {
    let mut overlay: Value = serde_yaml::from_str(&read("docker-compose.skiff.yaml")).unwrap();
    overlay.apply_merge().unwrap();
    let services = &overlay["services"];
    let config_text = read("skiff.toml");
    let mut checked_sidecars = Vec::new();
    for (name, uses_celery, forbidden) in DIFY_SERVICES {
        let service = &services[name];
        assert!(service.is_mapping(), "the overlay does not touch {name}");

        // The service joins the namespace of a skiff container.
        let network_mode = service["network_mode"].as_str().unwrap_or_default();
        let sidecar_name = network_mode
            .strip_prefix("service:")
            .unwrap_or_else(|| panic!("{name} network_mode {network_mode:?}"));
        let sidecar = &services[sidecar_name];
        let image = compose_defaults(sidecar["image"].as_str().unwrap());
        assert!(image.starts_with("skiff"), "{sidecar_name} image {image}");
        for key in forbidden {
            let Some(Value::Tagged(tagged)) = service.get(key) else {
                panic!("{name} keeps Dify's {key}, which network_mode forbids: reset it");
            };
            assert_eq!(tagged.tag, "!reset", "{name} {key}");
        }

        // The skiff container carries the service's name on its networks.
        let networks = sidecar["networks"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{sidecar_name} has no networks"));
        for (network, settings) in networks {
            let aliases: Vec<&str> = settings["aliases"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{sidecar_name} on {network:?}: no aliases"))
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                aliases.contains(&name),
                "{sidecar_name} aliases {aliases:?}"
            );
        }

        // It mounts docker/skiff.toml where its command reads the config.
        let command: Vec<&str> = sidecar["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let config_index = command.iter().position(|a| *a == "--config").unwrap();
        let config_path = command[config_index + 1];
        let mount = sidecar["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|volume| compose_defaults(volume.as_str().unwrap()))
            .find(|volume| volume.split(':').nth(1) == Some(config_path))
            .unwrap_or_else(|| panic!("{sidecar_name} mounts nothing at {config_path}"));
        let source = mount.split(':').next().unwrap();
        assert_eq!(
            Path::new(source).file_name().unwrap(),
            "skiff.toml",
            "{sidecar_name} mounts {source}"
        );

        // The config passes skiff check with the sidecar's environment.
        let sidecar_env: BTreeMap<String, String> = environment(sidecar)
            .into_iter()
            .map(|(key, value)| (key, compose_defaults(&value)))
            .collect();
        skiff_check(&docker_dir().join("skiff.toml"), &sidecar_env);
        let ports = listen_ports(&config_text, &sidecar_env);

        let env: BTreeMap<String, String> = environment(service)
            .into_iter()
            .map(|(key, value)| (key, compose_defaults(&value)))
            .collect();
        assert_points_at_skiff(name, &env, uses_celery, ports);
        checked_sidecars.push(sidecar_name.to_string());
    }
    checked_sidecars.sort();
    checked_sidecars.dedup();
    assert_eq!(
        checked_sidecars.len(),
        DIFY_SERVICES.len(),
        "one skiff per service"
    );
}

#[test]
fn kubernetes_example_points_api_at_skiff() {
    let text = read("k8s-sidecar.yaml");
    let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|document| !document.is_null())
        .collect();
    let find = |kind: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let config_text = find("ConfigMap")["data"]["skiff.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let pod = &find("Deployment")["spec"]["template"]["spec"];

    let skiff = pod["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "skiff")
        .expect("a skiff init container");
    assert_eq!(
        skiff["restartPolicy"], "Always",
        "skiff runs as a native sidecar"
    );
    assert_eq!(skiff["securityContext"]["runAsNonRoot"], true);
    let container_env = |container: &Value| -> BTreeMap<String, String> {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|entry| {
                let value = match entry.get("value") {
                    Some(value) => scalar(value),
                    None => "secret-from-kubernetes".to_string(),
                };
                (scalar(&entry["name"]), value)
            })
            .collect()
    };
    let skiff_env = container_env(skiff);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("skiff.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    skiff_check(&config_path, &skiff_env);
    let ports = listen_ports(&config_text, &skiff_env);

    let api = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "api")
        .expect("an api container");
    assert_points_at_skiff("api", &container_env(api), true, ports);
}

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let text = read("Dockerfile");
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let (word, rest) = line.split_once(char::is_whitespace)?;
            Some((word.to_uppercase(), rest.trim().to_string()))
        })
        .collect();
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|(word, _)| word == "FROM")
        .map(|(_, rest)| rest)
        .collect();
    assert!(froms.len() >= 2, "one stage only: {froms:?}");
    let build_stage = froms[0]
        .split_whitespace()
        .skip_while(|word| !word.eq_ignore_ascii_case("AS"))
        .nth(1)
        .expect("the build stage is named");
    let last_from = instructions
        .iter()
        .rposition(|(word, _)| word == "FROM")
        .unwrap();
    let final_stage = &instructions[last_from..];
    assert!(
        final_stage
            .iter()
            .any(|(word, rest)| word == "COPY" && rest.contains(&format!("--from={build_stage}"))),
        "the final stage copies from {build_stage}"
    );
    let user = final_stage
        .iter()
        .rev()
        .find(|(word, _)| word == "USER")
        .map(|(_, rest)| rest.clone())
        .expect("the final stage sets USER");
    let name = user.split(':').next().unwrap();
    assert_ne!(name, "root", "USER {user}");
    assert_ne!(name, "0", "USER {user}");
    assert!(
        final_stage
            .iter()
            .any(|(word, rest)| word == "ENTRYPOINT" && rest.contains("skiff")),
        "the final stage runs skiff"
    );
}
