//! `target/bench/results.{json,md,png}` from an [`Outcome`].
//!
//! JSON shape: one object per component (`agent`, each comparator by its short name —
//! `otelcol` —, `operator`) holding the headline figures by their issue-7 names; a figure
//! that could not be measured is `null` and its reason is under the component's
//! `reasons`. `ratios.<comparator>` holds ours / theirs of the same run. `operator` is
//! `make bench-operator`'s `operator.json` (see [`super::operator`]), or nulls with
//! reasons. Details per sink (`null`, `store`: VictoriaLogs) and per steady rate sit beside
//! the headline figures; every raw run is under `runs`.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Map, Value, json};

use super::corpus::Shape;
use super::runner::{CorpusRun, Sink, Subject};
use super::steady::SteadyRun;
use super::{BenchError, Options, Outcome};

const MIB: f64 = 1048576.0;

/// Median of finite values.
pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Medians of the successful runs of one (subject, sink).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub runs: usize,
    pub ok: usize,
    pub wall_s: Option<f64>,
    pub cpu_s: Option<f64>,
    pub lines_per_s: Option<f64>,
    pub lines_per_cpu_s: Option<f64>,
    pub mb_per_cpu_s: Option<f64>,
    pub mb_per_s: Option<f64>,
    pub peak_rss_bytes: Option<f64>,
    pub other_cpu_s: Option<f64>,
    pub errors: Vec<String>,
    pub label_names: Vec<String>,
    pub streams: usize,
}

pub fn summarise(runs: &[CorpusRun], subject: Subject, sink: Sink, shape: Shape) -> Summary {
    let mine: Vec<&CorpusRun> = runs
        .iter()
        .filter(|r| r.subject == subject && r.sink == sink && r.shape == shape)
        .collect();
    let ok: Vec<&CorpusRun> = mine.iter().copied().filter(|r| r.ok).collect();
    let m = |f: fn(&CorpusRun) -> f64| median(ok.iter().map(|r| f(r)).collect());
    Summary {
        runs: mine.len(),
        ok: ok.len(),
        wall_s: m(|r| r.wall_s),
        cpu_s: m(|r| r.cpu_s),
        lines_per_s: m(|r| r.lines_per_s),
        lines_per_cpu_s: m(|r| r.lines_per_cpu_s),
        mb_per_cpu_s: m(|r| r.mb_per_cpu_s),
        mb_per_s: m(|r| r.mb_per_s),
        peak_rss_bytes: m(|r| r.peak_rss_bytes as f64),
        other_cpu_s: m(|r| r.other_cpu_s),
        errors: mine.iter().filter_map(|r| r.error.clone()).collect(),
        label_names: ok
            .first()
            .map(|r| r.label_names.clone())
            .unwrap_or_default(),
        streams: ok.first().map_or(0, |r| r.streams),
    }
}

fn steady_of(runs: &[SteadyRun], subject: Subject, rate: u64) -> Option<&SteadyRun> {
    runs.iter()
        .find(|r| r.subject == subject && r.rate_lines_s == rate)
}

/// Sets `key` to `value`, or to `null` with `reason` under `reasons`.
pub(crate) fn put(
    obj: &mut Map<String, Value>,
    reasons: &mut Map<String, Value>,
    key: &str,
    value: Option<f64>,
    reason: &str,
) {
    match value {
        Some(v) if v.is_finite() => {
            obj.insert(key.into(), json!(v));
        }
        _ => {
            obj.insert(key.into(), Value::Null);
            reasons.insert(key.into(), json!(reason));
        }
    }
}

fn summary_json(s: &Summary, sink: &str, skipped: Option<&str>) -> Value {
    if let Some(reason) = skipped {
        return json!({"skipped": true, "reason": reason});
    }
    json!({
        "runs": s.runs,
        "ok_runs": s.ok,
        "median_wall_s": s.wall_s,
        "median_cpu_s": s.cpu_s,
        "median_lines_per_s": s.lines_per_s,
        "median_lines_per_cpu_s": s.lines_per_cpu_s,
        "median_mb_per_cpu_s": s.mb_per_cpu_s,
        "median_mb_per_s": s.mb_per_s,
        "median_peak_rss_bytes": s.peak_rss_bytes.map(|v| v as u64),
        "median_other_machine_cpu_s": s.other_cpu_s,
        "streams": s.streams,
        "label_names": s.label_names,
        "errors": s.errors,
        "sink": sink,
    })
}

struct Side {
    null: Summary,
    store: Summary,
}

/// The headline shape's (the long corpus, when it was run).
fn side(outcome: &Outcome, subject: Subject) -> Side {
    side_of(outcome, subject, outcome.manifest.shape)
}

