//! The Kubernetes objects the agent acts on, as every source (API server, manifest
//! directory) delivers them.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object from its metadata (namespace defaults to `default`, as
    /// kubectl does for manifests without one).
    #[must_use]
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the agent knows about its own node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name, to recognise local endpoints (`nodeName`).
    pub name: Option<String>,
    /// The node's labels (topology zone for topology-aware routing).
    pub labels: BTreeMap<String, String>,
}

/// Everything the model reads: Services and EndpointSlices by key, and this node.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Shared with the source's own store (the API source's reflector), never copied:
    /// at 100 000 services a copy per snapshot is most of the agent's memory.
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub node: NodeInfo,
}
