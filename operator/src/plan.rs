//! One reconcile as a pure function: what it saw ([`Snapshot`]: the caches, its own
//! memory, and the answers of the gate and the agents) in, what to do ([`Plan`]: objects
//! to apply, pods to delete, snapshot to save, ConfigMaps to drop, the status and its
//! Events) out.
//!
//! # Flow
//! `controller` observes the caches into a [`Snapshot`], asks the gate's cluster when
//! [`ask_gate`] says its last answer does not stand, then measures what [`asks`] names
//! (a step's stable baseline, its nodes' verification), and calls [`plan`], which calls
//! `gate::decide`, `verify::judge`, `rollout::step`, [`writes`] and `status::compute`.
//! `controller::execute` carries the [`Plan`] out in this order: apply (with
//! [`Writes::daemon_set`], only when [`Plan::apply`] says so), delete
//! [`Writes::delete_pods`] (sent off the reconcile, bounded concurrency), save [`Writes::save_stable`], clear the
//! annotations, delete [`Writes::delete_config_maps`], write the status, publish the
//! Events.
//!
//! # Guarantees
//! - The DaemonSet carries the target's template, or the saved stable one when the engine
//!   chose it and a snapshot exists, or nothing (held before any stable revision).
//! - A ConfigMap is deleted only when it is not the current config, not the stable one (the
//!   one being saved, else the saved one), and mounted by no pod in the cache.
//! - A Secret the pods or the gate need that is missing: the plan is that failure in the
//!   status and nothing else (no apply, no delete).
//! - Pods deleted by this plan, or by an earlier one the cache does not show yet, count
//!   as terminating in the status and for the rollout engine.
//!
//! # Caveats
//! - The gate's, the agents' and the store's answers are I/O: they come into the
//!   snapshot before [`plan`] runs, asked only when the pure [`ask_gate`] and [`asks`]
//!   say so. The agents and the store are measured in the background
//!   (`verify::background`): until their answer for the step is in, the step holds and
//!   the measurement wakes the next reconcile.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::apply::{self, Applied, StableSnapshot};
use crate::cache::NodeLabels;
use crate::crd::{GateFailureAction, GateSpec, GateStatus, LogPipeline, LogPipelineStatus, Phase};
use crate::desired::{Key, Objects};
use crate::events::{self, Transition};
use crate::gate;
use crate::rollout::{self, PodView, Template};
use crate::status::{self, Failure, FailureReason};
use crate::verify;

/// The two clocks of a reconcile: wall time for the rollout's timers and the status,
/// monotonic for the operator's own memory (when it last applied).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub wall: Timestamp,
    pub mono: Instant,
}

impl Now {
    pub fn current() -> Self {
        Self {
            wall: Timestamp::now(),
            mono: Instant::now(),
        }
    }
}

/// Everything one reconcile of a LogPipeline knows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub lp: Arc<LogPipeline>,
    pub key: Key,
    /// What the spec asks for (`desired::desired`, pure).
    pub objects: Objects,
    pub service_monitor_crd: bool,
    /// The stable revision, from its ConfigMap (the only place it is kept).
    pub stable: Option<StableSnapshot>,
    pub daemon_set: Option<Arc<DaemonSet>>,
    /// This LogPipeline's agent pods, sorted by name.
    pub pods: Vec<Arc<Pod>>,
    /// Pods this operator deleted that the pod cache does not show terminating yet.
    pub deleting: HashSet<String>,
    /// Node labels, filled only when a canary step selects nodes by labels.
    pub node_labels: NodeLabels,
    /// Names of this LogPipeline's ConfigMaps.
    pub config_maps: Vec<String>,
    /// What this operator last applied for it (`apply::Applied`).
    pub last_applied: Option<Applied>,
    /// When this operator last wrote its status.
    pub status_written: Option<Instant>,
    /// When this operator last asked the gate's cluster for it.
    pub gate_asked: Option<Timestamp>,
    /// The first Secret the pods (or the gate) need that is missing.
    pub missing_secret: Option<Failure>,
    /// Pods other LogPipelines ship too (`overlap`); `None` while not known yet.
    pub overlap: Option<crate::overlap::Overlap>,
    pub answers: Answers,
}

/// What was asked beyond the caches, because [`ask_gate`] or [`asks`] said so.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// The gate's cluster's LogPipeline, or why it could not be read.
    pub gate: Option<Result<Option<gate::Remote>, String>>,
    /// The step's stable agents (streams, lines read and dropped).
    pub baseline: Option<crate::crd::StreamBaseline>,
    /// The step's nodes' numbers, for [`Asks::verify`].
    pub measured: Option<verify::Measurements>,
}

/// What to measure before planning (see [`asks`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Asks {
    /// The stable pods to take the step's baseline from, and which step it is for.
    pub baseline: Option<(Vec<String>, verify::StepKey)>,
    /// The verification due, and which answer of the agents it needs.
    pub verify: Option<(rollout::VerifyRequest, verify::MeasureKey)>,
}

/// A verification that was judged, for the log and the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    pub step: usize,
    pub final_check: bool,
    pub passed: bool,
    pub summary: String,
    /// Also written into the status (`verify::worth_recording`).
    pub recorded: bool,
}