fn side_of(outcome: &Outcome, subject: Subject, shape: Shape) -> Side {
    Side {
        null: summarise(&outcome.corpus_runs, subject, Sink::Null, shape),
        store: summarise(&outcome.corpus_runs, subject, Sink::Store, shape),
    }
}

/// Peak RSS: the larger of the per-sink medians (the store's pace can make a reader buffer more).
fn peak(side: &Side) -> Option<f64> {
    match (side.null.peak_rss_bytes, side.store.peak_rss_bytes) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn component_json(outcome: &Outcome, options: &Options, subject: Subject) -> Value {
    let s = side(outcome, subject);
    let mut obj = Map::new();
    let mut reasons = Map::new();
    let failed = |sum: &Summary| {
        if sum.runs == 0 {
            "not run".to_string()
        } else {
            format!("no successful run: {}", sum.errors.join("; "))
        }
    };
    put(
        &mut obj,
        &mut reasons,
        "lines_per_cpu_s",
        s.null.lines_per_cpu_s,
        &failed(&s.null),
    );
    put(
        &mut obj,
        &mut reasons,
        "null_mb_per_cpu_s",
        s.null.mb_per_cpu_s,
        &failed(&s.null),
    );
    put(
        &mut obj,
        &mut reasons,
        "peak_rss_bytes",
        peak(&s),
        &failed(&s.null),
    );
    put(
        &mut obj,
        &mut reasons,
        "null_lines_per_s",
        s.null.lines_per_s,
        &failed(&s.null),
    );
    let store_reason = options
        .store_skip_reason
        .clone()
        .unwrap_or_else(|| failed(&s.store));
    put(
        &mut obj,
        &mut reasons,
        "store_lines_per_cpu_s",
        s.store.lines_per_cpu_s,
        &store_reason,
    );
    put(
        &mut obj,
        &mut reasons,
        "store_mb_per_cpu_s",
        s.store.mb_per_cpu_s,
        &store_reason,
    );
    put(
        &mut obj,
        &mut reasons,
        "store_lines_per_s",
        s.store.lines_per_s,
        &store_reason,
    );
    let at_10k = steady_of(&outcome.steady_runs, subject, 10_000);
    put(
        &mut obj,
        &mut reasons,
        "rss_bytes_at_10k_lines_s",
        at_10k.filter(|r| r.ok).map(|r| r.rss_max_bytes as f64),
        &at_10k
            .and_then(|r| r.error.clone())
            .unwrap_or_else(|| "10k lines/s not in the steady rates".into()),
    );
    obj.insert("null".into(), summary_json(&s.null, "null", None));
    obj.insert(
        "store".into(),
        summary_json(&s.store, "store", options.store_skip_reason.as_deref()),
    );
    let steady: Vec<Value> = options
        .steady_rates
        .iter()
        .filter_map(|&rate| steady_of(&outcome.steady_runs, subject, rate))
        .map(|r| {
            json!({
                "rate_lines_s": r.rate_lines_s,
                "ok": r.ok,
                "cpu_share": r.cpu_share,
                "rss_mean_bytes": r.rss_mean_bytes,
                "rss_max_bytes": r.rss_max_bytes,
                "peak_rss_bytes": r.peak_rss_bytes,
                "written_lines_s": r.written_lines_s,
                "window_s": r.window_s,
                "drain_s": r.drain_s,
                "error": r.error,
            })
        })
        .collect();
    obj.insert("steady".into(), Value::Array(steady));
    obj.insert("reasons".into(), Value::Object(reasons));
    Value::Object(obj)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Ours / one comparator's, same runs.
struct Ratios {
    lines_per_cpu_s: Option<f64>,
    store_lines_per_cpu_s: Option<f64>,
    mb_per_cpu_s: Option<f64>,
    store_mb_per_cpu_s: Option<f64>,
    peak_rss: Option<f64>,
    wall_null: Option<f64>,
    steady_cpu: Vec<(u64, Option<f64>)>,
    steady_rss: Vec<(u64, Option<f64>)>,
}

fn ratios(outcome: &Outcome, options: &Options, theirs: Subject) -> Ratios {
    let a = side(outcome, Subject::Agent);
    let p = side(outcome, theirs);
    let steady = |rate: u64, f: fn(&SteadyRun) -> f64| {
        let get = |s| {
            steady_of(&outcome.steady_runs, s, rate)
                .filter(|r| r.ok)
                .map(f)
        };
        ratio(get(Subject::Agent), get(theirs))
    };
    Ratios {
        lines_per_cpu_s: ratio(a.null.lines_per_cpu_s, p.null.lines_per_cpu_s),
        store_lines_per_cpu_s: ratio(a.store.lines_per_cpu_s, p.store.lines_per_cpu_s),
        mb_per_cpu_s: ratio(a.null.mb_per_cpu_s, p.null.mb_per_cpu_s),
        store_mb_per_cpu_s: ratio(a.store.mb_per_cpu_s, p.store.mb_per_cpu_s),
        peak_rss: ratio(peak(&a), peak(&p)),
        wall_null: ratio(a.null.wall_s, p.null.wall_s),
        steady_cpu: options
            .steady_rates
            .iter()
            .map(|&r| (r, steady(r, |s| s.cpu_share)))
            .collect(),
        steady_rss: options
            .steady_rates
            .iter()
            .map(|&r| (r, steady(r, |s| s.rss_max_bytes as f64)))
            .collect(),
    }
}

/// A version pinned in `tests/testbed/versions.env`.
pub fn pinned(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(logpipe_e2e::repo_root().join("tests/testbed/versions.env"))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": model,
        "mem_total_bytes": mem,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
    })
}

