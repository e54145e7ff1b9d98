//! The phased rollout engine: a pure state machine deciding which node moves when.
//!
//! ```text
//! Pending (gate) -> Canary -> verify -> Step k -> verify -> ... -> Soak -> Healthy
//!                      \ any verification fails, or logpipe.io/abort -> RollingBack -> Degraded
//! Healthy <-> Degraded (AgentsFailing): the stable revision's agents fail where they run
//! ```
//!
//! # Flow
//! The DaemonSet is `OnDelete`: a pod changes revision only when the operator deletes it.
//! Each reconcile the controller reads the [`State`] from the status, asks
//! [`verification_due`] whether the step's nodes must be checked now, runs the checks
//! (`verify`), asks the gate (`gate`) when one applies, then calls [`step`], which returns
//! the next state, the template the DaemonSet must carry ([`Template`]) and the
//! [`Action`]s (pods to delete, stable snapshot to save). The controller applies them and
//! writes the state back into the status.
//!
//! Steps: the effective steps are `spec.rollout.steps` plus a final 100% step when the last
//! one is not 100% (so every rollout ends with all nodes moved). Step k moves nodes until
//! its node count is reached (canary: a count or the nodes matching a selector; percent:
//! `ceil(p * nodes / 100)` of the nodes the DaemonSet should cover,
//! `desiredNumberScheduled`), waits for the new agents to be Ready, then watches them for
//! the step's window; only a passing final verification moves to the next step. After the
//! last step the revision soaks (`spec.rollout.soak`), then becomes stable (its pod
//! template is saved so it can be put back later).
//!
//! A step's window starts only when every node the step covers runs a Ready pod of the new
//! revision: nodes with no pod yet count as not moved, and nothing is counted before the
//! DaemonSet's status describes its current spec ([`Observed::desired_known`]), so a step
//! is never judged on the pods that happen to exist. A step fails when a new pod is not
//! Ready `rollout.progressDeadline` after it was created, or when nothing moved for that
//! long (a fatal waiting reason, `ErrImagePull` or `CrashLoopBackOff`, fails it at once:
//! `verify`).
//!
//! With a check that compares with the stable revision (`verify.maxStreamGrowth`, or
//! `verify.maxDropIncrease` below 100%, on by default), a step starts by scraping the
//! stable agents it is about to replace ([`baseline_due`], scraped by the controller, up
//! to [`BASELINE_NODES`] of them: active streams, lines read and dropped by pipeline
//! stages); [`step`] records them in the state, so in `status.streamBaseline`, and only
//! then deletes pods. It is written once, when the step starts, never during its window.
//!
//! A step whose only failed check is the store's, because the store could not be reached
//! at the end of the window ([`Verdict::store_unreachable`]), holds: it neither goes on
//! (nothing proves the logs arrived) nor rolls back (nothing says the revision is wrong),
//! asks again every 10 s, and says so ([`Decision::store_unreachable`], reported as
//! `StoreUnreachable`); `logpipe.io/promote` goes on without it.
//!
//! A Healthy revision stays watched: when an agent at the stable revision waits on an
//! image or container error (`ImagePullBackOff`...: see [`FATAL_WAITING`]) or is in a
//! crash loop ([`CRASH_LOOP_RESTARTS`] restarts, the last failed run less than
//! [`CRASH_LOOP_RECENT`] ago; one crash is not a loop, and a pod that is merely not Ready
//! is node or store trouble, not the revision), the LogPipeline turns Degraded on that
//! revision with the agents' last words (`status::AGENTS_FAILING`). Nothing moves, there is nothing to roll back to; a gate
//! downstream sees a release Degraded where it runs and stops it there. It is Healthy
//! again once no agent fails.
//!
//! Manual control (annotations on the LogPipeline, removed by the operator once acted on):
//! - `logpipe.io/promote`: skip what the rollout waits for now (the gate, the rest of a
//!   step's window, the soak); on a Degraded LogPipeline, try the failed revision again.
//! - `logpipe.io/abort`: roll back to the stable revision now (then Degraded, reason
//!   `aborted`).
//! - `spec.rollout.paused: true`: nothing moves (pods already moved stay) until false.
//!
//! # Guarantees
//! - Never more than `maxUnavailable` nodes without a Ready agent because of the operator:
//!   a node whose pod is not Ready, terminating or missing counts against the budget, once
//!   (as the DaemonSet controller counts); a pod that is not Ready anyway is replaced for
//!   free.
//! - Every decision depends only on the status, the spec and the cluster: an operator
//!   restarted at any moment resumes at the same step (timers are timestamps in status).
//! - A new revision arriving mid-rollout starts over at the canary (or the gate); pods of
//!   the superseded revision are not stable: they move in the new steps, or back to the
//!   stable revision on rollback.
//! - A failed verification or an abort puts the stable pod template back and moves every
//!   pod that is not at the stable revision back, within the same budget.
//!
//! # Assumptions
//! - The stable revision's pod template and ConfigMap still exist (apply keeps both).
//!
//! # Caveats
//! - A pod deleted by someone else (drain, eviction), or a new node, gets the DaemonSet's
//!   current template at once: the DaemonSet controller, not the operator, creates pods.
//! - A first install has nothing to roll back to: the DaemonSet creates every pod at once
//!   and the install is verified as one 100% step; a failure is reported (Degraded).
//! - The baseline is a sample on a large step (the first [`BASELINE_NODES`] stable
//!   agents in the step's order): `streamGrowth` and `pipelineDrops` compare those nodes
//!   only. `logpipe_active_streams` counts the last 5 minutes: a new agent watched for a
//!   shorter window shows fewer streams than it will have, so `streamGrowth` errs towards
//!   passing, never towards a false failure.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crd::{Phase, RolloutSpec, StreamBaseline};

