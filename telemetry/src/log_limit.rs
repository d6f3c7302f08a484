//! A log line that would repeat for every request during an outage (each
//! 503 while Redis is down), written at most once per interval with the
//! number of repeats it stands for. Metrics still count every one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one line through per interval.
pub struct EveryInterval {
    interval: Duration,
    state: Mutex<State>,
}

struct State {
    last_written: Option<Instant>,
    left_out: u64,
}

impl EveryInterval {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State {
                last_written: None,
                left_out: 0,
            }),
        }
    }

    /// `Some(left_out)` when the line is to be written now, with how many
    /// were left out since the last one; `None` when it is left out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        // Plain assignments only: consistent after a panic elsewhere.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .last_written
            .is_some_and(|at| now.duration_since(at) < self.interval)
        {
            state.left_out += 1;
            return None;
        }
        state.last_written = Some(now);
        Some(std::mem::take(&mut state.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let limit = EveryInterval::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(limit.admit_at(start), Some(0));
        assert_eq!(limit.admit_at(start + Duration::from_millis(10)), None);
        assert_eq!(limit.admit_at(start + Duration::from_millis(999)), None);
        assert_eq!(limit.admit_at(start + Duration::from_secs(1)), Some(2));
        assert_eq!(limit.admit_at(start + Duration::from_millis(1500)), None);
        assert_eq!(limit.admit_at(start + Duration::from_secs(5)), Some(1));
    }
}
