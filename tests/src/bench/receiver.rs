//! The receiving end of a run: an HTTP server on 127.0.0.1 that speaks Loki's push API.
//!
//! - Null mode answers 204 to every well-formed push and counts entries and line bytes.
//! - Proxy mode forwards the body unchanged (same content type, encoding and tenant) to
//!   the real Loki and counts only what Loki answered 2xx to, relaying Loki's status so
//!   the agent under test sees Loki's backpressure (429/5xx) as it would directly. Counting
//!   at the proxy tells the bench the moment Loki has acknowledged the last entry.
//!
//! Counts are kept per tenant (`X-Scope-OrgID`), and each run uses a fresh tenant, so one
//! server serves every run. Protobuf bodies (snappy block format, what both agents send)
//! are walked on the wire without building the messages: the receiver shares the two
//! cores with the processes being measured, so it should cost as little as possible.
//! JSON pushes are decoded with serde.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};

use super::BenchError;

/// Distinct stream label strings kept per tenant (enough to compare label sets).
const MAX_STREAMS_KEPT: usize = 20_000;

/// What one tenant received.
#[derive(Debug, Default)]
pub struct Tally {
    pub entries: AtomicU64,
    pub line_bytes: AtomicU64,
    pub body_bytes: AtomicU64,
    pub requests: AtomicU64,
    /// Pushes refused by the upstream Loki (proxy mode) or undecodable.
    pub refused: AtomicU64,
    streams: Mutex<HashSet<String>>,
}

impl Tally {
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Acquire)
    }

    /// Distinct streams seen, and one of their label strings (sorted, first).
    pub fn streams(&self) -> (usize, Option<String>) {
        match self.streams.lock() {
            Ok(set) => (set.len(), set.iter().min().cloned()),
            Err(_) => (0, None),
        }
    }
}

struct Shared {
    tallies: Mutex<HashMap<String, Arc<Tally>>>,
    upstream: Option<(reqwest::Client, String)>,
}

impl Shared {
    fn tally(&self, tenant: &str) -> Arc<Tally> {
        match self.tallies.lock() {
            Ok(mut map) => map.entry(tenant.to_string()).or_default().clone(),
            // A poisoned lock only means a handler panicked mid-update; counting into a
            // detached tally keeps the server answering and the run then shows the gap.
            Err(_) => Arc::new(Tally::default()),
        }
    }
}

/// A running receiver.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Start on an ephemeral loopback port. `upstream`: the Loki base URL to forward to.
    pub async fn start(upstream: Option<&str>) -> Result<Self, BenchError> {
        let shared = Arc::new(Shared {
            tallies: Mutex::new(HashMap::new()),
            upstream: upstream.map(|url| {
                (
                    crate::http_client(),
                    format!("{}/loki/api/v1/push", url.trim_end_matches('/')),
                )
            }),
        });
        let app = Router::new()
            .route("/loki/api/v1/push", post(push))
            .route("/ready", get(|| async { "ready" }))
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| {
                BenchError::Other(format!("cannot bind the receiver on 127.0.0.1: {e}"))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Other(format!("receiver address: {e}")))?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("[bench] receiver stopped: {e}");
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn push_url(&self) -> String {
        format!("http://{}/loki/api/v1/push", self.addr)
    }

    /// The tally of `tenant` (created empty if nothing arrived yet).
    pub fn tally(&self, tenant: &str) -> Arc<Tally> {
        self.shared.tally(tenant)
    }

    /// Forget a finished run's counters.
    pub fn forget(&self, tenant: &str) {
        if let Ok(mut map) = self.shared.tallies.lock() {
            map.remove(tenant);
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn push(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let tenant = match header("x-scope-orgid") {
        "" => "fake".to_string(),
        t => t.to_string(),
    };
    let content_type = header("content-type").to_string();
    let encoding = header("content-encoding").to_string();
    let tally = shared.tally(&tenant);
    let counted = decode(&content_type, &encoding, &body);
    let counts = match counted {
        Ok(counts) => counts,
        Err(message) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, message);
        }
    };
    if let Some((client, url)) = &shared.upstream {
        let mut request = client
            .post(url)
            .header("X-Scope-OrgID", &tenant)
            .body(body.clone());
        if !content_type.is_empty() {
            request = request.header("Content-Type", &content_type);
        }
        if !encoding.is_empty() {
            request = request.header("Content-Encoding", &encoding);
        }
        match request.send().await {
            Ok(answer) if answer.status().is_success() => {}
            Ok(answer) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                let status = StatusCode::from_u16(answer.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let text = answer.text().await.unwrap_or_default();
                return (status, text);
            }
            Err(e) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return (StatusCode::BAD_GATEWAY, format!("upstream Loki: {e}"));
            }
        }
    }
    tally.requests.fetch_add(1, Ordering::Relaxed);
    tally
        .body_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    tally
        .line_bytes
        .fetch_add(counts.line_bytes, Ordering::Relaxed);
    if let Ok(mut streams) = tally.streams.lock() {
        for labels in counts.labels {
            if streams.len() < MAX_STREAMS_KEPT {
                streams.insert(labels);
            }
        }
    }
    // Release: whoever sees the final count also sees the other counters.
    tally.entries.fetch_add(counts.entries, Ordering::Release);
    (StatusCode::NO_CONTENT, String::new())
}

