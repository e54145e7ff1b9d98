//! A fault proxy in front of the real store: the faults a production Loki gives, on demand.
//!
//! ```text
//! agent --push--> FaultProxy (127.0.0.1:<any>) --forward--> real store (VictoriaLogs)
//!                    \ a fault with budget left answers instead (429, 500, 400, drop, delay)
//! ```
//!
//! Flow: every request to the Loki push path takes the first injected fault that has
//! budget left and applies to its tenant (a fault injected with [`FaultProxy::inject_for`]
//! meets only pushes whose `X-Scope-OrgID` is that tenant); a fault answers in the store's place (or delays, then forwards). Every
//! other request, and every push with no fault left, is forwarded unchanged, so what is
//! accepted lands in the real store and tests count it there.
//!
//! Guarantees: faults are bounded (a number of requests or a time span, never open-ended);
//! the proxy listens on loopback only and stops with its handle (its connections too).
//! Caveats: the body of a request is read whole before it is answered or forwarded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::store::PUSH_PATH;

/// What a push meets instead of the store's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 429 with `Retry-After`, as Loki's per-tenant rate limit answers.
    RateLimited { retry_after: Duration },
    /// 500, as an overloaded or failing distributor answers.
    ServerError,
    /// 400 with one of Loki's refusal texts: the agent must drop the batch, not retry it.
    Rejected(Rejection),
    /// The connection is closed with no answer.
    DropConnection,
    /// Forwarded after this long.
    Delay(Duration),
}

/// Loki's 400 answers worth reproducing, with their texts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rejection {
    EntryTooFarBehind,
    LineTooLong,
}

impl Rejection {
    pub fn text(self) -> &'static str {
        match self {
            Self::EntryTooFarBehind => {
                "entry for stream '{app=\"x\"}' has timestamp too old: entry too far behind, oldest acceptable timestamp is: 2026-12-01T00:00:00Z"
            }
            Self::LineTooLong => {
                "Max entry size '262144' bytes exceeded for stream '{app=\"x\"}' while adding an entry with length '300000' bytes: line too long"
            }
        }
    }
}

impl Fault {
    /// A bounded metric-style name for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "429",
            Self::ServerError => "500",
            Self::Rejected(_) => "400",
            Self::DropConnection => "drop",
            Self::Delay(_) => "delay",
        }
    }
}

/// How much of a fault there is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// The next this-many pushes.
    Requests(u32),
    /// Every push from now on for this long.
    For(Duration),
    /// One push in `every`, `total` times in all.
    Share { every: u32, total: u32 },
}

#[derive(Debug)]
struct Injected {
    fault: Fault,
    budget: Budget,
    /// Only pushes of this tenant (`X-Scope-OrgID`); `None`: every push.
    tenant: Option<String>,
    started: Instant,
    seen: u32,
    used: u32,
}

impl Injected {
    fn applies_to(&self, tenant: Option<&str>) -> bool {
        self.tenant.is_none() || self.tenant.as_deref() == tenant
    }

    /// Whether this push meets the fault; counts it when it does.
    fn take(&mut self, now: Instant) -> bool {
        self.seen += 1;
        let hit = match self.budget {
            Budget::Requests(n) => self.used < n,
            Budget::For(span) => now.duration_since(self.started) < span,
            Budget::Share { every, total } => {
                self.used < total && (self.seen - 1).is_multiple_of(every.max(1))
            }
        };
        if hit {
            self.used += 1;
        }
        hit
    }

    fn spent(&self, now: Instant) -> bool {
        match self.budget {
            Budget::Requests(n) => self.used >= n,
            Budget::For(span) => now.duration_since(self.started) >= span,
            Budget::Share { total, .. } => self.used >= total,
        }
    }
}

/// What the proxy did, by kind: `forwarded`, and each [`Fault::kind`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats(pub BTreeMap<&'static str, u64>);