/// Annotation: skip the current wait (see the module doc).
pub const ANNOTATION_PROMOTE: &str = "logpipe.io/promote";
/// Annotation: roll back now.
pub const ANNOTATION_ABORT: &str = "logpipe.io/abort";
/// Most stable agents whose active streams are measured when a step starts: enough to see
/// a label that multiplies the streams, small enough for the status of a 5,000-node step.
pub const BASELINE_NODES: usize = 50;

/// What the engine needs to know about one agent pod.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodView {
    pub name: String,
    pub node: Option<String>,
    /// `logpipe.io/revision` of the pod (absent on pods from another operator version).
    pub revision: Option<String>,
    pub ready: bool,
    /// The agent's own readiness probe passes (`ContainersReady`). `Ready` also drops when
    /// the node is NotReady (the node lifecycle controller): that holds moves back, but
    /// says nothing about the revision being verified.
    pub containers_ready: bool,
    /// Has a deletionTimestamp (terminating).
    pub terminating: bool,
    /// Restarts of the agent container.
    pub restarts: i32,
    /// Why the container waits (`ErrImagePull`, `CrashLoopBackOff`...), if it does.
    pub waiting_reason: Option<String>,
    pub created: Option<Timestamp>,
    /// The agent's last words when its last run failed: the container's termination
    /// message (its fatal error, or the end of its log).
    pub termination_message: Option<String>,
    /// When that failed run ended.
    pub last_failure: Option<Timestamp>,
}

/// Restarts that make a stable agent's crashes a crash loop (see `Engine::failing`).
pub const CRASH_LOOP_RESTARTS: i32 = 3;
/// A container running again, not Ready, after a failed run that ended this recently is
/// still in its crash loop (a kubelet's back-off reaches 5 minutes).
pub const CRASH_LOOP_RECENT: Duration = Duration::from_secs(600);

/// Waiting reasons that mean the agent will not run without a change.
pub const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

impl PodView {
    fn at(&self, revision: &str) -> bool {
        self.revision.as_deref() == Some(revision)
    }

    /// `CrashLoopBackOff on n1: agent exited: <its last words>` when the agent waits for
    /// a reason that will not pass by itself; `None` otherwise.
    pub fn failure(&self) -> Option<String> {
        let reason = self.waiting_reason.as_deref()?;
        FATAL_WAITING
            .contains(&reason)
            .then(|| self.describe(reason))
    }

    /// A stable agent failing where it runs, at `now`: waiting on an image or container
    /// error, or in a crash loop (at least [`CRASH_LOOP_RESTARTS`] restarts, and waiting
    /// in its back-off or running again, not Ready, after a failed run that ended less
    /// than [`CRASH_LOOP_RECENT`] ago). One crash (an OOM kill) is no crash loop, nor is
    /// a pod that crashed long ago and is not Ready now (its store is away).
    fn failing_at(&self, now: Timestamp) -> Option<String> {
        let looping = self.restarts >= CRASH_LOOP_RESTARTS;
        match self.waiting_reason.as_deref() {
            Some("CrashLoopBackOff") => return looping.then(|| self.describe("CrashLoopBackOff")),
            Some(reason) if FATAL_WAITING.contains(&reason) => return self.failure(),
            _ => {}
        }
        let recent = self
            .last_failure
            .is_some_and(|t| elapsed(Some(t), now) <= CRASH_LOOP_RECENT);
        (looping && recent && !self.containers_ready).then(|| self.describe("restarting"))
    }

    /// `<reason> on <node>: agent exited: <the last line of its termination message>`.
    fn describe(&self, reason: &str) -> String {
        let node = self.node_name();
        let words = self
            .termination_message
            .as_deref()
            .and_then(|m| m.lines().rev().map(str::trim).find(|l| !l.is_empty()));
        match words {
            Some(w) => format!(
                "{reason} on {node}: agent exited: {}",
                w.chars().take(300).collect::<String>()
            ),
            None => format!("{reason} on {node}"),
        }
    }

    fn node_name(&self) -> &str {
        self.node.as_deref().unwrap_or(&self.name)
    }
}

/// One effective step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A node count (cumulative: nodes at the new revision after the step).
    CanaryNodes(usize),
    /// The nodes with these labels.
    CanarySelector(BTreeMap<String, String>),
    /// This share of the nodes.
    Percent(u32),
}

/// The steps a rollout goes through: the spec's, then 100% if the last is not.
pub fn plan_steps(spec: &RolloutSpec) -> Vec<StepKind> {
    let mut steps: Vec<StepKind> = spec
        .steps
        .iter()
        .filter_map(|s| match (&s.canary, s.percent) {
            (Some(c), _) => match (&c.nodes, &c.node_selector) {
                (Some(n), _) => Some(StepKind::CanaryNodes(usize::try_from(*n).unwrap_or(1))),
                (None, Some(sel)) => Some(StepKind::CanarySelector(sel.clone())),
                (None, None) => None,
            },
            (None, Some(p)) => Some(StepKind::Percent(
                u32::try_from(p.clamp(1, 100)).unwrap_or(100),
            )),
            (None, None) => None,
        })
        .collect();
    if steps.last() != Some(&StepKind::Percent(100)) {
        steps.push(StepKind::Percent(100));
    }
    steps
}

/// Verification window of step `index` (its own, else `rollout.verify.window`).
pub fn window(spec: &RolloutSpec, index: usize) -> Duration {
    spec.steps
        .get(index)
        .and_then(|s| s.window)
        .unwrap_or(spec.verify.window)
        .0
}

