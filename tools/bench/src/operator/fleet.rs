//! `logpipe-bench-operator --pipelines N` (issue 15): N LogPipelines in one cluster, each
//! in its own namespace, on every node, one operator watching all namespaces.
//!
//! ```text
//! apply N LogPipelines (release r1) -> every one Healthy          : install_s
//! change every one to release r2 at once -> every one Healthy,
//!   each rollout's start (status leaves Healthy or names the new
//!   target) and end (Healthy at r2, every pod Ready at it)        : rollouts[], overlap_s
//!   /metrics before and after                                      : reconcile p50/p99, requests
//!   VmRSS every 200 ms                                             : peak, steady after
//! ```
//!
//! The overlap is the time every rollout ran at once (latest start to earliest end): one
//! LogPipeline's rollout must not wait for another's. Same plain KWOK pods, zero windows
//! and checks as the single-pipeline run. Results: `target/bench/operator-fleet.json`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{
    BenchError, Goal, HISTOGRAM, Namespaces, Options, Phases, RssSampler, apply_pipeline,
    beyond_last_bound, bucket_delta, buckets, ensure_namespace, histogram_quantile, lp_status,
    max_unavailable, median, other, pipeline, pods_at, request_delta, say, scrape, start_operator,
    wait_healthy,
};

/// One LogPipeline's rollout, in seconds after the change.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    start: Option<f64>,
    end: Option<f64>,
}

/// Pure: the time every span ran at once (latest start to earliest end), and the most
/// spans running at one instant.
pub fn overlap(spans: &[(f64, f64)]) -> (f64, usize) {
    let latest_start = spans.iter().map(|s| s.0).fold(f64::MIN, f64::max);
    let earliest_end = spans.iter().map(|s| s.1).fold(f64::MAX, f64::min);
    let most = spans
        .iter()
        .map(|(t, _)| spans.iter().filter(|(s, e)| s <= t && t < e).count())
        .max()
        .unwrap_or(0);
    ((earliest_end - latest_start).max(0.0), most)
}

/// The status says the rollout to something other than `old` has begun.
fn begun(status: &Value, old: &str) -> bool {
    status["phase"] != "Healthy" || status["targetRevision"].as_str() != Some(old)
}

