//! Tables for the pure half of verification.

use super::*;
use logpipe_api::config::HumanDuration;

use crate::crd::QuerySpec;

mod stores;

const METRICS: &str = r#"# HELP promtail_sent_entries_total Entries sent.
# TYPE promtail_sent_entries_total counter
promtail_sent_entries_total{host="127.0.0.1:43100"} 120
promtail_dropped_entries_total{host="h",tenant="ops",reason="http_404"} 7
promtail_request_duration_seconds_count{status_code="204",host="h"} 10
promtail_request_duration_seconds_count{status_code="404",host="h"} 3
promtail_request_duration_seconds_count{status_code="503",host="h"} 2
promtail_request_duration_seconds_count{status_code="422",host="h"} 1
promtail_request_duration_seconds_bucket{status_code="404",host="h",le="0.1"} 3
process_cpu_seconds_total 1.5
process_resident_memory_bytes 52428800
logpipe_delivery_latency_seconds_sum 6.0
logpipe_delivery_latency_seconds_count 4
logpipe_newest_entry_timestamp_seconds 1700000000.5
logpipe_written_bytes_total{pipeline="ops"} 4096
logpipe_written_bytes_total{pipeline="dev"} 1024
logpipe_acknowledged_bytes_total 3072
logpipe_unacknowledged_bytes 2048
logpipe_oldest_unacknowledged_seconds{pipeline="ops"} 4.5
logpipe_oldest_unacknowledged_seconds{pipeline="dev"} 1.5
logpipe_active_streams 37
# EOF
"#;

#[test]
fn metrics_are_read_by_promtail_names() {
    let s = parse_metrics(METRICS);
    assert_eq!(s.sent_entries, 120.0);
    assert_eq!(s.dropped_entries, 7.0);
    assert_eq!(
        s.error_requests, 5.0,
        "404 and 503, not 204, not the probe's 422, not buckets"
    );
    assert_eq!(s.cpu_seconds, 1.5);
    assert_eq!(s.rss_bytes, 52428800.0);
    assert_eq!((s.latency_sum, s.latency_count), (6.0, 4.0));
    assert_eq!(s.newest_entry, 1_700_000_000.5);
    assert_eq!(s.written_bytes, Some(5120.0), "summed over pipelines");
    assert_eq!(s.unacknowledged_bytes, Some(2048.0));
    assert_eq!(s.oldest_unacknowledged, Some(4.5), "the oldest, not a sum");
    assert_eq!(s.active_streams, Some(37.0));
    assert_eq!(parse_metrics("garbage\n{{{ x\n"), Sample::default());
    assert_eq!(
        parse_metrics("promtail_sent_entries_total 3\n").written_bytes,
        None,
        "an agent that does not say what was written"
    );
}

#[test]
fn quantities() {
    for (q, cpu) in [
        ("250m", Some(250.0)),
        ("0.5", Some(500.0)),
        ("2", Some(2000.0)),
        ("x", None),
    ] {
        assert_eq!(parse_cpu(q), cpu, "{q}");
    }
    for (q, bytes) in [
        ("700Mi", Some(700.0 * 1048576.0)),
        ("1Gi", Some(1073741824.0)),
        ("500M", Some(5e8)),
        ("1024", Some(1024.0)),
        ("lots", None),
    ] {
        assert_eq!(parse_memory(q), bytes, "{q}");
    }
}

fn pod(node: &str, ready: bool) -> PodView {
    PodView {
        name: format!("agent-{node}"),
        node: Some(node.into()),
        revision: Some("r2".into()),
        ready,
        ..Default::default()
    }
}

fn good() -> Sample {
    Sample {
        sent_entries: 100.0,
        rss_bytes: 40.0 * 1048576.0,
        written_bytes: Some(8192.0),
        unacknowledged_bytes: Some(0.0),
        oldest_unacknowledged: Some(0.0),
        active_streams: Some(12.0),
        ..Default::default()
    }
}

/// Start of the store's window in the table tests (Unix seconds).
const WINDOW_START: f64 = 1_796_000_000.0;

/// Read files whose newest entry is older than the window: shipped them, but wrote
/// nothing in it.
fn old_files() -> Sample {
    Sample {
        newest_entry: WINDOW_START - 3600.0,
        ..good()
    }
}

/// Wrote nothing, so shipped nothing.
fn quiet() -> Sample {
    Sample {
        sent_entries: 0.0,
        written_bytes: Some(0.0),
        ..good()
    }
}

fn spec() -> VerifySpec {
    VerifySpec {
        window: HumanDuration(Duration::from_secs(10)),
        query_endpoint: Some("http://loki".into()),
        max_cpu: Some("250m".into()),
        max_memory: Some("700Mi".into()),
        max_latency: None,
        ..Default::default()
    }
}

fn measured(sample: Sample, cpu: f64, store: f64) -> Measurements {
    Measurements {
        samples: BTreeMap::from([("agent-n1".to_string(), Ok(sample))]),
        cpu_millis: BTreeMap::from([("agent-n1".to_string(), cpu)]),
        store: Some(Ok(BTreeMap::from([("n1".to_string(), store)]))),
        ..Default::default()
    }
}

