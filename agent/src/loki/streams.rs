//! Stream cardinality: how many distinct streams this agent pushed recently
//! (`logpipe_active_streams`).
//!
//! A stream is what Loki keys it by: the rendered label set of a push, external labels
//! included. Streams are counted when a push is attempted, whatever Loki answers, so a
//! tenant refused for "maximum active stream limit exceeded" still shows what it sent.
//!
//! Window: a stream counts for [`ACTIVE_STREAMS_WINDOW`] after its last push. Loki counts
//! a stream active until its ingester flushes it idle (30 minutes by default), so a count
//! since start would grow with every pod ever seen (and never fall), and the operator
//! compares a just-started canary with the stable agent it replaced: 5 minutes holds a
//! node's steady set of streams (anything logging at least every few minutes) while a
//! long-running agent does not accumulate dead pods'. A new label that multiplies the
//! streams (a pod uid, a request id) shows in the count at the first pushes.
//!
//! Memory: one hash and one time per stream of the window, not its labels.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

/// How long a stream counts as active after its last push.
pub const ACTIVE_STREAMS_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The identity of a stream, from its rendered labels.
pub fn stream_key(rendered_labels: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    rendered_labels.hash(&mut hasher);
    hasher.finish()
}

/// Streams seen in the window, by key, with the time (Unix ms) of their last push.
#[derive(Debug)]
pub struct ActiveStreams {
    window_ms: i64,
    last_push: HashMap<u64, i64>,
}

impl Default for ActiveStreams {
    fn default() -> Self {
        Self::new(ACTIVE_STREAMS_WINDOW)
    }
}

impl ActiveStreams {
    pub fn new(window: Duration) -> Self {
        Self {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            last_push: HashMap::new(),
        }
    }

    /// The streams of one push, at `now_ms`; returns the active count.
    pub fn pushed(&mut self, keys: &[u64], now_ms: i64) -> usize {
        for &key in keys {
            self.last_push.insert(key, now_ms);
        }
        self.expire(now_ms)
    }

    /// Forget streams not pushed within the window; returns the active count.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let window = self.window_ms;
        self.last_push
            .retain(|_, last| now_ms.saturating_sub(*last) < window);
        self.last_push.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_streams_in_the_window() {
        let mut active = ActiveStreams::new(Duration::from_secs(300));
        let a = stream_key(r#"{app="a"}"#);
        let b = stream_key(r#"{app="b"}"#);
        assert_eq!(active.expire(0), 0, "nothing pushed: no streams");
        assert_eq!(active.pushed(&[a, b], 1_000), 2);
        // The same streams again are not new ones.
        assert_eq!(active.pushed(&[a, b, a], 2_000), 2);
        // b goes quiet; a keeps pushing.
        assert_eq!(active.pushed(&[a], 200_000), 2);
        assert_eq!(active.expire(301_999), 2);
        assert_eq!(active.expire(302_000), 1, "b's last push was 300 s ago");
        assert_eq!(active.expire(600_000), 0);
    }

    #[test]
    fn a_per_pod_uid_label_multiplies_the_count() {
        let mut stable = ActiveStreams::default();
        let mut canary = ActiveStreams::default();
        let app = r#"{app="web", container="c", stream="stdout"}"#;
        for pod in 0..20 {
            let uid = format!(r#"{{app="web", container="c", stream="stdout", uid="{pod}"}}"#);
            stable.pushed(&[stream_key(app)], 1_000);
            canary.pushed(&[stream_key(&uid)], 1_000);
        }
        assert_eq!((stable.expire(1_000), canary.expire(1_000)), (1, 20));
    }
}
