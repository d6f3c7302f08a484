//! The destinations this router delivers to, kept in step with the
//! catalog in Redis ([`crate::control::catalog`]).
//!
//! Every overview interval the router reads the catalog's revision; when it
//! changed, it reads the definitions and applies them here: a new ready
//! destination gets its [`Destination`] (HTTP client, counters), a changed
//! one gets its new settings for its next attempts, and a deleted one is
//! dropped, so the coordinator stops its workers and releases its leases.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::config::DestinationConfig;
use crate::control::catalog::{Catalog, CatalogError, Definition};
use crate::control::lease::LeaseId;
use crate::destination::delivery::Destination;
use crate::outbound::Policy;

/// A destination and the definition it was built from.
#[derive(Clone)]
pub struct Known {
    pub destination: Arc<Destination>,
    pub definition: Arc<Definition>,
}
/// The defined destinations, by how they read.
#[derive(Debug, Clone, Default)]
pub struct Readers {
    /// Groups on the shard streams.
    pub direct: Vec<String>,
    /// Groups on their reference streams ([`crate::worker::routing`]).
    pub routed: Vec<String>,
}

impl Readers {
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.direct.iter().chain(&self.routed)
    }
}

#[derive(Default)]
struct Snapshot {
    revision: u64,
    /// Ready destinations, by name (one still being created is not
    /// delivered yet).
    known: BTreeMap<String, Known>,
}

pub struct Registry {
    policy: Policy,
    shards: u16,
    /// The longest attempt this router's lease is sure to cover
    /// (`LeaseConfig::assured_ms`).
    longest_attempt_ms: u64,
    current: RwLock<Snapshot>,
}

