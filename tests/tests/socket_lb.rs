//! Socket-layer load balancing for pods (`--socket-lb all`, the default): a pod's
//! `connect()`/`sendmsg()` to a ClusterIP is translated by the cgroup hooks, so its
//! packets leave the socket addressed to the backend (no per-packet DNAT, no conntrack
//! entry), with the same semantics as the TC path.
//!
//! Each test makes a cgroup of its own and runs `kpr-host-client` processes in pod
//! namespaces inside it (a lab pod is a network namespace; the cgroup is what the hooks
//! see). Nothing is attached to any other cgroup.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use kpr_lab::{
    host::{Mode, Outcome},
    scenario::{sock, CLIENT_IP},
    socket_lab::{
        answered_by, assert_peer, assert_socket_path_only, counter, hooks, inspect_json, plain_log,
        until_moved, SocketLab, DEADLINE,
    },
};
use proxy_userspace::datapath::cgroup::SockHook;

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const NOBODY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const REMOTE_ONLY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const SOLO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const WEB_BACKENDS: [&str; 3] = ["web-0", "web-1", "web-2"];
const WEB_0_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const CLIENT_2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
/// errno of a socket destroyed under its application (`bpf_sock_destroy`).
const ECONNABORTED: i32 = 103;

fn socket_lab() -> SocketLab {
    SocketLab::new(
        Path::new(env!("CARGO_BIN_EXE_kpr-host-client")),
        &[("client-2", CLIENT_2_IP)],
    )
}

/// A ClusterIP service `name` at `vip` (`protocol` port `port` -> 8080 for TCP, 5353
/// for UDP) with `extra` spec lines, and its slice of `endpoints` (pod, node).
fn service(
    name: &str,
    vip: Ipv4Addr,
    protocol: &str,
    extra: &str,
    endpoints: &[(&str, &str)],
) -> String {
    let (port, target) = if protocol == "UDP" {
        (53, 5353)
    } else {
        (80, 8080)
    };
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: {name}}}\n{extra}  \
         ports: [{{name: p, port: {port}, protocol: {protocol}, targetPort: {target}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         namespace: demo\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: p, port: {target}, protocol: {protocol}}}]\nendpoints:\n"
    );
    for (pod, node) in endpoints {
        let index: u8 = pod.trim_start_matches("web-").parse().expect("a web-N pod");
        yaml.push_str(&format!(
            "  - addresses: [10.244.1.{}]\n    conditions: {{ready: true}}\n    \
             nodeName: {node}\n    targetRef: {{kind: Pod, namespace: demo, name: {pod}}}\n",
            11 + index
        ));
    }
    yaml
}

fn write(lab: &SocketLab, file: &str, yaml: &str) {
    lab.lab.write_manifest(file, yaml).expect("write manifest");
}

/// The address a backend saw, as an IP.
fn seen_ip(outcome: &Outcome) -> Ipv4Addr {
    let seen: SocketAddrV4 = outcome
        .seen_client
        .as_deref()
        .and_then(|seen| seen.parse().ok())
        .unwrap_or_else(|| panic!("{outcome:?}"));
    *seen.ip()
}