/// A short name for messages: `canary`, `step 2 (50%)`, `soak`.
pub fn step_name(steps: &[StepKind], index: usize) -> String {
    match steps.get(index) {
        Some(StepKind::CanaryNodes(_) | StepKind::CanarySelector(_)) => "canary".into(),
        Some(StepKind::Percent(p)) => format!("step {index} ({p}%)"),
        None => "soak".into(),
    }
}

fn phase_of(steps: &[StepKind], index: usize) -> Phase {
    match steps.get(index) {
        Some(StepKind::CanaryNodes(_) | StepKind::CanarySelector(_)) => Phase::Canary,
        Some(StepKind::Percent(_)) => Phase::Step,
        None => Phase::Soak,
    }
}

pub use crate::crd::RollbackCause;

/// The rollout's memory, kept in the status (see `status::rollout_state`).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct State {
    pub phase: Option<Phase>,
    /// Revision being rolled out (or rolled back from, when Degraded).
    pub target: Option<String>,
    /// The stable revision: the saved snapshot's (the `<name>-stable` ConfigMap, its one
    /// source), not read from the status, which only shows it.
    pub stable: Option<String>,
    /// Index in [`plan_steps`]; `steps.len()` while soaking.
    pub step: Option<usize>,
    pub step_started: Option<Timestamp>,
    pub window_started: Option<Timestamp>,
    pub failed: Option<String>,
    pub reason: Option<String>,
    /// Why `failed` failed, typed (the `Degraded` condition's reason); `reason` says it
    /// in words, with the numbers.
    pub cause: Option<RollbackCause>,
    /// What the stable agents the current step replaced said before they moved (active
    /// streams, lines read and dropped).
    pub stream_baseline: Option<StreamBaseline>,
}

impl State {
    /// Degraded on the stable revision itself: its agents fail where they run (see
    /// `Engine::failing`), not a new revision rolled back.
    pub fn settled_failure(&self) -> bool {
        self.phase == Some(Phase::Degraded)
            && self.failed.is_some()
            && self.failed == self.stable
            && self.failed == self.target
    }
}

/// What the controller saw for one LogPipeline.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The revision the spec asks for.
    pub revision: &'a str,
    pub pods: &'a [PodView],
    /// Nodes that should run an agent (`desiredNumberScheduled`).
    pub desired_nodes: usize,
    /// The DaemonSet's status describes its current spec (`observedGeneration`):
    /// `desired_nodes` is the count for it, not 0 or a count still being made.
    pub desired_known: bool,
    /// Labels of the nodes (filled only when a canary step selects nodes by labels).
    pub node_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// A promotion gate applies: the target's release differs from the stable one.
    pub gated: bool,
    /// The stable revision's pod template is saved (a rollback is possible).
    pub stable_saved: bool,
    /// Revision of the saved stable template.
    pub saved_revision: Option<&'a str>,
    pub paused: bool,
    pub promote: bool,
    pub abort: bool,
}

/// Answer of the promotion gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    Held(String),
}

/// Result of verifying the current step's nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// End of the window (every check counts) or a check during it (only checks that
    /// can already fail: restarts, send errors, dropped entries, memory).
    pub final_check: bool,
    pub passed: bool,
    /// The failed checks with their numbers.
    pub summary: String,
    /// At the end of a window, the only check that failed is the store's, because the
    /// store could not be asked (its error): the step holds, it does not roll back.
    pub store_unreachable: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Verdicts {
    pub gate: Option<Gate>,
    pub verification: Option<Verdict>,
    /// What the stable agents said (active streams, lines read and dropped), measured
    /// because [`baseline_due`] asked.
    pub baseline: Option<StreamBaseline>,
}

/// Which pod template the DaemonSet must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    Target,
    Stable,
    /// Not even a DaemonSet: a first install held by its gate.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    DeletePods(Vec<String>),
    /// Save the target's pod template as the stable one.
    SaveStable,
    /// Remove the promote/abort annotations (they were acted on).
    ClearAnnotations,
}

/// Everything [`step`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub state: State,
    pub template: Template,
    pub actions: Vec<Action>,
    /// One line a person can act on, with the numbers.
    pub message: String,
    /// When to look again.
    pub requeue: Duration,
    /// The step holds because the store cannot be asked (the hold's message): the
    /// status reports it as a failure (`StoreUnreachable`).
    pub store_unreachable: Option<String>,
}

/// Nodes to check now, when due: a step's moved nodes during and at the end of its
/// window, every moved node while soaking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyRequest {
    pub pods: Vec<String>,
    pub final_check: bool,
    pub step: usize,
    pub window: Duration,
}

const ACTIVE_REQUEUE: Duration = Duration::from_secs(2);
/// How often a step held on an unreachable store asks it again.
const STORE_RETRY: Duration = Duration::from_secs(10);
const GATE_REQUEUE: Duration = Duration::from_secs(10);
const SETTLED_REQUEUE: Duration = Duration::from_secs(300);

