//! Prometheus on the test bed (`tests/testbed/addons.sh prometheus`): the scrape config
//! prometheus-operator would render from a ServiceMonitor, and the HTTP API's instant
//! queries.
//!
//! Flow: the test reads the operator's ServiceMonitor and the Services it selects from the
//! API server, [`scrape_config`] turns them into one Prometheus scrape config (a pure
//! function, table-tested below), [`Prometheus::load`] writes it where the add-on's
//! Prometheus includes it and reloads; [`Prometheus::query`] asks the HTTP API.
//!
//! Guarantees: the config keeps what prometheus-operator's `serviceMonitor/<ns>/<name>/<i>`
//! job keeps, the pods behind the selected Services on the endpoint's port and path, and
//! labels them as it does (`namespace`, `service`, `pod`, `container`, `node`, `endpoint`,
//! `job` = the Service's name).
//!
//! Caveats: it discovers `role: pod`, not `role: endpoints`. The test bed's Services have
//! no endpoints: the API server refuses loopback addresses in EndpointSlices, and every pod
//! IP here is in 127.0.0.0/8. The pods kept are those the Service's own selector picks,
//! which is what its EndpointSlices would list. Only `matchLabels` selectors and
//! `namespaceSelector.matchNames` are rendered (what the operator writes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{TestbedError, http_client};

/// Why no scrape config could be derived.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("the ServiceMonitor has no {0}")]
    Missing(&'static str),
    #[error("no selected Service has a port named {0:?}")]
    NoPort(String),
}

/// A Prometheus label name for a Kubernetes label key, as service discovery writes it.
fn sanitized(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The scrape config of endpoint `index` of `service_monitor` over `services` (the ones its
/// selector picks), discovering pods through `kubeconfig`. See the module docs.
pub fn scrape_config(
    service_monitor: &Value,
    services: &[Value],
    index: usize,
    kubeconfig: &Path,
) -> Result<Value, RenderError> {
    let meta = &service_monitor["metadata"];
    let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
        return Err(RenderError::Missing("metadata.namespace and name"));
    };
    let endpoint = &service_monitor["spec"]["endpoints"][index];
    let port = endpoint["port"]
        .as_str()
        .ok_or(RenderError::Missing("endpoints[].port"))?;
    let namespaces = service_monitor["spec"]["namespaceSelector"]["matchNames"].clone();
    // The operator makes one Service per LogPipeline; prometheus-operator would make one
    // target group per selected Service, with the same rules.
    let (service, target_port, keep) = services
        .iter()
        .find_map(|s| service_keep(s, port).map(|(t, k)| (&s["metadata"]["name"], t, k)))
        .ok_or_else(|| RenderError::NoPort(port.to_string()))?;
    let mut config = json!({
        "job_name": format!("serviceMonitor/{ns}/{name}/{index}"),
        "honor_labels": false,
        "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
        "kubernetes_sd_configs": [{
            "role": "pod",
            "kubeconfig_file": kubeconfig.display().to_string(),
            "namespaces": {"names": if namespaces.is_array() { namespaces } else { json!([ns]) }},
        }],
        "relabel_configs": relabelings(service, &target_port, keep, port),
    });
    if let Some(interval) = endpoint["interval"].as_str() {
        config["scrape_interval"] = json!(interval);
    }
    Ok(config)
}

/// For a Service with a port named `port`: its target port and the relabelings keeping its
/// pods (the Service's selector, on pod labels).
fn service_keep(service: &Value, port: &str) -> Option<(Value, Vec<Value>)> {
    let ports = service["spec"]["ports"].as_array()?;
    let target = ports.iter().find(|p| p["name"] == port)?;
    let target_port = match &target["targetPort"] {
        Value::Null => target["port"].clone(),
        other => other.clone(),
    };
    let keep = service["spec"]["selector"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, value)| {
            let key = sanitized(key);
            json!({
                "action": "keep",
                "source_labels": [format!("__meta_kubernetes_pod_label_{key}"),
                                  format!("__meta_kubernetes_pod_labelpresent_{key}")],
                "regex": format!("({});true", value.as_str().unwrap_or_default()),
            })
        })
        .collect();
    Some((target_port, keep))
}

/// The Service's pods (`keep`: its selector), on the container port its target port names
/// (or numbers), then prometheus-operator's target labels.
fn relabelings(service: &Value, target_port: &Value, keep: Vec<Value>, port: &str) -> Vec<Value> {
    let mut rules = keep;
    rules.push(
        json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
                      "regex": "(Failed|Succeeded)"}),
    );
    rules.push(match target_port {
        Value::Number(n) => json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_number"], "regex": n.to_string()}),
        other => json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": other.as_str().unwrap_or_default()}),
    });
    for (source, target) in [
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_pod_name", "pod"),
        ("__meta_kubernetes_pod_container_name", "container"),
        ("__meta_kubernetes_pod_node_name", "node"),
    ] {
        rules.push(json!({"source_labels": [source], "target_label": target}));
    }
    for (target, value) in [
        ("service", service),
        ("job", service),
        ("endpoint", &json!(port)),
    ] {
        rules.push(json!({"target_label": target, "replacement": value}));
    }
    rules
}

/// The add-on's Prometheus (`tests/testbed/addons.sh prometheus`).
pub struct Prometheus {
    pub url: String,
    scrape_dir: PathBuf,
}

