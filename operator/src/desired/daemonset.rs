//! The agent DaemonSet.
//!
//! Security: the agent runs as uid 0 because the kubelet writes `/var/log/pods` as root
//! with mode 0640/0750 and the positions hostPath is created root-owned; being the owner is
//! enough to read and write them, so every capability is dropped (no DAC_OVERRIDE, no
//! DAC_READ_SEARCH), privilege escalation is off, the root filesystem is read-only, the
//! log tree is mounted read-only and seccomp is the runtime default.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::agent_config::{
    AUTH_MOUNT, CA_FILE, CONFIG_MOUNT, DEFAULT_LOG_ROOT, DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    PASSWORD_FILE, POSITIONS_MOUNT, TLS_MOUNT, TOKEN_FILE,
};
use super::{
    ANNOTATION_CONFIG_HASH, ANNOTATION_REVISION, CONFIG_FILE, Context, DesiredError, Key,
    common_labels, owned_meta, selector_labels, short_hash,
};
use crate::crd::LogPipeline;
use logpipe_api::process;

pub const CONTAINER: &str = "logpipe-agent";
/// The host directory of positions, the same path as in the container by default.
pub const DEFAULT_POSITIONS_ROOT: &str = process::POSITIONS_DIR;
/// The kubelet's default, where the agent writes its last words by default.
pub const TERMINATION_MESSAGE_PATH: &str = process::TERMINATION_MESSAGE_PATH;
/// Extra grace on top of the agent's shutdown timeout: time for the process to save
/// positions and exit after its last Loki answer.
const GRACE_MARGIN_SECONDS: i64 = 10;

pub fn daemon_set(
    lp: &LogPipeline,
    key: &Key,
    ctx: &Context,
    config_map_name: &str,
    config_hash: &str,
) -> Result<DaemonSet, DesiredError> {
    let agent = &lp.spec.agent;
    let mut template = PodTemplateSpec {
        metadata: Some(pod_meta(lp, key, config_hash)),
        spec: Some(PodSpec {
            service_account_name: Some(key.name.clone()),
            priority_class_name: agent.priority_class_name.clone(),
            tolerations: (!agent.tolerations.is_empty()).then(|| agent.tolerations.clone()),
            node_selector: (!agent.node_selector.is_empty()).then(|| agent.node_selector.clone()),
            affinity: agent.affinity.clone(),
            termination_grace_period_seconds: Some(grace_period(lp)),
            containers: vec![container(lp, ctx)],
            volumes: Some(volumes(lp, key, config_map_name)),
            ..PodSpec::default()
        }),
    };
    // The revision is the hash of everything in the template (image, config, resources,
    // scheduling): pods are compared with it to know which nodes run the new revision.
    let revision = short_hash(&serde_json::to_vec(&template)?);
    if let Some(meta) = template.metadata.as_mut() {
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_REVISION.into(), revision);
    }
    Ok(DaemonSet {
        metadata: owned_meta(lp, key, key.name.clone()),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(key)),
                ..LabelSelector::default()
            },
            // The operator moves nodes itself (delete old-revision pods), so it can stop,
            // verify and go back at any step; no surge: two agents on one node would share
            // the positions file.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            template,
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    })
}

fn pod_meta(lp: &LogPipeline, key: &Key, config_hash: &str) -> ObjectMeta {
    let agent = &lp.spec.agent;
    let mut labels = agent.pod_labels.clone();
    labels.extend(common_labels(key));
    let mut annotations = agent.pod_annotations.clone();
    annotations.insert(ANNOTATION_CONFIG_HASH.into(), config_hash.into());
    ObjectMeta {
        labels: Some(labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    }
}

pub fn grace_period(lp: &LogPipeline) -> i64 {
    let agent = &lp.spec.agent;
    agent.termination_grace_period_seconds.unwrap_or_else(|| {
        agent
            .shutdown_timeout_seconds
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_SECONDS)
            + GRACE_MARGIN_SECONDS
    })
}

