//! `[[redis.routes]]`: validation, and the `[redis]` settings each route's
//! router is built from.

use std::collections::{HashMap, HashSet};

use super::redis::{validate_upstream, RedisConfig, RedisMode, RedisRoute, UpstreamFields};

/// The name `[redis]` itself has in metrics, logs and `SHOW REDIS_NODES`.
pub const MAIN_ROUTE: &str = "main";

impl RedisConfig {
    /// Returns the settings of a router for `route`: its upstream settings,
    /// and this section's listener, client, pool and timeout settings. The
    /// near cache and the routes are left out, because a route has neither.
    pub fn for_route(&self, route: &RedisRoute) -> RedisConfig {
        let mut config = self.clone();
        config.mode = route.mode;
        config.nodes = route.nodes.clone();
        config.master_name = route.master_name.clone();
        config.read_from = route.read_from;
        config.username = route.username.clone();
        config.password = route.password.clone();
        config.sentinel_username = route.sentinel_username.clone();
        config.sentinel_password = route.sentinel_password.clone();
        config.tls = route.tls;
        config.tls_ca_file = route.tls_ca_file.clone();
        config.tls_server_name = route.tls_server_name.clone();
        config.cache = Vec::new();
        config.routes = Vec::new();
        config
    }
}

/// Checks every route, and the routes against each other and against
/// `[redis]`.
pub(super) fn validate_routes(config: &RedisConfig) -> Result<(), String> {
    let mut names: HashSet<&str> = HashSet::new();
    let mut databases: HashMap<u32, &str> = HashMap::new();
    let mut prefixes: Vec<(&str, &str)> = Vec::new();
    for route in &config.routes {
        validate_name(&route.name)?;
        if !names.insert(route.name.as_str()) {
            return Err(format!(
                "[[redis.routes]] name {:?} is used by two routes",
                route.name
            ));
        }
        let section = format!("[[redis.routes]] {:?}", route.name);
        validate_route(&section, route)?;
        if let Some(database) = route.database {
            if let Some(other) = databases.insert(database, &route.name) {
                return Err(format!(
                    "{section}: database {database} is already routed to {other:?}; \
                     each database can have one route"
                ));
            }
        }
        for prefix in &route.prefixes {
            for &(other_route, other) in &prefixes {
                if prefix.starts_with(other) || other.starts_with(prefix.as_str()) {
                    return Err(format!(
                        "{section}: prefix {prefix:?} overlaps prefix {other:?} of route \
                         {other_route:?}, so some keys would match both; \
                         make the prefixes disjoint"
                    ));
                }
            }
            prefixes.push((&route.name, prefix));
        }
    }
    validate_cache_against_routes(config, &prefixes)
}

fn validate_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || !valid_chars {
        return Err(format!(
            "[[redis.routes]] name {name:?} is invalid: use letters, digits, '-' and '_'"
        ));
    }
    if name == MAIN_ROUTE {
        return Err(format!(
            "[[redis.routes]] name {MAIN_ROUTE:?} is reserved for [redis] itself"
        ));
    }
    Ok(())
}

fn validate_route(section: &str, route: &RedisRoute) -> Result<(), String> {
    if route.database.is_none() && route.prefixes.is_empty() {
        return Err(format!(
            "{section} needs database, prefixes or both, to say which commands it serves"
        ));
    }
    match route.database {
        Some(0) => {
            return Err(format!(
                "{section}: database 0 is served by [redis]; route another database, \
                 or use prefixes"
            ))
        }
        Some(database) if database > u32::from(u16::MAX) => {
            return Err(format!(
                "{section}: database {database} is out of range (at most {})",
                u16::MAX
            ))
        }
        _ => {}
    }
    let mut seen = HashSet::new();
    for prefix in &route.prefixes {
        if prefix.is_empty() {
            return Err(format!(
                "{section}: an empty prefix would match every key; to send everything \
                 to this upstream, configure it in [redis]"
            ));
        }
        if !seen.insert(prefix.as_str()) {
            return Err(format!("{section}: prefix {prefix:?} is listed twice"));
        }
    }
    if route.mode == RedisMode::Cluster && route.upstream_database != 0 {
        return Err(format!(
            "{section}: upstream_database = {} is impossible in cluster mode, where \
             Redis has only database 0",
            route.upstream_database
        ));
    }
    if route.upstream_database > u32::from(u16::MAX) {
        return Err(format!(
            "{section}: upstream_database {} is out of range (at most {})",
            route.upstream_database,
            u16::MAX
        ));
    }
    validate_upstream(
        section,
        &UpstreamFields {
            mode: route.mode,
            nodes: &route.nodes,
            master_name: route.master_name.as_deref(),
            tls: route.tls,
            tls_ca_file: route.tls_ca_file.as_deref(),
            tls_server_name: route.tls_server_name.as_deref(),
        },
    )
}