#[test]
fn latency_is_written_to_queryable_when_the_store_was_asked() {
    let spec = VerifySpec {
        max_latency: Some(HumanDuration(Duration::from_secs(5))),
        ..spec()
    };
    let latency = |m: &Measurements| {
        let p = pod("n1", true);
        let (checks, verdict) = judge(&spec, &[&p], m, true);
        let c = checks.into_iter().find(|c| c.name == "latency").unwrap();
        (
            c.value.unwrap(),
            c.passed,
            verdict.passed,
            c.message.unwrap(),
        )
    };
    let read_at = |newest: f64| Sample {
        newest_entry: newest,
        latency_sum: 1.0,
        latency_count: 4.0,
        ..good()
    };
    // The store returns what the agent read 2 s after it: within 5 s.
    let mut m = measured(read_at(1000.0), 20.0, 50.0);
    m.newest_queryable.insert("n1".into(), 998.0);
    let (value, passed, verdict, message) = latency(&m);
    assert_eq!((value.as_str(), passed, verdict), ("2.00s", true, true));
    assert!(message.contains("queryable"), "{message}");
    // 12 s behind: fails with the number.
    m.newest_queryable.insert("n1".into(), 988.0);
    assert_eq!(latency(&m).0, "12.00s");
    assert!(!latency(&m).1 && !latency(&m).2);
    // A quiet node the store has caught up with is not late.
    m.newest_queryable.insert("n1".into(), 1000.0);
    assert_eq!(latency(&m).0, "0.00s");
    // The store not asked (none set, or no entry yet): the agent's mean write -> ack.
    m.newest_queryable.clear();
    let (value, passed, _, message) = latency(&m);
    assert_eq!((value.as_str(), passed), ("0.25s", true));
    assert!(message.contains("acknowledgement"), "{message}");
}

#[test]
fn judge_table() {
    struct Case {
        name: &'static str,
        pod: PodView,
        m: Measurements,
        final_check: bool,
        passed: bool,
        mentions: &'static str,
    }
    let waiting = PodView {
        waiting_reason: Some("ErrImagePull".into()),
        ..pod("n1", false)
    };
    let restarted = PodView {
        restarts: 2,
        ..pod("n1", true)
    };
    let cases = [
        Case {
            name: "all good at the end",
            pod: pod("n1", true),
            m: measured(good(), 20.0, 50.0),
            final_check: true,
            passed: true,
            mentions: "",
        },
        Case {
            name: "not Ready yet during the window is fine",
            pod: pod("n1", false),
            m: measured(Sample::default(), 0.0, 0.0),
            final_check: false,
            passed: true,
            mentions: "",
        },
        Case {
            name: "not Ready at the end",
            pod: pod("n1", false),
            m: measured(good(), 20.0, 50.0),
            final_check: true,
            passed: false,
            mentions: "podsReady 0/1",
        },
        Case {
            name: "image pull error fails at once",
            pod: waiting,
            m: Measurements::default(),
            final_check: false,
            passed: false,
            mentions: "ErrImagePull on n1",
        },
        Case {
            name: "a restart fails at once",
            pod: restarted,
            m: measured(good(), 20.0, 50.0),
            final_check: false,
            passed: false,
            mentions: "restarts 2",
        },
        Case {
            name: "dropped entries fail at once",
            pod: pod("n1", true),
            m: measured(
                Sample {
                    dropped_entries: 12.0,
                    error_requests: 3.0,
                    ..good()
                },
                20.0,
                50.0,
            ),
            final_check: false,
            passed: false,
            mentions: "droppedEntries 12 (limit 0)",
        },
        Case {
            name: "nothing sent at the end",
            pod: pod("n1", true),
            m: measured(
                Sample {
                    sent_entries: 0.0,
                    ..good()
                },
                20.0,
                50.0,
            ),
            final_check: true,
            passed: false,
            mentions: "entriesSent 0",
        },
        Case {
            name: "no logs in the store at the end",
            pod: pod("n1", true),
            m: measured(good(), 20.0, 0.0),
            final_check: true,
            passed: false,
            mentions: "no entries from n1",
        },
        Case {
            name: "cpu over budget at the end",
            pod: pod("n1", true),
            m: measured(good(), 400.0, 50.0),
            final_check: true,
            passed: false,
            mentions: "cpu 400m (limit 250m)",
        },
        Case {
            name: "cpu over budget during the window waits",
            pod: pod("n1", true),
            m: measured(good(), 400.0, 50.0),
            final_check: false,
            passed: true,
            mentions: "",
        },
        Case {
            name: "memory over budget fails at once",
            pod: pod("n1", true),
            m: measured(
                Sample {
                    rss_bytes: 800.0 * 1048576.0,
                    ..good()
                },
                20.0,
                50.0,
            ),
            final_check: false,
            passed: false,
            mentions: "memory 800Mi (limit 700Mi)",
        },
        Case {
            name: "unscrapable at the end",
            pod: pod("n1", true),
            m: Measurements {
                samples: BTreeMap::from([(
                    "agent-n1".to_string(),
                    Err("connection refused".to_string()),
                )]),
                ..measured(good(), 20.0, 50.0)
            },
            final_check: true,
            passed: false,
            mentions: "connection refused",
        },
    ];
    for case in cases {
        let (checks, verdict) = judge(&spec(), &[&case.pod], &case.m, case.final_check);
        assert_eq!(
            verdict.passed, case.passed,
            "{}: {}",
            case.name, verdict.summary
        );
        assert!(
            verdict.summary.contains(case.mentions),
            "{}: {}",
            case.name,
            verdict.summary
        );
        assert!(
            checks.iter().all(|c| c.value.is_some()),
            "{}: every check has a value",
            case.name
        );
    }
}

