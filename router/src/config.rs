//! Router configuration: embedded defaults, then an optional file, then
//! `ROUTER_…` environment variables.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use protocol::RedisConfig;
use serde::{Deserialize, Serialize};

/// The commented reference configuration, also the defaults.
pub const DEFAULT_CONFIG: &str = include_str!("../config/router.default.toml");

/// The defaults: this service's own, then the `[traces]` section both
/// services share.
fn defaults_toml() -> String {
    [DEFAULT_CONFIG, telemetry::traces::DEFAULTS].concat()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This router's consumer name in every group; empty = the host name.
    pub consumer_name: String,
    /// How long in-flight attempts may finish after shutdown begins (ms).
    pub shutdown_grace_ms: u64,
    /// `text` or `json` log lines.
    pub log_format: telemetry::LogFormat,
    /// OpenTelemetry trace export (`OTEL_…` variables override it).
    pub traces: telemetry::traces::TracesConfig,
    /// The admin API, console and metrics endpoint.
    pub admin: AdminConfig,
    /// Redis connection and key layout.
    pub redis: RedisConfig,
    /// Exclusive (shard, destination) ownership.
    pub lease: LeaseConfig,
    /// Stream trimming.
    pub retention: RetentionConfig,
    /// How shard streams are read.
    pub reader: ReaderConfig,
    /// Destinations applied to the catalog in Redis at start-up (a seed:
    /// created if missing, updated if different).
    pub destinations: Vec<DestinationConfig>,
    /// What start-up does with destinations in Redis that `destinations`
    /// does not list.
    pub unlisted_destinations: Unlisted,
    /// Where deliveries may connect (the SSRF guard).
    pub outbound: crate::outbound::OutboundConfig,
    /// The record of every attempt, for `GET /admin/events/{id}`.
    pub delivery_log: DeliveryLogConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryLogConfig {
    pub enabled: bool,
    /// How long records are kept (hours; fractions allowed).
    pub retention_hours: f64,
    /// Most records kept per destination, over all shards.
    pub max_entries_per_destination: usize,
}

impl DeliveryLogConfig {
    pub fn retention(&self) -> Duration {
        Duration::from_secs_f64(self.retention_hours * 3600.0)
    }

    /// The cap of one (shard, destination) log stream.
    pub fn cap_per_shard(&self, shards: u16) -> usize {
        (self.max_entries_per_destination / usize::from(shards.max(1))).max(1)
    }
}

/// What applying a list of destinations does with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlisted {
    /// Left as they are (created through the admin API, say).
    Keep,
    /// Deleted, as `DELETE /admin/destinations/{name}` does.
    Remove,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// Lifetime of a lease without renewal (ms).
    pub ttl_ms: u64,
    /// How often leases are renewed and the split revised (ms).
    pub renew_interval_ms: u64,
    /// How long before a possible expiry this router stops using a lease (ms).
    pub safety_margin_ms: u64,
}

impl LeaseConfig {
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    pub fn renew_interval(&self) -> Duration {
        Duration::from_millis(self.renew_interval_ms)
    }

    pub fn safety_margin(&self) -> Duration {
        Duration::from_millis(self.safety_margin_ms)
    }

