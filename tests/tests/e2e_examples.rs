//! Every example a user copies works: each LogPipeline in examples/ is accepted by the real
//! API server (server-side dry run against the CRD in crds/). That they parse and that the
//! ArgoCD manifests point at paths of this repository needs no cluster:
//! tests/static_checks.rs.

use kube::api::{Patch, PatchParams};
use logpipe_e2e::{Testbed, cluster, repo_root, yaml_documents, yaml_files};

#[tokio::test]
async fn example_logpipelines_are_accepted_by_the_api_server() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    cluster::install_crd(&client).await.unwrap();
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::apply("logpipe-e2e")
    };
    let mut checked = 0;
    for file in yaml_files(&repo_root().join("examples")) {
        for doc in yaml_documents(&file) {
            if doc["kind"] != "LogPipeline" {
                continue;
            }
            let namespace = doc["metadata"]["namespace"].as_str().unwrap().to_string();
            cluster::ensure_namespace(&client, &namespace)
                .await
                .unwrap();
            let api = cluster::logpipelines(&client, &namespace);
            let name = doc["metadata"]["name"].as_str().unwrap();
            api.patch(name, &dry_run, &Patch::Apply(&doc))
                .await
                .unwrap_or_else(|e| panic!("{} refused by the API server: {e}", file.display()));
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "ops, dev and prod examples expected, checked {checked}"
    );
}
