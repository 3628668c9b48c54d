//! Bearer tokens: configured secrets that callers present as `Authorization: Bearer <token>`.
//!
//! Contract:
//! - A [`Token`] never prints its value: `Debug` and `Display` show `<redacted>`, so settings
//!   structs that hold one can be logged.
//! - [`Token::matches`] compares in constant time: both sides are hashed with SHA-256 first
//!   and the digests compared with `subtle`, so neither the content nor the length of the
//!   configured token leaks through timing.
//! - [`bearer`] extracts the token of an `Authorization` header value (`Bearer` is
//!   case-insensitive, surrounding spaces are ignored).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A configured secret token.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    pub fn new(value: &str) -> Token {
        Token { digest: Sha256::digest(value.as_bytes()).into() }
    }

    /// Whether `presented` is this token, in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        self.has_digest(&digest_of(presented))
    }

    fn has_digest(&self, digest: &[u8; 32]) -> bool {
        self.digest.ct_eq(digest).into()
    }
}

impl FromStr for Token {
    type Err = String;
    fn from_str(s: &str) -> Result<Token, String> {
        let s = s.trim();
        if s.len() < 16 {
            return Err("a token must be at least 16 characters".into());
        }
        Ok(Token::new(s))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim()).filter(|t| !t.is_empty())
}

fn digest_of(presented: &str) -> [u8; 32] {
    Sha256::digest(presented.as_bytes()).into()
}

/// Whether an `Authorization` header value carries one of `accepted`. The presented token is
/// hashed once, however many tokens are accepted (this runs on every checked request).
pub fn authorized<'a>(header: Option<&str>, accepted: impl IntoIterator<Item = &'a Token>) -> bool {
    let Some(presented) = header.and_then(bearer) else { return false };
    let digest = digest_of(presented);
    // Compare with every accepted token (no early exit) so timing does not say which.
    accepted.into_iter().fold(false, |ok, t| t.has_digest(&digest) | ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves_and_never_print() {
        let t: Token = "0123456789abcdef-secret".parse().unwrap();
        assert!(t.matches("0123456789abcdef-secret"));
        assert!(!t.matches("0123456789abcdef-secreT"));
        assert!(!t.matches(""));
        assert_eq!(format!("{t:?} {t}"), "<redacted> <redacted>");
        assert!("short".parse::<Token>().is_err());
    }

    #[test]
    fn bearer_headers() {
        let t = Token::new("0123456789abcdef-secret");
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert!(authorized(Some("Bearer 0123456789abcdef-secret"), [&t]));
        assert!(!authorized(Some("Bearer nope"), [&t]));
        assert!(!authorized(None, [&t]));
        assert!(!authorized(Some("Bearer 0123456789abcdef-secret"), []));
        // Any of several accepted tokens, wherever it comes in the list.
        let other = Token::new("fedcba9876543210-other");
        assert!(authorized(Some("Bearer 0123456789abcdef-secret"), [&other, &t]));
        assert!(authorized(Some("Bearer fedcba9876543210-other"), [&other, &t]));
        assert!(!authorized(Some("Bearer fedcba9876543210-othe"), [&other, &t]));
    }
}