#[test]
fn pod_sockets_are_translated_at_connect_with_the_tc_paths_semantics() {
    let mut lab = socket_lab();
    let all_web = [
        ("web-0", "node-a"),
        ("web-1", "node-a"),
        ("web-2", "node-a"),
    ];
    write(
        &lab,
        "sticky.yaml",
        &service(
            "sticky",
            STICKY_VIP,
            "TCP",
            "  sessionAffinity: ClientIP\n",
            &all_web,
        ),
    );
    write(
        &lab,
        "local.yaml",
        &service(
            "local",
            LOCAL_VIP,
            "TCP",
            "  internalTrafficPolicy: Local\n",
            &[
                ("web-0", "node-a"),
                ("web-1", "node-b"),
                ("web-2", "node-b"),
            ],
        ),
    );
    write(
        &lab,
        "remote-only.yaml",
        &service(
            "remote-only",
            REMOTE_ONLY_VIP,
            "TCP",
            "  internalTrafficPolicy: Local\n",
            &[("web-1", "node-b")],
        ),
    );
    write(
        &lab,
        "self.yaml",
        &service("self", SELF_VIP, "TCP", "", &[("web-0", "node-a")]),
    );
    lab.start_agent(&[]);
    let web = sock(WEB_VIP, 80);
    let before = lab.counters();

    // TCP from a pod: spread over the backends, which see the pod's own address; the
    // pod sees the ClusterIP as its peer.
    let tcp = lab.pod_client("client", true, Mode::Tcp, web, 30);
    let servers = answered_by(&tcp, &WEB_BACKENDS);
    assert!(servers.len() >= 2, "30 connections all went to {servers:?}");
    assert_peer(&tcp, "10.96.0.10:80");
    for outcome in &tcp {
        assert_eq!(seen_ip(outcome), CLIENT_IP, "{outcome:?}");
    }
    // UDP, connected and not: recvfrom() shows the ClusterIP as the source.
    for mode in [Mode::UdpConnected, Mode::UdpUnconnected] {
        let udp = lab.pod_client("client", true, mode, sock(DNS_VIP, 53), 10);
        let _ = answered_by(&udp, &WEB_BACKENDS);
        for outcome in &udp {
            assert_eq!(
                outcome.source.as_deref(),
                Some("10.96.0.53:53"),
                "{mode:?}: {outcome:?}"
            );
            assert_eq!(seen_ip(outcome), CLIENT_IP, "{mode:?}: {outcome:?}");
            let expected_peer = (mode == Mode::UdpConnected).then_some("10.96.0.53:53");
            assert_eq!(
                outcome.peer.as_deref(),
                expected_peer,
                "{mode:?}: {outcome:?}"
            );
        }
    }
    // All of it took the socket path: counted there, and not one new TC flow (so no
    // conntrack entry and no per-packet rewrite).
    let after = lab.counters();
    assert_socket_path_only(&before, &after, 50, "a pod's connection");
    let sockets = inspect_json(&lab.lab, "sockets");
    let entries = sockets.as_array().expect("a list of socket entries");
    assert!(
        entries.iter().any(|entry| entry["netns"] == "pod"
            && entry["frontend"] == "10.96.0.10:80"
            && entry["connected"] == true),
        "kpr inspect sockets shows the pod's translated sockets: {sockets}"
    );

    // No endpoints: refused at connect() and sendto().
    for outcome in lab.pod_client("client", true, Mode::Tcp, sock(NOBODY_VIP, 80), 3) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }

    // A port the live ClusterIP does not declare: refused at connect() (and for UDP
    // at sendto()), as the TC path rejects it, and counted.
    let before_undeclared = lab.counters();
    for mode in [Mode::Tcp, Mode::UdpConnected] {
        for outcome in lab.pod_client("client", true, mode, sock(WEB_VIP, 81), 2) {
            assert_eq!(
                outcome.errno,
                Some(libc::ECONNREFUSED),
                "{mode:?}: {outcome:?}"
            );
        }
    }
    let after_undeclared = lab.counters();
    assert_eq!(
        counter(&after_undeclared, "rejected_undeclared_port"),
        counter(&before_undeclared, "rejected_undeclared_port") + 4,
        "{before_undeclared} -> {after_undeclared}"
    );

    // internalTrafficPolicy Local: only this node's endpoint; none here: refused (the
    // TC path drops instead: a syscall has no silent drop to offer).
    let local = lab.pod_client("client", true, Mode::Tcp, sock(LOCAL_VIP, 80), 10);
    assert_eq!(
        answered_by(&local, &WEB_BACKENDS),
        BTreeSet::from(["web-0"])
    );
    for outcome in lab.pod_client("client", true, Mode::Tcp, sock(REMOTE_ONLY_VIP, 80), 2) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }

    // Hairpin: a pod reaching itself through its service, without masquerade: it sees
    // its own address as the client, and the ClusterIP as the peer.
    let hairpin = lab.pod_client("web-0", true, Mode::Tcp, sock(SELF_VIP, 80), 3);
    for outcome in &hairpin {
        assert_eq!(outcome.server.as_deref(), Some("web-0"), "{outcome:?}");
        assert_eq!(seen_ip(outcome), WEB_0_IP, "{outcome:?}");
        assert_eq!(
            outcome.peer.as_deref(),
            Some("10.96.0.40:80"),
            "{outcome:?}"
        );
    }

    // Session affinity per client pod (keyed by its network namespace, since an
    // unbound socket has no address at connect()): each pod sticks to one backend, and
    // the two pods have records of their own.
    let hits_before = counter(&lab.counters(), "affinity_hit");
    for pod in ["client", "client-2"] {
        let sticky = lab.pod_client(pod, true, Mode::Tcp, sock(STICKY_VIP, 80), 10);
        let servers = answered_by(&sticky, &WEB_BACKENDS);
        assert_eq!(servers.len(), 1, "{pod} moved between {servers:?}");
    }
    assert!(
        counter(&lab.counters(), "affinity_hit") >= hits_before + 18,
        "9 affinity hits per pod"
    );
    let records = inspect_json(&lab.lab, "affinity");
    let socket_records = records
        .as_array()
        .expect("affinity records")
        .iter()
        .filter(|record| record["path"] == "socket")
        .count();
    assert_eq!(socket_records, 2, "one record per client pod: {records}");

    // A pod outside the hooked cgroup keeps the TC path.
    let before = lab.counters();
    let outside = lab.pod_client("client", false, Mode::Tcp, web, 3);
    assert_peer(&outside, "10.96.0.10:80");
    let after = lab.counters();
    assert_eq!(
        counter(&after, "sock_translated_pod"),
        counter(&before, "sock_translated_pod")
    );
    assert!(counter(&after, "new_flow") >= counter(&before, "new_flow") + 3);
}

