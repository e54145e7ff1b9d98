//! The `limit` stage: token buckets, one per stream, or one per value combination of
//! `byLabels` (shared by every stream with those values, e.g. every pod of one app).
//!
//! Guarantees: at most `maxKeys` keyed buckets exist; when a new key finds them all
//! taken, buckets that refilled to `burst` are forgotten first (a full bucket is the
//! same as a new one, so nothing changes for their keys); if none is full, the new key
//! shares one overflow bucket, and its drops are counted as
//! [`RATE_LIMITED_OVERFLOW_REASON`] so an undersized `maxKeys` shows in metrics.
//!
//! Caveats: keyed buckets are behind a mutex shared by the pipeline; the tailer is one
//! thread, so it is never contended.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::entry::LabelSet;

/// Drop reason of the `limit` stage in drop mode.
pub const RATE_LIMITED_REASON: &str = "rate_limited";
/// Drop reason of entries of keys beyond `maxKeys`, limited by the shared overflow bucket.
pub const RATE_LIMITED_OVERFLOW_REASON: &str = "rate_limited_overflow";

#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    tokens: f64,
    last_ns: i64,
}

/// What the bucket says of one entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Take {
    Pass,
    Drop,
    /// Pass, but reading this stream pauses this long (wait mode).
    Wait(Duration),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Rate {
    pub(super) rate: f64,
    pub(super) burst: f64,
    pub(super) drop: bool,
}

impl Rate {
    pub(super) fn full(&self, now_ns: i64) -> Bucket {
        Bucket {
            tokens: self.burst,
            last_ns: now_ns,
        }
    }

    fn refill(&self, bucket: &mut Bucket, now_ns: i64) {
        let elapsed_ns = now_ns.saturating_sub(bucket.last_ns).max(0);
        bucket.tokens = (bucket.tokens + elapsed_ns as f64 * self.rate / 1e9).min(self.burst);
        bucket.last_ns = bucket.last_ns.max(now_ns);
    }

    /// Take one token for an entry at `now_ns`.
    pub(super) fn take(&self, bucket: &mut Bucket, now_ns: i64) -> Take {
        self.refill(bucket, now_ns);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Take::Pass
        } else if self.drop {
            Take::Drop
        } else {
            let wait = Duration::from_secs_f64(((1.0 - bucket.tokens) / self.rate).max(0.0));
            bucket.tokens -= 1.0;
            Take::Wait(wait)
        }
    }
}

/// Buckets keyed by the values of `byLabels`.
#[derive(Debug)]
pub(super) struct Keyed {
    labels: Vec<String>,
    max_keys: usize,
    state: Mutex<KeyedState>,
}

#[derive(Debug, Default)]
struct KeyedState {
    buckets: HashMap<Vec<String>, Bucket>,
    overflow: Option<Bucket>,
}

impl Keyed {
    pub(super) fn new(labels: Vec<String>, max_keys: u32) -> Self {
        Self {
            labels,
            max_keys: max_keys.max(1) as usize,
            state: Mutex::new(KeyedState::default()),
        }
    }

    /// Take one token from the bucket of `labels`' key; the drop reason when it drops.
    pub(super) fn take(&self, rate: &Rate, labels: &LabelSet, now_ns: i64) -> (Take, &'static str) {
        let key: Vec<String> = self
            .labels
            .iter()
            .map(|name| labels.get(name).cloned().unwrap_or_default())
            .collect();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.buckets.contains_key(&key) && state.buckets.len() >= self.max_keys {
            state.buckets.retain(|_, b| {
                rate.refill(b, now_ns);
                b.tokens < rate.burst
            });
        }
        if let Some(bucket) = state.buckets.get_mut(&key) {
            return (rate.take(bucket, now_ns), RATE_LIMITED_REASON);
        }
        if state.buckets.len() < self.max_keys {
            let bucket = state.buckets.entry(key).or_insert(rate.full(now_ns));
            return (rate.take(bucket, now_ns), RATE_LIMITED_REASON);
        }
        let overflow = state.overflow.get_or_insert(rate.full(now_ns));
        (rate.take(overflow, now_ns), RATE_LIMITED_OVERFLOW_REASON)
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;

    fn labels(app: &str) -> LabelSet {
        Arc::new(BTreeMap::from([
            ("namespace".to_string(), "shop".to_string()),
            ("app".to_string(), app.to_string()),
            ("pod".to_string(), format!("{app}-1")),
        ]))
    }

    const DROP: Rate = Rate {
        rate: 1.0,
        burst: 2.0,
        drop: true,
    };

    #[test]
    fn keys_share_a_bucket_and_do_not_share_with_others() {
        let keyed = Keyed::new(vec!["namespace".into(), "app".into()], 10);
        let noisy = labels("noisy");
        let takes: Vec<Take> = (0..4).map(|_| keyed.take(&DROP, &noisy, 0).0).collect();
        assert_eq!(takes, [Take::Pass, Take::Pass, Take::Drop, Take::Drop]);
        assert_eq!(keyed.take(&DROP, &labels("quiet"), 0).0, Take::Pass);
        // A second pod of the same app (other pod label) shares the noisy bucket.
        let mut other_pod = (*noisy).clone();
        other_pod.insert("pod".into(), "noisy-2".into());
        assert_eq!(keyed.take(&DROP, &Arc::new(other_pod), 0).0, Take::Drop);
        // One second later one token came back.
        assert_eq!(keyed.take(&DROP, &noisy, 1_000_000_000).0, Take::Pass);
    }

    #[test]
    fn keys_beyond_max_share_the_overflow_bucket() {
        let keyed = Keyed::new(vec!["app".into()], 2);
        for app in ["a", "b"] {
            keyed.take(&DROP, &labels(app), 0);
        }
        let (take, reason) = keyed.take(&DROP, &labels("c"), 0);
        assert_eq!((take, reason), (Take::Pass, RATE_LIMITED_OVERFLOW_REASON));
        keyed.take(&DROP, &labels("d"), 0);
        assert_eq!(
            keyed.take(&DROP, &labels("e"), 0),
            (Take::Drop, RATE_LIMITED_OVERFLOW_REASON)
        );
        assert_eq!(keyed.keys(), 2);
        // Ten seconds on, a and b refilled: they make room for a new key.
        let later = 10_000_000_000;
        assert_eq!(
            keyed.take(&DROP, &labels("f"), later),
            (Take::Pass, RATE_LIMITED_REASON)
        );
        assert_eq!(keyed.keys(), 1);
    }

    #[test]
    fn wait_mode_asks_for_the_time_of_the_missing_token() {
        let rate = Rate {
            rate: 2.0,
            burst: 1.0,
            drop: false,
        };
        let mut bucket = rate.full(0);
        assert_eq!(rate.take(&mut bucket, 0), Take::Pass);
        assert_eq!(
            rate.take(&mut bucket, 0),
            Take::Wait(Duration::from_millis(500))
        );
    }
}
