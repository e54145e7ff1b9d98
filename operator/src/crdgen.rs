//! The CRD YAML committed in `crds/`, generated from the Rust types (never written by hand).

use kube::CustomResourceExt;

use crate::crd::LogPipeline;

/// Path of the generated file, relative to the workspace root.
pub const CRD_FILE: &str = "crds/logpipe.io_logpipelines.yaml";

#[derive(Debug, thiserror::Error)]
pub enum CrdgenError {
    #[error("cannot serialize the CRD: {0}")]
    Serialize(#[from] serde_yaml::Error),
    #[error("cannot serialize the CRD: {0}")]
    Json(#[from] serde_json::Error),
}

/// The CRD as YAML, with a header saying how to regenerate it.
pub fn crd_yaml() -> Result<String, CrdgenError> {
    let mut crd = serde_json::to_value(LogPipeline::crd())?;
    unsigned_as_minimum(&mut crd);
    let body = serde_yaml::to_string(&crd)?;
    Ok(format!(
        "# Generated from operator/src/crd by `logpipe-operator crdgen` (make crds). Do not edit.\n{body}"
    ))
}

/// The agent's unsigned fields come out as `format: uint32/uint64`, which the API server
/// does not know (a warning on every apply); say the same with `minimum: 0`.
fn unsigned_as_minimum(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if matches!(
                map.get("format").and_then(|f| f.as_str()),
                Some("uint32" | "uint64" | "uint")
            ) {
                map.remove("format");
                map.entry("minimum").or_insert(serde_json::json!(0));
            }
            map.values_mut().for_each(unsigned_as_minimum);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unsigned_as_minimum),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_dir_is_up_to_date() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_FILE);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crd_yaml().unwrap();
        assert!(
            committed == generated,
            "{CRD_FILE} is stale (or missing): run `make crds` (logpipe-operator crdgen > {CRD_FILE}) and commit it"
        );
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = LogPipeline::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("logpipelines.logpipe.io")
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["lp".to_string()]));
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Tenant", "Ready", "Phase", "Revision", "Message", "Age"]
        );
    }
}
