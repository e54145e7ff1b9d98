//! Small steps every end-to-end test takes on a test-bed cluster: the LogPipeline CRD from
//! crds/ installed and served (with the agents' ClusterRole from the chart), a namespace, an API handle for LogPipelines. Test helpers:
//! a failure panics with what went wrong.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::json;

const FIELD_MANAGER: &str = "logpipe-e2e";

/// Apply the committed CRD (what the operator's types generate) and the agents' ClusterRole
/// the chart ships (the operator only binds it), and wait until the API server serves the CRD.
pub async fn install_crd(client: &kube::Client) {
    install_agent_cluster_role(client).await;
    let path = crate::repo_root().join("crds/logpipe.io_logpipelines.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "logpipelines.logpipe.io",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("applying the LogPipeline CRD: {e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let established = crds
            .get("logpipelines.logpipe.io")
            .await
            .ok()
            .and_then(|crd| crd.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the LogPipeline CRD is not Established after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agents' ClusterRole, from the file the chart renders it from: an operator run
/// outside the chart binds each LogPipeline's agents to it.
pub async fn install_agent_cluster_role(client: &kube::Client) {
    let path = crate::repo_root().join("charts/logpipe/files/agent-clusterrole.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let role: ClusterRole =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = role.metadata.name.clone().unwrap_or_default();
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&role),
        )
        .await
        .unwrap_or_else(|e| panic!("applying the agents' ClusterRole {name}: {e}"));
}

/// Create (or keep) a namespace.
pub async fn ensure_namespace(client: &kube::Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

/// Nodes of the cluster: what a DaemonSet without constraints runs on.
pub async fn node_count(client: &kube::Client) -> usize {
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list_metadata(&kube::api::ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("listing nodes: {e}"))
        .items
        .len()
}

/// LogPipelines of one namespace, as untyped objects (what a user's kubectl sees).
pub fn logpipelines(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("logpipe.io", "v1alpha1", "LogPipeline"),
        "logpipelines",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}
