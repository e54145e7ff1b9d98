//! The operator as a test runs it: a child process against one cluster of the test bed,
//! limited to one namespace, with its /metrics on a free loopback port; SIGKILLed when
//! dropped or killed (as a crash or an OOM kill would).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::{Testbed, free_port, wait_for, workspace_binary};

pub struct Operator {
    child: Option<tokio::process::Child>,
    /// `http://127.0.0.1:<port>/metrics`.
    pub metrics: String,
    pub log: PathBuf,
}

impl Operator {
    /// Start `logpipe-operator` for namespace `ns` of `cluster` (lease in `ns` too, 6 s)
    /// and wait until it answers /readyz. Its log: `<testbed>/operator-<cluster>-<ns>-<identity>.log`.
    pub async fn start(testbed: &Testbed, cluster: &str, ns: &str, identity: &str) -> Self {
        let args: Vec<String> = [
            "--namespace",
            ns,
            "--lease-namespace",
            ns,
            "--lease-duration-seconds",
            "6",
            "--lease-grace-seconds",
            "2",
            "--agent-image",
            "reg.local/logpipe-agent:e2e",
        ]
        .map(String::from)
        .to_vec();
        let log = format!("operator-{cluster}-{ns}-{identity}.log");
        Self::start_with(testbed, &testbed.kubeconfig(cluster), &args, identity, &log).await
    }

    /// Start `logpipe-operator` with `kubeconfig` and `args` (besides identity, log format
    /// and metrics address, which this sets) and wait until it answers /readyz. Its log:
    /// `<testbed>/<log>`.
    pub async fn start_with(
        testbed: &Testbed,
        kubeconfig: &std::path::Path,
        args: &[String],
        identity: &str,
        log: &str,
    ) -> Self {
        let port = free_port();
        let log = testbed.dir.join(log);
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let binary = workspace_binary("logpipe-operator");
        let child = tokio::process::Command::new(&binary)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,logpipe_operator=debug")
            .args(args)
            .args(["--identity", identity, "--log-format", "text"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let http = crate::http_client();
        let ready = format!("http://127.0.0.1:{port}/readyz");
        wait_for("the operator's /readyz", Duration::from_secs(30), || {
            let http = http.clone();
            let url = ready.clone();
            async move {
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(r.status().to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        Self {
            child: Some(child),
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            log,
        }
    }

    /// A series of the operator's /metrics without labels (a counter or gauge).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = crate::http_client()
            .get(&self.metrics)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.metrics))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.metrics));
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
