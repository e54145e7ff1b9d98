//! The Loki push client: one encoded batch, delivered or given up on for a stated reason.
//!
//! Flow: [`LokiClient::push`] POSTs the body (`Content-Type: application/x-protobuf`,
//! `Content-Encoding: snappy`, `X-Scope-OrgID: <the push's tenant>`, auth read from its file at each
//! attempt so rotated tokens are picked up) and classifies the answer:
//! 2xx delivered; 429, 5xx and connection errors or timeouts retried with exponential
//! backoff between `minBackoff` and `maxBackoff`, with jitter, honouring `Retry-After`;
//! any other status is a permanent refusal, counted by Promtail's `reason` and dropped.
//!
//! Guarantees:
//! - A retryable failure is retried until it succeeds or the caller cancels (shutdown
//!   deadline): the batch is never dropped for being late. Meanwhile the tailer stops
//!   reading (the batch's bytes stay counted in the ledger), so the agent does not grow.
//! - `Delivered` means Loki answered 2xx to this exact body.
//!
//! Assumptions: Loki deduplicates nothing for us, so a batch is re-sent only when its
//! previous attempt failed. Several batches may be in flight at once (see
//! [`super::inflight`]); each push retries on its own.
//!
//! Caveats: a permanent refusal (e.g. 400 for a line over Loki's limit) loses that batch's
//! entries, as Promtail does; the count is in `promtail_dropped_entries_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use tokio_util::sync::CancellationToken;

use crate::config::LokiClientConfig;
use crate::metrics::{DropLabels, HostLabel, HostTenantLabels, Metrics, RequestLabels};
use crate::server::Health;

/// Longest `Retry-After` honoured; anything longer is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum LokiError {
    #[error("loki.url {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot read {field} file {path}: {source}")]
    SecretFile {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("loki.tls.caFile {path}: {message}")]
    Ca { path: String, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// How a push ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Refused for good; `reason` is Promtail's label value.
    Dropped {
        status: u16,
        reason: &'static str,
    },
    /// The caller gave up (shutdown deadline) before Loki accepted it.
    Cancelled,
}

/// What one attempt's answer means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry { retry_after: Option<Duration> },
    Drop { reason: &'static str },
}

/// Classify an HTTP answer (`status` 0: no answer at all).
pub fn classify(status: u16, retry_after: Option<&str>, body: &str) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        0 | 429 | 500..=599 => Verdict::Retry {
            retry_after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER)),
        },
        _ => {
            let body = body.to_ascii_lowercase();
            let reason = if body.contains("line too long") || body.contains("max line size") {
                "line_too_long"
            } else if body.contains("stream limit") || body.contains("streams limit") {
                "stream_limited"
            } else {
                "ingester_error"
            };
            Verdict::Drop { reason }
        }
    }
}