impl Prometheus {
    /// The running one, found through `<testbed>/prometheus-url`; fails with the command
    /// that starts it.
    pub async fn running(testbed: &crate::Testbed) -> Result<Self, TestbedError> {
        let file = testbed.dir.join("prometheus-url");
        let url = std::fs::read_to_string(&file)
            .map_err(|source| TestbedError::Read {
                path: file.clone(),
                source,
            })?
            .trim()
            .to_string();
        let ready = format!("{url}/-/ready");
        http_client()
            .get(&ready)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|source| TestbedError::Http { url: ready, source })?;
        Ok(Self {
            url,
            scrape_dir: testbed.dir.join("prometheus/scrape"),
        })
    }

    /// Write `config` as `<name>.yaml` among the included scrape configs and reload.
    pub async fn load(&self, name: &str, config: &Value) -> Result<(), TestbedError> {
        let path = self.scrape_dir.join(format!("{name}.yaml"));
        let text =
            serde_yaml::to_string(&json!({"scrape_configs": [config]})).map_err(|source| {
                TestbedError::Yaml {
                    path: path.clone(),
                    source,
                }
            })?;
        std::fs::write(&path, text).map_err(|source| TestbedError::Write {
            path: path.clone(),
            source,
        })?;
        self.reload().await
    }

    /// Remove `<name>.yaml` and reload.
    pub async fn unload(&self, name: &str) -> Result<(), TestbedError> {
        let _ = std::fs::remove_file(self.scrape_dir.join(format!("{name}.yaml")));
        self.reload().await
    }

    async fn reload(&self) -> Result<(), TestbedError> {
        let url = format!("{}/-/reload", self.url);
        http_client()
            .post(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|source| TestbedError::Http { url, source })?;
        Ok(())
    }

    /// `data` of a GET on the HTTP API (`/api/v1/...`).
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, TestbedError> {
        let url = format!("{}{path}", self.url);
        let body: Value = http_client()
            .get(&url)
            .query(params)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|source| TestbedError::Http {
                url: url.clone(),
                source,
            })?
            .json()
            .await
            .map_err(|source| TestbedError::Http { url, source })?;
        Ok(body["data"].clone())
    }

    /// The samples of an instant query: each one's labels and value.
    pub async fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>, TestbedError> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let value = s["value"][1].as_str().and_then(|v| v.parse().ok());
                (s["metric"].clone(), value.unwrap_or(f64::NAN))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor(endpoint: Value) -> Value {
        json!({"metadata": {"name": "logpipe", "namespace": "logs"},
               "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": "logpipe"}},
                        "namespaceSelector": {"matchNames": ["logs"]},
                        "endpoints": [endpoint]}})
    }

    fn service(target_port: Value) -> Value {
        json!({"metadata": {"name": "logpipe-metrics", "namespace": "logs"},
               "spec": {"selector": {"app.kubernetes.io/name": "logpipe-agent"},
                        "ports": [{"name": "metrics", "port": 12345, "targetPort": target_port}]}})
    }

    fn rule<'a>(config: &'a Value, source: &str) -> &'a Value {
        config["relabel_configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["source_labels"][0] == source)
            .unwrap_or_else(|| panic!("no rule on {source}: {config}"))
    }

    #[test]
    fn renders_the_pod_role_equivalent_of_a_service_monitor() {
        let kc = Path::new("/bed/ops/kubeconfig");
        let named = monitor(json!({"port": "metrics", "path": "/metrics", "interval": "5s"}));
        // (monitor, services, expected port rule source, regex, interval)
        let cases = [
            (
                named.clone(),
                vec![service(json!("metrics"))],
                "__meta_kubernetes_pod_container_port_name",
                "metrics",
                Some("5s"),
            ),
            (
                monitor(json!({"port": "metrics"})),
                vec![service(json!(12345))],
                "__meta_kubernetes_pod_container_port_number",
                "12345",
                None,
            ),
            (
                monitor(json!({"port": "metrics"})),
                vec![service(Value::Null)],
                "__meta_kubernetes_pod_container_port_number",
                "12345",
                None,
            ),
        ];
        for (sm, services, source, regex, interval) in cases {
            let c = scrape_config(&sm, &services, 0, kc).unwrap();
            assert_eq!(c["job_name"], "serviceMonitor/logs/logpipe/0");
            assert_eq!(c["metrics_path"], "/metrics");
            assert_eq!(c["scrape_interval"].as_str(), interval);
            assert_eq!(c["kubernetes_sd_configs"][0]["role"], "pod");
            assert_eq!(
                c["kubernetes_sd_configs"][0]["namespaces"]["names"],
                json!(["logs"])
            );
            assert_eq!(rule(&c, source)["regex"], regex);
            let selector = rule(&c, "__meta_kubernetes_pod_label_app_kubernetes_io_name");
            assert_eq!(selector["regex"], "(logpipe-agent);true");
            assert_eq!(
                rule(&c, "__meta_kubernetes_pod_node_name")["target_label"],
                "node"
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_render() {
        let kc = Path::new("/kc");
        let sm = monitor(json!({"port": "web"}));
        assert_eq!(
            scrape_config(&sm, &[service(json!("metrics"))], 0, kc),
            Err(RenderError::NoPort("web".into()))
        );
        assert_eq!(
            scrape_config(&monitor(json!({})), &[service(json!("metrics"))], 0, kc),
            Err(RenderError::Missing("endpoints[].port"))
        );
        assert_eq!(
            scrape_config(&json!({}), &[], 0, kc),
            Err(RenderError::Missing("metadata.namespace and name"))
        );
    }
}
