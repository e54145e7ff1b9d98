//! What is sent to each store, and how each documented answer is read.

use super::*;

fn params(query: &str) -> Vec<(&'static str, String)> {
    vec![("query", query.to_string())]
}

// ---- Loki (LogQL): unit tests only, there is no Loki in the test bed (AGPL).

#[test]
fn loki_count_request_is_logql_by_node_name_with_the_tenant_header() {
    let request = loki::count_request(&["kwok-node-0", "n.1"], Duration::from_secs(10), "ops");
    assert_eq!(
        request,
        StoreRequest {
            path: "/loki/api/v1/query",
            params: params(
                r#"sum by (node_name) (count_over_time({node_name=~"kwok-node-0|n\\.1"}[10s]))"#
            ),
            headers: vec![("X-Scope-OrgID", "ops".into())],
        }
    );
    // Under a second still asks for one.
    assert!(loki::count_query(&["a"], Duration::from_millis(300)).ends_with("[1s]))"));
}

#[test]
fn loki_newest_request_asks_one_entry_backward_over_the_window() {
    let now = Duration::from_secs(1_700_000_010);
    let request = loki::newest_request("ops-node-1", Duration::from_secs(10), now, "ops");
    assert_eq!(
        request,
        StoreRequest {
            path: "/loki/api/v1/query_range",
            params: vec![
                ("query", r#"{node_name="ops-node-1"}"#.into()),
                ("limit", "1".into()),
                ("direction", "backward".into()),
                ("start", "1700000000000000000".into()),
                ("end", "1700000010000000000".into()),
            ],
            headers: vec![("X-Scope-OrgID", "ops".into())],
        }
    );
    assert_eq!(loki::newest_query(r#"a"b\c"#), r#"{node_name="a\"b\\c"}"#);
}

#[test]
fn loki_vector_answer() {
    let body = r#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"node_name":"kwok-node-0"},"value":[1700000000.1,"42"]},
        {"metric":{"node_name":"kwok-node-1"},"value":[1700000000.1,"7"]}]}}"#;
    assert_eq!(
        loki::parse_vector(body).unwrap(),
        BTreeMap::from([
            ("kwok-node-0".to_string(), 42.0),
            ("kwok-node-1".to_string(), 7.0)
        ])
    );
    let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
    assert_eq!(loki::parse_vector(empty).unwrap(), BTreeMap::new());
    let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
    assert_eq!(
        loki::parse_vector(error).unwrap_err(),
        "Loki answered error: parse error"
    );
    assert!(loki::parse_vector("<html>").is_err());
}

#[test]
fn loki_streams_answer() {
    let body = r#"{"status":"success","data":{"resultType":"streams","result":[
        {"stream":{"node_name":"n1","pod":"a"},"values":[["1700000002500000000","x"]]},
        {"stream":{"node_name":"n1","pod":"b"},"values":[["1700000001000000000","y"]]}]}}"#;
    assert_eq!(loki::parse_newest(body).unwrap(), Some(1_700_000_002.5));
    let empty = r#"{"status":"success","data":{"resultType":"streams","result":[]}}"#;
    assert_eq!(loki::parse_newest(empty).unwrap(), None);
    assert!(loki::parse_newest("<html>").is_err());
}

#[test]
fn loki_error_answers_are_plain_text() {
    let body = "parse error at line 1, col 1: syntax error: unexpected IDENTIFIER\n";
    assert_eq!(
        answer(StoreKind::Loki, 400, body.into()).unwrap_err(),
        "Loki answered 400: parse error at line 1, col 1: syntax error: unexpected IDENTIFIER"
    );
    assert_eq!(
        answer(StoreKind::Loki, 204, "ok".into()).unwrap(),
        "ok",
        "any 2xx is an answer"
    );
    let long = "x".repeat(1000);
    assert_eq!(
        answer(StoreKind::Loki, 502, long).unwrap_err().len(),
        "Loki answered 502: ".len() + 200,
        "an HTML error page is cut short"
    );
}

// ---- VictoriaLogs (LogsQL): also run end to end against the test bed's VictoriaLogs.

#[test]
fn victorialogs_stats_request_is_one_logsql_stats_query_with_tenant_headers() {
    let request =
        victorialogs::stats_request(&["kwok-node-0", "n.1"], Duration::from_secs(120), "12:3")
            .unwrap();
    assert_eq!(
        request,
        StoreRequest {
            path: "/select/logsql/stats_query",
            params: params(
                r#"_time:120s {node_name in ("kwok-node-0","n.1")} | stats by (node_name) count() hits, max(_time) newest"#
            ),
            headers: vec![("AccountID", "12".into()), ("ProjectID", "3".into())],
        }
    );
    let default_project = victorialogs::stats_request(&["a"], Duration::from_millis(10), "0");
    let default_project = default_project.unwrap();
    assert_eq!(
        default_project.headers,
        [
            ("AccountID", "0".to_string()),
            ("ProjectID", "0".to_string())
        ]
    );
    assert!(default_project.params[0].1.starts_with("_time:1s "));
}

