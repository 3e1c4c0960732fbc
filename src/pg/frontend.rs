//! Client login: the startup packet, SSL/GSS negotiation, cancel requests,
//! authentication and the greeting, before the session relay takes over.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::auth::{self, ScramSecret, ScramServer, Secret};
use super::params;
use super::pool::Pool;
use super::protocol::{
    self, frontend, parse_startup, MessageReader, ProtocolError, Severity, StartupPacket,
    StartupParams,
};
use super::session::Session;
use super::Pooler;
use crate::config::AuthType;

/// Largest message accepted before login completes; PostgreSQL caps
/// password packets at 65535 bytes as well.
const MAX_LOGIN_MESSAGE: usize = 65535;

/// Maximum time a client may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Reason a login ended without a session.
enum LoginEnd {
    /// The connection carried a cancel request, or closed early.
    Quiet,
    /// The client gets this FATAL error, then the connection closes.
    Fatal {
        code: &'static str,
        message: String,
        kind: &'static str,
    },
}

fn fatal(code: &'static str, message: String, kind: &'static str) -> LoginEnd {
    LoginEnd::Fatal {
        code,
        message,
        kind,
    }
}

impl From<ProtocolError> for LoginEnd {
    fn from(_: ProtocolError) -> Self {
        LoginEnd::Quiet
    }
}

impl From<std::io::Error> for LoginEnd {
    fn from(_: std::io::Error) -> Self {
        LoginEnd::Quiet
    }
}

/// Counts a connected client for `max_client_conn` and the client gauge.
struct ClientSlot(Arc<Pooler>);

impl ClientSlot {
    fn new(pooler: Arc<Pooler>) -> (ClientSlot, usize) {
        let count = pooler.clients.fetch_add(1, Ordering::Relaxed) + 1;
        gauge!("skiff_pg_client_connections").set(count as f64);
        (ClientSlot(pooler), count)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let count = self.0.clients.fetch_sub(1, Ordering::Relaxed) - 1;
        gauge!("skiff_pg_client_connections").set(count as f64);
    }
}

/// Outcome of a successful login.
enum Login {
    Session(LoggedIn),
    Admin,
}

/// A logged-in client, ready for the session relay.
pub struct LoggedIn {
    pub user: String,
    pub database: String,
    pub params: StartupParams,
    pub pool: Arc<Pool>,
}

/// Serves one client connection from accept to close.
pub async fn handle_client(
    pooler: Arc<Pooler>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let client_id = pooler.next_client_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("client", id = client_id, peer = %peer);
    let serve = async move {
        let (slot, count) = ClientSlot::new(pooler.clone());
        let (read, mut writer) = stream.into_split();
        let mut reader = MessageReader::new(read, MAX_LOGIN_MESSAGE);
        let login = tokio::time::timeout(
            LOGIN_TIMEOUT,
            login(&pooler, &mut reader, &mut writer, count),
        )
        .await;
        let logged_in = match login {
            Ok(Ok(Login::Session(logged_in))) => logged_in,
            Ok(Ok(Login::Admin)) => {
                reader.set_max_message_bytes(super::admin::MAX_ADMIN_MESSAGE);
                let _ = super::admin::serve(&pooler, reader, writer, &shutdown).await;
                return;
            }
            Ok(Err(LoginEnd::Quiet)) => return,
            Ok(Err(LoginEnd::Fatal {
                code,
                message,
                kind,
            })) => {
                counter!("skiff_pg_errors_total", "kind" => kind).increment(1);
                tracing::debug!(code, %message, "login rejected");
                let error = protocol::error_response(Severity::Fatal, code, &message);
                let _ = writer.write_all(&error).await;
                return;
            }
            Err(_) => {
                let error = protocol::error_response(
                    Severity::Fatal,
                    "08P01",
                    "login timed out: startup and authentication took longer than 60s",
                );
                let _ = writer.write_all(&error).await;
                return;
            }
        };
        tracing::debug!(user = %logged_in.user, database = %logged_in.database, "client logged in");
        reader.set_max_message_bytes(pooler.config().max_message_bytes);
        let session = Session::new(
            pooler.clone(),
            client_id,
            peer,
            logged_in,
            reader,
            writer,
            shutdown,
        );
        session.run().await;
        drop(slot);
    };
    // A disabled span still costs a dispatch on every poll.
    if span.is_disabled() {
        serve.await
    } else {
        serve.instrument(span).await
    }
}

