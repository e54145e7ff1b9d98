//! The agent's Prometheus metrics. Where Promtail has a metric with the same meaning, the
//! name and labels are Promtail's, so existing dashboards and alerts keep working:
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `promtail_read_bytes_total` (gauge, as in Promtail) | path | read offset of a file |
//! | `promtail_file_bytes_total` (gauge) | path | size of a file |
//! | `promtail_read_lines_total` | path | lines read |
//! | `promtail_files_active_total` (gauge) | | files being tailed |
//! | `promtail_encoded_bytes_total`, `promtail_sent_bytes_total`, `promtail_sent_entries_total` | host | pushes |
//! | `promtail_dropped_entries_total`, `promtail_dropped_bytes_total` | host, tenant, reason | refused by Loki (non-retryable 4xx) |
//! | `promtail_request_duration_seconds` | status_code, host | push requests |
//! | `promtail_batch_retries_total` | host, tenant | retried pushes |
//!
//! `tenant` is the push's tenant: `loki.tenant`, or with `tenantFrom` the entries' own.
//! Its values are bounded by what the source can name: the namespaces of the cluster (or
//! the values of the pod label or annotation); a `field` source takes them from log lines,
//! so pick a field with a small set of values.
//! | `promtail_stream_lag_seconds` (gauge) | | now minus the newest acknowledged entry's time |
//! | `logentry_dropped_lines_total` | reason | dropped by pipeline stages (Promtail's drop stage name) |
//!
//! The rest are `logpipe_*`, plus the standard `process_cpu_seconds_total` and
//! `process_resident_memory_bytes` read from `/proc/self` at scrape time. Label values
//! are bounded: paths of files on this node, one host, fixed reason strings.
//!
//! What the operator reads to judge a rollout step has no labels at all (one agent
//! serves one LogPipeline), and its names are in [`names`]:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `logpipe_written_bytes_total` | counter | bytes written to the files this agent tails, since it started tailing each (from its saved position, or 0): per file, the larger of its size at a scan and the offset read (a `.gz`: decompressed bytes read) |
//! | `logpipe_acknowledged_bytes_total` | counter | of those, bytes up to the files' committed offsets (what positions may advance to): entries Loki acknowledged or refused for good, and lines a stage dropped on purpose |
//! | `logpipe_unacknowledged_bytes` | gauge | written − acknowledged: unread, in flight, held, or lost undecided; 0 on a node where nothing was written |
//! | `logpipe_oldest_unacknowledged_seconds` | gauge | age of the oldest unacknowledged byte, from when the agent first saw it (scan or read, ≤ 1 s early); 0 when none |
//! | `logpipe_active_streams` | gauge | distinct streams (label sets as pushed, external labels included) in pushes of the last [`crate::loki::ACTIVE_STREAMS_WINDOW`] |
//! | `logpipe_read_lines_total` | counter | lines read since the agent started, every file (`promtail_read_lines_total` forgets a file's lines with the file) |
//!
//! It also reads `logentry_dropped_lines_total` (summed over `reason`) against
//! `logpipe_read_lines_total`: the share of lines the pipeline stages drop on purpose
//! (check `pipelineDrops`).
//!
//! The age is measured from first sight, not from entry timestamps: unread bytes have no
//! timestamp yet, and a timestamp is the application's (a backlog, a skewed clock, a
//! `timestamp` stage) — it would make a node that just started reading old files look
//! stuck, and a stuck one with a future clock look fine. See [`crate::tail::ack`].

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::tail::ack::Lag;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostTenantLabels {
    pub host: String,
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub host: String,
    pub tenant: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub status_code: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Names of the metrics the operator reads: the contract's, registered with the same
/// constants.
pub use logpipe_api::metrics as names;

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Every metric of the agent, registered once.
pub struct Metrics {
    registry: Registry,
    /// Serializes scrapes (process gauges are refreshed, then everything is encoded).
    scrape: Mutex<()>,
    // Files.
    pub read_bytes: Family<PathLabel, Gauge>,
    pub file_bytes: Family<PathLabel, Gauge>,
    pub read_lines: Family<PathLabel, Counter>,
    pub all_read_lines: Counter,
    pub files_active: Gauge,
    pub oversized_raw_lines: Counter,
    pub truncations: Counter,
    pub skipped_rotated_files: Counter,
    pub file_errors: Counter,
    // Pipeline.
    pub malformed_lines: Counter,
    pub split_lines: Counter,
    pub invalid_utf8_lines: Counter,
    pub pipeline_dropped: Family<ReasonLabel, Counter>,
    pub tenant_fallback_entries: Counter,
    // Buffering and backpressure.
    pub buffered_bytes: Gauge,
    pub buffered_bytes_limit: Gauge,
    pub backpressure_passes: Counter,
    // Loki client.
    pub encoded_bytes: Family<HostLabel, Counter>,
    pub sent_bytes: Family<HostLabel, Counter>,
    pub sent_entries: Family<HostLabel, Counter>,
    pub dropped_entries: Family<DropLabels, Counter>,
    pub dropped_bytes: Family<DropLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub batch_retries: Family<HostTenantLabels, Counter>,
    pub stream_lag: FloatGauge,
    pub delivery_latency: Histogram,
    pub newest_entry: FloatGauge,
    pub last_push_success: FloatGauge,
    // Positions.
    pub positions_commits: Counter,
    pub positions_commit_errors: Counter,
    pub positions_last_commit: FloatGauge,
    // Nothing left behind, stream cardinality.
    pub written_bytes: Counter,
    pub acknowledged_bytes: Counter,
    pub unacknowledged_bytes: Gauge,
    pub oldest_unacknowledged: FloatGauge,
    pub active_streams: Gauge,
    // Discovery.
    pub discovery_pods: Gauge,
    pub discovery_synced: Gauge,
    // Process.
    pub process_cpu: FloatCounter,
    pub process_rss: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let read_bytes = Family::<PathLabel, Gauge>::default();
        r.register(
            "promtail_read_bytes_total",
            "Number of bytes read (read offset)",
            read_bytes.clone(),
        );
        let file_bytes = Family::<PathLabel, Gauge>::default();
        r.register(
            "promtail_file_bytes_total",
            "Number of bytes total (file size)",
            file_bytes.clone(),
        );
        let read_lines = Family::<PathLabel, Counter>::default();
        r.register(
            names::READ_LINES,
            "Number of lines read",
            read_lines.clone(),
        );
        let all_read_lines = Counter::default();
        r.register(
            names::ALL_READ_LINES,
            "Lines read since the agent started, on every file (kept when a file goes, unlike promtail_read_lines)",
            all_read_lines.clone(),
        );
        let files_active = Gauge::default();
        r.register(
            "promtail_files_active_total",
            "Number of active files",
            files_active.clone(),
        );
        let oversized_raw_lines = Counter::default();
        r.register(
            "logpipe_oversized_raw_lines",
            "Raw lines longer than the read limit, cut into pieces before parsing",
            oversized_raw_lines.clone(),
        );
        let truncations = Counter::default();
        r.register(
            "logpipe_file_truncations",
            "Files found truncated (copytruncate) and read again from the start",
            truncations.clone(),
        );
        let skipped_rotated_files = Counter::default();
        r.register(
            "logpipe_skipped_rotated_files",
            "Rotated files not read because they predate what this agent has ever tailed",
            skipped_rotated_files.clone(),
        );
        let file_errors = Counter::default();
        r.register(
            "logpipe_file_errors",
            "I/O errors reading log files",
            file_errors.clone(),
        );

        let malformed_lines = Counter::default();
        r.register(
            "logpipe_malformed_lines",
            "Lines the parser stage could not read",
            malformed_lines.clone(),
        );
        let split_lines = Counter::default();
        r.register(
            "logpipe_split_lines",
            "Lines longer than limits.maxLineBytes, split",
            split_lines.clone(),
        );
        let invalid_utf8_lines = Counter::default();
        r.register(
            "logpipe_invalid_utf8_lines",
            "Lines that were not valid UTF-8",
            invalid_utf8_lines.clone(),
        );
        let pipeline_dropped = Family::<ReasonLabel, Counter>::default();
        r.register(
            names::PIPELINE_DROPPED_LINES,
            "Lines dropped by pipeline stages",
            pipeline_dropped.clone(),
        );

        let tenant_fallback_entries = Counter::default();
        r.register(
            "logpipe_tenant_fallback_entries",
            "Entries sent to loki.tenant because their tenantFrom value is not a valid tenant ID",
            tenant_fallback_entries.clone(),
        );

        let buffered_bytes = Gauge::default();
        r.register(
            "logpipe_buffered_bytes",
            "Bytes of entries read but not yet acknowledged by Loki",
            buffered_bytes.clone(),
        );
        let buffered_bytes_limit = Gauge::default();
        r.register(
            "logpipe_buffered_bytes_limit",
            "limits.maxBufferedBytes: reading pauses above it",
            buffered_bytes_limit.clone(),
        );
        let backpressure_passes = Counter::default();
        r.register(
            "logpipe_backpressure_passes",
            "Read passes skipped because the buffer was full",
            backpressure_passes.clone(),
        );

        let encoded_bytes = Family::<HostLabel, Counter>::default();
        r.register(
            "promtail_encoded_bytes",
            "Number of bytes encoded and ready to send",
            encoded_bytes.clone(),
        );
        let sent_bytes = Family::<HostLabel, Counter>::default();
        r.register(
            "promtail_sent_bytes",
            "Number of bytes sent",
            sent_bytes.clone(),
        );
        let sent_entries = Family::<HostLabel, Counter>::default();
        r.register(
            names::SENT_ENTRIES,
            "Number of log entries sent to the ingester",
            sent_entries.clone(),
        );
        let dropped_entries = Family::<DropLabels, Counter>::default();
        r.register(
            names::DROPPED_ENTRIES,
            "Number of log entries dropped because Loki refused them (non-retryable)",
            dropped_entries.clone(),
        );
        let dropped_bytes = Family::<DropLabels, Counter>::default();
        r.register(
            "promtail_dropped_bytes",
            "Number of bytes dropped because Loki refused them",
            dropped_bytes.clone(),
        );
        let request_duration =
            Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                request_histogram,
            );
        r.register(
            names::REQUEST_DURATION,
            "Duration of send requests",
            request_duration.clone(),
        );
        let batch_retries = Family::<HostTenantLabels, Counter>::default();
        r.register(
            "promtail_batch_retries",
            "Number of times batches has had to be retried",
            batch_retries.clone(),
        );
        let stream_lag = FloatGauge::default();
        r.register(
            "promtail_stream_lag_seconds",
            "Now minus the timestamp of the newest entry Loki acknowledged",
            stream_lag.clone(),
        );
        let delivery_latency = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        r.register(
            names::DELIVERY_LATENCY,
            "Per acknowledged batch: acknowledgement time minus the newest entry's timestamp",
            delivery_latency.clone(),
        );
        let newest_entry = FloatGauge::default();
        r.register(
            names::NEWEST_ENTRY,
            "Unix time of the newest entry read and handed to the shipper (what Loki should soon return)",
            newest_entry.clone(),
        );
        let last_push_success = FloatGauge::default();
        r.register(
            "logpipe_last_push_success_timestamp_seconds",
            "Unix time of the last push Loki accepted",
            last_push_success.clone(),
        );

        let positions_commits = Counter::default();
        r.register(
            "logpipe_positions_commits",
            "Positions file saves",
            positions_commits.clone(),
        );
        let positions_commit_errors = Counter::default();
        r.register(
            "logpipe_positions_commit_errors",
            "Positions file saves that failed",
            positions_commit_errors.clone(),
        );
        let positions_last_commit = FloatGauge::default();
        r.register(
            "logpipe_positions_last_commit_timestamp_seconds",
            "Unix time of the last positions file save",
            positions_last_commit.clone(),
        );

        let written_bytes = Counter::default();
        r.register(
            names::WRITTEN_BYTES,
            "Bytes written to the tailed files since this agent started tailing each (from its position): per file the larger of its size at a scan and the offset read",
            written_bytes.clone(),
        );
        let acknowledged_bytes = Counter::default();
        r.register(
            names::ACKNOWLEDGED_BYTES,
            "Of the written bytes, those up to the committed offsets: acknowledged (or refused for good) by Loki, or dropped on purpose by a stage",
            acknowledged_bytes.clone(),
        );
        let unacknowledged_bytes = Gauge::default();
        r.register(
            names::UNACKNOWLEDGED_BYTES,
            "Written minus acknowledged bytes: unread, in flight, held, or lost without a decision (0 when nothing was written)",
            unacknowledged_bytes.clone(),
        );
        let oldest_unacknowledged = FloatGauge::default();
        r.register(
            names::OLDEST_UNACKNOWLEDGED,
            "Age of the oldest unacknowledged byte, since the agent first saw it in its file (0 when none)",
            oldest_unacknowledged.clone(),
        );
        let active_streams = Gauge::default();
        r.register(
            names::ACTIVE_STREAMS,
            "Distinct streams (label sets as pushed) in the pushes of the last 5 minutes",
            active_streams.clone(),
        );

        let discovery_pods = Gauge::default();
        r.register(
            "logpipe_discovery_pods",
            "Pods of this node known to discovery",
            discovery_pods.clone(),
        );
        let discovery_synced = Gauge::default();
        r.register(
            "logpipe_discovery_synced",
            "1 when the pod watch has listed this node's pods (or discovery is off)",
            discovery_synced.clone(),
        );

        let process_cpu = FloatCounter::default();
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            process_cpu.clone(),
        );
        let process_rss = Gauge::default();
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            process_rss.clone(),
        );

        Self {
            registry: r,
            scrape: Mutex::new(()),
            read_bytes,
            file_bytes,
            read_lines,
            all_read_lines,
            files_active,
            oversized_raw_lines,
            truncations,
            skipped_rotated_files,
            file_errors,
            malformed_lines,
            split_lines,
            invalid_utf8_lines,
            pipeline_dropped,
            tenant_fallback_entries,
            buffered_bytes,
            buffered_bytes_limit,
            backpressure_passes,
            encoded_bytes,
            sent_bytes,
            sent_entries,
            dropped_entries,
            dropped_bytes,
            request_duration,
            batch_retries,
            stream_lag,
            delivery_latency,
            newest_entry,
            last_push_success,
            positions_commits,
            positions_commit_errors,
            positions_last_commit,
            written_bytes,
            acknowledged_bytes,
            unacknowledged_bytes,
            oldest_unacknowledged,
            active_streams,
            discovery_pods,
            discovery_synced,
            process_cpu,
            process_rss,
        }
    }

    /// Forget a file's per-path series once the file is gone (bounded cardinality).
    pub fn forget_path(&self, path: &str) {
        let label = PathLabel {
            path: path.to_string(),
        };
        self.read_bytes.remove(&label);
        self.file_bytes.remove(&label);
        self.read_lines.remove(&label);
    }

    /// Set the lag metrics from the ledger's totals. The counters only move up (a total
    /// read a moment earlier is never taken back).
    pub fn publish_lag(&self, lag: &Lag, now_ms: i64) {
        let up = |counter: &Counter, total: u64| {
            let delta = total.saturating_sub(counter.get());
            if delta > 0 {
                counter.inc_by(delta);
            }
        };
        up(&self.written_bytes, lag.written);
        up(&self.acknowledged_bytes, lag.acknowledged);
        self.unacknowledged_bytes
            .set(i64::try_from(lag.unacknowledged()).unwrap_or(i64::MAX));
        let age_ms = lag
            .oldest_unacknowledged_ms
            .map_or(0, |seen| now_ms.saturating_sub(seen).max(0));
        self.oldest_unacknowledged.set(age_ms as f64 / 1000.0);
    }

    /// The Prometheus text exposition, process gauges refreshed first.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let _guard = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sample) = read_process_sample() {
            let delta = sample.cpu_seconds - self.process_cpu.get();
            if delta > 0.0 {
                self.process_cpu.inc_by(delta);
            }
            self.process_rss.set(sample.rss_bytes as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// CPU time and resident memory of this process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// Read `/proc/self/stat` and `/proc/self/statm`; `None` off Linux or on odd content.
pub fn read_process_sample() -> Option<ProcessSample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse_process_sample(&stat, &statm, clock_ticks_per_second(), 4096)
}

