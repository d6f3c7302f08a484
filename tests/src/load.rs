//! Client loads for fault tests. [`Load`]: users `user-0…` post numbered
//! events (`{"n": 0, 1, …}`) one after another, like real clients: on 503 or a connection error they retry
//! the same event with the same `messageId` (so a retry of a write that did
//! land is not stored twice) before moving on to the next. [`HastyLoad`]:
//! users without `messageId` who move on after any answer, so a write
//! answered 503 that lands late would land behind their later events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::TestSystem;

/// One event the gateway answered 202 for.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: String,
    /// Its `eventType` ([`load_event_type`]).
    pub event_type: &'static str,
    pub sent_at: Instant,
    pub answered_at: Instant,
}

/// The type of a user's `seq`th load event: `load.b` for every fourth,
/// `load.a` for the others, so a destination with `event_types` (routed,
/// decision 0004) takes some of the load and filters out the rest.
pub fn load_event_type(seq: usize) -> &'static str {
    if seq % 4 == 3 {
        "load.b"
    } else {
        "load.a"
    }
}

pub struct Load {
    posters: JoinSet<()>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    unavailable: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// How long one event may keep being refused before the test fails.
const GIVE_UP_AFTER: Duration = Duration::from_secs(180);

impl Load {
    /// Starts `users` posters of `per_user` events each.
    pub fn start(system: &TestSystem, users: usize, per_user: usize) -> Self {
        Self::spawn(system, users, per_user, Duration::ZERO)
    }

    /// Starts `users` posters that keep sending, one event every `pace` each,
    /// until [`Load::stop`]. For tests that need requests in flight at a
    /// moment they choose, however fast the gateway is.
    pub fn until_stopped(system: &TestSystem, users: usize, pace: Duration) -> Self {
        Self::spawn(system, users, usize::MAX, pace)
    }

