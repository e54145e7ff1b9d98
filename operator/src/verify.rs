//! Verification of a rollout step: measure the step's agents, then judge (pure).
//!
//! # Flow
//! 1. [`Verifier::measure`] (the I/O): scrape each step pod's `/metrics` at
//!    `podIP:<monitoring.port>`, and, when a store is set (`rollout.verify.query`, or the
//!    deprecated `queryEndpoint`: Loki), ask it for the step's nodes' entries over the
//!    window and their newest entry, for the LogPipeline's tenant: LogQL for Loki
//!    ([`loki`]), LogsQL for VictoriaLogs ([`victorialogs`]). The requests are built and
//!    the answers read by pure functions; this module only sends them. Every call has a
//!    timeout; scrapes run concurrently (bounded). A reconcile never waits for them:
//!    [`background`] measures off the reconcile and wakes it when the answer is in.
//! 2. [`judge`] (pure): each check with its measured value and its limit, recorded in
//!    `status.lastVerification.checks`.
//!
//! Checks (values are the worst over the step's nodes):
//! - `podsReady` (`ready/total`, by the agent's own readiness: `Ready` or
//!   `ContainersReady`, so a node heartbeat lapse is not blamed on the revision) and
//!   `restarts`; a container waiting on `ErrImagePull`,
//!   `ImagePullBackOff`, `CrashLoopBackOff`... fails at once;
//! - a node is *quiet* when its agent wrote nothing (`logpipe_written_bytes_total` 0),
//!   or nothing within the window the store is asked about (its newest entry,
//!   `logpipe_newest_entry_timestamp_seconds`, is older: a node whose only files are old
//!   ones, read again from the start by a first install, has nothing in that window):
//!   `entriesSent` and `storeEntries` are asked only of the nodes that wrote, and their
//!   messages name the quiet ones (`quiet (wrote nothing): n2`, `all 3 nodes quiet`);
//!   their values stay plain numbers;
//! - `entriesSent` (`promtail_sent_entries_total`, > 0 on every node that wrote; value:
//!   the least), `sendErrors` (push requests answered 4xx/5xx, from
//!   `promtail_request_duration_seconds_count`; not 422, Loki's answer to the agent's
//!   readiness probe, an empty push), `droppedEntries` (`promtail_dropped_entries_total`),
//!   both must be 0;
//! - `lag`: on every node, quiet or not, the oldest byte written and not acknowledged
//!   (`logpipe_oldest_unacknowledged_seconds`) at most `maxLatency` (30 s) old at the end
//!   of the window: what was written was shipped, whatever the volume; value the worst
//!   node's age (`4.5s`), message that node and its `logpipe_unacknowledged_bytes`;
//! - `storeEntries`: the step's nodes' entries in the store over the window (> 0 on every
//!   node that wrote), asked at the end of the window only; recorded as skipped when no
//!   store is set. When a store that cannot be reached is the one reason a step fails,
//!   the verdict says so ([`Verdict::store_unreachable`]) and the step holds instead of
//!   rolling back (see `rollout`);
//! - `streams` (with `maxStreams`): the worst agent's `logpipe_active_streams`;
//!   `streamGrowth` (with `maxStreamGrowth`): per node, the new agent's active streams
//!   over the stable agent's on the same node before the step moved it
//!   ([`Measurements::stream_baseline`], from `status.streamBaseline`); value the worst
//!   ratio, message both counts; skipped, saying why, with no baseline (a first install).
//!   Both fail at once during the window: streams only accumulate over it;
//! - `pipelineDrops` (on by default, `maxDropIncrease`, 10%; `100%` turns it off): per
//!   node, the share of lines the new agent's pipeline stages dropped on purpose
//!   (`logentry_dropped_lines_total`, every reason: drop, limit, malformed...) out of the
//!   lines it read (`logpipe_read_lines_total`, else the sum of
//!   `promtail_read_lines_total`), minus the share the stable agent had dropped on the
//!   same node before the step moved it ([`Measurements::drop_baseline`], from
//!   `status.streamBaseline.drops`), at most `maxDropIncrease`. A line dropped on purpose
//!   is decided like a shipped one, so `lag` and `entriesSent` pass a release that ships
//!   only half of what it reads; this check does not. Judged at the end of the window, on
//!   nodes where both agents read at least [`MIN_DROP_LINES`] (a quieter new agent is
//!   "too few lines to judge", not a failure); value the worst node's new share
//!   (`50.0%`), message that node's two shares and line counts; skipped, saying why,
//!   with no baseline (a first install) or stable agents that do not export the counts;
//! - `cpu` (rate of `process_cpu_seconds_total`, in millicores) under `maxCpu`, `memory`
//!   (`process_resident_memory_bytes`) under `maxMemory`, `latency` under `maxLatency`:
//!   written -> queryable when a store is set (at the end of the window, for up to 5 of
//!   the step's nodes with Loki, one query per node; for every node with VictoriaLogs,
//!   one query in all: the newest entry the agent read,
//!   `logpipe_newest_entry_timestamp_seconds`, minus the newest the store returns for
//!   the node), else the mean of `logpipe_delivery_latency_seconds` (file write -> push
//!   acknowledgement).
//!
//! # Guarantees
//! - During the window only checks that can already fail count (restarts, waiting
//!   reasons, send errors, dropped entries, memory, streams): a failure rolls back at
//!   once. `lag` is judged at the end only (a busy node is always a little behind). At the
//!   end of the window every check counts, and an agent that cannot be scraped fails.
//! - The agent's counters start at 0 with the new pod (it never restarted, or the step
//!   already failed), so they measure this revision only.
//!
//! # Caveats
//! - Quiet is what the new agent says it wrote since it started: an agent that does not
//!   export `logpipe_written_bytes_total` is never quiet, and one that does not export
//!   its lag fails `lag` (fail closed).
//! - `pipelineDrops` compares lifetimes: the stable agent's share since it started with
//!   the new agent's over one window. A drop rule for a burst the stable agent happened
//!   to see (or not) moves the stable share; raise `maxDropIncrease` for such workloads.
//!   A stable agent of an older release that exports only `promtail_read_lines_total`
//!   under-counts its lines once files rotated (a file's series goes with it): its share
//!   reads high, so the check errs towards passing.
//! - CPU is a rate between two scrapes: the first scrape of a pod is its baseline (kept
//!   in memory; after an operator restart the final check scrapes twice, 1 s apart).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;

