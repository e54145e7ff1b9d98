//! logpipe-operator: reconciles `LogPipeline` resources into a log agent on every node.
//!
//! Pure decisions ([`desired`], [`status`], [`rollout`], [`gate::decide`],
//! [`verify::judge`]) beside one writer ([`apply`]) and two readers of the outside world
//! ([`verify`]: agents' metrics and Loki; [`gate`]: another cluster).

pub mod apply;
pub mod cache;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod desired;
pub mod events;
pub mod gate;
pub mod kube_requests;
pub mod leader;
pub mod metrics;
pub mod overlap;
pub mod plan;
pub mod rbac;
pub mod render;
pub mod rollout;
pub mod status;
pub mod verify;
