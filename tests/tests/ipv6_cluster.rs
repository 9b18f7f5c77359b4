//! IPv6 across two nodes: the two-node cluster of `external.rs` made dual stack
//! ([`Cluster::enable_ipv6`]), with IPv6 SingleStack Services whose backends run on
//! both nodes. An outside client reaches IPv6 NodePorts, LoadBalancer and external
//! IPs; externalTrafficPolicy Cluster masquerades to the remote backend (to the node's
//! IPv6 address, the reply coming back through the node and redirected to the client),
//! Local keeps the client's address and the healthCheckNodePorts say which node has
//! the endpoint, over IPv6; loadBalancerSourceRanges of IPv6 drop other clients; a pod
//! reaches a backend on the other node through an IPv6 ClusterIP. Real sockets, one
//! agent per node namespace, the TC path (no cgroup is hooked).
//!
//! Every scenario runs twice: on the dual-stack cluster and on an IPv6-only one
//! ([`Cluster::new_ipv6_only`]): nodes, pods, underlay and client with no IPv4 at all,
//! the agents given no `--node-ip` and only the IPv6 cluster CIDR, each finding its
//! node address from its IPv6 default route.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use kpr_lab::{
    cluster::{Cluster, CLIENT_IPS_V6, NODE_IPS_V6},
    lab::{http_get, ipv4_state},
    netns::Netns,
    socket_lab::plain_log,
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

/// The two clusters every scenario runs on.
#[derive(Clone, Copy, Debug)]
enum Stack {
    /// [`Cluster::new`] made dual stack; IPv6 SingleStack Services.
    Dual,
    /// [`Cluster::new_ipv6_only`]: no IPv4 anywhere.
    Ipv6Only,
}

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
/// the client's first IPv6 address only. The LoadBalancers serve TCP 80 and UDP 53.
fn manifests() -> Vec<(&'static str, String)> {
    let both = [(WEB_A, "node-a"), (WEB_B, "node-b")];
    let http_dns =
        "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 8080}]";
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
        slice("web6", http_dns, &both),
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
  - {{name: dns, protocol: UDP, port: 53, targetPort: 8080, nodePort: 30054}}
status:
  loadBalancer: {{ingress: [{{ip: '{LOCAL_LB}'}}]}}
"
            ),
        ),
        slice("local6", http_dns, &[(WEB_B, "node-b")]),
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
  - {{name: dns, protocol: UDP, port: 53, targetPort: 8080, nodePort: 30055}}
status:
  loadBalancer: {{ingress: [{{ip: '{RANGED_LB}'}}]}}
",
                CLIENT_IPS_V6[0]
            ),
        ),
        slice("ranged6", http_dns, &both),
    ]
    .join("---\n");
    vec![
        ("web6.yaml", web),
        ("local6.yaml", local),
        ("ranged6.yaml", ranged),
    ]
}

/// The cluster of `stack` with one web pod on each node serving TCP and UDP on IPv6,
/// a client pod on node-a, the manifests, and the agents running with the cluster
/// CIDR of that stack. An IPv6-only cluster is checked to have no IPv4 anywhere and
/// its agents to have found their node's IPv6 address by themselves.
fn cluster(stack: Stack) -> Cluster {
    let mut cluster = match stack {
        Stack::Dual => {
            let mut cluster = Cluster::new().expect("cluster");
            cluster.enable_ipv6().expect("IPv6 on the cluster");
            for (node, name, v4, ip) in
                [(0, "web-a", WEB_A_V4, WEB_A), (1, "web-b", WEB_B_V4, WEB_B)]
            {
                cluster.nodes[node]
                    .add_dual_pod(name, v4, Some(ip))
                    .expect("pod");
            }
            cluster.nodes[0]
                .add_dual_pod("client", CLIENT_POD_V4, Some(CLIENT_POD))
                .expect("client pod");
            cluster
        }
        Stack::Ipv6Only => {
            let mut cluster = Cluster::new_ipv6_only().expect("IPv6-only cluster");
            for (node, name, ip) in [(0, "web-a", WEB_A), (1, "web-b", WEB_B)] {
                cluster.nodes[node].add_ipv6_pod(name, ip).expect("pod");
            }
            cluster.nodes[0]
                .add_ipv6_pod("client", CLIENT_POD)
                .expect("client pod");
            cluster
        }
    };
    for (node, name) in [(0, "web-a"), (1, "web-b")] {
        cluster.nodes[node].serve_v6(name, 8080).expect("serve");
    }
    for (file, yaml) in manifests() {
        cluster.write_manifest(file, &yaml).expect("manifest");
    }
    match stack {
        Stack::Dual => cluster
            .start_agents(&["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"])
            .expect("agents"),
        Stack::Ipv6Only => {
            assert_no_ipv4(&cluster);
            // No --node-ip: each agent takes its node's address from the IPv6 default
            // route's interface, and its health server stays on the default address.
            cluster
                .start_agents(&["--cluster-cidr", "fd00:10:244::/56"])
                .expect("agents");
            for (lab, node_ip) in cluster.nodes.iter().zip(NODE_IPS_V6) {
                let log = plain_log(lab);
                assert!(
                    log.contains(&format!("snat_addr_v6=Some({node_ip})")),
                    "{} did not find its IPv6 address {node_ip}: {log}",
                    lab.node_name
                );
            }
        }
    }
    cluster
}