#[test]
fn store_is_recorded_as_skipped_without_a_query() {
    let spec = VerifySpec {
        query_endpoint: None,
        ..spec()
    };
    let m = Measurements {
        store: None,
        ..measured(good(), 20.0, 0.0)
    };
    let (checks, verdict) = judge(&spec, &[&pod("n1", true)], &m, true);
    assert!(verdict.passed, "{}", verdict.summary);
    let store = checks.iter().find(|c| c.name == "storeEntries").unwrap();
    assert_eq!(store.value.as_deref(), Some("skipped"));
    assert_eq!(
        store.message.as_deref(),
        Some("rollout.verify.query is not set")
    );
}

/// `tenantFrom`: a store is set but not asked; the check says why.
#[test]
fn store_not_asked_says_why() {
    let m = Measurements {
        store: None,
        store_skipped: Some("not asked: tenantFrom".into()),
        ..measured(good(), 20.0, 0.0)
    };
    let (checks, verdict) = judge(&spec(), &[&pod("n1", true)], &m, true);
    assert!(verdict.passed, "{}", verdict.summary);
    let store = checks.iter().find(|c| c.name == "storeEntries").unwrap();
    assert_eq!(store.value.as_deref(), Some("skipped"));
    assert_eq!(store.message.as_deref(), Some("not asked: tenantFrom"));
}

#[test]
fn a_store_error_fails_store_entries_at_the_end_with_its_message() {
    let tenant_error = victorialogs::tenant("ops").unwrap_err();
    let m = Measurements {
        store: Some(Err(StoreError::Refused(tenant_error.clone()))),
        ..measured(good(), 20.0, 0.0)
    };
    let p = pod("n1", true);
    let (_, during) = judge(&spec(), &[&p], &m, false);
    assert!(during.passed, "{}", during.summary);
    let (checks, verdict) = judge(&spec(), &[&p], &m, true);
    assert!(!verdict.passed);
    assert!(
        verdict
            .summary
            .contains(&format!("storeEntries - (limit >0): {tenant_error}")),
        "{}",
        verdict.summary
    );
    let c = checks.iter().find(|c| c.name == "storeEntries").unwrap();
    assert!(!c.passed);
    assert_eq!(verdict.store_unreachable, None, "a refusal fails the step");
}

/// A store that cannot be reached holds the step (it neither passes nor rolls back) when
/// it is the one reason the step fails; anything else failing fails the step as usual.
#[test]
fn an_unreachable_store_is_the_step_holding_only_when_nothing_else_failed() {
    let outage = "VictoriaLogs query: error sending request: connection refused";
    let unreachable = |sample: Sample| Measurements {
        store: Some(Err(StoreError::Unreachable(outage.into()))),
        ..measured(sample, 20.0, 0.0)
    };
    let p = pod("n1", true);
    let lagging = Sample {
        oldest_unacknowledged: Some(300.0),
        ..good()
    };
    let quiet = Sample {
        written_bytes: Some(0.0),
        ..good()
    };
    // (case, measurements, final check, passed, holds)
    let cases = [
        ("during the window", unreachable(good()), false, true, false),
        (
            "at the end, all else passing",
            unreachable(good()),
            true,
            false,
            true,
        ),
        (
            "at the end, a node left lines behind",
            unreachable(lagging),
            true,
            false,
            false,
        ),
        (
            "every node quiet: nothing to find",
            unreachable(quiet),
            true,
            true,
            false,
        ),
    ];
    for (case, m, final_check, passed, holds) in cases {
        let (checks, verdict) = judge(&spec(), &[&p], &m, final_check);
        assert_eq!(verdict.passed, passed, "{case}: {}", verdict.summary);
        assert_eq!(
            verdict.store_unreachable.as_deref(),
            holds.then_some(outage),
            "{case}: {}",
            verdict.summary
        );
        let store = checks.iter().find(|c| c.name == "storeEntries").unwrap();
        assert!(
            store
                .message
                .as_deref()
                .unwrap_or_default()
                .contains(outage),
            "{case}: the check says why: {store:?}"
        );
    }
}

