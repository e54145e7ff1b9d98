//! `logpipe-nodesim`: the kubelet of the test bed's agent pods.
//!
//! KWOK simulates nodes and ordinary pods but leaves pods annotated
//! `kwok.x-k8s.io/status=custom` alone. For those pods on KWOK nodes the simulator acts
//! as the kubelet with real processes: it gives the pod an IP from the top of the node's
//! loopback `podCIDR`, maps the image to a local binary (see [`image`]), materialises the
//! volumes (see [`volumes`]), starts the agent bound to the pod IP, probes it, writes
//! the pod status, restarts it when it exits, and on deletion stops it within the grace
//! period and makes the final delete.
//!
//! Files, all under the test bed directory (`target/testbed`):
//! - `<cluster>/nodesim/pods/<uid>.json`: PID records, so a restarted simulator adopts
//!   the agents it left running (or stops those whose pods are gone);
//! - `<cluster>/nodesim/pods/<uid>/`: the pod's volumes and private `rootfs`;
//! - `<cluster>/nodes/<node>/...`: each node's hostPath tree (`var/log/pods`, positions);
//! - `<cluster>/nodes/<node>/var/lib/kubelet/pods/<uid>/containers/<name>/termination-log`:
//!   the container's termination-message file, emptied before each run and given to the
//!   agent as `--termination-log`; what it holds (or, empty after a failure with
//!   `FallbackToLogsOnError`, the end of that run's log) becomes
//!   `lastState.terminated.message` (see [`status::termination_message`]);
//! - `logs/agents/<cluster>/<pod>.log`: the agent's stdout and stderr;
//! - `images/<tag>/<name>`: the "registry".

pub mod downward;
pub mod image;
pub mod ipam;
pub mod pod;
pub mod probe;
pub mod process;
pub mod status;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use self::image::Images;
use self::ipam::Ipam;
use self::pod::{Update, Worker};
use self::process::Record;

/// Pods with this annotation are left alone by KWOK and run by the simulator.
pub const CUSTOM_STATUS_ANNOTATION: &str = "kwok.x-k8s.io/status";
pub const CUSTOM_STATUS_VALUE: &str = "custom";
/// Nodes KWOK simulates.
pub const FAKE_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
pub const FAKE_NODE_VALUE: &str = "fake";

/// Settings of one simulator (one cluster). All paths absolute.
#[derive(Clone, Debug)]
pub struct Options {
    pub kubeconfig: PathBuf,
    pub cluster: String,
    /// The test bed directory (`target/testbed`).
    pub testbed_dir: PathBuf,
    /// Where released images live: `<images_dir>/<tag>/<name>`.
    pub images_dir: PathBuf,
    pub image_map: Option<PathBuf>,
    /// Crash back-off: first wait, and the cap it doubles up to.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often a pod that cannot start (no image, no ConfigMap) is retried.
    pub retry_interval: Duration,
    /// Upper bound on stopping all agents when the simulator is told to stop.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the probe HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("the node list did not sync within {0:?}; is the API server up?")]
    NodesNotSynced(Duration),
    #[error("another node simulator (pid {pid}) runs for cluster {cluster}; stop it first")]
    AlreadyRunning { pid: i32, cluster: String },
}

/// What every pod worker shares.
pub struct Ctx {
    pub client: kube::Client,
    pub opts: Options,
    pub nodes: Store<Node>,
    pub ipam: Mutex<Ipam>,
    pub images: Images,
    pub http: reqwest::Client,
    pub shutdown: watch::Receiver<bool>,
}

impl Ctx {
    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.opts)
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.opts
            .testbed_dir
            .join(&self.opts.cluster)
            .join("nodes")
            .join(node)
    }

    pub fn agent_logs_dir(&self) -> PathBuf {
        self.opts
            .testbed_dir
            .join("logs")
            .join("agents")
            .join(&self.opts.cluster)
    }
}

fn state_dir(opts: &Options) -> PathBuf {
    opts.testbed_dir.join(&opts.cluster).join("nodesim")
}

async fn client(path: &Path) -> Result<kube::Client, Error> {
    let fail = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| fail(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| fail(e.to_string()))
}

