//! Client login: the startup packet, SSL/GSS negotiation, cancel requests,
//! authentication and the greeting, before the session relay takes over.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use rand::RngCore;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::auth::{self, ScramSecret, ScramServer, Secret};
use super::params::{self, Settings};
use super::pool::Pool;
use super::protocol::{
    self, frontend, parse_startup, MessageReader, ProtocolError, Severity, StartupPacket,
    StartupParams,
};
use super::session::Session;
use super::Pooler;
use crate::config::{AuthType, ClientSslMode};
use crate::tls::{ReadHalf, Stream, WriteHalf};

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

impl LoginEnd {
    /// Sends the client the FATAL error, if any, and counts it.
    async fn report<W: AsyncWrite + Unpin>(self, writer: &mut W) {
        if let LoginEnd::Fatal {
            code,
            message,
            kind,
        } = self
        {
            counter!("skiff_pg_errors_total", "kind" => kind).increment(1);
            tracing::debug!(code, %message, "login rejected");
            let error = protocol::error_response(Severity::Fatal, code, &message);
            if writer.write_all(&error).await.is_ok() {
                let _ = writer.flush().await;
            }
        }
    }
}

/// Outcome of one packet of the startup phase.
enum Negotiation {
    /// The client sent its StartupMessage.
    Startup(StartupParams),
    /// The client requested TLS, and skiff sent 'S'.
    StartTls,
    /// The client requested an encryption skiff does not offer, and skiff
    /// sent 'N'.
    Declined,
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
    /// Session settings from the startup packet, keyed by lowercase name.
    pub settings: Settings,
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
    // At info level, so warnings and errors about this client name its
    // address.
    let span = tracing::info_span!("client", id = client_id, peer = %peer);
    let serve = async move {
        tracing::debug!("client connected");
        serve_client(pooler, stream, client_id, peer, shutdown).await;
        tracing::debug!("client disconnected");
    };
    // A disabled span still costs a dispatch on every poll, and an empty
    // span costs none. One await, because a release build once laid out
    // two copies of the client's future for an await with the span and
    // one without it.
    let span = if span.is_disabled() {
        tracing::Span::none()
    } else {
        span
    };
    serve.instrument(span).await
}

async fn serve_client(
    pooler: Arc<Pooler>,
    stream: TcpStream,
    client_id: u64,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let (slot, count) = ClientSlot::new(pooler.clone());
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    let Some((stream, buffered, params)) = negotiate(&pooler, stream, deadline).await else {
        return;
    };
    let (read, mut writer) = stream.into_split();
    let mut reader = MessageReader::with_buffered(read, buffered, MAX_LOGIN_MESSAGE);
    let login = tokio::time::timeout_at(
        deadline,
        login(&pooler, params, &mut reader, &mut writer, count),
    )
    .await;
    let logged_in = match login {
        Ok(Ok(Login::Session(logged_in))) => logged_in,
        Ok(Ok(Login::Admin)) => {
            reader.set_max_message_bytes(super::admin::MAX_ADMIN_MESSAGE);
            let _ = super::admin::serve(&pooler, reader, writer, &shutdown).await;
            return;
        }
        Ok(Err(end)) => {
            end.report(&mut writer).await;
            return;
        }
        Err(_) => {
            let _ = writer.send(&login_timed_out()).await;
            return;
        }
    };
    tracing::debug!(user = %logged_in.user, database = %logged_in.database, "client logged in");
    reader.set_max_message_bytes(pooler.config().max_message_bytes);
    let session = Session::new(pooler.clone(), client_id, peer, logged_in, reader, writer);
    session.run().await;
    drop(slot);
}

fn login_timed_out() -> bytes::Bytes {
    protocol::error_response(
        Severity::Fatal,
        "08P01",
        "login timed out: startup and authentication took longer than 60s",
    )
}

/// Reads startup packets until the StartupMessage, responding to SSLRequest
/// and GSSENCRequest and forwarding a cancel request, and switches to TLS
/// when the client asks and TLS is configured. Returns the connection, the
/// bytes read after the StartupMessage, and its parameters; None when the
/// connection ends here.
async fn negotiate(
    pooler: &Pooler,
    tcp: TcpStream,
    deadline: Instant,
) -> Option<(Stream, bytes::BytesMut, StartupParams)> {
    let mut reader = MessageReader::new(Stream::Plain(tcp), MAX_LOGIN_MESSAGE);
    for _ in 0..3 {
        let step = tokio::time::timeout_at(deadline, negotiate_step(pooler, &mut reader)).await;
        match step {
            Ok(Ok(Negotiation::Startup(params))) => {
                let (stream, buffered) = reader.into_parts();
                return Some((stream, buffered, params));
            }
            Ok(Ok(Negotiation::Declined)) => {}
            Ok(Ok(Negotiation::StartTls)) => {
                let acceptor = pooler.client_tls.as_ref()?;
                let (stream, _) = reader.into_parts();
                let tcp = stream.into_plain()?;
                let handshake =
                    tokio::time::timeout_at(deadline, Stream::accept_tls(tcp, acceptor)).await;
                match handshake {
                    Ok(Ok(stream)) => reader = MessageReader::new(stream, MAX_LOGIN_MESSAGE),
                    Ok(Err(err)) => {
                        counter!("skiff_pg_errors_total", "kind" => "client_tls").increment(1);
                        tracing::debug!(error = %err, "client TLS handshake failed");
                        return None;
                    }
                    Err(_) => return None,
                }
            }
            Ok(Err(end)) => {
                end.report(reader.get_mut()).await;
                return None;
            }
            Err(_) => {
                let _ = reader.get_mut().send(&login_timed_out()).await;
                return None;
            }
        }
    }
    fatal("08P01", "too many encryption requests".into(), "protocol")
        .report(reader.get_mut())
        .await;
    None
}

