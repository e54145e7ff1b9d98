//! Operator metrics (Prometheus text format) and the health endpoints, on one small HTTP
//! server: `/metrics`, `/healthz` (the process runs), `/readyz` (connected to the API
//! server; a standby replica is ready too, so a Deployment rollout is not held by it).
//!
//! Labels are bounded: a static reason per error kind, never an object name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    /// `window` (a check during the window) or `final`.
    pub kind: &'static str,
    /// `passed` or `failed`.
    pub result: &'static str,
}

/// A request of the operator's kube client (see [`crate::kube_requests`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Kubernetes' verb: get, list, watch, create, update, patch, delete, ...
    pub verb: &'static str,
    /// e.g. `pods`, `logpipelines/status`; `non-resource` for discovery paths.
    pub resource: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub verifications: Family<VerificationLabels, Counter>,
    pub reconciles: Counter,
    pub errors: Family<ReasonLabel, Counter>,
    pub duration: Histogram,
    pub status_writes: Counter,
    pub pod_deletions: Counter,
    pub config_map_deletions: Counter,
    pub leader: Gauge,
    pub kube_requests: Family<RequestLabels, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("logpipe_operator");
        let reconciles = Counter::default();
        let errors = Family::<ReasonLabel, Counter>::default();
        // Up to 2 min: with 1000 nodes a reconcile that moves a batch of nodes takes seconds.
        let duration = Histogram::new([
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ]);
        let status_writes = Counter::default();
        let pod_deletions = Counter::default();
        let config_map_deletions = Counter::default();
        let leader = Gauge::default();
        let verifications = Family::<VerificationLabels, Counter>::default();
        let kube_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "verifications",
            "Rollout step verifications, by kind and result",
            verifications.clone(),
        );
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles failed, by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        registry.register(
            "status_writes",
            "LogPipeline status writes",
            status_writes.clone(),
        );
        registry.register(
            "pod_deletions",
            "Agent pods deleted to move a node",
            pod_deletions.clone(),
        );
        registry.register(
            "config_map_deletions",
            "Unused agent ConfigMaps deleted",
            config_map_deletions.clone(),
        );
        registry.register(
            "leader",
            "1 when this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "kube_requests",
            "Requests sent to the API server, by verb and resource",
            kube_requests.clone(),
        );
        Self {
            verifications,
            reconciles,
            errors,
            duration,
            status_writes,
            pod_deletions,
            config_map_deletions,
            leader,
            kube_requests,
            registry,
        }
    }
}

impl Metrics {
    /// Times a reconcile until dropped, so every exit path (errors included) is measured.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            started: Instant::now(),
            histogram: &self.duration,
        }
    }

    pub fn verification(&self, final_check: bool, passed: bool) {
        let labels = VerificationLabels {
            kind: if final_check { "final" } else { "window" },
            result: if passed { "passed" } else { "failed" },
        };
        self.verifications.get_or_create(&labels).inc();
    }

    pub fn kube_request(&self, verb: &'static str, resource: String) {
        self.kube_requests
            .get_or_create(&RequestLabels { verb, resource })
            .inc();
    }

    pub fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

pub struct ReconcileTimer<'a> {
    started: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Shared by the HTTP server and the controller.
#[derive(Debug, Default)]
pub struct Health {
    pub ready: AtomicBool,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn serve_metrics(State(state): State<AppState>) -> impl IntoResponse {
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_documented_names() {
        let m = Metrics::default();
        drop(m.reconcile_timer());
        m.error("apply");
        m.kube_request("list", "pods".into());
        let text = m.encode().unwrap();
        for name in [
            "logpipe_operator_reconciles_total 1",
            "logpipe_operator_reconcile_errors_total{reason=\"apply\"} 1",
            "logpipe_operator_reconcile_duration_seconds_count 1",
            "logpipe_operator_status_writes_total 0",
            "logpipe_operator_kube_requests_total{verb=\"list\",resource=\"pods\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
