//! Pieces of the rollout tests: an operator process per test and cluster, the node
//! simulator (the test bed's, or one started here), released agent images, workload pods
//! with logs on every node, and a poller that records what status and pods went through.
//!
//! Everything started here is stopped when its guard is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
pub use logpipe_e2e::cluster::{
    ensure_namespace as create_namespace, install_crd, logpipelines as lp_api,
};
use logpipe_e2e::loggen::{ContainerLog, CriWriter, numbered_line};
pub use logpipe_e2e::operator::Operator;
use logpipe_e2e::simulator::Simulator;
pub use logpipe_e2e::wait_for;
use logpipe_e2e::{Testbed, unique_suffix, workspace_binary};
use serde_json::{Value, json};

/// A released agent image for the node simulator; unpublished when dropped (also when a
/// test fails).
pub struct Release {
    dir: PathBuf,
    pub image: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// "Publish" the built agent as `reg.local/logpipe-agent:<tag>` for the node simulator
/// (a hard link, renamed into place so a starting pod never sees half a file).
pub fn publish(testbed: &Testbed, tag: &str) -> Release {
    release(testbed, tag, |file| {
        let binary = workspace_binary("logpipe-agent");
        if std::fs::hard_link(&binary, file).is_err() {
            std::fs::copy(&binary, file).unwrap();
        }
    })
}

/// `images/<tag>/logpipe-agent`, written by `write` under a temporary name, then renamed.
fn release(testbed: &Testbed, tag: &str, write: impl FnOnce(&Path)) -> Release {
    let dir = testbed.dir.join("images").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!(".logpipe-agent.{}", unique_suffix()));
    write(&tmp);
    std::fs::rename(&tmp, dir.join("logpipe-agent")).unwrap();
    Release {
        dir,
        image: format!("reg.local/logpipe-agent:{tag}"),
    }
}

/// [`publish`], but the agent of this release fails at start on the nodes whose name
/// starts with `node_prefix` while the file `fault` exists (its last words in its
/// termination log, as the agent writes a fatal error): the same release, failing where it
/// runs, as a full disk or a broken node would make it.
pub fn publish_failing_on(
    testbed: &Testbed,
    tag: &str,
    node_prefix: &str,
    fault: &Path,
) -> Release {
    let agent = workspace_binary("logpipe-agent");
    let script = format!(
        r#"#!/bin/sh
node=; log=; prev=
for arg in "$@"; do
  case $prev in --node-name) node=$arg ;; --termination-log) log=$arg ;; esac
  prev=$arg
done
case $node in
  {node_prefix}*)
    if [ -e '{fault}' ]; then
      words='positions: cannot save: No space left on device (fault injected by the test)'
      [ -z "$log" ] || echo "$words" > "$log"
      echo "$words" >&2
      exit 1
    fi ;;
esac
exec '{agent}' "$@"
"#,
        fault = fault.display(),
        agent = agent.display(),
    );
    release(testbed, tag, |file| {
        std::fs::write(file, script).unwrap();
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    })
}

pub async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

/// A workload DaemonSet (plain pods, run by KWOK) in `ns`: something to log on every node.
/// Returns the Running pods once there is one per node.
pub async fn workload(client: &Client, ns: &str, nodes: usize) -> Vec<Pod> {
    let ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "workload", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "workload"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "workload"}},
                "spec": {
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{"name": "app", "image": "registry.example/app:1"}]
                }
            }
        }
    });
    Api::<DaemonSet>::namespaced(client.clone(), ns)
        .patch(
            "workload",
            &PatchParams::apply("e2e-rollout").force(),
            &Patch::Apply(&ds),
        )
        .await
        .unwrap();
    wait_for(
        "workload pods Running on every node",
        Duration::from_secs(60),
        || async {
            let pods: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default().labels("app.kubernetes.io/name=workload"))
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            (pods.len() >= nodes)
                .then_some(pods.clone())
                .ok_or_else(|| format!("{} Running", pods.len()))
        },
    )
    .await
}

/// Writes a CRI line every 200 ms for each workload pod until dropped.
pub struct LogWriter {
    task: tokio::task::JoinHandle<()>,
}

