//! How many pushes may be in flight at once, per budget key.
//!
//! Flow: the shipper asks [`Budget::has_room`] before it starts a push for a key, calls
//! [`Budget::start`] when it does and [`Budget::finish`] when the push's answer is in.
//! The key is the push's tenant (one key without `tenantFrom`), so a tenant Loki
//! throttles cannot hold the others' pushes.
//!
//! Guarantees: at most [`push_limit`] pushes per key, and no new one while a push of
//! that key is being retried (a 429 storm meets one push, not several). Bytes are bounded elsewhere: every
//! entry in a batch or a push is registered in the ledger until acknowledged, and the
//! tailer stops reading above `maxBufferedBytes`, so more pushes in flight never means
//! more memory than that limit (plus the compressed bodies, smaller than their lines).
//!
//! Caveats: two pushes of one stream may reach Loki in either order. Loki accepts entries
//! out of order within its window (`unordered_writes`, on by default since 2.4, an hour
//! by default); VictoriaLogs orders by timestamp itself. Positions are not affected: the
//! ledger commits a file's offset only past entries whose predecessors are all answered.

use std::collections::HashMap;
use std::hash::Hash;

/// Never more than this many pushes per key, however large the buffer.
pub const MAX_PUSHES_IN_FLIGHT: usize = 8;

/// Pushes per key: as many full batches as the buffer holds (a batch beyond that could
/// not fill while the tailer waits for room), at least one, at most
/// [`MAX_PUSHES_IN_FLIGHT`].
pub fn push_limit(max_buffered_bytes: u64, batch_bytes: u64) -> usize {
    let batches = max_buffered_bytes.div_ceil(batch_bytes.max(1));
    usize::try_from(batches)
        .unwrap_or(MAX_PUSHES_IN_FLIGHT)
        .clamp(1, MAX_PUSHES_IN_FLIGHT)
}

/// Pushes in flight, by key.
#[derive(Debug)]
pub struct Budget<K> {
    limit: usize,
    in_flight: HashMap<K, usize>,
}

impl<K: Eq + Hash + Clone> Budget<K> {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            in_flight: HashMap::new(),
        }
    }

    /// Whether another push for `key` may start. While one of its pushes is being
    /// retried (Loki throttling or failing), only one at a time: the others wait rather
    /// than meet the same answer.
    pub fn has_room(&self, key: &K, retrying: bool) -> bool {
        let limit = if retrying { 1 } else { self.limit };
        self.in_flight.get(key).copied().unwrap_or(0) < limit
    }

    pub fn start(&mut self, key: K) {
        *self.in_flight.entry(key).or_insert(0) += 1;
    }

    pub fn finish(&mut self, key: &K) {
        if let Some(n) = self.in_flight.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(key);
            }
        }
    }

    /// Pushes in flight for `key`.
    pub fn in_flight(&self, key: &K) -> usize {
        self.in_flight.get(key).copied().unwrap_or(0)
    }

    /// Pushes in flight over all keys.
    pub fn total(&self) -> usize {
        self.in_flight.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_the_batches_the_buffer_holds() {
        const MIB: u64 = 1024 * 1024;
        for (buffered, batch, want) in [
            (4 * MIB, MIB, 4),         // the defaults
            (4 * MIB, 3 * MIB / 2, 3), // a partial batch still fits
            (MIB, 4 * MIB, 1),         // batches larger than the buffer: one at a time
            (64 * MIB, MIB, 8),        // capped
            (4 * MIB, 0, 8),           // a zero batch size does not divide by zero
            (0, MIB, 1),               // at least one
        ] {
            assert_eq!(push_limit(buffered, batch), want, "{buffered} / {batch}");
        }
    }

    #[test]
    fn budgets_are_per_key() {
        let mut budget = Budget::new(2);
        let (a, b) = ("tenant-a".to_string(), "tenant-b".to_string());
        assert!(
            budget.has_room(&a, true),
            "nothing in flight: one may start"
        );
        budget.start(a.clone());
        assert!(budget.has_room(&a, false));
        assert!(!budget.has_room(&a, true), "one is being retried: no other");
        budget.start(a.clone());
        assert!(!budget.has_room(&a, false), "a is at its limit");
        assert!(budget.has_room(&b, false), "b's budget is its own");
        budget.start(b.clone());
        assert_eq!(budget.total(), 3);
        budget.finish(&a);
        assert!(budget.has_room(&a, false));
        budget.finish(&a);
        budget.finish(&a);
        assert_eq!(
            budget.total(),
            1,
            "finishing more than started does not underflow"
        );
    }
}
