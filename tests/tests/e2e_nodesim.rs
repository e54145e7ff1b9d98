//! The node simulator (`logpipe-nodesim`) on the running test bed: agent pods of a
//! DaemonSet on KWOK nodes run as real processes bound to their pod IPs, go Ready by
//! their readiness probe, show `ErrImagePull` for an unpublished tag, get SIGTERM when
//! deleted and are replaced with the node's positions directory intact.
//!
//! The "agent" is a stand-in (Python, same flags as logpipe-agent) so the test can see
//! what the process was given and what it received; published under a tag unique to
//! the run. Run with `cargo test -p logpipe-e2e --features e2e --test e2e_nodesim`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use logpipe_e2e::simulator::Simulator;
use logpipe_e2e::{Testbed, unique_suffix};
use serde_json::json;

const CLUSTER: &str = "ops";

/// Same flags as logpipe-agent; serves /-/ready on --listen; counts its starts in the
/// positions file; logs lifecycle events next to it.
const STANDIN: &str = r#"#!/usr/bin/env python3
import argparse, http.server, os, signal, sys, threading, time
p = argparse.ArgumentParser()
for flag in ("--config", "--node-name", "--log-root", "--positions", "--kubeconfig", "--listen", "--termination-log"):
    p.add_argument(flag)
a = p.parse_args()
events = os.path.join(os.path.dirname(a.positions), "standin-events.log")
def event(what):
    with open(events, "a") as f:
        f.write(f"pid={os.getpid()} {what}\n")
starts = 0
try:
    starts = int(open(a.positions).read().strip() or 0)
except (OSError, ValueError):
    pass
with open(a.positions, "w") as f:
    f.write(f"{starts + 1}\n")
config = open(a.config).read() if a.config else ""
event(f"start node={a.node_name} env_node={os.environ.get('NODE_NAME')} listen={a.listen} "
      f"starts_before={starts} config_ok={'nodesim-e2e-marker' in config} "
      f"log_root_ok={os.path.isdir(a.log_root)} kubeconfig_ok={os.path.isfile(a.kubeconfig)} positions={a.positions}")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path in ("/-/ready", "/-/healthy") else 404
        self.send_response(code); self.end_headers()
    def log_message(self, *args):
        pass
