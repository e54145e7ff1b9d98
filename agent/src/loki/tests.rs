//! The shipper against a fake Loki on loopback that throttles one tenant: the other
//! tenant's entries are pushed and acknowledged meanwhile, and positions wait for the
//! throttled tenant's earlier entries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::LokiClientConfig;
use crate::entry::Entry;
use crate::positions::PositionRecord;
use crate::server::Health;

/// Pushes answered, by tenant and status.
#[derive(Default)]
struct FakeLoki {
    throttled: Mutex<Option<String>>,
    /// Answered 403, as a gateway answers a tenant this agent may not write.
    forbidden: Mutex<Option<String>>,
    answers: Mutex<BTreeMap<(String, u16), u32>>,
}

async fn answer(
    State(loki): State<Arc<FakeLoki>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    // The readiness probe: an empty request (one byte of Snappy), not counted.
    if body.len() <= 1 {
        return StatusCode::NO_CONTENT;
    }
    let tenant = headers
        .get("X-Scope-OrgID")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let throttled = loki.throttled.lock().unwrap().as_deref() == Some(tenant.as_str());
    let forbidden = loki.forbidden.lock().unwrap().as_deref() == Some(tenant.as_str());
    let status = if throttled {
        StatusCode::TOO_MANY_REQUESTS
    } else if forbidden {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::NO_CONTENT
    };
    *loki
        .answers
        .lock()
        .unwrap()
        .entry((tenant, status.as_u16()))
        .or_default() += 1;
    status
}

async fn fake_loki(loki: Arc<FakeLoki>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/loki/api/v1/push", post(answer))
        .with_state(loki);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/loki/api/v1/push")
}

fn shipper(url: &str, ledger: Arc<Ledger>) -> Shipper {
    let cfg: LokiClientConfig = serde_yaml::from_str(&format!(
        "{{url: '{url}', tenant: default, minBackoff: 20ms, maxBackoff: 50ms}}"
    ))
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let client = LokiClient::new(&cfg, metrics.clone(), Arc::new(Health::new(false))).unwrap();
    Shipper {
        cfg: ShipperConfig {
            batch_wait: Duration::from_millis(20),
            // A batch per entry: several pushes per tenant.
            batch_bytes: 1,
            external_labels: BTreeMap::new(),
            max_pushes: 4,
        },
        client,
        ledger,
        metrics,
        acked: Arc::new(Notify::new()),
    }
}

fn entry(end: u64, tenant: Option<&str>) -> Entry {
    Entry {
        timestamp_ns: 1,
        line: format!("line ending at {end}"),
        labels: Arc::new(BTreeMap::from([("app".into(), "a".into())])),
        structured_metadata: Vec::new(),
        end_offset: end,
        tenant: tenant.map(Tenant::from),
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_tenant_does_not_hold_the_others() {
    let loki = Arc::new(FakeLoki::default());
    *loki.throttled.lock().unwrap() = Some("a".into());
    let url = fake_loki(loki.clone()).await;
    let ledger = Arc::new(Ledger::default());
    let key = ledger.open("/f".into(), PositionRecord::of_file(1, 0));
    // a's entry first, then b's and the default tenant's: all from one file.
    let tenants = [Some("a"), Some("b"), None, Some("b"), Some("a"), Some("b")];
    let entries = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| entry(10 * (i as u64 + 1), *t));
    let parcel = ledger.register_all(key, entries, |_| 10);
    ledger.progress(key, 60, None);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_shipper(
        shipper(&url, ledger.clone()),
        rx,
        cancel.clone(),
    ));
    tx.send(parcel).unwrap();
    let delivered = |tenant: &str| {
        loki.answers
            .lock()
            .unwrap()
            .get(&(tenant.to_string(), 204))
            .copied()
            .unwrap_or(0)
    };
    // Answered, then acknowledged: the fake counts before the shipper hears the answer.
    until(
        "b's three and the default tenant's entry acknowledged",
        || delivered("b") == 3 && delivered("default") == 1 && ledger.buffered_bytes() == 20,
    )
    .await;
    let throttled = loki
        .answers
        .lock()
        .unwrap()
        .get(&("a".into(), 429))
        .copied();
    assert!(throttled.unwrap_or(0) >= 1, "a met 429s meanwhile");
    assert_eq!(delivered("a"), 0);
    assert_eq!(
        ledger.committed(key),
        Some(0),
        "a's first entry holds the position"
    );

    *loki.throttled.lock().unwrap() = None;
    until("a's entries delivered", || ledger.buffered_bytes() == 0).await;
    assert_eq!(delivered("a"), 2);
    assert_eq!(ledger.committed(key), Some(60));
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the shipper ends when its input closes")
        .unwrap();
}

/// Readiness says whether Loki answers: another tenant's 403 does not flip it, the
/// default tenant's does.
#[tokio::test]
async fn another_tenants_refusal_does_not_make_the_agent_unready() {
    let loki = Arc::new(FakeLoki::default());
    let url = fake_loki(loki.clone()).await;
    let cfg: LokiClientConfig =
        serde_yaml::from_str(&format!("{{url: '{url}', tenant: default}}")).unwrap();
    let health = Arc::new(Health::new(false));
    let client = LokiClient::new(&cfg, Arc::new(Metrics::new()), health.clone()).unwrap();
    let push = |tenant: &'static str| {
        let client = client.clone();
        async move {
            let retrying = std::sync::atomic::AtomicUsize::new(0);
            let body = bytes::Bytes::from_static(b"not empty");
            client
                .push(tenant, body, 1, &CancellationToken::new(), &retrying)
                .await
        }
    };
    assert_eq!(push("default").await, client::Outcome::Delivered);
    assert!(health.ready().is_ok());
    *loki.forbidden.lock().unwrap() = Some("other".into());
    assert!(matches!(
        push("other").await,
        client::Outcome::Dropped { status: 403, .. }
    ));
    assert!(health.ready().is_ok(), "another tenant's 403");
    *loki.forbidden.lock().unwrap() = Some("default".into());
    assert!(matches!(
        push("default").await,
        client::Outcome::Dropped { status: 403, .. }
    ));
    assert!(health.ready().is_err(), "the default tenant's 403");
}
