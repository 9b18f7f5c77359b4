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

/// A plain HTTP/1.0 GET with an `Accept` header, over a fresh connection (no client
/// library between the test and the bytes): status, lower-cased headers, body.
async fn http_get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let request = format!("GET {path} HTTP/1.0\r\nHost: test\r\nAccept: {accept}\r\n\r\n");
    // Blocking I/O off the runtime thread, which serves the server meanwhile.
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        raw
    })
    .await
    .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec())
        .unwrap()
        .to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

const TABLE_V1: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

async fn get_table(server: &TestApiServerHandle, path: &str) -> Value {
    let (status, head, body) = within(path, http_get(server.addr(), path, TABLE_V1)).await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    assert!(head.contains("content-type: application/json"), "{head}");
    serde_json::from_slice(&body).unwrap()
}

fn column_names(table: &Value) -> Vec<&str> {
    table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

/// The cells of each row without the AGE cell (checked for its form only: the objects
/// were created moments ago, the exact value is the clock's).
fn cells_without_age(table: &Value, age_column: usize) -> Vec<Vec<Value>> {
    table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let mut cells = row["cells"].as_array().unwrap().clone();
            let age = cells.remove(age_column);
            let age = age.as_str().unwrap();
            assert!(
                age.ends_with('s') && age[..age.len() - 1].parse::<u32>().is_ok(),
                "AGE of a new object: {age:?}"
            );
            cells
        })
        .collect()
}

