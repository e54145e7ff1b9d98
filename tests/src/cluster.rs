//! Small steps every end-to-end test (and the operator bench) takes on a test-bed cluster:
//! the LogPipeline CRD from crds/ installed and served (with the agents' ClusterRole from
//! the chart), a namespace, the nodes, an API handle for LogPipelines. Each returns what
//! went wrong as a [`TestbedError`].

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::json;

use crate::{TestbedError, Wait, poll};

const FIELD_MANAGER: &str = "logpipe-e2e";

/// The label the operator puts on the agent pods it runs.
pub const AGENT_PODS: &str = "app.kubernetes.io/name=logpipe-agent";

/// The agent pods in `namespace` that are not terminating.
pub async fn live_agent_pods(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<Pod>, TestbedError> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(AGENT_PODS))
        .await
        .map_err(TestbedError::kube("list the agent pods"))?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Apply the committed CRD (what the operator's types generate) and the agents' ClusterRole
/// the chart ships (the operator only binds it), and wait until the API server serves the CRD.
pub async fn install_crd(client: &kube::Client) -> Result<(), TestbedError> {
    install_agent_cluster_role(client).await?;
    let path = crate::repo_root().join("crds/logpipe.io_logpipelines.yaml");
    let text = std::fs::read_to_string(&path).map_err(|source| TestbedError::Read {
        path: path.clone(),
        source,
    })?;
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&text).map_err(|source| TestbedError::Yaml { path, source })?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "logpipelines.logpipe.io",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .map_err(TestbedError::kube("applying the LogPipeline CRD"))?;
    poll(
        "the LogPipeline CRD Established",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let established = crds
                .get("logpipelines.logpipe.io")
                .await
                .map_err(|e| e.to_string())?
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            established.then_some(()).ok_or(Wait::from("not yet"))
        },
    )
    .await
}

/// The agents' ClusterRole, from the file the chart renders it from: an operator run
/// outside the chart binds each LogPipeline's agents to it.
pub async fn install_agent_cluster_role(client: &kube::Client) -> Result<(), TestbedError> {
    let path = crate::repo_root().join("charts/logpipe/files/agent-clusterrole.yaml");
    let text = std::fs::read_to_string(&path).map_err(|source| TestbedError::Read {
        path: path.clone(),
        source,
    })?;
    let role: ClusterRole =
        serde_yaml::from_str(&text).map_err(|source| TestbedError::Yaml { path, source })?;
    let name = role.metadata.name.clone().unwrap_or_default();
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&role),
        )
        .await
        .map_err(TestbedError::kube(&format!(
            "applying the agents' ClusterRole {name}"
        )))?;
    Ok(())
}

/// Create (or keep) a namespace.
pub async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), TestbedError> {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
        )
        .await
        .map_err(TestbedError::kube(&format!("creating namespace {name}")))?;
    Ok(())
}

/// How many nodes the cluster has, and how many of them are Ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nodes {
    /// What a DaemonSet without constraints runs on.
    pub all: usize,
    pub ready: usize,
}

/// The cluster's nodes, counted.
pub async fn nodes(client: &kube::Client) -> Result<Nodes, TestbedError> {
    let list = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(TestbedError::kube("listing nodes"))?;
    let ready = list
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    Ok(Nodes {
        all: list.items.len(),
        ready,
    })
}

/// LogPipelines of one namespace, as untyped objects (what a user's kubectl sees).
pub fn logpipelines(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("logpipe.io", "v1alpha1", "LogPipeline"),
        "logpipelines",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The reasons of the Events in `namespace` (what `kubectl get events` lists).
pub async fn event_reasons(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<String>, TestbedError> {
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(TestbedError::kube("listing events"))?;
    Ok(events.items.into_iter().filter_map(|e| e.reason).collect())
}

/// examples/ops.yaml's LogPipeline in namespace `ns`, pushing to `push_url`, for KWOK's
/// agent pods (no process, nothing shipped): verification only waits for Ready pods,
/// briefly, and never reaches for the example's in-cluster query address.
pub fn ops_example_on_kwok(ns: &str, push_url: &str) -> serde_json::Value {
    let mut lp = crate::yaml_documents(&crate::repo_root().join("examples/ops.yaml"))
        .into_iter()
        .find(|doc| doc["kind"] == "LogPipeline")
        .unwrap_or_default();
    lp["metadata"]["namespace"] = json!(ns);
    lp["spec"]["endpoint"] = json!(push_url);
    lp["spec"]["rollout"]["verify"] = json!({"window": "1s", "shipping": false});
    lp["spec"]["rollout"]["soak"] = json!("1s");
    lp
}
