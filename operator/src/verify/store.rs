//! The stores verification asks (the I/O half of [`loki`] and [`victorialogs`]): one GET
//! per request those modules build, with a timeout (the client's), the answer's body
//! handed back to their parsers.
//!
//! # Guarantees
//! - A store that cannot be reached, answers non-2xx or answers something unreadable gives
//!   an error naming the store, never a count: `storeEntries` fails with it at the end of
//!   the window. [`StoreError::Unreachable`] (no connection, no answer in time, 5xx, 429:
//!   an outage) is told apart from [`StoreError::Refused`] (the store answered and said
//!   no, or something unreadable: a mistake to fix), because an outage holds a step and a
//!   refusal fails it.
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

/// Why a store gave no count.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Not asked yet: its answers count only at the end of a window.
    #[error("counted at the end of the window")]
    NotYet,
    /// No connection, no answer in time, or a 5xx or 429 answer: an outage.
    #[error("{0}")]
    Unreachable(String),
    /// The store answered, refusing the query or with something unreadable.
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// A non-2xx answer: 429 and 5xx are the store being away (an outage holds a step),
    /// anything else the store saying no (a mistake: the step fails).
    pub fn of_status(status: u16, error: String) -> Self {
        match status {
            429 | 500.. => Self::Unreachable(error),
            _ => Self::Refused(error),
        }
    }
}

/// `url` without a `user:password@` part: it ends up in the status and in Events.
pub fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            // Only fails for URLs that cannot have credentials, which these have.
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        _ => url.to_string(),
    }
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
    ) -> (
        Result<BTreeMap<String, f64>, StoreError>,
        BTreeMap<String, f64>,
    ) {
        if nodes.is_empty() {
            return (Ok(BTreeMap::new()), BTreeMap::new());
        }
        match q.kind {
            StoreKind::Loki => {
                let counts = match self
                    .store_get(q, loki::count_request(nodes, q.window, &q.tenant))
                    .await
                {
                    Ok(body) => loki::parse_vector(&body).map_err(StoreError::Refused),
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
                        Ok(body) => victorialogs::parse_stats(&body).map_err(StoreError::Refused),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(StoreError::Refused(e)),
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
    async fn store_get(&self, q: &StoreQuery, r: StoreRequest) -> Result<String, StoreError> {
        let store = q.kind.name();
        let url = format!("{}{}", q.endpoint.trim_end_matches('/'), r.path);
        let mut request = self.http.get(&url).query(&r.params);
        for (name, value) in &r.headers {
            request = request.header(*name, value);
        }
        // The root cause ("Connection refused"), not the query string: reqwest's own
        // message names the whole URL and stops at "error sending request".
        let shown = without_credentials(&url);
        let unreachable = |e: reqwest::Error| {
            let e = e.without_url();
            let mut text = format!("{store} query {shown}: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            StoreError::Unreachable(text)
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(unreachable)?;
        answer(q.kind, status, body).map_err(|e| StoreError::of_status(status, e))
    }
}
