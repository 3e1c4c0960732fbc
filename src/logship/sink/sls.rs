//! The SLS sink: PutLogs requests with an LZ4-compressed `LogGroup`, signed
//! with V1 or V4, over one reused HTTP client (HTTPS through rustls, or
//! plain HTTP for an `http://` endpoint URL).

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::SendError;
use crate::config::{SignatureVersion, SlsConfig};
use crate::logship::sign::{self, V4Request};
use crate::logship::spool::SpooledBatch;
use crate::logship::time::v4_date_time;

/// `x-log-apiversion` of every request.
pub const API_VERSION: &str = "0.6.0";

/// Sends batches to SLS.
pub struct SlsSink {
    client: reqwest::Client,
    endpoint: Endpoint,
    config: SlsConfig,
}

/// A parsed `[logship.sls] endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Endpoint {
    /// Parses `host`, `host:port` or `scheme://host[:port][/]`; without a
    /// scheme HTTPS is used.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let text = text.trim();
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None => ("https".to_string(), text),
        };
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "invalid SLS endpoint {text:?}: scheme must be http or https"
            ));
        }
        let authority = rest.trim_end_matches('/');
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("invalid SLS endpoint {text:?}: bad port {port:?}"))?;
                (host.to_string(), Some(port))
            }
            None => (authority.to_string(), None),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "invalid SLS endpoint {text:?}: missing or bad host"
            ));
        }
        Ok(Endpoint { scheme, host, port })
    }

    /// Returns the request URL and `Host` header for `project`. A DNS endpoint is
    /// reached as `{project}.{host}`; an IP endpoint is reached directly,
    /// with `{project}.{ip}` as the `Host` header, as the official SDKs do.
    pub fn target(&self, project: &str, path: &str) -> (String, String) {
        let host_header = format!("{project}.{}", self.host);
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        let connect_host = if self.host.parse::<IpAddr>().is_ok() {
            self.host.clone()
        } else {
            host_header.clone()
        };
        (
            format!("{}://{connect_host}{port}{path}", self.scheme),
            host_header,
        )
    }
}

/// A PutLogs request ready to send.
#[derive(Debug)]
pub struct PreparedRequest {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "errorCode", default)]
    error_code: String,
    #[serde(rename = "errorMessage", default)]
    error_message: String,
}