#[test]
fn connected_udp_sockets_of_a_removed_backend_are_destroyed_and_reconnect() {
    let mut lab = socket_lab();
    // Every socket starts on web-0, which then leaves both services.
    write(
        &lab,
        "dns.yaml",
        &service("dns", DNS_VIP, "UDP", "", &[("web-0", "node-a")]),
    );
    write(
        &lab,
        "solo.yaml",
        &service("solo", SOLO_VIP, "TCP", "", &[("web-0", "node-a")]),
    );
    lab.start_agent(&[]);
    let dns = sock(DNS_VIP, 53);
    let pod = lab.lab.pod("client").netns.path();
    let node = lab.lab.node.path();
    let mut pod_udp = lab.session(&pod, Mode::UdpSession, dns);
    let mut host_udp = lab.session(&node, Mode::UdpSession, dns);
    let mut pod_tcp = lab.session(&pod, Mode::TcpSession, sock(SOLO_VIP, 80));
    for session in [&mut pod_udp, &mut host_udp, &mut pod_tcp] {
        let first = session.ask().expect("first request");
        assert_eq!(first.server.as_deref(), Some("web-0"), "{first:?}");
    }
    let before = lab.counters();

    // web-0 leaves; web-1 and web-2 take over. The removed pod keeps serving, so a
    // socket left pinned to it would go on getting answers from it.
    let others = [("web-1", "node-a"), ("web-2", "node-a")];
    write(
        &lab,
        "dns.yaml",
        &service("dns", DNS_VIP, "UDP", "", &others),
    );
    write(
        &lab,
        "solo.yaml",
        &service("solo", SOLO_VIP, "TCP", "", &others),
    );

    // The connected UDP sockets, a pod's and the node's, are destroyed: one failed
    // request each (ECONNABORTED, or EDESTADDRREQ when the send comes first on the
    // disconnected socket), then the client connects again, to a live backend.
    for (who, session) in [("pod", &mut pod_udp), ("node", &mut host_udp)] {
        let errors = until_moved(&lab.lab, session, "web-0");
        assert!(errors.len() <= 1, "{who}: {errors:?}");
        for error in &errors {
            assert!(
                matches!(error.errno, Some(ECONNABORTED | libc::EDESTADDRREQ)),
                "{who}: {error:?}"
            );
        }
        let next = session.ask().expect("request after the move");
        let _ = answered_by(std::slice::from_ref(&next), &["web-1", "web-2"]);
        assert_eq!(
            next.source.as_deref(),
            Some("10.96.0.53:53"),
            "{who}: {next:?}"
        );
    }
    let after = lab.counters();
    assert!(
        counter(&after, "sock_destroyed") >= counter(&before, "sock_destroyed") + 2,
        "{before} -> {after}"
    );

    // The established TCP connection stays on its backend (which may still be draining
    // it, as with kube-proxy); new connections avoid it.
    let kept = pod_tcp.ask().expect("established connection");
    assert_eq!(kept.server.as_deref(), Some("web-0"), "{kept:?}");
    assert_eq!(kept.peer.as_deref(), Some("10.96.0.50:80"), "{kept:?}");
    let fresh = lab.pod_client("client", true, Mode::Tcp, sock(SOLO_VIP, 80), 5);
    let _ = answered_by(&fresh, &["web-1", "web-2"]);
    let log = plain_log(&lab.lab);
    assert!(
        log.contains("destroyed connected sockets of removed backends"),
        "{log}"
    );
}

