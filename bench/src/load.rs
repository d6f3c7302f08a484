//! The load generator: `connections` workers, each with its own users,
//! each sending its users' events in sequence (a user's next event is sent
//! only after the gateway accepted the previous one), so every event carries
//! a per-user sequence number that receivers check.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::task::JoinSet;

/// Filler that brings one event to about 200 bytes of JSON.
const PAD: &str = "benchmark-padding-benchmark-padding-benchmark-padding-benchmark-padding-benchmark-padding-benchmark-padding-0123";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/events`, one event per request.
    Single,
    /// `POST /v1/batch` with this many events per request.
    Batch(usize),
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Single => "/v1/events",
            Endpoint::Batch(_) => "/v1/batch",
        }
    }

    fn events_per_request(self) -> usize {
        match self {
            Endpoint::Single => 1,
            Endpoint::Batch(size) => size,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// Send as fast as answers come back, for this long.
    After(Duration),
    /// Send exactly this many events, as fast as answers come back.
    Events(u64),
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Starts every user id, so runs never share users.
    pub users_named: String,
    pub endpoint: Endpoint,
    pub connections: usize,
    pub users_per_connection: usize,
    pub stop: Stop,
    /// Open loop: spread this many events per second evenly over the
    /// connections instead of sending as fast as possible.
    pub rate: Option<f64>,
    /// With `Some(n)`, each user sends events of one type only: the k-th
    /// user of the run sends `t<k mod n>` (see [`event_type`]).
    pub event_types: Option<usize>,
}

/// The event type the k-th user of a run sends, out of `types`.
pub fn event_type(k: usize, types: usize) -> String {
    format!("t{}", k % types)
}

#[derive(Debug, Default)]
pub struct LoadResult {
    /// Events the gateway accepted (202), per user.
    pub accepted: HashMap<String, u64>,
    /// The event type of each user that sends one.
    pub event_types: HashMap<String, String>,
    /// Requests answered with something other than 202, or not answered.
    pub refused: u64,
    /// Per accepted request, microseconds from sending to the 202.
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
}

impl LoadResult {
    pub fn events(&self) -> u64 {
        self.accepted.values().sum()
    }

    /// Per user, the events accepted of type `event_type`.
    pub fn accepted_of_type(&self, event_type: &str) -> HashMap<String, u64> {
        self.accepted
            .iter()
            .filter(|(user, _)| self.event_types.get(*user).map(String::as_str) == Some(event_type))
            .map(|(user, &count)| (user.clone(), count))
            .collect()
    }

    pub fn events_per_sec(&self) -> f64 {
        self.events() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// Adds the figures of another run, or of a part of this one; their
    /// users must differ (each run names its own).
    pub fn absorb(&mut self, other: LoadResult) {
        self.accepted.extend(other.accepted);
        self.event_types.extend(other.event_types);
        self.refused += other.refused;
        self.latencies_us.extend(other.latencies_us);
        self.elapsed += other.elapsed;
    }
}

/// Microseconds since the Unix epoch; the sink, in the same process,
/// subtracts this from its own clock.
pub fn unix_micros() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros(),
    )
    .unwrap_or(u64::MAX)
}

/// Runs `spec` against `base_url` (a gateway, or the no-op server).
pub async fn run(
    http: &reqwest::Client,
    base_url: &str,
    spec: LoadSpec,
) -> anyhow::Result<LoadResult> {
    let url = format!("{base_url}{}", spec.endpoint.path());
    let budget = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for connection in 0..spec.connections {
        let worker = Worker {
            http: http.clone(),
            url: url.clone(),
            spec: spec.clone(),
            users: (0..spec.users_per_connection)
                .map(|user| (format!("{}-{connection}-{user}", spec.users_named), 0))
                .collect(),
            event_types: (0..spec.users_per_connection)
                .map(|user| {
                    spec.event_types.map(|types| {
                        event_type(connection * spec.users_per_connection + user, types)
                    })
                })
                .collect(),
            cursor: 0,
            budget: budget.clone(),
        };
        let offset = spec
            .rate
            .map(|rate| Duration::from_secs_f64(connection as f64 / rate));
        workers.spawn(worker.run(started, offset));
    }
    let mut total = LoadResult::default();
    while let Some(result) = workers.join_next().await {
        total.absorb(result.context("a load worker panicked")??);
    }
    // The workers ran side by side: the run's time is the wall-clock time,
    // not the sum of theirs.
    total.elapsed = started.elapsed();
    Ok(total)
}

struct Worker {
    http: reqwest::Client,
    url: String,
    spec: LoadSpec,
    /// Each user of this connection and the sequence number it sends next.
    users: Vec<(String, u64)>,
    /// Beside each user, the type of its events, if they have one.
    event_types: Vec<Option<String>>,
    cursor: usize,
    /// Events claimed so far over all workers, for [`Stop::Events`].
    budget: Arc<AtomicU64>,
}

impl Worker {
    async fn run(
        mut self,
        started: Instant,
        offset: Option<Duration>,
    ) -> anyhow::Result<LoadResult> {
        let mut result = LoadResult::default();
        let mut ticks = self.spec.rate.map(|rate| {
            let period = Duration::from_secs_f64(self.spec.connections as f64 / rate);
            let first = tokio::time::Instant::from_std(started + offset.unwrap_or_default());
            let mut ticks = tokio::time::interval_at(first, period);
            // Fall behind and catch up rather than offer less than asked.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            ticks
        });
        while let Some(wanted) = self.claim() {
            if let Stop::After(duration) = self.spec.stop {
                if started.elapsed() >= duration {
                    break;
                }
            }
            if let Some(ticks) = &mut ticks {
                ticks.tick().await;
            }
            // A refused request is sent again with the same sequence
            // numbers, so every user's events stay a gapless sequence.
            loop {
                let body = self.body(wanted);
                let sent = Instant::now();
                let response = self
                    .http
                    .post(&self.url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let accepted = match response {
                    Ok(response) => {
                        let accepted = response.status() == reqwest::StatusCode::ACCEPTED;
                        // Read the answer so the connection is reused.
                        let _ = response.bytes().await;
                        accepted
                    }
                    Err(_) => false,
                };
                if accepted {
                    result
                        .latencies_us
                        .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    self.commit(wanted);
                    break;
                }
                result.refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Stop::After(duration) = self.spec.stop {
                    if started.elapsed() >= duration + Duration::from_secs(30) {
                        anyhow::bail!("requests to {} keep failing", self.url);
                    }
                }
            }
        }
        for ((user, _), event_type) in self.users.iter().zip(self.event_types) {
            if let Some(event_type) = event_type {
                result.event_types.insert(user.clone(), event_type);
            }
        }
        // Users start at 0, so the sequence number each reached is its count.
        result.accepted = self.users.into_iter().collect();
        Ok(result)
    }

    /// How many events the next request carries; `None` when done.
    fn claim(&self) -> Option<usize> {
        let per_request = self.spec.endpoint.events_per_request();
        match self.spec.stop {
            Stop::After(_) => Some(per_request),
            Stop::Events(total) => {
                let before = self.budget.fetch_add(per_request as u64, Ordering::Relaxed);
                (before < total).then(|| {
                    per_request.min(usize::try_from(total - before).unwrap_or(per_request))
                })
            }
        }
    }

    /// The next `count` events, round robin over this worker's users from
    /// the cursor. Nothing advances until they are accepted ([`Self::commit`]).
    fn body(&self, count: usize) -> String {
        let now = unix_micros();
        let users = self.users.len();
        let events: Vec<String> = (0..count)
            .map(|i| {
                let position = (self.cursor + i) % users;
                let (user, next) = &self.users[position];
                // A user recurs every `users` positions, so `i / users` of
                // its events come earlier in this request.
                let seq = next + (i / users) as u64;
                let event_type = self.event_types[position]
                    .as_ref()
                    .map(|t| format!(r#""eventType":"{t}","#))
                    .unwrap_or_default();
                format!(
                    r#"{{"userId":"{user}",{event_type}"payload":{{"seq":{seq},"sentAt":{now},"pad":"{PAD}"}}}}"#
                )
            })
            .collect();
        match self.spec.endpoint {
            Endpoint::Single => events.concat(),
            Endpoint::Batch(_) => format!(r#"{{"events":[{}]}}"#, events.join(",")),
        }
    }

    fn commit(&mut self, count: usize) {
        let users = self.users.len();
        for i in 0..count {
            self.users[(self.cursor + i) % users].1 += 1;
        }
        self.cursor = (self.cursor + count) % users;
    }
}

/// Percentile `p` (0–100) of `values`, which it sorts.
pub fn percentile(values: &mut [u32], p: f64) -> u32 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}
