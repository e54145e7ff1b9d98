//! The controller: watches LogPipelines (spec changes only: generation predicate), and
//! through `cache` their DaemonSets, agent pods, ConfigMaps and the ServiceMonitor CRD,
//! and reconciles one LogPipeline at a time per object.
//!
//! Reconcile = (wait for the caches' first list) -> desired (pure) -> read the rollout
//! state (status), stable snapshot, pods, DaemonSet from the caches -> the Secrets the pods
//! (and the gate) need -> gate (when a new release waits, or moves under it: a stop pauses
//! or aborts the rollout) -> verification (when due) -> rollout decision (pure)
//! -> apply with the chosen template -> delete pods (concurrently, bounded) / save stable /
//! clear annotations -> ConfigMap GC -> status (pure) -> status write if changed -> Events
//! on transitions. Nothing waits for the pods: their events wake the next reconcile.
//! Errors requeue with exponential backoff per object (1 s doubling to 5 min, reset on
//! success); a spec the agent would refuse is reported in status, not retried fast.
//! Failures (`status::Failure`: invalid spec, refused apply, missing Secret) are written
//! to the status by [`report_failure`], with one Event when they appear or change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
use crate::crd::{GateFailureAction, GateSpec, GateStatus, LogPipeline, Phase};
use crate::desired::daemonset::CONTAINER;
use crate::desired::{self, ANNOTATION_REVISION, DesiredError, Key, LABEL_INSTANCE};
use crate::events;
use crate::gate;
use crate::metrics::Metrics;
use crate::plan;
use crate::rollout::{self, PodView};
use crate::status::{self, Failure, FailureReason, Observed};
use crate::verify::{self, Verifier};

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest wait before looking again for a missing Secret.
const SECRET_RETRY: Duration = Duration::from_secs(30);
/// How soon to look again while a cache has not been listed once.
const CACHE_WAIT: Duration = Duration::from_secs(1);
/// At most one reconcile of a LogPipeline acts per this interval: a rollout's thousand pod
/// events become one reconcile (and at most one status write) a second, not a thousand.
pub const PACE: Duration = Duration::from_secs(1);

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

