//! The agent following a Kubernetes API server through its real kube-rs client while
//! traffic flows through the lab: the test API server (`kpr_lab::apiserver`) listens on
//! loopback inside the node namespace, the agent reaches it through a kubeconfig, and
//! the test changes Services and EndpointSlices through the same REST API.
//!
//! Every wait is bounded (at most [`DEADLINE`] per change); no assertion depends on how
//! fast something happened.
use std::{
    collections::BTreeSet,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kpr_lab::{
    apiserver::{TestApiServer, TestApiServerHandle, BYPASS_PAUSE_HEADER},
    lab::Lab,
    scenario::{sock, CLIENT_IP},
    traffic::tcp_request,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::{json, Value};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The backend pods: name and last octet of 10.244.1.x, all serving on port 8080.
const BACKENDS: [(&str, u8); 3] = [("web-0", 11), ("web-1", 12), ("web-2", 13)];
/// Per connection.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a change may take to reach the datapath before a test gives up.
const DEADLINE: Duration = Duration::from_secs(10);
/// The agent's batching period here (the default is kube-proxy's 1 s).
const MIN_SYNC_MS: u64 = 100;
/// This node, and another one.
const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";

/// A tokio runtime whose worker thread lives in the node namespace: the API server and
/// the test's API client, spawned on it, open their sockets there.
struct NodeRuntime(tokio::runtime::Runtime);

impl NodeRuntime {
    fn new(lab: &Lab) -> Self {
        let runtime = lab
            .node
            .run(|| {
                Ok(tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?)
            })
            .expect("a runtime in the node namespace");
        Self(runtime)
    }

    /// Runs `future` on the node's runtime, bounded by [`DEADLINE`].
    fn run<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        let bounded = async move { tokio::time::timeout(DEADLINE, future).await };
        self.0
            .block_on(self.0.spawn(bounded))
            .expect("the task panicked")
            .expect("an API call did not finish in time")
    }
}

/// A lab node with a client pod and three backend pods, the test API server in the
/// node namespace, and the agent following it.
struct ApiLab {
    /// Dropped first: stops the agent, removes the namespaces.
    lab: Lab,
    server: TestApiServerHandle,
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    /// Dropped last: the server and the client run on it.
    runtime: NodeRuntime,
}

impl ApiLab {
    fn start() -> Self {
        let mut lab = Lab::new().expect("lab");
        lab.node_name = NODE.into();
        lab.add_pod("client", CLIENT_IP).expect("client pod");
        for (name, last) in BACKENDS {
            lab.add_pod(name, Ipv4Addr::new(10, 244, 1, last))
                .expect("backend pod");
            lab.serve(name, 8080).expect("echo servers");
        }
        let runtime = NodeRuntime::new(&lab);
        let server = runtime
            .run(TestApiServer::start(SocketAddr::from((
                [127, 0, 0, 1],
                6443,
            ))))
            .expect("the test API server");
        let kubeconfig = lab.run_dir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");

        // The test's own client is served even while the server is paused for the
        // agent, so it can change objects during an outage.
        let url = server.url();
        let client = runtime.run(async move {
            let mut config = kube::Config::new(url.parse().expect("server URL"));
            config.headers.push((
                BYPASS_PAUSE_HEADER.parse().expect("header name"),
                "1".parse().expect("header value"),
            ));
            Client::try_from(config).expect("API client")
        });
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        }))
        .expect("node");
        runtime
            .run(async move { nodes.create(&PostParams::default(), &node).await })
            .expect("create the Node");

        lab.use_api_source(&kubeconfig, MIN_SYNC_MS);
        lab.start_agent(&[]).expect("the agent starts and syncs");
        lab.wait_attached().expect("programs attached");
        Self {
            lab,
            server,
            services: Api::namespaced(client.clone(), "demo"),
            slices: Api::namespaced(client, "demo"),
            runtime,
        }
    }

    /// Creates or updates Service `name` (server-side apply) on port 80 -> 8080.
    fn apply_service(&self, name: &str, vip: Ipv4Addr, spec: &Value) {
        let mut body = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {
                "clusterIP": vip.to_string(),
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        });
        merge(&mut body["spec"], spec);
        let services = self.services.clone();
        let name = name.to_owned();
        self.runtime
            .run(async move {
                services
                    .patch(&name, &PatchParams::apply("kpr-test"), &Patch::Apply(body))
                    .await
            })
            .expect("apply the Service");
    }

    /// Creates or replaces the endpoints of EndpointSlice `<service>-1`.
    fn apply_slice(&self, service: &str, endpoints: Vec<Value>) {
        let name = format!("{service}-1");
        let body = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "demo",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        });
        let slices = self.slices.clone();
        self.runtime
            .run(async move {
                slices
                    .patch(&name, &PatchParams::apply("kpr-test"), &Patch::Apply(body))
                    .await
            })
            .expect("apply the EndpointSlice");
    }

    /// Deletes a Service and its slice.
    fn delete_service(&self, service: &str) {
        let (services, slices) = (self.services.clone(), self.slices.clone());
        let service = service.to_owned();
        self.runtime
            .run(async move {
                services.delete(&service, &DeleteParams::default()).await?;
                slices
                    .delete(&format!("{service}-1"), &DeleteParams::default())
                    .await
            })
            .expect("delete the Service and its slice");
    }

    /// The backends answering `count` new connections to `vip`:80 from the client.
    fn backends(&self, vip: Ipv4Addr, count: usize) -> Result<BTreeSet<String>> {
        self.lab.pod("client").netns.run(|| {
            (0..count)
                .map(|_| tcp_request(sock(vip, 80), TIMEOUT).map(|answer| answer.server))
                .collect()
        })
    }

    /// Waits until connections to `vip` reach exactly `expected`.
    fn wait_backends(&self, what: &str, vip: Ipv4Addr, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|&s| s.to_owned()).collect();
        self.lab
            .wait_for(what, DEADLINE, || Ok(self.backends(vip, 30)? == expected))
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// How a new connection to `vip` fails (`None`: it succeeded).
    fn connect_error(&self, vip: Ipv4Addr, timeout: Duration) -> Option<std::io::ErrorKind> {
        let error = self
            .lab
            .pod("client")
            .netns
            .run(|| Ok(tcp_request(sock(vip, 80), timeout).err()))
            .expect("run in the client pod")?;
        Some(kpr_lab::traffic::io_error_kind(&error))
    }

    /// Waits until the agent's log contains `text`.
    fn wait_log(&self, text: &str) {
        self.lab
            .wait_for(&format!("{text:?} in the agent log"), DEADLINE, || {
                Ok(self.lab.agent_log().contains(text))
            })
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// Cuts the agent off the API (every request fails with 500, watches dropped) and
    /// waits until the agent noticed.
    fn cut_off(&self) {
        let failures_before = self.lab.agent_log().matches("watch failed").count();
        self.server.pause(500);
        self.lab
            .wait_for("the agent to notice the outage", DEADLINE, || {
                Ok(self.lab.agent_log().matches("watch failed").count() > failures_before)
            })
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    fn assert_healthy(&self) {
        let (code, body) = self.lab.healthz().expect("healthz answers");
        assert_eq!(code, 200, "healthz: {body}");
    }
}

/// Adds the keys of `patch` to `target` (one level deep is all the tests need).
fn merge(target: &mut Value, patch: &Value) {
    if let (Some(target), Some(patch)) = (target.as_object_mut(), patch.as_object()) {
        for (key, value) in patch {
            target.insert(key.clone(), value.clone());
        }
    }
}

/// An endpoint of backend `name` on `node` with the given conditions.
fn endpoint(name: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    let last = BACKENDS
        .iter()
        .find(|(backend, _)| *backend == name)
        .map(|(_, last)| *last)
        .unwrap_or_else(|| panic!("no backend {name}"));
    json!({
        "addresses": [format!("10.244.1.{last}")],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": "demo", "name": name},
    })
}

/// A ready endpoint on this node.
fn ready(name: &str) -> Value {
    endpoint(name, NODE, true, true, false)
}

/// New connections from the client pod to `vip`, one every 20 ms, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// The servers that answered so far, as the thread sees them.
    answered: Arc<std::sync::Mutex<BTreeSet<String>>>,
    thread: JoinHandle<Result<Vec<Result<String, String>>>>,
}

