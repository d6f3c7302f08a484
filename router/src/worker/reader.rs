//! The reader of one (shard, destination) worker: an owner loop that
//! takes over what earlier owners left (and restores a lost group), around
//! a read loop that fetches entries within the worker's budget and hands
//! them to the dispatcher ([`crate::worker::pair`]): first everything
//! pending on us, in id order, then new entries. A reader with its own
//! connection blocks in the read up to `block`; one sharing the shard's
//! wake-up reads without blocking and, once caught up, waits for the
//! wake-up (or `block`).
//!
//! Every read starts only if it ends while this router still surely holds
//! the lease ([`crate::control::lease`]): a read by a router whose lease
//! has expired would take entries away from the new owner.

use std::sync::Arc;
use std::time::Duration;

use protocol::{Backoff, StreamId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::catalog::CatalogError;
use crate::control::lease::LeaseGuard;
use crate::destination::delivery::Destination;
use crate::destination::progress::{Progress, Wait};
use crate::worker::budget::{Budget, Charge};
use crate::worker::consumer::{ConsumerError, Entry, GroupConsumer, ReadFrom};
use crate::worker::job::HeldEntry;
use crate::worker::wakeup::Wakeup;

/// How soon a paused destination's reader looks again for expired entries
/// after the look failed.
const RETRY_PAUSED_LOOK: Duration = Duration::from_secs(1);

/// What the reader hands the dispatcher.
pub enum Read {
    /// Entries in stream order.
    Entries(Vec<HeldEntry>),
    /// The consumer group was missing and is created anew at the start of
    /// the stream, which the new group hands out again from its first entry.
    GroupRecreated,
}

/// How a reader reads.
#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    /// Most entries one read fetches.
    pub batch_size: usize,
    /// How long a read blocks; with a shared wake-up, the longest a
    /// caught-up reader waits for it before it reads again anyway.
    pub block: Duration,
    /// Longest a read can take: the block time plus the reply timeout.
    pub read_span: Duration,
}

/// One worker's reader, run by [`Reader::run`].
pub struct Reader {
    pub consumer: Arc<GroupConsumer>,
    pub destination: Arc<Destination>,
    pub progress: Arc<Progress>,
    /// The shard's shared wake-up; `None` when this reader blocks in its
    /// own reads.
    pub wakeup: Option<Wakeup>,
    pub batches: mpsc::Sender<Read>,
    pub budget: Arc<Budget>,
    pub settings: ReadSettings,
    pub lease: LeaseGuard,
    pub shutdown: CancellationToken,
}

/// Whether the group's pending list held anything when it was taken over.
enum Pending {
    Some,
    None,
}

/// Why the read loop ended.
enum Ended {
    /// Shutdown, the lease going, or the dispatcher gone.
    Stopped,
    /// The consumer group is missing: prepare it again.
    GroupMissing,
}

impl Reader {
    /// The owner loop: takes over the group, then reads until stopped,
    /// taking it over again whenever it goes missing.
    pub async fn run(mut self) {
        loop {
            let Some(pending) = self.take_over().await else {
                return;
            };
            // The pending list first, from its start, unless it is empty:
            // then nothing can be pending on us but what we read from now.
            let from = match pending {
                Pending::Some => ReadFrom::Pending(StreamId::default()),
                Pending::None => ReadFrom::New,
            };
            match self.read_loop(from).await {
                Ended::Stopped => return,
                // Take the group over again, and read its pending list anew.
                Ended::GroupMissing => {}
            }
        }
    }

    /// [`prepare`]s the group until it works; `None` at shutdown or when
    /// the lease goes. (Not `run_with_retries`: every try first checks the
    /// lease, and a deleted destination is logged at debug, not as a failure.)
    async fn take_over(&mut self) -> Option<Pending> {
        let _waiting = self.progress.enter(Wait::Claiming);
        let mut failures = 0;
        loop {
            // Claiming entries is an owner's act, like reading.
            if !self
                .lease
                .hold_for(self.settings.read_span, &self.shutdown)
                .await
            {
                return None;
            }
            let error = match prepare(&self.consumer).await {
                Ok(pending) => {
                    self.progress.reader_progressed();
                    return Some(pending);
                }
                Err(error) => error,
            };
            failures += 1;
            let shard = self.consumer.shard();
            if error.is_destination_gone() {
                // Deleted: the coordinator stops this worker within a tick.
                tracing::debug!(shard, %error, "Destination deleted; waiting to be stopped.");
            } else {
                tracing::warn!(shard, %error, "Cannot prepare consumer group; retrying.");
            }
            if !Backoff::COMMANDS.wait(failures, &self.shutdown).await {
                return None;
            }
        }
    }

