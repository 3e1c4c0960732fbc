//! Connection commands that skiff replies to itself: AUTH, HELLO, PING, ECHO, QUIT,
//! SELECT, CLIENT, RESET, and transaction or subscription commands sent
//! outside a transaction or subscription.

use bytes::{Bytes, BytesMut};

use super::cache::ClientTracking;
use super::frame::{Protocol, Request};
use super::pool::ConnKey;
use super::pubsub::unsubscribe_confirmation;
use super::reply;
use super::routes::MAIN;
use super::session::{Flow, Outgoing, Session};
use super::upstream::UpstreamError;

impl Session {
    /// Replies to `request` when it is a connection command; `None` means
    /// the request is routed upstream.
    pub(super) async fn handle_local(&mut self, request: &Request, name: &str) -> Option<Flow> {
        let args = &request.args;
        let reply = match name {
            "AUTH" => self.auth(args),
            "HELLO" => self.hello(args),
            "PING" if args.len() == 1 => reply::simple("PONG"),
            "PING" if args.len() == 2 => reply::bulk(&args[1]),
            "ECHO" if args.len() == 2 => reply::bulk(&args[1]),
            "PING" | "ECHO" => reply::error(&reply::wrong_arity(name)),
            "QUIT" => {
                self.reply(reply::ok()).await;
                return Some(Flow::Close);
            }
            "SELECT" => self.select(args).await,
            "CLIENT" if request.arg_upper(1).as_deref() == Some("TRACKING") => {
                return Some(self.client_tracking(request).await);
            }
            "CLIENT" => self.client(request),
            "RESET" => self.reset(),
            "READONLY" | "READWRITE" | "ASKING" => reply::ok(),
            "EXEC" => reply::error("ERR EXEC without MULTI"),
            "DISCARD" => reply::error("ERR DISCARD without MULTI"),
            "UNWATCH" => reply::ok(),
            "UNSUBSCRIBE" | "PUNSUBSCRIBE" | "SUNSUBSCRIBE" => self.unsubscribe_none(request),
            _ => return None,
        };
        Some(self.reply(reply).await)
    }

    fn password_matches(&self, user: Option<&[u8]>, password: &[u8]) -> bool {
        let config = self.routes.main().config();
        let user_known = match user {
            None => true,
            Some(user) => {
                user == b"default" || config.username.as_deref().map(str::as_bytes) == Some(user)
            }
        };
        match &config.client_password {
            Some(expected) => user_known && constant_time_eq(expected.as_bytes(), password),
            // Without client_password the default user has no password, as
            // in a Redis server without requirepass.
            None => user_known,
        }
    }

    fn auth(&mut self, args: &[Bytes]) -> Bytes {
        let (user, password) = match args.len() {
            2 => (None, &args[1]),
            3 => (Some(&args[1][..]), &args[2]),
            _ => return reply::error(&reply::wrong_arity("auth")),
        };
        if user.is_none() && self.routes.main().config().client_password.is_none() {
            return reply::error(reply::NOPASS_CONFIGURED);
        }
        if self.password_matches(user, password) {
            self.authenticated = true;
            reply::ok()
        } else {
            tracing::info!("client AUTH failed");
            reply::error(reply::WRONGPASS)
        }
    }