fn elapsed(since: Option<Timestamp>, now: Timestamp) -> Duration {
    since
        .map(|s| now.as_millisecond().saturating_sub(s.as_millisecond()))
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// When something that started at `start` and lasts `length` ends, RFC 3339 to the second.
pub fn ends_at(start: Option<Timestamp>, length: Duration) -> String {
    let start = start.map_or(0, |s| s.as_second());
    let end = start.saturating_add(i64::try_from(length.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(end).map_or_else(|_| "?".to_string(), |t| t.to_string())
}

/// `1m30s`-style rendering for messages.
pub fn human(d: Duration) -> String {
    logpipe_api::config::HumanDuration(Duration::from_secs(d.as_secs())).to_string()
}

/// At most 5 names, then how many more: a message stays one line on 5,000 nodes.
pub fn few(names: &[String]) -> String {
    match names.len() {
        0..=5 => names.join(", "),
        n => format!("{} and {} more", names[..5].join(", "), n - 5),
    }
}

fn live(pods: &[PodView]) -> impl Iterator<Item = &PodView> {
    pods.iter().filter(|p| !p.terminating)
}

/// The step's node set: the first `want` nodes in rollout order, one pod each (the live
/// one, else the terminating one). Order: pods already at the target (never move a node
/// twice), then terminating pods (their node is being moved: the DaemonSet recreates
/// them from the target template), then nodes a canary selector picks, then pods of a
/// superseded revision (already off stable), then by node name (stable and reviewable).
/// A node with no pod at all (deleted, not yet recreated) takes a place too: without
/// that, a step would pick one more node while a moved one is in transition.
fn step_set<'a>(
    steps: &[StepKind],
    index: usize,
    obs: &Observed<'a>,
    target: &str,
    stable: Option<&str>,
) -> (Vec<&'a PodView>, usize) {
    let selectors: Vec<&BTreeMap<String, String>> = steps
        .iter()
        .take(index + 1)
        .filter_map(|s| match s {
            StepKind::CanarySelector(sel) => Some(sel),
            _ => None,
        })
        .collect();
    let selected = |p: &PodView| {
        let labels = obs.node_labels.get(p.node_name());
        selectors
            .iter()
            .any(|sel| labels.is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v))))
    };
    let live_nodes: std::collections::BTreeSet<&str> =
        live(obs.pods).map(PodView::node_name).collect();
    let mut order: Vec<&PodView> = obs
        .pods
        .iter()
        .filter(|p| !p.terminating || !live_nodes.contains(p.node_name()))
        .collect();
    order.sort_by_key(|p| {
        (
            !p.at(target),
            !p.terminating,
            !selected(p),
            stable.is_none_or(|s| p.at(s)),
            p.node_name().to_string(),
        )
    });
    let mut seen = std::collections::BTreeSet::new();
    order.retain(|p| seen.insert(p.node_name()));
    let total = order.len();
    let base = obs.desired_nodes.max(total);
    let mut want = 0usize;
    for step in steps.iter().take(index + 1) {
        let n = match step {
            StepKind::CanaryNodes(n) => *n,
            StepKind::CanarySelector(_) => order.iter().filter(|p| selected(p)).count(),
            StepKind::Percent(p) => (base * (*p as usize)).div_ceil(100),
        };
        want = want.max(n);
    }
    // Missing pods count as not moved: a step waits for them (or fails at its deadline).
    let want = want.min(base).max(usize::from(base > 0));
    order.truncate(want.saturating_sub(base - total));
    (order, want)
}

/// Pods to delete now among `candidates`, within the unavailability budget. Not-Ready
/// candidates cost nothing (they are down anyway); by name for a reviewable order.
fn budgeted(candidates: &[&PodView], obs: &Observed, max_unavailable: i32) -> Vec<String> {
    let budget = usize::try_from(max_unavailable.max(1)).unwrap_or(1);
    let mut not_ready: Vec<&&PodView> = candidates.iter().filter(|p| !p.ready).collect();
    let mut ready: Vec<&&PodView> = candidates.iter().filter(|p| p.ready).collect();
    not_ready.sort_by(|a, b| a.name.cmp(&b.name));
    ready.sort_by(|a, b| a.name.cmp(&b.name));
    let room = budget.saturating_sub(unavailable_nodes(obs));
    not_ready
        .iter()
        .map(|p| p.name.clone())
        .chain(ready.iter().take(room).map(|p| p.name.clone()))
        .collect()
}

/// Nodes with no live Ready agent: its pod is not Ready, terminating or missing. A node
/// counts once, as the DaemonSet controller counts it: a pod terminating while its node
/// has no replacement yet is one node down, not two (counted twice, the budget was half
/// used by nodes in transition, and a 1,000-node rollout moved half as fast).
fn unavailable_nodes(obs: &Observed) -> usize {
    let available: std::collections::BTreeSet<&str> = live(obs.pods)
        .filter(|p| p.ready)
        .map(PodView::node_name)
        .collect();
    let nodes = obs.desired_nodes.max(
        obs.pods
            .iter()
            .map(PodView::node_name)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
    );
    nodes.saturating_sub(available.len())
}

/// The pods a verification looks at: those of the step moved during the step (created
/// since it started); all moved ones if none (a first install, a step with nothing new).
fn step_pods(set: &[&PodView], target: &str, started: Option<Timestamp>) -> Vec<String> {
    let moved: Vec<&&PodView> = set.iter().filter(|p| p.at(target)).collect();
    let started_s = started.map(|t| t.as_second());
    let fresh: Vec<String> = moved
        .iter()
        .filter(|p| match (p.created, started_s) {
            (Some(c), Some(s)) => c.as_second() >= s,
            _ => false,
        })
        .map(|p| p.name.clone())
        .collect();
    if fresh.is_empty() {
        moved.iter().map(|p| p.name.clone()).collect()
    } else {
        fresh
    }
}

/// The stable pods of a set scraped for the baseline (Ready ones: the others
/// cannot be scraped), in the step's order.
fn baseline_pods(set: &[&PodView], stable: &str) -> Vec<String> {
    set.iter()
        .filter(|p| p.at(stable) && !p.terminating && p.ready)
        .take(BASELINE_NODES)
        .map(|p| p.name.clone())
        .collect()
}