#[test]
fn the_store_comes_from_query_else_the_deprecated_query_endpoint() {
    let query = |kind, endpoint: &str| {
        Some(QuerySpec {
            kind,
            endpoint: endpoint.into(),
        })
    };
    let cases = [
        (None, None, None),
        (
            Some("http://loki:3100"),
            None,
            Some((StoreKind::Loki, "http://loki:3100")),
        ),
        (
            None,
            query(StoreKind::VictoriaLogs, "http://vl:9428"),
            Some((StoreKind::VictoriaLogs, "http://vl:9428")),
        ),
        (
            None,
            query(StoreKind::Loki, "http://loki:3100"),
            Some((StoreKind::Loki, "http://loki:3100")),
        ),
    ];
    for (query_endpoint, query, store) in cases {
        let spec = VerifySpec {
            query_endpoint: query_endpoint.map(str::to_string),
            query,
            ..VerifySpec::default()
        };
        assert_eq!(spec.store(), store, "{spec:?}");
    }
}

/// Several nodes: (node, sample, entries in the store).
fn nodes(of: &[(&str, Sample, f64)]) -> (Vec<PodView>, Measurements) {
    let pods = of.iter().map(|(n, _, _)| pod(n, true)).collect();
    let m = Measurements {
        samples: of
            .iter()
            .map(|(n, s, _)| (format!("agent-{n}"), Ok(s.clone())))
            .collect(),
        cpu_millis: of
            .iter()
            .map(|(n, _, _)| (format!("agent-{n}"), 20.0))
            .collect(),
        store: Some(Ok(of.iter().map(|(n, _, c)| (n.to_string(), *c)).collect())),
        ..Default::default()
    };
    (pods, m)
}

fn check<'a>(checks: &'a [CheckResult], name: &str) -> &'a CheckResult {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

#[test]
fn quiet_nodes_and_lag_table() {
    struct Case {
        name: &'static str,
        spec: VerifySpec,
        nodes: Vec<(&'static str, Sample, f64)>,
        final_check: bool,
        passed: bool,
        /// (check, value, words of its message)
        shows: &'static [(&'static str, &'static str, &'static str)],
    }
    let with_latency = VerifySpec {
        max_latency: Some(HumanDuration(Duration::from_secs(60))),
        query_endpoint: None,
        ..spec()
    };
    let behind = |age: f64, bytes: f64| Sample {
        oldest_unacknowledged: Some(age),
        unacknowledged_bytes: Some(bytes),
        latency_sum: 1.0,
        latency_count: 4.0,
        ..good()
    };
    let cases = [
        Case {
            name: "regression: a node whose only files are old is quiet for the window (first install on a node with old logs)",
            spec: spec(),
            nodes: vec![("n1", good(), 50.0), ("n2", old_files(), 0.0)],
            final_check: true,
            passed: true,
            shows: &[("storeEntries", "50", "quiet (wrote nothing): n2")],
        },
        Case {
            name: "a quiet node passes with nothing sent and nothing in the store",
            spec: spec(),
            nodes: vec![("n1", quiet(), 0.0)],
            final_check: true,
            passed: true,
            shows: &[
                ("entriesSent", "0", "all 1 nodes quiet (wrote nothing)"),
                ("storeEntries", "0", "all 1 nodes quiet"),
                ("lag", "0.0s", "worst node n1: 0 bytes unacknowledged"),
            ],
        },
        Case {
            name: "only the node that wrote is asked for entries; the other is named quiet",
            spec: spec(),
            nodes: vec![("n1", good(), 50.0), ("n2", quiet(), 0.0)],
            final_check: true,
            passed: true,
            shows: &[
                ("entriesSent", "100", "quiet (wrote nothing): n2"),
                ("storeEntries", "50", "quiet (wrote nothing): n2"),
            ],
        },
        Case {
            name: "a node that wrote and has nothing in the store fails, named",
            spec: spec(),
            nodes: vec![("n1", good(), 0.0), ("n2", quiet(), 0.0)],
            final_check: true,
            passed: false,
            shows: &[(
                "storeEntries",
                "0",
                "no entries from n1; quiet (wrote nothing): n2",
            )],
        },
        Case {
            name: "a node that wrote and sent nothing fails",
            spec: spec(),
            nodes: vec![
                (
                    "n1",
                    Sample {
                        sent_entries: 0.0,
                        ..good()
                    },
                    50.0,
                ),
                ("n2", quiet(), 0.0),
            ],
            final_check: true,
            passed: false,
            shows: &[("entriesSent", "0", "quiet (wrote nothing): n2")],
        },
        Case {
            name: "every node quiet: latency with no delivery passes",
            spec: with_latency.clone(),
            nodes: vec![("n1", quiet(), 0.0), ("n2", quiet(), 0.0)],
            final_check: true,
            passed: true,
            shows: &[
                ("entriesSent", "0", "all 2 nodes quiet"),
                ("latency", "-", "every node quiet"),
            ],
        },
        Case {
            name: "entries sent but lines left behind fail on lag at the end",
            spec: spec(),
            nodes: vec![
                ("n1", behind(45.0, 2048.0), 50.0),
                ("n2", behind(2.0, 10.0), 50.0),
            ],
            final_check: true,
            passed: false,
            shows: &[("lag", "45.0s", "worst node n1: 2048 bytes unacknowledged")],
        },
        Case {
            name: "lag is not judged during the window",
            spec: spec(),
            nodes: vec![("n1", behind(45.0, 2048.0), 50.0)],
            final_check: false,
            passed: true,
            shows: &[("lag", "45.0s", "worst node n1")],
        },
        Case {
            name: "lag within maxLatency passes",
            spec: with_latency,
            nodes: vec![("n1", behind(45.0, 2048.0), 50.0)],
            final_check: true,
            passed: true,
            shows: &[("lag", "45.0s", "")],
        },
        Case {
            name: "an agent that does not export its lag fails at the end",
            spec: spec(),
            nodes: vec![(
                "n1",
                Sample {
                    oldest_unacknowledged: None,
                    ..good()
                },
                50.0,
            )],
            final_check: true,
            passed: false,
            shows: &[(
                "lag",
                "-",
                "logpipe_oldest_unacknowledged_seconds not exported by n1",
            )],
        },
        Case {
            name: "an agent that does not say what was written is not quiet",
            spec: spec(),
            nodes: vec![(
                "n1",
                Sample {
                    written_bytes: None,
                    ..quiet()
                },
                0.0,
            )],
            final_check: true,
            passed: false,
            shows: &[
                ("entriesSent", "0", ""),
                ("storeEntries", "0", "no entries from n1"),
            ],
        },
    ];
    for case in cases {
        let (pods, mut m) = nodes(&case.nodes);
        m.wrote_since = Some(WINDOW_START);
        let refs: Vec<&PodView> = pods.iter().collect();
        let (checks, verdict) = judge(&case.spec, &refs, &m, case.final_check);
        assert_eq!(
            verdict.passed, case.passed,
            "{}: {}",
            case.name, verdict.summary
        );
        for (name, value, words) in case.shows {
            let c = check(&checks, name);
            assert_eq!(c.value.as_deref(), Some(*value), "{}: {c:?}", case.name);
            let message = c.message.as_deref().unwrap_or_default();
            assert!(message.contains(words), "{}: {c:?}", case.name);
        }
        // What e2e tests parse stays a number.
        for name in ["entriesSent", "storeEntries"] {
            let value = check(&checks, name).value.clone().unwrap_or_default();
            assert!(
                value.parse::<f64>().is_ok(),
                "{}: {name} {value}",
                case.name
            );
        }
    }
}