pub struct Ctx {
    pub client: Client,
    pub agent_image: String,
    /// The chart's ClusterRole the agents are bound to (`--agent-cluster-role`).
    pub agent_cluster_role: String,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub verifier: Verifier,
    failures: Mutex<HashMap<ObjectRef<LogPipeline>, u32>>,
    /// What the reconcile reads of the cluster (see `cache`).
    pub caches: Caches,
    /// Taken by [`run`], which drives the watches that fill `caches`.
    writers: Mutex<Option<Writers>>,
    /// When each LogPipeline's last reconcile started acting (see [`PACE`]).
    acted: Mutex<HashMap<ObjectRef<LogPipeline>, Instant>>,
    /// What was last applied for each LogPipeline (see `apply::Applied`).
    applied: Mutex<HashMap<ObjectRef<LogPipeline>, apply::Applied>>,
    /// Pods this operator deleted that the pod cache may not show terminating yet.
    deleting: Mutex<HashMap<ObjectRef<LogPipeline>, HashSet<String>>>,
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
        Self {
            caches,
            writers: Mutex::new(Some(writers)),
            deleting: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            acted: Mutex::new(HashMap::new()),
            client,
            agent_image,
            agent_cluster_role,
            metrics,
            recorder,
            verifier,
            failures: Mutex::new(HashMap::new()),
            gate_asked: Mutex::new(HashMap::new()),
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
            Finalizer::Apply(lp) => reconcile_live(&lp, &ctx).await,
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

async fn reconcile_live(lp: &LogPipeline, ctx: &Ctx) -> Result<Action, Error> {
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
    let spec = &lp.spec.rollout;
    let old = lp.status.as_ref();
    let stable = apply::stable_from(
        ctx.caches
            .config_map(&key.namespace, &apply::stable_name(&key))
            .as_deref(),
    );
    let existing = ctx.caches.daemon_set(&key);
    let pods = ctx.caches.pods_of(&key);
    let deleting = ctx.still_deleting(lp, &pods);
    let views: Vec<PodView> = pods
        .iter()
        .map(|p| {
            let mut view = pod_view(p);
            view.terminating |= deleting.contains(&view.name);
            view
        })
        .collect();
    let desired_nodes = existing
        .as_ref()
        .and_then(|ds| ds.status.as_ref())
        .map(|s| s.desired_number_scheduled)
        .unwrap_or(0);
    // Counted for the DaemonSet's current spec; before that, 0 or a count being made.
    let desired_known = existing.as_ref().is_some_and(|ds| {
        let observed = ds.status.as_ref().and_then(|s| s.observed_generation);
        observed.is_some() && observed >= ds.metadata.generation
    });
    let selects_nodes = spec
        .steps
        .iter()
        .any(|s| s.canary.as_ref().is_some_and(|c| c.node_selector.is_some()));
    let node_labels = if selects_nodes {
        match ctx.caches.node_labels(&ctx.client) {
            Some(labels) => labels,
            None => return Ok(Action::requeue(CACHE_WAIT)),
        }
    } else {
        BTreeMap::new()
    };
    let state = status::rollout_state(old);
    let annotations = lp.annotations();
    let promote = annotations.contains_key(rollout::ANNOTATION_PROMOTE);
    let abort = annotations.contains_key(rollout::ANNOTATION_ABORT);
    let stable_release = old
        .and_then(|s| s.stable_release.clone())
        .or_else(|| stable.as_ref().map(|s| s.release.clone()));
    let gated = spec.gate.is_some() && stable_release.as_deref() != Some(objects.release.as_str());
    if let Some(failure) = missing_secret(lp, ctx, &key.namespace, gated).await? {
        report_failure(lp, ctx, &failure).await;
        return Err(Error::Failed(failure));
    }
    let mut observed = rollout::Observed {
        revision: &objects.revision,
        pods: &views,
        desired_nodes: usize::try_from(desired_nodes).unwrap_or(0),
        desired_known,
        node_labels: &node_labels,
        gated,
        stable_saved: stable
            .as_ref()
            .is_some_and(|s| Some(&s.revision) == state.stable.as_ref()),
        saved_revision: stable.as_ref().map(|s| s.revision.as_str()),
        paused: spec.paused,
        promote,
        abort,
    };
    let now_ts = Timestamp::now();

    // The gate is asked while a new release waits for it, and watched while it moves.
    let mut gate_status = old
        .and_then(|s| s.gate.clone())
        .filter(|_| spec.gate.is_some());
    let waiting = state.target.as_deref() != Some(objects.revision.as_str())
        || state.phase == Some(Phase::Pending);
    let mut gate_verdict = None;
    let mut gate_stop = None;
    if let Some(gate_spec) = &spec.gate
        && let Some(stage) = gate_stage(gate_spec, gated, waiting, state.phase)
    {
        let (verdict, gs) = consult_gate(
            lp,
            ctx,
            gate_spec,
            &objects.release,
            stage,
            gate_status.as_ref(),
            now_ts,
        )
        .await;
        gate_status = Some(gs);
        match (stage, verdict) {
            (gate::Stage::Waiting, verdict) => gate_verdict = Some(verdict.waiting()),
            (gate::Stage::Moving, gate::Verdict::Stop(why)) => {
                // The engine's own levers: its pause flag, or the abort path.
                match gate_spec.on_failure {
                    GateFailureAction::Pause => observed.paused = true,
                    GateFailureAction::Rollback => observed.abort = true,
                }
                gate_stop = Some(why);
            }
            (gate::Stage::Moving, _) => {}
        }
    }

    // What the stable agents say (streams, lines read and dropped), before the step moves
    // them.
    let baseline = match (rollout::baseline_due(spec, &state, &observed), state.step) {
        (Some(names), Some(step)) => {
            let targets: Vec<verify::Target> = pods
                .iter()
                .filter(|p| names.contains(&p.name_any()))
                .map(|p| verify::Target::of(p))
                .collect();
            let key = verify::BaselineKey {
                pipeline: lp.uid().unwrap_or_default(),
                revision: objects.revision.clone(),
                step,
                started: state.step_started.map(|t| t.to_string()),
            };
            Some(
                ctx.verifier
                    .baseline_once(key, &targets, lp.spec.monitoring.port)
                    .await,
            )
        }
        _ => None,
    };

    // Verification of the step's nodes, when due.
    let mut verification = None;
    let mut verdict = None;
    if let Some(request) = rollout::verification_due(spec, &state, &observed, now_ts) {
        let chosen: Vec<&Pod> = pods
            .iter()
            .filter(|p| request.pods.contains(&p.name_any()))
            .map(|p| p.as_ref())
            .collect();
        let targets: Vec<verify::Target> = chosen
            .iter()
            .map(|p| verify::Target {
                pod: p.name_any(),
                uid: p.uid().unwrap_or_default(),
                node: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
            })
            .collect();
        let store = spec
            .verify
            .store()
            .map(|(kind, endpoint)| verify::StoreQuery {
                kind,
                endpoint: endpoint.to_string(),
                tenant: lp.spec.tenant.clone(),
                window: request.window,
            });
        let mut measured = if spec.verify.measures() {
            ctx.verifier
                .measure(
                    &targets,
                    lp.spec.monitoring.port,
                    store.as_ref(),
                    request.final_check,
                )
                .await
        } else {
            verify::Measurements::default()
        };
        measured.stream_baseline = state.stream_baseline.as_ref().map(|b| b.nodes.clone());
        measured.drop_baseline = state.stream_baseline.as_ref().map(|b| b.drops.clone());
        let step_views: Vec<&PodView> = views
            .iter()
            .filter(|v| request.pods.contains(&v.name))
            .collect();
        let (checks, v) = verify::judge(&spec.verify, &step_views, &measured, request.final_check);
        ctx.metrics.verification(request.final_check, v.passed);
        let last = lp
            .status
            .as_ref()
            .and_then(|s| s.last_verification.as_ref());
        if verify::worth_recording(&v, &objects.revision, request.step, last) {
            tracing::info!(pipeline = %key.name, namespace = %key.namespace, step = request.step, final_check = request.final_check, passed = v.passed, summary = %v.summary, "verification");
            verification = Some(verify::record(
                &objects.revision,
                request.step,
                checks,
                &v,
                &now_ts.to_string(),
            ));
        }
        verdict = Some(v);
    }
    ctx.verifier
        .retain(&pods.iter().filter_map(|p| p.uid()).collect::<Vec<_>>());

    let mut decision = rollout::step(
        spec,
        &state,
        &observed,
        &rollout::Verdicts {
            gate: gate_verdict,
            verification: verdict,
            baseline,
        },
        now_ts,
    );
    if let Some(why) = &gate_stop {
        explain_gate_stop(&mut decision, &state, why, promote || abort);
    }
    let writes = plan::writes(
        &key,
        &objects,
        stable.as_ref(),
        &decision,
        &pods,
        &ctx.caches.config_map_names(&key),
    );
    let daemon_set = writes.daemon_set.as_ref();
    let applied = apply::Applied::of(&objects, daemon_set, sm_crd);
    let last = ctx.last_applied(lp);
    let ds = if applied.still_holds(last.as_ref(), existing.as_deref(), Instant::now()) {
        existing.as_deref().cloned()
    } else {
        match apply::apply_objects(&ctx.client, &key, &objects, daemon_set, sm_crd).await {
            Ok(ds) => {
                ctx.remember_applied(lp, applied.stored(ds.as_ref(), Instant::now()));
                ds
            }
            Err(e) => {
                ctx.forget_applied(lp);
                report_failure(lp, ctx, &Failure::of_apply(&e)).await;
                return Err(e.into());
            }
        }
    };
    let deleted_now = writes.delete_pods.clone();
    if !writes.delete_pods.is_empty() {
        let names = &writes.delete_pods;
        tracing::info!(pipeline = %key.name, namespace = %key.namespace, pods = ?names, phase = ?decision.state.phase, revision = %objects.revision, "moving nodes");
        ctx.deleted(lp, names);
        apply::delete_pods(&ctx.client, &key, names).await?;
        ctx.metrics.pod_deletions.inc_by(names.len() as u64);
    }
    if let Some(snapshot) = &writes.save_stable {
        apply::save_stable(&ctx.client, lp, &key, snapshot).await?;
        tracing::info!(pipeline = %key.name, namespace = %key.namespace, revision = %snapshot.revision, "saved the stable revision");
    }
    if writes.clear_annotations {
        apply::clear_annotations(&ctx.client, &key).await?;
    }
    let current_cm = objects.config_map.metadata.name.clone().unwrap_or_default();
    let deleted = apply::delete_config_maps(&ctx.client, &key, &writes.delete_config_maps).await?;
    if !deleted.is_empty() {
        tracing::info!(pipeline = %key.name, config_maps = ?deleted, "deleted unused agent ConfigMaps");
        ctx.metrics
            .config_map_deletions
            .inc_by(deleted.len() as u64);
    }
    let desired_nodes = ds
        .as_ref()
        .and_then(|ds| ds.status.as_ref())
        .map(|s| s.desired_number_scheduled)
        .unwrap_or(desired_nodes);
    let observed_status = Observed {
        generation: lp.metadata.generation,
        desired_nodes,
        // Pods deleted just now are terminating: count them so.
        pods: views
            .into_iter()
            .map(|mut p| {
                p.terminating |= deleted_now.contains(&p.name);
                p
            })
            .collect(),
        target_revision: objects.revision.clone(),
        release: objects.release.clone(),
        config_map: current_cm,
        paused: spec.paused,
        failure: decision
            .store_unreachable
            .as_ref()
            .map(|hold| Failure::new(FailureReason::StoreUnreachable, hold.clone())),
    };
    let record = status::Rollout {
        state: decision.state.clone(),
        message: decision.message.clone(),
        verification,
        gate: gate_status,
    };
    let mut new_status = status::compute(old, &observed_status, Some(&record), &now());
    let overlap = ctx.overlap.of(&ctx.client, lp);
    crate::overlap::annotate(&mut new_status, overlap, old);
    write_status(lp, ctx, &new_status).await?;
    ctx.reset_failures(lp);
    Ok(Action::requeue(decision.requeue))
}

async fn write_status(
    lp: &LogPipeline,
    ctx: &Ctx,
    status: &crate::crd::LogPipelineStatus,
) -> Result<(), Error> {
    if apply::patch_status(&ctx.client, lp, status).await? {
        ctx.metrics.status_writes.inc();
        for transition in events::transitions(lp.status.as_ref(), status) {
            events::publish(&ctx.recorder, lp, &transition).await;
        }
    }
    Ok(())
}

/// Best effort: a failure to write the failure is only logged (the error is returned anyway).
/// Everything but the failure stays as the last successful reconcile left it (see
/// `status` on failures): the failed spec is not recorded as the target.
async fn report_failure(lp: &LogPipeline, ctx: &Ctx, failure: &Failure) {
    let old = lp.status.as_ref();
    let observed = Observed {
        generation: lp.metadata.generation,
        desired_nodes: old.map(|s| s.desired_nodes).unwrap_or(0),
        pods: Vec::new(),
        target_revision: old
            .and_then(|s| s.target_revision.clone())
            .unwrap_or_default(),
        release: old.and_then(|s| s.release.clone()).unwrap_or_default(),
        config_map: old.and_then(|s| s.config_map.clone()).unwrap_or_default(),
        paused: lp.spec.rollout.paused,
        failure: Some(failure.clone()),
    };
    let status = status::compute(old, &observed, None, &now());
    if let Err(error) = write_status(lp, ctx, &status).await {
        tracing::warn!(%error, "cannot report the failure in status");
    }
}

/// The first Secret the agent pods mount (or the gate reads, while it applies) that is
/// missing: a new pod would wait in ContainerCreating forever, the gate could not be asked.
async fn missing_secret(
    lp: &LogPipeline,
    ctx: &Ctx,
    namespace: &str,
    gated: bool,
) -> Result<Option<Failure>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    for r in status::secret_refs(&lp.spec, gated) {
        let found = api
            .get_opt(&r.name)
            .await
            .map_err(|source| ApplyError::Api {
                action: "read a Secret the LogPipeline names",
                source,
            })?;
        let data = found.map(|s| s.data.unwrap_or_default());
        if let Some(failure) = status::secret_failure(namespace, &r, data.as_ref()) {
            return Ok(Some(failure));
        }
    }
    Ok(None)
}

/// Where a gated release stands: waiting for the gate, or moving under its watch. With
/// `onFailure: pause` the watch ends at the soak (the engine cannot hold a soak).
fn gate_stage(
    spec: &GateSpec,
    gated: bool,
    waiting: bool,
    phase: Option<Phase>,
) -> Option<gate::Stage> {
    let rollback = spec.on_failure == GateFailureAction::Rollback;
    match (gated, waiting, phase) {
        (false, _, _) => None,
        (true, true, _) => Some(gate::Stage::Waiting),
        (true, false, Some(Phase::Canary | Phase::Step | Phase::Paused)) => {
            Some(gate::Stage::Moving)
        }
        (true, false, Some(Phase::Soak)) if rollback => Some(gate::Stage::Moving),
        _ => None,
    }
}

/// The gate's answer: its last one while it stands (`gate::reuse`), else a new ask.
async fn consult_gate(
    lp: &LogPipeline,
    ctx: &Ctx,
    spec: &GateSpec,
    release: &str,
    stage: gate::Stage,
    previous: Option<&GateStatus>,
    now: Timestamp,
) -> (gate::Verdict, GateStatus) {
    let object = ObjectRef::from(lp);
    let last = ctx
        .gate_asked
        .lock()
        .ok()
        .and_then(|asked| asked.get(&object).copied());
    if let Some(answer) = gate::reuse(spec, previous, release, stage, last, now) {
        return answer;
    }
    let namespace = lp.namespace().unwrap_or_default();
    let remote = gate::fetch(&ctx.client, &namespace, spec)
        .await
        .map_err(|e| e.to_string());
    if let Ok(mut asked) = ctx.gate_asked.lock() {
        asked.insert(object, now);
    }
    gate::decide(remote, spec, release, stage, previous, now)
}

/// The engine paused or aborted because the gate said stop, not a person: say so in its
/// message and rollback reason, and leave the annotations alone (none was set).
fn explain_gate_stop(
    decision: &mut rollout::Decision,
    before: &rollout::State,
    why: &str,
    annotated: bool,
) {
    if !annotated {
        decision
            .actions
            .retain(|a| *a != rollout::Action::ClearAnnotations);
    }
    match decision.state.reason.clone() {
        Some(engine) if decision.state.reason != before.reason => {
            let ours = format!("aborted by the gate: {why}");
            decision.message = decision.message.replace(&engine, &ours);
            decision.state.reason = Some(ours);
        }
        _ => decision.message = format!("{} (gate: {why})", decision.message),
    }
}

async fn cleanup(lp: &LogPipeline, ctx: &Ctx) -> Result<Action, Error> {
    let key = Key::of(lp)?;
    apply::delete_cluster_scoped(&ctx.client, &key).await?;
    if let Ok(mut asked) = ctx.gate_asked.lock() {
        asked.remove(&ObjectRef::from(lp));
    }
    ctx.forget_applied(lp);
    tracing::info!(pipeline = %key.name, namespace = %key.namespace, "deleted cluster-scoped objects");
    Ok(Action::await_change())
}

fn now() -> Time {
    Time(Timestamp::now())
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
    let Some(writers) = ctx.writers.lock().ok().and_then(|mut w| w.take()) else {
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
            ("a moment later", t0 + ms(300), Some(ms(700))),
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

    #[test]
    fn gate_stage_table() {
        use gate::Stage::{Moving, Waiting};
        let pause = GateSpec {
            on_failure: GateFailureAction::Pause,
            ..serde_json::from_value(serde_json::json!({
                "clusterSecretRef": {"name": "ops", "key": "kubeconfig"},
                "namespace": "logging", "name": "logpipe",
            }))
            .unwrap()
        };
        let rollback = GateSpec {
            on_failure: GateFailureAction::Rollback,
            ..pause.clone()
        };
        let cases = [
            ("not gated", &pause, false, true, Some(Phase::Pending), None),
            (
                "a new release",
                &pause,
                true,
                true,
                Some(Phase::Healthy),
                Some(Waiting),
            ),
            (
                "held",
                &pause,
                true,
                true,
                Some(Phase::Pending),
                Some(Waiting),
            ),
            (
                "canary",
                &pause,
                true,
                false,
                Some(Phase::Canary),
                Some(Moving),
            ),
            ("step", &pause, true, false, Some(Phase::Step), Some(Moving)),
            (
                "paused",
                &pause,
                true,
                false,
                Some(Phase::Paused),
                Some(Moving),
            ),
            (
                "soak, pause: not watched",
                &pause,
                true,
                false,
                Some(Phase::Soak),
                None,
            ),
            (
                "soak, rollback",
                &rollback,
                true,
                false,
                Some(Phase::Soak),
                Some(Moving),
            ),
            (
                "rolling back",
                &rollback,
                true,
                false,
                Some(Phase::RollingBack),
                None,
            ),
            (
                "degraded",
                &rollback,
                true,
                false,
                Some(Phase::Degraded),
                None,
            ),
        ];
        for (name, spec, gated, waiting, phase, want) in cases {
            assert_eq!(gate_stage(spec, gated, waiting, phase), want, "{name}");
        }
    }

    #[test]
    fn a_gate_stop_says_so() {
        let before = rollout::State {
            phase: Some(Phase::Step),
            ..Default::default()
        };
        let engine = "aborted at step 1 (50%) (annotation logpipe.io/abort)";
        let mut aborted = rollout::Decision {
            state: rollout::State {
                phase: Some(Phase::RollingBack),
                reason: Some(engine.into()),
                ..Default::default()
            },
            template: rollout::Template::Stable,
            actions: vec![rollout::Action::ClearAnnotations],
            message: format!(
                "rolling back to revision r1: 2 nodes to move back, 3/5 Ready: {engine}"
            ),
            requeue: Duration::from_secs(2),
            store_unreachable: None,
        };
        explain_gate_stop(&mut aborted, &before, "ops turned Degraded", false);
        assert!(aborted.actions.is_empty(), "no annotation to clear");
        assert_eq!(
            aborted.state.reason.as_deref(),
            Some("aborted by the gate: ops turned Degraded")
        );
        assert!(
            aborted
                .message
                .ends_with("3/5 Ready: aborted by the gate: ops turned Degraded"),
            "{}",
            aborted.message
        );
        let mut paused = rollout::Decision {
            state: before.clone(),
            message: "paused at step 1 (50%): 3/5 nodes at revision r2".into(),
            actions: vec![rollout::Action::ClearAnnotations],
            ..aborted.clone()
        };
        explain_gate_stop(&mut paused, &before, "ops turned Degraded", true);
        assert_eq!(paused.actions, [rollout::Action::ClearAnnotations]);
        assert_eq!(
            paused.message,
            "paused at step 1 (50%): 3/5 nodes at revision r2 (gate: ops turned Degraded)"
        );
    }
}
