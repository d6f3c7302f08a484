//! One entry taken to a terminal outcome, in typed phases:
//! load (fetch it again when it was parked) → prepare (the request, or a
//! terminal decision without one) → attempt → handle the outcome (record
//! it, or wait out a retry delay and go round again).
//!
//! A job ends in one of:
//! - delivered → XACK;
//! - dead (permanent answer or attempts exhausted) → dead-letter + XACK in one MULTI;
//! - not for this destination (addressed elsewhere, or of an event type it
//!   does not subscribe to), or deleted from the stream → XACK;
//! - expired (older than the destination's `max_age_ms`, checked before
//!   each attempt and while it waits at the gates) → dead-letter + XACK;
//! - abandoned at shutdown or when the lease goes → nothing: it stays
//!   pending and is redelivered by the next owner.
//!
//! While it waits out a retry delay the job holds no entry in memory: it
//! drops the entry (giving back its budget), tells the dispatcher its user
//! is blocked, and fetches the entry again for the next attempt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::{Backoff, EventEntry, EventId, StreamId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::control::lease::LeaseGuard;
use crate::destination::breaker::{Counted, Verdict};
use crate::destination::delivery::{request_body, Destination, Endpoint, Gates};
use crate::destination::outcome::{AttemptOutcome, Fate};
use crate::destination::progress::{Progress, Wait};
use crate::destination::retry::RetryDecision;
use crate::destination::trace::{self, AttemptTrace, Outcome};
use crate::worker::budget::{Budget, Charge};
use crate::worker::consumer::{ConsumerError, DeadLetter, Entry, EntryContent, GroupConsumer};
use crate::worker::delivery_log::{Logged, Record};

/// An entry in memory with the budget it holds.
pub struct HeldEntry {
    pub entry: Entry,
    pub charge: Charge,
}

/// Where a job's entry is.
// Moved once into the job's future, which has room for the entry anyway;
// boxing would add an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    Held(HeldEntry),
    /// Parked: only its id is known; the job fetches it.
    Parked(StreamId),
}

/// A user's head went into backoff.
#[derive(Debug)]
pub struct Blocked {
    pub user: String,
    pub head: StreamId,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// A terminal outcome is recorded in Redis.
    Recorded,
    /// Stopped at shutdown or when the lease went; the entry stays pending.
    Abandoned,
}

/// What every job of one worker shares.
pub struct JobContext {
    pub consumer: Arc<GroupConsumer>,
    pub destination: Arc<Destination>,
    pub budget: Arc<Budget>,
    pub shutdown: CancellationToken,
    pub blocked: mpsc::UnboundedSender<Blocked>,
    /// What the worker's jobs wait on, and when they last got anywhere.
    pub progress: Arc<Progress>,
}

/// What preparing an entry decided.
enum Prepared<'a> {
    Deliver(Request<'a>),
    /// Not for this destination: acknowledged (and logged) without an attempt.
    Filtered {
        event: &'a EventEntry,
    },
    /// Deleted from the stream meanwhile: acknowledged.
    Deleted,
    /// Dead-letter without an attempt.
    DeadLetter {
        event_id: String,
        reason: String,
    },
}

/// One event, ready to send.
struct Request<'a> {
    event: &'a EventEntry,
    event_id: String,
    body: Bytes,
    /// When the event's age starts: its acceptance, or for a replay the replay.
    age_from_ms: u64,
}

/// An attempt that was sent, besides what it was answered.
struct Sent {
    latency: Duration,
    /// The settings it was sent under.
    endpoint: Arc<Endpoint>,
    trace: AttemptTrace,
    /// Since the event's first attempt (retry time and time at the gates).
    since_first_attempt: Duration,
}

