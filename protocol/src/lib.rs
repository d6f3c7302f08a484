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
//! [`undocumented_modules`] keeps each crate's Layout list complete.
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod entry;
pub mod keys;
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

/// The modules a crate root (`lib.rs` text) declares but its doc's layout
/// list does not name as ``[`module`]``: each crate's layout test asserts
/// there are none, so the list a newcomer reads stays complete.
pub fn undocumented_modules(lib_rs: &str) -> Vec<String> {
    let documented: String = lib_rs
        .lines()
        .filter(|line| line.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    lib_rs
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))?;
            rest.strip_suffix(';')
        })
        .filter(|module| !documented.contains(&format!("[`{module}`]")))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod layout_tests {
    #[test]
    fn the_layout_names_every_module() {
        assert_eq!(
            super::undocumented_modules(include_str!("lib.rs")),
            Vec::<String>::new()
        );
        let probe = "//! - [`a`]: one.\npub mod a;\nmod b;\n";
        assert_eq!(super::undocumented_modules(probe), vec!["b".to_owned()]);
    }
}
