//! A test Kubernetes API server: a **test tool**, not part of the product.
//!
//! No real kube-apiserver runs in the lab, so end-to-end tests start this server and
//! point the agent's real kube-rs client at it, over plain HTTP (no TLS, no auth),
//! through a kubeconfig ([`write_kubeconfig`]). It speaks the Kubernetes REST protocol
//! for three resources, with the JSON shapes of the real server, and stores objects as
//! untyped JSON, so any object is accepted.
//!
//! # Implemented
//! - Resources: core/v1 `services` and discovery.k8s.io/v1 `endpointslices`
//!   (namespaced: cluster-wide collection plus `/namespaces/{ns}/...`), core/v1 `nodes`
//!   (cluster-scoped).
//! - Verbs: LIST, WATCH, GET, CREATE (POST), REPLACE (PUT), PATCH, DELETE. Errors are
//!   `Status` objects with the real codes and reasons: 400 BadRequest, 404 NotFound,
//!   405 MethodNotAllowed, 409 AlreadyExists / Conflict (stale `resourceVersion` on
//!   update, failed delete preconditions), 413, 415, 422 Invalid.
//! - Metadata: one global, monotonically increasing `resourceVersion` counter;
//!   `uid`, `creationTimestamp` on create (kept on update), `generateName`. A no-op
//!   update issues no resourceVersion and no event (as etcd3's store). A deleted
//!   object and its DELETED event carry the deletion's resourceVersion.
//! - LIST: `{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"N"},"items":[...]}`
//!   in (namespace, name) order; `labelSelector` (full syntax: `=`, `==`, `!=`, `in`,
//!   `notin`, `key`, `!key`, `>`, `<`) and `fieldSelector` (`=`, `==`, `!=` on any
//!   dotted path, e.g. `metadata.name`). `limit`/`continue`: pages in that order with
//!   continue tokens, each costing its own objects, not the collection's;
//!   `remainingItemCount` only without selectors (as the real server);
//!   `resourceVersion`/`resourceVersionMatch` are accepted and the current state is
//!   always served.
//! - WATCH (`watch=true|1`): newline-delimited `{"type":...,"object":...}` in a chunked
//!   body. `resourceVersion=N` replays every change after N from a bounded history;
//!   unset or `"0"` first sends the current state as synthetic ADDED events.
//!   `sendInitialEvents=true` (streaming lists, needs `resourceVersionMatch=NotOlderThan`
//!   and `allowWatchBookmarks=true`) ends the initial events with a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"`. With `allowWatchBookmarks=true` a BOOKMARK
//!   (only kind, apiVersion, metadata.resourceVersion) is sent every
//!   [`ServerConfig::bookmark_interval`]. Selectors apply to watches as in the real
//!   watch cache: an object that starts matching arrives as ADDED, one that stops
//!   matching as DELETED. A watch from a resourceVersion older than the retained
//!   history gets HTTP 200 and one `ERROR` event with a `Status` of code 410, reason
//!   `Expired`, which makes kube-rs's watcher relist; a resourceVersion newer than the
//!   server's gets 504 `Too large resource version` (kube-rs's client retries a 504 by
//!   itself for minutes; turn `Config::default_retry` off to see it). `timeoutSeconds`
//!   ends the stream cleanly (default 30 minutes).
//! - Discovery, minimal: `/version`, `/api`, `/api/v1`, `/apis`,
//!   `/apis/discovery.k8s.io[/v1]`, `/healthz`, `/livez`, `/readyz`. kube-rs's typed
//!   `Api` and `watcher` do not need them; kubectl does.
//! - kubectl (1.20 to 1.32 tried) works as against a real server, validation on:
//!   `/openapi/v2` (protobuf for kubectl, JSON otherwise, see `openapi.rs`) has the
//!   schemas of Service and EndpointSlice, so `kubectl apply` validates on the client
//!   and rejects unknown fields (Nodes have no schema there: kubectl applies them
//!   unvalidated); `/openapi/v3` is 404 (kubectl falls back to v2).
//!   `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` (or `v1beta1`) on LIST,
//!   GET and WATCH answers `Table`s with the real server's columns (Services: Name,
//!   Type, Cluster-IP, External-IP, Port(s), Age, Selector (wide); EndpointSlices:
//!   Name, AddressType, Ports, Endpoints, Age; Nodes: Name, Status, Roles, Age,
//!   Version) and `includeObject=None|Metadata|Object`, see `table.rs`.
//! - EndpointSlices get `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339
//!   with nanoseconds, as the EndpointSlice controller writes it) on create and on
//!   every update that changes them: the write stands in for the Service or Pod change
//!   that would have triggered the controller. A value the writer sets itself (a new
//!   one on update) is kept, so a test can name its own trigger time.
//! - Service defaulting and allocation (ClusterIPs, node ports, ...), see `defaults.rs`;
//!   switch off with [`ServerConfig::service_defaults`].
//! - `metadata.creationTimestamp` on create (kept on updates), and on EndpointSlices
//!   `endpoints.kubernetes.io/last-change-trigger-time` stamped on creation and on
//!   every change of content, as the EndpointSlice controller does (a no-op update
//!   keeps it; a writer's own time is kept), so network programming latency is
//!   measured through this server.
//! - PATCH: `application/merge-patch+json` (RFC 7386), `application/json-patch+json`
//!   (RFC 6902), `application/strategic-merge-patch+json` (the merging lists of the
//!   served kinds merged by their keys: Service `spec.ports` by port, `ownerReferences`
//!   by uid, conditions by type, finalizers as a set, ...; every other list replaced;
//!   the directives `$patch`, `$retainKeys`, `$setElementOrder/`,
//!   `$deleteFromPrimitiveList/`), and an approximation of
//!   `application/apply-patch+yaml` (server-side apply as create-or-merge-patch,
//!   `fieldManager` required, no field ownership or conflicts).
//!
//! # Test controls (`/testing/...`, always served, also while paused)
//! - `POST /testing/drop-watches`: aborts every open watch response mid-stream (no final
//!   chunk, connection closed), as a broken connection would. The client resumes from
//!   the last resourceVersion it saw. Answers `{"dropped": N}`.
//! - `POST /testing/compact[?dropWatches=true]`: forgets all history and makes every
//!   resourceVersion issued so far too old to start a watch from, so a watch resumed
//!   from one gets 410 and the client relists. Open watches keep running (they are up
//!   to date) until they are dropped; `dropWatches=true` drops them in the same step.
//! - `POST /testing/pause[?code=503]`, `POST /testing/resume`: while paused, every
//!   non-`/testing` request is answered with a `Status` of that code (default 503
//!   ServiceUnavailable), `Retry-After: 1` and `Connection: close`, and pausing drops
//!   every open watch. With 503 (or 429/504), kube-rs's client retries by itself (its
//!   default `RetryPolicy`: up to 15 retries, honouring `Retry-After`) before
//!   reporting an error, so a short pause is ridden out inside one request; use
//!   `code=500` to make every request fail at once so the caller's own backoff
//!   (e.g. the watcher's `default_backoff`) is exercised. A 503 is the closest an HTTP
//!   server can get to "connection refused" while keeping `/testing/resume` reachable.
//!   Requests carrying the header [`BYPASS_PAUSE_HEADER`] are served anyway, so a test
//!   can change objects while the client under test is cut off (kube's `Config` takes
//!   extra headers in `headers`).
//!   [`TestApiServerHandle::refused`] counts the requests refused so far, so a test
//!   can wait for a client's retries instead of sleeping.
//! - `GET /testing/watchers`: `{"watchers": N, "watchRequests": M}`: open watch
//!   responses, and watch responses started so far (to wait until a client has
//!   reconnected). `GET /testing/resource-version`: `{"resourceVersion": "N"}`.
//!
//! The same controls are methods of [`TestApiServerHandle`], and so are `create` and
//! `replace`: a POST or PUT without the HTTP round trip (the same store path, checks
//! and watch events), for loading many objects fast (the benchmark's 100 000
//! Services).
//!
//! # Not implemented
//! Authentication and authorization, TLS, HTTP/2, protobuf objects (only the OpenAPI
//! document is protobuf), `PartialObjectMetadata` views, server-side field validation
//! (`fieldValidation` is ignored and not advertised), OpenAPI v3, other
//! resources and subresources (`/status`), `deletecollection`, pagination, LIST or
//! WATCH at an exact older resourceVersion (the current state is served), `dryRun`
//! (refused with 400), finalizers and graceful deletion (deletes are immediate),
//! namespaces as objects (any namespace exists), validation beyond names and
//! kind/apiVersion, `managedFields`, `generation`, admission.

