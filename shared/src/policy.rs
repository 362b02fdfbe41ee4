//! Retry policy: how many attempts a task gets, how long to wait between them, how long one
//! attempt may run.
//!
//! A worker combines three layers, most specific first: the caller's per-task headers
//! ([`PolicyOverrides`], read by the envelope), the policy the task type was registered with,
//! and the worker's defaults.

use std::time::Duration;

use crate::envelope::PolicyOverrides;

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

    /// This policy with a caller's per-task overrides applied (read from the task's headers by
    /// [`PolicyOverrides::read`]; invalid values are already left out there).
    ///
    /// A caller's delays are untrusted: each one is rounded up to [`BACKOFF_LADDER`], so that
    /// publishers cannot make a worker declare a delay queue per distinct value they send.
    pub fn overridden_by(&self, overrides: &PolicyOverrides) -> Self {
        let mut policy = self.clone();
        if let Some(n) = overrides.max_attempts {
            policy.max_attempts = n;
        }
        if let Some(backoff) = &overrides.backoff {
            policy.backoff = backoff.iter().map(|d| round_up_to_ladder(*d)).collect();
        }
        if let Some(limit) = overrides.time_limit {
            policy.time_limit = limit;
        }
        policy
    }
}

/// The delays a per-task backoff header may ask for; any other delay is rounded up to the next
/// one (and past the last, down to it). A worker's own policy (flags, `register_with`) is not
/// rounded: it is configuration, not input. 18 rungs, so a work queue has at most 18 delay
/// queues from headers, plus those of its workers' own policies.
pub const BACKOFF_LADDER: [Duration; 18] = [
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(2 * 60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(60 * 60),
    Duration::from_secs(2 * 60 * 60),
    Duration::from_secs(6 * 60 * 60),
    Duration::from_secs(12 * 60 * 60),
    Duration::from_secs(24 * 60 * 60),
];

/// The smallest rung of [`BACKOFF_LADDER`] at least as long as `delay` (the last rung for a
/// longer one): a retry never starts earlier than the caller asked.
pub fn round_up_to_ladder(delay: Duration) -> Duration {
    BACKOFF_LADDER
        .iter()
        .copied()
        .find(|rung| *rung >= delay)
        .unwrap_or(BACKOFF_LADDER[BACKOFF_LADDER.len() - 1])
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

/// Delays as the comma-separated milliseconds of the `x-warren-backoff` header.
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
    fn caller_overrides_apply_and_garbage_is_ignored() {
        use crate::envelope::{headers, set_header_int, set_header_str};
        use lapin::types::FieldTable;
        let base = Policy::default();
        let mut h = FieldTable::default();
        set_header_int(&mut h, headers::MAX_ATTEMPTS, 5);
        set_header_str(&mut h, headers::BACKOFF, "250, 500");
        set_header_int(&mut h, headers::TIME_LIMIT, 1500);
        let p = base.overridden_by(&PolicyOverrides::read(Some(&h)));
        assert_eq!(p.max_attempts, 5);
        assert_eq!(
            p.backoff,
            vec![Duration::from_millis(250), Duration::from_millis(500)]
        );
        assert_eq!(p.time_limit, Duration::from_millis(1500));

        let mut bad = FieldTable::default();
        set_header_int(&mut bad, headers::MAX_ATTEMPTS, 0);
        set_header_str(&mut bad, headers::BACKOFF, "soon");
        set_header_int(&mut bad, headers::TIME_LIMIT, -3);
        assert_eq!(base.overridden_by(&PolicyOverrides::read(Some(&bad))), base);
    }

    #[test]
    fn caller_delays_round_up_to_the_ladder() {
        let ms = Duration::from_millis;
        assert_eq!(round_up_to_ladder(ms(1)), ms(100));
        assert_eq!(round_up_to_ladder(ms(100)), ms(100));
        assert_eq!(round_up_to_ladder(ms(101)), ms(250));
        assert_eq!(round_up_to_ladder(ms(1001)), ms(2000));
        assert_eq!(round_up_to_ladder(ms(86_400_000)), ms(86_400_000));
        assert_eq!(round_up_to_ladder(Duration::MAX), ms(86_400_000));
        // However many distinct delays are asked for, they land on the ladder's rungs.
        let rungs: std::collections::BTreeSet<Duration> = (1..=200_000u64)
            .step_by(7)
            .map(|n| round_up_to_ladder(ms(n * 431)))
            .collect();
        assert!(rungs.len() <= BACKOFF_LADDER.len());
        assert!(rungs.iter().all(|r| BACKOFF_LADDER.contains(r)));
        let overrides = PolicyOverrides {
            backoff: Some(vec![ms(300), ms(90_000)]),
            ..PolicyOverrides::default()
        };
        assert_eq!(
            Policy::default().overridden_by(&overrides).backoff,
            vec![ms(500), Duration::from_secs(120)]
        );
    }
}
