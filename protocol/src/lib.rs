//! The contract between the gateway and the router: how users map to shards,
//! what Redis keys hold, and what one stream entry contains.
//!
//! # Layout
//! - [`shard`]: the pinned user → shard hash.
//! - [`keys`]: every Redis key name, each shard's keys under one hash tag.
//! - [`entry`]: the fields of one event in a shard stream, and event ids.
//! - [`connection`]: one connection type for a single Redis or a Redis Cluster.
//! - [`slot_owner`]: a connection to the one cluster master serving a key.
//! - [`secret`]: API keys and the admin token, kept as digests.
//! - [`webhook`]: Standard Webhooks signatures of deliveries.
//! - [`meta`]: start-up checks both services share (the recorded shard count, Redis
//!   persistence settings).
//! - [`config`]: the `[redis]` section both services share, and layered loading.
//! - [`retry`]: the pause between tries of a failing Redis call, and the one retry loop.
//! - [`sync`]: locks that outlive a panic (the one poison-tolerant lock helper).
//!
//! - [`layout`]: the checks that keep each crate's Layout list complete and its imports layered.
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod entry;
pub mod keys;
pub mod layout;
pub mod meta;
pub mod retry;
pub mod secret;
pub mod shard;
pub mod slot_owner;
pub mod sync;
pub mod webhook;

pub use config::RedisConfig;
pub use connection::{query_each, HealingCluster, RedisConnection};
pub use entry::{unix_millis, EventEntry, EventId, Replay, StreamId, TraceContext};
pub use keys::Keys;
pub use meta::{check_persistence, ensure_shard_count, info_field, MetaError};
pub use retry::{run_with_retries, Backoff};
pub use shard::shard_for;
