//! A strict stand-in for SLS PutLogs on 127.0.0.1: it checks every request
//! the way the service does (Host, path, headers, Content-MD5, V1 or V4
//! signature, LZ4 body, protobuf LogGroup), records what it accepted, and
//! injects failures on request.
//!
//! It keeps its own protobuf types and signature code, so a mistake in
//! skiff's is not repeated here.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, PartialEq, prost::Message)]
pub struct MockContent {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MockLog {
    #[prost(uint32, required, tag = "1")]
    pub time: u32,
    #[prost(message, repeated, tag = "2")]
    pub contents: Vec<MockContent>,
    #[prost(fixed32, optional, tag = "4")]
    pub time_ns: Option<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MockTag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MockLogGroup {
    #[prost(message, repeated, tag = "1")]
    pub logs: Vec<MockLog>,
    #[prost(string, optional, tag = "2")]
    pub reserved: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub topic: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub source: Option<String>,
    #[prost(message, repeated, tag = "6")]
    pub log_tags: Vec<MockTag>,
}

impl MockLog {
    /// Returns the value of the first content named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.contents
            .iter()
            .find(|c| c.key == key)
            .map(|c| c.value.as_str())
    }
}

/// What the mock does with the next request that passes its checks.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Reply with this status and SLS error code and message.
    Status(u16, &'static str, &'static str),
    /// Wait this long, then accept (the client may have given up by then).
    Slow(Duration),
    /// Close the connection without replying.
    Drop,
}

/// A log group the mock accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub project: String,
    pub logstore: String,
    pub group: MockLogGroup,
}

/// Credentials and project the mock expects.
#[derive(Debug, Clone)]
pub struct MockSlsConfig {
    pub project: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    pub security_token: Option<String>,
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    fail_all: Option<Fault>,
    accepted: Vec<Accepted>,
    violations: Vec<String>,
    requests: usize,
}

/// The running mock.
pub struct MockSls {
    pub addr: SocketAddr,
    config: MockSlsConfig,
    state: Arc<Mutex<State>>,
    connections: Arc<AtomicUsize>,
}

