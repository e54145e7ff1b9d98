//! The promotion gate across clusters: hold a new release until a LogPipeline in another
//! cluster has been Healthy at the same release for the gate's soak time.
//!
//! # Flow
//! 1. Read the Secret `spec.rollout.gate.clusterSecretRef` (the LogPipeline's namespace):
//!    either a kubeconfig under `key`, or an ArgoCD cluster Secret (`server` and `config`
//!    keys, `config` being ArgoCD's JSON: bearerToken or username/password,
//!    tlsClientConfig with caData/certData/keyData/insecure/serverName) — see
//!    [`kubeconfig_from_secret`].
//! 2. GET the LogPipeline there (timeouts on connect and read).
//! 3. [`decide`] (pure): open when it reports `phase: Healthy` for its current generation,
//!    at the same `release`, with `healthySince` at least `soak` ago.
//!
//! # Guarantees
//! - The release is what moves together (agent image, pipeline, labels: see
//!   `desired::release`), not per-cluster fields (tenant, endpoint, resources), so the
//!   same change synced to every cluster at once still goes ops -> dev -> prod.
//! - Any failure to ask (no Secret, unreachable cluster, no such LogPipeline) holds the
//!   release and says why in `status.gate.message`; it never opens the gate.
//!
//! # Caveats
//! - The gate is consulted before the canary only: once a release started moving, the
//!   other cluster turning unhealthy does not stop it (the step checks do).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;
use serde_json::json;

use crate::crd::{GateSpec, GateStatus, LogPipeline, LogPipelineStatus, Phase};
use crate::rollout::{Gate, ends_at, human};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot read Secret {name}: {source}")]
    Secret { name: String, source: kube::Error },
    #[error("Secret {name} has no key {key}")]
    MissingKey { name: String, key: String },
    #[error("Secret {name}: {message}")]
    Credentials { name: String, message: String },
    #[error("cannot reach the gate's cluster: {0}")]
    Remote(#[from] kube::Error),
    #[error("the gate's cluster did not answer within {0:?}")]
    Timeout(Duration),
}

/// ArgoCD's `config` JSON of a cluster Secret (the fields that matter here).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ArgoConfig {
    bearer_token: Option<String>,
    username: Option<String>,
    password: Option<String>,
    tls_client_config: ArgoTls,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ArgoTls {
    insecure: bool,
    server_name: Option<String>,
    ca_data: Option<String>,
    cert_data: Option<String>,
    key_data: Option<String>,
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
}

/// A kubeconfig from a Secret's data (pure): an ArgoCD cluster Secret when it has
/// `server` and `config`, else the kubeconfig stored under `key`.
pub fn kubeconfig_from_secret(
    name: &str,
    data: &BTreeMap<String, ByteString>,
    key: &str,
) -> Result<Kubeconfig, GateError> {
    let bad = |message: String| GateError::Credentials {
        name: name.to_string(),
        message,
    };
    if let (Some(server), Some(config)) = (text(data, "server"), text(data, "config")) {
        let argo: ArgoConfig = serde_json::from_str(&config)
            .map_err(|e| bad(format!("config is not ArgoCD cluster JSON: {e}")))?;
        let tls = argo.tls_client_config;
        let mut cluster = json!({"server": server});
        if let Some(ca) = tls.ca_data {
            cluster["certificate-authority-data"] = json!(ca);
        }
        if tls.insecure {
            cluster["insecure-skip-tls-verify"] = json!(true);
        }
        if let Some(sni) = tls.server_name {
            cluster["tls-server-name"] = json!(sni);
        }
        let mut user = json!({});
        if let Some(token) = argo.bearer_token {
            user["token"] = json!(token);
        }
        if let (Some(u), Some(p)) = (argo.username, argo.password) {
            user["username"] = json!(u);
            user["password"] = json!(p);
        }
        if let (Some(cert), Some(key)) = (tls.cert_data, tls.key_data) {
            user["client-certificate-data"] = json!(cert);
            user["client-key-data"] = json!(key);
        }
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "gate", "cluster": cluster}],
            "users": [{"name": "gate", "user": user}],
            "contexts": [{"name": "gate", "context": {"cluster": "gate", "user": "gate"}}],
            "current-context": "gate",
        });
        return serde_json::from_value(kubeconfig)
            .map_err(|e| bad(format!("cannot build a kubeconfig: {e}")));
    }
    let yaml = text(data, key).ok_or_else(|| GateError::MissingKey {
        name: name.to_string(),
        key: key.to_string(),
    })?;
    Kubeconfig::from_yaml(&yaml).map_err(|e| bad(format!("{key} is not a kubeconfig: {e}")))
}