/// Must the stable pods of the current step be scraped for the baseline now
/// (pure; called before [`step`])? Once per step, when it starts, before any of them
/// moves: a check that compares with the stable revision on (`verify.maxStreamGrowth`,
/// `verify.maxDropIncrease` below 100%: see `VerifySpec::needs_baseline`), a stable
/// revision to compare with, no baseline recorded for this step. The pods to scrape; the
/// controller passes what they said in [`Verdicts::baseline`] (an empty map when none
/// answered), and [`step`] holds the step's moves until it has it.
pub fn baseline_due(spec: &RolloutSpec, state: &State, obs: &Observed) -> Option<Vec<String>> {
    if !spec.verify.needs_baseline() || obs.paused || obs.abort || !obs.desired_known {
        return None;
    }
    let target = state.target.as_deref().filter(|t| *t == obs.revision)?;
    let stable = state.stable.as_deref()?;
    let index = state.step?;
    let steps = plan_steps(spec);
    if !matches!(state.phase?, Phase::Canary | Phase::Step)
        || index >= steps.len()
        || has_baseline(state, index)
    {
        return None;
    }
    let (set, _) = step_set(&steps, index, obs, target, Some(stable));
    let pods = baseline_pods(&set, stable);
    (!pods.is_empty()).then_some(pods)
}

fn has_baseline(state: &State, index: usize) -> bool {
    state
        .stream_baseline
        .as_ref()
        .is_some_and(|b| usize::try_from(b.step).ok() == Some(index))
}

/// Is a verification of the current step due now (pure; called before [`step`])?
pub fn verification_due(
    spec: &RolloutSpec,
    state: &State,
    obs: &Observed,
    now: Timestamp,
) -> Option<VerifyRequest> {
    if obs.paused || obs.abort {
        return None;
    }
    let target = state.target.as_deref()?;
    if target != obs.revision {
        return None;
    }
    let steps = plan_steps(spec);
    let index = state.step?;
    let pods = match state.phase? {
        Phase::Canary | Phase::Step if index < steps.len() => {
            let (set, _) = step_set(&steps, index, obs, target, state.stable.as_deref());
            step_pods(&set, target, state.step_started)
        }
        Phase::Soak => live(obs.pods)
            .filter(|p| p.at(target))
            .map(|p| p.name.clone())
            .collect(),
        _ => return None,
    };
    if pods.is_empty() {
        return None;
    }
    let window = window(spec, index);
    let final_check = index < steps.len()
        && state.window_started.is_some()
        && elapsed(state.window_started, now) >= window;
    Some(VerifyRequest {
        pods,
        final_check,
        step: index,
        window,
    })
}

/// The next state and what to do, from the current state, the spec, what was observed
/// and the verdicts of the checks and the gate.
pub fn step(
    spec: &RolloutSpec,
    state: &State,
    obs: &Observed,
    verdicts: &Verdicts,
    now: Timestamp,
) -> Decision {
    let mut st = state.clone();
    let mut actions = Vec::new();
    if obs.promote || obs.abort {
        actions.push(Action::ClearAnnotations);
    }
    let steps = plan_steps(spec);
    let target = obs.revision.to_string();
    let mut verification = verdicts.verification.clone();
    let mut promote = obs.promote;

    if st.target.as_deref() != Some(target.as_str()) {
        // A new revision: start over (a rollout in progress is superseded).
        st.target = Some(target.clone());
        st.failed = None;
        st.reason = None;
        st.cause = None;
        st.window_started = None;
        st.step_started = Some(now);
        st.stream_baseline = None;
        // A verdict or a promotion was about the previous revision.
        verification = None;
        promote = false;
        if st.stable.as_deref() == Some(target.as_str()) {
            st.phase = Some(Phase::Progressing);
            st.step = None;
        } else if st.stable.is_none() && !obs.gated {
            st.phase = Some(Phase::Step);
            st.step = Some(steps.len() - 1);
        } else {
            st.phase = Some(Phase::Pending);
            st.step = Some(0);
        }
    }

    let ctx = Engine {
        spec,
        steps: &steps,
        obs,
        now,
        target: &target,
        baseline: verdicts.baseline.as_ref(),
    };
    let mut decision = match st.phase.unwrap_or(Phase::Pending) {
        Phase::Pending => ctx.pending(st, verdicts.gate.as_ref(), promote),
        Phase::Canary | Phase::Step | Phase::Soak | Phase::Paused => {
            ctx.progress(st, verification.as_ref(), promote)
        }
        Phase::RollingBack => ctx.rollback(st),
        Phase::Degraded => ctx.degraded(st, promote),
        Phase::Healthy | Phase::Progressing => ctx.converge(st),
    };
    actions.append(&mut decision.actions);
    decision.actions = actions;
    decision
}

struct Engine<'a, 'b> {
    spec: &'a RolloutSpec,
    steps: &'a [StepKind],
    obs: &'a Observed<'b>,
    now: Timestamp,
    target: &'a str,
    baseline: Option<&'a StreamBaseline>,
}

impl Engine<'_, '_> {
    fn decision(
        &self,
        state: State,
        template: Template,
        actions: Vec<Action>,
        message: String,
    ) -> Decision {
        let requeue = match state.phase {
            Some(Phase::Healthy | Phase::Degraded) => SETTLED_REQUEUE,
            Some(Phase::Pending) => GATE_REQUEUE,
            Some(Phase::Paused) => GATE_REQUEUE,
            _ => ACTIVE_REQUEUE,
        };
        Decision {
            state,
            template,
            actions,
            message,
            requeue,
            store_unreachable: None,
        }
    }

    /// The message of a Healthy pipeline, whichever reconcile writes it.
    fn healthy_message(&self) -> String {
        let desired = self.obs.desired_nodes;
        if desired == 0 {
            return "no node matches the agent's scheduling constraints".to_string();
        }
        let ready = live(self.obs.pods)
            .filter(|p| p.at(self.target) && p.ready)
            .count();
        format!("{ready}/{desired} agents ready at revision {}", self.target)
    }

