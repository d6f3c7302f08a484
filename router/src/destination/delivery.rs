//! One delivery attempt to one destination, and what its answer means.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use protocol::webhook::{signature_header, SigningSecret};
use protocol::{EventEntry, TraceContext};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::config::DestinationConfig;
use crate::destination::breaker::{Breaker, Pass};
use crate::destination::outcome::AttemptOutcome;
use crate::destination::progress::Workers;
use crate::destination::retry::RetryPolicy;
use crate::destination::stats::DestinationStats;
use crate::destination::throttle::Throttle;
use crate::outbound::{refusal_of, Policy};

/// How much of an error response body is kept for the dead-letter record.
const ERROR_BODY_BYTES: usize = 512;
/// Bodies up to this size are read to the end so the connection is reused.
const DRAIN_BODY_BYTES: usize = 64 * 1024;
/// The Standard Webhooks headers, named once (parsing a name per request
/// allocates).
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_ATTEMPT: HeaderName = HeaderName::from_static("webhook-attempt");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
/// W3C trace context, when the event has one.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Headers of a request besides the configured ones: content type, the
/// six above, and what the client adds (`accept`, `host`, `content-length`).
const STANDARD_HEADERS: usize = 10;

/// How a destination's HTTP status is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    Retryable,
    Permanent,
}

pub fn classify(status: StatusCode) -> StatusClass {
    if status.is_success() {
        StatusClass::Success
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        StatusClass::Retryable
    } else {
        StatusClass::Permanent
    }
}

/// The JSON body a destination receives.
#[derive(Serialize)]
struct DeliveryBody<'a> {
    id: &'a str,
    #[serde(rename = "userId")]
    user_id: &'a str,
    payload: &'a RawValue,
    #[serde(rename = "eventType", skip_serializing_if = "Option::is_none")]
    event_type: Option<&'a str>,
    #[serde(rename = "receivedAt", serialize_with = "serialize_display")]
    received_at: humantime::Rfc3339Timestamp,
}

/// Writes a value's text straight into the body (no `String` in between).
fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Builds the request body once per event (every attempt shares it); the
/// payload text is embedded as received, never re-serialized.
pub fn request_body(
    event_id: &str,
    user_id: &str,
    payload: &str,
    event_type: Option<&str>,
    received_at_ms: u64,
) -> Result<Bytes, String> {
    let payload: &RawValue = serde_json::from_str(payload)
        .map_err(|e| format!("stored payload is not valid JSON: {e}"))?;
    let received_at = UNIX_EPOCH + Duration::from_millis(received_at_ms);
    let body = DeliveryBody {
        id: event_id,
        user_id,
        payload,
        event_type,
        received_at: humantime::format_rfc3339_millis(received_at),
    };
    // Sized up front: a growing buffer would end with up to twice the room
    // it needs, all of it kept (and not charged to the byte budget) while
    // attempts are made. The names, quotes and the timestamp fit in 160 bytes
    // unless ids need escaping, when the buffer grows as usual.
    let fixed = event_id.len() + user_id.len() + event_type.map_or(0, str::len) + 160;
    let mut buffer = Vec::with_capacity(payload.get().len() + fixed);
    serde_json::to_writer(&mut buffer, &body)
        .map_err(|e| format!("cannot encode delivery body: {e}"))?;
    Ok(Bytes::from(buffer))
}

/// A destination this router delivers to: its own HTTP connection pool,
/// concurrency limit and retry policy, so one destination's trouble stays
/// its own. Its settings ([`Endpoint`]) can change while it runs: each
/// attempt uses the latest.
pub struct Destination {
    pub name: String,
    endpoint: RwLock<Arc<Endpoint>>,
    in_flight: Arc<Semaphore>,
    /// The concurrency limit `in_flight` is being brought to.
    max_concurrency: AtomicUsize,
    /// This router's counters for the destination (metrics, admin API).
    pub stats: DestinationStats,
    /// Stops attempts while the destination is clearly failing.
    pub breaker: Breaker,
    /// Its rate limit and the pauses its 429s ask for.
    pub throttle: Throttle,
    /// Whether delivery is paused (set by the admin API, shared by all
    /// routers through Redis; see [`crate::admin::overview`]).
    paused: watch::Sender<bool>,
    /// Counts pauses and resumes requested on this router, so a read of
    /// the paused set that started before one cannot undo it.
    pause_requests: AtomicU64,
    /// Its workers on this router, with what each waits on.
    pub workers: Workers,
}

