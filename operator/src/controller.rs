//! The controller: watches LogPipelines (spec changes only: generation predicate), and
//! through `cache` their DaemonSets, agent pods, ConfigMaps and the ServiceMonitor CRD,
//! and reconciles one LogPipeline at a time per object.
//!
//! Reconcile = observe -> plan -> execute:
//! - [`observe`]: the caches (pods, DaemonSet, ConfigMaps, the stable snapshot, nodes
//!   while a canary selects by labels) and the operator's memory into a `plan::Snapshot`,
//!   after the desired objects (pure); the Secrets the pods need are checked with a get at
//!   most once per [`SECRET_RECHECK`] while none is missing.
//! - the gate's cluster, when `plan::ask_gate` says its last answer does not stand, and
//!   the agents (and the store) for what `plan::asks` names, measured in the background
//!   (`verify::background`): the answers in so far join the snapshot.
//! - `plan::plan` (pure, table-tested): every decision, the status and its Events.
//! - [`execute`]: apply (when the digest changed), delete pods (off the reconcile,
//!   concurrently, bounded: [`delete_off_reconcile`]), save stable, clear annotations,
//!   ConfigMap GC, status (when due), Events.
//!
//! Nothing waits for the pods, the agents or the store: their events, or the end of a
//! background measurement, wake the next reconcile.
//! Errors requeue with exponential backoff per object (1 s doubling to 5 min, reset on
//! success); a spec the agent would refuse is reported in status, not retried fast.
//! Failures (`status::Failure`: invalid spec, refused apply, missing Secret) are written
//! to the status by [`report_failure`], with one Event when they appear or change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, predicates, utils::Predicate};
use kube::{Client, ResourceExt};

use crate::apply::{self, ApplyError, FINALIZER};
use crate::cache::{self, Caches, Writers};
use crate::crd::LogPipeline;
use crate::desired::daemonset::CONTAINER;
use crate::desired::{self, ANNOTATION_REVISION, DesiredError, Key, LABEL_INSTANCE};
use crate::events;
use crate::gate;
use crate::metrics::Metrics;
use crate::plan;
use crate::rollout::PodView;
use crate::status::{self, Failure, FailureReason};
use crate::verify::{self, Verifier};

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// `storeEntries` of a LogPipeline with `tenantFrom` (see [`measure`]).
const TENANT_FROM_SKIPS_STORE: &str = "not asked: tenantFrom spreads the entries over tenants; the agents' acknowledgements (lag) judge delivery";
/// Longest wait before looking again for a missing Secret.
const SECRET_RETRY: Duration = Duration::from_secs(30);
/// How long a Secrets check that found nothing missing stands (see `Ctx::secrets_checked`).
const SECRET_RECHECK: Duration = Duration::from_secs(300);
/// How soon to look again while a cache has not been listed once.
const CACHE_WAIT: Duration = Duration::from_secs(1);
/// At most one reconcile of a LogPipeline acts per this interval: a rollout's thousand pod
/// events become four reconciles a second, not a thousand. Short, because a batch of
/// nodes moves only when a reconcile sees the last one Ready; a reconcile that changes
/// nothing makes no request, and progress-only status changes are paced apart
/// (`plan::STATUS_PACE`).
pub const PACE: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("invalid LogPipeline: {0}")]
    Desired(#[from] DesiredError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{}", .0.line())]
    Failed(Failure),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Apply(e) => e.reason(),
            Self::Desired(_) => "invalid_spec",
            Self::Finalizer(_) => "finalizer",
            Self::Failed(f) => f.reason.metric(),
        }
    }
}

/// Per LogPipeline, the names of the pods this operator deleted (see [`Ctx::deleted`]).
type Deleting = Mutex<HashMap<ObjectRef<LogPipeline>, HashSet<String>>>;

/// The Secrets a LogPipeline named when none was missing, and when that was seen.
type SecretsSeen = (Vec<status::SecretRef>, Instant);

pub struct Ctx {
    pub client: Client,
    pub agent_image: String,
    /// The chart's ClusterRole the agents are bound to (`--agent-cluster-role`).
    pub agent_cluster_role: String,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub verifier: Arc<Verifier>,
    /// Wakes a LogPipeline's reconcile when what it waited for (a step's baseline) is in.
    wake: UnboundedSender<ObjectRef<LogPipeline>>,
    /// Taken by [`run`]: the reconciles `wake` asks for.
    woken: Mutex<Option<UnboundedReceiver<ObjectRef<LogPipeline>>>>,
    failures: Mutex<HashMap<ObjectRef<LogPipeline>, u32>>,
    /// What the reconcile reads of the cluster (see `cache`).
    pub caches: Caches,
    /// Taken by [`run`], which drives the watches that fill `caches`.
    writers: Mutex<Option<Writers>>,
    /// When each LogPipeline's last reconcile started acting (see [`PACE`]).
    acted: Mutex<HashMap<ObjectRef<LogPipeline>, Instant>>,
    /// What was last applied for each LogPipeline (see `apply::Applied`).
    applied: Mutex<HashMap<ObjectRef<LogPipeline>, apply::Applied>>,
    /// Pods this operator deleted (or is deleting) that the pod cache may not show
    /// terminating yet; shared with the deletes in flight, which forget those that fail.
    deleting: Arc<Deleting>,
    /// When each LogPipeline's status was last written (see `plan::status_write`).
    status_written: Mutex<HashMap<ObjectRef<LogPipeline>, Instant>>,
    /// The Secrets each LogPipeline named when none was missing, and when that was seen.
    secrets_ok: Mutex<HashMap<ObjectRef<LogPipeline>, SecretsSeen>>,
    /// When each LogPipeline's gate was last asked (see `gate::reuse`).
    gate_asked: Mutex<HashMap<ObjectRef<LogPipeline>, Timestamp>>,
    /// Pods selected by more than one LogPipeline (see `overlap`).
    pub overlap: crate::overlap::Observer,
}

