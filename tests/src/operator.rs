//! The operator as a child process against one cluster of the test bed, limited to one
//! namespace, with its /metrics on a free loopback port; SIGKILLed when dropped or killed
//! (as a crash or an OOM kill would). The end-to-end tests start it with
//! [`Operator::start`]; the operator bench (tools/bench) with [`Operator::spawn`].

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::{Testbed, TestbedError, Wait, free_port, poll, workspace_binary};

/// How to run the operator: [`Operator::spawn`] adds the namespace and lease flags and
/// `--metrics-addr` on a free port.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    pub kubeconfig: PathBuf,
    /// Watched namespace, also the lease's; `None`: as `args` say.
    pub namespace: Option<String>,
    pub identity: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
    pub rust_log: String,
    /// Further arguments (`--log-format`, lease timing, `--agent-image`...).
    pub args: Vec<String>,
}

pub struct Operator {
    child: Option<tokio::process::Child>,
    /// Its process id (0 once killed).
    pub pid: u32,
    /// `http://127.0.0.1:<port>/metrics`.
    pub metrics: String,
    pub log: PathBuf,
}

impl Operator {
    /// Start `logpipe-operator` for namespace `ns` of `cluster` (lease in `ns` too, 6 s)
    /// and wait until it answers /readyz. Its log: `<testbed>/operator-<cluster>-<ns>-<identity>.log`.
    pub async fn start(testbed: &Testbed, cluster: &str, ns: &str, identity: &str) -> Self {
        let launch = Launch {
            binary: workspace_binary("logpipe-operator"),
            kubeconfig: testbed.kubeconfig(cluster),
            namespace: Some(ns.to_string()),
            identity: identity.to_string(),
            log: testbed
                .dir
                .join(format!("operator-{cluster}-{ns}-{identity}.log")),
            rust_log: "info,logpipe_operator=debug".into(),
            args: [
                "--log-format",
                "text",
                "--lease-duration-seconds",
                "6",
                "--lease-grace-seconds",
                "2",
                "--agent-image",
                "reg.local/logpipe-agent:e2e",
            ]
            .map(String::from)
            .to_vec(),
        };
        Self::start_ready(&launch).await
    }

    /// Start `logpipe-operator` with `kubeconfig` and `args` as they are (e.g. the chart's,
    /// with its own namespace flags), besides identity, log format and metrics address, and
    /// wait until it answers /readyz. Its log: `<testbed>/<log>`.
    pub async fn start_with(
        testbed: &Testbed,
        kubeconfig: &std::path::Path,
        args: &[String],
        identity: &str,
        log: &str,
    ) -> Self {
        let launch = Launch {
            binary: workspace_binary("logpipe-operator"),
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: None,
            identity: identity.to_string(),
            log: testbed.dir.join(log),
            rust_log: "info,logpipe_operator=debug".into(),
            args: args
                .iter()
                .cloned()
                .chain(["--log-format".to_string(), "text".to_string()])
                .collect(),
        };
        Self::start_ready(&launch).await
    }

    /// [`Self::spawn`], then wait until it answers /readyz.
    async fn start_ready(launch: &Launch) -> Self {
        let mut operator = Self::spawn(launch).unwrap_or_else(|e| panic!("{e}"));
        let http = crate::http_client();
        let ready = operator.metrics.replace("/metrics", "/readyz");
        operator
            .wait_until("the operator's /readyz", Duration::from_secs(30), || {
                let answer = http.get(&ready).send();
                async move {
                    match answer.await {
                        Ok(r) if r.status().is_success() => Ok(()),
                        Ok(r) => Err(r.status().to_string().into()),
                        Err(e) => Err(e.to_string().into()),
                    }
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        operator
    }

    /// Start the operator as `launch` says; does not wait for it.
    pub fn spawn(launch: &Launch) -> Result<Self, TestbedError> {
        let port = free_port()?;
        let file = std::fs::File::create(&launch.log).map_err(|source| TestbedError::Write {
            path: launch.log.clone(),
            source,
        })?;
        let stderr = file.try_clone().map_err(|source| TestbedError::Write {
            path: launch.log.clone(),
            source,
        })?;
        let namespace_args = match &launch.namespace {
            Some(ns) => vec!["--namespace", ns.as_str(), "--lease-namespace", ns.as_str()],
            None => Vec::new(),
        };
        let child = tokio::process::Command::new(&launch.binary)
            .env("KUBECONFIG", &launch.kubeconfig)
            .env("RUST_LOG", &launch.rust_log)
            .args(namespace_args)
            .args(["--identity", &launch.identity])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| TestbedError::Spawn {
                binary: launch.binary.clone(),
                source,
            })?;
        Ok(Self {
            pid: child.id().unwrap_or_default(),
            child: Some(child),
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            log: launch.log.clone(),
        })
    }

    /// Fails when the process has exited (or was killed): what waits on the operator says
    /// so at once instead of waiting for its timeout.
    pub fn check(&mut self) -> Result<(), TestbedError> {
        let exited = |status: String| TestbedError::Exited {
            what: format!("the operator (pid {})", self.pid),
            status,
            log: self.log.clone(),
        };
        let Some(child) = self.child.as_mut() else {
            return Err(exited("killed".into()));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(exited(status.to_string())),
            Err(e) => Err(exited(format!("cannot wait for it: {e}"))),
        }
    }

    /// [`poll`] `check` every 200 ms, failing at once when the operator exits.
    pub async fn wait_until<T, F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<T, TestbedError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Wait>>,
    {
        poll(what, timeout, Duration::from_millis(200), || {
            let alive = self.check();
            let look = check();
            async move {
                alive?;
                look.await
            }
        })
        .await
    }

    /// Its /metrics, as text.
    pub async fn scrape(&self) -> Result<String, TestbedError> {
        let http_error = |source| TestbedError::Http {
            url: self.metrics.clone(),
            source,
        };
        crate::http_client()
            .get(&self.metrics)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(http_error)?
            .text()
            .await
            .map_err(http_error)
    }

    /// A series of the operator's /metrics without labels (a counter or gauge).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = self.scrape().await.unwrap_or_else(|e| panic!("{e}"));
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("{name} not in\n{body}"))
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}