/// Reads one startup-phase packet and responds to it.
async fn negotiate_step(
    pooler: &Pooler,
    reader: &mut MessageReader<Stream>,
) -> Result<Negotiation, LoginEnd> {
    let packet = reader.read_startup().await?;
    let encrypted = reader.get_ref().is_tls();
    match parse_startup(&packet) {
        Ok(StartupPacket::SslRequest) if encrypted => Err(fatal(
            "08P01",
            "SSLRequest received on a connection that is already encrypted".into(),
            "protocol",
        )),
        Ok(StartupPacket::SslRequest) if pooler.client_tls.is_some() => {
            // Bytes that came after the SSLRequest were sent before TLS
            // started, so nothing vouches for them: taking them as the
            // first encrypted messages would let a third party inject them.
            if !reader.buffered_is_empty() {
                return Err(fatal(
                    "08P01",
                    "received unencrypted data after SSL request".into(),
                    "protocol",
                ));
            }
            reader.get_mut().send(b"S").await?;
            Ok(Negotiation::StartTls)
        }
        Ok(StartupPacket::SslRequest) | Ok(StartupPacket::GssEncRequest) => {
            reader.get_mut().send(b"N").await?;
            Ok(Negotiation::Declined)
        }
        Ok(StartupPacket::Cancel {
            process_id,
            secret_key,
        }) => {
            pooler.cancels.cancel(process_id, secret_key).await;
            Err(LoginEnd::Quiet)
        }
        Ok(StartupPacket::Startup(_))
            if !encrypted && pooler.config().client_tls_sslmode == ClientSslMode::Require =>
        {
            Err(fatal(
                "28000",
                "SSL required: this server accepts only encrypted connections".into(),
                "client_tls_required",
            ))
        }
        Ok(StartupPacket::Startup(params)) => Ok(Negotiation::Startup(params)),
        Err(err) => Err(fatal("08P01", err.to_string(), "protocol")),
    }
}

async fn login(
    pooler: &Pooler,
    params: StartupParams,
    reader: &mut MessageReader<ReadHalf>,
    writer: &mut WriteHalf,
    client_count: usize,
) -> Result<Login, LoginEnd> {
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
    let settings = pool.share_settings(params::startup_settings(&params));
    let mut greeting = Vec::with_capacity(512);
    greeting.extend_from_slice(&protocol::authentication(0, &[]));
    greeting.extend_from_slice(&pool.login_parameters(&settings));
    writer.send(&greeting).await?;
    Ok(Login::Session(LoggedIn {
        user,
        database,
        params,
        settings,
        pool,
    }))
}

async fn authenticate(
    pooler: &Pooler,
    user: &str,
    reader: &mut MessageReader<ReadHalf>,
    writer: &mut WriteHalf,
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

async fn read_password(reader: &mut MessageReader<ReadHalf>) -> Result<Vec<u8>, LoginEnd> {
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
    reader: &mut MessageReader<ReadHalf>,
    writer: &mut WriteHalf,
) -> Result<bool, LoginEnd> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    writer.send(&protocol::authentication(5, &salt)).await?;
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
    reader: &mut MessageReader<ReadHalf>,
    writer: &mut WriteHalf,
) -> Result<bool, LoginEnd> {
    // An unknown user still goes through the exchange against a random
    // secret, so a client cannot tell unknown users from wrong passwords.
    let secret = pooler
        .users()
        .scram_secret(user)
        .unwrap_or_else(|| Arc::new(ScramSecret::from_password(&random_password())));
    let mut server = ScramServer::new(secret);
    writer
        .send(&protocol::authentication(10, b"SCRAM-SHA-256\0\0"))
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
        .send(&protocol::authentication(11, server_first.as_bytes()))
        .await?;
    let client_final = read_password(reader).await?;
    let verdict = server
        .server_final(&client_final)
        .map_err(|reason| fatal("08P01", reason.into(), "protocol"))?;
    match verdict {
        Some(server_final) => {
            writer
                .send(&protocol::authentication(12, server_final.as_bytes()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest accepted size of one client's future, which is about 3.7 kB
    /// now. Each client's task stores it and each login copies it. An 8 kB
    /// array in any future a session awaits once took it to 10.8 kB and
    /// doubled skiff's RSS with 10,000 idle clients.
    const MAX_CLIENT_FUTURE_BYTES: usize = 6 * 1024;

    #[tokio::test]
    async fn client_future_size_bounded() {
        let config = crate::config::Config::parse(
            "[postgres]\n[[postgres.databases]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = 5432\n",
        )
        .expect("config is valid");
        let pg = config.postgres.clone().expect("config has [postgres]");
        let pooler = Pooler::new(pg, &config, None).expect("pooler starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stream = TcpStream::connect(address).await.unwrap();

        let client = handle_client(pooler, stream, address, CancellationToken::new());
        let size = std::mem::size_of_val(&client);

        assert!(
            size <= MAX_CLIENT_FUTURE_BYTES,
            "a client's future takes {size} bytes, more than {MAX_CLIENT_FUTURE_BYTES}"
        );
    }
}
