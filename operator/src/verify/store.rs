//! The stores verification asks (the I/O half of [`loki`] and [`victorialogs`]): one GET
//! per request those modules build, with a timeout (the client's), the answer's body
//! handed back to their parsers.
//!
//! # Guarantees
//! - A store that cannot be reached, answers non-2xx or answers something unreadable gives
//!   an error message naming the store, never a count: `storeEntries` fails with it at
//!   the end of the window.
//! - Loki is asked at most `1 + LATENCY_SAMPLE_NODES` queries per verification,
//!   VictoriaLogs one.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{LATENCY_SAMPLE_NODES, StoreKind, Verifier, loki, victorialogs};

/// Where to find the step's logs: which store, its query URL, the tenant, the window.
#[derive(Clone, Debug)]
pub struct StoreQuery {
    pub kind: StoreKind,
    pub endpoint: String,
    pub tenant: String,
    pub window: Duration,
}

/// One GET to a store, as built by [`loki`] or [`victorialogs`]: `path` is appended to the
/// endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRequest {
    pub path: &'static str,
    pub params: Vec<(&'static str, String)>,
    pub headers: Vec<(&'static str, String)>,
}

/// What a store says about the step's nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreAnswer {
    /// Per node: entries over the window (a node with none may be absent).
    pub counts: BTreeMap<String, f64>,
    /// Per node: time of the newest entry over the window (Unix seconds).
    pub newest: BTreeMap<String, f64>,
}

/// The body of a store's answer, or why not: a non-2xx status with the store's own error
/// text (`error` of a Prometheus-style error JSON, else the start of the body).
pub fn answer(kind: StoreKind, status: u16, body: String) -> Result<String, String> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let error = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().chars().take(200).collect());
    Err(format!("{} answered {status}: {error}", kind.name()))
}

impl Verifier {
    /// Entries per node over the window, and the newest entry's time for the nodes the
    /// store was asked about (kept even when the count failed, for the latency check).
    pub(super) async fn ask_store(
        &self,
        q: &StoreQuery,
        nodes: &[&str],
    ) -> (Result<BTreeMap<String, f64>, String>, BTreeMap<String, f64>) {
        if nodes.is_empty() {
            return (Ok(BTreeMap::new()), BTreeMap::new());
        }
        match q.kind {
            StoreKind::Loki => {
                let counts = match self
                    .store_get(q, loki::count_request(nodes, q.window, &q.tenant))
                    .await
                {
                    Ok(body) => loki::parse_vector(&body),
                    Err(e) => Err(e),
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let mut newest = BTreeMap::new();
                // A sample bounds the queries a 1,000-node step makes.
                for node in nodes.iter().take(LATENCY_SAMPLE_NODES) {
                    let request = loki::newest_request(node, q.window, now, &q.tenant);
                    if let Ok(body) = self.store_get(q, request).await
                        && let Ok(Some(t)) = loki::parse_newest(&body)
                    {
                        newest.insert((*node).to_string(), t);
                    }
                }
                (counts, newest)
            }
            StoreKind::VictoriaLogs => {
                let answer = match victorialogs::stats_request(nodes, q.window, &q.tenant) {
                    Ok(request) => match self.store_get(q, request).await {
                        Ok(body) => victorialogs::parse_stats(&body),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(a) => (Ok(a.counts), a.newest),
                    Err(e) => (Err(e), BTreeMap::new()),
                }
            }
        }
    }

    /// GET `<endpoint><path>` with the request's parameters and headers: the body, or why
    /// not.
    async fn store_get(&self, q: &StoreQuery, r: StoreRequest) -> Result<String, String> {
        let store = q.kind.name();
        let url = format!("{}{}", q.endpoint.trim_end_matches('/'), r.path);
        let mut request = self.http.get(&url).query(&r.params);
        for (name, value) in &r.headers {
            request = request.header(*name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{store} query: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| format!("{store} query: {e}"))?;
        answer(q.kind, status, body)
    }
}
