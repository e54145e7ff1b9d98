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
//! 3. [`decide`] (pure), by [`Stage`]:
//!    - `Waiting` (the release has not moved here yet): open when it reports
//!      `phase: Healthy` for its current generation, at the same `release`, with
//!      `healthySince` at least `soak` ago;
//!    - `Moving` (the release passed the gate and moves here: canary, steps, soak): keep
//!      watching; [`Verdict::Stop`] when it turns Degraded (or RollingBack) on that
//!      release, or, having vouched for it, moves to another release. The controller
//!      then pauses the rollout (`gate.onFailure: pause`, the default) or aborts it
//!      (`rollback`), and `status.gate` (`stopped: true`, `message`) says why.
//!
//! Before asking, [`reuse`] (pure) says whether the last answer still stands: the other
//! cluster is asked at most once per `gate.pollInterval` (default 30s), timed from the
//! last ask (kept in memory) or, after an operator restart, from `status.gate.checkedAt`.
//!
//! # Guarantees
//! - The release is what moves together (agent image, pipeline, labels: see
//!   `desired::release`), not per-cluster fields (tenant, endpoint, resources), so the
//!   same change synced to every cluster at once still goes ops -> dev -> prod.
//! - Any failure to ask (no Secret, unreachable cluster, no such LogPipeline) holds a
//!   waiting release and says why in `status.gate.message`; it never opens the gate.
//! - A steady answer is the same `status.gate` (`checkedAt` is when the answer last
//!   changed): watching writes no status while nothing changes.
//! - A pause lasts while the answer does: it ends when the other LogPipeline is back on
//!   this release (not Degraded), or when this spec changes (a new release waits again).
//!
//! # Caveats
//! - While a release moves, an answer that cannot be had (unreachable, no status yet, a
//!   status older than its spec) neither stops it nor ends a stop: the last verdict
//!   stands, and the message says so.
//! - A pause in the soak does not hold the promotion to stable: the rollout engine soaks
//!   whatever its pause flag says (a rollback does stop it).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;
use serde_json::json;

use crate::crd::{GateFailureAction, GateSpec, GateStatus, LogPipeline, LogPipelineStatus, Phase};
use crate::rollout::{Gate, ends_at, human};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest `gate.pollInterval` honoured: the other cluster is not a local cache.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(5);

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

/// Where the release stands with its gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// It has not moved here yet (Pending).
    Waiting,
    /// It passed the gate and moves here (canary, steps, soak).
    Moving,
}

/// The gate's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Waiting: the release may start. Moving: it may go on.
    Open,
    /// Waiting: not yet, and why.
    Held(String),
    /// Moving: stop it (pause or roll back, per `gate.onFailure`), and why.
    Stop(String),
}

impl Verdict {
    /// What the rollout engine is told while the release waits.
    pub fn waiting(&self) -> Gate {
        match self {
            Self::Open => Gate::Open,
            Self::Held(why) | Self::Stop(why) => Gate::Held(why.clone()),
        }
    }
}

fn pipeline_of(spec: &GateSpec) -> String {
    format!("{}/{}", spec.namespace, spec.name)
}

/// How often the other cluster may be asked.
pub fn poll_interval(spec: &GateSpec) -> Duration {
    spec.poll_interval.0.max(MIN_POLL_INTERVAL)
}

fn seconds(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second()).map_or_else(|_| t.to_string(), |t| t.to_string())
}

