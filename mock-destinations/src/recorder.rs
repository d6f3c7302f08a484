//! What each mock path received, and checks over it: per-user order and
//! duplicates among the deliveries it answered with 2xx.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use protocol::webhook::SigningSecret;
use protocol::EventId;
use serde::{Deserialize, Serialize};

/// How far a `webhook-timestamp` may be from now, as Standard Webhooks
/// receivers allow: older signed requests could be replays.
const TIMESTAMP_TOLERANCE_SECS: u64 = 5 * 60;

/// A request kept whole by `/capture`, for checks from outside (e.g. an
/// independent signature verifier).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Captured {
    pub path: String,
    /// The `webhook-*` headers, by lower-case name.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// One request as received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    /// The event id (`webhook-id`), empty if the request had none.
    pub id: String,
    pub user: String,
    pub attempt: u32,
    /// What the mock answered.
    pub status: u16,
    /// Unix milliseconds when the request arrived.
    pub at_ms: u64,
    /// Arrival minus the event's `receivedAt` at the gateway (ms).
    pub latency_ms: Option<u64>,
    /// The request's W3C `traceparent`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// What one path received, with the order and duplicate checks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathSummary {
    pub path: String,
    /// Every request, including failed attempts.
    pub requests: usize,
    /// Requests answered with 2xx.
    pub delivered: usize,
    /// Distinct events answered with 2xx.
    pub unique: usize,
    /// `delivered - unique`: events delivered more than once.
    pub duplicates: usize,
    /// Deliveries of an event older than one already delivered to that user.
    pub order_violations: usize,
    pub events: Vec<Received>,
}

/// Everything one path received, indexed so that per-request lookups stay
/// cheap however many requests arrive (a load test sends hundreds of
/// thousands).
#[derive(Default)]
struct PathLog {
    requests: Vec<Received>,
    attempts: HashMap<String, usize>,
    delivered: HashSet<String>,
}

#[derive(Default)]
pub struct Recorder {
    paths: Mutex<HashMap<String, PathLog>>,
    outages: Mutex<HashSet<String>>,
    signing_secrets: Mutex<Vec<SigningSecret>>,
    captured: Mutex<Vec<Captured>>,
}

impl Recorder {
    /// From now on every request must carry a valid Standard Webhooks
    /// signature by one of `secrets` (none: signatures are not checked).
    pub fn require_signatures(&self, secrets: Vec<SigningSecret>) {
        *self.signing_secrets.lock().expect("never poisoned") = secrets;
    }