fn ratios_json(r: &Ratios, theirs: Subject) -> Value {
    let mut steady_cpu = Map::new();
    for (rate, v) in &r.steady_cpu {
        steady_cpu.insert(rate.to_string(), json!(v));
    }
    let mut steady_rss = Map::new();
    for (rate, v) in &r.steady_rss {
        steady_rss.insert(rate.to_string(), json!(v));
    }
    json!({
        "note": format!("ours / {}", theirs.title()),
        "lines_per_cpu_s": r.lines_per_cpu_s,
        "store_lines_per_cpu_s": r.store_lines_per_cpu_s,
        "null_mb_per_cpu_s": r.mb_per_cpu_s,
        "store_mb_per_cpu_s": r.store_mb_per_cpu_s,
        "peak_rss_bytes": r.peak_rss,
        "null_wall_s": r.wall_null,
        "steady_cpu_share": steady_cpu,
        "steady_rss_max_bytes": steady_rss,
    })
}

/// The short shape (issue 16): per subject and sink, ratios, and the targets.
/// `None` when it was not run.
fn short_json(outcome: &Outcome) -> Option<Value> {
    let m = outcome.manifests.iter().find(|m| m.shape == Shape::Short)?;
    let a = side_of(outcome, Subject::Agent, Shape::Short);
    let mut obj = Map::new();
    obj.insert(
        "corpus".into(),
        json!({
            "bytes": m.bytes,
            "entries": m.entries,
            "cri_lines": m.cri_lines,
            "partial_lines": m.partial_lines,
            "mean_entry_bytes": m.content_bytes as f64 / m.entries.max(1) as f64,
            "mean_cri_line_bytes": m.bytes as f64 / m.cri_lines.max(1) as f64,
            "json_entries": m.json_entries,
            "longest_entry_bytes": m.longest_entry,
            "files": m.files.len(),
        }),
    );
    for subject in Subject::ALL {
        let s = side_of(outcome, subject, Shape::Short);
        obj.insert(
            subject.name().into(),
            json!({
                "null": summary_json(&s.null, "null", None),
                "store": summary_json(&s.store, "store", None),
            }),
        );
    }
    let mut ratios = Map::new();
    for theirs in Subject::COMPARATORS {
        let t = side_of(outcome, theirs, Shape::Short);
        ratios.insert(
            theirs.name().into(),
            json!({
                "note": format!("ours / {}", theirs.title()),
                "lines_per_cpu_s": ratio(a.null.lines_per_cpu_s, t.null.lines_per_cpu_s),
                "store_lines_per_cpu_s": ratio(a.store.lines_per_cpu_s, t.store.lines_per_cpu_s),
                "peak_rss_bytes": ratio(peak(&a), peak(&t)),
                "null_wall_s": ratio(a.null.wall_s, t.null.wall_s),
            }),
        );
    }
    obj.insert("ratios".into(), Value::Object(ratios));
    let target = |name: &str, goal: &str, measured: Option<f64>, met: Option<bool>| json!({"target": goal, "measured": measured, "met": met, "name": name});
    // CPU per line into the store over CPU per line into the null receiver.
    let store_cost = ratio(a.null.lines_per_cpu_s, a.store.lines_per_cpu_s);
    obj.insert(
        "targets".into(),
        json!([
            target(
                "short: agent null MB/CPU-s",
                ">= 300",
                a.null.mb_per_cpu_s,
                a.null.mb_per_cpu_s.map(|v| v >= 300.0)
            ),
            target(
                "short: agent null lines/CPU-s",
                ">= 1300000",
                a.null.lines_per_cpu_s,
                a.null.lines_per_cpu_s.map(|v| v >= 1.3e6)
            ),
            target(
                "short: agent peak RSS (null)",
                "<= 25165824 (24 MiB)",
                a.null.peak_rss_bytes,
                a.null.peak_rss_bytes.map(|v| v <= 24.0 * MIB)
            ),
            target(
                "short: agent CPU per line, store / null",
                "<= 1.2",
                store_cost,
                store_cost.map(|v| v <= 1.2)
            ),
            target(
                "short: agent store MB/s (wall)",
                ">= 200 (backlog drain)",
                a.store.mb_per_s,
                a.store.mb_per_s.map(|v| v >= 200.0)
            ),
        ]),
    );
    Some(Value::Object(obj))
}

