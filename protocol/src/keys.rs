//! Redis key names.
//!
//! Every key of shard 7 carries the hash tag `{s:7}`, so a Lua script or
//! MULTI touching a shard's stream, its dead-letter streams and its
//! idempotency keys stays in one Redis Cluster slot, while different shards
//! spread over the cluster.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>:{s:N}:events` | stream | accepted events of shard N |
//! | `<prefix>:{s:N}:dead:<destination>` | stream | events that destination gave up on |
//! | `<prefix>:{s:N}:idem:<len(user)>:<user>:<messageId>` | string | first event id for an idempotency key |
//! | `<prefix>:{s:N}:lease:<destination>` | string | the router instance delivering shard N to that destination (expires) |
//! | `<prefix>:{s:N}:log:<destination>` | stream | the delivery log: one entry per attempt |
//! | `<prefix>:{s:N}:replaying:<destination>` | set | ids of that destination's dead letters on shard N whose replay is under way |
//! | `<prefix>:{s:N}:refs:<destination>` | stream | references (the event's own id, no payload) to the events of shard N a filtered destination takes, written by the routing stage |
//! | `<prefix>:{s:N}:routing:marks` | hash | filtered destination → the last shard entry the routing stage considered for it, while it catches up (created, or behind the stage) |
//! | `<prefix>:{s:N}:routing:signal` | stream | one entry per routed batch (capped), which wakes the readers of reference streams |
//! | `<prefix>:meta:shards` | string | the shard count, fixed at first start |
//! | `<prefix>:{catalog}:destinations` | hash | destination name → its definition (JSON), the one source of truth |
//! | `<prefix>:{catalog}:revision` | string | a counter raised by every change of a definition |
//! | `<prefix>:meta:routers` | sorted set | live router instances, scored by when their heartbeat expires |
//! | `<prefix>:meta:paused` | set | destinations whose delivery is paused (admin API) |
/// The routing stage's consumer group on every shard stream, and the
/// destination part of its lease. Not a valid destination name, so it
/// never collides with one.
pub const ROUTING_GROUP: &str = "~routing";

/// The field of a routing signal entry that names, comma-separated, the
/// destinations that got references (only their readers are woken).
pub const ROUTING_SIGNAL_FIELD: &str = "d";

/// Builds key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The stream of accepted events of `shard`.
    pub fn events(&self, shard: u16) -> String {
        format!("{}:{{s:{shard}}}:events", self.prefix)
    }

    /// The dead-letter stream of `destination` in `shard`.
    pub fn dead_letters(&self, shard: u16, destination: &str) -> String {
        format!("{}:{{s:{shard}}}:dead:{destination}", self.prefix)
    }

    /// Ids of the dead letters of `destination` on `shard` whose replay is
    /// under way, so a second replay request does not send them twice.
    pub fn replaying(&self, shard: u16, destination: &str) -> String {
        format!("{}:{{s:{shard}}}:replaying:{destination}", self.prefix)
    }

    /// Names of the destinations whose delivery is paused.
    pub fn paused(&self) -> String {
        format!("{}:meta:paused", self.prefix)
    }

    /// The idempotency record of (`user_id`, `message_id`) in `shard`.
    ///
    /// Scoped per user: two users may use the same message id. The user id
    /// is length-prefixed so no (user, message id) pair can spell another's key.
    pub fn idempotency(&self, shard: u16, user_id: &str, message_id: &str) -> String {
        format!(
            "{}:{{s:{shard}}}:idem:{}:{user_id}:{message_id}",
            self.prefix,
            user_id.len()
        )
    }

    /// The delivery log of `destination` in `shard`: one entry per attempt.
    pub fn delivery_log(&self, shard: u16, destination: &str) -> String {
        format!("{}:{{s:{shard}}}:log:{destination}", self.prefix)
    }

    /// The lease naming the one router instance that may deliver `shard`
    /// to `destination`.
    pub fn lease(&self, shard: u16, destination: &str) -> String {
        format!("{}:{{s:{shard}}}:lease:{destination}", self.prefix)
    }

    /// The references to the events of `shard` that `destination` (one
    /// with `event_types`) takes: each entry's id is its event's id.
    pub fn refs(&self, shard: u16, destination: &str) -> String {
        format!("{}:{{s:{shard}}}:refs:{destination}", self.prefix)
    }

    /// The names of the filtered destinations with a reference stream on
    /// `shard`: added by the script that makes the stream, removed before
    /// it is deleted. Trimming walks them whatever a router's view of the
    /// catalog (one interval old at most) says.
    pub fn routed(&self, shard: u16) -> String {
        format!("{}:{{s:{shard}}}:routed", self.prefix)
    }

    /// Per filtered destination still catching up on `shard`, the last
    /// shard entry the routing stage considered for it.
    pub fn routing_marks(&self, shard: u16) -> String {
        format!("{}:{{s:{shard}}}:routing:marks", self.prefix)
    }

    /// A capped stream the routing stage adds to once per routed batch of
    /// `shard`: what wakes the readers of its reference streams.
    pub fn routing_signal(&self, shard: u16) -> String {
        format!("{}:{{s:{shard}}}:routing:signal", self.prefix)
    }

    /// One hour of `destination`'s delivery history (per-minute counts and
    /// latency buckets, from every router), for the console's charts.
    /// `hour` is Unix hours; each key expires a day after its hour.
    pub fn history(&self, destination: &str, hour: u64) -> String {
        format!("{}:history:{destination}:{hour}", self.prefix)
    }

    /// The membership of live router instances, which split the leases.
    pub fn routers(&self) -> String {
        format!("{}:meta:routers", self.prefix)
    }

    /// The shard count recorded at first start.
    pub fn shard_count(&self) -> String {
        format!("{}:meta:shards", self.prefix)
    }

    /// Every destination's definition, by name: the one definition every
    /// router follows. The gateway checks per-event destination filters
    /// against its names.
    pub fn catalog(&self) -> String {
        format!("{}:{{catalog}}:destinations", self.prefix)
    }

    /// The catalog's revision, raised by every change, so routers notice a
    /// change by reading one number. Shares the catalog's hash tag: the
    /// scripts that change both stay in one Redis Cluster slot.
    pub fn catalog_revision(&self) -> String {
        format!("{}:{{catalog}}:revision", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_keys_share_one_hash_tag() {
        let keys = Keys::new("evd");
        assert_eq!(keys.events(7), "evd:{s:7}:events");
        assert_eq!(keys.dead_letters(7, "crm"), "evd:{s:7}:dead:crm");
        assert_eq!(keys.idempotency(7, "u1", "m1"), "evd:{s:7}:idem:2:u1:m1");
        assert_eq!(keys.lease(7, "crm"), "evd:{s:7}:lease:crm");
        assert_eq!(keys.replaying(7, "crm"), "evd:{s:7}:replaying:crm");
        assert_eq!(keys.delivery_log(7, "crm"), "evd:{s:7}:log:crm");
    }

    #[test]
    fn idempotency_keys_of_different_pairs_differ() {
        let keys = Keys::new("evd");
        assert_ne!(
            keys.idempotency(0, "a:b", "c"),
            keys.idempotency(0, "a", "b:c")
        );
    }
}
