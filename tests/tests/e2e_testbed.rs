//! Smoke test of the test bed itself: a DaemonSet lands on every KWOK node and becomes
//! Ready, and Loki keeps tenants apart. Run with `make e2e-testbed`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use logpipe_e2e::{Testbed, loki, unique_suffix};
use serde_json::json;

fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn daemonset_gets_a_ready_pod_on_every_node() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();

    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = nodes
        .list(&ListParams::default().labels("logpipe.io/testbed-cluster=ops"))
        .await
        .unwrap();
    let ready_nodes = nodes.items.iter().filter(|n| node_is_ready(n)).count();
    // At least what was asked for (a bed started for the rollout tests has more).
    assert!(
        nodes.items.len() >= logpipe_e2e::wanted_nodes(),
        "{} KWOK nodes in cluster ops, NODES={}",
        nodes.items.len(),
        logpipe_e2e::wanted_nodes()
    );
    assert_eq!(
        ready_nodes,
        nodes.items.len(),
        "Ready KWOK nodes in cluster ops"
    );
    let expected = nodes.items.len();
    for node in &nodes.items {
        let spec = node.spec.as_ref().unwrap();
        let cidr = spec.pod_cidr.as_deref().unwrap_or_default();
        assert!(
            cidr.starts_with("127."),
            "node pod CIDR {cidr} must be loopback"
        );
    }

    let namespace = format!("smoke-{}", unique_suffix());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let apply = PatchParams::apply("logpipe-e2e").force();
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
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    daemonsets
        .patch(
            "smoke",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "smoke", "namespace": namespace},
                "spec": {
                    "selector": {"matchLabels": {"app": "smoke"}},
                    "template": {
                        "metadata": {"labels": {"app": "smoke"}},
                        "spec": {
                            "priorityClassName": "system-node-critical",
                            "tolerations": [{"operator": "Exists"}],
                            "containers": [{"name": "agent", "image": "registry.invalid/agent:1"}]
                        }
                    }
                }
            })),
        )
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let ds = daemonsets.get("smoke").await.unwrap();
        let status = ds.status.unwrap_or_default();
        if status.desired_number_scheduled as usize == expected
            && status.number_ready as usize == expected
            || tokio::time::Instant::now() > deadline
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        status.desired_number_scheduled as usize, expected,
        "desiredNumberScheduled"
    );
    assert_eq!(status.number_ready as usize, expected, "numberReady");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pods = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(pods.items.len(), expected);
    for pod in &pods.items {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        assert!(ip.starts_with("127."), "pod IP {ip} must be loopback");
    }

    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn loki_keeps_tenants_apart() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let marker = format!("smoke-{}", unique_suffix());
    let labels = BTreeMap::from([("job".to_string(), marker.clone())]);
    let start = loki::now_ns() - 1_000_000_000;
    let line = format!("hello from the test bed {marker}");
    loki::push(
        &testbed.loki_url,
        "ops",
        &labels,
        &[(loki::now_ns(), line.clone())],
    )
    .await
    .unwrap();

    let query = format!("{{job=\"{marker}\"}}");
    let found = loki::wait_for(
        &testbed.loki_url,
        "ops",
        &query,
        start,
        Duration::from_secs(30),
        |s| loki::count(s) == 1,
    )
    .await
    .unwrap();
    assert_eq!(
        loki::count(&found),
        1,
        "the line pushed under tenant ops: {found:?}"
    );
    assert_eq!(found[0].entries[0].1, line);

    let other = loki::query_range(
        &testbed.loki_url,
        "dev",
        &query,
        start,
        loki::now_ns() + 1_000_000_000,
    )
    .await
    .unwrap();
    assert_eq!(
        loki::count(&other),
        0,
        "tenant dev must not see tenant ops' line: {other:?}"
    );
}