/// A destination's settings as attempts use them.
pub struct Endpoint {
    url: reqwest::Url,
    client: reqwest::Client,
    /// How many headers a request carries.
    header_count: usize,
    pub retry: RetryPolicy,
    /// Longest one attempt takes, connecting and reading the answer included.
    pub timeout: Duration,
    /// Events older than this are dead-lettered instead of attempted.
    pub max_age: Option<Duration>,
    /// Every delivery is signed with each of these (Standard Webhooks).
    signing_secrets: Vec<SigningSecret>,
    /// Set when the URL is an IP literal the outbound policy refuses: then
    /// no attempt is made (names are checked by the resolver instead).
    refused: Option<String>,
    /// The settings it was built from (event types, for filtering).
    settings: DestinationConfig,
}

impl Endpoint {
    fn new(config: &DestinationConfig, policy: &Policy) -> Result<Self, reqwest::Error> {
        let mut headers = HeaderMap::new();
        let headers_configured = config.headers.len();
        for (name, value) in &config.headers {
            // Config validation has already checked both.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout())
            .connect_timeout(config.timeout().min(Duration::from_secs(5)))
            .pool_max_idle_per_host(config.max_concurrency)
            // A POST redirected becomes a GET elsewhere: treat 3xx as an answer.
            .redirect(reqwest::redirect::Policy::none())
            // Retrying is ours to do (with backoff, counted in
            // `webhook-attempt`); the client's own retry also copied every
            // request in case it retried.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .dns_resolver(policy.resolver())
            // A proxy from the environment would resolve destinations
            // itself, past the outbound policy (and matching each request
            // against it cost 1 % of the router's instructions).
            .no_proxy()
            .default_headers(headers)
            .build()?;
        let url = reqwest::Url::parse(&config.url).expect("config validation checked the url");
        Ok(Self {
            refused: policy
                .check_url(&url)
                .err()
                .map(|refused| refused.to_string()),
            url,
            client,
            header_count: STANDARD_HEADERS + headers_configured,
            retry: config.retry.into(),
            timeout: config.timeout(),
            max_age: config.max_age_ms.map(Duration::from_millis),
            signing_secrets: config.signing_secrets.clone(),
            settings: config.clone(),
        })
    }

    /// The event types it takes (exact, or a prefix ending in `*`); empty:
    /// every event.
    pub fn event_types(&self) -> &[String] {
        &self.settings.event_types
    }

    /// Whether an event of `event_type` is of a type it subscribes to.
    pub fn subscribes_to(&self, event_type: Option<&str>) -> bool {
        self.settings.subscribes_to(event_type)
    }

    /// Whether `event` is one this destination receives: addressed to it
    /// (or to every destination) and of a type it subscribes to.
    pub fn wants(&self, event: &EventEntry) -> bool {
        event.is_for(&self.settings.name)
            && self.settings.subscribes_to(event.event_type.as_deref())
    }

    /// Makes one attempt in `_slot`; it ends within the destination's timeout.
    pub async fn attempt(
        &self,
        _slot: &SemaphorePermit<'_>,
        event_id: &str,
        body: &Bytes,
        attempt: u32,
        trace: Option<&TraceContext>,
    ) -> (AttemptOutcome, Duration) {
        let started = Instant::now();
        if let Some(refused) = &self.refused {
            let outcome = AttemptOutcome::Dead {
                status: None,
                error: refused.clone(),
            };
            return (outcome, started.elapsed());
        }
        let request = match self.request(event_id, body, attempt, trace) {
            Ok(request) => request,
            Err(error) => {
                let outcome = AttemptOutcome::Dead {
                    status: None,
                    error,
                };
                return (outcome, started.elapsed());
            }
        };
        let response = self.client.execute(request).await;
        let outcome = match response {
            Err(error) => match refusal_of(&error) {
                // The outbound policy refused the address: no retry can help
                // until an operator changes the policy (then replay).
                Some(refused) => AttemptOutcome::Dead {
                    status: None,
                    error: refused.to_string(),
                },
                None => AttemptOutcome::Retry {
                    status: None,
                    error: describe(&error),
                    retry_after: None,
                },
            },
            Ok(response) => outcome_of(response).await,
        };
        (outcome, started.elapsed())
    }

    /// The attempt's request, built as a whole rather than through
    /// `RequestBuilder`: its header map is sized once for every header
    /// (the client's defaults, `host` and `content-length` join it later)
    /// instead of grown as they arrive. Fails only on an id or signature
    /// that is not a valid header value, which no retry can fix.
    fn request(
        &self,
        event_id: &str,
        body: &Bytes,
        attempt: u32,
        trace: Option<&TraceContext>,
    ) -> Result<reqwest::Request, String> {
        let header = |text: &str| {
            HeaderValue::from_str(text).map_err(|_| format!("{text:?} cannot be sent as a header"))
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut request = reqwest::Request::new(Method::POST, self.url.clone());
        let headers = request.headers_mut();
        headers.reserve(self.header_count);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(WEBHOOK_ID, header(event_id)?);
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        headers.insert(WEBHOOK_ATTEMPT, HeaderValue::from(attempt));
        if !self.signing_secrets.is_empty() {
            let signature = signature_header(&self.signing_secrets, event_id, timestamp, body);
            headers.insert(WEBHOOK_SIGNATURE, header(&signature)?);
        }
        // W3C trace context: a destination that traces continues the trace.
        // Best effort: a value no header can carry is left out, never a
        // reason to fail the delivery.
        if let Some(trace) = trace {
            let parent = HeaderValue::from_str(&trace.parent);
            let state = trace.state.as_deref().map(HeaderValue::from_str);
            if let Ok(parent) = parent {
                headers.insert(TRACEPARENT, parent);
                if let Some(Ok(state)) = state {
                    headers.insert(TRACESTATE, state);
                }
            }
        }
        *request.body_mut() = Some(body.clone().into());
        Ok(request)
    }
}

/// Leave to make an attempt.
pub struct Gates<'a> {
    pub slot: SemaphorePermit<'a>,
    pub pass: Pass<'a>,
    /// How long getting it took (not retry time).
    pub waited: Duration,
}

impl Destination {
    /// A destination of a deployment with `shards` shards.
    pub fn new(
        config: &DestinationConfig,
        policy: &Policy,
        shards: u16,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            name: config.name.clone(),
            endpoint: RwLock::new(Arc::new(Endpoint::new(config, policy)?)),
            in_flight: Arc::new(Semaphore::new(config.max_concurrency)),
            max_concurrency: AtomicUsize::new(config.max_concurrency),
            stats: DestinationStats::new(&config.name),
            breaker: Breaker::new(&config.name, config.breaker),
            throttle: Throttle::new(config.rate_limit_per_sec, shards),
            paused: watch::Sender::new(false),
            pause_requests: AtomicU64::new(0),
            workers: Workers::default(),
        })
    }

    /// The settings the next attempt uses.
    pub fn endpoint(&self) -> Arc<Endpoint> {
        protocol::sync::read(&self.endpoint).clone()
    }

    /// Applies changed settings: attempts from now on use them; those in
    /// flight finish under the old ones. A lower concurrency limit takes
    /// effect as attempts in flight end.
    pub fn update(
        &self,
        config: &DestinationConfig,
        policy: &Policy,
    ) -> Result<(), reqwest::Error> {
        let endpoint = Arc::new(Endpoint::new(config, policy)?);
        *protocol::sync::write(&self.endpoint) = endpoint;
        self.breaker.configure(config.breaker);
        self.throttle.set_rate(config.rate_limit_per_sec);
        let wanted = config.max_concurrency;
        let before = self.max_concurrency.swap(wanted, Ordering::SeqCst);
        if wanted > before {
            self.in_flight.add_permits(wanted - before);
        } else if wanted < before {
            let excess = before - wanted;
            let forgotten = self.in_flight.forget_permits(excess);
            if let Ok(rest) = u32::try_from(excess - forgotten) {
                let in_flight = self.in_flight.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = in_flight.acquire_many_owned(rest).await {
                        permits.forget();
                    }
                });
            }
        }
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Pauses or resumes delivery in this router, as requested here (after
    /// recording it in Redis); true if that changed it.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.switch(paused, || {
            self.pause_requests.fetch_add(1, Ordering::SeqCst);
            true
        })
    }

    /// A token to pass to [`Self::apply_paused`], taken before reading the
    /// paused set from Redis.
    pub fn pause_token(&self) -> u64 {
        self.pause_requests.load(Ordering::SeqCst)
    }

    /// Applies the paused state read from Redis, unless a request on this
    /// router came after the read began (it is newer); true if it changed.
    pub fn apply_paused(&self, paused: bool, token: u64) -> bool {
        self.switch(paused, || self.pause_token() == token)
    }

    /// Switches to `paused` if `allowed` says so. Both run under the
    /// state's lock, so a request here cannot slip between a read's check
    /// of its token and its switch.
    fn switch(&self, paused: bool, allowed: impl FnOnce() -> bool) -> bool {
        let changed = self.paused.send_if_modified(|current| {
            if !allowed() {
                return false;
            }
            let changed = *current != paused;
            *current = paused;
            changed
        });
        match (changed, paused) {
            (true, true) => tracing::info!(destination = %self.name, "Destination paused."),
            (true, false) => tracing::info!(destination = %self.name, "Destination resumed."),
            (false, _) => {}
        }
        changed
    }

    /// Returns once delivery is not paused: true, or false if `shutdown`
    /// came first.
    pub async fn wait_until_resumed(&self, shutdown: &CancellationToken) -> bool {
        if !self.is_paused() {
            return true;
        }
        let mut paused = self.paused.subscribe();
        tokio::select! {
            () = shutdown.cancelled() => false,
            resumed = paused.wait_for(|paused| !paused) => resumed.is_ok(),
        }
    }

    /// Waits until this destination takes attempt number `attempt`: not paused,
    /// its circuit letting this one through, a concurrency slot free, and its
    /// rate limit giving a turn. Events waiting for an open circuit hold no
    /// slot, so every one of them is a candidate for its probe; the circuit is
    /// asked again once the slot is held, so no attempt let through before it
    /// opened goes out after. `None` at shutdown.
    pub async fn pass_gates(
        &self,
        attempt: u32,
        shutdown: &CancellationToken,
    ) -> Option<Gates<'_>> {
        let arrived = Instant::now();
        let (slot, pass) = loop {
            // A paused destination starts no attempt; the entry stays pending.
            if !self.wait_until_resumed(shutdown).await {
                return None;
            }
            let pass = self.breaker.admit(attempt, shutdown).await?;
            let slot = self.slot().await;
            if pass.still_valid() {
                break (slot, pass);
            }
        };
        if !self.throttle.wait_turn(shutdown).await {
            return None;
        }
        Some(Gates {
            slot,
            pass,
            waited: arrived.elapsed(),
        })
    }

    /// Waits for a free concurrency slot; an attempt holds one throughout.
    async fn slot(&self) -> SemaphorePermit<'_> {
        self.in_flight
            .acquire()
            .await
            .expect("the concurrency semaphore is never closed")
    }
}