impl LogWriter {
    pub fn start(cluster_dir: &Path, pods: &[Pod], prefix: &str) -> Self {
        let mut writers = Vec::new();
        for pod in pods {
            let (Some(spec), Some(name), Some(uid), Some(ns)) = (
                pod.spec.as_ref(),
                pod.metadata.name.clone(),
                pod.metadata.uid.clone(),
                pod.metadata.namespace.clone(),
            ) else {
                continue;
            };
            let Some(node) = spec.node_name.clone() else {
                continue;
            };
            let log = ContainerLog {
                namespace: ns,
                pod: name,
                uid,
                container: "app".into(),
                node,
            };
            let writer = CriWriter::open(log.path(cluster_dir, 0)).unwrap();
            writers.push((log, writer));
        }
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            // Bounded: a test never runs an hour.
            for seq in 0..18_000u64 {
                ticker.tick().await;
                for (log, writer) in &mut writers {
                    let _ = writer.line("stdout", &numbered_line(&prefix, &log.pod, seq));
                }
            }
        });
        Self { task }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The unavailability budget of the test pipelines on `nodes` nodes: a fifth of them, so
/// a 20-node step moves in batches of 4.
pub fn max_unavailable(nodes: usize) -> usize {
    (nodes / 5).max(1)
}

/// A LogPipeline for the rollout tests on `nodes` nodes: real agents
/// (`kwok.x-k8s.io/status: custom`), the test bed's store (VictoriaLogs) for pushes and
/// verification queries (LogsQL), short windows.
pub fn pipeline(
    ns: &str,
    tenant: &str,
    image: &str,
    store: &str,
    window: &str,
    nodes: usize,
) -> Value {
    json!({
        "apiVersion": "logpipe.io/v1alpha1",
        "kind": "LogPipeline",
        "metadata": {"name": "logpipe", "namespace": ns},
        "spec": {
            "tenant": tenant,
            "endpoint": format!("{store}{}", logpipe_e2e::store::PUSH_PATH),
            "agent": {
                "image": image,
                "tolerations": [{"operator": "Exists"}],
                "podAnnotations": {"kwok.x-k8s.io/status": "custom"},
                "shutdownTimeoutSeconds": 5,
            },
            "pipeline": [
                {"cri": {}},
                {"timestamp": {"source": "time", "format": "RFC3339"}},
                {"labelDrop": ["filename"]},
            ],
            "rollout": {
                "maxUnavailable": max_unavailable(nodes),
                "steps": [{"canary": {"nodes": 1}}, {"percent": 40}, {"percent": 100}],
                "verify": {
                    "window": window,
                    "query": {"type": "victorialogs", "endpoint": store},
                    "maxCpu": "2",
                    "maxMemory": "500Mi",
                    "maxLatency": "30s",
                },
                "soak": "5s",
            },
        },
    })
}

pub async fn apply(client: &Client, ns: &str, lp: &Value) {
    let name = lp["metadata"]["name"].as_str().unwrap();
    lp_api(client, ns)
        .patch(
            name,
            &PatchParams::apply("e2e-rollout").force(),
            &Patch::Apply(lp),
        )
        .await
        .unwrap();
}

pub async fn status(client: &Client, ns: &str, name: &str) -> Result<(Option<i64>, Value), String> {
    let lp = lp_api(client, ns)
        .get(name)
        .await
        .map_err(|e| e.to_string())?;
    Ok((lp.metadata.generation, lp.data["status"].clone()))
}

/// Plain kubectl against one cluster of the test bed, as a person would type it.
pub fn kubectl(testbed: &Testbed, cluster: &str, args: &[&str]) -> String {
    let binary = logpipe_e2e::cached_binary("K8S", "kubectl");
    let output = std::process::Command::new(&binary)
        .arg("--kubeconfig")
        .arg(testbed.kubeconfig(cluster))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Nodes whose live agent pod runs `revision`.
pub async fn nodes_at(client: &Client, ns: &str, revision: &str) -> BTreeSet<String> {
    logpipe_e2e::cluster::live_agent_pods(client, ns)
        .await
        .unwrap()
        .iter()
        .filter(|p| {
            p.annotations()
                .get("logpipe.io/revision")
                .map(String::as_str)
                == Some(revision)
        })
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect()
}

pub async fn resource_version(client: &Client, ns: &str, name: &str) -> String {
    lp_api(client, ns)
        .get(name)
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap_or_default()
}

/// An RFC 3339 time of a status field.
pub fn rfc3339(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value.as_str().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{value} is not an RFC 3339 time: {e}"))
}

/// Wait for Healthy at the current generation with every node ready.
/// The status's condition of `type_` (`Null` when it has none).
pub fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_default()
}

