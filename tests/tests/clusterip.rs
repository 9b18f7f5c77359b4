//! End to end in the lab: real TCP and UDP sockets in pod namespaces, the agent as a
//! process in the node namespace reading the bundled example manifests, the datapath
//! attached to the pods' veths.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Result;
use kpr_lab::{
    scenario::{backend_pods, examples_dir, lab_for_manifests, sock, CLIENT_IP},
    traffic::{tcp_request, udp_request, Conversation},
};

const WEB_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 53);
const NOBODY_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 99);
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a manifest change may take to reach the datapath before a test gives up
/// (the agent's goal is well under a second; this only bounds a broken run).
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn tcp_connections_to_a_cluster_ip_spread_over_every_backend_and_keep_the_client_source() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let client = &lab.pod("client").netns;
    let answers = client
        .run(|| {
            (0..200)
                .map(|_| tcp_request(sock(WEB_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("200 connections to the ClusterIP");

    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        *per_backend.entry(answer.server.clone()).or_default() += 1;
        // The backend sees the client pod itself, not a node or service address.
        assert_eq!(
            answer.seen_client.ip(),
            std::net::IpAddr::V4(CLIENT_IP),
            "{} saw {}",
            answer.server,
            answer.seen_client
        );
    }
    eprintln!("connections per backend: {per_backend:?}");
    assert_eq!(
        per_backend.keys().cloned().collect::<Vec<_>>(),
        ["web-0", "web-1", "web-2"]
    );
    for (backend, count) in &per_backend {
        assert!(
            *count >= 30,
            "{backend} answered {count} of 200 (< 15%): {per_backend:?}"
        );
    }
}

#[test]
fn udp_requests_are_translated_both_ways() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let client = &lab.pod("client").netns;
    let replies = client
        .run(|| {
            (0..60)
                .map(|_| udp_request(sock(DNS_VIP, 53), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("UDP answers through the ClusterIP");
    let mut servers = BTreeMap::<String, usize>::new();
    for (answer, from) in &replies {
        // recv_from reports the packet's real source: the reply was reverse-translated.
        assert_eq!(*from, SocketAddr::from(sock(DNS_VIP, 53)));
        assert_eq!(answer.seen_client.ip(), std::net::IpAddr::V4(CLIENT_IP));
        *servers.entry(answer.server.clone()).or_default() += 1;
    }
    assert_eq!(
        servers.len(),
        3,
        "every backend answers some datagrams: {servers:?}"
    );
}

#[test]
fn a_service_without_endpoints_refuses_new_connections_at_once() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let error = lab
        .pod("client")
        .netns
        .run(|| Ok(tcp_request(sock(NOBODY_VIP, 80), Duration::from_secs(5))))
        .expect("run")
        .expect_err("nobody serves this service");
    assert!(
        is_refused(&error),
        "expected connection refused (ICMP port unreachable), got {error:#}"
    );
}

#[test]
fn a_removed_backend_gets_no_new_connections() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let web = std::fs::read_to_string(examples_dir().join("web.yaml")).expect("web.yaml");
    // Drop web-2's endpoint (the last three lines of its entry).
    let without_web2 = web
        .split("  - addresses: [10.244.1.13]")
        .next()
        .expect("web.yaml lists 10.244.1.13")
        .to_owned();
    lab.write_manifest("web.yaml", &without_web2)
        .expect("write");
    let client = &lab.pod("client").netns;
    let took = lab
        .wait_for("web-2 to leave the rotation", CHANGE_DEADLINE, || {
            client.run(|| {
                let servers = (0..30)
                    .map(|_| tcp_request(sock(WEB_VIP, 80), TIMEOUT).map(|a| a.server))
                    .collect::<Result<Vec<_>>>()?;
                Ok(!servers.iter().any(|server| server == "web-2"))
            })
        })
        .expect("web-2 removed");
    eprintln!("backend removal visible after {took:?}");
    let servers = client
        .run(|| {
            (0..100)
                .map(|_| tcp_request(sock(WEB_VIP, 80), TIMEOUT).map(|a| a.server))
                .collect::<Result<Vec<_>>>()
        })
        .expect("connections after the removal");
    assert!(
        !servers.iter().any(|server| server == "web-2"),
        "web-2 still chosen: {servers:?}"
    );
    assert!(
        servers.iter().any(|server| server == "web-0")
            && servers.iter().any(|server| server == "web-1")
    );
}

/// `yaml` without the endpoint entry of `ip` (its `- addresses:` line and the lines
/// under it).
fn without_endpoint(yaml: &str, ip: std::net::IpAddr) -> String {
    let entry = format!("  - addresses: [{ip}]");
    let mut out = String::new();
    let mut skipping = false;
    for line in yaml.lines() {
        if line.starts_with("  - addresses:") || !line.starts_with("    ") {
            skipping = line == entry;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_ne!(out.len(), yaml.len() + 1, "{ip} not found in the manifest");
    out
}

/// kube-proxy's rules when a backend leaves: UDP flows to it are flushed at once (a DNS
/// client reusing its socket must not blackhole until the UDP timeout), established TCP
/// connections keep their conntrack entry until they close (the backend may still be
/// draining them), and new connections of either protocol avoid it.
#[test]
fn a_removed_backends_udp_flows_move_at_once_while_its_tcp_connections_stay() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let client = &lab.pod("client").netns;
    // One UDP socket, connected: every datagram has the same 5-tuple, so without a
    // flush it would follow its conntrack entry to the removed backend for 120 s.
    let udp = client
        .run(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(sock(DNS_VIP, 53))?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            Ok(socket)
        })
        .expect("UDP socket");
    let ask_udp = || -> Result<String> {
        udp.send(b"hello\n")?;
        let mut buf = [0u8; 1500];
        let len = udp.recv(&mut buf)?;
        Ok(kpr_lab::traffic::Answer::parse(&String::from_utf8_lossy(&buf[..len]))?.server)
    };
    let udp_backend = ask_udp().expect("first datagram");
    for _ in 0..5 {
        assert_eq!(
            ask_udp().expect("datagram"),
            udp_backend,
            "a flow keeps its backend"
        );
    }
    let mut tcp = client
        .run(|| Conversation::open(sock(WEB_VIP, 80), TIMEOUT))
        .expect("TCP connection");
    let tcp_answer = tcp.ask().expect("first TCP answer");

    let ip_of = |name: &str| {
        backend_pods(&examples_dir())
            .expect("backend pods")
            .into_iter()
            .find(|pod| pod.name == name)
            .map(|pod| std::net::IpAddr::V4(pod.ip))
            .expect("a backend pod of that name")
    };
    let dns = std::fs::read_to_string(examples_dir().join("dns.yaml")).expect("dns.yaml");
    let web = std::fs::read_to_string(examples_dir().join("web.yaml")).expect("web.yaml");
    lab.write_manifest("dns.yaml", &without_endpoint(&dns, ip_of(&udp_backend)))
        .expect("write dns");
    lab.write_manifest(
        "web.yaml",
        &without_endpoint(&web, ip_of(&tcp_answer.server)),
    )
    .expect("write web");

    // The same UDP socket moves to another backend as soon as the change is applied
    // (the deadline, far below the 120 s UDP timeout, only bounds a broken run).
    let took = lab
        .wait_for(
            "the UDP flow to leave the removed backend",
            CHANGE_DEADLINE,
            || Ok(ask_udp().is_ok_and(|server| server != udp_backend)),
        )
        .expect("UDP flow moved");
    eprintln!("UDP flow moved {took:?} after the manifest change");
    let moved_to = ask_udp().expect("datagram after the move");
    assert_ne!(moved_to, udp_backend);
    for _ in 0..5 {
        assert_eq!(
            ask_udp().expect("datagram"),
            moved_to,
            "the new flow is stable"
        );
    }

    // New TCP connections avoid the removed backend...
    lab.wait_for("new TCP connections to avoid it", CHANGE_DEADLINE, || {
        client.run(|| {
            let servers = (0..20)
                .map(|_| tcp_request(sock(WEB_VIP, 80), TIMEOUT).map(|a| a.server))
                .collect::<Result<Vec<_>>>()?;
            Ok(!servers.contains(&tcp_answer.server))
        })
    })
    .expect("web backend removed");
    // ...while the established one still talks to it, with its original port.
    for _ in 0..5 {
        let again = tcp.ask().expect("the established connection survives");
        assert_eq!(again.server, tcp_answer.server);
        assert_eq!(again.seen_client, tcp_answer.seen_client);
    }
}

#[test]
fn a_deleted_service_stops_answering() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let client = &lab.pod("client").netns;
    client
        .run(|| tcp_request(sock(WEB_VIP, 80), TIMEOUT))
        .expect("answers before");
    lab.remove_manifest("web.yaml").expect("remove");
    lab.wait_for("the ClusterIP to stop answering", CHANGE_DEADLINE, || {
        client.run(|| Ok(tcp_request(sock(WEB_VIP, 80), Duration::from_millis(300)).is_err()))
    })
    .expect("web deleted");
    // The other service is untouched.
    client
        .run(|| udp_request(sock(DNS_VIP, 53), TIMEOUT))
        .expect("dns still answers");
}

#[test]
fn stopping_the_agent_detaches_everything_and_removes_its_pins() {
    let mut lab = lab_for_manifests(&examples_dir()).expect("lab");
    let before = lab.attached_programs().expect("query tcx");
    for pod in lab.pods().values() {
        for (direction, program) in [("ingress", "tc_pod_ingress"), ("egress", "tc_pod_egress")] {
            let wanted = (pod.host_interface.clone(), direction, program.to_owned());
            assert!(
                before.contains(&wanted),
                "{wanted:?} missing from {before:?}"
            );
        }
    }
    lab.stop_agent().expect("stop");
    lab.wait_detached_and_unpinned()
        .expect("nothing left attached or pinned");
    lab.pod("client")
        .netns
        .run(|| Ok(tcp_request(sock(WEB_VIP, 80), Duration::from_millis(500)).is_err()))
        .map(|failed| assert!(failed, "the ClusterIP still answers without the agent"))
        .expect("run");
}

#[test]
fn a_port_a_live_cluster_ip_does_not_declare_is_refused_at_once() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let client = &lab.pod("client").netns;
    // web.yaml declares TCP 80 only: TCP 81 and UDP 80 are undeclared.
    let tcp = client
        .run(|| Ok(tcp_request(sock(WEB_VIP, 81), Duration::from_secs(5))))
        .expect("run")
        .expect_err("no frontend declares port 81");
    assert!(
        is_refused(&tcp),
        "expected connection refused (ICMP port unreachable), got {tcp:#}"
    );
    let udp = client
        .run(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            socket.connect(sock(WEB_VIP, 80))?;
            socket.send(b"hello\n")?;
            let mut buffer = [0u8; 64];
            Ok(socket.recv(&mut buffer).map(|_| ()))
        })
        .expect("run")
        .expect_err("no frontend declares UDP 80");
    assert_eq!(
        udp.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "a connected UDP socket learns of the ICMP port unreachable: {udp}"
    );
    // The declared port is untouched.
    client
        .run(|| tcp_request(sock(WEB_VIP, 80), TIMEOUT))
        .expect("the declared port still answers");
}

fn is_refused(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// An unallocated address of the service CIDR, held by a host beyond the node's
/// uplink: without the drop, the node's default route would deliver the connection
/// there.
const UNALLOCATED_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 200);
const UPLINK_NODE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
const UPLINK_PEER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 2);

