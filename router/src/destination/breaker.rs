//! A circuit breaker per destination, shared by all of its shards on this
//! router.
//!
//! **Rule.** It opens when, over the last `window_ms` (30 s), at least
//! `min_attempts` (20) events were attempted and the latest attempt of at
//! least `failure_percent` (90 %) of them failed in a way that says the
//! destination is down or overloaded: a connection error, a timeout, 408,
//! 429 or 5xx. A permanent refusal (another 4xx) does not count as a
//! failure: the destination is up and answering. The minimum keeps a
//! handful of unlucky events from opening it; the high ratio keeps a
//! destination that fails one request in two (a flaky one, whose retries do
//! succeed) delivering at full rate.
//!
//! **Events, not attempts.** Each event counts once in the window, by its
//! latest attempt ([`Counted`]): a retry that succeeds takes the event's
//! failure back out. Counted by attempts, one user whose events the
//! destination refuses, retried quickly, would outnumber every other user's
//! successes and open the circuit for all of them; and a burst of events
//! that each fail once before they are accepted would keep the ratio high.
//!
//! **Open.** No attempt starts except one probe every `probe_interval_ms`
//! (5 s). Events wait without spending attempts or retry time, so an outage
//! ends in delivery rather than dead letters, and a destination that is
//! already failing gets one request per interval from this router instead
//! of one per user per backoff step.
//!
//! **Half-open.** The probe is in flight. If it succeeds the breaker closes
//! and the waiting events go out in per-user order (each user's next event
//! is the one waiting); if it fails, the breaker opens for another interval.
//!
//! **Which event probes.** Probes alternate, starting with each opening,
//! between the waiting event tried most often and the one waiting longest
//! (`docs/decisions/0003-breaker-probes.md`). Many endpoints refuse an
//! event's first attempt and accept its retry (a cold start, a token
//! refresh): a burst of fresh events opens the circuit, and a probe that
//! went to a fresh event would be refused every time, wedging a destination
//! that accepts every retry. The longest-waiting turn keeps one event the
//! destination always refuses (tried most often of all) from holding the
//! circuit open: every waiting event gets its turn, as a failed probe
//! waits again behind the others.
//!
//! Events wait here without holding anything of the destination's (its
//! concurrency slots are taken after this gate), so every event waiting
//! for the circuit is a candidate for the probe.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::BreakerConfig;
use crate::destination::outcome::AttemptOutcome;

/// Seconds kept in the failure window's ring of one-second buckets.
const MAX_WINDOW_SECS: usize = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// The breaker as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BreakerView {
    pub state: BreakerState,
    /// Unix ms when it entered that state.
    pub since_ms: u64,
}

/// How an attempt was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// The breaker is closed.
    Attempt,
    /// The breaker was open: this attempt is the probe.
    Probe,
}

/// What an attempt told the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered, or refused for good: the destination answers.
    Answered,
    /// Connection error, timeout, 408, 429 or 5xx.
    Failed,
    /// Never finished (shutdown, lease lost): says nothing.
    Unknown,
}

impl From<&AttemptOutcome> for Verdict {
    fn from(outcome: &AttemptOutcome) -> Self {
        match outcome {
            AttemptOutcome::Delivered { .. }
            | AttemptOutcome::Dead {
                status: Some(_), ..
            } => Verdict::Answered,
            AttemptOutcome::Retry { .. } => Verdict::Failed,
            // Refused by the outbound policy: nothing was sent.
            AttemptOutcome::Dead { status: None, .. } => Verdict::Unknown,
        }
    }
}

/// Leave from the breaker for one attempt. Its verdict goes back through
/// [`Pass::record`]; dropped without one (shutdown, a lost lease, a panic),
/// it counts as [`Verdict::Unknown`], so a probe is never left out.
#[must_use = "a pass records its attempt's verdict"]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    kind: PassKind,
    recorded: bool,
}