    fn at_target(&self) -> usize {
        live(self.obs.pods).filter(|p| p.at(self.target)).count()
    }

    fn pending(&self, mut st: State, gate: Option<&Gate>, promote: bool) -> Decision {
        let held = match (self.obs.gated, gate) {
            (false, _) | (true, Some(Gate::Open)) => None,
            (true, Some(Gate::Held(why))) => Some(why.clone()),
            (true, None) => Some("waiting for the promotion gate".to_string()),
        };
        match held {
            Some(why) if !promote => {
                let template = if st.stable.is_some() {
                    Template::Stable
                } else {
                    Template::None
                };
                self.decision(
                    st,
                    template,
                    Vec::new(),
                    format!("revision {} held: {why}", self.target),
                )
            }
            _ => {
                // A first install has no canary: the DaemonSet creates every pod at once,
                // verified as one 100% step.
                let first = if st.stable.is_none() {
                    self.steps.len() - 1
                } else {
                    0
                };
                self.start_step(&mut st, first);
                self.progress(st, None, false)
            }
        }
    }

    fn start_step(&self, st: &mut State, index: usize) {
        st.step = Some(index);
        st.phase = Some(phase_of(self.steps, index));
        st.step_started = Some(self.now);
        st.window_started = None;
        if index < self.steps.len() {
            // The soak keeps the last step's: the nodes it compares are the same.
            st.stream_baseline = None;
        }
    }

    /// Why the step fails for want of progress, if it does: a new pod not Ready
    /// `progressDeadline` after it was created (by the agent's own readiness: a NotReady
    /// node is not the revision's fault), or nothing moved for that long.
    fn stalled(&self, st: &State, set: &[&PodView], want: usize, ready: usize) -> Option<String> {
        let deadline = self.spec.progress_deadline.0;
        let new: Vec<&PodView> = set
            .iter()
            .copied()
            .filter(|p| p.at(self.target) && !p.terminating)
            .collect();
        let late: Vec<String> = new
            .iter()
            .filter(|p| !p.ready && !p.containers_ready && elapsed(p.created, self.now) > deadline)
            .map(|p| format!("{} on {}", p.name, p.node_name()))
            .collect();
        if !late.is_empty() {
            return Some(format!(
                "{ready}/{want} new agents Ready; not Ready {} after they started: {}",
                human(deadline),
                few(&late)
            ));
        }
        let last_move = new
            .iter()
            .filter_map(|p| p.created)
            .chain(st.step_started)
            .max();
        if elapsed(last_move, self.now) <= deadline {
            return None;
        }
        let mut why = vec![format!(
            "{ready}/{want} new agents Ready, nothing moved for {}",
            human(deadline)
        )];
        let not_ready: Vec<String> = new
            .iter()
            .filter(|p| !p.ready)
            .map(|p| format!("{} on {}", p.name, p.node_name()))
            .collect();
        if !not_ready.is_empty() {
            why.push(format!("not Ready: {}", few(&not_ready)));
        }
        let waiting = set.iter().filter(|p| !p.at(self.target)).count();
        if waiting > 0 {
            why.push(format!("{waiting} nodes not moved (maxUnavailable)"));
        }
        let missing = want.saturating_sub(set.len());
        if missing > 0 {
            why.push(format!("{missing} nodes without an agent pod"));
        }
        Some(why.join("; "))
    }

