//! The Kubernetes API as the source: kube-rs watchers for Services, EndpointSlices
//! (discovery.k8s.io/v1) and this node's own Node object, each feeding a store of its
//! own ([`ObjectStore`]) that holds the objects in their compact form
//! ([`crate::state`]): an object is converted as its event arrives and the whole
//! Kubernetes object dropped, so the source never holds what only the API needs.
//!
//! Two rules keep the datapath safe while the API misbehaves:
//! - nothing is published until every watcher has finished its initial list, so the
//!   agent never syncs a partial view (which would delete frontends);
//! - a broken watch publishes nothing: the stores keep their last state, the watcher
//!   reconnects with backoff (`default_backoff`) and relists after 410 Gone, and a
//!   relist replaces a store only once it is complete (`InitDone`), as kube-rs's
//!   reflector does. Maps are never flushed because a watch broke; only real changes
//!   reach them.
//!
//! Bursts are batched the way kube-proxy's bounded-frequency runner does it: the
//! minimum sync period (`minSyncPeriod`, 1 s by default) is the least time between two
//! published snapshots. A change after a quiet spell is published at once (together
//! with whatever else has already arrived); changes within the period of the last
//! publish wait for its end and go out together, so a thousand events cost one sync.
//! The period is short on purpose: kube-runtime warns that a long debounce on
//! EndpointSlices hides updates.
//!
//! Each published snapshot is the whole state of the stores (the model and the syncer
//! diff it against the maps), sharing every object with them. An object whose event
//! changes nothing the agent reads (a status or annotation update, a relist) keeps its
//! `Arc`, and such an event alone publishes nothing.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::{Path, PathBuf},
    pin::pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use futures::{
    stream::{self, BoxStream},
    Stream, StreamExt as _,
};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Config,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Snapshot;
use crate::state::{ChangedKeys, NodeInfo, ObjectKey, Revisions, ServiceInfo, SliceInfo};

/// kube-proxy's default `minSyncPeriod`.
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);

/// Errors of setting up the API client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("no cluster configuration: neither a kubeconfig nor the in-cluster service account")]
    Infer(#[source] InferConfigError),
    #[error("building the API client")]
    Client(#[source] kube::Error),
}

/// Builds a client from `kubeconfig`, else by kube's inference (`$KUBECONFIG` or
/// `~/.kube/config` if present, then the in-cluster service account, as a DaemonSet
/// pod has).
///
/// # Errors
/// When no usable configuration is found.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => Config::infer().await.map_err(Error::Infer)?,
    };
    info!(server = %config.cluster_url, "using the Kubernetes API");
    Client::try_from(config).map_err(Error::Client)
}

/// The watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Node,
}

impl Resource {
    /// A short name for logs and metric labels.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Node => "node",
        }
    }
}

/// How one watcher is doing, for health and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// The initial list finished (the store is complete).
    pub listed: bool,
    /// When the watcher last delivered something (a listed object or a change).
    pub last_success: Option<SystemTime>,
    /// When it last failed, and why (it retries with backoff).
    pub last_failure: Option<(SystemTime, String)>,
    /// Failures so far.
    pub failures: u64,
}

/// The source's state as others (health, metrics) read it. Cheap to share.
#[derive(Debug, Default)]
pub struct ApiStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    watches: BTreeMap<Resource, WatchStatus>,
    last_published: Option<SystemTime>,
}