pub fn results_json(outcome: &Outcome, options: &Options) -> Value {
    let agent = component_json(outcome, options, Subject::Agent);
    let agent_mb = agent.get("null_mb_per_cpu_s").and_then(Value::as_f64);
    let agent_rss10k = agent
        .get("rss_bytes_at_10k_lines_s")
        .and_then(Value::as_f64);
    let target = |name: &str, goal: &str, measured: Option<f64>, met: Option<bool>| json!({"target": goal, "measured": measured, "met": met, "name": name});
    let mut ratios_obj = Map::new();
    ratios_obj.insert(
        "note".into(),
        json!("ours / theirs per comparator, same corpus, same bench run"),
    );
    let mut targets = Vec::new();
    for theirs in Subject::COMPARATORS {
        let r = ratios(outcome, options, theirs);
        // The ratio goals of issue 7 were set against Promtail; they are kept, per comparator.
        targets.push(target(
            &format!("lines_per_cpu_s ratio vs {}", theirs.name()),
            ">= 5",
            r.lines_per_cpu_s,
            r.lines_per_cpu_s.map(|v| v >= 5.0),
        ));
        targets.push(target(
            &format!("peak_rss_bytes ratio vs {}", theirs.name()),
            "<= 0.25",
            r.peak_rss,
            r.peak_rss.map(|v| v <= 0.25),
        ));
        ratios_obj.insert(theirs.name().into(), ratios_json(&r, theirs));
    }
    targets.push(target(
        "agent.null_mb_per_cpu_s",
        ">= 150",
        agent_mb,
        agent_mb.map(|v| v >= 150.0),
    ));
    targets.push(target(
        "agent.rss_bytes_at_10k_lines_s",
        "< 33554432 (32 MiB)",
        agent_rss10k,
        agent_rss10k.map(|v| v < 32.0 * MIB),
    ));
    let m = &outcome.manifest;
    let mut results = json!({
        "schema_version": 2,
        "generated_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "command": options.command,
        "machine": machine(),
        "contention": {
            "note": "2 cores shared with other work (compilers, test beds): wall times move with it, CPU seconds much less; each run records the CPU the rest of the machine used meanwhile (median_other_machine_cpu_s)",
            "loadavg_before": outcome.load_before,
            "loadavg_after": outcome.load_after,
        },
        "versions": {
            "logpipe_agent": super::version_of(&options.bins.agent, "--version"),
            "otelcol": pinned("OTELCOL_VERSION"),
            "otelcol_contrib": pinned("OTELCOL_CONTRIB_VERSION"),
            "otelcol_banner": super::version_of(&options.bins.otelcol, "--version"),
            "victorialogs": pinned("VICTORIALOGS_VERSION"),
            "victorialogs_reported": outcome.store_version,
            "note": "the collector is tests/otelcol/main.go built against the pinned modules of tests/testbed/versions.env (core OTELCOL_VERSION, contrib OTELCOL_CONTRIB_VERSION); VictoriaLogs is built with go install, without version ldflags, so it reports no version: the pinned one is what runs",
            "agent_binary": options.bins.agent.display().to_string(),
            "otelcol_binary": options.bins.otelcol.display().to_string(),
        },
        "corpus": {
            "size": options.size.name,
            "target_bytes": m.target_bytes,
            "bytes": m.bytes,
            "entries": m.entries,
            "cri_lines": m.cri_lines,
            "partial_lines": m.partial_lines,
            "content_bytes": m.content_bytes,
            "json_entries": m.json_entries,
            "plain_entries": m.plain_entries,
            "klog_entries": m.klog_entries,
            "longest_entry_bytes": m.longest_entry,
            "pods": m.pods,
            "files": m.files.len(),
            "seed": m.seed,
            "generator_version": m.generator_version,
        },
        "settings": {
            "runs": options.runs,
            "statistic": "median of successful runs",
            "batch_bytes": super::runner::BATCH_BYTES,
            "batch_wait": super::runner::BATCH_WAIT,
            "protocols": {
                "agent": "Loki push, protobuf + snappy, X-Scope-OrgID: <tenant>",
                "otelcol": "OTLP/HTTP logs, protobuf, compression: snappy, AccountID: <tenant>; batches in the exporter's sending_queue (sizer bytes, min = max = batch_bytes, flush_timeout = batch_wait)",
            },
            "store": "VictoriaLogs: Loki push at /insert/loki/api/v1/push, OTLP at /insert/opentelemetry/v1/logs, through the bench's counting proxy; rows counted afterwards with LogsQL (* | stats count()) under the run's numeric tenant",
            "labels": super::runner::expected_label_names(),
            "steady_rates_lines_s": options.steady_rates,
            "steady_window_s": options.steady_duration.saturating_sub(options.steady_warmup).as_secs_f64(),
            "steady_containers": options.steady_containers,
            "mb": "10^6 bytes of CRI log files read",
            "peak_rss_bytes": "VmHWM at the moment the last entry arrived; the larger of the null and store medians",
            "rss_bytes_at_10k_lines_s": "largest VmRSS sampled (every 250 ms) in the steady window at 10k lines/s",
            "lines_per_cpu_s": "corpus entries / (utime+stime up to the last entry), null receiver",
        },
        "agent": agent,
        "ratios": Value::Object(ratios_obj),
        // Issue 16: the same runs on a corpus of ordinary line lengths (null when not run).
        "short": short_json(outcome),
        "targets": targets,
        // make bench-operator's figures (target/bench/operator.json), or null + reason.
        "operator": super::operator::load_section(&options.out),
        "runs": {
            "corpus": outcome.corpus_runs,
            "steady": outcome.steady_runs,
        },
    });
    for theirs in Subject::COMPARATORS {
        results[theirs.name()] = component_json(outcome, options, theirs);
    }
    results
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "—".into(),
    }
}