    fn hello(&mut self, args: &[Bytes]) -> Bytes {
        let hello = match HelloOptions::parse(args, self.ctx.protocol) {
            Ok(hello) => hello,
            Err(error) => return error,
        };
        if let Some((user, password)) = &hello.credentials {
            if !self.password_matches(Some(user), password) {
                return reply::error(reply::WRONGPASS);
            }
            self.authenticated = true;
        }
        if !self.authenticated {
            return reply::error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise \
                 the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the \
                 client and select the RESP protocol version at the same time",
            );
        }
        if let Some(name) = hello.name {
            if !valid_client_name(&name) {
                return reply::error(reply::BAD_CLIENT_NAME);
            }
            self.name = (!name.is_empty()).then_some(name);
        }
        self.ctx.protocol = hello.protocol;
        if hello.protocol == Protocol::Resp2 {
            // RESP2 has no push frames to carry invalidations.
            self.stop_tracking();
        }
        self.hello_reply()
    }

    fn hello_reply(&self) -> Bytes {
        let protocol = self.ctx.protocol;
        let version = self.routes.main().server_version.read().clone();
        let proto = if protocol == Protocol::Resp3 { 3 } else { 2 };
        let mut out = BytesMut::new();
        reply::put_map_header(&mut out, protocol, 7);
        let fields: [(&str, Bytes); 7] = [
            ("server", reply::bulk(b"redis")),
            ("version", reply::bulk(version.as_bytes())),
            ("proto", reply::integer(proto)),
            ("id", reply::integer(self.ctx.client_id as i64)),
            // skiff presents itself as one standalone server in every mode.
            ("mode", reply::bulk(b"standalone")),
            ("role", reply::bulk(b"master")),
            ("modules", reply::array(&[])),
        ];
        for (key, value) in fields {
            out.extend_from_slice(&reply::bulk(key.as_bytes()));
            out.extend_from_slice(&value);
        }
        out.freeze()
    }

    async fn select(&mut self, args: &[Bytes]) -> Bytes {
        if args.len() != 2 {
            return reply::error(&reply::wrong_arity("select"));
        }
        let Some(db) = std::str::from_utf8(&args[1])
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        else {
            return reply::error(reply::NOT_INTEGER);
        };
        // A route's database is accepted whatever [redis] is: the route's
        // upstream database is fixed and checked when it connects.
        let route = u32::try_from(db)
            .ok()
            .and_then(|db| self.routes.database_route(db));
        if let Some(route) = route {
            self.client_db = db as u32;
            self.use_route(route);
            return reply::ok();
        }
        let main = self.routes.main().clone();
        if main.is_cluster() {
            return match db {
                0 => {
                    self.client_db = 0;
                    self.use_route(MAIN);
                    reply::ok()
                }
                _ => reply::error(reply::SELECT_IN_CLUSTER),
            };
        }
        if !(0..=i64::from(u16::MAX)).contains(&db) {
            return reply::error(reply::DB_OUT_OF_RANGE);
        }
        // Opening the pooled connection for that database runs SELECT
        // upstream, which checks the index against the server's databases.
        let addr = match main.primary() {
            Ok(addr) => addr,
            Err(error) => return error,
        };
        let key = ConnKey {
            addr,
            protocol: self.ctx.protocol,
            db: db as u32,
        };
        match main.pool.shared(&key, self.ctx.client_id as usize).await {
            Ok(_) => {
                self.client_db = db as u32;
                self.use_route(MAIN);
                reply::ok()
            }
            Err(UpstreamError::Handshake { message, .. }) => reply::error(&message),
            Err(err) => reply::error(&format!("ERR {err}")),
        }
    }

    fn client(&mut self, request: &Request) -> Bytes {
        let args = &request.args;
        let sub = request.arg_upper(1).unwrap_or_default();
        match (sub.as_str(), args.len()) {
            ("ID", 2) => reply::integer(self.ctx.client_id as i64),
            ("GETNAME", 2) => match &self.name {
                Some(name) => reply::bulk(name),
                None => reply::null(self.ctx.protocol),
            },
            ("SETNAME", 3) => {
                if !valid_client_name(&args[2]) {
                    return reply::error(reply::BAD_CLIENT_NAME);
                }
                self.name = (!args[2].is_empty()).then(|| args[2].clone());
                reply::ok()
            }
            ("SETINFO", 4) => match request.arg_upper(2).as_deref() {
                Some("LIB-NAME") | Some("LIB-VER") => reply::ok(),
                _ => reply::error(&format!(
                    "ERR Unrecognized option '{}'",
                    String::from_utf8_lossy(&args[2])
                )),
            },
            ("INFO", 2) => reply::bulk(self.client_info().as_bytes()),
            ("TRACKINGINFO", 2) => self.tracking_info(),
            ("GETREDIR", 2) => reply::integer(if self.tracking.is_some() { 0 } else { -1 }),
            ("CACHING", 3) => reply::error(
                "ERR CLIENT CACHING can be called only when the client is in tracking mode \
                 with OPTIN or OPTOUT mode enabled",
            ),
            ("LIST", 2) => reply::bulk(self.client_info().as_bytes()),
            ("NO-EVICT", 3) | ("NO-TOUCH", 3) => reply::ok(),
            _ => reply::error(&format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(args.get(1).map(|a| &a[..]).unwrap_or(b""))
            )),
        }
    }

    fn client_info(&self) -> String {
        let name = self
            .name
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let resp = if self.ctx.protocol == Protocol::Resp3 {
            3
        } else {
            2
        };
        format!(
            "id={} addr={} name={} db={} resp={}\n",
            self.ctx.client_id, self.peer, name, self.client_db, resp
        )
    }

    /// Handles `CLIENT TRACKING ON|OFF [NOLOOP]`. Tracking is offered in
    /// its default mode over RESP3, which is what client-side caches such
    /// as redis-py's use; the other options are rejected.
    async fn client_tracking(&mut self, request: &Request) -> Flow {
        let args = &request.args;
        let Some(mode) = request.arg_upper(2) else {
            return self
                .reply(reply::error(&reply::wrong_arity("client|tracking")))
                .await;
        };
        for index in 3..args.len() {
            match request.arg_upper(index).as_deref() {
                // Skipping invalidations of the client's own writes is an
                // optimisation; sending them as well is still correct.
                Some("NOLOOP") => {}
                Some(option @ ("REDIRECT" | "BCAST" | "PREFIX" | "OPTIN" | "OPTOUT")) => {
                    let text = format!(
                        "ERR CLIENT TRACKING {option} is not supported through skiff; \
                         use CLIENT TRACKING ON over RESP3"
                    );
                    return self.reply(reply::error(&text)).await;
                }
                _ => return self.reply(reply::error(reply::SYNTAX)).await,
            }
        }
        match mode.as_str() {
            "ON" if self.ctx.protocol == Protocol::Resp2 => {
                let text = "ERR CLIENT TRACKING through skiff needs RESP3: send HELLO 3 first, \
                            because skiff delivers invalidations as push messages";
                self.reply(reply::error(text)).await
            }
            "ON" => {
                if self.tracking.is_none() {
                    let tracking = ClientTracking::new(self.ctx.client_id);
                    if self.send(Outgoing::Track(tracking.clone())).await == Flow::Close {
                        return Flow::Close;
                    }
                    // Every router's cache, because a read may go to any
                    // route and that route's servers report its changes.
                    for router in self.routes.all() {
                        router.cache.track_client(tracking.clone());
                    }
                    self.tracking = Some(tracking);
                }
                self.reply(reply::ok()).await
            }
            "OFF" => {
                self.stop_tracking();
                self.reply(reply::ok()).await
            }
            _ => self.reply(reply::error(reply::SYNTAX)).await,
        }
    }

    fn tracking_info(&self) -> Bytes {
        let protocol = self.ctx.protocol;
        let (flag, redirect) = match self.tracking {
            Some(_) => ("on", 0),
            None => ("off", -1),
        };
        let mut out = BytesMut::new();
        reply::put_map_header(&mut out, protocol, 3);
        out.extend_from_slice(&reply::bulk(b"flags"));
        out.extend_from_slice(&reply::array(&[reply::bulk(flag.as_bytes())]));
        out.extend_from_slice(&reply::bulk(b"redirect"));
        out.extend_from_slice(&reply::integer(redirect));
        out.extend_from_slice(&reply::bulk(b"prefixes"));
        out.extend_from_slice(&reply::array(&[]));
        out.freeze()
    }

    /// Returns the session to its state right after connecting.
    pub(super) fn reset(&mut self) -> Bytes {
        self.stop_tracking();
        self.transaction = None;
        self.name = None;
        self.client_db = 0;
        self.use_route(MAIN);
        self.ctx.protocol = Protocol::Resp2;
        self.authenticated = self.routes.main().config().client_password.is_none();
        reply::simple("RESET")
    }

    /// Confirms an unsubscribe from a client with no subscriptions, one
    /// reply per channel, as Redis does.
    fn unsubscribe_none(&self, request: &Request) -> Bytes {
        let kind = String::from_utf8_lossy(&request.args[0]).to_ascii_lowercase();
        let channels: Vec<Option<&Bytes>> = match request.args.len() {
            1 => vec![None],
            _ => request.args[1..].iter().map(Some).collect(),
        };
        let mut out = BytesMut::new();
        for channel in channels {
            let confirmation =
                unsubscribe_confirmation(kind.as_bytes(), channel, 0, self.ctx.protocol);
            out.extend_from_slice(&confirmation);
        }
        out.freeze()
    }
}

