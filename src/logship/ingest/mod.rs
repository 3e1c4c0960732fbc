//! The PutLogs-compatible ingest endpoint: SLS SDKs post log groups here as
//! they would to SLS. Each request's signature (V1 or V4) is checked
//! against the configured credentials, the body is decompressed (lz4,
//! deflate or none) and checked, and the records go through the batcher,
//! still encoded as the client sent them unless their form is unusual.
//! The reply is 200 only once every record is durable in the spool.

mod auth;
mod body;
mod listener;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use prost::Message;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{IngestConfig, SlsConfig};
use crate::logship::batcher::{EncodedLogs, Shipper, SubmitError};
use crate::logship::proto::{split_plain_log_group, LogGroup};
use crate::logship::record::{validate_logstore, GroupKey, Record};
use crate::logship::sign;

/// State shared by the handlers: credentials, limits and the shipper.
pub struct IngestState {
    /// Replaced by a config reload.
    credentials: ArcSwap<Credentials>,
    max_body_bytes: usize,
    /// Time a request has for its turn and its body, and for its headers.
    body_timeout: std::time::Duration,
    shipper: Shipper,
    /// One permit per request in progress.
    permits: tokio::sync::Semaphore,
}

/// The AccessKey pair clients sign with.
pub struct Credentials {
    pub access_key_id: String,
    pub access_key_secret: String,
}

impl Credentials {
    /// Takes the pair from `[logship.ingest]` when set, else from
    /// `[logship.sls]`.
    fn from_config(config: &IngestConfig, sls: Option<&SlsConfig>) -> Credentials {
        let (access_key_id, access_key_secret) =
            match (&config.access_key_id, &config.access_key_secret) {
                (Some(id), Some(secret)) => (id.clone(), secret.clone()),
                _ => sls
                    .map(|s| (s.access_key_id.clone(), s.access_key_secret.clone()))
                    .unwrap_or_default(),
            };
        Credentials {
            access_key_id,
            access_key_secret,
        }
    }
}

impl IngestState {
    /// Switches to the credentials of a reloaded config; requests already
    /// checked are not affected.
    pub fn reload_credentials(&self, config: &IngestConfig, sls: Option<&SlsConfig>) {
        self.credentials
            .store(Arc::new(Credentials::from_config(config, sls)));
    }

    pub fn credentials(&self) -> arc_swap::Guard<Arc<Credentials>> {
        self.credentials.load()
    }

    /// Creates the state with credentials from `[logship.ingest]` when set,
    /// else from `[logship.sls]`. Config validation ensures one of them is
    /// present.
    pub fn new(
        config: &IngestConfig,
        sls: Option<&SlsConfig>,
        shipper: Shipper,
    ) -> Arc<IngestState> {
        Arc::new(IngestState {
            credentials: ArcSwap::from_pointee(Credentials::from_config(config, sls)),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
            shipper,
            permits: tokio::sync::Semaphore::new(config.max_concurrent_requests),
        })
    }
}

/// Serves the endpoint until `shutdown` fires; requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    max_connections: usize,
    idle_timeout: std::time::Duration,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
) {
    let listener =
        listener::LimitedListener::new(listener, max_connections, idle_timeout, state.body_timeout);
    let permits_state = state.clone();
    let app = Router::new()
        .route("/logstores/{logstore}/shards/lb", post(put_logs))
        .route("/logstores/{logstore}/shards/route", post(put_logs))
        .route("/logstores/{logstore}", post(put_logs))
        .fallback(unsupported)
        .with_state(state);
    let app = app.into_make_service_with_connect_info::<listener::Activity>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            // Requests still waiting for a slot get ServerBusy at once.
            permits_state.permits.close();
        })
        .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "logship ingest endpoint failed");
    }
}

/// An error reply in SLS's form.
#[derive(Debug)]
pub(super) struct SlsError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

pub(super) fn sls_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> SlsError {
    SlsError {
        status,
        code,
        message: message.into(),
    }
}

fn reply(request_id: &str, result: Result<(), SlsError>) -> Response {
    match result {
        Ok(()) => (
            StatusCode::OK,
            [("x-log-requestid", request_id.to_string())],
        )
            .into_response(),
        Err(err) => {
            tracing::debug!(code = err.code, message = %err.message, request_id, "ingest request rejected");
            metrics::counter!("skiff_logship_ingest_errors_total", "code" => err.code).increment(1);
            let body = serde_json::json!({ "errorCode": err.code, "errorMessage": err.message });
            let mut response = (
                err.status,
                [
                    ("x-log-requestid", request_id.to_string()),
                    ("content-type", "application/json".to_string()),
                ],
                body.to_string(),
            )
                .into_response();
            // The rest of such a body is not read, so the connection cannot
            // carry another request.
            if matches!(
                err.status,
                StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE
            ) {
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            response
        }
    }
}

fn new_request_id() -> String {
    let bytes: [u8; 12] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

async fn unsupported(method: Method, uri: Uri) -> Response {
    let err = sls_error(
        StatusCode::NOT_FOUND,
        "RequestNotSupported",
        format!(
            "{method} {} is not supported; this endpoint accepts PutLogs only",
            uri.path()
        ),
    );
    reply(&new_request_id(), Err(err))
}

async fn put_logs(
    State(state): State<Arc<IngestState>>,
    ConnectInfo(activity): ConnectInfo<listener::Activity>,
    Path(logstore): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = new_request_id();
    // The wait for a request slot and the body share one deadline, so
    // clients that stall their bodies hold up a queued request for at most
    // body_timeout. Waiting for a slot is skiff's delay, not an idle client.
    let deadline = tokio::time::Instant::now() + state.body_timeout;
    let waiting = activity.begin();
    let permit = tokio::time::timeout_at(deadline, state.permits.acquire()).await;
    drop(waiting);
    let _permit = match permit {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => {
            let err = sls_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServerBusy",
                "shutting down",
            );
            return reply(&request_id, Err(err));
        }
        Err(_) => {
            let err = sls_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServerBusy",
                "every request slot stayed busy for body_timeout; retry later",
            );
            return reply(&request_id, Err(err));
        }
    };
    let result = handle(&state, &activity, &logstore, &uri, &headers, body, deadline).await;
    reply(&request_id, result)
}

