//! Server connections: connecting and logging in to PostgreSQL, and the state
//! skiff tracks per connection (prepared statements, applied settings).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth;
use super::cancel::ServerKey;
use super::params::Settings;
use super::pipeline::Delivery;
use super::prepared::ServerStatements;
use super::protocol::{self, backend, ErrorFields, Message, MessageReader, ProtocolError};
use crate::config::SslMode;
use crate::tls::{self, ReadHalf, Stream, TlsConnector, WriteHalf};

/// Server address, database, login and TLS settings of a pool.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    /// The database name clients use, for messages.
    pub database: String,
    pub dbname: String,
    pub user: String,
    pub password: Option<String>,
    /// Raised by RECONNECT and by a reload that changes the target, so
    /// connections opened before are closed once released.
    pub generation: u64,
    /// None when `sslmode` is `disable`.
    pub tls: Option<ServerTls>,
}

/// TLS settings of a pool's server connections, cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    /// Any mode but `disable`.
    pub mode: SslMode,
    pub connector: TlsConnector,
    /// The name the certificate is checked against, and the SNI sent.
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ServerTarget {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// True when both log in to the same server as the same user.
    pub fn same_login(&self, other: &ServerTarget) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.dbname == other.dbname
            && self.user == other.user
            && self.password == other.password
    }
}

/// Failure on a server connection.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    #[error("server {addr} rejected login: {message}")]
    Login {
        addr: String,
        code: String,
        message: String,
    },
    #[error("server {addr} asks for a password, and skiff has none for user {user:?}")]
    NoPassword { addr: String, user: String },
    #[error("server {addr} requested unsupported authentication method {method}")]
    UnsupportedAuth { addr: String, method: u32 },
    #[error("server {addr}: {source}")]
    Protocol { addr: String, source: ProtocolError },
    #[error("server {addr}: SCRAM exchange failed: {reason}")]
    Scram { addr: String, reason: String },
    #[error("server {addr} for database \"{database}\": TLS handshake failed: {reason}")]
    Tls {
        addr: String,
        database: String,
        reason: String,
    },
    #[error(
        "server {addr} for database \"{database}\" does not support SSL, and sslmode is {mode}"
    )]
    TlsUnsupported {
        addr: String,
        database: String,
        mode: SslMode,
    },
}

/// A failed connection attempt, and whether it had got as far as TLS;
/// with `sslmode` `prefer` such a failure is retried without TLS.
struct Attempt {
    error: BackendError,
    encrypted: bool,
}

impl Attempt {
    fn plain(error: BackendError) -> Attempt {
        Attempt {
            error,
            encrypted: false,
        }
    }
}

/// Largest message accepted from a server; a single row may be this large.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// Write buffer capacity of a new server connection.
const INITIAL_WRITE_BUFFER: usize = 8192;
/// Bytes of server replies read ahead while a write to the server waits.
/// NOTE: past this bound the write waits without reading, so a pipeline
/// whose unread replies exceed it can still stall. TLS connections do not
/// read ahead at all.
const MAX_READ_AHEAD: usize = 16 * 1024 * 1024;

/// Maximum wait for the reply to a queued Query after a cancel request
/// for the Query before it; see [`ServerConn::settle_behind`].
const SETTLE_WAIT: Duration = Duration::from_millis(500);
/// Largest reply to a queued Query read ahead that way.
const SETTLE_BYTES: usize = 1024 * 1024;
/// SQLSTATE of a statement ended by a cancel request.
const QUERY_CANCELED: &str = "57014";
/// SQLSTATE of "cached plan must not change result type", which a Bind
/// of a statement prepared before a DDL change gets.
const CACHED_PLAN_CHANGED: &str = "0A000";