/// A namespace behind the node's default route (its uplink) answering on
/// [`UPLINK_PEER`] and [`UNALLOCATED_VIP`], port 80.
fn uplink_host(
    lab: &kpr_lab::lab::Lab,
) -> Result<(
    kpr_lab::netns::Netns,
    kpr_lab::traffic::EchoServer,
    kpr_lab::traffic::EchoServer,
)> {
    let peer = kpr_lab::netns::Netns::create(&format!("{}-up", lab.prefix))?;
    lab.node.add_veth("uplink0", &peer, "eth0")?;
    lab.node.ip(&[
        "addr",
        "add",
        &format!("{UPLINK_NODE}/24"),
        "dev",
        "uplink0",
    ])?;
    lab.node.ip(&["link", "set", "uplink0", "up"])?;
    lab.node
        .ip(&["route", "add", "default", "via", &UPLINK_PEER.to_string()])?;
    peer.ip(&["addr", "add", &format!("{UPLINK_PEER}/24"), "dev", "eth0"])?;
    peer.ip(&[
        "addr",
        "add",
        &format!("{UNALLOCATED_VIP}/32"),
        "dev",
        "eth0",
    ])?;
    peer.ip(&["link", "set", "eth0", "up"])?;
    peer.ip(&["link", "set", "lo", "up"])?;
    peer.ip(&["route", "add", "default", "via", &UPLINK_NODE.to_string()])?;
    let vip_server = kpr_lab::traffic::EchoServer::start(
        &peer,
        "beyond-the-uplink-vip",
        sock(UNALLOCATED_VIP, 80),
    )?;
    let server =
        kpr_lab::traffic::EchoServer::start(&peer, "beyond-the-uplink", sock(UPLINK_PEER, 80))?;
    Ok((peer, vip_server, server))
}

