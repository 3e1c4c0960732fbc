//! `skiff plan`: pool sizes that keep the server connections of every
//! sidecar, plus a reserve, within each PostgreSQL server's
//! `max_connections`.
//!
//! Each sidecar opens up to `pool_size` server connections per (database,
//! client user). For each server (host and port) the plan takes
//! `max_connections`, subtracts the reserve, divides the rest evenly among
//! the sidecars, and splits each sidecar's share among the server's
//! databases in proportion to their configured pool sizes, at least 1 each.
//! So `instances × users × Σ pool_size + reserve <= max_connections` holds
//! for every server.
//!
//! The default reserve is the server's `superuser_reserved_connections`
//! and `reserved_connections` (PostgreSQL 16 and later), which
//! application roles cannot use anyway, plus 10% of `max_connections`
//! (at least 5) for migrations, maintenance, monitoring and other clients.
//! Without `--query` those two settings are taken as PostgreSQL's defaults,
//! 3 and 0.

use std::fmt::Write;

use crate::config::{Config, PgConfig, PgDatabase};

/// PostgreSQL's default `superuser_reserved_connections`.
const DEFAULT_SUPERUSER_RESERVED: u32 = 3;

/// Smallest reserve for other clients that the default rule keeps.
const MIN_OTHER_RESERVE: u32 = 5;

/// `skiff plan` options.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Number of skiff sidecars (application instances) that share the
    /// PostgreSQL servers.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub instances: u32,
    /// max_connections of the servers (each server, when the config
    /// names several).
    #[arg(long, required_unless_present = "query", conflicts_with = "query")]
    pub max_connections: Option<u32>,
    /// Read max_connections and the reserved connection settings from each
    /// server, logging in with the configured credentials.
    #[arg(long)]
    pub query: bool,
    /// Server connections to leave free on each server, superuser slots
    /// included. Default: superuser_reserved_connections plus
    /// reserved_connections, plus 10% of max_connections (at least 5).
    #[arg(long)]
    pub reserve: Option<u32>,
    /// Number of client user names that connect to each database, since
    /// skiff keeps one pool per (database, user).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub users: u32,
    /// Role to log in as with --query. Default: the database's `user`, or
    /// the only user in [postgres.auth] users.
    #[arg(long)]
    pub user: Option<String>,
}

/// Connection limits of one PostgreSQL server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_connections: u32,
    /// `superuser_reserved_connections` plus `reserved_connections`.
    pub reserved_for_roles: u32,
    /// Whether the numbers were read from the server.
    pub queried: bool,
}

/// The reserve and the resulting pool sizes for one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPlan {
    /// `host:port`.
    pub server: String,
    pub limits: ServerLimits,
    pub reserve: u32,
    /// Rule that chose the reserve, for the printed plan.
    pub reserve_rule: String,
    /// Server connections one sidecar may open to this server.
    pub per_sidecar: u32,
    /// Recommended pool size per database, in config order.
    pub pool_sizes: Vec<u32>,
}

/// Returns the default reserve: the server's reserved connection slots
/// plus 10% of `max_connections`, at least 5.
pub fn default_reserve(limits: &ServerLimits) -> u32 {
    let other = limits.max_connections.div_ceil(10).max(MIN_OTHER_RESERVE);
    limits.reserved_for_roles + other
}

/// Plans one server whose databases have the configured pool sizes
/// `configured`.
pub fn plan_server(
    server: &str,
    configured: &[u32],
    limits: ServerLimits,
    instances: u32,
    users: u32,
    reserve: Option<u32>,
) -> Result<ServerPlan, String> {
    let (reserve, reserve_rule) = match reserve {
        Some(reserve) => (reserve, "--reserve".to_string()),
        None => (
            default_reserve(&limits),
            format!(
                "reserved role slots {} + max(5, 10% of max_connections)",
                limits.reserved_for_roles
            ),
        ),
    };
    if reserve >= limits.max_connections {
        return Err(format!(
            "server {server}: the reserve of {reserve} leaves nothing of max_connections {}; \
             lower --reserve or raise max_connections",
            limits.max_connections
        ));
    }
    let budget = limits.max_connections - reserve;
    let per_sidecar = budget / instances;
    let per_user = per_sidecar / users;
    let needed = instances as u64 * users as u64 * configured.len() as u64 + reserve as u64;
    if (per_user as usize) < configured.len() {
        return Err(format!(
            "server {server}: {instances} sidecars × {users} users × {} databases need \
             {needed} connections with pool_size 1 each and a reserve of {reserve}, but \
             max_connections is {}; lower --instances or --reserve, or raise max_connections",
            configured.len(),
            limits.max_connections
        ));
    }
    Ok(ServerPlan {
        server: server.to_string(),
        limits,
        reserve,
        reserve_rule,
        per_sidecar,
        pool_sizes: split_proportionally(per_user, configured),
    })
}

