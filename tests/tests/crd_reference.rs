//! crds/REFERENCE.md is generated from the CRD and must match it. `UPDATE_REFERENCE=1`
//! (run by `make crds`) rewrites it.

use logpipe_e2e::{crdref, repo_root};

#[test]
fn field_reference_matches_the_crd() {
    let crd =
        std::fs::read_to_string(repo_root().join("crds/logpipe.io_logpipelines.yaml")).unwrap();
    let generated = crdref::reference(&crd).unwrap();
    for field in [
        "spec.tenant",
        "spec.endpoint",
        "spec.pipeline[]",
        "spec.rollout.steps",
        "status.phase",
    ] {
        assert!(
            generated.contains(&format!("`{field}")),
            "reference lacks {field}"
        );
    }
    let path = repo_root().join("crds/REFERENCE.md");
    if std::env::var_os("UPDATE_REFERENCE").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "crds/REFERENCE.md is stale: run `make crds`"
    );
}