async fn handle(
    state: &IngestState,
    activity: &listener::Activity,
    logstore: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    deadline: tokio::time::Instant,
) -> Result<(), SlsError> {
    // A client that stalls while sending the body is idle, so the body is
    // read before the request counts as being handled.
    let body = body::read(body, state.max_body_bytes, deadline).await?;
    let _handling = activity.begin();
    let raw = check_request(state, logstore, uri, headers, &body)?;
    let project = project_from_host(header_text(headers, "host"));

    // The logs of a usual request go to the spool as the client encoded
    // them, because decoding and encoding each log again took a third of
    // the CPU of the ingest path.
    if let Some(group) = split_plain_log_group(&raw) {
        metrics::counter!("skiff_logship_ingest_records_total").increment(group.ends.len() as u64);
        let logs = EncodedLogs {
            key: GroupKey {
                project,
                logstore: logstore.to_string(),
                topic: group.topic,
                source: group.source,
                tags: group.tags,
            },
            logs: group.logs,
            ends: group.ends,
        };
        return state
            .shipper
            .submit_encoded(logs)
            .await
            .map_err(submit_error);
    }
    let group = LogGroup::decode(raw.as_slice()).map_err(|err| {
        sls_error(
            StatusCode::BAD_REQUEST,
            "PostBodyInvalid",
            format!("body is not a valid LogGroup: {err}"),
        )
    })?;
    let records = to_records(group, project, logstore);
    metrics::counter!("skiff_logship_ingest_records_total").increment(records.len() as u64);
    state.shipper.submit(records).await.map_err(submit_error)
}

/// Checks the content type, signature, Content-MD5 and logstore name, then
/// decompresses the body.
fn check_request(
    state: &IngestState,
    logstore: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<u8>, SlsError> {
    let content_type = header_text(headers, "content-type");
    if !content_type.eq_ignore_ascii_case("application/x-protobuf") {
        return Err(sls_error(
            StatusCode::BAD_REQUEST,
            "InvalidContentType",
            format!("content type {content_type:?} is not supported; use application/x-protobuf"),
        ));
    }
    auth::verify_signature(state, "POST", uri, &header_pairs(headers), body)?;

    let md5 = header_text(headers, "content-md5");
    if !md5.is_empty() && !md5.eq_ignore_ascii_case(&sign::content_md5(body)) {
        return Err(sls_error(
            StatusCode::BAD_REQUEST,
            "PostBodyInvalid",
            "Content-MD5 does not match the body",
        ));
    }
    validate_logstore(logstore)
        .map_err(|err| sls_error(StatusCode::BAD_REQUEST, "ParameterInvalid", err))?;

    body::decompress(
        body,
        header_text(headers, "x-log-compresstype"),
        header_text(headers, "x-log-bodyrawsize"),
        state.max_body_bytes,
    )
}

/// Maps a batcher error to the SLS reply: a full spool or a shutdown is
/// `ServerBusy` (503), which SDKs retry.
fn submit_error(err: SubmitError) -> SlsError {
    match err {
        SubmitError::SpoolFull { .. } | SubmitError::Closed => sls_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServerBusy",
            err.to_string(),
        ),
        SubmitError::InvalidRecord(_) => {
            sls_error(StatusCode::BAD_REQUEST, "PostBodyInvalid", err.to_string())
        }
        SubmitError::Spool(_) => sls_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            err.to_string(),
        ),
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect()
}

/// Extracts the project an SDK addressed: the first label of
/// `{project}.{endpoint}`. A bare IP address, a name without a dot, or a
/// label that is not a valid SLS project name (3 to 63 lowercase letters,
/// digits and `-`) gives `None`, so the sink's configured project is used.
fn project_from_host(host: &str) -> Option<String> {
    let without_port = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if without_port.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let (project, rest) = without_port.split_once('.')?;
    let valid = (3..=63).contains(&project.len())
        && project
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (valid && !rest.is_empty()).then(|| project.to_string())
}

fn to_records(group: LogGroup, project: Option<String>, logstore: &str) -> Vec<Record> {
    let tags: Vec<(String, String)> = group
        .log_tags
        .into_iter()
        .map(|t| (t.key, t.value))
        .collect();
    let topic = group.topic.unwrap_or_default();
    let source = group.source.unwrap_or_default();
    group
        .logs
        .into_iter()
        .map(|log| Record {
            project: project.clone(),
            logstore: logstore.to_string(),
            topic: topic.clone(),
            source: source.clone(),
            tags: tags.clone(),
            time_ns: u64::from(log.time) * 1_000_000_000 + u64::from(log.time_ns.unwrap_or(0)),
            contents: log.contents.into_iter().map(|c| (c.key, c.value)).collect(),
        })
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_is_first_host_label() {
        assert_eq!(
            project_from_host("dify-logs.127.0.0.2").as_deref(),
            Some("dify-logs")
        );
        assert_eq!(
            project_from_host("dify-logs.localhost:9931").as_deref(),
            Some("dify-logs")
        );
        assert_eq!(project_from_host("localhost"), None);
        assert_eq!(project_from_host("127.0.0.2"), None);
        assert_eq!(project_from_host("127.0.0.2:80"), None);
        assert_eq!(project_from_host("Bad_Name.example.com"), None);
    }
}
