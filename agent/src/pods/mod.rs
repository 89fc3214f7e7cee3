//! Pods bound to this node: a watch feeds one worker per pod; each worker drives its pod's
//! sandbox and containers through CRI toward the spec, reports status, and tears the pod
//! down when it is deleted.

pub mod backoff;
pub mod cgroups;
pub mod env;
pub mod lifecycle;
pub mod manager;
pub mod observed;
pub mod plan;
pub mod runtime_events;
pub mod spec;
pub mod static_pods;
pub mod status;
pub mod worker;

#[cfg(test)]
mod tests;

pub use manager::PodManager;
pub use spec::{PodContext, PodKey};

use crate::api::ApiError;
use crate::cni::CniError;
use crate::cri::CriError;
use crate::volumes::VolumeError;

/// Why a pod sync failed; the worker logs it, records it in status and retries.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Runtime(#[from] CriError),
    #[error(transparent)]
    Network(#[from] CniError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The pod asks for something the agent cannot give (a missing key, an unknown field).
    #[error("{0}")]
    Config(String),
    #[error("image {image}: {message}")]
    Image { image: String, message: String },
}
