//! The agent config document rendered from a LogPipeline: built as the agent's own
//! [`AgentConfig`] (so every default and check is the agent's) and written as YAML.

use logpipe_api::config::AgentConfig;
use logpipe_api::process;
use logpipe_api::validate::{self, Problem};
use serde_json::{Map, Value, json};

use crate::crd::LogPipeline;

/// Where the ConfigMap is mounted, and the file the agent is started with.
pub const CONFIG_MOUNT: &str = "/etc/logpipe/config";
pub const CONFIG_FILE: &str = "/etc/logpipe/config/config.yaml";
pub const AUTH_MOUNT: &str = "/etc/logpipe/auth";
pub const TLS_MOUNT: &str = "/etc/logpipe/tls";
/// Container path of the positions hostPath directory.
pub const POSITIONS_MOUNT: &str = process::POSITIONS_DIR;
pub const DEFAULT_LOG_ROOT: &str = process::DEFAULT_LOG_ROOT;
/// Whole seconds, as the CRD's `agent.shutdownTimeoutSeconds` (an integer the API server
/// compares with the grace period).
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: i64 = process::DEFAULT_SHUTDOWN_TIMEOUT_SECONDS as i64;
/// File names inside the auth/TLS secret volumes (the Secret keys are mapped onto them).
pub const PASSWORD_FILE: &str = "password";
pub const TOKEN_FILE: &str = "token";
pub const CA_FILE: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("the agent would refuse this config: {0}")]
    Refused(String),
    /// What the contract's full validation finds, named by the LogPipeline's fields.
    #[error("{}", spec_problems(.0))]
    Invalid(Vec<Problem>),
    #[error("cannot write the agent config: {0}")]
    Write(String),
}

/// The agent config for `lp`, as YAML, checked by the agent's own loader.
pub fn render_agent_config(lp: &LogPipeline) -> Result<String, AgentConfigError> {
    let config = agent_config(lp)?;
    let problems = validate::config(&config);
    if !problems.is_empty() {
        return Err(AgentConfigError::Invalid(problems));
    }
    let yaml = config
        .to_yaml()
        .map_err(|e| AgentConfigError::Write(e.to_string()))?;
    // What we ship reads back as what we validated (the agent's loader validates again;
    // compiling every regex a second time here, at each reconcile, would add nothing).
    let read_back: AgentConfig =
        serde_yaml::from_str(&yaml).map_err(|e| AgentConfigError::Refused(e.to_string()))?;
    if read_back != config {
        return Err(AgentConfigError::Refused(
            "the rendered config does not read back as it was built".into(),
        ));
    }
    Ok(yaml)
}

/// `spec.labels[0].regex: invalid regex ...; spec.pipeline[2].multiline: ...`.
fn spec_problems(problems: &[Problem]) -> String {
    let described: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", spec_field(&p.field), p.message))
        .collect();
    described.join("; ")
}

/// The LogPipeline field an agent config field comes from.
fn spec_field(agent_field: &str) -> String {
    let renamed = [
        ("relabel", "spec.labels"),
        ("pipeline", "spec.pipeline"),
        ("loki.url", "spec.endpoint"),
        ("loki.tenant", "spec.tenant"),
        ("loki.tenantFrom", "spec.tenantFrom"),
        ("selector", "spec.selector"),
    ];
    renamed
        .iter()
        .find_map(|(agent, spec)| {
            agent_field
                .strip_prefix(agent)
                .filter(|rest| rest.is_empty() || rest.starts_with(['[', '.']))
                .map(|rest| format!("{spec}{rest}"))
        })
        .unwrap_or_else(|| format!("agent config {agent_field}"))
}

/// Built as JSON and deserialized, so the agent's serde defaults fill every field the
/// LogPipeline does not set, and a future agent field needs no operator change.
pub fn agent_config(lp: &LogPipeline) -> Result<AgentConfig, AgentConfigError> {
    let spec = &lp.spec;
    let mut loki = Map::new();
    loki.insert("url".into(), json!(spec.endpoint));
    loki.insert("tenant".into(), json!(spec.tenant));
    if let Some(from) = &spec.tenant_from {
        loki.insert("tenantFrom".into(), json!(from));
    }
    if let Some(auth) = &spec.auth {
        let mut a = Map::new();
        if let Some(basic) = &auth.basic {
            a.insert(
                "basic".into(),
                json!({"username": basic.username, "passwordFile": format!("{AUTH_MOUNT}/{PASSWORD_FILE}")}),
            );
        }
        if auth.bearer_token_secret_ref.is_some() {
            a.insert(
                "bearerTokenFile".into(),
                json!(format!("{AUTH_MOUNT}/{TOKEN_FILE}")),
            );
        }
        loki.insert("auth".into(), Value::Object(a));
    }
    if let Some(tls) = &spec.tls {
        let mut t = Map::new();
        if tls.ca_secret_ref.is_some() || tls.ca_config_map_ref.is_some() {
            t.insert("caFile".into(), json!(format!("{TLS_MOUNT}/{CA_FILE}")));
        }
        t.insert("insecureSkipVerify".into(), json!(tls.insecure_skip_verify));
        loki.insert("tls".into(), Value::Object(t));
    }
    let shutdown = spec
        .agent
        .shutdown_timeout_seconds
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_SECONDS);
    let document = json!({
        "loki": loki,
        "logRoot": spec.agent.log_root.as_deref().unwrap_or(DEFAULT_LOG_ROOT),
        "positionsFile": process::POSITIONS_FILE,
        "listen": format!("0.0.0.0:{}", spec.monitoring.port),
        "relabel": spec.labels,
        "pipeline": spec.pipeline,
        "selector": spec.selector,
        "shutdownTimeout": format!("{shutdown}s"),
    });
    serde_json::from_value(document).map_err(|e| AgentConfigError::Refused(e.to_string()))
}
