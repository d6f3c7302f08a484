//! How much of its stream one (shard, destination) worker holds in memory,
//! counted in entries and in bytes.
//!
//! The reader reserves room before each read, and a job before it fetches a
//! parked entry again; every entry in memory carries a [`Charge`] that gives
//! its share back when dropped, however the entry leaves (delivered, parked,
//! put into backoff, or abandoned at shutdown). A read reserves room for as
//! many entries as fit at the size of the largest entry seen recently; an
//! entry larger than its reservation is charged anyway (it is already in
//! memory), so the budget is exceeded only by a read whose entries are
//! larger than any of the last few reads, and then only until they leave.
//! A worker's first read takes one entry, to learn the size.
//! When nothing is held, one entry may be reserved whatever its size, so an
//! event larger than the whole budget is still delivered, alone.
//!
//! A read holds its reservation while it blocks on an idle stream, so it
//! takes at most half of what is free: a job fetching a parked entry for
//! its next attempt never waits for a read to time out. It also takes at
//! most an eighth of the byte limit ([`READ_PARTS`]), because a reply is
//! briefly in memory more than once while it is parsed.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// One read reserves at most this fraction of the byte limit. While a reply
/// is parsed it is in memory two or three times over (the connection's
/// buffer, the parsed reply, the entries), and only the entries are
/// charged; a small read keeps that passing excess small beside the budget.
const READ_PARTS: usize = 8;

/// A number of entries and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub entries: usize,
    pub bytes: usize,
}

/// The memory limits of one worker.
pub struct Budget {
    limit: Amount,
    state: Mutex<State>,
    freed: Notify,
}

struct State {
    held: Amount,
    /// The size a read expects per entry: the largest entry of the last
    /// read, or a quarter of the previous estimate when that is larger, so
    /// one big entry keeps the next reads small; `None` before the first
    /// entry was read, when a read takes one entry to learn the size.
    estimate: Option<usize>,
}

impl Budget {
    pub fn new(limit: Amount) -> Arc<Self> {
        Arc::new(Self {
            limit,
            state: Mutex::new(State {
                held: Amount::default(),
                estimate: None,
            }),
            freed: Notify::new(),
        })
    }

    /// What is held now.
    #[cfg(test)]
    pub fn held(&self) -> Amount {
        self.lock().held
    }

    /// For a read: waits until half of what is free holds at least one
    /// entry of the expected size (or nothing is held at all), then
    /// reserves room for as many entries as that half holds, up to `most`.
    pub async fn reserve_for_read(self: &Arc<Self>, most: usize) -> Charge {
        self.reserve(most.max(1), 2, self.limit.bytes / READ_PARTS)
            .await
    }

    /// For one entry fetched again: waits until it fits (or nothing is held).
    pub async fn reserve_one(self: &Arc<Self>) -> Charge {
        self.reserve(1, 1, usize::MAX).await
    }

    /// Reserves up to `most` entries out of `1 / share` of what is free,
    /// and at most `max_bytes`.
    async fn reserve(self: &Arc<Self>, most: usize, share: usize, max_bytes: usize) -> Charge {
        loop {
            // Registered before the check, so a release in between wakes us.
            let freed = self.freed.notified();
            if let Some(amount) = self.try_reserve(most, share, max_bytes) {
                return Charge {
                    budget: self.clone(),
                    amount,
                };
            }
            freed.await;
        }
    }

    fn try_reserve(&self, most: usize, share: usize, max_bytes: usize) -> Option<Amount> {
        let mut state = self.lock();
        let free_entries = self.limit.entries.saturating_sub(state.held.entries) / share;
        let free_bytes = (self.limit.bytes.saturating_sub(state.held.bytes) / share).min(max_bytes);
        let (most, estimate) = match state.estimate {
            Some(estimate) => (most, estimate),
            // Nothing read yet: one entry, with room for whatever its size.
            None => (1, free_bytes.max(1)),
        };
        let fitting = most.min(free_entries).min(free_bytes / estimate);
        let entries = match fitting {
            0 if state.held.entries == 0 => 1,
            0 => return None,
            n => n,
        };
        let amount = Amount {
            entries,
            bytes: entries * estimate,
        };
        state.held.entries += amount.entries;
        state.held.bytes += amount.bytes;
        Some(amount)
    }

    /// Records the largest entry of a read, for the next reservations.
    pub fn observe(&self, largest_entry: usize) {
        let mut state = self.lock();
        let previous = state.estimate.unwrap_or(0);
        state.estimate = Some(largest_entry.max(previous / 4).max(1));
    }

    fn charge_more(&self, amount: Amount) {
        let mut state = self.lock();
        state.held.entries += amount.entries;
        state.held.bytes += amount.bytes;
    }

    fn release(&self, amount: Amount) {
        if amount == Amount::default() {
            return;
        }
        let mut state = self.lock();
        state.held.entries -= amount.entries;
        state.held.bytes -= amount.bytes;
        drop(state);
        self.freed.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two counters, consistent after every statement.
        protocol::sync::lock(&self.state)
    }
}

/// A share of a [`Budget`], given back when dropped.
pub struct Charge {
    budget: Arc<Budget>,
    amount: Amount,
}

impl Charge {
    /// Entries this charge has room for.
    pub fn entries(&self) -> usize {
        self.amount.entries
    }

    /// Splits off the charge of one entry of `bytes`. What the reservation
    /// lacks is charged on top: the entry is in memory already.
    pub fn take(&mut self, bytes: usize) -> Charge {
        let covered = Amount {
            entries: self.amount.entries.min(1),
            bytes: self.amount.bytes.min(bytes),
        };
        self.amount.entries -= covered.entries;
        self.amount.bytes -= covered.bytes;
        self.budget.charge_more(Amount {
            entries: 1 - covered.entries,
            bytes: bytes - covered.bytes,
        });
        Charge {
            budget: self.budget.clone(),
            amount: Amount { entries: 1, bytes },
        }
    }
}

