//! Shipping to Loki: the batcher loop ([`run_shipper`]), batches ([`batch`]), the wire
//! format ([`proto`]) and the HTTP client ([`client`]).
//!
//! Flow: entries arrive from the tailer with their acknowledgement tokens; they are added
//! to one batch until it holds `batchBytes` of lines or its first entry waited `batchWait`;
//! the batch is pushed (one in flight at a time, so a stream's entries reach Loki in the
//! order they were read); when Loki accepts it — or refuses it for good — its tokens are
//! acknowledged in the ledger, which is what lets positions move.
//!
//! Guarantees: a token is acknowledged only after Loki's answer for the batch holding it.
//! When the input closes, the last batch is pushed before returning; cancelling stops the
//! loop without acknowledging what was not delivered.
//!
//! Caveats: while a push is being retried nothing else is sent; entries queue (bounded by
//! the ledger's buffer limit, which stops the tailer).

pub mod batch;
pub mod client;
pub mod proto;
pub mod streams;

pub use self::streams::ACTIVE_STREAMS_WINDOW;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use self::batch::Batch;
use self::client::{LokiClient, Outcome};
use self::streams::ActiveStreams;
use crate::metrics::Metrics;
use crate::tail::ack::{Ledger, Parcel};

/// Batching limits.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub batch_wait: Duration,
    pub batch_bytes: u64,
    pub external_labels: BTreeMap<String, String>,
}

/// Everything the shipper touches.
pub struct Shipper {
    pub cfg: ShipperConfig,
    pub client: LokiClient,
    pub ledger: Arc<Ledger>,
    pub metrics: Arc<Metrics>,
    /// Poked after every acknowledgement (the positions writer saves then).
    pub acked: Arc<Notify>,
}

/// Run until `rx` closes (then flush) or `cancel` fires.
pub async fn run_shipper(
    shipper: Shipper,
    mut rx: UnboundedReceiver<Parcel>,
    cancel: CancellationToken,
) {
    let mut batch = Batch::default();
    let mut probed = false;
    let mut newest_ns = 0;
    let mut active = ActiveStreams::default();
    // Streams also fall out of the window while nothing is pushed.
    let mut expire = tokio::time::interval(Duration::from_secs(15));
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = batch
            .started()
            .map(|t| tokio::time::Instant::from_std(t + shipper.cfg.batch_wait));
        tokio::select! {
            received = rx.recv() => match received {
                Some(parcel) => {
                    let newest = parcel.iter().map(|p| p.entry.timestamp_ns).max().unwrap_or(0);
                    if newest > newest_ns {
                        newest_ns = newest;
                        shipper.metrics.newest_entry.set(newest_ns as f64 / 1e9);
                    }
                    for pending in parcel {
                        let size = pending.entry.line.len() as u64;
                        if !batch.is_empty() && batch.bytes() + size > shipper.cfg.batch_bytes {
                            let full = std::mem::take(&mut batch);
                            if !send(&shipper, &mut active, full, &cancel).await {
                                return;
                            }
                        }
                        batch.push(pending);
                    }
                }
                None => {
                    if !batch.is_empty() {
                        send(&shipper, &mut active, batch, &cancel).await;
                    }
                    return;
                }
            },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending::<()>().await,
                }
            } => {
                let due = std::mem::take(&mut batch);
                if !send(&shipper, &mut active, due, &cancel).await {
                    return;
                }
            }
            // Readiness before the first push: is Loki there for this tenant?
            _ = tokio::time::sleep(Duration::from_secs(if probed { 10 } else { 0 })),
                if batch.is_empty() && shipper.metrics.last_push_success.get() == 0.0 => {
                probed = true;
                let ok = shipper.client.probe().await;
                tracing::debug!(ok, "probed Loki");
            }
            _ = expire.tick() => {
                let count = active.expire(crate::tail::now_ms());
                shipper.metrics.active_streams.set(count as i64);
            }
            _ = cancel.cancelled() => return,
        }
    }
}

/// Push one batch; `false` when cancelled.
async fn send(
    shipper: &Shipper,
    active: &mut ActiveStreams,
    batch: Batch,
    cancel: &CancellationToken,
) -> bool {
    let encoded = match batch.encode(&shipper.cfg.external_labels) {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a batch");
            return true;
        }
    };
    let count = active.pushed(&encoded.streams, crate::tail::now_ms());
    shipper.metrics.active_streams.set(count as i64);
    let outcome = shipper
        .client
        .push(encoded.body.clone(), encoded.entries, cancel)
        .await;
    match outcome {
        Outcome::Cancelled => return false,
        Outcome::Delivered => {
            let now = crate::tail::now_ms();
            shipper.metrics.last_push_success.set(now as f64 / 1000.0);
            if encoded.newest_ns > 0 {
                let lag = (now as f64 / 1000.0) - (encoded.newest_ns as f64 / 1e9);
                shipper.metrics.stream_lag.set(lag.max(0.0));
                shipper.metrics.delivery_latency.observe(lag.max(0.0));
            }
        }
        Outcome::Dropped { .. } => {}
    }
    shipper.ledger.ack(&encoded.tokens);
    shipper
        .metrics
        .buffered_bytes
        .set(shipper.ledger.buffered_bytes() as i64);
    shipper.acked.notify_one();
    true
}
