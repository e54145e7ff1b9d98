//! The `LogPipeline` custom resource (group `logpipe.io`, v1alpha1).
//!
//! The API server is the first line of defence: every rule a person can get wrong is
//! declared here (OpenAPI schema + CEL `x-kubernetes-validations`) with a message that says
//! what is wrong and what is expected, so `kubectl apply` refuses a bad spec before the
//! operator ever sees it. The operator re-checks nothing the schema already guarantees, and
//! treats anything else it cannot use as a reconcile error with a readable status message.
//!
//! `labels` and `pipeline` embed the agent's own types ([`logpipe_api::config`]), so what
//! a user writes is exactly what the agent runs.

mod rollout;
mod status;

pub use rollout::*;
pub use status::*;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use logpipe_api::config::{HumanDuration, RelabelRule, Stage, TenantFrom};
use logpipe_api::selector::PodSelection;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default metrics and health port of the agent (the reference pipeline's 12345).
pub const DEFAULT_METRICS_PORT: i32 = logpipe_api::process::DEFAULT_PORT as i32;

/// The desired log agent of one cluster: where logs go, how they are processed, how the
/// agent runs on each node and how a change is rolled out.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "logpipe.io",
    version = "v1alpha1",
    kind = "LogPipeline",
    plural = "logpipelines",
    shortname = "lp",
    namespaced,
    status = "LogPipelineStatus",
    derive = "PartialEq",
    doc = "A log agent on every node, shipping to Grafana Loki, rolled out in verified steps",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "ready/desired nodes"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.targetRevision", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 50")
        .message("metadata.name: a LogPipeline name may have at most 50 characters (it names the DaemonSet, its ConfigMaps and label values)")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tls) || self.endpoint.startsWith('https://')")
    .message("tls is set but endpoint is not an https:// URL: use https:// or remove tls"))]
#[x_kube(validation = Rule::new(VICTORIALOGS_TENANT_RULE)
    .message("tenant must be <accountID> or <accountID>:<projectID>, numbers (e.g. 0 or 12:3), when rollout.verify.query.type is victorialogs: VictoriaLogs reads the tenant as its AccountID and ProjectID"))]
pub struct LogPipelineSpec {
    /// Loki tenant, sent as `X-Scope-OrgID` (e.g. `ops`, `dev`, `prod`). With VictoriaLogs
    /// (`rollout.verify.query.type: victorialogs`): `<accountID>[:<projectID>]`, numbers.
    #[schemars(length(max = 150))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("tenant must not be empty: it is sent to Loki as X-Scope-OrgID"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("tenant must not be '.' or '..': Loki refuses these tenant IDs"))]
    #[x_kube(validation = Rule::new("self.matches(\"^[a-zA-Z0-9!._*'()-]*$\")")
        .message("tenant may only contain letters, digits and ! - _ . * ' ( ) (Loki's tenant ID rules; '|' separates tenants in queries)"))]
    pub tenant: String,

    /// Where each entry's tenant comes from, one of: `namespaceLabel` (e.g.
    /// `logpipe.io/tenant` on each team's namespace), `podLabel`, `podAnnotation`, or
    /// `field` (extracted by a json or regex stage). Where the source is missing, or its
    /// value is not a valid tenant (counted in `logpipe_tenant_fallback_entries_total`),
    /// `tenant` is used. The agent batches, pushes and retries per tenant. Rollout
    /// verification then does not ask the store (`storeEntries` is skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_from: Option<TenantFrom>,

    /// Loki push URL, e.g. `http://loki-distributor.loki.svc:3100/loki/api/v1/push`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#\\\\s]+(/[^\\\\s]*)?$')")
        .message("endpoint must be an http:// or https:// URL with a host, e.g. http://loki-distributor.loki.svc:3100/loki/api/v1/push"))]
    pub endpoint: String,

    /// Authentication to Loki, from Secrets in the LogPipeline's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// TLS to Loki (requires an https endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// How the agent runs on each node.
    #[serde(default)]
    pub agent: AgentSpec,

    /// Relabel rules from Kubernetes meta labels to stream labels (Prometheus semantics).
    /// Empty: the Promtail-compatible defaults (app, component, instance, node_name,
    /// namespace, pod, container).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub labels: Vec<RelabelRule>,

    /// Ordered processing stages, each a one-key object: `- cri: {}`,
    /// `- timestamp: {source: time, format: RFC3339}`, `- labelDrop: [filename]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(STAGE_ONE_KIND_RULE)
        .message("each pipeline stage must name exactly one kind: cri, docker, timestamp, labelDrop, labelKeep, staticLabels, json, regex, labels, structuredMetadata, drop, multiline or limit"))]
    pub pipeline: Vec<Stage>,

    /// Which pods this pipeline ships: `namespaceSelector` and `podSelector`, Kubernetes
    /// label selectors (a namespace by name: `kubernetes.io/metadata.name`). Empty: every
    /// pod. Pods selected by two LogPipelines are shipped by both, and counted in both
    /// statuses (`status.overlappingPods`, `status.overlapsWith`).
    #[serde(default, skip_serializing_if = "PodSelection::is_empty")]
    pub selector: PodSelection,

    /// Metrics of the agents: port and Prometheus ServiceMonitor.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// How a change moves across the nodes (used by the rollout engine).
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// VictoriaLogs tenants are two uint32 numbers (`AccountID`, `ProjectID`); the operator
/// refuses an out-of-range number at verification time with the same message.
const VICTORIALOGS_TENANT_RULE: &str = "!has(self.rollout) || !has(self.rollout.verify) || !has(self.rollout.verify.query) || self.rollout.verify.query.type != 'victorialogs' || self.tenant.matches('^[0-9]{1,10}(:[0-9]{1,10})?$')";

