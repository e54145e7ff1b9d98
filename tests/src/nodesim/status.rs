//! The pod status a kubelet would write for a simulated agent pod.

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