/// Arguments of `HELLO [protover [AUTH user pass] [SETNAME name]]`.
struct HelloOptions {
    protocol: Protocol,
    credentials: Option<(Bytes, Bytes)>,
    name: Option<Bytes>,
}

impl HelloOptions {
    /// Parses HELLO's arguments; `Err` is the error reply, in Redis's words.
    fn parse(args: &[Bytes], current: Protocol) -> Result<HelloOptions, Bytes> {
        let mut hello = HelloOptions {
            protocol: current,
            credentials: None,
            name: None,
        };
        if let Some(version) = args.get(1) {
            let version = std::str::from_utf8(version)
                .ok()
                .and_then(|v| v.parse::<i64>().ok());
            hello.protocol = match version {
                Some(2) => Protocol::Resp2,
                Some(3) => Protocol::Resp3,
                Some(_) => return Err(reply::error(reply::NOPROTO)),
                None => {
                    let text = "ERR Protocol version is not an integer or out of range";
                    return Err(reply::error(text));
                }
            };
        }
        let mut index = 2;
        while index < args.len() {
            let option = String::from_utf8_lossy(&args[index]).to_ascii_uppercase();
            match option.as_str() {
                "AUTH" if index + 2 < args.len() => {
                    hello.credentials = Some((args[index + 1].clone(), args[index + 2].clone()));
                    index += 3;
                }
                "SETNAME" if index + 1 < args.len() => {
                    hello.name = Some(args[index + 1].clone());
                    index += 2;
                }
                _ => {
                    let option = String::from_utf8_lossy(&args[index]);
                    let text = format!("ERR Syntax error in HELLO option '{option}'");
                    return Err(reply::error(&text));
                }
            }
        }
        Ok(hello)
    }
}

/// Client names are printable ASCII without spaces, as Redis requires.
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
