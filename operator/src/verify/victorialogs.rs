//! LogsQL for VictoriaLogs: the request verification sends and the answer it reads (pure).
//!
//! One request answers both questions, for every node of the step:
//! `GET /select/logsql/stats_query` with
//! `_time:<window>s {node_name in ("a","b")} | stats by (node_name) count() hits, max(_time) newest`.
//! The answer is a Prometheus-style instant vector with two samples per node that has
//! entries: `__name__: hits` (entries over the window) and `__name__: newest` (the newest
//! entry's `_time`, RFC 3339). `time` is left out: the store evaluates `_time:<window>s`
//! back from its own now.
//!
//! The agent's stream labels (`node_name` among them) are VictoriaLogs stream fields, so
//! `{node_name in (...)}` is a stream filter. Node names are LogsQL quoted strings (Go
//! string syntax); `in` matches each value literally.
//!
//! Tenant: `spec.tenant` is `<accountID>[:<projectID>]`, two uint32 numbers, sent in the
//! `AccountID` and `ProjectID` headers (the agent's `X-Scope-OrgID` push header is read the
//! same way by VictoriaLogs' Loki endpoint). Errors come back as a non-2xx status with
//! `{"status":"error","errorType":"422","error":"..."}` (see [`super::answer`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use super::{StoreAnswer, StoreRequest};

const STATS_QUERY_PATH: &str = "/select/logsql/stats_query";

/// `(AccountID, ProjectID)` from a tenant `<accountID>[:<projectID>]`.
pub fn tenant(tenant: &str) -> Result<(u32, u32), String> {
    let (account, project) = tenant.split_once(':').unwrap_or((tenant, "0"));
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    match (number(account), number(project)) {
        (Some(a), Some(p)) => Ok((a, p)),
        _ => Err(format!(
            "tenant {tenant:?} cannot be queried in VictoriaLogs: it must be <accountID> or <accountID>:<projectID>, numbers up to 4294967295 (e.g. 0 or 12:3), sent as the AccountID and ProjectID headers"
        )),
    }
}

/// Entries and newest entry per node over the window, for the tenant.
pub fn stats_request(
    nodes: &[&str],
    window: Duration,
    tenant_id: &str,
) -> Result<StoreRequest, String> {
    let (account, project) = tenant(tenant_id)?;
    Ok(StoreRequest {
        path: STATS_QUERY_PATH,
        params: vec![("query", stats_query(nodes, window))],
        headers: vec![
            ("AccountID", account.to_string()),
            ("ProjectID", project.to_string()),
        ],
    })
}

/// `_time:10s {node_name in ("a","b")} | stats by (node_name) count() hits, max(_time) newest`.
pub fn stats_query(nodes: &[&str], window: Duration) -> String {
    let quoted: Vec<String> = nodes.iter().map(|n| quote(n)).collect();
    format!(
        "_time:{}s {{node_name in ({})}} | stats by (node_name) count() hits, max(_time) newest",
        window.as_secs().max(1),
        quoted.join(",")
    )
}

/// A LogsQL quoted string (read with Go's `strconv.Unquote`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Deserialize)]
struct Response {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    metric: BTreeMap<String, String>,
    value: (serde_json::Value, String),
}

/// Per node: `hits` as the count, `newest` (RFC 3339) as Unix seconds. A node with no
/// entry in the window is absent.
pub fn parse_stats(body: &str) -> Result<StoreAnswer, String> {
    let parsed: Response =
        serde_json::from_str(body).map_err(|e| format!("unexpected VictoriaLogs answer: {e}"))?;
    if parsed.status != "success" {
        return Err(format!(
            "VictoriaLogs answered {}: {}",
            parsed.status,
            parsed.error.unwrap_or_default()
        ));
    }
    let mut answer = StoreAnswer::default();
    for sample in parsed.data.map(|d| d.result).unwrap_or_default() {
        let (Some(name), Some(node)) = (
            sample.metric.get("__name__"),
            sample.metric.get("node_name"),
        ) else {
            continue;
        };
        let value = sample.value.1;
        match name.as_str() {
            "hits" => {
                if let Ok(n) = value.parse::<f64>() {
                    answer.counts.insert(node.clone(), n);
                }
            }
            "newest" => {
                if let Ok(t) = value.parse::<Timestamp>() {
                    answer
                        .newest
                        .insert(node.clone(), t.as_nanosecond() as f64 / 1e9);
                }
            }
            _ => {}
        }
    }
    Ok(answer)
}
