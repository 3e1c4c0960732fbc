//! The PutLogs-compatible ingest endpoint: SLS SDKs post log groups here as
//! they would to SLS. Each request's signature (V1 or V4) is checked
//! against the configured credentials, the body is decompressed (lz4,
//! deflate or none) and decoded, and the records go through the batcher.
//! The reply is 200 only once every record is durable in the spool.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use prost::Message;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::batcher::{Shipper, SubmitError};
use super::proto::LogGroup;
use super::record::{validate_logstore, Record};
use super::sign::{self, V4Request, V4_ALGORITHM};
use super::time::parse_v4_date_time;
use crate::config::{IngestConfig, SlsConfig};

/// Largest difference between a request's date and ours that SLS accepts.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// State shared by the handlers: credentials, limits and the shipper.
pub struct IngestState {
    access_key_id: String,
    access_key_secret: String,
    max_body_bytes: usize,
    shipper: Shipper,
    /// One permit per request in progress.
    permits: tokio::sync::Semaphore,
}

impl IngestState {
    /// Takes credentials from `[logship.ingest]` when set, else from
    /// `[logship.sls]`. Config validation ensures one of them is present.
    pub fn new(
        config: &IngestConfig,
        sls: Option<&SlsConfig>,
        shipper: Shipper,
    ) -> Arc<IngestState> {
        let (access_key_id, access_key_secret) =
            match (&config.access_key_id, &config.access_key_secret) {
                (Some(id), Some(secret)) => (id.clone(), secret.clone()),
                _ => sls
                    .map(|s| (s.access_key_id.clone(), s.access_key_secret.clone()))
                    .unwrap_or_default(),
            };
        Arc::new(IngestState {
            access_key_id,
            access_key_secret,
            max_body_bytes: config.max_body_bytes,
            shipper,
            permits: tokio::sync::Semaphore::new(config.max_concurrent_requests),
        })
    }
}

/// Serves the endpoint until `shutdown` fires; requests in progress finish.
pub async fn serve(listener: TcpListener, state: Arc<IngestState>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/logstores/{logstore}/shards/lb", post(put_logs))
        .route("/logstores/{logstore}/shards/route", post(put_logs))
        .route("/logstores/{logstore}", post(put_logs))
        .fallback(unsupported)
        .with_state(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "logship ingest endpoint failed");
    }
}

/// An error reply in SLS's form.
#[derive(Debug)]
struct SlsError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn sls_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> SlsError {
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
            (
                err.status,
                [
                    ("x-log-requestid", request_id.to_string()),
                    ("content-type", "application/json".to_string()),
                ],
                body.to_string(),
            )
                .into_response()
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
    Path(logstore): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = new_request_id();
    let Ok(_permit) = state.permits.acquire().await else {
        let err = sls_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServerBusy",
            "shutting down",
        );
        return reply(&request_id, Err(err));
    };
    let result = handle(&state, &logstore, &uri, &headers, body).await;
    reply(&request_id, result)
}