/// One logged-in connection to PostgreSQL.
pub struct ServerConn {
    pub id: u64,
    reader: MessageReader<ReadHalf>,
    writer: WriteHalf,
    out: BytesMut,
    /// The connection is encrypted.
    pub tls: bool,
    pub process_id: i32,
    pub secret_key: i32,
    pub address: String,
    /// Key a cancel request for this connection's process needs.
    pub cancel_key: Arc<ServerKey>,
    /// ParameterStatus values the server reported at login.
    pub login_params: Vec<(String, String)>,
    pub created: Instant,
    pub last_used: Instant,
    /// Prepared statements that exist on this connection.
    pub statements: ServerStatements,
    /// Session settings skiff applied with SET, keyed by lowercase name.
    pub applied: Settings,
    /// A client ran SET/RESET here; settings must be reset before another
    /// client uses it.
    pub dirty_by: Option<u64>,
    /// Last ReadyForQuery status.
    pub tx_status: u8,
    /// Statements that must be closed before they are prepared again, after
    /// the server reported that their cached plan changed.
    pub needs_close: HashSet<String>,
    /// A client ran SQL-level PREPARE, so a reset must also DEALLOCATE ALL.
    pub sql_prepared: bool,
    /// Another client's Query written behind the running one.
    pub behind: Option<super::pipeline::Behind>,
    /// Set when the reply to the Query behind was read ahead: what became
    /// of it.
    pub delivery: Option<super::pipeline::Delivery>,
    /// A cancel request that the server did not confirm may still reach
    /// this connection, so it closes when it is next given back.
    pub retire: bool,
}

