//! What an attempt came to, in two steps: what the destination answered
//! ([`AttemptOutcome`], which the circuit breaker reads), and what became
//! of the event once the retry policy has spoken ([`Fate`], which the
//! stats, the attempt's span and the delivery log read).

use std::time::Duration;

/// What one attempt's answer tells us to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// 2xx: done.
    Delivered { status: u16 },
    /// 408, 429, 5xx, timeout or connection error: try again later.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Any other answer: retrying cannot help.
    Dead { status: Option<u16>, error: String },
}

/// What became of the event after an attempt: delivered, to be tried
/// again, or given up on (dead-lettered). A [`AttemptOutcome::Retry`]
/// is [`Fate::Dead`] once the retry policy's attempts or horizon run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Delivered,
    Retry,
    Dead,
}

impl Fate {
    /// Its name in logs, spans and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Delivered => "delivered",
            Fate::Retry => "retry",
            Fate::Dead => "dead",
        }
    }
}