async fn handle(
    state: &IngestState,
    logstore: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), SlsError> {
    let body = axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| {
            sls_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PostBodyTooLarge",
                format!("body exceeds {} bytes", state.max_body_bytes),
            )
        })?;
    let pairs = header_pairs(headers);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let content_type = header("content-type");
    if !content_type.eq_ignore_ascii_case("application/x-protobuf") {
        return Err(sls_error(
            StatusCode::BAD_REQUEST,
            "InvalidContentType",
            format!("content type {content_type:?} is not supported; use application/x-protobuf"),
        ));
    }
    verify_signature(state, "POST", uri, &pairs, &body)?;
    let md5 = header("content-md5");
    if !md5.is_empty() && !md5.eq_ignore_ascii_case(&sign::content_md5(&body)) {
        return Err(sls_error(
            StatusCode::BAD_REQUEST,
            "PostBodyInvalid",
            "Content-MD5 does not match the body",
        ));
    }
    validate_logstore(logstore)
        .map_err(|err| sls_error(StatusCode::BAD_REQUEST, "ParameterInvalid", err))?;
    let raw = decompress(
        &body,
        header("x-log-compresstype"),
        header("x-log-bodyrawsize"),
        state.max_body_bytes,
    )?;
    let group = LogGroup::decode(raw.as_slice()).map_err(|err| {
        sls_error(
            StatusCode::BAD_REQUEST,
            "PostBodyInvalid",
            format!("body is not a valid LogGroup: {err}"),
        )
    })?;
    let project = project_from_host(header("host"));
    let records = to_records(group, project, logstore);
    metrics::counter!("skiff_logship_ingest_records_total").increment(records.len() as u64);
    state
        .shipper
        .submit(records)
        .await
        .map_err(|err| match err {
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
        })
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
/// `{project}.{endpoint}`.
fn project_from_host(host: &str) -> Option<String> {
    let (project, rest) = host.split_once('.')?;
    (!project.is_empty() && !rest.is_empty()).then(|| project.to_string())
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

fn decompress(
    body: &[u8],
    compress_type: &str,
    raw_size: &str,
    limit: usize,
) -> Result<Vec<u8>, SlsError> {
    let invalid = |message: String| sls_error(StatusCode::BAD_REQUEST, "PostBodyInvalid", message);
    let raw_size = if raw_size.is_empty() {
        None
    } else {
        let size = raw_size
            .parse::<usize>()
            .map_err(|_| invalid(format!("x-log-bodyrawsize {raw_size:?} is not a number")))?;
        if size > limit {
            return Err(sls_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PostBodyTooLarge",
                format!("raw body of {size} bytes exceeds {limit} bytes"),
            ));
        }
        Some(size)
    };
    let raw = match compress_type.to_ascii_lowercase().as_str() {
        "" | "none" => body.to_vec(),
        "lz4" => {
            let size =
                raw_size.ok_or_else(|| invalid("lz4 body needs x-log-bodyrawsize".into()))?;
            lz4_flex::block::decompress(body, size)
                .map_err(|err| invalid(format!("lz4 body does not decompress: {err}")))?
        }
        "deflate" => {
            let mut raw = Vec::new();
            flate2::read::ZlibDecoder::new(body)
                .take(limit as u64 + 1)
                .read_to_end(&mut raw)
                .map_err(|err| invalid(format!("deflate body does not decompress: {err}")))?;
            if raw.len() > limit {
                return Err(sls_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PostBodyTooLarge",
                    format!("raw body exceeds {limit} bytes"),
                ));
            }
            raw
        }
        other => {
            return Err(sls_error(
                StatusCode::BAD_REQUEST,
                "UnsupportedCompressType",
                format!("compress type {other:?} is not supported; use lz4, deflate or none"),
            ))
        }
    };
    if let Some(size) = raw_size {
        if raw.len() != size {
            return Err(invalid(format!(
                "body decompresses to {} bytes but x-log-bodyrawsize is {size}",
                raw.len()
            )));
        }
    }
    Ok(raw)
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> SlsError {
    sls_error(StatusCode::UNAUTHORIZED, code, message)
}

/// Checks the request's V1 or V4 signature against the configured key.
fn verify_signature(
    state: &IngestState,
    method: &str,
    uri: &Uri,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), SlsError> {
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let authorization = find("authorization")
        .ok_or_else(|| unauthorized("Unauthorized", "missing Authorization header"))?;
    let query = parse_query(uri.query().unwrap_or(""));
    let resource = uri.path();
    if let Some(credential) = authorization.strip_prefix("LOG ") {
        let (key_id, signature) = credential
            .split_once(':')
            .ok_or_else(|| unauthorized("Unauthorized", "malformed Authorization header"))?;
        check_key_id(state, key_id)?;
        let date = find("date").unwrap_or("");
        let date = httpdate::parse_http_date(date).map_err(|_| {
            unauthorized(
                "Unauthorized",
                format!("missing or invalid Date header {date:?}"),
            )
        })?;
        check_skew(date)?;
        // The Python SDK copies Date into x-log-date after signing, so try
        // without it first; other clients may have signed it.
        let without_date: Vec<(String, String)> = headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("x-log-date"))
            .cloned()
            .collect();
        for candidate in [&without_date, headers] {
            let text = sign::v1_string_to_sign(method, resource, &query, candidate);
            let expected = sign::v1_signature(&state.access_key_secret, &text);
            if sign::constant_time_eq(&expected, signature) {
                return Ok(());
            }
        }
        return Err(unauthorized(
            "SignatureNotMatch",
            "signature of the request does not match",
        ));
    }
    if let Some(rest) = authorization.strip_prefix(V4_ALGORITHM) {
        let (key_id, date, region, signature) =
            parse_v4_authorization(rest.trim()).ok_or_else(|| {
                unauthorized(
                    "Unauthorized",
                    "malformed SLS4-HMAC-SHA256 Authorization header",
                )
            })?;
        check_key_id(state, key_id)?;
        let date_time = find("x-log-date").unwrap_or("");
        let seconds = parse_v4_date_time(date_time).ok_or_else(|| {
            unauthorized(
                "Unauthorized",
                format!("missing or invalid x-log-date {date_time:?}"),
            )
        })?;
        if !date_time.starts_with(date) {
            return Err(unauthorized(
                "SignatureNotMatch",
                "credential date does not match x-log-date",
            ));
        }
        check_skew(UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64))?;
        let content_sha256 = find("x-log-content-sha256").unwrap_or("");
        if content_sha256 != sign::content_sha256(body) {
            return Err(unauthorized(
                "SignatureNotMatch",
                "x-log-content-sha256 does not match the body",
            ));
        }
        let request = V4Request {
            method,
            resource,
            query: &query,
            headers,
            region,
            date_time,
            content_sha256,
        };
        let expected = sign::v4_signature(&state.access_key_secret, &request);
        if sign::constant_time_eq(&expected, signature) {
            return Ok(());
        }
        return Err(unauthorized(
            "SignatureNotMatch",
            "signature of the request does not match",
        ));
    }
    Err(unauthorized(
        "Unauthorized",
        "unsupported Authorization scheme; use LOG or SLS4-HMAC-SHA256",
    ))
}