fn mib(v: Option<f64>) -> String {
    v.map_or("—".into(), |b| format!("{:.1}", b / MIB))
}

pub fn results_md(outcome: &Outcome, options: &Options, results: &Value) -> String {
    let m = &outcome.manifest;
    let machine = &results["machine"];
    let v = |k: &str| results["versions"][k].as_str().unwrap_or("?").to_string();
    let mut md = String::new();
    md.push_str("# logpipe-agent vs the OpenTelemetry Collector\n\n");
    md.push_str(&format!(
        "`{}` — {} runs per case (median), corpus {:.1} MiB: {} entries ({} CRI lines, {} partial), {} files, {} pods, seed {:#x}.  \n",
        options.command,
        options.runs,
        m.bytes as f64 / MIB,
        m.entries,
        m.cri_lines,
        m.partial_lines,
        m.files.len(),
        m.pods,
        m.seed
    ));
    md.push_str(&format!(
        "Machine: {} × {}; load average before/after: {} / {}. Versions: agent `{}`, OpenTelemetry Collector `{}` (contrib `{}`), VictoriaLogs `{}`.\n\n",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        outcome.load_before.as_deref().unwrap_or("?"),
        outcome.load_after.as_deref().unwrap_or("?"),
        v("logpipe_agent"),
        v("otelcol"),
        v("otelcol_contrib"),
        v("victorialogs"),
    ));
    md.push_str("## Corpus runs (read everything, push everything)\n\n");
    md.push_str("| sink | who | ok runs | wall s | CPU s | lines/s | lines/CPU-s | MB/CPU-s | peak RSS MiB | rows in store | other CPU s on the machine |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for sink in [Sink::Null, Sink::Store] {
        for subject in Subject::ALL {
            let sd = side(outcome, subject);
            let s = match sink {
                Sink::Null => &sd.null,
                Sink::Store => &sd.store,
            };
            let rows: Vec<String> = outcome
                .corpus_runs
                .iter()
                .filter(|r| r.subject == subject && r.sink == sink && r.shape == m.shape)
                .filter_map(|r| r.store_rows.map(|n| n.to_string()))
                .collect();
            md.push_str(&format!(
                "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                match sink {
                    Sink::Null => "null",
                    Sink::Store => "VictoriaLogs",
                },
                subject.title(),
                s.ok,
                s.runs,
                fmt(s.wall_s, 2),
                fmt(s.cpu_s, 2),
                fmt(s.lines_per_s, 0),
                fmt(s.lines_per_cpu_s, 0),
                fmt(s.mb_per_cpu_s, 1),
                mib(s.peak_rss_bytes),
                if rows.is_empty() {
                    "—".to_string()
                } else {
                    rows.join(", ")
                },
                fmt(s.other_cpu_s, 1),
            ));
        }
    }
    if let Some(reason) = &options.store_skip_reason {
        md.push_str(&format!("\nStore runs skipped: {reason}\n"));
    }
    let errors: Vec<String> = outcome
        .corpus_runs
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| {
                format!(
                    "- {} ({} shape) -> {:?} run {}: {e}",
                    r.subject.title(),
                    r.shape.name(),
                    r.sink,
                    r.index
                )
            })
        })
        .collect();
    if !errors.is_empty() {
        md.push_str(&format!("\nFailed runs:\n{}\n", errors.join("\n")));
    }
    if let Some(m) = outcome.manifests.iter().find(|m| m.shape == Shape::Short) {
        md.push_str(&format!(
            "\n## Short lines (issue 16): {:.1} MiB, {} entries of {:.0} B on average ({} CRI lines, {} partial, {} JSON)\n\n",
            m.bytes as f64 / MIB,
            m.entries,
            m.content_bytes as f64 / m.entries.max(1) as f64,
            m.cri_lines,
            m.partial_lines,
            m.json_entries,
        ));
        md.push_str("| sink | who | ok runs | wall s | CPU s | MB/s | lines/CPU-s | MB/CPU-s | peak RSS MiB |\n");
        md.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for sink in [Sink::Null, Sink::Store] {
            for subject in Subject::ALL {
                let sd = side_of(outcome, subject, Shape::Short);
                let s = match sink {
                    Sink::Null => &sd.null,
                    Sink::Store => &sd.store,
                };
                if s.runs == 0 {
                    continue;
                }
                md.push_str(&format!(
                    "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} |\n",
                    match sink {
                        Sink::Null => "null",
                        Sink::Store => "VictoriaLogs",
                    },
                    subject.title(),
                    s.ok,
                    s.runs,
                    fmt(s.wall_s, 2),
                    fmt(s.cpu_s, 2),
                    fmt(s.mb_per_s, 1),
                    fmt(s.lines_per_cpu_s, 0),
                    fmt(s.mb_per_cpu_s, 1),
                    mib(s.peak_rss_bytes),
                ));
            }
        }
        if let Some(short) = &results["short"].as_object() {
            for theirs in Subject::COMPARATORS {
                let r = &short["ratios"][theirs.name()];
                md.push_str(&format!(
                    "\nOurs / {}: lines per CPU-second {} (null), {} (VictoriaLogs); peak RSS {}.\n",
                    theirs.title(),
                    fmt(r["lines_per_cpu_s"].as_f64(), 2),
                    fmt(r["store_lines_per_cpu_s"].as_f64(), 2),
                    fmt(r["peak_rss_bytes"].as_f64(), 3),
                ));
            }
            md.push_str(&target_table("target (issue 16)", &short["targets"]));
        }
    }
    md.push_str("\n## Steady state (null receiver, short lines)\n\n");
    md.push_str("| lines/s | who | CPU (cores) | RSS mean MiB | RSS max MiB | delivered |\n|---|---|---|---|---|---|\n");
    for &rate in &options.steady_rates {
        for subject in Subject::ALL {
            if let Some(s) = steady_of(&outcome.steady_runs, subject, rate) {
                md.push_str(&format!(
                    "| {rate} | {} | {:.3} | {:.1} | {:.1} | {}/{}{} |\n",
                    subject.title(),
                    s.cpu_share,
                    s.rss_mean_bytes as f64 / MIB,
                    s.rss_max_bytes as f64 / MIB,
                    s.received,
                    s.written,
                    if s.ok { "" } else { " (incomplete)" }
                ));
            }
        }
    }
    let all: Vec<(Subject, Ratios)> = Subject::COMPARATORS
        .iter()
        .map(|&t| (t, ratios(outcome, options, t)))
        .collect();
    md.push_str("\n## Ratios (ours / theirs, same run) and targets\n\n| figure |");
    for (t, _) in &all {
        md.push_str(&format!(" vs {} |", t.title()));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(all.len()));
    md.push('\n');
    let mut row = |name: String, f: &dyn Fn(&Ratios) -> String| {
        md.push_str(&format!("| {name} |"));
        for (_, r) in &all {
            md.push_str(&format!(" {} |", f(r)));
        }
        md.push('\n');
    };
    row("lines per CPU-second (null)".into(), &|r| {
        fmt(r.lines_per_cpu_s, 2)
    });
    row("lines per CPU-second (VictoriaLogs)".into(), &|r| {
        fmt(r.store_lines_per_cpu_s, 2)
    });
    row("MB per CPU-second (null)".into(), &|r| {
        fmt(r.mb_per_cpu_s, 2)
    });
    row("MB per CPU-second (VictoriaLogs)".into(), &|r| {
        fmt(r.store_mb_per_cpu_s, 2)
    });
    row("peak RSS".into(), &|r| fmt(r.peak_rss, 3));
    row("wall time (null)".into(), &|r| fmt(r.wall_null, 2));
    for (i, &rate) in options.steady_rates.iter().enumerate() {
        row(format!("CPU at {rate} lines/s"), &|r| {
            fmt(r.steady_cpu.get(i).and_then(|x| x.1), 3)
        });
        row(format!("RSS at {rate} lines/s"), &|r| {
            fmt(r.steady_rss.get(i).and_then(|x| x.1), 3)
        });
    }
    md.push_str(&target_table("target", &results["targets"]));
    md.push_str("\nLabels per stream (null runs) —");
    for subject in Subject::ALL {
        md.push_str(&format!(
            " {}: {:?};",
            subject.title(),
            side(outcome, subject).null.label_names
        ));
    }
    md.push_str(" (the collector's are its resource and record attributes.)\n");
    md.push_str(&super::operator::merge_md(
        "\n",
        &super::operator::markdown(&results["operator"]),
    ));
    md.push_str(
        "\nNotes: CPU seconds are utime+stime of the process up to the moment the receiver held the last entry; \
         MB = 10^6 bytes of CRI files read. The machine's 2 cores are shared, so wall times are noisy; \
         the VictoriaLogs runs go through a counting proxy in the bench process that forwards each protocol to the \
         test bed's VictoriaLogs (Loki push and OTLP/HTTP), and the rows are then counted there with LogsQL. \
         Our agent pushes Loki protobuf + snappy; the collector OTLP protobuf + snappy (`compression: snappy`), \
         both in batches of up to 1 MiB or 1 s.\n",
    );
    md
}