fn clock_ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux architecture Kubernetes runs on.
    100.0
}

/// `stat`: fields after the `(comm)` (which may hold spaces); utime and stime are fields
/// 14 and 15. `statm`: the second field is resident pages.
pub fn parse_process_sample(
    stat: &str,
    statm: &str,
    ticks: f64,
    page: u64,
) -> Option<ProcessSample> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state), so field n is at index n - 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcessSample {
        cpu_seconds: (utime + stime) / ticks,
        rss_bytes: resident * page,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promtail_names_are_exposed() {
        let m = Metrics::new();
        m.sent_entries
            .get_or_create(&HostLabel {
                host: "loki:3100".into(),
            })
            .inc_by(3);
        m.read_bytes
            .get_or_create(&PathLabel {
                path: "/p/0.log".into(),
            })
            .set(10);
        m.dropped_entries
            .get_or_create(&DropLabels {
                host: "h".into(),
                tenant: "t".into(),
                reason: "line_too_long".into(),
            })
            .inc();
        m.files_active.set(2);
        let text = m.encode().unwrap();
        for needle in [
            "promtail_sent_entries_total{host=\"loki:3100\"} 3",
            "promtail_read_bytes_total{path=\"/p/0.log\"} 10",
            "promtail_files_active_total 2",
            "promtail_dropped_entries_total{host=\"h\",tenant=\"t\",reason=\"line_too_long\"} 1",
            "logpipe_buffered_bytes 0",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        m.forget_path("/p/0.log");
        assert!(!m.encode().unwrap().contains("/p/0.log"));
    }

    /// The operator decides rollouts on these: each must be a family this agent exposes,
    /// of the type its sample name implies.
    #[test]
    fn every_metric_the_operator_reads_is_exposed() {
        let m = Metrics::new();
        // A labelled family is exposed once it has a series.
        let host = HostLabel { host: "h".into() };
        m.sent_entries.get_or_create(&host).inc();
        let drop = DropLabels {
            host: "h".into(),
            tenant: "t".into(),
            reason: "r".into(),
        };
        m.dropped_entries.get_or_create(&drop).inc();
        let path = PathLabel { path: "p".into() };
        m.read_lines.get_or_create(&path).inc();
        let reason = ReasonLabel { reason: "r".into() };
        m.pipeline_dropped.get_or_create(&reason).inc();
        let request = RequestLabels {
            status_code: "204".into(),
            host: "h".into(),
        };
        m.request_duration.get_or_create(&request).observe(0.1);
        let text = m.encode().unwrap();
        for sample in names::READ_BY_OPERATOR {
            let (family, kind) = if let Some(family) = sample.strip_suffix("_total") {
                (family, "counter")
            } else if let Some(family) = sample
                .strip_suffix("_sum")
                .or_else(|| sample.strip_suffix("_count"))
            {
                (family, "histogram")
            } else {
                (*sample, "gauge")
            };
            let declared = format!("# TYPE {family} {kind}\n");
            assert!(text.contains(&declared), "missing {declared:?} in\n{text}");
        }
    }

    #[test]
    fn lines_read_outlive_the_file_they_were_read_from() {
        // The operator's drop share divides by this: it must not fall when a file goes.
        let m = Metrics::new();
        let path = PathLabel {
            path: "/p/0.log".into(),
        };
        m.read_lines.get_or_create(&path).inc_by(7);
        m.all_read_lines.inc_by(7);
        m.forget_path("/p/0.log");
        let text = m.encode().unwrap();
        assert!(!text.contains(names::READ_LINES_TOTAL), "{text}");
        assert!(
            text.contains(&format!("{} 7", names::ALL_READ_LINES_TOTAL)),
            "{text}"
        );
    }

    #[test]
    fn proc_stat_with_spaces_in_comm() {
        let stat = "42 (logpipe agent) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 1 1 1";
        let sample = parse_process_sample(stat, "1000 300 20 1 0 50 0", 100.0, 4096).unwrap();
        assert_eq!(sample.cpu_seconds, 3.0);
        assert_eq!(sample.rss_bytes, 300 * 4096);
        assert!(parse_process_sample("garbage", "", 100.0, 4096).is_none());
    }
}
