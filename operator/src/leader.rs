//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager, server-side
//! apply on the Lease): of several replicas, only the holder runs the controller.
//!
//! Guarantees: a replica reconciles only while it holds the lease; when it loses the lease
//! it stops reconciling at once and the process exits with an error (the Deployment
//! restarts it as a standby), so two writers never overlap beyond the lease's grace.
//! On SIGTERM the holder stops the controller, then releases the lease, so a standby
//! takes over immediately instead of after the lease duration.
//!
//! Caveat: a holder killed with SIGKILL is replaced only once its lease expires
//! (`--lease-duration`).

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration_seconds: u64,
    pub grace_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "invalid lease timing: grace ({grace}s) must be > 0 and shorter than the duration ({duration}s)"
    )]
    Timing { duration: u64, grace: u64 },
    #[error("lease: {0}")]
    Lease(#[from] LeaseManagerError),
}

/// A running election: `is_leader` changes as the lease is won or lost.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    pub task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

pub async fn start(client: Client, config: &LeaseConfig) -> Result<Election, LeaderError> {
    // LeaseParams panics on these; refuse them with a message instead.
    if config.grace_seconds == 0 || config.grace_seconds >= config.duration_seconds {
        return Err(LeaderError::Timing {
            duration: config.duration_seconds,
            grace: config.grace_seconds,
        });
    }
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration_seconds)
        .with_grace(config.grace_seconds)
        .build()
        .await?;
    let (is_leader, task) = manager.watch().await;
    Ok(Election { is_leader, task })
}

impl Election {
    /// Wait until this replica holds the lease; false if the election ended.
    pub async fn acquired(&mut self) -> bool {
        self.is_leader.wait_for(|leader| *leader).await.is_ok()
    }

    /// Resolves when the lease is lost (or the election ended).
    pub async fn lost(&mut self) {
        let _ = self.is_leader.wait_for(|leader| !*leader).await;
    }

    /// Release the lease (closing the channel makes the manager release it) and wait.
    pub async fn release(self) {
        let Election { is_leader, task } = self;
        drop(is_leader);
        match task.await {
            Ok(Ok(_)) => tracing::info!("lease released"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot release the lease"),
            Err(error) => tracing::warn!(%error, "lease task failed"),
        }
    }
}