pub use crate::crd::StoreKind;
use crate::crd::{CheckResult, LineCounts, StreamBaseline, Verification, VerifySpec};
use crate::rollout::{PodView, Verdict, few};
use logpipe_api::metrics as names;

mod background;
pub mod loki;
mod store;
pub mod victorialogs;

pub use background::{MeasureKey, MeasureRequest, StepKey, WINDOW_CHECK_SPACING};
pub use store::{StoreAnswer, StoreError, StoreQuery, StoreRequest, answer, without_credentials};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
const SCRAPE_CONCURRENCY: usize = 16;
/// Fewest lines an agent must have read for its drop share to mean something (check
/// `pipelineDrops`): the new agent on a node to be judged, the stable one to be compared
/// with. Below it one line more or less moves the share by whole percents.
pub const MIN_DROP_LINES: i64 = 50;
/// Nodes of a step whose written -> queryable latency Loki is asked about (one query each).
const LATENCY_SAMPLE_NODES: usize = 5;
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// What one scrape of an agent's /metrics says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub sent_entries: f64,
    pub dropped_entries: f64,
    /// Push requests answered with a 4xx or 5xx status.
    pub error_requests: f64,
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub latency_sum: f64,
    pub latency_count: f64,
    /// Time of the newest entry the agent has read (Unix seconds; 0: none yet).
    pub newest_entry: f64,
    /// Bytes written to the files the agent tails since it started; `None`: an agent that
    /// does not say (never counted as quiet).
    pub written_bytes: Option<f64>,
    /// Written bytes the store has not acknowledged yet.
    pub unacknowledged_bytes: Option<f64>,
    /// Age of the oldest unacknowledged byte, seconds (0: none).
    pub oldest_unacknowledged: Option<f64>,
    /// Label sets pushed over the last 5 minutes.
    pub active_streams: Option<f64>,
    /// Lines read since the agent started (`logpipe_read_lines_total`, else the sum of
    /// `promtail_read_lines_total`); `None`: an agent that does not say.
    pub read_lines: Option<f64>,
    /// Lines its pipeline stages dropped on purpose (`logentry_dropped_lines_total`, every
    /// reason): absent until the first drop, so 0 when absent.
    pub pipeline_dropped: f64,
}

impl Sample {
    /// Lines read and dropped by pipeline stages; `None` from an agent that does not say
    /// how many lines it read.
    pub fn line_counts(&self) -> Option<LineCounts> {
        Some(LineCounts {
            read: self.read_lines?.round() as i64,
            dropped: self.pipeline_dropped.round() as i64,
        })
    }
}

/// The standard process collector's names (not the agent's own: not in `names`).
const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";

fn add(total: &mut Option<f64>, value: f64) {
    *total = Some(total.unwrap_or(0.0) + value);
}

/// Sum of every series of each metric we read (labels ignored: one agent, one host).
pub fn parse_metrics(text: &str) -> Sample {
    let mut s = Sample::default();
    // Promtail's per-file counter loses a file's lines when the file goes (rotation): the
    // agent-wide total wins when the agent has it.
    let (mut all_read, mut per_file_read) = (None, None);
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((series, value)) => (series.trim(), value.trim()),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels),
            None => (series, ""),
        };
        match name {
            names::SENT_ENTRIES_TOTAL => s.sent_entries += value,
            names::DROPPED_ENTRIES_TOTAL => s.dropped_entries += value,
            names::REQUEST_DURATION_COUNT => {
                let code = label(labels, "status_code").unwrap_or_default();
                // 422 answers the agent's readiness probe (an empty push), not an entry.
                if (code.starts_with('4') && code != "422") || code.starts_with('5') {
                    s.error_requests += value;
                }
            }
            PROCESS_CPU_SECONDS_TOTAL => s.cpu_seconds += value,
            PROCESS_RESIDENT_MEMORY_BYTES => s.rss_bytes += value,
            names::DELIVERY_LATENCY_SUM => s.latency_sum += value,
            names::DELIVERY_LATENCY_COUNT => s.latency_count += value,
            names::NEWEST_ENTRY => {
                s.newest_entry = s.newest_entry.max(value);
            }
            names::WRITTEN_BYTES_TOTAL => add(&mut s.written_bytes, value),
            names::UNACKNOWLEDGED_BYTES => add(&mut s.unacknowledged_bytes, value),
            names::OLDEST_UNACKNOWLEDGED => {
                s.oldest_unacknowledged = Some(s.oldest_unacknowledged.unwrap_or(0.0).max(value));
            }
            names::ACTIVE_STREAMS => add(&mut s.active_streams, value),
            names::ALL_READ_LINES_TOTAL => add(&mut all_read, value),
            names::READ_LINES_TOTAL => add(&mut per_file_read, value),
            names::PIPELINE_DROPPED_LINES_TOTAL => s.pipeline_dropped += value,
            _ => {}
        }
    }
    s.read_lines = all_read.or(per_file_read);
    s
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// A Kubernetes CPU quantity in millicores (`250m`, `0.5`, `1`).
pub fn parse_cpu(q: &str) -> Option<f64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok(),
        None => q.parse::<f64>().ok().map(|c| c * 1000.0),
    }
}

