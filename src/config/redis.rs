//! `[redis]`: the Redis router's listener and upstream servers.

use serde::Deserialize;

/// How skiff finds the upstream Redis servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// `nodes` lists the primary, then its replicas.
    Standalone,
    /// `nodes` lists the sentinels; `master_name` names the group.
    Sentinel,
    /// `nodes` lists seed nodes of a Redis Cluster.
    Cluster,
}

/// Where reads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadFrom {
    Primary,
    PreferReplica,
    Replica,
    Any,
}

/// `[redis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Client listener address. Default `127.0.0.1:6379`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Upstream topology. Default `standalone`.
    #[serde(default = "default_mode")]
    pub mode: RedisMode,
    /// Upstream addresses, `host:port`; their meaning depends on `mode`.
    pub nodes: Vec<String>,
    /// Sentinel group name, required in sentinel mode.
    pub master_name: Option<String>,
    /// Read policy. Default `primary`.
    #[serde(default = "default_read_from")]
    pub read_from: ReadFrom,
    /// Upstream ACL user name.
    pub username: Option<String>,
    /// Upstream password.
    pub password: Option<String>,
    /// Password clients must AUTH with; unset means no client auth.
    pub client_password: Option<String>,
}

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("[redis] nodes must list at least one host:port".into());
        }
        if self.mode == RedisMode::Sentinel && self.master_name.is_none() {
            return Err("[redis] mode \"sentinel\" needs master_name".into());
        }
        Ok(())
    }
}

fn default_listen() -> String {
    "127.0.0.1:6379".into()
}
fn default_mode() -> RedisMode {
    RedisMode::Standalone
}
fn default_read_from() -> ReadFrom {
    ReadFrom::Primary
}
