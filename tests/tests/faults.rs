//! Faults that must never flush the datapath (issue 11, items 5 and 6), each against
//! the real agent in the lab: what kube-proxy does (keep its rules, repair drift,
//! expose little) is the expected result.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use kpr_lab::{
    lab::Lab,
    scenario::{examples_dir, lab_for_manifests, sock, CLIENT_IP},
    traffic::tcp_request,
};
use proxy_common::names;
use proxy_userspace::{
    agent::{self, AgentConfig},
    model::ModelSettings,
    source::{self, manifests::parse_documents, Snapshot, SourceConfig},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

/// A Service `name` on `vip:80` with one endpoint, web-0 (10.244.1.11:8080) of the
/// examples' pods.
fn one_endpoint_service(namespace: &str, name: &str, vip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {vip}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [10.244.1.11], conditions: {{ready: true}}}}]
"
    )
}

fn request_from(lab: &Lab, pod: &str, to: SocketAddrV4) -> anyhow::Result<String> {
    Ok(lab.pod(pod).netns.run(|| tcp_request(to, TIMEOUT))?.server)
}

fn service_map_entries(lab: &Lab) -> Option<f64> {
    lab.metric("kpr_map_entries{map=\"SVC_V4_V1\"}")
        .expect("metrics")
}

#[test]
fn a_removed_and_recreated_manifests_directory_changes_nothing_and_is_followed_again() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
    let entries = service_map_entries(&lab);
    assert!(entries.is_some_and(|n| n > 0.0), "{entries:?}");

    std::fs::remove_dir_all(lab.manifests_dir()).expect("remove the manifests directory");
    lab.wait_for("the failed read to be counted", WAIT, || {
        Ok(lab
            .metric("kpr_source_read_failures_total{reason=\"not_found\"}")?
            .is_some_and(|n| n >= 1.0))
    })
    .expect("a read failure, logged and counted");
    // kube-proxy's column: an unreadable source changes nothing.
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web still answers");
    assert_eq!(
        service_map_entries(&lab),
        entries,
        "the service map changed"
    );
    assert_eq!(lab.healthz().expect("healthz").0, 200);
    assert!(
        lab.agent_log()
            .contains("the manifests directory cannot be read"),
        "{}",
        lab.agent_log()
    );

    // Created again, with the same files and one more: followed again.
    std::fs::create_dir(lab.manifests_dir()).expect("create it again");
    lab.copy_manifests(&examples_dir()).expect("the same files");
    let extra = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 77), 80);
    lab.write_manifest(
        "extra.yaml",
        &one_endpoint_service("demo", "extra", *extra.ip()),
    )
    .expect("a new service");
    lab.wait_for("the new service to answer", WAIT, || {
        Ok(request_from(&lab, "client", extra).is_ok())
    })
    .expect("the recreated directory is followed");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
}

#[test]
fn when_the_source_ends_the_datapath_stays_and_the_agent_exits_with_an_error() {
    let mut lab = Lab::new().expect("lab");
    lab.add_pod("client", CLIENT_IP).expect("client pod");
    lab.add_pod("web-0", Ipv4Addr::new(10, 244, 1, 11))
        .expect("backend pod");
    lab.serve("web-0", 8080).expect("serve");
    let mut snapshot = Snapshot::for_node(Some(&lab.node_name));
    parse_documents(
        &one_endpoint_service("demo", "web", WEB_VIP),
        "test",
        &mut snapshot,
    );
    let config = AgentConfig {
        // Unused: the test is the source.
        source: SourceConfig::Manifests(lab.manifests_dir()),
        node_name: Some(lab.node_name.clone()),
        pin_dir: lab.pin_dir(),
        pod_interfaces: vec!["veth*".into()],
        node_interfaces: Some(Vec::new()),
        node_port_filters: Vec::new(),
        node_ip: None,
        cgroup_path: None,
        keep_state: false,
        conntrack_max: None,
        datapath: proxy_common::DatapathConfig::DEFAULT,
        conntrack_gc_interval: Duration::from_secs(10),
        model: ModelSettings::default(),
        healthz_bind_address: None,
        metrics_bind_address: None,
        health_check_addresses: Vec::new(),
    };
    let (snapshots, receiver) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let mut receiver = receiver;
    receiver.mark_unchanged();
    // The agent in this process, on a thread of the node's namespace.
    let agent = lab
        .node
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(agent::run_on(
                config,
                source::Running::new(receiver),
                std::future::pending(),
            ))
        })
        .expect("agent thread");
    snapshots
        .send(Arc::new(snapshot))
        .expect("the agent receives");
    lab.wait_attached().expect("programs attached");
    lab.wait_for("web to answer", WAIT, || {
        Ok(request_from(&lab, "client", sock(WEB_VIP, 80)).is_ok())
    })
    .expect("web answers");

    drop(snapshots);
    let result = agent
        .join()
        .expect("agent thread")
        .expect("in the namespace");
    let error = result.expect_err("a source that ends is an error (a non-zero exit)");
    assert!(format!("{error:#}").contains("stopped"), "{error:#}");
    for map in [names::SERVICES_V4, names::BACKENDS_V4, names::CONNTRACK_V4] {
        assert!(lab.pin_dir().join(map).exists(), "{map} unpinned");
    }
    assert_eq!(
        request_from(&lab, "client", sock(WEB_VIP, 80)).expect("the datapath stays"),
        "web-0"
    );
}