impl Charge {
    /// Adds `bytes` held with this charge's entry (its request body while
    /// an attempt is made), given back with it.
    pub fn grow(&mut self, bytes: usize) {
        let more = Amount { entries: 0, bytes };
        self.budget.charge_more(more);
        self.amount.bytes += bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.amount);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn amount(entries: usize, bytes: usize) -> Amount {
        Amount { entries, bytes }
    }

    /// A budget whose reads expect entries of `estimate` bytes.
    fn budget(entries: usize, bytes: usize, estimate: usize) -> Arc<Budget> {
        let budget = Budget::new(amount(entries, bytes));
        budget.observe(estimate);
        budget
    }

    #[tokio::test]
    async fn the_first_read_takes_one_entry_to_learn_their_size() {
        let budget = Budget::new(amount(100, 8000));
        let mut first = budget.reserve_for_read(50).await;
        assert_eq!(first.entries(), 1);
        drop(first.take(10));
        drop(first);
        budget.observe(10);
        assert_eq!(budget.reserve_for_read(50).await.entries(), 50);
    }

    #[tokio::test]
    async fn a_read_reserves_half_of_what_is_free_at_the_expected_size() {
        let budget = budget(100, 8000, 100);
        let _held = budget.reserve_one().await.take(7000);
        let reservation = budget.reserve_for_read(50).await;
        assert_eq!(
            reservation.entries(),
            5,
            "half of 1000 free bytes at 100 per entry"
        );
        let by_entries = self::budget(8, 1000, 10).reserve_for_read(50).await;
        assert_eq!(by_entries.entries(), 4, "the entry window binds first");
        let by_most = self::budget(1000, 1000, 1).reserve_for_read(50).await;
        assert_eq!(by_most.entries(), 50);
    }

    #[tokio::test]
    async fn a_read_reserves_at_most_an_eighth_of_the_byte_limit() {
        let budget = budget(100, 8000, 100);
        assert_eq!(
            budget.reserve_for_read(100).await.entries(),
            10,
            "1000 bytes at 100 per entry, though 4000 are half of what is free"
        );
        let large = self::budget(100, 8000, 5000);
        let alone = large.reserve_for_read(100).await;
        assert_eq!(
            alone.entries(),
            1,
            "nothing held: one entry whatever its size"
        );
        let next =
            tokio::time::timeout(Duration::from_millis(50), large.reserve_for_read(100)).await;
        assert!(next.is_err(), "one more would pass the eighth");
    }

    #[tokio::test]
    async fn a_fetch_finds_room_while_a_read_holds_its_reservation() {
        let budget = budget(100, 1000, 100);
        let _held = budget.reserve_one().await.take(200);
        let read = budget.reserve_for_read(100).await;
        assert_eq!(read.entries(), 1);
        let fetch = tokio::time::timeout(Duration::from_millis(50), budget.reserve_one()).await;
        assert_eq!(fetch.expect("room left").entries(), 1);
    }

    #[tokio::test]
    async fn taking_entries_moves_their_bytes_and_unused_room_is_given_back() {
        let budget = budget(100, 1000, 100);
        let mut reservation = budget.reserve_for_read(10).await;
        let small = reservation.take(40);
        drop(reservation);
        assert_eq!(budget.held(), amount(1, 40));
        drop(small);
        assert_eq!(budget.held(), Amount::default());
    }

    #[tokio::test]
    async fn an_entry_larger_than_its_reservation_is_charged_in_full() {
        let budget = budget(100, 1000, 100);
        let mut reservation = budget.reserve_one().await;
        let big = reservation.take(5000);
        drop(reservation);
        assert_eq!(budget.held(), amount(1, 5000));
        drop(big);
        assert_eq!(budget.held(), Amount::default());
    }

    #[tokio::test]
    async fn what_an_entry_grows_by_is_given_back_with_it() {
        let budget = budget(100, 1000, 100);
        let mut charge = budget.reserve_one().await.take(100);
        charge.grow(300);
        assert_eq!(budget.held(), amount(1, 400));
        drop(charge);
        assert_eq!(budget.held(), Amount::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_waits_until_an_entry_leaves() {
        let budget = budget(100, 1000, 500);
        let mut first = budget.reserve_one().await;
        let held = first.take(1000);
        drop(first);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve_one().await.entries() }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !waiting.is_finished(),
            "nothing fits while 1000 of 1000 bytes are held"
        );
        drop(held);
        let entries = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the release wakes the waiter")
            .expect("no panic");
        assert_eq!(entries, 1);
    }

    #[tokio::test]
    async fn an_entry_larger_than_the_whole_budget_goes_alone() {
        let budget = budget(100, 1000, 4000);
        let mut reservation = budget.reserve_for_read(10).await;
        assert_eq!(reservation.entries(), 1, "nothing else is held");
        let _huge = reservation.take(4000);
        drop(reservation);
        let second = tokio::time::timeout(Duration::from_millis(50), budget.reserve_one()).await;
        assert!(second.is_err(), "a second one waits until the first leaves");
    }

    #[tokio::test]
    async fn the_estimate_follows_the_largest_entry_and_decays_by_quarters() {
        let budget = budget(1000, 800_000, 10_000);
        assert_eq!(budget.reserve_for_read(1000).await.entries(), 10);
        budget.observe(100);
        assert_eq!(
            budget.reserve_for_read(1000).await.entries(),
            40,
            "a quarter: 2500"
        );
        budget.observe(20_000);
        assert_eq!(
            budget.reserve_for_read(1000).await.entries(),
            5,
            "a large entry at once"
        );
    }
}
