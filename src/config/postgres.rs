//! `[postgres]`: the PostgreSQL pooler's listener, pools and client auth.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// When a server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// When the client disconnects.
    Session,
    /// After each transaction (ReadyForQuery with status 'I').
    Transaction,
}

/// Client authentication method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// TLS to a PostgreSQL server, with libpq's `sslmode` names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never TLS: no SSLRequest is sent.
    Disable,
    /// TLS when the server supports it, plain otherwise; the certificate is
    /// not checked. A failed handshake or a login refused over TLS is
    /// retried once without TLS, as libpq does.
    Prefer,
    /// TLS or no connection. The certificate is not checked, unless a CA
    /// file is given: then it must chain to that CA, as in `verify-ca`.
    Require,
    /// TLS, and the certificate must chain to a trusted CA.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the configured `host`
    /// (a DNS name, or an IP address in its IP SANs).
    VerifyFull,
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// TLS from clients to skiff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientSslMode {
    /// skiff responds 'N' to SSLRequest, so clients stay plain.
    Disable,
    /// Clients may use TLS or not (same as `prefer`).
    Allow,
    /// Clients may use TLS or not (same as `allow`).
    Prefer,
    /// Clients must use TLS; a plain login is refused.
    Require,
}

/// `[postgres]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// Client listener address. Default `127.0.0.1:6432`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Pool mode for every database. Default `transaction`.
    #[serde(default = "default_pool_mode")]
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) pool. Default 20.
    #[serde(default = "default_pool_size")]
    pub default_pool_size: usize,
    /// Maximum client connections across all databases. Default 10000.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// Maximum time a client waits for a server connection before it gets
    /// an error. Default 120s.
    #[serde(default = "default_query_wait_timeout", with = "duration")]
    pub query_wait_timeout: Duration,
    /// Users allowed into the admin console (database `skiff` or `pgbouncer`).
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// A server connection is closed once it is this old, at its next return
    /// to the pool. Default 3600s, as in PgBouncer.
    #[serde(default = "default_server_lifetime", with = "duration")]
    pub server_lifetime: Duration,
    /// An idle server connection is closed after this long. Default 600s.
    #[serde(default = "default_server_idle_timeout", with = "duration")]
    pub server_idle_timeout: Duration,
    /// A server connection idle for longer than this is checked with an
    /// empty query before it is handed out. Default 30s.
    #[serde(default = "default_server_check_delay", with = "duration")]
    pub server_check_delay: Duration,
    /// Maximum time for a server to accept a connection and log in.
    /// Default 15s.
    #[serde(default = "default_server_connect_timeout", with = "duration")]
    pub server_connect_timeout: Duration,
    /// Query run when a session-mode client gives its server connection
    /// back. The default is DISCARD ALL without DEALLOCATE ALL, so that
    /// skiff's shared prepared statements survive.
    #[serde(default = "default_server_reset_query")]
    pub server_reset_query: String,
    /// Prepared statements kept on one server connection before the least
    /// recently used is closed. Default 1000; 0 turns off prepared statement
    /// tracking.
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: usize,
    /// In transaction mode, while every server connection is busy, write
    /// the request of the client that has waited longest behind a running
    /// one, so the server goes on to it without waiting for skiff. A
    /// request is a simple Query or a Bind, Execute and Sync of one
    /// prepared statement. Only one-statement SELECT, INSERT, UPDATE,
    /// DELETE, WITH, VALUES and TABLE queries that change no session state
    /// go either side. A queued request waits for the one before it even
    /// when another connection frees up first. Default true.
    #[serde(default = "default_true")]
    pub pipeline_queries: bool,
    /// Maximum time a SIGTERM waits for running transactions. Default 30s.
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// Largest message accepted from a client, in bytes. Default 1 GiB, the
    /// largest value PostgreSQL itself accepts.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// TLS to the servers: `disable`, `prefer`, `require`, `verify-ca` or
    /// `verify-full`, with libpq's meanings. Default `prefer`. A database's
    /// `sslmode` overrides it.
    #[serde(default = "default_server_sslmode")]
    pub server_tls_sslmode: SslMode,
    /// PEM file of the CA certificates that server certificates must chain
    /// to. Without it, `verify-ca` and `verify-full` trust the Mozilla root
    /// set built into skiff. A database's `sslrootcert` overrides it.
    /// Relative paths are relative to the config file.
    pub server_tls_ca_file: Option<String>,
    /// TLS from clients: `disable` (skiff responds 'N' to SSLRequest), `allow` or
    /// `prefer` (both: TLS when the client asks), `require` (plain logins
    /// are refused). Default `disable`.
    #[serde(default = "default_client_sslmode")]
    pub client_tls_sslmode: ClientSslMode,
    /// PEM certificate chain skiff presents to clients; needed unless
    /// `client_tls_sslmode` is `disable`.
    pub client_tls_cert_file: Option<String>,
    /// PEM private key of `client_tls_cert_file`.
    pub client_tls_key_file: Option<String>,
    /// Client authentication settings.
    #[serde(default)]
    pub auth: PgAuthConfig,
    /// The databases clients may connect to.
    #[serde(default)]
    pub databases: Vec<PgDatabase>,
}