fn owned(pod: &Pod) -> bool {
    pod.annotations()
        .get(CUSTOM_STATUS_ANNOTATION)
        .map(String::as_str)
        == Some(CUSTOM_STATUS_VALUE)
}

/// Whether `pid` runs this binary (argv[0] named `logpipe-nodesim`): a stale PID file
/// may name a recycled PID.
pub fn is_simulator(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|c| {
            c.split(|b| *b == 0)
                .next()
                .map(|argv0| argv0.ends_with(b"logpipe-nodesim"))
        })
        .unwrap_or(false)
}

/// Refuse to run twice for one cluster: two kubelets for the same pods would fight.
fn take_pid_file(opts: &Options) -> Result<PathBuf, Error> {
    let path = state_dir(opts).join("nodesim.pid");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(pid) = text.trim().parse::<i32>()
    {
        let me = i32::try_from(std::process::id()).unwrap_or_default();
        if pid != me && is_simulator(pid) {
            return Err(Error::AlreadyRunning {
                pid,
                cluster: opts.cluster.clone(),
            });
        }
    }
    std::fs::write(&path, format!("{}\n", std::process::id())).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Stop an agent whose pod no longer exists (left by an earlier run), then free its IP.
async fn stop_orphan(record: Record, ctx: Arc<Ctx>) {
    let state_dir = ctx.state_dir();
    if let Some(mut proc) = record.live_process() {
        tracing::info!(pid = record.pid, pod = %format!("{}/{}", record.namespace, record.name), "stopping an agent whose pod is gone");
        proc.stop(Duration::from_secs(30)).await;
    }
    Record::remove(&state_dir, &record.uid);
    let _ = std::fs::remove_dir_all(state_dir.join("pods").join(&record.uid));
    if let Ok(mut ipam) = ctx.ipam.lock() {
        ipam.release(&record.uid);
    }
}

/// Run until SIGTERM or SIGINT, then stop every agent and return.
pub async fn run(opts: Options) -> Result<(), Error> {
    let client = client(&opts.kubeconfig).await?;
    let state = state_dir(&opts);
    for dir in [
        state.join("pods"),
        opts.testbed_dir
            .join("logs")
            .join("agents")
            .join(&opts.cluster),
    ] {
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
    }
    let pid_file = take_pid_file(&opts)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;

    let (nodes, writer) = reflector::store::<Node>();
    let node_watch = tokio::spawn(
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(|_| futures::future::ready(())),
    );
    let sync_limit = Duration::from_secs(60);
    if tokio::time::timeout(sync_limit, nodes.wait_until_ready())
        .await
        .is_err()
    {
        node_watch.abort();
        return Err(Error::NodesNotSynced(sync_limit));
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        images: Images::new(opts.images_dir.clone(), opts.image_map.clone()),
        opts: opts.clone(),
        nodes: nodes.clone(),
        ipam: Mutex::new(Ipam::default()),
        http,
        shutdown: shutdown_rx,
    });
    tracing::info!(cluster = %opts.cluster, testbed = %opts.testbed_dir.display(), images = %opts.images_dir.display(), "node simulator started");

    let mut records: HashMap<String, Record> = Record::load_all(&state)
        .into_iter()
        .map(|r| (r.uid.clone(), r))
        .collect();
    // Agents left by an earlier run still hold their IPs: no new pod may get one
    // before its holder is adopted or stopped.
    if let Ok(mut ipam) = ctx.ipam.lock() {
        for r in records.values() {
            if let Ok(ip) = r.pod_ip.parse::<Ipv4Addr>()
                && !r.node.is_empty()
            {
                ipam.claim(&r.uid, &r.node, ip);
            }
        }
    }
    let mut workers: HashMap<String, watch::Sender<Update>> = HashMap::new();
    let mut task_uids: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut cleanups: JoinSet<()> = JoinSet::new();
    // Pods whose worker is done: later events for them (the watch lags the final delete)
    // must not start a second worker.
    let mut finished: HashSet<String> = HashSet::new();
    let mut listing: Option<HashSet<String>> = None;
    let mut first_list_done = false;

    let mut pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping all agents"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping all agents"); break; }
            Some(done) = tasks.join_next_with_id() => {
                let id = match &done { Ok((id, ())) => *id, Err(e) => e.id() };
                if let Err(e) = &done {
                    tracing::error!(error = %e, "a pod worker failed");
                }
                if let Some(uid) = task_uids.remove(&id) {
                    workers.remove(&uid);
                    finished.insert(uid);
                }
            }
            Some(_) = cleanups.join_next() => {}
            event = pods.next() => {
                let event = match event {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => { tracing::warn!(error = %e, "pod watch error (retrying)"); continue; }
                    None => { tracing::error!("pod watch ended"); break; }
                };
                match event {
                    watcher::Event::Init => listing = Some(HashSet::new()),
                    watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                        let uid = pod.uid().unwrap_or_default();
                        if let Some(seen) = listing.as_mut() {
                            seen.insert(uid.clone());
                        }
                        if !owned(&pod) {
                            observe_foreign(&ctx, &pod);
                            continue;
                        }
                        if let Some(tx) = workers.get(&uid) {
                            tx.send_replace(Update::Present(Arc::new(pod)));
                            continue;
                        }
                        if finished.contains(&uid) || !should_run(&nodes, &pod) {
                            continue;
                        }
                        let pod = Arc::new(pod);
                        let (tx, rx) = watch::channel(Update::Present(pod.clone()));
                        let worker = Worker::new(ctx.clone(), pod, rx, records.remove(&uid));
                        let handle = tasks.spawn(worker.run());
                        task_uids.insert(handle.id(), uid.clone());
                        workers.insert(uid, tx);
                    }
                    watcher::Event::InitDone => {
                        let seen = listing.take().unwrap_or_default();
                        for (uid, tx) in &workers {
                            if !seen.contains(uid) {
                                tx.send_replace(Update::Gone);
                            }
                        }
                        finished.retain(|uid| seen.contains(uid));
                        if !first_list_done {
                            first_list_done = true;
                            for (_, record) in records.drain() {
                                cleanups.spawn(stop_orphan(record, ctx.clone()));
                            }
                        }
                    }
                    watcher::Event::Delete(pod) => {
                        let uid = pod.uid().unwrap_or_default();
                        finished.remove(&uid);
                        match workers.get(&uid) {
                            Some(tx) => { tx.send_replace(Update::Gone); }
                            None if !owned(&pod) => {
                                if let Ok(mut ipam) = ctx.ipam.lock() {
                                    ipam.release(&uid);
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
        }
    }

    shutdown_tx.send_replace(true);
    let stopping = async {
        while tasks.join_next().await.is_some() {}
        while cleanups.join_next().await.is_some() {}
    };
    if tokio::time::timeout(opts.shutdown_timeout, stopping)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?opts.shutdown_timeout, "agents still stopping; leaving them to the next run (their records stay)");
        tasks.abort_all();
        cleanups.abort_all();
    }
    node_watch.abort();
    let _ = std::fs::remove_file(pid_file);
    tracing::info!("node simulator stopped");
    Ok(())
}

/// An owned pod is ours to run once scheduled to a simulated node and not finished.
fn should_run(nodes: &Store<Node>, pod: &Pod) -> bool {
    let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
        return false;
    };
    if let Some(node) = nodes.get(&ObjectRef::new(node_name))
        && node
            .annotations()
            .get(FAKE_NODE_ANNOTATION)
            .map(String::as_str)
            != Some(FAKE_NODE_VALUE)
    {
        return false;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    // A pod we already finished (terminal phase) only needs work if it is being deleted.
    !matches!(phase, Some("Succeeded" | "Failed")) || pod.metadata.deletion_timestamp.is_some()
}

/// Remember IPs KWOK gave ordinary pods, so ours never collide with them.
fn observe_foreign(ctx: &Ctx, pod: &Pod) {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    if let (Some(node), Some(ip), Some(uid)) = (node, ip, pod.uid())
        && let Ok(mut ipam) = ctx.ipam.lock()
    {
        ipam.claim(&uid, node, ip);
    }
}