pub async fn wait_healthy(client: &Client, ns: &str, nodes: usize, timeout: Duration) -> Value {
    wait_for("LogPipeline Healthy", timeout, || async {
        let (generation, s) = status(client, ns, "logpipe").await?;
        let ok = s["phase"] == "Healthy"
            && s["readyNodes"] == nodes
            && s["observedGeneration"].as_i64() == generation;
        ok.then(|| s.clone()).ok_or_else(|| s.to_string())
    })
    .await
}

/// One moment of a rollout as seen from outside.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Duration,
    pub phase: String,
    pub step: Option<i64>,
    pub message: String,
}

/// Everything a poll loop saw until `done` held.
#[derive(Debug, Default)]
pub struct Record {
    /// Distinct (phase, step) in order.
    pub phases: Vec<Seen>,
    /// Nodes that ran a pod of another revision than the stable one at some point.
    pub moved_nodes: BTreeSet<String>,
    /// Most agent pods unavailable at once (not Ready, terminating or missing).
    pub max_unavailable: usize,
    /// `stepStartedAt` of each step (`currentStep`) seen.
    pub step_started: BTreeMap<i64, String>,
    pub last: Value,
}

impl Record {
    pub fn sequence(&self) -> Vec<String> {
        self.phases
            .iter()
            .map(|s| match s.step {
                Some(i) => format!("{}({i})", s.phase),
                None => s.phase.clone(),
            })
            .collect()
    }

    pub fn first(&self, phase: &str) -> Option<&Seen> {
        self.phases.iter().find(|s| s.phase == phase)
    }
}

