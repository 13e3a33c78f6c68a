//! Access control, off unless configured: HTTP basic authentication against
//! an htpasswd file (bcrypt entries, as `htpasswd -B` writes them) and/or
//! bearer tokens listed in a file. Refusals are the distribution spec's
//! `401 UNAUTHORIZED` with a `WWW-Authenticate: Basic` challenge, which
//! docker, podman and skopeo answer with the credentials they were given.
//! bcrypt is slow on purpose, so credentials that verified are remembered
//! (by their sha256) for a while.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest as _, Sha256};

/// How long verified credentials are trusted without bcrypt.
const REMEMBER: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} line {line}: not `user:bcrypt-hash`")]
    Htpasswd { path: String, line: usize },
    #[error("{0} names no user and no token")]
    Empty(String),
}

/// Who may pull.
#[derive(Debug)]
pub struct Auth {
    /// User → bcrypt hash.
    users: HashMap<String, String>,
    /// sha256 of each token.
    tokens: HashSet<[u8; 32]>,
    /// sha256 of `Authorization` values that verified.
    verified: moka::sync::Cache<[u8; 32], ()>,
    /// Whether the web pages and metrics need credentials too.
    pub protect_web: bool,
}

impl Auth {
    /// Reads the files; `None` when neither is configured.
    pub fn load(htpasswd: Option<&Path>, tokens: Option<&Path>, protect_web: bool) -> Result<Option<Self>, AuthError> {
        if htpasswd.is_none() && tokens.is_none() {
            return Ok(None);
        }
        let mut users = HashMap::new();
        if let Some(path) = htpasswd {
            for (number, line) in lines(path)? {
                let (user, hash) = line.split_once(':').ok_or_else(|| AuthError::Htpasswd {
                    path: path.display().to_string(),
                    line: number,
                })?;
                if !hash.starts_with("$2") {
                    return Err(AuthError::Htpasswd {
                        path: path.display().to_string(),
                        line: number,
                    });
                }
                users.insert(user.to_owned(), hash.to_owned());
            }
        }
        let mut hashed = HashSet::new();
        if let Some(path) = tokens {
            hashed.extend(lines(path)?.into_iter().map(|(_, token)| sha256(token.as_bytes())));
        }
        if users.is_empty() && hashed.is_empty() {
            let named = htpasswd.or(tokens).expect("one is set");
            return Err(AuthError::Empty(named.display().to_string()));
        }
        Ok(Some(Auth {
            users,
            tokens: hashed,
            verified: moka::sync::Cache::builder()
                .time_to_live(REMEMBER)
                .max_capacity(10_000)
                .build(),
            protect_web,
        }))
    }

    /// Whether an `Authorization` header value lets its sender in.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(value) = authorization else { return false };
        let key = sha256(value.as_bytes());
        if self.verified.contains_key(&key) {
            return true;
        }
        let ok = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                self.tokens.contains(&sha256(token.trim().as_bytes()))
            }
            Some((scheme, encoded)) if scheme.eq_ignore_ascii_case("basic") => self.basic(encoded.trim()),
            _ => false,
        };
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }

    fn basic(&self, encoded: &str) -> bool {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        self.users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false))
    }
}

/// The non-empty lines of a file that are not comments, numbered from 1.
fn lines(path: &Path) -> Result<Vec<(usize, String)>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_owned()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(credentials: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    #[test]
    fn users_and_tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(&htpasswd, format!("# users\nalice:{hash}\n")).unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "tok-123\n").unwrap();
        let auth = Auth::load(Some(&htpasswd), Some(&tokens), false).unwrap().unwrap();
        assert!(auth.allows(Some(&basic("alice:secret"))));
        assert!(auth.allows(Some(&basic("alice:secret"))), "remembered");
        assert!(!auth.allows(Some(&basic("alice:wrong"))));
        assert!(!auth.allows(Some(&basic("bob:secret"))));
        assert!(auth.allows(Some("Bearer tok-123")));
        assert!(!auth.allows(Some("Bearer tok-124")));
        assert!(!auth.allows(Some("Basic !!!")));
        assert!(!auth.allows(None));
    }

    #[test]
    fn bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "alice:secret\n").unwrap();
        assert!(matches!(
            Auth::load(Some(&plain), None, false),
            Err(AuthError::Htpasswd { line: 1, .. })
        ));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nobody\n").unwrap();
        assert!(matches!(
            Auth::load(None, Some(&empty), false),
            Err(AuthError::Empty(_))
        ));
        assert!(Auth::load(None, None, true).unwrap().is_none());
    }
}