#[test]
fn stream_cardinality_table() {
    struct Case {
        name: &'static str,
        max_streams: Option<i64>,
        growth: Option<&'static str>,
        /// Active streams of the new agents on n1, n2.
        now: [f64; 2],
        baseline: Option<&'static [(&'static str, i64)]>,
        final_check: bool,
        passed: bool,
        shows: &'static [(&'static str, &'static str, &'static str)],
    }
    let cases = [
        Case {
            name: "under maxStreams",
            max_streams: Some(500),
            growth: None,
            now: [40.0, 12.0],
            baseline: None,
            final_check: true,
            passed: true,
            shows: &[("streams", "40", "worst node n1")],
        },
        Case {
            name: "over maxStreams fails at once, during the window",
            max_streams: Some(500),
            growth: None,
            now: [900.0, 12.0],
            baseline: None,
            final_check: false,
            passed: false,
            shows: &[("streams", "900", "worst node n1")],
        },
        Case {
            name: "no baseline (first install): growth skipped, saying so",
            max_streams: None,
            growth: Some("2x"),
            now: [40.0, 12.0],
            baseline: None,
            final_check: true,
            passed: true,
            shows: &[("streamGrowth", "skipped", "first install")],
        },
        Case {
            name: "3.3x the stable streams on the same node fails at once against 2x",
            max_streams: None,
            growth: Some("2x"),
            now: [40.0, 12.0],
            baseline: Some(&[("n1", 12), ("n2", 12)]),
            final_check: false,
            passed: false,
            shows: &[(
                "streamGrowth",
                "3.33",
                "worst node n1: 12 -> 40 streams (3.3x), 2 nodes compared",
            )],
        },
        Case {
            name: "1.5x passes 2x",
            max_streams: None,
            growth: Some("2"),
            now: [18.0, 12.0],
            baseline: Some(&[("n1", 12), ("n2", 12)]),
            final_check: true,
            passed: true,
            shows: &[("streamGrowth", "1.50", "12 -> 18 streams")],
        },
        Case {
            name: "only nodes with a baseline are compared",
            max_streams: None,
            growth: Some("2x"),
            now: [400.0, 12.0],
            baseline: Some(&[("n2", 12)]),
            final_check: true,
            passed: true,
            shows: &[("streamGrowth", "1.00", "1 nodes compared")],
        },
        Case {
            name: "a baseline on no node of the step: skipped",
            max_streams: None,
            growth: Some("2x"),
            now: [400.0, 12.0],
            baseline: Some(&[("n9", 12)]),
            final_check: true,
            passed: true,
            shows: &[("streamGrowth", "skipped", "no node of the step")],
        },
    ];
    for case in cases {
        let spec = VerifySpec {
            max_streams: case.max_streams,
            max_stream_growth: case.growth.map(str::to_string),
            ..spec()
        };
        let streams = |n: f64| Sample {
            active_streams: Some(n),
            ..good()
        };
        let (pods, mut m) = nodes(&[
            ("n1", streams(case.now[0]), 50.0),
            ("n2", streams(case.now[1]), 50.0),
        ]);
        m.stream_baseline = case
            .baseline
            .map(|b| b.iter().map(|(n, c)| (n.to_string(), *c)).collect());
        let refs: Vec<&PodView> = pods.iter().collect();
        let (checks, verdict) = judge(&spec, &refs, &m, case.final_check);
        assert_eq!(
            verdict.passed, case.passed,
            "{}: {}",
            case.name, verdict.summary
        );
        for (name, value, words) in case.shows {
            let c = check(&checks, name);
            assert_eq!(c.value.as_deref(), Some(*value), "{}: {c:?}", case.name);
            assert!(
                c.message.as_deref().unwrap_or_default().contains(words),
                "{}: {c:?}",
                case.name
            );
        }
    }
}