/// The last answer, when it still stands: same gate and release, asked less than
/// `pollInterval` ago (`last_asked` from memory, else `checkedAt`), and for a waiting
/// release not past its `opensAt`. `None`: ask now (pure).
pub fn reuse(
    spec: &GateSpec,
    previous: Option<&GateStatus>,
    release: &str,
    stage: Stage,
    last_asked: Option<Timestamp>,
    now: Timestamp,
) -> Option<(Verdict, GateStatus)> {
    let p = previous.filter(|p| p.release == release && p.pipeline == pipeline_of(spec))?;
    let asked = last_asked.or_else(|| p.checked_at.as_deref()?.parse::<Timestamp>().ok())?;
    let age = now.as_second().saturating_sub(asked.as_second());
    if u64::try_from(age).unwrap_or(0) >= poll_interval(spec).as_secs() {
        return None;
    }
    let verdict = match stage {
        Stage::Waiting if p.open => Verdict::Open,
        Stage::Waiting => {
            let opens = p
                .opens_at
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok());
            if opens.is_some_and(|t| t <= now) {
                return None;
            }
            Verdict::Held(p.message.clone())
        }
        Stage::Moving if p.stopped => Verdict::Stop(p.message.clone()),
        Stage::Moving => Verdict::Open,
    };
    Some((verdict, p.clone()))
}

/// The verdict and what to say (pure). `previous`: the recorded `status.gate`; an answer
/// equal to it keeps its `checkedAt`, so a steady gate is a steady status.
pub fn decide(
    remote: Result<Option<Remote>, String>,
    spec: &GateSpec,
    release: &str,
    stage: Stage,
    previous: Option<&GateStatus>,
    now: Timestamp,
) -> (Verdict, GateStatus) {
    let previous = previous.filter(|p| p.release == release && p.pipeline == pipeline_of(spec));
    let (verdict, mut status) = match stage {
        Stage::Waiting => waiting(remote, spec, release, now),
        Stage::Moving => moving(remote, spec, release, previous),
    };
    status.checked_at = match previous {
        Some(p)
            if GateStatus {
                checked_at: p.checked_at.clone(),
                ..status.clone()
            } == *p =>
        {
            p.checked_at.clone()
        }
        _ => Some(seconds(now)),
    };
    (verdict, status)
}

fn gate_status(spec: &GateSpec, release: &str, open: bool, message: String) -> GateStatus {
    GateStatus {
        pipeline: pipeline_of(spec),
        release: release.to_string(),
        open,
        message,
        ..GateStatus::default()
    }
}