/// What one reconcile does.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `Some`: apply the objects (this digest); `None`: the last apply still holds.
    pub apply: Option<Applied>,
    pub writes: Writes,
    /// Written when it differs from the stored one and [`Plan::write_status`].
    pub status: LogPipelineStatus,
    /// Write the status now (see [`status_write`]); else it waits for a later plan.
    pub write_status: bool,
    /// Published once the status is written.
    pub events: Vec<Transition>,
    /// The reconcile fails with this (after writing it into the status).
    pub failure: Option<Failure>,
    pub judged: Option<Judged>,
    /// The gate's cluster was asked now: remember when.
    pub gate_asked: Option<Timestamp>,
    pub requeue: Duration,
}

/// What the rollout engine and the status see of the snapshot (pure).
struct Seen {
    state: rollout::State,
    views: Vec<PodView>,
    gated: bool,
    promote: bool,
    abort: bool,
    paused: bool,
    desired_nodes: i32,
    desired_known: bool,
}

impl Seen {
    fn of(snap: &Snapshot) -> Self {
        let lp = &snap.lp;
        let ds = snap.daemon_set.as_ref();
        let annotations = lp.annotations();
        // Counted for the DaemonSet's current spec; before that, 0 or a count being made.
        let desired_known = ds.is_some_and(|ds| {
            let observed = ds.status.as_ref().and_then(|s| s.observed_generation);
            observed.is_some() && observed >= ds.metadata.generation
        });
        let mut state = status::rollout_state(lp.status.as_ref());
        // The stable revision is the saved snapshot's: its ConfigMap is the one place it is
        // kept; `status.stableRevision` shows it and is never read back.
        state.stable = snap.stable.as_ref().map(|s| s.revision.clone());
        Self {
            state,
            views: snap
                .pods
                .iter()
                .map(|p| {
                    let mut view = crate::controller::pod_view(p);
                    view.terminating |= snap.deleting.contains(&view.name);
                    view
                })
                .collect(),
            gated: gated(snap),
            promote: annotations.contains_key(rollout::ANNOTATION_PROMOTE),
            abort: annotations.contains_key(rollout::ANNOTATION_ABORT),
            paused: lp.spec.rollout.paused,
            desired_nodes: ds
                .and_then(|ds| ds.status.as_ref())
                .map(|s| s.desired_number_scheduled)
                .unwrap_or(0),
            desired_known,
        }
    }

    fn observed<'a>(&'a self, snap: &'a Snapshot) -> rollout::Observed<'a> {
        let stable = snap.stable.as_ref();
        rollout::Observed {
            revision: &snap.objects.revision,
            pods: &self.views,
            desired_nodes: usize::try_from(self.desired_nodes).unwrap_or(0),
            desired_known: self.desired_known,
            node_labels: &snap.node_labels,
            gated: self.gated,
            stable_saved: stable.is_some(),
            saved_revision: stable.map(|s| s.revision.as_str()),
            paused: self.paused,
            promote: self.promote,
            abort: self.abort,
        }
    }

    /// The gate's verdict folded in: a stop while the release moves is the engine's own
    /// lever (its pause flag, or the abort path). Returns the waiting verdict and the stop.
    fn with_gate(&mut self, gate: Option<&GateAnswer>) -> (Option<rollout::Gate>, Option<String>) {
        let Some(answer) = gate else {
            return (None, None);
        };
        match (answer.stage, &answer.verdict) {
            (gate::Stage::Waiting, verdict) => (Some(verdict.waiting()), None),
            (gate::Stage::Moving, gate::Verdict::Stop(why)) => {
                match answer.on_failure {
                    GateFailureAction::Pause => self.paused = true,
                    GateFailureAction::Rollback => self.abort = true,
                }
                (None, Some(why.clone()))
            }
            (gate::Stage::Moving, _) => (None, None),
        }
    }
}

fn gated(snap: &Snapshot) -> bool {
    gates(&snap.lp, snap.stable.as_ref(), &snap.objects.release)
}

/// Pure: a gate applies to `release`: the LogPipeline has one and the stable release
/// differs (also what decides whether the gate's Secret is needed).
pub fn gates(lp: &LogPipeline, stable: Option<&StableSnapshot>, release: &str) -> bool {
    lp.spec.rollout.gate.is_some() && stable.map(|s| s.release.as_str()) != Some(release)
}

/// The gate's answer for this reconcile.
struct GateAnswer {
    stage: gate::Stage,
    on_failure: GateFailureAction,
    verdict: gate::Verdict,
    status: GateStatus,
}

/// The stage the gate watches the release at, if any (see [`gate_stage`]).
fn stage_of<'a>(snap: &'a Snapshot, seen: &Seen) -> Option<(&'a GateSpec, gate::Stage)> {
    let spec = snap.lp.spec.rollout.gate.as_ref()?;
    let state = &seen.state;
    let waiting = state.target.as_deref() != Some(snap.objects.revision.as_str())
        || state.phase == Some(Phase::Pending);
    Some((spec, gate_stage(spec, seen.gated, waiting, state.phase)?))
}

fn previous_gate(snap: &Snapshot) -> Option<&GateStatus> {
    snap.lp.status.as_ref().and_then(|s| s.gate.as_ref())
}

