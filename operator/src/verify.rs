//! Verification of a rollout step: measure the step's agents, then judge (pure).
//!
//! # Flow
//! 1. [`Verifier::measure`] (the I/O): scrape each step pod's `/metrics` at
//!    `podIP:<monitoring.port>`, and, when a store is set (`rollout.verify.query`, or the
//!    deprecated `queryEndpoint`: Loki), ask it for the step's nodes' entries over the
//!    window and their newest entry, for the LogPipeline's tenant: LogQL for Loki
//!    ([`loki`]), LogsQL for VictoriaLogs ([`victorialogs`]). The requests are built and
//!    the answers read by pure functions; this module only sends them. Every call has a
//!    timeout; scrapes run concurrently (bounded).
//! 2. [`judge`] (pure): each check with its measured value and its limit, recorded in
//!    `status.lastVerification.checks`.
//!
//! Checks (values are the worst over the step's nodes):
//! - `podsReady` (`ready/total`, by the agent's own readiness: `Ready` or
//!   `ContainersReady`, so a node heartbeat lapse is not blamed on the revision) and
//!   `restarts`; a container waiting on `ErrImagePull`,
//!   `ImagePullBackOff`, `CrashLoopBackOff`... fails at once;
//! - `entriesSent` (`promtail_sent_entries_total`, must be > 0), `sendErrors` (push
//!   requests answered 4xx/5xx, from `promtail_request_duration_seconds_count`; not 422,
//!   Loki's answer to the agent's readiness probe, an empty push),
//!   `droppedEntries` (`promtail_dropped_entries_total`), both must be 0;
//! - `storeEntries`: the step's nodes' entries in the store over the window (> 0 on every
//!   node), asked at the end of the window only; recorded as skipped when no store is
//!   set;
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
//!   reasons, send errors, dropped entries, memory): a failure rolls back at once. At the
//!   end of the window every check counts, and an agent that cannot be scraped fails.
//! - The agent's counters start at 0 with the new pod (it never restarted, or the step
//!   already failed), so they measure this revision only.
//!
//! # Caveats
//! - CPU is a rate between two scrapes: the first scrape of a pod is its baseline (kept
//!   in memory; after an operator restart the final check scrapes twice, 1 s apart).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;

pub use crate::crd::StoreKind;
use crate::crd::{CheckResult, Verification, VerifySpec};
use crate::rollout::{PodView, Verdict};

pub mod loki;
mod store;
pub mod victorialogs;

pub use store::{StoreAnswer, StoreQuery, StoreRequest, answer};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
const SCRAPE_CONCURRENCY: usize = 16;
/// Nodes of a step whose written -> queryable latency Loki is asked about (one query each).
const LATENCY_SAMPLE_NODES: usize = 5;
/// Waiting reasons that mean the new agent will not run without a change.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

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
}

/// Sum of every series of each metric we read (labels ignored: one agent, one host).
pub fn parse_metrics(text: &str) -> Sample {
    let mut s = Sample::default();
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
            "promtail_sent_entries_total" => s.sent_entries += value,
            "promtail_dropped_entries_total" => s.dropped_entries += value,
            "promtail_request_duration_seconds_count" => {
                let code = label(labels, "status_code").unwrap_or_default();
                // 422 answers the agent's readiness probe (an empty push), not an entry.
                if (code.starts_with('4') && code != "422") || code.starts_with('5') {
                    s.error_requests += value;
                }
            }
            "process_cpu_seconds_total" => s.cpu_seconds += value,
            "process_resident_memory_bytes" => s.rss_bytes += value,
            "logpipe_delivery_latency_seconds_sum" => s.latency_sum += value,
            "logpipe_delivery_latency_seconds_count" => s.latency_count += value,
            "logpipe_newest_entry_timestamp_seconds" => {
                s.newest_entry = s.newest_entry.max(value);
            }
            _ => {}
        }
    }
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
    /// Per node: entries in the store over the window; `None`: no store set.
    pub store: Option<Result<BTreeMap<String, f64>, String>>,
    /// Per node (the step's nodes, or a sample of them, at the end of the window): time of
    /// the newest entry the store returns, asked right after the scrape (Unix seconds).
    pub newest_queryable: BTreeMap<String, f64>,
}