impl ApiStatus {
    fn update<T>(&self, f: impl FnOnce(&mut StatusInner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Each watcher's status.
    #[must_use]
    pub fn watches(&self) -> BTreeMap<Resource, WatchStatus> {
        self.update(|inner| inner.watches.clone())
    }

    /// When a snapshot was last published.
    #[must_use]
    pub fn last_published(&self) -> Option<SystemTime> {
        self.update(|inner| inner.last_published)
    }

    /// The most recent time every watcher was known to work: the oldest of their last
    /// successes (`None` until all have delivered something).
    #[must_use]
    pub fn last_success(&self) -> Option<SystemTime> {
        self.update(|inner| {
            let mut oldest: Option<SystemTime> = None;
            for status in inner.watches.values() {
                let success = status.last_success?;
                oldest = Some(oldest.map_or(success, |o| o.min(success)));
            }
            oldest
        })
    }

    fn register(&self, resource: Resource) {
        self.update(|inner| {
            inner.watches.entry(resource).or_default();
        });
    }

    pub(crate) fn succeeded(&self, resource: Resource, listed: bool) {
        self.update(|inner| {
            let status = inner.watches.entry(resource).or_default();
            status.last_success = Some(SystemTime::now());
            status.listed |= listed;
        });
    }

    pub(crate) fn failed(&self, resource: Resource, error: String) {
        self.update(|inner| {
            let status = inner.watches.entry(resource).or_default();
            status.last_failure = Some((SystemTime::now(), error));
            status.failures += 1;
        });
    }

    fn published(&self) {
        self.update(|inner| inner.last_published = Some(SystemTime::now()));
    }
}

/// A watcher event with the object in its compact form.
#[derive(Debug)]
enum StoreEvent<T> {
    /// Added or modified.
    Apply(ObjectKey, T),
    Delete(ObjectKey),
    /// A (re)list starts.
    Init,
    /// An object of the (re)list.
    InitApply(ObjectKey, T),
    /// The (re)list is complete: it replaces the store.
    InitDone,
}

/// What a watcher reported, its objects already converted.
#[derive(Debug)]
enum Update {
    Services(StoreEvent<ServiceInfo>),
    EndpointSlices(StoreEvent<SliceInfo>),
    Node(StoreEvent<NodeInfo>),
    /// The watch failed; the watcher retries with backoff.
    Failed(Resource, String),
}

/// What an update did to its store.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    /// An object was added, changed or removed.
    Changed,
    /// Nothing the agent reads changed (an equal object, a delete of an unknown one).
    Unchanged,
    /// A (re)list started or delivered an object; the store is unchanged until it ends.
    Listing,
    /// A (re)list ended: the store now holds exactly the listed objects.
    Listed,
    /// The watch failed.
    Failed(String),
}

/// A watched kind of object and its compact form: the one conversion in
/// [`crate::state`].
trait Watched:
    kube::Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    type Info: Send + 'static;
    const RESOURCE: Resource;
    fn compact(&self) -> Self::Info;
    fn update(event: StoreEvent<Self::Info>) -> Update;
}

impl Watched for Service {
    type Info = ServiceInfo;
    const RESOURCE: Resource = Resource::Services;
    fn compact(&self) -> ServiceInfo {
        ServiceInfo::from(self)
    }
    fn update(event: StoreEvent<ServiceInfo>) -> Update {
        Update::Services(event)
    }
}

impl Watched for EndpointSlice {
    type Info = SliceInfo;
    const RESOURCE: Resource = Resource::EndpointSlices;
    fn compact(&self) -> SliceInfo {
        SliceInfo::from(self)
    }
    fn update(event: StoreEvent<SliceInfo>) -> Update {
        Update::EndpointSlices(event)
    }
}

impl Watched for Node {
    type Info = NodeInfo;
    const RESOURCE: Resource = Resource::Node;
    fn compact(&self) -> NodeInfo {
        NodeInfo::from(self)
    }
    fn update(event: StoreEvent<NodeInfo>) -> Update {
        Update::Node(event)
    }
}

/// Turns a watcher stream into [`Update`]s, converting each object as it arrives (the
/// Kubernetes object is dropped right after).
fn updates<K, S>(events: S) -> BoxStream<'static, Update>
where
    K: Watched,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let keyed = |object: &K| (ObjectKey::of(object.meta()), object.compact());
    events
        .map(move |event| match event {
            Ok(watcher::Event::Apply(object)) => {
                let (key, info) = keyed(&object);
                K::update(StoreEvent::Apply(key, info))
            }
            Ok(watcher::Event::Delete(object)) => {
                K::update(StoreEvent::Delete(ObjectKey::of(object.meta())))
            }
            Ok(watcher::Event::Init) => K::update(StoreEvent::Init),
            Ok(watcher::Event::InitApply(object)) => {
                let (key, info) = keyed(&object);
                K::update(StoreEvent::InitApply(key, info))
            }
            Ok(watcher::Event::InitDone) => K::update(StoreEvent::InitDone),
            // kube-runtime's errors already include their causes in Display.
            Err(error) => Update::Failed(K::RESOURCE, error.to_string()),
        })
        .boxed()
}