/// What one push request carried.
#[derive(Debug, Default, PartialEq)]
pub struct Counts {
    pub entries: u64,
    pub line_bytes: u64,
    pub labels: Vec<String>,
}

fn decode(content_type: &str, encoding: &str, body: &[u8]) -> Result<Counts, String> {
    if content_type.contains("json") {
        if !(encoding.is_empty() || encoding == "identity") {
            return Err(format!(
                "unsupported Content-Encoding {encoding:?} for JSON"
            ));
        }
        return count_json(body);
    }
    // Loki assumes snappy for protobuf whatever Content-Encoding says (Promtail sends none).
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("snappy: {e}"))?;
    count_protobuf(&raw)
}

#[derive(serde::Deserialize)]
struct JsonPush {
    streams: Vec<JsonStream>,
}

#[derive(serde::Deserialize)]
struct JsonStream {
    #[serde(default)]
    stream: std::collections::BTreeMap<String, String>,
    values: Vec<Vec<serde_json::Value>>,
}

fn count_json(body: &[u8]) -> Result<Counts, String> {
    let push: JsonPush = serde_json::from_slice(body).map_err(|e| format!("json: {e}"))?;
    let mut counts = Counts::default();
    for stream in push.streams {
        let labels: Vec<String> = stream
            .stream
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        counts.labels.push(format!("{{{}}}", labels.join(", ")));
        for value in stream.values {
            counts.entries += 1;
            counts.line_bytes += value
                .get(1)
                .and_then(|v| v.as_str())
                .map_or(0, |s| s.len() as u64);
        }
    }
    Ok(counts)
}

/// Walk a `PushRequest` (see `logpipe_agent::loki::proto`): streams = 1, in a stream
/// labels = 1 and entries = 2, in an entry line = 2.
pub fn count_protobuf(buf: &[u8]) -> Result<Counts, String> {
    let mut counts = Counts::default();
    let mut wire = Wire { buf, pos: 0 };
    while let Some((field, kind)) = wire.key()? {
        if field == 1 && kind == 2 {
            let stream = wire.bytes()?;
            let mut inner = Wire {
                buf: stream,
                pos: 0,
            };
            while let Some((field, kind)) = inner.key()? {
                match (field, kind) {
                    (1, 2) => counts
                        .labels
                        .push(String::from_utf8_lossy(inner.bytes()?).into_owned()),
                    (2, 2) => {
                        let entry = inner.bytes()?;
                        counts.entries += 1;
                        let mut e = Wire { buf: entry, pos: 0 };
                        while let Some((field, kind)) = e.key()? {
                            if field == 2 && kind == 2 {
                                counts.line_bytes += e.bytes()?.len() as u64;
                            } else {
                                e.skip(kind)?;
                            }
                        }
                    }
                    _ => inner.skip(kind)?,
                }
            }
        } else {
            wire.skip(kind)?;
        }
    }
    Ok(counts)
}

struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn key(&mut self) -> Result<Option<(u64, u64)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, key & 7)))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or("truncated field")?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn skip(&mut self, kind: u64) -> Result<(), String> {
        match kind {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            other => Err(format!("unsupported wire type {other}")),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        if self.pos + n > self.buf.len() {
            return Err("truncated fixed field".into());
        }
        self.pos += n;
        Ok(())
    }
}

/// Label names of a label string such as `{a="b", c="d\"e"}`, sorted.
pub fn label_names(labels: &str) -> Vec<String> {
    let mut names = Vec::new();
    let inner = labels.trim().trim_start_matches('{').trim_end_matches('}');
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        names.push(name.trim().to_string());
        if chars.next() != Some('"') {
            break;
        }
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => escaped = false,
            }
        }
    }
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use logpipe_agent::loki::proto::{
        EntryAdapter, LabelPairAdapter, PushRequest, StreamAdapter, Timestamp,
    };
    use prost::Message;

    use super::*;

    #[test]
    fn the_wire_walker_counts_what_prost_encodes() {
        let entry = |line: &str| EntryAdapter {
            timestamp: Some(Timestamp::from_unix_nanos(1_700_000_000_123_456_789)),
            line: line.into(),
            structured_metadata: vec![LabelPairAdapter {
                name: "trace".into(),
                value: "abc".into(),
            }],
        };
        let req = PushRequest {
            streams: vec![
                StreamAdapter {
                    labels: r#"{app="a", pod="p\"1"}"#.into(),
                    entries: vec![entry("hello"), entry(&"x".repeat(20_000))],
                    hash: 7,
                },
                StreamAdapter {
                    labels: r#"{app="b"}"#.into(),
                    entries: vec![entry("")],
                    hash: 0,
                },
            ],
        };
        let raw = req.encode_to_vec();
        let counts = count_protobuf(&raw).unwrap();
        assert_eq!((counts.entries, counts.line_bytes), (3, 20_005));
        assert_eq!(counts.labels.len(), 2);
        let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        assert_eq!(decode("application/x-protobuf", "", &body).unwrap(), counts);
        assert!(count_protobuf(&raw[..raw.len() - 1]).is_err());
        assert_eq!(label_names(&counts.labels[0]), ["app", "pod"]);
    }

    #[test]
    fn json_pushes_count_too() {
        let body =
            br#"{"streams":[{"stream":{"a":"b"},"values":[["1","one"],["2","two",{"k":"v"}]]}]}"#;
        let counts = decode("application/json", "", body).unwrap();
        assert_eq!((counts.entries, counts.line_bytes), (2, 6));
    }

    #[tokio::test]
    async fn null_receiver_answers_204_and_counts_per_tenant() {
        let receiver = Receiver::start(None).await.unwrap();
        let raw = PushRequest {
            streams: vec![StreamAdapter {
                labels: r#"{a="b"}"#.into(),
                entries: vec![EntryAdapter {
                    timestamp: None,
                    line: "hi".into(),
                    structured_metadata: vec![],
                }],
                hash: 0,
            }],
        }
        .encode_to_vec();
        let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        let answer = crate::http_client()
            .post(receiver.push_url())
            .header("X-Scope-OrgID", "t1")
            .header("Content-Type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 204);
        assert_eq!(receiver.tally("t1").entries(), 1);
        assert_eq!(receiver.tally("t2").entries(), 0);
    }
}