    /// Time a lease is sure to have left just before its next renewal:
    /// the longest any attempt or read may take.
    pub fn assured_ms(&self) -> u64 {
        self.ttl_ms
            .saturating_sub(self.safety_margin_ms)
            .saturating_sub(2 * self.renew_interval_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address and port of the admin API, console and `/metrics`.
    pub listen: String,
    /// How often destinations are measured for the admin API and gauges (ms).
    pub overview_interval_ms: u64,
    /// How long a worker with work may make no progress before it shows
    /// as stalled (ms).
    pub stall_after_ms: u64,
    /// Whether every request to the admin listener must carry the token.
    pub require_token: bool,
    /// SHA-256 of the admin token; required when `require_token`.
    pub token_sha256: Option<protocol::secret::TokenDigest>,
}

impl AdminConfig {
    pub fn overview_interval(&self) -> Duration {
        Duration::from_millis(self.overview_interval_ms)
    }

    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// How often shard streams are trimmed (ms).
    pub trim_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    /// Most entries one XREADGROUP fetches.
    pub batch_size: usize,
    /// How long a read blocks waiting for new entries; with a shared
    /// wake-up, how long a caught-up reader waits for it before it reads
    /// again anyway, and how long the wake-up's XREAD blocks (ms).
    pub block_ms: u64,
    /// Most entries one shard × destination reader holds in memory.
    pub window: usize,
    /// Most bytes of entries one destination holds in memory, split evenly
    /// over the shards (each shard's worker gets `max_bytes / shards`).
    pub max_bytes: usize,
    /// Most entries of one user queued in memory behind its head; further
    /// ones are parked (ids only) until their turn.
    pub max_queued_per_user: usize,
    /// While the destinations × shards are at most this many, each reader
    /// blocks in a read of its own, on a connection of its own: an entry
    /// is read in the Redis event-loop turn that stored it. Beyond, every
    /// reader reads without blocking and a shard's readers share one
    /// blocking read as a wake-up, so connections stop growing with
    /// destinations (decision 0004). 0: always share.
    pub own_connections: usize,
}

impl ReaderConfig {
    /// The byte budget of one (shard, destination) worker.
    pub fn max_bytes_per_worker(&self, shards: u16) -> usize {
        self.max_bytes / usize::from(shards.max(1))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Consumer-group name; letters, digits, `-` and `_`.
    pub name: String,
    /// Where events are POSTed.
    pub url: String,
    /// Timeout of one attempt (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts in flight at once, over all shards.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Events undelivered this long after acceptance are dead-lettered (ms).
    #[serde(default)]
    pub max_age_ms: Option<u64>,
    /// When and how often to retry.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Standard Webhooks secrets (`whsec_…`) each delivery is signed with;
    /// more than one while a secret is rotated. Empty: unsigned.
    #[serde(default)]
    pub signing_secrets: Vec<protocol::webhook::SigningSecret>,
    /// Event types delivered (`order.created`, or `order.*` for a prefix);
    /// empty: every event.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// When to stop sending while the destination is clearly failing.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Most attempts per second over all shards and routers; none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<u32>,
}

/// The circuit breaker's rule (see `breaker.rs` for why these defaults).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub enabled: bool,
    /// The window outcomes are counted over (ms).
    pub window_ms: u64,
    /// Fewest events attempted in the window before it may open (each
    /// event counts once, by its latest attempt).
    pub min_attempts: u32,
    /// Share of those whose latest attempt failed (connection error,
    /// timeout, 408, 429, 5xx) at which it opens, in percent.
    pub failure_percent: u8,
    /// While open, one probe attempt goes out this often (ms).
    pub probe_interval_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_ms: 30_000,
            min_attempts: 20,
            failure_percent: 90,
            probe_interval_ms: 5_000,
        }
    }
}

impl BreakerConfig {
    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }

    /// The window in whole seconds (at least one).
    pub fn window_secs(&self) -> u64 {
        self.window_ms.div_ceil(1000).max(1)
    }
}

/// The `[[destinations]]` of a TOML file (any other setting in it is
/// ignored, so a router config file will do), each checked as `config`
/// checks its own, and the file's `unlisted_destinations` (default: keep).
pub fn destinations_file(
    path: &Path,
    config: &Config,
) -> anyhow::Result<(Vec<DestinationConfig>, Unlisted)> {
    #[derive(Deserialize)]
    struct DestinationsFile {
        #[serde(default)]
        destinations: Vec<DestinationConfig>,
        unlisted_destinations: Option<Unlisted>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: DestinationsFile =
        toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    check_destinations(&file.destinations, config).map_err(anyhow::Error::msg)?;
    Ok((
        file.destinations,
        file.unlisted_destinations.unwrap_or(Unlisted::Keep),
    ))
}

/// Checks a list of destinations under `config`'s outbound policy and
/// lease: each valid, no name twice.
fn check_destinations(destinations: &[DestinationConfig], config: &Config) -> Result<(), String> {
    let policy = crate::outbound::Policy::new(&config.outbound)?;
    let mut names = HashSet::new();
    for destination in destinations {
        destination.check(&policy, &config.lease)?;
        if !names.insert(&destination.name) {
            return Err(format!(
                "destination name `{}` is used twice",
                destination.name
            ));
        }
    }
    Ok(())
}

/// Longest event type a destination may subscribe to (the gateway's limit).
pub const MAX_EVENT_TYPE_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay before the second attempt (ms); each later delay doubles.
    pub initial_delay_ms: u64,
    /// Longest delay between attempts (ms), also the cap on Retry-After.
    pub max_delay_ms: u64,
    /// Attempts before the event is dead-lettered (the first included);
    /// none: only `max_elapsed_ms` ends the retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// How long an event is retried, from its first attempt, before it is
    /// dead-lettered (ms). Time the destination's circuit is open or the
    /// destination paused does not count.
    pub max_elapsed_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_delay_ms: 100,
            max_delay_ms: 300_000,
            max_attempts: None,
            max_elapsed_ms: 86_400_000,
        }
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_concurrency() -> usize {
    64
}

