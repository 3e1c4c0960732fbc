//! Users allowed to log in to skiff: inline `users` and a PgBouncer-format
//! `auth_file`.

use std::collections::HashMap;
use std::sync::Arc;

use super::ScramSecret;
use crate::config::{Config, PgConfig};

/// A user's stored credential.
#[derive(Debug, Clone)]
pub enum Secret {
    /// Plain text: works for every auth type and for logging in to the
    /// server as this user.
    Plain(String),
    /// `md5...` hash: works for md5 auth only.
    Md5(String),
    /// `SCRAM-SHA-256$...` secret: works for SCRAM auth only.
    Scram(Arc<ScramSecret>),
}

/// Failure to load the user list.
#[derive(Debug, thiserror::Error)]
pub enum UserListError {
    #[error("cannot read auth_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth_file {path}, line {line}: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("user {user:?}: {reason}")]
    BadSecret { user: String, reason: String },
}

/// All users skiff authenticates, keyed by name.
#[derive(Debug, Default)]
pub struct UserList {
    users: HashMap<String, Secret>,
    /// SCRAM secrets derived from plain passwords once at load, because
    /// PBKDF2 with 4096 rounds is too slow to run per login.
    derived_scram: HashMap<String, Arc<ScramSecret>>,
}

impl UserList {
    /// Loads inline users and the auth file (inline entries win).
    pub fn load(pg: &PgConfig, root: &Config) -> Result<UserList, UserListError> {
        let mut entries: Vec<(String, String)> = Vec::new();
        if let Some(file) = &pg.auth.auth_file {
            let path = root.resolve_path(file);
            let display = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|source| UserListError::Read {
                path: display.clone(),
                source,
            })?;
            entries.extend(parse_auth_file(&text, &display)?);
        }
        entries.extend(pg.auth.users.iter().map(|(u, p)| (u.clone(), p.clone())));
        let mut list = UserList::default();
        for (user, password) in entries {
            let secret = classify(&user, &password)?;
            if let Secret::Plain(plain) = &secret {
                list.derived_scram
                    .insert(user.clone(), Arc::new(ScramSecret::from_password(plain)));
            }
            list.users.insert(user, secret);
        }
        Ok(list)
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    /// The SCRAM secret of a user, stored or derived from a plain password.
    pub fn scram_secret(&self, user: &str) -> Option<Arc<ScramSecret>> {
        match self.users.get(user)? {
            Secret::Scram(secret) => Some(secret.clone()),
            Secret::Plain(_) => self.derived_scram.get(user).cloned(),
            Secret::Md5(_) => None,
        }
    }

    /// The plain-text password of a user, when skiff has it.
    pub fn plain_password(&self, user: &str) -> Option<&str> {
        match self.users.get(user)? {
            Secret::Plain(password) => Some(password),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn classify(user: &str, password: &str) -> Result<Secret, UserListError> {
    if password.starts_with("SCRAM-SHA-256$") {
        let secret = ScramSecret::parse(password).map_err(|reason| UserListError::BadSecret {
            user: user.to_string(),
            reason,
        })?;
        return Ok(Secret::Scram(Arc::new(secret)));
    }
    if password.len() == 35 && password.starts_with("md5") {
        return Ok(Secret::Md5(password.to_string()));
    }
    Ok(Secret::Plain(password.to_string()))
}

/// Parses `"user" "password"` lines; `""` inside quotes is a literal quote.
/// Blank lines and lines starting with `;` or `#` are skipped.
fn parse_auth_file(text: &str, path: &str) -> Result<Vec<(String, String)>, UserListError> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let syntax = |reason: &str| UserListError::Syntax {
            path: path.to_string(),
            line: index + 1,
            reason: reason.to_string(),
        };
        let (user, rest) = quoted(trimmed).ok_or_else(|| syntax("expected \"user\""))?;
        let (password, _) =
            quoted(rest.trim_start()).ok_or_else(|| syntax("expected \"password\" after user"))?;
        entries.push((user, password));
    }
    Ok(entries)
}

/// Reads one double-quoted field; returns it and the text after it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut rest = text.strip_prefix('"')?;
    let mut value = String::new();
    loop {
        let end = rest.find('"')?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix('"') {
            value.push('"');
            rest = after;
        } else {
            return Some((value, rest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_lines() {
        let text = "; comment\n\"alice\" \"pa\"\"ss\"\n\n\"bob\" \"md5abcdefabcdefabcdefabcdefabcdefab\"\n";
        let entries = parse_auth_file(text, "users.txt").unwrap();
        assert_eq!(entries[0], ("alice".to_string(), "pa\"ss".to_string()));
        assert_eq!(entries[1].0, "bob");
        assert!(matches!(
            classify("bob", &entries[1].1).unwrap(),
            Secret::Md5(_)
        ));
    }

    #[test]
    fn auth_file_syntax_error_names_line() {
        let err = parse_auth_file("\"alice\" \"x\"\nbob x\n", "users.txt").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