    /// Why a request's signature is refused, if it is; `now_secs` is the
    /// current Unix time.
    pub fn signature_problem(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now_secs: u64,
    ) -> Option<&'static str> {
        let secrets = self.signing_secrets.lock().expect("never poisoned");
        if secrets.is_empty() {
            return None;
        }
        let (Some(id), Some(timestamp), Some(signature)) = (id, timestamp, signature) else {
            return Some("missing webhook-id, webhook-timestamp or webhook-signature");
        };
        let Ok(timestamp) = timestamp.parse::<u64>() else {
            return Some("malformed webhook-timestamp");
        };
        if timestamp.abs_diff(now_secs) > TIMESTAMP_TOLERANCE_SECS {
            return Some("webhook-timestamp is too far from now");
        }
        if secrets
            .iter()
            .any(|secret| secret.verify(id, timestamp, body, signature))
        {
            None
        } else {
            Some("no valid signature")
        }
    }

    pub fn capture(&self, request: Captured) {
        self.captured.lock().expect("never poisoned").push(request);
    }

    /// Every request `/capture` kept, oldest first.
    pub fn captured(&self) -> Vec<Captured> {
        self.captured.lock().expect("never poisoned").clone()
    }

    /// Declares (`true`) or ends an outage of `path` (see `/outage`).
    pub fn set_outage(&self, path: &str, down: bool) {
        let mut outages = self.outages.lock().expect("outage lock is never poisoned");
        if down {
            outages.insert(path.to_owned());
        } else {
            outages.remove(path);
        }
    }

    pub fn in_outage(&self, path: &str) -> bool {
        self.outages
            .lock()
            .expect("outage lock is never poisoned")
            .contains(path)
    }

    pub fn record(&self, path: &str, received: Received) {
        let mut paths = self.lock();
        let log = paths.entry(path.to_owned()).or_default();
        *log.attempts.entry(received.id.clone()).or_default() += 1;
        if (200..300).contains(&received.status) {
            log.delivered.insert(received.id.clone());
        }
        log.requests.push(received);
    }

    /// Attempts seen so far for `event_id` on `path`.
    pub fn attempts(&self, path: &str, event_id: &str) -> usize {
        self.lock()
            .get(path)
            .and_then(|log| log.attempts.get(event_id).copied())
            .unwrap_or(0)
    }

    /// Distinct events `path` answered with 2xx.
    pub fn delivered_count(&self, path: &str) -> usize {
        self.lock().get(path).map_or(0, |log| log.delivered.len())
    }

    /// How many of `event_ids` `path` has not answered with 2xx.
    pub fn missing<'a>(&self, path: &str, event_ids: impl IntoIterator<Item = &'a str>) -> usize {
        let paths = self.lock();
        let delivered = paths.get(path).map(|log| &log.delivered);
        event_ids
            .into_iter()
            .filter(|id| !delivered.is_some_and(|d| d.contains(*id)))
            .count()
    }

    /// Requests that reached `path` within the last second.
    pub fn requests_in_last_second(&self, path: &str, now_ms: u64) -> usize {
        self.lock().get(path).map_or(0, |log| {
            log.requests
                .iter()
                .rev()
                .take_while(|r| r.at_ms + 1000 > now_ms)
                .count()
        })
    }

    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.lock().keys().cloned().collect();
        paths.sort();
        paths
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn summary(&self, path: &str) -> PathSummary {
        let events = self
            .lock()
            .get(path)
            .map(|log| log.requests.clone())
            .unwrap_or_default();
        summarize(path, events)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PathLog>> {
        self.paths.lock().expect("recorder lock is never poisoned")
    }
}

fn summarize(path: &str, events: Vec<Received>) -> PathSummary {
    let mut seen = HashSet::new();
    let mut newest_per_user: BTreeMap<&str, EventId> = BTreeMap::new();
    let (mut delivered, mut duplicates, mut order_violations) = (0, 0, 0);
    for event in events.iter().filter(|e| (200..300).contains(&e.status)) {
        delivered += 1;
        if !seen.insert(event.id.as_str()) {
            duplicates += 1;
            continue;
        }
        let Ok(id) = event.id.parse::<EventId>() else {
            continue;
        };
        match newest_per_user.get(event.user.as_str()) {
            Some(newest) if id < *newest => order_violations += 1,
            _ => {
                newest_per_user.insert(&event.user, id);
            }
        }
    }
    PathSummary {
        path: path.to_owned(),
        requests: events.len(),
        delivered,
        unique: seen.len(),
        duplicates,
        order_violations,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: &str, user: &str, status: u16) -> Received {
        Received {
            id: id.into(),
            user: user.into(),
            attempt: 1,
            status,
            at_ms: 0,
            latency_ms: None,
            traceparent: None,
        }
    }

    #[test]
    fn counts_duplicates_and_order_violations_per_user() {
        let recorder = Recorder::default();
        for received in [
            delivery("1-10-0", "a", 200),
            delivery("1-5-0", "b", 200),
            delivery("1-12-0", "a", 500),
            delivery("1-11-0", "a", 200),
            delivery("1-11-0", "a", 200),
            delivery("1-10-5", "a", 200),
        ] {
            recorder.record("/ok", received);
        }
        let summary = recorder.summary("/ok");
        assert_eq!(summary.requests, 6);
        assert_eq!(summary.delivered, 5);
        assert_eq!(summary.unique, 4);
        assert_eq!(summary.duplicates, 1);
        assert_eq!(summary.order_violations, 1, "1-10-5 arrived after 1-11-0");
    }
}