impl Ctx {
    pub fn new(
        client: Client,
        agent_image: String,
        agent_cluster_role: String,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        verifier: Verifier,
    ) -> Self {
        let (caches, writers) = Caches::new();
        let (wake, woken) = futures::channel::mpsc::unbounded();
        Self {
            wake,
            woken: Mutex::new(Some(woken)),
            caches,
            writers: Mutex::new(Some(writers)),
            deleting: Arc::default(),
            applied: Mutex::new(HashMap::new()),
            acted: Mutex::new(HashMap::new()),
            client,
            agent_image,
            agent_cluster_role,
            metrics,
            recorder,
            verifier: Arc::new(verifier),
            failures: Mutex::new(HashMap::new()),
            gate_asked: Mutex::new(HashMap::new()),
            secrets_ok: Mutex::new(HashMap::new()),
            status_written: Mutex::new(HashMap::new()),
            overlap: Default::default(),
        }
    }

    /// Names of `pods` this operator deleted that the cache does not show terminating yet
    /// (forgets those it does show terminating, and those gone).
    fn still_deleting(&self, lp: &LogPipeline, pods: &[Arc<Pod>]) -> HashSet<String> {
        let Ok(mut map) = self.deleting.lock() else {
            return HashSet::new();
        };
        let Some(names) = map.get_mut(&ObjectRef::from(lp)) else {
            return HashSet::new();
        };
        names.retain(|name| {
            pods.iter().any(|p| {
                p.metadata.name.as_ref() == Some(name) && p.metadata.deletion_timestamp.is_none()
            })
        });
        names.clone()
    }

    /// The Secrets check (see [`missing_secret`]) of this LogPipeline: asked again when the
    /// Secrets it names change, when the last check found one missing, or after
    /// [`SECRET_RECHECK`]; else the last answer (none missing). Secrets are not watched
    /// (a cluster-wide Secret watch would hold every Secret's data in memory): this keeps
    /// a rollout's reconciles from reading them once a second.
    async fn secrets_checked(
        &self,
        lp: &LogPipeline,
        gated: bool,
        now: Instant,
    ) -> Result<Option<Failure>, Error> {
        let object = ObjectRef::from(lp);
        let refs = status::secret_refs(&lp.spec, gated);
        let fresh = self.secrets_ok.lock().ok().is_some_and(|map| {
            map.get(&object)
                .is_some_and(|(seen, at)| *seen == refs && !secret_recheck_due(*at, now))
        });
        if fresh || refs.is_empty() {
            return Ok(None);
        }
        let namespace = lp.namespace().unwrap_or_default();
        let missing = missing_secret(&self.client, &namespace, &refs).await?;
        if let Ok(mut map) = self.secrets_ok.lock() {
            match missing {
                None => map.insert(object, (refs, now)),
                Some(_) => map.remove(&object),
            };
        }
        Ok(missing)
    }

    fn deleted(&self, lp: &LogPipeline, names: &[String]) {
        if let Ok(mut map) = self.deleting.lock() {
            map.entry(ObjectRef::from(lp))
                .or_default()
                .extend(names.iter().cloned());
        }
    }

    /// `Some(wait)`: this LogPipeline was reconciled less than [`PACE`] ago; else it may
    /// act now (and `now` is remembered).
    fn paced(&self, lp: &LogPipeline, now: Instant) -> Option<Duration> {
        let mut map = self.acted.lock().ok()?;
        let object = ObjectRef::from(lp);
        if let Some(wait) = map.get(&object).and_then(|last| pace_wait(*last, now)) {
            return Some(wait);
        }
        map.insert(object, now);
        None
    }

    fn last_applied(&self, lp: &LogPipeline) -> Option<apply::Applied> {
        self.applied
            .lock()
            .ok()
            .and_then(|map| map.get(&ObjectRef::from(lp)).cloned())
    }

    fn remember_applied(&self, lp: &LogPipeline, applied: apply::Applied) {
        if let Ok(mut map) = self.applied.lock() {
            map.insert(ObjectRef::from(lp), applied);
        }
    }