/// One stage object must set exactly one of the agent's stage kinds (mirrors
/// [`Stage::kind`]); unknown keys are refused earlier by strict field validation.
const STAGE_ONE_KIND_RULE: &str = "self.all(s, [has(s.cri), has(s.docker), has(s.timestamp), has(s.labelDrop), has(s.labelKeep), has(s.staticLabels), has(s.json), has(s.regex), has(s.labels), has(s.structuredMetadata), has(s.drop), has(s.multiline), has(s.limit)].filter(x, x).size() == 1)";

/// A key of a Secret or ConfigMap in the LogPipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.basic) != has(self.bearerTokenSecretRef)")
    .message("auth must set exactly one of basic or bearerTokenSecretRef"))]
pub struct AuthSpec {
    /// HTTP basic auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuthSpec>,
    /// Secret key holding a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret_ref: Option<KeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuthSpec {
    #[schemars(length(min = 1, max = 253))]
    pub username: String,
    pub password_secret_ref: KeyRef,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.caSecretRef) && has(self.caConfigMapRef))")
    .message("tls: set caSecretRef or caConfigMapRef, not both"))]
pub struct TlsSpec {
    /// Secret key holding the PEM CA bundle that signs Loki's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<KeyRef>,
    /// ConfigMap key holding the PEM CA bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<KeyRef>,
    /// Skip verification of Loki's certificate (never in production).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// How the agent pods run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.terminationGracePeriodSeconds) || self.terminationGracePeriodSeconds > (has(self.shutdownTimeoutSeconds) ? self.shutdownTimeoutSeconds : 20)")
    .message("agent.terminationGracePeriodSeconds must be longer than agent.shutdownTimeoutSeconds (default 20), or the kubelet kills the agent before it saved its positions"))]