impl SlsSink {
    /// Builds the sink and its HTTP client.
    pub fn new(config: &SlsConfig) -> Result<SlsSink, String> {
        let endpoint = Endpoint::parse(&config.endpoint)?;
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(55))
            .pool_max_idle_per_host(4)
            .build()
            .map_err(|err| format!("cannot build the HTTP client: {err}"))?;
        Ok(SlsSink {
            client,
            endpoint,
            config: config.clone(),
        })
    }

    /// Builds the signed PutLogs request for `raw`, an encoded `LogGroup`.
    pub fn prepare(
        &self,
        project: &str,
        logstore: &str,
        raw: &[u8],
        now: SystemTime,
    ) -> PreparedRequest {
        let path = format!("/logstores/{logstore}/shards/lb");
        let (url, host) = self.endpoint.target(project, &path);
        let body = lz4_flex::block::compress(raw);
        let mut headers = vec![
            ("Host".to_string(), host),
            (
                "Content-Type".to_string(),
                "application/x-protobuf".to_string(),
            ),
            ("Content-MD5".to_string(), sign::content_md5(&body)),
            ("x-log-apiversion".to_string(), API_VERSION.to_string()),
            ("x-log-bodyrawsize".to_string(), raw.len().to_string()),
            ("x-log-compresstype".to_string(), "lz4".to_string()),
        ];
        if let Some(token) = &self.config.security_token {
            headers.push(("x-acs-security-token".to_string(), token.clone()));
        }
        let authorization = match self.config.signature {
            SignatureVersion::V1 => {
                headers.push(("Date".to_string(), httpdate::fmt_http_date(now)));
                headers.push(("x-log-signaturemethod".to_string(), "hmac-sha1".to_string()));
                let text = sign::v1_string_to_sign("POST", &path, &[], &headers);
                let signature = sign::v1_signature(&self.config.access_key_secret, &text);
                format!("LOG {}:{signature}", self.config.access_key_id)
            }
            SignatureVersion::V4 => {
                let date_time = v4_date_time(now);
                let sha = sign::content_sha256(&body);
                headers.push(("x-log-date".to_string(), date_time.clone()));
                headers.push(("x-log-content-sha256".to_string(), sha.clone()));
                let region = self.config.region.clone().unwrap_or_default();
                let request = V4Request {
                    method: "POST",
                    resource: &path,
                    query: &[],
                    headers: &headers,
                    region: &region,
                    date_time: &date_time,
                    content_sha256: &sha,
                };
                let signature = sign::v4_signature(&self.config.access_key_secret, &request);
                sign::v4_authorization(
                    &self.config.access_key_id,
                    &date_time[..8],
                    &region,
                    &signature,
                )
            }
        };
        headers.push(("Authorization".to_string(), authorization));
        PreparedRequest { url, headers, body }
    }

    /// Sends one batch with PutLogs.
    pub async fn send(&self, batch: &SpooledBatch) -> Result<(), SendError> {
        let key = &batch.header.key;
        let project = key.project.as_deref().unwrap_or(&self.config.project);
        let prepared = self.prepare(project, &key.logstore, &batch.log_group, SystemTime::now());
        let mut request = self.client.post(&prepared.url);
        for (name, value) in &prepared.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let started = Instant::now();
        let result = request.body(prepared.body).send().await;
        let outcome = match result {
            Err(err) => Err(SendError::Retryable(describe_transport_error(&err))),
            Ok(response) => {
                let status = response.status().as_u16();
                let request_id = header_text(&response, "x-log-requestid");
                let body = response.bytes().await.unwrap_or_default();
                if status == 200 {
                    Ok(())
                } else {
                    Err(classify_failure(status, &body, &request_id))
                }
            }
        };
        metrics::histogram!("skiff_logship_putlogs_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

fn header_text(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn describe_transport_error(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The innermost cause names the failure without repeating the URL.
    let mut cause = String::new();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    format!("PutLogs {kind}: {cause}")
}

/// Sorts a PutLogs failure into retryable and rejected: 5xx, 429, 403 with a
/// write quota code or "Inflow Quota Exceed", and ServerBusy are retried.
pub fn classify_failure(status: u16, body: &[u8], request_id: &str) -> SendError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (code, message) = match parsed {
        Some(parsed) => (parsed.error_code, parsed.error_message),
        None => (
            String::new(),
            String::from_utf8_lossy(body).chars().take(200).collect(),
        ),
    };
    let quota = status == 403
        && (matches!(code.as_str(), "WriteQuotaExceed" | "ShardWriteQuotaExceed")
            || message.contains("Inflow Quota Exceed"));
    let retryable = status >= 500
        || status == 429
        || quota
        || matches!(
            code.as_str(),
            "ServerBusy" | "RequestTimeout" | "InternalServerError"
        );
    let text = format!("PutLogs HTTP {status} {code}: {message} (request id {request_id:?})");
    if retryable {
        SendError::Retryable(text)
    } else {
        SendError::Rejected(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(signature: SignatureVersion) -> SlsConfig {
        let text = format!(
            "endpoint = \"http://127.0.0.1:8080\"\nproject = \"p1\"\n\
             access_key_id = \"ak\"\naccess_key_secret = \"sk\"\n\
             signature = \"{}\"\nregion = \"cn-hangzhou\"\nsecurity_token = \"tok\"\n",
            if signature == SignatureVersion::V1 {
                "v1"
            } else {
                "v4"
            }
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn endpoint_forms() {
        let dns = Endpoint::parse("cn-hangzhou.log.aliyuncs.com").unwrap();
        assert_eq!(
            dns.target("proj", "/x"),
            (
                "https://proj.cn-hangzhou.log.aliyuncs.com/x".into(),
                "proj.cn-hangzhou.log.aliyuncs.com".into()
            )
        );
        let ip = Endpoint::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            ip.target("proj", "/x"),
            ("http://127.0.0.1:8080/x".into(), "proj.127.0.0.1".into())
        );
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://h:notaport").is_err());
    }

    #[test]
    fn v1_request_headers_and_body() {
        let sink = SlsSink::new(&config(SignatureVersion::V1)).unwrap();
        let raw = b"raw log group bytes, raw log group bytes".to_vec();
        let request = sink.prepare("p1", "ls", &raw, SystemTime::UNIX_EPOCH);
        let get = |name: &str| {
            request
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(request.url, "http://127.0.0.1:8080/logstores/ls/shards/lb");
        assert_eq!(get("host").as_deref(), Some("p1.127.0.0.1"));
        assert_eq!(get("x-log-bodyrawsize"), Some(raw.len().to_string()));
        assert_eq!(get("content-md5"), Some(sign::content_md5(&request.body)));
        assert_eq!(get("x-acs-security-token").as_deref(), Some("tok"));
        assert_eq!(
            get("date").as_deref(),
            Some("Thu, 01 Jan 1970 00:00:00 GMT")
        );
        assert!(get("authorization").unwrap().starts_with("LOG ak:"));
        let decompressed = lz4_flex::block::decompress(&request.body, raw.len()).unwrap();
        assert_eq!(decompressed, raw);
    }

    #[test]
    fn v4_request_is_signed_with_scope() {
        let sink = SlsSink::new(&config(SignatureVersion::V4)).unwrap();
        let request = sink.prepare("p1", "ls", b"x", SystemTime::UNIX_EPOCH);
        let auth = &request.headers.last().unwrap().1;
        assert!(auth.starts_with(
            "SLS4-HMAC-SHA256 Credential=ak/19700101/cn-hangzhou/sls/aliyun_v4_request,Signature="
        ));
    }

    #[test]
    fn failures_are_classified() {
        let retry = |status, body: &str| {
            matches!(
                classify_failure(status, body.as_bytes(), ""),
                SendError::Retryable(_)
            )
        };
        assert!(retry(
            500,
            r#"{"errorCode":"InternalServerError","errorMessage":"x"}"#
        ));
        assert!(retry(502, "bad gateway"));
        assert!(retry(429, ""));
        assert!(retry(
            403,
            r#"{"errorCode":"WriteQuotaExceed","errorMessage":"x"}"#
        ));
        assert!(retry(
            403,
            r#"{"errorCode":"ShardWriteQuotaExceed","errorMessage":"x"}"#
        ));
        assert!(retry(
            403,
            r#"{"errorCode":"ProjectQuotaExceed","errorMessage":"Inflow Quota Exceed"}"#
        ));
        assert!(retry(
            400,
            r#"{"errorCode":"ServerBusy","errorMessage":"x"}"#
        ));
        assert!(!retry(
            403,
            r#"{"errorCode":"Unauthorized","errorMessage":"x"}"#
        ));
        assert!(!retry(
            401,
            r#"{"errorCode":"SignatureNotMatch","errorMessage":"x"}"#
        ));
        assert!(!retry(
            400,
            r#"{"errorCode":"PostBodyInvalid","errorMessage":"x"}"#
        ));
        assert!(!retry(
            404,
            r#"{"errorCode":"LogStoreNotExist","errorMessage":"x"}"#
        ));
    }
}