/// Watch every namespace's LogPipeline until each is Healthy at a revision other than
/// `old` with `nodes` pods Ready at it; the spans, seconds after `changed`.
async fn watch_rollouts(
    operator: &mut logpipe_e2e::operator::Operator,
    client: &kube::Client,
    namespaces: &[String],
    old: &str,
    nodes: usize,
    changed: Instant,
    limit: Duration,
) -> Result<Vec<Span>, BenchError> {
    let mut spans = vec![Span::default(); namespaces.len()];
    while spans.iter().any(|s| s.end.is_none()) {
        operator.check()?;
        if changed.elapsed() > limit {
            return Err(other(format!(
                "timed out after {}s: {spans:?}",
                limit.as_secs()
            )));
        }
        for (ns, span) in namespaces.iter().zip(spans.iter_mut()) {
            if span.end.is_some() {
                continue;
            }
            let Ok((generation, s)) = lp_status(client, ns).await else {
                continue;
            };
            let at = changed.elapsed().as_secs_f64();
            if span.start.is_none() && begun(&s, old) {
                span.start = Some(at);
            }
            let target = s["targetRevision"].as_str().unwrap_or("");
            let healthy = s["phase"] == "Healthy"
                && s["observedGeneration"].as_i64() == generation
                && target != old
                && s["stableRevision"].as_str() == Some(target);
            if healthy
                && matches!(pods_at(client, ns, target).await, Ok((n, all)) if n >= nodes && all == n)
            {
                span.start.get_or_insert(at);
                span.end = Some(at);
                say(format!("  {at:>7.1}s {ns} Healthy at {target}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(spans)
}

/// The fleet run; its section (also when part of it failed: `error` says what).
pub async fn run(
    options: &Options,
    client: &kube::Client,
    kubeconfig: &Path,
    nodes: usize,
    pipelines: usize,
) -> Result<Value, BenchError> {
    let suffix = logpipe_e2e::unique_suffix();
    let names: Vec<String> = (0..pipelines)
        .map(|i| format!("opfleet-{suffix}-{i}"))
        .collect();
    let mut guard = Namespaces {
        client: client.clone(),
        names: names.clone(),
    };
    let mut operator = start_operator(options, kubeconfig, None).await?;
    let rss = RssSampler::start(operator.pid);
    let unavailable = max_unavailable(options);
    let applied = Instant::now();
    for ns in &names {
        ensure_namespace(client, ns).await?;
        apply_pipeline(client, ns, &pipeline(ns, "r1", unavailable)).await?;
    }
    say(format!(
        "{pipelines} LogPipelines applied (release r1), each on {nodes} nodes"
    ));
    let mut r1 = String::new();
    for ns in &names {
        let goal = Goal {
            nodes,
            old: None,
            started: applied,
            limit: options.install_timeout,
        };
        r1 = wait_healthy(&mut operator, client, ns, goal, &mut Phases::default()).await?;
    }
    let install_s = applied.elapsed().as_secs_f64();
    say(format!("every one Healthy at r1 after {install_s:.1}s"));
    tokio::time::sleep(Duration::from_secs(5)).await;

    let before = scrape(&operator).await?;
    let changed = Instant::now();
    for ns in &names {
        apply_pipeline(client, ns, &pipeline(ns, "r2", unavailable)).await?;
    }
    let applied_all_s = changed.elapsed().as_secs_f64();
    say(format!(
        "every one changed to r2 within {applied_all_s:.1}s"
    ));
    let limit = options.rollout_timeout;
    let spans = watch_rollouts(&mut operator, client, &names, &r1, nodes, changed, limit).await?;
    let done = Instant::now();
    let after = scrape(&operator).await?;
    let delta = bucket_delta(&buckets(&before, HISTOGRAM), &buckets(&after, HISTOGRAM));
    let pairs: Vec<(f64, f64)> = spans
        .iter()
        .map(|s| (s.start.unwrap_or(0.0), s.end.unwrap_or(0.0)))
        .collect();
    let (overlap_s, most_at_once) = overlap(&pairs);
    let peak = rss.between(changed, done).into_iter().reduce(f64::max);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steady_from = Instant::now();
    tokio::time::sleep(options.steady).await;
    let steady = median(rss.between(steady_from, Instant::now()));
    drop(rss);
    drop(operator);
    for ns in &names {
        super::force_cleanup(client, ns).await;
        guard.delete_and_wait(ns, Duration::from_secs(120)).await;
    }
    Ok(json!({
        "nodes": nodes,
        "pipelines": pipelines,
        "pods": nodes * pipelines,
        "max_unavailable": unavailable,
        "install_s": install_s,
        "changed_all_within_s": applied_all_s,
        "rollout_all_s": done.duration_since(changed).as_secs_f64(),
        "rollouts": pairs.iter().zip(&names).map(|((s, e), ns)| json!({"namespace": ns, "start_s": s, "end_s": e, "length_s": e - s})).collect::<Vec<_>>(),
        "overlap_s": overlap_s,
        "most_at_once": most_at_once,
        "reconcile_p50_s": histogram_quantile(0.5, &delta),
        "reconcile_p99_s": histogram_quantile(0.99, &delta),
        "reconcile_p99_lower_bound": beyond_last_bound(0.99, &delta),
        "peak_rss_mib": peak.map(|b| b / super::MIB),
        "steady_rss_mib": steady.map(|b| b / super::MIB),
        "requests": request_delta(&before, &after),
        "machine": "shared: the test bed, the operator and the bench on the same cores",
    }))
}

/// Run, and write `operator-fleet.json` under `out`.
pub async fn run_and_write(
    options: &Options,
    pipelines: usize,
    out: &Path,
) -> Result<Value, BenchError> {
    let section = super::run_fleet(options, pipelines).await?;
    std::fs::create_dir_all(out).map_err(BenchError::io(out))?;
    let path = out.join("operator-fleet.json");
    let text = serde_json::to_string_pretty(&section).map_err(|e| other(e.to_string()))?;
    std::fs::write(&path, text).map_err(BenchError::io(&path))?;
    say(format!("wrote {}", path.display()));
    Ok(section)
}

/// One line: what the fleet run showed.
pub fn headline(s: &Value) -> String {
    format!(
        "{} LogPipelines x {} nodes: all Healthy {:.1}s after the change, overlap {:.1}s ({} at once), reconcile p50/p99 {:.3}/{:.3}s, RSS peak/steady {:.1}/{:.1} MiB",
        s["pipelines"],
        s["nodes"],
        s["rollout_all_s"].as_f64().unwrap_or(f64::NAN),
        s["overlap_s"].as_f64().unwrap_or(f64::NAN),
        s["most_at_once"],
        s["reconcile_p50_s"].as_f64().unwrap_or(f64::NAN),
        s["reconcile_p99_s"].as_f64().unwrap_or(f64::NAN),
        s["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
        s["steady_rss_mib"].as_f64().unwrap_or(f64::NAN),
    )
}

#[cfg(test)]
mod tests {
    use super::overlap;

    #[test]
    fn overlap_table() {
        let cases = [
            (
                "all at once",
                vec![(0.0, 10.0), (1.0, 9.0), (2.0, 12.0)],
                (7.0, 3),
            ),
            (
                "one after the other",
                vec![(0.0, 5.0), (5.0, 9.0)],
                (0.0, 1),
            ),
            (
                "two of three",
                vec![(0.0, 5.0), (4.0, 9.0), (8.0, 12.0)],
                (0.0, 2),
            ),
        ];
        for (name, spans, want) in cases {
            assert_eq!(overlap(&spans), want, "{name}");
        }
    }
}
