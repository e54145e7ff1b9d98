//! One simulated kubelet pod worker: it owns one agent pod from its first sight to its
//! final deletion, and the agent process in between.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerStateTerminated, Node, Pod, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::downward::{Facts, expand};
use super::ipam::Cidr;
use super::probe::{Prober, Verdict};
use super::process::{Exit, Launch, Proc, Record};
use super::status::{self, Input, State, Transitions};
use super::volumes::{self, Mounts};
use super::{Ctx, FAKE_NODE_ANNOTATION, FAKE_NODE_VALUE};

/// What the main loop tells a worker about its pod.
#[derive(Clone, Debug)]
pub enum Update {
    Present(Arc<Pod>),
    /// The pod is gone from the API (deleted outright, or never seen again after a
    /// re-list).
    Gone,
}

/// Why a worker stops its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The pod has a deletionTimestamp: stop, then make the final delete.
    Deleting,
    /// The pod no longer exists.
    Gone,
    /// The simulator itself is stopping.
    Shutdown,
}

/// Ports the agent's metrics server may be named in the pod spec.
const METRICS_PORT_NAMES: [&str; 3] = ["metrics", "http-metrics", "http"];
const DEFAULT_LISTEN_PORT: u16 = 12345;
/// Agent flags the simulator always sets itself; copies in the container args are dropped
/// (the agent refuses a flag given twice).
const OVERRIDDEN_FLAGS: [&str; 6] = [
    "--node-name",
    "--listen",
    "--log-root",
    "--kubeconfig",
    "--positions",
    "--termination-log",
];
const DEFAULT_POSITIONS: &str = "/var/lib/logpipe/positions.json";
/// A container that ran this long gets its crash back-off reset, as on a kubelet.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Why a container cannot start, with the waiting reason a kubelet shows for it.
enum NotStarted {
    /// No sandbox (IP, node): `ContainerCreating`.
    Sandbox(String),
    /// No binary for the image: `ErrImagePull`.
    Image(String),
    /// Volumes could not be mounted: `ContainerCreating`.
    Mount(String),
    /// Env or args could not be built: `CreateContainerConfigError`.
    Config(String),
}

impl NotStarted {
    fn waiting(&self) -> State {
        let (reason, message) = match self {
            NotStarted::Sandbox(m) | NotStarted::Mount(m) => ("ContainerCreating", m),
            NotStarted::Image(m) => ("ErrImagePull", m),
            NotStarted::Config(m) => ("CreateContainerConfigError", m),
        };
        State::Waiting {
            reason: reason.into(),
            message: message.clone(),
        }
    }
}

/// The container, ready to run.
struct Prepared {
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    image: String,
    readiness: Option<Prober>,
    liveness: Option<Prober>,
    startup: Option<Prober>,
}

enum Outcome {
    Exited(Exit, Time),
    Restart(Exit, Time),
    Stop(Stop),
}

pub struct Worker {
    ctx: Arc<Ctx>,
    uid: String,
    namespace: String,
    name: String,
    pod: Arc<Pod>,
    updates: watch::Receiver<Update>,
    shutdown: watch::Receiver<bool>,
    adopt: Option<Record>,
    ip: Option<Ipv4Addr>,
    host_ip: Option<String>,
    restart_count: i32,
    last_state: Option<ContainerStateTerminated>,
    has_run: bool,
    transitions: Transitions,
    start_time: Time,
    image_id: String,
    published: Option<serde_json::Value>,
    warned_sidecars: bool,
    last_warning: Option<String>,
}

