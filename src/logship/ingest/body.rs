//! Request bodies of PutLogs: lz4 (raw block, size in
//! `x-log-bodyrawsize`), deflate (zlib) or uncompressed, with every size
//! checked against the configured limit.

use std::io::Read;
use tokio::time::Instant;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::{sls_error, SlsError};

/// Reads a request body of at most `limit` bytes, which must arrive
/// before `deadline`. A body that is too large, too slow or cut short
/// each gets its own error, so the error counts tell them apart.
pub(super) async fn read(body: Body, limit: usize, deadline: Instant) -> Result<Bytes, SlsError> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let reading = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| {
                if timed_out(&err) {
                    return sls_error(
                        StatusCode::REQUEST_TIMEOUT,
                        "RequestTimeout",
                        format!(
                            "body stalled after {} bytes for longer than idle_timeout",
                            buf.len()
                        ),
                    );
                }
                sls_error(
                    StatusCode::BAD_REQUEST,
                    "PostBodyInvalid",
                    format!("body ended after {} bytes: {err}", buf.len()),
                )
            })?;
            if chunk.len() > limit - buf.len() {
                return Err(sls_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PostBodyTooLarge",
                    format!("body exceeds {limit} bytes"),
                ));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline, reading).await {
        Ok(Ok(())) => Ok(buf.freeze()),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(sls_error(
            StatusCode::REQUEST_TIMEOUT,
            "RequestTimeout",
            "body did not arrive within body_timeout",
        )),
    }
}

/// True when the connection's idle timeout ended the read: the listener
/// fails a stalled read with `TimedOut`.
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(error) = source {
        let io_error = error.downcast_ref::<std::io::Error>();
        if io_error.is_some_and(|io_error| io_error.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        source = error.source();
    }
    false
}

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

    /// Builds a body sent in `chunks`, then ended by `end`: Ok for its end,
    /// the kind of a read error, or None for a client that stalls.
    fn chunked(chunks: &[&'static [u8]], end: Option<Result<(), std::io::ErrorKind>>) -> Body {
        let parts: Vec<_> = chunks
            .iter()
            .map(|chunk| Ok::<Bytes, std::io::Error>(Bytes::from_static(chunk)))
            .collect();
        let tail = futures_util::stream::once(async move {
            match end {
                Some(Ok(())) => None,
                Some(Err(kind)) => Some(Err(std::io::Error::new(kind, "read failed"))),
                None => std::future::pending().await,
            }
        })
        .filter_map(std::future::ready);
        Body::from_stream(futures_util::stream::iter(parts).chain(tail))
    }

    #[tokio::test]
    async fn body_errors_are_told_apart() {
        let second = std::time::Duration::from_secs(1);
        let within = |duration| Instant::now() + duration;
        let whole = read(chunked(&[b"abc", b"def"], Some(Ok(()))), 6, within(second)).await;
        assert_eq!(&whole.unwrap()[..], b"abcdef");

        let large = read(chunked(&[b"abc", b"defg"], Some(Ok(()))), 6, within(second)).await;
        let err = large.err().unwrap();
        assert_eq!((err.status.as_u16(), err.code), (413, "PostBodyTooLarge"));

        let reset = Some(Err(std::io::ErrorKind::ConnectionReset));
        let broken = read(chunked(&[b"abc"], reset), 6, within(second)).await;
        let err = broken.err().unwrap();
        assert_eq!((err.status.as_u16(), err.code), (400, "PostBodyInvalid"));
        assert!(err.message.contains("after 3 bytes"), "{}", err.message);

        // The listener's idle timeout fails a stalled read with TimedOut.
        let idle = Some(Err(std::io::ErrorKind::TimedOut));
        let idled = read(chunked(&[b"abc"], idle), 6, within(second)).await;
        let err = idled.err().unwrap();
        assert_eq!((err.status.as_u16(), err.code), (408, "RequestTimeout"));

        let started = Instant::now();
        let stalled = read(chunked(&[b"abc"], None), 6, within(second / 20)).await;
        let err = stalled.err().unwrap();
        assert_eq!((err.status.as_u16(), err.code), (408, "RequestTimeout"));
        assert!(started.elapsed() < second);
    }
}
