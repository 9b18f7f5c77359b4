//! Where Kubernetes objects come from: a directory of manifests, or the API server.
pub mod kube;
pub mod manifests;

use std::{path::PathBuf, time::Duration};

/// Which source the agent follows.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML/JSON manifests, re-read on every change.
    Manifests(PathBuf),
    /// The Kubernetes API: a kubeconfig file, or in-cluster configuration when `None`.
    Api {
        kubeconfig: Option<PathBuf>,
        /// kube-proxy's minSyncPeriod: changes are batched over this long.
        min_sync_period: Duration,
    },
}
