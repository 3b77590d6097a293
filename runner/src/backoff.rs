//! When to retry and when to give up: exponential backoff with jitter, which answers end a lease,
//! and small helpers for saying how long and why.

use std::time::Duration;

/// First delay after a failure.
const FIRST: Duration = Duration::from_millis(500);
/// Longest delay between two attempts.
const MAX: Duration = Duration::from_secs(30);

/// Delays that start at 0.5 s and double up to 30 s, each randomised to between half and all of
/// its nominal value so that many runners do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    nominal: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A backoff at its first step.
    pub fn new() -> Self {
        Self { nominal: FIRST }
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.nominal = FIRST;
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal;
        self.nominal = (self.nominal * 2).min(MAX);
        let half = nominal / 2;
        half + half.mul_f64(rand::random_range(0.0..=1.0))
    }
}

/// A duration as people write it: `450ms`, `1.3s`, `4s`, `2m 5s`, `1h 2m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        let rounded = (secs * 10.0).round() / 10.0;
        if rounded.fract() == 0.0 {
            return format!("{rounded:.0}s");
        }
        return format!("{rounded:.1}s");
    }
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        match s % 60 {
            0 => format!("{}m", s / 60),
            r => format!("{}m {}s", s / 60, r),
        }
    } else {
        match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h {}m", s / 3600, m),
        }
    }
}

/// Whether an answer to a per-job call means this runner no longer holds the job: `409` says the
/// lease was superseded; `401`, `403`, `404` and `410` say the lease or the job no longer exists.
pub fn lease_is_gone(e: &outpost_protocol::ClientError) -> bool {
    matches!(
        e.status().map(|s| s.as_u16()),
        Some(401 | 403 | 404 | 409 | 410)
    )
}

/// An error and its causes on one line, `outer: inner: innermost`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_thirty_seconds_with_jitter() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(250) && delays[0] <= FIRST);
        assert!(delays[1] >= Duration::from_millis(500) && delays[1] <= Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= MAX));
        assert!(delays[9] >= MAX / 2);
        b.reset();
        assert!(b.next_delay() <= FIRST);
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human(Duration::from_millis(450)), "450ms");
        assert_eq!(human(Duration::from_millis(1300)), "1.3s");
        assert_eq!(human(Duration::from_secs(4)), "4s");
        assert_eq!(human(Duration::from_secs(125)), "2m 5s");
        assert_eq!(human(Duration::from_secs(3720)), "1h 2m");
    }
}
