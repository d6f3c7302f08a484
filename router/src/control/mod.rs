//! Which destinations exist and which router delivers each (shard,
//! destination) pair: the catalog in Redis, leases, the registry that
//! follows the catalog, the coordinator that starts and stops workers, and
//! trimming.
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`catalog`]: the destinations' definitions in Redis, the one source of truth.
//! - [`lease`]: exclusive (shard, destination) ownership and how it is split among routers.
//! - [`registry`]: the destinations this router delivers to, following the catalog.
//! - [`follower`]: applies the catalog and the paused set every interval, in a task of its own.
//! - [`retention`]: trims shard streams below what every destination still needs.
//! - [`coordinator`]: acquires, renews, hands over and releases leases; starts and stops workers.

pub(crate) mod catalog;
pub(crate) mod coordinator;
pub(crate) mod follower;
pub(crate) mod lease;
pub(crate) mod registry;
pub(crate) mod retention;
