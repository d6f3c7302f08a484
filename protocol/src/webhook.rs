//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the
//! router signs every delivery with the destination's secrets, and the mock
//! destinations verify them.
//!
//! A secret is `whsec_` followed by 24 to 64 random bytes in base64. The
//! signature is the base64 HMAC-SHA256, under the decoded secret, of
//! `{webhook-id}.{webhook-timestamp}.{body}`, sent as `v1,<signature>`; with
//! several secrets (while one is rotated out) the signatures are sent
//! space-separated, and a receiver accepts any one it can verify.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

const PREFIX: &str = "whsec_";

/// A destination's signing secret. Never printed: `Debug` shows a
/// placeholder; `Serialize` writes it as a config file holds it.
#[derive(Clone, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct SigningSecret(SecretSlice<u8>);

impl From<SigningSecret> for String {
    fn from(secret: SigningSecret) -> Self {
        format!("{PREFIX}{}", STANDARD.encode(secret.0.expose_secret()))
    }
}

impl TryFrom<String> for SigningSecret {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let encoded = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or("a signing secret must start with `whsec_`")?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| "a signing secret must be `whsec_` then base64")?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "a signing secret must hold 24 to 64 bytes; this one holds {}",
                key.len()
            ));
        }
        Ok(Self(key.into()))
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

impl SigningSecret {
    /// A new random secret, as config files hold it.
    pub fn generate() -> String {
        let mut key = [0; 32];
        getrandom::fill(&mut key).expect("the operating system provides random bytes");
        format!("{PREFIX}{}", STANDARD.encode(key))
    }

    /// The HMAC-SHA256 of `{id}.{timestamp}.{body}` under this secret.
    fn tag(&self, id: &str, timestamp: u64, body: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// `v1,<base64 signature>` of one message.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        format!("v1,{}", STANDARD.encode(self.tag(id, timestamp, body)))
    }

    /// Whether any `v1` signature in `header` is this secret's for the
    /// message (compared in constant time).
    pub fn verify(&self, id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        let expected = self.tag(id, timestamp, body);
        header.split(' ').any(|signature| {
            signature
                .strip_prefix("v1,")
                .and_then(|encoded| STANDARD.decode(encoded).ok())
                .is_some_and(|given| bool::from(expected.as_slice().ct_eq(&given)))
        })
    }
}

/// The `webhook-signature` header value: one signature per secret.
pub fn signature_header(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> SigningSecret {
        SigningSecret::try_from(text.to_owned()).expect("valid secret")
    }

    #[test]
    fn signs_like_the_standard_webhooks_reference() {
        // The example of the Standard Webhooks reference libraries' tests.
        let secret = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn verifies_any_signature_of_a_rotation_and_refuses_tampering() {
        let (old, new) = (
            secret(&SigningSecret::generate()),
            secret(&SigningSecret::generate()),
        );
        let header = signature_header(&[new.clone(), old.clone()], "id", 5, b"body");
        assert_eq!(header.split(' ').count(), 2);
        assert!(old.verify("id", 5, b"body", &header));
        assert!(new.verify("id", 5, b"body", &header));
        assert!(!new.verify("id", 5, b"bodx", &header));
        assert!(!new.verify("id", 6, b"body", &header));
        assert!(!new.verify("other", 5, b"body", &header));
        assert!(!new.verify("id", 5, b"body", "v1,AAAA v2,zzz"));
    }

    #[test]
    fn malformed_secrets_are_refused_and_never_printed() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_***",
            "whsec_c2hvcnQ=",
        ] {
            assert!(SigningSecret::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        let text = SigningSecret::generate();
        assert!(!format!("{:?}", secret(&text)).contains(&text[6..]));
    }
}
