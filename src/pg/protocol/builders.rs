//! Encoders for the messages skiff writes itself.

use bytes::{BufMut, Bytes, BytesMut};

use super::{backend, frontend};

/// Starts a tagged message; `finish` fills in the length.
fn begin(tag: u8, capacity: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(capacity + 5);
    out.put_u8(tag);
    out.put_u32(0);
    out
}

fn finish(mut out: BytesMut) -> Bytes {
    let length = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&length.to_be_bytes());
    out.freeze()
}

fn put_cstr(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, code: &str, message: &str) -> Bytes {
    let mut out = begin(backend::ERROR_RESPONSE, message.len() + 32);
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', message),
    ] {
        out.put_u8(field);
        put_cstr(&mut out, value);
    }
    out.put_u8(0);
    finish(out)
}

/// ReadyForQuery with a transaction status of `I`, `T` or `E`.
pub fn ready_for_query(status: u8) -> Bytes {
    let mut out = begin(backend::READY_FOR_QUERY, 1);
    out.put_u8(status);
    finish(out)
}

/// AuthenticationOk, or another Authentication request by its code.
pub fn authentication(code: u32, payload: &[u8]) -> Bytes {
    let mut out = begin(backend::AUTHENTICATION, 4 + payload.len());
    out.put_u32(code);
    out.put_slice(payload);
    finish(out)
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    let mut out = begin(backend::PARAMETER_STATUS, name.len() + value.len() + 2);
    put_cstr(&mut out, name);
    put_cstr(&mut out, value);
    finish(out)
}

pub fn backend_key_data(process_id: i32, secret_key: i32) -> Bytes {
    let mut out = begin(backend::BACKEND_KEY_DATA, 8);
    out.put_i32(process_id);
    out.put_i32(secret_key);
    finish(out)
}

pub fn command_complete(tag: &str) -> Bytes {
    let mut out = begin(backend::COMMAND_COMPLETE, tag.len() + 1);
    put_cstr(&mut out, tag);
    finish(out)
}

/// A message with an empty body, such as ParseComplete or CloseComplete.
pub fn empty_message(tag: u8) -> Bytes {
    finish(begin(tag, 0))
}

/// RowDescription of text columns, for the admin console.
pub fn row_description(columns: &[&str]) -> Bytes {
    let mut out = begin(backend::ROW_DESCRIPTION, 2 + columns.len() * 32);
    out.put_i16(columns.len() as i16);
    for name in columns {
        put_cstr(&mut out, name);
        out.put_i32(0); // table oid
        out.put_i16(0); // column number
        out.put_i32(25); // type oid: text
        out.put_i16(-1); // type size
        out.put_i32(-1); // type modifier
        out.put_i16(0); // format: text
    }
    finish(out)
}

/// DataRow of text values; `None` is SQL NULL.
pub fn data_row(values: &[Option<&str>]) -> Bytes {
    let mut out = begin(backend::DATA_ROW, 2 + values.len() * 16);
    out.put_i16(values.len() as i16);
    for value in values {
        match value {
            Some(text) => {
                out.put_i32(text.len() as i32);
                out.put_slice(text.as_bytes());
            }
            None => out.put_i32(-1),
        }
    }
    finish(out)
}

/// Simple Query.
pub fn query(sql: &str) -> Bytes {
    let mut out = begin(frontend::QUERY, sql.len() + 1);
    put_cstr(&mut out, sql);
    finish(out)
}

pub fn sync() -> Bytes {
    empty_message(frontend::SYNC)
}

pub fn terminate() -> Bytes {
    empty_message(frontend::TERMINATE)
}

/// PasswordMessage (also used for SASL responses).
pub fn password_message(payload: &[u8]) -> Bytes {
    let mut out = begin(frontend::PASSWORD, payload.len());
    out.put_slice(payload);
    finish(out)
}

/// SASLInitialResponse: mechanism name and the client-first message.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    let mut out = begin(frontend::PASSWORD, mechanism.len() + data.len() + 5);
    put_cstr(&mut out, mechanism);
    out.put_i32(data.len() as i32);
    out.put_slice(data);
    finish(out)
}

/// Close of a prepared statement (`S`) or portal (`P`).
pub fn close(kind: u8, name: &str) -> Bytes {
    let mut out = begin(frontend::CLOSE, name.len() + 2);
    out.put_u8(kind);
    put_cstr(&mut out, name);
    finish(out)
}

/// StartupMessage for protocol 3.0 with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Bytes {
    let mut out = BytesMut::with_capacity(128);
    out.put_u32(0);
    out.put_u32(super::PROTOCOL_VERSION_3);
    for (name, value) in params {
        put_cstr(&mut out, name);
        put_cstr(&mut out, value);
    }
    out.put_u8(0);
    let length = out.len() as u32;
    out[0..4].copy_from_slice(&length.to_be_bytes());
    out.freeze()
}

/// CancelRequest for a server process.
pub fn cancel_request(process_id: i32, secret_key: i32) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_u32(16);
    out.put_u32(super::CANCEL_REQUEST_CODE);
    out.put_i32(process_id);
    out.put_i32(secret_key);
    out.freeze()
}

/// SSLRequest: asks the server whether it will talk TLS.
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&super::SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// Fields of an ErrorResponse or NoticeResponse body.
#[derive(Debug, Default, Clone)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    /// Decodes the fields skiff needs from an ErrorResponse body.
    pub fn parse(mut body: &[u8]) -> ErrorFields {
        let mut fields = ErrorFields::default();
        while let Some((&kind, rest)) = body.split_first() {
            if kind == 0 {
                break;
            }
            body = rest;
            let Some(value) = super::read_cstr(&mut body) else {
                break;
            };
            match kind {
                b'S' => fields.severity = value.to_string(),
                b'C' => fields.code = value.to_string(),
                b'M' => fields.message = value.to_string(),
                _ => {}
            }
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trip() {
        let raw = error_response(Severity::Fatal, "53300", "sorry, too many clients already");
        assert_eq!(raw[0], b'E');
        assert_eq!(
            u32::from_be_bytes(raw[1..5].try_into().unwrap()) as usize,
            raw.len() - 1
        );
        let fields = ErrorFields::parse(&raw[5..]);
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "53300");
        assert_eq!(fields.message, "sorry, too many clients already");
    }

    #[test]
    fn startup_message_length_counts_itself() {
        let raw = startup_message(&[("user", "u"), ("database", "d")]);
        assert_eq!(
            u32::from_be_bytes(raw[0..4].try_into().unwrap()) as usize,
            raw.len()
        );
        assert_eq!(&raw[4..8], &196608u32.to_be_bytes());
        assert_eq!(*raw.last().unwrap(), 0);
    }

    #[test]
    fn data_row_encodes_null_as_minus_one() {
        let raw = data_row(&[Some("a"), None]);
        assert_eq!(&raw[5..7], &2i16.to_be_bytes());
        assert_eq!(&raw[7..11], &1i32.to_be_bytes());
        assert_eq!(raw[11], b'a');
        assert_eq!(&raw[12..16], &(-1i32).to_be_bytes());
    }
}