/// A Kubernetes memory quantity in bytes (`700Mi`, `1Gi`, `500M`, `1048576`).
pub fn parse_memory(q: &str) -> Option<f64> {
    let q = q.trim();
    const UNITS: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    q.parse::<f64>().ok()
}

fn mib(bytes: f64) -> String {
    format!("{:.0}Mi", bytes / (1024.0 * 1024.0))
}

/// What [`Verifier::measure`] found for the step's pods.
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    /// Per pod: the scrape, or why it failed.
    pub samples: BTreeMap<String, Result<Sample, String>>,
    /// Per pod: CPU in millicores since the previous scrape.
    pub cpu_millis: BTreeMap<String, f64>,
    /// Per node: entries in the store over the window; `None`: no store set, or not
    /// asked (see `store_skipped`).
    pub store: Option<Result<BTreeMap<String, f64>, StoreError>>,
    /// Why the store was not asked although one is set (`tenantFrom`: the step's entries
    /// are spread over tenants, and only `spec.tenant` is known).
    pub store_skipped: Option<String>,
    /// Per node (the step's nodes, or a sample of them, at the end of the window): time of
    /// the newest entry the store returns, asked right after the scrape (Unix seconds).
    pub newest_queryable: BTreeMap<String, f64>,
    /// Per node: the stable revision's active streams before the step moved it, from
    /// `status.streamBaseline` (set by the caller); `None`: none recorded.
    pub stream_baseline: Option<BTreeMap<String, i64>>,
    /// Per node: lines the stable revision's agent had read and dropped before the step
    /// moved it, from `status.streamBaseline.drops` (set by the caller); `None`: no
    /// baseline recorded (a first install).
    pub drop_baseline: Option<BTreeMap<String, LineCounts>>,
    /// Start of the window the store is asked about (Unix seconds), when it is: a node
    /// whose newest entry is older wrote nothing in it.
    pub wrote_since: Option<f64>,
}

/// How far what the store can return trails what the agents have read, worst node: for
/// each node the store was asked about, the newest entry its agent read minus the newest
/// entry the store returns for it (0 when it has caught up: a quiet node is not late).
/// The agent reads within about half a second of the write, so this is
/// written -> queryable.
/// `None` when no node could be compared.
fn queryable_lag(pods: &[&PodView], m: &Measurements) -> Option<f64> {
    pods.iter()
        .filter_map(|p| {
            let node = p.node.as_deref()?;
            let queryable = m.newest_queryable.get(node)?;
            let sample = m.samples.get(&p.name)?.as_ref().ok()?;
            (sample.newest_entry > 0.0).then(|| (sample.newest_entry - queryable).max(0.0))
        })
        .reduce(f64::max)
}

/// The step's pods, each with its node and its scrape (if it answered).
struct Node<'a> {
    name: &'a str,
    sample: Option<&'a Sample>,
    /// See [`Measurements::wrote_since`].
    wrote_since: Option<f64>,
}

impl Node<'_> {
    /// Wrote nothing to the files its agent tails, or nothing since the window the store
    /// is asked about began: nothing to send, nothing to find. An agent that does not say
    /// what was written is never quiet.
    fn quiet(&self) -> bool {
        self.sample.is_some_and(|s| {
            let nothing = s.written_bytes.is_some_and(|w| w <= 0.0);
            // 0: the agent has read no entry at all (not the same as an old one).
            let nothing_recent = s.written_bytes.is_some()
                && s.newest_entry > 0.0
                && self.wrote_since.is_some_and(|since| s.newest_entry < since);
            nothing || nothing_recent
        })
    }
}

/// `quiet: n2, n3` or `all 3 nodes quiet (wrote nothing)`; `None` when none is.
fn quiet_note(nodes: &[Node]) -> Option<String> {
    let quiet: Vec<String> = nodes
        .iter()
        .filter(|n| n.quiet())
        .map(|n| n.name.to_string())
        .collect();
    match quiet.len() {
        0 => None,
        n if n == nodes.len() => Some(format!("all {n} nodes quiet (wrote nothing)")),
        _ => Some(format!("quiet (wrote nothing): {}", few(&quiet))),
    }
}

