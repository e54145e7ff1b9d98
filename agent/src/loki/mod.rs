//! Shipping to Loki: the batcher loop ([`run_shipper`]), batches ([`batch`]), the wire
//! format ([`proto`]) and the HTTP client ([`client`]).
//!
//! Flow: entries arrive from the tailer with their acknowledgement tokens; they are added
//! to one batch until it holds `batchBytes` of lines or its first entry waited `batchWait`;
//! the batch is handed to a push task of its own, which encodes and compresses it (on a
//! runtime worker, not the loop that gathers the next batch) and pushes it; when Loki
//! accepts it — or refuses it for good — its tokens are acknowledged in the ledger, which
//! is what lets positions move. Up to [`inflight::push_limit`] pushes are in flight at
//! once ([`inflight::Budget`], keyed by tenant), so a backlog drains at the speed of the
//! store and both cores rather than one push's round trip at a time. While a push is
//! being retried, no other starts.
//!
//! Guarantees: a token is acknowledged only after Loki's answer for the batch holding it;
//! positions advance only past entries whose predecessors in their file are all answered
//! (the ledger's rule), whatever order the pushes finish in. When the input closes, the
//! last batch is pushed and every push in flight answered before returning; cancelling
//! stops the loop and its pushes without acknowledging what was not delivered.
//!
//! Caveats: two batches of one stream may reach Loki in either order (see
//! [`inflight`]). While pushes are retried, entries queue (bounded by the ledger's buffer
//! limit, which stops the tailer).

pub mod batch;
pub mod client;
pub mod inflight;
pub mod proto;
pub mod streams;

pub use self::streams::ACTIVE_STREAMS_WINDOW;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::batch::Batch;
use self::client::{LokiClient, Outcome};
use self::inflight::Budget;
use self::streams::ActiveStreams;
use crate::metrics::Metrics;
use crate::tail::ack::{Ledger, Parcel};

/// Batching limits.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    pub batch_wait: Duration,
    pub batch_bytes: u64,
    pub external_labels: BTreeMap<String, String>,
    /// Pushes in flight at once per tenant ([`inflight::push_limit`]).
    pub max_pushes: usize,
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
    let mut pushes = Pushes::new(shipper, cancel.clone());
    let mut batch = Batch::default();
    let mut probed = false;
    let mut newest_ns = 0;
    // Streams also fall out of the window while nothing is pushed.
    let mut expire = tokio::time::interval(Duration::from_secs(15));
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shipper = pushes.shipper.clone();
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
                        if !batch.is_empty() && batch.bytes() + size > shipper.cfg.batch_bytes
                            && !pushes.dispatch(std::mem::take(&mut batch)).await
                        {
                            return;
                        }
                        batch.push(pending);
                    }
                }
                None => {
                    if !batch.is_empty() && !pushes.dispatch(batch).await {
                        return;
                    }
                    pushes.drain().await;
                    return;
                }
            },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending::<()>().await,
                }
            } => {
                if !pushes.dispatch(std::mem::take(&mut batch)).await {
                    return;
                }
            }
            Some(done) = pushes.tasks.join_next(), if !pushes.tasks.is_empty() => {
                if !pushes.finished(done) {
                    return;
                }
            }
            // Readiness before the first push: is Loki there for this tenant?
            _ = tokio::time::sleep(Duration::from_secs(if probed { 10 } else { 0 })),
                if batch.is_empty() && pushes.tasks.is_empty()
                    && shipper.metrics.last_push_success.get() == 0.0 => {
                probed = true;
                let ok = shipper.client.probe().await;
                tracing::debug!(ok, "probed Loki");
            }
            _ = expire.tick() => {
                let count = pushes.active.lock().unwrap_or_else(|p| p.into_inner())
                    .expire(crate::tail::now_ms());
                shipper.metrics.active_streams.set(count as i64);
            }
            _ = cancel.cancelled() => return,
        }
    }
}

/// The pushes in flight and what starting one needs.
struct Pushes {
    shipper: Arc<Shipper>,
    /// Budget key of this shipper's pushes: its tenant.
    key: String,
    budget: Budget<String>,
    tasks: JoinSet<bool>,
    active: Arc<Mutex<ActiveStreams>>,
    /// Pushes of this key being retried.
    retrying: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

impl Pushes {
    fn new(shipper: Shipper, cancel: CancellationToken) -> Self {
        Self {
            key: shipper.client.tenant().to_string(),
            budget: Budget::new(shipper.cfg.max_pushes),
            shipper: Arc::new(shipper),
            tasks: JoinSet::new(),
            active: Arc::new(Mutex::new(ActiveStreams::default())),
            retrying: Arc::new(AtomicUsize::new(0)),
            cancel,
        }
    }

    /// Start pushing `batch`, first waiting for room in the budget; `false` when cancelled.
    async fn dispatch(&mut self, batch: Batch) -> bool {
        while !self
            .budget
            .has_room(&self.key, self.retrying.load(Ordering::Relaxed) > 0)
        {
            match self.tasks.join_next().await {
                Some(done) => {
                    if !self.finished(done) {
                        return false;
                    }
                }
                None => break,
            }
        }
        self.budget.start(self.key.clone());
        self.tasks.spawn(push(
            self.shipper.clone(),
            self.active.clone(),
            self.retrying.clone(),
            batch,
            self.cancel.clone(),
        ));
        true
    }

    /// Account for a finished push; `false` when it was cancelled.
    fn finished(&mut self, done: Result<bool, tokio::task::JoinError>) -> bool {
        self.budget.finish(&self.key);
        match done {
            Ok(delivered_or_dropped) => delivered_or_dropped,
            // Its tokens stay unacknowledged: positions hold there, nothing is skipped.
            Err(e) => {
                tracing::error!(error = %e, "a push task failed");
                true
            }
        }
    }

    /// Wait for every push in flight to be answered (or cancelled).
    async fn drain(&mut self) {
        while let Some(done) = self.tasks.join_next().await {
            self.finished(done);
        }
    }
}

/// Encode, compress and push one batch, then acknowledge it; `false` when cancelled.
async fn push(
    shipper: Arc<Shipper>,
    active: Arc<Mutex<ActiveStreams>>,
    retrying: Arc<AtomicUsize>,
    batch: Batch,
    cancel: CancellationToken,
) -> bool {
    let encoded = match batch.encode(&shipper.cfg.external_labels) {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a batch");
            return true;
        }
    };
    let count = active
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pushed(&encoded.streams, crate::tail::now_ms());
    shipper.metrics.active_streams.set(count as i64);
    let outcome = shipper
        .client
        .push(encoded.body.clone(), encoded.entries, &cancel, &retrying)
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