async fn outcome_of(response: reqwest::Response) -> AttemptOutcome {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let class = classify(status);
    // Reading the body lets the connection be reused; a short prefix of an
    // error body explains the failure in the dead-letter record.
    let body = read_prefix(response).await;
    let code = Some(status.as_u16());
    match class {
        StatusClass::Success => AttemptOutcome::Delivered {
            status: status.as_u16(),
        },
        StatusClass::Retryable => AttemptOutcome::Retry {
            status: code,
            error: format!("HTTP {status}: {body}"),
            retry_after,
        },
        StatusClass::Permanent => AttemptOutcome::Dead {
            status: code,
            error: format!("HTTP {status}: {body}"),
        },
    }
}

async fn read_prefix(mut response: reqwest::Response) -> String {
    let mut prefix = Vec::new();
    let mut total = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        if prefix.len() < ERROR_BODY_BYTES {
            prefix.extend_from_slice(&chunk[..chunk.len().min(ERROR_BODY_BYTES - prefix.len())]);
        }
        total += chunk.len();
        if total > DRAIN_BODY_BYTES {
            break;
        }
    }
    String::from_utf8_lossy(&prefix).into_owned()
}

fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_connect() {
        format!("connection failed: {error}")
    } else {
        format!("request failed: {error}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_like_webhook_senders_do() {
        for (code, class) in [
            (200, StatusClass::Success),
            (204, StatusClass::Success),
            (301, StatusClass::Permanent),
            (400, StatusClass::Permanent),
            (401, StatusClass::Permanent),
            (404, StatusClass::Permanent),
            (408, StatusClass::Retryable),
            (429, StatusClass::Retryable),
            (500, StatusClass::Retryable),
            (503, StatusClass::Retryable),
        ] {
            let status = StatusCode::from_u16(code).expect("valid status");
            assert_eq!(classify(status), class, "status {code}");
        }
    }

    #[test]
    fn a_stale_read_of_the_paused_set_does_not_undo_a_newer_request() {
        let config = crate::config::Config::defaults();
        let policy = Policy::new(&config.outbound).expect("default policy");
        let destination =
            Destination::new(&config.destinations[0], &policy, 16).expect("client builds");
        let read_started = destination.pause_token();
        assert!(destination.set_paused(true));
        assert!(!destination.apply_paused(false, read_started));
        assert!(destination.is_paused());
        assert!(destination.apply_paused(false, destination.pause_token()));
        assert!(!destination.is_paused());
    }

    #[test]
    fn an_attempt_carries_the_standard_webhook_headers() {
        let config = crate::config::Config::defaults();
        let policy = Policy::new(&config.outbound).expect("default policy");
        let mut settings = config.destinations[0].clone();
        let secret: SigningSecret = SigningSecret::generate().try_into().expect("a secret");
        settings.signing_secrets = vec![secret.clone()];
        let endpoint = Endpoint::new(&settings, &policy).expect("client builds");
        let body = Bytes::from_static(b"{}");
        let trace = TraceContext {
            parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            state: Some("vendor=1".into()),
        };
        let request = endpoint
            .request("3-5-0", &body, 4, Some(&trace))
            .expect("a valid id");
        let header = |name: &str| request.headers()[name].to_str().expect("text").to_owned();
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header("webhook-id"), "3-5-0");
        assert_eq!(header("webhook-attempt"), "4");
        assert_eq!(header("traceparent"), trace.parent);
        assert_eq!(header("tracestate"), "vendor=1");
        let timestamp: u64 = header("webhook-timestamp").parse().expect("seconds");
        assert!(timestamp.abs_diff(protocol::unix_millis() / 1000) <= 5);
        assert_eq!(
            header("webhook-signature"),
            secret.sign("3-5-0", timestamp, &body)
        );
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.url(), &endpoint.url);
        assert_eq!(
            request.body().and_then(reqwest::Body::as_bytes),
            Some(&b"{}"[..])
        );
        assert!(
            endpoint.request("3-5-0\n", &body, 1, None).is_err(),
            "an id no header can carry is refused"
        );
        let unsendable = TraceContext {
            parent: "00-bad\n".into(),
            state: None,
        };
        let request = endpoint
            .request("3-5-0", &body, 1, Some(&unsendable))
            .expect("trace context is best effort, never a reason to fail");
        assert!(!request.headers().contains_key("traceparent"));
    }

    #[test]
    fn the_body_is_built_without_spare_room() {
        let payload = format!("[{}1]", "1,".repeat(100_000));
        let body = request_body("3-5-0", "u1", &payload, Some("order.created"), 0).expect("JSON");
        let buffer = Vec::from(body);
        assert!(
            buffer.capacity() - buffer.len() <= 160,
            "{} bytes of room for {}",
            buffer.capacity(),
            buffer.len()
        );
    }

    #[test]
    fn body_embeds_the_payload_text_unchanged() {
        let body = request_body("3-5-0", "u1", r#"{"b": 1.50}"#, None, 0).expect("valid");
        assert_eq!(
            body,
            r#"{"id":"3-5-0","userId":"u1","payload":{"b": 1.50},"receivedAt":"1970-01-01T00:00:00.000Z"}"#
        );
    }
}
