//! The pod status a kubelet would write for a simulated agent pod.
//!
//! Termination messages, as the kubelet makes them ([`termination_message`]): the
//! content of the container's termination-message file (its first 4 KiB), else, when
//! the file is empty, the container failed (exit code not 0) and its
//! `terminationMessagePolicy` is `FallbackToLogsOnError`, the end of its log of that run
//! (at most 80 lines and 2 KiB).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// The kubelet's limits (`kubecontainer.MaxContainerTerminationMessage*`).
pub const MAX_MESSAGE_BYTES: usize = 4096;
pub const MAX_LOG_LINES: usize = 80;
pub const MAX_LOG_BYTES: usize = 2048;
/// First line of the simulator's banner before each run of an agent in its log.
pub const BANNER_PREFIX: &str = "--- nodesim ";

/// The last `max_bytes` of `text`, cut forward to a character boundary.
fn tail_bytes(text: &str, max_bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(max_bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The first `max_bytes` of `text`, cut back to a character boundary.
fn head_bytes(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The output of the latest run in an agent's log: what follows the last banner (the
/// simulator appends every run of a pod's agent to one file, each after a banner).
pub fn current_run(log: &str) -> &str {
    let start = if log.starts_with(BANNER_PREFIX) {
        Some(0)
    } else {
        None
    };
    let Some(banner) = log
        .rfind(&format!("\n{BANNER_PREFIX}"))
        .map(|i| i + 1)
        .or(start)
    else {
        return log;
    };
    // The banner is its first line and the `--- args:` line after it.
    let mut rest = &log[banner..];
    for _ in 0..2 {
        if rest.starts_with("--- ") {
            rest = rest.split_once('\n').map_or("", |(_, r)| r);
        }
    }
    rest
}

/// The end of a run's log, as the kubelet quotes it: the last 80 lines, then the last
/// 2 KiB of those.
pub fn log_tail(run: &str) -> &str {
    let trimmed = run.trim_end_matches('\n');
    let start = trimmed
        .rmatch_indices('\n')
        .nth(MAX_LOG_LINES - 1)
        .map_or(0, |(i, _)| i + 1);
    tail_bytes(&trimmed[start..], MAX_LOG_BYTES)
}

/// The termination message of a container that ended with `exit_code` (see the module
/// doc). `file`: its termination-message file (`None`: none); `log`: its log's latest
/// run, read only when needed.
pub fn termination_message(
    file: Option<&str>,
    policy: Option<&str>,
    exit_code: i32,
    log: impl FnOnce() -> Option<String>,
) -> Option<String> {
    if let Some(text) = file.filter(|t| !t.is_empty()) {
        return Some(head_bytes(text, MAX_MESSAGE_BYTES).to_string());
    }
    if policy != Some("FallbackToLogsOnError") || exit_code == 0 {
        return None;
    }
    let log = log()?;
    let tail = log_tail(current_run(&log));
    (!tail.trim().is_empty()).then(|| tail.to_string())
}

/// The state of the simulated (first) container.
#[derive(Clone, Debug)]
pub enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: Time,
        container_id: String,
    },
    Terminated(ContainerStateTerminated),
}

impl State {
    fn to_api(&self) -> ContainerState {
        match self {
            State::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: Some(message.clone()).filter(|m| !m.is_empty()),
                }),
                ..Default::default()
            },
            State::Running { started_at, .. } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            },
            State::Terminated(t) => ContainerState {
                terminated: Some(t.clone()),
                ..Default::default()
            },
        }
    }

    fn container_id(&self) -> Option<String> {
        match self {
            State::Running { container_id, .. } => Some(container_id.clone()),
            State::Terminated(t) => t.container_id.clone(),
            State::Waiting { .. } => None,
        }
    }
}

/// Everything the status is computed from.
pub struct Input<'a> {
    pub pod: &'a Pod,
    pub host_ip: Option<&'a str>,
    pub pod_ip: Option<&'a str>,
    pub start_time: &'a Time,
    pub state: &'a State,
    pub last_state: Option<&'a ContainerStateTerminated>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
    pub image_id: &'a str,
    /// The container has run at least once (phase Running rather than Pending).
    pub has_run: bool,
    /// Set when the pod is done (deleted and its container stopped).
    pub terminal_phase: Option<&'static str>,
}

/// Remembers when each condition last changed, as `lastTransitionTime` requires.
#[derive(Debug, Default)]
pub struct Transitions(BTreeMap<String, (String, Time)>);

impl Transitions {
    /// Seed from the pod's current status (a restarted simulator keeps the old times).
    pub fn from_pod(pod: &Pod) -> Self {
        let mut map = BTreeMap::new();
        for c in pod
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
        {
            if let Some(t) = &c.last_transition_time {
                map.insert(c.type_.clone(), (c.status.clone(), t.clone()));
            }
        }
        Self(map)
    }

    fn condition(
        &mut self,
        type_: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let status = if ok { "True" } else { "False" }.to_string();
        let entry = self
            .0
            .entry(type_.to_string())
            .or_insert_with(|| (status.clone(), now()));
        if entry.0 != status {
            *entry = (status.clone(), now());
        }
        PodCondition {
            type_: type_.to_string(),
            status,
            last_transition_time: Some(entry.1.clone()),
            reason: reason.map(str::to_string),
            message,
            ..Default::default()
        }
    }
}

