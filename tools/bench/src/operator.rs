//! `make bench-operator` (issue 7, operator side): the operator on a KWOK test bed with
//! many nodes, against a native DaemonSet RollingUpdate.
//!
//! ```text
//! operator process (release build, counted kube client, /metrics on 127.0.0.1)
//!   apply LogPipeline (release 1) -> DaemonSet created        : apply_to_daemonset_s
//!   -> Healthy with every node (first install, one 100% step)  : install_s
//!   -> image tag release 2 -> canary, steps, soak -> Healthy, every pod at the new
//!      revision and Ready                                       : rollout_s
//!      /metrics before and after                               : API requests, reconcile p50/p99
//!      VmRSS sampled every 200 ms                               : peak, steady (after Healthy)
//! native DaemonSet, same pod template, RollingUpdate with the same maxUnavailable
//!   -> release 2 -> updated == available == desired           : native_rollout_s
//! ```
//!
//! The agent pods are plain KWOK pods (no `kwok.x-k8s.io/status: custom` annotation), so
//! KWOK makes them Ready at once and no real agent runs: the checks are set to what such
//! pods can pass (pods Ready, no shipping, no Loki, no CPU or memory budget) and the
//! windows and soak to zero, so the figures are the operator's own pace plus the cluster's
//! (API server, DaemonSet controller, scheduler, KWOK). Every wait is bounded, and the
//! operator process and the namespaces are removed at the end, on error too.
//!
//! Results: `target/bench/operator.json` (the `operator` section of results.json), merged
//! into `results.json` and `results.md` when those exist (and read by the agent bench when
//! it writes them later).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use logpipe_e2e::cluster::{self, ensure_namespace, install_crd, logpipelines as lp_api};
use logpipe_e2e::operator::{Launch, Operator};
use logpipe_e2e::{Wait, poll};
use serde_json::{Map, Value, json};

use super::BenchError;

pub mod fleet;
use super::procstat;
use super::report::{median, put};

const FIELD_MANAGER: &str = "logpipe-bench";
const LP_NAME: &str = "logpipe";
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=logpipe-agent";
const NATIVE_NAME: &str = "native-agent";
const MIB: f64 = 1048576.0;
/// The headline keys carry the node count of the issue; a run with another count leaves
/// them null and says so (the figures are under `rollout_s` and `native_rollout_s`).
pub const HEADLINE_NODES: usize = 1000;

/// Everything one operator bench run needs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The test bed's directory (kubeconfigs under `<dir>/<cluster>/kubeconfig`).
    pub testbed_dir: PathBuf,
    pub cluster: String,
    pub operator: PathBuf,
    /// Output directory: operator.json, the operator's log.
    pub out: PathBuf,
    /// Nodes the bed was started with (make bench-operator's NODES); the run checks them.
    pub expected_nodes: Option<usize>,
    /// `spec.rollout.maxUnavailable`, and the native DaemonSet's; `None`: 10% of the nodes.
    pub max_unavailable: Option<i32>,
    /// Seconds of steady state after the rollout (RSS, requests per minute).
    pub steady: Duration,
    pub install_timeout: Duration,
    pub rollout_timeout: Duration,
    pub command: String,
}

fn say(message: impl AsRef<str>) {
    eprintln!("[bench-operator] {}", message.as_ref());
}

fn other(message: impl Into<String>) -> BenchError {
    BenchError::Other(message.into())
}

fn kube_err(what: &str) -> impl FnOnce(kube::Error) -> BenchError + '_ {
    move |e| BenchError::Other(format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Prometheus text: samples, histogram quantiles (pure, unit tested)
// ---------------------------------------------------------------------------------------

/// One sample of a Prometheus/OpenMetrics text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of an exposition (comments and `# EOF` skipped; unparsable lines too).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

/// Cumulative histogram buckets `(le, count)` of `name` (`<name>_bucket`), sorted by `le`.
pub fn buckets(samples: &[Sample], name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut out: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == bucket)
        .filter_map(|s| {
            let le = s.labels.get("le")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, s.value))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `after - before`, bucket by bucket (what happened between two scrapes).
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, count)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, (count - old).max(0.0))
        })
        .collect()
}

/// The q-quantile of cumulative buckets, as Prometheus' `histogram_quantile` computes it:
/// linear interpolation inside the bucket holding rank `q * count` (from 0 for the first
/// bucket); a rank in the `+Inf` bucket gives the largest finite bound. `None` when empty.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last().map(|(_, c)| *c)?;
    if !(0.0..=1.0).contains(&q) || total <= 0.0 || buckets.len() < 2 {
        return None;
    }
    let rank = q * total;
    let index = buckets.iter().position(|(_, c)| *c >= rank)?;
    let (upper, count) = buckets[index];
    if upper.is_infinite() {
        return Some(buckets[buckets.len() - 2].0);
    }
    let (lower, below) = if index == 0 {
        (0.0f64.min(upper), 0.0)
    } else {
        buckets[index - 1]
    };
    if count - below <= 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / (count - below))
}

/// Whether the q-quantile falls in the `+Inf` bucket: [`histogram_quantile`] then gives
/// the largest finite bound, a lower bound of the real value.
pub fn beyond_last_bound(q: f64, buckets: &[(f64, f64)]) -> bool {
    let Some(total) = buckets.last().map(|(_, c)| *c) else {
        return false;
    };
    let finite = buckets
        .iter()
        .rev()
        .find(|(le, _)| le.is_finite())
        .map_or(0.0, |(_, c)| *c);
    total > 0.0 && finite < q * total
}

/// `logpipe_operator_kube_requests_total` by (verb, resource).
pub fn requests(samples: &[Sample]) -> BTreeMap<(String, String), f64> {
    samples
        .iter()
        .filter(|s| s.name == "logpipe_operator_kube_requests_total")
        .map(|s| {
            let get = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            ((get("verb"), get("resource")), s.value)
        })
        .collect()
}

/// Requests between two scrapes: total, by verb, by `verb resource`.
pub fn request_delta(before: &[Sample], after: &[Sample]) -> Value {
    let (old, new) = (requests(before), requests(after));
    let mut by_verb: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_call: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    for (key, value) in &new {
        let n = (value - old.get(key).copied().unwrap_or(0.0))
            .max(0.0)
            .round() as u64;
        if n == 0 {
            continue;
        }
        total += n;
        *by_verb.entry(key.0.clone()).or_default() += n;
        by_call.insert(format!("{} {}", key.0, key.1), n);
    }
    json!({"total": total, "by_verb": by_verb, "by_verb_resource": by_call})
}

fn scalar(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.is_empty())
        .map(|s| s.value)
}

