//! A destination's delivery history by minute: attempts that delivered or
//! failed, dead letters, and attempt latencies in fixed buckets. Each
//! router tallies its own minutes here; [`crate::admin::history`] adds them
//! into Redis, where every router's minutes meet and outlive restarts
//! (docs/decisions/0006-console-history.md). Pure: no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

/// Upper bounds (ms) of the latency buckets; one more bucket takes the rest.
pub const LATENCY_BOUNDS_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Buckets per minute: one per bound, and one above the last.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// What happened in one minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Attempts that delivered.
    pub delivered: u64,
    /// Attempts that failed (retried or dead-lettered after them).
    pub failed: u64,
    /// Events dead-lettered (after attempts, or expired).
    pub dead_lettered: u64,
    /// Attempts by latency bucket.
    pub latency: [u64; LATENCY_BUCKETS],
}

/// A Unix minute.
pub type Minute = u64;

/// Tallies by minute.
pub type Minutes = BTreeMap<Minute, Tally>;

/// The minute of a Unix time in ms.
pub fn minute_of(unix_ms: u64) -> Minute {
    unix_ms / 60_000
}

impl Tally {
    pub fn attempt(&mut self, delivered: bool, latency: Duration) {
        if delivered {
            self.delivered += 1;
        } else {
            self.failed += 1;
        }
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency[bucket] += 1;
    }

    pub fn add(&mut self, other: &Tally) {
        self.delivered += other.delivered;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        for (mine, theirs) in self.latency.iter_mut().zip(other.latency) {
            *mine += theirs;
        }
    }

    pub fn attempts(&self) -> u64 {
        self.delivered + self.failed
    }

    /// Its counts as hash fields of its minute (`<minute>:d`, `:f`, `:x`,
    /// `:l<bucket>`), leaving out zeros.
    pub fn fields(&self, minute: Minute) -> Vec<(String, u64)> {
        let named = [
            ("d", self.delivered),
            ("f", self.failed),
            ("x", self.dead_lettered),
        ];
        let buckets = self.latency.iter().enumerate();
        named
            .into_iter()
            .map(|(name, count)| (format!("{minute}:{name}"), count))
            .chain(buckets.map(|(i, count)| (format!("{minute}:l{i}"), *count)))
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// Adds one hash field written by [`Tally::fields`]; false when the
    /// field is not one.
    pub fn add_field(minutes: &mut Minutes, field: &str, count: u64) -> bool {
        let Some((minute, name)) = field.split_once(':') else {
            return false;
        };
        let Ok(minute) = minute.parse::<Minute>() else {
            return false;
        };
        let bucket = name.strip_prefix('l').and_then(|i| i.parse::<usize>().ok());
        if !matches!(name, "d" | "f" | "x") && bucket.is_none_or(|i| i >= LATENCY_BUCKETS) {
            return false;
        }
        let tally = minutes.entry(minute).or_default();
        match (name, bucket) {
            ("d", _) => tally.delivered += count,
            ("f", _) => tally.failed += count,
            ("x", _) => tally.dead_lettered += count,
            (_, Some(i)) => tally.latency[i] += count,
            (_, None) => unreachable!("checked above"),
        }
        true
    }

    /// The latency below which `quantile` (0 to 1) of the attempts fell, as
    /// its bucket's upper bound in ms; `None` without attempts or above the
    /// last bound.
    pub fn latency_quantile_ms(&self, quantile: f64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return LATENCY_BOUNDS_MS.get(i).copied();
            }
        }
        None
    }

    /// Delivered of attempted, 0 to 1; `None` without attempts.
    pub fn success_rate(&self) -> Option<f64> {
        (self.attempts() > 0).then(|| self.delivered as f64 / self.attempts() as f64)
    }
}

/// Merges `from` into `into`, minute by minute.
pub fn merge(into: &mut Minutes, from: Minutes) {
    for (minute, tally) in from {
        into.entry(minute).or_default().add(&tally);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_into_the_same_tally() {
        let mut tally = Tally::default();
        tally.attempt(true, Duration::from_millis(3));
        tally.attempt(false, Duration::from_millis(700));
        tally.attempt(true, Duration::from_secs(60));
        tally.dead_lettered = 2;
        let mut minutes = Minutes::new();
        for (field, count) in tally.fields(42) {
            assert!(Tally::add_field(&mut minutes, &field, count), "{field}");
        }
        assert_eq!(minutes.get(&42), Some(&tally));
        assert!(!Tally::add_field(&mut minutes, "42:l99", 1));
        assert!(!Tally::add_field(&mut minutes, "x:d", 1));
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let mut tally = Tally::default();
        for _ in 0..98 {
            tally.attempt(true, Duration::from_millis(20));
        }
        tally.attempt(true, Duration::from_millis(400));
        tally.attempt(false, Duration::from_millis(400));
        assert_eq!(tally.latency_quantile_ms(0.5), Some(25));
        assert_eq!(tally.latency_quantile_ms(0.99), Some(500));
        assert_eq!(tally.success_rate(), Some(0.99));
        assert_eq!(Tally::default().latency_quantile_ms(0.5), None);
    }
}