impl Pass<'_> {
    #[cfg(test)]
    pub fn kind(&self) -> PassKind {
        self.kind
    }

    /// Whether the attempt may still go out: a probe may; an ordinary
    /// attempt only while the circuit is closed (it may have opened while
    /// this one waited for a concurrency slot).
    pub fn still_valid(&self) -> bool {
        self.kind == PassKind::Probe || self.breaker.lock().state == BreakerState::Closed
    }

    /// Records how the attempt ended; `counted` is the event's place in
    /// the window, kept by its job from one attempt to the next.
    pub fn record(mut self, verdict: Verdict, counted: &mut Counted) {
        self.recorded = true;
        self.breaker.record(self.kind, verdict, counted);
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker
                .record(self.kind, Verdict::Unknown, &mut Counted::default());
        }
    }
}

/// Which waiting event the next probe goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeTurn {
    MostTried,
    LongestWaiting,
}

/// The events waiting for an open circuit, by ticket (the order they came).
#[derive(Default)]
struct Waiters {
    next_ticket: u64,
    /// Ticket → the attempt the event waits to make (1: never tried).
    waiting: BTreeMap<u64, u32>,
    /// The waiter the due probe goes to, once picked.
    chosen: Option<u64>,
}

impl Waiters {
    fn join(&mut self, attempt: u32) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.insert(ticket, attempt);
        ticket
    }

    fn pick(&self, turn: ProbeTurn) -> Option<u64> {
        match turn {
            ProbeTurn::LongestWaiting => self.waiting.keys().next().copied(),
            // The highest attempt, the earliest ticket among equals.
            ProbeTurn::MostTried => self
                .waiting
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(ticket, _)| *ticket),
        }
    }
}

/// An event's outcome as the window holds it: its latest attempt's, in the
/// second it ended. A job keeps it across the event's attempts and hands it
/// back with each verdict, so the earlier outcome leaves the window as the
/// new one enters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counted(Option<Mark>);

#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The window's generation (closing the circuit starts a new one).
    generation: u64,
    second: u64,
    failed: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    /// Events whose latest attempt ended in this second.
    events: u32,
    /// Of those, the ones whose latest attempt failed.
    failed: u32,
}

/// The window's counts before one second: summed once in that second, not
/// at every attempt (a sum over the ring per attempt cost 7 % of the
/// router's instructions). Those seconds are over, so their counts stay.
#[derive(Debug, Clone, Copy)]
struct Earlier {
    second: u64,
    events: u64,
    failed: u64,
}

struct Inner {
    settings: BreakerConfig,
    state: BreakerState,
    since_ms: u64,
    /// Open: when the next probe may go.
    next_probe: Instant,
    buckets: Vec<Bucket>,
    /// Raised when the buckets are cleared: marks of before no longer count.
    generation: u64,
    /// Seconds are counted from here (monotonic).
    epoch: Instant,
    /// `None` once the buckets or the window change.
    earlier: Option<Earlier>,
    waiters: Waiters,
    /// Which waiter the next probe goes to.
    turn: ProbeTurn,
}

pub struct Breaker {
    /// The destination's name, for the log lines of opening and closing.
    destination: String,
    inner: Mutex<Inner>,
    /// Bumped at every state change and every pick of a probe, so waiting
    /// attempts look again.
    changes: watch::Sender<u64>,
}

