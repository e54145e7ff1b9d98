//! LogQL for Loki: the requests verification sends and the answers it reads (pure).
//!
//! - entries per node over the window: `GET /loki/api/v1/query` with
//!   `sum by (node_name) (count_over_time({node_name=~"a|b"}[<window>s]))`, an instant
//!   vector;
//! - newest entry of one node: `GET /loki/api/v1/query_range` with `{node_name="a"}`,
//!   `limit=1`, `direction=backward` over the window, a streams answer.
//!
//! The tenant goes in `X-Scope-OrgID`. Errors come back as a non-2xx status with a text
//! body (see [`super::answer`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::StoreRequest;

const QUERY_PATH: &str = "/loki/api/v1/query";
const QUERY_RANGE_PATH: &str = "/loki/api/v1/query_range";

/// Entries per node over the window.
pub fn count_request(nodes: &[&str], window: Duration, tenant: &str) -> StoreRequest {
    StoreRequest {
        path: QUERY_PATH,
        params: vec![("query", count_query(nodes, window))],
        headers: vec![("X-Scope-OrgID", tenant.to_string())],
    }
}

/// The newest entry of `node` over the window ending at `now` (since the Unix epoch).
pub fn newest_request(node: &str, window: Duration, now: Duration, tenant: &str) -> StoreRequest {
    let start = now.saturating_sub(window);
    StoreRequest {
        path: QUERY_RANGE_PATH,
        params: vec![
            ("query", newest_query(node)),
            ("limit", "1".to_string()),
            ("direction", "backward".to_string()),
            ("start", start.as_nanos().to_string()),
            ("end", now.as_nanos().to_string()),
        ],
        headers: vec![("X-Scope-OrgID", tenant.to_string())],
    }
}

/// `{node_name="a"}`: every stream of one node.
pub fn newest_query(node: &str) -> String {
    format!(
        "{{node_name=\"{}\"}}",
        node.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// `sum by (node_name) (count_over_time({node_name=~"a|b"}[10s]))`.
pub fn count_query(nodes: &[&str], window: Duration) -> String {
    let alternatives: Vec<String> = nodes.iter().map(|n| regex_escape(n)).collect();
    format!(
        "sum by (node_name) (count_over_time({{node_name=~\"{}\"}}[{}s]))",
        alternatives.join("|"),
        window.as_secs().max(1)
    )
}

/// Escape a node name for a LogQL regex inside a double-quoted string.
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            // Backslash for the regex, doubled for the LogQL string.
            out.push_str("\\\\");
        } else if c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[derive(Deserialize)]
struct Response<T> {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    error: Option<String>,
    data: Option<Data<T>>,
}

#[derive(Deserialize)]
struct Data<T> {
    result: Vec<T>,
}

/// The `data.result` of a Loki answer whose `status` is not an error.
fn results<'a, T: Deserialize<'a>>(body: &'a str) -> Result<Vec<T>, String> {
    let parsed: Response<T> =
        serde_json::from_str(body).map_err(|e| format!("unexpected Loki answer: {e}"))?;
    if let Some(status) = parsed.status.filter(|s| s != "success") {
        return Err(format!(
            "Loki answered {status}: {}",
            parsed.error.unwrap_or_default()
        ));
    }
    parsed
        .data
        .map(|d| d.result)
        .ok_or_else(|| "unexpected Loki answer: no data".to_string())
}

#[derive(Deserialize)]
struct StreamValues {
    values: Vec<(String, String)>,
}

/// The newest entry's time (Unix seconds) in a Loki streams answer; `None`: no entry.
pub fn parse_newest(body: &str) -> Result<Option<f64>, String> {
    Ok(results::<StreamValues>(body)?
        .iter()
        .flat_map(|s| &s.values)
        .filter_map(|(ns, _)| ns.parse::<i64>().ok())
        .max()
        .map(|ns| ns as f64 / 1e9))
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (serde_json::Value, String),
}

/// Node -> count from a Loki instant-vector answer.
pub fn parse_vector(body: &str) -> Result<BTreeMap<String, f64>, String> {
    Ok(results::<VectorSample>(body)?
        .into_iter()
        .filter_map(|s| {
            let node = s.metric.get("node_name")?.clone();
            Some((node, s.value.1.parse().ok()?))
        })
        .collect())
}
