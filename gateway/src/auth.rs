//! Who may post events: API keys (`Authorization: Bearer <key>`) checked
//! against the configured digests, and each key's optional rate limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::secret::{bearer_token, find_token, TokenDigest};

use crate::config::AuthConfig;
use crate::error::ApiError;

/// The key a request was authenticated with.
pub struct ApiKey {
    pub name: String,
    digest: TokenDigest,
    limit: Option<Mutex<TokenBucket>>,
}

pub struct Authenticator {
    required: bool,
    keys: Vec<ApiKey>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            required: config.required,
            keys: config
                .keys
                .iter()
                .map(|key| ApiKey {
                    name: key.name.clone(),
                    digest: key.sha256.clone(),
                    limit: key
                        .events_per_sec
                        .map(|rate| Mutex::new(TokenBucket::new(f64::from(rate)))),
                })
                .collect(),
        }
    }

    /// The key `authorization` (the header's value) carries. `None` when
    /// authentication is off and no key was sent.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Option<&ApiKey>, ApiError> {
        let Some(header) = authorization else {
            return if self.required {
                Err(ApiError::Unauthorized(
                    "missing API key: send `Authorization: Bearer <key>`",
                ))
            } else {
                Ok(None)
            };
        };
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(bearer_token)
            .ok_or(ApiError::Unauthorized(
                "malformed Authorization header: expected `Bearer <key>`",
            ))?;
        match find_token(token, self.keys.iter().map(|key| &key.digest)) {
            Some(index) => Ok(Some(&self.keys[index])),
            None => Err(ApiError::Unauthorized("invalid API key")),
        }
    }
}

impl ApiKey {
    /// Takes `events` from the key's allowance, or says when to come back.
    pub fn admit(&self, events: usize) -> Result<(), ApiError> {
        let Some(limit) = &self.limit else {
            return Ok(());
        };
        limit
            .lock()
            .expect("a rate limiter is never poisoned")
            .take(events as f64, Instant::now())
            .map_err(|wait| ApiError::RateLimited {
                key: self.name.clone(),
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            })
    }
}

/// A token bucket holding up to one second's worth of events. A request is
/// admitted while the bucket holds at least one token and takes all it
/// needs, going into debt if it must: a batch larger than the rate is then
/// admitted once and paid back over time, instead of being refused forever.
struct TokenBucket {
    per_sec: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(per_sec: f64) -> Self {
        Self {
            per_sec,
            tokens: per_sec,
            updated: Instant::now(),
        }
    }

    fn take(&mut self, events: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec);
        self.updated = now;
        if self.tokens < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec));
        }
        self.tokens -= events;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_admits_its_rate_then_says_when_to_return() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0);
        bucket.updated = start;
        for _ in 0..10 {
            assert_eq!(bucket.take(1.0, start), Ok(()));
        }
        let wait = bucket.take(1.0, start).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(bucket.take(1.0, start + wait), Ok(()));
    }

    #[test]
    fn a_batch_larger_than_the_rate_is_admitted_once_then_repaid() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0);
        bucket.updated = start;
        assert_eq!(bucket.take(25.0, start), Ok(()));
        // 15 in debt: one token is back after 1.6 s.
        let wait = bucket.take(1.0, start).expect_err("in debt");
        assert!((wait.as_secs_f64() - 1.6).abs() < 1e-9, "{wait:?}");
        assert!(bucket
            .take(1.0, start + Duration::from_millis(1600))
            .is_ok());
    }
}