    fn forget_applied(&self, lp: &LogPipeline) {
        if let Ok(mut map) = self.applied.lock() {
            map.remove(&ObjectRef::from(lp));
        }
    }

    fn reset_failures(&self, lp: &LogPipeline) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&ObjectRef::from(lp));
        }
    }
}

/// Pure: how long until a LogPipeline last reconciled at `last` may act again.
fn pace_wait(last: Instant, now: Instant) -> Option<Duration> {
    let since = now.saturating_duration_since(last);
    (since < PACE).then(|| PACE - since)
}

/// Pure: is a Secrets check last passed at `at` too old to stand at `now`?
fn secret_recheck_due(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) >= SECRET_RECHECK
}

/// Exponential backoff: 1 s, 2 s, 4 s ... capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64.checked_shl(failures.min(16)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

pub async fn reconcile(lp: Arc<LogPipeline>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let Some(namespace) = lp.namespace() else {
        return Ok(Action::await_change());
    };
    if !ctx.caches.ready() {
        // Acting on a half-listed cache could move nodes it does not know of.
        return Ok(Action::requeue(CACHE_WAIT));
    }
    if let Some(wait) = ctx.paced(&lp, Instant::now()) {
        return Ok(Action::requeue(wait));
    }
    let api: Api<LogPipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, lp, |event| async {
        match event {
            Finalizer::Apply(lp) => reconcile_live(lp, &ctx).await,
            Finalizer::Cleanup(lp) => cleanup(&lp, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => Ok(action),
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => Err(e),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

async fn reconcile_live(lp: Arc<LogPipeline>, ctx: &Ctx) -> Result<Action, Error> {
    let now = plan::Now::current();
    let mut snap = match observe(&lp, ctx, now.mono).await? {
        Observation::Seen(snap) => *snap,
        Observation::Wait(wait) => return Ok(Action::requeue(wait)),
    };
    if plan::ask_gate(&snap, now.wall)
        && let Some(spec) = &lp.spec.rollout.gate
    {
        let namespace = snap.key.namespace.clone();
        let remote = gate::fetch(&ctx.client, &namespace, spec).await;
        snap.answers.gate = Some(remote.map_err(|e| e.to_string()));
    }
    let asks = plan::asks(&snap, now.wall);
    snap.answers = measure(&snap, &asks, ctx);
    let plan = plan::plan(&snap, now);
    execute(&snap, &plan, ctx).await
}

enum Observation {
    Seen(Box<plan::Snapshot>),
    /// A store this reconcile needs has not been listed yet: look again after this.
    Wait(Duration),
}

/// Read the caches and the operator's own memory into a snapshot (no API request but the
/// Secrets check, at most once per [`SECRET_RECHECK`]). An invalid spec is a failure,
/// reported here.
async fn observe(lp: &Arc<LogPipeline>, ctx: &Ctx, mono: Instant) -> Result<Observation, Error> {
    let key = Key::of(lp)?;
    let sm_crd = ctx.caches.service_monitor_crd();
    let dctx = desired::Context {
        agent_image: ctx.agent_image.clone(),
        service_monitor_crd: sm_crd,
        agent_cluster_role: ctx.agent_cluster_role.clone(),
    };
    let objects = match desired::desired(lp, &dctx) {
        Ok(objects) => objects,
        Err(e) => {
            // Permanent until the spec changes: say so in status, retry slowly.
            let failure = Failure::new(FailureReason::InvalidSpec, e.to_string());
            report_failure(lp, ctx, &failure).await;
            return Err(e.into());
        }
    };
    let selects_nodes = lp
        .spec
        .rollout
        .steps
        .iter()
        .any(|s| s.canary.as_ref().is_some_and(|c| c.node_selector.is_some()));
    let node_labels = if selects_nodes {
        match ctx.caches.node_labels(&ctx.client) {
            Some(labels) => labels,
            None => return Ok(Observation::Wait(CACHE_WAIT)),
        }
    } else {
        BTreeMap::new()
    };
    let stable_cm = ctx
        .caches
        .config_map(&key.namespace, &apply::stable_name(&key));
    let stable = apply::stable_from(stable_cm.as_deref());
    let gated = plan::gates(lp, stable.as_ref(), &objects.release);
    let missing_secret = ctx.secrets_checked(lp, gated, mono).await?;
    let pods = ctx.caches.pods_of(&key);
    let object = ObjectRef::from(lp.as_ref());
    Ok(Observation::Seen(Box::new(plan::Snapshot {
        deleting: ctx.still_deleting(lp, &pods),
        daemon_set: ctx.caches.daemon_set(&key),
        config_maps: ctx.caches.config_map_names(&key),
        last_applied: ctx.last_applied(lp),
        status_written: ctx
            .status_written
            .lock()
            .ok()
            .and_then(|written| written.get(&object).copied()),
        gate_asked: ctx
            .gate_asked
            .lock()
            .ok()
            .and_then(|asked| asked.get(&object).copied()),
        lp: lp.clone(),
        key,
        objects,
        service_monitor_crd: sm_crd,
        stable,
        pods,
        node_labels,
        missing_secret,
        overlap: ctx.overlap.of(&ctx.client, lp),
        answers: plan::Answers::default(),
    })))
}

/// Ask the agents (and the store) what [`plan::asks`] names; the answers join the gate's.
/// Both are measured in the background: an answer not in yet is `None`, and its
/// measurement wakes the LogPipeline's next reconcile when it is.
fn measure(snap: &plan::Snapshot, asks: &plan::Asks, ctx: &Ctx) -> plan::Answers {
    let lp = &snap.lp;
    let port = lp.spec.monitoring.port;
    let targets = |names: &[String]| -> Vec<verify::Target> {
        let names: HashSet<&str> = names.iter().map(String::as_str).collect();
        snap.pods
            .iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| names.contains(n))
            })
            .map(|p| verify::Target::of(p))
            .collect()
    };
    let wake = || {
        let wake = ctx.wake.clone();
        let object = ObjectRef::from(lp.as_ref());
        move || {
            // A closed channel: the controller is stopping, nothing left to wake.
            let _ = wake.unbounded_send(object);
        }
    };
    let mut answers = snap.answers.clone();
    if let Some((names, key)) = &asks.baseline {
        answers.baseline =
            ctx.verifier
                .baseline_or_start(key.clone(), targets(names), port, wake());
    }
    if let Some((request, key)) = &asks.verify {
        let spec = &lp.spec.rollout.verify;
        answers.measured = if spec.measures() {
            let request = verify::MeasureRequest {
                targets: targets(&request.pods),
                port,
                store: store_query(lp, request.window),
            };
            let skipped = (lp.spec.tenant_from.is_some() && spec.store().is_some())
                .then_some(TENANT_FROM_SKIPS_STORE);
            ctx.verifier
                .measurements_or_start(key.clone(), request, wake())
                .map(|mut measured| {
                    measured.store_skipped = skipped.map(String::from);
                    measured
                })
        } else {
            Some(verify::Measurements::default())
        };
    }
    answers
}

/// The store a verification asks about the step's nodes over `window`, if any. With
/// `tenantFrom` none: the step's entries are spread over tenants the operator does not
/// know, and asking `spec.tenant` alone would fail nodes whose pods all go elsewhere; the
/// agents' own acknowledgements (`lag`) still judge delivery.
fn store_query(lp: &LogPipeline, window: Duration) -> Option<verify::StoreQuery> {
    if lp.spec.tenant_from.is_some() {
        return None;
    }
    let (kind, endpoint) = lp.spec.rollout.verify.store()?;
    Some(verify::StoreQuery {
        kind,
        endpoint: endpoint.to_string(),
        tenant: lp.spec.tenant.clone(),
        window,
    })
}

/// Carry out `plan` (see `plan`'s module docs for the order). The first write that fails
/// ends the reconcile with its error (the next one plans again from the caches).
pub async fn execute(snap: &plan::Snapshot, plan: &plan::Plan, ctx: &Ctx) -> Result<Action, Error> {
    let (lp, key) = (snap.lp.as_ref(), &snap.key);
    if let Some(failure) = &plan.failure {
        write_status(lp, ctx, &plan.status, &plan.events).await?;
        return Err(Error::Failed(failure.clone()));
    }
    let writes = &plan.writes;
    if let Some(applied) = &plan.apply {
        let ds = writes.daemon_set.as_ref();
        let (objects, sm_crd) = (&snap.objects, snap.service_monitor_crd);
        match apply::apply_objects(&ctx.client, key, objects, ds, sm_crd).await {
            Ok(ds) => {
                ctx.remember_applied(lp, applied.clone().stored(ds.as_ref(), Instant::now()));
            }
            Err(e) => {
                ctx.forget_applied(lp);
                report_failure(lp, ctx, &Failure::of_apply(&e)).await;
                return Err(e.into());
            }
        }
    }
    if !writes.delete_pods.is_empty() {
        let names = &writes.delete_pods;
        tracing::info!(pipeline = %key.name, namespace = %key.namespace, pods = ?names, phase = ?plan.status.phase, revision = %snap.objects.revision, "moving nodes");
        ctx.deleted(lp, names);
        ctx.metrics.pod_deletions.inc_by(names.len() as u64);
        tokio::spawn(delete_off_reconcile(ctx, lp, key, names.clone()));
    }
    if let Some(snapshot) = &writes.save_stable {
        apply::save_stable(&ctx.client, lp, key, snapshot).await?;
        tracing::info!(pipeline = %key.name, namespace = %key.namespace, revision = %snapshot.revision, "saved the stable revision");
    }
    if writes.clear_annotations {
        apply::clear_annotations(&ctx.client, key).await?;
    }
    let deleted = apply::delete_config_maps(&ctx.client, key, &writes.delete_config_maps).await?;
    if !deleted.is_empty() {
        tracing::info!(pipeline = %key.name, config_maps = ?deleted, "deleted unused agent ConfigMaps");
        ctx.metrics
            .config_map_deletions
            .inc_by(deleted.len() as u64);
    }
    remember(snap, plan, ctx);
    if plan.write_status {
        write_status(lp, ctx, &plan.status, &plan.events).await?;
    }
    ctx.reset_failures(lp);
    Ok(Action::requeue(plan.requeue))
}

/// A batch's pod deletes, sent off the reconcile (bounded concurrency, see
/// `apply::delete_pods`): at 1,000 nodes a batch is 100 deletes, and the reconcile that
/// decided them does not wait for their answers; the pods' events wake the next one. A
/// pod whose delete failed is forgotten by `deleting` (it does not count as terminating),
/// so the next plan picks it again, and that reconcile is woken now.
fn delete_off_reconcile(
    ctx: &Ctx,
    lp: &LogPipeline,
    key: &Key,
    names: Vec<String>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (client, key) = (ctx.client.clone(), key.clone());
    let (deleting, metrics, wake) = (
        Arc::clone(&ctx.deleting),
        Arc::clone(&ctx.metrics),
        ctx.wake.clone(),
    );
    let object = ObjectRef::from(lp);
    async move {
        let failed = apply::delete_pods(&client, &key, &names).await;
        let Some((_, first)) = failed.first() else {
            return;
        };
        metrics.error(first.reason());
        tracing::warn!(pipeline = %key.name, namespace = %key.namespace, pods = failed.len(), error = %first, "deleting old-revision agent pods failed: they will be picked again");
        if let Ok(mut map) = deleting.lock()
            && let Some(names) = map.get_mut(&object)
        {
            for (name, _) in &failed {
                names.remove(name);
            }
        }
        // A closed channel: the controller is stopping, nothing left to wake.
        let _ = wake.unbounded_send(object);
    }
}

/// The operator's own memory and telemetry of a plan: its verification, when the gate
/// was asked, which pods' CPU baselines to keep.
fn remember(snap: &plan::Snapshot, plan: &plan::Plan, ctx: &Ctx) {
    let key = &snap.key;
    if let Some(j) = &plan.judged {
        ctx.metrics.verification(j.final_check, j.passed);
        if j.recorded {
            tracing::info!(pipeline = %key.name, namespace = %key.namespace, step = j.step, final_check = j.final_check, passed = j.passed, summary = %j.summary, "verification");
        }
    }
    if let (Some(at), Ok(mut asked)) = (plan.gate_asked, ctx.gate_asked.lock()) {
        asked.insert(ObjectRef::from(snap.lp.as_ref()), at);
    }
    ctx.verifier
        .retain(&snap.pods.iter().filter_map(|p| p.uid()).collect::<Vec<_>>());
}

async fn write_status(
    lp: &LogPipeline,
    ctx: &Ctx,
    status: &crate::crd::LogPipelineStatus,
    transitions: &[events::Transition],
) -> Result<(), Error> {
    if apply::patch_status(&ctx.client, lp, status).await? {
        ctx.metrics.status_writes.inc();
        if let Ok(mut written) = ctx.status_written.lock() {
            written.insert(ObjectRef::from(lp), Instant::now());
        }
        for transition in transitions {
            events::publish(&ctx.recorder, lp, transition).await;
        }
    }
    Ok(())
}

/// Best effort: a failure to write the failure is only logged (the error is returned anyway).
async fn report_failure(lp: &LogPipeline, ctx: &Ctx, failure: &Failure) {
    let plan = plan::failed(lp, failure, Timestamp::now());
    if let Err(error) = write_status(lp, ctx, &plan.status, &plan.events).await {
        tracing::warn!(%error, "cannot report the failure in status");
    }
}

/// The first Secret the agent pods mount (or the gate reads, while it applies) that is
/// missing: a new pod would wait in ContainerCreating forever, the gate could not be asked.
async fn missing_secret(
    client: &Client,
    namespace: &str,
    refs: &[status::SecretRef],
) -> Result<Option<Failure>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for r in refs {
        let found = api
            .get_opt(&r.name)
            .await
            .map_err(|source| ApplyError::Api {
                action: "read a Secret the LogPipeline names",
                source,
            })?;
        let data = found.map(|s| s.data.unwrap_or_default());
        if let Some(failure) = status::secret_failure(namespace, r, data.as_ref()) {
            return Ok(Some(failure));
        }
    }
    Ok(None)
}

