//! End-to-end tests of the operator on the test bed (`make e2e-operator`): the operator
//! binary runs as a local process against cluster `ops` (real kube-apiserver 1.36,
//! controller-manager, scheduler, KWOK nodes).
//!
//! Each test works in its own namespace and runs its operator with `--namespace`, so runs
//! (and other tests sharing the test bed) never see each other's LogPipelines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    ValidationDirective,
};
use kube::{Client, ResourceExt};
use logpipe_e2e::cluster::nodes as count_nodes;
use logpipe_e2e::operator::Operator;
use logpipe_e2e::{Testbed, repo_root, unique_suffix, wait_for};
use serde_json::{Value, json};

fn lp_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    logpipe_e2e::cluster::logpipelines(client, ns)
}

async fn setup(testbed: &Testbed, client: &Client, prefix: &str) -> String {
    logpipe_e2e::cluster::install_crd(client).await.unwrap();
    let ns = format!("{prefix}-{}", unique_suffix());
    logpipe_e2e::cluster::ensure_namespace(client, &ns)
        .await
        .unwrap();
    let _ = testbed;
    ns
}

fn ops_example(testbed: &Testbed, ns: &str) -> Value {
    logpipe_e2e::cluster::ops_example_on_kwok(ns, &testbed.push_url())
}

async fn apply_lp(client: &Client, ns: &str, lp: &Value) {
    let name = lp["metadata"]["name"].as_str().unwrap();
    lp_api(client, ns)
        .patch(
            name,
            &PatchParams::apply("e2e-operator").force(),
            &Patch::Apply(lp),
        )
        .await
        .unwrap();
}

async fn status(client: &Client, ns: &str, name: &str) -> Result<Value, String> {
    let lp = lp_api(client, ns)
        .get(name)
        .await
        .map_err(|e| e.to_string())?;
    Ok(lp.data["status"].clone())
}

/// Wait until the LogPipeline is Healthy with every node ready at the current spec.
async fn wait_healthy(client: &Client, ns: &str, name: &str, timeout: Duration) -> Value {
    let nodes = count_nodes(client).await.unwrap().all;
    wait_for("LogPipeline Healthy on every node", timeout, || async {
        let lp = lp_api(client, ns)
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let s = &lp.data["status"];
        let ok = s["phase"] == "Healthy"
            && s["ready"] == format!("{nodes}/{nodes}")
            && s["readyNodes"] == nodes
            && s["observedGeneration"].as_i64() == lp.metadata.generation;
        ok.then(|| s.clone()).ok_or_else(|| s.to_string())
    })
    .await
}

async fn ready_pods(client: &Client, ns: &str) -> Vec<Pod> {
    logpipe_e2e::cluster::live_agent_pods(client, ns)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

/// Resource versions of everything the operator writes for `name`.
async fn versions(client: &Client, ns: &str, name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let cluster_name = format!("logpipe:{ns}:{name}");
    let lp = lp_api(client, ns).get(name).await.unwrap();
    out.insert("LogPipeline".into(), lp.resource_version().unwrap());
    let ds = Api::<DaemonSet>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    out.insert("DaemonSet".into(), ds.resource_version().unwrap());
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    out.insert("ServiceAccount".into(), sa.resource_version().unwrap());
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get(&format!("{name}-metrics"))
        .await
        .unwrap();
    out.insert("Service".into(), svc.resource_version().unwrap());
    for cm in Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=logpipe-operator"))
        .await
        .unwrap()
        .items
    {
        out.insert(
            format!("ConfigMap/{}", cm.name_any()),
            cm.resource_version().unwrap(),
        );
    }
    let crb = Api::<ClusterRoleBinding>::all(client.clone())
        .get(&cluster_name)
        .await
        .unwrap();
    // The agents are bound to the chart's ClusterRole; the operator creates none.
    assert_eq!(crb.role_ref.name, "logpipe-agent");
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&cluster_name)
            .await
            .unwrap()
            .is_none(),
        "the operator created a ClusterRole {cluster_name}"
    );
    out.insert("ClusterRoleBinding".into(), crb.resource_version().unwrap());
    out
}

