//! Per-user order within one (shard, destination), and parking.
//!
//! Each user with work has one head (the event in flight, or waiting for
//! its next attempt), then entries queued in memory, then parked entries:
//! ids only, in id order, whose payloads stay in the shard stream (they are
//! pending in the consumer group, so nothing trims them) and are fetched
//! again when their turn comes. A user's entries are parked instead of
//! queued while its head is in backoff, while it already has
//! `allowance` entries queued, and while anything of it is parked (so
//! order holds: head < queued < parked). When the head goes into backoff,
//! its queued entries are parked too, so a blocked user holds no entry in
//! memory and cannot fill the window that every other user needs.
//!
//! Nothing here is persisted: the group's pending list is the durable
//! record. A new owner re-reads it in id order and rebuilds the same
//! queues (first entry per user = head, then queued, then parked).

use std::collections::{HashMap, VecDeque};

use protocol::StreamId;

use crate::destination::stats::ParkedCount;

/// What to do with an admitted entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<E> {
    /// The user had nothing in flight: start it now.
    Start(E),
    /// Waits in memory behind the user's earlier entries.
    Queued,
    /// Its id waits in order; the entry itself leaves memory.
    Parked(E),
}

/// What a user does after its head reached a terminal outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Successor<E> {
    /// Start this queued entry.
    Start(E),
    /// Fetch this parked entry and start it.
    Fetch(StreamId),
    /// Nothing left; the user is forgotten.
    Idle,
}

struct UserQueue<E> {
    /// The stream id of the entry in flight (or in backoff).
    head: StreamId,
    /// The head is waiting out a retry delay.
    blocked: bool,
    queued: VecDeque<(StreamId, E)>,
    parked: VecDeque<StreamId>,
}

/// The queues of every user with work in one worker.
pub struct UserQueues<E> {
    users: HashMap<String, UserQueue<E>>,
    allowance: usize,
    parked: ParkedCount,
}

impl<E> UserQueues<E> {
    /// `allowance`: most entries of one user queued in memory behind its head.
    pub fn new(allowance: usize) -> Self {
        Self {
            users: HashMap::new(),
            allowance,
            parked: ParkedCount::default(),
        }
    }

    pub fn parked(&self) -> ParkedCount {
        self.parked
    }

    /// Admits `user`'s next entry, read in stream order.
    pub fn admit(&mut self, user: &str, id: StreamId, entry: E) -> Admission<E> {
        let Some(queue) = self.users.get_mut(user) else {
            self.users.insert(
                user.to_owned(),
                UserQueue {
                    head: id,
                    blocked: false,
                    queued: VecDeque::new(),
                    parked: VecDeque::new(),
                },
            );
            return Admission::Start(entry);
        };
        if queue.blocked || !queue.parked.is_empty() || queue.queued.len() >= self.allowance {
            if queue.parked.is_empty() {
                self.parked.users += 1;
            }
            queue.parked.push_back(id);
            self.parked.events += 1;
            return Admission::Parked(entry);
        }
        queue.queued.push_back((id, entry));
        Admission::Queued
    }

    /// `user`'s head `head` went into backoff: its queued entries are parked
    /// (ahead of those parked already) and handed back to leave memory.
    /// Ignored when `head` is no longer the user's head.
    pub fn blocked(&mut self, user: &str, head: StreamId) -> Vec<E> {
        let Some(queue) = self.users.get_mut(user).filter(|q| q.head == head) else {
            return Vec::new();
        };
        queue.blocked = true;
        if queue.queued.is_empty() {
            return Vec::new();
        }
        if queue.parked.is_empty() {
            self.parked.users += 1;
        }
        self.parked.events += queue.queued.len();
        let mut evicted = Vec::with_capacity(queue.queued.len());
        while let Some((id, entry)) = queue.queued.pop_back() {
            queue.parked.push_front(id);
            evicted.push(entry);
        }
        evicted
    }

