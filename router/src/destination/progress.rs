//! What each delivery worker is waiting on, so that a stall explains itself.
//!
//! Every wait of a worker that can last (reading, claiming, fetching a
//! parked entry, waiting for the lease, at the gates, sending, recording an
//! outcome, a retry delay) is entered through [`Progress::enter`], whose
//! guard leaves it on every path, drop and panic included. Jobs report
//! progress when an attempt starts and when an outcome is recorded; the
//! reader when a read succeeds.
//!
//! A worker is **stalled** when it has work it is not legitimately holding
//! back and has made no progress for `stall_after`:
//! - its jobs: one of them is fetching, waiting for the lease or recording
//!   an outcome, and no job started an attempt or recorded an outcome
//!   since;
//! - its reader: no read or claim succeeded since, and it is not waiting
//!   for a pause to end or for room in the memory budget.
//!
//! Legitimate waits never make a stall: a paused destination, an open
//! circuit, the rate limit or a concurrency slot (the gates), a retry
//! delay, and an attempt in flight (each ends by its own timeout).
//! [`crate::admin::overview`] checks every worker each interval, shows the result
//! in the admin API and on the console, sets `router_stalled_workers`
//! and logs a warning naming the waits when a worker becomes stalled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One kind of wait of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wait {
    // The reader's.
    /// Creating or checking the consumer group.
    Claiming,
    /// A read of the stream (pending entries first, then new ones).
    Reading,
    /// The destination is paused.
    Paused,
    /// Room in the worker's memory budget (held by its jobs).
    Budget,
    /// The dispatcher taking a batch (busy with its jobs).
    HandOver,
    /// Caught up: new entries to be announced ([`crate::worker::wakeup`]), at most
    /// `reader.block_ms`.
    NewEntries,
    // The jobs'.
    /// Fetching a parked entry again.
    Fetching,
    /// The gates: pause, circuit, concurrency slot, rate limit.
    Gates,
    /// The lease to last past the attempt (renewals late).
    Lease,
    /// An attempt in flight.
    Sending,
    /// Recording a terminal outcome (acknowledgement, dead letter).
    Recording,
    /// A retry delay.
    Backoff,
}

const KINDS: usize = Wait::Backoff as usize + 1;

impl Wait {
    /// Whether a worker waiting only on this is holding back on purpose
    /// (or bounded by a timeout of its own), never stalled.
    fn is_legitimate(self) -> bool {
        matches!(
            self,
            Wait::Paused
                | Wait::Budget
                | Wait::HandOver
                | Wait::NewEntries
                | Wait::Gates
                | Wait::Sending
                | Wait::Backoff
        )
    }

    fn is_reader(self) -> bool {
        matches!(
            self,
            Wait::Claiming
                | Wait::Reading
                | Wait::Paused
                | Wait::Budget
                | Wait::HandOver
                | Wait::NewEntries
        )
    }

    /// What an operator reads in a warning or the admin API.
    pub fn describe(self) -> &'static str {
        match self {
            Wait::Claiming => "preparing the consumer group in Redis",
            Wait::Reading => "reading the shard stream from Redis",
            Wait::Paused => "the destination to be resumed",
            Wait::Budget => "room in the worker's memory budget",
            Wait::HandOver => "the dispatcher to take a batch",
            Wait::NewEntries => "new entries on the shard stream",
            Wait::Fetching => "fetching a parked entry from Redis",
            Wait::Gates => "the destination's gates (circuit, concurrency, rate limit)",
            Wait::Lease => "the lease to cover an attempt (renewed, and longer than the timeout)",
            Wait::Sending => "the destination's answer",
            Wait::Recording => "recording an outcome in Redis",
            Wait::Backoff => "a retry delay",
        }
    }
}

