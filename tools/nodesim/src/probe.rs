//! Container probes (readiness, liveness, startup) against the pod IP, as the kubelet
//! runs them: HTTP GET (2xx/3xx succeed) and TCP connect. Exec and gRPC probes are not
//! simulated and count as succeeding.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

#[derive(Clone, Debug)]
enum Action {
    Http {
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Unsimulated,
}

/// One probe of one container, with its counters.
#[derive(Clone, Debug)]
pub struct Prober {
    action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
}

/// What the last probe changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// success_threshold consecutive successes reached.
    Passing,
    /// failure_threshold consecutive failures reached.
    Failing,
    /// Neither threshold crossed yet.
    Undecided,
}

fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => {
            u16::try_from(*n).map_err(|_| format!("probe port {n} out of range"))
        }
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("probe port {name:?} names no container port")),
    }
}

fn secs(value: Option<i32>, default: i32, min: i32) -> Duration {
    Duration::from_secs(u64::try_from(value.unwrap_or(default).max(min)).unwrap_or(1))
}

impl Prober {
    pub fn new(probe: &Probe, container: &Container) -> Result<Self, String> {
        let action = if let Some(http) = &probe.http_get {
            if http
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
            {
                return Err("HTTPS probes are not simulated; use scheme HTTP".into());
            }
            Action::Http {
                port: resolve_port(&http.port, container)?,
                path: http
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "/".into()),
                headers: http
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            Action::Tcp {
                port: resolve_port(&tcp.port, container)?,
            }
        } else {
            Action::Unsimulated
        };
        Ok(Self {
            action,
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold: u32::try_from(probe.success_threshold.unwrap_or(1).max(1))
                .unwrap_or(1),
            failure_threshold: u32::try_from(probe.failure_threshold.unwrap_or(3).max(1))
                .unwrap_or(3),
            successes: 0,
            failures: 0,
        })
    }

    /// Run the probe once (bounded by its timeout) and update the counters.
    pub async fn run(&mut self, http: &reqwest::Client, ip: Ipv4Addr) -> Verdict {
        let ok = match &self.action {
            Action::Http {
                port,
                path,
                headers,
            } => {
                let mut request = http
                    .get(format!("http://{ip}:{port}{path}"))
                    .timeout(self.timeout)
                    .header("User-Agent", "kube-probe/1.36");
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                request
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success() || r.status().is_redirection())
            }
            Action::Tcp { port } => tokio::time::timeout(
                self.timeout,
                tokio::net::TcpStream::connect(SocketAddr::from((ip, *port))),
            )
            .await
            .is_ok_and(|r| r.is_ok()),
            Action::Unsimulated => true,
        };
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= self.success_threshold {
                return Verdict::Passing;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.failure_threshold {
                return Verdict::Failing;
            }
        }
        Verdict::Undecided
    }

    pub fn reset(&mut self) {
        self.successes = 0;
        self.failures = 0;
    }
}