/// Load a TrueType font from the machine for the chart's text; `false` if none.
fn register_font() -> bool {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    for path in candidates {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters wants 'static font data; one font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

pub fn results_png(outcome: &Outcome, options: &Options, path: &Path) -> Result<bool, BenchError> {
    let with_text = register_font();
    // Left: advantage factors over each comparator, higher is better for us.
    let mut bars: Vec<(String, f64)> = Vec::new();
    for theirs in Subject::COMPARATORS {
        let r = ratios(outcome, options, theirs);
        let who = match theirs {
            Subject::Otelcol => "OTel",
            other => other.name(),
        };
        if let Some(v) = r.lines_per_cpu_s {
            bars.push((format!("lines/CPU-s, null (vs {who})"), v));
        }
        if let Some(v) = r.store_lines_per_cpu_s {
            bars.push((format!("lines/CPU-s, VictoriaLogs (vs {who})"), v));
        }
        if let Some(v) = r.peak_rss.filter(|v| *v > 0.0) {
            bars.push((format!("peak RSS ({who}/ours)"), 1.0 / v));
        }
        for (rate, v) in &r.steady_cpu {
            if let Some(v) = v.filter(|v| *v > 0.0) {
                bars.push((format!("CPU @{}k/s ({who}/ours)", rate / 1000), 1.0 / v));
            }
        }
        for (rate, v) in &r.steady_rss {
            if let Some(v) = v.filter(|v| *v > 0.0) {
                bars.push((format!("RSS @{}k/s ({who}/ours)", rate / 1000), 1.0 / v));
            }
        }
    }
    let mut absolute: Vec<(String, f64, bool)> = Vec::new();
    for (sink, label) in [(Sink::Null, "null"), (Sink::Store, "VictoriaLogs")] {
        for subject in Subject::ALL {
            let sd = side(outcome, subject);
            let s = match sink {
                Sink::Null => &sd.null,
                Sink::Store => &sd.store,
            };
            if let Some(v) = s.lines_per_cpu_s {
                absolute.push((
                    format!("{} -> {label}", subject.title()),
                    v,
                    subject == Subject::Agent,
                ));
            }
        }
    }
    draw(path, &bars, &absolute, with_text)
        .map_err(|e| BenchError::Other(format!("{}: {e}", path.display())))?;
    Ok(with_text)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(
    path: &Path,
    bars: &[(String, f64)],
    absolute: &[(String, f64, bool)],
    text: bool,
) -> DrawResult {
    let root = BitMapBackend::new(path, (1400, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(800);
    let ours = RGBColor(31, 119, 180);
    let theirs = RGBColor(255, 127, 14);
    let worse = RGBColor(214, 39, 40);
    let factors: Vec<(String, f64, RGBColor)> = bars
        .iter()
        .map(|(name, v)| (name.clone(), *v, if *v >= 1.0 { ours } else { worse }))
        .collect();
    hbars(
        &left,
        "advantage of logpipe-agent (x, higher is better)",
        &factors,
        |v| format!("{v:.2}x"),
        Some(1.0),
        text,
    )?;
    let throughput: Vec<(String, f64, RGBColor)> = absolute
        .iter()
        .map(|(name, v, is_ours)| {
            (
                name.clone(),
                v / 1000.0,
                if *is_ours { ours } else { theirs },
            )
        })
        .collect();
    hbars(
        &right,
        "thousand lines per CPU-second",
        &throughput,
        |v| format!("{v:.0}k"),
        None,
        text,
    )?;
    root.present()?;
    Ok(())
}

/// Horizontal bars (labels need no rotation, which plotters' ab_glyph text lacks).
fn hbars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    bars: &[(String, f64, RGBColor)],
    value_label: impl Fn(f64) -> String,
    reference: Option<f64>,
    text: bool,
) -> DrawResult {
    // A segmented range over 0..=last has one segment per bar.
    let last = bars.len().saturating_sub(1);
    let top = bars
        .iter()
        .map(|b| b.1)
        .fold(reference.unwrap_or(0.0), f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.2;
    let mut chart = ChartBuilder::on(area);
    chart
        .margin(20)
        .x_label_area_size(if text { 30 } else { 5 })
        .y_label_area_size(if text { 230 } else { 5 });
    if text {
        chart.caption(title, ("sans-serif", 20));
    }
    let mut c = chart.build_cartesian_2d(0f64..top, (0..last).into_segmented())?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let name_of = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    {
        let mut mesh = c.configure_mesh();
        mesh.disable_y_mesh();
        if text {
            mesh.y_labels(bars.len().max(1))
                .y_label_formatter(&name_of)
                .label_style(("sans-serif", 15));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
    }
    c.draw_series(bars.iter().enumerate().map(|(i, (_, v, color))| {
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*v, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        bar.set_margin(8, 8, 0, 0);
        bar
    }))?;
    if let Some(x) = reference {
        c.draw_series(std::iter::once(PathElement::new(
            vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Last)],
            BLACK.stroke_width(2),
        )))?;
    }
    if text {
        let style =
            TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        c.draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                value_label(*v),
                (*v + top * 0.01, SegmentValue::CenterOf(i)),
                style.clone(),
            )
        }))?;
    }
    Ok(())
}