/// One worker's waits and progress. Shared by its reader, its jobs and
/// the overview.
#[derive(Debug)]
pub struct Progress {
    shard: u16,
    /// Longest a read takes: the reader is stalled only past this and
    /// `stall_after` together.
    read_span: Duration,
    /// Unix ms when the worker started (its lease was gained).
    started_at_ms: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// How many of the worker's tasks are in each kind of wait.
    waiting: [u32; KINDS],
    /// When the jobs last started an attempt or recorded an outcome.
    jobs_progressed: Instant,
    /// When the reader last read or claimed successfully.
    reader_progressed: Instant,
    /// Whether the current stall was reported (warned once per stall).
    reported: bool,
}

/// Leaves its wait when dropped.
#[must_use = "the wait ends when this is dropped"]
pub struct Waiting {
    progress: Arc<Progress>,
    wait: Wait,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut state = self.progress.lock();
        let count = &mut state.waiting[self.wait as usize];
        *count = count.saturating_sub(1);
    }
}

/// Why a worker is stalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The waits it is in that are not legitimate, most telling first.
    pub waiting_on: Vec<Wait>,
    /// How long it has made no progress.
    pub for_: Duration,
}

/// A worker's state at a check, and whether it changed from or to stalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Not stalled, as at the last check.
    Fine,
    /// Stalled since this check.
    Stalled(Stall),
    /// Stalled, as at the last check.
    StillStalled,
    /// No longer stalled.
    Recovered,
}

impl Change {
    pub fn is_stalled(&self) -> bool {
        matches!(self, Change::Stalled(_) | Change::StillStalled)
    }
}

