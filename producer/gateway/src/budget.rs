//! Bytes the gateway holds for callers, bounded per connection and for the whole gateway.
//!
//! Counting calls is not enough: a thousand calls of one megabyte each are a gigabyte. Each
//! call takes its request's bytes from its connection's [`Budget`] and from the gateway's before
//! it starts, and holds them until its answer is written (the result comes back into that
//! room); its result's bytes are counted too, from arrival until written. A request that does
//! not fit is answered `busy`; one larger than a whole budget, `too_large`. Results are counted without being refused (the task already
//! ran), so they only make the next requests wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A number of bytes that may be held at once.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// The limit, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held right now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the limit.
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Takes `bytes` even past the limit.
    fn force(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Which budget a request did not fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spent {
    /// The request alone is larger than a whole budget, named by its setting: it would never
    /// fit, so waiting does not help (`too_large`, not `busy`).
    Exceeds {
        /// The request's bytes.
        bytes: usize,
        /// The budget's limit.
        limit: usize,
        /// The setting that sets it.
        setting: &'static str,
    },
    /// The connection's (`max_in_flight_bytes`), of this many bytes.
    Connection(usize),
    /// The gateway's (`max_gateway_in_flight_bytes`), of this many bytes.
    Gateway(usize),
}

/// Bytes taken from a connection's budget and the gateway's, given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    connection: Arc<Budget>,
    gateway: Arc<Budget>,
    bytes: usize,
}

impl Held {
    /// Takes `bytes` from both budgets, or from neither.
    ///
    /// # Errors
    /// [`Spent`] names the budget that has no room.
    pub(crate) fn take(
        connection: &Arc<Budget>,
        gateway: &Arc<Budget>,
        bytes: usize,
    ) -> Result<Self, Spent> {
        for (budget, setting) in [
            (connection, "max_in_flight_bytes"),
            (gateway, "max_gateway_in_flight_bytes"),
        ] {
            if bytes > budget.limit() {
                return Err(Spent::Exceeds {
                    bytes,
                    limit: budget.limit(),
                    setting,
                });
            }
        }
        if !connection.try_take(bytes) {
            return Err(Spent::Connection(connection.limit()));
        }
        if !gateway.try_take(bytes) {
            connection.give_back(bytes);
            return Err(Spent::Gateway(gateway.limit()));
        }
        crate::metrics::held_bytes(signed(bytes));
        Ok(Self {
            connection: connection.clone(),
            gateway: gateway.clone(),
            bytes,
        })
    }

    /// Takes `bytes` more from the same budgets, held apart (a progress update on its way to
    /// the client), or `None` when they do not fit.
    pub(crate) fn try_more(&self, bytes: usize) -> Option<Self> {
        Self::take(&self.connection, &self.gateway, bytes).ok()
    }

    /// Counts `bytes` more (a result that arrived), without refusing them.
    pub(crate) fn add(&mut self, bytes: usize) {
        self.connection.force(bytes);
        self.gateway.force(bytes);
        crate::metrics::held_bytes(signed(bytes));
        self.bytes += bytes;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.connection.give_back(self.bytes);
        self.gateway.give_back(self.bytes);
        crate::metrics::held_bytes(-signed(self.bytes));
    }
}

/// `bytes` as a gauge delta (a count of bytes in memory always fits).
fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_taken_from_both_budgets_or_neither_and_given_back_on_drop() {
        let gateway = Budget::new(100);
        let (a, b) = (Budget::new(60), Budget::new(60));
        let first = Held::take(&a, &gateway, 60).expect("fits");
        assert_eq!(
            Held::take(&a, &gateway, 1).unwrap_err(),
            Spent::Connection(60)
        );
        let mut second = Held::take(&b, &gateway, 40).expect("fits");
        assert_eq!(
            Held::take(&b, &gateway, 1).unwrap_err(),
            Spent::Gateway(100)
        );
        assert_eq!(b.used(), 40, "a refusal takes nothing");
        second.add(30);
        assert_eq!(
            (b.used(), gateway.used()),
            (70, 130),
            "results are counted past the limit"
        );
        drop(first);
        drop(second);
        assert_eq!((a.used(), b.used(), gateway.used()), (0, 0, 0));
        assert!(Held::take(&a, &gateway, 60).is_ok());
    }

    #[test]
    fn a_request_larger_than_a_whole_budget_is_told_so_even_with_room_elsewhere() {
        let (connection, gateway) = (Budget::new(50), Budget::new(100));
        assert_eq!(
            Held::take(&connection, &gateway, 51).unwrap_err(),
            Spent::Exceeds {
                bytes: 51,
                limit: 50,
                setting: "max_in_flight_bytes"
            }
        );
        let wide = Budget::new(500);
        assert_eq!(
            Held::take(&wide, &gateway, 101).unwrap_err(),
            Spent::Exceeds {
                bytes: 101,
                limit: 100,
                setting: "max_gateway_in_flight_bytes"
            }
        );
        assert_eq!((connection.used(), wide.used(), gateway.used()), (0, 0, 0));
    }
}
