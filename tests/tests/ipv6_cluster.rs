//! IPv6 across two nodes: the two-node cluster of `external.rs` made dual stack
//! ([`Cluster::enable_ipv6`]), with IPv6 SingleStack Services whose backends run on
//! both nodes. An outside client reaches IPv6 NodePorts, LoadBalancer and external
//! IPs; externalTrafficPolicy Cluster masquerades to the remote backend (to the node's
//! IPv6 address, the reply coming back through the node and redirected to the client),
//! Local keeps the client's address and the healthCheckNodePorts say which node has
//! the endpoint, over IPv6; loadBalancerSourceRanges of IPv6 drop other clients; a pod
//! reaches a backend on the other node through an IPv6 ClusterIP. Real sockets, one
//! agent per node namespace, the TC path (no cgroup is hooked).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use kpr_lab::{
    cluster::{Cluster, CLIENT_IPS_V6, NODE_IPS_V6},
    lab::http_get,
    traffic::{tcp_request, udp_request, Answer, Conversation},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// What a dropped connection attempt waits for before the test calls it dropped.
const DROP_WAIT: Duration = Duration::from_millis(700);

const WEB_A_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 1, 11);
const WEB_B_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 2, 11);
const WEB_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11);
const WEB_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x11);
const CLIENT_POD_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 1, 2);
const CLIENT_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
const WEB_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const EXTERNAL_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x30);
const LOCAL_LB: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x20);
const RANGED_LB: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x40);
const HEALTH_CHECK_PORT: u16 = 32_000;

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// An IPv6 EndpointSlice of `service` with `addresses` on their nodes.
fn slice(service: &str, ports: &str, endpoints: &[(Ipv6Addr, &str)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, node)| {
            format!(
                "  - addresses: ['{ip}']\n    nodeName: {node}\n    conditions: {{ready: true}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-v6
  namespace: demo
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv6
ports: {ports}
endpoints:
{endpoints}"
    )
}

/// An IPv6 SingleStack Service; `spec` holds the lines after `ipFamilies`.
fn service(name: &str, cluster_ip: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  clusterIP: '{cluster_ip}'
  clusterIPs: ['{cluster_ip}']
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
{spec}"
    )
}

/// `web6`: NodePort TCP 30080 and UDP 30053, an IPv6 externalIP, Cluster policy,
/// endpoints on both nodes. `local6`: LoadBalancer, externalTrafficPolicy Local, its
/// endpoint on node-b only, healthCheckNodePort 32000. `ranged6`: LoadBalancer open to
/// the client's first IPv6 address only.
fn manifests() -> Vec<(&'static str, String)> {
    let both = [(WEB_A, "node-a"), (WEB_B, "node-b")];
    let http = "[{name: http, protocol: TCP, port: 8080}]";
    let web = [
        service(
            "web6",
            &WEB_VIP.to_string(),
            &format!(
                "  type: NodePort
  externalIPs: ['{EXTERNAL_IP}']
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 8080, nodePort: 30053}}
"
            ),
        ),
        slice(
            "web6",
            "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 8080}]",
            &both,
        ),
    ]
    .join("---\n");
    let local = [
        service(
            "local6",
            "fd00:96::20",
            &format!(
                "  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_CHECK_PORT}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}
status:
  loadBalancer: {{ingress: [{{ip: '{LOCAL_LB}'}}]}}
"
            ),
        ),
        slice("local6", http, &[(WEB_B, "node-b")]),
    ]
    .join("---\n");
    let ranged = [
        service(
            "ranged6",
            "fd00:96::40",
            &format!(
                "  type: LoadBalancer
  loadBalancerSourceRanges: ['{}/128']
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30082}}
status:
  loadBalancer: {{ingress: [{{ip: '{RANGED_LB}'}}]}}
",
                CLIENT_IPS_V6[0]
            ),
        ),
        slice("ranged6", http, &both),
    ]
    .join("---\n");
    vec![
        ("web6.yaml", web),
        ("local6.yaml", local),
        ("ranged6.yaml", ranged),
    ]
}

/// Both nodes dual stack with one web pod each serving TCP and UDP on IPv6, a client
/// pod on node-a, the agents running with the dual-stack cluster CIDR.
fn cluster() -> Cluster {
    let mut cluster = Cluster::new().expect("cluster");
    cluster.enable_ipv6().expect("IPv6 on the cluster");
    for (node, name, v4, ip) in [(0, "web-a", WEB_A_V4, WEB_A), (1, "web-b", WEB_B_V4, WEB_B)] {
        let lab = &mut cluster.nodes[node];
        lab.add_dual_pod(name, v4, Some(ip)).expect("pod");
        lab.serve_v6(name, 8080).expect("serve");
    }
    cluster.nodes[0]
        .add_dual_pod("client", CLIENT_POD_V4, Some(CLIENT_POD))
        .expect("client pod");
    for (file, yaml) in manifests() {
        cluster.write_manifest(file, &yaml).expect("manifest");
    }
    cluster
        .start_agents(&["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"])
        .expect("agents");
    cluster
}