impl Progress {
    pub fn new(shard: u16, read_span: Duration) -> Self {
        let now = Instant::now();
        Self {
            shard,
            read_span,
            started_at_ms: protocol::unix_millis(),
            state: Mutex::new(State {
                waiting: [0; KINDS],
                jobs_progressed: now,
                reader_progressed: now,
                reported: false,
            }),
        }
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// Enters `wait` until the guard is dropped.
    pub fn enter(self: &Arc<Self>, wait: Wait) -> Waiting {
        self.lock().waiting[wait as usize] += 1;
        Waiting {
            progress: self.clone(),
            wait,
        }
    }

    /// A job started an attempt or recorded an outcome.
    pub fn job_progressed(&self) {
        self.lock().jobs_progressed = Instant::now();
    }

    /// The reader read or claimed successfully.
    pub fn reader_progressed(&self) {
        self.lock().reader_progressed = Instant::now();
    }

    /// The stall, if the worker has made no progress for `after` while
    /// waiting on something that is not legitimate (the tests' probe;
    /// the router asks [`Progress::check`]).
    #[cfg(test)]
    fn stall(&self, now: Instant, after: Duration) -> Option<Stall> {
        stall_of(&self.lock(), now, after, self.read_span)
    }

    /// Checks for a stall and remembers whether it was reported, so a
    /// stall is warned about once and its end once.
    pub fn check(&self, now: Instant, after: Duration) -> Change {
        let mut state = self.lock();
        match (stall_of(&state, now, after, self.read_span), state.reported) {
            (Some(stall), false) => {
                state.reported = true;
                Change::Stalled(stall)
            }
            (Some(_), true) => Change::StillStalled,
            (None, true) => {
                state.reported = false;
                Change::Recovered
            }
            (None, false) => Change::Fine,
        }
    }

    /// What the admin API shows of this worker.
    pub fn view(&self, now: Instant, after: Duration) -> WorkerView {
        let state = self.lock();
        let stall = stall_of(&state, now, after, self.read_span);
        let waiting_on = (0..KINDS)
            .filter_map(|kind| {
                let count = state.waiting[kind];
                (count > 0).then(|| format!("{} ({count})", WAITS[kind].describe()))
            })
            .collect();
        let busy = state
            .waiting
            .iter()
            .zip(WAITS)
            .any(|(count, wait)| *count > 0 && !wait.is_reader());
        WorkerView {
            shard: self.shard,
            started_at_ms: self.started_at_ms,
            state: match (&stall, busy) {
                (Some(_), _) => WorkerState::Stalled,
                (None, true) => WorkerState::Working,
                (None, false) => WorkerState::Idle,
            },
            waiting_on,
            stalled_for_ms: stall.map(|s| millis(s.for_)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters and instants only: consistent after a panic elsewhere.
        protocol::sync::lock(&self.state)
    }
}

/// Every kind, indexed by its discriminant.
const WAITS: [Wait; KINDS] = [
    Wait::Claiming,
    Wait::Reading,
    Wait::Paused,
    Wait::Budget,
    Wait::HandOver,
    Wait::NewEntries,
    Wait::Fetching,
    Wait::Gates,
    Wait::Lease,
    Wait::Sending,
    Wait::Recording,
    Wait::Backoff,
];

fn stall_of(state: &State, now: Instant, after: Duration, read_span: Duration) -> Option<Stall> {
    let in_wait = |wait: Wait| state.waiting[wait as usize] > 0;
    let mut waiting_on = Vec::new();
    let mut for_ = Duration::MAX;
    let jobs_idle = now.saturating_duration_since(state.jobs_progressed);
    if jobs_idle >= after {
        let stuck: Vec<Wait> = WAITS
            .into_iter()
            .filter(|w| !w.is_reader() && !w.is_legitimate() && in_wait(*w))
            .collect();
        if !stuck.is_empty() {
            waiting_on.extend(stuck);
            for_ = for_.min(jobs_idle);
        }
    }
    let reader_idle = now.saturating_duration_since(state.reader_progressed);
    // A reader held back by a pause or by its jobs is not stuck itself.
    let held_back = [Wait::Paused, Wait::Budget, Wait::HandOver]
        .into_iter()
        .any(in_wait);
    if reader_idle >= after + read_span && !held_back {
        let stuck: Vec<Wait> = [Wait::Claiming, Wait::Reading]
            .into_iter()
            .filter(|w| in_wait(*w))
            .collect();
        if !stuck.is_empty() {
            waiting_on.extend(stuck);
            for_ = for_.min(reader_idle);
        }
    }
    (!waiting_on.is_empty()).then_some(Stall { waiting_on, for_ })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A worker's state as the admin API shows it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Nothing to do: no job, its reader waiting for new entries.
    Idle,
    /// Jobs under way (attempts, retry delays, gates).
    Working,
    /// No progress for `stall_after_ms` while waiting on something that
    /// is not a legitimate hold (see `waiting_on`).
    Stalled,
}

/// One (shard, destination) worker on this router.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct WorkerView {
    pub shard: u16,
    /// Unix ms when this router gained the lease and started the worker.
    pub started_at_ms: u64,
    pub state: WorkerState,
    /// What its reader and jobs wait on now, with how many of them.
    pub waiting_on: Vec<String>,
    /// How long it has made no progress, when stalled.
    pub stalled_for_ms: Option<u64>,
}

/// The workers of one destination on this router, by shard.
#[derive(Debug, Default)]
pub struct Workers {
    running: Mutex<BTreeMap<u16, Arc<Progress>>>,
}

/// Removes its worker from [`Workers`] when dropped.
pub struct Registered<'a> {
    workers: &'a Workers,
    progress: Arc<Progress>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut running = self.workers.lock();
        // Only its own entry: a later worker of the shard may have replaced it.
        if running
            .get(&self.progress.shard)
            .is_some_and(|p| Arc::ptr_eq(p, &self.progress))
        {
            running.remove(&self.progress.shard);
        }
    }
}