pub struct AgentSpec {
    /// Agent image; default: the agent release bundled with this operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Requests and limits (e.g. requests cpu 250m, memory 300Mi; limits memory 700Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<AgentResources>,
    /// Tolerations; `[{operator: Exists}]` runs on every node whatever its taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.operator) || t.operator == 'Exists' || t.operator == 'Equal')")
        .message("agent.tolerations[].operator must be Exists or Equal (case matters)"))]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.effect) || t.effect == '' || t.effect == 'NoSchedule' || t.effect == 'PreferNoSchedule' || t.effect == 'NoExecute')")
        .message("agent.tolerations[].effect must be NoSchedule, PreferNoSchedule or NoExecute (or empty for all effects)"))]
    #[x_kube(validation = Rule::new("self.all(t, !has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == '')")
        .message("agent.tolerations[]: a toleration with operator Exists must not set a value"))]
    #[x_kube(validation = Rule::new("self.all(t, has(t.key) && t.key != '' || has(t.operator) && t.operator == 'Exists')")
        .message("agent.tolerations[]: a toleration without a key must use operator Exists (it then tolerates every taint)"))]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Added to every agent pod (e.g. Datadog / prometheus.io scrape annotations).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Added to every agent pod; the selector labels are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("!self.exists(k, k == 'app.kubernetes.io/name' || k == 'app.kubernetes.io/instance' || k.startsWith('logpipe.io/'))")
        .message("agent.podLabels must not set app.kubernetes.io/name, app.kubernetes.io/instance or logpipe.io/* labels: the operator owns them (DaemonSet selector)"))]
    pub pod_labels: BTreeMap<String, String>,
    /// Must exceed `shutdownTimeout`: the agent flushes and saves positions on SIGTERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("agent.terminationGracePeriodSeconds must be between 1 and 3600"))]
    pub termination_grace_period_seconds: Option<i64>,
    /// How long SIGTERM may wait for Loki's answers before positions are saved
    /// (default 20). Whole seconds, so the API server can compare it with the grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3000").message("agent.shutdownTimeoutSeconds must be between 1 and 3000"))]
    pub shutdown_timeout_seconds: Option<i64>,
    /// The kubelet's pod log directory on the node (default /var/log/pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("agent.logRoot must be an absolute path"))]
    pub log_root: Option<String>,
    /// Host directory under which each LogPipeline keeps its positions
    /// (`<positionsRoot>/<namespace>-<name>`, default /var/lib/logpipe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("agent.positionsRoot must be an absolute path"))]
    pub positions_root: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Requests and limits by resource name (cpu, memory, ephemeral-storage).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(LIMIT_AT_LEAST_REQUEST_RULE)
    .message("agent.resources: every limit must be at least the matching request (e.g. limits.memory 700Mi >= requests.memory 300Mi)"))]
pub struct AgentResources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    #[x_kube(validation = Rule::new(QUANTITIES_RULE).message(QUANTITIES_MESSAGE))]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    #[x_kube(validation = Rule::new(QUANTITIES_RULE).message(QUANTITIES_MESSAGE))]
    pub limits: BTreeMap<String, Quantity>,
}

// `sign()` is not in the API server's quantity library (1.36): compare with zero instead.
const QUANTITIES_RULE: &str = "self.all(k, isQuantity(string(self[k])) && !quantity(string(self[k])).isLessThan(quantity('0')))";
const QUANTITIES_MESSAGE: &str = "agent.resources: each quantity must be a non-negative Kubernetes quantity such as 250m, 1, 300Mi or 1Gi";
const LIMIT_AT_LEAST_REQUEST_RULE: &str = "!has(self.limits) || !has(self.requests) || self.limits.all(k, !(k in self.requests) || !isQuantity(string(self.limits[k])) || !isQuantity(string(self.requests[k])) || quantity(string(self.limits[k])).compareTo(quantity(string(self.requests[k]))) >= 0)";

/// A resource list: int-or-string quantities, bounded so the CEL cost estimate fits the
/// API server's budget (an unbounded string makes every rule on it "too expensive").
fn quantity_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 8,
        "additionalProperties": {
            "x-kubernetes-int-or-string": true,
            "maxLength": 32,
            "description": "A Kubernetes quantity, e.g. 250m, 1, 300Mi, 1Gi."
        }
    })
}

/// Agent metrics: the port of `/metrics`, `/-/ready`, `/-/healthy`, and a ServiceMonitor.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    #[serde(default = "default_metrics_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("monitoring.port must be between 1 and 65535"))]
    pub port: i32,
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            port: DEFAULT_METRICS_PORT,
            service_monitor: ServiceMonitorSpec::default(),
        }
    }
}

fn default_metrics_port() -> i32 {
    DEFAULT_METRICS_PORT
}

/// A Prometheus-operator ServiceMonitor for the agents (created only when its CRD exists).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Labels Prometheus selects ServiceMonitors by (e.g. `release: kube-prometheus-stack`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Scrape interval; default: Prometheus' own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
}