mod defaults;
mod http;
mod openapi;
mod patch;
mod resource;
mod selector;
mod store;
mod table;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

pub use self::resource::ApiError;
use self::{
    resource::ResourceKind,
    store::{Store, StoreConfig},
};
use serde_json::Value;

/// Requests with this header (any value) are served while the server is paused.
pub const BYPASS_PAUSE_HEADER: &str = "x-kpr-test-bypass-pause";

/// Errors of starting and driving the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The bound address could not be read back.
    #[error("reading the bound address: {0}")]
    LocalAddr(#[source] io::Error),
    /// The kubeconfig file could not be written.
    #[error("writing kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A wait on the server's state did not finish in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Behaviour knobs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (zero: never).
    /// The real server sends one about every minute; a short interval keeps tests fast.
    pub bookmark_interval: Duration,
    /// Number of change events kept for watches to resume from; older ones are
    /// forgotten and a watch from before them gets 410.
    pub history_limit: usize,
    /// Default and allocate Service fields (ClusterIPs, node ports, protocols, ...)
    /// as the real server does.
    pub service_defaults: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            service_defaults: true,
        }
    }
}

/// State shared by the handlers and the handle.
struct Shared {
    store: Mutex<Store>,
    /// The store's resourceVersion, published after each change (watches wake on it).
    rv_tx: watch::Sender<u64>,
    /// Bumped to abort every open watch.
    drop_tx: watch::Sender<u64>,
    watchers: AtomicUsize,
    /// Watch responses started since the server started.
    watch_requests: AtomicU64,
    paused: AtomicBool,
    pause_code: AtomicU16,
    /// Requests answered with the pause's code since the server started.
    refused: AtomicU64,
    config: ServerConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.lock())
    }

    /// Runs a change and wakes the watches, under the lock so a watch subscribing
    /// under the lock misses nothing.
    fn mutate<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.lock();
        let out = f(&mut store);
        let rv = store.resource_version();
        if *self.rv_tx.borrow() != rv {
            self.rv_tx.send_replace(rv);
        }
        out
    }

    fn watchers(&self) -> usize {
        self.watchers.load(Ordering::SeqCst)
    }

    fn drop_watches(&self) -> usize {
        let open = self.watchers();
        self.drop_tx.send_modify(|g| *g = g.wrapping_add(1));
        open
    }

    fn compact(&self, drop_watches: bool) -> u64 {
        let rv = self.mutate(Store::compact);
        if drop_watches {
            self.drop_watches();
        }
        rv
    }

    fn pause(&self, code: u16) {
        self.pause_code.store(code, Ordering::SeqCst);
        self.paused.store(true, Ordering::SeqCst);
        self.drop_watches();
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Counts an open watch response while alive.
struct WatcherGuard(Arc<Shared>);

impl WatcherGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.watchers.fetch_add(1, Ordering::SeqCst);
        shared.watch_requests.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Entry point: see the module documentation.
pub struct TestApiServer;

impl TestApiServer {
    /// Binds `addr` (port 0 picks a free port) and serves in a background task with
    /// the default [`ServerConfig`].
    pub async fn start(addr: SocketAddr) -> Result<TestApiServerHandle> {
        Self::start_with(addr, ServerConfig::default()).await
    }

    /// Like [`TestApiServer::start`] with explicit knobs.
    pub async fn start_with(addr: SocketAddr, config: ServerConfig) -> Result<TestApiServerHandle> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local = listener.local_addr().map_err(Error::LocalAddr)?;
        let store = Store::new(StoreConfig {
            history_limit: config.history_limit,
            service_defaults: config.service_defaults,
        });
        let (rv_tx, _) = watch::channel(store.resource_version());
        let (drop_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            rv_tx,
            drop_tx,
            watchers: AtomicUsize::new(0),
            watch_requests: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            pause_code: AtomicU16::new(503),
            refused: AtomicU64::new(0),
            config,
        });
        let app = axum::Router::new()
            .fallback(http::handle)
            .with_state(shared.clone());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // A dropped sender also means shut down.
                    let _ = shutdown_rx.await;
                })
                .await
        });
        tracing::info!(addr = %local, "test API server listening");
        Ok(TestApiServerHandle {
            addr: local,
            shared,
            shutdown_tx: Some(shutdown_tx),
            task: Some(task),
        })
    }
}