/// The other cluster's LogPipeline, as far as the gate cares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Remote {
    pub generation: Option<i64>,
    pub status: Option<LogPipelineStatus>,
}

/// Open or held, and what to say (pure).
pub fn decide(
    remote: Result<Option<Remote>, String>,
    spec: &GateSpec,
    release: &str,
    now: Timestamp,
) -> (Gate, GateStatus) {
    let pipeline = format!("{}/{}", spec.namespace, spec.name);
    let status = |open: bool, opens_at: Option<String>, message: String| GateStatus {
        pipeline: pipeline.clone(),
        release: release.to_string(),
        open,
        opens_at,
        message,
    };
    let held = |opens_at: Option<String>, message: String| {
        (
            Gate::Held(message.clone()),
            status(false, opens_at, message),
        )
    };
    let remote = match remote {
        Err(e) => return held(None, format!("cannot read gate {pipeline}: {e}")),
        Ok(None) => return held(None, format!("gate {pipeline} does not exist")),
        Ok(Some(r)) => r,
    };
    let Some(s) = remote.status else {
        return held(None, format!("gate {pipeline} has no status yet"));
    };
    let their_release = s.release.clone().unwrap_or_default();
    let phase = s.phase.map(Phase::as_str).unwrap_or("unknown");
    let current = s.observed_generation == remote.generation;
    if s.phase != Some(Phase::Healthy) || their_release != release || !current {
        return held(
            None,
            format!(
                "waiting for {pipeline} to be Healthy at release {release} (it is {phase} at release {})",
                if their_release.is_empty() {
                    "-"
                } else {
                    &their_release
                }
            ),
        );
    }
    let since = s
        .healthy_since
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok());
    let Some(since) = since else {
        return held(
            None,
            format!("{pipeline} is Healthy but reports no healthySince"),
        );
    };
    let healthy_for = u64::try_from(now.as_second().saturating_sub(since.as_second())).unwrap_or(0);
    let soak = spec.soak.0;
    if Duration::from_secs(healthy_for) >= soak {
        return (
            Gate::Open,
            status(
                true,
                None,
                format!(
                    "{pipeline} Healthy at release {release} for {}",
                    human(Duration::from_secs(healthy_for))
                ),
            ),
        );
    }
    let opens_at = ends_at(Some(since), soak);
    held(
        Some(opens_at.clone()),
        format!(
            "{pipeline} Healthy at release {release} since {since}: opens at {opens_at}, after its {} soak",
            human(soak)
        ),
    )
}