/// Pure: must the gate's cluster be asked now (its last answer does not stand)?
pub fn ask_gate(snap: &Snapshot, now: Timestamp) -> bool {
    let seen = Seen::of(snap);
    stage_of(snap, &seen).is_some_and(|(spec, stage)| {
        let release = &snap.objects.release;
        gate::reuse(
            spec,
            previous_gate(snap),
            release,
            stage,
            snap.gate_asked,
            now,
        )
        .is_none()
    })
}

/// The gate's verdict: its last answer while it stands, else what its cluster said.
fn gate_answer(snap: &Snapshot, seen: &Seen, now: Timestamp) -> Option<GateAnswer> {
    let (spec, stage) = stage_of(snap, seen)?;
    let (release, previous) = (&snap.objects.release, previous_gate(snap));
    let (verdict, status) = gate::reuse(spec, previous, release, stage, snap.gate_asked, now)
        .unwrap_or_else(|| {
            let remote = snap
                .answers
                .gate
                .clone()
                .unwrap_or_else(|| Err("not asked yet".into()));
            gate::decide(remote, spec, release, stage, previous, now)
        });
    Some(GateAnswer {
        stage,
        on_failure: spec.on_failure,
        verdict,
        status,
    })
}

/// Pure: what to measure before [`plan`], given the gate's answer in the snapshot.
pub fn asks(snap: &Snapshot, now: Timestamp) -> Asks {
    let spec = &snap.lp.spec.rollout;
    let mut seen = Seen::of(snap);
    let gate = gate_answer(snap, &seen, now);
    seen.with_gate(gate.as_ref());
    let observed = seen.observed(snap);
    let state = &seen.state;
    let step_key = |step: usize| verify::StepKey {
        pipeline: snap.lp.uid().unwrap_or_default(),
        revision: snap.objects.revision.clone(),
        step,
        started: state.step_started.map(|t| t.to_string()),
    };
    let baseline = match (rollout::baseline_due(spec, state, &observed), state.step) {
        (Some(names), Some(step)) => Some((names, step_key(step))),
        _ => None,
    };
    let verify = rollout::verification_due(spec, state, &observed, now).map(|request| {
        let key = verify::MeasureKey {
            step: step_key(request.step),
            final_check: request.final_check,
        };
        (request, key)
    });
    Asks { baseline, verify }
}

/// Pure: everything one reconcile does (see the module docs).
pub fn plan(snap: &Snapshot, now: Now) -> Plan {
    if let Some(failure) = &snap.missing_secret {
        return failed(&snap.lp, failure, now.wall);
    }
    let spec = &snap.lp.spec.rollout;
    let old = snap.lp.status.as_ref();
    let mut seen = Seen::of(snap);
    let gate = gate_answer(snap, &seen, now.wall);
    let (gate_verdict, gate_stop) = seen.with_gate(gate.as_ref());
    let observed = seen.observed(snap);
    let request = rollout::verification_due(spec, &seen.state, &observed, now.wall);
    let (verdict, judged, verification) = match (&request, &snap.answers.measured) {
        (Some(request), Some(measured)) => judge(snap, &seen, request, measured, now.wall),
        _ => (None, None, None),
    };
    let mut decision = rollout::step(
        spec,
        &seen.state,
        &observed,
        &rollout::Verdicts {
            gate: gate_verdict,
            verification: verdict,
            baseline: snap.answers.baseline.clone(),
        },
        now.wall,
    );
    if let Some(why) = &gate_stop {
        explain_gate_stop(&mut decision, &seen.state, why, seen.promote || seen.abort);
    }
    let pending = request.is_some() && snap.answers.measured.is_none();
    if pending {
        // The agents' answer is measured in the background and wakes the next reconcile
        // when it is in: looking sooner would only find it missing.
        decision.requeue = decision.requeue.max(verify::WINDOW_CHECK_SPACING);
    }
    let writes = writes(
        &snap.key,
        &snap.objects,
        snap.stable.as_ref(),
        &decision,
        &snap.pods,
        &snap.config_maps,
    );
    let applied = Applied::of(
        &snap.objects,
        writes.daemon_set.as_ref(),
        snap.service_monitor_crd,
    );
    let cached = snap.daemon_set.as_deref();
    let apply =
        (!applied.still_holds(snap.last_applied.as_ref(), cached, now.mono)).then_some(applied);
    let status = plan_status(snap, seen, &writes, &decision, verification, gate, now.wall);
    let (write_status, requeue) = match status_write(old, &status, snap.status_written, now.mono) {
        StatusWrite::Now => (true, decision.requeue),
        StatusWrite::After(wait) => (false, decision.requeue.min(wait)),
    };
    // Without the agents' answer the status would say less than the last answer did (a
    // step held on an unreachable store would read "verifying" until the answer is in):
    // while it is on its way and the rollout's state is unchanged, the status stays as
    // the last answer left it.
    let unchanged = status::rollout_state(Some(&status)) == status::rollout_state(old);
    let write_status = write_status && !(pending && unchanged);
    Plan {
        apply,
        events: events::transitions(old, &status),
        status,
        write_status,
        failure: None,
        judged,
        gate_asked: snap.answers.gate.is_some().then_some(now.wall),
        requeue,
        writes,
    }
}