fn notes(parts: impl IntoIterator<Item = Option<String>>) -> Option<String> {
    let parts: Vec<String> = parts.into_iter().flatten().collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn worst<'a, T: Copy + PartialOrd>(
    values: impl Iterator<Item = (T, &'a str)>,
) -> Option<(T, &'a str)> {
    values.fold(None, |acc, (v, n)| match acc {
        Some((a, _)) if a >= v => acc,
        _ => Some((v, n)),
    })
}

/// Judge the step's pods (pure). `final_check`: the end of the window.
pub fn judge(
    spec: &VerifySpec,
    pods: &[&PodView],
    m: &Measurements,
    final_check: bool,
) -> (Vec<CheckResult>, Verdict) {
    let mut checks = Vec::new();
    // (check, counts during the window)
    let mut push = |c: CheckResult, hard: bool| checks.push((c, hard));
    let total = pods.len();
    if spec.pods_ready {
        let ready = pods
            .iter()
            .filter(|p| p.ready || p.containers_ready)
            .count();
        let fatal: Vec<String> = pods.iter().filter_map(|p| p.failure()).collect();
        push(
            CheckResult {
                name: "podsReady".into(),
                passed: fatal.is_empty() && (!final_check || ready == total),
                value: Some(format!("{ready}/{total}")),
                limit: Some(format!("{total}/{total}")),
                message: (!fatal.is_empty()).then(|| fatal.join(", ")),
            },
            !fatal.is_empty(),
        );
        let restarts = pods.iter().map(|p| p.restarts).max().unwrap_or(0);
        push(
            CheckResult {
                name: "restarts".into(),
                passed: restarts == 0,
                value: Some(restarts.to_string()),
                limit: Some("0".into()),
                message: None,
            },
            true,
        );
    }
    let scraped: Vec<(&str, &Sample)> = m
        .samples
        .iter()
        .filter_map(|(pod, s)| s.as_ref().ok().map(|s| (pod.as_str(), s)))
        .collect();
    let unscraped: Vec<String> = m
        .samples
        .iter()
        .filter_map(|(pod, s)| s.as_ref().err().map(|e| format!("{pod}: {e}")))
        .collect();
    let not_scraped = (!unscraped.is_empty()).then(|| format!("not scraped: {}", few(&unscraped)));
    // The scraped pods by node (a pod with no node yet by its own name).
    let node_of = |pod: &str| {
        pods.iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.node.as_deref())
    };
    let nodes: Vec<Node> = m
        .samples
        .iter()
        .map(|(pod, s)| Node {
            name: node_of(pod).unwrap_or(pod),
            sample: s.as_ref().ok(),
            wrote_since: m.wrote_since,
        })
        .collect();
    let quiet = quiet_note(&nodes);
    let writers: Vec<&Node> = nodes.iter().filter(|n| !n.quiet()).collect();
    // Every node answered and none wrote a byte: nothing to send, find or wait for.
    let all_quiet = !nodes.is_empty() && writers.is_empty();
    if spec.shipping {
        let min_sent = writers
            .iter()
            .filter_map(|n| n.sample.map(|s| s.sent_entries))
            .reduce(f64::min);
        let value = match (min_sent, all_quiet) {
            (Some(v), _) => format!("{v:.0}"),
            (None, true) => "0".into(),
            (None, false) => "-".into(),
        };
        push(
            CheckResult {
                name: "entriesSent".into(),
                passed: !final_check
                    || (unscraped.is_empty() && (all_quiet || min_sent.is_some_and(|v| v > 0.0))),
                value: Some(value),
                limit: Some(">0".into()),
                message: notes([not_scraped.clone(), quiet.clone()]),
            },
            false,
        );
        let errors: f64 = scraped.iter().map(|(_, s)| s.error_requests).sum();
        push(
            CheckResult {
                name: "sendErrors".into(),
                passed: errors == 0.0,
                value: Some(format!("{errors:.0}")),
                limit: Some("0".into()),
                message: None,
            },
            true,
        );
        let dropped: f64 = scraped.iter().map(|(_, s)| s.dropped_entries).sum();
        push(
            CheckResult {
                name: "droppedEntries".into(),
                passed: dropped == 0.0,
                value: Some(format!("{dropped:.0}")),
                limit: Some("0".into()),
                message: None,
            },
            true,
        );
        push(lag(spec, &nodes, not_scraped.clone(), final_check), false);
    }
    match &m.store {
        None => push(
            CheckResult {
                name: "storeEntries".into(),
                passed: true,
                value: Some("skipped".into()),
                limit: None,
                message: Some(
                    m.store_skipped
                        .clone()
                        .unwrap_or_else(|| "rollout.verify.query is not set".into()),
                ),
            },
            false,
        ),
        Some(Err(e)) => push(
            CheckResult {
                name: "storeEntries".into(),
                passed: !final_check || all_quiet,
                value: Some(if all_quiet { "0" } else { "-" }.into()),
                limit: Some(">0".into()),
                message: notes([Some(e.to_string()), quiet.clone()]),
            },
            false,
        ),
        Some(Ok(counts)) => {
            // Asked only of nodes that wrote: a quiet node has nothing in the store.
            let quiet_nodes: Vec<&str> =
                nodes.iter().filter(|n| n.quiet()).map(|n| n.name).collect();
            let asked: Vec<&str> = pods
                .iter()
                .filter_map(|p| p.node.as_deref())
                .filter(|n| !quiet_nodes.contains(n))
                .collect();
            let count = |n: &str| counts.get(n).copied().unwrap_or(0.0);
            let min = asked
                .iter()
                .map(|n| count(n))
                .reduce(f64::min)
                .unwrap_or(0.0);
            let empty: Vec<String> = asked
                .iter()
                .filter(|n| count(n) <= 0.0)
                .map(|n| n.to_string())
                .collect();
            push(
                CheckResult {
                    name: "storeEntries".into(),
                    passed: !final_check || empty.is_empty(),
                    value: Some(format!("{min:.0}")),
                    limit: Some(">0".into()),
                    message: notes([
                        (!empty.is_empty()).then(|| format!("no entries from {}", few(&empty))),
                        quiet.clone(),
                    ]),
                },
                false,
            );
        }
    }
    if let Some(max_cpu) = spec.max_cpu.as_deref() {
        let limit = parse_cpu(max_cpu);
        let worst = m
            .cpu_millis
            .values()
            .copied()
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
        push(
            CheckResult {
                name: "cpu".into(),
                passed: !final_check || matches!((worst, limit), (Some(w), Some(l)) if w <= l),
                value: Some(worst.map_or("-".into(), |w| format!("{w:.0}m"))),
                limit: Some(max_cpu.to_string()),
                message: limit
                    .is_none()
                    .then(|| format!("cannot read maxCpu {max_cpu:?}")),
            },
            false,
        );
    }
    if let Some(max_memory) = spec.max_memory.as_deref() {
        let limit = parse_memory(max_memory);
        let worst = scraped
            .iter()
            .map(|(_, s)| s.rss_bytes)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
        let over = matches!((worst, limit), (Some(w), Some(l)) if w > l);
        push(
            CheckResult {
                name: "memory".into(),
                passed: !over && (!final_check || (worst.is_some() && limit.is_some())),
                value: Some(worst.map_or("-".into(), mib)),
                limit: Some(max_memory.to_string()),
                message: limit
                    .is_none()
                    .then(|| format!("cannot read maxMemory {max_memory:?}")),
            },
            over,
        );
    }
    if let Some(max_latency) = spec.max_latency {
        let (value, message) = match queryable_lag(pods, m) {
            Some(lag) => (
                Some(lag),
                "written -> queryable: newest entry an agent read minus the newest the store returns for its node, worst node",
            ),
            None => {
                let (sum, count) = scraped.iter().fold((0.0, 0.0), |(s, c), (_, x)| {
                    (s + x.latency_sum, c + x.latency_count)
                });
                (
                    (count > 0.0).then(|| sum / count),
                    if all_quiet {
                        "every node quiet (wrote nothing): nothing was delivered"
                    } else {
                        "mean delivery latency, file write to push acknowledgement"
                    },
                )
            }
        };
        push(
            CheckResult {
                name: "latency".into(),
                passed: !final_check
                    || value.map_or(all_quiet, |v| v <= max_latency.0.as_secs_f64()),
                value: Some(value.map_or("-".into(), |v| format!("{v:.2}s"))),
                limit: Some(max_latency.to_string()),
                message: Some(message.into()),
            },
            false,
        );
    }
    if let Some(max) = spec.max_streams {
        let top = worst(
            nodes
                .iter()
                .filter_map(|n| Some((n.sample?.active_streams?, n.name))),
        );
        let over = top.is_some_and(|(v, _)| v > max as f64);
        push(
            CheckResult {
                name: "streams".into(),
                passed: !over && (!final_check || top.is_some()),
                value: Some(top.map_or("-".into(), |(v, _)| format!("{v:.0}"))),
                limit: Some(max.to_string()),
                message: Some(top.map_or_else(
                    || format!("not exported by the agent ({})", names::ACTIVE_STREAMS),
                    |(_, node)| format!("active streams per agent, worst node {node}"),
                )),
            },
            over,
        );
    }
    if let Some(raw) = spec.max_stream_growth.as_deref() {
        push(
            stream_growth(raw, spec.stream_growth_limit(), &nodes, m, final_check),
            // Streams only accumulate during a window: over the limit now is over for good.
            stream_growth_over(spec.stream_growth_limit(), &nodes, m),
        );
    }
    if spec.pipeline_drops() {
        push(pipeline_drops(spec, &nodes, m, final_check), false);
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|(c, hard)| !c.passed && (final_check || *hard))
        .map(|(c, _)| {
            let mut s = format!(
                "{} {} (limit {})",
                c.name,
                c.value.as_deref().unwrap_or("-"),
                c.limit.as_deref().unwrap_or("-")
            );
            if let Some(m) = &c.message {
                s.push_str(&format!(": {m}"));
            }
            s
        })
        .collect();
    let verdict = Verdict {
        final_check,
        passed: failed.is_empty(),
        summary: failed.join("; "),
        store_unreachable: store_unreachable(&m.store, &checks, final_check),
    };
    (checks.into_iter().map(|(c, _)| c).collect(), verdict)
}