#[tokio::test]
async fn table_responses_have_the_real_servers_columns() {
    bounded(async {
        let (server, client) = start().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let ports = json!([{"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]);
        for (name, spec) in [
            ("a-cluster", json!({"clusterIP": "10.96.0.10", "selector": {"app": "a", "tier": "web"}, "ports": ports})),
            ("b-headless", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
            ("c-nodeport", json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalIPs": ["192.0.2.1", "192.0.2.2"], "ports": [{"port": 80, "nodePort": 30080}]})),
            ("d-lb", json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12", "ports": [{"port": 443, "nodePort": 30443}]})),
            ("e-external", json!({"type": "ExternalName", "externalName": "example.org"})),
        ] {
            let svc: Service = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
            services.create(&PostParams::default(), &svc).await.unwrap();
        }
        let endpoint = |last: u8| json!({"addresses": [format!("10.244.1.{last}")], "conditions": {"ready": true}});
        for (name, endpoints, ports) in [
            ("a-1", (1..=5).map(endpoint).collect::<Vec<_>>(), json!([{"port": 1}, {"port": 2}, {}, {"port": 4}])),
            ("a-2", vec![endpoint(9)], json!([{"port": 8080}])),
            ("b-1", vec![], json!([])),
        ] {
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": name}, "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
            }))
            .unwrap();
            slices.create(&PostParams::default(), &slice).await.unwrap();
        }

        let table = get_table(&server, "/api/v1/namespaces/default/services").await;
        assert_eq!((table["kind"].as_str(), table["apiVersion"].as_str()), (Some("Table"), Some("meta.k8s.io/v1")));
        assert_eq!(table["metadata"]["resourceVersion"], json!(server.resource_version().to_string()));
        assert_eq!(
            column_names(&table),
            ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
        );
        // Selector is a wide-only column, as on the real server.
        let priorities: Vec<u64> = table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["priority"].as_u64().unwrap()).collect();
        assert_eq!(priorities, [0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            cells_without_age(&table, 5),
            [
                json!(["a-cluster", "ClusterIP", "10.96.0.10", "<none>", "80/TCP,53/UDP", "app=a,tier=web"]),
                json!(["b-headless", "ClusterIP", "None", "<none>", "80/TCP", "<none>"]),
                json!(["c-nodeport", "NodePort", "10.96.0.11", "192.0.2.1,192.0.2.2", "80:30080/TCP", "<none>"]),
                json!(["d-lb", "LoadBalancer", "10.96.0.12", "<pending>", "443:30443/TCP", "<none>"]),
                json!(["e-external", "ExternalName", "<none>", "example.org", "<none>", "<none>"]),
            ]
            .map(|row| row.as_array().unwrap().clone())
        );
        // includeObject: Metadata by default, or the object, or nothing.
        let row = &table["rows"][0];
        assert_eq!(row["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(row["object"]["metadata"]["name"], "a-cluster");
        assert!(row["object"].get("spec").is_none());
        let full = get_table(&server, "/api/v1/namespaces/default/services?includeObject=Object").await;
        assert_eq!(full["rows"][0]["object"]["spec"]["clusterIP"], "10.96.0.10");
        let bare = get_table(&server, "/api/v1/namespaces/default/services?includeObject=None").await;
        assert!(bare["rows"][0].get("object").is_none());
        let (status, _, _) = http_get(server.addr(), "/api/v1/namespaces/default/services?includeObject=All", TABLE_V1).await;
        assert_eq!(status, 400);

        let table = get_table(&server, "/apis/discovery.k8s.io/v1/endpointslices").await;
        assert_eq!(column_names(&table), ["Name", "AddressType", "Ports", "Endpoints", "Age"]);
        assert_eq!(
            cells_without_age(&table, 4),
            [
                json!(["a-1", "IPv4", "1,2,<unset> + 1 more...", "10.244.1.1,10.244.1.2,10.244.1.3 + 2 more..."]),
                json!(["a-2", "IPv4", "8080", "10.244.1.9"]),
                json!(["b-1", "IPv4", "<unset>", "<unset>"]),
            ]
            .map(|row| row.as_array().unwrap().clone())
        );

        // One object: a Table of one row; v1beta1 when that is what the client asks for.
        let one = get_table(&server, "/api/v1/namespaces/default/services/d-lb").await;
        assert_eq!(one["rows"].as_array().unwrap().len(), 1);
        assert_eq!(one["rows"][0]["cells"][0], "d-lb");
        let (_, _, body) = http_get(server.addr(), "/api/v1/namespaces/default/services/d-lb", "application/json;as=Table;v=v1beta1;g=meta.k8s.io").await;
        let beta: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(beta["apiVersion"], "meta.k8s.io/v1beta1");
        // Without the Table media type: the object itself.
        let (_, _, body) = http_get(server.addr(), "/api/v1/namespaces/default/services/d-lb", "application/json").await;
        let plain: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(plain["kind"], "Service");

        // A watch's events carry Tables too (what `kubectl get -w` prints).
        let (status, _, body) = http_get(
            server.addr(),
            "/api/v1/namespaces/default/services?watch=true&fieldSelector=metadata.name%3Da-cluster&timeoutSeconds=1",
            TABLE_V1,
        )
        .await;
        assert_eq!(status, 200);
        let events: Vec<Value> = body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "ADDED");
        assert_eq!(events[0]["object"]["kind"], "Table");
        assert_eq!(events[0]["object"]["rows"][0]["cells"][0], "a-cluster");
    })
    .await;
}

/// The fields of one protobuf message: (field number, wire type, varint or bytes).
fn proto_fields(mut buf: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let (byte, rest) = buf.split_first().unwrap();
            *buf = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        match key & 7 {
            0 => out.push((key >> 3, 0, varint(&mut buf).to_le_bytes().to_vec())),
            2 => {
                let len = usize::try_from(varint(&mut buf)).unwrap();
                out.push((key >> 3, 2, buf[..len].to_vec()));
                buf = &buf[len..];
            }
            other => panic!("unexpected wire type {other}"),
        }
    }
    out
}

fn proto_field(msg: &[u8], field: u64) -> Vec<Vec<u8>> {
    proto_fields(msg)
        .into_iter()
        .filter(|(f, _, _)| *f == field)
        .map(|(_, _, v)| v)
        .collect()
}

fn proto_string(msg: &[u8], field: u64) -> String {
    String::from_utf8(proto_field(msg, field).remove(0)).unwrap()
}

#[tokio::test]
async fn openapi_v2_as_json_and_as_gnostic_protobuf() {
    bounded(async {
        let (server, _) = start().await;
        let (status, _, body) = http_get(server.addr(), "/openapi/v2", "application/json").await;
        assert_eq!(status, 200);
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["swagger"], "2.0");
        let defs = doc["definitions"].as_object().unwrap();
        assert_eq!(
            defs["io.k8s.api.core.v1.Service"]["x-kubernetes-group-version-kind"],
            json!([{"group": "", "kind": "Service", "version": "v1"}])
        );
        assert_eq!(
            defs["io.k8s.api.discovery.v1.EndpointSlice"]["x-kubernetes-group-version-kind"],
            json!([{"group": "discovery.k8s.io", "kind": "EndpointSlice", "version": "v1"}])
        );
        assert_eq!(
            defs["io.k8s.api.discovery.v1.EndpointSlice"]["required"],
            json!(["addressType", "endpoints"])
        );
        // kubectl finds each kind's PATCH here; without `fieldValidation` listed it
        // validates on the client.
        let patch = &doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-action"], "patch");
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Service");
        assert!(!patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
        assert!(doc["paths"]
            ["/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}"]["patch"]
            .is_object());

        // What kubectl asks for: the same document as gnostic's openapi.v2.Document.
        let (status, head, pb) = http_get(
            server.addr(),
            "/openapi/v2",
            "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            head.contains(
                "content-type: application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
            ),
            "{head}"
        );
        assert_eq!(proto_string(&pb, 1), "2.0");
        // definitions (9) > NamedSchema (1) {name 1, Schema 2}
        let definitions = proto_field(&pb, 9).remove(0);
        let named: Vec<(String, Vec<u8>)> = proto_field(&definitions, 1)
            .iter()
            .map(|n| (proto_string(n, 1), proto_field(n, 2).remove(0)))
            .collect();
        let names: BTreeSet<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, defs.keys().map(String::as_str).collect());
        let (_, service) = named
            .iter()
            .find(|(n, _)| n == "io.k8s.api.core.v1.Service")
            .unwrap();
        // Schema.type (22) > TypeItem.value (1)
        assert_eq!(
            proto_string(&proto_field(service, 22).remove(0), 1),
            "object"
        );
        // Schema.properties (25) > NamedSchema names
        let props: BTreeSet<String> = proto_field(&proto_field(service, 25).remove(0), 1)
            .iter()
            .map(|n| proto_string(n, 1))
            .collect();
        assert_eq!(
            props,
            ["apiVersion", "kind", "metadata", "spec", "status"]
                .map(String::from)
                .into()
        );
        // Schema.vendor_extension (31) > NamedAny {name 1, Any 2 {yaml 2}}
        let ext = proto_field(service, 31).remove(0);
        assert_eq!(proto_string(&ext, 1), "x-kubernetes-group-version-kind");
        let yaml = proto_string(&proto_field(&ext, 2).remove(0), 2);
        let gvk: Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(
            gvk,
            json!([{"group": "", "kind": "Service", "version": "v1"}])
        );
        // paths (8) > NamedPathItem (2) {name 1, PathItem 2 {patch 8 > Operation}}
        let paths = proto_field(&pb, 8).remove(0);
        let path_names: Vec<String> = proto_field(&paths, 2)
            .iter()
            .map(|p| proto_string(p, 1))
            .collect();
        assert!(
            path_names.contains(&"/api/v1/namespaces/{namespace}/services/{name}".to_owned()),
            "{path_names:?}"
        );

        // No v3: kubectl falls back to v2.
        let (status, _, _) = http_get(server.addr(), "/openapi/v3", "application/json").await;
        assert_eq!(status, 404);
    })
    .await;
}

const TRIGGER: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_of(slice: &EndpointSlice) -> Option<String> {
    slice.annotations().get(TRIGGER).cloned()
}

/// (seconds since the epoch, nanoseconds) of an RFC 3339 UTC time with an optional
/// fraction, parsed here independently of the server.
fn instant(ts: &str) -> (i64, u32) {
    let (whole, frac) = ts
        .strip_suffix('Z')
        .unwrap()
        .split_once('.')
        .unwrap_or((ts.strip_suffix('Z').unwrap(), ""));
    let nanos = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().unwrap()
    };
    let dt = chrono_free_seconds(whole);
    (dt, nanos)
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS`, by counting days.
fn chrono_free_seconds(s: &str) -> i64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut days: i64 = (1970..y).map(|y| if leap(y) { 366 } else { 365 }).sum();
    let month_days = [
        31,
        if leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    days += month_days[..usize::try_from(m - 1).unwrap()]
        .iter()
        .sum::<i64>()
        + d
        - 1;
    days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)
}

#[tokio::test]
async fn creation_timestamps_and_endpoint_slice_trigger_times() {
    bounded(async {
        let (_server, client) = start().await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let now = i64::try_from(now).unwrap();

        // creationTimestamp: set on create (second precision, as metav1.Time), kept by
        // updates whatever they send.
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let created = services.create(&PostParams::default(), &service("web", json!({}))).await.unwrap();
        let ts = created.metadata.creation_timestamp.clone().unwrap();
        let secs = ts.0.as_second();
        assert!((now - 5..=now + 60).contains(&secs), "creationTimestamp {ts:?} is not about now ({now})");
        let patched = services
            .patch("web", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"creationTimestamp": "2001-01-01T00:00:00Z", "labels": {"x": "y"}}})))
            .await
            .unwrap();
        assert_eq!(patched.metadata.creation_timestamp, Some(ts));

        // The trigger time: set on create, RFC 3339 with nanoseconds (RFC3339Nano).
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let slice = |addresses: &[&str], annotations: Value| -> EndpointSlice {
            serde_json::from_value(json!({
                "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}, "annotations": annotations},
                "addressType": "IPv4",
                "endpoints": addresses.iter().map(|a| json!({"addresses": [a]})).collect::<Vec<_>>(),
            }))
            .unwrap()
        };
        let first = slices.create(&PostParams::default(), &slice(&["10.244.1.1"], json!({}))).await.unwrap();
        let t1 = trigger_of(&first).expect("a trigger time on create");
        assert!(t1.ends_with('Z') && t1.len() > 20 && t1.len() <= 30, "{t1}");
        let (t1_secs, _) = instant(&t1);
        assert!((now - 5..=now + 60).contains(&t1_secs), "trigger time {t1} is not about now ({now})");

        // A replace that changes nothing (the annotation carried over or left out):
        // no new version, the trigger time stays.
        for annotations in [json!({TRIGGER: t1}), json!({})] {
            let mut same = slice(&["10.244.1.1"], annotations);
            same.metadata.resource_version = first.metadata.resource_version.clone();
            let replaced = slices.replace("web-1", &PostParams::default(), &same).await.unwrap();
            assert_eq!(replaced.metadata.resource_version, first.metadata.resource_version);
            assert_eq!(trigger_of(&replaced), Some(t1.clone()));
        }

        // A writer's own trigger time is kept (here an old one, a test standing in for
        // the controller) ...
        let old = "2020-01-01T00:00:00.5Z";
        let second = slices
            .patch("web-1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {TRIGGER: old}}, "endpoints": [{"addresses": ["10.244.1.2"]}]})))
            .await
            .unwrap();
        assert_eq!(trigger_of(&second).as_deref(), Some(old));
        // ... and a change that carries it over (as kubectl apply's patch does) gets
        // the time of this change.
        let third = slices
            .patch("web-1", &PatchParams::default(), &Patch::Merge(json!({"endpoints": [{"addresses": ["10.244.1.3"]}]})))
            .await
            .unwrap();
        let t3 = trigger_of(&third).unwrap();
        assert!(instant(&t3) > instant(old), "{t3} after {old}");
        assert!(instant(&t3) >= instant(&t1), "{t3} not before {t1}");
        // Other kinds get no trigger time.
        assert!(!patched.annotations().contains_key(TRIGGER));
    })
    .await;
}

#[tokio::test]
async fn kubectl_applies_the_repos_examples_with_validation_on() {
    bounded(async {
        let (server, client) = start().await;
        let dir = temp_path("kubectl");
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
        // kubectl blocks; the server runs on this test's runtime thread meanwhile.
        let kubectl = move |args: Vec<String>| {
            let (kubeconfig, cache) = (kubeconfig.clone(), dir.join("cache"));
            tokio::task::spawn_blocking(move || {
                Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .arg("--cache-dir")
                    .arg(&cache)
                    .args(["--request-timeout", "10s"])
                    .args(&args)
                    .output()
                    .expect("kubectl runs (install it: Debian's kubernetes-client, or `cargo xtask test`)")
            })
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&examples).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty());
        for file in &files {
            let out = kubectl(vec!["apply".into(), "-f".into(), file.display().to_string()]).await.unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "kubectl apply {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
            assert!(stdout.lines().all(|l| l.ends_with(" created")), "{stdout}");
            // Applied again: the same objects, nothing to change.
            let out = kubectl(vec!["apply".into(), "-f".into(), file.display().to_string()]).await.unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && stdout.lines().all(|l| l.ends_with(" unchanged")), "{stdout}");
        }
        // A changed port and a new one, then back: kubectl's strategic merge patches
        // (computed from the document's merge keys, with `$setElementOrder` and
        // `$patch: delete`) merged by port.
        let web = std::fs::read_to_string(examples.join("web.yaml")).unwrap();
        let changed = web.replace(
            "      port: 80\n      targetPort: 8080\n",
            "      port: 80\n      targetPort: 9090\n    - name: https\n      protocol: TCP\n      port: 443\n      targetPort: 8443\n",
        );
        assert_ne!(changed, web, "web.yaml has the port this test changes");
        let changed_path = temp_path("kubectl").join("web-changed.yaml");
        std::fs::write(&changed_path, changed).unwrap();
        let demo: Api<Service> = Api::namespaced(client.clone(), "demo");
        let ports = |svc: Service| serde_json::to_value(svc.spec.unwrap().ports.unwrap()).unwrap();
        for (file, want) in [
            (
                changed_path.clone(),
                json!([
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 9090},
                    {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443},
                ]),
            ),
            (
                examples.join("web.yaml"),
                json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]),
            ),
        ] {
            let out = kubectl(vec!["apply".into(), "-f".into(), file.display().to_string()]).await.unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && stdout.contains("service/web configured"), "{stdout}");
            assert_eq!(ports(demo.get("web").await.unwrap()), want);
        }

        let services: Api<Service> = Api::all(client.clone());
        let applied = services.list(&ListParams::default()).await.unwrap().items.len();
        let out = kubectl(vec!["get".into(), "services".into(), "-A".into()]).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]);
        assert_eq!(lines.count(), applied, "{stdout}");
        let out = kubectl(vec!["get".into(), "endpointslices".into(), "-A".into()]).await.unwrap();
        let header: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().split_whitespace().map(String::from).collect();
        assert_eq!(header, ["NAMESPACE", "NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]);
        let _ = std::fs::remove_dir_all(temp_path("kubectl"));
    })
    .await;
}
