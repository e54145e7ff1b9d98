//! Shared pieces of the end-to-end tests: the local test bed (real kube-apiserver, etcd,
//! controller-manager, scheduler, KWOK nodes, a real log store) and small store helpers.
//!
//! The test bed is found through the files `make testbed-up` writes
//! (`target/testbed/<cluster>/kubeconfig`, `target/testbed/store-url`). When it is not up,
//! [`Testbed::ensure`] starts it; when it cannot, the test fails with the reason and the
//! command to run. A missing component never makes a test pass.

pub mod argocd;
pub mod cluster;
pub mod crdref;
pub mod faultproxy;
pub mod listeners;
pub mod loggen;
pub mod operator;
pub mod prometheus;
pub mod simulator;
pub mod store;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// What went wrong in a test-bed helper. The end-to-end tests panic with it; the
/// benchmarks (tools/bench) return it. For the test bed itself, the message says what to run.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error(
        "the test bed could not be started ({0}).\nRun `make testbed-up` in {repo} to see why; the first run builds \
         Kubernetes, etcd, KWOK and VictoriaLogs from Go modules (Go required, about 12 minutes on 2 cores).",
        repo = repo_root().display()
    )]
    Start(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error("GET {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("no free loopback port: {0}")]
    NoFreePort(std::io::Error),
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} exited ({status}); log: {}", log.display())]
    Exited {
        what: String,
        status: String,
        log: PathBuf,
    },
    #[error("timed out after {}s waiting for {what}; last: {last}", after.as_secs())]
    Timeout {
        what: String,
        after: Duration,
        last: String,
    },
}