#[test]
fn an_unallocated_service_address_never_leaves_the_node_while_other_traffic_does() {
    let mut lab = kpr_lab::scenario::lab_without_agent(&examples_dir()).expect("lab");
    let (_peer, _vip_server, _server) = uplink_host(&lab).expect("uplink host");
    // Without the service CIDR the address is like any other: the node routes the
    // connection out of its uplink, to the host that holds it (today's behaviour).
    lab.start_agent(&[]).expect("agent");
    lab.wait_attached().expect("attached");
    let answer = lab
        .pod("client")
        .netns
        .run(|| tcp_request(sock(UNALLOCATED_VIP, 80), TIMEOUT))
        .expect("without --service-cidr the address is routed out");
    assert_eq!(answer.server, "beyond-the-uplink-vip");
    lab.stop_agent().expect("stop");

    lab.start_agent(&["--service-cidr", "10.96.0.0/12"])
        .expect("agent with --service-cidr");
    lab.wait_attached().expect("attached");
    let client_ns = &lab.pod("client").netns;
    let error = client_ns
        .run(|| Ok(tcp_request(sock(UNALLOCATED_VIP, 80), TIMEOUT)))
        .expect("run")
        .expect_err("the node drops traffic to an unallocated service address");
    assert!(!is_refused(&error), "dropped, not refused: {error:#}");
    let dropped = "kpr_datapath_events_total{event=\"drop_unallocated_service_ip\"}";
    lab.wait_for("the drop to be counted", CHANGE_DEADLINE, || {
        Ok(lab.metric(dropped)?.is_some_and(|count| count >= 1.0))
    })
    .expect("drop counted");
    // Everything else still flows: the uplink host, and the ClusterIPs.
    let answer = client_ns
        .run(|| tcp_request(sock(UPLINK_PEER, 80), TIMEOUT))
        .expect("a pod's traffic to other addresses leaves the node");
    assert_eq!(answer.server, "beyond-the-uplink");
    assert_eq!(answer.seen_client.ip(), std::net::IpAddr::V4(CLIENT_IP));
    client_ns
        .run(|| tcp_request(sock(WEB_VIP, 80), TIMEOUT))
        .expect("a ClusterIP still answers");
}