    fn progress(&self, mut st: State, verdict: Option<&Verdict>, promote: bool) -> Decision {
        let index = st.step.unwrap_or(0).min(self.steps.len());
        let name = step_name(self.steps, index);
        if self.obs.abort {
            return self.start_rollback(
                st,
                RollbackCause::Aborted,
                format!("aborted at {name} (annotation {ANNOTATION_ABORT})"),
            );
        }
        if let Some(v) = verdict.filter(|v| !v.passed) {
            match v.store_unreachable.as_deref() {
                Some(why) if v.final_check && !promote => return self.hold_for_store(st, why),
                // Promoted: on without the store's answer.
                Some(_) if v.final_check => {}
                _ => {
                    return self.start_rollback(
                        st,
                        RollbackCause::VerificationFailed,
                        format!("{name} failed verification: {}", v.summary),
                    );
                }
            }
        }
        let desired = self.obs.desired_nodes;
        if index >= self.steps.len() {
            // Soak.
            st.phase = Some(Phase::Soak);
            let soak = self.spec.soak.0;
            let soaked = elapsed(st.step_started, self.now);
            if promote || soaked >= soak {
                st.phase = Some(Phase::Healthy);
                st.stable = Some(self.target.to_string());
                st.step = None;
                st.step_started = Some(self.now);
                st.window_started = None;
                st.stream_baseline = None;
                // The same words as every later reconcile of a Healthy pipeline, so the
                // first one after the soak has nothing to write.
                let message = self.healthy_message();
                return self.decision(st, Template::Target, vec![Action::SaveStable], message);
            }
            // An end time, not a countdown: the message (so the status) stays the same
            // for the whole soak instead of changing at every look.
            let message = format!(
                "soak: {}/{desired} nodes at revision {}, until {}",
                self.at_target(),
                self.target,
                ends_at(st.step_started, soak)
            );
            return self.decision(st, Template::Target, Vec::new(), message);
        }
        if self.obs.paused {
            st.phase = Some(Phase::Paused);
            let message = format!(
                "paused at {name}: {}/{desired} nodes at revision {}",
                self.at_target(),
                self.target
            );
            return self.decision(st, Template::Target, Vec::new(), message);
        }
        st.phase = Some(phase_of(self.steps, index));
        if promote {
            self.start_step(&mut st, index + 1);
            return self.progress(st, None, false);
        }
        if !self.obs.desired_known {
            // Until the DaemonSet controller has counted the nodes of the current spec,
            // the step's size is unknown: a step judged now would be judged on the pods
            // that happen to exist.
            let deadline = self.spec.progress_deadline.0;
            if elapsed(st.step_started, self.now) > deadline {
                return self.start_rollback(
                    st,
                    RollbackCause::VerificationFailed,
                    format!(
                        "{name} did not complete: the DaemonSet's status did not count its nodes within {}",
                        human(deadline)
                    ),
                );
            }
            let message = format!(
                "{name}: waiting for the DaemonSet controller to count the nodes of revision {}",
                self.target
            );
            return self.decision(st, Template::Target, Vec::new(), message);
        }
        let (set, want) = step_set(
            self.steps,
            index,
            self.obs,
            self.target,
            st.stable.as_deref(),
        );
        let to_move: Vec<&PodView> = set
            .iter()
            .copied()
            .filter(|p| !p.at(self.target) && !p.terminating)
            .collect();
        let ready = set.iter().filter(|p| p.at(self.target) && p.ready).count();
        let window = window(self.spec, index);
        if want == 0 {
            let message = format!("{name}: no node runs an agent yet");
            return self.decision(st, Template::Target, Vec::new(), message);
        }
        if !to_move.is_empty() || ready < want {
            st.window_started = None;
            if let Some(why) = self.stalled(&st, &set, want, ready) {
                return self.start_rollback(
                    st,
                    RollbackCause::VerificationFailed,
                    format!("{name} did not complete: {why}"),
                );
            }
            if let Some(held) = self.record_baseline(&mut st, index, &set) {
                return self.decision(st, Template::Target, Vec::new(), held);
            }
            let delete = budgeted(&to_move, self.obs, self.spec.max_unavailable);
            let moved = set.iter().filter(|p| p.at(self.target)).count();
            let message = format!(
                "{name}: {moved}/{want} nodes at revision {} ({ready} Ready), {desired} in all",
                self.target
            );
            let actions = if delete.is_empty() {
                Vec::new()
            } else {
                vec![Action::DeletePods(delete)]
            };
            return self.decision(st, Template::Target, actions, message);
        }
        let started = *st.window_started.get_or_insert(self.now);
        if verdict.is_some_and(|v| v.final_check && v.passed) {
            self.start_step(&mut st, index + 1);
            return self.progress(st, None, false);
        }
        let message = format!(
            "{name}: {want}/{desired} nodes at revision {}, verifying for {} until {}",
            self.target,
            human(window),
            ends_at(Some(started), window)
        );
        let mut decision = self.decision(st, Template::Target, Vec::new(), message);
        // Look again when the window ends, not a fixed interval later: with short windows
        // the step boundary, not the nodes, set the rollout's pace.
        let left = window.saturating_sub(elapsed(Some(started), self.now));
        decision.requeue = decision.requeue.min(left);
        decision
    }

    /// Records what the stable agents said (the baseline) before the step moves any of
    /// them; the message to hold the step with while they are being measured.
    fn record_baseline(&self, st: &mut State, index: usize, set: &[&PodView]) -> Option<String> {
        let stable = st.stable.clone()?;
        if !self.spec.verify.needs_baseline() || has_baseline(st, index) {
            return None;
        }
        let step = i32::try_from(index).unwrap_or(i32::MAX);
        let pods = baseline_pods(set, &stable);
        match self.baseline.filter(|b| b.step == step) {
            Some(measured) => st.stream_baseline = Some(measured.clone()),
            // Nothing left at the stable revision to measure.
            None if pods.is_empty() => {
                st.stream_baseline = Some(StreamBaseline {
                    step,
                    ..Default::default()
                })
            }
            None => {
                return Some(format!(
                    "{}: measuring {} stable agents (active streams, pipeline drops) before they move",
                    step_name(self.steps, index),
                    pods.len()
                ));
            }
        }
        None
    }

    /// Every check of the step passed but the store's, which could not be asked: the step
    /// neither goes on (nothing proves the logs arrived) nor rolls back (nothing says the
    /// revision is wrong). It asks again every [`STORE_RETRY`], so it goes on once the
    /// store answers; `logpipe.io/promote` goes on without it.
    fn hold_for_store(&self, st: State, why: &str) -> Decision {
        let index = st.step.unwrap_or(0);
        let message = format!(
            "{}: holding at revision {}: every check passed but the store cannot be asked: {why} (asked again every 10s; promote to go on without it)",
            step_name(self.steps, index),
            self.target
        );
        let mut decision = self.decision(st, Template::Target, Vec::new(), message.clone());
        decision.store_unreachable = Some(message);
        // Each look scrapes the step's agents and asks the store again: not every 2 s.
        decision.requeue = STORE_RETRY;
        decision
    }

    fn start_rollback(&self, mut st: State, cause: RollbackCause, reason: String) -> Decision {
        st.failed = Some(self.target.to_string());
        st.reason = Some(reason);
        st.cause = Some(cause);
        st.window_started = None;
        st.step_started = Some(self.now);
        if st.stable.is_none() || !self.obs.stable_saved {
            // Nothing to go back to (first install): report and stop.
            st.phase = Some(Phase::Degraded);
            let message = format!(
                "revision {} failed, no stable revision to roll back to: {}",
                self.target,
                st.reason.clone().unwrap_or_default()
            );
            return self.decision(st, Template::Target, Vec::new(), message);
        }
        st.phase = Some(Phase::RollingBack);
        self.rollback(st)
    }

