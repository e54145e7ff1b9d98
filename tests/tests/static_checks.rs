//! Checks of the repository's files that need no test bed, no helm and no cluster, so they
//! run in `make unit` (`cargo test --workspace`): the chart's CRD is the generated one,
//! every example parses as what it claims to be, and the ArgoCD examples point at paths of
//! this repository. (crd_reference.rs and metrics_reference.rs are of the same tier.)
//! What needs the API server is in e2e_chart.rs and e2e_examples.rs.

use logpipe_e2e::{repo_root, yaml_documents, yaml_files};
use logpipe_operator::crd::LogPipeline;
use serde_json::Value;

#[test]
fn chart_crds_are_the_generated_ones() {
    let generated =
        std::fs::read_to_string(repo_root().join("crds/logpipe.io_logpipelines.yaml")).unwrap();
    let in_chart = std::fs::read_to_string(
        repo_root().join("charts/logpipe/crds/logpipe.io_logpipelines.yaml"),
    )
    .unwrap();
    assert!(
        generated == in_chart,
        "charts/logpipe/crds/ differs from crds/: run `make crds`"
    );
}

/// Parse, and pass the operator's full validation (what `logpipe-operator validate` runs):
/// an example the operator would hold as InvalidSpec fails here.
#[test]
fn example_logpipelines_parse_and_validate_as_the_operator_reads_them() {
    let mut parsed = 0;
    for file in yaml_files(&repo_root().join("examples")) {
        for doc in yaml_documents(&file) {
            if doc["kind"] != "LogPipeline" {
                continue;
            }
            let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
            let lp: LogPipeline = serde_json::from_value(doc).unwrap_or_else(|e| {
                panic!("{}: LogPipeline {name} does not parse: {e}", file.display())
            });
            assert!(
                lp.metadata.namespace.is_some(),
                "{}: LogPipeline {name} has no namespace",
                file.display()
            );
            let text = serde_yaml::to_string(&lp).unwrap();
            let (report, verdict) = logpipe_operator::render::validate(&text).unwrap();
            assert!(verdict.is_ok(), "{}: {report}", file.display());
            parsed += 1;
        }
    }
    assert!(
        parsed >= 3,
        "ops, dev and prod examples expected, parsed {parsed}"
    );
}

#[test]
fn argocd_examples_point_at_this_repository() {
    let mut applications = 0;
    for file in yaml_files(&repo_root().join("examples/argocd")) {
        for doc in yaml_documents(&file) {
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