/// Splits `total` into one part per weight, each at least 1, in proportion
/// to the weights by the largest-remainder method. The parts add up to
/// `total`, which must be at least the number of weights.
fn split_proportionally(total: u32, weights: &[u32]) -> Vec<u32> {
    let count = weights.len() as u64;
    let spare = total as u64 - count;
    let weight_sum: u64 = weights.iter().map(|&w| w.max(1) as u64).sum();
    let mut parts: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(weights.len());
    for (index, &weight) in weights.iter().enumerate() {
        let scaled = spare * weight.max(1) as u64;
        parts.push(1 + scaled / weight_sum);
        remainders.push((scaled % weight_sum, index));
    }
    let handed_out: u64 = parts.iter().sum();
    // Largest remainder first; among equal remainders, config order.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, index) in remainders.iter().take((total as u64 - handed_out) as usize) {
        parts[index] += 1;
    }
    parts.into_iter().map(|part| part as u32).collect()
}

/// The databases of one server, in config order.
struct ServerGroup<'a> {
    host: &'a str,
    port: u16,
    databases: Vec<&'a PgDatabase>,
}

fn group_by_server(pg: &PgConfig) -> Vec<ServerGroup<'_>> {
    let mut groups: Vec<ServerGroup<'_>> = Vec::new();
    for db in &pg.databases {
        match groups
            .iter_mut()
            .find(|group| group.host == db.host && group.port == db.port)
        {
            Some(group) => group.databases.push(db),
            None => groups.push(ServerGroup {
                host: &db.host,
                port: db.port,
                databases: vec![db],
            }),
        }
    }
    groups
}

/// Runs `skiff plan` and returns the text to print: comments with the
/// arithmetic and `[[postgres.databases]]` entries to paste.
pub fn run(config: &Config, args: &PlanArgs) -> Result<String, String> {
    let pg = config
        .postgres
        .as_ref()
        .ok_or("the config has no [postgres] section, so there is nothing to plan")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# skiff plan: {} sidecars, client users per database: {}.",
        args.instances, args.users
    );
    let _ = writeln!(
        out,
        "# Each sidecar opens up to pool_size server connections per (database, user)."
    );
    for group in group_by_server(pg) {
        let server = format!("{}:{}", group.host, group.port);
        let limits = match args.max_connections {
            Some(max_connections) => ServerLimits {
                max_connections,
                reserved_for_roles: DEFAULT_SUPERUSER_RESERVED,
                queried: false,
            },
            None => query_limits(config, &group, args.user.as_deref())?,
        };
        let configured: Vec<u32> = group
            .databases
            .iter()
            .map(|db| pg.pool_size(db) as u32)
            .collect();
        let plan = plan_server(
            &server,
            &configured,
            limits,
            args.instances,
            args.users,
            args.reserve,
        )?;
        write_plan(&mut out, &plan, &group, &configured, args);
    }
    Ok(out)
}

fn write_plan(
    out: &mut String,
    plan: &ServerPlan,
    group: &ServerGroup<'_>,
    configured: &[u32],
    args: &PlanArgs,
) {
    let limits = &plan.limits;
    let source = if limits.queried {
        "read from the server"
    } else {
        "from --max-connections"
    };
    let per_sidecar = |sizes: &[u32]| -> u64 {
        let pools: u64 = sizes.iter().map(|&size| size as u64).sum();
        args.users as u64 * pools
    };
    let total = |sizes: &[u32]| args.instances as u64 * per_sidecar(sizes) + plan.reserve as u64;
    let max = limits.max_connections as u64;
    let _ = writeln!(out, "#");
    let _ = writeln!(
        out,
        "# Server {}: max_connections {max} ({source}).",
        plan.server
    );
    let _ = writeln!(
        out,
        "#   reserve {} ({}), so {} connections per sidecar.",
        plan.reserve, plan.reserve_rule, plan.per_sidecar
    );
    let _ = writeln!(
        out,
        "#   planned:    {} sidecars × {} + reserve {} = {} <= {max}",
        args.instances,
        per_sidecar(&plan.pool_sizes),
        plan.reserve,
        total(&plan.pool_sizes)
    );
    let current = total(configured);
    let verdict = if current <= max {
        format!("<= {max}")
    } else {
        format!("> {max}, over by {}", current - max)
    };
    let _ = writeln!(
        out,
        "#   configured: {} sidecars × {} + reserve {} = {current} {verdict}",
        args.instances,
        per_sidecar(configured),
        plan.reserve
    );
    write_entries(out, plan, group, configured);
}

