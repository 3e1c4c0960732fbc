//! A hand-built PutLogs client for the ingest tests: builds the LogGroup,
//! compresses and signs the request the way SLS SDKs do.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::SystemTime;

use prost::Message;
use skiff::logship::proto::{Log, LogContent, LogGroup};
use skiff::logship::sign::{self, V4Request};
use skiff::logship::time::v4_date_time;

/// How the body is compressed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    Deflate,
    None,
}

/// How the request is signed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    V1,
    V4,
}

/// Everything that varies between the ingest test requests.
pub struct PutLogs<'a> {
    pub addr: SocketAddr,
    pub project: &'a str,
    pub logstore: &'a str,
    pub access_key_id: &'a str,
    pub access_key_secret: &'a str,
    pub compression: Compression,
    pub signature: Signature,
    pub content_type: &'a str,
    pub date: SystemTime,
}

impl<'a> PutLogs<'a> {
    pub fn new(addr: SocketAddr, logstore: &'a str) -> Self {
        PutLogs {
            addr,
            project: "dify-logs",
            logstore,
            access_key_id: "test-ak",
            access_key_secret: "test-secret",
            compression: Compression::Lz4,
            signature: Signature::V1,
            content_type: "application/x-protobuf",
            date: SystemTime::now(),
        }
    }
}

/// Builds a log group of `count` logs with ids `{prefix}-{i}`.
pub fn log_group(prefix: &str, count: usize) -> LogGroup {
    LogGroup {
        logs: (0..count)
            .map(|i| Log {
                time: 1_700_000_000,
                time_ns: Some(i as u32),
                contents: vec![
                    LogContent {
                        key: "id".into(),
                        value: format!("{prefix}-{i}"),
                    },
                    LogContent {
                        key: "message".into(),
                        value: "workflow started".into(),
                    },
                ],
            })
            .collect(),
        reserved: None,
        topic: Some("sdk".into()),
        source: Some("127.0.0.1".into()),
        log_tags: vec![],
    }
}

/// Sends `group` as a PutLogs request and returns the response.
pub async fn put_logs(request: &PutLogs<'_>, group: &LogGroup) -> reqwest::Response {
    let raw = group.encode_to_vec();
    send_raw(request, &raw).await
}

/// Sends `group` as a PutLogs request; a connection failure is an `Err`.
pub async fn try_put_logs(
    request: &PutLogs<'_>,
    group: &LogGroup,
) -> reqwest::Result<reqwest::Response> {
    try_send_raw(request, &group.encode_to_vec()).await
}

/// Sends `raw` (an encoded LogGroup, or anything else) as a PutLogs body.
pub async fn send_raw(request: &PutLogs<'_>, raw: &[u8]) -> reqwest::Response {
    try_send_raw(request, raw).await.unwrap()
}

async fn try_send_raw(request: &PutLogs<'_>, raw: &[u8]) -> reqwest::Result<reqwest::Response> {
    let path = format!("/logstores/{}/shards/lb", request.logstore);
    let (body, compress_type) = match request.compression {
        Compression::Lz4 => (lz4_flex::block::compress(raw), Some("lz4")),
        Compression::Deflate => {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut encoder, raw).unwrap();
            (encoder.finish().unwrap(), Some("deflate"))
        }
        Compression::None => (raw.to_vec(), None),
    };
    let mut headers = vec![
        ("Host".to_string(), format!("{}.127.0.0.1", request.project)),
        ("Content-Type".to_string(), request.content_type.to_string()),
        ("Content-MD5".to_string(), sign::content_md5(&body)),
        ("x-log-apiversion".to_string(), "0.6.0".to_string()),
        ("x-log-bodyrawsize".to_string(), raw.len().to_string()),
    ];
    if let Some(compress_type) = compress_type {
        headers.push(("x-log-compresstype".to_string(), compress_type.to_string()));
    }
    let authorization = match request.signature {
        Signature::V1 => {
            headers.push(("Date".to_string(), httpdate::fmt_http_date(request.date)));
            headers.push(("x-log-signaturemethod".to_string(), "hmac-sha1".to_string()));
            let text = sign::v1_string_to_sign("POST", &path, &[], &headers);
            let signature = sign::v1_signature(request.access_key_secret, &text);
            format!("LOG {}:{signature}", request.access_key_id)
        }
        Signature::V4 => {
            let date_time = v4_date_time(request.date);
            let sha = sign::content_sha256(&body);
            headers.push(("x-log-date".to_string(), date_time.clone()));
            headers.push(("x-log-content-sha256".to_string(), sha.clone()));
            let v4 = V4Request {
                method: "POST",
                resource: &path,
                query: &[],
                headers: &headers,
                region: "cn-hangzhou",
                date_time: &date_time,
                content_sha256: &sha,
            };
            let signature = sign::v4_signature(request.access_key_secret, &v4);
            sign::v4_authorization(
                request.access_key_id,
                &date_time[..8],
                "cn-hangzhou",
                &signature,
            )
        }
    };
    headers.push(("Authorization".to_string(), authorization));
    let mut builder = reqwest::Client::new().post(format!("http://{}{path}", request.addr));
    for (name, value) in &headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(body).send().await
}