host, port = a.listen.rsplit(":", 1)
server = http.server.ThreadingHTTPServer((host, int(port)), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
while not stop.wait(0.2):
    pass
event("sigterm")
server.shutdown()
"#;

/// Poll `check` until it returns Some, or fail after `limit` with `what`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// "Publish a release": the stand-in under `images/<tag>/logpipe-agent`, atomically.
fn publish(testbed: &Testbed, tag: &str) -> PathBuf {
    let dir = testbed.dir.join("images").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(".logpipe-agent.tmp");
    std::fs::write(&tmp, STANDIN).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, dir.join("logpipe-agent")).unwrap();
    dir
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// PID of the agent process, from the container ID the simulator reports.
fn agent_pid(pod: &Pod) -> u32 {
    let id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    id.strip_prefix("nodesim://").unwrap().parse().unwrap()
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (base, prefix) = cidr.split_once('/').unwrap();
    let base: Ipv4Addr = base.parse().unwrap();
    let prefix: u32 = prefix.parse().unwrap();
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(base) & mask
}

async fn ready_endpoint(http: &reqwest::Client, ip: Ipv4Addr) -> bool {
    http.get(format!("http://{ip}:12345/-/ready"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodesim_runs_agent_pods_as_processes() {
    let testbed = Testbed::ensure(&[CLUSTER])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client(CLUSTER).await.unwrap();
    let suffix = unique_suffix();
    let namespace = format!("nodesim-{suffix}");
    let tag = format!("nodesim-e2e-{suffix}");
    let late_tag = format!("nodesim-e2e-late-{suffix}");
    // A hostPath of this run only, so the node trees of other tests are not touched.
    let host_dir = format!("/var/lib/logpipe-e2e-{suffix}");
    let node_tree = |node: &str| testbed.dir.join(CLUSTER).join("nodes").join(node);
    let events_of = |node: &str| {
        std::fs::read_to_string(
            node_tree(node)
                .join(host_dir.trim_start_matches('/'))
                .join("standin-events.log"),
        )
        .unwrap_or_default()
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let image_dir = publish(&testbed, &tag);
    std::fs::create_dir_all(testbed.dir.join("logs")).unwrap();
    let mut simulator = Simulator::ensure(
        &testbed,
        CLUSTER,
        &testbed
            .dir
            .join("logs")
            .join(format!("nodesim-e2e-{suffix}.log")),
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let nodes: BTreeMap<String, Node> = nodes
        .list(&ListParams::default().labels(&format!("logpipe.io/testbed-cluster={CLUSTER}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| (n.metadata.name.clone().unwrap(), n))
        .collect();
    assert!(!nodes.is_empty(), "no KWOK nodes in cluster {CLUSTER}");

    let apply = PatchParams::apply("logpipe-e2e").force();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &namespace,
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
            })),
        )
        .await
        .unwrap();
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &namespace);
    config_maps
        .patch("agent-config", &apply, &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "agent-config", "namespace": namespace},
            "data": {"config.yaml": format!(
                "# nodesim-e2e-marker\nloki: {{url: \"{push_url}\", tenant: \"{tenant}\"}}\npositionsFile: {host_dir}/positions.json\n",
                push_url = testbed.push_url(),
                tenant = logpipe_e2e::store::unique_tenant(),
            )}
        })))
        .await
        .unwrap();
    let annotations = json!({"kwok.x-k8s.io/status": "custom"});
    let container = |image: &str| {
        json!({
            "name": "agent",
            "image": image,
            "args": ["--config", "/etc/logpipe/config.yaml"],
            "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            "ports": [{"name": "metrics", "containerPort": 12345}],
            "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "metrics"}, "periodSeconds": 1},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/logpipe"},
                {"name": "pods", "mountPath": "/var/log/pods", "readOnly": true},
                {"name": "positions", "mountPath": host_dir},
            ]
        })
    };
    let volumes = json!([
        {"name": "config", "configMap": {"name": "agent-config"}},
        {"name": "pods", "hostPath": {"path": "/var/log/pods"}},
        {"name": "positions", "hostPath": {"path": host_dir, "type": "DirectoryOrCreate"}},
    ]);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    daemonsets
        .patch("agent", &apply, &Patch::Apply(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": {"app": "agent"}},
                "updateStrategy": {"type": "OnDelete"},
                "template": {
                    "metadata": {"labels": {"app": "agent"}, "annotations": annotations},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [container(&format!("registry.invalid/logpipe/logpipe-agent:{tag}"))],
                        "volumes": volumes,
                    }
                }
            }
        })))
        .await
        .unwrap();

    // 1. Every node runs a Ready agent pod, bound to an IP of the node's podCIDR.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let by_label = ListParams::default().labels("app=agent");
    let running = wait_for(
        "a Ready agent pod on every node",
        Duration::from_secs(90),
        || async {
            let list = pods.list(&by_label).await.ok()?;
            (list.items.len() == nodes.len() && list.items.iter().all(is_ready))
                .then_some(list.items)
        },
    )
    .await;
    for pod in &running {
        let node = &nodes[&node_of(pod)];
        let cidr = node.spec.as_ref().unwrap().pod_cidr.clone().unwrap();
        let ip = pod_ip(pod).unwrap();
        assert!(ip.is_loopback(), "pod IP {ip} must be loopback");
        assert!(
            in_cidr(ip, &cidr),
            "pod IP {ip} outside the node's podCIDR {cidr}"
        );
        let internal = node
            .status
            .as_ref()
            .unwrap()
            .addresses
            .as_ref()
            .unwrap()
            .iter()
            .find(|a| a.type_ == "InternalIP")
            .unwrap();
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.host_ip.as_deref(), Some(internal.address.as_str()));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let cs = &status.container_statuses.as_ref().unwrap()[0];
        assert!(cs.state.as_ref().unwrap().running.is_some(), "{cs:?}");
        assert_eq!(cs.restart_count, 0);
        assert!(
            cs.image_id.contains("@sha256:"),
            "imageID {:?}",
            cs.image_id
        );
        assert!(
            ready_endpoint(&http, ip).await,
            "nothing answers on {ip}:12345/-/ready"
        );
        let events = events_of(&node_of(pod));
        let pid = agent_pid(pod);
        let start = events
            .lines()
            .find(|l| l.starts_with(&format!("pid={pid} start")))
            .unwrap_or_else(|| panic!("no start event of pid {pid}: {events}"));
        let node_name = node_of(pod);
        for expected in [
            format!("node={node_name}"),
            format!("env_node={node_name}"),
            format!("listen={ip}:12345"),
            "config_ok=True".into(),
            "log_root_ok=True".into(),
            "kubeconfig_ok=True".into(),
        ] {
            assert!(start.contains(&expected), "{expected} missing in {start:?}");
        }
    }
    let ips: std::collections::BTreeSet<_> = running.iter().map(pod_ip).collect();
    assert_eq!(ips.len(), running.len(), "pod IPs must be distinct");

    // 1b. Ready=False written by someone else while the agent is ready (what the node
    // lifecycle controller does when a node's heartbeat lapses) is put right.
    let marked = running[0].metadata.name.clone().unwrap();
    let mut conditions = running[0]
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap();
    for c in conditions.iter_mut().filter(|c| c.type_ == "Ready") {
        c.status = "False".into();
        c.reason = Some("NodeNotReady".into());
    }
    pods.patch_status(
        &marked,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await
    .unwrap();
    let marked_down = pods.get(&marked).await.unwrap();
    assert!(
        !is_ready(&marked_down),
        "the patch took: {:?}",
        marked_down.status
    );
    wait_for(
        "the simulator to write Ready back",
        Duration::from_secs(15),
        || async { pods.get(&marked).await.ok().filter(is_ready) },
    )
    .await;

    // 2. An unpublished tag stays ErrImagePull, not Ready; publishing it starts the pod.
    let first_node = nodes.keys().next().unwrap().clone();
    let mut lonely = container(&format!(
        "registry.invalid/logpipe/logpipe-agent:{late_tag}"
    ));
    lonely["volumeMounts"] = json!([{"name": "config", "mountPath": "/etc/logpipe"}]);
    let lonely_pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "unpublished", "namespace": namespace, "annotations": annotations},
        "spec": {
            "nodeName": first_node,
            "terminationGracePeriodSeconds": 2,
            "tolerations": [{"operator": "Exists"}],
            "containers": [lonely],
            "volumes": [{"name": "config", "configMap": {"name": "agent-config"}}],
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &lonely_pod)
        .await
        .unwrap();
    let pulled = wait_for(
        "ErrImagePull on the unpublished tag",
        Duration::from_secs(30),
        || async {
            let pod = pods.get("unpublished").await.ok()?;
            let waiting = pod
                .status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()?
                .state
                .as_ref()?
                .waiting
                .clone()?;
            (waiting.reason.as_deref() == Some("ErrImagePull")).then_some((pod, waiting))
        },
    )
    .await;
    let (pod, waiting) = pulled;
    assert!(!is_ready(&pod), "a pod without its image must not be Ready");
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert!(waiting.message.unwrap_or_default().contains(&late_tag));
    let late_dir = publish(&testbed, &late_tag);
    wait_for(
        "the pod to start once its tag is published",
        Duration::from_secs(30),
        || async { pods.get("unpublished").await.ok().filter(is_ready) },
    )
    .await;
    pods.delete("unpublished", &DeleteParams::default())
        .await
        .unwrap();

    // 3. Deleting a pod: its agent gets SIGTERM, the replacement starts on the same node
    //    with the same positions directory, and finds what its predecessor saved.
    let victim = running
        .iter()
        .find(|p| node_of(p) == first_node)
        .unwrap()
        .clone();
    let victim_pid = agent_pid(&victim);
    let victim_uid = victim.metadata.uid.clone().unwrap();
    let before = events_of(&first_node);
    let old_positions = before
        .lines()
        .find(|l| l.starts_with(&format!("pid={victim_pid} start")))
        .and_then(|l| l.split(" positions=").nth(1))
        .unwrap()
        .to_string();
    pods.delete(
        victim.metadata.name.as_deref().unwrap(),
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    let replacement = wait_for(
        "a Ready replacement on the node",
        Duration::from_secs(60),
        || async {
            let list = pods.list(&by_label).await.ok()?;
            list.items.into_iter().find(|p| {
                node_of(p) == first_node
                    && p.metadata.uid.as_deref() != Some(victim_uid.as_str())
                    && is_ready(p)
            })
        },
    )
    .await;
    let events = events_of(&first_node);
    assert!(
        events.contains(&format!("pid={victim_pid} sigterm")),
        "the deleted pod's agent got no SIGTERM: {events}"
    );
    let new_pid = agent_pid(&replacement);
    assert_ne!(new_pid, victim_pid);
    let new_start = events
        .lines()
        .find(|l| l.starts_with(&format!("pid={new_pid} start")))
        .unwrap_or_else(|| panic!("no start of the replacement: {events}"));
    assert!(
        new_start.ends_with(&format!("positions={old_positions}")),
        "{new_start}"
    );
    assert!(
        !new_start.contains("starts_before=0"),
        "positions lost across the replacement: {new_start}"
    );
    assert!(
        old_positions.starts_with(&node_tree(&first_node).display().to_string()),
        "positions must live in the node's tree: {old_positions}"
    );
    let new_ip = pod_ip(&replacement).unwrap();
    assert!(
        ready_endpoint(&http, new_ip).await,
        "the replacement does not answer on {new_ip}"
    );

    // Clean up while the simulator still runs: it makes the pods' final deletes.
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the namespace to go", Duration::from_secs(90), || async {
        namespaces
            .get_opt(&namespace)
            .await
            .ok()
            .and_then(|ns| ns.is_none().then_some(()))
    })
    .await;
    assert!(
        simulator.stop(),
        "the node simulator did not stop within 30s of SIGTERM"
    );
    for dir in [image_dir, late_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
    for node in nodes.keys() {
        let _ = std::fs::remove_dir_all(node_tree(node).join(host_dir.trim_start_matches('/')));
    }
}
