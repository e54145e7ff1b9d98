//! Shipping to Loki: the batcher loop ([`run_shipper`]), batches ([`batch`]), the wire
//! format ([`proto`]) and the HTTP client ([`client`]).
//!
//! Flow: entries arrive from the tailer with their acknowledgement tokens and their tenant
//! (`loki.tenant` unless `tenantFrom` placed them, see [`crate::tenant`]); they are added
//! to their tenant's open batch until it holds `batchBytes` of lines or its first entry
//! waited `batchWait`; the batch is handed to a push task of its own, which encodes and
//! compresses it (on a runtime worker, not the loop that gathers the next batch) and
//! pushes it with its tenant in `X-Scope-OrgID`; when Loki accepts it — or refuses it for
//! good — its tokens are acknowledged in the ledger, which is what lets positions move. Up
//! to [`inflight::push_limit`] pushes per tenant are in flight at once
//! ([`inflight::Budget`], keyed by tenant), so a backlog drains at the speed of the store
//! and both cores rather than one push's round trip at a time. While a push of a tenant
//! is being retried, no other of that tenant starts: its full batches queue, and other
//! tenants push as before (a 429 for one tenant never holds the others).
//!
//! Guarantees: a token is acknowledged only after Loki's answer for the batch holding it;
//! positions advance only past entries whose predecessors in their file are all answered
//! (the ledger's rule), whatever order the pushes finish in. When the input closes, the
//! last batch is pushed and every push in flight answered before returning; cancelling
//! stops the loop and its pushes without acknowledging what was not delivered.
//!
//! Caveats: two batches of one stream may reach Loki in either order (see
//! [`inflight`]). While pushes are retried, entries queue (bounded by the ledger's buffer
//! limit, which stops the tailer). Per-tenant state (open batch, queue, retry count) is
//! kept only while the tenant has entries waiting or in flight.

pub mod batch;
pub mod client;
pub mod inflight;
pub mod proto;
pub mod streams;
#[cfg(test)]
mod tests;

pub use self::streams::ACTIVE_STREAMS_WINDOW;