/// Delay before retry `attempt` (0-based): `min * 2^attempt` capped at `max`, then a
/// random point in its upper half, so many agents do not retry in step.
pub fn backoff(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let base = min
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(max)
        .max(min);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[derive(Clone, Debug)]
enum Auth {
    None,
    Basic {
        username: String,
        password_file: String,
    },
    Bearer {
        token_file: String,
    },
}

/// The push client. Cheap to clone.
#[derive(Clone)]
pub struct LokiClient {
    http: reqwest::Client,
    url: String,
    host: String,
    tenant: String,
    auth: Auth,
    min_backoff: Duration,
    max_backoff: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl LokiClient {
    pub fn new(
        cfg: &LokiClientConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, LokiError> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| LokiError::Url {
            url: cfg.url.clone(),
            message: e.to_string(),
        })?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => {
                return Err(LokiError::Url {
                    url: cfg.url.clone(),
                    message: "no host".into(),
                });
            }
        };
        // reqwest is built without a bundled provider; ring is the one kube uses too. An
        // error only means a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0.min(Duration::from_secs(5)))
            .user_agent(concat!("logpipe-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = &cfg.tls {
            if let Some(ca) = &tls.ca_file {
                let pem = std::fs::read(ca).map_err(|source| LokiError::SecretFile {
                    field: "loki.tls.caFile",
                    path: ca.clone(),
                    source,
                })?;
                let certs =
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| LokiError::Ca {
                        path: ca.clone(),
                        message: e.to_string(),
                    })?;
                builder = builder.tls_certs_merge(certs);
            }
            if tls.insecure_skip_verify {
                builder = builder.tls_danger_accept_invalid_certs(true);
            }
        }
        let http = builder
            .build()
            .map_err(|e| LokiError::Build(e.to_string()))?;
        let auth = match &cfg.auth {
            Some(a) if a.basic.is_some() => {
                let b = a
                    .basic
                    .clone()
                    .ok_or_else(|| LokiError::Build("unreachable".into()))?;
                Auth::Basic {
                    username: b.username,
                    password_file: b.password_file,
                }
            }
            Some(a) => match &a.bearer_token_file {
                Some(file) => Auth::Bearer {
                    token_file: file.clone(),
                },
                None => Auth::None,
            },
            None => Auth::None,
        };
        let client = Self {
            http,
            url: cfg.url.clone(),
            host,
            tenant: cfg.tenant.clone(),
            auth,
            min_backoff: cfg.min_backoff.0,
            max_backoff: cfg.max_backoff.0.max(cfg.min_backoff.0),
            metrics,
            health,
        };
        // Fail at start, naming the field, rather than at the first push.
        client.auth_header()?;
        Ok(client)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The default tenant (`loki.tenant`).
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    fn auth_header(&self) -> Result<Option<HeaderValue>, LokiError> {
        let read = |field, path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|source| LokiError::SecretFile {
                    field,
                    path: path.to_string(),
                    source,
                })
        };
        let value = match &self.auth {
            Auth::None => return Ok(None),
            Auth::Basic {
                username,
                password_file,
            } => {
                let password = read("loki.auth.basic.passwordFile", password_file)?;
                format!(
                    "Basic {}",
                    base64_encode(format!("{username}:{password}").as_bytes())
                )
            }
            Auth::Bearer { token_file } => {
                format!("Bearer {}", read("loki.auth.bearerTokenFile", token_file)?)
            }
        };
        HeaderValue::from_str(&value)
            .map(Some)
            .map_err(|e| LokiError::Build(format!("auth header: {e}")))
    }

    fn headers(&self, tenant: &str) -> Result<HeaderMap, LokiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("snappy"));
        let tenant = HeaderValue::from_str(tenant)
            .map_err(|e| LokiError::Build(format!("tenant {tenant:?}: {e}")))?;
        headers.insert("X-Scope-OrgID", tenant);
        if let Some(auth) = self.auth_header()? {
            headers.insert(reqwest::header::AUTHORIZATION, auth);
        }
        Ok(headers)
    }

    /// One attempt: (status, Retry-After, first line of the body). Status 0: no answer.
    async fn attempt(&self, tenant: &str, body: bytes::Bytes) -> (u16, Option<String>, String) {
        let headers = match self.headers(tenant) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the push request");
                return (0, None, e.to_string());
            }
        };
        let started = Instant::now();
        let result = self
            .http
            .post(&self.url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let (status, retry_after, text) = match result {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let text = if status.is_success() {
                    String::new()
                } else {
                    resp.text().await.unwrap_or_default()
                };
                (status.as_u16(), retry_after, text)
            }
            Err(e) => (0, None, e.to_string()),
        };
        let status_label = if status == 0 {
            "-1".to_string()
        } else {
            status.to_string()
        };
        self.metrics
            .request_duration
            .get_or_create(&RequestLabels {
                status_code: status_label,
                host: self.host.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        // Reachable: Loki answered for this tenant, even if it refused the content (an empty
        // probe gets 422, a bad line 400, an overloaded tenant 429).
        let reachable = (200..300).contains(&status)
            || status == StatusCode::TOO_MANY_REQUESTS.as_u16()
            || status == StatusCode::BAD_REQUEST.as_u16()
            || status == StatusCode::UNPROCESSABLE_ENTITY.as_u16();
        // Another tenant's refusal (401, 403: a gateway that does not let this agent write
        // that tenant) says nothing about Loki: readiness would flap with every push of
        // that tenant. No answer, a 5xx, or any answer for the default tenant does.
        if reachable || tenant == self.tenant || status == 0 || status >= 500 {
            self.health.set_loki_ready(reachable);
        }
        let first_line: String = text
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(1024)
            .collect();
        (status, retry_after, first_line)
    }

    /// Push for `tenant` until Loki accepts or refuses for good, or `cancel` fires. From
    /// its first retry until it ends, the push counts in `retrying`, the tenant's count
    /// (the shipper starts no other push of that tenant meanwhile, so a throttled tenant
    /// is not pressed by several at once; other tenants go on).
    pub async fn push(
        &self,
        tenant: &str,
        body: bytes::Bytes,
        entries: u64,
        cancel: &CancellationToken,
        retrying: &AtomicUsize,
    ) -> Outcome {
        let mut counted = RetryCount {
            retrying,
            counted: false,
        };
        let encoded = body.len() as u64;
        self.metrics
            .encoded_bytes
            .get_or_create(&HostLabel {
                host: self.host.clone(),
            })
            .inc_by(encoded);
        let mut attempt = 0u32;
        loop {
            let (status, retry_after, text) = tokio::select! {
                r = self.attempt(tenant, body.clone()) => r,
                _ = cancel.cancelled() => return Outcome::Cancelled,
            };
            match classify(status, retry_after.as_deref(), &text) {
                Verdict::Delivered => {
                    let host = HostLabel {
                        host: self.host.clone(),
                    };
                    self.metrics.sent_bytes.get_or_create(&host).inc_by(encoded);
                    self.metrics
                        .sent_entries
                        .get_or_create(&host)
                        .inc_by(entries);
                    return Outcome::Delivered;
                }
                Verdict::Drop { reason } => {
                    tracing::error!(status, reason, tenant, body = %text, entries, "Loki refused the batch, dropping it");
                    let labels = DropLabels {
                        host: self.host.clone(),
                        tenant: tenant.to_string(),
                        reason: reason.to_string(),
                    };
                    self.metrics
                        .dropped_entries
                        .get_or_create(&labels)
                        .inc_by(entries);
                    self.metrics
                        .dropped_bytes
                        .get_or_create(&labels)
                        .inc_by(encoded);
                    return Outcome::Dropped { status, reason };
                }
                Verdict::Retry { retry_after } => {
                    self.metrics
                        .batch_retries
                        .get_or_create(&HostTenantLabels {
                            host: self.host.clone(),
                            tenant: tenant.to_string(),
                        })
                        .inc();
                    let jitter = rand::rng().random::<f64>();
                    let delay = backoff(self.min_backoff, self.max_backoff, attempt, jitter);
                    let delay = retry_after.map_or(delay, |r| r.max(delay));
                    tracing::warn!(status, tenant, error = %text, attempt, delay_ms = delay.as_millis() as u64, "push failed, will retry");
                    attempt = attempt.saturating_add(1);
                    counted.start();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return Outcome::Cancelled,
                    }
                }
            }
        }
    }

    /// A push of no streams: tells whether Loki answers for the default tenant.
    pub async fn probe(&self) -> bool {
        let raw = prost::Message::encode_to_vec(&super::proto::PushRequest { streams: vec![] });
        let Ok(body) = snap::raw::Encoder::new().compress_vec(&raw) else {
            return false;
        };
        let (status, _, _) = self.attempt(&self.tenant, bytes::Bytes::from(body)).await;
        (200..300).contains(&status) || status == StatusCode::UNPROCESSABLE_ENTITY.as_u16()
    }
}