fn check_key_id(state: &IngestState, key_id: &str) -> Result<(), SlsError> {
    if state.access_key_id.is_empty() || key_id != state.access_key_id {
        return Err(unauthorized(
            "InvalidAccessKeyId",
            format!("AccessKeyId {key_id:?} is not accepted"),
        ));
    }
    Ok(())
}

fn check_skew(date: SystemTime) -> Result<(), SlsError> {
    let now = SystemTime::now();
    let skew = now
        .duration_since(date)
        .or_else(|_| date.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_CLOCK_SKEW {
        return Err(sls_error(
            StatusCode::FORBIDDEN,
            "RequestTimeTooSkewed",
            format!(
                "request time differs from server time by {}s",
                skew.as_secs()
            ),
        ));
    }
    Ok(())
}

/// Splits `Credential={ak}/{date}/{region}/sls/aliyun_v4_request,Signature={hex}`.
fn parse_v4_authorization(text: &str) -> Option<(&str, &str, &str, &str)> {
    let (credential, signature) = text.split_once(',')?;
    let credential = credential.trim().strip_prefix("Credential=")?;
    let signature = signature.trim().strip_prefix("Signature=")?;
    let mut parts = credential.split('/');
    let (key_id, date, region) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next()? != "sls" || parts.next()? != "aliyun_v4_request" || parts.next().is_some() {
        return None;
    }
    Some((key_id, date, region, signature))
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_authorization_parts() {
        let parsed = parse_v4_authorization(
            "Credential=ak/20220808/cn-shanghai/sls/aliyun_v4_request,Signature=abc",
        );
        assert_eq!(parsed, Some(("ak", "20220808", "cn-shanghai", "abc")));
        assert_eq!(
            parse_v4_authorization("Credential=ak/2022,Signature=x"),
            None
        );
    }

    #[test]
    fn project_is_first_host_label() {
        assert_eq!(
            project_from_host("dify-logs.127.0.0.2").as_deref(),
            Some("dify-logs")
        );
        assert_eq!(project_from_host("localhost"), None);
    }

    #[test]
    fn decompress_checks_sizes() {
        let raw = b"hello hello hello hello".to_vec();
        let lz4 = lz4_flex::block::compress(&raw);
        assert_eq!(
            decompress(&lz4, "lz4", &raw.len().to_string(), 1000).unwrap(),
            raw
        );
        assert!(decompress(&lz4, "lz4", "3", 1000).is_err());
        assert!(decompress(&lz4, "lz4", "", 1000).is_err());
        let err = decompress(&lz4, "lz4", "5000", 1000).err().unwrap();
        assert_eq!(err.code, "PostBodyTooLarge");
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut encoder, &raw).unwrap();
        let deflated = encoder.finish().unwrap();
        assert_eq!(decompress(&deflated, "deflate", "", 1000).unwrap(), raw);
        assert_eq!(decompress(&raw, "", "", 1000).unwrap(), raw);
        assert_eq!(
            decompress(&raw, "zstd", "", 1000).err().unwrap().code,
            "UnsupportedCompressType"
        );
    }

    #[test]
    fn query_is_decoded() {
        assert_eq!(
            parse_query("key=a%2Fb&x"),
            vec![("key".into(), "a/b".into()), ("x".into(), "".into())]
        );
    }
}