// ---------------------------------------------------------------------------------------
// results.json / results.md merge (pure, unit tested)
// ---------------------------------------------------------------------------------------

/// The `operator` section when operator.json does not exist (or cannot be read).
pub fn missing_section(reason: &str) -> Value {
    let mut reasons = Map::new();
    let mut obj = Map::new();
    for key in [
        "nodes",
        "apply_to_daemonset_s",
        "rollout_1000_nodes_s",
        "native_rollout_1000_nodes_s",
        "api_requests_per_rollout",
        "peak_rss_bytes",
        "steady_rss_bytes",
        "reconcile_p50_s",
        "reconcile_p99_s",
    ] {
        obj.insert(key.into(), Value::Null);
        reasons.insert(key.into(), json!(reason));
    }
    obj.insert("reason".into(), json!(reason));
    obj.insert("reasons".into(), Value::Object(reasons));
    Value::Object(obj)
}

/// The `operator` section for results.json: operator.json in `dir` when it is there.
pub fn load_section(dir: &Path) -> Value {
    let path = dir.join("operator.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(value) if value.is_object() => value,
            Ok(_) => missing_section(&format!("{} is not a JSON object", path.display())),
            Err(e) => missing_section(&format!("{} is not valid JSON: {e}", path.display())),
        },
        Err(_) => missing_section(
            "not measured in this run: operator.json is missing (make bench-operator writes it)",
        ),
    }
}

/// results.json with its `operator` section replaced.
pub fn merge_json(mut results: Value, section: Value) -> Value {
    if let Some(obj) = results.as_object_mut() {
        obj.insert("operator".into(), section);
    }
    results
}

pub const MD_BEGIN: &str = "<!-- operator:begin -->";
pub const MD_END: &str = "<!-- operator:end -->";