    /// Reads from `from` on, handing each read to the dispatcher, until
    /// stopped or the group goes missing. A failed read is retried with
    /// [`Backoff::COMMANDS`], from the start of the pending list: a reply
    /// lost in the failure may have left entries pending on us. (Not
    /// `run_with_retries`: the read after a failure is another read.)
    async fn read_loop(&mut self, mut from: ReadFrom) -> Ended {
        let mut failures = 0;
        loop {
            let Some(reservation) = self.wait_for_room().await else {
                return Ended::Stopped;
            };
            let reading_new = from == ReadFrom::New;
            let wanted = reservation.entries();
            // HeldEntry through a failure's retry delay: failing reads make no progress.
            let reading = self.progress.enter(Wait::Reading);
            let Some(result) = self.read(&from, wanted).await else {
                return Ended::Stopped;
            };
            let entries = match result {
                Ok(entries) => entries,
                Err(error) => {
                    drop(reservation);
                    failures += 1;
                    if let Some(ended) = self.on_failed_read(&error, failures).await {
                        return ended;
                    }
                    from = ReadFrom::Pending(StreamId::default());
                    continue;
                }
            };
            drop(reading);
            self.progress.reader_progressed();
            failures = 0;
            let caught_up = reading_new && entries.len() < wanted;
            if let ReadFrom::Pending(after) = &mut from {
                match entries.last() {
                    Some(last) => *after = last.id,
                    None => from = ReadFrom::New,
                }
            }
            if !self.hand_over_entries(entries, reservation).await {
                return Ended::Stopped;
            }
            if let (true, Some(wakeup)) = (caught_up, &mut self.wakeup) {
                let _waiting = self.progress.enter(Wait::NewEntries);
                if !wakeup.wait(self.settings.block, &self.shutdown).await {
                    return Ended::Stopped;
                }
            }
        }
    }

    /// Waits while the destination is paused, then for room in the budget;
    /// `None` at shutdown.
    async fn wait_for_room(&self) -> Option<Charge> {
        let waiting = self.progress.enter(Wait::Paused);
        if !wait_while_paused(&self.consumer, &self.destination, &self.shutdown).await {
            return None;
        }
        drop(waiting);
        let _waiting = self.progress.enter(Wait::Budget);
        tokio::select! {
            () = self.shutdown.cancelled() => None,
            reservation = self.budget.reserve_for_read(self.settings.batch_size) => Some(reservation),
        }
    }

    /// One read of up to what the budget reserved, if the lease surely
    /// outlasts it; `None` at shutdown or when the lease goes. A read
    /// abandoned here may leave entries pending on us unseen; the next
    /// owner of this shard claims and reads them first.
    async fn read(
        &mut self,
        from: &ReadFrom,
        wanted: usize,
    ) -> Option<Result<Vec<Entry>, ConsumerError>> {
        if !self
            .lease
            .hold_for(self.settings.read_span, &self.shutdown)
            .await
        {
            return None;
        }
        if let (ReadFrom::New, Some(wakeup)) = (from, &mut self.wakeup) {
            // Before the read: an entry added after it still wakes us.
            wakeup.mark_seen();
        }
        let block = self.wakeup.is_none().then_some(self.settings.block);
        tokio::select! {
            () = self.shutdown.cancelled() => None,
            result = self.consumer.read(from, wanted, block) => Some(result),
        }
    }

    /// Charges the entries to the read's reservation (giving back what they
    /// did not fill) and hands them to the dispatcher; false once it stops.
    async fn hand_over_entries(&self, entries: Vec<Entry>, mut reservation: Charge) -> bool {
        if let Some(largest) = entries.iter().map(|entry| entry.bytes).max() {
            self.budget.observe(largest);
        }
        let held: Vec<HeldEntry> = entries
            .into_iter()
            .map(|entry| HeldEntry {
                charge: reservation.take(entry.bytes),
                entry,
            })
            .collect();
        // Room reserved but not filled goes back now.
        drop(reservation);
        let _waiting = self.progress.enter(Wait::HandOver);
        held.is_empty() || hand_over(&self.batches, Read::Entries(held), &self.shutdown).await
    }

