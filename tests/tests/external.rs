//! End to end across two nodes: an outside client reaches NodePorts, LoadBalancer and
//! external IPs; externalTrafficPolicy Cluster masquerades to remote backends and
//! Local keeps the client's address; health check ports steer load balancers;
//! loadBalancerSourceRanges drop other clients; a pod reaches itself through its
//! service (hairpin). Real sockets, real kernels, one agent per node namespace.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};
use kpr_lab::{
    cluster::{Cluster, CLIENT_IPS, NODE_IPS},
    lab::http_get,
    traffic::{tcp_request, Answer, Conversation},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// What a dropped connection attempt waits for before the test calls it dropped.
const DROP_WAIT: Duration = Duration::from_millis(700);

const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const LOCAL_LB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const RANGED_LB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);
const HEALTH_CHECK_PORT: u16 = 32_000;

fn endpoints(service: &str, ports: &str) -> String {
    format!(
        r"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-x
  namespace: demo
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: {ports}
endpoints:
  - addresses: [{WEB_A}]
    nodeName: node-a
    conditions: {{ready: true}}
  - addresses: [{WEB_B}]
    nodeName: node-b
    conditions: {{ready: true}}
"
    )
}

/// `web`: NodePort TCP 30080 and UDP 30053, externalIP 198.51.100.30, Cluster policy.
/// `local`: LoadBalancer 198.51.100.20, externalTrafficPolicy Local, endpoint on
/// node-b only, healthCheckNodePort 32000. `ranged`: LoadBalancer 198.51.100.40 open
/// to the first client address only.
fn manifests() -> Vec<(&'static str, String)> {
    let web = format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [{EXTERNAL_IP}]
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}
---
{}",
        endpoints(
            "web",
            "[{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 5353}]"
        )
    );
    let local = format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: local, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_CHECK_PORT}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}