    /// `user`'s head reached a terminal outcome (or was abandoned): what
    /// comes next for that user.
    pub fn finished(&mut self, user: &str) -> Successor<E> {
        let Some(queue) = self.users.get_mut(user) else {
            return Successor::Idle;
        };
        queue.blocked = false;
        if let Some((id, entry)) = queue.queued.pop_front() {
            queue.head = id;
            return Successor::Start(entry);
        }
        if let Some(id) = queue.parked.pop_front() {
            queue.head = id;
            self.parked.events -= 1;
            if queue.parked.is_empty() {
                self.parked.users -= 1;
            }
            return Successor::Fetch(id);
        }
        self.users.remove(user);
        Successor::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> StreamId {
        StreamId { ms: n, seq: 0 }
    }

    fn parked(users: usize, events: usize) -> ParkedCount {
        ParkedCount { users, events }
    }

    /// Admits entry `n` of `user`; the entry is its number.
    fn admit(queues: &mut UserQueues<u64>, user: &str, n: u64) -> Admission<u64> {
        queues.admit(user, id(n), n)
    }

    #[test]
    fn a_user_runs_one_entry_at_a_time_in_order() {
        let mut queues = UserQueues::new(10);
        assert_eq!(admit(&mut queues, "u", 1), Admission::Start(1));
        assert_eq!(admit(&mut queues, "u", 2), Admission::Queued);
        assert_eq!(
            admit(&mut queues, "v", 3),
            Admission::Start(3),
            "others do not wait"
        );
        assert_eq!(admit(&mut queues, "u", 4), Admission::Queued);
        assert_eq!(queues.finished("u"), Successor::Start(2));
        assert_eq!(queues.finished("u"), Successor::Start(4));
        assert_eq!(queues.finished("u"), Successor::Idle);
        assert_eq!(
            admit(&mut queues, "u", 5),
            Admission::Start(5),
            "forgotten, then new"
        );
    }

    #[test]
    fn entries_beyond_the_allowance_are_parked_and_come_back_in_order() {
        let mut queues = UserQueues::new(2);
        assert_eq!(admit(&mut queues, "hot", 1), Admission::Start(1));
        assert_eq!(admit(&mut queues, "hot", 2), Admission::Queued);
        assert_eq!(admit(&mut queues, "hot", 3), Admission::Queued);
        assert_eq!(admit(&mut queues, "hot", 4), Admission::Parked(4));
        assert_eq!(admit(&mut queues, "hot", 5), Admission::Parked(5));
        assert_eq!(queues.parked(), parked(1, 2));
        assert_eq!(queues.finished("hot"), Successor::Start(2));
        assert_eq!(
            admit(&mut queues, "hot", 6),
            Admission::Parked(6),
            "room in the queue, but earlier entries are parked"
        );
        assert_eq!(queues.finished("hot"), Successor::Start(3));
        assert_eq!(queues.finished("hot"), Successor::Fetch(id(4)));
        assert_eq!(queues.finished("hot"), Successor::Fetch(id(5)));
        assert_eq!(queues.finished("hot"), Successor::Fetch(id(6)));
        assert_eq!(queues.parked(), ParkedCount::default());
        assert_eq!(queues.finished("hot"), Successor::Idle);
    }

    #[test]
    fn a_blocked_user_holds_nothing_in_memory_and_keeps_its_order() {
        let mut queues = UserQueues::new(10);
        assert_eq!(admit(&mut queues, "u", 1), Admission::Start(1));
        assert_eq!(admit(&mut queues, "u", 2), Admission::Queued);
        assert_eq!(admit(&mut queues, "u", 3), Admission::Queued);
        assert_eq!(queues.blocked("u", id(1)), vec![3, 2], "both leave memory");
        assert_eq!(queues.parked(), parked(1, 2));
        assert_eq!(
            admit(&mut queues, "u", 4),
            Admission::Parked(4),
            "still blocked"
        );
        assert_eq!(queues.finished("u"), Successor::Fetch(id(2)));
        assert_eq!(queues.finished("u"), Successor::Fetch(id(3)));
        assert_eq!(queues.finished("u"), Successor::Fetch(id(4)));
        assert_eq!(queues.finished("u"), Successor::Idle);
    }

    #[test]
    fn a_block_reported_for_an_earlier_head_changes_nothing() {
        let mut queues = UserQueues::new(10);
        assert_eq!(admit(&mut queues, "u", 1), Admission::Start(1));
        assert_eq!(queues.finished("u"), Successor::Idle);
        assert_eq!(admit(&mut queues, "u", 2), Admission::Start(2));
        assert_eq!(admit(&mut queues, "u", 3), Admission::Queued);
        assert!(queues.blocked("u", id(1)).is_empty(), "entry 1 is done");
        assert_eq!(admit(&mut queues, "u", 4), Admission::Queued, "not blocked");
        assert!(queues.blocked("gone", id(9)).is_empty());
    }

    #[test]
    fn the_block_ends_with_its_head() {
        let mut queues = UserQueues::new(10);
        assert_eq!(admit(&mut queues, "u", 1), Admission::Start(1));
        assert!(queues.blocked("u", id(1)).is_empty());
        assert_eq!(admit(&mut queues, "u", 2), Admission::Parked(2));
        assert_eq!(queues.finished("u"), Successor::Fetch(id(2)));
        assert_eq!(
            admit(&mut queues, "u", 3),
            Admission::Queued,
            "the new head is not in backoff and nothing is parked"
        );
    }

    #[test]
    fn counts_cover_every_parked_user() {
        let mut queues = UserQueues::new(0);
        for user in ["a", "b"] {
            assert_eq!(admit(&mut queues, user, 1), Admission::Start(1));
            assert_eq!(admit(&mut queues, user, 2), Admission::Parked(2));
        }
        assert_eq!(queues.parked(), parked(2, 2));
        assert_eq!(queues.finished("a"), Successor::Fetch(id(2)));
        assert_eq!(queues.parked(), parked(1, 1));
    }
}