    /// After the `failures`th failed read in a row: `Some` when the loop
    /// ends (the group is missing, or shutdown came during the pause).
    async fn on_failed_read(&self, error: &ConsumerError, failures: u32) -> Option<Ended> {
        let shard = self.consumer.shard();
        if error.is_missing_group() {
            tracing::debug!(shard, "Consumer group missing.");
            let _waiting = self.progress.enter(Wait::HandOver);
            if !hand_over(&self.batches, Read::GroupRecreated, &self.shutdown).await {
                return Some(Ended::Stopped);
            }
            return Some(Ended::GroupMissing);
        }
        tracing::warn!(shard, %error, "Reading the stream failed; retrying.");
        if !Backoff::COMMANDS.wait(failures, &self.shutdown).await {
            return Some(Ended::Stopped);
        }
        None
    }
}

/// Waits while `destination` is paused, reading nothing more, so that the
/// group's lag shows the backlog: until it is resumed or, when it has a
/// `max_age_ms`, until the oldest entry it has not read on this shard
/// reaches that age. Then the reader reads on while paused, and its jobs
/// dead-letter what expired ([`crate::worker::job`]): an event's age counts while its
/// destination is paused. False at shutdown.
async fn wait_while_paused(
    consumer: &GroupConsumer,
    destination: &Destination,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        if !destination.is_paused() {
            return true;
        }
        let Some(max_age) = destination.endpoint().max_age else {
            return destination.wait_until_resumed(shutdown).await;
        };
        let look_again = match consumer.oldest_unread().await {
            Ok(Some(oldest)) => {
                let age = Duration::from_millis(protocol::unix_millis().saturating_sub(oldest.ms));
                if age >= max_age {
                    return true;
                }
                max_age - age
            }
            // An entry added from now on expires no sooner than this.
            Ok(None) => max_age,
            Err(error) => {
                tracing::warn!(shard = consumer.shard(), %error, "Cannot look for expired entries of a paused destination; retrying.");
                RETRY_PAUSED_LOOK
            }
        };
        // A lowered `max_age_ms` applies within a minute.
        let look_again = look_again.min(Duration::from_secs(60));
        tokio::select! {
            resumed = destination.wait_until_resumed(shutdown) => return resumed,
            () = tokio::time::sleep(look_again) => {}
        }
    }
}

/// Passes a read to the dispatcher; false once the worker stops (the
/// dispatcher no longer takes reads then, so waiting for room could last
/// forever and keep the worker from ending).
async fn hand_over(batches: &mpsc::Sender<Read>, read: Read, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        sent = batches.send(read) => sent.is_ok(),
    }
}

/// Why a worker cannot start reading yet.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("cannot restore the missing consumer group: {0}")]
    Restore(#[from] CatalogError),
}

impl PrepareError {
    /// The group is missing because the destination was deleted.
    fn is_destination_gone(&self) -> bool {
        matches!(self, PrepareError::Restore(CatalogError::Unknown(_)))
    }
}

/// Takes over what earlier owners left: their pending entries become ours
/// (read first, in id order), and their consumers, now empty, are removed.
/// A missing group (deleted by hand, or lost by Redis) is restored at the
/// destination's cut, unless the destination was deleted meanwhile. Says
/// whether anything is pending (the claim counts what was ours already:
/// none claimed means an empty pending list, and only our reads, under the
/// lease, can add to it).
async fn prepare(consumer: &GroupConsumer) -> Result<Pending, PrepareError> {
    let claimed = match consumer.claim_pending_of_others().await {
        Err(error) if error.is_missing_group() => {
            let cut = consumer.restore_group().await?;
            tracing::warn!(
                shard = consumer.shard(),
                %cut,
                "Consumer group was missing; restored at the destination's cut \
                 (retained events since then are delivered again)."
            );
            consumer.claim_pending_of_others().await?
        }
        claimed => claimed?,
    };
    let removed = consumer.remove_idle_consumers().await?;
    if claimed > 0 || !removed.is_empty() {
        tracing::info!(
            shard = consumer.shard(),
            claimed,
            removed_consumers = ?removed,
            "Took over entries pending on earlier owners."
        );
    }
    Ok(if claimed > 0 {
        Pending::Some
    } else {
        Pending::None
    })
}
