//! The `[traces]` section both services share, and the standard
//! `OTEL_…` environment variables that override it.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::Sampler;
use serde::{Deserialize, Serialize};

/// Where and how spans are exported. Export is off while both endpoints
/// are empty.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// Base URL of the OTLP receiver (`OTEL_EXPORTER_OTLP_ENDPOINT`). Over
    /// `http/protobuf`, `/v1/traces` is appended.
    pub endpoint: String,
    /// The traces URL itself, used as is (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`);
    /// wins over `endpoint`.
    pub traces_endpoint: String,
    /// `http/protobuf` or `grpc` (`OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`).
    pub protocol: Protocol,
    /// `service.name` (`OTEL_SERVICE_NAME`); empty means the binary's name.
    pub service_name: String,
    /// More resource attributes, `key=value,key=value`
    /// (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: String,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
    /// `parentbased_always_off` or `parentbased_traceidratio`
    /// (`OTEL_TRACES_SAMPLER`).
    pub sampler: String,
    /// The ratio of the `…traceidratio` samplers, 0 to 1
    /// (`OTEL_TRACES_SAMPLER_ARG`).
    pub sampler_arg: f64,
    /// Finished spans waiting for export; past it spans are dropped and
    /// counted (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub queue_size: usize,
    /// Most spans per export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub batch_size: usize,
    /// Longest a span waits for a batch to fill, in ms
    /// (`OTEL_BSP_SCHEDULE_DELAY`).
    pub flush_interval_ms: u64,
    /// Longest one export request may take, in ms; then its spans are
    /// dropped and counted (`OTEL_EXPORTER_OTLP_TIMEOUT`,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`).
    pub export_timeout_ms: u64,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

impl Protocol {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!(
                "unsupported OTLP protocol `{other}`: use `http/protobuf` or `grpc`"
            )),
        }
    }
}

/// The environment variables that override a setting, most specific first.
const OVERRIDES: &[(&str, &[&str])] = &[
    ("endpoint", &["OTEL_EXPORTER_OTLP_ENDPOINT"]),
    ("traces_endpoint", &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]),
    (
        "protocol",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    ),
    ("service_name", &["OTEL_SERVICE_NAME"]),
    ("resource_attributes", &["OTEL_RESOURCE_ATTRIBUTES"]),
    ("sampler", &["OTEL_TRACES_SAMPLER"]),
    ("sampler_arg", &["OTEL_TRACES_SAMPLER_ARG"]),
    ("queue_size", &["OTEL_BSP_MAX_QUEUE_SIZE"]),
    ("batch_size", &["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]),
    ("flush_interval_ms", &["OTEL_BSP_SCHEDULE_DELAY"]),
    (
        "export_timeout_ms",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ],
    ),
];

/// The export settings after validation.
#[derive(Debug, Clone)]
pub(crate) struct Export {
    /// The full traces URL.
    pub url: String,
    pub protocol: Protocol,
    pub queue_size: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub timeout: Duration,
}