impl TestbedError {
    /// `map_err(TestbedError::kube("what was done"))`.
    pub fn kube(what: &str) -> impl FnOnce(kube::Error) -> Self + '_ {
        move |source| Self::Kube {
            what: what.to_string(),
            source,
        }
    }
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo target directory of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Path of a workspace binary built by `cargo build` (debug profile unless
/// `LOGPIPE_PROFILE` says otherwise); fails with the command that builds it.
pub fn workspace_binary(name: &str) -> PathBuf {
    let profile = std::env::var("LOGPIPE_PROFILE").unwrap_or_else(|_| "debug".into());
    let path = target_dir().join(profile).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --bins` (or `make build`) before the end-to-end tests",
        path.display()
    );
    path
}

/// A Go component the test bed builds (`tests/testbed/build.sh`) into
/// `~/.cache/logpipe/bin/<component>-<version>` (or `$LOGPIPE_CACHE/bin`), at the version
/// `<PREFIX>_VERSION` of tests/testbed/versions.env; fails with the command that builds it.
pub fn cached_binary(prefix: &str, component: &str) -> PathBuf {
    let versions = repo_root().join("tests/testbed/versions.env");
    let text = std::fs::read_to_string(&versions)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", versions.display()));
    let key = format!("{prefix}_VERSION=");
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in {}", versions.display()))
        .trim();
    let cache = std::env::var_os("LOGPIPE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/logpipe")))
        .unwrap_or_else(|| PathBuf::from(".cache/logpipe"));
    let path = cache.join("bin").join(format!("{component}-{version}"));
    assert!(
        path.is_file(),
        "{} is missing: run `tests/testbed/build.sh {component}` in {} (or `make testbed-up`, which builds the test bed's components)",
        path.display(),
        repo_root().display()
    );
    path
}

/// Nodes each cluster of the test bed must have: `NODES` (what `make testbed-up` starts
/// with), 5 by default. A running test bed with fewer gets the missing ones added.
pub fn wanted_nodes() -> usize {
    std::env::var("NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5)
}

/// What one look of [`poll`] saw when it was not done: wait and look again (with what it
/// saw, for the timeout's message), or stop waiting with an error.
#[derive(Debug)]
pub enum Wait {
    Again(String),
    Fail(TestbedError),
}

impl From<String> for Wait {
    fn from(last: String) -> Self {
        Self::Again(last)
    }
}

impl From<&str> for Wait {
    fn from(last: &str) -> Self {
        Self::Again(last.to_string())
    }
}

impl From<TestbedError> for Wait {
    fn from(error: TestbedError) -> Self {
        Self::Fail(error)
    }
}

/// Call `check` every `every` until it returns `Ok`; fail with its error
/// ([`Wait::Fail`]) at once, or with `what` and the last observation ([`Wait::Again`])
/// after `timeout`.
pub async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<T, TestbedError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Wait>>,
{
    let started = std::time::Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(Wait::Fail(error)) => return Err(error),
            Err(Wait::Again(last)) if started.elapsed() > timeout => {
                return Err(TestbedError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    last,
                });
            }
            Err(Wait::Again(_)) => tokio::time::sleep(every).await,
        }
    }
}

/// [`poll`] every 500 ms for a test: panics with `what` and the last observation after
/// `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    poll(what, timeout, Duration::from_millis(500), || {
        let look = check();
        async move { look.await.map_err(Wait::Again) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16, TestbedError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(TestbedError::NoFreePort)
}

/// Directory of the running test bed.
pub fn testbed_dir() -> PathBuf {
    std::env::var_os("LOGPIPE_TESTBED")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("testbed"))
}

/// A running test bed: clusters by name, and the log store (VictoriaLogs) shared by all.
#[derive(Clone, Debug)]
pub struct Testbed {
    pub dir: PathBuf,
    /// The store's base URL; see [`store`] for its paths.
    pub store_url: String,
}

static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An HTTP client for the test bed's loopback services. reqwest is built without a
/// bundled TLS provider (the workspace uses ring, as kube does), so install it once.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

impl Testbed {
    /// Use the running test bed, or start it (`make testbed-up`) with `clusters`.
    pub async fn ensure(clusters: &[&str]) -> Result<Self, TestbedError> {
        let dir = testbed_dir();
        if let Some(testbed) = Self::running(&dir, clusters).await {
            return Ok(testbed);
        }
        {
            // Tests of one binary run in threads: only one starts the test bed.
            let _guard = STARTING.lock().await;
            if Self::running(&dir, clusters).await.is_none() {
                let output = tokio::process::Command::new("make")
                    .arg("-C")
                    .arg(repo_root())
                    .arg("testbed-up")
                    .arg(format!("CLUSTERS={}", clusters.join(" ")))
                    .arg(format!("NODES={}", wanted_nodes()))
                    .output()
                    .await
                    .map_err(|e| TestbedError::Start(format!("cannot run make: {e}")))?;
                if !output.status.success() {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    let stdout = String::from_utf8_lossy(&output.stdout);
                    let tail: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
                    let tail = tail[tail.len().saturating_sub(15)..].join("\n");
                    return Err(TestbedError::Start(format!(
                        "make testbed-up failed:\n{tail}"
                    )));
                }
            }
        }
        Self::running(&dir, clusters).await.ok_or_else(|| {
            TestbedError::Start("make testbed-up succeeded but the test bed does not answer".into())
        })
    }

    async fn running(dir: &Path, clusters: &[&str]) -> Option<Self> {
        let store_url = std::fs::read_to_string(dir.join("store-url")).ok()?;
        let testbed = Self {
            dir: dir.to_path_buf(),
            store_url: store_url.trim().to_string(),
        };
        let http = http_client();
        let ready = http
            .get(format!("{}{}", testbed.store_url, store::READY_PATH))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        if !ready.status().is_success() {
            return None;
        }
        for cluster in clusters {
            let client = testbed.client(cluster).await.ok()?;
            tokio::time::timeout(Duration::from_secs(5), client.apiserver_version())
                .await
                .ok()?
                .ok()?;
            let nodes = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client)
                .list_metadata(
                    &kube::api::ListParams::default()
                        .labels(&format!("logpipe.io/testbed-cluster={cluster}")),
                )
                .await
                .ok()?;
            if nodes.items.len() < wanted_nodes() {
                return None;
            }
        }
        Some(testbed)
    }

    /// Where agents push (Loki's push protocol).
    pub fn push_url(&self) -> String {
        format!("{}{}", self.store_url, store::PUSH_PATH)
    }

    /// The kubeconfig of one cluster (`ops`, `dev`, `prod`).
    pub fn kubeconfig(&self, cluster: &str) -> PathBuf {
        self.dir.join(cluster).join("kubeconfig")
    }

    /// A client for one cluster, as the admin.
    pub async fn client(&self, cluster: &str) -> Result<kube::Client, TestbedError> {
        kube_client(&self.kubeconfig(cluster)).await
    }

    /// A fresh directory under the test bed for one test's files.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf, TestbedError> {
        let path = self
            .dir
            .join("scratch")
            .join(format!("{name}-{}", unique_suffix()));
        std::fs::create_dir_all(&path).map_err(|source| TestbedError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// The YAML documents of a file (empty documents left out); panics with the file's name.
pub fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|doc: &serde_json::Value| !doc.is_null())
        .collect()
}

/// The `*.yaml` files of a directory, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// A client from a kubeconfig file (a test-bed cluster's: `<testbed>/<cluster>/kubeconfig`).
pub async fn kube_client(path: &Path) -> Result<kube::Client, TestbedError> {
    let invalid = |message: String| TestbedError::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| invalid(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| invalid(e.to_string()))
}

/// A short suffix unique to this test run, so reruns against a long-lived test bed (and
/// its store, which keeps what it got) never see each other's data.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}{:x}", std::process::id(), nanos % 0xffff_ffff)
}
