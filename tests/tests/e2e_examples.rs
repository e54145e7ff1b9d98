//! Every example a user copies works: each LogPipeline in examples/ is accepted by the real
//! API server (server-side dry run against the CRD in crds/), and the ArgoCD manifests point
//! at paths and files that exist in this repository.

use std::path::Path;

use kube::api::{Patch, PatchParams};
use logpipe_e2e::{Testbed, cluster, repo_root};
use serde_json::Value;

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn example_logpipelines_are_accepted_by_the_api_server() {
    let testbed = Testbed::ensure(&["ops"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = testbed.client("ops").await.unwrap();
    cluster::install_crd(&client).await;
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::apply("logpipe-e2e")
    };
    let mut checked = 0;
    for file in yaml_files(&repo_root().join("examples")) {
        for doc in documents(&file) {
            if doc["kind"] != "LogPipeline" {
                continue;
            }
            let namespace = doc["metadata"]["namespace"].as_str().unwrap().to_string();
            cluster::ensure_namespace(&client, &namespace).await;
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

#[test]
fn argocd_examples_point_at_this_repository() {
    let mut applications = 0;
    for file in yaml_files(&repo_root().join("examples/argocd")) {
        for doc in documents(&file) {
            let spec = match doc["kind"].as_str() {
                Some("Application") => &doc["spec"],
                Some("ApplicationSet") => &doc["spec"]["template"]["spec"],
                _ => continue,
            };
            let source = &spec["source"];
            applications += 1;
            let path = source["path"].as_str().unwrap();
            if path.contains("{{") {
                continue; // a per-cluster directory of the user's own repository
            }
            let dir = repo_root().join(path);
            assert!(
                dir.is_dir(),
                "{}: path {path} does not exist",
                file.display()
            );
            if let Some(include) = source["directory"]["include"].as_str() {
                assert!(
                    dir.join(include).is_file(),
                    "{}: {path}/{include} does not exist",
                    file.display()
                );
            }
            let options: Vec<&str> = spec["syncPolicy"]["syncOptions"]
                .as_array()
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert!(
                options.contains(&"ServerSideApply=true"),
                "{}: the CRD and LogPipelines need ServerSideApply=true",
                file.display()
            );
        }
    }
    assert!(
        applications >= 3,
        "operator, LogPipelines and ApplicationSet examples expected"
    );
}
