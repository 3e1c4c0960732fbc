//! Session settings that follow a client from one server connection to the
//! next: startup parameters (application_name, TimeZone, DateStyle,
//! client_encoding, search_path, `options=-c ...`) and reported settings the
//! client changed with SET.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::protocol::{parse_options, StartupParams};

/// Startup parameters that are not session settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// Settings PostgreSQL reports with ParameterStatus when they change, with
/// the spelling it reports them under.
const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "standard_conforming_strings",
];

/// The reported spelling of a lowercase setting name, if it is reported.
pub fn reported_name(lowercase: &str) -> Option<&'static str> {
    REPORTED
        .iter()
        .copied()
        .find(|name| name.eq_ignore_ascii_case(lowercase))
}

/// Session settings keyed by lowercase name. Clients of a pool with equal
/// settings share one map (see `Pool::share_settings`), so checking that a
/// server connection has a client's settings is usually a pointer
/// comparison.
pub type Settings = Arc<BTreeMap<String, String>>;

/// Settings a client asked for at startup, keyed by lowercase name.
pub fn startup_settings(params: &StartupParams) -> BTreeMap<String, String> {
    let mut settings = BTreeMap::new();
    for (name, value) in &params.pairs {
        if NOT_SETTINGS.contains(&name.as_str()) {
            continue;
        }
        settings.insert(name.to_lowercase(), value.clone());
    }
    if let Some(options) = params.get("options") {
        for (name, value) in parse_options(options) {
            settings.insert(name, value);
        }
    }
    settings.retain(|name, _| is_valid_name(name));
    settings
}

/// Returns true when some of the settings are reported with
/// ParameterStatus, so a client that has them gets other values at login
/// than the server sent.
pub fn overrides_reported(settings: &BTreeMap<String, String>) -> bool {
    settings.keys().any(|name| reported_name(name).is_some())
}

/// ParameterStatus values a client sees at login: the server's, overridden
/// by the client's startup settings.
pub fn client_visible(
    server: &[(String, String)],
    settings: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut visible: Vec<(String, String)> = server.to_vec();
    for (name, value) in settings {
        let Some(reported) = reported_name(name) else {
            continue;
        };
        match visible.iter_mut().find(|(n, _)| n == reported) {
            Some(entry) => entry.1 = value.clone(),
            None => visible.push((reported.to_string(), value.clone())),
        }
    }
    visible
}

/// SQL that turns a server connection's applied settings into the client's
/// desired ones, or `None` when they already match. `reset_first` starts
/// with RESET ALL, for a connection another client changed with SET.
pub fn sync_sql(
    applied: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
    reset_first: bool,
) -> Option<String> {
    if !reset_first && applied == desired {
        return None;
    }
    let empty = BTreeMap::new();
    let applied = if reset_first { &empty } else { applied };
    let mut statements = Vec::new();
    if reset_first {
        statements.push("RESET ALL".to_string());
    }
    for (name, value) in desired {
        if applied.get(name) != Some(value) {
            statements.push(format!("SET {name} = {}", quote_literal(value)));
        }
    }
    for name in applied.keys() {
        if !desired.contains_key(name) {
            statements.push(format!("RESET {name}"));
        }
    }
    if statements.is_empty() {
        None
    } else {
        Some(statements.join("; "))
    }
}

/// A setting name skiff is willing to put into SQL.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fn quote_literal(value: &str) -> String {
    let escaped = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", escaped.replace('\\', "\\\\"))
    } else {
        format!("'{escaped}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> StartupParams {
        StartupParams {
            pairs: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn options_and_params_become_settings() {
        let params = startup(&[
            ("user", "dify"),
            ("application_name", "api"),
            ("options", "-c timezone=UTC -c search_path=app"),
            ("bad name;", "x"),
        ]);
        let settings = startup_settings(&params);
        assert_eq!(
            settings.get("application_name").map(String::as_str),
            Some("api")
        );
        assert_eq!(settings.get("timezone").map(String::as_str), Some("UTC"));
        assert_eq!(settings.get("search_path").map(String::as_str), Some("app"));
        assert!(!settings.contains_key("user"));
        assert_eq!(settings.len(), 3);
    }

    #[test]
    fn sync_sets_changes_and_resets_leftovers() {
        let applied = BTreeMap::from([
            ("timezone".to_string(), "UTC".to_string()),
            ("application_name".to_string(), "a".to_string()),
        ]);
        let desired = BTreeMap::from([("application_name".to_string(), "b'c".to_string())]);
        let sql = sync_sql(&applied, &desired, false).unwrap();
        assert_eq!(sql, "SET application_name = 'b''c'; RESET timezone");
        assert_eq!(sync_sql(&desired, &desired, false), None);
        let reset = sync_sql(&desired, &desired, true).unwrap();
        assert_eq!(reset, "RESET ALL; SET application_name = 'b''c'");
    }

    #[test]
    fn visible_params_use_reported_spelling() {
        let server = vec![("TimeZone".to_string(), "Asia/Shanghai".to_string())];
        let settings = startup_settings(&startup(&[("options", "-c timezone=UTC")]));
        assert!(overrides_reported(&settings));
        let visible = client_visible(&server, &settings);
        assert_eq!(visible, vec![("TimeZone".to_string(), "UTC".to_string())]);
        let unreported = startup_settings(&startup(&[("options", "-c work_mem=8MB")]));
        assert!(!overrides_reported(&unreported));
    }
}