#[tokio::test]
async fn ops_example_is_reconciled_updated_quiet_and_deleted() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    let ns = setup(&testbed, &client, "lpop-e2e").await;
    let mut operator = Operator::start(&testbed, "ops", &ns, "solo").await;
    let lp = ops_example(&testbed, &ns);
    let name = lp["metadata"]["name"].as_str().unwrap().to_string();

    // 1. Apply: the DaemonSet with the reference settings, a Ready pod on every node.
    let nodes = count_nodes(&client).await.unwrap().all;
    let started = Instant::now();
    apply_lp(&client, &ns, &lp).await;
    let first = wait_healthy(&client, &ns, &name, Duration::from_secs(60)).await;
    println!(
        "ops example Healthy {nodes}/{nodes} after {:?}",
        started.elapsed()
    );
    assert_eq!(ready_pods(&client, &ns).await.len(), nodes);
    let ds = Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    let spec = ds.spec.unwrap();
    assert_eq!(
        spec.update_strategy.unwrap().type_.as_deref(),
        Some("OnDelete")
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    let c = &pod.containers[0];
    let resources = c.resources.clone().unwrap();
    let requests = resources.requests.unwrap();
    let limits = resources.limits.unwrap();
    assert_eq!(requests["cpu"].0, "250m");
    assert_eq!(requests["memory"].0, "300Mi");
    assert_eq!(limits["memory"].0, "700Mi");
    assert!(!limits.contains_key("cpu"));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 12345);
    let annotations = spec.template.metadata.unwrap().annotations.unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "12345");
    assert!(
        annotations["ad.datadoghq.com/logpipe-agent.checks"].contains("%%host%%:12345/metrics")
    );
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let logs = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/var/log/pods")
        .unwrap();
    assert_eq!(logs.read_only, Some(true));
    let first_cm = first["configMap"].as_str().unwrap().to_string();
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get(&first_cm)
        .await
        .unwrap();
    assert_eq!(cm.immutable, Some(true));
    assert!(cm.data.unwrap()["config.yaml"].contains("tenant: ops"));

    // Someone else's change to the DaemonSet (as `kubectl label` makes it) survives the
    // reconciles below: server-side apply gives the operator only the fields it sets.
    Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .patch(
            &name,
            &PatchParams {
                field_manager: Some("e2e-platform-team".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"metadata": {"labels": {"example.com/team": "platform"}}})),
        )
        .await
        .unwrap();

    // 2. Quiet: reconciles triggered by pod events write nothing.
    let before = versions(&client, &ns, &name).await;
    let reconciles_before = operator.metric("logpipe_operator_reconciles_total").await;
    let writes_before = operator
        .metric("logpipe_operator_status_writes_total")
        .await;
    for (i, pod) in ready_pods(&client, &ns).await.iter().enumerate() {
        // A label on a pod is a watch event for the operator, and nothing it manages.
        Api::<Pod>::namespaced(client.clone(), &ns)
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"e2e-poke": i.to_string()}}})),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = versions(&client, &ns, &name).await;
    let reconciles = operator.metric("logpipe_operator_reconciles_total").await - reconciles_before;
    let writes = operator
        .metric("logpipe_operator_status_writes_total")
        .await
        - writes_before;
    println!(
        "quiet window: {reconciles} reconciles, {writes} status writes, {} objects unchanged",
        after.len()
    );
    assert!(
        reconciles >= 1.0,
        "the pokes should have triggered reconciles"
    );
    assert_eq!(writes, 0.0, "no status write when nothing changed");
    assert_eq!(before, after, "no object written when nothing changed");
    let labels = Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("example.com/team").map(String::as_str),
        Some("platform"),
        "another field manager's label survives reconciles: {labels:?}"
    );

    // 3. Edit the spec: new ConfigMap hash, new revision, rolled to every node.
    let mut edited = lp.clone();
    edited["spec"]["pipeline"]
        .as_array_mut()
        .unwrap()
        .push(json!({"staticLabels": {"cluster": "ops"}}));
    let started = Instant::now();
    apply_lp(&client, &ns, &edited).await;
    let second = wait_for(
        "the new revision on every node",
        Duration::from_secs(120),
        || async {
            let s = status(&client, &ns, &name).await?;
            let moved = s["targetRevision"] != first["targetRevision"]
                && s["phase"] == "Healthy"
                && s["updatedNodes"] == nodes
                && s["readyNodes"] == nodes;
            moved.then(|| s.clone()).ok_or_else(|| s.to_string())
        },
    )
    .await;
    println!(
        "new revision rolled to {nodes} nodes in {:?}",
        started.elapsed()
    );
    assert_ne!(
        second["configMap"], first["configMap"],
        "a config change is a new ConfigMap"
    );
    assert_eq!(second["stableRevision"], second["targetRevision"]);
    let pods = ready_pods(&client, &ns).await;
    assert_eq!(pods.len(), nodes);
    for pod in &pods {
        assert_eq!(
            pod.annotations()
                .get("logpipe.io/revision")
                .map(String::as_str),
            second["targetRevision"].as_str()
        );
    }
    wait_for(
        "the old ConfigMap to be garbage collected",
        Duration::from_secs(60),
        || async {
            match Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt(&first_cm)
                .await
            {
                Ok(None) => Ok(()),
                other => Err(format!("{:?}", other.map(|cm| cm.map(|c| c.name_any())))),
            }
        },
    )
    .await;

    // 4. Delete: everything goes, the cluster-scoped objects too.
    lp_api(&client, &ns)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let cluster_name = format!("logpipe:{ns}:{name}");
    wait_for(
        "every owned object to be deleted",
        Duration::from_secs(90),
        || async {
            let mut left = Vec::new();
            if lp_api(&client, &ns)
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                left.push("LogPipeline".to_string());
            }
            if Api::<DaemonSet>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                left.push("DaemonSet".into());
            }
            if Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                left.push("ServiceAccount".into());
            }
            let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .list(
                    &ListParams::default().labels("app.kubernetes.io/managed-by=logpipe-operator"),
                )
                .await
                .map_err(|e| e.to_string())?;
            left.extend(
                cms.items
                    .iter()
                    .map(|c| format!("ConfigMap/{}", c.name_any())),
            );
            if Api::<ClusterRoleBinding>::all(client.clone())
                .get_opt(&cluster_name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                left.push("ClusterRoleBinding".into());
            }
            left.is_empty().then_some(()).ok_or_else(|| left.join(", "))
        },
    )
    .await;
    println!("operator log: {}", operator.log.display());
    operator.kill().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}