impl Registry {
    pub fn new(policy: Policy, shards: u16, longest_attempt_ms: u64) -> Self {
        Self {
            policy,
            shards,
            longest_attempt_ms,
            current: RwLock::new(Snapshot::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        protocol::sync::read(&self.current)
    }

    /// The settings this router delivers with. A definition made through
    /// another router, whose lease is longer, may time its attempts longer
    /// than this router's lease is sure to last; an attempt only starts when
    /// the lease covers its timeout, so here it would wait for good, holding
    /// its concurrency slot and its bytes. Its attempts time out sooner here
    /// instead, and the log says so.
    fn fit_to_lease(&self, settings: &DestinationConfig) -> DestinationConfig {
        let mut settings = settings.clone();
        if settings.timeout_ms > self.longest_attempt_ms {
            tracing::warn!(
                destination = %settings.name,
                timeout_ms = settings.timeout_ms,
                longest_ms = self.longest_attempt_ms,
                "The destination's timeout_ms is longer than this router's lease is sure to last \
                 (lease.ttl_ms - safety_margin_ms - 2 * renew_interval_ms); its attempts time out \
                 after the shorter here."
            );
            settings.timeout_ms = self.longest_attempt_ms;
        }
        settings
    }

    /// The catalog revision applied last.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    pub fn get(&self, name: &str) -> Option<Known> {
        self.read().known.get(name).cloned()
    }

    /// Every ready destination, by name.
    pub fn destinations(&self) -> Vec<Arc<Destination>> {
        self.read()
            .known
            .values()
            .map(|known| known.destination.clone())
            .collect()
    }

    /// Every ready destination with its definition, by name.
    pub fn known(&self) -> Vec<Known> {
        self.read().known.values().cloned().collect()
    }

    /// Which creation of `name` is current (its creation time): a worker
    /// started for another is stopped, so a destination deleted and created
    /// again between two reads does not deliver from its old group's state.
    pub fn generation(&self, name: &str) -> Option<u64> {
        let snapshot = self.read();
        if name == protocol::keys::ROUTING_GROUP {
            // The routing stage runs while some destination is routed.
            return Self::routes(&snapshot).then_some(0);
        }
        snapshot
            .known
            .get(name)
            .map(|known| known.definition.created_at_ms)
    }

    /// Whether some destination reads references ([`routing`]).
    fn routes(snapshot: &Snapshot) -> bool {
        snapshot.known.values().any(|known| known.definition.routed)
    }

    /// The ready destinations' names, by how they read.
    pub fn readers(&self) -> Readers {
        let mut readers = Readers::default();
        for (name, known) in &self.read().known {
            if known.definition.routed {
                readers.routed.push(name.clone());
            } else {
                readers.direct.push(name.clone());
            }
        }
        readers
    }

    pub fn names(&self) -> Vec<String> {
        self.read().known.keys().cloned().collect()
    }

    /// How many (shard, destination) pairs there are to deliver.
    pub fn pair_count(&self) -> usize {
        self.read().known.len() * usize::from(self.shards)
    }

    /// Every (shard, destination) pair to deliver, sorted, with the pair of
    /// each shard's routing stage ([`protocol::keys::ROUTING_GROUP`]) while some
    /// destination is routed.
    pub fn pairs(&self) -> Vec<LeaseId> {
        let snapshot = self.read();
        let routing = Self::routes(&snapshot).then_some(protocol::keys::ROUTING_GROUP.to_owned());
        let mut pairs: Vec<LeaseId> = (0..self.shards)
            .flat_map(|shard| {
                snapshot
                    .known
                    .keys()
                    .cloned()
                    .chain(routing.clone())
                    .map(move |destination| LeaseId { shard, destination })
            })
            .collect();
        pairs.sort();
        pairs
    }

    /// Reads the catalog if its revision moved since the last read, and
    /// applies it; true if something was applied.
    pub async fn follow(&self, catalog: &Catalog) -> Result<bool, CatalogError> {
        if catalog.revision().await? == self.revision() {
            return Ok(false);
        }
        let (revision, definitions) = catalog.load().await?;
        self.apply(revision, definitions);
        Ok(true)
    }

    /// Applies the catalog at `revision`.
    pub fn apply(&self, revision: u64, definitions: BTreeMap<String, Definition>) {
        let mut snapshot = protocol::sync::write(&self.current);
        if revision < snapshot.revision {
            return; // an older read finishing late
        }
        let mut known = BTreeMap::new();
        for (name, definition) in definitions {
            let definition = Arc::new(definition);
            if !definition.is_ready() {
                continue;
            }
            let previous = snapshot.known.remove(&name);
            let settings = || self.fit_to_lease(&definition.settings);
            let built = match previous {
                Some(old) if old.definition.revision == definition.revision => Ok(old.destination),
                // The same destination changed: its next attempts use the change.
                Some(old) if old.definition.created_at_ms == definition.created_at_ms => {
                    match old.destination.update(&settings(), &self.policy) {
                        Ok(()) => {
                            tracing::info!(destination = %name, revision = definition.revision, "Destination settings changed; the next attempts use them.");
                            Ok(old.destination)
                        }
                        Err(error) => {
                            tracing::error!(destination = %name, %error, "Cannot build the changed destination's HTTP client; it keeps its previous settings.");
                            known.insert(name, old);
                            continue;
                        }
                    }
                }
                // New, or deleted and created again since the last read (a
                // new generation: its workers restart, see `generation`).
                _ => Destination::new(&settings(), &self.policy, self.shards).map(|destination| {
                    tracing::info!(destination = %name, revision = definition.revision, "Destination added.");
                    Arc::new(destination)
                }),
            };
            match built {
                Ok(destination) => {
                    known.insert(
                        name,
                        Known {
                            destination,
                            definition,
                        },
                    );
                }
                Err(error) => {
                    tracing::error!(destination = %name, %error, "Cannot build the destination's HTTP client; it is not delivered.");
                }
            }
        }
        for name in snapshot.known.keys() {
            tracing::info!(destination = %name, "Destination deleted; its workers stop.");
        }
        *snapshot = Snapshot { revision, known };
    }
}
