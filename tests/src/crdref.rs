//! The LogPipeline field reference (crds/REFERENCE.md), generated from the CRD's OpenAPI
//! schema, so the reference can never describe a field the API server does not have.

use std::fmt::Write;

use serde_json::Value;

/// Markdown reference of `spec` and `status` of the CRD in `crd_yaml`.
pub fn reference(crd_yaml: &str) -> Result<String, String> {
    let crd: Value = serde_yaml::from_str(crd_yaml).map_err(|e| format!("CRD YAML: {e}"))?;
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    let kind = crd["spec"]["names"]["kind"]
        .as_str()
        .unwrap_or("LogPipeline");
    let group = crd["spec"]["group"].as_str().unwrap_or_default();
    let name = version["name"].as_str().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {kind} reference ({group}/{name})\n\n\
         Generated from `crds/logpipe.io_logpipelines.yaml` by `make crds`; a test fails when \
         it is stale. Rules marked *checked* are enforced by the API server (CEL), with the \
         message shown.\n"
    );
    for section in ["spec", "status"] {
        let _ = writeln!(
            out,
            "## {section}\n\n| field | type | default | description |\n|---|---|---|---|"
        );
        walk(&schema["properties"][section], section, &mut out);
        out.push('\n');
    }
    Ok(out)
}

/// Fields of Kubernetes' own types: documented by the Kubernetes API reference, not expanded.
const KUBERNETES_TYPES: &[(&str, &str)] = &[
    ("spec.agent.affinity", "core/v1 Affinity"),
    ("spec.agent.tolerations", "core/v1 Toleration"),
    ("spec.agent.resources", "core/v1 ResourceRequirements"),
    ("status.conditions", "meta/v1 Condition"),
];

fn walk(schema: &Value, path: &str, out: &mut String) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(message) = rule["message"].as_str() {
            let _ = writeln!(out, "| `{path}` | | | *checked*: {} |", cell(message));
        }
    }
    let Some(properties) = schema["properties"].as_object() else {
        if let Some(items) = schema.get("items")
            && items["properties"].is_object()
        {
            walk(items, &format!("{path}[]"), out);
        }
        return;
    };
    for (field, child) in properties {
        let child_path = format!("{path}.{field}");
        let upstream = KUBERNETES_TYPES.iter().find(|(p, _)| *p == child_path);
        let description = match upstream {
            Some((_, kind)) => format!("Kubernetes `{kind}` (see the Kubernetes API reference)."),
            None => cell(child["description"].as_str().unwrap_or_default()),
        };
        let default = child
            .get("default")
            .map(|d| format!("`{d}`"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| `{child_path}` | {} | {default} | {description} |",
            type_of(child)
        );
        if upstream.is_none() {
            walk(child, &child_path, out);
        }
    }
}

fn type_of(schema: &Value) -> String {
    let base = schema["type"].as_str().unwrap_or_else(|| {
        if schema["x-kubernetes-int-or-string"].as_bool() == Some(true) {
            "int or string"
        } else {
            "any"
        }
    });
    let mut text = match base {
        "array" => format!("[]{}", type_of(&schema["items"])),
        "object" if schema["additionalProperties"].is_object() => {
            format!("map[string]{}", type_of(&schema["additionalProperties"]))
        }
        other => other.to_string(),
    };
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        text = format!("{text} ({})", values.join(", "));
    }
    text
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}
