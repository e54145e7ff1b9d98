//! The downward API (env `fieldRef`/`resourceFieldRef`, `downwardAPI` volume items) and
//! `$(VAR)` expansion, resolved the way the kubelet resolves them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod, ResourceFieldSelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// What the downward API can reveal about one pod on one node.
pub struct Facts<'a> {
    pub pod: &'a Pod,
    pub pod_ip: String,
    pub host_ip: String,
    /// Node allocatable: the value of a `limits.*` resource the container does not limit.
    pub allocatable: BTreeMap<String, Quantity>,
}

impl Facts<'_> {
    pub fn field(&self, selector: &ObjectFieldSelector) -> Result<String, String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        let path = selector.field_path.as_str();
        let subscript = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix("['"))
                .and_then(|rest| rest.strip_suffix("']"))
                .or_else(|| {
                    path.strip_prefix(prefix)
                        .and_then(|rest| rest.strip_prefix("[\""))
                        .and_then(|rest| rest.strip_suffix("\"]"))
                })
        };
        let value = match path {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.clone(),
            "metadata.labels" => format_map(meta.labels.as_ref()),
            "metadata.annotations" => format_map(meta.annotations.as_ref()),
            _ => {
                if let Some(key) = subscript("metadata.labels") {
                    meta.labels
                        .as_ref()
                        .and_then(|l| l.get(key).cloned())
                        .unwrap_or_default()
                } else if let Some(key) = subscript("metadata.annotations") {
                    meta.annotations
                        .as_ref()
                        .and_then(|a| a.get(key).cloned())
                        .unwrap_or_default()
                } else {
                    return Err(format!("unsupported fieldPath {path:?}"));
                }
            }
        };
        Ok(value)
    }

    pub fn resource(
        &self,
        container: &Container,
        selector: &ResourceFieldSelector,
    ) -> Result<String, String> {
        let resources = container.resources.as_ref();
        let (kind, name) = selector
            .resource
            .split_once('.')
            .ok_or_else(|| format!("unsupported resource {:?}", selector.resource))?;
        let set = match kind {
            "limits" => resources.and_then(|r| r.limits.as_ref()),
            "requests" => resources.and_then(|r| r.requests.as_ref()),
            _ => return Err(format!("unsupported resource {:?}", selector.resource)),
        };
        let quantity = set.and_then(|s| s.get(name)).or_else(|| {
            // An unset limit reads as what the node can give, as on a real kubelet.
            (kind == "limits")
                .then(|| self.allocatable.get(name))
                .flatten()
        });
        let value = match quantity {
            Some(q) => parse_quantity(&q.0)?,
            None => 0.0,
        };
        let divisor = match &selector.divisor {
            Some(d) => parse_quantity(&d.0)?,
            None => 1.0,
        };
        if divisor <= 0.0 {
            return Err(format!(
                "divisor of {:?} must be positive",
                selector.resource
            ));
        }
        // The kubelet rounds up: 250m CPU with divisor 1 reads as 1.
        Ok(format!("{}", (value / divisor).ceil() as i64))
    }
}

fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join("\n")
    })
    .unwrap_or_default()
}

/// A Kubernetes quantity as a plain number (`250m` is 0.25, `700Mi` is 734003200).
pub fn parse_quantity(q: &str) -> Result<f64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("bad quantity {q:?}"))?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        _ => return Err(format!("bad quantity {q:?}")),
    };
    Ok(number * factor)
}

/// `$(NAME)` expansion of command, args and env values: defined names are replaced,
/// `$$` escapes a `$`, anything else stays as written (the kubelet's rules).
pub fn expand(input: &str, vars: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match vars(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str(&rest[pos..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("250m").unwrap(), 0.25);
        assert_eq!(parse_quantity("700Mi").unwrap(), 734_003_200.0);
        assert_eq!(parse_quantity("2").unwrap(), 2.0);
        assert_eq!(parse_quantity("1k").unwrap(), 1000.0);
        assert!(parse_quantity("1Qi").is_err());
    }

    #[test]
    fn expansion() {
        let vars = |name: &str| (name == "NODE_NAME").then(|| "n0".to_string());
        assert_eq!(expand("--node=$(NODE_NAME)", &vars), "--node=n0");
        assert_eq!(expand("$(UNKNOWN)/x", &vars), "$(UNKNOWN)/x");
        assert_eq!(expand("$$(NODE_NAME) $5 $(", &vars), "$(NODE_NAME) $5 $(");
    }
}