/// A running server. Dropping it stops the server (and aborts its watches).
pub struct TestApiServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl TestApiServerHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, the URL clients use (a wildcard bind address is reached on
    /// loopback).
    pub fn url(&self) -> String {
        server_url(self.addr)
    }

    /// The kubeconfig YAML pointing at this server.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(self.addr)
    }

    /// Writes the kubeconfig pointing at this server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        write_kubeconfig(path, self.addr)
    }

    /// The last resourceVersion issued.
    pub fn resource_version(&self) -> u64 {
        self.shared.read(Store::resource_version)
    }

    /// Number of open watch responses.
    pub fn watchers(&self) -> usize {
        self.shared.watchers()
    }

    /// Number of watch responses started so far (a reconnecting client adds one).
    pub fn watch_requests(&self) -> u64 {
        self.shared.watch_requests.load(Ordering::SeqCst)
    }

    /// Number of requests answered with a pause's code so far: a client retrying through
    /// a pause adds one per attempt.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Waits until `pred(open watches)` holds, polling every 10 ms.
    pub async fn wait_for_watchers(
        &self,
        timeout: Duration,
        pred: impl Fn(usize) -> bool,
    ) -> Result<usize> {
        let wait = async {
            loop {
                let n = self.watchers();
                if pred(n) {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout(timeout, format!("open watches (now {})", self.watchers())))
    }

    /// Creates `object` as a POST of it to its collection would (same checks,
    /// defaulting, resourceVersion and watch events), without the HTTP round trip: for
    /// loading many objects fast. Its `apiVersion` and `kind` name the resource, its
    /// `metadata.namespace` the namespace.
    ///
    /// # Errors
    /// As the POST would answer.
    pub fn create(&self, object: Value) -> Result<Arc<Value>, ApiError> {
        let (kind, namespace) = addressed(&object)?;
        self.shared
            .mutate(|store| store.create(kind, namespace.as_deref(), object))
    }

    /// Replaces the object named by `object`'s `metadata.name` with it, as a PUT
    /// would, without the HTTP round trip (see [`TestApiServerHandle::create`]).
    ///
    /// # Errors
    /// As the PUT would answer (404 when it does not exist).
    pub fn replace(&self, object: Value) -> Result<Arc<Value>, ApiError> {
        let (kind, namespace) = addressed(&object)?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("metadata.name: Required value"))?
            .to_owned();
        self.shared
            .mutate(|store| store.replace(kind, namespace.as_deref(), &name, object))
    }

    /// Aborts every open watch (`POST /testing/drop-watches`); returns how many were open.
    pub fn drop_watches(&self) -> usize {
        self.shared.drop_watches()
    }

    /// Forgets all history (`POST /testing/compact`), optionally dropping the open
    /// watches in the same step; returns the new resourceVersion.
    pub fn compact(&self, drop_watches: bool) -> u64 {
        self.shared.compact(drop_watches)
    }

    /// Answers every API request with `code` (`POST /testing/pause?code=...`) and
    /// drops the open watches.
    pub fn pause(&self, code: u16) {
        self.shared.pause(code);
    }

    /// Ends a pause (`POST /testing/resume`).
    pub fn resume(&self) {
        self.shared.resume();
    }

    /// Stops the server: aborts the watches, closes idle connections, waits (up to 5 s)
    /// for the serving task.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Serves until the serving task ends (it does not, unless it fails).
    pub async fn wait(mut self) -> io::Result<()> {
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        self.shared.drop_watches();
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestApiServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The resource and namespace (the path a request for it would name) of `object`.
fn addressed(object: &Value) -> Result<(ResourceKind, Option<String>), ApiError> {
    let field = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or_default();
    let kind = ResourceKind::from_kind(field("apiVersion"), field("kind")).ok_or_else(|| {
        ApiError::bad_request(format!(
            "no resource of apiVersion {:?} and kind {:?} is served",
            field("apiVersion"),
            field("kind")
        ))
    })?;
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok((kind, namespace))
}

/// `http://IP:PORT` for a bound address; a wildcard address becomes loopback.
pub fn server_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A kubeconfig with one cluster (`server: http://IP:PORT`), one user without
/// credentials and one current context, named `kpr-test`.
pub fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kpr-test
  cluster:
    server: {}
users:
- name: kpr-test
  user: {{}}
contexts:
- name: kpr-test
  context:
    cluster: kpr-test
    user: kpr-test
    namespace: default
current-context: kpr-test
preferences: {{}}
",
        server_url(addr)
    )
}

/// Writes [`kubeconfig_yaml`] to `path`.
pub fn write_kubeconfig(path: &Path, addr: SocketAddr) -> Result<()> {
    std::fs::write(path, kubeconfig_yaml(addr)).map_err(|source| Error::Kubeconfig {
        path: path.to_owned(),
        source,
    })
}