status:
  loadBalancer: {{ingress: [{{ip: {LOCAL_LB}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-x
  namespace: demo
  labels: {{kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
  - addresses: [{WEB_B}]
    nodeName: node-b
    conditions: {{ready: true}}
"
    );
    let ranged = format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: ranged, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  loadBalancerSourceRanges: [{}/32]
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30082}}
status:
  loadBalancer: {{ingress: [{{ip: {RANGED_LB}}}]}}
---
{}",
        CLIENT_IPS[0],
        endpoints("ranged", "[{name: http, protocol: TCP, port: 8080}]")
    );
    vec![
        ("web.yaml", web),
        ("local.yaml", local),
        ("ranged.yaml", ranged),
    ]
}

/// Both nodes with one web pod each (TCP and UDP echo) and a client pod on node-a,
/// agents running.
fn cluster() -> Cluster {
    cluster_with(&[])
}

/// [`cluster`], the agents started with `extra_args` as well.
fn cluster_with(extra_args: &[&str]) -> Cluster {
    let mut cluster = Cluster::new().expect("cluster");
    for (node, name, ip) in [(0, "web-a", WEB_A), (1, "web-b", WEB_B)] {
        let lab = &mut cluster.nodes[node];
        lab.add_pod(name, ip).expect("pod");
        lab.serve(name, 8080).expect("serve http");
        lab.serve(name, 5353).expect("serve dns");
    }
    cluster.nodes[0]
        .add_pod("client", Ipv4Addr::new(10, 244, 1, 2))
        .expect("client pod");
    for (file, yaml) in manifests() {
        cluster.write_manifest(file, &yaml).expect("manifest");
    }
    let mut args = vec!["--cluster-cidr", "10.244.0.0/16"];
    args.extend_from_slice(extra_args);
    cluster.start_agents(&args).expect("agents");
    cluster
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A TCP request from a chosen source address of the outside client.
fn tcp_from(source: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> Result<Answer> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(sock(source, 0)).into())?;
    socket
        .connect_timeout(&SocketAddr::from(dst).into(), timeout)
        .with_context(|| format!("connecting from {source} to {dst}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    let mut conversation = Conversation::from_stream(stream);
    conversation.ask()
}

fn udp_request(dst: SocketAddrV4) -> Result<(Answer, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"hello\n", dst)?;
    let mut buf = [0u8; 1500];
    let (len, from) = socket.recv_from(&mut buf)?;
    Ok((Answer::parse(&String::from_utf8_lossy(&buf[..len]))?, from))
}

fn seen_ip(answer: &Answer) -> IpAddr {
    answer.seen_client.ip()
}

#[test]
fn outside_clients_reach_node_ports_local_and_remote_backends_with_the_right_source() {
    let cluster = cluster();
    let client = &cluster.client;
    let outside = IpAddr::V4(CLIENT_IPS[0]);
    for (node, node_ip) in NODE_IPS.into_iter().enumerate() {
        let answers = client
            .run(|| {
                (0..40)
                    .map(|_| tcp_request(sock(node_ip, 30080), TIMEOUT))
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap_or_else(|error| panic!("TCP NodePort on node {node}: {error:#}"));
        let mut seen: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for answer in &answers {
            seen.entry(answer.server.clone())
                .or_default()
                .insert(seen_ip(answer));
        }
        eprintln!("node {node} TCP NodePort: backends and the sources they saw: {seen:?}");
        let (local, remote) = if node == 0 {
            ("web-a", "web-b")
        } else {
            ("web-b", "web-a")
        };
        // The local backend sees the real client; the remote one the node's address
        // (masqueraded, so its reply comes back through this node).
        assert_eq!(
            seen.get(local),
            Some(&BTreeSet::from([outside])),
            "{seen:?}"
        );
        assert_eq!(
            seen.get(remote),
            Some(&BTreeSet::from([IpAddr::V4(node_ip)])),
            "{seen:?}"
        );

        let replies = client
            .run(|| {
                (0..30)
                    .map(|_| udp_request(sock(node_ip, 30053)))
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap_or_else(|error| panic!("UDP NodePort on node {node}: {error:#}"));
        let servers: BTreeSet<String> = replies.iter().map(|(a, _)| a.server.clone()).collect();
        assert_eq!(
            servers,
            BTreeSet::from(["web-a".to_owned(), "web-b".to_owned()])
        );
        for (_, from) in &replies {
            assert_eq!(
                *from,
                SocketAddr::from(sock(node_ip, 30053)),
                "UDP reply source"
            );
        }
    }
    // externalIP, through node-a: translated like the ClusterIP.
    let answer = client
        .run(|| tcp_request(sock(EXTERNAL_IP, 80), TIMEOUT))
        .expect("externalIP");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
    // A pod reaching the other node's NodePort.
    let pod = &cluster.nodes[0].pod("client").netns;
    let answer = pod
        .run(|| tcp_request(sock(NODE_IPS[1], 30080), TIMEOUT))
        .expect("pod to the other node's NodePort");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
    let answer = pod
        .run(|| tcp_request(sock(NODE_IPS[0], 30080), TIMEOUT))
        .expect("pod to its own node's NodePort");
    assert!(["web-a", "web-b"].contains(&answer.server.as_str()));
}

#[test]
fn masquerade_keeps_500_concurrent_flows_from_one_client_apart() {
    let cluster = cluster();
    let mut conversations = cluster
        .client
        .run(|| {
            (0..500)
                .map(|_| Conversation::open(sock(NODE_IPS[0], 30080), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("500 connections");
    let first: Vec<Answer> = conversations
        .iter_mut()
        .map(|c| c.ask().expect("first answer"))
        .collect();
    // Every flow still talks to the same backend with the same translated source.
    for (conversation, before) in conversations.iter_mut().zip(&first) {
        assert_eq!(&conversation.ask().expect("second answer"), before);
    }
    let masqueraded: Vec<SocketAddr> = first
        .iter()
        .filter(|answer| answer.server == "web-b")
        .map(|answer| answer.seen_client)
        .collect();
    let distinct: BTreeSet<SocketAddr> = masqueraded.iter().copied().collect();
    eprintln!(
        "{} of 500 flows masqueraded to the remote backend, {} distinct source ports",
        masqueraded.len(),
        distinct.len()
    );
    assert!(
        masqueraded.len() > 100,
        "too few remote flows to say anything"
    );
    assert_eq!(
        distinct.len(),
        masqueraded.len(),
        "two live flows share a SNAT port"
    );
    assert!(masqueraded
        .iter()
        .all(|seen| seen.ip() == IpAddr::V4(NODE_IPS[0]) && seen.port() >= 61_000));
}

#[test]
fn external_traffic_policy_local_keeps_the_source_and_health_checks_steer() {
    let mut cluster = cluster();
    let outside = IpAddr::V4(CLIENT_IPS[0]);
    // node-b has the endpoint: served, and the backend sees the real client.
    let answer = cluster
        .client
        .run(|| tcp_request(sock(NODE_IPS[1], 30081), TIMEOUT))
        .expect("node-b serves its local endpoint");
    assert_eq!(
        (answer.server.as_str(), seen_ip(&answer)),
        ("web-b", outside)
    );
    // node-a has none: dropped, never forwarded elsewhere.
    let dropped = cluster
        .client
        .run(|| Ok(tcp_request(sock(NODE_IPS[0], 30081), DROP_WAIT)))
        .expect("run");
    assert!(
        dropped.is_err(),
        "node-a forwarded an eTP Local flow: {dropped:?}"
    );
    // The health check ports say so, as a cloud load balancer would ask them.
    let health = |cluster: &Cluster, node: usize| {
        cluster
            .client
            .run(|| http_get(sock(NODE_IPS[node], HEALTH_CHECK_PORT), "/healthz"))
            .expect("health check port answers")
    };
    let (code_a, body_a) = health(&cluster, 0);
    let (code_b, body_b) = health(&cluster, 1);
    assert_eq!((code_a, code_b), (503, 200), "{body_a} / {body_b}");
    assert!(body_b.contains("\"localEndpoints\": 1"), "{body_b}");
    // The endpoint moves to node-a: both answers flip.
    let local = manifests()
        .into_iter()
        .find(|(file, _)| *file == "local.yaml")
        .map(|(_, yaml)| {
            yaml.replace(&format!("[{WEB_B}]"), &format!("[{WEB_A}]"))
                .replace("nodeName: node-b", "nodeName: node-a")
        })
        .expect("local.yaml");
    cluster.write_manifest("local.yaml", &local).expect("move");
    cluster.nodes[0]
        .wait_for(
            "node-a's health check to say 200",
            Duration::from_secs(10),
            || Ok(health(&cluster, 0).0 == 200),
        )
        .expect("node-a healthy");
    // Each node's agent reads the change on its own: node-b's may come a moment later.
    cluster.nodes[1]
        .wait_for(
            "node-b's health check to say 503",
            Duration::from_secs(10),
            || Ok(health(&cluster, 1).0 == 503),
        )
        .expect("node-b without local endpoints");
    // Traffic to the LoadBalancer IP (routed to node-a) now reaches web-a directly.
    let answer = cluster
        .client
        .run(|| tcp_request(sock(LOCAL_LB, 80), TIMEOUT))
        .expect("LoadBalancer IP");
    assert_eq!(
        (answer.server.as_str(), seen_ip(&answer)),
        ("web-a", outside)
    );
    drop(cluster.nodes.remove(1));
}

#[test]
fn load_balancer_source_ranges_drop_other_clients() {
    let cluster = cluster();
    let allowed = cluster
        .client
        .run(|| tcp_from(CLIENT_IPS[0], sock(RANGED_LB, 80), TIMEOUT))
        .expect("a client inside the range is served");
    assert!(["web-a", "web-b"].contains(&allowed.server.as_str()));
    let refused = cluster
        .client
        .run(|| Ok(tcp_from(CLIENT_IPS[1], sock(RANGED_LB, 80), DROP_WAIT)))
        .expect("run");
    assert!(
        refused.is_err(),
        "a client outside the range got through: {refused:?}"
    );
    // Counted in the datapath (metrics refresh every 2 s).
    cluster.nodes[0]
        .wait_for(
            "drop_source_range in the metrics",
            Duration::from_secs(10),
            || {
                Ok(cluster.nodes[0].metrics()?.lines().any(|line| {
                    line.starts_with("kpr_datapath_events_total{event=\"drop_source_range\"}")
                        && !line.ends_with(" 0")
                }))
            },
        )
        .expect("drop counted");
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let cluster = cluster();
    let web_a = &cluster.nodes[0].pod("web-a").netns;
    let answers = web_a
        .run(|| {
            (0..30)
                .map(|_| tcp_request(sock(Ipv4Addr::new(10, 96, 0, 10), 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("web-a to its own service");
    let to_itself: Vec<&Answer> = answers.iter().filter(|a| a.server == "web-a").collect();
    assert!(
        !to_itself.is_empty(),
        "never chose itself in 30 tries: {answers:?}"
    );
    for answer in to_itself {
        // Masqueraded to the node, so the reply left the pod and was translated back.
        assert_eq!(seen_ip(answer), IpAddr::V4(NODE_IPS[0]));
    }
}

/// `kpr inspect services --service <service> --json` of a node.
fn inspect(lab: &kpr_lab::lab::Lab, service: &str) -> Vec<serde_json::Value> {
    let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
        .args([
            "inspect",
            "services",
            "--json",
            "--service",
            service,
            "--bpffs",
        ])
        .arg(lab.pin_dir())
        .output()
        .expect("kpr inspect");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    json.as_array().expect("a list").clone()
}

#[test]
fn inspect_names_every_frontend_type_policy_and_backend() {
    let cluster = cluster();
    let node_a = &cluster.nodes[0];
    let web = inspect(node_a, "demo/web");
    let rows: Vec<(String, String, String, String)> = web
        .iter()
        .map(|row| {
            (
                row["service"].as_str().unwrap_or_default().to_owned(),
                row["type"].as_str().unwrap_or_default().to_owned(),
                row["frontend"].as_str().unwrap_or_default().to_owned(),
                row["protocol"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let row = |service: &str, kind: &str, frontend: String, protocol: &str| {
        (
            service.to_owned(),
            kind.to_owned(),
            frontend,
            protocol.to_owned(),
        )
    };
    // Sorted by port name (dns before http), then type, then address.
    assert_eq!(
        rows,
        [
            row("demo/web:dns", "ClusterIP", "10.96.0.10:53".into(), "UDP"),
            row(
                "demo/web:dns",
                "NodePort",
                format!("{}:30053", NODE_IPS[0]),
                "UDP"
            ),
            row(
                "demo/web:dns",
                "externalIP",
                format!("{EXTERNAL_IP}:53"),
                "UDP"
            ),
            row("demo/web:http", "ClusterIP", "10.96.0.10:80".into(), "TCP"),
            row(
                "demo/web:http",
                "NodePort",
                format!("{}:30080", NODE_IPS[0]),
                "TCP"
            ),
            row(
                "demo/web:http",
                "externalIP",
                format!("{EXTERNAL_IP}:80"),
                "TCP"
            ),
        ]
    );
    let node_port = &web[4];
    assert_eq!(
        node_port["policy"],
        serde_json::json!([
            "externalTrafficPolicy Cluster (masqueraded to endpoints on other nodes)"
        ])
    );
    assert_eq!(web[3]["policy"], serde_json::json!([]), "a ClusterIP");
    assert_eq!(
        node_port["backends"],
        serde_json::json!([
            {"address": format!("{WEB_A}:8080"), "pod": null, "node": "node-a", "ready": true, "serving": true, "terminating": false},
            {"address": format!("{WEB_B}:8080"), "pod": null, "node": "node-b", "ready": true, "serving": true, "terminating": false},
        ])
    );

    // externalTrafficPolicy Local on a node without the endpoint: the external
    // frontends drop, pods here get the in-cluster set.
    let local = inspect(node_a, "demo/local");
    let lb: Vec<&serde_json::Value> = local
        .iter()
        .filter(|row| row["type"] == "LoadBalancer")
        .collect();
    assert_eq!(lb.len(), 2, "{local:?}");
    assert_eq!(lb[0]["clients"], "all");
    assert_eq!(lb[0]["backends"], serde_json::json!([]));
    assert_eq!(lb[0]["when_empty"], "drop (endpoints only on other nodes)");
    assert_eq!(
        lb[0]["policy"],
        serde_json::json!(["externalTrafficPolicy Local (client address kept)"])
    );
    assert_eq!(lb[1]["clients"], "in-cluster");
    assert_eq!(
        lb[1]["backends"][0]["address"],
        format!("{WEB_B}:8080"),
        "{local:?}"
    );
    let ranged = inspect(node_a, "demo/ranged");
    assert!(
        ranged.iter().any(|row| row["type"] == "LoadBalancer"
            && row["policy"]
                .as_array()
                .is_some_and(|words| words.contains(&"loadBalancerSourceRanges".into()))),
        "{ranged:?}"
    );
}

/// kube-proxy's rule: with nodePortAddresses set, healthCheckNodePorts listen on those
/// addresses only (without it, on 0.0.0.0: `operations.rs` reaches one on 127.0.0.1).
#[test]
fn health_check_ports_listen_on_the_node_port_addresses() {
    let cluster = cluster_with(&["--node-port-addresses", "192.168.50.0/24"]);
    let (code, body) = cluster
        .client
        .run(|| http_get(sock(NODE_IPS[1], HEALTH_CHECK_PORT), "/healthz"))
        .expect("node-b's health check port answers on its node address");
    assert_eq!(code, 200, "{body}");
    let loopback = cluster.nodes[1]
        .node
        .run(|| {
            Ok(TcpStream::connect(sock(
                Ipv4Addr::LOCALHOST,
                HEALTH_CHECK_PORT,
            )))
        })
        .expect("run");
    assert!(
        matches!(&loopback, Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused),
        "127.0.0.1:{HEALTH_CHECK_PORT} is not a NodePort address: {loopback:?}"
    );
}

/// `kpr trace --from-outside --json` on `lab`'s node (run in its namespace).
fn trace_from_outside(
    lab: &kpr_lab::lab::Lab,
    client: SocketAddrV4,
    to: SocketAddrV4,
) -> serde_json::Value {
    let (client, to) = (client.to_string(), to.to_string());
    let output = lab
        .kpr(&[
            "trace",
            "--from-outside",
            "--json",
            "--client",
            &client,
            "--to",
            &to,
        ])
        .expect("kpr trace");
    serde_json::from_str(&output).expect("JSON")
}

fn has_stage(trace: &serde_json::Value, stage: &str) -> bool {
    trace["stages"]
        .as_array()
        .is_some_and(|stages| stages.iter().any(|s| s == stage))
}

/// Trace from outside agrees with what real outside clients get (the tests above):
/// NodePort to a local backend keeps the client, to a remote one masquerades; an
/// externalTrafficPolicy Local NodePort without a local endpoint drops; a client
/// outside loadBalancerSourceRanges is dropped, one inside served. No map changes.
#[test]
fn trace_from_outside_agrees_with_real_traffic() {
    let cluster = cluster();
    let node_a = &cluster.nodes[0];
    let inside = sock(CLIENT_IPS[0], 41_000);
    let outside_range = sock(CLIENT_IPS[1], 41_000);
    // Real traffic: eTP Local without a local endpoint is dropped, the range filters.
    let dropped = cluster
        .client
        .run(|| Ok(tcp_request(sock(NODE_IPS[0], 30081), DROP_WAIT)))
        .expect("run");
    assert!(dropped.is_err(), "{dropped:?}");
    let refused = cluster
        .client
        .run(|| Ok(tcp_from(CLIENT_IPS[1], sock(RANGED_LB, 80), DROP_WAIT)))
        .expect("run");
    assert!(refused.is_err(), "{refused:?}");

    let before = kpr_lab::lab::map_snapshot(&node_a.pin_dir());
    for _ in 0..10 {
        let trace = trace_from_outside(node_a, inside, sock(NODE_IPS[0], 30080));
        assert_eq!(trace["service"], "demo/web:http", "{trace}");
        assert!(
            trace["verdict"]
                .as_str()
                .is_some_and(|v| v.starts_with("translate")),
            "{trace}"
        );
        let backend = trace["backend"].as_str().unwrap_or_default();
        let masqueraded = has_stage(
            &trace,
            "masquerade: yes, the source becomes the node's address and an SNAT port",
        );
        if backend.starts_with(&WEB_A.to_string()) {
            assert!(!masqueraded, "a local backend keeps the client: {trace}");
            assert_eq!(
                trace["packet_out"],
                format!("{inside} -> {WEB_A}:8080 TCP"),
                "{trace}"
            );
        } else {
            assert!(backend.starts_with(&WEB_B.to_string()), "{trace}");
            assert!(masqueraded, "a remote backend is masqueraded: {trace}");
            assert!(
                trace["packet_out"]
                    .as_str()
                    .is_some_and(|out| out.starts_with(&format!("{}:", NODE_IPS[0]))
                        && out.ends_with(&format!("-> {WEB_B}:8080 TCP"))),
                "{trace}"
            );
        }
    }
    let local = trace_from_outside(node_a, inside, sock(NODE_IPS[0], 30081));
    assert_eq!(local["verdict"], "drop: drop_no_local_backend", "{local}");
    assert!(has_stage(
        &local,
        "backends: none on this node (Local policy, endpoints elsewhere)"
    ));
    let denied = trace_from_outside(node_a, outside_range, sock(RANGED_LB, 80));
    assert_eq!(denied["verdict"], "drop: drop_source_range", "{denied}");
    let allowed = trace_from_outside(node_a, inside, sock(RANGED_LB, 80));
    assert!(
        has_stage(
            &allowed,
            "source ranges: the client is inside loadBalancerSourceRanges"
        ) && allowed["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("translate")),
        "{allowed}"
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&local).unwrap_or_default()
    );
    let after = kpr_lab::lab::map_snapshot(&node_a.pin_dir());
    assert!(before == after, "trace changed a map");
}