/// A watcher with backoff (reconnecting, relisting after 410 Gone), as [`Update`]s.
fn follow<K: Watched>(api: Api<K>, config: watcher::Config) -> BoxStream<'static, Update> {
    updates(watcher(api, config).default_backoff())
}

/// The objects of one watched kind, as the watcher's events leave them: kube-rs's
/// reflector semantics over compact objects. A relist is gathered aside and replaces
/// the objects when complete, so objects gone meanwhile are deleted and a relist cut
/// short changes nothing.
#[derive(Debug)]
struct ObjectStore<T> {
    objects: BTreeMap<ObjectKey, Arc<T>>,
    /// The relist under way, if any: its objects in the order listed, made a map
    /// once complete (built in one go, the map's nodes are full; inserted one by one
    /// in key order, each was about half full: 3.5 MiB more at 50 000 services in the
    /// store, and as much in every snapshot, a copy of its shape).
    relist: Option<Vec<(ObjectKey, Arc<T>)>>,
    /// The keys of the objects changed since the last snapshot.
    changed: BTreeSet<ObjectKey>,
}

impl<T> Default for ObjectStore<T> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            relist: None,
            changed: BTreeSet::new(),
        }
    }
}

impl<T: PartialEq> ObjectStore<T> {
    fn apply(&mut self, event: StoreEvent<T>) -> Effect {
        match event {
            StoreEvent::Apply(key, object) => {
                if self
                    .objects
                    .get(&key)
                    .is_some_and(|known| **known == object)
                {
                    return Effect::Unchanged;
                }
                self.changed.insert(key.clone());
                self.objects.insert(key, Arc::new(object));
                Effect::Changed
            }
            StoreEvent::Delete(key) => match self.objects.remove(&key) {
                Some(_) => {
                    self.changed.insert(key);
                    Effect::Changed
                }
                None => Effect::Unchanged,
            },
            StoreEvent::Init => {
                self.relist = Some(Vec::new());
                Effect::Listing
            }
            StoreEvent::InitApply(key, object) => {
                // An object the relist finds unchanged stays the same object.
                let object = match self.objects.get(&key) {
                    Some(known) if **known == object => Arc::clone(known),
                    _ => Arc::new(object),
                };
                self.relist.get_or_insert_default().push((key, object));
                Effect::Listing
            }
            StoreEvent::InitDone => {
                // A key listed twice keeps its last object, as inserting did.
                let listed: BTreeMap<ObjectKey, Arc<T>> =
                    self.relist.take().unwrap_or_default().into_iter().collect();
                // The objects the relist found unchanged kept their Arc.
                for (key, known) in &self.objects {
                    if !listed.get(key).is_some_and(|now| Arc::ptr_eq(now, known)) {
                        self.changed.insert(key.clone());
                    }
                }
                for key in listed.keys() {
                    if !self.objects.contains_key(key) {
                        self.changed.insert(key.clone());
                    }
                }
                self.objects = listed;
                Effect::Listed
            }
        }
    }
}

/// The stores the snapshots are read from.
#[derive(Debug, Default)]
struct Stores {
    services: ObjectStore<ServiceInfo>,
    slices: ObjectStore<SliceInfo>,
    /// `None` without a node name: no Node is watched.
    node: Option<ObjectStore<NodeInfo>>,
    /// The count of the snapshots published, with the keys each changed.
    revisions: Revisions,
}

impl Stores {
    fn new(watch_node: bool) -> Self {
        Self {
            node: watch_node.then(ObjectStore::default),
            ..Self::default()
        }
    }

