//! Per-user order and completeness: the load generator numbers each user's
//! events 0, 1, 2, …; whoever receives them (the sink, or a scan of the
//! shard streams) feeds them here in arrival order.

use std::collections::HashMap;

/// What arrived, per user, compared with what each user sent.
#[derive(Debug, Default)]
pub struct OrderCheck {
    /// Per user: the sequence number expected next.
    next: HashMap<String, u64>,
    /// Events that arrived in order, each counted once.
    pub in_order: u64,
    /// Events arriving again after they had arrived (at-least-once redelivery).
    pub duplicates: u64,
    /// Events arriving before an earlier event of the same user.
    pub violations: u64,
}

/// The outcome of a run: it passes only if nothing is out of order or missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub expected: u64,
    pub in_order: u64,
    pub duplicates: u64,
    pub violations: u64,
    pub missing: u64,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations == 0 && self.missing == 0 && self.in_order == self.expected
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} in order, {} missing, {} order violations, {} duplicates",
            self.in_order, self.expected, self.missing, self.violations, self.duplicates
        )
    }
}

/// Several destinations' verdicts in one phrase: "all, in order" when each
/// passed, else each one's.
pub fn summary(verdicts: &[Verdict]) -> String {
    if verdicts.iter().all(Verdict::passed) {
        let duplicates: u64 = verdicts.iter().map(|v| v.duplicates).sum();
        format!("all, in order ({duplicates} duplicates)")
    } else {
        verdicts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl OrderCheck {
    pub fn observe(&mut self, user: &str, seq: u64) {
        let next = match self.next.get_mut(user) {
            Some(next) => next,
            None => self.next.entry(user.to_owned()).or_insert(0),
        };
        if seq == *next {
            *next += 1;
            self.in_order += 1;
        } else if seq < *next {
            self.duplicates += 1;
        } else {
            // Something of this user's is skipped: even if it arrives later,
            // it arrives after its successor.
            self.violations += 1;
            *next = seq + 1;
        }
    }

    /// Compares what arrived with `sent` (per user, how many events the
    /// gateway accepted).
    pub fn verdict(&self, sent: &HashMap<String, u64>) -> Verdict {
        let missing = sent
            .iter()
            .map(|(user, &count)| count.saturating_sub(self.next.get(user).copied().unwrap_or(0)))
            .sum();
        let unexpected = self
            .next
            .iter()
            .filter(|(user, &next)| next > sent.get(*user).copied().unwrap_or(0))
            .count() as u64;
        Verdict {
            expected: sent.values().sum(),
            in_order: self.in_order,
            duplicates: self.duplicates,
            // An event nobody sent is as wrong as one out of order.
            violations: self.violations + unexpected,
            missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect()
    }

    #[test]
    fn in_order_and_complete_passes() {
        let mut check = OrderCheck::default();
        for (user, seq) in [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)] {
            check.observe(user, seq);
        }
        let verdict = check.verdict(&sent(&[("a", 3), ("b", 2)]));
        assert!(verdict.passed(), "{verdict}");
    }

    #[test]
    fn a_swap_is_a_violation() {
        let mut check = OrderCheck::default();
        for seq in [0, 2, 1] {
            check.observe("a", seq);
        }
        let verdict = check.verdict(&sent(&[("a", 3)]));
        assert_eq!(verdict.violations, 1);
        assert!(!verdict.passed());
    }

    #[test]
    fn a_lost_tail_is_missing() {
        let mut check = OrderCheck::default();
        check.observe("a", 0);
        let verdict = check.verdict(&sent(&[("a", 2), ("b", 1)]));
        assert_eq!(verdict.missing, 2);
        assert!(!verdict.passed());
    }

    #[test]
    fn redelivery_is_a_duplicate_not_a_failure() {
        let mut check = OrderCheck::default();
        for seq in [0, 1, 1, 2] {
            check.observe("a", seq);
        }
        let verdict = check.verdict(&sent(&[("a", 3)]));
        assert_eq!(verdict.duplicates, 1);
        assert!(verdict.passed(), "{verdict}");
    }

    #[test]
    fn events_nobody_sent_fail_the_run() {
        let mut check = OrderCheck::default();
        check.observe("a", 0);
        check.observe("ghost", 0);
        assert!(!check.verdict(&sent(&[("a", 1)])).passed());
    }
}