/// An upgrade from an operator that created a ClusterRole per LogPipeline and bound the
/// agents to it: the binding (whose roleRef is immutable) is made again to the chart's
/// role, and the old role is deleted (this operator runs as admin, as with the chart's
/// `rbac.legacyClusterRoleCleanup=true`); the finalizer deletes the binding.
#[tokio::test]
async fn an_earlier_operators_cluster_role_is_replaced() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    let ns = setup(&testbed, &client, "lpop-upgrade").await;
    let lp = ops_example(&testbed, &ns);
    let name = lp["metadata"]["name"].as_str().unwrap().to_string();
    let cluster_name = format!("logpipe:{ns}:{name}");
    // What the earlier operator left: its ClusterRole and a binding to it.
    let labels = json!({"app.kubernetes.io/managed-by": "logpipe-operator"});
    let old_role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": cluster_name, "labels": labels},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }))
    .unwrap();
    let old_binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": cluster_name, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    }))
    .unwrap();
    let roles = Api::<ClusterRole>::all(client.clone());
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    roles
        .create(&PostParams::default(), &old_role)
        .await
        .unwrap();
    bindings
        .create(&PostParams::default(), &old_binding)
        .await
        .unwrap();

    let mut operator = Operator::start(&testbed, "ops", &ns, "upgrade").await;
    apply_lp(&client, &ns, &lp).await;
    wait_for(
        "the binding on the chart's role, the old role gone",
        Duration::from_secs(60),
        || async {
            let binding = bindings
                .get_opt(&cluster_name)
                .await
                .map_err(|e| e.to_string())?;
            let role_ref = binding.map(|b| b.role_ref.name);
            let old = roles
                .get_opt(&cluster_name)
                .await
                .map_err(|e| e.to_string())?;
            (role_ref.as_deref() == Some("logpipe-agent") && old.is_none())
                .then_some(())
                .ok_or_else(|| format!("roleRef {role_ref:?}, old role there: {}", old.is_some()))
        },
    )
    .await;

    lp_api(&client, &ns)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the binding deleted", Duration::from_secs(60), || async {
        match bindings.get_opt(&cluster_name).await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|b| b.map(|b| b.name_any())))),
        }
    })
    .await;
    operator.kill().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn leader_killed_mid_reconcile_standby_takes_over() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    let ns = setup(&testbed, &client, "lpop-leader").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |leases: Api<Lease>| async move {
        leases
            .get_opt("logpipe-operator")
            .await
            .map_err(|e| e.to_string())?
            .and_then(|l| l.spec.and_then(|s| s.holder_identity))
            .ok_or_else(|| "no holder".to_string())
    };
    let mut first = Operator::start(&testbed, "ops", &ns, "first").await;
    let leader = wait_for("a leader", Duration::from_secs(30), || {
        holder(leases.clone())
    })
    .await;
    assert_eq!(leader, "first");
    let mut second = Operator::start(&testbed, "ops", &ns, "second").await;
    assert_eq!(
        second.metric("logpipe_operator_leader").await,
        0.0,
        "the standby does not lead"
    );

    let lp = ops_example(&testbed, &ns);
    let name = lp["metadata"]["name"].as_str().unwrap().to_string();
    apply_lp(&client, &ns, &lp).await;
    // Kill the leader as soon as it started writing, before it could finish.
    wait_for(
        "the leader to start reconciling",
        Duration::from_secs(30),
        || async {
            let ds = Api::<DaemonSet>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await;
            matches!(ds, Ok(Some(_)))
                .then_some(())
                .ok_or_else(|| "no DaemonSet yet".to_string())
        },
    )
    .await;
    let killed = Instant::now();
    first.kill().await;
    let new_leader = wait_for(
        "the standby to take the lease",
        Duration::from_secs(30),
        || async {
            let h = holder(leases.clone()).await?;
            (h == "second").then_some(h.clone()).ok_or(h)
        },
    )
    .await;
    assert_eq!(new_leader, "second");
    wait_healthy(&client, &ns, &name, Duration::from_secs(60)).await;
    println!(
        "leader killed; standby finished the reconcile in {:?}",
        killed.elapsed()
    );
    assert_eq!(second.metric("logpipe_operator_leader").await, 1.0);

    lp_api(&client, &ns)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the LogPipeline to be deleted",
        Duration::from_secs(60),
        || async {
            match lp_api(&client, &ns).get_opt(&name).await {
                Ok(None) => Ok(()),
                other => Err(format!("{:?}", other.map(|o| o.map(|o| o.name_any())))),
            }
        },
    )
    .await;
    second.kill().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