impl ServerConn {
    /// Connects and logs in, bounded by `timeout`. The connection is boxed
    /// because it is large and moves between the pool and sessions at every
    /// checkout.
    pub async fn connect(
        id: u64,
        target: &ServerTarget,
        timeout: Duration,
        max_statements: usize,
    ) -> Result<Box<ServerConn>, BackendError> {
        let addr = target.address();
        match tokio::time::timeout(timeout, Self::connect_inner(id, target, max_statements)).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::ConnectTimeout(addr)),
        }
    }

    async fn connect_inner(
        id: u64,
        target: &ServerTarget,
        max_statements: usize,
    ) -> Result<Box<ServerConn>, BackendError> {
        let tls = target.tls.as_ref();
        match Self::attempt(id, target, max_statements, tls).await {
            Ok(conn) => Ok(conn),
            Err(failed) if failed.encrypted && tls.map(|t| t.mode) == Some(SslMode::Prefer) => {
                tracing::debug!(
                    server = %target.address(),
                    error = %failed.error,
                    "connecting over TLS failed; trying without TLS (sslmode prefer)"
                );
                Self::attempt(id, target, max_statements, None)
                    .await
                    .map_err(|failed| failed.error)
            }
            Err(failed) => Err(failed.error),
        }
    }

    /// Connects, negotiates TLS when `tls` is given, and logs in.
    async fn attempt(
        id: u64,
        target: &ServerTarget,
        max_statements: usize,
        tls: Option<&ServerTls>,
    ) -> Result<Box<ServerConn>, Attempt> {
        let addr = target.address();
        let tcp = TcpStream::connect(&addr).await.map_err(|source| {
            Attempt::plain(BackendError::Connect {
                addr: addr.clone(),
                source,
            })
        })?;
        let _ = tcp.set_nodelay(true);
        let stream = match tls {
            Some(tls) => negotiate_tls(tcp, target, tls).await?,
            None => Stream::Plain(tcp),
        };
        let encrypted = stream.is_tls();
        let (read, write) = stream.into_split();
        // A pool has few server connections, and each is busy while a
        // client has checked it out.
        let mut reader = MessageReader::new(read, MAX_SERVER_MESSAGE);
        reader.keep_buffer();
        let now = Instant::now();
        let mut conn = Box::new(ServerConn {
            id,
            reader,
            writer: write,
            out: BytesMut::with_capacity(INITIAL_WRITE_BUFFER),
            tls: encrypted,
            process_id: 0,
            secret_key: 0,
            cancel_key: Arc::new(ServerKey {
                address: addr.clone(),
                process_id: 0,
                secret_key: 0,
                server_id: id,
                connected_at: SystemTime::now(),
                generation: target.generation,
                tls: None,
                cancels: Arc::default(),
            }),
            address: addr,
            login_params: Vec::new(),
            created: now,
            last_used: now,
            statements: ServerStatements::new(max_statements),
            applied: Settings::default(),
            dirty_by: None,
            tx_status: b'I',
            needs_close: HashSet::new(),
            sql_prepared: false,
            behind: None,
            delivery: None,
            retire: false,
        });
        let tls_for_cancel = tls.filter(|_| encrypted).cloned();
        conn.login(target, tls_for_cancel)
            .await
            .map_err(|error| Attempt { error, encrypted })?;
        Ok(conn)
    }

    fn protocol_error(&self, source: ProtocolError) -> BackendError {
        BackendError::Protocol {
            addr: self.address.clone(),
            source,
        }
    }

    /// Logs in; `tls` is kept in the cancel key, so a cancel request for
    /// this connection is encrypted as the connection is.
    async fn login(
        &mut self,
        target: &ServerTarget,
        tls: Option<ServerTls>,
    ) -> Result<(), BackendError> {
        let startup =
            protocol::startup_message(&[("user", &target.user), ("database", &target.dbname)]);
        self.write_now(&startup).await?;
        self.authenticate(target).await?;
        loop {
            let message = self.read().await?;
            match message.tag() {
                backend::PARAMETER_STATUS => {
                    let mut body = message.body();
                    let name = protocol::read_cstr(&mut body)
                        .unwrap_or_default()
                        .to_string();
                    let value = protocol::read_cstr(&mut body)
                        .unwrap_or_default()
                        .to_string();
                    self.login_params.push((name, value));
                }
                backend::BACKEND_KEY_DATA if message.body().len() >= 8 => {
                    let body = message.body();
                    self.process_id = i32::from_be_bytes(body[0..4].try_into().unwrap());
                    self.secret_key = i32::from_be_bytes(body[4..8].try_into().unwrap());
                }
                backend::READY_FOR_QUERY => {
                    self.cancel_key = Arc::new(ServerKey {
                        address: self.address.clone(),
                        process_id: self.process_id,
                        secret_key: self.secret_key,
                        server_id: self.id,
                        connected_at: self.cancel_key.connected_at,
                        generation: target.generation,
                        tls,
                        cancels: Arc::default(),
                    });
                    return Ok(());
                }
                backend::ERROR_RESPONSE => return Err(self.login_error(&message)),
                _ => {}
            }
        }
    }

    fn login_error(&self, message: &Message) -> BackendError {
        let fields = ErrorFields::parse(message.body());
        BackendError::Login {
            addr: self.address.clone(),
            code: fields.code,
            message: fields.message,
        }
    }

    async fn authenticate(&mut self, target: &ServerTarget) -> Result<(), BackendError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = self.read().await?;
            match message.tag() {
                backend::AUTHENTICATION => {}
                backend::ERROR_RESPONSE => return Err(self.login_error(&message)),
                _ => return Err(self.protocol_error(ProtocolError::Malformed("authentication"))),
            }
            let body = message.body();
            if body.len() < 4 {
                return Err(self.protocol_error(ProtocolError::Malformed("authentication")));
            }
            let method = u32::from_be_bytes(body[0..4].try_into().unwrap());
            let payload = &body[4..];
            match method {
                0 => return Ok(()),
                3 => {
                    let password = self.password(target)?;
                    let mut text = password.as_bytes().to_vec();
                    text.push(0);
                    self.write_now(&protocol::password_message(&text)).await?;
                }
                5 if payload.len() >= 4 => {
                    let password = self.password(target)?;
                    let salt: [u8; 4] = payload[0..4].try_into().unwrap();
                    let stored = auth::md5_password_hash(&target.user, &password);
                    let mut response = auth::md5_salted_response(&stored, &salt).into_bytes();
                    response.push(0);
                    self.write_now(&protocol::password_message(&response))
                        .await?;
                }
                10 => {
                    let password = self.password(target)?;
                    let client =
                        ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    let first = protocol::sasl_initial_response("SCRAM-SHA-256", client.message());
                    self.write_now(&first).await?;
                    scram = Some(client);
                }
                11 => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.scram_error("out of order"))?;
                    client
                        .update(payload)
                        .map_err(|err| self.scram_error(&err.to_string()))?;
                    let reply = protocol::password_message(client.message());
                    self.write_now(&reply).await?;
                }
                12 => {
                    let mut client = scram
                        .take()
                        .ok_or_else(|| self.scram_error("out of order"))?;
                    client
                        .finish(payload)
                        .map_err(|err| self.scram_error(&err.to_string()))?;
                }
                other => {
                    return Err(BackendError::UnsupportedAuth {
                        addr: self.address.clone(),
                        method: other,
                    })
                }
            }
        }
    }

    fn scram_error(&self, reason: &str) -> BackendError {
        BackendError::Scram {
            addr: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    fn password(&self, target: &ServerTarget) -> Result<String, BackendError> {
        target
            .password
            .clone()
            .ok_or_else(|| BackendError::NoPassword {
                addr: self.address.clone(),
                user: target.user.clone(),
            })
    }

    /// Reads the next message from the server.
    pub async fn read(&mut self) -> Result<Message, BackendError> {
        match self.reader.read().await {
            Ok(message) => Ok(message),
            Err(err) => Err(self.protocol_error(err)),
        }
    }

    /// True when another message is buffered and `read` will not wait.
    pub fn has_buffered_message(&self) -> bool {
        self.reader.has_buffered_message()
    }

    /// Queues bytes to send; `flush` writes them.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Returns the buffer of bytes queued for the server, for a request encoded
    /// in place.
    pub fn out_mut(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    pub fn queued_len(&self) -> usize {
        self.out.len()
    }

    /// Writes the queued bytes. On a plain socket the server's replies are
    /// read into the read buffer meanwhile, up to `MAX_READ_AHEAD` bytes.
    /// PostgreSQL stops reading requests while its replies wait to be read,
    /// so without this a pipeline of large requests and large results could
    /// leave both sides waiting on each other.
    pub async fn flush(&mut self) -> Result<(), BackendError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.out);
        let result = self.write_reading(&mut out).await;
        self.out = out;
        protocol::clear_write_buffer(&mut self.out);
        result.map_err(|err| self.protocol_error(ProtocolError::Io(err)))
    }

    /// Reads ahead the reply to the Query queued behind, after a cancel
    /// request went to the server for the client whose Query ran first, or
    /// after that client's Bind found the plan of the queued Query's
    /// statement changed. When the queued Query failed the same way, its
    /// reply is dropped and the Query is to be sent again, which prepares
    /// the statement afresh first. The server confirmed each
    /// such cancel before the earlier client let go of the connection, so
    /// a Query it hit ends within moments. A queued Query still running
    /// after `SETTLE_WAIT`, or whose reply grows past `SETTLE_BYTES`, is
    /// handed over as it is.
    // NOTE: a cancel that lands on such a long Query still ends it with a
    // 57014 error that its client did not ask for.
    pub async fn settle_behind(&mut self) -> Result<Delivery, BackendError> {
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        let failed_unrun = |tag: u8, body: &[u8]| {
            tag == backend::ERROR_RESPONSE
                && matches!(
                    ErrorFields::parse(body).code.as_str(),
                    QUERY_CANCELED | CACHED_PLAN_CHANGED
                )
        };
        loop {
            if let Some((count, hit)) = self.reader.scan_to(backend::READY_FOR_QUERY, failed_unrun)
            {
                if !hit {
                    return Ok(Delivery::Sent);
                }
                for _ in 0..count {
                    self.read().await?;
                }
                return Ok(Delivery::Resend);
            }
            if self.reader.buffered_len() >= SETTLE_BYTES {
                return Ok(Delivery::Sent);
            }
            match tokio::time::timeout_at(deadline, self.reader.read_ahead()).await {
                Err(_) => return Ok(Delivery::Sent),
                Ok(result) => result.map_err(|err| self.protocol_error(err))?,
            }
        }
    }

    async fn write_reading(&mut self, out: &mut BytesMut) -> std::io::Result<()> {
        // A read error or end of stream here is left for the next read to
        // report; the write goes on and reports its own errors.
        let mut reading = true;
        while !out.is_empty() {
            let can_read = reading && self.reader.buffered_len() < MAX_READ_AHEAD;
            tokio::select! {
                biased;
                written = self.writer.write_some(out) => match written {
                    None => return self.writer.send(out).await,
                    Some(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Some(Ok(count)) => bytes::Buf::advance(out, count),
                    Some(Err(err)) => return Err(err),
                },
                read = self.reader.read_ahead(), if can_read => reading = read.is_ok(),
            }
        }
        Ok(())
    }

    async fn write_now(&mut self, bytes: &Bytes) -> Result<(), BackendError> {
        self.queue(bytes);
        self.flush().await
    }

    /// True when the server sent something or closed while idle in the
    /// pool: an idle server sends nothing unless it is shutting down.
    pub fn closed_while_idle(&mut self) -> bool {
        !self.reader.buffered_is_empty() || !self.reader.get_mut().is_idle()
    }

    /// Builds the SQL that resets this connection's session state for the
    /// next client, and forgets the state that SQL removes. SQL-level
    /// PREPARE adds DEALLOCATE ALL, which also drops skiff's own statements.
    pub fn take_reset_sql(&mut self, reset_query: &str) -> String {
        let mut sql = reset_query.to_string();
        if self.sql_prepared {
            sql.push_str("; DEALLOCATE ALL");
            self.statements.clear();
            self.sql_prepared = false;
        }
        self.applied = Settings::default();
        sql
    }

    /// Runs an empty query to check the connection still works.
    pub async fn check(&mut self, timeout: Duration) -> bool {
        let probe = async {
            self.write_now(&protocol::query("")).await?;
            loop {
                let message = self.read().await?;
                if message.tag() == backend::READY_FOR_QUERY {
                    return Ok::<bool, BackendError>(message.body() == b"I");
                }
            }
        };
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(true)))
    }

    /// Runs a simple query skiff issues itself and discards its results;
    /// returns the first error, if any.
    pub async fn run_internal(&mut self, sql: &str) -> Result<Option<ErrorFields>, BackendError> {
        self.write_now(&protocol::query(sql)).await?;
        let mut first_error = None;
        loop {
            let message = self.read().await?;
            match message.tag() {
                backend::ERROR_RESPONSE if first_error.is_none() => {
                    first_error = Some(ErrorFields::parse(message.body()));
                }
                backend::READY_FOR_QUERY => {
                    self.tx_status = message.body().first().copied().unwrap_or(b'I');
                    return Ok(first_error);
                }
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes, without waiting for the server.
    pub async fn terminate(mut self: Box<Self>) {
        self.out.clear();
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            self.write_now(&protocol::terminate()),
        )
        .await;
    }
}

/// Sends SSLRequest and, when the server agrees, runs the TLS handshake.
/// A server that declines gets a plain connection only with `prefer`.
async fn negotiate_tls(
    mut tcp: TcpStream,
    target: &ServerTarget,
    tls: &ServerTls,
) -> Result<Stream, Attempt> {
    let addr = target.address();
    let io_error = |err: std::io::Error| {
        Attempt::plain(BackendError::Protocol {
            addr: addr.clone(),
            source: ProtocolError::Io(err),
        })
    };
    tcp.write_all(&protocol::ssl_request())
        .await
        .map_err(io_error)?;
    // One byte exactly: anything the server sent after it belongs to the
    // TLS handshake and is checked there, never taken as protocol data.
    let answer = match tcp.read_u8().await {
        Ok(answer) => answer,
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Attempt::plain(BackendError::Protocol {
                addr,
                source: ProtocolError::Closed,
            }))
        }
        Err(err) => return Err(io_error(err)),
    };
    match answer {
        b'S' => Stream::connect_tls(tcp, &tls.connector, tls.server_name.clone())
            .await
            .map_err(|err| Attempt {
                error: BackendError::Tls {
                    addr: addr.clone(),
                    database: target.database.clone(),
                    reason: tls::describe_handshake_error(&err, &tls.server_name),
                },
                encrypted: true,
            }),
        b'N' if tls.mode == SslMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(Attempt::plain(BackendError::TlsUnsupported {
            addr,
            database: target.database.clone(),
            mode: tls.mode,
        })),
        _ => Err(Attempt::plain(BackendError::Protocol {
            addr,
            source: ProtocolError::Malformed("SSLRequest response"),
        })),
    }
}