    /// Applies an update to its store: which resource it was about, and its effect.
    fn apply(&mut self, update: Update) -> (Resource, Effect) {
        match update {
            Update::Services(event) => (Resource::Services, self.services.apply(event)),
            Update::EndpointSlices(event) => (Resource::EndpointSlices, self.slices.apply(event)),
            Update::Node(event) => {
                let effect = match &mut self.node {
                    Some(store) => store.apply(event),
                    None => Effect::Unchanged,
                };
                (Resource::Node, effect)
            }
            Update::Failed(resource, error) => (resource, Effect::Failed(error)),
        }
    }

    /// The snapshot of the stores: their maps, sharing every object, and the keys
    /// changed since the last snapshot.
    fn snapshot(&mut self, node_name: Option<&str>) -> Snapshot {
        let mut snapshot = Snapshot::for_node(node_name);
        snapshot.state.revision = self.revisions.next(Some(ChangedKeys {
            services: std::mem::take(&mut self.services.changed),
            endpoint_slices: std::mem::take(&mut self.slices.changed),
        }));
        // The node is compared whole by its consumers.
        if let Some(node) = &mut self.node {
            node.changed.clear();
        }
        snapshot.state.services.clone_from(&self.services.objects);
        snapshot
            .state
            .endpoint_slices
            .clone_from(&self.slices.objects);
        for node in self.node.iter().flat_map(|store| store.objects.values()) {
            snapshot.add_node(node);
        }
        snapshot
    }
}

/// The API source: create it, keep its [`ApiStatus`] if you want to read it, then
/// [`ApiSource::run`] it.
pub struct ApiSource {
    client: Client,
    node_name: Option<String>,
    min_sync_period: Duration,
    status: Arc<ApiStatus>,
}

impl ApiSource {
    #[must_use]
    pub fn new(client: Client, node_name: Option<String>, min_sync_period: Duration) -> Self {
        Self {
            client,
            node_name,
            min_sync_period,
            status: Arc::default(),
        }
    }

    /// The source's status, updated while it runs.
    #[must_use]
    pub fn status(&self) -> Arc<ApiStatus> {
        Arc::clone(&self.status)
    }

