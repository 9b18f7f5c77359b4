//! Where Kubernetes objects come from: a directory of manifests, or the API server.
//!
//! A source publishes [`Snapshot`]s, the contract between sources and the model: each
//! one is the whole state the source holds after a successful read, shared as an
//! [`Arc`] (a snapshot of 10 000 services is large; nobody needs a copy). A source
//! that cannot be read publishes nothing, so the datapath keeps what it has.
pub mod kube;
pub mod manifests;

use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::{sync::watch, task::JoinHandle};
use tracing::error;

use crate::{
    metrics::Metrics,
    model::Diagnostic,
    state::{ClusterState, NodeInfo, ObjectKey, ServiceInfo, SliceInfo},
};

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

/// What a source delivers: the objects it holds, and what it could not use. Both
/// sources (the manifest directory, [`manifests`], and the API, [`kube`]) build it with
/// the same methods, so an object means the same thing whichever way it arrived.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub state: ClusterState,
    pub diagnostics: Vec<Diagnostic>,
}

impl Snapshot {
    /// An empty snapshot for the node called `node_name`.
    #[must_use]
    pub fn for_node(node_name: Option<&str>) -> Self {
        let mut snapshot = Self::default();
        snapshot.state.node = NodeInfo {
            name: node_name.map(str::to_owned),
            ..NodeInfo::default()
        };
        snapshot
    }

    /// Adds a Service, replacing one with the same namespace and name.
    pub fn add_service(&mut self, service: &Service) {
        self.add_shared_service(
            ObjectKey::of(&service.metadata),
            Arc::new(ServiceInfo::from(service)),
        );
    }

    /// Adds a Service held elsewhere too (a source's store, an earlier snapshot),
    /// without copying it.
    pub fn add_shared_service(&mut self, key: ObjectKey, service: Arc<ServiceInfo>) {
        self.state.services.insert(key, service);
    }

    /// Adds an EndpointSlice, replacing one with the same namespace and name.
    pub fn add_endpoint_slice(&mut self, slice: &EndpointSlice) {
        self.add_shared_endpoint_slice(
            ObjectKey::of(&slice.metadata),
            Arc::new(SliceInfo::from(slice)),
        );
    }

    /// Adds an EndpointSlice held elsewhere too (a source's store, an earlier
    /// snapshot), without copying it.
    pub fn add_shared_endpoint_slice(&mut self, key: ObjectKey, slice: Arc<SliceInfo>) {
        self.state.endpoint_slices.insert(key, slice);
    }

    /// Takes the labels (topology zone) of `node` if it is this node; other nodes are
    /// ignored.
    pub fn add_node(&mut self, node: &NodeInfo) {
        if node.name.is_some() && node.name == self.state.node.name {
            self.state.node.labels.clone_from(&node.labels);
        }
    }

    /// Replaces every object of `self` that equals the one `earlier` holds under the
    /// same key by `earlier`'s copy, so objects that did not change keep their `Arc`
    /// across snapshots (consumers compare them with `Arc::ptr_eq`) and are held once.
    pub fn share_unchanged(&mut self, earlier: &ClusterState) {
        share_equal(&mut self.state.services, &earlier.services);
        share_equal(&mut self.state.endpoint_slices, &earlier.endpoint_slices);
    }
}

fn share_equal<T: PartialEq>(
    objects: &mut std::collections::BTreeMap<ObjectKey, Arc<T>>,
    earlier: &std::collections::BTreeMap<ObjectKey, Arc<T>>,
) {
    for (key, object) in objects.iter_mut() {
        if let Some(known) = earlier.get(key) {
            if !Arc::ptr_eq(known, object) && **known == **object {
                *object = Arc::clone(known);
            }
        }
    }
}

/// Errors of starting a source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the Kubernetes API")]
    Api(#[source] self::kube::Error),
}

/// A running source: the snapshots it publishes (the receiver reports an error once
/// the source has ended, which it never does on its own), and its task.
pub struct Running {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The API source's watcher status, for the metrics.
    pub api_status: Option<Arc<self::kube::ApiStatus>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// A source of the caller's own: whatever it sends on the other end of
    /// `snapshots`; it ends when that sender is dropped.
    #[must_use]
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self {
            snapshots,
            api_status: None,
            task: None,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts the source `config` names for the node `node_name`; read failures are
/// counted in `metrics`.
///
/// # Errors
/// When the API client cannot be configured.
pub async fn start(
    config: &SourceConfig,
    node_name: Option<String>,
    metrics: &Metrics,
) -> Result<Running, Error> {
    let (snapshots_tx, mut snapshots) = watch::channel(Arc::new(Snapshot::default()));
    snapshots.mark_unchanged();
    let (task, api_status) = match config {
        SourceConfig::Manifests(dir) => {
            let watch = manifests::watch_dir(
                dir.clone(),
                node_name,
                snapshots_tx,
                metrics.source_read_failures.clone(),
            );
            let task = tokio::spawn(async move {
                if let Err(error) = watch.await {
                    error!(error = %crate::error_chain(&error), "the manifest source failed");
                }
            });
            (task, None)
        }
        SourceConfig::Api {
            kubeconfig,
            min_sync_period,
        } => {
            let client = self::kube::client(kubeconfig.as_deref())
                .await
                .map_err(Error::Api)?;
            let api = self::kube::ApiSource::new(client, node_name, *min_sync_period);
            let status = api.status();
            (tokio::spawn(api.run(snapshots_tx)), Some(status))
        }
    };
    Ok(Running {
        snapshots,
        api_status,
        task: Some(task),
    })
}
