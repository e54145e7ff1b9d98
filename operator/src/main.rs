//! logpipe-operator: `run` (default), `crdgen`, `render -f lp.yaml`, `validate -f lp.yaml`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand, ValueEnum};
use kube::runtime::events::{Recorder, Reporter};
use logpipe_operator::controller::{self, Ctx};
use logpipe_operator::leader::{self, LeaseConfig};
use logpipe_operator::metrics::{Health, Metrics, router};
use logpipe_operator::verify::{Verifier, VerifyError};
use logpipe_operator::{crdgen, kube_requests, rbac, render};
use tokio::sync::oneshot;

/// The agent release bundled with this operator version.
const DEFAULT_AGENT_IMAGE: &str =
    concat!("ghcr.io/logpipe/logpipe-agent:", env!("CARGO_PKG_VERSION"));

#[derive(Parser)]
#[command(
    version,
    about = "Reconciles LogPipeline resources into a verified log agent on every node"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the LogPipeline CRD YAML (committed as crds/logpipe.io_logpipelines.yaml).
    Crdgen,
    /// Print every object the operator would create for the LogPipelines of a file.
    Render {
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Check the LogPipelines of these files as the operator does before any node moves;
    /// exits 1 when one would be held as InvalidSpec.
    Validate {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<std::path::PathBuf>,
    },
}

/// Global, so they may follow the subcommand too: `logpipe-operator run --namespace x`.
#[derive(clap::Args)]
struct RunArgs {
    /// Agent image used when a LogPipeline sets none.
    #[arg(long, env = "LOGPIPE_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE, global = true)]
    agent_image: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "LOGPIPE_METRICS_ADDR",
        default_value = "0.0.0.0:8080",
        global = true
    )]
    metrics_addr: SocketAddr,
    /// Reconcile only the LogPipelines of this namespace (default: all namespaces).
    #[arg(long, env = "LOGPIPE_WATCH_NAMESPACE", global = true)]
    namespace: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default", global = true)]
    lease_namespace: String,
    #[arg(long, default_value = rbac::LEASE_NAME, global = true)]
    lease_name: String,
    /// The ClusterRole (created by the chart: `<release>-agent`) each LogPipeline's agent
    /// ServiceAccount is bound to. The operator creates only the binding.
    #[arg(
        long,
        env = "LOGPIPE_AGENT_CLUSTER_ROLE",
        default_value = rbac::AGENT_CLUSTER_ROLE,
        global = true
    )]
    agent_cluster_role: String,
    /// Unique per replica (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", global = true)]
    identity: Option<String>,
    #[arg(long, default_value_t = 15, global = true)]
    lease_duration_seconds: u64,
    #[arg(long, default_value_t = 5, global = true)]
    lease_grace_seconds: u64,
    #[arg(
        long,
        value_enum,
        env = "LOGPIPE_LOG_FORMAT",
        default_value = "json",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Crdgen(#[from] crdgen::CrdgenError),
    #[error("{0}")]
    Render(#[from] render::RenderError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write output: {0}")]
    Write(#[from] std::io::Error),
    #[error("cannot connect to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Leader(#[from] leader::LeaderError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Verify(#[from] VerifyError),
    #[error("lost the leader lease: exiting so that a fresh replica stands by")]
    LostLease,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match real_main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Display, not Debug: the message is for a person.
            tracing::error!(%error, "exiting");
            eprintln!("logpipe-operator: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn read(file: &std::path::Path) -> Result<String, MainError> {
    std::fs::read_to_string(file).map_err(|source| MainError::Read {
        path: file.display().to_string(),
        source,
    })
}

async fn real_main() -> Result<(), MainError> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crdgen) => {
            std::io::stdout().write_all(crdgen::crd_yaml()?.as_bytes())?;
            Ok(())
        }
        Some(Command::Render { file }) => {
            let text = read(&file)?;
            let out = render::render(&text, &cli.run.agent_image, &cli.run.agent_cluster_role)?;
            std::io::stdout().write_all(out.as_bytes())?;
            Ok(())
        }
        Some(Command::Validate { files }) => {
            let mut text = String::new();
            for file in &files {
                text.push_str(&read(file)?);
                text.push_str("\n---\n");
            }
            let (report, verdict) = render::validate(&text)?;
            std::io::stdout().write_all(report.as_bytes())?;
            Ok(verdict?)
        }
        Some(Command::Run) | None => run(cli.run).await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,kube_lease_manager=warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> Result<(), MainError> {
    init_logging(args.log_format);
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("logpipe-operator-{}", std::process::id()));
    // reqwest (verification) is built without a bundled crypto provider: use ring, as kube.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let verifier = Verifier::new()?;
    let metrics = Arc::new(Metrics::default());
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    // Every request the operator sends is counted (logpipe_operator_kube_requests_total).
    let client = kube_requests::counted_client(config, metrics.clone())?;
    let health = Arc::new(Health::default());

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| MainError::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    let app = router(metrics.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });

    let lease = LeaseConfig {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration_seconds: args.lease_duration_seconds,
        grace_seconds: args.lease_grace_seconds,
    };
    let mut election = leader::start(client.clone(), &lease).await?;
    health.ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, lease = %lease.name, namespace = %lease.namespace, "waiting for the leader lease");

    let mut terminate = std::pin::pin!(shutdown_signal());
    tokio::select! {
        acquired = election.acquired() => if !acquired { return Err(MainError::LostLease) },
        () = &mut terminate => {
            tracing::info!("shutdown before leading");
            election.release().await;
            return Ok(());
        }
    }
    metrics.leader.set(1);
    tracing::info!(%identity, "leading: starting the controller");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "logpipe-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx::new(
        client,
        args.agent_image.clone(),
        args.agent_cluster_role.clone(),
        metrics.clone(),
        recorder,
        verifier,
    ));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut controller = std::pin::pin!(controller::run(ctx, args.namespace.clone(), async move {
        let _ = stop_rx.await;
    }));

    let outcome = tokio::select! {
        () = &mut controller => Ok(()),
        () = election.lost() => {
            tracing::error!("lost the leader lease: stopping at once");
            metrics.leader.set(0);
            Err(MainError::LostLease)
        }
        () = &mut terminate => {
            tracing::info!("SIGTERM: finishing in-flight reconciles");
            let _ = stop_tx.send(());
            controller.await;
            Ok(())
        }
    };
    if outcome.is_ok() {
        metrics.leader.set(0);
        election.release().await;
    }
    outcome
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
