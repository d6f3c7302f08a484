//! Gateway configuration: embedded defaults, then an optional file, then
//! `GATEWAY_…` environment variables.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use protocol::secret::TokenDigest;
use protocol::RedisConfig;
use serde::Deserialize;

/// The commented reference configuration, also the defaults.
pub const DEFAULT_CONFIG: &str = include_str!("../config/gateway.default.toml");

/// The defaults: this service's own, then the `[traces]` section both
/// services share.
fn defaults_toml() -> String {
    [DEFAULT_CONFIG, telemetry::traces::DEFAULTS].concat()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and port the HTTP API listens on.
    pub listen: String,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Most events one batch request may carry.
    pub max_batch_events: usize,
    /// Deepest nesting of arrays and objects a request body may have.
    pub max_json_depth: usize,
    /// How long an idempotency key is remembered, in seconds.
    pub idempotency_ttl_secs: u64,
    /// Retry-After seconds sent with a 503.
    pub retry_after_secs: u64,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// `text` or `json` log lines.
    pub log_format: telemetry::LogFormat,
    /// OpenTelemetry trace export (`OTEL_…` variables override it).
    pub traces: telemetry::traces::TracesConfig,
    /// Redis connection and key layout.
    pub redis: RedisConfig,
    /// When to refuse events because destinations fall behind.
    pub backlog: BacklogConfig,
    /// Who may post events.
    pub auth: AuthConfig,
    /// How many Redis replicas must hold an event before its 202.
    pub replication: ReplicationConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Replicas of the shard's master that must confirm each write (WAIT).
    pub min_replicas: u32,
    /// How long to wait for them (ms) before answering 503.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether `/v1/*` requests must carry one of `keys`.
    pub required: bool,
    pub keys: Vec<KeyConfig>,
}

/// One API key, known by its SHA-256 digest only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Recorded on every event the key sends.
    pub name: String,
    pub sha256: TokenDigest,
    /// Most events per second this key may send through one gateway.
    #[serde(default)]
    pub events_per_sec: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BacklogConfig {
    /// Entries one shard stream may hold before its events get 503.
    pub max_events_per_shard: u64,
    /// Percent of Redis `maxmemory` past which every event gets 503.
    pub max_memory_percent: u8,
    /// How often stream lengths and memory are measured (ms).
    pub check_interval_ms: u64,
}

impl BacklogConfig {
    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.check_interval_ms)
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut config: Self = protocol::config::load_layered(&defaults_toml(), file, "GATEWAY_")
            .context("cannot load the gateway configuration")?;
        config.traces = config
            .traces
            .with_env(|name| std::env::var(name).ok())
            .map_err(anyhow::Error::msg)?;
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    /// The embedded defaults alone; tests start from these.
    pub fn defaults() -> Self {
        protocol::config::parse_defaults(&defaults_toml())
    }

    pub fn validate(&self) -> Result<(), String> {
        self.redis.validate()?;
        self.traces.validate()?;
        if self.max_batch_events == 0 {
            return Err("max_batch_events must be at least 1".into());
        }
        if self.max_body_bytes < 1024 {
            return Err("max_body_bytes must be at least 1024".into());
        }
        if self.idempotency_ttl_secs == 0 {
            return Err("idempotency_ttl_secs must be positive".into());
        }
        let backlog = &self.backlog;
        if backlog.max_events_per_shard == 0 || backlog.check_interval_ms == 0 {
            return Err(
                "backlog.max_events_per_shard and backlog.check_interval_ms must be positive"
                    .into(),
            );
        }
        if !(1..=100).contains(&backlog.max_memory_percent) {
            return Err("backlog.max_memory_percent must be between 1 and 100".into());
        }
        let replication = &self.replication;
        if replication.min_replicas > 0
            && !(1..self.redis.timeout_ms).contains(&replication.timeout_ms)
        {
            return Err(format!(
                "replication.timeout_ms must be positive and below redis.timeout_ms ({}), so a \
                 write that replicas do not confirm in time gets a clear 503",
                self.redis.timeout_ms
            ));
        }
        if self.max_json_depth < 2 {
            return Err(
                "max_json_depth must be at least 2 (an event is an object in a request)".into(),
            );
        }
        self.auth.validate()
    }

    pub fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.idempotency_ttl_secs)
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), String> {
        if self.required && self.keys.is_empty() {
            return Err(
                "auth.required is true but auth.keys is empty: create a key with \
                 `gateway new-key --name NAME` and add the line it prints, or set \
                 auth.required = false (local demos only)"
                    .into(),
            );
        }
        for (index, key) in self.keys.iter().enumerate() {
            if !protocol::config::is_valid_name(&key.name) {
                return Err(format!(
                    "auth.keys[{index}].name `{}` must be 1-64 letters, digits, `-` or `_`",
                    key.name
                ));
            }
            if self.keys[..index]
                .iter()
                .any(|other| other.name == key.name)
            {
                return Err(format!("auth.keys: the name `{}` is used twice", key.name));
            }
            if self.keys[..index]
                .iter()
                .any(|other| other.sha256 == key.sha256)
            {
                return Err(format!(
                    "auth.keys: `{}` has the same key as another",
                    key.name
                ));
            }
            if key.events_per_sec == Some(0) {
                return Err(format!(
                    "auth.keys[{index}].events_per_sec must be positive (omit it for no limit)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid_once_a_key_is_added() {
        let mut config = Config::defaults();
        assert!(config
            .validate()
            .expect_err("no keys")
            .contains("gateway new-key"));
        config.auth.keys.push(KeyConfig {
            name: "web-app".into(),
            sha256: TokenDigest::of("key"),
            events_per_sec: None,
        });
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.redis.shards, 16);
        config.auth.keys.push(KeyConfig {
            name: "web-app".into(),
            sha256: TokenDigest::of("other"),
            events_per_sec: None,
        });
        assert!(config
            .validate()
            .expect_err("same name")
            .contains("used twice"));
    }
}