/// Every namespace of the cluster (client, underlay, nodes, pods) has no IPv4 address
/// or route besides its loopback.
fn assert_no_ipv4(cluster: &Cluster) {
    let mut namespaces: Vec<(String, &Netns)> = vec![
        ("client".into(), &cluster.client),
        ("underlay".into(), cluster.underlay()),
    ];
    for lab in &cluster.nodes {
        namespaces.push((lab.node_name.clone(), &lab.node));
        for pod in lab.pods().values() {
            namespaces.push((format!("{}/{}", lab.node_name, pod.name), &pod.netns));
        }
    }
    assert_eq!(namespaces.len(), 7, "client, underlay, 2 nodes, 3 pods");
    for (name, netns) in namespaces {
        let ipv4 = ipv4_state(netns).expect("ip -4");
        assert!(ipv4.is_empty(), "{name} has IPv4: {ipv4:?}");
    }
}

/// One UDP request from a chosen IPv6 source address of the outside client: the
/// answer and the address it came from.
fn udp_from(
    source: Ipv6Addr,
    dst: SocketAddrV6,
    timeout: Duration,
) -> Result<(Answer, SocketAddr)> {
    let socket = std::net::UdpSocket::bind(v6(source, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello\n", dst)?;
    let mut buf = [0u8; 1500];
    let (len, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {dst} to {source}"))?;
    Ok((Answer::parse(&String::from_utf8_lossy(&buf[..len]))?, from))
}

/// Routes the LoadBalancer IP `lb` from the outside client via `node`, as a load
/// balancer that picked that node would send it.
fn route_lb_via(client: &Netns, lb: Ipv6Addr, node: usize) {
    client
        .ip(&[
            "-6",
            "route",
            "replace",
            &format!("{lb}/128"),
            "via",
            &NODE_IPS_V6[node].to_string(),
        ])
        .expect("route the LoadBalancer IP");
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
    node_ports_cluster_ip_and_external_ip(Stack::Dual);
}

#[test]
fn ipv6_only_node_ports_reach_local_and_remote_backends_with_the_right_source() {
    node_ports_cluster_ip_and_external_ip(Stack::Ipv6Only);
}

/// The IPv6 NodePort of either node, TCP and UDP: the local backend sees the client,
/// the remote one the node's address; the IPv6 externalIP; a pod to the other node's
/// backend through the IPv6 ClusterIP with its own address, and to node-b's NodePort.
fn node_ports_cluster_ip_and_external_ip(stack: Stack) {
    let cluster = cluster(stack);
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
        for (answer, from) in &replies {
            assert_eq!(
                *from,
                SocketAddr::from(v6(node_ip, 30053)),
                "UDP reply source"
            );
            // The same sources as TCP's: the client's own, or the node's.
            let expected = if answer.server == local {
                outside
            } else {
                IpAddr::V6(node_ip)
            };
            assert_eq!(
                answer.seen_client.ip(),
                expected,
                "UDP on node {node}: {answer:?}"
            );
        }
    }
    // The IPv6 externalIP, routed to node-a: translated like the ClusterIP, the UDP
    // answer coming from the externalIP.
    let answer = cluster
        .client
        .run(|| tcp_request(v6(EXTERNAL_IP, 80), TIMEOUT))
        .expect("IPv6 externalIP");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
    let (answer, from) = cluster
        .client
        .run(|| udp_request(v6(EXTERNAL_IP, 53), TIMEOUT))
        .expect("IPv6 externalIP over UDP");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
    assert_eq!(
        from,
        SocketAddr::from(v6(EXTERNAL_IP, 53)),
        "UDP reply source"
    );
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
    // UDP likewise, answered from the ClusterIP.
    let replies = pod
        .run(|| {
            (0..30)
                .map(|_| udp_request(v6(WEB_VIP, 53), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("the pod to the IPv6 ClusterIP over UDP");
    assert!(
        replies.iter().any(|(answer, _)| answer.server == "web-b"),
        "UDP never chose node-b's backend: {replies:?}"
    );
    for (answer, from) in &replies {
        assert_eq!(
            answer.seen_client.ip(),
            IpAddr::V6(CLIENT_POD),
            "{answer:?}"
        );
        assert_eq!(*from, SocketAddr::from(v6(WEB_VIP, 53)), "UDP reply source");
    }
    // And the other node's IPv6 NodePort.
    let answer = pod
        .run(|| tcp_request(v6(NODE_IPS_V6[1], 30080), TIMEOUT))
        .expect("the pod to node-b's IPv6 NodePort");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
}

#[test]
fn ipv6_external_traffic_policy_local_keeps_the_source_and_health_checks_steer() {
    external_traffic_policy_local(Stack::Dual);
}

#[test]
fn ipv6_only_external_traffic_policy_local_keeps_the_source_and_health_checks_steer() {
    external_traffic_policy_local(Stack::Ipv6Only);
}

/// eTP Local, on the NodePort and on the LoadBalancer IP, TCP and UDP: node-b (the
/// endpoint's) serves with the client's own address, node-a drops; the
/// healthCheckNodePorts answer 503 on node-a and 200 on node-b over IPv6.
fn external_traffic_policy_local(stack: Stack) {
    let cluster = cluster(stack);
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
    // The LoadBalancer IP, as a load balancer sends it to either node.
    route_lb_via(&cluster.client, LOCAL_LB, 1);
    let answer = cluster
        .client
        .run(|| tcp_request(v6(LOCAL_LB, 80), TIMEOUT))
        .expect("node-b serves the LoadBalancer IP");
    assert_eq!(
        (answer.server.as_str(), answer.seen_client.ip()),
        ("web-b", outside)
    );
    let (answer, from) = cluster
        .client
        .run(|| udp_request(v6(LOCAL_LB, 53), TIMEOUT))
        .expect("node-b serves the LoadBalancer IP over UDP");
    assert_eq!(
        (answer.server.as_str(), answer.seen_client.ip(), from),
        ("web-b", outside, SocketAddr::from(v6(LOCAL_LB, 53)))
    );
    route_lb_via(&cluster.client, LOCAL_LB, 0);
    let dropped = cluster
        .client
        .run(|| Ok(tcp_request(v6(LOCAL_LB, 80), DROP_WAIT)))
        .expect("run");
    assert!(
        dropped.is_err(),
        "node-a forwarded the eTP Local LoadBalancer IP: {dropped:?}"
    );
    let dropped = cluster
        .client
        .run(|| Ok(udp_request(v6(LOCAL_LB, 53), DROP_WAIT)))
        .expect("run");
    assert!(
        dropped.is_err(),
        "node-a forwarded the eTP Local LoadBalancer IP over UDP: {dropped:?}"
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
    source_ranges(Stack::Dual);
}

#[test]
fn an_ipv6_only_load_balancer_ip_admits_its_source_range_only() {
    source_ranges(Stack::Ipv6Only);
}

/// loadBalancerSourceRanges of one IPv6 client address: TCP and UDP from it are
/// served, from the client's other address dropped.
fn source_ranges(stack: Stack) {
    let cluster = cluster(stack);
    let allowed = cluster
        .client
        .run(|| tcp_from(CLIENT_IPS_V6[0], v6(RANGED_LB, 80), TIMEOUT))
        .expect("a client inside the range");
    assert!(["web-a", "web-b"].contains(&allowed.server.as_str()));
    let (allowed, from) = cluster
        .client
        .run(|| udp_from(CLIENT_IPS_V6[0], v6(RANGED_LB, 53), TIMEOUT))
        .expect("a client inside the range, over UDP");
    assert!(["web-a", "web-b"].contains(&allowed.server.as_str()));
    assert_eq!(
        from,
        SocketAddr::from(v6(RANGED_LB, 53)),
        "UDP reply source"
    );
    let refused = cluster
        .client
        .run(|| Ok(tcp_from(CLIENT_IPS_V6[1], v6(RANGED_LB, 80), DROP_WAIT)))
        .expect("run");
    assert!(
        refused.is_err(),
        "a client outside the range got through: {refused:?}"
    );
    let refused = cluster
        .client
        .run(|| Ok(udp_from(CLIENT_IPS_V6[1], v6(RANGED_LB, 53), DROP_WAIT)))
        .expect("run");
    assert!(
        refused.is_err(),
        "a client outside the range got through over UDP: {refused:?}"
    );
}