/// The store's error when, at the end of the window, it is the one reason the step
/// fails: the store could not be reached for `storeEntries` and every other check
/// passed.
fn store_unreachable(
    store: &Option<Result<BTreeMap<String, f64>, StoreError>>,
    checks: &[(CheckResult, bool)],
    final_check: bool,
) -> Option<String> {
    let Some(Err(StoreError::Unreachable(error))) = store else {
        return None;
    };
    let mut failing = checks.iter().filter(|(c, _)| !c.passed);
    let only_store = failing.clone().count() == 1
        && failing
            .next()
            .is_some_and(|(c, _)| c.name == "storeEntries");
    (final_check && only_store).then(|| error.clone())
}

/// `lag`: at the end of the window, the oldest byte written on a node and not yet
/// acknowledged by the store is at most `maxLatency` (30 s) old, on every node: what was
/// written was shipped, whatever the volume. A quiet node has nothing unacknowledged.
fn lag(
    spec: &VerifySpec,
    nodes: &[Node],
    not_scraped: Option<String>,
    final_check: bool,
) -> CheckResult {
    let limit = spec.max_lag();
    let silent: Vec<String> = nodes
        .iter()
        .filter(|n| n.sample.is_some_and(|s| s.oldest_unacknowledged.is_none()))
        .map(|n| n.name.to_string())
        .collect();
    let top = worst(
        nodes
            .iter()
            .filter_map(|n| Some((n.sample?.oldest_unacknowledged?, n.name))),
    );
    let bytes = |node: &str| {
        nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.sample?.unacknowledged_bytes)
            .unwrap_or(0.0)
    };
    CheckResult {
        name: "lag".into(),
        passed: !final_check
            || (not_scraped.is_none()
                && silent.is_empty()
                && top.is_some_and(|(age, _)| age <= limit.as_secs_f64())),
        value: Some(top.map_or("-".into(), |(age, _)| format!("{age:.1}s"))),
        limit: Some(logpipe_api::config::HumanDuration(limit).to_string()),
        message: notes([
            top.map(|(_, node)| {
                format!("worst node {node}: {:.0} bytes unacknowledged", bytes(node))
            }),
            (!silent.is_empty()).then(|| {
                format!(
                    "{} not exported by {}",
                    names::OLDEST_UNACKNOWLEDGED,
                    few(&silent)
                )
            }),
            not_scraped,
        ]),
    }
}

