//! Table tests of the rollout engine: one case per transition.

use super::*;
use crate::crd::{CanaryStep, RolloutStep};
use logpipe_api::config::HumanDuration;

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

/// canary 1 node, 50%, (implicit 100%); window 10s, soak 30s, maxUnavailable 1.
fn spec() -> RolloutSpec {
    RolloutSpec {
        steps: vec![
            RolloutStep {
                canary: Some(CanaryStep {
                    nodes: Some(1),
                    node_selector: None,
                }),
                ..Default::default()
            },
            RolloutStep {
                percent: Some(50),
                ..Default::default()
            },
        ],
        soak: HumanDuration(Duration::from_secs(30)),
        verify: crate::crd::VerifySpec {
            window: HumanDuration(Duration::from_secs(10)),
            // These tables are about moves; the baseline a step starts with (taken by
            // default for `pipelineDrops`) has its own, with `drops_spec` and `growth_spec`.
            max_drop_increase: "100%".into(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// [`spec`] with the default `pipelineDrops` check (maxDropIncrease 10%).
fn drops_spec() -> RolloutSpec {
    let mut s = spec();
    s.verify.max_drop_increase = crate::crd::VerifySpec::default().max_drop_increase;
    s
}

fn pod(node: &str, rev: &str, ready: bool) -> PodView {
    PodView {
        name: format!("agent-{node}"),
        node: Some(node.into()),
        revision: Some(rev.into()),
        ready,
        created: Some(t(0)),
        ..Default::default()
    }
}

/// Four nodes n1..n4, all Ready at `rev`.
fn fleet(rev: &str) -> Vec<PodView> {
    (1..=4).map(|i| pod(&format!("n{i}"), rev, true)).collect()
}

fn with(mut pods: Vec<PodView>, node: &str, rev: &str, ready: bool, created: i64) -> Vec<PodView> {
    let mut p = pod(node, rev, ready);
    p.created = Some(t(created));
    pods.retain(|q| q.node.as_deref() != Some(node));
    pods.push(p);
    pods
}

fn state(phase: Phase, step: Option<usize>, started: i64) -> State {
    State {
        phase: Some(phase),
        target: Some("r2".into()),
        stable: Some("r1".into()),
        step,
        step_started: Some(t(started)),
        window_started: None,
        failed: None,
        reason: None,
        cause: None,
        stream_baseline: None,
    }
}

#[derive(Default)]
struct Flags {
    gated: bool,
    paused: bool,
    promote: bool,
    abort: bool,
    no_saved: bool,
    labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Nodes the DaemonSet should cover (default 4).
    desired: Option<usize>,
    /// The DaemonSet's status does not describe its current spec yet.
    uncounted: bool,
}

fn run(
    spec: &RolloutSpec,
    st: &State,
    revision: &str,
    pods: &[PodView],
    verdicts: Verdicts,
    now: i64,
    flags: Flags,
) -> Decision {
    let obs = Observed {
        revision,
        pods,
        desired_nodes: flags.desired.unwrap_or(4),
        desired_known: !flags.uncounted,
        node_labels: &flags.labels,
        gated: flags.gated,
        stable_saved: !flags.no_saved,
        saved_revision: st.stable.as_deref(),
        paused: flags.paused,
        promote: flags.promote,
        abort: flags.abort,
    };
    step(spec, st, &obs, &verdicts, t(now))
}

fn verdict(final_check: bool, passed: bool) -> Verdicts {
    Verdicts {
        gate: None,
        verification: Some(Verdict {
            final_check,
            passed,
            summary: if passed {
                String::new()
            } else {
                "droppedEntries 12 > 0".into()
            },
            store_unreachable: None,
        }),
        baseline: None,
    }
}

fn deleted(d: &Decision) -> Vec<String> {
    d.actions
        .iter()
        .flat_map(|a| match a {
            Action::DeletePods(p) => p.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn healthy_r1() -> State {
    State {
        phase: Some(Phase::Healthy),
        target: Some("r1".into()),
        stable: Some("r1".into()),
        ..Default::default()
    }
}

#[test]
fn plan_steps_appends_the_final_hundred_percent() {
    assert_eq!(
        plan_steps(&spec()),
        [
            StepKind::CanaryNodes(1),
            StepKind::Percent(50),
            StepKind::Percent(100)
        ]
    );
    assert_eq!(
        plan_steps(&RolloutSpec::default()),
        [StepKind::Percent(100)]
    );
}

#[test]
fn new_revision_without_gate_starts_the_canary_on_one_node() {
    let d = run(
        &spec(),
        &healthy_r1(),
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        100,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert_eq!(d.state.step, Some(0));
    assert_eq!(d.state.target.as_deref(), Some("r2"));
    assert_eq!(d.state.step_started, Some(t(100)));
    assert_eq!(d.template, Template::Target);
    assert_eq!(deleted(&d), ["agent-n1"]);
}

#[test]
fn gate_holds_opens_and_promote_skips_it() {
    type Case = (&'static str, Option<Gate>, bool, Phase, Template, usize);
    let cases: [Case; 4] = [
        (
            "held",
            Some(Gate::Held("ops not Healthy".into())),
            false,
            Phase::Pending,
            Template::Stable,
            0,
        ),
        (
            "no answer yet",
            None,
            false,
            Phase::Pending,
            Template::Stable,
            0,
        ),
        (
            "open",
            Some(Gate::Open),
            false,
            Phase::Canary,
            Template::Target,
            1,
        ),
        (
            "promoted",
            Some(Gate::Held("ops not Healthy".into())),
            true,
            Phase::Canary,
            Template::Target,
            1,
        ),
    ];
    for (name, gate, promote, phase, template, moves) in cases {
        let pending = State {
            phase: Some(Phase::Pending),
            step: Some(0),
            ..state(Phase::Pending, Some(0), 100)
        };
        let d = run(
            &spec(),
            &pending,
            "r2",
            &fleet("r1"),
            Verdicts {
                gate,
                verification: None,
                baseline: None,
            },
            110,
            Flags {
                gated: true,
                promote,
                ..Default::default()
            },
        );
        assert_eq!(d.state.phase, Some(phase), "{name}");
        assert_eq!(d.template, template, "{name}");
        assert_eq!(deleted(&d).len(), moves, "{name}");
        assert_eq!(
            d.actions.contains(&Action::ClearAnnotations),
            promote,
            "{name}"
        );
    }
}

#[test]
fn first_install_held_by_its_gate_has_no_daemonset() {
    let d = run(
        &spec(),
        &State::default(),
        "r1",
        &[],
        Verdicts {
            gate: Some(Gate::Held("waiting".into())),
            verification: None,
            baseline: None,
        },
        0,
        Flags {
            gated: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.phase, Some(Phase::Pending));
    assert_eq!(d.template, Template::None);
}

#[test]
fn canary_waits_for_ready_then_opens_its_window_then_advances_on_a_final_pass() {
    let canary = state(Phase::Canary, Some(0), 100);
    // Moved, not Ready yet: wait, no more moves.
    let pods = with(fleet("r1"), "n1", "r2", false, 101);
    let d = run(
        &spec(),
        &canary,
        "r2",
        &pods,
        Verdicts::default(),
        103,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert!(deleted(&d).is_empty());
    assert_eq!(d.state.window_started, None);
    // Ready: the window starts.
    let pods = with(fleet("r1"), "n1", "r2", true, 101);
    let d = run(
        &spec(),
        &canary,
        "r2",
        &pods,
        Verdicts::default(),
        105,
        Flags::default(),
    );
    assert_eq!(d.state.window_started, Some(t(105)));
    assert!(
        d.message
            .contains("verifying for 10s until 1970-01-01T00:01:55Z"),
        "{}",
        d.message
    );
    // A check during the window passes: stay, with the same words (no status write).
    let watching = d.state.clone();
    let verifying = d.message.clone();
    let d = run(
        &spec(),
        &watching,
        "r2",
        &pods,
        verdict(false, true),
        108,
        Flags::default(),
    );
    assert_eq!(d.state, watching);
    assert_eq!(d.message, verifying);
    // The final check passes: step 1 (50% of 4 = 2 nodes) moves one more node.
    let d = run(
        &spec(),
        &watching,
        "r2",
        &pods,
        verdict(true, true),
        116,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Step));
    assert_eq!(d.state.step, Some(1));
    assert_eq!(d.state.step_started, Some(t(116)));
    assert_eq!(d.state.window_started, None);
    assert_eq!(deleted(&d), ["agent-n2"]);
}

#[test]
fn a_failed_check_rolls_back_the_moved_nodes_then_degraded() {
    let mut canary = state(Phase::Canary, Some(0), 100);
    canary.window_started = Some(t(105));
    let pods = with(fleet("r1"), "n1", "r2", true, 101);
    for (name, v) in [
        ("during the window", verdict(false, false)),
        ("at its end", verdict(true, false)),
    ] {
        let d = run(&spec(), &canary, "r2", &pods, v, 108, Flags::default());
        assert_eq!(d.state.phase, Some(Phase::RollingBack), "{name}");
        assert_eq!(d.template, Template::Stable, "{name}");
        assert_eq!(d.state.failed.as_deref(), Some("r2"), "{name}");
        assert!(
            d.state
                .reason
                .as_deref()
                .unwrap()
                .contains("droppedEntries 12 > 0"),
            "{name}"
        );
        assert_eq!(deleted(&d), ["agent-n1"], "{name}");
    }
    // Back on every node and Ready: Degraded, with the reason.
    let mut back = run(
        &spec(),
        &canary,
        "r2",
        &pods,
        verdict(false, false),
        108,
        Flags::default(),
    )
    .state;
    let d = run(
        &spec(),
        &back,
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        112,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Degraded));
    assert_eq!(d.template, Template::Stable);
    assert!(
        d.message.contains("rolled back to revision r1"),
        "{}",
        d.message
    );
    // Degraded stays Degraded for the same revision, with the stable template.
    back = d.state;
    let d = run(
        &spec(),
        &back,
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        400,
        Flags::default(),
    );
    assert_eq!(d.state, back);
    assert_eq!(d.template, Template::Stable);
    assert!(deleted(&d).is_empty());
}

#[test]
fn rollback_respects_max_unavailable_and_takes_not_ready_pods_for_free() {
    let mut rolling = state(Phase::RollingBack, Some(1), 100);
    rolling.failed = Some("r2".into());
    // n1, n2 moved (n2 not Ready): n2 is free, n1 must wait for budget.
    let pods = with(
        with(fleet("r1"), "n1", "r2", true, 101),
        "n2",
        "r2",
        false,
        101,
    );
    let d = run(
        &spec(),
        &rolling,
        "r2",
        &pods,
        Verdicts::default(),
        120,
        Flags::default(),
    );
    assert_eq!(deleted(&d), ["agent-n2"]);
    assert_eq!(d.state.phase, Some(Phase::RollingBack));
}

#[test]
fn no_stable_template_means_degraded_without_rollback() {
    let canary = state(Phase::Canary, Some(0), 100);
    let pods = with(fleet("r1"), "n1", "r2", true, 101);
    let d = run(
        &spec(),
        &canary,
        "r2",
        &pods,
        verdict(false, false),
        108,
        Flags {
            no_saved: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.phase, Some(Phase::Degraded));
    assert!(deleted(&d).is_empty());
}

#[test]
fn abort_rolls_back_now() {
    let step = state(Phase::Step, Some(1), 100);
    let pods = with(fleet("r1"), "n1", "r2", true, 90);
    let d = run(
        &spec(),
        &step,
        "r2",
        &pods,
        Verdicts::default(),
        101,
        Flags {
            abort: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.phase, Some(Phase::RollingBack));
    assert!(d.state.reason.as_deref().unwrap().contains("aborted"));
    assert!(d.actions.contains(&Action::ClearAnnotations));
    assert_eq!(deleted(&d), ["agent-n1"]);
}

#[test]
fn paused_moves_nothing_and_resumes_at_the_same_step() {
    let step = state(Phase::Step, Some(1), 100);
    let pods = with(fleet("r1"), "n1", "r2", true, 90);
    let d = run(
        &spec(),
        &step,
        "r2",
        &pods,
        Verdicts::default(),
        101,
        Flags {
            paused: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.phase, Some(Phase::Paused));
    assert_eq!(d.state.step, Some(1));
    assert!(deleted(&d).is_empty());
    let d = run(
        &spec(),
        &d.state,
        "r2",
        &pods,
        Verdicts::default(),
        102,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Step));
    assert_eq!(deleted(&d), ["agent-n2"]);
}

#[test]
fn promote_skips_the_rest_of_the_window() {
    let mut canary = state(Phase::Canary, Some(0), 100);
    canary.window_started = Some(t(105));
    let pods = with(fleet("r1"), "n1", "r2", true, 101);
    let d = run(
        &spec(),
        &canary,
        "r2",
        &pods,
        Verdicts::default(),
        106,
        Flags {
            promote: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.step, Some(1));
    assert_eq!(deleted(&d), ["agent-n2"]);
}

#[test]
fn soak_then_healthy_and_the_revision_becomes_stable() {
    let soak = state(Phase::Soak, Some(3), 100);
    let d = run(
        &spec(),
        &soak,
        "r2",
        &fleet("r2"),
        Verdicts::default(),
        110,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Soak));
    assert!(
        d.message.contains("until 1970-01-01T00:02:10Z"),
        "{}",
        d.message
    );
    let d = run(
        &spec(),
        &soak,
        "r2",
        &fleet("r2"),
        Verdicts::default(),
        131,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Healthy));
    assert_eq!(d.state.stable.as_deref(), Some("r2"));
    assert!(d.actions.contains(&Action::SaveStable));
    // A failed check while soaking rolls back.
    let d = run(
        &spec(),
        &soak,
        "r2",
        &fleet("r2"),
        verdict(false, false),
        120,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::RollingBack));
}

#[test]
fn last_step_passes_into_soak() {
    let mut last = state(Phase::Step, Some(2), 100);
    last.window_started = Some(t(105));
    let d = run(
        &spec(),
        &last,
        "r2",
        &fleet("r2"),
        verdict(true, true),
        116,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Soak));
    assert_eq!(d.state.step, Some(3));
}

#[test]
fn a_new_revision_mid_rollout_restarts_at_the_canary_on_a_superseded_node() {
    let step = state(Phase::Step, Some(1), 100);
    let pods = with(
        with(fleet("r1"), "n3", "r2", true, 90),
        "n4",
        "r2",
        true,
        95,
    );
    let d = run(
        &spec(),
        &step,
        "r3",
        &pods,
        verdict(true, true),
        120,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert_eq!(d.state.target.as_deref(), Some("r3"));
    assert_eq!(
        d.state.stable.as_deref(),
        Some("r1"),
        "r2 never became stable"
    );
    // The superseded revision's nodes move first; the verdict was about r2: ignored.
    assert_eq!(deleted(&d), ["agent-n3"]);
}

#[test]
fn a_new_revision_after_degraded_starts_a_new_rollout() {
    let mut degraded = state(Phase::Degraded, Some(0), 100);
    degraded.failed = Some("r2".into());
    let d = run(
        &spec(),
        &degraded,
        "r3",
        &fleet("r1"),
        Verdicts::default(),
        200,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert_eq!(d.state.failed, None);
    assert_eq!(deleted(&d), ["agent-n1"]);
}

#[test]
fn promote_on_degraded_retries_the_failed_revision() {
    let mut degraded = state(Phase::Degraded, Some(0), 100);
    degraded.failed = Some("r2".into());
    let d = run(
        &spec(),
        &degraded,
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        200,
        Flags {
            promote: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert_eq!(d.state.failed, None);
    assert_eq!(deleted(&d), ["agent-n1"]);
}

#[test]
fn progress_deadline_table() {
    // Canary started at 100; progressDeadline 5m (the default).
    struct Case {
        name: &'static str,
        pods: Vec<PodView>,
        now: i64,
        failed: Option<&'static str>,
    }
    let mut agent_ready = pod("n1", "r2", false);
    agent_ready.containers_ready = true;
    agent_ready.created = Some(t(101));
    let mut crash_free_but_down = fleet("r1");
    crash_free_but_down.retain(|p| p.node.as_deref() != Some("n1"));
    crash_free_but_down.push(agent_ready);
    let cases = [
        Case {
            name: "a new pod not Ready yet, within the deadline, is waited for",
            pods: with(fleet("r1"), "n1", "r2", false, 101),
            now: 101 + 300,
            failed: None,
        },
        Case {
            name: "a new pod not Ready 5m after it started fails the step, named",
            pods: with(fleet("r1"), "n1", "r2", false, 101),
            now: 101 + 301,
            failed: Some(
                "canary did not complete: 0/1 new agents Ready; not Ready 5m after they started: agent-n1 on n1",
            ),
        },
        Case {
            name: "an agent Ready on a NotReady node is not late, but nothing moved for 5m",
            pods: crash_free_but_down,
            now: 101 + 301,
            failed: Some("nothing moved for 5m; not Ready: agent-n1 on n1"),
        },
        Case {
            name: "a node whose pod never came back: nothing moved for 5m",
            pods: fleet("r1").into_iter().skip(1).collect(),
            now: 100 + 301,
            failed: Some(
                "0/1 new agents Ready, nothing moved for 5m; 1 nodes without an agent pod",
            ),
        },
        Case {
            name: "the deadline counts from the newest move, not the step's start",
            pods: with(fleet("r1"), "n1", "r2", false, 350),
            now: 100 + 400,
            failed: None,
        },
    ];
    for case in cases {
        let d = run(
            &spec(),
            &state(Phase::Canary, Some(0), 100),
            "r2",
            &case.pods,
            Verdicts::default(),
            case.now,
            Flags::default(),
        );
        match case.failed {
            None => assert_eq!(
                d.state.phase,
                Some(Phase::Canary),
                "{}: {}",
                case.name,
                d.message
            ),
            Some(why) => {
                assert_eq!(d.state.phase, Some(Phase::RollingBack), "{}", case.name);
                let reason = d.state.reason.unwrap_or_default();
                assert!(reason.contains(why), "{}: {reason}", case.name);
            }
        }
    }
}

#[test]
fn budget_counts_unavailable_pods_elsewhere() {
    let step = state(Phase::Step, Some(1), 100);
    // n1 moved; n4 (not in the step) is down: no room for n2.
    let mut pods = with(fleet("r1"), "n1", "r2", true, 90);
    pods = with(pods, "n4", "r1", false, 0);
    let d = run(
        &spec(),
        &step,
        "r2",
        &pods,
        Verdicts::default(),
        101,
        Flags::default(),
    );
    assert!(deleted(&d).is_empty());
    // A missing pod counts too.
    let pods: Vec<PodView> = with(fleet("r1"), "n1", "r2", true, 90)
        .into_iter()
        .filter(|p| p.node.as_deref() != Some("n4"))
        .collect();
    let d = run(
        &spec(),
        &step,
        "r2",
        &pods,
        Verdicts::default(),
        101,
        Flags::default(),
    );
    assert!(deleted(&d).is_empty());
}

/// A node in transition (its old pod terminating, the new one not there yet, then not
/// Ready yet) is one node down, not two: with a budget of 2 another node may move.
#[test]
fn a_node_being_replaced_counts_once_against_the_budget() {
    let mut two = spec();
    two.max_unavailable = 2;
    let step = state(Phase::Step, Some(1), 100);
    let mut terminating = pod("n1", "r1", true);
    terminating.terminating = true;
    // n1's pod terminating, maybe its replacement; n4 maybe down (not in the step).
    let deleted_when = |new_pod: Option<PodView>, n4_down: bool| {
        let mut pods = with(fleet("r1"), "n4", "r1", !n4_down, 0);
        pods.retain(|p| p.node.as_deref() != Some("n1"));
        pods.push(terminating.clone());
        pods.extend(new_pod);
        let flags = Flags::default();
        deleted(&run(
            &two,
            &step,
            "r2",
            &pods,
            Verdicts::default(),
            101,
            flags,
        ))
    };
    let n2 = vec!["agent-n2".to_string()];
    assert_eq!(deleted_when(None, false), n2, "n1 gone: one node down");
    let mut starting = pod("n1", "r2", false);
    starting.name = "agent-n1-new".into();
    assert_eq!(deleted_when(Some(starting), false), n2, "n1 starting: one");
    assert!(
        deleted_when(None, true).is_empty(),
        "n1 and n4 down: no room"
    );
}

#[test]
fn first_install_is_one_verified_step_and_a_failure_is_degraded() {
    let d = run(
        &spec(),
        &State::default(),
        "r1",
        &fleet("r1"),
        Verdicts::default(),
        10,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Step));
    assert_eq!(d.state.step, Some(2));
    assert_eq!(d.state.window_started, Some(t(10)));
    let d = run(
        &spec(),
        &d.state,
        "r1",
        &fleet("r1"),
        verdict(true, false),
        21,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Degraded));
    assert_eq!(d.template, Template::Target);
}

#[test]
fn back_to_the_stable_revision_moves_nodes_back_unverified() {
    let step = state(Phase::Step, Some(1), 100);
    let pods = with(fleet("r1"), "n1", "r2", true, 90);
    let d = run(
        &spec(),
        &step,
        "r1",
        &pods,
        Verdicts::default(),
        101,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Progressing));
    assert_eq!(deleted(&d), ["agent-n1"]);
    let d = run(
        &spec(),
        &d.state,
        "r1",
        &fleet("r1"),
        Verdicts::default(),
        105,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Healthy));
}

#[test]
fn a_canary_selector_picks_the_labelled_node() {
    let mut s = spec();
    s.steps[0].canary = Some(CanaryStep {
        nodes: None,
        node_selector: Some(BTreeMap::from([("canary".into(), "true".into())])),
    });
    let labels = BTreeMap::from([(
        "n3".to_string(),
        BTreeMap::from([("canary".to_string(), "true".to_string())]),
    )]);
    let d = run(
        &s,
        &healthy_r1(),
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        100,
        Flags {
            labels,
            ..Default::default()
        },
    );
    assert_eq!(deleted(&d), ["agent-n3"]);
}

#[test]
fn resuming_from_the_written_state_repeats_no_move() {
    // The operator wrote this state, deleted agent-n1 and died; the pod is terminating.
    let d = run(
        &spec(),
        &healthy_r1(),
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        100,
        Flags::default(),
    );
    let mut pods = fleet("r1");
    pods[0].terminating = true;
    let again = run(
        &spec(),
        &d.state,
        "r2",
        &pods,
        Verdicts::default(),
        130,
        Flags::default(),
    );
    assert_eq!(again.state.step, Some(0));
    assert_eq!(
        again.state.step_started,
        Some(t(100)),
        "the step keeps its start time"
    );
    assert!(
        deleted(&again).is_empty(),
        "budget used by the terminating pod"
    );
}

#[test]
fn verification_is_due_on_moved_pods_and_final_after_the_window() {
    let obs_pods = with(fleet("r1"), "n1", "r2", true, 101);
    let labels = BTreeMap::new();
    let obs = Observed {
        revision: "r2",
        pods: &obs_pods,
        desired_nodes: 4,
        desired_known: true,
        node_labels: &labels,
        gated: false,
        stable_saved: true,
        saved_revision: Some("r1"),
        paused: false,
        promote: false,
        abort: false,
    };
    let mut canary = state(Phase::Canary, Some(0), 100);
    let req = verification_due(&spec(), &canary, &obs, t(103)).unwrap();
    assert_eq!(
        (req.pods, req.final_check),
        (vec!["agent-n1".to_string()], false)
    );
    canary.window_started = Some(t(105));
    assert!(
        !verification_due(&spec(), &canary, &obs, t(114))
            .unwrap()
            .final_check
    );
    assert!(
        verification_due(&spec(), &canary, &obs, t(115))
            .unwrap()
            .final_check
    );
    let pending = state(Phase::Pending, Some(0), 100);
    assert_eq!(verification_due(&spec(), &pending, &obs, t(115)), None);
    let degraded = state(Phase::Degraded, Some(0), 100);
    assert_eq!(verification_due(&spec(), &degraded, &obs, t(115)), None);
}

#[test]
fn a_gated_first_install_opens_into_the_install_step() {
    let pending = State {
        phase: Some(Phase::Pending),
        target: Some("r1".into()),
        step: Some(0),
        step_started: Some(t(0)),
        ..Default::default()
    };
    let d = run(
        &spec(),
        &pending,
        "r1",
        &[],
        Verdicts {
            gate: Some(Gate::Open),
            verification: None,
            baseline: None,
        },
        5,
        Flags {
            gated: true,
            ..Default::default()
        },
    );
    assert_eq!(d.state.phase, Some(Phase::Step));
    assert_eq!(d.state.step, Some(2), "the 100% step: nothing to hold back");
    assert_eq!(d.template, Template::Target);
}

#[test]
fn a_node_in_transition_keeps_its_place_in_the_step() {
    // Room for two agents down: the canary's node must not be joined by a second one
    // while its old pod terminates, or after it is gone and not yet recreated.
    let spec = RolloutSpec {
        max_unavailable: 2,
        ..spec()
    };
    let canary = state(Phase::Canary, Some(0), 100);
    let d = run(
        &spec,
        &canary,
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        100,
        Flags::default(),
    );
    assert_eq!(deleted(&d), ["agent-n1"]);
    let mut terminating = fleet("r1");
    terminating[0].terminating = true;
    let missing: Vec<PodView> = fleet("r1").into_iter().skip(1).collect();
    for (name, pods) in [("terminating", terminating), ("missing", missing)] {
        let d = run(
            &spec,
            &canary,
            "r2",
            &pods,
            Verdicts::default(),
            101,
            Flags::default(),
        );
        assert!(deleted(&d).is_empty(), "{name}: {:?}", deleted(&d));
        assert!(d.message.contains("0/1 nodes"), "{name}: {}", d.message);
    }
    // Recreated at the target and Ready: the canary is that node alone; its window starts.
    let d = run(
        &spec,
        &canary,
        "r2",
        &with(fleet("r1"), "n1", "r2", true, 102),
        Verdicts::default(),
        103,
        Flags::default(),
    );
    assert!(deleted(&d).is_empty(), "{:?}", deleted(&d));
    assert_eq!(d.state.window_started, Some(t(103)));
}

#[test]
fn first_install_judged_while_59_of_200_pods_existed() {
    // BENCH_SIZE=small: 2.2 s after the apply, 60 of the 200 agent pods existed and 59
    // were Ready; the install was judged on them and reported Degraded.
    let zero_window = RolloutSpec {
        verify: crate::crd::VerifySpec {
            window: HumanDuration(Duration::ZERO),
            ..Default::default()
        },
        ..spec()
    };
    let install = State {
        phase: Some(Phase::Step),
        target: Some("r1".into()),
        step: Some(2),
        step_started: Some(t(0)),
        ..Default::default()
    };
    let pods = |existing: usize, ready: usize| -> Vec<PodView> {
        (0..existing)
            .map(|i| pod(&format!("node-{i:03}"), "r1", i < ready))
            .collect()
    };
    struct Case {
        name: &'static str,
        pods: Vec<PodView>,
        desired: usize,
        uncounted: bool,
        window_starts: bool,
        says: &'static str,
    }
    let cases = [
        Case {
            name: "the DaemonSet has not counted its nodes: nothing is judged",
            pods: pods(60, 59),
            desired: 0,
            uncounted: true,
            window_starts: false,
            says: "waiting for the DaemonSet controller to count the nodes",
        },
        Case {
            name: "not counted, even with every existing pod Ready",
            pods: pods(60, 60),
            desired: 0,
            uncounted: true,
            window_starts: false,
            says: "waiting for the DaemonSet controller",
        },
        Case {
            name: "200 to cover, 60 exist: the missing 140 are not moved yet",
            pods: pods(60, 60),
            desired: 200,
            uncounted: false,
            window_starts: false,
            says: "60/200 nodes at revision r1 (60 Ready)",
        },
        Case {
            name: "every node of the step runs a Ready new pod: the window starts",
            pods: pods(200, 200),
            desired: 200,
            uncounted: false,
            window_starts: true,
            says: "200/200 nodes at revision r1, verifying",
        },
    ];
    for case in cases {
        let d = run(
            &zero_window,
            &install,
            "r1",
            &case.pods,
            Verdicts::default(),
            2,
            Flags {
                desired: Some(case.desired),
                uncounted: case.uncounted,
                ..Default::default()
            },
        );
        assert_eq!(d.state.phase, Some(Phase::Step), "{}", case.name);
        assert_eq!(
            d.state.window_started.is_some(),
            case.window_starts,
            "{}: {}",
            case.name,
            d.message
        );
        assert!(
            d.message.contains(case.says),
            "{}: {}",
            case.name,
            d.message
        );
        assert!(deleted(&d).is_empty(), "{}", case.name);
        // Nothing to verify before the window: no final check is due.
        let obs = Observed {
            revision: "r1",
            pods: &case.pods,
            desired_nodes: case.desired,
            desired_known: !case.uncounted,
            node_labels: &BTreeMap::new(),
            gated: false,
            stable_saved: false,
            saved_revision: None,
            paused: false,
            promote: false,
            abort: false,
        };
        let due = verification_due(&zero_window, &d.state, &obs, t(2));
        assert_eq!(
            due.is_some_and(|r| r.final_check),
            case.window_starts,
            "{}",
            case.name
        );
    }
}

fn growth_spec() -> RolloutSpec {
    let mut s = spec();
    s.verify.max_stream_growth = Some("2x".into());
    s
}

fn baseline(step: i32, nodes: &[(&str, i64)]) -> StreamBaseline {
    StreamBaseline {
        step,
        nodes: nodes.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
        ..Default::default()
    }
}

#[test]
fn baseline_due_table() {
    let labels = BTreeMap::new();
    let fleet_r1 = fleet("r1");
    let obs = |pods| Observed {
        revision: "r2",
        pods,
        desired_nodes: 4,
        desired_known: true,
        node_labels: &labels,
        gated: false,
        stable_saved: true,
        saved_revision: Some("r1"),
        paused: false,
        promote: false,
        abort: false,
    };
    let canary = state(Phase::Canary, Some(0), 100);
    let recorded = State {
        stream_baseline: Some(baseline(0, &[("n1", 12)])),
        ..canary.clone()
    };
    let step1 = State {
        stream_baseline: Some(baseline(0, &[("n1", 12)])),
        ..state(Phase::Step, Some(1), 200)
    };
    let first_install = State {
        stable: None,
        ..canary.clone()
    };
    let moved = with(fleet("r1"), "n1", "r2", true, 101);
    // (case, spec, state, pods, pods to scrape)
    type Case<'a> = (
        &'a str,
        RolloutSpec,
        &'a State,
        &'a [PodView],
        Option<Vec<&'a str>>,
    );
    let cases: [Case; 10] = [
        (
            "no maxStreamGrowth, maxDropIncrease 100%: nothing to measure",
            spec(),
            &canary,
            &fleet_r1,
            None,
        ),
        (
            "the default drop check, no maxStreamGrowth: the canary's stable node",
            drops_spec(),
            &canary,
            &fleet_r1,
            Some(vec!["agent-n1"]),
        ),
        (
            "the default drop check: the next step's stable nodes",
            drops_spec(),
            &step1,
            &moved,
            Some(vec!["agent-n2"]),
        ),
        (
            "the default drop check: recorded once for the step",
            drops_spec(),
            &recorded,
            &fleet_r1,
            None,
        ),
        (
            "the default drop check: a first install has no stable revision",
            drops_spec(),
            &first_install,
            &fleet_r1,
            None,
        ),
        (
            "the canary starts: its stable node",
            growth_spec(),
            &canary,
            &fleet_r1,
            Some(vec!["agent-n1"]),
        ),
        (
            "recorded once for the step",
            growth_spec(),
            &recorded,
            &fleet_r1,
            None,
        ),
        (
            "the next step: its stable nodes, not the moved one",
            growth_spec(),
            &step1,
            &moved,
            Some(vec!["agent-n2"]),
        ),
        (
            "a first install has no stable revision",
            growth_spec(),
            &first_install,
            &fleet_r1,
            None,
        ),
        (
            "the stable nodes are all moved already",
            growth_spec(),
            &canary,
            &moved,
            None,
        ),
    ];
    for (name, spec, st, pods, want) in cases {
        let got = baseline_due(&spec, st, &obs(pods));
        assert_eq!(
            got,
            want.map(|w| w.iter().map(|s| s.to_string()).collect()),
            "{name}"
        );
    }
}

#[test]
fn a_step_holds_its_moves_until_the_stable_streams_are_measured_then_records_them_once() {
    // The canary starts (r2 arrives): nothing is deleted before the stable streams are in.
    let d = run(
        &growth_spec(),
        &healthy_r1(),
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        100,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert!(deleted(&d).is_empty(), "{:?}", d.actions);
    assert!(
        d.message.contains("measuring 1 stable agents"),
        "{}",
        d.message
    );
    assert_eq!(d.state.stream_baseline, None);
    // Next reconcile: the controller measured them; recorded, and the node moves.
    let measured = Verdicts {
        baseline: Some(baseline(0, &[("n1", 12)])),
        ..Default::default()
    };
    let d = run(
        &growth_spec(),
        &d.state,
        "r2",
        &fleet("r1"),
        measured,
        102,
        Flags::default(),
    );
    assert_eq!(deleted(&d), ["agent-n1"]);
    assert_eq!(d.state.stream_baseline, Some(baseline(0, &[("n1", 12)])));
    // Later reconciles of the step keep it as it is (no status write for it).
    let later = run(
        &growth_spec(),
        &d.state,
        "r2",
        &with(fleet("r1"), "n1", "r2", true, 103),
        Verdicts::default(),
        104,
        Flags::default(),
    );
    assert_eq!(later.state.stream_baseline, d.state.stream_baseline);
    assert_eq!(later.state.window_started, Some(t(104)));
    // A measurement for another step is not taken for this one.
    let stale = Verdicts {
        baseline: Some(baseline(1, &[("n1", 12)])),
        ..Default::default()
    };
    let d = run(
        &growth_spec(),
        &healthy_r1(),
        "r2",
        &fleet("r1"),
        stale,
        100,
        Flags::default(),
    );
    assert!(deleted(&d).is_empty());
    // Healthy forgets it.
    let soak = State {
        stream_baseline: Some(baseline(2, &[("n3", 10)])),
        ..state(Phase::Soak, Some(3), 100)
    };
    let d = run(
        &growth_spec(),
        &soak,
        "r2",
        &fleet("r2"),
        Verdicts::default(),
        131,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Healthy));
    assert_eq!(d.state.stream_baseline, None);
}

/// `pods` with the agent on `node` waiting on `reason`, with its last words.
fn waiting(mut pods: Vec<PodView>, node: &str, reason: &str, words: Option<&str>) -> Vec<PodView> {
    for p in pods.iter_mut().filter(|p| p.node.as_deref() == Some(node)) {
        p.ready = false;
        p.waiting_reason = Some(reason.into());
        p.termination_message = words.map(Into::into);
    }
    pods
}

/// A Healthy revision whose agents then fail where they run: Degraded on that revision
/// (a gate downstream stops the release), no node moves, Healthy again once they run.
#[test]
fn a_settled_revision_whose_agents_fail_is_degraded_until_they_run_again() {
    let healthy = healthy_r1();
    // n2's agent after `restarts` failed runs, the last one ended at `ended`.
    let after_crashes = |restarts: i32, ended: i64, pods: Vec<PodView>| {
        let mut pods = pods;
        pods[1].restarts = restarts;
        pods[1].last_failure = Some(t(ended));
        pods[1].termination_message = Some("starting\npositions: disk full\n".into());
        pods
    };
    let crashing = after_crashes(3, 99, waiting(fleet("r1"), "n2", "CrashLoopBackOff", None));
    let mut running_again = fleet("r1");
    running_again[1].ready = false;
    // (case, pods, phase, reason contains); Degraded names r1 as failed
    let cases: Vec<(&str, Vec<PodView>, Phase, &str)> = vec![
        ("all running", fleet("r1"), Phase::Healthy, ""),
        (
            "a node not Ready (node trouble) stays Healthy",
            with(fleet("r1"), "n2", "r1", false, 0),
            Phase::Healthy,
            "",
        ),
        (
            "a starting container is not a failure",
            waiting(fleet("r1"), "n2", "ContainerCreating", None),
            Phase::Healthy,
            "",
        ),
        (
            "a crash loop with its last words",
            crashing.clone(),
            Phase::Degraded,
            "on 1/4 nodes: CrashLoopBackOff on n2: agent exited: positions: disk full",
        ),
        (
            "one crash (an OOM kill) waiting out its back-off is no crash loop",
            after_crashes(1, 99, waiting(fleet("r1"), "n2", "CrashLoopBackOff", None)),
            Phase::Healthy,
            "",
        ),
        (
            "between two crashes of a loop: running again, not Ready yet",
            after_crashes(3, 95, running_again.clone()),
            Phase::Degraded,
            "restarting on n2: agent exited: positions: disk full",
        ),
        (
            "crashes long ago, not Ready now (its store is away): no crash loop",
            after_crashes(5, 100 - 601, running_again.clone()),
            Phase::Healthy,
            "",
        ),
        (
            "Ready again after a crash loop",
            after_crashes(3, 95, {
                let mut pods = fleet("r1");
                pods[1].containers_ready = true;
                pods
            }),
            Phase::Healthy,
            "",
        ),
        (
            "an image gone",
            waiting(fleet("r1"), "n4", "ImagePullBackOff", None),
            Phase::Degraded,
            "ImagePullBackOff on n4",
        ),
    ];
    for (case, pods, phase, reason) in cases {
        let failed = (phase == Phase::Degraded).then_some("r1");
        let d = run(
            &spec(),
            &healthy,
            "r1",
            &pods,
            Verdicts::default(),
            100,
            Flags::default(),
        );
        assert_eq!(d.state.phase, Some(phase), "{case}: {}", d.message);
        assert_eq!(d.state.failed.as_deref(), failed, "{case}");
        assert!(
            d.state
                .reason
                .as_deref()
                .unwrap_or_default()
                .contains(reason),
            "{case}: {:?}",
            d.state.reason
        );
        assert!(deleted(&d).is_empty(), "{case}: nothing moves");
        assert_eq!(d.template, Template::Target, "{case}");
        assert_eq!(d.state.stable.as_deref(), Some("r1"), "{case}");
    }

    // Degraded on r1: it stays so (same start) while the crash goes on, even on promote.
    let failing = run(
        &spec(),
        &healthy,
        "r1",
        &crashing,
        Verdicts::default(),
        100,
        Flags::default(),
    );
    assert!(failing.state.settled_failure());
    assert!(
        failing.message.contains("revision r1: agents failing"),
        "{}",
        failing.message
    );
    let flags = Flags {
        promote: true,
        ..Default::default()
    };
    let still = run(
        &spec(),
        &failing.state,
        "r1",
        &crashing,
        Verdicts::default(),
        160,
        flags,
    );
    assert_eq!(still.state.phase, Some(Phase::Degraded));
    assert_eq!(still.state.step_started, Some(t(100)));
    assert!(deleted(&still).is_empty());

    // The agent runs again (not Ready yet, then Ready): Healthy, nothing moved.
    let running = with(fleet("r1"), "n2", "r1", false, 170);
    let back = run(
        &spec(),
        &failing.state,
        "r1",
        &running,
        Verdicts::default(),
        170,
        Flags::default(),
    );
    assert_eq!(back.state.phase, Some(Phase::Healthy), "{}", back.message);
    assert_eq!(back.state.failed, None);
    assert_eq!(back.state.reason, None);
    assert!(deleted(&back).is_empty());

    // A new revision while r1 fails: a rollout as usual, from the canary.
    let next = run(
        &spec(),
        &failing.state,
        "r2",
        &crashing,
        Verdicts::default(),
        180,
        Flags::default(),
    );
    assert_eq!(next.state.phase, Some(Phase::Canary), "{}", next.message);
    assert!(!next.state.settled_failure());
}

/// A rolled-back revision is not a settled failure, nor is a failed first install.
#[test]
fn settled_failure_is_only_the_stable_revision_failing() {
    let rolled_back = State {
        phase: Some(Phase::Degraded),
        target: Some("r2".into()),
        stable: Some("r1".into()),
        failed: Some("r2".into()),
        ..Default::default()
    };
    assert!(!rolled_back.settled_failure());
    let first_install = State {
        stable: None,
        target: Some("r1".into()),
        failed: Some("r1".into()),
        ..rolled_back.clone()
    };
    assert!(!first_install.settled_failure());
    let settled = State {
        target: Some("r1".into()),
        failed: Some("r1".into()),
        ..rolled_back
    };
    assert!(settled.settled_failure());
}

#[test]
fn the_default_drop_check_holds_the_canary_until_the_stable_agents_are_measured() {
    let d = run(
        &drops_spec(),
        &healthy_r1(),
        "r2",
        &fleet("r1"),
        Verdicts::default(),
        100,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::Canary));
    assert!(deleted(&d).is_empty(), "{:?}", d.actions);
    assert!(
        d.message.contains("measuring 1 stable agents"),
        "{}",
        d.message
    );
    let mut measured = baseline(0, &[]);
    measured.drops.insert(
        "n1".into(),
        crate::crd::LineCounts {
            read: 1200,
            dropped: 0,
        },
    );
    let d = run(
        &drops_spec(),
        &d.state,
        "r2",
        &fleet("r1"),
        Verdicts {
            baseline: Some(measured.clone()),
            ..Default::default()
        },
        102,
        Flags::default(),
    );
    assert_eq!(deleted(&d), ["agent-n1"]);
    assert_eq!(d.state.stream_baseline, Some(measured));
}

/// The end of the canary's window, every check passing but the store's, which cannot be
/// reached: the step holds (no rollback, no next step), says so, and asks again; it goes
/// on once the store answers, or on promote.
#[test]
fn an_unreachable_store_holds_the_step_until_it_answers_or_a_promote() {
    let mut watching = state(Phase::Canary, Some(0), 100);
    watching.window_started = Some(t(105));
    let pods = with(fleet("r1"), "n1", "r2", true, 101);
    let outage = "VictoriaLogs query: connection refused";
    let unreachable = Verdicts {
        verification: Some(Verdict {
            final_check: true,
            passed: false,
            summary: format!("storeEntries - (limit >0): {outage}"),
            store_unreachable: Some(outage.into()),
        }),
        ..Default::default()
    };
    let held = run(
        &spec(),
        &watching,
        "r2",
        &pods,
        unreachable.clone(),
        116,
        Flags::default(),
    );
    assert_eq!(held.state, watching, "neither rolled back nor moved on");
    assert!(deleted(&held).is_empty());
    let hold = held.store_unreachable.as_deref().unwrap_or_default();
    assert!(
        hold.starts_with("canary: holding at revision r2") && hold.contains(outage),
        "{hold}"
    );
    assert_eq!(held.message, hold);
    assert_eq!(held.requeue, STORE_RETRY, "asked again, not at every look");

    // The store answers at a later look: on to step 1.
    let d = run(
        &spec(),
        &held.state,
        "r2",
        &pods,
        verdict(true, true),
        130,
        Flags::default(),
    );
    assert_eq!((d.state.phase, d.state.step), (Some(Phase::Step), Some(1)));
    assert_eq!(d.store_unreachable, None);

    // Promoted while it holds: on without the store.
    let flags = Flags {
        promote: true,
        ..Default::default()
    };
    let d = run(&spec(), &watching, "r2", &pods, unreachable, 120, flags);
    assert_eq!((d.state.phase, d.state.step), (Some(Phase::Step), Some(1)));
    assert_eq!(d.store_unreachable, None);

    // Anything else failing rolls back as ever.
    let d = run(
        &spec(),
        &watching,
        "r2",
        &pods,
        verdict(true, false),
        116,
        Flags::default(),
    );
    assert_eq!(d.state.phase, Some(Phase::RollingBack));
}
