//! Retry policy: how many attempts a task gets, how long to wait between them, how long one
//! attempt may run.
//!
//! A worker combines three layers, most specific first: the caller's per-task headers
//! ([`headers::MAX_ATTEMPTS`], [`headers::BACKOFF`], [`headers::TIME_LIMIT`]), the policy the task
//! type was registered with, and the worker's defaults.

use std::time::Duration;

use lapin::types::FieldTable;

use crate::protocol::{self, headers};

/// How a task is retried and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Attempts in all, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Delay before attempt n+1 is `backoff[n-1]`; past the end the last delay repeats.
    /// Each distinct delay is a delay queue of its own (`<queue>.retry.<delay>`).
    pub backoff: Vec<Duration>,
    /// How long one attempt may run.
    pub time_limit: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(10)],
            time_limit: Duration::from_secs(300),
        }
    }
}

impl Policy {
    /// The delay before the attempt after `attempt` (1-based); zero when the schedule is empty.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(index)
            .or_else(|| self.backoff.last())
            .copied()
            .unwrap_or_default()
    }

    /// This policy with the caller's overrides from `h` applied (invalid values are ignored).
    pub fn overridden_by(&self, h: Option<&FieldTable>) -> Self {
        let mut policy = self.clone();
        if let Some(n) =
            protocol::header_int(h, headers::MAX_ATTEMPTS).and_then(|n| u32::try_from(n).ok())
            && n >= 1
        {
            policy.max_attempts = n;
        }
        if let Some(backoff) =
            protocol::header_str(h, headers::BACKOFF).and_then(|s| parse_backoff(&s))
        {
            policy.backoff = backoff;
        }
        if let Some(ms) =
            protocol::header_int(h, headers::TIME_LIMIT).and_then(|n| u64::try_from(n).ok())
            && ms >= 1
        {
            policy.time_limit = Duration::from_millis(ms);
        }
        policy
    }

    /// Writes this policy's retry part as per-task headers (what a caller sends).
    pub fn write_headers(&self, h: &mut FieldTable) {
        protocol::set_header_int(h, headers::MAX_ATTEMPTS, i64::from(self.max_attempts));
        protocol::set_header_str(h, headers::BACKOFF, &format_backoff(&self.backoff));
        protocol::set_header_int(
            h,
            headers::TIME_LIMIT,
            i64::try_from(self.time_limit.as_millis()).unwrap_or(i64::MAX),
        );
    }
}

/// `"1000,10000"` (milliseconds) to delays; `None` if any part is not a number of
/// milliseconds between 1 and 24 hours.
pub fn parse_backoff(text: &str) -> Option<Vec<Duration>> {
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;
    text.split(',')
        .map(|part| {
            part.trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| (1..=DAY_MS).contains(ms))
        })
        .map(|ms| ms.map(Duration::from_millis))
        .collect()
}

/// Delays as the comma-separated milliseconds of [`headers::BACKOFF`].
pub fn format_backoff(backoff: &[Duration]) -> String {
    backoff
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_schedule_then_repeat_the_last() {
        let p = Policy {
            backoff: vec![Duration::from_millis(100), Duration::from_millis(300)],
            ..Policy::default()
        };
        assert_eq!(p.delay_after(1), Duration::from_millis(100));
        assert_eq!(p.delay_after(2), Duration::from_millis(300));
        assert_eq!(p.delay_after(7), Duration::from_millis(300));
        assert_eq!(
            Policy {
                backoff: vec![],
                ..Policy::default()
            }
            .delay_after(1),
            Duration::ZERO
        );
    }

    #[test]
    fn caller_headers_override_and_garbage_is_ignored() {
        let base = Policy::default();
        let mut h = FieldTable::default();
        protocol::set_header_int(&mut h, headers::MAX_ATTEMPTS, 5);
        protocol::set_header_str(&mut h, headers::BACKOFF, "200, 400");
        protocol::set_header_int(&mut h, headers::TIME_LIMIT, 1500);
        let p = base.overridden_by(Some(&h));
        assert_eq!(p.max_attempts, 5);
        assert_eq!(
            p.backoff,
            vec![Duration::from_millis(200), Duration::from_millis(400)]
        );
        assert_eq!(p.time_limit, Duration::from_millis(1500));

        let mut bad = FieldTable::default();
        protocol::set_header_int(&mut bad, headers::MAX_ATTEMPTS, 0);
        protocol::set_header_str(&mut bad, headers::BACKOFF, "soon");
        protocol::set_header_int(&mut bad, headers::TIME_LIMIT, -3);
        assert_eq!(base.overridden_by(Some(&bad)), base);
    }

    #[test]
    fn headers_round_trip() {
        let p = Policy {
            max_attempts: 4,
            backoff: vec![Duration::from_millis(250)],
            time_limit: Duration::from_secs(2),
        };
        let mut h = FieldTable::default();
        p.write_headers(&mut h);
        assert_eq!(Policy::default().overridden_by(Some(&h)), p);
    }
}