impl Stats {
    pub fn get(&self, kind: &str) -> u64 {
        self.0.get(kind).copied().unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct State {
    faults: Vec<Injected>,
    stats: Stats,
}

impl State {
    /// The fault a push of `tenant` meets; a tenant's fault neither sees nor counts
    /// another tenant's pushes.
    fn next_fault(&mut self, now: Instant, tenant: Option<&str>) -> Option<Fault> {
        self.faults.retain(|f| !f.spent(now));
        let fault = self
            .faults
            .iter_mut()
            .filter(|f| f.applies_to(tenant))
            .find_map(|f| f.take(now).then(|| f.fault.clone()))?;
        *self.stats.0.entry(fault.kind()).or_default() += 1;
        Some(fault)
    }
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("connection dropped on purpose")]
    Dropped,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream` (a base URL).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::new(Upstream {
            base: upstream.trim_end_matches('/').to_string(),
            http: crate::http_client(),
            state: state.clone(),
        });
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the accept task drops them all.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let upstream = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let upstream = upstream.clone();
                        async move { upstream.answer(request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The proxy's base URL (use it where the store's base URL would go).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where an agent pushes through the proxy.
    pub fn push_url(&self) -> String {
        format!("{}{PUSH_PATH}", self.url())
    }

    /// Add a fault; faults added earlier are met first.
    pub fn inject(&self, fault: Fault, budget: Budget) {
        self.add(fault, budget, None);
    }

    /// Add a fault that only pushes of `tenant` (their `X-Scope-OrgID`) meet.
    pub fn inject_for(&self, tenant: &str, fault: Fault, budget: Budget) {
        self.add(fault, budget, Some(tenant.to_string()));
    }

    fn add(&self, fault: Fault, budget: Budget, tenant: Option<String>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.faults.push(Injected {
            fault,
            budget,
            tenant,
            started: Instant::now(),
            seen: 0,
            used: 0,
        });
    }

    /// Remove every fault that is left.
    pub fn clear(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .faults
            .clear();
    }

    pub fn stats(&self) -> Stats {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats
            .clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Upstream {
    base: String,
    http: reqwest::Client,
    state: Arc<Mutex<State>>,
}

type Answer = Response<Full<Bytes>>;

impl Upstream {
    async fn answer(&self, request: Request<Incoming>) -> Result<Answer, ProxyError> {
        let is_push = request.uri().path() == PUSH_PATH;
        let fault = if is_push {
            let tenant = request
                .headers()
                .get("x-scope-orgid")
                .and_then(|v| v.to_str().ok());
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.next_fault(Instant::now(), tenant)
        } else {
            None
        };
        match fault {
            Some(Fault::RateLimited { retry_after }) => Ok(reply(
                StatusCode::TOO_MANY_REQUESTS,
                &[("retry-after", retry_after.as_secs().to_string())],
                "Ingestion rate limit exceeded for user (limit: 4194304 bytes/sec) while attempting to ingest lines totaling 65536 bytes, reduce log volume or contact your Loki administrator to see if the limit can be increased",
            )),
            Some(Fault::ServerError) => Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[],
                "rpc error: code = Unavailable desc = ingester unavailable",
            )),
            Some(Fault::Rejected(rejection)) => {
                Ok(reply(StatusCode::BAD_REQUEST, &[], rejection.text()))
            }
            Some(Fault::DropConnection) => Err(ProxyError::Dropped),
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                Ok(self.forward(request).await)
            }
            None => Ok(self.forward(request).await),
        }
    }

    async fn forward(&self, request: Request<Incoming>) -> Answer {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return reply(StatusCode::BAD_REQUEST, &[], &format!("body: {e}")),
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut forwarded = self
            .http
            .request(parts.method, format!("{}{path}", self.base))
            .body(body)
            .timeout(Duration::from_secs(30));
        for (name, value) in &parts.headers {
            if !matches!(name.as_str(), "host" | "content-length" | "connection") {
                forwarded = forwarded.header(name, value);
            }
        }
        let answer = match forwarded.send().await {
            Ok(response) => {
                let status = response.status();
                let content_type = response.headers().get("content-type").cloned();
                let body = response.bytes().await.unwrap_or_default();
                let mut answer = Response::new(Full::new(body));
                *answer.status_mut() = status;
                if let Some(value) = content_type {
                    answer.headers_mut().insert("content-type", value);
                }
                answer
            }
            Err(e) => reply(StatusCode::BAD_GATEWAY, &[], &format!("store: {e}")),
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.stats.0.entry("forwarded").or_default() += 1;
        answer
    }
}

fn reply(status: StatusCode, headers: &[(&'static str, String)], body: &str) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    for (name, value) in headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(*name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injected(fault: Fault, budget: Budget) -> Injected {
        Injected {
            fault,
            budget,
            tenant: None,
            started: Instant::now(),
            seen: 0,
            used: 0,
        }
    }

    #[test]
    fn a_count_budget_meets_exactly_that_many_pushes() {
        let mut state = State::default();
        state
            .faults
            .push(injected(Fault::ServerError, Budget::Requests(2)));
        let now = Instant::now();
        let got: Vec<_> = (0..4).map(|_| state.next_fault(now, None)).collect();
        assert_eq!(
            got,
            [
                Some(Fault::ServerError),
                Some(Fault::ServerError),
                None,
                None
            ]
        );
        assert_eq!(state.stats.get("500"), 2);
    }

    #[test]
    fn a_share_budget_meets_one_push_in_n_up_to_its_total() {
        let mut state = State::default();
        state.faults.push(injected(
            Fault::DropConnection,
            Budget::Share { every: 3, total: 2 },
        ));
        let now = Instant::now();
        let hits: Vec<bool> = (0..9)
            .map(|_| state.next_fault(now, None).is_some())
            .collect();
        assert_eq!(
            hits,
            [true, false, false, true, false, false, false, false, false]
        );
    }

    #[test]
    fn a_time_budget_ends_by_itself() {
        let mut state = State::default();
        state.faults.push(injected(
            Fault::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            Budget::For(Duration::from_millis(50)),
        ));
        assert!(state.next_fault(Instant::now(), None).is_some());
        assert!(
            state
                .next_fault(Instant::now() + Duration::from_millis(60), None)
                .is_none()
        );
        assert!(state.faults.is_empty(), "a spent fault is forgotten");
    }

    #[test]
    fn a_tenants_fault_meets_only_that_tenants_pushes() {
        let mut state = State::default();
        state.faults.push(Injected {
            tenant: Some("12".into()),
            ..injected(
                Fault::RateLimited {
                    retry_after: Duration::from_secs(1),
                },
                Budget::Requests(2),
            )
        });
        let now = Instant::now();
        let met = |state: &mut State, tenant| state.next_fault(now, tenant).is_some();
        assert!(!met(&mut state, Some("13")), "another tenant passes");
        assert!(!met(&mut state, None), "a push with no tenant passes");
        assert!(met(&mut state, Some("12")));
        assert!(
            !met(&mut state, Some("13")),
            "and does not use up its budget"
        );
        assert!(met(&mut state, Some("12")));
        assert!(!met(&mut state, Some("12")), "budget spent");
        assert_eq!(state.stats.get("429"), 2);
    }

    #[test]
    fn a_tenants_time_budget_lets_other_tenants_through_meanwhile() {
        let mut state = State::default();
        state.faults.push(Injected {
            tenant: Some("12".into()),
            ..injected(Fault::ServerError, Budget::For(Duration::from_secs(60)))
        });
        let now = Instant::now();
        for tenant in ["13", "14", "13"] {
            assert_eq!(state.next_fault(now, Some(tenant)), None, "{tenant}");
        }
        assert_eq!(state.next_fault(now, Some("12")), Some(Fault::ServerError));
        let later = now + Duration::from_secs(61);
        assert_eq!(
            state.next_fault(later, Some("12")),
            None,
            "the window ended"
        );
    }

    #[test]
    fn earlier_faults_are_met_first() {
        let mut state = State::default();
        state
            .faults
            .push(injected(Fault::ServerError, Budget::Requests(1)));
        state.faults.push(injected(
            Fault::Rejected(Rejection::LineTooLong),
            Budget::Requests(1),
        ));
        let now = Instant::now();
        assert_eq!(state.next_fault(now, None), Some(Fault::ServerError));
        assert_eq!(
            state.next_fault(now, None),
            Some(Fault::Rejected(Rejection::LineTooLong))
        );
        assert!(Rejection::LineTooLong.text().contains("line too long"));
        assert!(
            Rejection::EntryTooFarBehind
                .text()
                .contains("entry too far behind")
        );
    }
}
