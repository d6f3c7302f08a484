//! The bodies of the admin API's destination routes: what a create or a
//! change may say, and what a read shows (secrets masked). Pure: the
//! handlers in [`crate::admin::routes`] do the I/O.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::admin::overview::DestinationView;
use crate::config::{BreakerConfig, DestinationConfig, LeaseConfig, RetryConfig};
use crate::control::catalog::{Definition, Start};
use crate::outbound::Policy;

/// Fields a change may set; `name` is fixed at creation.
pub(crate) const CHANGEABLE: [&str; 10] = [
    "url",
    "timeout_ms",
    "max_concurrency",
    "headers",
    "retry",
    "max_age_ms",
    "signing_secrets",
    "event_types",
    "breaker",
    "rate_limit_per_sec",
];

/// Header names whose values are shown masked: they usually carry credentials.
const SECRET_HEADER_WORDS: [&str; 6] = ["auth", "token", "key", "secret", "cookie", "password"];

/// A create request: the destination and where its delivery starts.
pub fn parse_create(
    body: &[u8],
    policy: &Policy,
    lease: &LeaseConfig,
) -> Result<(DestinationConfig, Start), String> {
    let mut fields = object(body)?;
    let start = match fields.remove("start_from_ms") {
        None | Some(Value::Null) => Start::Now,
        Some(value) => {
            let ms = value
                .as_u64()
                .ok_or("start_from_ms must be a Unix time in milliseconds")?;
            if ms > protocol::unix_millis() {
                return Err("start_from_ms is in the future".into());
            }
            Start::Since(ms)
        }
    };
    let settings: DestinationConfig = from_fields(Value::Object(fields))?;
    settings.check(policy, lease)?;
    Ok((settings, start))
}

/// A change request applied to `current` as a JSON merge patch (RFC 7396):
/// fields given replace, objects (`headers`, `retry`) merge, `null` removes.
pub fn apply_change(
    current: &DestinationConfig,
    body: &[u8],
    policy: &Policy,
    lease: &LeaseConfig,
) -> Result<DestinationConfig, String> {
    let change = object(body)?;
    if let Some(field) = change.keys().find(|k| !CHANGEABLE.contains(&k.as_str())) {
        return Err(if field == "name" {
            "name cannot be changed: create a destination under the new name".into()
        } else {
            format!(
                "unknown field `{field}`; a change may set {}",
                CHANGEABLE.join(", ")
            )
        });
    }
    let mut merged = serde_json::to_value(current).map_err(|e| e.to_string())?;
    merge(&mut merged, Value::Object(change));
    let changed: DestinationConfig = from_fields(merged)?;
    changed.check(policy, lease)?;
    Ok(changed)
}

/// The settings in `fields`; an error names the field it is about.
fn from_fields(fields: Value) -> Result<DestinationConfig, String> {
    serde_path_to_error::deserialize(fields).map_err(|error| {
        let path = error.path().to_string();
        if path == "." {
            error.into_inner().to_string()
        } else {
            format!("{path}: {}", error.into_inner())
        }
    })
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err("the body must be a JSON object".into()),
        Err(e) => Err(format!("invalid JSON body: {e}")),
    }
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(&key);
                } else {
                    merge(target.entry(key).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch,
    }
}

/// A new destination (`POST /admin/destinations`). Unknown fields are refused.
#[derive(ToSchema)]
#[schema(as = NewDestination)]
#[allow(dead_code)] // Describes the JSON `parse_create` reads; never built.
pub struct NewDestinationDoc {
    /// Letters, digits, `-` and `_`; names its consumer groups, fixed.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    name: String,
    /// Where events are POSTed (http or https; internal addresses are
    /// refused unless the outbound policy allows them).
    url: String,
    #[serde(flatten)]
    settings: SettingsDoc,
    /// Deliver the events still retained that were accepted at or after
    /// this Unix time (ms), then the new ones. Without it: only events
    /// accepted after the creation.
    #[schema(minimum = 0)]
    start_from_ms: Option<u64>,
}

/// A change (`PATCH /admin/destinations/{name}`), as a JSON merge patch:
/// fields given replace, `headers` and `retry` merge, `null` removes.
#[derive(ToSchema)]
#[schema(as = DestinationChange)]
#[allow(dead_code)] // Describes the JSON `apply_change` reads; never built.
pub struct DestinationChangeDoc {
    url: Option<String>,
    #[serde(flatten)]
    settings: SettingsDoc,
}