/// Writes the server's `[[postgres.databases]]` entries with the planned
/// pool sizes; passwords are left out.
fn write_entries(out: &mut String, plan: &ServerPlan, group: &ServerGroup<'_>, configured: &[u32]) {
    for (index, db) in group.databases.iter().enumerate() {
        let _ = writeln!(out, "\n[[postgres.databases]]");
        let _ = writeln!(out, "name = {}", toml_string(&db.name));
        let _ = writeln!(out, "host = {}", toml_string(&db.host));
        let _ = writeln!(out, "port = {}", db.port);
        if let Some(dbname) = &db.dbname {
            let _ = writeln!(out, "dbname = {}", toml_string(dbname));
        }
        if let Some(user) = &db.user {
            let _ = writeln!(out, "user = {}", toml_string(user));
        }
        if db.password.is_some() {
            let _ = writeln!(out, "# password = ... (keep the configured value)");
        }
        let _ = writeln!(
            out,
            "pool_size = {}  # configured {}",
            plan.pool_sizes[index], configured[index]
        );
    }
}

/// Quotes `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04X}", c as u32);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Reads the connection limits of a server over a login to its first
/// database.
fn query_limits(
    config: &Config,
    group: &ServerGroup<'_>,
    user: Option<&str>,
) -> Result<ServerLimits, String> {
    let pg = config.postgres.as_ref().expect("checked by the caller");
    let db = group.databases[0];
    let user = match (user, &db.user, pg.auth.users.len()) {
        (Some(user), _, _) => user.to_string(),
        (None, Some(user), _) => user.clone(),
        (None, None, 1) => pg.auth.users.keys().next().cloned().unwrap_or_default(),
        _ => {
            return Err(format!(
                "database {:?} has no `user`: pass --user to name the role to log in as",
                db.name
            ))
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))?;
    let settings = runtime
        .block_on(crate::pg::plan::server_settings(config, db, &user))
        .map_err(|err| format!("server {}:{}: {err}", group.host, group.port))?;
    Ok(ServerLimits {
        max_connections: settings.max_connections,
        reserved_for_roles: settings.superuser_reserved_connections + settings.reserved_connections,
        queried: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: u32) -> ServerLimits {
        ServerLimits {
            max_connections,
            reserved_for_roles: 3,
            queried: false,
        }
    }

    #[test]
    fn default_reserve_is_reserved_slots_plus_ten_percent() {
        assert_eq!(default_reserve(&limits(100)), 3 + 10);
        assert_eq!(default_reserve(&limits(201)), 3 + 21);
        assert_eq!(default_reserve(&limits(20)), 3 + 5);
    }

    #[test]
    fn split_keeps_total_and_proportions() {
        assert_eq!(split_proportionally(10, &[1, 1]), [5, 5]);
        assert_eq!(split_proportionally(30, &[20, 10]), [20, 10]);
        assert_eq!(split_proportionally(7, &[5, 5, 5]), [3, 2, 2]);
        assert_eq!(split_proportionally(3, &[1000, 1, 1]), [1, 1, 1]);
        assert_eq!(split_proportionally(100, &[97, 1, 1, 1]), [94, 2, 2, 2]);
    }

    #[test]
    fn split_parts_add_up_and_stay_positive() {
        for total in 3..200 {
            for weights in [[1, 2, 3], [50, 1, 1], [7, 7, 7]] {
                let parts = split_proportionally(total, &weights);
                assert_eq!(parts.iter().sum::<u32>(), total, "{total} {weights:?}");
                assert!(parts.iter().all(|&p| p >= 1), "{total} {weights:?}");
            }
        }
    }

    #[test]
    fn plan_stays_within_max_connections() {
        let plan = plan_server("h:1", &[30, 10], limits(200), 4, 1, None).unwrap();
        assert_eq!(plan.reserve, 23);
        assert_eq!(plan.per_sidecar, 44);
        assert_eq!(plan.pool_sizes, [33, 11]);
        let used: u32 = plan.pool_sizes.iter().sum::<u32>() * 4 + plan.reserve;
        assert!(used <= 200);
    }

    #[test]
    fn impossible_plan_is_an_error() {
        let err = plan_server("h:1", &[10, 10], limits(50), 30, 1, None).unwrap_err();
        assert!(err.contains("lower --instances"), "{err}");
        let err = plan_server("h:1", &[10], limits(50), 1, 1, Some(50)).unwrap_err();
        assert!(err.contains("--reserve"), "{err}");
    }
}