impl Traffic {
    fn start(lab: &ApiLab, vip: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        let thread = lab
            .lab
            .pod("client")
            .netns
            .spawn({
                let stop = Arc::clone(&stop);
                let answered = Arc::clone(&answered);
                move || {
                    let mut results = Vec::new();
                    // Bounded: at most 10 minutes' worth, whatever happens to the test.
                    while !stop.load(Ordering::Relaxed) && results.len() < 30_000 {
                        let result = tcp_request(sock(vip, 80), TIMEOUT)
                            .map(|answer| answer.server)
                            .map_err(|error| format!("{error:#}"));
                        if let (Ok(server), Ok(mut seen)) = (&result, answered.lock()) {
                            seen.insert(server.clone());
                        }
                        results.push(result);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    results
                }
            })
            .expect("a traffic thread in the client pod");
        Self {
            stop,
            answered,
            thread,
        }
    }

    /// Waits until each of `servers` has answered the flowing traffic, so a phase of the
    /// test never ends before the traffic has met the backends it is about.
    fn wait_answered(&self, lab: &ApiLab, servers: &[&str]) {
        lab.lab
            .wait_for("the traffic to reach every backend", DEADLINE, || {
                let seen = self
                    .answered
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?;
                Ok(servers.iter().all(|server| seen.contains(*server)))
            })
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// Stops and returns the servers that answered; panics on any failed connection.
    fn stop_without_failures(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        let results = self
            .thread
            .join()
            .expect("the traffic thread panicked")
            .expect("the traffic thread entered the pod");
        let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "{} of {} connections failed: {failures:?}",
            failures.len(),
            results.len()
        );
        results.into_iter().filter_map(Result::ok).collect()
    }
}

#[test]
fn services_are_created_scaled_drained_and_deleted_while_traffic_flows() {
    let lab = ApiLab::start();
    lab.apply_service("web", WEB_VIP, &json!({}));
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1")]);
    lab.wait_backends("the new service", WEB_VIP, &["web-0", "web-1"]);
    // The API server stamps last-change-trigger-time as the EndpointSlice controller
    // does, so network programming latency is measured through it.
    lab.lab
        .wait_for("network programming latency measured", DEADLINE, || {
            Ok(lab
                .lab
                .metric("kubeproxy_network_programming_duration_seconds_count")?
                .is_some_and(|count| count >= 1.0))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));

    let traffic = Traffic::start(&lab, WEB_VIP);
    traffic.wait_answered(&lab, &["web-0", "web-1"]);
    // Scale up.
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1"), ready("web-2")]);
    lab.wait_backends("web-2 to join", WEB_VIP, &["web-0", "web-1", "web-2"]);
    traffic.wait_answered(&lab, &["web-2"]);
    // Drain web-1: its pod is terminating but still serving; the others are ready, so
    // it gets no new connections.
    lab.apply_slice(
        "web",
        vec![
            ready("web-0"),
            endpoint("web-1", NODE, false, true, true),
            ready("web-2"),
        ],
    );
    lab.wait_backends("web-1 to drain", WEB_VIP, &["web-0", "web-2"]);
    // Its pod is gone.
    lab.apply_slice("web", vec![ready("web-0"), ready("web-2")]);
    lab.wait_backends("web-1 removed", WEB_VIP, &["web-0", "web-2"]);
    let answered = traffic.stop_without_failures();
    assert_eq!(
        answered,
        BTreeSet::from(["web-0".into(), "web-1".into(), "web-2".into()]),
        "every backend served the flowing traffic at some point"
    );

    // Scaled to zero: refused at once (the service exists, nothing serves it).
    lab.apply_slice("web", vec![]);
    lab.lab
        .wait_for("the empty service to refuse", DEADLINE, || {
            Ok(lab.connect_error(WEB_VIP, TIMEOUT) == Some(std::io::ErrorKind::ConnectionRefused))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    // Deleted: the ClusterIP is no frontend any more.
    lab.apply_slice("web", vec![ready("web-0")]);
    lab.wait_backends("the service back", WEB_VIP, &["web-0"]);
    lab.delete_service("web");
    lab.lab
        .wait_for("the deleted service to stop answering", DEADLINE, || {
            Ok(lab
                .connect_error(WEB_VIP, Duration::from_millis(300))
                .is_some_and(|kind| kind != std::io::ErrorKind::ConnectionRefused))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    lab.assert_healthy();
}

#[test]
fn a_broken_watch_flushes_nothing_and_changes_made_meanwhile_arrive() {
    let lab = ApiLab::start();
    lab.apply_service("web", WEB_VIP, &json!({}));
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1"), ready("web-2")]);
    lab.wait_backends("the service", WEB_VIP, &["web-0", "web-1", "web-2"]);
    let traffic = Traffic::start(&lab, WEB_VIP);

    // The API goes away: watches broken mid-stream, reconnects refused.
    lab.cut_off();
    lab.lab
        .wait_for("every watch to be dropped", DEADLINE, || {
            Ok(lab.server.watchers() == 0)
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    // Changes the agent cannot see yet.
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1")]);
    lab.apply_service("db", DB_VIP, &json!({}));
    lab.apply_slice("db", vec![ready("web-2")]);
    // Nothing was flushed: the datapath still serves what it had.
    assert_eq!(
        lab.backends(WEB_VIP, 30)
            .expect("traffic during the outage"),
        BTreeSet::from(["web-0".into(), "web-1".into(), "web-2".into()]),
    );
    lab.assert_healthy();

    // Back: the watchers reconnect (with backoff) and the changes arrive.
    lab.server.resume();
    lab.wait_backends("web-2 to leave", WEB_VIP, &["web-0", "web-1"]);
    lab.wait_backends("the service created meanwhile", DB_VIP, &["web-2"]);
    traffic.stop_without_failures();

    // A watch dropped without an outage resumes at once and misses nothing either.
    lab.server.drop_watches();
    lab.apply_slice("web", vec![ready("web-0")]);
    lab.wait_backends("the change after the drop", WEB_VIP, &["web-0"]);
    lab.assert_healthy();
}

#[test]
fn an_agent_restarted_while_the_api_is_down_keeps_the_datapath_until_it_has_listed() {
    let mut lab = ApiLab::start();
    lab.apply_service("web", WEB_VIP, &json!({}));
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1"), ready("web-2")]);
    lab.wait_backends("the service", WEB_VIP, &["web-0", "web-1", "web-2"]);
    let traffic = Traffic::start(&lab, WEB_VIP);

    // A crash (programs and maps stay pinned), and the API is down when the agent comes
    // back: it must not touch the datapath before its initial lists, because an empty
    // view would delete every frontend. (It loads and adopts the maps only once the
    // first snapshot says how large they must be; the pinned programs keep
    // translating with them meanwhile.)
    lab.lab.kill_agent().expect("kill the agent");
    // The log is appended to: count what the first agent wrote.
    let syncs_before = lab.lab.agent_log().matches(" synced ").count();
    let adoptions_before = lab.lab.agent_log().matches("adopting the maps").count();
    lab.server.pause(500);
    lab.lab.spawn_agent(&[]).expect("restart the agent");
    lab.wait_log("watch failed");
    assert_eq!(
        lab.lab.agent_log().matches(" synced ").count(),
        syncs_before,
        "no sync before the initial lists"
    );
    assert_eq!(
        lab.backends(WEB_VIP, 30)
            .expect("traffic while the agent cannot list"),
        BTreeSet::from(["web-0".into(), "web-1".into(), "web-2".into()]),
    );

    // The API is back: the agent lists, syncs (nothing to change) and is healthy.
    lab.server.resume();
    lab.lab
        .wait_healthy(DEADLINE)
        .unwrap_or_else(|error| panic!("{error:#}"));
    assert_eq!(
        lab.lab.agent_log().matches("adopting the maps").count(),
        adoptions_before + 1,
        "the restarted agent adopted the maps"
    );
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1")]);
    lab.wait_backends("a change after the restart", WEB_VIP, &["web-0", "web-1"]);
    traffic.stop_without_failures();
}

#[test]
fn a_relist_after_410_gone_applies_what_changed_meanwhile() {
    let lab = ApiLab::start();
    lab.apply_service("web", WEB_VIP, &json!({}));
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1")]);
    lab.apply_service("db", DB_VIP, &json!({}));
    lab.apply_slice("db", vec![ready("web-2")]);
    lab.wait_backends("web", WEB_VIP, &["web-0", "web-1"]);
    lab.wait_backends("db", DB_VIP, &["web-2"]);

    lab.cut_off();
    // Meanwhile: db deleted, web scaled down, and the history the agent would resume
    // from is compacted away, so its watches get 410 Gone and it must relist (a deletion
    // is then only visible as an object missing from the list).
    lab.delete_service("db");
    lab.apply_slice("web", vec![ready("web-1")]);
    lab.server.compact(false);
    let traffic = Traffic::start(&lab, WEB_VIP);
    lab.server.resume();

    lab.wait_backends("web scaled down", WEB_VIP, &["web-1"]);
    lab.lab
        .wait_for("db to stop answering", DEADLINE, || {
            Ok(lab
                .connect_error(DB_VIP, Duration::from_millis(300))
                .is_some_and(|kind| kind != std::io::ErrorKind::ConnectionRefused))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    lab.wait_log("too old resource version");
    traffic.stop_without_failures();
    lab.assert_healthy();
}

#[test]
fn session_affinity_holds_a_client_and_lets_go_after_the_timeout() {
    let lab = ApiLab::start();
    let timeout_seconds = 2;
    lab.apply_service(
        "web",
        WEB_VIP,
        &json!({
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout_seconds}},
        }),
    );
    lab.apply_slice("web", vec![ready("web-0"), ready("web-1"), ready("web-2")]);
    lab.lab
        .wait_for("the service to answer", DEADLINE, || {
            Ok(!lab.backends(WEB_VIP, 1)?.is_empty())
        })
        .unwrap_or_else(|error| panic!("{error:#}"));

    // One client, 100 connections: one backend.
    let sticky = lab.backends(WEB_VIP, 100).expect("100 connections");
    assert_eq!(sticky.len(), 1, "the client moved: {sticky:?}");
    let first = sticky.into_iter().next().expect("one backend");

    // Idle for longer than the timeout, the client is free again: a new connection
    // picks at random (1 in 3 it lands on the same backend; then try again).
    let idle = Duration::from_secs(timeout_seconds + 1);
    let mut moved_to = None;
    for _ in 0..12 {
        std::thread::sleep(idle);
        let now = lab
            .backends(WEB_VIP, 1)
            .expect("a connection after the timeout");
        if !now.contains(&first) {
            moved_to = now.into_iter().next();
            break;
        }
    }
    let second = moved_to.unwrap_or_else(|| {
        panic!("the client stayed on {first} after 12 idle periods longer than the timeout")
    });
    // ...and is held there again.
    let held = lab.backends(WEB_VIP, 100).expect("100 connections");
    assert_eq!(held, BTreeSet::from([second.clone()]));

    // Its backend goes away: the affinity is forgotten, the client sticks elsewhere.
    let remaining: Vec<Value> = BACKENDS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| *name != second)
        .map(ready)
        .collect();
    lab.apply_slice("web", remaining);
    lab.lab
        .wait_for("the client to leave the removed backend", DEADLINE, || {
            let now = lab.backends(WEB_VIP, 30)?;
            Ok(now.len() == 1 && !now.contains(&second))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let lab = ApiLab::start();
    lab.apply_service("web", WEB_VIP, &json!({"internalTrafficPolicy": "Local"}));
    lab.apply_slice(
        "web",
        vec![
            endpoint("web-0", OTHER_NODE, true, true, false),
            endpoint("web-1", OTHER_NODE, true, true, false),
            ready("web-2"),
        ],
    );
    lab.wait_backends("only the local endpoint", WEB_VIP, &["web-2"]);

    // No local endpoint left, endpoints elsewhere: dropped (not refused), as
    // kube-proxy does.
    lab.apply_slice(
        "web",
        vec![
            endpoint("web-0", OTHER_NODE, true, true, false),
            endpoint("web-1", OTHER_NODE, true, true, false),
        ],
    );
    lab.lab
        .wait_for("the service to drop", DEADLINE, || {
            Ok(lab.connect_error(WEB_VIP, Duration::from_millis(500))
                == Some(std::io::ErrorKind::TimedOut))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));

    // Cluster policy: the other node's endpoints serve.
    lab.apply_service("web", WEB_VIP, &json!({"internalTrafficPolicy": "Cluster"}));
    lab.wait_backends("every endpoint", WEB_VIP, &["web-0", "web-1"]);
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let lab = ApiLab::start();
    lab.apply_service("web", WEB_VIP, &json!({}));
    lab.apply_slice(
        "web",
        vec![ready("web-0"), endpoint("web-1", NODE, false, true, true)],
    );
    lab.wait_backends("the ready endpoint only", WEB_VIP, &["web-0"]);

    // web-0 shuts down (no longer serving); web-1 is terminating but still serving:
    // the fallback (KEP-1669) keeps the service up on web-1.
    lab.apply_slice(
        "web",
        vec![
            endpoint("web-0", NODE, false, false, true),
            endpoint("web-1", NODE, false, true, true),
        ],
    );
    lab.wait_backends("the serving, terminating endpoint", WEB_VIP, &["web-1"]);

    // Nothing serving at all: refused.
    lab.apply_slice(
        "web",
        vec![
            endpoint("web-0", NODE, false, false, true),
            endpoint("web-1", NODE, false, false, true),
        ],
    );
    lab.lab
        .wait_for("the service to refuse", DEADLINE, || {
            Ok(lab.connect_error(WEB_VIP, TIMEOUT) == Some(std::io::ErrorKind::ConnectionRefused))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
}