impl MockSls {
    /// Starts the mock on 127.0.0.1 with an OS-chosen port.
    pub async fn start(config: MockSlsConfig) -> MockSls {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let connections = Arc::new(AtomicUsize::new(0));
        let server = Server {
            config: config.clone(),
            state: state.clone(),
            port: addr.port(),
        };
        let server = Arc::new(server);
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::spawn(async move { server.connection(stream).await });
            }
        });
        MockSls {
            addr,
            config,
            state,
            connections,
        }
    }

    /// Returns the endpoint URL to put in `[logship.sls] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues faults for the next requests, one each, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    /// Fails every request with `fault` until cleared with `None`.
    pub fn fail_all(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().fail_all = fault;
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.state.lock().unwrap().accepted.clone()
    }

    /// Returns every accepted log with its logstore.
    pub fn logs(&self) -> Vec<(String, MockLog)> {
        let state = self.state.lock().unwrap();
        let mut logs = Vec::new();
        for accepted in &state.accepted {
            for log in &accepted.group.logs {
                logs.push((accepted.logstore.clone(), log.clone()));
            }
        }
        logs
    }

    /// Requests that failed a check, with the reason.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` logs are accepted, or panics after
    /// `timeout` with what arrived.
    pub async fn wait_for_logs(&self, count: usize, timeout: Duration) -> Vec<(String, MockLog)> {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.len() >= count {
                return logs;
            }
            if Instant::now() > deadline {
                panic!(
                    "mock SLS got {} of {count} logs in {timeout:?}; violations: {:?}",
                    logs.len(),
                    self.violations()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn project(&self) -> &str {
        &self.config.project
    }
}

struct Server {
    config: MockSlsConfig,
    state: Arc<Mutex<State>>,
    port: u16,
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    header_order: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Server {
    async fn connection(&self, mut stream: TcpStream) {
        let mut buffer = Vec::new();
        loop {
            let Some(request) = read_request(&mut stream, &mut buffer).await else {
                return;
            };
            let (status, code, message) = match self.check(&request) {
                Err((status, code, message)) => {
                    self.state
                        .lock()
                        .unwrap()
                        .violations
                        .push(format!("{code}: {message}"));
                    (status, code, message)
                }
                Ok(accepted) => {
                    let fault = {
                        let mut state = self.state.lock().unwrap();
                        state.requests += 1;
                        state.faults.pop_front().or_else(|| state.fail_all.clone())
                    };
                    match fault {
                        Some(Fault::Drop) => return,
                        Some(Fault::Status(status, code, message)) => {
                            (status, code, message.to_string())
                        }
                        Some(Fault::Slow(delay)) => {
                            tokio::time::sleep(delay).await;
                            self.state.lock().unwrap().accepted.push(accepted);
                            (200, "", String::new())
                        }
                        None => {
                            self.state.lock().unwrap().accepted.push(accepted);
                            (200, "", String::new())
                        }
                    }
                }
            };
            let body = if status == 200 {
                String::new()
            } else {
                serde_json::json!({ "errorCode": code, "errorMessage": message }).to_string()
            };
            let response = format!(
                "HTTP/1.1 {status} X\r\nx-log-requestid: MOCK{:08X}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{body}",
                rand::random::<u32>(),
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// Checks a request as SLS would; returns the decoded log group or the
    /// status, error code and message SLS would send.
    fn check(&self, request: &Request) -> Result<Accepted, (u16, &'static str, String)> {
        let bad = |code: &'static str, message: String| Err((400, code, message));
        let header = |name: &str| request.headers.get(name).map(String::as_str);
        if request.method != "POST" {
            return bad("MethodNotAllowed", request.method.clone());
        }
        let logstore = request
            .path
            .strip_prefix("/logstores/")
            .and_then(|rest| rest.strip_suffix("/shards/lb"));
        let Some(logstore) = logstore else {
            return bad("InvalidPath", request.path.clone());
        };
        let expected_host = format!("{}.127.0.0.1", self.config.project);
        if header("host") != Some(expected_host.as_str()) {
            return bad(
                "ProjectNotExist",
                format!("host {:?} (port {})", header("host"), self.port),
            );
        }
        for (name, value) in [
            ("content-type", "application/x-protobuf"),
            ("x-log-apiversion", "0.6.0"),
            ("x-log-compresstype", "lz4"),
        ] {
            if header(name) != Some(value) {
                return bad("InvalidHeader", format!("{name} is {:?}", header(name)));
            }
        }
        if header("content-length") != Some(request.body.len().to_string().as_str()) {
            return bad("InvalidHeader", "content-length".into());
        }
        let md5: String = md5::Md5::digest(&request.body)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        if header("content-md5") != Some(md5.as_str()) {
            return bad(
                "InvalidContentMD5",
                format!("{:?} != {md5}", header("content-md5")),
            );
        }
        if header("x-acs-security-token") != self.config.security_token.as_deref() {
            return Err((
                401,
                "SecurityTokenInvalid",
                format!("{:?}", header("x-acs-security-token")),
            ));
        }
        self.check_signature(request)?;
        let raw_size: usize = header("x-log-bodyrawsize")
            .and_then(|v| v.parse().ok())
            .ok_or((400, "InvalidHeader", "x-log-bodyrawsize".to_string()))?;
        let raw = lz4_flex::block::decompress(&request.body, raw_size)
            .map_err(|err| (400, "PostBodyUncompressError", err.to_string()))?;
        if raw.len() != raw_size {
            return bad("PostBodyUncompressError", "raw size mismatch".into());
        }
        if raw_size > 5 * 1024 * 1024 {
            return bad("PostBodyTooLarge", raw_size.to_string());
        }
        let group = MockLogGroup::decode(raw.as_slice())
            .map_err(|err| (400, "PostBodyInvalid", err.to_string()))?;
        if group.logs.is_empty() || group.logs.len() > 4096 {
            return bad("PostBodyInvalid", format!("{} logs", group.logs.len()));
        }
        Ok(Accepted {
            project: self.config.project.clone(),
            logstore: logstore.to_string(),
            group,
        })
    }

    fn check_signature(&self, request: &Request) -> Result<(), (u16, &'static str, String)> {
        let header = |name: &str| request.headers.get(name).map(String::as_str).unwrap_or("");
        let authorization = header("authorization");
        let mismatch = |what: &str| Err((401, "SignatureNotMatch", what.to_string()));
        if let Some(rest) = authorization.strip_prefix("LOG ") {
            let Some((key_id, signature)) = rest.split_once(':') else {
                return mismatch("malformed authorization");
            };
            if key_id != self.config.access_key_id || header("x-log-signaturemethod") != "hmac-sha1"
            {
                return Err((401, "Unauthorized", key_id.to_string()));
            }
            let date = httpdate::parse_http_date(header("date"))
                .map_err(|_| (400, "InvalidDate", header("date").to_string()))?;
            let skew = SystemTime::now().duration_since(date).unwrap_or_default();
            if skew > Duration::from_secs(900) {
                return Err((403, "RequestTimeTooSkewed", header("date").to_string()));
            }
            let mut text = format!(
                "POST\n{}\n{}\n{}\n",
                header("content-md5"),
                header("content-type"),
                header("date")
            );
            let mut signed: Vec<&(String, String)> = request
                .header_order
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("x-acs-")
                        || (k.starts_with("x-log-") && !k.starts_with("x-log-meta-"))
                })
                .collect();
            signed.sort();
            for (key, value) in signed {
                text.push_str(&format!("{key}:{value}\n"));
            }
            text.push_str(&request.path);
            let mut mac =
                Hmac::<sha1::Sha1>::new_from_slice(self.config.access_key_secret.as_bytes())
                    .unwrap();
            mac.update(text.as_bytes());
            let expected =
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            return if expected == signature {
                Ok(())
            } else {
                mismatch("v1")
            };
        }
        if let Some(rest) = authorization.strip_prefix("SLS4-HMAC-SHA256 Credential=") {
            let Some((credential, signature)) = rest.split_once(",Signature=") else {
                return mismatch("malformed v4 authorization");
            };
            let parts: Vec<&str> = credential.split('/').collect();
            if parts.len() != 5
                || parts[0] != self.config.access_key_id
                || parts[3] != "sls"
                || parts[4] != "aliyun_v4_request"
            {
                return Err((401, "Unauthorized", credential.to_string()));
            }
            let (date, region) = (parts[1], parts[2]);
            let date_time = header("x-log-date");
            let body_sha: String = Sha256::digest(&request.body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if !date_time.starts_with(date) || header("x-log-content-sha256") != body_sha {
                return mismatch("v4 date or content sha256");
            }
            let mut signed: Vec<(&str, &str)> = request
                .header_order
                .iter()
                .filter(|(k, _)| {
                    k == "host"
                        || k == "content-type"
                        || k.starts_with("x-acs-")
                        || (k.starts_with("x-log-") && !k.starts_with("x-log-meta-"))
                })
                .map(|(k, v)| (k.as_str(), v.trim()))
                .collect();
            signed.sort();
            let canonical_headers: String =
                signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
            let names: Vec<&str> = signed.iter().map(|(k, _)| *k).collect();
            let canonical = format!(
                "POST\n{}\n\n{canonical_headers}\n{}\n{body_sha}",
                request.path,
                names.join(";")
            );
            let canonical_sha: String = Sha256::digest(canonical.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let scope = format!("{date}/{region}/sls/aliyun_v4_request");
            let to_sign = format!("SLS4-HMAC-SHA256\n{date_time}\n{scope}\n{canonical_sha}");
            let mut key = format!("aliyun_v4{}", self.config.access_key_secret).into_bytes();
            for part in [date, region, "sls", "aliyun_v4_request", to_sign.as_str()] {
                let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
                mac.update(part.as_bytes());
                key = mac.finalize().into_bytes().to_vec();
            }
            let expected: String = key.iter().map(|b| format!("{b:02x}")).collect();
            return if expected == signature {
                Ok(())
            } else {
                mismatch("v4")
            };
        }
        Err((401, "Unauthorized", "no authorization".into()))
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body; `None` on EOF or
/// a malformed request.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Request> {
    let header_end = loop {
        if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buffer.len() > 1 << 20 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..header_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_string();
    let path = request_line.next()?.to_string();
    let mut headers = HashMap::new();
    let mut header_order = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        headers.insert(name.clone(), value.clone());
        header_order.push((name, value));
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body_start = header_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    buffer.drain(..body_start + length);
    Some(Request {
        method,
        path,
        headers,
        header_order,
        body,
    })
}
