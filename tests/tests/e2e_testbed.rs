//! Smoke test of the test bed itself: a DaemonSet lands on every KWOK node and becomes
//! Ready, and Loki keeps tenants apart. Run with `make e2e-testbed`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use logpipe_e2e::faultproxy::{Budget, Fault, FaultProxy, Rejection};
use logpipe_e2e::{Testbed, store, unique_suffix};
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
async fn store_keeps_numeric_tenants_apart_and_refuses_a_named_one() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (tenant, neighbour) = (store::unique_tenant(), store::unique_tenant());
    let marker = format!("smoke-{}", unique_suffix());
    let labels = BTreeMap::from([("job".to_string(), marker.clone())]);
    let start = store::now_ns() - 1_000_000_000;
    let line = format!("hello from the test bed {marker}");
    store::push(
        &testbed.store_url,
        &tenant,
        &labels,
        &[(store::now_ns(), line.clone())],
    )
    .await
    .unwrap();

    let query = format!("{{job=\"{marker}\"}}");
    let found = store::wait_for(
        &testbed.store_url,
        &tenant,
        &query,
        start,
        Duration::from_secs(30),
        |s| store::count(s) == 1,
    )
    .await
    .unwrap();
    assert_eq!(
        store::count(&found),
        1,
        "the line pushed under tenant {tenant}: {found:?}"
    );
    assert_eq!(found[0].entries[0].1, line);

    let other = store::query_range(
        &testbed.store_url,
        &neighbour,
        &query,
        start,
        store::now_ns() + 1_000_000_000,
    )
    .await
    .unwrap();
    assert_eq!(
        store::count(&other),
        0,
        "tenant {neighbour} must not see tenant {tenant}'s line: {other:?}"
    );

    // A Loki tenant name is refused by VictoriaLogs: the docs tell users to use numbers.
    let refused = store::push(
        &testbed.store_url,
        "ops",
        &labels,
        &[(store::now_ns(), line)],
    )
    .await;
    assert!(
        matches!(&refused, Err(store::StoreError::Status { status: 400, body }) if body.contains("accountID")),
        "{refused:?}"
    );
}

/// Each fault answers in the store's place for exactly its budget; what is forwarded
/// lands in the real store.
#[tokio::test]
async fn fault_proxy_answers_its_faults_and_forwards_the_rest() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = FaultProxy::start(&testbed.store_url).await.unwrap();
    proxy.inject(
        Fault::RateLimited {
            retry_after: Duration::from_secs(3),
        },
        Budget::Requests(1),
    );
    proxy.inject(Fault::ServerError, Budget::Requests(1));
    proxy.inject(
        Fault::Rejected(Rejection::EntryTooFarBehind),
        Budget::Requests(1),
    );
    proxy.inject(Fault::DropConnection, Budget::Requests(1));
    proxy.inject(
        Fault::Delay(Duration::from_millis(300)),
        Budget::Requests(1),
    );
    let tenant = store::unique_tenant();
    let marker = format!("proxied-{}", unique_suffix());
    let labels = BTreeMap::from([("job".to_string(), marker.clone())]);
    let start = store::now_ns() - 1_000_000_000;
    let mut answers = Vec::new();
    for i in 0..6 {
        let pushed = store::push(
            &proxy.url(),
            &tenant,
            &labels,
            &[(store::now_ns(), format!("line {i}"))],
        )
        .await;
        answers.push(match pushed {
            Ok(()) => "ok".to_string(),
            Err(store::StoreError::Status { status, body }) => format!("{status} {body}"),
            Err(e) => format!("error {e}"),
        });
    }
    assert!(
        answers[0].starts_with("429 Ingestion rate limit exceeded"),
        "{answers:?}"
    );
    assert!(answers[1].starts_with("500 "), "{answers:?}");
    assert!(
        answers[2].starts_with("400 ") && answers[2].contains("entry too far behind"),
        "{answers:?}"
    );
    assert!(
        answers[3].starts_with("error "),
        "a dropped connection: {answers:?}"
    );
    assert_eq!(answers[4..], ["ok", "ok"], "{answers:?}");
    let stats = proxy.stats();
    assert_eq!(
        (
            stats.get("429"),
            stats.get("500"),
            stats.get("400"),
            stats.get("drop"),
            stats.get("delay")
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(stats.get("forwarded"), 2);
    let query = format!("{{job=\"{marker}\"}}");
    let found = store::wait_for(
        &testbed.store_url,
        &tenant,
        &query,
        start,
        Duration::from_secs(30),
        |s| store::count(s) >= 2,
    )
    .await
    .unwrap();
    let lines: Vec<_> = found
        .iter()
        .flat_map(|s| s.entries.iter().map(|(_, l)| l.as_str()))
        .collect();
    assert_eq!(
        lines,
        ["line 4", "line 5"],
        "only the forwarded pushes land"
    );
}

/// Every component of the core test bed listens on loopback only (README "Test bed").
#[tokio::test]
async fn every_component_listens_on_loopback_only() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let required = [
        "ops-etcd",
        "ops-kube-apiserver",
        "ops-kube-controller-manager",
        "ops-kube-scheduler",
        "ops-kwok",
        "victorialogs",
    ];
    let checked = logpipe_e2e::listeners::check_loopback_only(&testbed.dir, &required);
    assert_eq!(checked, Ok(()));
}