/// `[postgres.auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgAuthConfig {
    /// `trust`, `md5` or `scram-sha-256`. Default `trust`.
    #[serde(rename = "type", default = "default_auth_type")]
    pub auth_type: AuthType,
    /// User name to password (plain text, an md5 hash or a SCRAM secret).
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// A PgBouncer-format user list: `"user" "password"` per line.
    pub auth_file: Option<String>,
}

impl Default for PgAuthConfig {
    fn default() -> Self {
        PgAuthConfig {
            auth_type: default_auth_type(),
            users: BTreeMap::new(),
            auth_file: None,
        }
    }
}

/// `[[postgres.databases]]`: one database clients can connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgDatabase {
    /// The database name clients connect to.
    pub name: String,
    /// Server host. Default `127.0.0.1`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Server port. Default 5432.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Server database name; defaults to `name`.
    pub dbname: Option<String>,
    /// Server login; defaults to the client's user.
    pub user: Option<String>,
    /// Server password; defaults to the client's password when skiff has
    /// it in plain text.
    pub password: Option<String>,
    /// Overrides `default_pool_size` for this database.
    pub pool_size: Option<usize>,
    /// Overrides `server_tls_sslmode` for this database.
    pub sslmode: Option<SslMode>,
    /// Overrides `server_tls_ca_file` for this database.
    pub sslrootcert: Option<String>,
}

impl PgDatabase {
    /// The database name sent to the server.
    pub fn server_dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }
}

/// The TLS settings that apply to one database's server connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsSettings {
    pub mode: SslMode,
    pub ca_file: Option<String>,
}

impl PgConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        super::validate_listen("[postgres] listen", &self.listen)?;
        if self.max_message_bytes < 1024 {
            return Err("[postgres] max_message_bytes must be at least 1024".into());
        }
        if self.databases.is_empty() {
            return Err("[postgres] needs at least one [[postgres.databases]] entry".into());
        }
        let mut names = std::collections::HashSet::new();
        for db in &self.databases {
            if !names.insert(db.name.as_str()) {
                return Err(format!(
                    "[[postgres.databases]] name {:?} appears twice",
                    db.name
                ));
            }
            if db.pool_size == Some(0) {
                return Err(format!(
                    "database {:?}: pool_size must be at least 1",
                    db.name
                ));
            }
        }
        if self.default_pool_size == 0 {
            return Err("[postgres] default_pool_size must be at least 1".into());
        }
        if self.max_client_conn == 0 {
            return Err("[postgres] max_client_conn must be at least 1".into());
        }
        if self.client_tls_sslmode != ClientSslMode::Disable
            && (self.client_tls_cert_file.is_none() || self.client_tls_key_file.is_none())
        {
            return Err(
                "[postgres] client_tls_sslmode other than \"disable\" needs client_tls_cert_file \
                 and client_tls_key_file"
                    .into(),
            );
        }
        if self.client_tls_cert_file.is_some() != self.client_tls_key_file.is_some() {
            return Err(
                "[postgres] client_tls_cert_file and client_tls_key_file go together".into(),
            );
        }
        if self.auth.auth_type != AuthType::Trust
            && self.auth.users.is_empty()
            && self.auth.auth_file.is_none()
        {
            return Err(format!(
                "[postgres.auth] type {:?} needs users or auth_file",
                self.auth.auth_type
            ));
        }
        Ok(())
    }

    /// TLS mode and CA file of a database's server connections, its own
    /// settings taking precedence.
    pub fn server_tls(&self, db: &PgDatabase) -> ServerTlsSettings {
        ServerTlsSettings {
            mode: db.sslmode.unwrap_or(self.server_tls_sslmode),
            ca_file: db
                .sslrootcert
                .clone()
                .or_else(|| self.server_tls_ca_file.clone()),
        }
    }

    /// Pool size of a database, falling back to `default_pool_size`.
    pub fn pool_size(&self, db: &PgDatabase) -> usize {
        db.pool_size.unwrap_or(self.default_pool_size)
    }
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_pool_mode() -> PoolMode {
    PoolMode::Transaction
}
fn default_pool_size() -> usize {
    20
}
fn default_max_client_conn() -> usize {
    10000
}
fn default_query_wait_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_check_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_server_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_server_reset_query() -> String {
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
        .into()
}
fn default_true() -> bool {
    true
}
fn default_max_prepared_statements() -> usize {
    1000
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_bytes() -> usize {
    1 << 30
}
fn default_server_sslmode() -> SslMode {
    SslMode::Prefer
}
fn default_client_sslmode() -> ClientSslMode {
    ClientSslMode::Disable
}
fn default_auth_type() -> AuthType {
    AuthType::Trust
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
