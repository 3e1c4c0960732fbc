//! Typed TOML configuration: loading, `${ENV}` expansion and validation.
//!
//! Every section but `[admin]` is optional; skiff runs the jobs that are
//! configured. Unknown keys are rejected with their line and column.

pub mod duration;
mod logship;
mod postgres;
mod redis;
mod redis_routes;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use logship::{
    CaptureConfig, FileSinkConfig, IngestConfig, LogshipConfig, OnFull, SignatureVersion, SlsConfig,
};
pub use postgres::{
    AuthType, ClientSslMode, PgAuthConfig, PgConfig, PgDatabase, PoolMode, ServerTlsSettings,
    SslMode,
};
pub use redis::{CacheRule, ReadFrom, RedisConfig, RedisMode, RedisRoute};
pub use redis_routes::MAIN_ROUTE;

/// Failure to load or validate a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP listener for /metrics, /healthz, /readyz and /status.
    #[serde(default)]
    pub admin: AdminConfig,
    /// PostgreSQL pooler; absent means no PostgreSQL listener.
    pub postgres: Option<PgConfig>,
    /// Redis router; absent means no Redis listener.
    pub redis: Option<RedisConfig>,
    /// Log shipping; absent means no log shipping.
    pub logship: Option<LogshipConfig>,
    /// Directory the config file was read from; relative paths in the file
    /// (such as `auth_file`) are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[admin]`: the HTTP endpoint for metrics and health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTP listener. Default `127.0.0.1:9930`.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9930".to_string()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

impl Config {
    /// Reads, expands and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|err| match err {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    /// Parses and validates config text; relative paths stay relative to the
    /// current directory.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let expanded = expand_env(text).map_err(ConfigError::Invalid)?;
        let mut config: Config = toml::from_str(&expanded).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: describe_toml_error(&expanded, &err),
        })?;
        config.base_dir = PathBuf::from(".");
        if let Some(redis) = &mut config.redis {
            redis.normalize_nodes().map_err(ConfigError::Invalid)?;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_listen("[admin] listen", &self.admin.listen).map_err(ConfigError::Invalid)?;
        if self.postgres.is_none() && self.redis.is_none() && self.logship.is_none() {
            return Err(ConfigError::Invalid(
                "nothing to run: configure at least one of [postgres], [redis] or [logship]"
                    .to_string(),
            ));
        }
        if let Some(pg) = &self.postgres {
            pg.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(redis) = &self.redis {
            redis.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(logship) = &self.logship {
            logship.validate().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// Resolves a path from the config file against the file's directory.
    pub fn resolve_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// Checks that a listen address is `ip:port`, so a typo fails `skiff check`
/// instead of the start.
pub(crate) fn validate_listen(what: &str, addr: &str) -> Result<(), String> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| {
            format!("{what} {addr:?} is not an ip:port address such as \"127.0.0.1:6432\"")
        })
}

/// Formats a TOML error with its 1-based line and column.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().to_string();
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Replaces each `${NAME}` with the environment variable NAME.
///
/// The value is escaped for a TOML basic string, because references are
/// written inside quoted strings. `$${` stands for a literal `${`. A missing
/// variable is an error rather than an empty string, so a typo cannot turn
/// into an empty password. Comment lines (first non-blank character `#`)
/// are left as they are, so a commented-out setting may name a variable
/// that is not set.
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            expand_env_line(line, &mut out)?;
        }
    }
    Ok(out)
}

fn expand_env_line(line: &str, out: &mut String) -> Result<(), String> {
    let mut rest = line;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${ in config file".to_string())?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| {
            format!("environment variable {name} is not set (referenced as ${{{name}}})")
        })?;
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "[postgres]\nlisten = \"127.0.0.1:6432\"\npool_sise = 3\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("pool_sise"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn env_reference_is_expanded_and_escaped() {
        std::env::set_var("SKIFF_TEST_SECRET", "pa\"ss");
        let expanded = expand_env("password = \"${SKIFF_TEST_SECRET}\"").unwrap();
        assert_eq!(expanded, "password = \"pa\\\"ss\"");
        let value: toml::Value = toml::from_str(&expanded).unwrap();
        assert_eq!(value["password"].as_str(), Some("pa\"ss"));
    }

    #[test]
    fn missing_env_reference_is_an_error() {
        let err = expand_env("x = \"${SKIFF_TEST_NOT_SET_ANYWHERE}\"").unwrap_err();
        assert!(err.contains("SKIFF_TEST_NOT_SET_ANYWHERE"), "{err}");
    }

    #[test]
    fn escaped_dollar_stays_literal() {
        assert_eq!(expand_env("a = \"$${X}\"").unwrap(), "a = \"${X}\"");
    }

    #[test]
    fn env_reference_in_comment_line_is_kept() {
        let text = "# password = \"${SKIFF_TEST_NOT_SET_ANYWHERE}\"\n  #x = ${Y}\na = 1\n";
        assert_eq!(expand_env(text).unwrap(), text);
        let err = expand_env("a = 1 # ${SKIFF_TEST_NOT_SET_ANYWHERE}").unwrap_err();
        assert!(err.contains("SKIFF_TEST_NOT_SET_ANYWHERE"), "{err}");
    }

    #[test]
    fn invalid_listen_is_rejected() {
        let text = "[postgres]\nlisten = \"nonsense\"\n[[postgres.databases]]\nname = \"d\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn empty_config_is_rejected() {
        let err = Config::parse("").unwrap_err().to_string();
        assert!(err.contains("nothing to run"), "{err}");
    }
}