/// At most one status write per this interval for a change of progress figures alone
/// (node counts, the messages that carry them): a 1,000-node rollout is a few dozen status
/// writes, not one per batch. Any other change is written at once.
pub const STATUS_PACE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// Write it now (or nothing changed: the write is skipped as equal).
    Now,
    /// Only progress figures changed, and the last write was less than [`STATUS_PACE`]
    /// ago: plan again after this.
    After(Duration),
}

/// Pure: when to write `new` over `old`, the last write having been at `written`.
pub fn status_write(
    old: Option<&LogPipelineStatus>,
    new: &LogPipelineStatus,
    written: Option<Instant>,
    now: Instant,
) -> StatusWrite {
    let since = written.map(|at| now.saturating_duration_since(at));
    match (old, since) {
        (Some(old), Some(since)) if since < STATUS_PACE && progress_only(old, new) => {
            StatusWrite::After(STATUS_PACE - since)
        }
        _ => StatusWrite::Now,
    }
}

/// Pure: `new` differs from `old` at most in its progress figures (and differs).
fn progress_only(old: &LogPipelineStatus, new: &LogPipelineStatus) -> bool {
    let mut n = new.clone();
    n.desired_nodes = old.desired_nodes;
    n.updated_nodes = old.updated_nodes;
    n.ready_nodes = old.ready_nodes;
    n.ready.clone_from(&old.ready);
    n.message.clone_from(&old.message);
    if n.conditions.len() == old.conditions.len() {
        for (c, o) in n.conditions.iter_mut().zip(&old.conditions) {
            if (&c.type_, &c.status, &c.reason) == (&o.type_, &o.status, &o.reason) {
                c.message.clone_from(&o.message);
                c.last_transition_time = o.last_transition_time.clone();
            }
        }
    }
    n == *old && new != old
}

/// The status after this plan: pods it deletes count as terminating.
fn plan_status(
    snap: &Snapshot,
    seen: Seen,
    writes: &Writes,
    decision: &rollout::Decision,
    verification: Option<crate::crd::Verification>,
    gate: Option<GateAnswer>,
    now: Timestamp,
) -> LogPipelineStatus {
    let objects = &snap.objects;
    let observed = status::Observed {
        generation: snap.lp.metadata.generation,
        desired_nodes: seen.desired_nodes,
        pods: seen
            .views
            .into_iter()
            .map(|mut p| {
                p.terminating |= writes.delete_pods.contains(&p.name);
                p
            })
            .collect(),
        target_revision: objects.revision.clone(),
        release: objects.release.clone(),
        config_map: objects.config_map.metadata.name.clone().unwrap_or_default(),
        paused: snap.lp.spec.rollout.paused,
        failure: decision
            .store_unreachable
            .as_ref()
            .map(|hold| Failure::new(FailureReason::StoreUnreachable, hold.clone())),
    };
    let record = status::Rollout {
        state: decision.state.clone(),
        message: decision.message.clone(),
        verification,
        // No stage to watch (the release is not gated, or is past the gate): the gate's
        // last answer stays, saying how the release got here.
        gate: gate.map(|g| g.status).or_else(|| {
            previous_gate(snap)
                .filter(|_| snap.lp.spec.rollout.gate.is_some())
                .cloned()
        }),
    };
    let old = snap.lp.status.as_ref();
    let mut status = status::compute(old, &observed, Some(&record), &Time(now));
    crate::overlap::annotate(&mut status, snap.overlap.clone(), old);
    status
}

/// The verdict on the step's nodes from what they said, and what of it is kept.
fn judge(
    snap: &Snapshot,
    seen: &Seen,
    request: &rollout::VerifyRequest,
    measured: &verify::Measurements,
    now: Timestamp,
) -> (
    Option<rollout::Verdict>,
    Option<Judged>,
    Option<crate::crd::Verification>,
) {
    let spec = &snap.lp.spec.rollout;
    let mut measured = measured.clone();
    let baseline = seen.state.stream_baseline.as_ref();
    measured.stream_baseline = baseline.map(|b| b.nodes.clone());
    measured.drop_baseline = baseline.map(|b| b.drops.clone());
    let step_views: Vec<&PodView> = seen
        .views
        .iter()
        .filter(|v| request.pods.contains(&v.name))
        .collect();
    let (checks, v) = verify::judge(&spec.verify, &step_views, &measured, request.final_check);
    let revision = &snap.objects.revision;
    let last = snap
        .lp
        .status
        .as_ref()
        .and_then(|s| s.last_verification.as_ref());
    let recorded = verify::worth_recording(&v, revision, request.step, last);
    let verification =
        recorded.then(|| verify::record(revision, request.step, checks, &v, &now.to_string()));
    let judged = Judged {
        step: request.step,
        final_check: request.final_check,
        passed: v.passed,
        summary: v.summary.clone(),
        recorded,
    };
    (Some(v), Some(judged), verification)
}

