//! Reading and delivering: the routing stage, and per (shard, destination)
//! pair a reader, a dispatcher and one job per user at a time, with what
//! they hold in memory and what they write back to Redis.
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`delivery_log`]: what happened to each event at each destination, written per attempt.
//! - [`acks`]: acknowledgements written by group commit, with their log records.
//! - [`budget`]: how many entries and bytes a worker holds in memory.
//! - [`parking`]: per-user queues; entries of blocked or hot users parked as ids.
//! - [`consumer`]: one destination's consumer group on one shard (XREADGROUP, XACK, dead letters).
//! - [`job`]: one entry to its terminal outcome (fetch, prepare, attempt, record).
//! - [`wakeup`]: whether a reader blocks in its own reads, or shares one blocking read per shard that wakes it.
//! - [`reader`]: a worker's reader: takes over the group, then reads within the budget and hands entries over.
//! - [`pair`]: the per (shard, destination) loop: reader, dispatcher, lease checks.
//! - [`routing`]: the routing stage: one read per shard stream, references for destinations with `event_types`.

pub(crate) mod acks;
pub(crate) mod budget;
pub(crate) mod consumer;
pub(crate) mod delivery_log;
pub(crate) mod job;
pub(crate) mod pair;
pub(crate) mod parking;
pub(crate) mod reader;
pub(crate) mod routing;
pub(crate) mod wakeup;