async fn cleanup(lp: &LogPipeline, ctx: &Ctx) -> Result<Action, Error> {
    let key = Key::of(lp)?;
    apply::delete_cluster_scoped(&ctx.client, &key).await?;
    let object = ObjectRef::from(lp);
    if let Ok(mut asked) = ctx.gate_asked.lock() {
        asked.remove(&object);
    }
    if let Ok(mut written) = ctx.status_written.lock() {
        written.remove(&object);
    }
    if let Ok(mut seen) = ctx.secrets_ok.lock() {
        seen.remove(&object);
    }
    ctx.verifier.forget(&lp.uid().unwrap_or_default());
    ctx.forget_applied(lp);
    tracing::info!(pipeline = %key.name, namespace = %key.namespace, "deleted cluster-scoped objects");
    Ok(Action::await_change())
}

pub fn pod_view(pod: &Pod) -> PodView {
    let status = pod.status.as_ref();
    let condition = |type_: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
    };
    let ready = condition("Ready");
    let containers_ready = condition("ContainersReady");
    let agent = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER).or(cs.first()));
    PodView {
        name: pod.name_any(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        revision: pod.annotations().get(ANNOTATION_REVISION).cloned(),
        ready,
        containers_ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        restarts: agent.map(|c| c.restart_count).unwrap_or(0),
        waiting_reason: agent
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone()),
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        termination_message: agent.and_then(|c| failed_run(c)?.message.clone()),
        last_failure: agent.and_then(|c| Some(failed_run(c)?.finished_at.as_ref()?.0)),
    }
}