    /// Follows the API and publishes a [`Snapshot`] once every initial list is done
    /// and then after every batch of changes, until the receiver is gone.
    pub async fn run(self, snapshots: watch::Sender<Arc<Snapshot>>) {
        let mut streams = vec![
            follow(
                Api::<Service>::all(self.client.clone()),
                watcher::Config::default(),
            ),
            follow(
                Api::<EndpointSlice>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        ];
        // Only our own Node (its labels carry the topology zone).
        match self.node_name.as_deref() {
            Some(name) => streams.push(follow(
                Api::<Node>::all(self.client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
            )),
            None => {
                warn!("no node name (--node-name, NODE_NAME): node-local endpoints and topology are unknown");
            }
        }
        publish(
            stream::select_all(streams),
            Stores::new(self.node_name.is_some()),
            self.node_name.as_deref(),
            self.min_sync_period,
            &self.status,
            &snapshots,
        )
        .await;
    }
}

/// The publishing loop over every watcher's updates: waits for all initial lists,
/// then publishes changes at most once per `min_sync_period` (at once when the last
/// publish is older than that). Returns when the updates end or the receiver is gone.
async fn publish(
    updates: impl Stream<Item = Update>,
    mut stores: Stores,
    node_name: Option<&str>,
    min_sync_period: Duration,
    status: &ApiStatus,
    snapshots: &watch::Sender<Arc<Snapshot>>,
) {
    let mut updates = pin!(updates);
    let mut watched = vec![Resource::Services, Resource::EndpointSlices];
    if stores.node.is_some() {
        watched.push(Resource::Node);
    }
    for resource in &watched {
        status.register(*resource);
    }
    let mut listed: Vec<Resource> = Vec::new();
    let mut pending = false;
    let mut last_publish: Option<tokio::time::Instant> = None;
    loop {
        let Some(update) = updates.next().await else {
            return;
        };
        pending |= note(stores.apply(update), &mut listed, status);
        if !pending || listed.len() < watched.len() {
            continue;
        }
        // Batch: collect what arrives until `min_sync_period` after the last publish
        // (already past after a quiet spell: then only what is ready right now).
        let now = tokio::time::Instant::now();
        let due = last_publish.map_or(now, |last| (last + min_sync_period).max(now));
        let mut window = pin!(tokio::time::sleep_until(due));
        loop {
            tokio::select! {
                // Updates first, so an elapsed window still takes everything ready.
                biased;
                update = updates.next() => match update {
                    Some(update) => {
                        note(stores.apply(update), &mut listed, status);
                    }
                    None => return,
                },
                () = &mut window => break,
            }
        }
        pending = false;
        last_publish = Some(tokio::time::Instant::now());
        let snapshot = stores.snapshot(node_name);
        debug!(
            services = snapshot.state.services.len(),
            endpoint_slices = snapshot.state.endpoint_slices.len(),
            "publishing a snapshot"
        );
        if snapshots.send(Arc::new(snapshot)).is_err() {
            return;
        }
        status.published();
    }
}

/// Records what an update did in the status and the list of listed resources; true
/// when it changed a store.
fn note(
    (resource, effect): (Resource, Effect),
    listed: &mut Vec<Resource>,
    status: &ApiStatus,
) -> bool {
    match effect {
        Effect::Changed => {
            status.succeeded(resource, false);
            true
        }
        Effect::Unchanged | Effect::Listing => {
            status.succeeded(resource, false);
            false
        }
        Effect::Listed => {
            status.succeeded(resource, true);
            if !listed.contains(&resource) {
                info!(resource = resource.label(), "initial list done");
                listed.push(resource);
            }
            true
        }
        Effect::Failed(error) => {
            // The watcher retries with backoff (and relists after 410 Gone); the stores
            // and the datapath stay as they are meanwhile.
            warn!(resource = resource.label(), %error, "watch failed; keeping the last known state");
            status.failed(resource, error);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    //! The publishing loop fed with `stream::iter` of watcher events (kube-runtime's own
    //! tests do the same), no API server involved.
    //!
    //! Every test runs on tokio's paused clock: time only moves when every task is
    //! idle, and then straight to the next timer. So "nothing was published" is proven
    //! without waiting: [`Harness::next`] gives up only once the loop has taken in every
    //! event sent and has no timer left before [`QUIET`] (a rate-limited publish is such
    //! a timer, and fires first), never because a slow machine was slow.
    use super::*;

    const PERIOD: Duration = Duration::from_millis(100);
    /// Virtual time (the clock is paused) after which a publish the loop would make has
    /// happened: longer than any of its timers ([`PERIOD`]).
    const QUIET: Duration = Duration::from_millis(500);

    fn service(name: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
        }))
        .expect("valid service")
    }

    fn slice(name: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.5"]}],
        }))
        .expect("valid slice")
    }

    fn node(name: &str, zone: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        }))
        .expect("valid node")
    }

    fn listed<K>(objects: Vec<K>) -> Vec<Result<watcher::Event<K>, watcher::Error>> {
        let mut events = vec![Ok(watcher::Event::Init)];
        events.extend(
            objects
                .into_iter()
                .map(|o| Ok(watcher::Event::InitApply(o))),
        );
        events.push(Ok(watcher::Event::InitDone));
        events
    }

    fn failure<K>() -> Result<watcher::Event<K>, watcher::Error> {
        Err(watcher::Error::NoResourceVersion)
    }

    /// Sends watcher events into the source's updates; the stream never ends by itself.
    struct Feed<K: Watched> {
        tx: futures::channel::mpsc::UnboundedSender<Result<watcher::Event<K>, watcher::Error>>,
    }

    impl<K: Watched> Feed<K> {
        fn new() -> (Self, BoxStream<'static, Update>) {
            let (tx, rx) = futures::channel::mpsc::unbounded();
            (Self { tx }, updates(rx))
        }

        fn send(&self, events: Vec<Result<watcher::Event<K>, watcher::Error>>) {
            for event in events {
                self.tx.unbounded_send(event).expect("the loop is running");
            }
        }
    }

    struct Harness {
        services: Feed<Service>,
        slices: Feed<EndpointSlice>,
        nodes: Feed<Node>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        status: Arc<ApiStatus>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start() -> Self {
            let (services, a) = Feed::new();
            let (slices, b) = Feed::new();
            let (nodes, c) = Feed::new();
            let (tx, mut snapshots) = watch::channel(Arc::new(Snapshot::default()));
            snapshots.mark_unchanged();
            let status = Arc::new(ApiStatus::default());
            let task = tokio::spawn({
                let status = Arc::clone(&status);
                async move {
                    let updates = stream::select_all([a, b, c]);
                    let stores = Stores::new(true);
                    publish(updates, stores, Some("node-a"), PERIOD, &status, &tx).await;
                }
            });
            Self {
                services,
                slices,
                nodes,
                snapshots,
                status,
                task,
            }
        }

        /// The next snapshot, if one is published within [`QUIET`].
        async fn next(&mut self) -> Option<Arc<Snapshot>> {
            tokio::time::timeout(QUIET, self.snapshots.changed())
                .await
                .ok()?
                .ok()?;
            Some(self.snapshots.borrow_and_update().clone())
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn names<V>(map: &BTreeMap<crate::state::ObjectKey, V>) -> Vec<String> {
        map.keys().map(|key| key.name.to_string()).collect()
    }

    /// The names of the services and slices `later` says changed since `earlier`.
    fn changed_names(earlier: &Snapshot, later: &Snapshot) -> (Vec<String>, Vec<String>) {
        let changed = later
            .state
            .revision
            .changed_since(&earlier.state.revision)
            .expect("the steps cover the earlier snapshot");
        let names = |keys: &BTreeSet<crate::state::ObjectKey>| {
            keys.iter().map(|key| key.name.to_string()).collect()
        };
        (names(&changed.services), names(&changed.endpoint_slices))
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_published_before_every_initial_list() {
        let mut h = Harness::start();
        h.services.send(listed(vec![service("web")]));
        h.slices.send(listed(vec![slice("web")]));
        h.services
            .send(vec![Ok(watcher::Event::Apply(service("db")))]);
        assert!(
            h.next().await.is_none(),
            "published without the Node's list"
        );

        h.nodes.send(listed(vec![node("node-a", "zone-1")]));
        let snapshot = h.next().await.expect("published once all are listed");
        assert_eq!(names(&snapshot.state.services), ["db", "web"]);
        assert_eq!(names(&snapshot.state.endpoint_slices), ["web"]);
        assert_eq!(snapshot.state.node.name.as_deref(), Some("node-a"));
        assert_eq!(
            snapshot
                .state
                .node
                .labels
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("zone-1")
        );
        assert!(h.status.watches().values().all(|w| w.listed));
        assert!(h.status.last_published().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_published_once() {
        let mut h = Harness::start();
        h.services.send(listed(vec![]));
        h.slices.send(listed(vec![]));
        h.nodes.send(listed(vec![]));
        assert!(h.next().await.is_some());

        let burst: Vec<_> = (0..1000)
            .map(|i| Ok(watcher::Event::Apply(service(&format!("svc-{i:04}")))))
            .collect();
        h.services.send(burst);
        let snapshot = h.next().await.expect("one snapshot");
        assert_eq!(snapshot.state.services.len(), 1000);
        assert!(
            h.next().await.is_none(),
            "the burst cost more than one snapshot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_unfinished_relists_publish_nothing_and_keep_the_state() {
        let mut h = Harness::start();
        h.services.send(listed(vec![service("a"), service("b")]));
        h.slices.send(listed(vec![slice("a")]));
        h.nodes.send(listed(vec![node("node-a", "z")]));
        let first = h.next().await.expect("first");
        assert_eq!(names(&first.state.services), ["a", "b"]);

        // The watch breaks, again and again (the API server is gone).
        h.services.send(vec![failure(), failure()]);
        h.slices.send(vec![failure()]);
        assert!(h.next().await.is_none(), "a failure published something");
        let watches = h.status.watches();
        assert_eq!(watches[&Resource::Services].failures, 2);
        assert!(watches[&Resource::Services].last_failure.is_some());

        // A relist (after 410 Gone) that has not finished changes nothing...
        h.services.send(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(service("b"))),
        ]);
        assert!(
            h.next().await.is_none(),
            "a partial relist published something"
        );
        // ...and once it has, it replaces the store: `a` was deleted meanwhile.
        h.services.send(vec![Ok(watcher::Event::InitDone)]);
        let snapshot = h.next().await.expect("the relist");
        assert_eq!(names(&snapshot.state.services), ["b"]);
        let key = crate::state::ObjectKey::new("default", "b");
        assert!(
            Arc::ptr_eq(&first.state.services[&key], &snapshot.state.services[&key]),
            "an object the relist found unchanged is the same object"
        );
        assert_eq!(
            names(&snapshot.state.endpoint_slices),
            ["a"],
            "other stores kept"
        );
        assert_eq!(
            changed_names(&first, &snapshot),
            (vec!["a".to_owned()], vec![]),
            "the relist changed `a` only"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_after_a_quiet_spell_is_published_at_once_then_rate_limited() {
        let mut h = Harness::start();
        h.services.send(listed(vec![]));
        h.slices.send(listed(vec![]));
        h.nodes.send(listed(vec![]));
        assert!(h.next().await.is_some());
        tokio::time::sleep(PERIOD * 3).await;

        let started = tokio::time::Instant::now();
        h.services
            .send(vec![Ok(watcher::Event::Apply(service("a")))]);
        let first = h.next().await.expect("the change");
        assert_eq!(names(&first.state.services), ["a"]);
        assert!(
            started.elapsed() < PERIOD / 10,
            "idle change waited {:?}",
            started.elapsed()
        );

        // Within the period of that publish: held back until the period ends.
        h.services
            .send(vec![Ok(watcher::Event::Apply(service("b")))]);
        let second = h.next().await.expect("the second change");
        assert_eq!(names(&second.state.services), ["a", "b"]);
        assert!(
            started.elapsed() >= PERIOD,
            "published {:?} after the previous one, inside the minimum period",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deletions_are_published() {
        let mut h = Harness::start();
        h.services.send(listed(vec![service("a"), service("b")]));
        h.slices.send(listed(vec![slice("a"), slice("b")]));
        h.nodes.send(listed(vec![]));
        let before = h.next().await.expect("the lists");
        h.services
            .send(vec![Ok(watcher::Event::Delete(service("a")))]);
        h.slices.send(vec![Ok(watcher::Event::Delete(slice("a")))]);
        let snapshot = h.next().await.expect("the deletion");
        assert_eq!(
            changed_names(&before, &snapshot),
            (vec!["a".to_owned()], vec!["a".to_owned()])
        );
        assert_eq!(names(&snapshot.state.services), ["b"]);
        assert_eq!(names(&snapshot.state.endpoint_slices), ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_the_agent_cannot_see_publishes_nothing() {
        let mut h = Harness::start();
        h.services.send(listed(vec![service("a")]));
        h.slices.send(listed(vec![]));
        h.nodes.send(listed(vec![]));
        let first = h.next().await.expect("listed");
        // Only what the agent drops changed (an annotation, the resource version).
        let mut annotated = service("a");
        annotated.metadata.annotations = Some([("note".to_owned(), "x".to_owned())].into());
        annotated.metadata.resource_version = Some("2".into());
        h.services.send(vec![Ok(watcher::Event::Apply(annotated))]);
        assert!(
            h.next().await.is_none(),
            "an invisible change was published"
        );
        let mut moved: Service = service("a");
        if let Some(spec) = moved.spec.as_mut() {
            spec.cluster_ip = Some("10.96.0.2".into());
        }
        h.services.send(vec![Ok(watcher::Event::Apply(moved))]);
        let second = h.next().await.expect("a real change");
        let key = crate::state::ObjectKey::new("default", "a");
        assert!(!Arc::ptr_eq(
            &first.state.services[&key],
            &second.state.services[&key]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn another_nodes_labels_are_ignored() {
        let mut h = Harness::start();
        h.services.send(listed(vec![]));
        h.slices.send(listed(vec![]));
        h.nodes.send(listed(vec![node("node-b", "elsewhere")]));
        let snapshot = h.next().await.expect("published");
        assert!(snapshot.state.node.labels.is_empty());
    }
}