impl Worker {
    pub fn new(
        ctx: Arc<Ctx>,
        pod: Arc<Pod>,
        updates: watch::Receiver<Update>,
        adopt: Option<Record>,
    ) -> Self {
        let shutdown = ctx.shutdown.clone();
        let status = pod.status.clone().unwrap_or_default();
        let first = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone());
        let previous = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| Some(&c.name) == first.as_ref())
            .cloned();
        // A pod seen before (simulator restart) keeps its counters and history.
        let restart_count = previous.as_ref().map(|c| c.restart_count).unwrap_or(0);
        let last_state = previous
            .as_ref()
            .and_then(|c| c.last_state.as_ref())
            .and_then(|s| s.terminated.clone());
        let has_run = previous
            .as_ref()
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            || last_state.is_some();
        Self {
            uid: pod.uid().unwrap_or_default(),
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            transitions: Transitions::from_pod(&pod),
            start_time: status.start_time.clone().unwrap_or_else(status::now),
            pod,
            updates,
            shutdown,
            adopt,
            ip: None,
            host_ip: None,
            restart_count,
            last_state,
            has_run,
            image_id: String::new(),
            published: None,
            warned_sidecars: false,
            last_warning: None,
            ctx,
        }
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx.state_dir().join("pods").join(&self.uid)
    }

    fn container(&self) -> Option<Container> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first().cloned())
    }

    /// The pod's own stop condition, if any; also takes the newest pod object.
    fn stop_reason(&mut self) -> Option<Stop> {
        if *self.shutdown.borrow() {
            return Some(Stop::Shutdown);
        }
        match &*self.updates.borrow_and_update() {
            Update::Gone => return Some(Stop::Gone),
            Update::Present(pod) => self.pod = pod.clone(),
        }
        self.pod
            .metadata
            .deletion_timestamp
            .is_some()
            .then_some(Stop::Deleting)
    }

    /// Sleep up to `duration`, waking early for a stop condition.
    async fn pause(&mut self, duration: Duration) -> Option<Stop> {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            if let Some(stop) = self.stop_reason() {
                return Some(stop);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                changed = self.updates.changed() => if changed.is_err() { return Some(Stop::Shutdown) },
                changed = self.shutdown.changed() => if changed.is_err() { return Some(Stop::Shutdown) },
            }
        }
    }

    pub async fn run(mut self) {
        tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), uid = %self.uid, "taking the pod");
        let mut proc: Option<Proc> = None;
        let mut backoff = self.ctx.opts.backoff_initial;
        let stop = 'life: loop {
            if let Some(stop) = self.stop_reason() {
                break stop;
            }
            let prepared = match self.prepare().await {
                Ok(p) => p,
                Err(not_started) => {
                    let state = not_started.waiting();
                    // Retried every few seconds: say it once per distinct reason.
                    if let State::Waiting { reason, message } = &state
                        && self.last_warning.as_ref() != Some(message)
                    {
                        tracing::warn!(pod = %self.name, %reason, %message, "container cannot start");
                        self.last_warning = Some(message.clone());
                    }
                    self.publish(&state, false, false, None).await;
                    if let Some(stop) = self.pause(self.ctx.opts.retry_interval).await {
                        break stop;
                    }
                    continue;
                }
            };
            self.image_id = self
                .ctx
                .images
                .image_id(&prepared.image, &prepared.binary)
                .unwrap_or_default();
            loop {
                let adopted = self.adopt.take().and_then(|r| {
                    let live = r.live_process();
                    if live.is_none() {
                        // It died while nobody watched: that is a restart.
                        self.restart_count += 1;
                    }
                    live.map(|p| (p, r.started_at))
                });
                let (mut running, started_at) = match adopted {
                    Some((p, started_at)) => {
                        tracing::info!(pod = %self.name, pid = p.pid(), "adopted the running agent");
                        let started_at = started_at
                            .parse()
                            .map(Time)
                            .unwrap_or_else(|_| status::now());
                        (p, started_at)
                    }
                    None => match self.start(&prepared) {
                        Ok(started) => started,
                        Err(message) => {
                            tracing::warn!(pod = %self.name, %message, "agent did not start");
                            let state = State::Waiting {
                                reason: "RunContainerError".into(),
                                message,
                            };
                            self.publish(&state, false, false, None).await;
                            if let Some(stop) = self.pause(backoff).await {
                                break 'life stop;
                            }
                            backoff = (backoff * 2).min(self.ctx.opts.backoff_max);
                            continue;
                        }
                    },
                };
                self.has_run = true;
                let began = Instant::now();
                let outcome = self.supervise(&mut running, &prepared, &started_at).await;
                let (exit, finished_at) = match outcome {
                    Outcome::Stop(stop) => {
                        proc = Some(running);
                        break 'life stop;
                    }
                    Outcome::Exited(exit, at) => (exit, at),
                    Outcome::Restart(exit, at) => (exit, at),
                };
                running.kill_group();
                Record::remove(&self.ctx.state_dir(), &self.uid);
                tracing::warn!(pod = %self.name, pid = running.pid(), ?exit, "agent exited; restarting with back-off");
                let words = self.last_words(exit);
                self.last_state = Some(terminated(&running, exit, &started_at, finished_at, words));
                self.restart_count += 1;
                if began.elapsed() >= BACKOFF_RESET_AFTER {
                    backoff = self.ctx.opts.backoff_initial;
                }
                let container = self.container().map(|c| c.name).unwrap_or_default();
                let state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "back-off {}s restarting failed container={container} pod={}_{}({})",
                        backoff.as_secs(),
                        self.name,
                        self.namespace,
                        self.uid
                    ),
                };
                self.publish(&state, false, false, None).await;
                if let Some(stop) = self.pause(backoff).await {
                    break 'life stop;
                }
                backoff = (backoff * 2).min(self.ctx.opts.backoff_max);
            }
        };
        self.finish(stop, proc).await;
    }

    /// Stop the agent (if any) for `stop`, report it, and for a deleted pod make the
    /// final delete that lets the DaemonSet controller create the replacement.
    async fn finish(mut self, stop: Stop, proc: Option<Proc>) {
        // A record adopted but never resumed still names a live process: stop it too.
        let mut proc = proc.or_else(|| self.adopt.take().and_then(|r| r.live_process()));
        let grace = self.grace();
        let mut final_state = None;
        if let Some(running) = proc.as_mut() {
            tracing::info!(pod = %self.name, pid = running.pid(), ?stop, grace_s = grace.as_secs(), "stopping the agent (SIGTERM)");
            let started_at = self.started_at_of_current();
            let exit = running.stop(grace).await;
            tracing::info!(pod = %self.name, pid = running.pid(), ?exit, "agent stopped");
            let words = self.last_words(exit);
            final_state = Some(terminated(running, exit, &started_at, status::now(), words));
        }
        Record::remove(&self.ctx.state_dir(), &self.uid);
        match stop {
            Stop::Deleting => {
                let terminal = match &final_state {
                    Some(t) if t.exit_code == 0 => "Succeeded",
                    _ => "Failed",
                };
                let state = final_state.map(State::Terminated).unwrap_or_else(|| {
                    State::Terminated(ContainerStateTerminated {
                        exit_code: 0,
                        reason: Some("ContainerStatusUnknown".into()),
                        ..Default::default()
                    })
                });
                self.publish(&state, false, false, Some(terminal)).await;
                self.final_delete().await;
                self.cleanup();
            }
            Stop::Gone => self.cleanup(),
            Stop::Shutdown => {
                // Leave the pod to the next simulator run, marked not ready so no one
                // mistakes a stopped agent for a working one.
                if let Some(t) = final_state {
                    self.restart_count += 1;
                    self.last_state = Some(t);
                    let state = State::Waiting {
                        reason: "ContainerCreating".into(),
                        message: "node simulator stopped".into(),
                    };
                    self.publish(&state, false, false, None).await;
                }
                if let Ok(mut ipam) = self.ctx.ipam.lock() {
                    ipam.release(&self.uid);
                }
            }
        }
        tracing::info!(pod = %self.name, uid = %self.uid, ?stop, "done with the pod");
    }

    fn cleanup(&self) {
        if let Ok(mut ipam) = self.ctx.ipam.lock() {
            ipam.release(&self.uid);
        }
        let _ = std::fs::remove_dir_all(self.pod_dir());
        if let Some(dir) = self.kubelet_pod_dir() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn agent_log(&self) -> PathBuf {
        self.ctx.agent_logs_dir().join(format!("{}.log", self.name))
    }

    /// `<node>/var/lib/kubelet/pods/<uid>`, as on a node: the pod's kubelet files.
    fn kubelet_pod_dir(&self) -> Option<PathBuf> {
        let node = self.pod.spec.as_ref()?.node_name.as_deref()?;
        Some(
            self.ctx
                .node_dir(node)
                .join("var/lib/kubelet/pods")
                .join(&self.uid),
        )
    }

    /// The host file behind the container's `terminationMessagePath`; the agent gets it
    /// as `--termination-log`.
    fn termination_file(&self) -> Option<PathBuf> {
        let container = self.container()?.name;
        Some(
            self.kubelet_pod_dir()?
                .join("containers")
                .join(container)
                .join("termination-log"),
        )
    }

    /// The termination message of the run that just ended with `exit`, as a kubelet
    /// makes it (see `status::termination_message`).
    fn last_words(&self, exit: Exit) -> Option<String> {
        let file = self
            .termination_file()
            .and_then(|f| std::fs::read(f).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let policy = self.container().and_then(|c| c.termination_message_policy);
        status::termination_message(
            file.as_deref(),
            policy.as_deref(),
            exit.container_code(),
            || read_tail(&self.agent_log(), 64 * 1024),
        )
    }

    fn started_at_of_current(&self) -> Time {
        self.published
            .as_ref()
            .and_then(|v| v.pointer("/containerStatuses/0/state/running/startedAt"))
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .map(Time)
            .unwrap_or_else(status::now)
    }

    /// The grace period: what the deletion asked for, else the pod's own.
    fn grace(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .clamp(0, 3600);
        Duration::from_secs(u64::try_from(seconds).unwrap_or(30))
    }

    async fn final_delete(&self) {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&self.name, &params).await {
            Ok(_) => tracing::info!(pod = %self.name, "pod deleted (grace 0)"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.name, error = %e, "final delete failed"),
        }
    }

    fn start(&mut self, prepared: &Prepared) -> Result<(Proc, Time), String> {
        let started_at = status::now();
        let log = self.agent_log();
        // A new, empty termination-message file for each run, as the kubelet makes one
        // per container instance.
        if let Some(file) = self.termination_file() {
            let fresh = file
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&file, b""));
            if let Err(e) = fresh {
                tracing::warn!(pod = %self.name, path = %file.display(), error = %e, "cannot create the termination-message file");
            }
        }
        let banner = format!(
            "--- nodesim {}: starting {} for pod {}/{} (uid {}, restart {})\n--- args: {:?}",
            started_at.0,
            prepared.binary.display(),
            self.namespace,
            self.name,
            self.uid,
            self.restart_count,
            prepared.args
        );
        let rootfs = self.pod_dir().join("rootfs");
        let running = Proc::spawn(&Launch {
            binary: &prepared.binary,
            args: &prepared.args,
            env: &prepared.env,
            cwd: &rootfs,
            log: &log,
            banner,
        })
        .map_err(|e| e.to_string())?;
        let record = Record {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            pid: running.pid(),
            start_ticks: super::process::start_ticks(running.pid()).unwrap_or_default(),
            binary: prepared.binary.clone(),
            pod_ip: self.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            node: self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            started_at: started_at.0.to_string(),
        };
        if let Err(e) = record.save(&self.ctx.state_dir()) {
            tracing::warn!(pod = %self.name, error = %e, "cannot record the agent's PID; a simulator restart will not find it");
        }
        tracing::info!(pod = %self.name, pid = running.pid(), ip = ?self.ip, binary = %prepared.binary.display(), "agent started");
        Ok((running, started_at))
    }

    /// Watch a running agent: probes, exit, stop conditions.
    async fn supervise(
        &mut self,
        running: &mut Proc,
        prepared: &Prepared,
        started_at: &Time,
    ) -> Outcome {
        let Some(ip) = self.ip else {
            return Outcome::Stop(Stop::Shutdown);
        };
        let container_id = format!("nodesim://{}", running.pid());
        let state = State::Running {
            started_at: started_at.clone(),
            container_id,
        };
        let mut readiness = prepared.readiness.clone();
        let mut liveness = prepared.liveness.clone();
        let mut startup = prepared.startup.clone();
        let mut started = startup.is_none();
        // Without a readiness probe a started container is ready at once.
        let mut ready = started && readiness.is_none();
        let now = tokio::time::Instant::now();
        let first = |p: &Option<Prober>| p.as_ref().map(|p| now + p.initial_delay);
        let mut next_startup = first(&startup);
        let mut next_readiness = first(&readiness);
        let mut next_liveness = first(&liveness);
        let far = now + Duration::from_secs(3600 * 24 * 365);
        let mut resync = tokio::time::interval(Duration::from_secs(2));
        self.publish(&state, ready, started, None).await;
        loop {
            if let Some(stop) = self.stop_reason() {
                return Outcome::Stop(stop);
            }
            let probe_due = [
                if started { None } else { next_startup },
                if started { next_readiness } else { None },
                if started { next_liveness } else { None },
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far);
            tokio::select! {
                exit = running.wait() => return Outcome::Exited(exit, status::now()),
                changed = self.updates.changed() => if changed.is_err() { return Outcome::Stop(Stop::Shutdown) },
                changed = self.shutdown.changed() => if changed.is_err() { return Outcome::Stop(Stop::Shutdown) },
                _ = resync.tick() => {
                    // A status patch that failed is retried here, and the imageID is
                    // filled in once the binary's digest is known.
                    if self.image_id.is_empty()
                        && let Some(id) = self.ctx.images.image_id(&prepared.image, &prepared.binary)
                    {
                        self.image_id = id;
                    }
                    self.publish(&state, ready, started, None).await;
                }
                _ = tokio::time::sleep_until(probe_due) => {
                    let now = tokio::time::Instant::now();
                    let http = self.ctx.http.clone();
                    if !started
                        && let (Some(p), Some(at)) = (startup.as_mut(), next_startup)
                        && at <= now
                    {
                        next_startup = Some(now + p.period);
                        match p.run(&http, ip).await {
                            Verdict::Passing => {
                                started = true;
                                let now = tokio::time::Instant::now();
                                next_readiness = readiness.as_ref().map(|_| now);
                                next_liveness = liveness.as_ref().map(|_| now);
                                ready = readiness.is_none();
                            }
                            Verdict::Failing => {
                                tracing::warn!(pod = %self.name, "startup probe failed; restarting the agent");
                                let exit = running.stop(self.grace()).await;
                                return Outcome::Restart(exit, status::now());
                            }
                            Verdict::Undecided => {}
                        }
                    }
                    if started
                        && let (Some(p), Some(at)) = (readiness.as_mut(), next_readiness)
                        && at <= now
                    {
                        next_readiness = Some(now + p.period);
                        match p.run(&http, ip).await {
                            Verdict::Passing => ready = true,
                            Verdict::Failing => ready = false,
                            Verdict::Undecided => {}
                        }
                    }
                    if started
                        && let (Some(p), Some(at)) = (liveness.as_mut(), next_liveness)
                        && at <= now
                    {
                        next_liveness = Some(now + p.period);
                        if p.run(&http, ip).await == Verdict::Failing {
                            tracing::warn!(pod = %self.name, "liveness probe failed; restarting the agent");
                            p.reset();
                            let exit = running.stop(self.grace()).await;
                            return Outcome::Restart(exit, status::now());
                        }
                    }
                    self.publish(&state, ready, started, None).await;
                }
            }
        }
    }

    /// Write the pod status if it changed since the last successful write.
    async fn publish(
        &mut self,
        state: &State,
        ready: bool,
        started: bool,
        terminal: Option<&'static str>,
    ) {
        let pod = self.pod.clone();
        let pod_ip = self.ip.map(|ip| ip.to_string());
        let status = status::build(
            &Input {
                pod: &pod,
                host_ip: self.host_ip.as_deref(),
                pod_ip: pod_ip.as_deref(),
                start_time: &self.start_time,
                state,
                last_state: self.last_state.as_ref(),
                restart_count: self.restart_count,
                ready,
                started,
                image_id: &self.image_id,
                has_run: self.has_run,
                terminal_phase: terminal,
            },
            &mut self.transitions,
        );
        // Someone else rewrote the conditions (the node lifecycle controller marks pods
        // not Ready when a node's heartbeat lapses): what we published no longer stands.
        if condition_states(self.pod.status.as_ref()) != condition_states(Some(&status)) {
            self.published = None;
        }
        let Ok(value) = serde_json::to_value(&status) else {
            return;
        };
        if self.published.as_ref() == Some(&value) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = serde_json::json!({ "status": value });
        match api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.published = Some(value),
            Err(kube::Error::Api(e)) if e.code == 404 => self.published = Some(value),
            Err(e) => {
                tracing::warn!(pod = %self.name, error = %e, "cannot write pod status; will retry");
                self.published = None;
            }
        }
    }

    async fn prepare(&mut self) -> Result<Prepared, NotStarted> {
        let pod = self.pod.clone();
        let container = self
            .container()
            .ok_or_else(|| NotStarted::Config("the pod has no containers".into()))?;
        if !self.warned_sidecars && pod.spec.as_ref().is_some_and(|s| s.containers.len() > 1) {
            self.warned_sidecars = true;
            tracing::warn!(pod = %self.name, "only the first container runs; the others are reported running");
        }
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .ok_or_else(|| NotStarted::Sandbox("the pod is not scheduled".into()))?;
        let node = self
            .ctx
            .nodes
            .get(&ObjectRef::<Node>::new(&node_name))
            .ok_or_else(|| NotStarted::Sandbox(format!("node {node_name:?} is not known (yet)")))?;
        if node
            .annotations()
            .get(FAKE_NODE_ANNOTATION)
            .map(String::as_str)
            != Some(FAKE_NODE_VALUE)
        {
            return Err(NotStarted::Sandbox(format!(
                "node {node_name:?} is not a simulated node"
            )));
        }
        let (cidr, host_ip) = node_network(&node).map_err(|e| {
            NotStarted::Sandbox(format!(
                "Failed to create pod sandbox: {e}; the node simulator binds only to 127.0.0.0/8"
            ))
        })?;
        self.host_ip = Some(host_ip.to_string());
        let ip = self.pod_ip(&node_name, cidr)?;
        let image = container.image.clone().unwrap_or_default();
        let binary = self.ctx.images.resolve(&image).map_err(NotStarted::Image)?;

        let allocatable = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.clone())
            .unwrap_or_default();
        let facts = Facts {
            pod: &pod,
            pod_ip: ip.to_string(),
            host_ip: host_ip.to_string(),
            allocatable,
        };
        let pod_dir = self.pod_dir();
        let node_dir = self.ctx.node_dir(&node_name);
        let mounts =
            volumes::materialise(&self.ctx.client, &facts, &container, &pod_dir, &node_dir)
                .await
                .map_err(NotStarted::Mount)?;
        let env = self
            .env(&facts, &container, &mounts)
            .await
            .map_err(NotStarted::Config)?;
        let args = self.args(&container, &mounts, &env, ip, &node_name, &node_dir);
        let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
            p.map(|p| Prober::new(p, &container))
                .transpose()
                .map_err(NotStarted::Config)
        };
        let readiness = probe(container.readiness_probe.as_ref())?;
        let liveness = probe(container.liveness_probe.as_ref())?;
        let startup = probe(container.startup_probe.as_ref())?;
        Ok(Prepared {
            binary,
            args,
            env,
            image,
            readiness,
            liveness,
            startup,
        })
    }

    /// The pod's IP: the one it already has (a simulator restart), else a fresh one.
    fn pod_ip(&mut self, node: &str, cidr: Cidr) -> Result<Ipv4Addr, NotStarted> {
        if let Some(ip) = self.ip {
            return Ok(ip);
        }
        let known = self
            .adopt
            .as_ref()
            .map(|r| r.pod_ip.clone())
            .or_else(|| self.pod.status.as_ref().and_then(|s| s.pod_ip.clone()))
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter(|ip| cidr.contains(*ip));
        let mut ipam = self
            .ctx
            .ipam
            .lock()
            .map_err(|_| NotStarted::Sandbox("IP allocator unavailable".into()))?;
        let ip = match known {
            Some(ip) if ipam.claim(&self.uid, node, ip) => {
                ipam.seed_cursor(node, ip, cidr);
                ip
            }
            _ => ipam
                .allocate(&self.uid, node, cidr)
                .ok_or_else(|| NotStarted::Sandbox(format!("no free IP left in {cidr}")))?,
        };
        self.ip = Some(ip);
        Ok(ip)
    }

    /// The container's environment: a minimal base, envFrom, then env (later wins).
    async fn env(
        &self,
        facts: &Facts<'_>,
        container: &Container,
        mounts: &Mounts,
    ) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            (
                "HOME".into(),
                self.pod_dir().join("rootfs").display().to_string(),
            ),
            ("HOSTNAME".into(), self.name.clone()),
        ];
        let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        };
        let client = &self.ctx.client;
        for source in container.env_from.iter().flatten() {
            let prefix = source.prefix.clone().unwrap_or_default();
            if let Some(cm) = &source.config_map_ref {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
                match api.get_opt(&cm.name).await.map_err(|e| e.to_string())? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    None if cm.optional.unwrap_or(false) => {}
                    None => return Err(format!("configmap \"{}\" not found", cm.name)),
                }
            }
            if let Some(secret) = &source.secret_ref {
                let api: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
                match api.get_opt(&secret.name).await.map_err(|e| e.to_string())? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            );
                        }
                    }
                    None if secret.optional.unwrap_or(false) => {}
                    None => return Err(format!("secret \"{}\" not found", secret.name)),
                }
            }
        }
        for var in container.env.iter().flatten() {
            let value = if let Some(source) = &var.value_from {
                if let Some(field) = &source.field_ref {
                    facts.field(field)?
                } else if let Some(resource) = &source.resource_field_ref {
                    facts.resource(container, resource)?
                } else if let Some(key) = &source.config_map_key_ref {
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
                    let found = api
                        .get_opt(&key.name)
                        .await
                        .map_err(|e| e.to_string())?
                        .and_then(|cm| cm.data.and_then(|d| d.get(&key.key).cloned()));
                    match found {
                        Some(v) => v,
                        None if key.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                key.key, self.namespace, key.name
                            ));
                        }
                    }
                } else if let Some(key) = &source.secret_key_ref {
                    let api: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
                    let found = api
                        .get_opt(&key.name)
                        .await
                        .map_err(|e| e.to_string())?
                        .and_then(|s| {
                            s.data.and_then(|d| {
                                d.get(&key.key)
                                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                            })
                        });
                    match found {
                        Some(v) => v,
                        None if key.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {}/{}",
                                key.key, self.namespace, key.name
                            ));
                        }
                    }
                } else {
                    return Err(format!("env {:?}: unsupported valueFrom", var.name));
                }
            } else {
                let defined = env.clone();
                let lookup = move |name: &str| {
                    defined
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                };
                expand(var.value.as_deref().unwrap_or_default(), &lookup)
            };
            // A value naming a file on a volume must name it where the agent can read it.
            let value = if value.starts_with('/') {
                mounts.translate_arg(&value)
            } else {
                value
            };
            set(&mut env, var.name.clone(), value);
        }
        Ok(env)
    }

    /// Container args with paths translated, the simulator's flags dropped and appended.
    fn args(
        &self,
        container: &Container,
        mounts: &Mounts,
        env: &[(String, String)],
        ip: Ipv4Addr,
        node_name: &str,
        node_dir: &std::path::Path,
    ) -> Vec<String> {
        let lookup = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        // The image's entrypoint is the agent itself: command[0] is the binary we run.
        let raw: Vec<String> = container
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(container.args.iter().flatten())
            .map(|a| expand(a, &lookup))
            .collect();
        let rootfs = self.pod_dir().join("rootfs");
        let mut args = Vec::new();
        let mut positions: Option<String> = None;
        let mut config: Option<PathBuf> = None;
        let mut iter = raw.iter().peekable();
        while let Some(arg) = iter.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let takes_value = OVERRIDDEN_FLAGS.contains(&flag) || flag == "--config";
            let value = if takes_value && inline.is_none() {
                iter.next().cloned()
            } else {
                inline.clone()
            };
            if flag == "--positions" {
                positions = value;
                continue;
            }
            if OVERRIDDEN_FLAGS.contains(&flag) {
                continue;
            }
            if flag == "--config" {
                if let Some(v) = value {
                    let host = mounts.translate_or_rootfs(&v, &rootfs);
                    args.push("--config".into());
                    args.push(host.display().to_string());
                    config = Some(host);
                }
                continue;
            }
            args.push(mounts.translate_arg(arg));
        }
        if let Some(config) = &config {
            let from_config = translate_config(config, mounts);
            positions = positions.or(from_config);
        }
        let positions =
            mounts.translate_or_rootfs(positions.as_deref().unwrap_or(DEFAULT_POSITIONS), &rootfs);
        if let Some(parent) = positions.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let log_root = node_dir.join("var/log/pods");
        let _ = std::fs::create_dir_all(&log_root);
        let port = listen_port(container);
        if let Some(file) = self.termination_file() {
            args.extend(["--termination-log".to_string(), file.display().to_string()]);
        }
        args.extend([
            "--node-name".to_string(),
            node_name.to_string(),
            "--listen".to_string(),
            format!("{ip}:{port}"),
            "--log-root".to_string(),
            log_root.display().to_string(),
            "--kubeconfig".to_string(),
            self.ctx.opts.kubeconfig.display().to_string(),
            "--positions".to_string(),
            positions.display().to_string(),
        ]);
        args
    }
}

