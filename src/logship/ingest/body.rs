//! Request bodies of PutLogs: lz4 (raw block, size in
//! `x-log-bodyrawsize`), deflate (zlib) or uncompressed, with every size
//! checked against the configured limit.

use std::io::Read;

use axum::http::StatusCode;

use super::{sls_error, SlsError};

/// Decompresses a request body per `x-log-compresstype`.
pub(super) fn decompress(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
