//! The metrics and health server: `/metrics` (Prometheus/OpenMetrics text), `/-/ready`
//! (pod discovery synced, or not configured, and Loki reachable: the last push or probe
//! got an answer that is not a server or connection error), `/-/healthy` (the process
//! serves requests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use logpipe_api::process;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listen {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics server failed: {0}")]
    Serve(std::io::Error),
}

/// Readiness inputs, written by discovery and the Loki client.
#[derive(Debug, Default)]
pub struct Health {
    discovery_ready: AtomicBool,
    loki_ready: AtomicBool,
}

impl Health {
    pub fn new(discovery_enabled: bool) -> Self {
        Self {
            discovery_ready: AtomicBool::new(!discovery_enabled),
            loki_ready: AtomicBool::new(false),
        }
    }

    pub fn set_discovery_ready(&self, ready: bool) {
        self.discovery_ready.store(ready, Ordering::Release);
    }

    pub fn set_loki_ready(&self, ready: bool) {
        self.loki_ready.store(ready, Ordering::Release);
    }

    /// `Err` names what is not ready.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.discovery_ready.load(Ordering::Acquire) {
            return Err("pod discovery has not listed this node's pods yet");
        }
        if !self.loki_ready.load(Ordering::Acquire) {
            return Err("Loki is not reachable (last push or probe failed)");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Parse `host:port`, accepting Go's `:port` for all interfaces.
pub fn parse_listen(addr: &str) -> Result<SocketAddr, ServerError> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    full.parse()
        .map_err(|e: std::net::AddrParseError| ServerError::Address {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route(process::METRICS_PATH, get(metrics_handler))
        .route(process::READY_PATH, get(ready_handler))
        .route(process::HEALTHY_PATH, get(|| async { "ok\n" }))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
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
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Bind now (so a taken port fails at start), serve until `shutdown`.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(ServerError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(":12345").unwrap().to_string(), "0.0.0.0:12345");
        assert_eq!(
            parse_listen("127.0.0.1:9").unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert!(parse_listen("localhost").is_err());
    }

    #[test]
    fn readiness_needs_discovery_and_loki() {
        let health = Health::new(true);
        assert!(health.ready().unwrap_err().contains("discovery"));
        health.set_discovery_ready(true);
        assert!(health.ready().unwrap_err().contains("Loki"));
        health.set_loki_ready(true);
        assert!(health.ready().is_ok());
        assert!(Health::new(false).ready().unwrap_err().contains("Loki"));
    }
}