impl Breaker {
    pub fn new(destination: &str, settings: BreakerConfig) -> Self {
        Self {
            destination: destination.to_owned(),
            inner: Mutex::new(Inner {
                settings,
                state: BreakerState::Closed,
                since_ms: protocol::unix_millis(),
                next_probe: Instant::now(),
                buckets: vec![Bucket::default(); MAX_WINDOW_SECS],
                generation: 0,
                epoch: Instant::now(),
                earlier: None,
                waiters: Waiters::default(),
                turn: ProbeTurn::MostTried,
            }),
            changes: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        protocol::sync::lock(&self.inner)
    }

    /// Applies changed settings; turning it off closes it.
    pub fn configure(&self, settings: BreakerConfig) {
        let mut inner = self.lock();
        inner.settings = settings;
        inner.earlier = None;
        if !settings.enabled && inner.state != BreakerState::Closed {
            self.switch(&mut inner, BreakerState::Closed);
        }
    }

    pub fn view(&self) -> BreakerView {
        let inner = self.lock();
        BreakerView {
            state: inner.state,
            since_ms: inner.since_ms,
        }
    }

    /// Waits until attempt number `attempt` of an event (1: its first)
    /// may go out: at once while closed; while open, until this caller is
    /// picked for the probe. `None` at shutdown.
    pub async fn admit(&self, attempt: u32, shutdown: &CancellationToken) -> Option<Pass<'_>> {
        let mut changes = self.changes.subscribe();
        let mut ticket = Ticket {
            breaker: self,
            id: None,
        };
        loop {
            let wait = {
                let mut inner = self.lock();
                // Under the lock that every change is made under: no change
                // between this look and the wait below can be missed.
                changes.mark_unchanged();
                match self.turn(&mut inner, attempt, &mut ticket.id) {
                    Ok(kind) => {
                        return Some(Pass {
                            breaker: self,
                            kind,
                            recorded: false,
                        })
                    }
                    Err(wait) => wait,
                }
            };
            let sleep = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600)));
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = sleep => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// Under the lock: the pass this caller gets now, or how long to wait
    /// (`None`: until a change). A caller that must wait joins the waiters.
    fn turn(
        &self,
        inner: &mut Inner,
        attempt: u32,
        ticket: &mut Option<u64>,
    ) -> Result<PassKind, Option<Duration>> {
        let now = Instant::now();
        if inner.state == BreakerState::Closed {
            if let Some(id) = ticket.take() {
                self.leave(inner, id);
            }
            return Ok(PassKind::Attempt);
        }
        let id = *ticket.get_or_insert_with(|| inner.waiters.join(attempt));
        match inner.state {
            BreakerState::Open if now >= inner.next_probe => {
                // A waiter that leaves clears its pick (`leave`).
                let chosen = match inner.waiters.chosen {
                    Some(chosen) => chosen,
                    None => {
                        let chosen = inner.waiters.pick(inner.turn).unwrap_or(id);
                        inner.turn = match inner.turn {
                            ProbeTurn::MostTried => ProbeTurn::LongestWaiting,
                            ProbeTurn::LongestWaiting => ProbeTurn::MostTried,
                        };
                        inner.waiters.chosen = Some(chosen);
                        // The chosen one may be waiting for a change.
                        self.changes.send_modify(|changes| *changes += 1);
                        chosen
                    }
                };
                if chosen != id {
                    return Err(None);
                }
                *ticket = None;
                self.leave(inner, id);
                self.switch(inner, BreakerState::HalfOpen);
                Ok(PassKind::Probe)
            }
            BreakerState::Open => Err(Some(inner.next_probe - now)),
            // The probe is out: wait for its verdict.
            _ => Err(None),
        }
    }

    /// Records how an attempt let through ended.
    fn record(&self, kind: PassKind, verdict: Verdict, counted: &mut Counted) {
        let mut inner = self.lock();
        let now = Instant::now();
        match (kind, verdict) {
            (PassKind::Probe, Verdict::Answered) => {
                inner.buckets.fill(Bucket::default());
                inner.generation += 1;
                inner.earlier = None;
                tracing::info!(destination = %self.destination, "Circuit closed: a probe was answered.");
                self.switch(&mut inner, BreakerState::Closed);
            }
            (PassKind::Probe, Verdict::Failed) => {
                inner.next_probe = now + inner.settings.probe_interval();
                self.switch(&mut inner, BreakerState::Open);
            }
            // A probe that never finished: the next caller probes at once.
            (PassKind::Probe, Verdict::Unknown) => {
                inner.next_probe = now;
                self.switch(&mut inner, BreakerState::Open);
            }
            (PassKind::Attempt, Verdict::Unknown) => {}
            (PassKind::Attempt, verdict) => {
                let second = now.duration_since(inner.epoch).as_secs();
                if let Some(mark) = counted.0.take() {
                    withdraw(&mut inner, mark);
                }
                let failed = verdict == Verdict::Failed;
                let bucket = &mut inner.buckets[slot(second)];
                if bucket.second != second {
                    *bucket = Bucket {
                        second,
                        ..Bucket::default()
                    };
                }
                bucket.events += 1;
                bucket.failed += u32::from(failed);
                let current = *bucket;
                counted.0 = Some(Mark {
                    generation: inner.generation,
                    second,
                    failed,
                });
                if inner.state == BreakerState::Closed
                    && inner.settings.enabled
                    && trips(&mut inner, current)
                {
                    inner.next_probe = now + inner.settings.probe_interval();
                    inner.turn = ProbeTurn::MostTried;
                    tracing::warn!(
                        destination = %self.destination,
                        window_ms = inner.settings.window_ms,
                        probe_interval_ms = inner.settings.probe_interval_ms,
                        "Circuit opened: most events attempted in the window failed; \
                         only probes go out until one is answered."
                    );
                    self.switch(&mut inner, BreakerState::Open);
                }
            }
        }
    }

    /// Takes waiter `id` out; if the due probe was picked for it, the
    /// others pick again.
    fn leave(&self, inner: &mut Inner, id: u64) {
        inner.waiters.waiting.remove(&id);
        if inner.waiters.chosen == Some(id) {
            inner.waiters.chosen = None;
            self.changes.send_modify(|changes| *changes += 1);
        }
    }

    fn switch(&self, inner: &mut Inner, state: BreakerState) {
        if inner.state == state {
            return;
        }
        inner.state = state;
        inner.since_ms = protocol::unix_millis();
        self.changes.send_modify(|changes| *changes += 1);
    }
}