impl Workers {
    /// Lists `progress` until the guard is dropped.
    pub fn register(&self, progress: Arc<Progress>) -> Registered<'_> {
        self.lock().insert(progress.shard, progress.clone());
        Registered {
            workers: self,
            progress,
        }
    }

    /// The workers running now, by shard.
    pub fn running(&self) -> Vec<Arc<Progress>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u16, Arc<Progress>>> {
        // Inserts and removals only: consistent after a panic elsewhere.
        protocol::sync::lock(&self.running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(10);
    const READ_SPAN: Duration = Duration::from_secs(3);

    fn later(by: Duration) -> Instant {
        Instant::now() + by
    }

    #[test]
    fn every_kind_is_listed_at_its_index() {
        for (index, wait) in WAITS.into_iter().enumerate() {
            assert_eq!(wait as usize, index);
        }
    }

    #[test]
    fn a_job_recording_without_progress_is_stalled_and_named() {
        let progress = Arc::new(Progress::new(3, READ_SPAN));
        let waiting = progress.enter(Wait::Recording);
        assert_eq!(progress.stall(later(AFTER / 2), AFTER), None);
        let stall = progress.stall(later(AFTER * 2), AFTER).expect("stalled");
        assert_eq!(stall.waiting_on, vec![Wait::Recording]);
        assert!(stall.for_ >= AFTER * 2);
        drop(waiting);
        assert_eq!(progress.stall(later(AFTER * 2), AFTER), None);
    }

    #[test]
    fn legitimate_waits_never_stall() {
        let progress = Arc::new(Progress::new(0, READ_SPAN));
        let _waits: Vec<Waiting> = [
            Wait::Paused,
            Wait::Gates,
            Wait::Sending,
            Wait::Backoff,
            Wait::Budget,
        ]
        .into_iter()
        .map(|wait| progress.enter(wait))
        .collect();
        assert_eq!(progress.stall(later(AFTER * 100), AFTER), None);
    }

    #[test]
    fn progress_of_any_job_ends_a_stall() {
        let progress = Arc::new(Progress::new(0, READ_SPAN));
        let _stuck = progress.enter(Wait::Lease);
        progress.job_progressed();
        assert_eq!(progress.stall(later(AFTER / 2), AFTER), None);
    }

    #[test]
    fn a_reader_held_back_by_its_jobs_is_not_stalled_but_one_stuck_reading_is() {
        let progress = Arc::new(Progress::new(0, READ_SPAN));
        let reading = progress.enter(Wait::Reading);
        // A blocking read lasts up to its span.
        assert_eq!(progress.stall(later(AFTER), AFTER), None);
        let stall = progress
            .stall(later(AFTER + READ_SPAN), AFTER)
            .expect("stalled");
        assert_eq!(stall.waiting_on, vec![Wait::Reading]);
        drop(reading);
        let _budget = progress.enter(Wait::Budget);
        assert_eq!(progress.stall(later(AFTER + READ_SPAN), AFTER), None);
    }

    #[test]
    fn a_stall_is_reported_once_and_its_end_once() {
        let progress = Arc::new(Progress::new(0, READ_SPAN));
        let waiting = progress.enter(Wait::Fetching);
        let at = later(AFTER * 2);
        assert!(matches!(progress.check(at, AFTER), Change::Stalled(_)));
        assert_eq!(progress.check(at, AFTER), Change::StillStalled);
        drop(waiting);
        assert_eq!(progress.check(at, AFTER), Change::Recovered);
        assert_eq!(progress.check(at, AFTER), Change::Fine);
    }

    #[test]
    fn a_waits_guard_leaves_on_panic() {
        let progress = Arc::new(Progress::new(0, READ_SPAN));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _waiting = progress.enter(Wait::Recording);
            panic!("in the wait");
        }));
        assert!(result.is_err());
        assert_eq!(progress.stall(later(AFTER * 2), AFTER), None);
    }

    #[test]
    fn a_replaced_workers_guard_leaves_its_successor_listed() {
        let workers = Workers::default();
        let first = workers.register(Arc::new(Progress::new(1, READ_SPAN)));
        let second = Arc::new(Progress::new(1, READ_SPAN));
        let _second = workers.register(second.clone());
        drop(first);
        let running = workers.running();
        assert_eq!(running.len(), 1);
        assert!(Arc::ptr_eq(&running[0], &second));
    }
}
