//! Signature checks of ingest requests: V1 (`LOG ak:signature`) and V4
//! (`SLS4-HMAC-SHA256`), each against the configured key, with SLS's limit
//! on clock skew.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{StatusCode, Uri};

use super::{sls_error, IngestState, SlsError};
use crate::logship::sign::{self, V4Request, V4_ALGORITHM};
use crate::logship::time::parse_v4_date_time;

/// Largest difference between a request's date and ours that SLS accepts.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

fn unauthorized(code: &'static str, message: impl Into<String>) -> SlsError {
    sls_error(StatusCode::UNAUTHORIZED, code, message)
}

/// Checks the request's V1 or V4 signature against the configured key.
pub(super) fn verify_signature(
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
            let expected = sign::v1_signature(&state.credentials().access_key_secret, &text);
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
        let expected = sign::v4_signature(&state.credentials().access_key_secret, &request);
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
    let credentials = state.credentials();
    if credentials.access_key_id.is_empty() || key_id != credentials.access_key_id {
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
    fn query_is_decoded() {
        assert_eq!(
            parse_query("key=a%2Fb&x"),
            vec![("key".into(), "a/b".into()), ("x".into(), "".into())]
        );
    }
}