use std::collections::{BTreeMap, HashMap, VecDeque};
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
use crate::entry::Tenant;
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
    // One open batch per tenant with entries waiting; a tenant's batch leaves the map
    // when it is dispatched.
    let mut open: HashMap<Tenant, Batch> = HashMap::new();
    let mut probed = false;
    let mut newest_ns = 0;
    // Streams also fall out of the window while nothing is pushed.
    let mut expire = tokio::time::interval(Duration::from_secs(15));
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shipper = pushes.shipper.clone();
    let wait = shipper.cfg.batch_wait;
    loop {
        let deadline = open
            .values()
            .filter_map(Batch::started)
            .min()
            .map(|t| tokio::time::Instant::from_std(t + wait));
        tokio::select! {
            received = rx.recv() => match received {
                Some(parcel) => {
                    let newest = parcel.iter().map(|p| p.entry.timestamp_ns).max().unwrap_or(0);
                    if newest > newest_ns {
                        newest_ns = newest;
                        shipper.metrics.newest_entry.set(newest_ns as f64 / 1e9);
                    }
                    pushes.add(&mut open, parcel);
                }
                None => {
                    for (tenant, batch) in open.drain() {
                        pushes.dispatch(tenant, batch);
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
                let now = std::time::Instant::now();
                let due: Vec<Tenant> = open
                    .iter()
                    .filter(|(_, b)| b.started().is_some_and(|t| t + wait <= now))
                    .map(|(tenant, _)| tenant.clone())
                    .collect();
                for tenant in due {
                    if let Some(batch) = open.remove(&tenant) {
                        pushes.dispatch(tenant, batch);
                    }
                }
            }
            Some(done) = pushes.tasks.join_next_with_id(), if !pushes.tasks.is_empty() => {
                if !pushes.finished(done) {
                    return;
                }
            }
            // Readiness before the first push: is Loki there for the default tenant?
            _ = tokio::time::sleep(Duration::from_secs(if probed { 10 } else { 0 })),
                if open.is_empty() && pushes.tasks.is_empty()
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

/// The pushes in flight, per tenant, and what starting one needs.
///
/// Nothing here waits: a full batch of a tenant without room in its budget (at its limit,
/// or one push being retried) is queued for that tenant and started when one of the
/// tenant's pushes ends, so a throttled tenant never holds the loop, and with it the
/// other tenants. Queued batches are bounded by the ledger's buffer limit, like open ones.
struct Pushes {
    shipper: Arc<Shipper>,
    /// `loki.tenant`: the tenant of entries `tenantFrom` did not place.
    default: Tenant,
    budget: Budget<Tenant>,
    tasks: JoinSet<bool>,
    /// The tenant of each push task.
    owners: HashMap<tokio::task::Id, Tenant>,
    /// Full batches waiting for room in their tenant's budget, oldest first.
    queued: HashMap<Tenant, VecDeque<Batch>>,
    /// Pushes being retried, per tenant with pushes in flight or queued.
    retrying: HashMap<Tenant, Arc<AtomicUsize>>,
    active: Arc<Mutex<ActiveStreams>>,
    cancel: CancellationToken,
}

impl Pushes {
    fn new(shipper: Shipper, cancel: CancellationToken) -> Self {
        Self {
            default: Tenant::from(shipper.client.tenant()),
            budget: Budget::new(shipper.cfg.max_pushes),
            shipper: Arc::new(shipper),
            tasks: JoinSet::new(),
            owners: HashMap::new(),
            queued: HashMap::new(),
            retrying: HashMap::new(),
            active: Arc::new(Mutex::new(ActiveStreams::default())),
            cancel,
        }
    }

    /// Add each entry to its tenant's open batch, dispatching a batch first when the entry
    /// would overfill it. A parcel is one file's entries, mostly of one tenant: the batch
    /// is looked up once per run of one tenant, not per entry.
    fn add(&mut self, open: &mut HashMap<Tenant, Batch>, parcel: Parcel) {
        let mut entries = parcel.into_iter().peekable();
        while let Some(first) = entries.next() {
            let run_tenant = first.entry.tenant.clone();
            let tenant = run_tenant.clone().unwrap_or_else(|| self.default.clone());
            let mut batch = open.remove(&tenant).unwrap_or_default();
            let mut next = Some(first);
            while let Some(pending) = next {
                let size = pending.entry.line.len() as u64;
                if !batch.is_empty() && batch.bytes() + size > self.shipper.cfg.batch_bytes {
                    self.dispatch(tenant.clone(), std::mem::take(&mut batch));
                }
                batch.push(pending);
                next = entries.next_if(|p| p.entry.tenant == run_tenant);
            }
            open.insert(tenant, batch);
        }
    }

    /// Queue `batch` for its tenant and start what the tenant's budget allows.
    fn dispatch(&mut self, tenant: Tenant, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        self.queued
            .entry(tenant.clone())
            .or_default()
            .push_back(batch);
        self.start_queued(&tenant);
    }

    /// Start `tenant`'s queued batches while its budget has room; forget a tenant with
    /// nothing in flight or queued.
    fn start_queued(&mut self, tenant: &Tenant) {
        let retrying = self.retrying.entry(tenant.clone()).or_default().clone();
        while self
            .budget
            .has_room(tenant, retrying.load(Ordering::Relaxed) > 0)
        {
            let Some(batch) = self.queued.get_mut(tenant).and_then(VecDeque::pop_front) else {
                break;
            };
            self.budget.start(tenant.clone());
            let task = self.tasks.spawn(push(
                self.shipper.clone(),
                self.active.clone(),
                retrying.clone(),
                tenant.clone(),
                batch,
                self.cancel.clone(),
            ));
            self.owners.insert(task.id(), tenant.clone());
        }
        if self.queued.get(tenant).is_some_and(VecDeque::is_empty) {
            self.queued.remove(tenant);
        }
        if self.budget.in_flight(tenant) == 0 && !self.queued.contains_key(tenant) {
            self.retrying.remove(tenant);
        }
    }

    /// Account for a finished push and start its tenant's next; `false` when it was
    /// cancelled.
    fn finished(&mut self, done: Result<(tokio::task::Id, bool), tokio::task::JoinError>) -> bool {
        let (id, delivered_or_dropped) = match done {
            Ok((id, delivered_or_dropped)) => (id, delivered_or_dropped),
            // Its tokens stay unacknowledged: positions hold there, nothing is skipped.
            Err(e) => {
                tracing::error!(error = %e, "a push task failed");
                (e.id(), true)
            }
        };
        let Some(tenant) = self.owners.remove(&id) else {
            return delivered_or_dropped;
        };
        self.budget.finish(&tenant);
        if delivered_or_dropped {
            self.start_queued(&tenant);
        }
        delivered_or_dropped
    }

    /// Push everything queued and wait for every push to be answered (or cancelled).
    async fn drain(&mut self) {
        while let Some(done) = self.tasks.join_next_with_id().await {
            if !self.finished(done) {
                return;
            }
        }
    }
}

/// Encode, compress and push one batch, then acknowledge it; `false` when cancelled.
async fn push(
    shipper: Arc<Shipper>,
    active: Arc<Mutex<ActiveStreams>>,
    retrying: Arc<AtomicUsize>,
    tenant: Tenant,
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
        .push(
            &tenant,
            encoded.body.clone(),
            encoded.entries,
            &cancel,
            &retrying,
        )
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