async fn login(
    pooler: &Pooler,
    reader: &mut MessageReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    client_count: usize,
) -> Result<Login, LoginEnd> {
    let params = read_startup(pooler, reader, writer).await?;
    if client_count > pooler.config().max_client_conn {
        return Err(fatal(
            "53300",
            "sorry, too many clients already".into(),
            "too_many_clients",
        ));
    }
    let user = params.get("user").unwrap_or_default().to_string();
    if user.is_empty() {
        return Err(fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet".into(),
            "protocol",
        ));
    }
    let database = params.get("database").unwrap_or(&user).to_string();
    if super::admin::ADMIN_DATABASES.contains(&database.as_str()) {
        if !pooler.config().admin_users.contains(&user) {
            return Err(fatal(
                "28000",
                format!(
                    "user \"{user}\" is not in admin_users, so it cannot use the admin console"
                ),
                "auth_failed",
            ));
        }
        authenticate(pooler, &user, reader, writer).await?;
        return Ok(Login::Admin);
    }
    let Some(db) = pooler.database(&database) else {
        return Err(fatal(
            "3D000",
            format!("database \"{database}\" does not exist"),
            "unknown_database",
        ));
    };
    if pooler.is_disabled(&database) {
        return Err(fatal(
            "55000",
            format!("database \"{database}\" is not currently accepting connections (DISABLE)"),
            "database_disabled",
        ));
    }
    authenticate(pooler, &user, reader, writer).await?;
    let pool = match pooler.existing_pool(&db, &user) {
        Some(pool) => pool,
        None => create_pool(pooler, &db, &user).await?,
    };
    // The pool learned the server's ParameterStatus values from its first
    // login, which happened before the pool existed.
    let server_params = pool.server_params().unwrap_or_default();
    let mut greeting = Vec::with_capacity(512);
    greeting.extend_from_slice(&protocol::authentication(0, &[]));
    for (name, value) in params::client_visible(&server_params, &params) {
        greeting.extend_from_slice(&protocol::parameter_status(&name, &value));
    }
    writer.write_all(&greeting).await?;
    Ok(Login::Session(LoggedIn {
        user,
        database,
        params,
        pool,
    }))
}