/// A TCP request from a chosen IPv6 source address of the outside client.
fn tcp_from(source: Ipv6Addr, dst: SocketAddrV6, timeout: Duration) -> Result<Answer> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(v6(source, 0)).into())?;
    socket
        .connect_timeout(&SocketAddr::from(dst).into(), timeout)
        .with_context(|| format!("connecting from {source} to {dst}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    Conversation::from_stream(stream).ask()
}

#[test]
fn ipv6_node_ports_reach_local_and_remote_backends_with_the_right_source() {
    let cluster = cluster();
    let outside = IpAddr::V6(CLIENT_IPS_V6[0]);
    for (node, node_ip) in NODE_IPS_V6.into_iter().enumerate() {
        let answers = cluster
            .client
            .run(|| {
                (0..40)
                    .map(|_| tcp_request(v6(node_ip, 30080), TIMEOUT))
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap_or_else(|error| panic!("TCP NodePort on node {node}: {error:#}"));
        let mut seen: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for answer in &answers {
            seen.entry(answer.server.clone())
                .or_default()
                .insert(answer.seen_client.ip());
        }
        eprintln!("node {node} IPv6 NodePort: backends and the sources they saw: {seen:?}");
        let (local, remote) = if node == 0 {
            ("web-a", "web-b")
        } else {
            ("web-b", "web-a")
        };
        // The local backend sees the real client; the remote one the node's IPv6
        // address (masqueraded, so its reply comes back through this node).
        assert_eq!(
            seen.get(local),
            Some(&BTreeSet::from([outside])),
            "{seen:?}"
        );
        assert_eq!(
            seen.get(remote),
            Some(&BTreeSet::from([IpAddr::V6(node_ip)])),
            "{seen:?}"
        );
        let replies = cluster
            .client
            .run(|| {
                (0..30)
                    .map(|_| udp_request(v6(node_ip, 30053), TIMEOUT))
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap_or_else(|error| panic!("UDP NodePort on node {node}: {error:#}"));
        let servers: BTreeSet<&str> = replies.iter().map(|(a, _)| a.server.as_str()).collect();
        assert_eq!(servers, BTreeSet::from(["web-a", "web-b"]));
        for (_, from) in &replies {
            assert_eq!(
                *from,
                SocketAddr::from(v6(node_ip, 30053)),
                "UDP reply source"
            );
        }
    }
    // The IPv6 externalIP, routed to node-a: translated like the ClusterIP.
    let answer = cluster
        .client
        .run(|| tcp_request(v6(EXTERNAL_IP, 80), TIMEOUT))
        .expect("IPv6 externalIP");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
    // A pod on node-a reaches the backend on node-b through the IPv6 ClusterIP,
    // which sees the pod's own address (no masquerade inside the cluster).
    let pod = &cluster.nodes[0].pod("client").netns;
    let answers = pod
        .run(|| {
            (0..30)
                .map(|_| tcp_request(v6(WEB_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("the pod to the IPv6 ClusterIP");
    let remote: Vec<&Answer> = answers.iter().filter(|a| a.server == "web-b").collect();
    assert!(
        !remote.is_empty(),
        "never chose node-b's backend: {answers:?}"
    );
    for answer in answers {
        assert_eq!(
            answer.seen_client.ip(),
            IpAddr::V6(CLIENT_POD),
            "{answer:?}"
        );
    }
    // And the other node's IPv6 NodePort.
    let answer = pod
        .run(|| tcp_request(v6(NODE_IPS_V6[1], 30080), TIMEOUT))
        .expect("the pod to node-b's IPv6 NodePort");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
}

#[test]
fn ipv6_external_traffic_policy_local_keeps_the_source_and_health_checks_steer() {
    let cluster = cluster();
    let outside = IpAddr::V6(CLIENT_IPS_V6[0]);
    // node-b has the endpoint: served, and the backend sees the real client.
    let answer = cluster
        .client
        .run(|| tcp_request(v6(NODE_IPS_V6[1], 30081), TIMEOUT))
        .expect("node-b serves its local endpoint");
    assert_eq!(
        (answer.server.as_str(), answer.seen_client.ip()),
        ("web-b", outside)
    );
    // node-a has none: dropped, never forwarded elsewhere.
    let dropped = cluster
        .client
        .run(|| Ok(tcp_request(v6(NODE_IPS_V6[0], 30081), DROP_WAIT)))
        .expect("run");
    assert!(
        dropped.is_err(),
        "node-a forwarded an eTP Local flow: {dropped:?}"
    );
    // The health check ports say so over IPv6, as a load balancer would ask them.
    let health = |node: usize| {
        cluster
            .client
            .run(|| http_get(v6(NODE_IPS_V6[node], HEALTH_CHECK_PORT), "/healthz"))
            .expect("health check port answers over IPv6")
    };
    let ((code_a, body_a), (code_b, body_b)) = (health(0), health(1));
    assert_eq!((code_a, code_b), (503, 200), "{body_a} / {body_b}");
    assert!(body_b.contains("\"localEndpoints\": 1"), "{body_b}");
}

#[test]
fn an_ipv6_load_balancer_ip_admits_its_source_range_only() {
    let cluster = cluster();
    let allowed = cluster
        .client
        .run(|| tcp_from(CLIENT_IPS_V6[0], v6(RANGED_LB, 80), TIMEOUT))
        .expect("a client inside the range");
    assert!(["web-a", "web-b"].contains(&allowed.server.as_str()));
    let refused = cluster
        .client
        .run(|| Ok(tcp_from(CLIENT_IPS_V6[1], v6(RANGED_LB, 80), DROP_WAIT)))
        .expect("run");
    assert!(
        refused.is_err(),
        "a client outside the range got through: {refused:?}"
    );
}