/// Two ClusterIPs whose only endpoint is web-0 (10.244.1.11:8080).
const WEB0_VIPS: [std::net::Ipv4Addr; 2] = [
    std::net::Ipv4Addr::new(10, 96, 0, 40),
    std::net::Ipv4Addr::new(10, 96, 0, 41),
];

/// A Service at `vip` port 80 with web-0 as its one endpoint.
fn web0_service(name: &str, vip: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  type: ClusterIP
  clusterIP: {vip}
  clusterIPs: [{vip}]
  ipFamilies: [IPv4]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
  - addresses: [10.244.1.11]
    conditions: {{ready: true}}
    nodeName: node-a
    targetRef: {{kind: Pod, namespace: demo, name: web-0}}
"
    )
}

/// A TCP socket bound to `local` with SO_REUSEADDR (so a second one can share the
/// port), connected to `dst`.
fn connect_from(local: SocketAddr, dst: SocketAddr) -> Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket.connect_timeout(&dst.into(), TIMEOUT)?;
    let stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Linux picks ephemeral ports per destination, so a client may use one port towards
/// two ClusterIPs at once; when both choose the same backend, the two flows are one
/// tuple once translated. netfilter remaps the second flow's source port; so does
/// kpr: both connections exchange data, the backend sees the second from another port,
/// and the client sees its own port on both. (On the old code the second connection's
/// SYN was dropped: its translated tuple was held.)
#[test]
fn one_client_port_reaches_two_cluster_ips_of_one_backend_at_once() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    for (index, vip) in WEB0_VIPS.iter().enumerate() {
        lab.write_manifest(
            &format!("web0-{index}.yaml"),
            &web0_service(&format!("web0-{index}"), *vip),
        )
        .expect("write manifest");
    }
    let client = &lab.pod("client").netns;
    lab.wait_for(
        "both ClusterIPs of web-0 to answer",
        CHANGE_DEADLINE,
        || {
            client.run(|| {
                Ok(WEB0_VIPS
                    .iter()
                    .all(|vip| tcp_request(sock(*vip, 80), Duration::from_millis(300)).is_ok()))
            })
        },
    )
    .expect("ClusterIPs programmed");

    let (mut first, mut second, port) = client
        .run(|| {
            let first = connect_from(
                SocketAddr::from(sock(CLIENT_IP, 0)),
                SocketAddr::from(sock(WEB0_VIPS[0], 80)),
            )?;
            let port = first.local_addr()?.port();
            let second = connect_from(
                SocketAddr::from(sock(CLIENT_IP, port)),
                SocketAddr::from(sock(WEB0_VIPS[1], 80)),
            )?;
            Ok((
                Conversation::from_stream(first),
                Conversation::from_stream(second),
                port,
            ))
        })
        .expect("two connections from one client port");
    for conversation in [&first, &second] {
        assert_eq!(
            conversation.local_addr().expect("local address").port(),
            port
        );
    }
    for round in 0..3 {
        let to_first = first.ask().expect("the first connection answers");
        let to_second = second.ask().expect("the second connection answers");
        assert_eq!(to_first.server, "web-0");
        assert_eq!(to_second.server, "web-0");
        assert_eq!(
            to_first.seen_client,
            SocketAddr::from(sock(CLIENT_IP, port)),
            "round {round}: the first flow keeps the client's port"
        );
        assert_eq!(to_second.seen_client.ip(), std::net::IpAddr::V4(CLIENT_IP));
        assert_ne!(
            to_second.seen_client.port(),
            port,
            "round {round}: the second flow's port is remapped"
        );
    }
    let remapped = "kpr_datapath_events_total{event=\"source_port_remapped\"}";
    lab.wait_for("the remap to be counted", CHANGE_DEADLINE, || {
        Ok(lab.metric(remapped)?.is_some_and(|count| count >= 1.0))
    })
    .expect("remap counted");
}