/// Per node with a baseline: (node, streams before, streams now, now / before).
fn growth<'a>(nodes: &'a [Node], m: &Measurements) -> Vec<(&'a str, f64, f64, f64)> {
    let Some(baseline) = &m.stream_baseline else {
        return Vec::new();
    };
    nodes
        .iter()
        .filter_map(|n| {
            let now = n.sample?.active_streams?;
            // A stable agent with no stream gives no ratio (maxStreams bounds it).
            let before = baseline.get(n.name).copied().filter(|b| *b > 0)? as f64;
            Some((n.name, before, now, now / before))
        })
        .collect()
}

fn stream_growth_over(limit: Option<f64>, nodes: &[Node], m: &Measurements) -> bool {
    limit.is_some_and(|l| growth(nodes, m).iter().any(|(_, _, _, r)| *r > l))
}

/// `streamGrowth`: the new revision's active streams per node over the stable revision's
/// on the same node, scraped before the step moved it (`status.streamBaseline`).
fn stream_growth(
    raw: &str,
    limit: Option<f64>,
    nodes: &[Node],
    m: &Measurements,
    final_check: bool,
) -> CheckResult {
    let skipped = |why: String| CheckResult {
        name: "streamGrowth".into(),
        passed: true,
        value: Some("skipped".into()),
        limit: Some(raw.to_string()),
        message: Some(why),
    };
    if m.stream_baseline.is_none() {
        return skipped(
            "no stable revision's stream count to compare with (a first install)".into(),
        );
    }
    let compared = growth(nodes, m);
    let Some(&(node, before, now, ratio)) =
        compared.iter().reduce(|a, b| if b.3 > a.3 { b } else { a })
    else {
        return skipped("no node of the step has a stable stream count to compare with".into());
    };
    let over = limit.is_some_and(|l| ratio > l);
    CheckResult {
        name: "streamGrowth".into(),
        passed: !over && (!final_check || limit.is_some()),
        value: Some(format!("{ratio:.2}")),
        limit: Some(raw.to_string()),
        message: Some(match limit {
            None => format!("cannot read maxStreamGrowth {raw:?}"),
            Some(_) => format!(
                "worst node {node}: {before:.0} -> {now:.0} streams ({ratio:.1}x), {} nodes compared",
                compared.len()
            ),
        }),
    }
}

/// A node whose pipeline drops are compared: the stable agent's counts before the step
/// moved it, the new agent's now.
struct DropShares<'a> {
    node: &'a str,
    before: LineCounts,
    now: LineCounts,
}

