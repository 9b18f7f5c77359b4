//! The test API server, driven over real HTTP by kube-rs itself (the client the agent
//! uses): if these pass, the agent's watchers work against it. Loopback only; no root.

use std::{
    collections::BTreeSet,
    fmt::Debug,
    future::Future,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use axum::http::{header, HeaderName, HeaderValue, Method, Request};
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kpr_lab::apiserver::{ServerConfig, TestApiServer, TestApiServerHandle, BYPASS_PAUSE_HEADER};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Config, ResourceExt as _,
};
use serde_json::{json, Value};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(5);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start() -> (TestApiServerHandle, Client) {
    start_with(ServerConfig::default()).await
}

async fn start_with(config: ServerConfig) -> (TestApiServerHandle, Client) {
    let server = TestApiServer::start_with(localhost(), config)
        .await
        .unwrap();
    let client = client_for(&server.url());
    (server, client)
}

fn client_for(url: &str) -> Client {
    Client::try_from(Config::new(url.parse().unwrap())).unwrap()
}

/// Each test as a whole is bounded by this, so a wait that was missed fails the test
/// instead of hanging it (kube's client retries 503/504 for minutes by itself).
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded(test: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, test).await.is_err() {
        panic!("the test did not finish within {TEST_LIMIT:?}");
    }
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// A raw request through kube's client (same connection handling as the agent's).
async fn raw(
    client: &Client,
    method: Method,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<String, kube::Error> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.as_bytes().to_vec())
        .unwrap();
    client.request_text(req).await
}