/// Ask the other cluster (the I/O half).
pub async fn fetch(
    client: &kube::Client,
    namespace: &str,
    spec: &GateSpec,
) -> Result<Option<Remote>, GateError> {
    let secret_name = &spec.cluster_secret_ref.name;
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(secret_name)
        .await
        .map_err(|source| GateError::Secret {
            name: secret_name.clone(),
            source,
        })?;
    let data = secret.data.unwrap_or_default();
    let kubeconfig = kubeconfig_from_secret(secret_name, &data, &spec.cluster_secret_ref.key)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| GateError::Credentials {
                name: secret_name.clone(),
                message: e.to_string(),
            })?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    let remote = kube::Client::try_from(config)?;
    let api: Api<LogPipeline> = Api::namespaced(remote, &spec.namespace);
    let lp = tokio::time::timeout(READ_TIMEOUT, api.get_opt(&spec.name))
        .await
        .map_err(|_| GateError::Timeout(READ_TIMEOUT))??;
    Ok(lp.map(|lp| Remote {
        generation: lp.metadata.generation,
        status: lp.status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use logpipe_agent::config::HumanDuration;

    fn spec() -> GateSpec {
        GateSpec {
            cluster_secret_ref: crate::crd::KeyRef {
                name: "ops".into(),
                key: "kubeconfig".into(),
            },
            namespace: "logging".into(),
            name: "logpipe".into(),
            soak: HumanDuration(Duration::from_secs(3600)),
        }
    }

    fn remote(phase: Phase, release: &str, since: i64) -> Result<Option<Remote>, String> {
        Ok(Some(Remote {
            generation: Some(3),
            status: Some(LogPipelineStatus {
                observed_generation: Some(3),
                phase: Some(phase),
                release: Some(release.into()),
                healthy_since: Some(Timestamp::from_second(since).unwrap().to_string()),
                ..Default::default()
            }),
        }))
    }

    #[test]
    fn decide_table() {
        let now = Timestamp::from_second(10_000).unwrap();
        type Case = (
            &'static str,
            Result<Option<Remote>, String>,
            bool,
            &'static str,
        );
        let cases: [Case; 7] = [
            (
                "healthy long enough",
                remote(Phase::Healthy, "rel", 10_000 - 3600),
                true,
                "Healthy at release rel for 1h",
            ),
            (
                "soaking",
                remote(Phase::Healthy, "rel", 10_000 - 600),
                false,
                "opens at 1970-01-01T03:36:40Z, after its 1h soak",
            ),
            (
                "other release",
                remote(Phase::Healthy, "old", 0),
                false,
                "(it is Healthy at release old)",
            ),
            (
                "still rolling",
                remote(Phase::Canary, "rel", 0),
                false,
                "(it is Canary at release rel)",
            ),
            (
                "degraded",
                remote(Phase::Degraded, "rel", 0),
                false,
                "it is Degraded",
            ),
            ("missing", Ok(None), false, "does not exist"),
            (
                "unreachable",
                Err("connection refused".into()),
                false,
                "connection refused",
            ),
        ];
        for (name, r, open, says) in cases {
            let (gate, status) = decide(r, &spec(), "rel", now);
            assert_eq!(gate == Gate::Open, open, "{name}");
            assert_eq!(status.open, open, "{name}");
            assert!(status.message.contains(says), "{name}: {}", status.message);
        }
        let (_, soaking) = decide(
            remote(Phase::Healthy, "rel", 10_000 - 600),
            &spec(),
            "rel",
            now,
        );
        assert_eq!(soaking.opens_at.as_deref(), Some("1970-01-01T03:36:40Z"));
        // A minute later nothing changed: the same status (no write while it soaks).
        let (_, later) = decide(
            remote(Phase::Healthy, "rel", 10_000 - 600),
            &spec(),
            "rel",
            Timestamp::from_second(10_060).unwrap(),
        );
        assert_eq!(later, soaking);
    }

    #[test]
    fn a_stale_status_holds() {
        let mut r = remote(Phase::Healthy, "rel", 0).unwrap().unwrap();
        r.generation = Some(4);
        let (gate, _) = decide(
            Ok(Some(r)),
            &spec(),
            "rel",
            Timestamp::from_second(10_000).unwrap(),
        );
        assert_ne!(gate, Gate::Open);
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn credentials_from_a_kubeconfig_or_an_argocd_cluster_secret() {
        let kc = "apiVersion: v1\nkind: Config\nclusters:\n- name: ops\n  cluster: {server: 'https://127.0.0.1:41043'}\nusers:\n- name: a\n  user: {token: t}\ncontexts:\n- name: ops\n  context: {cluster: ops, user: a}\ncurrent-context: ops\n";
        let k = kubeconfig_from_secret("s", &data(&[("kubeconfig", kc)]), "kubeconfig").unwrap();
        assert_eq!(
            k.clusters[0].cluster.as_ref().unwrap().server.as_deref(),
            Some("https://127.0.0.1:41043")
        );
        let argo = data(&[
            ("name", "ops"),
            ("server", "https://127.0.0.1:41043"),
            (
                "config",
                r#"{"tlsClientConfig":{"caData":"Q0E=","certData":"Q0VSVA==","keyData":"S0VZ"}}"#,
            ),
        ]);
        let k = kubeconfig_from_secret("s", &argo, "config").unwrap();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:41043"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_certificate_data.as_deref(), Some("Q0VSVA=="));
        assert!(matches!(
            kubeconfig_from_secret("s", &data(&[]), "kubeconfig"),
            Err(GateError::MissingKey { .. })
        ));
        assert!(
            kubeconfig_from_secret("s", &data(&[("server", "x"), ("config", "{")]), "config")
                .is_err()
        );
    }
}