/// The settings a create and a change share, with their defaults.
#[derive(ToSchema)]
#[allow(dead_code)] // Part of the two documents above; never built.
pub struct SettingsDoc {
    /// Longest one attempt may take (ms); default 10000, at most what a lease assures.
    #[schema(minimum = 1)]
    timeout_ms: Option<u64>,
    /// Attempts in flight at once, over all shards; default 64.
    #[schema(minimum = 1)]
    max_concurrency: Option<u64>,
    /// Extra request headers (valid names and values).
    headers: Option<BTreeMap<String, String>>,
    retry: Option<RetryDoc>,
    /// Events undelivered this long after acceptance are dead-lettered (ms).
    #[schema(minimum = 1)]
    max_age_ms: Option<u64>,
    /// Standard Webhooks secrets (`whsec_` + base64 of 24 to 64 bytes).
    signing_secrets: Option<Vec<String>>,
    /// Event types delivered, each 1 to 128 bytes: exact, or a prefix
    /// ending in `*`; empty: all.
    event_types: Option<Vec<String>>,
    breaker: Option<BreakerDoc>,
    /// Most attempts per second over all routers (each sends its share by
    /// the shards it delivers); none: no limit.
    #[schema(minimum = 1)]
    rate_limit_per_sec: Option<u32>,
}

/// The circuit breaker: it opens when at least `min_attempts` events were
/// attempted in the last `window_ms` and the latest attempt of at least
/// `failure_percent` of them failed (connection errors, timeouts, 408, 429,
/// 5xx); then one probe goes out every `probe_interval_ms` until one
/// succeeds, in turn to the event tried most often and the one waiting
/// longest. Defaults: on, 30000, 20, 90, 5000.
#[derive(ToSchema)]
#[schema(as = Breaker)]
#[allow(dead_code)] // Describes the JSON of BreakerConfig; never built.
pub struct BreakerDoc {
    enabled: Option<bool>,
    #[schema(minimum = 1, maximum = 600000)]
    window_ms: Option<u64>,
    #[schema(minimum = 1)]
    min_attempts: Option<u32>,
    #[schema(minimum = 1, maximum = 100)]
    failure_percent: Option<u8>,
    #[schema(minimum = 1)]
    probe_interval_ms: Option<u64>,
}

/// A destination as the admin API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DestinationDoc {
    pub name: String,
    pub url: String,
    pub timeout_ms: u64,
    pub max_concurrency: usize,
    /// Values of headers whose names suggest credentials are masked.
    pub headers: BTreeMap<String, String>,
    #[schema(value_type = RetryDoc)]
    pub retry: RetryConfig,
    pub max_age_ms: Option<u64>,
    /// Masked: `whsec_…` and the last 4 characters.
    pub signing_secrets: Vec<String>,
    pub event_types: Vec<String>,
    #[schema(value_type = BreakerDoc)]
    pub breaker: BreakerConfig,
    pub rate_limit_per_sec: Option<u32>,
    /// The catalog revision of its last change.
    pub revision: u64,
    pub created_at_ms: u64,
    /// `active`, or `creating` until its consumer groups exist on every shard.
    pub state: DefinitionState,
    /// This router's latest measurement of it (absent while creating, or
    /// until the router has measured it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<DestinationView>,
}

/// When to retry: doubling delays from `initial_delay_ms` up to
/// `max_delay_ms` (also the cap on Retry-After), until `max_elapsed_ms`
/// after the first attempt (or `max_attempts` attempts, if set), then the
/// dead-letter stream. Defaults 100, 300000, 86400000 (24 h), no attempt limit.
#[derive(ToSchema)]
#[schema(as = Retry)]
#[allow(dead_code)] // Describes the JSON of RetryConfig; never built.
pub struct RetryDoc {
    #[schema(minimum = 1)]
    initial_delay_ms: Option<u64>,
    #[schema(minimum = 1)]
    max_delay_ms: Option<u64>,
    #[schema(minimum = 1)]
    max_attempts: Option<u32>,
    #[schema(minimum = 1)]
    max_elapsed_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefinitionState {
    Creating,
    Active,
}

impl DestinationDoc {
    pub fn new(definition: &Definition, status: Option<DestinationView>) -> Self {
        let settings = &definition.settings;
        Self {
            name: settings.name.clone(),
            url: settings.url.clone(),
            timeout_ms: settings.timeout_ms,
            max_concurrency: settings.max_concurrency,
            headers: settings
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), mask_header(name, value)))
                .collect(),
            retry: settings.retry,
            max_age_ms: settings.max_age_ms,
            signing_secrets: settings
                .signing_secrets
                .iter()
                .map(|secret| mask_secret(&String::from(secret.clone())))
                .collect(),
            event_types: settings.event_types.clone(),
            breaker: settings.breaker,
            rate_limit_per_sec: settings.rate_limit_per_sec,
            revision: definition.revision,
            created_at_ms: definition.created_at_ms,
            state: if definition.is_ready() {
                DefinitionState::Active
            } else {
                DefinitionState::Creating
            },
            status,
        }
    }
}