/// A caller's place among the waiters, left when it is dropped (the
/// caller gave up: shutdown, or its job ended).
struct Ticket<'a> {
    breaker: &'a Breaker,
    id: Option<u64>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut inner = self.breaker.lock();
            self.breaker.leave(&mut inner, id);
        }
    }
}

fn slot(second: u64) -> usize {
    usize::try_from(second % MAX_WINDOW_SECS as u64).unwrap_or(0)
}

fn window_secs(settings: &BreakerConfig) -> u64 {
    settings.window_secs().min(MAX_WINDOW_SECS as u64)
}

/// Takes an event's earlier outcome out of the window, if the window still
/// holds it.
fn withdraw(inner: &mut Inner, mark: Mark) {
    let bucket = &mut inner.buckets[slot(mark.second)];
    if mark.generation != inner.generation || bucket.second != mark.second {
        return;
    }
    bucket.events = bucket.events.saturating_sub(1);
    bucket.failed = bucket.failed.saturating_sub(u32::from(mark.failed));
    let window = window_secs(&inner.settings);
    if let Some(earlier) = &mut inner.earlier {
        // The same seconds `trips` summed into it.
        if mark.second < earlier.second && mark.second + window > earlier.second {
            earlier.events = earlier.events.saturating_sub(1);
            earlier.failed = earlier.failed.saturating_sub(u64::from(mark.failed));
        }
    }
}