#[test]
fn victorialogs_node_names_are_quoted_logsql_strings() {
    assert_eq!(victorialogs::quote("kwok-node-0"), r#""kwok-node-0""#);
    assert_eq!(victorialogs::quote(r#"a"b\c"#), r#""a\"b\\c""#);
    assert_eq!(victorialogs::quote("a\nb\u{1}"), r#""a\nb\u0001""#);
    assert_eq!(victorialogs::quote("nœud"), "\"nœud\"");
    assert_eq!(
        victorialogs::stats_query(&[r#"x") | delete"#], Duration::from_secs(5)),
        r#"_time:5s {node_name in ("x\") | delete")} | stats by (node_name) count() hits, max(_time) newest"#
    );
}

#[test]
fn victorialogs_tenants_are_numbers() {
    for (tenant, ids) in [
        ("0", Some((0, 0))),
        ("12", Some((12, 0))),
        ("12:3", Some((12, 3))),
        ("4294967295:4294967295", Some((u32::MAX, u32::MAX))),
        ("ops", None),
        ("4294967296", None),
        ("12:", None),
        (":3", None),
        ("1:2:3", None),
        ("+1", None),
        ("-1", None),
        ("", None),
    ] {
        assert_eq!(victorialogs::tenant(tenant).ok(), ids, "{tenant:?}");
    }
    let e = victorialogs::stats_request(&["n1"], Duration::from_secs(10), "ops").unwrap_err();
    assert!(
        e.contains(r#"tenant "ops""#)
            && e.contains("<accountID>:<projectID>")
            && e.contains("AccountID"),
        "{e}"
    );
}

#[test]
fn victorialogs_stats_answer() {
    // The shape of app/vlselect/logsql/stats_query_response.qtpl: one sample per node and
    // stats function, the function's result name as __name__, values as strings.
    let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"hits","node_name":"kwok-node-0"},"value":[1700000010,"42"]},{"metric":{"__name__":"newest","node_name":"kwok-node-0"},"value":[1700000010,"2023-11-14T22:13:18.5Z"]},{"metric":{"__name__":"hits","node_name":"kwok-node-1"},"value":[1700000010,"7"]},{"metric":{"__name__":"newest","node_name":"kwok-node-1"},"value":[1700000010,"2023-11-14T22:13:20.123456789Z"]}]}}"#;
    let answer = victorialogs::parse_stats(body).unwrap();
    assert_eq!(
        answer.counts,
        BTreeMap::from([
            ("kwok-node-0".to_string(), 42.0),
            ("kwok-node-1".to_string(), 7.0)
        ])
    );
    assert_eq!(answer.newest["kwok-node-0"], 1_699_999_998.5);
    assert!((answer.newest["kwok-node-1"] - 1_700_000_000.123_456).abs() < 1e-5);
}

#[test]
fn victorialogs_empty_and_odd_answers() {
    let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
    assert_eq!(
        victorialogs::parse_stats(empty).unwrap(),
        StoreAnswer::default()
    );
    // Samples without a node, of another function, or with an unreadable value are left out.
    let odd = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"hits"},"value":[1,"3"]},{"metric":{"__name__":"other","node_name":"n1"},"value":[1,"3"]},{"metric":{"__name__":"newest","node_name":"n1"},"value":[1,""]},{"metric":{"__name__":"hits","node_name":"n1"},"value":[1,"x"]}]}}"#;
    assert_eq!(
        victorialogs::parse_stats(odd).unwrap(),
        StoreAnswer::default()
    );
    assert!(victorialogs::parse_stats("<html>").is_err());
    assert!(victorialogs::parse_stats("").is_err());
}

#[test]
fn victorialogs_error_answers() {
    // httpserver.SendPrometheusError: 422 unless the error carries its own status.
    let body = r#"{"status":"error","errorType":"422","error":"cannot parse query [_time:10s {node_name in (]: missing ')'"}"#;
    assert_eq!(
        answer(StoreKind::VictoriaLogs, 422, body.into()).unwrap_err(),
        "VictoriaLogs answered 422: cannot parse query [_time:10s {node_name in (]: missing ')'"
    );
    assert_eq!(
        victorialogs::parse_stats(body).unwrap_err(),
        "VictoriaLogs answered error: cannot parse query [_time:10s {node_name in (]: missing ')'"
    );
    assert_eq!(
        answer(
            StoreKind::VictoriaLogs,
            400,
            "cannot obtain tenantID: cannot parse \"ops\" as uint32\n".into()
        )
        .unwrap_err(),
        r#"VictoriaLogs answered 400: cannot obtain tenantID: cannot parse "ops" as uint32"#
    );
}