    fn rollback(&self, mut st: State) -> Decision {
        let Some(stable) = st.stable.clone() else {
            st.phase = Some(Phase::Degraded);
            return self.decision(
                st,
                Template::Target,
                Vec::new(),
                "no stable revision".into(),
            );
        };
        let reason = st.reason.clone().unwrap_or_default();
        let off: Vec<&PodView> = live(self.obs.pods).filter(|p| !p.at(&stable)).collect();
        let ready = live(self.obs.pods)
            .filter(|p| p.at(&stable) && p.ready)
            .count();
        let desired = self.obs.desired_nodes;
        let terminating = self.obs.pods.iter().any(|p| p.terminating);
        if off.is_empty() && !terminating && ready >= desired && self.obs.desired_known {
            st.phase = Some(Phase::Degraded);
            let message =
                format!("rolled back to revision {stable} ({ready}/{desired} Ready): {reason}");
            return self.decision(st, Template::Stable, Vec::new(), message);
        }
        let delete = budgeted(&off, self.obs, self.spec.max_unavailable);
        let message = format!(
            "rolling back to revision {stable}: {} nodes to move back, {ready}/{desired} Ready: {reason}",
            off.len()
        );
        let actions = if delete.is_empty() {
            Vec::new()
        } else {
            vec![Action::DeletePods(delete)]
        };
        self.decision(st, Template::Stable, actions, message)
    }

    /// The stable revision's agents fail where they run (a fatal waiting reason: crash
    /// loop, image gone): Degraded on that revision, so a gate downstream stops the
    /// release, until they run again. Nothing to roll back to: no node moves.
    fn failing(&self, mut st: State) -> Option<Decision> {
        let failures: Vec<String> = live(self.obs.pods)
            .filter(|p| p.at(self.target))
            .filter_map(|p| p.failing_at(self.now))
            .collect();
        if failures.is_empty() {
            return None;
        }
        let reason = format!(
            "agents failing at the stable revision on {}/{} nodes: {}",
            failures.len(),
            self.obs.desired_nodes,
            few(&failures)
        );
        if st.failed.as_deref() != Some(self.target) || st.phase != Some(Phase::Degraded) {
            st.step_started = Some(self.now);
        }
        st.phase = Some(Phase::Degraded);
        st.failed = Some(self.target.to_string());
        st.reason = Some(reason.clone());
        st.cause = Some(RollbackCause::AgentsFailing);
        let message = format!("revision {}: {reason}", self.target);
        Some(self.decision(st, Template::Target, Vec::new(), message))
    }

    fn degraded(&self, mut st: State, promote: bool) -> Decision {
        if st.settled_failure() {
            // Watched, not rolled back: Healthy again once no agent fails.
            return self.failing(st.clone()).unwrap_or_else(|| {
                st.phase = Some(Phase::Healthy);
                st.failed = None;
                st.reason = None;
                st.cause = None;
                self.converge(st)
            });
        }
        if promote {
            // A person asked to try the failed revision again.
            st.failed = None;
            st.reason = None;
            st.cause = None;
            self.start_step(&mut st, 0);
            return self.progress(st, None, false);
        }
        let template = if st.stable.is_some() && self.obs.stable_saved {
            Template::Stable
        } else {
            Template::Target
        };
        let message = match (&st.stable, template) {
            (Some(stable), Template::Stable) => format!(
                "revision {} rolled back to {stable}: {} (promote to retry, or change the spec)",
                self.target,
                st.reason.clone().unwrap_or_default()
            ),
            _ => format!(
                "revision {} failed: {}",
                self.target,
                st.reason.clone().unwrap_or_default()
            ),
        };
        self.decision(st, template, Vec::new(), message)
    }

    /// Healthy, or moving back to the stable revision with no verification: move every
    /// node to the target within the budget, then it is stable.
    fn converge(&self, mut st: State) -> Decision {
        let off: Vec<&PodView> = live(self.obs.pods).filter(|p| !p.at(self.target)).collect();
        let ready = live(self.obs.pods)
            .filter(|p| p.at(self.target) && p.ready)
            .count();
        let desired = self.obs.desired_nodes;
        let mut actions = Vec::new();
        if off.is_empty() && ready >= desired && self.obs.desired_known {
            if st.phase == Some(Phase::Healthy)
                && let Some(decision) = self.failing(st.clone())
            {
                return decision;
            }
            let changed = st.phase != Some(Phase::Healthy);
            st.phase = Some(Phase::Healthy);
            st.stable = Some(self.target.to_string());
            st.step = None;
            st.window_started = None;
            st.stream_baseline = None;
            if changed {
                st.step_started = Some(self.now);
            }
            if self.obs.saved_revision != Some(self.target) {
                actions.push(Action::SaveStable);
            }
            let message = self.healthy_message();
            return self.decision(st, Template::Target, actions, message);
        }
        if st.phase == Some(Phase::Healthy) && off.is_empty() {
            if let Some(decision) = self.failing(st.clone()) {
                return decision;
            }
            // Healthy with an agent down (node trouble): stays Healthy, the Ready
            // condition tells.
            let message = self.healthy_message();
            return self.decision(st, Template::Target, actions, message);
        }
        st.phase = Some(Phase::Progressing);
        let delete = budgeted(&off, self.obs, self.spec.max_unavailable);
        if !delete.is_empty() {
            actions.push(Action::DeletePods(delete));
        }
        let message = format!(
            "{}/{desired} nodes at revision {}, {ready} Ready",
            desired.saturating_sub(off.len()),
            self.target
        );
        self.decision(st, Template::Target, actions, message)
    }
}

#[cfg(test)]
mod tests;