#[test]
fn max_stream_growth_reads_as_a_ratio() {
    for (raw, limit) in [
        ("2x", Some(2.0)),
        ("1.5", Some(1.5)),
        ("10x", Some(10.0)),
        ("0x", None),
        ("a lot", None),
    ] {
        let spec = VerifySpec {
            max_stream_growth: Some(raw.into()),
            ..spec()
        };
        assert_eq!(spec.stream_growth_limit(), limit, "{raw}");
    }
}

#[test]
fn pipeline_drops_table() {
    struct Case {
        name: &'static str,
        limit: &'static str,
        /// Lines read and dropped by the new agents on n1, n2 (`None`: not exported).
        now: [Option<(i64, i64)>; 2],
        /// Lines read and dropped by the stable agents before they moved.
        baseline: Option<&'static [(&'static str, i64, i64)]>,
        final_check: bool,
        passed: bool,
        value: &'static str,
        says: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "a bad drop rule (every other line) fails at the end of the window",
            limit: "10%",
            now: [Some((200, 100)), Some((200, 0))],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: false,
            value: "50.0%",
            says: &[
                "worst node n1: 0.0% of 1000 lines dropped by the stable revision -> 50.0% of 200 by the new one, 2 nodes compared",
                "raise rollout.verify.maxDropIncrease if the new drop rule is intended",
            ],
        },
        Case {
            name: "the same bad rule does not fail during the window (judged at the end)",
            limit: "10%",
            now: [Some((200, 100)), Some((200, 0))],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: false,
            passed: true,
            value: "50.0%",
            says: &["worst node n1"],
        },
        Case {
            name: "the same share as the stable revision passes",
            limit: "10%",
            now: [Some((200, 20)), Some((300, 30))],
            baseline: Some(&[("n1", 1000, 100), ("n2", 1000, 100)]),
            final_check: true,
            passed: true,
            value: "10.0%",
            says: &["10.0% of 1000 lines dropped by the stable revision -> 10.0% of"],
        },
        Case {
            name: "an intended small increase within the limit passes",
            limit: "10%",
            now: [Some((200, 10)), Some((200, 0))],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: true,
            value: "5.0%",
            says: &[
                "worst node n1: 0.0% of 1000 lines dropped by the stable revision -> 5.0% of 200",
            ],
        },
        Case {
            name: "a stable revision already dropping 40%: 45% passes at 10%",
            limit: "10%",
            now: [Some((200, 90)), Some((200, 80))],
            baseline: Some(&[("n1", 1000, 400), ("n2", 1000, 400)]),
            final_check: true,
            passed: true,
            value: "45.0%",
            says: &["40.0% of 1000 lines dropped by the stable revision -> 45.0% of 200"],
        },
        Case {
            name: "a quiet node is too few lines to judge, not failed; the other is judged",
            limit: "10%",
            now: [Some((20, 20)), Some((200, 0))],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: true,
            value: "0.0%",
            says: &[
                "worst node n2",
                "1 nodes compared",
                "too few lines to judge (under 50 read): n1",
            ],
        },
        Case {
            name: "every node too quiet: passed, with a note",
            limit: "10%",
            now: [Some((20, 20)), Some((0, 0))],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: true,
            value: "-",
            says: &["too few lines to judge (under 50 read): n1, n2"],
        },
        Case {
            name: "no baseline (a first install): skipped, saying so",
            limit: "10%",
            now: [Some((200, 100)), Some((200, 100))],
            baseline: None,
            final_check: true,
            passed: true,
            value: "skipped",
            says: &["first install"],
        },
        Case {
            name: "stable agents that do not export line counts: skipped, saying so",
            limit: "10%",
            now: [Some((200, 100)), Some((200, 100))],
            baseline: Some(&[]),
            final_check: true,
            passed: true,
            value: "skipped",
            says: &["do not export logpipe_read_lines_total or promtail_read_lines_total"],
        },
        Case {
            name: "only nodes with a stable count are compared; a thin baseline is none",
            limit: "10%",
            now: [Some((200, 100)), Some((200, 0))],
            baseline: Some(&[("n1", 30, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: true,
            value: "0.0%",
            says: &[
                "1 nodes compared",
                "no stable line counts to compare with: n1",
            ],
        },
        Case {
            name: "a new agent that does not export its lines is not compared",
            limit: "10%",
            now: [None, None],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: true,
            value: "skipped",
            says: &["logpipe_read_lines_total not exported by the new agent: n1, n2"],
        },
        Case {
            name: "a bigger limit lets the bad rule pass",
            limit: "60%",
            now: [Some((200, 100)), Some((200, 0))],
            baseline: Some(&[("n1", 1000, 0), ("n2", 1000, 0)]),
            final_check: true,
            passed: true,
            value: "50.0%",
            says: &["worst node n1"],
        },
    ];
    for case in cases {
        let spec = VerifySpec {
            max_drop_increase: case.limit.into(),
            ..spec()
        };
        let lines = |now: Option<(i64, i64)>| Sample {
            read_lines: now.map(|(r, _)| r as f64),
            pipeline_dropped: now.map_or(0.0, |(_, d)| d as f64),
            ..good()
        };
        let (pods, mut m) = nodes(&[
            ("n1", lines(case.now[0]), 50.0),
            ("n2", lines(case.now[1]), 50.0),
        ]);
        m.drop_baseline = case.baseline.map(|b| {
            b.iter()
                .map(|(n, read, dropped)| {
                    (
                        n.to_string(),
                        LineCounts {
                            read: *read,
                            dropped: *dropped,
                        },
                    )
                })
                .collect()
        });
        let refs: Vec<&PodView> = pods.iter().collect();
        let (checks, verdict) = judge(&spec, &refs, &m, case.final_check);
        assert_eq!(
            verdict.passed, case.passed,
            "{}: {}",
            case.name, verdict.summary
        );
        let c = check(&checks, "pipelineDrops");
        assert_eq!(c.value.as_deref(), Some(case.value), "{}: {c:?}", case.name);
        assert_eq!(c.limit.as_deref(), Some(case.limit), "{}", case.name);
        for words in case.says {
            assert!(
                c.message.as_deref().unwrap_or_default().contains(words),
                "{}: {words:?} not in {c:?}",
                case.name
            );
        }
        if !case.passed {
            assert!(
                verdict.summary.contains("pipelineDrops 50.0% (limit 10%)"),
                "{}",
                verdict.summary
            );
        }
    }
}

#[test]
fn pipeline_drops_off_at_100_percent() {
    let spec = VerifySpec {
        max_drop_increase: "100%".into(),
        ..spec()
    };
    let (pods, m) = nodes(&[("n1", good(), 50.0)]);
    let refs: Vec<&PodView> = pods.iter().collect();
    let (checks, _) = judge(&spec, &refs, &m, true);
    assert!(
        checks.iter().all(|c| c.name != "pipelineDrops"),
        "{checks:?}"
    );
    assert!(!spec.pipeline_drops() && !spec.needs_baseline());
    assert!(VerifySpec::default().needs_baseline(), "on by default");
}

#[test]
fn max_drop_increase_reads_as_a_share() {
    for (raw, limit) in [
        ("10%", Some(0.1)),
        ("0%", Some(0.0)),
        ("2.5%", Some(0.025)),
        ("100%", Some(1.0)),
        ("10", None),
        ("150%", None),
        ("lots%", None),
    ] {
        let spec = VerifySpec {
            max_drop_increase: raw.into(),
            ..spec()
        };
        assert_eq!(spec.drop_increase_limit(), limit, "{raw}");
    }
}

#[test]
fn lines_read_are_the_agents_total_else_the_sum_over_files() {
    let both = "promtail_read_lines_total{path=\"/a/0.log\"} 10\n\
                promtail_read_lines_total{path=\"/b/0.log\"} 5\n\
                logpipe_read_lines_total 40\n\
                logentry_dropped_lines_total{reason=\"drop_stage\"} 6\n\
                logentry_dropped_lines_total{reason=\"rate_limited\"} 2\n";
    let s = parse_metrics(both);
    assert_eq!(
        s.read_lines,
        Some(40.0),
        "the total outlives rotated files' series"
    );
    assert_eq!(s.pipeline_dropped, 8.0, "every reason");
    let promtail_only = "promtail_read_lines_total{path=\"/a/0.log\"} 10\n\
                         promtail_read_lines_total{path=\"/b/0.log\"} 5\n";
    assert_eq!(parse_metrics(promtail_only).read_lines, Some(15.0));
    assert_eq!(parse_metrics(promtail_only).pipeline_dropped, 0.0);
    assert_eq!(parse_metrics(METRICS).read_lines, None);
}

#[test]
fn store_answers_tell_an_outage_from_a_refusal() {
    // (status, an outage)
    let cases = [
        (429, true),
        (500, true),
        (502, true),
        (503, true),
        (400, false),
        (401, false),
        (403, false),
        (404, false),
    ];
    for (status, outage) in cases {
        let e = StoreError::of_status(status, format!("answered {status}"));
        assert_eq!(
            matches!(e, StoreError::Unreachable(_)),
            outage,
            "{status}: {e:?}"
        );
        assert_eq!(e.to_string(), format!("answered {status}"));
    }
}

#[test]
fn store_urls_in_messages_carry_no_credentials() {
    let cases = [
        (
            "http://user:secret@vl:9428/select/logsql/stats_query",
            "http://vl:9428/select/logsql/stats_query",
        ),
        (
            "https://token@loki/loki/api/v1/query",
            "https://loki/loki/api/v1/query",
        ),
        (
            "http://127.0.0.1:9428/select",
            "http://127.0.0.1:9428/select",
        ),
        ("not a url", "not a url"),
    ];
    for (url, shown) in cases {
        assert_eq!(without_credentials(url), shown);
    }
}

/// The end of a window and any failure are written into the status; a step held on an
/// unreachable store only once.
#[test]
fn verdicts_worth_recording() {
    let verdict = |final_check: bool, passed: bool, held: bool| Verdict {
        final_check,
        passed,
        summary: String::new(),
        store_unreachable: held.then(|| "VictoriaLogs query: refused".into()),
    };
    let failed_at = |revision: &str, step: i32| Verification {
        revision: revision.into(),
        step: Some(step),
        passed: false,
        ..Default::default()
    };
    let held = failed_at("r2", 0);
    // (case, verdict, last recorded, recorded)
    let cases = [
        (
            "a passing look during the window",
            verdict(false, true, false),
            None,
            false,
        ),
        (
            "a failure during the window",
            verdict(false, false, false),
            None,
            true,
        ),
        (
            "the end of the window",
            verdict(true, true, false),
            None,
            true,
        ),
        ("a hold, first look", verdict(true, false, true), None, true),
        (
            "a hold, recorded already",
            verdict(true, false, true),
            Some(&held),
            false,
        ),
        (
            "a hold of another step",
            verdict(true, false, true),
            Some(&failed_at("r2", 1)),
            true,
        ),
        (
            "a hold of another revision",
            verdict(true, false, true),
            Some(&failed_at("r1", 0)),
            true,
        ),
        (
            "a real failure after a hold",
            verdict(true, false, false),
            Some(&held),
            true,
        ),
    ];
    for (case, v, last, recorded) in cases {
        assert_eq!(worth_recording(&v, "r2", 0, last), recorded, "{case}");
    }
}

/// A step's baseline is measured in the background: the first ask answers nothing and
/// starts it, `done` runs once it is in, and then it is the answer for that step only.
#[tokio::test]
async fn a_baseline_is_measured_in_the_background_then_kept_for_its_step() {
    // A port nobody listens on: the agent's answer is a refused connection.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        i32::from(listener.local_addr().unwrap().port())
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let verifier = std::sync::Arc::new(Verifier::new().unwrap());
    let target = Target {
        pod: "agent-a".into(),
        uid: "uid-a".into(),
        node: "n1".into(),
        ip: Some("127.0.0.1".into()),
    };
    let key = |step: usize| StepKey {
        pipeline: "lp-uid".into(),
        revision: "r2".into(),
        step,
        started: Some("2026-12-06T10:00:00Z".into()),
    };
    let ask = |step: usize| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = verifier.baseline_or_start(key(step), vec![target.clone()], port, move || {
            let _ = tx.send(());
        });
        (answer, rx)
    };
    let (first, done) = ask(1);
    assert_eq!(first, None, "nothing is measured yet");
    tokio::time::timeout(std::time::Duration::from_secs(10), done)
        .await
        .expect("the background measurement ends")
        .expect("and wakes its reconcile");
    let (kept, _) = ask(1);
    let kept = kept.expect("the measured baseline is the answer now");
    assert_eq!(kept.step, 1);
    assert!(
        kept.nodes.is_empty(),
        "a refused agent is left out: {kept:?}"
    );
    let (next_step, _) = ask(2);
    assert_eq!(next_step, None, "another step is measured anew");
}

