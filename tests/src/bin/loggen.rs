//! logpipe-loggen: writes numbered CRI log lines for the Running pods of a namespace into
//! their nodes' simulated /var/log/pods trees, at a fixed rate for a fixed time, then
//! prints how many lines each pod got (JSON). Used by `make demo`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use logpipe_e2e::loggen::{ContainerLog, CriWriter, numbered_line};

#[derive(Parser)]
#[command(about = "Write numbered CRI log lines for a namespace's pods on simulated nodes")]
struct Args {
    /// Test-bed cluster directory (target/testbed/<cluster>): kubeconfig and nodes/ inside.
    #[arg(long)]
    cluster_dir: PathBuf,
    #[arg(long)]
    namespace: String,
    /// Lines per second per container.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Seconds to write for.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// First word of every line.
    #[arg(long, default_value = "loggen")]
    prefix: String,
}

#[derive(Debug, thiserror::Error)]
enum LoggenError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("writing logs: {0}")]
    Io(#[from] std::io::Error),
    #[error("no Running pod in namespace {0}")]
    NoPods(String),
}

#[tokio::main]
async fn main() -> Result<(), LoggenError> {
    let args = Args::parse();
    let kubeconfig = Kubeconfig::read_from(args.cluster_dir.join("kubeconfig"))
        .map_err(|e| LoggenError::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| LoggenError::Kubeconfig(e.to_string()))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_from(config)?;
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);
    let mut streams = Vec::new();
    for pod in pods.list(&ListParams::default()).await?.items {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let (Some(spec), Some(name), Some(uid)) = (pod.spec, pod.metadata.name, pod.metadata.uid)
        else {
            continue;
        };
        let Some(node) = spec.node_name.filter(|_| running) else {
            continue;
        };
        for container in spec.containers {
            let log = ContainerLog {
                namespace: args.namespace.clone(),
                pod: name.clone(),
                uid: uid.clone(),
                container: container.name,
                node: node.clone(),
            };
            let writer = CriWriter::open(log.path(&args.cluster_dir, 0))?;
            streams.push((log, writer));
        }
    }
    if streams.is_empty() {
        return Err(LoggenError::NoPods(args.namespace));
    }
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    let ticks = args.seconds * u64::from(args.rate.max(1));
    for seq in 0..ticks {
        ticker.tick().await;
        for (log, writer) in &mut streams {
            writer.line("stdout", &numbered_line(&args.prefix, &log.pod, seq))?;
        }
    }
    let written: BTreeMap<String, u64> = streams
        .iter()
        .map(|(log, _)| (format!("{}/{}", log.pod, log.container), ticks))
        .collect();
    println!("{}", serde_json::to_string(&written).unwrap_or_default());
    Ok(())
}