fn container(lp: &LogPipeline, ctx: &Context) -> Container {
    let agent = &lp.spec.agent;
    let port = lp.spec.monitoring.port;
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let resources = agent.resources.as_ref().map(|r| ResourceRequirements {
        requests: (!r.requests.is_empty()).then(|| r.requests.clone()),
        limits: (!r.limits.is_empty()).then(|| r.limits.clone()),
        ..ResourceRequirements::default()
    });
    Container {
        name: CONTAINER.into(),
        image: Some(
            agent
                .image
                .clone()
                .unwrap_or_else(|| ctx.agent_image.clone()),
        ),
        image_pull_policy: agent.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(vec![
            format!("--{}", process::FLAG_CONFIG),
            CONFIG_FILE.into(),
            format!("--{}", process::FLAG_NODE_NAME),
            format!("$({})", process::ENV_NODE_NAME),
        ]),
        env: Some(vec![EnvVar {
            name: process::ENV_NODE_NAME.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe(process::READY_PATH, 5)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..probe(process::HEALTHY_PATH, 10)
        }),
        resources,
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts(lp)),
        // The agent writes its fatal error there (`--termination-log`, default this
        // path); when it died without a word, the end of its log stands in, so a failed
        // pod check can quote the agent itself.
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

fn log_root(lp: &LogPipeline) -> String {
    lp.spec
        .agent
        .log_root
        .clone()
        .unwrap_or_else(|| DEFAULT_LOG_ROOT.into())
}

/// Host directory of this LogPipeline's positions: one per LogPipeline, so two pipelines
/// on a node never share a positions file.
pub fn positions_host_path(lp: &LogPipeline, key: &Key) -> String {
    let root = lp
        .spec
        .agent
        .positions_root
        .as_deref()
        .unwrap_or(DEFAULT_POSITIONS_ROOT);
    format!(
        "{}/{}-{}",
        root.trim_end_matches('/'),
        key.namespace,
        key.name
    )
}

fn volume_mounts(lp: &LogPipeline) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let mut mounts = vec![
        mount("pod-logs", &log_root(lp), true),
        mount("positions", POSITIONS_MOUNT, false),
        mount("config", CONFIG_MOUNT, true),
        mount("tmp", "/tmp", false),
    ];
    if lp.spec.auth.is_some() {
        mounts.push(mount("auth", AUTH_MOUNT, true));
    }
    if lp
        .spec
        .tls
        .as_ref()
        .is_some_and(|t| t.ca_secret_ref.is_some() || t.ca_config_map_ref.is_some())
    {
        mounts.push(mount("tls-ca", TLS_MOUNT, true));
    }
    mounts
}

fn volumes(lp: &LogPipeline, key: &Key, config_map_name: &str) -> Vec<Volume> {
    let host = |name: &str, path: String, type_: &str| Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path,
            type_: Some(type_.into()),
        }),
        ..Volume::default()
    };
    let item = |key: &str, path: &str| KeyToPath {
        key: key.into(),
        path: path.into(),
        mode: None,
    };
    let mut volumes = vec![
        host("pod-logs", log_root(lp), "Directory"),
        host(
            "positions",
            positions_host_path(lp, key),
            "DirectoryOrCreate",
        ),
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name.into(),
                items: Some(vec![item("config.yaml", "config.yaml")]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if let Some(auth) = &lp.spec.auth {
        // basic and bearer are exclusive (CRD rule): one Secret, one file.
        let source = match (&auth.basic, &auth.bearer_token_secret_ref) {
            (Some(basic), _) => Some((&basic.password_secret_ref, PASSWORD_FILE)),
            (None, Some(bearer)) => Some((bearer, TOKEN_FILE)),
            (None, None) => None,
        };
        if let Some((secret, file)) = source {
            volumes.push(Volume {
                name: "auth".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    items: Some(vec![item(&secret.key, file)]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
    }
    if let Some(tls) = &lp.spec.tls {
        if let Some(secret) = &tls.ca_secret_ref {
            volumes.push(Volume {
                name: "tls-ca".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    items: Some(vec![item(&secret.key, CA_FILE)]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
        } else if let Some(cm) = &tls.ca_config_map_ref {
            volumes.push(Volume {
                name: "tls-ca".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: cm.name.clone(),
                    items: Some(vec![item(&cm.key, CA_FILE)]),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
    }
    volumes
}
