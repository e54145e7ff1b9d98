//! logpipe-operator: reconciles `LogPipeline` resources into a log agent on every node.
//!
//! Pure decisions ([`desired`], [`status`], [`rollout`]) beside one writer ([`apply`]).

pub mod apply;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod desired;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod rollout;
pub mod status;
