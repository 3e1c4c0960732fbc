//! SLS request signatures: V1 (`LOG ak:signature`, HMAC-SHA1) and V4
//! (`SLS4-HMAC-SHA256`). The sink signs with them and the ingest endpoint
//! checks clients with them.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Name of the V4 algorithm in the `Authorization` header.
pub const V4_ALGORITHM: &str = "SLS4-HMAC-SHA256";

/// Uppercase hex MD5 of `body`, as `Content-MD5` carries it.
pub fn content_md5(body: &[u8]) -> String {
    hex_upper(&md5::Md5::digest(body))
}

/// Lowercase hex SHA-256 of `body`, as `x-log-content-sha256` carries it.
pub fn content_sha256(body: &[u8]) -> String {
    hex_lower(&Sha256::digest(body))
}

/// Checks whether a header takes part in the signature besides the fixed ones:
/// `x-acs-*`, and `x-log-*` except `x-log-meta-*`.
fn is_extra_signed_header(lower_name: &str) -> bool {
    lower_name.starts_with("x-acs-")
        || (lower_name.starts_with("x-log-") && !lower_name.starts_with("x-log-meta-"))
}

/// Builds the V1 string to sign. `headers` are every request header (any
/// case); `query` the decoded query parameters.
pub fn v1_string_to_sign(
    method: &str,
    resource: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
) -> String {
    let find = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
            .unwrap_or("")
    };
    let mut text = format!(
        "{method}\n{}\n{}\n{}\n",
        find("content-md5"),
        find("content-type"),
        find("date")
    );
    let mut signed: Vec<(String, &str)> = headers
        .iter()
        .map(|(key, value)| (key.to_ascii_lowercase(), value.as_str()))
        .filter(|(key, _)| is_extra_signed_header(key))
        .collect();
    signed.sort();
    for (key, value) in signed {
        text.push_str(&format!("{key}:{value}\n"));
    }
    text.push_str(resource);
    if !query.is_empty() {
        let mut sorted: Vec<&(String, String)> = query.iter().collect();
        sorted.sort();
        let joined: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        text.push('?');
        text.push_str(&joined.join("&"));
    }
    text
}

/// Signs a V1 string: base64 of HMAC-SHA1 keyed with the secret.
pub fn v1_signature(secret: &str, string_to_sign: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Inputs of a V4 signature.
pub struct V4Request<'a> {
    pub method: &'a str,
    pub resource: &'a str,
    pub query: &'a [(String, String)],
    /// Every request header; `x-log-date` and `x-log-content-sha256` must
    /// be among them.
    pub headers: &'a [(String, String)],
    pub region: &'a str,
    /// `yyyymmddThhmmssZ`, the value of `x-log-date`.
    pub date_time: &'a str,
    /// Lowercase hex SHA-256 of the body.
    pub content_sha256: &'a str,
}

/// Computes the hex V4 signature of `request`.
pub fn v4_signature(secret: &str, request: &V4Request<'_>) -> String {
    let date = request.date_time.get(..8).unwrap_or("");
    let scope = v4_scope(date, request.region);
    let string_to_sign = format!(
        "{V4_ALGORITHM}\n{}\n{scope}\n{}",
        request.date_time,
        content_sha256(v4_canonical_request(request).as_bytes())
    );
    let mut key = hmac_sha256(format!("aliyun_v4{secret}").as_bytes(), date.as_bytes());
    for part in [request.region, "sls", "aliyun_v4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    hex_lower(&hmac_sha256(&key, string_to_sign.as_bytes()))
}

/// Builds the V4 credential scope, `{yyyymmdd}/{region}/sls/aliyun_v4_request`.
pub fn v4_scope(date: &str, region: &str) -> String {
    format!("{date}/{region}/sls/aliyun_v4_request")
}

/// Builds the V4 `Authorization` header value.
pub fn v4_authorization(access_key_id: &str, date: &str, region: &str, signature: &str) -> String {
    format!(
        "{V4_ALGORITHM} Credential={access_key_id}/{},Signature={signature}",
        v4_scope(date, region)
    )
}

fn v4_canonical_request(request: &V4Request<'_>) -> String {
    let mut headers: Vec<(String, &str)> = request
        .headers
        .iter()
        .map(|(key, value)| (key.to_ascii_lowercase(), value.trim()))
        .filter(|(key, _)| key == "content-type" || key == "host" || is_extra_signed_header(key))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let mut query: Vec<(&str, String)> = request
        .query
        .iter()
        .map(|(k, v)| (k.as_str(), uri_encode(v)))
        .collect();
    query.sort();
    let canonical_query: Vec<String> = query
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.to_string()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        request.resource,
        canonical_query.join("&"),
        canonical_headers,
        signed_headers.join(";"),
        request.content_sha256
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Compares two signatures in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn v1_known_answer() {
        let headers = pairs(&[
            ("Date", "Mon, 3 Jan 2010 08:33:47 GMT"),
            ("x-log-apiversion", "0.6.0"),
            ("x-log-bodyrawsize", "0"),
            ("x-log-signaturemethod", "hmac-sha1"),
        ]);
        let text = v1_string_to_sign("GET", "/logstores", &[], &headers);
        assert_eq!(
            v1_signature("mockAccessKeySecret", &text),
            "Rwm6cTKzoti4HWoe+GKcb6Kv07E="
        );
    }

    #[test]
    fn v1_string_sorts_headers_and_query() {
        let headers = pairs(&[
            ("X-Log-B", "2"),
            ("x-acs-security-token", "t"),
            ("x-log-meta-x", "skipped"),
            ("Content-Type", "application/x-protobuf"),
        ]);
        let query = pairs(&[("z", "1"), ("a", "2")]);
        let text = v1_string_to_sign("POST", "/logstores/ls/shards/lb", &query, &headers);
        assert_eq!(
            text,
            "POST\n\napplication/x-protobuf\n\nx-acs-security-token:t\nx-log-b:2\n\
             /logstores/ls/shards/lb?a=2&z=1"
        );
    }

    #[test]
    fn v4_known_answer() {
        let body = b"adasd= -asd zcas";
        let sha = content_sha256(body);
        let headers = pairs(&[
            ("x-log-date", "20220808T032330Z"),
            ("x-log-content-sha256", &sha),
        ]);
        let request = V4Request {
            method: "POST",
            resource: "/logstores",
            query: &[],
            headers: &headers,
            region: "cn-shanghai",
            date_time: "20220808T032330Z",
            content_sha256: &sha,
        };
        assert_eq!(
            v4_signature("zxasdasdasw2", &request),
            "8a10a5e723cb2e75964816de660b2c16a58af8bc0261f7f0722d832468c76ce8"
        );
        assert_eq!(
            v4_authorization("acsddda21dsd", "20220808", "cn-shanghai", "abc"),
            "SLS4-HMAC-SHA256 Credential=acsddda21dsd/20220808/cn-shanghai/sls/aliyun_v4_request,\
             Signature=abc"
        );
    }

    #[test]
    fn content_md5_is_uppercase_hex() {
        assert_eq!(content_md5(b""), "D41D8CD98F00B204E9800998ECF8427E");
    }

    #[test]
    fn uri_encode_keeps_unreserved() {
        assert_eq!(uri_encode("a-b_c.d~e f/"), "a-b_c.d~e%20f%2F");
    }
}