fn terminated(
    running: &Proc,
    exit: Exit,
    started_at: &Time,
    finished_at: Time,
    message: Option<String>,
) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: exit.container_code(),
        signal: exit.signal,
        reason: Some(exit.reason().to_string()),
        started_at: Some(started_at.clone()),
        finished_at: Some(finished_at),
        container_id: Some(format!("nodesim://{}", running.pid())),
        message,
    }
}

/// The last `max` bytes of a file (lossy UTF-8), `None` if it cannot be read.
fn read_tail(path: &std::path::Path, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The port the agent listens on: a container port named like a metrics port, else the
/// first one, else the agent's default.
pub fn listen_port(container: &Container) -> u16 {
    let ports = container.ports.as_deref().unwrap_or_default();
    ports
        .iter()
        .find(|p| {
            p.name
                .as_deref()
                .is_some_and(|n| METRICS_PORT_NAMES.contains(&n))
        })
        .or_else(|| ports.first())
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_LISTEN_PORT)
}

/// The node's pod CIDR and InternalIP, both required to be loopback.
fn node_network(node: &Node) -> Result<(Cidr, Ipv4Addr), String> {
    let cidr_text = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.clone())
        .ok_or("the node has no spec.podCIDR")?;
    let cidr: Cidr = cidr_text.parse()?;
    if !cidr.is_loopback() {
        return Err(format!("node podCIDR {cidr} is outside 127.0.0.0/8"));
    }
    let host_ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .map(|a| a.address.clone())
        .ok_or("the node has no InternalIP")?;
    let host_ip: Ipv4Addr = host_ip
        .parse()
        .map_err(|_| format!("node InternalIP {host_ip:?} is not IPv4"))?;
    if !host_ip.is_loopback() {
        return Err(format!("node InternalIP {host_ip} is outside 127.0.0.0/8"));
    }
    Ok((cidr, host_ip))
}

/// Rewrite the agent config in place so the files it names on volumes are the host
/// paths; returns its `positionsFile` (container path) if it sets one.
fn translate_config(path: &std::path::Path, mounts: &Mounts) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let positions = doc
        .get("positionsFile")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    if let Some(out) = mounts.translate_document(&text)
        && let Err(e) = std::fs::write(path, out)
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the translated config");
    }
    positions
}

/// `(type, status)` of each condition, ordered: what a reader of the pod acts on.
fn condition_states(status: Option<&PodStatus>) -> std::collections::BTreeSet<(String, String)> {
    status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect()
}
