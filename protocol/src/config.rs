//! The Redis settings both services read from their config files.

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::connection::HealingCluster;
use crate::slot_owner::SlotOwner;
use crate::RedisConnection;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

/// Reads a service config in layers: the embedded `defaults` TOML, then
/// `file` if given, then environment variables `<env_prefix><KEY>` with `__`
/// between section and key (e.g. `ROUTER_REDIS__URL`).
pub fn load_layered<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    env_prefix: &str,
) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Toml::string(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError::MissingFile(file.display().to_string()));
        }
        figment = figment.merge(Toml::file(file));
    }
    figment
        .merge(Env::prefixed(env_prefix).split("__"))
        .extract()
        .map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// Parses a service's embedded default TOML alone (what tests start from).
pub fn parse_defaults<T: DeserializeOwned>(defaults: &str) -> T {
    Figment::from(Toml::string(defaults))
        .extract()
        .expect("the embedded default config is valid")
}

/// 1 to 64 letters, digits, `-` or `_`: the rule for destination and API
/// key names, which appear in Redis keys, URLs, metric labels and events.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `scheme://user:password@rest` → `scheme://user:***@rest`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable url>".into();
    };
    match rest.split_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// The `[redis]` section of the gateway and router configs. `Serialize`
/// writes a config file (the URLs in clear, as such a file holds them);
/// logs use [`Self::redacted_url`].
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379`, `redis://:password@host`,
    /// `redis://user:password@host` (ACL) or `rediss://…` (TLS). Secret,
    /// since it may hold a password: logs show [`Self::redacted_url`].
    #[serde(serialize_with = "in_clear")]
    pub url: SecretString,
    /// Seed nodes of a Redis Cluster (any few of its masters or replicas;
    /// the rest is discovered). When given, the cluster is used and `url`
    /// is not. From the environment as one comma-separated value.
    #[serde(
        deserialize_with = "list_or_comma_separated",
        serialize_with = "all_in_clear"
    )]
    pub cluster_nodes: Vec<SecretString>,
    /// Prefix of every key this deployment uses.
    pub key_prefix: String,
    /// Number of shard streams; fixed at first start.
    pub shards: u16,
    /// Multiplexed connections for ordinary (non-blocking) commands.
    pub connections: usize,
    /// Longest wait for an ordinary command's reply, in milliseconds.
    pub timeout_ms: u64,
    /// Longest a new connection may take to answer, in milliseconds. On a
    /// cluster, a connection made while a master does not answer refreshes
    /// its slot map at each command for that master's slots, and each
    /// refresh holds up its commands to every master this long.
    pub connect_timeout_ms: u64,
    /// Start even when Redis has the append-only file off or an evicting
    /// `maxmemory-policy` (either can silently lose accepted events).
    pub allow_unsafe_persistence: bool,
}

impl RedisConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks relationships a type cannot express; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 {
            return Err("redis.shards must be at least 1".into());
        }
        if self.connections == 0 {
            return Err("redis.connections must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            return Err("redis.timeout_ms must be positive".into());
        }
        if self.connect_timeout_ms == 0 {
            return Err("redis.connect_timeout_ms must be positive".into());
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err("redis.key_prefix must be non-empty and free of `{` and `}` (hash tags are added per shard)".into());
        }
        if self.is_cluster() {
            return redis::cluster::ClusterClient::new(self.cluster_node_urls())
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "redis.cluster_nodes `{}` is invalid: {e}",
                        self.redacted_url()
                    )
                });
        }
        redis::Client::open(self.url.expose_secret())
            .map(|_| ())
            .map_err(|e| format!("redis.url `{}` is invalid: {e}", self.redacted_url()))
    }

    /// Whether `cluster_nodes` selects a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    fn cluster_node_urls(&self) -> Vec<&str> {
        self.cluster_nodes
            .iter()
            .map(|url| url.expose_secret())
            .collect()
    }

    /// The URL (or the cluster's seed URLs) with any password replaced by
    /// `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        if self.is_cluster() {
            let nodes: Vec<String> = self
                .cluster_node_urls()
                .into_iter()
                .map(redact_password)
                .collect();
            return format!("cluster {}", nodes.join(","));
        }
        redact_password(self.url.expose_secret())
    }

    /// A reconnecting connection for ordinary commands, which fail after
    /// `timeout` instead of hanging while Redis is unreachable or paused.
    /// On a cluster, a command that failed on a connection error is retried
    /// (within `timeout`) after the client re-learns which node owns its slot.
    pub async fn connect(&self, timeout: Duration) -> redis::RedisResult<RedisConnection> {
        if self.is_cluster() {
            return self.connect_cluster(timeout).await;
        }
        self.connect_single(timeout).await
    }

    /// A connection for blocking reads only (`XREADGROUP … BLOCK`) of
    /// `key`, whose replies may take up to `timeout`. On a cluster it is a
    /// connection to the master serving `key`'s slot alone, and it never
    /// retries a command by itself: a read whose reply was lost may still
    /// have moved entries into our pending list, so the caller must see the
    /// error and re-read that list before reading anything newer. After a
    /// `MOVED` the next read goes to the new owner.
    pub async fn connect_for_blocking_reads(
        &self,
        key: &str,
        timeout: Duration,
    ) -> redis::RedisResult<RedisConnection> {
        if self.is_cluster() {
            let seeds = self
                .cluster_node_urls()
                .into_iter()
                .map(redis::IntoConnectionInfo::into_connection_info)
                .collect::<redis::RedisResult<_>>()?;
            let questions = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.connect_timeout()))
                .set_response_timeout(Some(self.timeout()));
            let reads = questions.clone().set_response_timeout(Some(timeout));
            return Ok(RedisConnection::SlotOwner(
                SlotOwner::connect(seeds, key, reads, questions).await?,
            ));
        }
        self.connect_single(timeout).await
    }

    async fn connect_cluster(&self, timeout: Duration) -> redis::RedisResult<RedisConnection> {
        // A command's reply is awaited `timeout` in all, retries included.
        // Each attempt may wait longer: redis-rs resends a command whose
        // attempt timed out, and a write resent while the first copy is
        // still queued on a stalled master would be stored twice, under a
        // new id. With the attempt outliving the whole, the caller has
        // given up (and no resend follows) before an attempt times out.
        let client = redis::cluster::ClusterClient::builder(self.cluster_node_urls())
            .connection_timeout(self.connect_timeout())
            .response_timeout(timeout.saturating_mul(2))
            .overall_response_timeout(Some(timeout))
            .build()?;
        Ok(RedisConnection::Cluster(
            HealingCluster::connect(client).await?,
        ))
    }

    async fn connect_single(&self, timeout: Duration) -> redis::RedisResult<RedisConnection> {
        let client = redis::Client::open(self.url.expose_secret())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(self.connect_timeout()))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(RedisConnection::Single(
            redis::aio::ConnectionManager::new_with_config(client, config).await?,
        ))
    }
}

fn in_clear<S: Serializer>(secret: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

fn all_in_clear<S: Serializer>(secrets: &[SecretString], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(secrets.iter().map(ExposeSecret::expose_secret))
}

/// A list of URLs from TOML, or one comma-separated string (from an
/// environment variable).
fn list_or_comma_separated<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    let urls = match ListOrString::deserialize(deserializer)? {
        ListOrString::List(urls) => urls,
        ListOrString::String(joined) => joined
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    Ok(urls.into_iter().map(SecretString::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("redis://:hunter2@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redact_password("rediss://app:hunter2@h"),
            "rediss://app:***@h"
        );
        assert_eq!(redact_password("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_password("hunter2"), "<unparsable url>");
    }
}