impl Config {
    /// Loads defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut config: Self = protocol::config::load_layered(&defaults_toml(), file, "ROUTER_")
            .context("cannot load the router configuration")?;
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

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.redis.validate()?;
        self.traces.validate()?;
        if self.consumer_name.chars().any(char::is_whitespace) {
            return Err("consumer_name must not contain whitespace".into());
        }
        if self.admin.overview_interval_ms == 0 {
            return Err("admin.overview_interval_ms must be positive".into());
        }
        if self.admin.stall_after_ms < self.admin.overview_interval_ms {
            return Err(format!(
                "admin.stall_after_ms ({}) must be at least admin.overview_interval_ms ({}), \
                 which is how often workers are checked",
                self.admin.stall_after_ms, self.admin.overview_interval_ms
            ));
        }
        if self.admin.require_token && self.admin.token_sha256.is_none() {
            return Err("admin.token_sha256 is not set: create a token with \
                 `router new-admin-token` and add the line it prints, or set \
                 admin.require_token = false (local demos only)"
                .into());
        }
        if self.retention.trim_interval_ms == 0 {
            return Err("retention.trim_interval_ms must be positive".into());
        }
        self.validate_lease()?;
        if self.reader.batch_size == 0 || self.reader.window == 0 {
            return Err("reader.batch_size and reader.window must be at least 1".into());
        }
        if self.reader.max_queued_per_user == 0
            || self.reader.max_queued_per_user > self.reader.window
        {
            return Err("reader.max_queued_per_user must be between 1 and reader.window".into());
        }
        if self.reader.max_bytes_per_worker(self.redis.shards) < 64 * 1024 {
            return Err(format!(
                "reader.max_bytes must allow at least 64 KiB per shard ({} shards: at least {} bytes)",
                self.redis.shards,
                64 * 1024 * usize::from(self.redis.shards)
            ));
        }
        let log = &self.delivery_log;
        if !(log.retention_hours > 0.0 && log.retention_hours <= 24.0 * 365.0)
            || log.max_entries_per_destination == 0
        {
            return Err(
                "delivery_log needs 0 < retention_hours ≤ 8760 and max_entries_per_destination ≥ 1"
                    .into(),
            );
        }
        if self.reader.block_ms == 0 {
            return Err("reader.block_ms must be positive (0 would block forever)".into());
        }
        check_destinations(&self.destinations, self)
    }

    /// Checks that every read fits in the time a lease is sure to have
    /// left, so a router never acts on an expired lease (attempts are
    /// checked per destination, [`DestinationConfig::check`]).
    fn validate_lease(&self) -> Result<(), String> {
        let lease = &self.lease;
        if lease.renew_interval_ms == 0 {
            return Err("lease.renew_interval_ms must be positive".into());
        }
        let assured = lease.assured_ms();
        let read = self.reader.block_ms + self.redis.timeout_ms;
        if read > assured {
            return Err(format!(
                "lease.ttl_ms is too short: ttl_ms - safety_margin_ms - 2 * renew_interval_ms = {assured} ms \
                 must cover reader.block_ms + redis.timeout_ms = {read} ms"
            ));
        }
        Ok(())
    }

    /// The consumer name: the configured one, else the host name.
    pub fn consumer_name(&self) -> String {
        if !self.consumer_name.is_empty() {
            return self.consumer_name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty() && !name.contains(char::is_whitespace))
            .unwrap_or_else(|| "router".to_owned())
    }
}

