//! The receiving end of a run: an HTTP server on 127.0.0.1 that speaks both protocols the
//! measured agents push with: Loki's push API (`POST /loki/api/v1/push`, our agent) and
//! OTLP/HTTP logs (`POST /v1/logs`, protobuf, the OpenTelemetry Collector's otlphttp
//! exporter).
//!
//! - Null mode answers 2xx to every well-formed push and counts entries (log records) and
//!   line (body) bytes.
//! - Proxy mode forwards the body unchanged (same content type, encoding and tenant) to
//!   the real store, VictoriaLogs: Loki pushes to `<base>/insert/loki/api/v1/push`
//!   (`X-Scope-OrgID`), OTLP to `<base>/insert/opentelemetry/v1/logs` (`AccountID` /
//!   `ProjectID`). It counts only what the store answered 2xx to and relays the store's
//!   status, so the agent under test sees the store's backpressure (429/5xx) as it would
//!   directly. Counting at the proxy tells the bench the moment the store acknowledged the
//!   last entry (the bench then counts the rows with LogsQL too).
//!
//! Counts are kept per tenant (`X-Scope-OrgID`, or `AccountID[:ProjectID]` for OTLP; the
//! bench uses numeric tenants, so both name a run's tenant alike), and each run uses a
//! fresh tenant, so one server serves every run. Protobuf bodies (snappy block format,
//! what both agents send) are walked on the wire without building the messages: the
//! receiver shares the two cores with the processes being measured, so it should cost as
//! little as possible. Loki JSON pushes are decoded with serde.

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

/// Paths the receiver serves, and the store's paths proxy mode forwards them to.
pub const LOKI_PATH: &str = "/loki/api/v1/push";
pub const OTLP_PATH: &str = "/v1/logs";
pub const STORE_LOKI_PATH: &str = "/insert/loki/api/v1/push";
pub const STORE_OTLP_PATH: &str = "/insert/opentelemetry/v1/logs";

/// The two push protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Loki,
    Otlp,
}