/// A verification is measured in the background like a baseline, but its answer is taken
/// by the reconcile that judges it: asked again, it is measured again.
#[tokio::test]
async fn a_verification_is_measured_in_the_background_and_taken_once() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        i32::from(listener.local_addr().unwrap().port())
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let verifier = std::sync::Arc::new(Verifier::new().unwrap());
    let key = MeasureKey {
        step: StepKey {
            pipeline: "lp-uid".into(),
            revision: "r2".into(),
            step: 1,
            started: None,
        },
        final_check: true,
    };
    let ask = || {
        let request = MeasureRequest {
            targets: vec![Target {
                pod: "agent-a".into(),
                uid: "uid-a".into(),
                node: "n1".into(),
                ip: Some("127.0.0.1".into()),
            }],
            port,
            store: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = verifier.measurements_or_start(key.clone(), request, move || {
            let _ = tx.send(());
        });
        (answer, rx)
    };
    let (first, done) = ask();
    assert!(first.is_none(), "nothing is measured yet");
    tokio::time::timeout(std::time::Duration::from_secs(10), done)
        .await
        .expect("the background measurement ends")
        .expect("and wakes its reconcile");
    let (measured, _) = ask();
    let measured = measured.expect("the measurement is the answer now");
    assert!(
        measured.samples["agent-a"].is_err(),
        "a refused agent is an error sample: {measured:?}"
    );
    let (again, _) = ask();
    assert!(again.is_none(), "taken: the next ask measures again");
}
