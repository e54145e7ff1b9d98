//! The ArgoCD health check (charts/logpipe/argocd/health.lua) on LogPipeline objects as
//! the real API server returns them: each status goes through the status subresource of
//! the CRD in crds/ as a dry run (validated and returned as it would be stored, but not
//! stored, so an operator running against the same test bed cannot overwrite it between
//! the write and the read), and the returned object is judged by the Lua script.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use logpipe_e2e::{Testbed, argocd, cluster, unique_suffix};
use serde_json::{Value, json};

async fn lp_api(testbed: &Testbed, namespace: &str) -> Api<DynamicObject> {
    let client = testbed.client("ops").await.unwrap();
    cluster::install_crd(&client).await.unwrap();
    cluster::ensure_namespace(&client, namespace).await.unwrap();
    cluster::logpipelines(&client, namespace)
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-11-24T10:00:00Z", "observedGeneration": 1})
}

#[tokio::test]
async fn argocd_health_follows_the_logpipeline_status() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let namespace = format!("argocd-health-{}", unique_suffix());
    let api = lp_api(&testbed, &namespace).await;
    let apply = PatchParams::apply("logpipe-e2e").force();
    api.patch(
        "lp",
        &apply,
        &Patch::Apply(json!({
            "apiVersion": "logpipe.io/v1alpha1", "kind": "LogPipeline",
            "metadata": {"name": "lp", "namespace": namespace},
            "spec": {"tenant": "ops", "endpoint": "http://127.0.0.1:43100/loki/api/v1/push"}
        })),
    )
    .await
    .unwrap();

    let mut fresh = serde_json::to_value(api.get("lp").await.unwrap()).unwrap();
    // An operator may already have written a status; the verdict before any is what
    // ArgoCD sees right after a sync.
    fresh.as_object_mut().unwrap().remove("status");
    assert_eq!(
        argocd::health(&fresh).unwrap().0,
        "Progressing",
        "no status yet: {fresh}"
    );
    let dry_run = PostParams {
        dry_run: true,
        field_manager: Some("logpipe-e2e".into()),
    };

    // (status written by the operator, expected ArgoCD health, text the message must hold)
    let cases = [
        (
            json!({"observedGeneration": 1, "phase": "Canary", "currentStep": 0,
                "message": "canary: 1/20 nodes on revision 7f3a"}),
            "Progressing",
            "canary",
        ),
        (
            json!({"observedGeneration": 1, "phase": "Healthy",
                "conditions": [condition("Ready", "True", "RolledOut", "20/20 agents ready")],
                "message": "20/20 nodes on revision 7f3a"}),
            "Healthy",
            "20/20",
        ),
        (
            json!({"observedGeneration": 1, "phase": "RollingBack",
                "message": "canary failed: no logs in Loki for node ops-node-0 after 2m"}),
            "Degraded",
            "no logs in Loki",
        ),
        (
            json!({"observedGeneration": 1, "phase": "Step",
                "conditions": [condition("Degraded", "True", "VerificationFailed", "send errors 12 > 0")]}),
            "Degraded",
            "send errors",
        ),
        (
            json!({"observedGeneration": 1, "phase": "Paused", "message": "paused by spec.rollout.paused"}),
            "Suspended",
            "paused",
        ),
        (
            json!({"observedGeneration": 1, "phase": "Pending",
                "message": "held: ops/logpipe must be Healthy at this release for 23h12m more"}),
            "Suspended",
            "held",
        ),
        (
            json!({"observedGeneration": 0, "phase": "Healthy"}),
            "Progressing",
            "generation 1",
        ),
    ];
    for (status, expected, words) in cases {
        let mut object = api.get("lp").await.unwrap();
        object.data["status"] = status.clone();
        let object = api
            .replace_status("lp", &dry_run, &object)
            .await
            .unwrap_or_else(|e| panic!("status {status} refused: {e}"));
        let object = serde_json::to_value(object).unwrap();
        // The server adds the schema's defaults; every field written must come back as is.
        for (field, value) in status.as_object().unwrap() {
            assert_eq!(&object["status"][field], value, "status.{field} as stored");
        }
        let (health, message) = argocd::health(&object).unwrap();
        assert_eq!(health, expected, "status {}", object["status"]);
        assert!(
            message.contains(words),
            "message {message:?} should mention {words:?}"
        );
    }

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
        Api::all(testbed.client("ops").await.unwrap());
    namespaces
        .delete(&namespace, &Default::default())
        .await
        .unwrap();
}