    fn spawn(system: &TestSystem, users: usize, per_user: usize, pace: Duration) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut posters = JoinSet::new();
        for user in 0..users {
            let http = system.http.clone();
            let url = format!("{}/v1/events", system.gateway_url);
            let (accepted, unavailable, stop) =
                (accepted.clone(), unavailable.clone(), stop.clone());
            posters.spawn(async move {
                for seq in 0..per_user {
                    // Checked only between events: the one being retried is
                    // finished first, so none is left half-sent.
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                    let event_type = load_event_type(seq);
                    let body = serde_json::json!({
                        "userId": format!("user-{user}"),
                        "messageId": format!("user-{user}-{seq}"),
                        "payload": { "n": seq },
                        "eventType": event_type,
                    });
                    let first_try = Instant::now();
                    loop {
                        let sent_at = Instant::now();
                        let response = http
                            .post(&url)
                            .json(&body)
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await;
                        match response {
                            Ok(response) if response.status() == 202 => {
                                let answer: serde_json::Value =
                                    response.json().await.expect("202 body is JSON");
                                let id = answer["id"].as_str().expect("id").to_owned();
                                accepted.lock().expect("not poisoned").push(Accepted {
                                    id,
                                    event_type,
                                    sent_at,
                                    answered_at: Instant::now(),
                                });
                                break;
                            }
                            Ok(response) if response.status() == 503 => {
                                unavailable.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(response) => {
                                panic!(
                                    "event {seq} of user {user}: unexpected {}",
                                    response.status()
                                )
                            }
                            Err(_) => {}
                        }
                        assert!(
                            first_try.elapsed() < GIVE_UP_AFTER,
                            "event {seq} of user {user} refused for {GIVE_UP_AFTER:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
        }
        Self {
            posters,
            accepted,
            unavailable,
            stop,
        }
    }

    pub fn accepted_count(&self) -> usize {
        self.accepted.lock().expect("not poisoned").len()
    }

    /// 503 answers received so far.
    pub fn unavailable_count(&self) -> usize {
        self.unavailable.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().expect("not poisoned").clone()
    }

    /// Lets each poster finish the event it is on, then stops; returns every
    /// accepted event.
    pub async fn stop(self) -> Vec<Accepted> {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }

    /// Waits until every event is accepted; returns them.
    pub async fn finish(mut self) -> Vec<Accepted> {
        while let Some(result) = self.posters.join_next().await {
            result.expect("every event is eventually accepted");
        }
        self.accepted()
    }
}

/// Users `hasty-0…` posting `{"n": 0, 1, …}` one after another, every
/// 20 ms, moving on after any answer, until stopped.
pub struct HastyLoad {
    posters: JoinSet<BTreeMap<u16, usize>>,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
}

impl HastyLoad {
    pub fn start(system: &TestSystem, users: usize) -> Self {
        let users: Vec<String> = (0..users).map(|n| format!("hasty-{n}")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut posters = JoinSet::new();
        for user in users.clone() {
            let (http, stop) = (system.http.clone(), stop.clone());
            let url = format!("{}/v1/events", system.gateway_url);
            posters.spawn(async move {
                let mut answers = BTreeMap::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = serde_json::json!({ "userId": user, "payload": { "n": n } });
                    let post = http.post(&url).json(&body).timeout(Duration::from_secs(10));
                    // 0: no answer at all.
                    let status = post.send().await.map_or(0, |r| r.status().as_u16());
                    *answers.entry(status).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                answers
            });
        }
        Self {
            posters,
            users,
            stop,
        }
    }

    /// Stops every poster after its current event; returns how many answers
    /// of each status they got, and the users.
    pub async fn stop(mut self) -> (BTreeMap<u16, usize>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut answers = BTreeMap::new();
        while let Some(per_user) = self.posters.join_next().await {
            for (status, count) in per_user.expect("a poster finishes") {
                *answers.entry(status).or_default() += count;
            }
        }
        (answers, self.users)
    }
}

/// What one destination got of the accepted events.
#[derive(Debug)]
pub struct Verdict {
    pub destination: String,
    pub accepted: usize,
    pub delivered: usize,
    pub missing: usize,
    pub order_violations: usize,
    pub duplicates: usize,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: accepted {}, delivered {}, missing {}, order violations {}, duplicates {}",
            self.destination,
            self.accepted,
            self.delivered,
            self.missing,
            self.order_violations,
            self.duplicates
        )
    }
}

impl TestSystem {
    /// The accepted events `destination` takes (by its `event_types`).
    pub fn taken_by<'a>(&self, destination: &str, accepted: &'a [Accepted]) -> Vec<&'a Accepted> {
        let settings = &self
            .destinations
            .iter()
            .find(|d| d.name() == destination)
            .expect("known destination")
            .settings;
        accepted
            .iter()
            .filter(|a| settings.subscribes_to(Some(a.event_type)))
            .collect()
    }

    /// Compares what `destination` received with the `accepted` events it takes.
    pub fn verdict(&self, destination: &str, accepted: &[Accepted]) -> Verdict {
        let received = self.received(destination);
        let taken = self.taken_by(destination, accepted);
        let missing = self.recorder.missing(
            self.path_of(destination),
            taken.iter().map(|a| a.id.as_str()),
        );
        Verdict {
            destination: destination.to_owned(),
            accepted: taken.len(),
            delivered: received.unique,
            missing,
            order_violations: received.order_violations,
            duplicates: received.duplicates,
        }
    }

    /// Waits until every accepted event reached every destination, then
    /// checks nothing is missing and order held; prints the figures, or on
    /// timeout what is stuck.
    pub async fn assert_all_delivered(&self, accepted: &[Accepted], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for destination in self.destinations.iter().map(|d| d.name().to_owned()) {
            let path = self.path_of(&destination).to_owned();
            let taken = self.taken_by(&destination, accepted);
            let ids = || taken.iter().map(|a| a.id.as_str());
            while self.recorder.missing(&path, ids()) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let verdict = self.verdict(&destination, accepted);
            eprintln!("{verdict}");
            assert!(
                verdict.missing == 0,
                "timed out after {timeout:?}: {verdict}; pending {}, stream entries {}, \
                 lease holders {:?}",
                self.pending(&destination).await,
                self.stream_lengths().await,
                self.lease_holders().await,
            );
            assert_eq!(verdict.order_violations, 0, "{verdict}");
        }
    }
}