#[tokio::test]
async fn bad_specs_are_refused_with_a_readable_message() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    let ns = setup(&testbed, &client, "lpop-bad").await;
    let cases: Vec<Value> = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("tests/tests/e2e_operator/bad_specs.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 30, "at least 30 distinct bad specs");
    let base = json!({
        "apiVersion": "logpipe.io/v1alpha1",
        "kind": "LogPipeline",
        "metadata": {"name": "bad", "namespace": ns},
        "spec": {"tenant": "ops", "endpoint": testbed.push_url(), "pipeline": [{"cri": {}}]},
    });
    // kubectl apply's defaults: server-side, strict field validation; dry run keeps the
    // namespace empty.
    let params = PatchParams {
        dry_run: true,
        force: true,
        field_manager: Some("e2e-operator".into()),
        field_validation: Some(ValidationDirective::Strict),
    };
    let api = lp_api(&client, &ns);
    // The base itself is accepted: each refusal is the patch's doing.
    api.patch("bad", &params, &Patch::Apply(&base))
        .await
        .unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let mut object = base.clone();
        merge(&mut object, &case["patch"]);
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let expect = case["expect"].as_str().unwrap();
        match api.patch(&name, &params, &Patch::Apply(&object)).await {
            Err(kube::Error::Api(status)) if status.message.contains(expect) => {
                println!(
                    "refused: {:<55} {}",
                    case["name"].as_str().unwrap(),
                    status.message
                );
            }
            other => failures.push(format!(
                "{}: expected a refusal containing {expect:?}, got {other:?}",
                case["name"].as_str().unwrap()
            )),
        }
    }
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
    assert!(
        failures.is_empty(),
        "{} of {} bad specs not refused as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// What only code can judge (issue 13): each mistake, applied over a Healthy LogPipeline,
/// is held as `InvalidSpec` naming its field, with an Event; the DaemonSet and its pods
/// are untouched, so the running revision keeps shipping. The rollout tests show the
/// shipping with real agents (`an_invalid_spec_is_held_and_the_running_release_keeps_shipping`).
#[tokio::test]
async fn mistakes_only_code_can_judge_are_held_as_invalid_spec_before_any_node_moves() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    let ns = setup(&testbed, &client, "lpop-invalid").await;
    let mut operator = Operator::start(&testbed, "ops", &ns, "solo").await;
    let lp = ops_example(&testbed, &ns);
    let name = lp["metadata"]["name"].as_str().unwrap().to_string();
    apply_lp(&client, &ns, &lp).await;
    wait_healthy(&client, &ns, &name, Duration::from_secs(60)).await;
    let daemon_sets = Api::<DaemonSet>::namespaced(client.clone(), &ns);
    let generation = |ds: DaemonSet| ds.metadata.generation;
    let ds_before = generation(daemon_sets.get(&name).await.unwrap());
    let pod_uids =
        |pods: Vec<Pod>| -> Vec<String> { pods.iter().filter_map(|p| p.uid()).collect() };
    let pods_before = pod_uids(ready_pods(&client, &ns).await);
    assert!(!pods_before.is_empty());

    let cases: Vec<Value> = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("tests/tests/e2e_operator/invalid_specs.yaml"))
            .unwrap(),
    )
    .unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let mut object = lp.clone();
        merge(&mut object, &case["patch"]);
        let expect = case["expect"].as_str().unwrap();
        let started = Instant::now();
        apply_lp(&client, &ns, &object).await;
        let held = wait_failure(&client, &ns, &name, "InvalidSpec").await;
        let message = held["message"].as_str().unwrap_or_default();
        println!(
            "held in {:>5.1}s: {:<52} {message}",
            started.elapsed().as_secs_f64(),
            case["name"].as_str().unwrap()
        );
        if !message.contains(expect) {
            failures.push(format!("{}: {expect:?} not in {message:?}", case["name"]));
        }
    }
    // Nothing moved: the same DaemonSet spec, the same pods.
    assert_eq!(generation(daemon_sets.get(&name).await.unwrap()), ds_before);
    assert_eq!(pod_uids(ready_pods(&client, &ns).await), pods_before);
    let reasons = logpipe_e2e::cluster::event_reasons(&client, &ns)
        .await
        .unwrap();
    assert!(
        reasons.iter().any(|r| r == "InvalidSpec"),
        "an InvalidSpec Event: {reasons:?}"
    );
    // The mistake fixed: Healthy again, on the same pods (nothing changed for them).
    apply_lp(&client, &ns, &lp).await;
    wait_healthy(&client, &ns, &name, Duration::from_secs(60)).await;
    assert_eq!(pod_uids(ready_pods(&client, &ns).await), pods_before);
    operator.kill().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
    assert!(
        failures.is_empty(),
        "{} of {} not held as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// What `kubectl get lp -o wide` and `kubectl describe lp` show of a failure: the Ready
/// condition's reason and the status message, for the generation that failed.
async fn wait_failure(client: &Client, ns: &str, name: &str, reason: &str) -> Value {
    wait_for(
        &format!("Ready=False reason {reason}"),
        Duration::from_secs(30),
        || async {
            let lp = lp_api(client, ns)
                .get(name)
                .await
                .map_err(|e| e.to_string())?;
            let s = &lp.data["status"];
            let ready = s["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .cloned()
                .unwrap_or_default();
            let ok = ready["status"] == "False"
                && ready["reason"] == reason
                && s["observedGeneration"].as_i64() == lp.metadata.generation;
            ok.then(|| s.clone()).ok_or_else(|| s.to_string())
        },
    )
    .await
}

/// Regression: a DaemonSet the API server refused (a toleration key the LogPipeline
/// schema lets through) left the previous revision's message in status; a missing auth
/// Secret was only in the operator's log.
#[tokio::test]
async fn refused_apply_and_missing_secret_show_their_reason_in_status() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    let ns = setup(&testbed, &client, "lpop-fail").await;
    let mut operator = Operator::start(&testbed, "ops", &ns, "solo").await;
    let mut lp = ops_example(&testbed, &ns);
    let name = lp["metadata"]["name"].as_str().unwrap().to_string();
    apply_lp(&client, &ns, &lp).await;
    wait_healthy(&client, &ns, &name, Duration::from_secs(60)).await;

    // 1. A toleration key the API server refuses on the DaemonSet (not a qualified name;
    //    the LogPipeline schema checks operators and effects, not key syntax).
    let started = Instant::now();
    lp["spec"]["agent"]["tolerations"] = json!([{"key": "dedicated node!", "operator": "Exists"}]);
    apply_lp(&client, &ns, &lp).await;
    let failed = wait_failure(&client, &ns, &name, "ApplyFailed").await;
    let message = failed["message"].as_str().unwrap_or_default();
    println!(
        "toleration key refused after {:?}: {message}",
        started.elapsed()
    );
    assert!(
        message.contains("ApplyFailed") && message.contains("DaemonSet"),
        "{message}"
    );
    assert!(
        message.contains("dedicated node!"),
        "the API server's own words: {message}"
    );

    // 2. The typo fixed, but a bearer token from a Secret that does not exist.
    lp["spec"]["agent"]["tolerations"] = json!([{"operator": "Exists"}]);
    lp["spec"]["auth"] =
        json!({"bearerTokenSecretRef": {"name": "no-such-secret", "key": "token"}});
    let started = Instant::now();
    apply_lp(&client, &ns, &lp).await;
    let failed = wait_failure(&client, &ns, &name, "SecretMissing").await;
    let message = failed["message"].as_str().unwrap_or_default();
    println!("missing Secret after {:?}: {message}", started.elapsed());
    assert!(message.contains("no-such-secret"), "{message}");
    let reasons = logpipe_e2e::cluster::event_reasons(&client, &ns)
        .await
        .unwrap();
    assert!(
        ["ApplyFailed", "SecretMissing"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r)),
        "an Event for each failure: {reasons:?}"
    );

    // 3. The Secret created: Healthy again.
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "no-such-secret"},
                "stringData": {"token": "t"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    wait_healthy(&client, &ns, &name, Duration::from_secs(90)).await;

    // The finalizer removes the cluster-scoped objects while the operator still runs.
    lp_api(&client, &ns)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the LogPipeline gone", Duration::from_secs(60), || async {
        match lp_api(&client, &ns).get_opt(&name).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    operator.kill().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}
