//! agent/METRICS.md and operator/METRICS.md list every metric the programs export.
//!
//! The list comes from the `register("name", "help", metric)` calls in each program's
//! metrics module: prometheus-client leaves a labelled family out of /metrics until its
//! first label set exists, so a fresh registry cannot list them. The live registry is the
//! cross-check: every family it does expose must be in the parsed list. `UPDATE_REFERENCE=1`
//! (run by `make crds`) rewrites the files.

use std::collections::BTreeMap;
use std::fmt::Write;

use logpipe_e2e::repo_root;
use regex::Regex;

/// name -> (help, Prometheus type as exposed, or "" when the family is empty now).
fn registered(source: &str, prefix: &str, exposition: &str) -> BTreeMap<String, (String, String)> {
    // A name is a literal or one of the `pub const`s of the module (`names::X`), which
    // the operator reads too.
    // The contract's counters and histograms are declared by macro: `counter!(NAME, ...,
    // "name")`.
    let constant = Regex::new(
        r#"pub const ([A-Z0-9_]+): &str = "([a-zA-Z0-9_:]+)";|(?:counter|histogram)!\(\s*(?:///[^\n]*\s*)*([A-Z0-9_]+),[^"]*"([a-zA-Z0-9_:]+)"\s*\)"#,
    )
    .unwrap();
    let constants: BTreeMap<&str, &str> = constant
        .captures_iter(source)
        .map(|c| {
            let name = c.get(1).or(c.get(3)).unwrap().as_str();
            let literal = c.get(2).or(c.get(4)).unwrap().as_str();
            (name, literal)
        })
        .collect();
    let call =
        Regex::new(r#"register\(\s*(?:"([a-zA-Z0-9_:]+)"|names::([A-Z0-9_]+)),\s*"([^"]*)""#)
            .unwrap();
    let mut types = BTreeMap::new();
    for line in exposition.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            types.insert(name.to_string(), kind.to_string());
        }
    }
    let mut out = BTreeMap::new();
    for capture in call.captures_iter(source) {
        let literal = match (capture.get(1), capture.get(2)) {
            (Some(name), _) => name.as_str(),
            (None, Some(constant)) => constants
                .get(constant.as_str())
                .copied()
                .unwrap_or_else(|| panic!("register(names::{}): no such const", &capture[2])),
            (None, None) => unreachable!("the regex matches one or the other"),
        };
        let name = format!("{prefix}{literal}");
        let kind = types.get(&name).cloned().unwrap_or_default();
        out.insert(name, (capture[3].to_string(), kind));
    }
    for name in types.keys() {
        assert!(
            out.contains_key(name),
            "{name} is exposed but its register() call was not found"
        );
    }
    out
}

fn document(title: &str, intro: &str, metrics: &BTreeMap<String, (String, String)>) -> String {
    let mut out = format!("# {title}\n\n{intro}\n\n| metric | meaning |\n|---|---|\n");
    for (name, (help, _)) in metrics {
        let _ = writeln!(out, "| `{name}` | {help} |");
    }
    out
}

fn check(relative: &str, generated: &str) {
    let path = repo_root().join(relative);
    if std::env::var_os("UPDATE_REFERENCE").is_some() {
        std::fs::write(&path, generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{relative} is stale: run `make crds`"
    );
}

#[test]
fn agent_metrics_list_matches_the_registry() {
    let read = |path: &str| std::fs::read_to_string(repo_root().join(path)).unwrap();
    // The names the operator reads are the contract's (api/), registered by the agent.
    let source = read("agent/src/metrics.rs") + &read("api/src/metrics.rs");
    let exposition = logpipe_agent::metrics::Metrics::new().encode().unwrap();
    let metrics = registered(&source, "", &exposition);
    // Promtail's names, so existing dashboards keep working.
    for name in [
        "promtail_sent_entries",
        "promtail_dropped_entries",
        "promtail_read_bytes_total",
    ] {
        assert!(metrics.contains_key(name), "{name} missing: {metrics:?}");
    }
    check(
        "agent/METRICS.md",
        &document(
            "logpipe-agent metrics",
            "Served on `:12345/metrics` (Prometheus text; counters get the `_total` suffix). Where \
             a Promtail metric means the same thing the agent uses Promtail's name and labels, so \
             existing dashboards keep working. Generated from the agent's metric registrations; a \
             test fails when this list is stale.",
            &metrics,
        ),
    );
}

#[test]
fn operator_metrics_list_matches_the_registry() {
    let source = std::fs::read_to_string(repo_root().join("operator/src/metrics.rs")).unwrap();
    let exposition = logpipe_operator::metrics::Metrics::default()
        .encode()
        .unwrap();
    let metrics = registered(&source, "logpipe_operator_", &exposition);
    assert!(
        metrics.contains_key("logpipe_operator_reconcile_duration_seconds"),
        "{metrics:?}"
    );
    check(
        "operator/METRICS.md",
        &document(
            "logpipe-operator metrics",
            "Served on `--metrics-addr` (default `:8080/metrics`), next to `/healthz` and \
             `/readyz` (counters get the `_total` suffix). Generated from the operator's metric \
             registrations; a test fails when this list is stale.",
            &metrics,
        ),
    );
}