impl TracesConfig {
    /// Applies the standard `OTEL_…` variables `lookup` finds (the process
    /// environment in production); an empty variable counts as unset.
    pub fn with_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        for (setting, variables) in OVERRIDES {
            let Some((variable, value)) = variables
                .iter()
                .find_map(|v| lookup(v).filter(|s| !s.is_empty()).map(|s| (*v, s)))
            else {
                continue;
            };
            self.set(setting, &value)
                .map_err(|error| format!("{variable}={value:?}: {error}"))?;
        }
        Ok(self)
    }

    fn set(&mut self, setting: &str, value: &str) -> Result<(), String> {
        fn number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
            value
                .trim()
                .parse()
                .map_err(|_| "not a number of the expected kind".to_owned())
        }
        match setting {
            "endpoint" => self.endpoint = value.to_owned(),
            "traces_endpoint" => self.traces_endpoint = value.to_owned(),
            "protocol" => self.protocol = Protocol::parse(value)?,
            "service_name" => self.service_name = value.to_owned(),
            "resource_attributes" => self.resource_attributes = value.to_owned(),
            "sampler" => self.sampler = value.to_owned(),
            "sampler_arg" => self.sampler_arg = number(value)?,
            "queue_size" => self.queue_size = number(value)?,
            "batch_size" => self.batch_size = number(value)?,
            "flush_interval_ms" => self.flush_interval_ms = number(value)?,
            "export_timeout_ms" => self.export_timeout_ms = number(value)?,
            other => unreachable!("OVERRIDES names only known settings, not {other}"),
        }
        Ok(())
    }

    /// Whether spans are exported at all.
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty() || !self.traces_endpoint.is_empty()
    }

    /// Checks every setting, so a typo fails at startup rather than
    /// silently exporting nothing.
    pub fn validate(&self) -> Result<(), String> {
        self.sampler()?;
        self.attributes()?;
        if self.queue_size == 0 || self.batch_size == 0 || self.batch_size > self.queue_size {
            return Err(
                "traces.batch_size must be at least 1 and at most traces.queue_size".into(),
            );
        }
        if self.flush_interval_ms == 0 || self.export_timeout_ms == 0 {
            return Err(
                "traces.flush_interval_ms and traces.export_timeout_ms must be positive".into(),
            );
        }
        if self.enabled() {
            let url = self.url();
            if url.starts_with("https://") {
                return Err(format!(
                    "the traces endpoint `{url}`: https is not supported; export over http:// \
                     to an OpenTelemetry Collector beside the service, which can forward over TLS"
                ));
            }
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| format!("the traces endpoint `{url}` must start with http://"))?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("the traces endpoint `{url}` names no host"));
            }
        }
        Ok(())
    }

    /// The URL spans go to.
    fn url(&self) -> String {
        if !self.traces_endpoint.is_empty() {
            return self.traces_endpoint.clone();
        }
        match self.protocol {
            Protocol::HttpProtobuf => {
                format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
            }
            Protocol::Grpc => self.endpoint.clone(),
        }
    }

    pub(crate) fn export(&self) -> Export {
        Export {
            url: self.url(),
            protocol: self.protocol,
            queue_size: self.queue_size,
            batch_size: self.batch_size,
            flush_interval: Duration::from_millis(self.flush_interval_ms),
            timeout: Duration::from_millis(self.export_timeout_ms),
        }
    }

    /// The sampler, and whether it follows a sampled-out parent (then a
    /// service need not make spans under such a parent at all).
    pub(crate) fn sampler(&self) -> Result<(Sampler, bool), String> {
        let ratio = || {
            if (0.0..=1.0).contains(&self.sampler_arg) {
                Ok(self.sampler_arg)
            } else {
                Err(format!(
                    "traces.sampler_arg (OTEL_TRACES_SAMPLER_ARG) must be between 0 and 1, not {}",
                    self.sampler_arg
                ))
            }
        };
        let root = match self
            .sampler
            .strip_prefix("parentbased_")
            .unwrap_or(&self.sampler)
        {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            other => {
                return Err(format!(
                    "traces.sampler (OTEL_TRACES_SAMPLER) `{other}` is unknown: use always_on, \
                     always_off, traceidratio, or one of them prefixed with parentbased_"
                ))
            }
        };
        Ok(if self.sampler.starts_with("parentbased_") {
            (Sampler::ParentBased(Box::new(root)), true)
        } else {
            (root, false)
        })
    }

    /// `resource_attributes` as key-values.
    pub(crate) fn attributes(&self) -> Result<Vec<KeyValue>, String> {
        self.resource_attributes
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => Ok(KeyValue::new(
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                )),
                _ => Err(format!(
                    "traces.resource_attributes: `{pair}` is not key=value"
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> TracesConfig {
        TracesConfig {
            endpoint: String::new(),
            traces_endpoint: String::new(),
            protocol: Protocol::HttpProtobuf,
            service_name: String::new(),
            resource_attributes: String::new(),
            sampler: "parentbased_always_on".into(),
            sampler_arg: 1.0,
            queue_size: 4096,
            batch_size: 512,
            flush_interval_ms: 1000,
            export_timeout_ms: 10_000,
        }
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn off_without_an_endpoint_and_valid_by_default() {
        let config = defaults();
        assert!(!config.enabled());
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn standard_variables_override_the_file() {
        let config = defaults()
            .with_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_SERVICE_NAME", "edge"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ("OTEL_RESOURCE_ATTRIBUTES", ""),
            ]))
            .expect("valid");
        assert!(config.enabled());
        assert_eq!(config.service_name, "edge");
        assert_eq!(config.sampler_arg, 0.01);
        // The signal's own variable wins over the general one.
        assert_eq!(config.protocol, Protocol::Grpc);
        assert_eq!(config.export().url, "http://collector:4318/");
        let (_, follows_parent) = config.sampler().expect("valid sampler");
        assert!(follows_parent);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_traces_endpoint_is_used_as_is_and_http_appends_the_path() {
        let mut config = defaults();
        config.endpoint = "http://c:4318".into();
        assert_eq!(config.export().url, "http://c:4318/v1/traces");
        config.traces_endpoint = "http://other:9/spans".into();
        assert_eq!(config.export().url, "http://other:9/spans");
    }

    #[test]
    fn bad_values_are_named() {
        let error = defaults()
            .with_env(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]))
            .expect_err("unsupported");
        assert!(
            error.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && error.contains("grpc"),
            "{error}"
        );
        let error = defaults()
            .with_env(env(&[("OTEL_TRACES_SAMPLER_ARG", "half")]))
            .expect_err("not a number");
        assert!(error.contains("OTEL_TRACES_SAMPLER_ARG"), "{error}");
        let mut config = defaults();
        config.sampler = "traceidratio".into();
        config.sampler_arg = 1.5;
        assert!(config
            .validate()
            .expect_err("ratio")
            .contains("sampler_arg"));
        config.sampler = "sometimes".into();
        assert!(config
            .validate()
            .expect_err("sampler")
            .contains("sometimes"));
        let mut config = defaults();
        config.resource_attributes = "team=core,oops".into();
        assert!(config.validate().expect_err("pair").contains("oops"));
        let mut config = defaults();
        config.endpoint = "collector:4318".into();
        assert!(config.validate().expect_err("scheme").contains("http://"));
        config.endpoint = "https://collector:4318".into();
        assert!(config.validate().expect_err("tls").contains("Collector"));
    }
}