impl Sent {
    fn latency_ms(&self) -> u64 {
        u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A failed attempt's answer.
struct Failure {
    status: Option<u16>,
    error: String,
}

/// What to do after an attempt.
enum AfterAttempt {
    Done(JobEnd),
    RetryAfter(Duration),
}

/// Takes `source` to a terminal outcome, or abandons it.
pub async fn run(context: Arc<JobContext>, lease: LeaseGuard, source: Source) -> JobEnd {
    Job {
        context,
        lease,
        span: OnceLock::new(),
        identified: AtomicBool::new(false),
        first_attempt: None,
        held_at_gates: Duration::ZERO,
        counted: Counted::default(),
    }
    .run(source)
    .await
}

struct Job {
    context: Arc<JobContext>,
    lease: LeaseGuard,
    /// The delivery's span (destination, shard, event id, user), parent of
    /// every line it logs. Made at its first line: a delivery that logs
    /// nothing (a success, logged at debug) pays nothing for it, and spans
    /// cost more than the rest of a delivery's bookkeeping.
    span: OnceLock<Span>,
    /// Whether the span names the event yet.
    identified: AtomicBool,
    /// When the first attempt started: the retry horizon counts from here.
    first_attempt: Option<Instant>,
    /// Time since then spent waiting for a paused destination, an open
    /// circuit or the rate limit, which the horizon does not count.
    held_at_gates: Duration,
    /// The event's outcome in its circuit breaker's window.
    counted: Counted,
}

impl Job {
    async fn run(mut self, mut source: Source) -> JobEnd {
        let mut attempt = 1;
        loop {
            let Some(mut held) = self.load(source).await else {
                return JobEnd::Abandoned;
            };
            let entry = &held.entry;
            let endpoint = self.context.destination.endpoint();
            let request = match prepare(entry, &endpoint, self.shard()) {
                Prepared::Deliver(request) => {
                    // The body is a second copy of the payload.
                    held.charge.grow(request.body.len());
                    request
                }
                Prepared::Filtered { event } => {
                    let consumer = &self.context.consumer;
                    let event_id = event_id(self.shard(), entry.id);
                    // A replay addressed to another destination is not news here.
                    let record = event
                        .replay
                        .is_none()
                        .then(|| Record::of(&event_id, event, 0, Logged::Filtered));
                    let end = self
                        .record(|| consumer.filtered(entry.id, record.as_ref()))
                        .await;
                    if end == JobEnd::Recorded {
                        self.context.destination.stats.filtered();
                    }
                    return end;
                }
                Prepared::Deleted => {
                    // Nothing deletes an entry a group still needs: worth a look.
                    tracing::warn!(parent: self.span(None), stream_id = %entry.id, "An entry pending on this destination is gone from the stream; acknowledging it.");
                    let consumer = &self.context.consumer;
                    return self.record(|| consumer.ack(entry.id)).await;
                }
                Prepared::DeadLetter { event_id, reason } => {
                    tracing::error!(parent: self.span(None), %event_id, %reason, outcome = "dead", "Dead-lettering an entry that cannot be delivered.");
                    return self
                        .dead_letter(entry, &event_id, 0, None, &reason, None)
                        .await;
                }
            };
            match self.attempt(entry, &request, attempt, &endpoint).await {
                AfterAttempt::Done(end) => return end,
                AfterAttempt::RetryAfter(delay) => {
                    let user = request.event.user_id.clone();
                    let id = entry.id;
                    // The entry leaves memory while the user waits.
                    drop(held);
                    // The dispatcher may already have stopped listening.
                    let _ = self.context.blocked.send(Blocked { user, head: id });
                    let _in_backoff = self.context.destination.stats.user_in_backoff();
                    let _waiting = self.context.progress.enter(Wait::Backoff);
                    tokio::select! {
                        () = self.context.shutdown.cancelled() => return JobEnd::Abandoned,
                        () = tokio::time::sleep(delay) => {}
                    }
                    source = Source::Parked(id);
                    attempt += 1;
                }
            }
        }
    }

    fn shard(&self) -> u16 {
        self.context.consumer.shard()
    }

    /// The span, made now if this is the first line; named after the event
    /// once a request for it is known.
    fn span(&self, request: Option<&Request<'_>>) -> &Span {
        let span = self.span.get_or_init(|| {
            tracing::info_span!(
                "delivery",
                destination = %self.context.destination.name,
                shard = self.shard(),
                event_id = tracing::field::Empty,
                user = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            )
        });
        if let Some(request) = request {
            if !self.identified.swap(true, Ordering::Relaxed) {
                span.record("event_id", request.event_id.as_str());
                span.record("user", request.event.user_id.as_str());
                if let Some(trace_id) = trace::trace_id(request.event) {
                    span.record("trace_id", trace_id);
                }
            }
        }
        span
    }

    /// The entry in memory: as read, or fetched again within the budget.
    async fn load(&self, source: Source) -> Option<HeldEntry> {
        let id = match source {
            Source::Held(held) => return Some(held),
            Source::Parked(id) => id,
        };
        let mut reservation = tokio::select! {
            () = self.context.shutdown.cancelled() => return None,
            reservation = self.context.budget.reserve_one() => reservation,
        };
        let _waiting = self.context.progress.enter(Wait::Fetching);
        // Not `run_with_retries`: its lines carry the delivery's span, which
        // is made only when a line is logged.
        let mut failures = 0;
        loop {
            match self.context.consumer.fetch(id).await {
                Ok(entry) => {
                    let charge = reservation.take(entry.bytes);
                    return Some(HeldEntry { entry, charge });
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(parent: self.span(None), stream_id = %id, %error, "Fetching a parked entry failed; retrying.");
                    if !Backoff::COMMANDS
                        .wait(failures, &self.context.shutdown)
                        .await
                    {
                        return None;
                    }
                }
            }
        }
    }

    /// One attempt and what follows from its outcome: wait at the gates
    /// (or expire there), send, then handle the answer.
    /// `prepared_with` is the settings the request was prepared under.
    async fn attempt(
        &mut self,
        entry: &Entry,
        request: &Request<'_>,
        attempt: u32,
        prepared_with: &Endpoint,
    ) -> AfterAttempt {
        // Its own handle, so the gates it lends outlive no borrow of the job.
        let destination = Arc::clone(&self.context.destination);
        let gates = match self
            .pass_gates(&destination, request, attempt, prepared_with)
            .await
        {
            AtGates::Passed(gates) => gates,
            AtGates::Expired => {
                return AfterAttempt::Done(self.expire(entry, request, attempt).await)
            }
            AtGates::Shutdown => return AfterAttempt::Done(JobEnd::Abandoned),
        };
        let Some((outcome, sent)) = self.send(&destination, request, attempt, gates).await else {
            return AfterAttempt::Done(JobEnd::Abandoned);
        };
        let (failure, next) = match outcome {
            AttemptOutcome::Delivered { status } => {
                return AfterAttempt::Done(
                    self.on_delivered(entry, request, attempt, status, sent)
                        .await,
                );
            }
            AttemptOutcome::Retry {
                status,
                error,
                retry_after,
            } => {
                let elapsed = sent.since_first_attempt.saturating_sub(self.held_at_gates);
                let next = sent
                    .endpoint
                    .retry
                    .after_failure(attempt, elapsed, retry_after);
                (Failure { status, error }, next)
            }
            AttemptOutcome::Dead { status, error } => {
                (Failure { status, error }, RetryDecision::GiveUp)
            }
        };
        self.on_failed(entry, request, attempt, failure, next, sent)
            .await
    }

    /// Waits until the destination takes the attempt (not paused, circuit,
    /// slot, rate limit), unless the event reaches its `max_age_ms` first:
    /// its age keeps counting while it waits.
    async fn pass_gates<'d>(
        &mut self,
        destination: &'d Destination,
        request: &Request<'_>,
        attempt: u32,
        prepared_with: &Endpoint,
    ) -> AtGates<'d> {
        let max_age = prepared_with.max_age;
        if expired(request.age_from_ms, max_age) {
            return AtGates::Expired;
        }
        let _waiting = self.context.progress.enter(Wait::Gates);
        let expiry = time_left(request.age_from_ms, max_age).map(|left| Instant::now() + left);
        let at_gates = tokio::select! {
            gates = destination.pass_gates(attempt, &self.context.shutdown) => {
                gates.map_or(AtGates::Shutdown, AtGates::Passed)
            }
            () = sleep_until(expiry) => AtGates::Expired,
        };
        if let (AtGates::Passed(gates), Some(_)) = (&at_gates, self.first_attempt) {
            self.held_at_gates += gates.waited;
        }
        at_gates
    }

