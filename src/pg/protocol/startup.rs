//! Untagged startup-phase packets: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest.

use bytes::Buf;

use super::{read_cstr_lossy, ProtocolError};

pub const PROTOCOL_VERSION_3: u32 = 196608;
pub const SSL_REQUEST_CODE: u32 = 80877103;
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
pub const CANCEL_REQUEST_CODE: u32 = 80877102;

/// The first packet of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Startup(StartupParams),
    SslRequest,
    GssEncRequest,
    Cancel { process_id: i32, secret_key: i32 },
}

/// Parameters of a StartupMessage, in the order sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams {
    pub pairs: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Decodes a startup-phase packet, length included.
pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut body = &packet[4..];
    if body.len() < 4 {
        return Err(ProtocolError::Malformed("startup"));
    }
    let code = body.get_u32();
    match code {
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 {
                return Err(ProtocolError::Malformed("CancelRequest"));
            }
            let process_id = body.get_i32();
            let secret_key = body.get_i32();
            Ok(StartupPacket::Cancel {
                process_id,
                secret_key,
            })
        }
        PROTOCOL_VERSION_3 => parse_params(body).map(StartupPacket::Startup),
        _ => Err(ProtocolError::Malformed(
            "startup (unsupported protocol version)",
        )),
    }
}

fn parse_params(mut body: &[u8]) -> Result<StartupParams, ProtocolError> {
    let mut params = StartupParams::default();
    loop {
        let name = read_cstr_lossy(&mut body).ok_or(ProtocolError::Malformed("startup"))?;
        if name.is_empty() {
            return Ok(params);
        }
        let value = read_cstr_lossy(&mut body).ok_or(ProtocolError::Malformed("startup"))?;
        params.pairs.push((name.to_string(), value.to_string()));
    }
}

/// Splits a libpq `options` value into `-c name=value` settings.
///
/// Supports `-c name=value`, `-cname=value` and `--name=value`; a backslash
/// escapes the next character, as in PostgreSQL's own parser.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    let mut settings = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let setting = if word == "-c" {
            iter.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            word.strip_prefix("-c").map(str::to_string)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            settings.push((name.replace('-', "_").to_lowercase(), value.to_string()));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::super::builders::{cancel_request, startup_message};
    use super::*;

    #[test]
    fn startup_round_trip() {
        let raw = startup_message(&[("user", "dify"), ("database", "dify")]);
        let StartupPacket::Startup(params) = parse_startup(&raw).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(params.get("user"), Some("dify"));
        assert_eq!(params.get("database"), Some("dify"));
    }

    #[test]
    fn cancel_round_trip() {
        let raw = cancel_request(42, -7);
        assert_eq!(
            parse_startup(&raw).unwrap(),
            StartupPacket::Cancel {
                process_id: 42,
                secret_key: -7
            }
        );
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(parse_startup(&ssl).unwrap(), StartupPacket::SslRequest);
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(parse_startup(&gss).unwrap(), StartupPacket::GssEncRequest);
    }

    #[test]
    fn options_forms() {
        assert_eq!(
            parse_options("-c timezone=UTC"),
            vec![("timezone".into(), "UTC".into())]
        );
        assert_eq!(
            parse_options("-csearch_path=a,b --statement-timeout=5s"),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into())
            ]
        );
        assert_eq!(
            parse_options("-c application_name=my\\ app"),
            vec![("application_name".into(), "my app".into())]
        );
    }
}