/// A push's place in the retrying count, given back however the push ends.
struct RetryCount<'a> {
    retrying: &'a AtomicUsize,
    counted: bool,
}

impl RetryCount<'_> {
    fn start(&mut self) {
        if !self.counted {
            self.counted = true;
            self.retrying.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RetryCount<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.retrying.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_429_5xx_and_connection_errors_are_retried() {
        let cases = [
            (204, Verdict::Delivered),
            (0, Verdict::Retry { retry_after: None }),
            (500, Verdict::Retry { retry_after: None }),
            (503, Verdict::Retry { retry_after: None }),
            (429, Verdict::Retry { retry_after: None }),
            (
                400,
                Verdict::Drop {
                    reason: "ingester_error",
                },
            ),
            (
                401,
                Verdict::Drop {
                    reason: "ingester_error",
                },
            ),
            (
                404,
                Verdict::Drop {
                    reason: "ingester_error",
                },
            ),
        ];
        for (status, want) in cases {
            assert_eq!(classify(status, None, ""), want, "{status}");
        }
        assert_eq!(
            classify(429, Some("7"), ""),
            Verdict::Retry {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify(
                400,
                None,
                "entry for stream '{a=\"b\"}' has timestamp too new: line too long"
            ),
            Verdict::Drop {
                reason: "line_too_long"
            }
        );
        assert_eq!(
            classify(400, None, "Maximum active stream limit exceeded"),
            Verdict::Drop {
                reason: "stream_limited"
            }
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(backoff(min, max, 0, 1.0), min);
        assert_eq!(backoff(min, max, 0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(min, max, 3, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(min, max, 10, 1.0), max);
        assert_eq!(backoff(min, max, 1000, 1.0), max);
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
    }
}
