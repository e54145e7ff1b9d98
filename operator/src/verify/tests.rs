//! Tables for the pure half of verification.

use super::*;
use logpipe_agent::config::HumanDuration;

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
    assert_eq!(parse_metrics("garbage\n{{{ x\n"), Sample::default());
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
        ..Default::default()
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
        newest_queryable: BTreeMap::new(),
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

#[test]
fn a_store_error_fails_store_entries_at_the_end_with_its_message() {
    let tenant_error = victorialogs::tenant("ops").unwrap_err();
    let m = Measurements {
        store: Some(Err(tenant_error.clone())),
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