struct Shared {
    tallies: Mutex<HashMap<String, Arc<Tally>>>,
    /// Proxy mode: the store's base URL.
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
    /// Start on an ephemeral loopback port. `upstream`: the store's base URL to forward to.
    pub async fn start(upstream: Option<&str>) -> Result<Self, BenchError> {
        let shared = Arc::new(Shared {
            tallies: Mutex::new(HashMap::new()),
            upstream: upstream.map(|url| {
                (
                    logpipe_e2e::http_client(),
                    url.trim_end_matches('/').to_string(),
                )
            }),
        });
        let app = Router::new()
            .route(LOKI_PATH, post(push_loki))
            .route(OTLP_PATH, post(push_otlp))
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

    /// Where a client of `protocol` pushes.
    pub fn push_url(&self, protocol: Protocol) -> String {
        match protocol {
            Protocol::Loki => format!("http://{}{LOKI_PATH}", self.addr),
            Protocol::Otlp => format!("http://{}{OTLP_PATH}", self.addr),
        }
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

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The tenant a push names: Loki's `X-Scope-OrgID`, OTLP's `AccountID[:ProjectID]`
/// (`ProjectID` 0 or absent: the account alone, as a Loki tenant `N` is `N:0`).
pub fn tenant_of(protocol: Protocol, headers: &HeaderMap) -> String {
    match protocol {
        Protocol::Loki => match header(headers, "x-scope-orgid") {
            "" => "fake".to_string(),
            t => t.to_string(),
        },
        Protocol::Otlp => {
            let account = match header(headers, "accountid") {
                "" => "0",
                a => a,
            };
            match header(headers, "projectid") {
                "" | "0" => account.to_string(),
                project => format!("{account}:{project}"),
            }
        }
    }
}

async fn push_loki(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    push(Protocol::Loki, &shared, &headers, body).await
}

async fn push_otlp(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    push(Protocol::Otlp, &shared, &headers, body).await
}

async fn push(
    protocol: Protocol,
    shared: &Shared,
    headers: &HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let tenant = tenant_of(protocol, headers);
    let content_type = header(headers, "content-type").to_string();
    let encoding = header(headers, "content-encoding").to_string();
    let tally = shared.tally(&tenant);
    let counted = match protocol {
        Protocol::Loki => decode(&content_type, &encoding, &body),
        Protocol::Otlp => decode_otlp(&content_type, &encoding, &body),
    };
    let counts = match counted {
        Ok(counts) => counts,
        Err(message) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, message);
        }
    };
    if let Some((client, base)) = &shared.upstream {
        let mut request = match protocol {
            Protocol::Loki => client
                .post(format!("{base}{STORE_LOKI_PATH}"))
                .header("X-Scope-OrgID", &tenant),
            Protocol::Otlp => client
                .post(format!("{base}{STORE_OTLP_PATH}"))
                .header("AccountID", header(headers, "accountid"))
                .header("ProjectID", header(headers, "projectid")),
        }
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
                return (StatusCode::BAD_GATEWAY, format!("upstream store: {e}"));
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
    match protocol {
        Protocol::Loki => (StatusCode::NO_CONTENT, String::new()),
        // OTLP/HTTP: 200, and an empty body is a full success (no partial_success).
        Protocol::Otlp => (StatusCode::OK, String::new()),
    }
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
    // Loki assumes snappy for protobuf whatever Content-Encoding says.
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("snappy: {e}"))?;
    count_protobuf(&raw)
}

/// An OTLP/HTTP logs body: protobuf only (the bench's collector sends protobuf), raw
/// (`identity`) or snappy block format (`Content-Encoding: snappy`, what the otlphttp
/// exporter's `compression: snappy` sends).
pub fn decode_otlp(content_type: &str, encoding: &str, body: &[u8]) -> Result<Counts, String> {
    if !content_type.is_empty() && !content_type.contains("protobuf") {
        return Err(format!(
            "unsupported Content-Type {content_type:?}: the bench counts protobuf OTLP only"
        ));
    }
    match encoding {
        "" | "identity" | "none" => count_otlp(body),
        "snappy" => {
            let raw = snap::raw::Decoder::new()
                .decompress_vec(body)
                .map_err(|e| format!("snappy: {e}"))?;
            count_otlp(&raw)
        }
        other => Err(format!(
            "unsupported Content-Encoding {other:?} for OTLP (configure compression: snappy)"
        )),
    }
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

/// Walk an OTLP `ExportLogsServiceRequest` (opentelemetry/proto/collector/logs/v1):
/// resource_logs = 1; in a ResourceLogs resource = 1 and scope_logs = 2; in a Resource
/// attributes = 1; in a ScopeLogs log_records = 2; in a LogRecord body = 5 (an AnyValue:
/// string_value = 1, bytes_value = 7) and attributes = 6. A log record is one entry, its
/// line bytes are its body's string (bytes; for a structured body, its encoded size). A
/// stream, as Loki's label set, is a distinct pair of resource attributes and record
/// attributes (the collector puts the file's pod/container on the resource and
/// `log.iostream` on the record).
pub fn count_otlp(buf: &[u8]) -> Result<Counts, String> {
    use std::hash::{Hash, Hasher};
    let mut counts = Counts::default();
    let mut wire = Wire { buf, pos: 0 };
    while let Some((field, kind)) = wire.key()? {
        if (field, kind) != (1, 2) {
            wire.skip(kind)?;
            continue;
        }
        let mut resource_logs = Wire {
            buf: wire.bytes()?,
            pos: 0,
        };
        let mut resource_attrs: Vec<&[u8]> = Vec::new();
        // Record-attribute sets already seen under this resource, by hash.
        let mut seen: HashSet<u64> = HashSet::new();
        let mut scopes: Vec<&[u8]> = Vec::new();
        while let Some((field, kind)) = resource_logs.key()? {
            match (field, kind) {
                (1, 2) => {
                    let mut resource = Wire {
                        buf: resource_logs.bytes()?,
                        pos: 0,
                    };
                    while let Some((field, kind)) = resource.key()? {
                        if (field, kind) == (1, 2) {
                            resource_attrs.push(resource.bytes()?);
                        } else {
                            resource.skip(kind)?;
                        }
                    }
                }
                (2, 2) => scopes.push(resource_logs.bytes()?),
                _ => resource_logs.skip(kind)?,
            }
        }
        let mut record_attrs: Vec<&[u8]> = Vec::new();
        for scope in scopes {
            let mut scope = Wire { buf: scope, pos: 0 };
            while let Some((field, kind)) = scope.key()? {
                if (field, kind) != (2, 2) {
                    scope.skip(kind)?;
                    continue;
                }
                let mut record = Wire {
                    buf: scope.bytes()?,
                    pos: 0,
                };
                counts.entries += 1;
                record_attrs.clear();
                while let Some((field, kind)) = record.key()? {
                    match (field, kind) {
                        (5, 2) => counts.line_bytes += body_len(record.bytes()?)?,
                        (6, 2) => record_attrs.push(record.bytes()?),
                        _ => record.skip(kind)?,
                    }
                }
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                record_attrs.hash(&mut hasher);
                if seen.insert(hasher.finish()) {
                    let mut pairs = key_values(&resource_attrs)?;
                    pairs.extend(key_values(&record_attrs)?);
                    pairs.sort();
                    let inner: Vec<String> =
                        pairs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                    counts.labels.push(format!("{{{}}}", inner.join(", ")));
                }
            }
        }
    }
    Ok(counts)
}

/// Line bytes of a log record body (an AnyValue).
fn body_len(any: &[u8]) -> Result<u64, String> {
    let mut wire = Wire { buf: any, pos: 0 };
    while let Some((field, kind)) = wire.key()? {
        match (field, kind) {
            (1, 2) | (7, 2) => return Ok(wire.bytes()?.len() as u64),
            _ => wire.skip(kind)?,
        }
    }
    Ok(any.len() as u64)
}

/// (key, value as text) of encoded KeyValues.
fn key_values(encoded: &[&[u8]]) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::with_capacity(encoded.len());
    for kv in encoded {
        let mut wire = Wire { buf: kv, pos: 0 };
        let (mut key, mut value) = (String::new(), String::new());
        while let Some((field, kind)) = wire.key()? {
            match (field, kind) {
                (1, 2) => key = String::from_utf8_lossy(wire.bytes()?).into_owned(),
                (2, 2) => value = any_text(wire.bytes()?)?,
                _ => wire.skip(kind)?,
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// A scalar AnyValue as text (strings, booleans, integers); other kinds as `…`.
fn any_text(any: &[u8]) -> Result<String, String> {
    let mut wire = Wire { buf: any, pos: 0 };
    while let Some((field, kind)) = wire.key()? {
        match (field, kind) {
            (1, 2) => return Ok(String::from_utf8_lossy(wire.bytes()?).into_owned()),
            (2, 0) => return Ok((wire.varint()? != 0).to_string()),
            (3, 0) => return Ok((wire.varint()? as i64).to_string()),
            _ => wire.skip(kind)?,
        }
    }
    Ok("…".into())
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
        let answer = logpipe_e2e::http_client()
            .post(receiver.push_url(Protocol::Loki))
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

    /// A request built with the OTLP schema's generated types (opentelemetry-proto), as
    /// the collector's exporter would send it: two resources (files), records with
    /// string, bytes and structured bodies, attributes on both levels.
    fn otlp_request() -> Vec<u8> {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        use opentelemetry_proto::tonic::common::v1::{
            AnyValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
        };
        use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
        use opentelemetry_proto::tonic::resource::v1::Resource;
        let text = |s: &str| AnyValue {
            value: Some(Value::StringValue(s.into())),
        };
        let kv = |k: &str, v: AnyValue| KeyValue {
            key: k.into(),
            value: Some(v),
            ..Default::default()
        };
        let record = |body: AnyValue, iostream: &str| LogRecord {
            time_unix_nano: 1_748_736_000_123_456_789,
            observed_time_unix_nano: 1_748_736_001_000_000_000,
            severity_number: 9,
            severity_text: "INFO".into(),
            body: Some(body),
            attributes: vec![
                kv("log.iostream", text(iostream)),
                kv("log.file.path", text("/var/log/pods/ns_p_u/c/0.log")),
            ],
            dropped_attributes_count: 0,
            flags: 1,
            trace_id: vec![7; 16],
            span_id: vec![8; 8],
            ..Default::default()
        };
        let resource = |pod: &str, records: Vec<LogRecord>| ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    kv("k8s.pod.name", text(pod)),
                    kv("k8s.namespace.name", text("ns")),
                    kv(
                        "k8s.container.restart_count",
                        AnyValue {
                            value: Some(Value::IntValue(0)),
                        },
                    ),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "filelog".into(),
                    ..Default::default()
                }),
                log_records: records,
                schema_url: String::new(),
            }],
            schema_url: "https://opentelemetry.io/schemas/1.0.0".into(),
        };
        ExportLogsServiceRequest {
            resource_logs: vec![
                resource(
                    "a",
                    vec![
                        record(text("hello"), "stdout"),
                        record(text(&"y".repeat(70_000)), "stdout"),
                        record(text(""), "stderr"),
                    ],
                ),
                resource(
                    "b",
                    vec![
                        record(
                            AnyValue {
                                value: Some(Value::BytesValue(b"raw".to_vec())),
                            },
                            "stdout",
                        ),
                        record(
                            AnyValue {
                                value: Some(Value::KvlistValue(KeyValueList {
                                    values: vec![kv("msg", text("x"))],
                                })),
                            },
                            "stdout",
                        ),
                    ],
                ),
            ],
        }
        .encode_to_vec()
    }