/// How far what the store can return trails what the agents have read, worst node: for
/// each node the store was asked about, the newest entry its agent read minus the newest
/// entry the store returns for it (0 when it has caught up: a quiet node is not late).
/// The agent reads within a poll interval (250 ms) of the write, so this is
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
        let fatal: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                let reason = p.waiting_reason.as_deref()?;
                FATAL_WAITING
                    .contains(&reason)
                    .then(|| format!("{} on {}", reason, p.node.as_deref().unwrap_or(&p.name)))
            })
            .collect();
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
    if spec.shipping {
        let min_sent = scraped
            .iter()
            .map(|(_, s)| s.sent_entries)
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.min(v)))
            });
        push(
            CheckResult {
                name: "entriesSent".into(),
                passed: !final_check || (unscraped.is_empty() && min_sent.is_some_and(|v| v > 0.0)),
                value: Some(min_sent.map_or("-".into(), |v| format!("{v:.0}"))),
                limit: Some(">0".into()),
                message: (!unscraped.is_empty())
                    .then(|| format!("not scraped: {}", unscraped.join("; "))),
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
    }
    match &m.store {
        None => push(
            CheckResult {
                name: "storeEntries".into(),
                passed: true,
                value: Some("skipped".into()),
                limit: None,
                message: Some("rollout.verify.query is not set".into()),
            },
            false,
        ),
        Some(Err(e)) => push(
            CheckResult {
                name: "storeEntries".into(),
                passed: !final_check,
                value: Some("-".into()),
                limit: Some(">0".into()),
                message: Some(e.clone()),
            },
            false,
        ),
        Some(Ok(counts)) => {
            let nodes: Vec<&str> = pods.iter().filter_map(|p| p.node.as_deref()).collect();
            let min = nodes
                .iter()
                .map(|n| counts.get(*n).copied().unwrap_or(0.0))
                .fold(f64::INFINITY, f64::min);
            let min = if min.is_finite() { min } else { 0.0 };
            let empty: Vec<&str> = nodes
                .iter()
                .copied()
                .filter(|n| counts.get(*n).copied().unwrap_or(0.0) <= 0.0)
                .collect();
            push(
                CheckResult {
                    name: "storeEntries".into(),
                    passed: !final_check || empty.is_empty(),
                    value: Some(format!("{min:.0}")),
                    limit: Some(">0".into()),
                    message: (!empty.is_empty())
                        .then(|| format!("no entries from {}", empty.join(", "))),
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
                    "mean delivery latency, file write to push acknowledgement",
                )
            }
        };
        push(
            CheckResult {
                name: "latency".into(),
                passed: !final_check || value.is_some_and(|v| v <= max_latency.0.as_secs_f64()),
                value: Some(value.map_or("-".into(), |v| format!("{v:.2}s"))),
                limit: Some(max_latency.to_string()),
                message: Some(message.into()),
            },
            false,
        );
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
    };
    (checks.into_iter().map(|(c, _)| c).collect(), verdict)
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

/// The I/O half: HTTP client and the CPU baselines (pod uid -> time, cpu seconds).
pub struct Verifier {
    http: reqwest::Client,
    baselines: Mutex<HashMap<String, (Instant, f64)>>,
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
                m.store = Some(Err("counted at the end of the window".into()));
            }
            Some(q) => {
                let nodes: Vec<&str> = targets.iter().map(|t| t.node.as_str()).collect();
                let (counts, newest) = self.ask_store(q, &nodes).await;
                m.store = Some(counts);
                m.newest_queryable = newest;
            }
            None => {}
        }
        m
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
        let url = format!("http://{ip}:{port}/metrics");
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