    /// Sends the attempt, once the lease surely outlasts it; `None` if the
    /// lease is going or shutdown came first. Tells the breaker (and, for
    /// a 429 with `Retry-After`, the throttle) what the answer said.
    async fn send(
        &mut self,
        destination: &Destination,
        request: &Request<'_>,
        attempt: u32,
        gates: Gates<'_>,
    ) -> Option<(AttemptOutcome, Sent)> {
        let Gates { slot, pass, .. } = gates;
        let progress = &self.context.progress;
        // The settings as they are now: a change made while this waited applies.
        let endpoint = destination.endpoint();
        // The attempt must be over before the lease could pass to another
        // router, or the next owner could deliver this user's next event first.
        let waiting = progress.enter(Wait::Lease);
        if !self
            .lease
            .hold_for(endpoint.timeout, &self.context.shutdown)
            .await
        {
            // The pass, dropped, tells the breaker nothing came of it.
            return None;
        }
        drop(waiting);
        let first_attempt = *self.first_attempt.get_or_insert_with(Instant::now);
        progress.job_progressed();
        let in_flight = destination.stats.attempt_in_flight();
        let waiting = progress.enter(Wait::Sending);
        let trace = AttemptTrace::start(
            request.event,
            &request.event_id,
            &destination.name,
            self.shard(),
            attempt,
        );
        let (outcome, latency) = endpoint
            .attempt(
                &slot,
                &request.event_id,
                &request.body,
                attempt,
                trace.header(request.event),
            )
            .await;
        drop((waiting, in_flight, slot));
        pass.record(Verdict::from(&outcome), &mut self.counted);
        if let AttemptOutcome::Retry {
            status: Some(429),
            retry_after: Some(retry_after),
            ..
        } = &outcome
        {
            // The destination asked everyone to slow down, not just this event.
            destination
                .throttle
                .hold_for((*retry_after).min(endpoint.retry.max_delay()));
        }
        let sent = Sent {
            latency,
            endpoint,
            trace,
            since_first_attempt: first_attempt.elapsed(),
        };
        Some((outcome, sent))
    }

