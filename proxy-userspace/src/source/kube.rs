//! The Kubernetes API as the source: kube-rs watchers with reflector stores for
//! Services, EndpointSlices and this node's Node object.
//!
//! Two rules keep the datapath safe while the API misbehaves:
//! - nothing is published until all three watchers finished their initial list, so the
//!   agent never syncs a partial view (which would delete frontends);
//! - a broken watch publishes nothing: the stores keep their last state, the watcher
//!   reconnects with backoff and relists on 410 Gone, and only real changes reach the
//!   maps. Maps are never flushed because a watch broke.
//!
//! Bursts of events are batched: after the first change the source waits the minimum
//! sync period (kube-proxy's `minSyncPeriod`) collecting further events, then publishes
//! one snapshot, so a thousand events cost one sync.
use std::{path::PathBuf, pin::pin, sync::Arc, time::Duration};

use futures::{stream::BoxStream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Config,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::manifests::Snapshot;
use crate::state::{ClusterState, NodeInfo, ObjectKey};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("configuring the API client: {0}")]
    Config(String),
}

/// Builds a client from `kubeconfig`, or from the in-cluster environment (service
/// account) or the default kubeconfig when `None`.
///
/// # Errors
/// When no usable configuration is found.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|error| Error::Kubeconfig {
                path: path.clone(),
                message: error.to_string(),
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|error| Error::Kubeconfig {
                    path: path.clone(),
                    message: error.to_string(),
                })?
        }
        None => Config::infer()
            .await
            .map_err(|error| Error::Config(error.to_string()))?,
    };
    Client::try_from(config).map_err(|error| Error::Config(error.to_string()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Services,
    EndpointSlices,
    Node,
}

/// What a watcher reported: a change, the end of an initial list, or an error.
enum Update {
    Changed(Resource),
    Listed(Resource),
    Failed(Resource, String),
}

fn follow<K>(
    resource: Resource,
    api: Api<K>,
    config: watcher::Config,
) -> (Store<K>, BoxStream<'static, Update>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff())
        .map(move |event| match event {
            Ok(watcher::Event::InitDone) => Update::Listed(resource),
            Ok(_) => Update::Changed(resource),
            Err(error) => Update::Failed(resource, error.to_string()),
        })
        .boxed();
    (store, stream)
}

/// Follows the API and publishes a [`Snapshot`] after the initial lists and after every
/// batch of changes, until the receiver is gone.
pub async fn watch_api(
    client: Client,
    node_name: Option<String>,
    min_sync_period: Duration,
    snapshots: watch::Sender<Snapshot>,
) {
    let (services, services_updates) = follow(
        Resource::Services,
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let (slices, slices_updates) = follow(
        Resource::EndpointSlices,
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    );
    // Only our own Node (its labels: topology zone). Without a node name, none.
    let node_selector = format!("metadata.name={}", node_name.as_deref().unwrap_or(""));
    let (nodes, node_updates) = follow(
        Resource::Node,
        Api::<Node>::all(client),
        watcher::Config::default().fields(&node_selector),
    );
    let mut updates = pin!(futures::stream::select_all([
        services_updates,
        slices_updates,
        node_updates
    ]));

    let mut listed = Vec::new();
    let mut pending = false;
    loop {
        let Some(update) = updates.next().await else {
            return;
        };
        match update {
            Update::Changed(resource) => {
                debug!(?resource, "change");
                pending = true;
            }
            Update::Listed(resource) => {
                if !listed.contains(&resource) {
                    info!(?resource, "initial list done");
                    listed.push(resource);
                }
                pending = true;
            }
            Update::Failed(resource, error) => {
                // The watcher retries with backoff (and relists after 410 Gone); the
                // stores and the datapath stay as they are meanwhile.
                warn!(?resource, %error, "watch failed; keeping the last known state");
            }
        }
        if !pending || listed.len() < 3 {
            continue;
        }
        // Batch: collect everything that arrives within the minimum sync period.
        let deadline = tokio::time::sleep(min_sync_period);
        let mut deadline = pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                next = updates.next() => match next {
                    None => return,
                    Some(Update::Failed(resource, error)) => {
                        warn!(?resource, %error, "watch failed; keeping the last known state");
                    }
                    Some(_) => {}
                },
            }
        }
        pending = false;
        let snapshot = snapshot(&services, &slices, &nodes, node_name.as_deref());
        if snapshots.send(snapshot).is_err() {
            return;
        }
    }
}

fn snapshot(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    nodes: &Store<Node>,
    node_name: Option<&str>,
) -> Snapshot {
    let mut state = ClusterState {
        node: NodeInfo {
            name: node_name.map(str::to_owned),
            ..NodeInfo::default()
        },
        ..ClusterState::default()
    };
    for service in services.state() {
        state.services.insert(
            ObjectKey::of(&service.metadata),
            Arc::unwrap_or_clone(service),
        );
    }
    for slice in slices.state() {
        state
            .endpoint_slices
            .insert(ObjectKey::of(&slice.metadata), Arc::unwrap_or_clone(slice));
    }
    if let Some(node) = nodes
        .state()
        .into_iter()
        .find(|node| node.metadata.name.as_deref() == node_name)
    {
        state.node.labels = node.metadata.labels.clone().unwrap_or_default();
    }
    Snapshot {
        state,
        diagnostics: Vec::new(),
    }
}