/// Rejects a `[[redis.cache]]` prefix that only route keys can match: the
/// near cache serves `[redis]` alone, so that rule could never apply.
fn validate_cache_against_routes(
    config: &RedisConfig,
    route_prefixes: &[(&str, &str)],
) -> Result<(), String> {
    for rule in &config.cache {
        for &(route, prefix) in route_prefixes {
            if rule.prefix.starts_with(prefix) {
                return Err(format!(
                    "[[redis.cache]] prefix {:?} is inside prefix {prefix:?} of route \
                     {route:?}, and routed keys are not cached; remove the rule",
                    rule.prefix
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const MAIN: &str = "[redis]\nmode = \"cluster\"\nnodes = [\"127.0.0.1:7000\"]\n";

    fn parse_error(routes: &str) -> String {
        let text = format!("{MAIN}{routes}");
        Config::parse(&text).unwrap_err().to_string()
    }

    #[test]
    fn celery_route_parses_with_defaults() {
        let text = format!(
            "{MAIN}[[redis.routes]]\nname = \"celery\"\ndatabase = 1\n\
             prefixes = [\"celery\", \"_kombu.\"]\nnodes = [\"rediss://10.0.0.9:6380\"]\n\
             password = \"route-secret\"\n"
        );
        let redis = Config::parse(&text).unwrap().redis.unwrap();
        let route = &redis.routes[0];
        assert_eq!(route.name, "celery");
        assert_eq!(route.database, Some(1));
        assert_eq!(route.upstream_database, 0);
        assert_eq!(route.mode, crate::config::RedisMode::Standalone);
        assert_eq!(route.nodes, ["10.0.0.9:6380"]);
        assert!(route.tls);
        let printed = format!("{redis:?}");
        assert!(!printed.contains("route-secret"), "{printed}");

        let built = redis.for_route(route);
        assert_eq!(built.nodes, ["10.0.0.9:6380"]);
        assert!(built.routes.is_empty());
        assert!(built.cache.is_empty());
    }

    #[test]
    fn route_without_database_or_prefixes_is_rejected() {
        let err = parse_error("[[redis.routes]]\nname = \"r\"\nnodes = [\"a:1\"]\n");
        assert!(err.contains("needs database, prefixes or both"), "{err}");
    }

    #[test]
    fn overlapping_prefixes_are_rejected() {
        let err = parse_error(
            "[[redis.routes]]\nname = \"a\"\nprefixes = [\"celery\"]\nnodes = [\"a:1\"]\n\
             [[redis.routes]]\nname = \"b\"\nprefixes = [\"celery-task\"]\nnodes = [\"b:1\"]\n",
        );
        assert!(
            err.contains("prefix \"celery-task\" overlaps prefix \"celery\" of route \"a\""),
            "{err}"
        );
    }

    #[test]
    fn duplicate_database_is_rejected() {
        let err = parse_error(
            "[[redis.routes]]\nname = \"a\"\ndatabase = 1\nnodes = [\"a:1\"]\n\
             [[redis.routes]]\nname = \"b\"\ndatabase = 1\nnodes = [\"b:1\"]\n",
        );
        assert!(
            err.contains("database 1 is already routed to \"a\""),
            "{err}"
        );
    }

    #[test]
    fn cluster_route_with_upstream_database_is_rejected() {
        let err = parse_error(
            "[[redis.routes]]\nname = \"a\"\ndatabase = 1\nmode = \"cluster\"\n\
             nodes = [\"a:1\"]\nupstream_database = 1\n",
        );
        assert!(err.contains("impossible in cluster mode"), "{err}");
    }

    #[test]
    fn invalid_names_and_databases_are_rejected() {
        let cases = [
            ("name = \"main\"\ndatabase = 1", "reserved for [redis]"),
            ("name = \"a b\"\ndatabase = 1", "name \"a b\" is invalid"),
            (
                "name = \"a\"\ndatabase = 0",
                "database 0 is served by [redis]",
            ),
            (
                "name = \"a\"\ndatabase = 70000",
                "database 70000 is out of range",
            ),
            ("name = \"a\"\nprefixes = [\"\"]", "empty prefix"),
            ("name = \"a\"\nprefixes = [\"x\", \"x\"]", "listed twice"),
        ];
        for (fields, expected) in cases {
            let err = parse_error(&format!("[[redis.routes]]\n{fields}\nnodes = [\"a:1\"]\n"));
            assert!(err.contains(expected), "{fields}: {err}");
        }
    }

    #[test]
    fn route_upstream_settings_are_checked() {
        let err = parse_error(
            "[[redis.routes]]\nname = \"s\"\ndatabase = 2\nmode = \"sentinel\"\n\
             nodes = [\"a:1\"]\n",
        );
        assert!(
            err.contains("[[redis.routes]] \"s\" mode \"sentinel\" needs master_name"),
            "{err}"
        );
        let err = parse_error("[[redis.routes]]\nname = \"s\"\ndatabase = 2\nnodes = [\"a\"]\n");
        assert!(err.contains("invalid address \"a\""), "{err}");
        let err = parse_error("[[redis.routes]]\nname = \"s\"\ndatabase = 2\nnodes = []\n");
        assert!(err.contains("nodes must list at least one"), "{err}");
    }

    #[test]
    fn duplicate_route_name_is_rejected() {
        let err = parse_error(
            "[[redis.routes]]\nname = \"a\"\ndatabase = 1\nnodes = [\"a:1\"]\n\
             [[redis.routes]]\nname = \"a\"\ndatabase = 2\nnodes = [\"b:1\"]\n",
        );
        assert!(err.contains("name \"a\" is used by two routes"), "{err}");
    }

    #[test]
    fn cache_rule_inside_route_prefix_is_rejected() {
        let text = "[redis]\nnodes = [\"127.0.0.1:7000\"]\n\
                    [[redis.cache]]\nprefix = \"celery-meta\"\n\
                    [[redis.routes]]\nname = \"c\"\nprefixes = [\"celery\"]\nnodes = [\"a:1\"]\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("routed keys are not cached"), "{err}");
    }
}
