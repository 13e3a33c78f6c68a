//! Keeping secrets from the configuration out of everything the registry
//! shows or stores. [`url`] is the one function that strips user-info and
//! query strings from a configured URL before it appears in a page, an
//! error, a log line, a label or a metric. Text from elsewhere that may
//! quote such a URL whole (Nix's and git's messages) is scrubbed of the
//! secrets it carried: the process installs them once at start
//! ([`install`]), and [`scrub`] blanks them out wherever text comes in, and
//! in every log line.

use std::borrow::Cow;
use std::sync::OnceLock;

/// What stands in for a secret.
const BLANK: &str = "***";
/// Shorter strings are not treated as secrets: blanking them would mangle
/// ordinary text and hide nothing worth hiding.
const MIN_SECRET: usize = 4;
/// Query parameters whose values are secrets wherever they appear.
const SECRET_PARAMETERS: &[&str] = &[
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "auth",
    "signature",
    "sig",
    "credential",
];

static INSTALLED: OnceLock<Secrets> = OnceLock::new();

/// `url` without user-info, query string or fragment:
/// `http://deploy:TOKEN@host/repo.git?x=1` → `http://host/repo.git`,
/// `github:owner/repo?access_token=…` → `github:owner/repo`. Text that is
/// not a URL is returned as it is.
pub fn url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Strings that must not be shown: the user-info of configured URLs and
/// their parts, their query strings and the values of secret-looking
/// parameters, and secrets configured on their own (keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets(Vec<String>);

impl Secrets {
    /// The secrets `urls` carry, and `others` as they are.
    pub fn new<'a>(urls: impl IntoIterator<Item = &'a str>, others: impl IntoIterator<Item = &'a str>) -> Self {
        let mut found: Vec<String> = urls.into_iter().flat_map(secrets_of_url).collect();
        found.extend(others.into_iter().map(str::to_owned));
        found.retain(|s| s.len() >= MIN_SECRET);
        // Longest first, so that a secret's part never leaves the rest of it.
        found.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        found.dedup();
        Secrets(found)
    }

    /// `text` with every secret blanked out.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut text = Cow::Borrowed(text);
        for secret in &self.0 {
            if text.contains(secret.as_str()) {
                text = Cow::Owned(text.replace(secret.as_str(), BLANK));
            }
        }
        text
    }
}

/// Makes `secrets` the ones [`scrub`] blanks out, for the rest of the
/// process; a second call changes nothing.
pub fn install(secrets: Secrets) {
    let _ = INSTALLED.set(secrets);
}

/// `text` with the installed secrets blanked out.
pub fn scrub(text: &str) -> Cow<'_, str> {
    match INSTALLED.get() {
        Some(secrets) => secrets.scrub(text),
        None => Cow::Borrowed(text),
    }
}

/// Where log lines go: stderr, each line with the installed secrets
/// blanked out (a formatted event arrives in one write).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScrubbedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedStderr
    }
}

impl std::io::Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The user-info, its user and password, the query string and the values
/// of secret-looking parameters of `url`, raw and percent-decoded.
fn secrets_of_url(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(scheme_end) = url.find("://").map(|at| at + 3) {
        let rest = &url[scheme_end..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some((user_info, _)) = authority.rsplit_once('@') {
            found.push(user_info.to_owned());
            found.extend(user_info.split(':').map(str::to_owned));
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        let query = query.split('#').next().unwrap_or(query);
        found.push(query.to_owned());
        for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
            let name = name.to_ascii_lowercase();
            if SECRET_PARAMETERS.iter().any(|p| name.contains(p)) {
                found.push(value.to_owned());
            }
        }
    }
    let decoded: Vec<String> = found.iter().filter_map(|s| percent_decoded(s)).collect();
    found.extend(decoded);
    found
}

/// `text` with `%XX` escapes decoded, when it has any and they decode to UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    if !text.contains('%') {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_user_info_and_queries() {
        for (given, shown) in [
            (
                "http://deploy:S3CRET-TOKEN@127.0.0.1:9/nixpkgs.git",
                "http://127.0.0.1:9/nixpkgs.git",
            ),
            ("https://TOKEN@github.com/o/r.git", "https://github.com/o/r.git"),
            (
                "https://h/{channel}.tar.gz?access_token=abc",
                "https://h/{channel}.tar.gz",
            ),
            ("git+https://u:p@h/r?ref=main&rev=1#frag", "git+https://h/r"),
            ("github:owner/repo?access_token=ghp_x", "github:owner/repo"),
            ("https://h/p@q/r", "https://h/p@q/r"),
            ("git@github.com:o/r.git", "git@github.com:o/r.git"),
            ("/srv/pkgs", "/srv/pkgs"),
            ("file:///srv/repo", "file:///srv/repo"),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }

    #[test]
    fn secrets_are_blanked_out_of_any_text() {
        let secrets = Secrets::new(
            [
                "http://deploy:S3CRET-TOKEN@127.0.0.1:9/nixpkgs.git",
                "https://h/{channel}.tar.gz?access_token=tok%2Fen&ref=main",
                "/plain/path",
            ],
            ["aws-secret-key"],
        );
        let text = "fatal: unable to access 'http://deploy:S3CRET-TOKEN@127.0.0.1:9/nixpkgs.git/': \
                    tok/en, tok%2Fen, S3CRET-TOKEN alone, aws-secret-key; the main branch";
        let scrubbed = secrets.scrub(text);
        for secret in ["S3CRET-TOKEN", "deploy", "tok/en", "tok%2Fen", "aws-secret-key"] {
            assert!(!scrubbed.contains(secret), "{secret} in {scrubbed}");
        }
        assert!(scrubbed.contains("http://***@127.0.0.1:9/nixpkgs.git"), "{scrubbed}");
        assert!(
            scrubbed.contains("the main branch"),
            "an ordinary parameter value is no secret"
        );
        assert!(matches!(secrets.scrub("nothing to hide"), Cow::Borrowed(_)));
        assert_eq!(
            Secrets::new(["https://ab:cd@h/"], []).scrub("ab cd"),
            "ab cd",
            "too short to be secrets"
        );
    }
}