    /// A 2xx: records the delivery (and the acknowledgement with it).
    async fn on_delivered(
        &self,
        entry: &Entry,
        request: &Request<'_>,
        attempt: u32,
        status: u16,
        sent: Sent,
    ) -> JobEnd {
        let stats = &self.context.destination.stats;
        let latency_ms = sent.latency_ms();
        // Debug: at info, a line (and a span) per delivery would cost more
        // CPU than the rest of its bookkeeping. Failures stay at info and warn.
        tracing::debug!(
            parent: self.span(Some(request)),
            attempt,
            status,
            latency_ms,
            outcome = Fate::Delivered.as_str(),
            "Delivery attempt."
        );
        sent.trace.finish(&Outcome {
            fate: Fate::Delivered,
            status: Some(status),
            latency: sent.latency,
            error: None,
            retry_delay: None,
        });
        stats.attempted(Fate::Delivered, sent.latency);
        let consumer = &self.context.consumer;
        let record = Record {
            status: Some(status),
            latency_ms,
            ..Record::of(
                &request.event_id,
                request.event,
                attempt,
                Fate::Delivered.into(),
            )
        };
        let end = self.record(|| consumer.delivered(entry, &record)).await;
        stats.delivered(age_since(request.age_from_ms));
        end
    }

    /// A failed attempt: dead-letters the event when `next` gives up, or
    /// records the retry and says how long to wait before the next.
    async fn on_failed(
        &self,
        entry: &Entry,
        request: &Request<'_>,
        attempt: u32,
        failure: Failure,
        next: RetryDecision,
        sent: Sent,
    ) -> AfterAttempt {
        let stats = &self.context.destination.stats;
        let Failure { status, error } = failure;
        let error = error.as_str();
        stats.failed(error, status);
        let latency_ms = sent.latency_ms();
        let fate = match next {
            RetryDecision::RetryAfter(_) => Fate::Retry,
            RetryDecision::GiveUp => Fate::Dead,
        };
        let record = Record {
            status,
            latency_ms,
            error: Some(error),
            ..Record::of(&request.event_id, request.event, attempt, fate.into())
        };
        // A retry due after the event expires waits only until then.
        let delay = match next {
            RetryDecision::RetryAfter(delay) => Some(
                time_left(request.age_from_ms, sent.endpoint.max_age)
                    .map_or(delay, |left| delay.min(left)),
            ),
            RetryDecision::GiveUp => None,
        };
        sent.trace.finish(&Outcome {
            fate,
            status,
            latency: sent.latency,
            error: Some(error),
            retry_delay: delay,
        });
        stats.attempted(fate, sent.latency);
        let Some(delay) = delay else {
            tracing::warn!(parent: self.span(Some(request)), attempt, status, latency_ms, %error, outcome = fate.as_str(), "Delivery attempt.");
            let end = self
                .dead_letter(
                    entry,
                    &request.event_id,
                    attempt,
                    status,
                    error,
                    Some(&record),
                )
                .await;
            return AfterAttempt::Done(end);
        };
        self.context.consumer.record_retry(&record).await;
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        tracing::info!(parent: self.span(Some(request)), attempt, status, latency_ms, %error, delay_ms, outcome = fate.as_str(), "Delivery attempt.");
        AfterAttempt::RetryAfter(delay)
    }

    /// Dead-letters an event past its destination's `max_age_ms`, before
    /// attempt number `attempt`.
    async fn expire(&self, entry: &Entry, request: &Request<'_>, attempt: u32) -> JobEnd {
        let age = age_since(request.age_from_ms);
        let error = format!(
            "expired: undelivered {}s after it was accepted (max_age_ms)",
            age.as_secs()
        );
        tracing::warn!(parent: self.span(Some(request)), attempt, %error, outcome = "expired", "Dead-lettering an expired event.");
        let record = Record {
            error: Some(&error),
            ..Record::of(
                &request.event_id,
                request.event,
                attempt - 1,
                Fate::Dead.into(),
            )
        };
        self.dead_letter(
            entry,
            &request.event_id,
            attempt - 1,
            None,
            &error,
            Some(&record),
        )
        .await
    }

