//! Names of the agent's metrics that the operator's verification reads, as exposed on
//! `/metrics`. The agent registers its metrics with these constants and the operator
//! queries them with the same ones, so a rename is one edit. A counter's samples carry
//! `_total`; that name is derived here, never typed a second time.
//!
//! [`READ_BY_OPERATOR`] lists every sample name a rollout decision reads; the agent's unit
//! tests check that its exposition has each one, so a renamed or dropped metric fails
//! `cargo test` and not only an end-to-end test.

/// A counter: its registered name and the name of its samples.
macro_rules! counter {
    ($(#[$doc:meta])* $name:ident, $total:ident, $text:literal) => {
        $(#[$doc])*
        pub const $name: &str = $text;
        #[doc = concat!("The samples of [`", stringify!($name), "`].")]
        pub const $total: &str = concat!($text, "_total");
    };
}

/// A histogram: its registered name and the names of its `_sum` and `_count` samples.
macro_rules! histogram {
    ($name:ident, $sum:ident, $count:ident, $text:literal) => {
        pub const $name: &str = $text;
        pub const $sum: &str = concat!($text, "_sum");
        pub const $count: &str = concat!($text, "_count");
    };
}

counter!(SENT_ENTRIES, SENT_ENTRIES_TOTAL, "promtail_sent_entries");
counter!(
    DROPPED_ENTRIES,
    DROPPED_ENTRIES_TOTAL,
    "promtail_dropped_entries"
);
counter!(WRITTEN_BYTES, WRITTEN_BYTES_TOTAL, "logpipe_written_bytes");
counter!(
    ACKNOWLEDGED_BYTES,
    ACKNOWLEDGED_BYTES_TOTAL,
    "logpipe_acknowledged_bytes"
);
counter!(
    /// Promtail's, per file (`path`): a file's series goes when the file does (rotation,
    /// deletion), so its sum is not a count since the agent started.
    READ_LINES,
    READ_LINES_TOTAL,
    "promtail_read_lines"
);
counter!(
    /// Every line read since the agent started, on every file, gone or not.
    ALL_READ_LINES,
    ALL_READ_LINES_TOTAL,
    "logpipe_read_lines"
);
counter!(
    /// Promtail's drop stage counter (`reason`): entries pipeline stages dropped.
    PIPELINE_DROPPED_LINES,
    PIPELINE_DROPPED_LINES_TOTAL,
    "logentry_dropped_lines"
);
histogram!(
    REQUEST_DURATION,
    REQUEST_DURATION_SUM,
    REQUEST_DURATION_COUNT,
    "promtail_request_duration_seconds"
);
histogram!(
    DELIVERY_LATENCY,
    DELIVERY_LATENCY_SUM,
    DELIVERY_LATENCY_COUNT,
    "logpipe_delivery_latency_seconds"
);
pub const NEWEST_ENTRY: &str = "logpipe_newest_entry_timestamp_seconds";
pub const UNACKNOWLEDGED_BYTES: &str = "logpipe_unacknowledged_bytes";
pub const OLDEST_UNACKNOWLEDGED: &str = "logpipe_oldest_unacknowledged_seconds";
pub const ACTIVE_STREAMS: &str = "logpipe_active_streams";

/// Every sample name the operator's verification reads from an agent.
pub const READ_BY_OPERATOR: &[&str] = &[
    SENT_ENTRIES_TOTAL,
    DROPPED_ENTRIES_TOTAL,
    WRITTEN_BYTES_TOTAL,
    READ_LINES_TOTAL,
    ALL_READ_LINES_TOTAL,
    PIPELINE_DROPPED_LINES_TOTAL,
    REQUEST_DURATION_COUNT,
    DELIVERY_LATENCY_SUM,
    DELIVERY_LATENCY_COUNT,
    NEWEST_ENTRY,
    UNACKNOWLEDGED_BYTES,
    OLDEST_UNACKNOWLEDGED,
    ACTIVE_STREAMS,
];