/// Whether the window ending with `current` (this second's bucket) meets
/// the opening rule.
fn trips(inner: &mut Inner, current: Bucket) -> bool {
    let second = current.second;
    let window = window_secs(&inner.settings);
    let earlier = match inner.earlier {
        Some(earlier) if earlier.second == second => earlier,
        _ => {
            let earlier = inner
                .buckets
                .iter()
                .filter(|bucket| bucket.second + window > second && bucket.second < second)
                .fold(
                    Earlier {
                        second,
                        events: 0,
                        failed: 0,
                    },
                    |sum, bucket| Earlier {
                        events: sum.events + u64::from(bucket.events),
                        failed: sum.failed + u64::from(bucket.failed),
                        ..sum
                    },
                );
            inner.earlier = Some(earlier);
            earlier
        }
    };
    let events = earlier.events + u64::from(current.events);
    let failed = earlier.failed + u64::from(current.failed);
    let settings = &inner.settings;
    events >= u64::from(settings.min_attempts)
        && failed * 100 >= events * u64::from(settings.failure_percent)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn settings() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            window_ms: 30_000,
            min_attempts: 20,
            failure_percent: 90,
            probe_interval_ms: 5_000,
        }
    }

    /// `failed` events whose one attempt failed, then `answered` answered.
    fn attempts(breaker: &Breaker, failed: u32, answered: u32) {
        for _ in 0..failed {
            breaker.record(PassKind::Attempt, Verdict::Failed, &mut Counted::default());
        }
        for _ in 0..answered {
            breaker.record(
                PassKind::Attempt,
                Verdict::Answered,
                &mut Counted::default(),
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_only_on_enough_attempts_that_mostly_failed() {
        let breaker = Breaker::new("test", settings());
        attempts(&breaker, 19, 0);
        assert_eq!(
            breaker.view().state,
            BreakerState::Closed,
            "19 < 20 attempts"
        );
        let breaker = Breaker::new("test", settings());
        attempts(&breaker, 0, 3);
        attempts(&breaker, 20, 0);
        // 20 failures of 23: 87 % < 90 %.
        assert_eq!(breaker.view().state, BreakerState::Closed);
        attempts(&breaker, 7, 0);
        // 27 of 30: 90 %.
        assert_eq!(breaker.view().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_do_not_count() {
        let breaker = Breaker::new("test", settings());
        attempts(&breaker, 15, 0);
        tokio::time::advance(Duration::from_secs(31)).await;
        attempts(&breaker, 15, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_earlier_seconds_in_the_window_count() {
        let breaker = Breaker::new("test", settings());
        for _ in 0..4 {
            attempts(&breaker, 4, 0);
            tokio::time::advance(Duration::from_secs(7)).await;
        }
        assert_eq!(breaker.view().state, BreakerState::Closed, "16 < 20");
        // 20 failures over 29 s, the first of them 28 s ago.
        attempts(&breaker, 3, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed, "19 < 20");
        attempts(&breaker, 1, 0);
        assert_eq!(breaker.view().state, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn while_open_one_probe_per_interval_goes_and_its_success_closes_it() {
        let breaker = Breaker::new("test", settings());
        let shutdown = CancellationToken::new();
        attempts(&breaker, 20, 0);
        assert_eq!(breaker.view().state, BreakerState::Open);
        let started = tokio::time::Instant::now();
        let probe = breaker.admit(1, &shutdown).await.expect("a pass");
        assert_eq!(probe.kind(), PassKind::Probe);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "one probe interval"
        );
        assert_eq!(breaker.view().state, BreakerState::HalfOpen);
        // Others wait for the probe's verdict.
        let waiting = tokio::time::timeout(Duration::from_secs(60), breaker.admit(1, &shutdown));
        probe.record(Verdict::Failed, &mut Counted::default());
        // The failed probe reopens it; the waiter becomes the next probe 5 s later.
        let started = tokio::time::Instant::now();
        let probe = waiting.await.expect("in time").expect("a pass");
        assert_eq!(probe.kind(), PassKind::Probe);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        probe.record(Verdict::Answered, &mut Counted::default());
        assert_eq!(breaker.view().state, BreakerState::Closed);
        let pass = breaker.admit(1, &shutdown).await.expect("a pass");
        assert_eq!(pass.kind(), PassKind::Attempt);
        drop(pass);
        // Closing cleared the window: 19 more failures do not reopen it.
        attempts(&breaker, 19, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed);
    }

    /// Waiters making attempts `attempts` join in that order; returns the
    /// attempt number of each probe, in order, failing all but the last
    /// `succeed_from`-numbered one.
    async fn probes_among(attempts: &[u32], probes: usize) -> Vec<u32> {
        let breaker = Arc::new(Breaker::new("test", settings()));
        let shutdown = CancellationToken::new();
        self::attempts(&breaker, 20, 0);
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = tokio::task::JoinSet::new();
        for &attempt in attempts {
            let (breaker, shutdown, sender) = (breaker.clone(), shutdown.clone(), sender.clone());
            waiters.spawn(async move {
                let pass = breaker.admit(attempt, &shutdown).await.expect("a pass");
                assert_eq!(pass.kind(), PassKind::Probe);
                sender.send(attempt).expect("the test listens");
                pass.record(Verdict::Failed, &mut Counted::default());
            });
            // Each joins before the next.
            tokio::task::yield_now().await;
        }
        let mut probed = Vec::new();
        for _ in 0..probes {
            probed.push(receiver.recv().await.expect("a probe"));
        }
        shutdown.cancel();
        probed
    }

    #[tokio::test(start_paused = true)]
    async fn probes_alternate_between_the_event_tried_most_and_the_one_waiting_longest() {
        // Fresh events came first; the retries (attempts 2 and 3) later.
        let probed = probes_among(&[1, 1, 2, 3, 1, 3], 6).await;
        assert_eq!(
            probed,
            // Most tried (the first 3), longest waiting (the first 1),
            // most tried (the other 3), longest waiting (the second 1),
            // most tried (the 2), then the last left.
            [3, 1, 3, 1, 2, 1]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_given_back_when_dropped() {
        let breaker = Breaker::new("test", settings());
        let shutdown = CancellationToken::new();
        attempts(&breaker, 20, 0);
        let probe = breaker.admit(2, &shutdown).await.expect("a pass");
        assert_eq!(breaker.view().state, BreakerState::HalfOpen);
        // Its job ended without a verdict (a panic, a lost lease).
        drop(probe);
        assert_eq!(breaker.view().state, BreakerState::Open);
        let started = tokio::time::Instant::now();
        let next = breaker.admit(1, &shutdown).await.expect("a pass");
        assert_eq!(next.kind(), PassKind::Probe);
        assert_eq!(started.elapsed(), Duration::ZERO, "the next probes at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_picked_for_the_probe_that_gives_up_leaves_it_to_another() {
        let breaker = Breaker::new("test", settings());
        attempts(&breaker, 20, 0);
        let turn = |attempt, ticket: &mut Ticket<'_>| {
            breaker.turn(&mut breaker.lock(), attempt, &mut ticket.id)
        };
        let mut most_tried = Ticket {
            breaker: &breaker,
            id: None,
        };
        let mut other = Ticket {
            breaker: &breaker,
            id: None,
        };
        assert!(turn(9, &mut most_tried).is_err());
        assert!(turn(1, &mut other).is_err());
        tokio::time::advance(Duration::from_secs(5)).await;
        // The other looks first and picks the most tried, then waits.
        assert_eq!(turn(1, &mut other), Err(None));
        // The one picked gives up before it looks.
        drop(most_tried);
        assert_eq!(turn(1, &mut other), Ok(PassKind::Probe));
        assert_eq!(breaker.view().state, BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_counts_once_by_its_latest_attempt() {
        let breaker = Breaker::new("test", settings());
        // One event (one user's head) failing 100 times, quickly.
        let mut hot = Counted::default();
        for _ in 0..100 {
            breaker.record(PassKind::Attempt, Verdict::Failed, &mut hot);
        }
        attempts(&breaker, 0, 2);
        assert_eq!(
            breaker.view().state,
            BreakerState::Closed,
            "1 of 3 events failed"
        );
        // 18 fresh events fail once, in an earlier second, then 17 of them
        // are accepted on their retry: 2 failed of 21.
        let breaker = Breaker::new("test", settings());
        let mut events = vec![Counted::default(); 18];
        for counted in &mut events {
            breaker.record(PassKind::Attempt, Verdict::Failed, counted);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for counted in &mut events[1..] {
            breaker.record(PassKind::Attempt, Verdict::Answered, counted);
        }
        breaker.record(PassKind::Attempt, Verdict::Failed, &mut Counted::default());
        attempts(&breaker, 0, 2);
        assert_eq!(breaker.view().state, BreakerState::Closed);
        // The same 18 failing again: 18 + 1 of 21 events.
        for counted in &mut events[1..] {
            breaker.record(PassKind::Attempt, Verdict::Failed, counted);
        }
        assert_eq!(breaker.view().state, BreakerState::Open, "19 of 21 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_never_opens() {
        let breaker = Breaker::new(
            "test",
            BreakerConfig {
                enabled: false,
                ..settings()
            },
        );
        attempts(&breaker, 100, 0);
        assert_eq!(breaker.view().state, BreakerState::Closed);
    }
}