    /// Records the dead letter (and the acknowledgement with it).
    async fn dead_letter(
        &self,
        entry: &Entry,
        event_id: &str,
        attempts: u32,
        last_status: Option<u16>,
        last_error: &str,
        record: Option<&Record<'_>>,
    ) -> JobEnd {
        let letter = DeadLetter {
            event_id,
            attempts,
            last_status,
            last_error,
        };
        let _span = match &entry.content {
            EntryContent::Event(event) => trace::dead_letter(
                event,
                event_id,
                &self.context.destination.name,
                attempts,
                last_error,
            ),
            _ => Span::none(),
        };
        let consumer = &self.context.consumer;
        let end = self
            .record(|| consumer.dead_letter(entry, &letter, record))
            .await;
        if end == JobEnd::Recorded {
            self.context.destination.stats.dead_lettered();
        }
        end
    }

    /// Runs a terminal Redis write until it succeeds. Before the user's next
    /// event may go out, this one must be recorded; otherwise a restart
    /// would redeliver it after its successor. At shutdown it gives up
    /// after a few tries (the entry stays pending). (Not `run_with_retries`,
    /// which stops at shutdown at once: an outcome already reached is worth
    /// a few more tries to record.)
    async fn record<F, Fut>(&self, mut write: F) -> JobEnd
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), ConsumerError>>,
    {
        let progress = &self.context.progress;
        let waiting = progress.enter(Wait::Recording);
        let mut failures = 0;
        while let Err(error) = write().await {
            failures += 1;
            tracing::warn!(parent: self.span(None), %error, failures, "Recording a terminal outcome failed; retrying.");
            if self.context.shutdown.is_cancelled() && failures > 3 {
                return JobEnd::Abandoned;
            }
            tokio::time::sleep(Backoff::COMMANDS.delay(failures)).await;
        }
        drop(waiting);
        progress.job_progressed();
        JobEnd::Recorded
    }
}

/// Builds the request, or decides the entry's fate without one.
fn prepare<'a>(entry: &'a Entry, endpoint: &Endpoint, shard: u16) -> Prepared<'a> {
    let event = match &entry.content {
        EntryContent::Event(event) if endpoint.wants(event) => event,
        EntryContent::Event(event) => return Prepared::Filtered { event },
        EntryContent::Deleted => return Prepared::Deleted,
        EntryContent::Malformed(reason) => {
            return Prepared::DeadLetter {
                event_id: event_id(shard, entry.id),
                reason: format!("malformed stream entry: {reason}"),
            }
        }
    };
    // A replay keeps the id the event was first delivered under.
    let event_id = match &event.replay {
        Some(replay) => replay.event_id.clone(),
        None => event_id(shard, entry.id),
    };
    match request_body(
        &event_id,
        &event.user_id,
        &event.payload,
        event.event_type.as_deref(),
        event.received_at_ms,
    ) {
        Ok(body) => Prepared::Deliver(Request {
            event,
            event_id,
            body,
            // A replay's age (for `max_age_ms` and end-to-end latency)
            // starts at the replay.
            age_from_ms: event
                .replay
                .as_ref()
                .map_or(event.received_at_ms, |replay| replay.replayed_at_ms),
        }),
        Err(reason) => Prepared::DeadLetter { event_id, reason },
    }
}

/// How an event's wait at the gates ended.
enum AtGates<'a> {
    Passed(Gates<'a>),
    /// It reached its destination's `max_age_ms` first.
    Expired,
    Shutdown,
}

fn event_id(shard: u16, stream_id: StreamId) -> String {
    use std::fmt::Write;
    // Room for the longest id (`65535-<20 digits>-<20 digits>`): written
    // into a growing string it took three allocations.
    let mut id = String::with_capacity(48);
    let _ = write!(id, "{}", EventId { shard, stream_id });
    id
}

fn age_since(unix_ms: u64) -> Duration {
    Duration::from_millis(protocol::unix_millis().saturating_sub(unix_ms))
}

/// Whether the event has reached `max_age`.
fn expired(since_ms: u64, max_age: Option<Duration>) -> bool {
    max_age.is_some_and(|max| age_since(since_ms) >= max)
}

/// How long until the event reaches `max_age` (`None`: it never expires).
fn time_left(since_ms: u64, max_age: Option<Duration>) -> Option<Duration> {
    max_age.map(|max| max.saturating_sub(age_since(since_ms)))
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
