//! Push to and query the test bed's log store, the way a user would check it.
//!
//! The store is VictoriaLogs: it takes the agent's Loki push at `/insert/loki/api/v1/push`
//! (tenant `X-Scope-OrgID: <account>[:<project>]`, numeric) and answers LogsQL at
//! `/select/logsql/query` (tenant in the `AccountID` / `ProjectID` headers), one JSON
//! object per line. A LogsQL stream filter is written like a LogQL selector
//! (`{namespace="x"}`), so tests select streams as they would in Loki.
//!
//! Caveats: VictoriaLogs keeps every copy of an entry (Loki keeps one copy of identical
//! (timestamp, line) pairs of a stream), so a duplicate sent by the agent is visible here.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

/// Where the agent pushes, below the store's base URL.
pub const PUSH_PATH: &str = "/insert/loki/api/v1/push";
/// The store's readiness endpoint for the Loki protocol, below the base URL.
pub const READY_PATH: &str = "/insert/loki/ready";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the store answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected store answer line {line:?}: {reason}")]
    Answer { line: String, reason: String },
    #[error("{0}")]
    Tenant(String),
}

/// One stream of a query result.
#[derive(Clone, Debug, PartialEq)]
pub struct Stream {
    pub labels: BTreeMap<String, String>,
    /// (unix nanoseconds, line), oldest first.
    pub entries: Vec<(i64, String)>,
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// A numeric tenant no other test run uses, so reruns against a long-lived store never
/// see each other's data.
pub fn unique_tenant() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let salt = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mixed = (nanos as u64 ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9);
    // Tenants 0..1000 are left to hand-made examples (the demo uses 1, 2, 3).
    (1000 + (mixed.wrapping_add(u64::from(salt) * 7919)) % 4_000_000_000).to_string()
}

/// `AccountID` and `ProjectID` of a tenant `<account>[:<project>]`, read as the
/// operator's verification reads it.
pub fn tenant_headers(tenant: &str) -> Result<(u32, u32), StoreError> {
    logpipe_operator::verify::victorialogs::tenant(tenant).map_err(StoreError::Tenant)
}

/// Push lines with Loki's JSON push API (the agent uses protobuf; this is the test's own path).
pub async fn push(
    base: &str,
    tenant: &str,
    labels: &BTreeMap<String, String>,
    entries: &[(i64, String)],
) -> Result<(), StoreError> {
    let values: Vec<_> = entries
        .iter()
        .map(|(ts, line)| json!([ts.to_string(), line]))
        .collect();
    let body = json!({"streams": [{"stream": labels, "values": values}]});
    let response = crate::http_client()
        .post(format!("{base}{PUSH_PATH}"))
        .header("X-Scope-OrgID", tenant)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    check(response).await.map(|_| ())
}

/// Every entry matching the LogsQL `query` between `start_ns` and `end_ns`, by stream.
pub async fn query_range(
    base: &str,
    tenant: &str,
    query: &str,
    start_ns: i64,
    end_ns: i64,
) -> Result<Vec<Stream>, StoreError> {
    let (account, project) = tenant_headers(tenant)?;
    let response = crate::http_client()
        .post(format!("{base}/select/logsql/query"))
        .header("AccountID", account.to_string())
        .header("ProjectID", project.to_string())
        .form(&[
            ("query", query.to_string()),
            ("start", rfc3339(start_ns)),
            ("end", rfc3339(end_ns)),
        ])
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    let body = check(response).await?.text().await?;
    parse_rows(&body)
}

/// Group the JSON-lines answer of `/select/logsql/query` into streams: the labels are
/// every field but VictoriaLogs' own (`_time`, `_msg`, `_stream`, `_stream_id`).
pub fn parse_rows(body: &str) -> Result<Vec<Stream>, StoreError> {
    let mut streams: BTreeMap<BTreeMap<String, String>, Vec<(i64, String)>> = BTreeMap::new();
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |reason: String| StoreError::Answer {
            line: line.chars().take(200).collect(),
            reason,
        };
        let row: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let text = |key: &str| row.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let time = chrono::DateTime::parse_from_rfc3339(text("_time"))
            .map_err(|e| bad(format!("_time: {e}")))?;
        let ts = time
            .timestamp_nanos_opt()
            .ok_or_else(|| bad("_time out of range".into()))?;
        let labels = row
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "_time" | "_msg" | "_stream" | "_stream_id"))
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect();
        streams
            .entry(labels)
            .or_default()
            .push((ts, text("_msg").to_string()));
    }
    Ok(streams
        .into_iter()
        .map(|(labels, mut entries)| {
            entries.sort();
            Stream { labels, entries }
        })
        .collect())
}

/// Poll `query_range` until `done` accepts the result or `timeout` passes; returns the
/// last result either way so the caller's assertion shows what was there.
pub async fn wait_for(
    base: &str,
    tenant: &str,
    query: &str,
    start_ns: i64,
    timeout: Duration,
    done: impl Fn(&[Stream]) -> bool,
) -> Result<Vec<Stream>, StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let result = query_range(base, tenant, query, start_ns, now_ns() + 1_000_000_000).await?;
        if done(&result) || tokio::time::Instant::now() >= deadline {
            return Ok(result);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Total number of entries over all streams.
pub fn count(streams: &[Stream]) -> usize {
    streams.iter().map(|s| s.entries.len()).sum()
}

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, StoreError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(StoreError::Status {
        status: status.as_u16(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_grouped_by_their_labels_oldest_first() {
        let body = concat!(
            r#"{"_msg":"two","_stream":"{pod=\"p\"}","_stream_id":"x","_time":"2026-12-01T23:14:59.000000002Z","pod":"p"}"#,
            "\n",
            r#"{"_msg":"one","_stream":"{pod=\"p\"}","_stream_id":"x","_time":"2026-12-01T23:14:59.000000001Z","pod":"p"}"#,
            "\n",
            r#"{"_msg":"other","_time":"2026-12-01T23:14:59Z","pod":"q"}"#,
            "\n"
        );
        let streams = parse_rows(body).unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0].labels["pod"], "p");
        let lines: Vec<_> = streams[0].entries.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(streams[0].entries[1].0 - streams[0].entries[0].0, 1);
        assert_eq!(count(&streams), 3);
    }

    #[test]
    fn a_row_without_a_time_is_an_error_not_a_silent_skip() {
        assert!(parse_rows(r#"{"_msg":"x"}"#).is_err());
        assert!(parse_rows("").unwrap().is_empty());
    }

    #[test]
    fn tenants_are_numeric_account_and_project() {
        assert_eq!(tenant_headers("7").unwrap(), (7, 0));
        assert_eq!(tenant_headers("7:3").unwrap(), (7, 3));
        assert!(tenant_headers("ops").is_err());
        assert!(tenant_headers(&unique_tenant()).is_ok());
        assert_ne!(unique_tenant(), unique_tenant());
    }
}