/// The agent's last failed run (`terminationMessagePolicy: FallbackToLogsOnError`: its
/// message is the termination-log file, else the end of its log): the run that just
/// ended, else the previous one (a crash-looping container waits with it in
/// `lastState`). Only a failed run, with something to say.
fn failed_run(c: &ContainerStatus) -> Option<ContainerStateTerminated> {
    let failed = |s: Option<&k8s_openapi::api::core::v1::ContainerState>| {
        s.and_then(|s| s.terminated.as_ref())
            .filter(|t| t.exit_code != 0)
            .map(|t| ContainerStateTerminated {
                message: t
                    .message
                    .as_deref()
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string),
                ..t.clone()
            })
            .filter(|t| t.message.is_some())
    };
    failed(c.state.as_ref()).or_else(|| failed(c.last_state.as_ref()))
}

pub fn error_policy(lp: Arc<LogPipeline>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.error(error.reason());
    let failures = ctx
        .failures
        .lock()
        .map(|mut map| {
            let n = map.entry(ObjectRef::from(lp.as_ref())).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = match error {
        // Nothing changes until the spec does (which triggers a reconcile by itself).
        Error::Desired(_) => MAX_BACKOFF,
        // Creating the Secret wakes nothing (Secrets are not watched): look again soon.
        Error::Failed(f) if f.reason == FailureReason::SecretMissing => {
            backoff(failures.saturating_sub(1)).min(SECRET_RETRY)
        }
        _ => backoff(failures.saturating_sub(1)),
    };
    tracing::warn!(pipeline = %lp.name_any(), namespace = lp.namespace().unwrap_or_default(), %error, reason = error.reason(), retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// Run the controller until `shutdown` resolves. `namespace`: watch only that namespace
/// (several operators, or several test runs, sharing one cluster); `None`: all.
pub async fn run(
    ctx: Arc<Ctx>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = namespace.as_deref();
    let taken = ctx.writers.lock().ok().and_then(|mut w| w.take());
    let woken = ctx.woken.lock().ok().and_then(|mut w| w.take());
    let (Some(writers), Some(woken)) = (taken, woken) else {
        tracing::error!("the controller runs once per context");
        return;
    };
    let pipelines: Api<LogPipeline> = scoped(&client, ns);
    // Spec changes only: our own status writes must not trigger a reconcile.
    let (reader, writer) = reflector::store::<LogPipeline>();
    ctx.overlap.set_pipelines(reader.clone());
    let main_stream = reflector(writer, watcher(pipelines, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .predicate_filter(
            // Annotations too: logpipe.io/promote and logpipe.io/abort are annotations.
            predicates::generation
                .combine(predicates::finalizers)
                .combine(predicates::annotations),
            Default::default(),
        );
    let to_pipeline = |labels: &BTreeMap<String, String>, namespace: Option<String>| {
        let name = labels.get(LABEL_INSTANCE)?;
        Some(ObjectRef::<LogPipeline>::new(name).within(&namespace?))
    };
    Controller::for_stream(main_stream, reader)
        .owns_stream(cache::daemon_set_stream(
            scoped(&client, ns),
            writers.daemon_sets,
        ))
        .watches_stream(
            cache::pod_stream(scoped(&client, ns), writers.pods),
            move |pod: Pod| to_pipeline(pod.labels(), pod.namespace()),
        )
        .watches_stream(
            cache::config_map_stream(scoped(&client, ns), writers.config_maps),
            move |cm: k8s_openapi::api::core::v1::ConfigMap| {
                to_pipeline(cm.labels(), cm.namespace())
            },
        )
        .reconcile_on(woken)
        .reconcile_all_on(cache::service_monitor_crd_trigger(
            client.clone(),
            writers.crds,
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(pipeline = %object.name, "reconciled"),
                Err(error) => tracing::debug!(%error, "reconcile error"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_table() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let cases = [
            ("at once", t0, Some(PACE)),
            ("a moment later", t0 + ms(100), Some(ms(150))),
            ("a pace later", t0 + PACE, None),
            ("long after", t0 + ms(60_000), None),
        ];
        for (name, now, want) in cases {
            assert_eq!(pace_wait(t0, now), want, "{name}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = [0, 1, 2, 3, 8, 9, 30]
            .map(|n| backoff(n).as_secs())
            .to_vec();
        assert_eq!(secs, [1, 2, 4, 8, 256, 300, 300]);
    }

    fn agent_pod(state: serde_json::Value, last_state: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "lp-abc", "annotations": {ANNOTATION_REVISION: "r2"}},
            "spec": {"nodeName": "ops-node-0", "containers": [{"name": CONTAINER}]},
            "status": {"containerStatuses": [{
                "name": CONTAINER, "image": "x", "imageID": "", "ready": false,
                "restartCount": 3, "state": state, "lastState": last_state,
            }]},
        }))
        .unwrap()
    }

    #[test]
    fn termination_message_table() {
        let words = "logpipe-agent: regex stage 2: missing ] at 'a[b'";
        let failed = serde_json::json!({"terminated": {"exitCode": 1, "message": words}});
        let waiting = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
        let cases = [
            (
                "terminated now",
                failed.clone(),
                serde_json::json!({}),
                Some(words),
            ),
            (
                "crash loop: the last run's",
                waiting.clone(),
                failed.clone(),
                Some(words),
            ),
            (
                "a clean exit has no last words",
                waiting.clone(),
                serde_json::json!({"terminated": {"exitCode": 0, "message": "bye"}}),
                None,
            ),
            (
                "an empty message is none",
                waiting,
                serde_json::json!({"terminated": {"exitCode": 1, "message": " \n"}}),
                None,
            ),
            (
                "running, never failed",
                serde_json::json!({"running": {}}),
                serde_json::json!({}),
                None,
            ),
        ];
        for (name, state, last, want) in cases {
            let view = pod_view(&agent_pod(state, last));
            assert_eq!(view.termination_message.as_deref(), want, "{name}");
        }
    }

    /// Regression: a canary that crash-looped on a bad regex said only
    /// `CrashLoopBackOff on ops-node-0`, not why.
    #[test]
    fn a_crash_looping_canary_fails_with_the_agents_last_words() {
        let pod = agent_pod(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            serde_json::json!({"terminated": {"exitCode": 1,
                "message": "logpipe-agent: regex stage 2: missing ] at 'a[b'"}}),
        );
        let view = pod_view(&pod);
        let (_, verdict) = verify::judge(
            &crate::crd::VerifySpec::default(),
            &[&view],
            &verify::Measurements::default(),
            false,
        );
        assert!(!verdict.passed);
        assert!(
            verdict.summary.contains(
                "CrashLoopBackOff on ops-node-0: agent exited: logpipe-agent: regex stage 2: missing ] at 'a[b'"
            ),
            "{}",
            verdict.summary
        );
    }

    /// `execute` against a mocked API server (kube's tower-test pattern): every request
    /// is answered with success and recorded as `METHOD path`.
    mod execute {
        use super::*;
        use http::{Request, Response};
        use kube::client::Body;
        use kube::runtime::events::Reporter;

        use crate::plan::fixtures::{pipeline, pod, snapshot};

        /// A controller context whose API server is the mock `service`.
        fn mocked_ctx(service: tower_test::mock::Mock<Request<Body>, Response<Body>>) -> Ctx {
            let client = Client::new(service, "default");
            let reporter = Reporter {
                controller: "logpipe-operator".into(),
                instance: None,
            };
            // As main does: reqwest (the verifier) has no crypto provider of its own.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Ctx::new(
                client.clone(),
                "logpipe-agent:new".into(),
                crate::rbac::AGENT_CLUSTER_ROLE.into(),
                Arc::new(Metrics::default()),
                Recorder::new(client, reporter),
                Verifier::new().unwrap(),
            )
        }

        /// Run `execute(snap, plan)` against the mock; the requests it made, in order, and
        /// its result.
        async fn run(snap: &plan::Snapshot, plan: &plan::Plan) -> (Vec<String>, bool) {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let lp_json = serde_json::to_vec(snap.lp.as_ref()).unwrap();
            let server = tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some((request, reply)) = handle.next_request().await {
                    let line = format!("{} {}", request.method(), request.uri().path());
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let answer = if line.starts_with("DELETE") {
                        br#"{"apiVersion":"v1","kind":"Status","metadata":{},"status":"Success"}"#
                            .to_vec()
                    } else if line.contains("/logpipelines/") {
                        lp_json.clone()
                    } else {
                        body.to_vec()
                    };
                    seen.push(line);
                    reply.send_response(Response::builder().body(Body::from(answer)).unwrap());
                }
                seen
            });
            let ctx = mocked_ctx(service);
            let ok = execute(snap, plan, &ctx).await.is_ok();
            drop(ctx);
            (server.await.unwrap(), ok)
        }

        const NS: &str = "/api/v1/namespaces/loki-v3";
        const APPS: &str = "/apis/apps/v1/namespaces/loki-v3";

        /// A step: objects applied first, then the batch's pods deleted, then the status
        /// and its Event; nothing else.
        #[tokio::test]
        async fn a_step_applies_then_deletes_then_writes_status() {
            let mut snap = snapshot(pipeline());
            let old = "r0";
            snap.pods = vec![
                pod("a", "n1", old),
                pod("b", "n2", old),
                pod("c", "n3", old),
            ];
            let mut plan = plan::plan(&snap, plan::Now::current());
            plan.writes.delete_pods = vec!["a".into(), "b".into()];
            let (seen, ok) = run(&snap, &plan).await;
            assert!(ok, "{seen:?}");
            let cm = snap.objects.config_map.metadata.name.clone().unwrap();
            let want = [
                format!("PATCH {NS}/serviceaccounts/logpipe"),
                "PATCH /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/logpipe:loki-v3:logpipe".into(),
                format!("PATCH {NS}/configmaps/{cm}"),
                format!("PATCH {APPS}/daemonsets/logpipe"),
                format!("PATCH {NS}/services/logpipe-metrics"),
            ];
            assert_eq!(seen[..5], want, "{seen:?}");
            // The deletes go out off the reconcile, together: their order, and where they
            // fall among the status and its Event, is not fixed.
            let (mut deletes, rest): (Vec<String>, Vec<String>) = seen[5..]
                .iter()
                .cloned()
                .partition(|l| l.starts_with("DELETE"));
            deletes.sort();
            assert_eq!(
                deletes,
                [format!("DELETE {NS}/pods/a"), format!("DELETE {NS}/pods/b")]
            );
            assert_eq!(
                rest[0],
                "PATCH /apis/logpipe.io/v1alpha1/namespaces/loki-v3/logpipelines/logpipe/status"
            );
            assert!(
                rest[1..]
                    .iter()
                    .all(|l| l.starts_with("POST /apis/events.k8s.io/")),
                "{seen:?}"
            );
            assert!(rest.len() > 1, "the new revision's Event: {seen:?}");
        }

        /// A delete the API refuses: the pod is not remembered as terminating (the next
        /// plan picks it again) and the LogPipeline's reconcile is woken to do so.
        #[tokio::test]
        async fn a_failed_delete_is_forgotten_and_wakes_the_reconcile() {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let server = tokio::spawn(async move {
                while let Some((_, reply)) = handle.next_request().await {
                    let refused = br#"{"apiVersion":"v1","kind":"Status","metadata":{},"status":"Failure","message":"pods is forbidden","reason":"Forbidden","code":403}"#;
                    let response = Response::builder()
                        .status(403)
                        .body(Body::from(refused.to_vec()))
                        .unwrap();
                    reply.send_response(response);
                }
            });
            let ctx = mocked_ctx(service);
            let mut woken = ctx.woken.lock().unwrap().take().unwrap();
            let snap = snapshot(pipeline());
            let pods = vec![pod("a", "n1", "r0")];
            let names = vec!["a".to_string()];
            ctx.deleted(&snap.lp, &names);
            assert_eq!(ctx.still_deleting(&snap.lp, &pods).len(), 1);
            delete_off_reconcile(&ctx, &snap.lp, &snap.key, names).await;
            assert!(
                ctx.still_deleting(&snap.lp, &pods).is_empty(),
                "a refused delete is not a terminating pod"
            );
            let object = woken.next().await.expect("its reconcile is woken");
            assert_eq!(object.name, "logpipe");
            drop(ctx);
            server.abort();
        }

        /// Nothing changed: no request at all (the quiet window, without a cluster).
        #[tokio::test]
        async fn a_quiet_plan_makes_no_request() {
            let snap = snapshot(pipeline());
            let first = plan::plan(&snap, plan::Now::current());
            let mut lp = (*snap.lp).clone();
            lp.status = Some(first.status.clone());
            let quiet = plan::Snapshot {
                lp: Arc::new(lp),
                last_applied: first.apply.map(|a| a.stored(None, Instant::now())),
                ..snap
            };
            let plan = plan::plan(&quiet, plan::Now::current());
            let (seen, ok) = run(&quiet, &plan).await;
            assert!(ok);
            assert_eq!(seen, Vec::<String>::new());
        }

        /// A missing Secret: the status says so, and nothing is applied or deleted.
        #[tokio::test]
        async fn a_missing_secret_writes_only_the_status() {
            let mut snap = snapshot(pipeline());
            snap.pods = vec![pod("a", "n1", "r0")];
            snap.missing_secret = Some(Failure::new(
                FailureReason::SecretMissing,
                "Secret loki-v3/x is missing",
            ));
            let plan = plan::plan(&snap, plan::Now::current());
            let (seen, ok) = run(&snap, &plan).await;
            assert!(!ok, "the reconcile fails (and is retried)");
            assert_eq!(
                seen[0],
                "PATCH /apis/logpipe.io/v1alpha1/namespaces/loki-v3/logpipelines/logpipe/status"
            );
            assert!(
                seen[1..]
                    .iter()
                    .all(|l| l.starts_with("POST /apis/events.k8s.io/")),
                "{seen:?}"
            );
        }
    }
}