#[test]
fn socket_lb_connections_survive_an_agent_restart_and_off_detaches_the_hooks() {
    let mut lab = socket_lab();
    lab.start_agent(&[]);
    let pod = lab.lab.pod("client").netns.path();
    let mut tcp = lab.session(&pod, Mode::TcpSession, sock(WEB_VIP, 80));
    let mut udp = lab.session(&pod, Mode::UdpSession, sock(DNS_VIP, 53));
    let first_tcp = tcp.ask().expect("tcp");
    let first_udp = udp.ask().expect("udp");
    assert!(first_tcp.server.is_some() && first_udp.server.is_some());

    // A crash: the pinned hooks and maps stay and keep serving; the next agent adopts
    // them. The open sockets never notice.
    lab.lab.kill_agent().expect("kill");
    for session in [&mut tcp, &mut udp] {
        let outcome = session.ask().expect("no agent");
        assert!(outcome.server.is_some(), "{outcome:?}");
    }
    lab.start_agent(&[]);
    let again_tcp = tcp.ask().expect("tcp after restart");
    let again_udp = udp.ask().expect("udp after restart");
    assert_eq!(again_tcp.server, first_tcp.server, "{again_tcp:?}");
    assert_eq!(
        again_tcp.peer.as_deref(),
        Some("10.96.0.10:80"),
        "{again_tcp:?}"
    );
    assert_eq!(again_udp.server, first_udp.server, "{again_udp:?}");
    assert_eq!(
        again_udp.source.as_deref(),
        Some("10.96.0.53:53"),
        "{again_udp:?}"
    );
    assert_eq!(
        plain_log(&lab.lab)
            .lines()
            .filter(|line| line.contains("adopted the pinned link"))
            .count(),
        SockHook::ALL.len()
    );

    // --socket-lb off: no hooks; pods take the TC path again.
    lab.lab.stop_agent().expect("stop");
    lab.start_agent_without_hooks(&["--socket-lb", "off"]);
    assert!(hooks(lab.cgroup.path()).is_empty());
    let before = lab.counters();
    let through_tc = lab.pod_client("client", true, Mode::Tcp, sock(WEB_VIP, 80), 3);
    assert_peer(&through_tc, "10.96.0.10:80");
    let after = lab.counters();
    assert!(counter(&after, "new_flow") >= counter(&before, "new_flow") + 3);
    assert_eq!(
        counter(&after, "sock_translated"),
        counter(&before, "sock_translated")
    );
}

