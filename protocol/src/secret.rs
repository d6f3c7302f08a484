//! Bearer tokens the services check: the gateway's API keys and the router's
//! admin token. Configs hold only their SHA-256 digests, so a leaked config
//! or log line does not leak a usable token, and a presented token is
//! compared with every digest in constant time.
//!
//! Plain SHA-256 (not a slow password hash) suits these tokens because they
//! are generated with 256 random bits ([`generate_token`]), not chosen by people.

use std::fmt;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 digest of a token, written in config as 64 hex digits.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// The 64 hex digits config files hold.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<TokenDigest> for String {
    fn from(digest: TokenDigest) -> Self {
        digest.to_hex()
    }
}

impl TryFrom<String> for TokenDigest {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let mut digest = [0; 32];
        hex::decode_to_slice(text.trim(), &mut digest).map_err(|_| {
            "a token digest must be 64 hex digits (the SHA-256 of the token; \
             `gateway new-key` prints one)"
                .to_owned()
        })?;
        Ok(Self(digest))
    }
}

/// Shows only a prefix: enough to tell digests apart in a debug dump.
impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({}…)", &self.to_hex()[..8])
    }
}

/// The position of the digest `presented` matches. Every digest is compared
/// in full whatever matches, so the time taken says nothing about which
/// digest, or how much of one, a guess got right.
pub fn find_token<'a>(
    presented: &str,
    digests: impl IntoIterator<Item = &'a TokenDigest>,
) -> Option<usize> {
    let presented = TokenDigest::of(presented);
    let mut found = None;
    for (index, digest) in digests.into_iter().enumerate() {
        if bool::from(digest.0.ct_eq(&presented.0)) {
            found = Some(index);
        }
    }
    found
}

/// The token of a `Bearer` credential (the scheme is case-insensitive).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A new random token: `prefix` then 32 random bytes in URL-safe base64.
pub fn generate_token(prefix: &str) -> String {
    let mut bytes = [0; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_sha256_and_round_trip_through_hex() {
        // sha256("abc") from FIPS 180-2.
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(TokenDigest::of("abc").to_hex(), hex);
        assert_eq!(
            TokenDigest::try_from(hex.to_owned()),
            Ok(TokenDigest::of("abc"))
        );
        assert!(TokenDigest::try_from("abc".to_owned()).is_err());
        assert!(!format!("{:?}", TokenDigest::of("abc")).contains(hex));
    }

    #[test]
    fn finds_the_matching_digest_only() {
        let digests = [TokenDigest::of("one"), TokenDigest::of("two")];
        assert_eq!(find_token("two", &digests), Some(1));
        assert_eq!(find_token("one", &digests), Some(0));
        assert_eq!(find_token("three", &digests), None);
        assert_eq!(find_token("", &digests), None);
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn generated_tokens_differ_and_carry_the_prefix() {
        let (a, b) = (generate_token("evd_"), generate_token("evd_"));
        assert_ne!(a, b);
        assert!(a.starts_with("evd_") && a.len() == 4 + 43, "{a}");
    }
}
