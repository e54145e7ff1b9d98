//! Push to and query the test bed's Loki, the way a user would check it: the HTTP API with
//! `X-Scope-OrgID`, LogQL over `query_range`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum LokiError {
    #[error("Loki request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("Loki answered {status}: {body}")]
    Status { status: u16, body: String },
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

/// Push lines with the JSON push API (the agent uses protobuf; this is the test's own path).
pub async fn push(
    base: &str,
    tenant: &str,
    labels: &BTreeMap<String, String>,
    entries: &[(i64, String)],
) -> Result<(), LokiError> {
    let values: Vec<_> = entries
        .iter()
        .map(|(ts, line)| json!([ts.to_string(), line]))
        .collect();
    let body = json!({"streams": [{"stream": labels, "values": values}]});
    let response = crate::http_client()
        .post(format!("{base}/loki/api/v1/push"))
        .header("X-Scope-OrgID", tenant)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    check(response).await.map(|_| ())
}

#[derive(Deserialize)]
struct QueryResponse {
    data: QueryData,
}

#[derive(Deserialize)]
struct QueryData {
    result: Vec<QueryStream>,
}

#[derive(Deserialize)]
struct QueryStream {
    stream: BTreeMap<String, String>,
    values: Vec<(String, String)>,
}

/// Every entry matching `logql` between `start_ns` and `end_ns` (inclusive start,
/// exclusive end), paging forward past Loki's per-query limit.
pub async fn query_range(
    base: &str,
    tenant: &str,
    logql: &str,
    start_ns: i64,
    end_ns: i64,
) -> Result<Vec<Stream>, LokiError> {
    const PAGE: usize = 5000;
    let client = crate::http_client();
    let mut streams: BTreeMap<BTreeMap<String, String>, Vec<(i64, String)>> = BTreeMap::new();
    let mut from = start_ns;
    loop {
        let response = client
            .get(format!("{base}/loki/api/v1/query_range"))
            .header("X-Scope-OrgID", tenant)
            .query(&[
                ("query", logql.to_string()),
                ("start", from.to_string()),
                ("end", end_ns.to_string()),
                ("limit", PAGE.to_string()),
                ("direction", "forward".to_string()),
            ])
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        let page: QueryResponse = check(response).await?.json().await?;
        let mut count = 0;
        let mut newest = from;
        for stream in page.data.result {
            let entries = streams.entry(stream.stream).or_default();
            for (ts, line) in stream.values {
                let ts: i64 = ts.parse().unwrap_or_default();
                newest = newest.max(ts);
                count += 1;
                entries.push((ts, line));
            }
        }
        if count < PAGE {
            break;
        }
        // The next page starts at the newest timestamp seen; entries at exactly that
        // timestamp come back again and are removed below.
        from = if newest == from { from + 1 } else { newest };
    }
    Ok(streams
        .into_iter()
        .map(|(labels, mut entries)| {
            // Loki itself keeps one copy of identical (timestamp, line) pairs of a stream,
            // so removing them here only undoes the page overlap.
            entries.sort();
            entries.dedup();
            Stream { labels, entries }
        })
        .collect())
}

/// Poll `query_range` until `done` accepts the result or `timeout` passes; returns the
/// last result either way so the caller's assertion shows what was there.
pub async fn wait_for(
    base: &str,
    tenant: &str,
    logql: &str,
    start_ns: i64,
    timeout: Duration,
    done: impl Fn(&[Stream]) -> bool,
) -> Result<Vec<Stream>, LokiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let result = query_range(base, tenant, logql, start_ns, now_ns() + 1_000_000_000).await?;
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

async fn check(response: reqwest::Response) -> Result<reqwest::Response, LokiError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(LokiError::Status {
        status: status.as_u16(),
        body,
    })
}