#[test]
fn a_connect_still_waiting_for_a_removed_backend_is_aborted() {
    let mut lab = socket_lab();
    const SLOW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
    write(
        &lab,
        "slow.yaml",
        &service("slow", SLOW_VIP, "TCP", "", &[("web-2", "node-a")]),
    );
    // web-2's answers to the client go nowhere: the client's handshake stays in
    // SYN-SENT, retransmitting.
    lab.lab
        .pod("web-2")
        .netns
        .ip(&["route", "add", "blackhole", &format!("{CLIENT_IP}/32")])
        .expect("blackhole route");
    lab.start_agent(&[]);
    let connecting = std::thread::scope(|scope| {
        let client =
            scope.spawn(|| lab.pod_client("client", true, Mode::TcpWait, sock(SLOW_VIP, 80), 1));
        // The socket was translated (its reverse entry exists) and is connecting.
        lab.lab
            .wait_for("the connect() to be translated", DEADLINE, || {
                let sockets = inspect_json(&lab.lab, "sockets");
                Ok(sockets.as_array().is_some_and(|entries| {
                    entries
                        .iter()
                        .any(|entry| entry["frontend"] == "10.96.0.60:80")
                }))
            })
            .expect("translated");
        write(
            &lab,
            "slow.yaml",
            &service("slow", SLOW_VIP, "TCP", "", &[("web-1", "node-a")]),
        );
        client.join().expect("client thread")
    });
    // Aborted when web-2 left, instead of waiting out the handshake's timeout.
    assert_eq!(connecting.len(), 1);
    assert_eq!(connecting[0].errno, Some(ECONNABORTED), "{connecting:?}");
    let next = lab.pod_client("client", true, Mode::Tcp, sock(SLOW_VIP, 80), 2);
    let _ = answered_by(&next, &["web-1"]);
}

/// The IPv4-mapped form of `addr:port`, as an AF_INET6 socket addresses IPv4.
fn mapped(addr: Ipv4Addr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.to_ipv6_mapped().into(), port)
}

#[test]
fn dual_stack_sockets_reach_ipv4_services_through_ipv4_mapped_addresses() {
    // A Go or Java client opens AF_INET6 sockets for every family and addresses an IPv4
    // ClusterIP as ::ffff:10.96.0.10: the connect6/sendmsg6 hooks translate it with the
    // IPv4 maps, and getpeername6/recvmsg6 show it the mapped ClusterIP again.
    let mut lab = socket_lab();
    lab.start_agent(&[]);
    let attached: BTreeSet<SockHook> = hooks(lab.cgroup.path())
        .into_iter()
        .map(|(hook, _)| hook)
        .collect();
    assert_eq!(
        attached,
        SockHook::ALL.into_iter().collect(),
        "every socket hook, both families, is attached"
    );
    let before = lab.counters();

    let tcp = lab.pod_client("client", true, Mode::Tcp, mapped(WEB_VIP, 80), 30);
    let servers = answered_by(&tcp, &WEB_BACKENDS);
    assert!(servers.len() >= 2, "30 connections all went to {servers:?}");
    assert_peer(&tcp, "[::ffff:10.96.0.10]:80");
    for outcome in &tcp {
        assert_eq!(seen_ip(outcome), CLIENT_IP, "{outcome:?}");
    }
    for mode in [Mode::UdpConnected, Mode::UdpUnconnected] {
        let udp = lab.pod_client("client", true, mode, mapped(DNS_VIP, 53), 10);
        let _ = answered_by(&udp, &WEB_BACKENDS);
        for outcome in &udp {
            assert_eq!(
                outcome.source.as_deref(),
                Some("[::ffff:10.96.0.53]:53"),
                "{mode:?}: {outcome:?}"
            );
            let expected_peer = (mode == Mode::UdpConnected).then_some("[::ffff:10.96.0.53]:53");
            assert_eq!(
                outcome.peer.as_deref(),
                expected_peer,
                "{mode:?}: {outcome:?}"
            );
        }
    }
    let after = lab.counters();
    assert_socket_path_only(&before, &after, 50, "a mapped connection");
    for outcome in lab.pod_client("client", true, Mode::Tcp, mapped(NOBODY_VIP, 80), 3) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }
}