pub fn build(input: &Input<'_>, transitions: &mut Transitions) -> PodStatus {
    let spec = input.pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let first_name = containers
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let mut statuses = Vec::new();
    for (i, container) in containers.iter().enumerate() {
        if i == 0 {
            statuses.push(ContainerStatus {
                name: container.name.clone(),
                image: container.image.clone().unwrap_or_default(),
                image_id: input.image_id.to_string(),
                container_id: input.state.container_id(),
                ready: input.ready,
                started: Some(input.started),
                restart_count: input.restart_count,
                state: Some(input.state.to_api()),
                last_state: Some(ContainerState {
                    terminated: input.last_state.cloned(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        } else {
            // Only the first container runs a process; sidecars are reported running,
            // as KWOK would report them.
            statuses.push(ContainerStatus {
                name: container.name.clone(),
                image: container.image.clone().unwrap_or_default(),
                image_id: String::new(),
                ready: input.terminal_phase.is_none(),
                started: Some(input.terminal_phase.is_none()),
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(input.start_time.clone()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    let not_ready =
        (!input.ready).then(|| format!("containers with unready status: [{first_name}]"));
    let reason = (!input.ready).then_some("ContainersNotReady");
    let conditions = vec![
        transitions.condition(
            "PodReadyToStartContainers",
            input.pod_ip.is_some(),
            None,
            None,
        ),
        transitions.condition("Initialized", true, None, None),
        transitions.condition("Ready", input.ready, reason, not_ready.clone()),
        transitions.condition("ContainersReady", input.ready, reason, not_ready),
        transitions.condition("PodScheduled", true, None, None),
    ];
    let phase = input
        .terminal_phase
        .unwrap_or(if input.has_run { "Running" } else { "Pending" });
    PodStatus {
        phase: Some(phase.to_string()),
        host_ip: input.host_ip.map(str::to_string),
        host_ips: input.host_ip.map(|ip| vec![HostIP { ip: ip.to_string() }]),
        pod_ip: input.pod_ip.map(str::to_string),
        pod_ips: input.pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
        start_time: Some(input.start_time.clone()),
        conditions: Some(conditions),
        container_statuses: Some(statuses),
        observed_generation: input.pod.metadata.generation,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    #[test]
    fn termination_message_table() {
        let fallback = Some("FallbackToLogsOnError");
        let log = "--- nodesim t0: starting a\n--- args: [\"--config\"]\nold run line\n\
                   --- nodesim t1: starting a\n--- args: [\"--config\"]\nstarting\n\
                   logpipe-agent: regex stage 2: missing ]\n";
        let long: String = (0..200).map(|i| format!("line {i}\n")).collect();
        type Case = (
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            i32,
            Option<String>,
            Option<String>,
        );
        let cases: [Case; 7] = [
            (
                "the file wins",
                Some("regex stage 2: missing ]"),
                fallback,
                1,
                Some(log.into()),
                Some("regex stage 2: missing ]".into()),
            ),
            (
                "the file, even on a clean exit",
                Some("bye"),
                None,
                0,
                None,
                Some("bye".into()),
            ),
            (
                "empty file, failed, fallback: this run's log",
                Some(""),
                fallback,
                1,
                Some(log.into()),
                Some("starting\nlogpipe-agent: regex stage 2: missing ]".into()),
            ),
            (
                "empty file, policy File: nothing",
                Some(""),
                Some("File"),
                1,
                Some(log.into()),
                None,
            ),
            (
                "empty file, exit 0: nothing",
                None,
                fallback,
                0,
                Some(log.into()),
                None,
            ),
            ("no log either", None, fallback, 137, None, None),
            (
                "a long log: its last 80 lines",
                None,
                fallback,
                1,
                Some(long.clone()),
                Some(
                    long.trim_end()
                        .lines()
                        .skip(120)
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            ),
        ];
        for (name, file, policy, code, log, want) in cases {
            assert_eq!(
                termination_message(file, policy, code, || log),
                want,
                "{name}"
            );
        }
        let huge = "x".repeat(10_000);
        assert_eq!(
            termination_message(Some(&huge), None, 1, || None).map(|m| m.len()),
            Some(MAX_MESSAGE_BYTES)
        );
        let wide: String = (0..50).map(|_| format!("{}\n", "é".repeat(30))).collect();
        let tail = termination_message(None, fallback, 1, || Some(wide)).unwrap();
        assert!(tail.len() <= MAX_LOG_BYTES, "{}", tail.len());
        assert!(tail.starts_with('é'));
    }

    #[test]
    fn the_current_run_is_after_the_last_banner() {
        assert_eq!(current_run("no banner\n"), "no banner\n");
        assert_eq!(
            current_run("--- nodesim a\n--- args: []\nhello\n"),
            "hello\n"
        );
        assert_eq!(
            current_run("x\n--- nodesim a\n--- args: []\none\n--- nodesim b\n--- args: []\ntwo\n"),
            "two\n"
        );
    }

    #[test]
    fn pending_with_image_pull_error() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "agent".into(),
                    image: Some("x/logpipe-agent:nope".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let start = now();
        let state = State::Waiting {
            reason: "ErrImagePull".into(),
            message: "Failed to pull image".into(),
        };
        let mut transitions = Transitions::default();
        let status = build(
            &Input {
                pod: &pod,
                host_ip: Some("127.200.0.1"),
                pod_ip: Some("127.16.0.254"),
                start_time: &start,
                state: &state,
                last_state: None,
                restart_count: 0,
                ready: false,
                started: false,
                image_id: "",
                has_run: false,
                terminal_phase: None,
            },
            &mut transitions,
        );
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let cs = &status.container_statuses.unwrap()[0];
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("ErrImagePull")
        );
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [agent]")
        );
    }
}