impl DestinationConfig {
    /// Everything a destination must satisfy, wherever it comes from (the
    /// config file, the admin API): its own fields, the outbound policy
    /// for an IP-literal URL, and an attempt that fits in a lease.
    pub fn check(
        &self,
        policy: &crate::outbound::Policy,
        lease: &LeaseConfig,
    ) -> Result<(), String> {
        self.validate()?;
        let name = &self.name;
        let url = reqwest::Url::parse(&self.url).expect("validated above");
        policy
            .check_url(&url)
            .map_err(|refused| format!("destination `{name}`: url: {refused}"))?;
        let assured = lease.assured_ms();
        if self.timeout_ms > assured {
            return Err(format!(
                "destination `{name}`: timeout_ms ({} ms) is longer than a lease is sure to last: \
                 lease.ttl_ms - safety_margin_ms - 2 * renew_interval_ms = {assured} ms",
                self.timeout_ms
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if !protocol::config::is_valid_name(name) {
            return Err(format!(
                "destination name `{name}` must be 1 to 64 letters, digits, `-` or `_`"
            ));
        }
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| format!("destination `{name}`: url `{}` is invalid: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("destination `{name}`: url must be http or https"));
        }
        if self.max_age_ms == Some(0) {
            return Err(format!(
                "destination `{name}`: max_age_ms must be positive when set"
            ));
        }
        if self.timeout_ms == 0 || self.max_concurrency == 0 {
            return Err(format!(
                "destination `{name}`: timeout_ms and max_concurrency must be positive"
            ));
        }
        let retry = self.retry;
        if retry.max_attempts == Some(0)
            || retry.max_elapsed_ms == 0
            || retry.initial_delay_ms == 0
            || retry.max_delay_ms < retry.initial_delay_ms
        {
            return Err(format!(
                "destination `{name}`: retry needs max_attempts ≥ 1 (when set), max_elapsed_ms ≥ 1 \
                 and 0 < initial_delay_ms ≤ max_delay_ms"
            ));
        }
        let breaker = self.breaker;
        if breaker.window_ms == 0
            || breaker.window_ms > 600_000
            || breaker.min_attempts == 0
            || !(1..=100).contains(&breaker.failure_percent)
            || breaker.probe_interval_ms == 0
        {
            return Err(format!(
                "destination `{name}`: breaker needs 0 < window_ms ≤ 600000, min_attempts ≥ 1, \
                 1 ≤ failure_percent ≤ 100 and probe_interval_ms ≥ 1"
            ));
        }
        if self.rate_limit_per_sec == Some(0) {
            return Err(format!(
                "destination `{name}`: rate_limit_per_sec must be at least 1 when set"
            ));
        }
        for event_type in &self.event_types {
            let prefix = event_type.strip_suffix('*').unwrap_or(event_type);
            if event_type.is_empty()
                || event_type.len() > MAX_EVENT_TYPE_BYTES
                || prefix.contains('*')
            {
                return Err(format!(
                    "destination `{name}`: event_types: `{event_type}` must be 1 to \
                     {MAX_EVENT_TYPE_BYTES} bytes, with `*` only at the end"
                ));
            }
        }
        for (header, value) in &self.headers {
            reqwest::header::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                format!("destination `{name}`: `{header}` is not a valid header name")
            })?;
            reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                format!("destination `{name}`: header `{header}` has an invalid value")
            })?;
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Whether an event of `event_type` is one this destination subscribes to.
    pub fn subscribes_to(&self, event_type: Option<&str>) -> bool {
        if self.event_types.is_empty() {
            return true;
        }
        let Some(event_type) = event_type else {
            return false;
        };
        self.event_types
            .iter()
            .any(|wanted| match wanted.strip_suffix('*') {
                Some(prefix) => event_type.starts_with(prefix),
                None => wanted == event_type,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults plus the admin token they lack, and the loopback network
    /// their example destinations are on allow-listed.
    fn valid_defaults() -> Config {
        let mut config = Config::defaults();
        config.admin.token_sha256 = Some(protocol::secret::TokenDigest::of("token"));
        config.outbound.allowed_networks = vec!["127.0.0.0/8".into()];
        config
    }

    #[test]
    fn embedded_defaults_are_valid_once_a_token_is_set_and_loopback_allowed() {
        let mut config = Config::defaults();
        let refusal = config.validate().expect_err("no admin token");
        assert!(refusal.contains("router new-admin-token"), "{refusal}");
        config.admin.token_sha256 = Some(protocol::secret::TokenDigest::of("token"));
        let refusal = config.validate().expect_err("loopback destinations");
        assert!(
            refusal.contains("destination `healthy`: url: refused to connect to 127.0.0.1"),
            "{refusal}"
        );
        let config = valid_defaults();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.destinations.len(), 4);
        assert_eq!(config.destinations[1].retry, RetryConfig::default());
    }

    /// The reference file states each destination default twice (the first
    /// example spells them out, the comment above it lists them); the code
    /// applies its own. All three must agree.
    #[test]
    fn the_reference_file_states_the_destination_defaults_the_code_applies() {
        let implied: DestinationConfig =
            protocol::config::parse_defaults("name = \"d\"\nurl = \"http://d.example/\"");
        let spelled = &Config::defaults().destinations[0];
        assert_eq!(spelled.timeout_ms, implied.timeout_ms);
        assert_eq!(spelled.max_concurrency, implied.max_concurrency);
        assert_eq!(spelled.retry, implied.retry);
        assert_eq!(spelled.breaker, implied.breaker);
        // The comment of `field`: its line and the more indented ones after
        // it, as one line of single spaces.
        let commented = |field: &str| {
            let mut lines = DEFAULT_CONFIG
                .lines()
                .skip_while(|line| !line.starts_with(&format!("#   {field} ")));
            let first = lines
                .next()
                .unwrap_or_else(|| panic!("the comment lists {field}"));
            let rest = lines.take_while(|line| line.starts_with("#     "));
            std::iter::once(first)
                .chain(rest)
                .flat_map(|line| line.trim_start_matches('#').split_whitespace())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let listed = [
            ("timeout_ms", vec![implied.timeout_ms.to_string()]),
            ("max_concurrency", vec![implied.max_concurrency.to_string()]),
            (
                "[retry]",
                vec![
                    format!("initial_delay_ms ({})", implied.retry.initial_delay_ms),
                    format!("max_delay_ms ({})", implied.retry.max_delay_ms),
                    format!("max_elapsed_ms ({})", implied.retry.max_elapsed_ms),
                ],
            ),
            (
                "[breaker]",
                vec![
                    format!("enabled ({})", implied.breaker.enabled),
                    format!("window_ms ({})", implied.breaker.window_ms),
                    format!("min_attempts ({})", implied.breaker.min_attempts),
                ],
            ),
        ];
        for (field, values) in listed {
            let line = commented(field);
            for value in values {
                let expected = if value.contains('(') {
                    value
                } else {
                    format!("({value})")
                };
                assert!(line.contains(&expected), "`{line}` should say {expected}");
            }
        }
    }

    #[test]
    fn event_types_match_exactly_or_by_prefix() {
        let mut destination = valid_defaults().destinations[0].clone();
        assert!(destination.subscribes_to(None), "no list: everything");
        assert!(destination.subscribes_to(Some("a.b")));
        destination.event_types = vec!["order.*".into(), "user.created".into()];
        for (event_type, wanted) in [
            (Some("order.created"), true),
            (Some("order."), true),
            (Some("order"), false),
            (Some("user.created"), true),
            (Some("user.created.v2"), false),
            (Some("user.deleted"), false),
            (None, false),
        ] {
            assert_eq!(
                destination.subscribes_to(event_type),
                wanted,
                "{event_type:?}"
            );
        }
        destination.event_types = vec!["*".into()];
        assert!(destination.subscribes_to(Some("anything")));
        assert!(
            !destination.subscribes_to(None),
            "a list asks for typed events"
        );
    }

    #[test]
    fn bad_destinations_are_refused_with_their_name() {
        let mut config = valid_defaults();
        config.destinations[0].name = "has space".into();
        assert!(config
            .validate()
            .expect_err("invalid")
            .contains("has space"));
        let mut config = valid_defaults();
        config.destinations[1].name = "healthy".into();
        assert!(config
            .validate()
            .expect_err("invalid")
            .contains("used twice"));
        let mut config = valid_defaults();
        config.destinations[2].url = "ftp://x".into();
        assert!(config.validate().expect_err("invalid").contains("http"));
    }

    #[test]
    fn reader_budgets_that_cannot_work_are_refused_with_their_names() {
        let mut config = valid_defaults();
        config.reader.max_queued_per_user = 0;
        let error = config.validate().expect_err("no allowance");
        assert!(error.contains("reader.max_queued_per_user"), "{error}");
        config.reader.max_queued_per_user = config.reader.window + 1;
        assert!(config.validate().is_err(), "more than the window");
        let mut config = valid_defaults();
        config.reader.max_bytes = 16 * 64 * 1024 - 1;
        let error = config.validate().expect_err("under 64 KiB a shard");
        assert!(error.contains("reader.max_bytes"), "{error}");
        config.reader.max_bytes += 1;
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn a_lease_too_short_for_an_attempt_is_refused() {
        let mut config = valid_defaults();
        config.destinations[2].timeout_ms = 17_001;
        let error = config.validate().expect_err("too short");
        assert!(error.contains("`slow`"), "{error}");
        config.destinations[2].timeout_ms = 17_000;
        assert_eq!(config.validate(), Ok(()));
        config.lease.renew_interval_ms = 5_000;
        assert!(config
            .validate()
            .expect_err("too short")
            .contains("lease.ttl_ms"));
    }
}