/// Poll status and pods every 250 ms until `done(status)`; a node whose pod is not at
/// `stable` (the revision before the change) counts as moved.
pub async fn record_until(
    client: &Client,
    ns: &str,
    nodes: usize,
    stable: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Record {
    let started = Instant::now();
    let mut record = Record::default();
    let pods_api = Api::<Pod>::namespaced(client.clone(), ns);
    loop {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}; saw {:?}; last status {}",
            record.sequence(),
            record.last
        );
        let Ok((_, s)) = status(client, ns, "logpipe").await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        let phase = s["phase"].as_str().unwrap_or("").to_string();
        let step = s["currentStep"].as_i64();
        if let (Some(i), Some(at)) = (step, s["stepStartedAt"].as_str()) {
            record
                .step_started
                .entry(i)
                .or_insert_with(|| at.to_string());
        }
        if record
            .phases
            .last()
            .is_none_or(|l| l.phase != phase || l.step != step)
        {
            let seen = Seen {
                at: started.elapsed(),
                phase,
                step,
                message: s["message"].as_str().unwrap_or("").to_string(),
            };
            println!(
                "  {:>6.1}s  {:<12} step {:<4} {}",
                seen.at.as_secs_f64(),
                seen.phase,
                seen.step.map_or("-".into(), |i| i.to_string()),
                seen.message
            );
            record.phases.push(seen);
        }
        if let Ok(list) = pods_api
            .list(&ListParams::default().labels(logpipe_e2e::cluster::AGENT_PODS))
            .await
        {
            let mut ready = 0;
            for p in &list.items {
                let revision = p
                    .annotations()
                    .get("logpipe.io/revision")
                    .cloned()
                    .unwrap_or_default();
                let node = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                if revision != stable {
                    record.moved_nodes.insert(node);
                }
                // The agent's own readiness (ContainersReady): the pod's Ready condition
                // also drops when KWOK's node heartbeats lapse, until the simulator writes
                // it back.
                let is_ready = p.metadata.deletion_timestamp.is_none()
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c.type_ == "ContainersReady" && c.status == "True")
                        });
                if is_ready {
                    ready += 1;
                }
            }
            let down = nodes.saturating_sub(ready);
            if down > record.max_unavailable {
                record.max_unavailable = down;
                let names: Vec<String> = list
                    .items
                    .iter()
                    .map(|p| {
                        let conditions = p
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .map(|c| {
                                c.iter()
                                    .map(|c| format!("{}={}", c.type_, c.status))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        format!(
                            "{}{} [{conditions}]",
                            p.name_any(),
                            if p.metadata.deletion_timestamp.is_some() {
                                " (terminating)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect();
                println!("  {down} agents down: {}", names.join("; "));
            }
        }
        record.last = s.clone();
        if done(&s) {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The checks of `status.lastVerification` by name: (value, limit, passed).
pub fn checks(s: &Value) -> BTreeMap<String, (String, String, bool)> {
    s["lastVerification"]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                (
                    c["value"].as_str().unwrap_or("").to_string(),
                    c["limit"].as_str().unwrap_or("").to_string(),
                    c["passed"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect()
}

/// One cluster of one test: namespace, node simulator, operator, workload with logs.
pub struct Bed {
    testbed: Testbed,
    cluster: String,
    cleaned: bool,
    pub client: Client,
    pub ns: String,
    pub nodes: usize,
    pub operator: Operator,
    _logs: LogWriter,
    _simulator: Simulator,
}

impl Bed {
    pub async fn up(testbed: &Testbed, cluster: &str, ns: &str) -> Self {
        Self::up_writing(testbed, cluster, ns, usize::MAX).await
    }

    /// Like [`Bed::up`], with workload logs written on the first `writing` nodes (by
    /// name) only: the others are quiet.
    pub async fn up_writing(testbed: &Testbed, cluster: &str, ns: &str, writing: usize) -> Self {
        let client = testbed.client(cluster).await.unwrap();
        install_crd(&client).await.unwrap();
        create_namespace(&client, ns).await.unwrap();
        let simulator = Simulator::ensure(
            testbed,
            cluster,
            &testbed
                .dir
                .join(format!("nodesim-{cluster}-e2e-rollout.log")),
        );
        let node_count = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .list_metadata(&ListParams::default())
            .await
            .unwrap()
            .items
            .len();
        let pods = workload(&client, ns, node_count).await;
        let mut nodes: Vec<String> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        nodes.sort();
        nodes.truncate(writing);
        let writers: Vec<Pod> = pods
            .into_iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| nodes.contains(n))
            })
            .collect();
        let logs = LogWriter::start(&testbed.dir.join(cluster), &writers, "rollout");
        let operator = Operator::start(testbed, cluster, ns, "first").await;
        Self {
            testbed: testbed.clone(),
            cluster: cluster.to_string(),
            cleaned: false,
            client,
            ns: ns.to_string(),
            nodes: node_count,
            operator,
            _logs: logs,
            _simulator: simulator,
        }
    }

    pub async fn down(mut self) {
        println!("operator log: {}", self.operator.log.display());
        // The LogPipeline first, so the finalizer runs while the operator still does.
        let _ = lp_api(&self.client, &self.ns)
            .delete("logpipe", &DeleteParams::default())
            .await;
        let client = self.client.clone();
        let ns = self.ns.clone();
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while matches!(lp_api(&client, &ns).get_opt("logpipe").await, Ok(Some(_))) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        self.operator.kill().await;
        delete_namespace(&self.client, &self.ns).await;
        self.cleaned = true;
    }
}

impl Drop for Bed {
    /// A failed test still deletes its namespace (its agents would run on otherwise), from
    /// a thread with its own runtime: the test's runtime may be unwinding.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let testbed = self.testbed.clone();
        let cluster = self.cluster.clone();
        let ns = self.ns.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = testbed.client(&cluster).await else {
                    return;
                };
                // The operator still runs (fields drop after this): let its finalizer
                // delete the cluster-scoped objects, then make sure nothing holds the
                // namespace.
                let api = lp_api(&client, &ns);
                let _ = api.delete("logpipe", &DeleteParams::default()).await;
                for _ in 0..40 {
                    if !matches!(api.get_opt("logpipe").await, Ok(Some(_))) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let _ = api
                    .patch(
                        "logpipe",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), delete_namespace(&client, &ns))
                        .await;
            });
        })
        .join();
    }
}