/// Write all three files; returns whether the chart has text.
pub fn write_all(outcome: &Outcome, options: &Options) -> Result<bool, BenchError> {
    let results = results_json(outcome, options);
    let json_path = options.out.join("results.json");
    let text = serde_json::to_string_pretty(&results)
        .map_err(|e| BenchError::Other(format!("results.json: {e}")))?;
    std::fs::write(&json_path, text + "\n").map_err(BenchError::io(&json_path))?;
    let md_path = options.out.join("results.md");
    std::fs::write(&md_path, results_md(outcome, options, &results))
        .map_err(BenchError::io(&md_path))?;
    let png_path = options.out.join("results.png");
    let with_text = results_png(outcome, options, &png_path)?;
    Ok(with_text)
}

/// Headline lines for the terminal.
pub fn headline(results: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    let get = |p: &str| results.pointer(p).and_then(Value::as_f64);
    lines.push(format!(
        "agent: {} lines/CPU-s, null {} MB/CPU-s, peak RSS {} MiB, RSS@10k {} MiB",
        fmt(get("/agent/lines_per_cpu_s"), 0),
        fmt(get("/agent/null_mb_per_cpu_s"), 1),
        mib(get("/agent/peak_rss_bytes")),
        mib(get("/agent/rss_bytes_at_10k_lines_s")),
    ));
    if results["short"].is_object() {
        lines.push(format!(
            "agent, short lines: {} lines/CPU-s, null {} MB/CPU-s, {} MB/s into VictoriaLogs, peak RSS {} MiB",
            fmt(get("/short/agent/null/median_lines_per_cpu_s"), 0),
            fmt(get("/short/agent/null/median_mb_per_cpu_s"), 1),
            fmt(get("/short/agent/store/median_mb_per_s"), 1),
            mib(get("/short/agent/null/median_peak_rss_bytes")),
        ));
    }
    for theirs in Subject::COMPARATORS {
        let n = theirs.name();
        lines.push(format!(
            "{}: {} lines/CPU-s (ours x{}; into VictoriaLogs x{}), peak RSS {} MiB (ours x{})",
            theirs.title(),
            fmt(get(&format!("/{n}/lines_per_cpu_s")), 0),
            fmt(get(&format!("/ratios/{n}/lines_per_cpu_s")), 2),
            fmt(get(&format!("/ratios/{n}/store_lines_per_cpu_s")), 2),
            mib(get(&format!("/{n}/peak_rss_bytes"))),
            fmt(get(&format!("/ratios/{n}/peak_rss_bytes")), 3),
        ));
    }
    lines
}

/// A Markdown table of `targets` (`[{name, target, measured, met}]`), headed `heading`.
fn target_table(heading: &str, targets: &serde_json::Value) -> String {
    let mut md = format!("\n| {heading} | goal | measured | met |\n|---|---|---|---|\n");
    for t in targets.as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            t["name"].as_str().unwrap_or(""),
            t["target"].as_str().unwrap_or(""),
            t["measured"]
                .as_f64()
                .map_or("—".into(), |v| format!("{v:.3}")),
            match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            }
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