impl DropShares<'_> {
    fn share(c: LineCounts) -> f64 {
        // A stage that splits long lines can drop more entries than lines were read.
        (c.dropped as f64 / c.read.max(1) as f64).min(1.0)
    }

    /// New share minus stable share, in [-1, 1].
    fn increase(&self) -> f64 {
        Self::share(self.now) - Self::share(self.before)
    }
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// `pipelineDrops`: per node, the share of lines the new revision's pipeline stages drop
/// on purpose (drop, limit, malformed, ...) minus the share the stable revision dropped on
/// the same node before the step moved it (`status.streamBaseline.drops`), at most
/// `maxDropIncrease`. A dropped line is decided (acknowledged) like a shipped one, so this
/// is the only check that sees a release ship less than it reads. Judged at the end of
/// the window, on nodes where both agents read at least [`MIN_DROP_LINES`].
fn pipeline_drops(
    spec: &VerifySpec,
    nodes: &[Node],
    m: &Measurements,
    final_check: bool,
) -> CheckResult {
    let raw = spec.max_drop_increase.as_str();
    let result = |passed: bool, value: String, message: String| CheckResult {
        name: "pipelineDrops".into(),
        passed,
        value: Some(value),
        limit: Some(raw.to_string()),
        message: Some(message),
    };
    let Some(baseline) = &m.drop_baseline else {
        return result(
            true,
            "skipped".into(),
            "no stable revision's drop share to compare with (a first install)".into(),
        );
    };
    if baseline.is_empty() {
        return result(
            true,
            "skipped".into(),
            format!(
                "the stable agents gave no line counts to compare with (they do not export {} or {}, or could not be scraped)",
                names::ALL_READ_LINES_TOTAL,
                names::READ_LINES_TOTAL
            ),
        );
    }
    let Some(limit) = spec.drop_increase_limit() else {
        return result(
            !final_check,
            "-".into(),
            format!("cannot read maxDropIncrease {raw:?}"),
        );
    };
    let (mut compared, mut quiet) = (Vec::new(), Vec::new());
    let (mut unmatched, mut silent) = (Vec::new(), Vec::new());
    for n in nodes {
        // An agent that was not scraped fails the other checks at the end of the window.
        let Some(sample) = n.sample else { continue };
        let Some(now) = sample.line_counts() else {
            silent.push(n.name.to_string());
            continue;
        };
        if now.read < MIN_DROP_LINES {
            quiet.push(n.name.to_string());
            continue;
        }
        // Not in the sample of a large step, or a stable agent that read too little.
        match baseline.get(n.name).filter(|b| b.read >= MIN_DROP_LINES) {
            Some(&before) => compared.push(DropShares {
                node: n.name,
                before,
                now,
            }),
            None => unmatched.push(n.name.to_string()),
        }
    }
    let aside = notes([
        (!quiet.is_empty()).then(|| {
            format!(
                "too few lines to judge (under {MIN_DROP_LINES} read): {}",
                few(&quiet)
            )
        }),
        (!unmatched.is_empty())
            .then(|| format!("no stable line counts to compare with: {}", few(&unmatched))),
        (!silent.is_empty()).then(|| {
            format!(
                "{} not exported by the new agent: {}",
                names::ALL_READ_LINES_TOTAL,
                few(&silent)
            )
        }),
    ]);
    let Some(worst) = compared
        .iter()
        .reduce(|a, b| if b.increase() > a.increase() { b } else { a })
    else {
        // Too quiet to judge is a pass with a note; nothing to compare with, a skip.
        let value = if quiet.is_empty() { "skipped" } else { "-" };
        return result(
            true,
            value.into(),
            aside.unwrap_or_else(|| "no node of the step to compare".into()),
        );
    };
    // A hair of tolerance: 45% - 35% is 0.0999... or 0.1000...1 in floating point.
    let over = worst.increase() > limit + 1e-9;
    let share = DropShares::share;
    let mut message = format!(
        "worst node {}: {} of {} lines dropped by the stable revision -> {} of {} by the new one, {} nodes compared",
        worst.node,
        percent(share(worst.before)),
        worst.before.read,
        percent(share(worst.now)),
        worst.now.read,
        compared.len()
    );
    for part in [
        aside,
        over.then(|| {
            "raise rollout.verify.maxDropIncrease if the new drop rule is intended".to_string()
        }),
    ]
    .into_iter()
    .flatten()
    {
        message.push_str("; ");
        message.push_str(&part);
    }
    result(!final_check || !over, percent(share(worst.now)), message)
}

/// Is this verdict written into the status (`lastVerification`)? A passing check during a
/// window is not: its numbers change at every look, and the status would be written
/// every few seconds for nothing. The end of a window and any failure are, except a step
/// held on an unreachable store once its hold is recorded (it is asked again at each
/// look, with the same answer).
pub fn worth_recording(
    v: &Verdict,
    revision: &str,
    step: usize,
    last: Option<&Verification>,
) -> bool {
    let held_already = v.store_unreachable.is_some()
        && last.is_some_and(|l| {
            !l.passed && l.revision == revision && l.step == i32::try_from(step).ok()
        });
    (!v.passed || v.final_check) && !held_already
}

/// The record of a verification for the status.
pub fn record(
    revision: &str,
    step: usize,
    checks: Vec<CheckResult>,
    verdict: &Verdict,
    now: &str,
) -> Verification {
    Verification {
        revision: revision.to_string(),
        step: i32::try_from(step).ok(),
        finished_at: Some(now.to_string()),
        passed: verdict.passed,
        checks,
    }
}

/// A pod to measure.
#[derive(Clone, Debug)]
pub struct Target {
    pub pod: String,
    pub uid: String,
    pub node: String,
    pub ip: Option<String>,
}

impl Target {
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> Self {
        use kube::ResourceExt;
        Self {
            pod: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        }
    }
}