/// A waiting release: open or held.
fn waiting(
    remote: Result<Option<Remote>, String>,
    spec: &GateSpec,
    release: &str,
    now: Timestamp,
) -> (Verdict, GateStatus) {
    let pipeline = pipeline_of(spec);
    let held = |opens_at: Option<String>, message: String| {
        (
            Verdict::Held(message.clone()),
            GateStatus {
                opens_at,
                ..gate_status(spec, release, false, message)
            },
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
        // The soak it passed, not how long ago: the same words at every ask.
        return (
            Verdict::Open,
            gate_status(
                spec,
                release,
                true,
                format!(
                    "{pipeline} Healthy at release {release} since {since}, longer than its {} soak",
                    human(soak)
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

/// A release moving here: go on, or stop it.
fn moving(
    remote: Result<Option<Remote>, String>,
    spec: &GateSpec,
    release: &str,
    previous: Option<&GateStatus>,
) -> (Verdict, GateStatus) {
    let pipeline = pipeline_of(spec);
    // Did the gate vouch for this release (it opened on it)? A release promoted past a
    // held gate is stopped only by a Degraded verdict on it, not by "another release".
    let vouched = previous.is_none_or(|p| p.open || p.stopped);
    let unknown = |why: String| match previous.filter(|p| p.stopped) {
        Some(p) => (Verdict::Stop(p.message.clone()), p.clone()),
        None => (
            Verdict::Open,
            gate_status(
                spec,
                release,
                vouched,
                format!("cannot watch gate {pipeline} ({why}): release {release} keeps moving"),
            ),
        ),
    };
    let remote = match remote {
        Err(e) => return unknown(e),
        Ok(None) => return unknown("it does not exist".into()),
        Ok(Some(r)) => r,
    };
    let Some(s) = remote
        .status
        .filter(|s| s.observed_generation == remote.generation)
    else {
        return unknown("its status is older than its spec, or absent".into());
    };
    let Some(theirs) = s.release.clone().filter(|r| !r.is_empty()) else {
        return unknown("it reports no release".into());
    };
    let phase = s.phase.map(Phase::as_str).unwrap_or("unknown");
    let action = match spec.on_failure {
        GateFailureAction::Pause => {
            format!("paused here until it is back on release {release} (gate.onFailure: pause)")
        }
        GateFailureAction::Rollback => "rolled back here (gate.onFailure: rollback)".to_string(),
    };
    let stop = |why: String| {
        let message = format!("{why}: {action}");
        (
            Verdict::Stop(message.clone()),
            GateStatus {
                stopped: true,
                ..gate_status(spec, release, false, message)
            },
        )
    };
    if theirs == release && matches!(s.phase, Some(Phase::Degraded | Phase::RollingBack)) {
        let why: String = s
            .rollback_reason
            .as_deref()
            .map(|r| format!(" ({})", r.chars().take(300).collect::<String>()))
            .unwrap_or_default();
        return stop(format!(
            "{pipeline} turned {phase} at release {release}{why}"
        ));
    }
    if theirs != release && vouched {
        return stop(format!(
            "{pipeline} moved to release {theirs} while release {release} moves here"
        ));
    }
    (
        Verdict::Open,
        gate_status(
            spec,
            release,
            vouched,
            format!(
                "watching {pipeline} every {}: it is {phase} at release {theirs}",
                human(poll_interval(spec))
            ),
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
    use logpipe_api::config::HumanDuration;

    fn spec() -> GateSpec {
        GateSpec {
            cluster_secret_ref: crate::crd::KeyRef {
                name: "ops".into(),
                key: "kubeconfig".into(),
            },
            namespace: "logging".into(),
            name: "logpipe".into(),
            soak: HumanDuration(Duration::from_secs(3600)),
            poll_interval: HumanDuration(Duration::from_secs(30)),
            on_failure: GateFailureAction::Pause,
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

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn decide_table() {
        let now = at(10_000);
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
                "Healthy at release rel since 1970-01-01T01:46:40Z, longer than its 1h soak",
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
            let (verdict, status) = decide(r, &spec(), "rel", Stage::Waiting, None, now);
            assert_eq!(verdict == Verdict::Open, open, "{name}");
            assert_eq!(verdict.waiting() == Gate::Open, open, "{name}");
            assert_eq!(status.open, open, "{name}");
            assert!(
                !status.stopped,
                "{name}: a waiting release is held, never stopped"
            );
            assert!(status.message.contains(says), "{name}: {}", status.message);
            assert_eq!(
                status.checked_at.as_deref(),
                Some("1970-01-01T02:46:40Z"),
                "{name}"
            );
        }
        let (_, soaking) = decide(
            remote(Phase::Healthy, "rel", 10_000 - 600),
            &spec(),
            "rel",
            Stage::Waiting,
            None,
            now,
        );
        assert_eq!(soaking.opens_at.as_deref(), Some("1970-01-01T03:36:40Z"));
        // A minute later nothing changed: the same status (no write while it soaks).
        let (_, later) = decide(
            remote(Phase::Healthy, "rel", 10_000 - 600),
            &spec(),
            "rel",
            Stage::Waiting,
            Some(&soaking),
            at(10_060),
        );
        assert_eq!(later, soaking);
    }

    /// A release that passed the gate, and what the gate's LogPipeline does meanwhile.
    #[test]
    fn decide_while_moving_table() {
        let now = at(20_000);
        let opened = decide(
            remote(Phase::Healthy, "rel", 0),
            &spec(),
            "rel",
            Stage::Waiting,
            None,
            at(10_000),
        )
        .1;
        let mut rolled_back = remote(Phase::Degraded, "rel", 0).unwrap().unwrap();
        if let Some(s) = rolled_back.status.as_mut() {
            s.rollback_reason = Some("step 1 (50%) failed verification: droppedEntries 4".into());
        }
        let mut stale = remote(Phase::Degraded, "rel", 0).unwrap().unwrap();
        stale.generation = Some(4);
        let paused_message = "logging/logpipe turned Degraded at release rel (step 1 (50%) failed verification: droppedEntries 4): paused here until it is back on release rel (gate.onFailure: pause)";
        let paused = GateStatus {
            pipeline: "logging/logpipe".into(),
            release: "rel".into(),
            open: false,
            stopped: true,
            message: paused_message.into(),
            checked_at: Some("1970-01-01T05:00:00Z".into()),
            ..Default::default()
        };
        let promoted = GateStatus {
            open: false,
            message: "waiting for logging/logpipe to be Healthy at release rel".into(),
            ..opened.clone()
        };
        type Case = (
            &'static str,
            Result<Option<Remote>, String>,
            GateFailureAction,
            &'static GateStatus,
            bool,
            &'static str,
        );
        // Leaked for the table's 'static: a test, a few bytes.
        let opened: &'static GateStatus = Box::leak(Box::new(opened));
        let paused: &'static GateStatus = Box::leak(Box::new(paused));
        let promoted: &'static GateStatus = Box::leak(Box::new(promoted));
        let cases: [Case; 11] = [
            (
                "still healthy on it: go on",
                remote(Phase::Healthy, "rel", 0),
                GateFailureAction::Pause,
                opened,
                false,
                "watching logging/logpipe every 30s: it is Healthy at release rel",
            ),
            (
                "turns Degraded on it: pause",
                Ok(Some(rolled_back.clone())),
                GateFailureAction::Pause,
                opened,
                true,
                paused_message,
            ),
            (
                "turns Degraded on it: roll back",
                Ok(Some(rolled_back.clone())),
                GateFailureAction::Rollback,
                opened,
                true,
                "rolled back here (gate.onFailure: rollback)",
            ),
            (
                "rolling back on it",
                remote(Phase::RollingBack, "rel", 0),
                GateFailureAction::Pause,
                opened,
                true,
                "turned RollingBack at release rel: paused here",
            ),
            (
                "moves to another release",
                remote(Phase::Canary, "next", 0),
                GateFailureAction::Pause,
                opened,
                true,
                "logging/logpipe moved to release next while release rel moves here",
            ),
            (
                "promoted past the gate: another release there is no failure",
                remote(Phase::Healthy, "old", 0),
                GateFailureAction::Pause,
                promoted,
                false,
                "it is Healthy at release old",
            ),
            (
                "promoted past the gate: Degraded on it still stops",
                remote(Phase::Degraded, "rel", 0),
                GateFailureAction::Pause,
                promoted,
                true,
                "turned Degraded",
            ),
            (
                "unreachable: keeps moving",
                Err("connection refused".into()),
                GateFailureAction::Pause,
                opened,
                false,
                "cannot watch gate logging/logpipe (connection refused): release rel keeps moving",
            ),
            (
                "unreachable while paused: stays paused",
                Err("connection refused".into()),
                GateFailureAction::Pause,
                paused,
                true,
                paused_message,
            ),
            (
                "a status older than its spec decides nothing",
                Ok(Some(stale)),
                GateFailureAction::Pause,
                opened,
                false,
                "its status is older than its spec",
            ),
            (
                "back on it: the pause ends",
                remote(Phase::Canary, "rel", 0),
                GateFailureAction::Pause,
                paused,
                false,
                "it is Canary at release rel",
            ),
        ];
        for (name, r, on_failure, previous, stops, says) in cases {
            let spec = GateSpec {
                on_failure,
                ..spec()
            };
            let (verdict, status) = decide(r, &spec, "rel", Stage::Moving, Some(previous), now);
            assert_eq!(matches!(verdict, Verdict::Stop(_)), stops, "{name}");
            assert_eq!(status.stopped, stops, "{name}");
            assert!(status.message.contains(says), "{name}: {}", status.message);
            if let Verdict::Stop(why) = &verdict {
                assert_eq!(why, &status.message, "{name}");
            }
        }
        // Paused and nothing changed a poll later: the very same status (no write).
        let (_, again) = decide(
            Ok(Some(rolled_back)),
            &spec(),
            "rel",
            Stage::Moving,
            Some(paused),
            now,
        );
        assert_eq!(&again, paused);
    }

    /// At most one ask per pollInterval, from memory or, after a restart, the status.
    #[test]
    fn reuse_table() {
        let now = at(1_000);
        let asked = |t: i64| Some(at(t));
        let held = GateStatus {
            pipeline: "logging/logpipe".into(),
            release: "rel".into(),
            message: "waiting".into(),
            checked_at: Some(at(990).to_string()),
            ..Default::default()
        };
        let soaking = GateStatus {
            opens_at: Some(at(995).to_string()),
            ..held.clone()
        };
        let open = GateStatus {
            open: true,
            ..held.clone()
        };
        let stopped = GateStatus {
            stopped: true,
            message: "stopped".into(),
            ..held.clone()
        };
        let old_answer = GateStatus {
            checked_at: Some(at(100).to_string()),
            ..held.clone()
        };
        type Case<'a> = (
            &'a str,
            Option<&'a GateStatus>,
            &'a str,
            Stage,
            Option<Timestamp>,
            Option<Verdict>,
        );
        let cases: [Case; 10] = [
            ("never asked", None, "rel", Stage::Waiting, None, None),
            (
                "asked 10s ago: held",
                Some(&held),
                "rel",
                Stage::Waiting,
                asked(990),
                Some(Verdict::Held("waiting".into())),
            ),
            (
                "asked 30s ago: ask",
                Some(&held),
                "rel",
                Stage::Waiting,
                asked(970),
                None,
            ),
            (
                "another release: ask",
                Some(&held),
                "new",
                Stage::Waiting,
                asked(999),
                None,
            ),
            (
                "past opensAt: ask",
                Some(&soaking),
                "rel",
                Stage::Waiting,
                asked(999),
                None,
            ),
            (
                "open stays open",
                Some(&open),
                "rel",
                Stage::Waiting,
                asked(999),
                Some(Verdict::Open),
            ),
            (
                "moving, not stopped",
                Some(&open),
                "rel",
                Stage::Moving,
                asked(999),
                Some(Verdict::Open),
            ),
            (
                "moving, stopped",
                Some(&stopped),
                "rel",
                Stage::Moving,
                asked(999),
                Some(Verdict::Stop("stopped".into())),
            ),
            (
                "restart: checkedAt 10s ago",
                Some(&held),
                "rel",
                Stage::Waiting,
                None,
                Some(Verdict::Held("waiting".into())),
            ),
            (
                "restart: an old answer",
                Some(&old_answer),
                "rel",
                Stage::Waiting,
                None,
                None,
            ),
        ];
        for (name, previous, release, stage, last, want) in cases {
            let got = reuse(&spec(), previous, release, stage, last, now);
            assert_eq!(got.as_ref().map(|(v, _)| v.clone()), want, "{name}");
            if let (Some((_, status)), Some(p)) = (got, previous) {
                assert_eq!(&status, p, "{name}: the same status");
            }
        }
    }

    #[test]
    fn a_stale_status_holds() {
        let mut r = remote(Phase::Healthy, "rel", 0).unwrap().unwrap();
        r.generation = Some(4);
        let (verdict, _) = decide(
            Ok(Some(r)),
            &spec(),
            "rel",
            Stage::Waiting,
            None,
            at(10_000),
        );
        assert_ne!(verdict, Verdict::Open);
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