    #[test]
    fn the_otlp_walker_counts_records_bytes_and_streams_of_a_built_request() {
        let raw = otlp_request();
        let counts = count_otlp(&raw).unwrap();
        // 5 records; bodies 5 + 70,000 + 0 + 3 bytes and one structured body (its
        // encoded AnyValue: kvlist tag+len, KeyValue tag+len, key, value).
        let kvlist_len = {
            use opentelemetry_proto::tonic::common::v1::{
                AnyValue, KeyValue, KeyValueList, any_value::Value,
            };
            AnyValue {
                value: Some(Value::KvlistValue(KeyValueList {
                    values: vec![KeyValue {
                        key: "msg".into(),
                        value: Some(AnyValue {
                            value: Some(Value::StringValue("x".into())),
                        }),
                        ..Default::default()
                    }],
                })),
            }
            .encoded_len() as u64
        };
        assert_eq!(counts.entries, 5);
        assert_eq!(counts.line_bytes, 70_008 + kvlist_len);
        // Streams: (a, stdout), (a, stderr), (b, stdout).
        assert_eq!(counts.labels.len(), 3, "{:?}", counts.labels);
        assert_eq!(
            label_names(&counts.labels[0]),
            [
                "k8s.container.restart_count",
                "k8s.namespace.name",
                "k8s.pod.name",
                "log.file.path",
                "log.iostream"
            ]
        );
        assert!(counts.labels[0].contains(r#"k8s.container.restart_count="0""#));
        let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        assert_eq!(
            decode_otlp("application/x-protobuf", "snappy", &body).unwrap(),
            counts
        );
        assert_eq!(
            decode_otlp("application/x-protobuf", "", &raw).unwrap(),
            counts
        );
        assert!(decode_otlp("application/x-protobuf", "gzip", &body).is_err());
        assert!(decode_otlp("application/json", "", b"{}").is_err());
        assert!(count_otlp(&raw[..raw.len() - 1]).is_err());
        assert_eq!(count_otlp(&[]).unwrap(), Counts::default());
    }

    #[tokio::test]
    async fn null_receiver_takes_otlp_per_account() {
        let receiver = Receiver::start(None).await.unwrap();
        let body = snap::raw::Encoder::new()
            .compress_vec(&otlp_request())
            .unwrap();
        let send = |account: &'static str, project: &'static str| {
            logpipe_e2e::http_client()
                .post(receiver.push_url(Protocol::Otlp))
                .header("AccountID", account)
                .header("ProjectID", project)
                .header("Content-Type", "application/x-protobuf")
                .header("Content-Encoding", "snappy")
                .body(body.clone())
                .send()
        };
        assert_eq!(send("42", "0").await.unwrap().status().as_u16(), 200);
        assert_eq!(send("42", "7").await.unwrap().status().as_u16(), 200);
        // The Loki tenant "42" and the OTLP account 42 (project 0) are one tally.
        assert_eq!(receiver.tally("42").entries(), 5);
        assert_eq!(receiver.tally("42:7").entries(), 5);
        assert_eq!(receiver.tally("42").streams().0, 3);
        let bad = logpipe_e2e::http_client()
            .post(receiver.push_url(Protocol::Otlp))
            .header("Content-Encoding", "snappy")
            .body(vec![1u8, 2, 3])
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status().as_u16(), 400);
    }
}