/// Reads the startup packet. SSL and GSS requests get 'N', and a cancel
/// request is forwarded.
async fn read_startup(
    pooler: &Pooler,
    reader: &mut MessageReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<StartupParams, LoginEnd> {
    for _ in 0..3 {
        let packet = reader.read_startup().await?;
        match parse_startup(&packet) {
            Ok(StartupPacket::SslRequest) | Ok(StartupPacket::GssEncRequest) => {
                writer.write_all(b"N").await?;
            }
            Ok(StartupPacket::Cancel {
                process_id,
                secret_key,
            }) => {
                pooler.cancels.cancel(process_id, secret_key).await;
                return Err(LoginEnd::Quiet);
            }
            Ok(StartupPacket::Startup(params)) => return Ok(params),
            Err(err) => return Err(fatal("08P01", err.to_string(), "protocol")),
        }
    }
    Err(fatal(
        "08P01",
        "too many encryption requests".into(),
        "protocol",
    ))
}

async fn authenticate(
    pooler: &Pooler,
    user: &str,
    reader: &mut MessageReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<(), LoginEnd> {
    let passed = match pooler.config().auth.auth_type {
        AuthType::Trust => true,
        AuthType::Md5 => md5_exchange(pooler, user, reader, writer).await?,
        AuthType::ScramSha256 => scram_exchange(pooler, user, reader, writer).await?,
    };
    if passed {
        return Ok(());
    }
    tracing::info!(user, "client password authentication failed");
    Err(fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
        "auth_failed",
    ))
}

async fn read_password(reader: &mut MessageReader<OwnedReadHalf>) -> Result<Vec<u8>, LoginEnd> {
    let message = reader.read().await?;
    if message.tag() != frontend::PASSWORD {
        return Err(fatal(
            "08P01",
            format!(
                "expected password response, got message type {:?}",
                message.tag() as char
            ),
            "protocol",
        ));
    }
    Ok(message.body().to_vec())
}

async fn md5_exchange(
    pooler: &Pooler,
    user: &str,
    reader: &mut MessageReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<bool, LoginEnd> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    writer
        .write_all(&protocol::authentication(5, &salt))
        .await?;
    let response = read_password(reader).await?;
    let response = response.strip_suffix(&[0]).unwrap_or(&response);
    let users = pooler.users();
    let stored = match users.get(user) {
        Some(Secret::Plain(password)) => auth::md5_password_hash(user, password),
        Some(Secret::Md5(hash)) => hash.clone(),
        _ => return Ok(false),
    };
    let expected = auth::md5_salted_response(&stored, &salt);
    Ok(auth::constant_time_eq(expected.as_bytes(), response))
}

async fn scram_exchange(
    pooler: &Pooler,
    user: &str,
    reader: &mut MessageReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<bool, LoginEnd> {
    // An unknown user still goes through the exchange against a random
    // secret, so a client cannot tell unknown users from wrong passwords.
    let secret = pooler
        .users()
        .scram_secret(user)
        .unwrap_or_else(|| Arc::new(ScramSecret::from_password(&random_password())));
    let mut server = ScramServer::new(secret);
    writer
        .write_all(&protocol::authentication(10, b"SCRAM-SHA-256\0\0"))
        .await?;
    let initial = read_password(reader).await?;
    let mut body = &initial[..];
    let mechanism = protocol::read_cstr(&mut body).unwrap_or_default();
    if mechanism != "SCRAM-SHA-256" || body.len() < 4 {
        return Err(fatal(
            "28000",
            "client selected an invalid SASL authentication mechanism".into(),
            "protocol",
        ));
    }
    let client_first = &body[4..];
    let server_first = server
        .server_first(client_first)
        .map_err(|reason| fatal("08P01", reason.into(), "protocol"))?;
    writer
        .write_all(&protocol::authentication(11, server_first.as_bytes()))
        .await?;
    let client_final = read_password(reader).await?;
    let verdict = server
        .server_final(&client_final)
        .map_err(|reason| fatal("08P01", reason.into(), "protocol"))?;
    match verdict {
        Some(server_final) => {
            writer
                .write_all(&protocol::authentication(12, server_final.as_bytes()))
                .await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

fn random_password() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates the pool of a (database, user) once a server login as that user
/// succeeds, so logins under made-up names leave no pool or metrics behind.
/// The login's connection becomes the pool's first, and one login runs at a
/// time, so the pool bound is kept while many clients arrive at once.
async fn create_pool(
    pooler: &Pooler,
    db: &crate::config::PgDatabase,
    user: &str,
) -> Result<Arc<Pool>, LoginEnd> {
    // A paused database gets no new server connection, so the login that
    // would open the pool's first one waits for RESUME, as queries do.
    // NOTE: LOGIN_TIMEOUT bounds the whole login, this wait included, so a
    // query_wait_timeout above 60 s does not lengthen it.
    let deadline = tokio::time::Instant::now() + pooler.config().query_wait_timeout;
    pooler
        .wait_until_unpaused(&db.name, deadline)
        .await
        .map_err(|message| fatal("57P03", message, "paused"))?;
    let _one_at_a_time = pooler.pool_creation.lock().await;
    if let Some(pool) = pooler.existing_pool(db, user) {
        return Ok(pool);
    }
    let target = pooler.target_for(db, user);
    let timeout = pooler.config().server_connect_timeout;
    let max_statements = pooler.config().max_prepared_statements;
    match super::backend::ServerConn::connect(0, &target, timeout, max_statements).await {
        Ok(conn) => {
            let pool = pooler.pool_for(db, user);
            pool.adopt(conn);
            Ok(pool)
        }
        Err(err) => Err(server_login_error(err)),
    }
}

fn server_login_error(err: super::backend::BackendError) -> LoginEnd {
    match err {
        super::backend::BackendError::Login { code, message, .. } => {
            let code = if code == "28P01" || code == "28000" {
                "08004"
            } else {
                "08006"
            };
            fatal(
                code,
                format!("server login failed: {message}"),
                "server_login",
            )
        }
        other => fatal("08006", other.to_string(), "server_connect"),
    }
}