/// The I/O half: HTTP client, the CPU baselines (pod uid -> time, cpu seconds) and the
/// last stable baseline measured per LogPipeline.
pub struct Verifier {
    http: reqwest::Client,
    baselines: Mutex<HashMap<String, (Instant, f64)>>,
    /// The last step baseline measured per LogPipeline. A reconcile that starts before
    /// the status carrying a baseline is back in the cache sees none and asks again,
    /// after the step moved some of its nodes: measured again, those nodes would be left
    /// out of it (seen in the rollout tests), so the first measurement is reused.
    step_baselines: Mutex<background::Jobs<StepKey, StreamBaseline>>,
    /// The last verification made per LogPipeline, until a reconcile judges it.
    verifications: Mutex<background::Jobs<MeasureKey, Measurements>>,
}

impl Verifier {
    pub fn new() -> Result<Self, VerifyError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(STORE_TIMEOUT)
            .build()?;
        Ok(Self {
            http,
            baselines: Mutex::new(HashMap::new()),
            step_baselines: Mutex::default(),
            verifications: Mutex::default(),
        })
    }

    pub async fn measure(
        &self,
        targets: &[Target],
        port: i32,
        store: Option<&StoreQuery>,
        final_check: bool,
    ) -> Measurements {
        let mut m = Measurements::default();
        // Futures collected first: a closure in the stream type trips the compiler's
        // higher-ranked lifetime inference inside the controller's Send future.
        let pending: Vec<_> = targets.iter().map(|t| self.scrape_pair(t, port)).collect();
        let scrapes = futures::stream::iter(pending)
            .buffer_unordered(SCRAPE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut need_second = Vec::new();
        for (t, result) in scrapes {
            if let Ok(sample) = &result {
                match self.rate(&t.uid, sample.cpu_seconds) {
                    Some(rate) => {
                        m.cpu_millis.insert(t.pod.clone(), rate);
                    }
                    None => need_second.push(t),
                }
            }
            m.samples.insert(t.pod.clone(), result);
        }
        if final_check && !need_second.is_empty() {
            // No baseline (operator restarted): a second scrape gives a rate.
            tokio::time::sleep(Duration::from_secs(1)).await;
            for t in need_second {
                if let Ok(sample) = self.scrape(t, port).await
                    && let Some(rate) = self.rate(&t.uid, sample.cpu_seconds)
                {
                    m.cpu_millis.insert(t.pod.clone(), rate);
                }
            }
        }
        match store {
            // The store's answers count only at the end of the window: no query every few
            // seconds before it.
            Some(_) if !final_check => {
                m.store = Some(Err(StoreError::NotYet));
            }
            Some(q) => {
                let nodes: Vec<&str> = targets.iter().map(|t| t.node.as_str()).collect();
                m.wrote_since = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|now| now.saturating_sub(q.window).as_secs_f64());
                let (counts, newest) = self.ask_store(q, &nodes).await;
                m.store = Some(counts);
                m.newest_queryable = newest;
            }
            None => {}
        }
        m
    }

    /// What each target's agent says, by node, for step `step`'s baseline (the stable
    /// agents it is about to replace): active streams, lines read and dropped. An agent
    /// that cannot be scraped, or does not export a count, is left out of that count: its
    /// node is not compared by the check that uses it.
    pub async fn baseline(&self, step: usize, targets: &[Target], port: i32) -> StreamBaseline {
        let pending: Vec<_> = targets.iter().map(|t| self.scrape_pair(t, port)).collect();
        let scrapes = futures::stream::iter(pending)
            .buffer_unordered(SCRAPE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut baseline = StreamBaseline {
            step: i32::try_from(step).unwrap_or(i32::MAX),
            ..Default::default()
        };
        for (t, result) in scrapes {
            let Ok(sample) = result else { continue };
            if let Some(streams) = sample.active_streams {
                baseline
                    .nodes
                    .insert(t.node.clone(), streams.round() as i64);
            }
            if let Some(counts) = sample.line_counts() {
                baseline.drops.insert(t.node.clone(), counts);
            }
        }
        baseline
    }

    /// Millicores since the first sample of this pod (the average over the step, not
    /// the noise between two scrapes); `None` for the first sample.
    fn rate(&self, uid: &str, cpu_seconds: f64) -> Option<f64> {
        let now = Instant::now();
        let mut map = self.baselines.lock().ok()?;
        let (then, cpu) = match map.get(uid) {
            Some(first) => *first,
            None => {
                map.insert(uid.to_string(), (now, cpu_seconds));
                return None;
            }
        };
        let secs = now.duration_since(then).as_secs_f64();
        (secs >= 0.5).then(|| ((cpu_seconds - cpu).max(0.0) / secs) * 1000.0)
    }

    /// Forget pods that are gone (bounded memory).
    pub fn retain(&self, uids: &[String]) {
        if let Ok(mut map) = self.baselines.lock() {
            map.retain(|uid, _| uids.contains(uid));
        }
    }

    async fn scrape_pair<'t>(
        &self,
        t: &'t Target,
        port: i32,
    ) -> (&'t Target, Result<Sample, String>) {
        (t, self.scrape(t, port).await)
    }

    async fn scrape(&self, t: &Target, port: i32) -> Result<Sample, String> {
        let ip = t.ip.as_deref().ok_or("no pod IP yet")?;
        let url = format!("http://{ip}:{port}{}", logpipe_api::process::METRICS_PATH);
        let response = self
            .http
            .get(&url)
            .timeout(SCRAPE_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: {}", response.status()));
        }
        let text = response
            .text()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        Ok(parse_metrics(&text))
    }
}

#[cfg(test)]
mod tests;