async fn control(client: &Client, path: &str) -> Value {
    let text = within(
        path,
        raw(client, Method::POST, path, "application/json", ""),
    )
    .await
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn api_code(err: &kube::Error) -> u16 {
    match err {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn service(name: &str, labels: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap()
}

fn node(name: &str) -> Node {
    serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": {"podCIDR": "10.244.0.0/24"}}),
    )
    .unwrap()
}

fn rv_of<K: kube::Resource>(obj: &K) -> u64 {
    obj.resource_version().unwrap().parse().unwrap()
}

/// A watcher event, reduced to what the tests compare.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

fn seen<K: kube::Resource>(ev: Result<watcher::Event<K>, watcher::Error>) -> Seen {
    match ev {
        Ok(watcher::Event::Init) => Seen::Init,
        Ok(watcher::Event::InitApply(o)) => Seen::InitApply(o.name_any()),
        Ok(watcher::Event::InitDone) => Seen::InitDone,
        Ok(watcher::Event::Apply(o)) => Seen::Apply(o.name_any()),
        Ok(watcher::Event::Delete(o)) => Seen::Delete(o.name_any()),
        Err(e) => Seen::Error(e.to_string()),
    }
}

/// Reads watcher events until `last` (inclusive), bounded by [`WAIT`].
async fn until<S, K>(stream: &mut S, last: &Seen) -> Vec<Seen>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
    K: kube::Resource,
{
    let mut got = Vec::new();
    let read = async {
        while let Some(ev) = stream.next().await {
            let s = seen(ev);
            let done = &s == last;
            got.push(s);
            if done {
                return;
            }
        }
    };
    if tokio::time::timeout(WAIT, read).await.is_err() {
        panic!("timed out waiting for {last:?}; saw {got:?}");
    }
    got
}

fn without_errors(events: &[Seen]) -> Vec<Seen> {
    events
        .iter()
        .filter(|e| !matches!(e, Seen::Error(_)))
        .cloned()
        .collect()
}

/// Polls `streams` until `done` resolves. A watcher opens its watch only when polled
/// after `InitDone`, so waiting for open watches without polling would wait forever.
/// No event may arrive meanwhile.
async fn polling<S, K, T>(streams: &mut [S], done: impl Future<Output = T>) -> T
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
    K: kube::Resource,
{
    let mut events = futures::stream::select_all(streams.iter_mut());
    tokio::select! {
        out = done => out,
        event = events.next() => panic!("unexpected watcher event {:?}", event.map(seen)),
    }
}

async fn watchers(client: &Client) -> (u64, u64) {
    let text = within(
        "watchers",
        raw(
            client,
            Method::GET,
            "/testing/watchers",
            "application/json",
            "",
        ),
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    (
        v["watchers"].as_u64().unwrap(),
        v["watchRequests"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn crud_through_kube_client() {
    bounded(async {
        let (_server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let all: Api<Service> = Api::all(client.clone());
        let pp = PostParams::default();

        let web = services
            .create(&pp, &service("web", json!({"app": "web"})))
            .await
            .unwrap();
        let uid = web.uid().unwrap();
        assert_eq!(uid.len(), 36);
        assert!(web.metadata.creation_timestamp.is_some());
        let spec = web.spec.clone().unwrap();
        assert_eq!(
            spec.cluster_ip.as_deref(),
            Some("10.96.0.1"),
            "ClusterIP allocated"
        );
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.ports.unwrap()[0].protocol.as_deref(), Some("TCP"));

        let err = services
            .create(&pp, &service("web", json!({})))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), 409, "AlreadyExists");
        let err = Api::<Service>::namespaced(client.clone(), "other")
            .create(&pp, &service("db", json!({})))
            .await
            .unwrap_err();
        assert_eq!(api_code(&err), 400, "body namespace differs from the URL's");
        let mut db = service("db", json!({}));
        db.metadata.namespace = Some("other".into());
        Api::<Service>::namespaced(client.clone(), "other")
            .create(&pp, &db)
            .await
            .unwrap();

        let list = all.list(&ListParams::default()).await.unwrap();
        let names: Vec<_> = list
            .items
            .iter()
            .map(|s| (s.namespace().unwrap(), s.name_any()))
            .collect();
        assert_eq!(
            names,
            [
                ("default".into(), "web".into()),
                ("other".into(), "db".into())
            ]
        );
        let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
        assert!(list_rv >= rv_of(&web));
        assert_eq!(
            services
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );

        // Replace: a stale resourceVersion is a conflict; the current one works.
        let mut changed = services.get("web").await.unwrap();
        changed.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let replaced = services.replace("web", &pp, &changed).await.unwrap();
        assert!(rv_of(&replaced) > rv_of(&web));
        assert_eq!(replaced.uid().unwrap(), uid, "uid kept");
        assert_eq!(
            replaced.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.1")
        );
        let err = services.replace("web", &pp, &changed).await.unwrap_err();
        assert_eq!(api_code(&err), 409, "stale resourceVersion");

        // The three PATCH flavours kube offers.
        let patched = services
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
            )
            .await
            .unwrap();
        assert_eq!(
            patched.labels().get("tier").map(String::as_str),
            Some("front")
        );
        assert_eq!(patched.labels().get("app").map(String::as_str), Some("web"));
        let patched = services
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Strategic(json!({"metadata": {"labels": {"tier": null}}})),
            )
            .await
            .unwrap();
        assert!(!patched.labels().contains_key("tier"));
        // JSON patch (kube's Patch::Json needs a kube feature the workspace leaves off).
        let text = raw(
            &client,
            Method::PATCH,
            "/api/v1/namespaces/default/services/web",
            "application/json-patch+json",
            r#"[{"op": "replace", "path": "/spec/sessionAffinity", "value": "None"}]"#,
        )
        .await
        .unwrap();
        let patched: Service = serde_json::from_str(&text).unwrap();
        assert_eq!(
            patched.spec.unwrap().session_affinity.as_deref(),
            Some("None")
        );
        let applied = services
            .patch(
                "api",
                &PatchParams::apply("kpr-test"),
                &Patch::Apply(
                    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
                "spec": {"ports": [{"port": 443}]}}),
                ),
            )
            .await
            .unwrap();
        let applied_rv = rv_of(&applied);
        assert_eq!(
            applied.spec.unwrap().ports.unwrap()[0].target_port,
            Some(IntOrString::Int(443))
        );

        let gone = services
            .delete("web", &DeleteParams::default())
            .await
            .unwrap();
        let gone = gone.left().expect("the deleted object");
        assert!(rv_of(&gone) > applied_rv);
        assert_eq!(api_code(&services.get("web").await.unwrap_err()), 404);
        assert_eq!(
            api_code(
                &services
                    .delete("web", &DeleteParams::default())
                    .await
                    .unwrap_err()
            ),
            404
        );

        // EndpointSlices (group API, namespaced) and Nodes (cluster-scoped).
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 8080}],
        }))
        .unwrap();
        let slice = slices.create(&pp, &slice).await.unwrap();
        assert_eq!(slice.ports.unwrap()[0].protocol.as_deref(), Some("TCP"));
        let by_service = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .unwrap();
        assert_eq!(by_service.items.len(), 1);

        let nodes: Api<Node> = Api::all(client.clone());
        nodes.create(&pp, &node("node-a")).await.unwrap();
        nodes.create(&pp, &node("node-b")).await.unwrap();
        let a = nodes.get("node-a").await.unwrap();
        assert_eq!(a.namespace(), None);
        let only_a = nodes
            .list(&ListParams::default().fields("metadata.name=node-a"))
            .await
            .unwrap();
        assert_eq!(
            only_a
                .items
                .iter()
                .map(|n| n.name_any())
                .collect::<Vec<_>>(),
            ["node-a"]
        );
    })
    .await;
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    bounded(async {
        let (_server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        services
            .create(&pp, &service("before", json!({})))
            .await
            .unwrap();

        let mut events = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .boxed();
        let init = until(&mut events, &Seen::InitDone).await;
        assert_eq!(
            init,
            [Seen::Init, Seen::InitApply("before".into()), Seen::InitDone]
        );

        services
            .create(&pp, &service("web", json!({})))
            .await
            .unwrap();
        assert_eq!(
            until(&mut events, &Seen::Apply("web".into())).await,
            [Seen::Apply("web".into())]
        );

        let mut web = services.get("web").await.unwrap();
        web.metadata.labels = Some([("v".to_owned(), "2".to_owned())].into());
        services.replace("web", &pp, &web).await.unwrap();
        let modified = until(&mut events, &Seen::Apply("web".into())).await;
        assert_eq!(modified, [Seen::Apply("web".into())]);

        services
            .delete("web", &DeleteParams::default())
            .await
            .unwrap();
        assert_eq!(
            until(&mut events, &Seen::Delete("web".into())).await,
            [Seen::Delete("web".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn watcher_resumes_after_dropped_watches() {
    bounded(async {
        let (server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        let mut events = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed();
        until(&mut events, &Seen::InitDone).await;
        services
            .create(&pp, &service("a", json!({})))
            .await
            .unwrap();
        until(&mut events, &Seen::Apply("a".into())).await;
        within("the watch", server.wait_for_watchers(WAIT, |n| n == 1))
            .await
            .unwrap();
        let (_, started) = watchers(&client).await;

        let dropped = control(&client, "/testing/drop-watches").await;
        assert_eq!(dropped["dropped"], 1);
        // A change made while the watch is down is replayed from history on resume.
        services
            .create(&pp, &service("b", json!({})))
            .await
            .unwrap();
        let events_back = until(&mut events, &Seen::Apply("b".into())).await;
        let (open, started_after) = watchers(&client).await;
        assert_eq!(open, 1);
        assert!(
            started_after > started,
            "the watcher reconnected ({started} -> {started_after})"
        );
        assert_eq!(
            without_errors(&events_back),
            [Seen::Apply("b".into())],
            "resumed, no relist"
        );

        services
            .create(&pp, &service("c", json!({})))
            .await
            .unwrap();
        assert_eq!(
            without_errors(&until(&mut events, &Seen::Apply("c".into())).await),
            [Seen::Apply("c".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn watcher_relists_after_compaction() {
    bounded(async {
        let (server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        for name in ["a", "b"] {
            services
                .create(&pp, &service(name, json!({})))
                .await
                .unwrap();
        }
        let mut events = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed();
        until(&mut events, &Seen::InitDone).await;
        services
            .delete("a", &DeleteParams::default())
            .await
            .unwrap();
        until(&mut events, &Seen::Delete("a".into())).await;
        within("the watch", server.wait_for_watchers(WAIT, |n| n == 1))
            .await
            .unwrap();

        // Compaction alone leaves the open watch alone, however often...
        control(&client, "/testing/compact").await;
        control(&client, "/testing/compact").await;
        services
            .create(&pp, &service("c", json!({})))
            .await
            .unwrap();
        assert_eq!(
            until(&mut events, &Seen::Apply("c".into())).await,
            [Seen::Apply("c".into())]
        );
        // ...but it can no longer resume from what it saw before the next compaction.
        control(&client, "/testing/compact").await;
        services
            .create(&pp, &service("d", json!({})))
            .await
            .unwrap();
        until(&mut events, &Seen::Apply("d".into())).await;
        control(&client, "/testing/compact").await;
        control(&client, "/testing/drop-watches").await;
        let relist = until(&mut events, &Seen::InitDone).await;
        assert!(
            relist
                .iter()
                .any(|e| matches!(e, Seen::Error(m) if m.contains("too old resource version"))),
            "410 Expired seen: {relist:?}"
        );
        let relist = without_errors(&relist);
        assert_eq!(relist.first(), Some(&Seen::Init), "{relist:?}");
        let listed: BTreeSet<_> = relist
            .iter()
            .filter_map(|e| match e {
                Seen::InitApply(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(listed, BTreeSet::from(["b", "c", "d"]));

        services
            .create(&pp, &service("e", json!({})))
            .await
            .unwrap();
        assert_eq!(
            without_errors(&until(&mut events, &Seen::Apply("e".into())).await),
            [Seen::Apply("e".into())]
        );

        // compact?dropWatches=true does both in one step.
        control(&client, "/testing/compact?dropWatches=true").await;
        let relist = without_errors(&until(&mut events, &Seen::InitDone).await);
        assert_eq!(relist.first(), Some(&Seen::Init), "{relist:?}");
    })
    .await;
}

#[tokio::test]
async fn raw_watch_bookmarks_and_410() {
    bounded(async {
        let (server, client) = start_with(ServerConfig {
            bookmark_interval: Duration::from_millis(200),
            ..ServerConfig::default()
        })
        .await;
        let services: Api<Service> = Api::all(client.clone());
        let list = services.list(&ListParams::default()).await.unwrap();
        let rv = list.metadata.resource_version.unwrap();

        let mut stream = services
            .watch(&WatchParams::default().timeout(30), &rv)
            .await
            .unwrap()
            .boxed();
        let ev = within("a bookmark", stream.try_next())
            .await
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Bookmark(b) => {
                assert_eq!(b.metadata.resource_version, rv);
                assert_eq!(b.types.kind, "Service");
                assert_eq!(b.types.api_version, "v1");
            }
            other => panic!("expected a bookmark, got {other:?}"),
        }

        // Without bookmarks, only changes arrive.
        let mut quiet = services
            .watch(&WatchParams::default().disable_bookmarks(), &rv)
            .await
            .unwrap()
            .boxed();
        Api::<Service>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &service("x", json!({})))
            .await
            .unwrap();
        match within("ADDED", quiet.try_next()).await.unwrap().unwrap() {
            WatchEvent::Added(s) => assert_eq!(s.name_any(), "x"),
            other => panic!("expected ADDED, got {other:?}"),
        }

        control(&client, "/testing/compact").await;
        let mut old = services
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        match within("ERROR", old.try_next()).await.unwrap().unwrap() {
            WatchEvent::Error(status) => {
                assert_eq!(status.code, 410);
                assert_eq!(status.reason, "Expired");
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(within("the end of stream", old.try_next())
            .await
            .unwrap()
            .is_none());

        // timeoutSeconds ends the stream cleanly.
        let rv = services
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let mut short = services
            .watch(&WatchParams::default().disable_bookmarks().timeout(1), &rv)
            .await
            .unwrap()
            .boxed();
        assert!(within("timeoutSeconds", short.try_next())
            .await
            .unwrap()
            .is_none());

        // A resourceVersion from the future: 504, which kube's client would retry for
        // minutes by itself (15 times, exponential backoff); look at it with retries off.
        let mut config = Config::new(server.url().parse().unwrap());
        config.default_retry = false;
        let no_retry: Api<Service> = Api::all(Client::try_from(config).unwrap());
        let err = within("504", no_retry.watch(&WatchParams::default(), "999999"))
            .await
            .err()
            .unwrap();
        assert_eq!(api_code(&err), 504);
    })
    .await;
}

#[tokio::test]
async fn streaming_list_watcher() {
    bounded(async {
        let (_server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        for name in ["a", "b"] {
            services
                .create(&pp, &service(name, json!({})))
                .await
                .unwrap();
        }
        let mut events = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().streaming_lists(),
        )
        .boxed();
        let init = until(&mut events, &Seen::InitDone).await;
        assert_eq!(
            init,
            [
                Seen::Init,
                Seen::InitApply("a".into()),
                Seen::InitApply("b".into()),
                Seen::InitDone
            ]
        );
        services
            .create(&pp, &service("c", json!({})))
            .await
            .unwrap();
        assert_eq!(
            until(&mut events, &Seen::Apply("c".into())).await,
            [Seen::Apply("c".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn selectors_on_watches() {
    bounded(async {
        let (_server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        services
            .create(&pp, &service("web", json!({"app": "web"})))
            .await
            .unwrap();
        services
            .create(
                &pp,
                &service(
                    "mesh",
                    json!({"app": "mesh", "service.kubernetes.io/service-proxy-name": "other"}),
                ),
            )
            .await
            .unwrap();

        // kube-proxy's selector: services not claimed by another proxy.
        let mut ours = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels("!service.kubernetes.io/service-proxy-name"),
        )
        .boxed();
        assert_eq!(
            until(&mut ours, &Seen::InitDone).await,
            [Seen::Init, Seen::InitApply("web".into()), Seen::InitDone]
        );
        // Claimed by another proxy: leaves the selection, seen as deleted.
        services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "x"}}}),
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            until(&mut ours, &Seen::Delete("web".into())).await,
            [Seen::Delete("web".into())]
        );
        // Released: enters it, seen as applied.
        services
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": null}}}),
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            until(&mut ours, &Seen::Apply("mesh".into())).await,
            [Seen::Apply("mesh".into())]
        );

        // A single object by field selector, as the agent watches its own Node.
        let nodes: Api<Node> = Api::all(client.clone());
        nodes.create(&pp, &node("node-a")).await.unwrap();
        nodes.create(&pp, &node("node-b")).await.unwrap();
        let mut mine = watcher(
            nodes.clone(),
            watcher::Config::default().fields("metadata.name=node-a"),
        )
        .boxed();
        assert_eq!(
            until(&mut mine, &Seen::InitDone).await,
            [Seen::Init, Seen::InitApply("node-a".into()), Seen::InitDone]
        );
        let label = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"touched": v}}}));
        nodes
            .patch("node-b", &PatchParams::default(), &label("1"))
            .await
            .unwrap();
        nodes
            .patch("node-a", &PatchParams::default(), &label("1"))
            .await
            .unwrap();
        assert_eq!(
            until(&mut mine, &Seen::Apply("node-a".into())).await,
            [Seen::Apply("node-a".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn pause_and_resume() {
    bounded(async {
        let (server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let pp = PostParams::default();
        let mut events = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed();
        until(&mut events, &Seen::InitDone).await;
        polling(
            std::slice::from_mut(&mut events),
            server.wait_for_watchers(WAIT, |n| n == 1),
        )
        .await
        .unwrap();

        // code=500: requests fail at once (kube's client does not retry a 500).
        let paused = control(&client, "/testing/pause?code=500").await;
        assert_eq!(paused["code"], 500);
        let err = services.list(&ListParams::default()).await.unwrap_err();
        assert_eq!(api_code(&err), 500);
        // The watch was dropped (an error of its own: the body broke off) and cannot
        // come back while paused: the watcher's restarts fail with the pause's Status.
        let errors = async {
            let mut seen_errors = Vec::new();
            loop {
                match events.next().await.map(seen) {
                    Some(Seen::Error(e)) if e.contains("paused") => return (e, seen_errors),
                    Some(Seen::Error(e)) => seen_errors.push(e),
                    other => panic!("unexpected watcher event while paused: {other:?}"),
                }
            }
        };
        let (paused_error, before) = within("a watcher error while paused", errors).await;
        assert!(
            before.len() <= 1,
            "at most the broken stream first: {before:?}"
        );
        assert!(paused_error.contains("500"), "{paused_error}");
        // A client with the bypass header is still served: a change made during the
        // outage, which the watcher must pick up once it is back.
        let mut config = Config::new(server.url().parse().unwrap());
        config.headers.push((
            HeaderName::from_static(BYPASS_PAUSE_HEADER),
            HeaderValue::from_static("1"),
        ));
        let bypass: Api<Service> = Api::namespaced(Client::try_from(config).unwrap(), "default");
        bypass
            .create(&pp, &service("during", json!({})))
            .await
            .unwrap();
        control(&client, "/testing/resume").await;
        services
            .create(&pp, &service("after", json!({})))
            .await
            .unwrap();
        let back = without_errors(&until(&mut events, &Seen::Apply("after".into())).await);
        assert_eq!(back.last(), Some(&Seen::Apply("after".into())), "{back:?}");
        assert!(back.contains(&Seen::Apply("during".into())), "{back:?}");

        // 503 (the default): kube's client retries by itself (Retry-After: 1), so a short
        // pause is ridden out inside one request. The watcher above is not polled here,
        // so every refusal counted from now on is an attempt of this list.
        control(&client, "/testing/pause").await;
        let refused_before = server.refused();
        let list = tokio::spawn({
            let services = services.clone();
            async move { services.list(&ListParams::default()).await }
        });
        within("the list to be refused and retried", async {
            while server.refused() < refused_before + 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(!list.is_finished(), "still retrying while paused");
        control(&client, "/testing/resume").await;
        let listed = within("the retried list", list).await.unwrap().unwrap();
        assert_eq!(listed.items.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn bad_input_gets_status_errors() {
    bounded(async {
        let (_server, client) = start().await;
        let json_ct = "application/json";
        let cases: &[(Method, &str, &str, &str, u16)] = &[
            (
                Method::POST,
                "/api/v1/namespaces/default/services",
                json_ct,
                "{not json",
                400,
            ),
            (
                Method::POST,
                "/api/v1/namespaces/default/services",
                json_ct,
                "[1,2]",
                400,
            ),
            (
                Method::POST,
                "/api/v1/namespaces/default/services",
                json_ct,
                r#"{"kind":"Pod"}"#,
                400,
            ),
            (
                Method::POST,
                "/api/v1/namespaces/default/services",
                json_ct,
                r#"{"metadata":{}}"#,
                422,
            ),
            (
                Method::POST,
                "/api/v1/services",
                json_ct,
                r#"{"metadata":{"name":"x"}}"#,
                405,
            ),
            (
                Method::GET,
                "/api/v1/services?labelSelector=a+in+b",
                json_ct,
                "",
                400,
            ),
            (
                Method::GET,
                "/api/v1/services?fieldSelector=metadata.name",
                json_ct,
                "",
                400,
            ),
            (
                Method::GET,
                "/api/v1/services?watch=maybe",
                json_ct,
                "",
                400,
            ),
            (
                Method::GET,
                "/api/v1/services?watch=true&resourceVersion=abc",
                json_ct,
                "",
                400,
            ),
            (
                Method::GET,
                "/api/v1/services?watch=true&timeoutSeconds=-1",
                json_ct,
                "",
                400,
            ),
            (
                Method::GET,
                "/api/v1/services?watch=true&sendInitialEvents=true",
                json_ct,
                "",
                422,
            ),
            (Method::GET, "/api/v1/pods", json_ct, "", 404),
            (
                Method::GET,
                "/api/v1/namespaces/default/nodes",
                json_ct,
                "",
                404,
            ),
            (Method::GET, "/api/v1/services/web", json_ct, "", 404),
            (
                Method::GET,
                "/apis/discovery.k8s.io/v2/endpointslices",
                json_ct,
                "",
                404,
            ),
            (Method::GET, "/nope", json_ct, "", 404),
            (
                Method::GET,
                "/api/v1/namespaces/default/services/web",
                json_ct,
                "",
                404,
            ),
            (
                Method::PUT,
                "/api/v1/nodes/n",
                json_ct,
                r#"{"metadata":{"name":"n"}}"#,
                404,
            ),
            (Method::PATCH, "/api/v1/nodes/n", "text/plain", "{}", 415),
            (Method::DELETE, "/api/v1/nodes", json_ct, "", 405),
            (Method::POST, "/testing/pause?code=200", json_ct, "", 400),
            (Method::GET, "/testing/pause", json_ct, "", 405),
            (
                Method::POST,
                "/api/v1/nodes?dryRun=All",
                json_ct,
                r#"{"metadata":{"name":"n"}}"#,
                400,
            ),
        ];
        for (method, path, ct, body, want) in cases {
            let err = raw(&client, method.clone(), path, ct, body)
                .await
                .unwrap_err();
            assert_eq!(api_code(&err), *want, "{method} {path} {body}");
        }

        // Wrong names on update, bad patches.
        let nodes: Api<Node> = Api::all(client.clone());
        nodes
            .create(&PostParams::default(), &node("n"))
            .await
            .unwrap();
        let err = raw(
            &client,
            Method::PUT,
            "/api/v1/nodes/n",
            json_ct,
            r#"{"metadata":{"name":"m"}}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), 400);
        let merge = "application/merge-patch+json";
        let err = raw(
            &client,
            Method::PATCH,
            "/api/v1/nodes/n",
            merge,
            r#"{"metadata":{"name":"m"}}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), 400);
        let err = raw(
            &client,
            Method::PATCH,
            "/api/v1/nodes/n",
            merge,
            r#"{"metadata":{"resourceVersion":"1"}}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), 409);
        let jp = "application/json-patch+json";
        let err = raw(
            &client,
            Method::PATCH,
            "/api/v1/nodes/n",
            jp,
            r#"[{"op":"remove","path":"/nope"}]"#,
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), 422);
        let apply = "application/apply-patch+yaml";
        let err = raw(
            &client,
            Method::PATCH,
            "/api/v1/nodes/n",
            apply,
            "metadata: {}",
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), 400, "fieldManager required");
        let delete_opts = r#"{"preconditions":{"uid":"not-the-uid"}}"#;
        let err = raw(
            &client,
            Method::DELETE,
            "/api/v1/nodes/n",
            json_ct,
            delete_opts,
        )
        .await
        .unwrap_err();
        assert_eq!(api_code(&err), 409);

        // The server is still fine.
        assert_eq!(
            nodes
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
    })
    .await;
}

#[tokio::test]
async fn many_concurrent_watchers() {
    bounded(async {
        const N: usize = 50;
        let (server, client) = start().await;
        let mut streams = Vec::new();
        for _ in 0..N {
            let mut s = watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .boxed();
            until(&mut s, &Seen::InitDone).await;
            streams.push(s);
        }
        polling(&mut streams, server.wait_for_watchers(WAIT, |n| n == N))
            .await
            .unwrap();
        Api::<Service>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &service("web", json!({})))
            .await
            .unwrap();
        let web = Seen::Apply("web".into());
        let all = futures::future::join_all(streams.iter_mut().map(|s| until(s, &web))).await;
        assert!(all.iter().all(|evs| evs == &[Seen::Apply("web".into())]));
        drop(streams);
        server.drop_watches();
        within("watches closed", server.wait_for_watchers(WAIT, |n| n == 0))
            .await
            .unwrap();
    })
    .await;
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kpr-apiserver-test-{}-{name}", std::process::id()))
}

async fn client_from_kubeconfig(path: &PathBuf) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

#[tokio::test]
async fn kubeconfig_and_discovery() {
    bounded(async {
        let (server, _) = start().await;
        let path = temp_path("kubeconfig");
        server.write_kubeconfig(&path).unwrap();
        let client = client_from_kubeconfig(&path).await;
        let _ = std::fs::remove_file(&path);

        let version = client.apiserver_version().await.unwrap();
        assert_eq!(
            (version.major.as_str(), version.minor.as_str()),
            ("1", "34")
        );
        let core = client.list_core_api_versions().await.unwrap();
        assert_eq!(core.versions, ["v1"]);
        let groups = client.list_api_groups().await.unwrap();
        assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));
        let resources = client
            .list_api_group_resources("discovery.k8s.io/v1")
            .await
            .unwrap();
        assert_eq!(resources.resources[0].name, "endpointslices");
        // The kubeconfig's default namespace is used by `Api::default_namespaced`.
        let services: Api<Service> = Api::default_namespaced(client.clone());
        services
            .create(&PostParams::default(), &service("web", json!({})))
            .await
            .unwrap();
        assert_eq!(
            services
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
    })
    .await;
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_address_and_serves() {
    bounded(async {
        let path = temp_path("bin-kubeconfig");
        let mut child = Child(
            Command::new(env!("CARGO_BIN_EXE_kpr-test-apiserver"))
                .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
                .arg(&path)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let line = within(
            "the first line",
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).unwrap();
                line
            }),
        )
        .await
        .unwrap();
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(addr.port(), 0);

        let client = client_from_kubeconfig(&path).await;
        let _ = std::fs::remove_file(&path);
        let nodes: Api<Node> = Api::all(client.clone());
        nodes
            .create(&PostParams::default(), &node("n"))
            .await
            .unwrap();
        let direct: Api<Node> = Api::all(client_for(&format!("http://{addr}")));
        assert_eq!(direct.get("n").await.unwrap().name_any(), "n");
        assert_eq!(watchers(&client).await, (0, 0));
    })
    .await;
}

/// An EndpointSlice with one endpoint at `ip`.
fn slice(name: &str, ip: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip]}],
    }))
    .unwrap()
}

fn trigger_time(slice: &EndpointSlice) -> Option<String> {
    slice
        .annotations()
        .get("endpoints.kubernetes.io/last-change-trigger-time")
        .cloned()
}

/// As the EndpointSlice controller: creation and every change of a slice stamp
/// `endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339 with nanoseconds); a
/// no-op update keeps it (and stays a no-op); a writer's own time is kept.
#[tokio::test]
async fn endpoint_slice_changes_get_a_trigger_time() {
    bounded(async {
        let (_server, client) = start().await;
        let api: Api<EndpointSlice> = Api::namespaced(client, "default");
        let created = api
            .create(&PostParams::default(), &slice("web-1", "10.244.1.11"))
            .await
            .unwrap();
        let first = trigger_time(&created).expect("stamped on create");
        let parsed: k8s_openapi::jiff::Timestamp = first.parse().expect("RFC 3339");
        assert!(first.contains('.'), "with a fraction: {first}");
        assert!(created.metadata.creation_timestamp.is_some());

        let same = api
            .replace("web-1", &PostParams::default(), &created)
            .await
            .unwrap();
        assert_eq!(trigger_time(&same).as_deref(), Some(first.as_str()));
        assert_eq!(rv_of(&same), rv_of(&created), "a no-op stays a no-op");

        let mut changed = same.clone();
        changed.endpoints[0].addresses = vec!["10.244.1.12".into()];
        let changed = api
            .replace("web-1", &PostParams::default(), &changed)
            .await
            .unwrap();
        let second = trigger_time(&changed).expect("stamped on change");
        let later: k8s_openapi::jiff::Timestamp = second.parse().expect("RFC 3339");
        assert_ne!(second, first);
        assert!(later >= parsed);

        let mut own = changed.clone();
        own.endpoints[0].addresses = vec!["10.244.1.13".into()];
        own.metadata.annotations = Some(
            [(
                "endpoints.kubernetes.io/last-change-trigger-time".to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            )]
            .into(),
        );
        let own = api
            .replace("web-1", &PostParams::default(), &own)
            .await
            .unwrap();
        assert_eq!(trigger_time(&own).as_deref(), Some("2026-01-01T00:00:00Z"));
    })
    .await;
}

#[tokio::test]
async fn lists_come_in_pages_of_limit_with_continue_tokens() {
    bounded(async {
        let (_server, client) = start().await;
        let api: Api<Service> = Api::namespaced(client, "default");
        let names: Vec<String> = (0..5).map(|i| format!("svc-{i}")).collect();
        for name in &names {
            api.create(&PostParams::default(), &service(name, json!({})))
                .await
                .unwrap();
        }
        let first = api.list(&ListParams::default().limit(2)).await.unwrap();
        let listed_rv = first.metadata.resource_version.clone();
        assert_eq!(first.items.len(), 2);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let mut seen: Vec<String> = first.items.iter().map(|svc| svc.name_any()).collect();
        let mut token = first.metadata.continue_;
        while let Some(next) = token.filter(|token| !token.is_empty()) {
            let page = api
                .list(&ListParams::default().limit(2).continue_token(&next))
                .await
                .unwrap();
            assert!(page.items.len() <= 2);
            assert_eq!(
                page.metadata.resource_version, listed_rv,
                "the first page's version"
            );
            seen.extend(page.items.iter().map(|svc| svc.name_any()));
            token = page.metadata.continue_;
        }
        assert_eq!(seen, names, "every object once, in order");
        // kube-runtime's watcher pages its initial list (500 a page by default): a
        // paged list ends in the same store.
        let listed: BTreeSet<String> = watcher(api, watcher::Config::default().page_size(2))
            .default_backoff()
            .applied_objects()
            .take(5)
            .map_ok(|svc| svc.name_any())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed, names.into_iter().collect());
    })
    .await;
}