fn mask_header(name: &str, value: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if SECRET_HEADER_WORDS.iter().any(|word| lower.contains(word)) {
        "(masked)".into()
    } else {
        value.to_owned()
    }
}

fn mask_secret(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("whsec_…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&crate::outbound::OutboundConfig::default()).expect("default policy")
    }

    fn lease() -> LeaseConfig {
        crate::config::Config::defaults().lease
    }

    fn created(body: &str) -> Result<(DestinationConfig, Start), String> {
        parse_create(body.as_bytes(), &policy(), &lease())
    }

    #[test]
    fn a_create_names_the_field_it_refuses() {
        let (settings, start) =
            created(r#"{"name": "crm", "url": "https://crm.example/hook"}"#).expect("valid");
        assert_eq!((settings.name.as_str(), start), ("crm", Start::Now));
        for (body, field) in [
            (r#"{"url": "https://crm.example/"}"#, "name"),
            (r#"{"name": "crm"}"#, "url"),
            (r#"{"name": "a b", "url": "https://x.example/"}"#, "a b"),
            (r#"{"name": "crm", "url": "ftp://x"}"#, "url"),
            (
                r#"{"name": "crm", "url": "https://x.example/", "colour": 1}"#,
                "colour",
            ),
            (
                r#"{"name": "crm", "url": "https://x.example/", "timeout_ms": 0}"#,
                "timeout_ms",
            ),
            (
                r#"{"name": "crm", "url": "https://x.example/", "timeout_ms": 3600000}"#,
                "timeout_ms",
            ),
            (
                r#"{"name": "crm", "url": "https://x.example/", "event_types": ["a*b"]}"#,
                "event_types",
            ),
            (
                r#"{"name": "crm", "url": "https://x.example/", "start_from_ms": "x"}"#,
                "start_from_ms",
            ),
            (
                r#"{"name": "crm", "url": "https://x.example/", "start_from_ms": 99999999999999}"#,
                "start_from_ms",
            ),
            (
                r#"{"name": "crm", "url": "http://169.254.169.254/"}"#,
                "url",
            ),
            (r#"{"name": "crm", "url": "http://10.0.0.1/"}"#, "url"),
            ("[1]", "object"),
        ] {
            let error = created(body).expect_err(body);
            assert!(
                error.contains(field),
                "{body}: `{error}` should name {field}"
            );
        }
    }

    #[test]
    fn a_change_merges_into_the_current_settings() {
        let (current, _) = created(
            r#"{"name": "crm", "url": "https://crm.example/", "headers": {"a": "1", "b": "2"},
                "retry": {"initial_delay_ms": 50, "max_delay_ms": 500, "max_attempts": 3},
                "max_age_ms": 1000}"#,
        )
        .expect("valid");
        let changed = apply_change(
            &current,
            br#"{"url": "https://new.example/", "headers": {"a": null, "c": "3"},
                 "retry": {"max_attempts": 9}, "max_age_ms": null}"#,
            &policy(),
            &lease(),
        )
        .expect("valid change");
        assert_eq!(changed.url, "https://new.example/");
        assert_eq!(
            changed.headers,
            BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
        );
        assert_eq!(changed.retry.initial_delay_ms, 50);
        assert_eq!(changed.retry.max_attempts, Some(9));
        assert_eq!(changed.max_age_ms, None);
        for (body, field) in [
            (r#"{"name": "other"}"#, "name"),
            (r#"{"colour": 1}"#, "colour"),
            (r#"{"url": "http://127.0.0.1/"}"#, "url"),
            (r#"{"max_concurrency": 0}"#, "max_concurrency"),
        ] {
            let error =
                apply_change(&current, body.as_bytes(), &policy(), &lease()).expect_err(body);
            assert!(
                error.contains(field),
                "{body}: `{error}` should name {field}"
            );
        }
    }

    #[test]
    fn a_read_masks_secrets_and_credential_headers() {
        let secret = protocol::webhook::SigningSecret::generate();
        let body = format!(
            r#"{{"name": "crm", "url": "https://crm.example/", "signing_secrets": ["{secret}"],
                 "headers": {{"Authorization": "Bearer s3cret", "X-Env": "prod"}}}}"#
        );
        let (settings, _) = created(&body).expect("valid");
        let definition = Definition {
            revision: 3,
            created_at_ms: 1,
            cuts: vec!["0-0".into()],
            start_id: None,
            routed: false,
            settings,
        };
        let shown = serde_json::to_string(&DestinationDoc::new(&definition, None)).expect("json");
        assert!(!shown.contains(&secret[6..]), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("prod"), "{shown}");
        assert!(shown.contains(&format!("whsec_…{}", &secret[secret.len() - 4..])));
        assert!(shown.contains(r#""state":"active""#), "{shown}");
    }
}
