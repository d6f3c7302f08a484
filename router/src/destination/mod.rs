//! A destination at runtime: its endpoint and one HTTP attempt, and what
//! guards it (retry policy, breaker, throttle) and counts it (stats,
//! progress, traces). Nothing here touches Redis.
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`outcome`]: what an attempt's answer says, and what became of the event.
//! - [`history`]: delivery counts and latencies by minute (the console's charts).
//! - [`retry`]: the backoff policy.
//! - [`stats`]: this router's counters per destination (metrics and admin API).
//! - [`progress`]: what each worker waits on, and when it last got anywhere (the stall check).
//! - [`breaker`]: the circuit breaker per destination and its probes.
//! - [`throttle`]: the rate limit, and the holds a 429 asks for.
//! - [`trace`]: the spans of attempts, dead-lettering and replays, in each event's trace.
//! - [`delivery`]: one HTTP attempt and what its answer means; the destination at runtime.

pub(crate) mod breaker;
pub(crate) mod delivery;
pub(crate) mod history;
pub(crate) mod outcome;
pub(crate) mod progress;
pub(crate) mod retry;
pub(crate) mod stats;
pub(crate) mod throttle;
pub(crate) mod trace;
