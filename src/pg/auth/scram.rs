//! Server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) for clients logging in
//! to skiff. Channel binding is not offered (no TLS), so the client's GS2
//! header must be `n,,` or `y,,`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Iterations used for secrets skiff derives from plain passwords; the same
/// as PostgreSQL's default `scram_iterations`.
const DEFAULT_ITERATIONS: u32 = 4096;

/// A SCRAM verifier as PostgreSQL stores it in `pg_authid`.
#[derive(Debug, Clone)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

impl ScramSecret {
    /// Derives a secret from a plain password with a random salt.
    pub fn from_password(password: &str) -> ScramSecret {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::derive(password, salt, DEFAULT_ITERATIONS)
    }

    fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> ScramSecret {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramSecret {
            iterations,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Result<ScramSecret, String> {
        let invalid = || "invalid SCRAM-SHA-256 secret".to_string();
        let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or_else(invalid)?;
        let (params, keys) = rest.split_once('$').ok_or_else(invalid)?;
        let (iterations, salt) = params.split_once(':').ok_or_else(invalid)?;
        let (stored, server) = keys.split_once(':').ok_or_else(invalid)?;
        let decode_key = |b64: &str| -> Result<[u8; 32], String> {
            BASE64
                .decode(b64)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(invalid)
        };
        Ok(ScramSecret {
            iterations: iterations.parse().map_err(|_| invalid())?,
            salt: BASE64.decode(salt).map_err(|_| invalid())?,
            stored_key: decode_key(stored)?,
            server_key: decode_key(server)?,
        })
    }
}

/// One SCRAM exchange, from the client-first message to the server-final.
pub struct ScramServer {
    secret: std::sync::Arc<ScramSecret>,
    state: Option<Exchange>,
}

struct Exchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    pub fn new(secret: std::sync::Arc<ScramSecret>) -> ScramServer {
        ScramServer {
            secret,
            state: None,
        }
    }

    /// Takes the client-first message and returns the server-first message.
    pub fn server_first(&mut self, client_first: &[u8]) -> Result<String, &'static str> {
        let text = std::str::from_utf8(client_first).map_err(|_| "invalid SCRAM message")?;
        let bare = text
            .strip_prefix("n,,")
            .or_else(|| text.strip_prefix("y,,"))
            .ok_or("SCRAM channel binding is not supported")?;
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|nonce| !nonce.is_empty())
            .ok_or("SCRAM client-first message has no nonce")?;
        let mut random = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut random);
        let nonce = format!("{client_nonce}{}", BASE64.encode(random));
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.secret.salt),
            self.secret.iterations
        );
        self.state = Some(Exchange {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        });
        Ok(server_first)
    }

    /// Checks the client-final message; returns the server-final message
    /// when the proof is valid and `None` when the password is wrong.
    pub fn server_final(&mut self, client_final: &[u8]) -> Result<Option<String>, &'static str> {
        let exchange = self.state.take().ok_or("SCRAM message out of order")?;
        let text = std::str::from_utf8(client_final).map_err(|_| "invalid SCRAM message")?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or("SCRAM client-final message has no proof")?;
        let nonce = without_proof
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .ok_or("SCRAM client-final message has no nonce")?;
        if nonce != exchange.nonce {
            return Err("SCRAM nonce does not match");
        }
        let proof = BASE64.decode(proof).map_err(|_| "invalid SCRAM proof")?;
        if proof.len() != 32 {
            return Err("invalid SCRAM proof");
        }
        let auth_message = format!(
            "{},{},{}",
            exchange.client_first_bare, exchange.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let stored_key: [u8; 32] = Sha256::digest(&client_key).into();
        if !super::constant_time_eq(&stored_key, &self.secret.stored_key) {
            return Ok(None);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(Some(format!("v={}", BASE64.encode(server_signature))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use std::sync::Arc;

    fn exchange(server_password: &str, client_password: &str) -> Option<String> {
        let secret = Arc::new(ScramSecret::from_password(server_password));
        let mut server = ScramServer::new(secret);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let first = server.server_first(client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let result = server.server_final(client.message()).unwrap();
        if let Some(final_message) = &result {
            client.finish(final_message.as_bytes()).unwrap();
        }
        result
    }

    #[test]
    fn right_password_passes_both_ways() {
        assert!(exchange("difyai123456", "difyai123456").is_some());
    }

    #[test]
    fn wrong_password_fails() {
        assert!(exchange("difyai123456", "guess").is_none());
    }

    #[test]
    fn parses_postgres_secret_format() {
        let secret = ScramSecret::derive("pw", b"0123456789abcdef".to_vec(), 4096);
        let text = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            BASE64.encode(&secret.salt),
            BASE64.encode(secret.stored_key),
            BASE64.encode(secret.server_key)
        );
        let parsed = ScramSecret::parse(&text).unwrap();
        assert_eq!(parsed.stored_key, secret.stored_key);
        assert_eq!(parsed.iterations, 4096);
        assert!(ScramSecret::parse("SCRAM-SHA-256$x").is_err());
    }

    #[test]
    fn channel_binding_request_is_rejected() {
        let mut server = ScramServer::new(Arc::new(ScramSecret::from_password("x")));
        assert!(server
            .server_first(b"p=tls-server-end-point,,n=,r=abc")
            .is_err());
    }
}
