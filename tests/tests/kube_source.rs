//! The agent following a Kubernetes API server (the test API server of
//! `kpr_lab::apiserver`, in the node namespace) through its real kube-rs client, while
//! traffic flows through the lab.
use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kpr_lab::{
    apiserver::{TestApiServer, TestApiServerHandle},
    lab::Lab,
    scenario::sock,
    traffic::tcp_request,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(15);

const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
";

const SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.12], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.13], conditions: {ready: true}, nodeName: node-a}
";

/// A runtime whose worker threads live in the node namespace: everything spawned on
/// it (the API server, the test's client) opens its sockets there.
struct NodeRuntime {
    runtime: tokio::runtime::Runtime,
}

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
            .expect("runtime in the node namespace");
        Self { runtime }
    }

    fn run<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        self.runtime
            .block_on(self.runtime.spawn(future))
            .expect("task")
    }
}

/// The set of backends answering `count` new connections from the client pod.
fn backends(lab: &Lab, count: usize) -> Result<Vec<String>> {
    lab.pod("client").netns.run(|| {
        let mut servers: Vec<String> = (0..count)
            .map(|_| tcp_request(sock(VIP, 80), TIMEOUT).map(|a| a.server))
            .collect::<Result<_>>()?;
        servers.sort();
        servers.dedup();
        Ok(servers)
    })
}

fn client_for(server: &TestApiServerHandle, node: &NodeRuntime) -> Client {
    let url = server.url();
    node.run(async move {
        let config = kube::Config::new(url.parse().expect("url"));
        Client::try_from(config).expect("client")
    })
}

#[test]
fn services_follow_the_api_through_disconnects_and_relists() {
    let mut lab = Lab::new().expect("lab");
    lab.add_pod("client", Ipv4Addr::new(10, 244, 1, 2))
        .expect("client");
    for (name, last) in [("web-0", 11), ("web-1", 12), ("web-2", 13)] {
        lab.add_pod(name, Ipv4Addr::new(10, 244, 1, last))
            .expect("pod");
        lab.serve(name, 8080).expect("serve");
    }
    let node = NodeRuntime::new(&lab);
    let server = node
        .run(TestApiServer::start(SocketAddr::from((
            [127, 0, 0, 1],
            6443,
        ))))
        .expect("API server");
    let kubeconfig = lab.run_dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = client_for(&server, &node);
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "demo");

    lab.use_api_source(&kubeconfig, 100);
    lab.start_agent(&[]).expect("agent");
    lab.wait_attached().expect("attached");

    // Created: the service answers from every backend.
    let (svc, slice) = (
        serde_yaml::from_str::<Service>(SERVICE).expect("svc"),
        serde_yaml::from_str::<EndpointSlice>(SLICE).expect("slice"),
    );
    {
        let (services, slices) = (services.clone(), slices.clone());
        node.run(async move {
            services.create(&PostParams::default(), &svc).await?;
            slices.create(&PostParams::default(), &slice).await
        })
        .expect("create");
    }
    lab.wait_for(
        "the service to answer from its 3 backends",
        DEADLINE,
        || Ok(backends(&lab, 30)? == ["web-0", "web-1", "web-2"]),
    )
    .expect("created");

    // The API goes away: nothing is flushed, traffic keeps its backends.
    server.pause(503);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        backends(&lab, 30).expect("traffic while the API is down"),
        ["web-0", "web-1", "web-2"]
    );
    server.resume();

    // Watches drop; a change made right then arrives once the watcher reconnects.
    server.drop_watches();
    let drain = serde_json::json!({"endpoints": [
        {"addresses": ["10.244.1.11"], "conditions": {"ready": true}},
        {"addresses": ["10.244.1.12"], "conditions": {"ready": true}},
    ]});
    {
        let slices = slices.clone();
        node.run(async move {
            slices
                .patch("web-1", &PatchParams::default(), &Patch::Merge(drain))
                .await
        })
        .expect("scale down");
    }
    lab.wait_for("web-2 to leave after the reconnect", DEADLINE, || {
        Ok(backends(&lab, 30)? == ["web-0", "web-1"])
    })
    .expect("scaled down");

    // History compacted and watches dropped: the watcher relists (410 Gone) and a
    // deletion made meanwhile still arrives.
    server.compact(true);
    {
        let services = services.clone();
        node.run(async move { services.delete("web", &DeleteParams::default()).await })
            .expect("delete");
    }
    lab.wait_for("the deleted service to stop answering", DEADLINE, || {
        lab.pod("client")
            .netns
            .run(|| Ok(tcp_request(sock(VIP, 80), Duration::from_millis(300)).is_err()))
    })
    .expect("deleted");

    let log = lab.agent_log();
    assert!(
        log.contains("keeping the last known state"),
        "the outage was noticed:\n{log}"
    );
    lab.stop_agent().expect("stop");
    node.run(server.shutdown());
}