/// results.md with the operator section (between the markers) replaced, or appended.
pub fn merge_md(md: &str, section: &str) -> String {
    let block = format!("{MD_BEGIN}\n{}\n{MD_END}\n", section.trim_end());
    match (md.find(MD_BEGIN), md.find(MD_END)) {
        (Some(begin), Some(end)) if end > begin => {
            let after = &md[end + MD_END.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            format!("{}{block}{after}", &md[..begin])
        }
        _ => {
            let sep = if md.is_empty() || md.ends_with("\n\n") {
                ""
            } else if md.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{md}{sep}{block}")
        }
    }
}

fn num(section: &Value, key: &str) -> Option<f64> {
    section.get(key).and_then(Value::as_f64)
}

fn cell(section: &Value, key: &str, show: impl Fn(f64) -> String) -> String {
    match num(section, key) {
        Some(v) => show(v),
        None => {
            let reason = section
                .pointer(&format!("/reasons/{key}"))
                .and_then(Value::as_str)
                .unwrap_or("not measured");
            format!("— ({reason})")
        }
    }
}

/// The Markdown section for results.md, from the `operator` JSON section.
pub fn markdown(section: &Value) -> String {
    let nodes = num(section, "nodes").map_or("?".to_string(), |n| format!("{n:.0}"));
    let mut md = format!("## Operator ({nodes} KWOK nodes)\n\n");
    if let Some(command) = section.get("command").and_then(Value::as_str) {
        md.push_str(&format!("`{command}`"));
        if let Some(s) = section.get("settings") {
            md.push_str(&format!(
                " — steps {}, maxUnavailable {}, checks: {}; operator `{}`.",
                s["steps"],
                s["max_unavailable"],
                s["checks"].as_str().unwrap_or("?"),
                s["operator_profile"].as_str().unwrap_or("?"),
            ));
        }
        md.push_str("\n\n");
    }
    let secs = |v: f64| format!("{v:.1} s");
    let rows: Vec<(&str, String)> = vec![
        (
            "kubectl apply -> DaemonSet created",
            cell(section, "apply_to_daemonset_s", |v| format!("{v:.2} s")),
        ),
        (
            "first install: apply -> Healthy, every node",
            cell(section, "install_s", secs),
        ),
        (
            "phased rollout (canary, steps, soak) -> Healthy",
            cell(section, "rollout_s", secs),
        ),
        (
            "native RollingUpdate, same maxUnavailable",
            cell(section, "native_rollout_s", secs),
        ),
        (
            "API requests per rollout",
            cell(section, "api_requests_per_rollout", |v| format!("{v:.0}")),
        ),
        (
            "reconciles per rollout",
            cell(section, "reconciles_per_rollout", |v| format!("{v:.0}")),
        ),
        (
            "reconcile duration p50",
            cell(section, "reconcile_p50_s", |v| format!("{:.0} ms", v * 1e3)),
        ),
        (
            "reconcile duration p99",
            cell(section, "reconcile_p99_s", |v| {
                let bound = section["reconcile_p99_is_lower_bound"] == json!(true);
                format!("{}{:.0} ms", if bound { "≥ " } else { "" }, v * 1e3)
            }),
        ),
        (
            "operator RSS before the first apply",
            cell(section, "idle_rss_bytes", |v| format!("{:.1} MiB", v / MIB)),
        ),
        (
            "operator peak RSS (VmHWM)",
            cell(section, "peak_rss_bytes", |v| format!("{:.1} MiB", v / MIB)),
        ),
        (
            "operator steady RSS (median after Healthy)",
            cell(section, "steady_rss_bytes", |v| {
                format!("{:.1} MiB", v / MIB)
            }),
        ),
        (
            "API requests per minute, steady",
            cell(section, "steady_api_requests_per_min", |v| {
                format!("{v:.1}")
            }),
        ),
    ];
    md.push_str("| figure | value |\n|---|---|\n");
    for (name, value) in rows {
        md.push_str(&format!("| {name} | {value} |\n"));
    }
    if let Some(by_verb) = section
        .pointer("/api_requests/by_verb")
        .and_then(Value::as_object)
    {
        let parts: Vec<String> = by_verb.iter().map(|(k, v)| format!("{k} {v}")).collect();
        md.push_str(&format!(
            "\nAPI requests per rollout by verb: {}.",
            parts.join(", ")
        ));
        if let Some(calls) = section
            .pointer("/api_requests/by_verb_resource")
            .and_then(Value::as_object)
        {
            let parts: Vec<String> = calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
            md.push_str(&format!(" By verb and resource: {}.", parts.join(", ")));
        }
        md.push('\n');
    }
    if let Some(phases) = section.get("phases").and_then(Value::as_array)
        && !phases.is_empty()
    {
        let parts: Vec<String> = phases
            .iter()
            .map(|p| {
                format!(
                    "{} {:.1} s",
                    p["phase"].as_str().unwrap_or("?"),
                    p["at_s"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        md.push_str(&format!(
            "\nPhases of the rollout (time since the change): {}.\n",
            parts.join(" → ")
        ));
    }
    if let Some(note) = section.get("note").and_then(Value::as_str) {
        md.push_str(&format!("\n{note}\n"));
    }
    md
}

/// Merge operator.json into results.json and results.md in `dir`, when they exist.
pub fn merge_into_results(dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let section = load_section(dir);
    let mut written = Vec::new();
    let json_path = dir.join("results.json");
    if let Ok(text) = std::fs::read_to_string(&json_path) {
        let results: Value = serde_json::from_str(&text)
            .map_err(|e| other(format!("{}: {e}", json_path.display())))?;
        let merged = merge_json(results, section.clone());
        let text = serde_json::to_string_pretty(&merged)
            .map_err(|e| other(format!("results.json: {e}")))?;
        std::fs::write(&json_path, text + "\n").map_err(BenchError::io(&json_path))?;
        written.push(json_path);
    }
    let md_path = dir.join("results.md");
    if let Ok(md) = std::fs::read_to_string(&md_path) {
        std::fs::write(&md_path, merge_md(&md, &markdown(&section)))
            .map_err(BenchError::io(&md_path))?;
        written.push(md_path);
    }
    Ok(written)
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// The operator as a child process (SIGKILLed when dropped, also on error), once it leads
/// (the controller starts after the lease).
async fn start_operator(
    options: &Options,
    kubeconfig: &Path,
    ns: Option<&str>,
) -> Result<Operator, BenchError> {
    std::fs::create_dir_all(&options.out).map_err(BenchError::io(&options.out))?;
    let mut operator = Operator::spawn(&Launch {
        binary: options.operator.clone(),
        kubeconfig: kubeconfig.to_path_buf(),
        namespace: ns.map(str::to_string),
        identity: "bench".into(),
        log: options.out.join("operator.log"),
        rust_log: "info,kube=warn,kube_lease_manager=warn".into(),
        args: vec!["--log-format".into(), "json".into()],
    })?;
    let metrics = operator.metrics.clone();
    operator
        .wait_until("the operator leading", Duration::from_secs(60), || {
            let metrics = metrics.clone();
            async move {
                let leader = scrape_url(&metrics)
                    .await
                    .ok()
                    .and_then(|samples| scalar(&samples, "logpipe_operator_leader"));
                match leader {
                    Some(1.0) => Ok(()),
                    other => Err(Wait::from(format!("logpipe_operator_leader {other:?}"))),
                }
            }
        })
        .await?;
    Ok(operator)
}

/// The samples of the operator's /metrics.
async fn scrape(operator: &Operator) -> Result<Vec<Sample>, BenchError> {
    Ok(parse_exposition(&operator.scrape().await?))
}

async fn scrape_url(url: &str) -> Result<Vec<Sample>, String> {
    let answer = logpipe_e2e::http_client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(parse_exposition(
        &answer.text().await.map_err(|e| e.to_string())?,
    ))
}

/// VmRSS of a process every 200 ms, with the time of each sample.
struct RssSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            // Bounded: ten hours of samples at most.
            for _ in 0..180_000u32 {
                tick.tick().await;
                let Ok(sample) = procstat::sample(pid) else {
                    return;
                };
                if let Ok(mut all) = sink.lock() {
                    all.push((Instant::now(), sample.rss));
                }
            }
        });
        Self { samples, task }
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<f64> {
        self.samples
            .lock()
            .map(|all| {
                all.iter()
                    .filter(|(t, _)| *t >= from && *t <= to)
                    .map(|(_, rss)| *rss as f64)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deletes the namespaces it holds when dropped (from a thread with its own runtime: the
/// caller's may be unwinding), waiting a bounded time.
struct Namespaces {
    client: kube::Client,
    names: Vec<String>,
}

impl Namespaces {
    async fn delete_and_wait(&mut self, name: &str, limit: Duration) {
        let api = Api::<Namespace>::all(self.client.clone());
        let _ = api.delete(name, &DeleteParams::default()).await;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(api.get_opt(name).await, Ok(None)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.names.retain(|n| n != name);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let client = self.client.clone();
        let names = std::mem::take(&mut self.names);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let api = Api::<Namespace>::all(client);
                for name in names {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        api.delete(&name, &DeleteParams::default()),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

fn max_unavailable(options: &Options) -> i32 {
    options.max_unavailable.unwrap_or(1).max(1)
}

/// The steps of the phased rollout.
fn steps() -> Value {
    json!([{"canary": {"nodes": 1}}, {"percent": 10}, {"percent": 50}, {"percent": 100}])
}

/// The bench's LogPipeline: plain KWOK pods (no custom-status annotation), checks a
/// simulated pod can pass (Ready, no restarts), zero windows and soak.
fn pipeline(ns: &str, tag: &str, max_unavailable: i32) -> Value {
    json!({
        "apiVersion": "logpipe.io/v1alpha1",
        "kind": "LogPipeline",
        "metadata": {"name": LP_NAME, "namespace": ns},
        "spec": {
            "tenant": "bench",
            "endpoint": "http://127.0.0.1:9/loki/api/v1/push",
            "agent": {
                "image": format!("reg.local/logpipe-agent:{tag}"),
                "tolerations": [{"operator": "Exists"}],
            },
            "rollout": {
                "maxUnavailable": max_unavailable,
                "steps": steps(),
                "verify": {"window": "0s", "podsReady": true, "shipping": false},
                "soak": "0s",
            },
        },
    })
}

async fn apply_pipeline(client: &kube::Client, ns: &str, lp: &Value) -> Result<(), BenchError> {
    lp_api(client, ns)
        .patch(
            LP_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(lp),
        )
        .await
        .map_err(kube_err("applying the LogPipeline"))?;
    Ok(())
}

/// (generation, status) of the LogPipeline.
async fn lp_status(client: &kube::Client, ns: &str) -> Result<(Option<i64>, Value), String> {
    let lp = lp_api(client, ns)
        .get(LP_NAME)
        .await
        .map_err(|e| e.to_string())?;
    Ok((lp.metadata.generation, lp.data["status"].clone()))
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Agent pods Ready at `revision` (and how many pods in all).
async fn pods_at(
    client: &kube::Client,
    ns: &str,
    revision: &str,
) -> Result<(usize, usize), String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .map_err(|e| e.to_string())?;
    let at = pods
        .items
        .iter()
        .filter(|p| {
            is_ready(p)
                && p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("logpipe.io/revision"))
                    .is_some_and(|r| r == revision)
        })
        .count();
    Ok((at, pods.items.len()))
}

#[derive(Debug, Default)]
struct Phases {
    seen: Vec<Value>,
    last: Option<(String, Option<i64>)>,
}

impl Phases {
    fn note(&mut self, at: Duration, status: &Value) {
        let phase = status["phase"].as_str().unwrap_or("").to_string();
        let step = status["currentStep"].as_i64();
        if self.last.as_ref() != Some(&(phase.clone(), step)) {
            say(format!(
                "  {:>7.1}s {:<10} step {:<4} {}",
                at.as_secs_f64(),
                phase,
                step.map_or("-".into(), |s| s.to_string()),
                status["message"].as_str().unwrap_or("")
            ));
            self.seen.push(json!({
                "at_s": at.as_secs_f64(),
                "phase": phase,
                "step": step,
                "message": status["message"],
            }));
            self.last = Some((phase, step));
        }
    }
}

/// Wait until the LogPipeline is Healthy at its current generation, at a revision other
/// than `old`, with every one of `nodes` pods Ready at that revision. Returns the revision.
/// What [`wait_healthy`] waits for: `nodes` pods at a revision other than `old`, within
/// `limit` of `started`.
struct Goal<'a> {
    nodes: usize,
    old: Option<&'a str>,
    started: Instant,
    limit: Duration,
}

async fn wait_healthy(
    operator: &mut Operator,
    client: &kube::Client,
    ns: &str,
    goal: Goal<'_>,
    phases: &mut Phases,
) -> Result<String, BenchError> {
    let Goal {
        nodes,
        old,
        started,
        limit,
    } = goal;
    let mut last = String::new();
    loop {
        operator.check()?;
        if started.elapsed() > limit {
            return Err(other(format!(
                "timed out after {}s waiting for Healthy with {nodes} nodes; last: {last}",
                limit.as_secs()
            )));
        }
        match lp_status(client, ns).await {
            Ok((generation, s)) => {
                phases.note(started.elapsed(), &s);
                let target = s["targetRevision"].as_str().unwrap_or("").to_string();
                let healthy = s["phase"] == "Healthy"
                    && s["observedGeneration"].as_i64() == generation
                    && generation.is_some()
                    && !target.is_empty()
                    && s["stableRevision"].as_str() == Some(target.as_str())
                    && old != Some(target.as_str());
                if healthy {
                    match pods_at(client, ns, &target).await {
                        Ok((at, all)) if at >= nodes && all == at => return Ok(target),
                        Ok((at, all)) => {
                            last =
                                format!("Healthy, {at}/{nodes} pods Ready at {target} ({all} pods)")
                        }
                        Err(e) => last = e,
                    }
                } else {
                    last = s.to_string();
                }
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the operator run measured.
#[derive(Debug, Default)]
struct OperatorRun {
    idle_rss_bytes: Option<f64>,
    apply_to_daemonset_s: Option<f64>,
    install_s: Option<f64>,
    rollout_s: Option<f64>,
    phases: Vec<Value>,
    requests: Option<Value>,
    reconciles: Option<f64>,
    reconcile_p50_s: Option<f64>,
    reconcile_p99_s: Option<f64>,
    reconcile_p99_lower_bound: bool,
    reconcile_mean_s: Option<f64>,
    reconcile_buckets: Vec<(f64, f64)>,
    peak_rss_bytes: Option<f64>,
    peak_rss_sampled_rollout_bytes: Option<f64>,
    steady_rss_bytes: Option<f64>,
    steady_requests_per_min: Option<f64>,
    steady_requests: Option<Value>,
    templates: Option<(Value, Value)>,
    error: Option<String>,
}

const HISTOGRAM: &str = "logpipe_operator_reconcile_duration_seconds";

async fn operator_run(
    options: &Options,
    client: &kube::Client,
    kubeconfig: &Path,
    ns: &str,
    nodes: usize,
    run: &mut OperatorRun,
) -> Result<(), BenchError> {
    let mut operator = start_operator(options, kubeconfig, Some(ns)).await?;
    say(format!(
        "operator pid {} leading (log {})",
        operator.pid,
        operator.log.display()
    ));
    let rss = RssSampler::start(operator.pid);
    let idle_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.idle_rss_bytes = median(rss.between(idle_from, Instant::now()));
    let ds_api = Api::<DaemonSet>::namespaced(client.clone(), ns);

    // Release 1: a first install (every pod at once, verified as one 100% step).
    say(format!("apply LogPipeline release r1 in {ns}"));
    let applied = Instant::now();
    apply_pipeline(client, ns, &pipeline(ns, "r1", max_unavailable(options))).await?;
    poll(
        "the DaemonSet",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            ds_api
                .get_opt(LP_NAME)
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .ok_or(Wait::from("not created yet"))
        },
    )
    .await?;
    run.apply_to_daemonset_s = Some(applied.elapsed().as_secs_f64());
    say(format!(
        "DaemonSet created {:.2}s after the apply",
        applied.elapsed().as_secs_f64()
    ));
    let mut install_phases = Phases::default();
    let r1 = wait_healthy(
        &mut operator,
        client,
        ns,
        Goal {
            nodes,
            old: None,
            started: applied,
            limit: options.install_timeout,
        },
        &mut install_phases,
    )
    .await?;
    run.install_s = Some(applied.elapsed().as_secs_f64());
    say(format!(
        "installed: Healthy at {r1} with {nodes} pods after {:.1}s",
        applied.elapsed().as_secs_f64()
    ));
    let template_r1 = ds_template(&ds_api).await?;
    // Let the install's tail (events, last status writes) pass before the baseline.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Release 2: the phased rollout.
    let before = scrape(&operator).await?;
    let changed = Instant::now();
    say("change the agent image to release r2: phased rollout");
    apply_pipeline(client, ns, &pipeline(ns, "r2", max_unavailable(options))).await?;
    let mut phases = Phases::default();
    let r2 = wait_healthy(
        &mut operator,
        client,
        ns,
        Goal {
            nodes,
            old: Some(&r1),
            started: changed,
            limit: options.rollout_timeout,
        },
        &mut phases,
    )
    .await?;
    let done = Instant::now();
    let after = scrape(&operator).await?;
    run.rollout_s = Some(done.duration_since(changed).as_secs_f64());
    run.phases = phases.seen;
    say(format!(
        "rolled out: Healthy at {r2}, every pod Ready at it, {:.1}s after the change",
        done.duration_since(changed).as_secs_f64()
    ));
    run.templates = Some((template_r1, ds_template(&ds_api).await?));
    run.requests = Some(request_delta(&before, &after));
    let delta = bucket_delta(&buckets(&before, HISTOGRAM), &buckets(&after, HISTOGRAM));
    run.reconcile_p50_s = histogram_quantile(0.5, &delta);
    run.reconcile_p99_s = histogram_quantile(0.99, &delta);
    run.reconcile_p99_lower_bound = beyond_last_bound(0.99, &delta);
    let count = |s: &[Sample]| scalar(s, &format!("{HISTOGRAM}_count")).unwrap_or(0.0);
    let sum = |s: &[Sample]| scalar(s, &format!("{HISTOGRAM}_sum")).unwrap_or(0.0);
    let reconciles = count(&after) - count(&before);
    run.reconciles = Some(reconciles);
    run.reconcile_mean_s = (reconciles > 0.0).then(|| (sum(&after) - sum(&before)) / reconciles);
    run.reconcile_buckets = delta;
    run.peak_rss_sampled_rollout_bytes = rss.between(changed, done).into_iter().reduce(f64::max);
    run.peak_rss_bytes = procstat::sample(operator.pid).ok().map(|s| s.hwm as f64);

    // Steady state: Healthy, nothing moves.
    say(format!(
        "steady state for {}s (RSS, requests)",
        options.steady.as_secs()
    ));
    let settle = Duration::from_secs(5);
    tokio::time::sleep(settle).await;
    let steady_from = Instant::now();
    let steady_before = scrape(&operator).await?;
    tokio::time::sleep(options.steady).await;
    let steady_after = scrape(&operator).await?;
    let steady_to = Instant::now();
    run.steady_rss_bytes = median(rss.between(steady_from, steady_to));
    let steady = request_delta(&steady_before, &steady_after);
    let minutes = steady_to.duration_since(steady_from).as_secs_f64() / 60.0;
    run.steady_requests_per_min = steady["total"]
        .as_f64()
        .filter(|_| minutes > 0.0)
        .map(|n| n / minutes);
    run.steady_requests = Some(steady);

    // Remove the LogPipeline while the operator still runs (its finalizer).
    let _ = lp_api(client, ns)
        .delete(LP_NAME, &DeleteParams::default())
        .await;
    let _ = poll(
        "the LogPipeline deleted",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            match lp_api(client, ns).get_opt(LP_NAME).await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(Wait::from("still there")),
                Err(e) => Err(Wait::from(e.to_string())),
            }
        },
    )
    .await;
    drop(rss);
    drop(operator);
    Ok(())
}

/// Without an operator: drop the LogPipeline's finalizer and delete the cluster-scoped
/// objects it would have deleted (best effort).
async fn force_cleanup(client: &kube::Client, ns: &str) {
    let _ = lp_api(client, ns)
        .patch(
            LP_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    let name = format!("logpipe:{ns}:{LP_NAME}");
    let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
}

async fn ds_template(api: &Api<DaemonSet>) -> Result<Value, BenchError> {
    let ds = api
        .get(LP_NAME)
        .await
        .map_err(kube_err("reading the DaemonSet"))?;
    let spec = ds
        .spec
        .ok_or_else(|| other("the operator's DaemonSet has no spec"))?;
    serde_json::to_value(spec.template).map_err(|e| other(format!("pod template: {e}")))
}

/// The operator's pod template for a native DaemonSet: same spec and annotations, labels
/// of its own (nothing the operator watches).
fn native_template(template: &Value) -> Value {
    let mut t = template.clone();
    t["metadata"]["labels"] = json!({"app.kubernetes.io/name": NATIVE_NAME});
    t
}

fn native_daemon_set(ns: &str, template: &Value, max_unavailable: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": NATIVE_NAME, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NATIVE_NAME}},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": max_unavailable, "maxSurge": 0},
            },
            "template": native_template(template),
        },
    })
}

/// `updatedNumberScheduled == numberAvailable == numberReady == desired` at the current
/// generation, with `desired == nodes`.
async fn native_done(api: &Api<DaemonSet>, nodes: usize) -> Result<(), String> {
    let ds = api.get(NATIVE_NAME).await.map_err(|e| e.to_string())?;
    let generation = ds.metadata.generation;
    let s = ds.status.ok_or("no status yet")?;
    let desired = s.desired_number_scheduled;
    let ok = s.observed_generation == generation
        && usize::try_from(desired).ok() == Some(nodes)
        && s.updated_number_scheduled == Some(desired)
        && s.number_available == Some(desired)
        && s.number_ready == desired
        && s.number_unavailable.unwrap_or(0) == 0;
    ok.then_some(()).ok_or_else(|| {
        format!(
            "desired {desired} updated {:?} available {:?} ready {} (generation {:?}, observed {:?})",
            s.updated_number_scheduled,
            s.number_available,
            s.number_ready,
            generation,
            s.observed_generation
        )
    })
}

async fn native_run(
    options: &Options,
    client: &kube::Client,
    ns: &str,
    nodes: usize,
    templates: &(Value, Value),
) -> Result<(f64, f64), BenchError> {
    // The template names the operator's ServiceAccount: the namespace needs one of that name.
    let account = templates.0["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or(LP_NAME)
        .to_string();
    let sa: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": account, "namespace": ns}
    }))
    .map_err(|e| other(format!("service account: {e}")))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .map_err(kube_err("creating the ServiceAccount"))?;
    let api = Api::<DaemonSet>::namespaced(client.clone(), ns);
    let apply = |template: &Value| {
        let ds = native_daemon_set(ns, template, max_unavailable(options));
        let api = api.clone();
        async move {
            api.patch(
                NATIVE_NAME,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&ds),
            )
            .await
            .map(|_| ())
            .map_err(kube_err("applying the native DaemonSet"))
        }
    };
    say(format!("native DaemonSet release r1 in {ns}"));
    let created = Instant::now();
    apply(&templates.0).await?;
    poll(
        "the native DaemonSet Ready on every node",
        options.install_timeout,
        Duration::from_millis(250),
        || async { native_done(&api, nodes).await.map_err(Wait::Again) },
    )
    .await?;
    let install_s = created.elapsed().as_secs_f64();
    say(format!(
        "native install: every pod Ready after {install_s:.1}s"
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    say("native DaemonSet release r2: RollingUpdate");
    let changed = Instant::now();
    apply(&templates.1).await?;
    // The controller must see the new generation first: `native_done` compares it.
    poll(
        "the native RollingUpdate done",
        options.rollout_timeout,
        Duration::from_millis(250),
        || async { native_done(&api, nodes).await.map_err(Wait::Again) },
    )
    .await?;
    let rollout_s = changed.elapsed().as_secs_f64();
    say(format!("native rollout: done after {rollout_s:.1}s"));
    Ok((install_s, rollout_s))
}

/// Run everything; returns the `operator` section (also when a part failed: the figures it
/// could not measure are null with the reason).
/// The bed checked and the CRD installed: the client, the kubeconfig, the nodes (all, Ready)
/// and the options with maxUnavailable settled (10% of the nodes when unset).
async fn prepare(
    options: &Options,
) -> Result<(kube::Client, PathBuf, usize, usize, Options), BenchError> {
    let kubeconfig = options
        .testbed_dir
        .join(&options.cluster)
        .join("kubeconfig");
    if !kubeconfig.is_file() {
        return Err(other(format!(
            "{} is missing: the test bed is not up (make testbed-up, with the same LOGPIPE_PORT_BASE)",
            kubeconfig.display()
        )));
    }
    if !options.operator.is_file() {
        return Err(other(format!(
            "{} is missing: cargo build --release -p logpipe-operator",
            options.operator.display()
        )));
    }
    let client = logpipe_e2e::kube_client(&kubeconfig).await?;
    let cluster::Nodes {
        all: nodes,
        ready: ready_nodes,
    } = cluster::nodes(&client).await?;
    say(format!(
        "cluster {}: {nodes} nodes ({ready_nodes} Ready), kubeconfig {}",
        options.cluster,
        kubeconfig.display()
    ));
    if let Some(expected) = options.expected_nodes
        && expected != nodes
    {
        return Err(other(format!(
            "the test bed has {nodes} nodes, NODES={expected} expected: restart it with NODES={expected} (down.sh, then up.sh)"
        )));
    }
    if nodes == 0 {
        return Err(other("the test bed has no nodes"));
    }
    let options = Options {
        max_unavailable: Some(
            options
                .max_unavailable
                .unwrap_or_else(|| i32::try_from(nodes.div_ceil(10)).unwrap_or(i32::MAX)),
        ),
        ..options.clone()
    };
    install_crd(&client).await?;
    Ok((client, kubeconfig, nodes, ready_nodes, options))
}

/// `--pipelines N`: see [`fleet`].
pub async fn run_fleet(options: &Options, pipelines: usize) -> Result<Value, BenchError> {
    let (client, kubeconfig, nodes, _, options) = prepare(options).await?;
    fleet::run(&options, &client, &kubeconfig, nodes, pipelines).await
}

pub async fn run(options: &Options) -> Result<Value, BenchError> {
    let (client, kubeconfig, nodes, ready_nodes, options) = prepare(options).await?;
    let options = &options;
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string());
    let suffix = logpipe_e2e::unique_suffix();
    let ns = format!("opbench-{suffix}");
    let native_ns = format!("opbench-native-{suffix}");
    let mut namespaces = Namespaces {
        client: client.clone(),
        names: vec![ns.clone(), native_ns.clone()],
    };
    ensure_namespace(&client, &ns).await?;

    let mut run = OperatorRun::default();
    let operator_started = Instant::now();
    if let Err(e) = operator_run(options, &client, &kubeconfig, &ns, nodes, &mut run).await {
        say(format!("operator run failed: {e}"));
        run.error = Some(e.to_string());
    }
    let operator_wall = operator_started.elapsed();
    if run.error.is_some() {
        // The operator is gone: nobody runs the LogPipeline's finalizer.
        force_cleanup(&client, &ns).await;
    }
    say("deleting the operator's namespace (its pods) before the native run");
    namespaces
        .delete_and_wait(&ns, Duration::from_secs(300))
        .await;

    let native: Result<(f64, f64), String> = match run.templates.clone() {
        Some(templates) => {
            ensure_namespace(&client, &native_ns).await?;
            let result = native_run(options, &client, &native_ns, nodes, &templates)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &result {
                say(format!("native run failed: {e}"));
            }
            namespaces
                .delete_and_wait(&native_ns, Duration::from_secs(300))
                .await;
            result
        }
        None => Err(format!(
            "no pod template: the operator run failed first ({})",
            run.error.as_deref().unwrap_or("?")
        )),
    };
    drop(namespaces);
    let load_after = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string());

    // The section.
    let failed = |what: &str| {
        run.error.as_ref().map_or_else(
            || format!("{what}: not measured"),
            |e| format!("operator run failed: {e}"),
        )
    };
    let mut obj = Map::new();
    let mut reasons = Map::new();
    obj.insert("nodes".into(), json!(nodes));
    obj.insert("nodes_ready".into(), json!(ready_nodes));
    put(
        &mut obj,
        &mut reasons,
        "apply_to_daemonset_s",
        run.apply_to_daemonset_s,
        &failed("apply"),
    );
    put(
        &mut obj,
        &mut reasons,
        "install_s",
        run.install_s,
        &failed("install"),
    );
    put(
        &mut obj,
        &mut reasons,
        "rollout_s",
        run.rollout_s,
        &failed("rollout"),
    );
    let (native_install, native_rollout) = match &native {
        Ok((i, r)) => (Some(*i), Some(*r)),
        Err(_) => (None, None),
    };
    let native_reason = native.as_ref().err().cloned().unwrap_or_default();
    put(
        &mut obj,
        &mut reasons,
        "native_install_s",
        native_install,
        &native_reason,
    );
    put(
        &mut obj,
        &mut reasons,
        "native_rollout_s",
        native_rollout,
        &native_reason,
    );
    let not_headline = format!(
        "this run had {nodes} nodes, not {HEADLINE_NODES}: see rollout_s / native_rollout_s and nodes"
    );
    let headline = |v: Option<f64>, reason: &str| -> (Option<f64>, String) {
        if nodes == HEADLINE_NODES {
            (v, reason.to_string())
        } else {
            (None, not_headline.clone())
        }
    };
    let (v, why) = headline(run.rollout_s, &failed("rollout"));
    put(&mut obj, &mut reasons, "rollout_1000_nodes_s", v, &why);
    let (v, why) = headline(native_rollout, &native_reason);
    put(
        &mut obj,
        &mut reasons,
        "native_rollout_1000_nodes_s",
        v,
        &why,
    );
    put(
        &mut obj,
        &mut reasons,
        "rollout_vs_native",
        match (run.rollout_s, native_rollout) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        },
        "needs both rollouts",
    );
    let requests_total = run.requests.as_ref().and_then(|r| r["total"].as_f64());
    put(
        &mut obj,
        &mut reasons,
        "api_requests_per_rollout",
        requests_total,
        &failed("requests"),
    );
    obj.insert(
        "api_requests".into(),
        run.requests.clone().unwrap_or(Value::Null),
    );
    put(
        &mut obj,
        &mut reasons,
        "reconciles_per_rollout",
        run.reconciles,
        &failed("reconciles"),
    );
    let no_reconcile = if run.reconciles.is_some_and(|n| n > 0.0) {
        failed("reconcile histogram")
    } else {
        "no reconcile observed during the rollout".to_string()
    };
    put(
        &mut obj,
        &mut reasons,
        "reconcile_p50_s",
        run.reconcile_p50_s,
        &no_reconcile,
    );
    put(
        &mut obj,
        &mut reasons,
        "reconcile_p99_s",
        run.reconcile_p99_s,
        &no_reconcile,
    );
    put(
        &mut obj,
        &mut reasons,
        "reconcile_mean_s",
        run.reconcile_mean_s,
        &no_reconcile,
    );
    obj.insert(
        "reconcile_buckets".into(),
        json!(run
            .reconcile_buckets
            .iter()
            .map(|(le, c)| json!({"le": if le.is_finite() { json!(le) } else { json!("+Inf") }, "count": c}))
            .collect::<Vec<_>>()),
    );
    obj.insert(
        "reconcile_p99_is_lower_bound".into(),
        json!(run.reconcile_p99_lower_bound),
    );
    put(
        &mut obj,
        &mut reasons,
        "idle_rss_bytes",
        run.idle_rss_bytes,
        &failed("idle RSS"),
    );
    put(
        &mut obj,
        &mut reasons,
        "peak_rss_bytes",
        run.peak_rss_bytes,
        &failed("peak RSS"),
    );
    put(
        &mut obj,
        &mut reasons,
        "peak_rss_sampled_rollout_bytes",
        run.peak_rss_sampled_rollout_bytes,
        &failed("RSS samples"),
    );
    put(
        &mut obj,
        &mut reasons,
        "steady_rss_bytes",
        run.steady_rss_bytes,
        &failed("steady RSS"),
    );
    put(
        &mut obj,
        &mut reasons,
        "steady_api_requests_per_min",
        run.steady_requests_per_min,
        &failed("steady requests"),
    );
    obj.insert(
        "steady_api_requests".into(),
        run.steady_requests.clone().unwrap_or(Value::Null),
    );
    obj.insert("phases".into(), json!(run.phases));
    obj.insert("error".into(), json!(run.error));
    obj.insert("native_error".into(), json!(native.as_ref().err()));
    obj.insert(
        "settings".into(),
        json!({
            "cluster": options.cluster,
            "steps": steps(),
            "max_unavailable": max_unavailable(options),
            "verify_window": "0s",
            "soak": "0s",
            "checks": "podsReady only (KWOK-simulated pods: no agent runs, so no shipping, Loki, CPU or memory check)",
            "agent_pods": "plain KWOK pods (no kwok.x-k8s.io/status: custom annotation): KWOK makes them Ready at once",
            "native": "DaemonSet with the operator's pod template (own labels), updateStrategy RollingUpdate, maxUnavailable as above, maxSurge 0",
            "operator_binary": options.operator.display().to_string(),
            "operator_profile": if options.operator.components().any(|c| c.as_os_str() == "release") { "release" } else { "debug" },
            "rss_sampling": "VmRSS every 200 ms from /proc/<pid>/status",
            "steady_window_s": options.steady.as_secs_f64(),
        }),
    );
    obj.insert(
        "definitions".into(),
        json!({
            "apply_to_daemonset_s": "server-side apply of the LogPipeline sent -> GET finds the DaemonSet (polled every 50 ms)",
            "install_s": "first apply -> Healthy at its generation, every node's pod Ready at the revision (a first install is one 100% step)",
            "rollout_s": "image tag changed -> Healthy at the new revision, stable == target, every node's pod Ready at it (status polled every 250 ms)",
            "native_rollout_s": "template changed -> observedGeneration current, updatedNumberScheduled == numberAvailable == numberReady == desired (polled every 250 ms)",
            "api_requests_per_rollout": "logpipe_operator_kube_requests_total (a tower layer on the operator's kube client) at Healthy minus before the change; a watch counts once per connection; the DaemonSet controller's, scheduler's and KWOK's requests are not in it",
            "reconcile_p50_s": "from logpipe_operator_reconcile_duration_seconds buckets over the rollout (after - before), interpolated within a bucket as Prometheus' histogram_quantile does; buckets 10ms,50ms,100ms,250ms,500ms,1s,2.5s,5s,10s,30s,60s,120s bound its precision; reconcile_p99_is_lower_bound says when p99 lies above the last bound (then the value is that bound)",
            "idle_rss_bytes": "median VmRSS over 3 s after the operator leads, before the first apply",
            "peak_rss_bytes": "VmHWM of the operator process at Healthy (its whole life: install and rollout)",
            "peak_rss_sampled_rollout_bytes": "largest VmRSS sampled during the rollout",
            "steady_rss_bytes": "median VmRSS over the steady window, starting 5 s after Healthy",
        }),
    );
    obj.insert("command".into(), json!(options.command));
    obj.insert(
        "generated_at".into(),
        json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    );
    obj.insert(
        "operator_run_wall_s".into(),
        json!(operator_wall.as_secs_f64()),
    );
    obj.insert(
        "contention".into(),
        json!({"loadavg_before": load_before, "loadavg_after": load_after,
               "note": "2 cores shared with the whole control plane (API server, etcd, controller-manager, scheduler, KWOK) and with other work: the times are the cluster's pace as much as the operator's"}),
    );
    obj.insert(
        "note".into(),
        json!(format!(
            "Agent pods are KWOK-simulated (Ready at once, no real agent), checks podsReady only, windows and soak 0 s: \
             these are the rollout machinery's own costs on a {nodes}-node cluster, on 2 shared cores. \
             The kube-controller-manager runs with its default client rate limit, which paces the DaemonSet controller's pod creations in both runs."
        )),
    );
    obj.insert("reasons".into(), Value::Object(reasons));
    Ok(Value::Object(obj))
}

/// Write operator.json and merge it into results.json / results.md when they exist.
pub fn write(out: &Path, section: &Value) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(out).map_err(BenchError::io(out))?;
    let path = out.join("operator.json");
    let text =
        serde_json::to_string_pretty(section).map_err(|e| other(format!("operator.json: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(BenchError::io(&path))?;
    let mut written = vec![path];
    written.extend(merge_into_results(out)?);
    Ok(written)
}

/// One line for the terminal.
pub fn headline(section: &Value) -> String {
    let f = |k: &str, digits: usize| {
        num(section, k).map_or("null".to_string(), |v| format!("{v:.digits$}"))
    };
    let mib = |k: &str| num(section, k).map_or("null".to_string(), |v| format!("{:.1}", v / MIB));
    format!(
        "nodes {}: apply->DaemonSet {}s, rollout {}s vs native {}s, {} API requests, reconcile p50 {}s p99 {}s, RSS peak {} MiB steady {} MiB",
        f("nodes", 0),
        f("apply_to_daemonset_s", 2),
        f("rollout_s", 1),
        f("native_rollout_s", 1),
        f("api_requests_per_rollout", 0),
        f("reconcile_p50_s", 3),
        f("reconcile_p99_s", 3),
        mib("peak_rss_bytes"),
        mib("steady_rss_bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "# HELP logpipe_operator_reconcile_duration_seconds Reconcile duration.\n\
# TYPE logpipe_operator_reconcile_duration_seconds histogram\n\
logpipe_operator_reconcile_duration_seconds_sum 3.5\n\
logpipe_operator_reconcile_duration_seconds_count 10\n\
logpipe_operator_reconcile_duration_seconds_bucket{le=\"0.1\"} 2\n\
logpipe_operator_reconcile_duration_seconds_bucket{le=\"0.5\"} 8\n\
logpipe_operator_reconcile_duration_seconds_bucket{le=\"1.0\"} 10\n\
logpipe_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 10\n\
logpipe_operator_kube_requests_total{verb=\"list\",resource=\"pods\"} 7\n\
logpipe_operator_kube_requests_total{verb=\"patch\",resource=\"logpipelines/status\"} 3\n\
logpipe_operator_leader 1\n\
# EOF\n";

    #[test]
    fn parses_samples_with_and_without_labels() {
        let samples = parse_exposition(EXPOSITION);
        assert_eq!(samples.len(), 9);
        assert_eq!(scalar(&samples, "logpipe_operator_leader"), Some(1.0));
        assert_eq!(
            buckets(&samples, HISTOGRAM),
            vec![(0.1, 2.0), (0.5, 8.0), (1.0, 10.0), (f64::INFINITY, 10.0)]
        );
        let odd = parse_line(r#"m{a="x\"y",b="1,2"} 4.5 1700000000"#).unwrap();
        assert_eq!(odd.labels["a"], "x\"y");
        assert_eq!(odd.labels["b"], "1,2");
        assert_eq!(odd.value, 4.5);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let b = vec![(0.1, 2.0), (0.5, 8.0), (1.0, 10.0), (f64::INFINITY, 10.0)];
        // rank 5 of 10: in (0.1, 0.5], 3 of its 6 -> 0.1 + 0.4 * 3/6.
        assert!((histogram_quantile(0.5, &b).unwrap() - 0.3).abs() < 1e-9);
        // rank 9.9: in (0.5, 1.0], 1.9 of its 2.
        assert!((histogram_quantile(0.99, &b).unwrap() - 0.975).abs() < 1e-9);
        // rank 1 in the first bucket: from 0.
        assert!((histogram_quantile(0.1, &b).unwrap() - 0.05).abs() < 1e-9);
        // In the +Inf bucket: the largest finite bound.
        let tail = vec![(0.1, 1.0), (1.0, 2.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.99, &tail), Some(1.0));
        assert!(beyond_last_bound(0.99, &tail));
        assert!(!beyond_last_bound(0.99, &b));
        assert!(!beyond_last_bound(0.2, &tail));
        assert_eq!(
            histogram_quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    #[test]
    fn deltas_between_two_scrapes() {
        let before = parse_exposition(EXPOSITION);
        let after = parse_exposition(
            &EXPOSITION
                .replace("le=\"0.1\"} 2", "le=\"0.1\"} 4")
                .replace("le=\"0.5\"} 8", "le=\"0.5\"} 10")
                .replace("le=\"1.0\"} 10", "le=\"1.0\"} 13")
                .replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 14")
                .replace("resource=\"pods\"} 7", "resource=\"pods\"} 12"),
        );
        let d = bucket_delta(&buckets(&before, HISTOGRAM), &buckets(&after, HISTOGRAM));
        assert_eq!(
            d,
            vec![(0.1, 2.0), (0.5, 2.0), (1.0, 3.0), (f64::INFINITY, 4.0)]
        );
        let r = request_delta(&before, &after);
        assert_eq!(r["total"], 5);
        assert_eq!(r["by_verb"]["list"], 5);
        assert_eq!(r["by_verb_resource"]["list pods"], 5);
        assert!(r["by_verb"].get("patch").is_none());
    }

    #[test]
    fn merges_the_section_into_results_json() {
        let results = json!({"agent": {"x": 1}, "operator": {"rollout_1000_nodes_s": null}});
        let merged = merge_json(
            results,
            json!({"rollout_1000_nodes_s": 12.5, "nodes": 1000}),
        );
        assert_eq!(merged["operator"]["rollout_1000_nodes_s"], 12.5);
        assert_eq!(merged["agent"]["x"], 1);
        let missing = missing_section("not run");
        assert!(missing["steady_rss_bytes"].is_null());
        assert_eq!(missing["reasons"]["steady_rss_bytes"], "not run");
        let dir =
            std::env::temp_dir().join(format!("opbench-test-{}", logpipe_e2e::unique_suffix()));
        assert_eq!(load_section(&dir)["rollout_1000_nodes_s"], Value::Null);
        assert!(load_section(&dir)["reasons"]["rollout_1000_nodes_s"].is_string());
    }

    #[test]
    fn replaces_or_appends_the_markdown_section() {
        let appended = merge_md("# Bench\n\ntext\n", "## Operator\n\n| a | b |\n");
        assert_eq!(
            appended,
            format!("# Bench\n\ntext\n\n{MD_BEGIN}\n## Operator\n\n| a | b |\n{MD_END}\n")
        );
        let replaced = merge_md(&format!("{appended}\nNotes.\n"), "## Operator\n\nnew\n");
        assert_eq!(
            replaced,
            format!("# Bench\n\ntext\n\n{MD_BEGIN}\n## Operator\n\nnew\n{MD_END}\n\nNotes.\n")
        );
        assert_eq!(merge_md(&replaced, "## Operator\n\nnew\n"), replaced);
    }

    #[test]
    fn markdown_shows_values_and_reasons() {
        let mut section = missing_section("bed not up");
        section["nodes"] = json!(1000);
        section["rollout_s"] = json!(61.3);
        let md = markdown(&section);
        assert!(md.contains("## Operator (1000 KWOK nodes)"), "{md}");
        assert!(
            md.contains("| phased rollout (canary, steps, soak) -> Healthy | 61.3 s |"),
            "{md}"
        );
        assert!(
            md.contains("| operator steady RSS (median after Healthy) | — (bed not up) |"),
            "{md}"
        );
    }
}