/// Pure: a reconcile that fails with `failure`: said in the status, nothing else moves.
/// Everything but the failure stays as the last successful reconcile left it (see
/// `status` on failures): the failed spec is not recorded as the target.
pub fn failed(lp: &LogPipeline, failure: &Failure, now: Timestamp) -> Plan {
    let old = lp.status.as_ref();
    let observed = status::Observed {
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
    let status = status::compute(old, &observed, None, &Time(now));
    Plan {
        apply: None,
        writes: Writes::default(),
        events: events::transitions(old, &status),
        status,
        write_status: true,
        failure: Some(failure.clone()),
        judged: None,
        gate_asked: None,
        requeue: Duration::ZERO,
    }
}

/// Where a gated release stands: waiting for the gate, or moving under its watch. With
/// `onFailure: pause` the watch ends at the soak (the engine cannot hold a soak).
pub fn gate_stage(
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

/// The engine paused or aborted because the gate said stop, not a person: say so in its
/// message and rollback reason, and leave the annotations alone (none was set).
pub fn explain_gate_stop(
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

/// Everything one reconcile writes besides the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Writes {
    /// The DaemonSet to apply; `None`: leave whatever runs alone.
    pub daemon_set: Option<DaemonSet>,
    pub delete_pods: Vec<String>,
    pub save_stable: Option<StableSnapshot>,
    pub clear_annotations: bool,
    pub delete_config_maps: Vec<String>,
}

/// Pure: the writes that carry out `decision` (see the module docs).
pub fn writes(
    key: &Key,
    objects: &Objects,
    stable: Option<&StableSnapshot>,
    decision: &rollout::Decision,
    pods: &[Arc<Pod>],
    config_maps: &[String],
) -> Writes {
    let daemon_set = match (decision.template, stable) {
        (Template::Target, _) | (Template::Stable, None) => Some(objects.daemon_set.clone()),
        (Template::Stable, Some(snapshot)) => Some(snapshot.apply_to(&objects.daemon_set)),
        // Held before its first stable revision: leave whatever runs alone.
        (Template::None, _) => None,
    };
    let mut out = Writes {
        daemon_set,
        ..Writes::default()
    };
    for action in &decision.actions {
        match action {
            rollout::Action::DeletePods(names) => out.delete_pods.extend(names.iter().cloned()),
            rollout::Action::SaveStable => out.save_stable = StableSnapshot::of(objects),
            rollout::Action::ClearAnnotations => out.clear_annotations = true,
        }
    }
    let mut used: Vec<String> = pods
        .iter()
        .flat_map(|p| apply::mounted_config_maps(p))
        .collect();
    used.extend(
        out.save_stable
            .as_ref()
            .or(stable)
            .map(|s| s.config_map.clone()),
    );
    let current = objects.config_map.metadata.name.clone().unwrap_or_default();
    out.delete_config_maps =
        apply::unused_config_maps(&key.config_map_prefix(), config_maps, &current, &used);
    out
}

/// Snapshots for the tests of `plan` and `controller::execute`.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// The reference pipeline (examples/ops.yaml), named `ops-...` objects in `loki-v3`.
    pub fn pipeline() -> LogPipeline {
        let text = include_str!("../../examples/ops.yaml");
        crate::render::parse_log_pipelines(text).unwrap().remove(0)
    }

    /// What a reconcile of `lp` sees in an empty cluster (no DaemonSet, no pods).
    pub fn snapshot(lp: LogPipeline) -> Snapshot {
        let ctx = crate::desired::Context {
            agent_image: "logpipe-agent:new".into(),
            service_monitor_crd: false,
            agent_cluster_role: crate::rbac::AGENT_CLUSTER_ROLE.into(),
        };
        Snapshot {
            key: Key::of(&lp).unwrap(),
            objects: crate::desired::desired(&lp, &ctx).unwrap(),
            lp: Arc::new(lp),
            service_monitor_crd: false,
            stable: None,
            daemon_set: None,
            pods: Vec::new(),
            deleting: HashSet::new(),
            node_labels: NodeLabels::new(),
            config_maps: Vec::new(),
            last_applied: None,
            status_written: None,
            gate_asked: None,
            missing_secret: None,
            overlap: Some(crate::overlap::Overlap::default()),
            answers: Answers::default(),
        }
    }

    /// An agent pod of the snapshot's pipeline on `node`, Ready, at `revision`.
    pub fn pod(name: &str, node: &str, revision: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "loki-v3", "uid": name,
                    "annotations": {crate::desired::ANNOTATION_REVISION: revision}},
                "spec": {"nodeName": node, "containers": []},
                "status": {"conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"}]},
            }))
            .unwrap(),
        )
    }

    /// A DaemonSet (as cached) wanting `nodes` agents, its status current.
    pub fn daemon_set(nodes: i32) -> Arc<DaemonSet> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "logpipe", "namespace": "loki-v3", "generation": 1},
                "status": {"desiredNumberScheduled": nodes, "observedGeneration": 1,
                    "currentNumberScheduled": nodes, "numberMisscheduled": 0,
                    "numberReady": nodes},
            }))
            .unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn objects() -> (Key, Objects) {
        let text = include_str!("../../examples/ops.yaml");
        let lp = crate::render::parse_log_pipelines(text).unwrap().remove(0);
        let ctx = crate::desired::Context {
            agent_image: "logpipe-agent:new".into(),
            service_monitor_crd: false,
            agent_cluster_role: crate::rbac::AGENT_CLUSTER_ROLE.into(),
        };
        (
            Key::of(&lp).unwrap(),
            crate::desired::desired(&lp, &ctx).unwrap(),
        )
    }

    fn decision(template: Template, actions: Vec<rollout::Action>) -> rollout::Decision {
        rollout::Decision {
            state: rollout::State::default(),
            template,
            actions,
            message: String::new(),
            requeue: Duration::from_secs(2),
            store_unreachable: None,
        }
    }

    fn pod_mounting(cm: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [], "volumes": [{"name": "c", "configMap": {"name": cm}}]},
            }))
            .unwrap(),
        )
    }

    fn image(ds: Option<&DaemonSet>) -> Option<String> {
        ds?.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()
    }

    #[test]
    fn writes_table() {
        let (key, objects) = objects();
        let current = objects.config_map.metadata.name.clone().unwrap();
        let prefix = key.config_map_prefix();
        let (old_cm, older_cm) = (format!("{prefix}old"), format!("{prefix}older"));
        let mut old_template = objects.daemon_set.spec.clone().unwrap().template;
        if let Some(spec) = old_template.spec.as_mut() {
            spec.containers[0].image = Some("logpipe-agent:old".into());
        }
        let stable = StableSnapshot {
            revision: "r1".into(),
            release: "old".into(),
            config_map: old_cm.clone(),
            template: old_template,
        };
        let cms = vec![current.clone(), old_cm.clone(), older_cm.clone()];
        let delete = rollout::Action::DeletePods(vec!["a".into(), "b".into()]);
        struct Case {
            name: &'static str,
            template: Template,
            actions: Vec<rollout::Action>,
            stable: Option<StableSnapshot>,
            pods: Vec<Arc<Pod>>,
            image: Option<&'static str>,
            deletes: usize,
            saves: bool,
            gc: Vec<String>,
        }
        let cases = [
            Case {
                name: "moving: the target's template, old configs unmounted go",
                template: Template::Target,
                actions: vec![delete.clone()],
                stable: Some(stable.clone()),
                pods: vec![],
                image: Some("logpipe-agent:new"),
                deletes: 2,
                saves: false,
                gc: vec![older_cm.clone()],
            },
            Case {
                name: "rolling back: the stable template",
                template: Template::Stable,
                actions: vec![delete.clone(), rollout::Action::ClearAnnotations],
                stable: Some(stable.clone()),
                pods: vec![pod_mounting(&older_cm)],
                image: Some("logpipe-agent:old"),
                deletes: 2,
                saves: false,
                gc: vec![],
            },
            Case {
                name: "stable asked for, none saved: the target's",
                template: Template::Stable,
                actions: vec![],
                stable: None,
                pods: vec![],
                image: Some("logpipe-agent:new"),
                deletes: 0,
                saves: false,
                gc: vec![old_cm.clone(), older_cm.clone()],
            },
            Case {
                name: "held before any stable revision: no DaemonSet",
                template: Template::None,
                actions: vec![],
                stable: None,
                pods: vec![pod_mounting(&old_cm)],
                image: None,
                deletes: 0,
                saves: false,
                gc: vec![older_cm.clone()],
            },
            Case {
                name: "healthy: the target becomes stable, the old stable's config goes",
                template: Template::Target,
                actions: vec![rollout::Action::SaveStable],
                stable: Some(stable.clone()),
                pods: vec![],
                image: Some("logpipe-agent:new"),
                deletes: 0,
                saves: true,
                gc: vec![old_cm.clone(), older_cm.clone()],
            },
        ];
        for c in cases {
            let w = writes(
                &key,
                &objects,
                c.stable.as_ref(),
                &decision(c.template, c.actions.clone()),
                &c.pods,
                &cms,
            );
            assert_eq!(
                image(w.daemon_set.as_ref()).as_deref(),
                c.image,
                "{}",
                c.name
            );
            assert_eq!(w.delete_pods.len(), c.deletes, "{}", c.name);
            assert_eq!(w.save_stable.is_some(), c.saves, "{}", c.name);
            assert_eq!(
                w.clear_annotations,
                c.actions.contains(&rollout::Action::ClearAnnotations),
                "{}",
                c.name
            );
            assert_eq!(w.delete_config_maps, c.gc, "{}", c.name);
        }
    }

    fn gate_spec() -> GateSpec {
        serde_json::from_value(serde_json::json!({
            "clusterSecretRef": {"name": "ops", "key": "kubeconfig"},
            "namespace": "logging", "name": "logpipe",
        }))
        .unwrap()
    }

    /// The glue's decisions: apply or not, a failure instead of a plan, pods deleted
    /// counted as terminating, the gate asked or not.
    #[test]
    fn plan_table() {
        use fixtures::{daemon_set, pipeline, pod, snapshot};
        let now = Now::current();
        let fresh = snapshot(pipeline());
        let target = fresh.objects.revision.clone();
        // What the first reconcile applies, remembered as this operator's last apply.
        let first = plan(&fresh, now);
        let remembered = first.apply.clone().unwrap().stored(None, now.mono);
        let secret = Failure::new(FailureReason::SecretMissing, "Secret loki-v3/ops missing");
        let mut gated = pipeline();
        gated.spec.rollout.gate = Some(gate_spec());
        struct Case {
            name: &'static str,
            snap: Snapshot,
            apply: bool,
            failure: Option<FailureReason>,
            terminating: i32,
            ask_gate: bool,
        }
        let cases = [
            Case {
                name: "first reconcile: everything applied",
                snap: fresh.clone(),
                apply: true,
                failure: None,
                terminating: 0,
                ask_gate: false,
            },
            Case {
                name: "the last apply stands: nothing applied",
                snap: Snapshot {
                    last_applied: Some(remembered.clone()),
                    ..fresh.clone()
                },
                apply: false,
                failure: None,
                terminating: 0,
                ask_gate: false,
            },
            Case {
                name: "someone changed the DaemonSet's spec: applied again",
                snap: Snapshot {
                    last_applied: Some(remembered.clone()),
                    daemon_set: Some(daemon_set(2)),
                    ..fresh.clone()
                },
                apply: true,
                failure: None,
                terminating: 0,
                ask_gate: false,
            },
            Case {
                name: "a missing Secret: the failure and nothing else",
                snap: Snapshot {
                    missing_secret: Some(secret.clone()),
                    ..fresh.clone()
                },
                apply: false,
                failure: Some(FailureReason::SecretMissing),
                terminating: 0,
                ask_gate: false,
            },
            Case {
                name: "a pod deleted earlier, not yet terminating in the cache, counts so",
                snap: Snapshot {
                    daemon_set: Some(daemon_set(2)),
                    pods: vec![pod("a", "n1", &target), pod("b", "n2", &target)],
                    deleting: HashSet::from(["a".to_string()]),
                    ..fresh.clone()
                },
                apply: true,
                failure: None,
                terminating: 1,
                ask_gate: false,
            },
            Case {
                name: "a gated release never asked about: ask its cluster",
                snap: snapshot(gated.clone()),
                apply: true,
                failure: None,
                terminating: 0,
                ask_gate: true,
            },
        ];
        for c in cases {
            let p = plan(&c.snap, now);
            assert_eq!(p.apply.is_some(), c.apply, "{}", c.name);
            assert_eq!(
                p.failure.as_ref().map(|f| f.reason),
                c.failure,
                "{}",
                c.name
            );
            if c.failure.is_some() {
                assert_eq!(p.writes, Writes::default(), "{}", c.name);
            }
            let ready = p.status.ready_nodes;
            let pods = i32::try_from(c.snap.pods.len()).unwrap();
            assert_eq!(pods - ready, c.terminating, "{}: ready {ready}", c.name);
            assert_eq!(ask_gate(&c.snap, now.wall), c.ask_gate, "{}", c.name);
        }
    }

    /// The overlap observed with other pipelines reaches the status; while it is not known
    /// yet (the watches have not listed), the status keeps what it said.
    #[test]
    fn overlap_reaches_the_status_and_an_unknown_one_keeps_the_last() {
        let now = Now::current();
        let mut snap = fixtures::snapshot(fixtures::pipeline());
        snap.overlap = Some(crate::overlap::Overlap {
            pods: 3,
            with: ["logging/teams".to_string()].into(),
        });
        let first = plan(&snap, now).status;
        assert_eq!(first.overlapping_pods, Some(3));
        assert_eq!(first.overlaps_with, vec!["logging/teams".to_string()]);
        let mut lp = (*snap.lp).clone();
        lp.status = Some(first);
        let unknown = Snapshot {
            lp: Arc::new(lp),
            overlap: None,
            ..snap.clone()
        };
        assert_eq!(plan(&unknown, now).status.overlapping_pods, Some(3));
        let gone = Snapshot {
            overlap: Some(crate::overlap::Overlap::default()),
            ..unknown
        };
        let status = plan(&gone, now).status;
        assert_eq!(status.overlapping_pods, None);
        assert!(status.overlaps_with.is_empty());
    }

    /// Past the gate (the stable release is the target's: nothing gated, no stage to
    /// watch), the gate's last answer stays in the status, and the gate is not asked.
    #[test]
    fn past_the_gate_its_last_answer_stays() {
        let now = Now::current();
        let mut lp = fixtures::pipeline();
        lp.spec.rollout.gate = Some(gate_spec());
        let mut snap = fixtures::snapshot(lp);
        let answered = GateStatus {
            pipeline: "ops/logging/logpipe".into(),
            release: snap.objects.release.clone(),
            open: true,
            opens_at: None,
            message: "ops/logging/logpipe is Healthy at this release".into(),
            checked_at: Some(now.wall.to_string()),
            stopped: false,
        };
        let mut lp = (*snap.lp).clone();
        lp.status = Some(LogPipelineStatus {
            gate: Some(answered.clone()),
            ..Default::default()
        });
        snap.lp = Arc::new(lp);
        snap.stable = Some(StableSnapshot {
            revision: snap.objects.revision.clone(),
            release: snap.objects.release.clone(),
            config_map: snap.objects.config_map.metadata.name.clone().unwrap(),
            template: snap.objects.daemon_set.spec.clone().unwrap().template,
        });
        assert!(!ask_gate(&snap, now.wall));
        assert_eq!(plan(&snap, now).status.gate, Some(answered));
    }

    /// A gated release: the gate's answer in the snapshot is what the plan goes by, and
    /// the ask is remembered; once remembered, the gate is not asked again.
    /// The final check of a step whose window ended: asked of the agents, judged only
    /// once their answer is in; until then the step holds and nothing looks again before
    /// the background measurement could be in.
    #[test]
    fn a_final_check_is_judged_only_with_its_answer() {
        use fixtures::{daemon_set, pipeline, pod, snapshot};
        let now = Now::current();
        let ago = |minutes: i64| {
            let t = now.wall - k8s_openapi::jiff::SignedDuration::from_mins(minutes);
            Timestamp::from_second(t.as_second()).unwrap().to_string()
        };
        let mut snap = snapshot(pipeline());
        let target = snap.objects.revision.clone();
        let mut lp = (*snap.lp).clone();
        lp.status = Some(LogPipelineStatus {
            phase: Some(Phase::Canary),
            target_revision: Some(target.clone()),
            stable_revision: Some("stable".into()),
            current_step: Some(0),
            step_started_at: Some(ago(5)),
            // The window (2m) ended a minute ago.
            window_started_at: Some(ago(3)),
            ..Default::default()
        });
        snap.lp = Arc::new(lp);
        snap.daemon_set = Some(daemon_set(1));
        snap.pods = vec![pod("a", "n1", &target)];
        let mut stable = StableSnapshot::of(&snap.objects).unwrap();
        stable.revision = "stable".into();
        snap.stable = Some(stable);

        let (request, key) = asks(&snap, now.wall).verify.expect("a verification is due");
        assert!(request.final_check && key.final_check);
        assert_eq!(request.pods, vec!["a".to_string()]);

        let waiting = plan(&snap, now);
        assert_eq!(waiting.judged, None, "no answer: nothing judged");
        assert!(!waiting.write_status, "nothing to say before the answer");
        assert_eq!(waiting.status.current_step, Some(0), "the step holds");
        assert!(waiting.requeue >= verify::WINDOW_CHECK_SPACING);

        snap.answers.measured = Some(verify::Measurements::default());
        let judged = plan(&snap, now).judged.expect("its answer is judged");
        assert!(judged.final_check);
    }

    /// The stable revision is the saved snapshot's (its ConfigMap), whatever the status
    /// says: the status shows it; with no snapshot saved, a Healthy revision saves one.
    #[test]
    fn the_stable_revision_is_the_saved_snapshots() {
        use fixtures::{daemon_set, pipeline, pod, snapshot};
        let now = Now::current();
        let mut snap = snapshot(pipeline());
        let target = snap.objects.revision.clone();
        let mut lp = (*snap.lp).clone();
        lp.status = Some(LogPipelineStatus {
            phase: Some(Phase::Healthy),
            target_revision: Some(target.clone()),
            stable_revision: Some("what-the-status-said".into()),
            ..Default::default()
        });
        snap.lp = Arc::new(lp);
        snap.daemon_set = Some(daemon_set(1));
        snap.pods = vec![pod("a", "n1", &target)];
        snap.stable = StableSnapshot::of(&snap.objects);
        let saved = plan(&snap, now);
        assert_eq!(
            saved.status.stable_revision.as_deref(),
            Some(target.as_str())
        );
        assert_eq!(saved.writes.save_stable, None, "saved already");

        snap.stable = None;
        let unsaved = plan(&snap, now);
        assert_eq!(
            unsaved.writes.save_stable.map(|s| s.revision),
            Some(target),
            "none saved: the Healthy revision is saved"
        );
    }

    #[test]
    fn the_gate_is_asked_once_per_poll() {
        let mut lp = fixtures::pipeline();
        lp.spec.rollout.gate = Some(gate_spec());
        let mut snap = fixtures::snapshot(lp);
        let now = Now::current();
        snap.answers.gate = Some(Err("cluster ops unreachable".into()));
        let p = plan(&snap, now);
        assert_eq!(p.gate_asked, Some(now.wall));
        let gate = p.status.gate.clone().expect("the gate's answer in status");
        assert!(!gate.open, "{gate:?}");
        let mut lp = (*snap.lp).clone();
        lp.status = Some(p.status);
        let again = Snapshot {
            lp: Arc::new(lp),
            gate_asked: p.gate_asked,
            answers: Answers::default(),
            ..snap
        };
        assert!(!ask_gate(&again, now.wall));
        assert_eq!(plan(&again, now).gate_asked, None);
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

    #[test]
    fn status_write_table() {
        use StatusWrite::{After, Now};
        let t0 = Instant::now();
        let s = |phase: Phase, ready: i32, message: &str| LogPipelineStatus {
            phase: Some(phase),
            ready_nodes: ready,
            message: Some(message.into()),
            ..Default::default()
        };
        let step = s(Phase::Step, 3, "step 1: 3/5 Ready");
        let more = s(Phase::Step, 4, "step 1: 4/5 Ready");
        let healthy = s(Phase::Healthy, 5, "healthy");
        let sec = Duration::from_secs;
        let cases = [
            ("first write", None, &more, None, t0, Now),
            (
                "never written by this process",
                Some(&step),
                &more,
                None,
                t0,
                Now,
            ),
            (
                "progress, just written: later",
                Some(&step),
                &more,
                Some(t0),
                t0 + sec(4),
                After(sec(6)),
            ),
            (
                "progress, a pace later",
                Some(&step),
                &more,
                Some(t0),
                t0 + STATUS_PACE,
                Now,
            ),
            (
                "a phase change: at once",
                Some(&more),
                &healthy,
                Some(t0),
                t0 + sec(1),
                Now,
            ),
            (
                "unchanged: nothing to defer",
                Some(&step),
                &step,
                Some(t0),
                t0,
                Now,
            ),
        ];
        for (name, old, new, written, now, want) in cases {
            assert_eq!(status_write(old, new, written, now), want, "{name}");
        }
    }
}
