//! IPv6 services on the socket path: AF_INET6 sockets of a pod, inside the test's own
//! cgroup, translated at `connect()`/`sendmsg()` by the `*6` hooks (`proxy-ebpf`
//! `sock6.rs`), with the semantics of the IPv4 socket path: spread over the backends,
//! the ClusterIP shown by `getpeername()` and `recvfrom()`, the pod's own address seen
//! by the backend, ECONNREFUSED without endpoints, no TC flow at all, and a connected
//! UDP socket of a removed backend destroyed so its client connects again.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    path::Path,
};

use kpr_lab::{
    host::{run_client, Mode, Outcome, Session, TestCgroup},
    lab::Lab,
    socket_lab::{assert_socket_path_only, until_moved},
};

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
const SIX_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const EMPTY_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x40);
const WEB: [&str; 3] = ["web-0", "web-1", "web-2"];

fn pod_v6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, host)
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// The IPv6-only Service `six` (TCP 80 and UDP 53 -> 8080) over the web pods named in
/// `backends`, and `empty`, an IPv6 Service without endpoints.
fn manifests(backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|index| {
            format!(
                "  - addresses: ['{}']\n    nodeName: node-a\n    conditions: {{ready: true}}\n    \
                 targetRef: {{kind: Pod, namespace: demo, name: web-{index}}}\n",
                pod_v6(0x11 + u16::try_from(*index).unwrap_or(0))
            )
        })
        .collect();
    let service = |name: &str, vip: Ipv6Addr| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  clusterIP: '{vip}'
  clusterIPs: ['{vip}']
  ports:
    - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
    - {{name: dns, port: 53, protocol: UDP, targetPort: 8080}}
"
        )
    };
    format!(
        "{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: six-ipv6
  namespace: demo
  labels: {{kubernetes.io/service-name: six}}
addressType: IPv6
ports:
  - {{name: http, port: 8080, protocol: TCP}}
  - {{name: dns, port: 8080, protocol: UDP}}
endpoints:
{endpoints}---
{}",
        service("six", SIX_VIP),
        service("empty", EMPTY_VIP)
    )
}

struct SocketLab6 {
    lab: Lab,
    cgroup: TestCgroup,
}

impl SocketLab6 {
    fn new() -> Self {
        let mut lab = Lab::new().expect("lab");
        lab.enable_ipv6().expect("IPv6 in the node namespace");
        lab.add_dual_pod("client", CLIENT_V4, Some(CLIENT_V6))
            .expect("client pod");
        for (index, name) in WEB.iter().enumerate() {
            let host = 0x11 + u16::try_from(index).unwrap_or(0);
            lab.add_dual_pod(
                name,
                Ipv4Addr::new(10, 244, 1, 11 + u8::try_from(index).unwrap_or(0)),
                Some(pod_v6(host)),
            )
            .expect("web pod");
            lab.serve_v6(name, 8080).expect("IPv6 server");
        }
        lab.write_manifest("six.yaml", &manifests(&[0, 1, 2]))
            .expect("manifests");
        let cgroup = TestCgroup::create(&lab.prefix).expect("the test's cgroup");
        let path = cgroup.path().display().to_string();
        lab.start_agent(&["--cgroup-path", &path, "--socket-lb", "all"])
            .expect("agent");
        Self { lab, cgroup }
    }

    fn client(&self, mode: Mode, dst: SocketAddr, count: usize) -> Vec<Outcome> {
        run_client(
            Path::new(env!("CARGO_BIN_EXE_kpr-host-client")),
            &self.lab.pod("client").netns.path(),
            Some(&self.cgroup),
            mode,
            dst,
            count,
        )
        .unwrap_or_else(|error| panic!("client {mode:?} {dst}: {error:#}"))
    }

    /// `count` requests from a host-network client: a process in the node's own
    /// namespace, inside the test's cgroup.
    fn host_client(&self, mode: Mode, dst: SocketAddr, count: usize) -> Vec<Outcome> {
        run_client(
            Path::new(env!("CARGO_BIN_EXE_kpr-host-client")),
            &self.lab.node.path(),
            Some(&self.cgroup),
            mode,
            dst,
            count,
        )
        .unwrap_or_else(|error| panic!("host client {mode:?} {dst}: {error:#}"))
    }

    fn session(&self, mode: Mode, dst: SocketAddr) -> Session {
        Session::start(
            Path::new(env!("CARGO_BIN_EXE_kpr-host-client")),
            &self.lab.pod("client").netns.path(),
            Some(&self.cgroup),
            mode,
            dst,
        )
        .unwrap_or_else(|error| panic!("session {mode:?} {dst}: {error:#}"))
    }

    /// `kpr inspect counters`, by name.
    fn counters(&self) -> serde_json::Value {
        let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
            .args(["inspect", "counters", "--json", "--bpffs"])
            .arg(self.lab.pin_dir())
            .output()
            .expect("kpr inspect counters");
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).expect("JSON counters")
    }
}

fn servers(outcomes: &[Outcome]) -> BTreeSet<String> {
    outcomes
        .iter()
        .map(|outcome| {
            let server = outcome
                .server
                .clone()
                .unwrap_or_else(|| panic!("no answer: {outcome:?}"));
            assert!(WEB.contains(&server.as_str()), "{outcome:?}");
            server
        })
        .collect()
}

/// Host-network clients over IPv6 (kubelet, hostNetwork pods): AF_INET6 sockets of a
/// process in the node's namespace, in the hooked cgroup, reach an IPv6 ClusterIP
/// through the `*6` hooks, see the ClusterIP as their peer, and the backend sees the
/// node's own IPv6 address.
#[test]
fn ipv6_host_clients_in_the_cgroup_reach_ipv6_cluster_ips_and_see_the_frontend() {
    let lab = SocketLab6::new();
    // The node's global IPv6 address, the source its sockets pick for pods.
    let node_v6: Ipv6Addr = "fd00:192:168::1".parse().expect("literal");
    lab.lab
        .node
        .ip(&[
            "-6",
            "addr",
            "add",
            &format!("{node_v6}/128"),
            "dev",
            "lo",
            "nodad",
        ])
        .expect("the node's IPv6 address");
    let tcp = lab.host_client(Mode::Tcp, v6(SIX_VIP, 80), 20);
    let answered = servers(&tcp);
    assert!(
        answered.len() >= 2,
        "20 connections all went to {answered:?}"
    );
    for outcome in &tcp {
        assert_eq!(
            outcome.peer.as_deref(),
            Some("[fd00:96::10]:80"),
            "{outcome:?}"
        );
        let seen: SocketAddr = outcome
            .seen_client
            .as_deref()
            .and_then(|seen| seen.parse().ok())
            .unwrap_or_else(|| panic!("{outcome:?}"));
        assert_eq!(seen.ip(), node_v6, "the backend sees the node: {outcome:?}");
    }
    for mode in [Mode::UdpConnected, Mode::UdpUnconnected] {
        let udp = lab.host_client(mode, v6(SIX_VIP, 53), 6);
        let _ = servers(&udp);
        for outcome in &udp {
            assert_eq!(
                outcome.source.as_deref(),
                Some("[fd00:96::10]:53"),
                "{mode:?}: {outcome:?}"
            );
        }
    }
    // A service without endpoints is refused at connect(), as on IPv4.
    for outcome in lab.host_client(Mode::Tcp, v6(EMPTY_VIP, 80), 1) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }
}

#[test]
fn ipv6_sockets_are_translated_at_connect_with_the_socket_paths_semantics() {
    let lab = SocketLab6::new();
    let before = lab.counters();

    let tcp = lab.client(Mode::Tcp, v6(SIX_VIP, 80), 30);
    let answered = servers(&tcp);
    assert!(
        answered.len() >= 2,
        "30 connections all went to {answered:?}"
    );
    for outcome in &tcp {
        assert_eq!(
            outcome.peer.as_deref(),
            Some("[fd00:96::10]:80"),
            "{outcome:?}"
        );
        let seen: SocketAddr = outcome
            .seen_client
            .as_deref()
            .and_then(|seen| seen.parse().ok())
            .unwrap_or_else(|| panic!("{outcome:?}"));
        assert_eq!(
            seen.ip(),
            CLIENT_V6,
            "the backend sees the pod: {outcome:?}"
        );
    }
    for mode in [Mode::UdpConnected, Mode::UdpUnconnected] {
        let udp = lab.client(mode, v6(SIX_VIP, 53), 10);
        let _ = servers(&udp);
        for outcome in &udp {
            assert_eq!(
                outcome.source.as_deref(),
                Some("[fd00:96::10]:53"),
                "{mode:?}: {outcome:?}"
            );
        }
    }
    let after = lab.counters();
    assert_socket_path_only(&before, &after, 50, "an IPv6 socket's connection");
    for outcome in lab.client(Mode::Tcp, v6(EMPTY_VIP, 80), 3) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }
    // A port the live ClusterIP does not declare is refused as well.
    for outcome in lab.client(Mode::Tcp, v6(SIX_VIP, 81), 2) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }
}

#[test]
fn a_connected_ipv6_udp_socket_of_a_removed_backend_is_destroyed_and_reconnects() {
    let lab = SocketLab6::new();
    let mut session = lab.session(Mode::UdpSession, v6(SIX_VIP, 53));
    let first = session.ask().expect("first request");
    let gone = first
        .server
        .clone()
        .unwrap_or_else(|| panic!("no answer: {first:?}"));
    let gone_index = WEB
        .iter()
        .position(|name| *name == gone)
        .unwrap_or_else(|| panic!("{first:?}"));
    // The backend leaves the slice; its pod keeps serving, so a socket left pinned to
    // it would go on getting answers from it.
    let others: Vec<usize> = (0..WEB.len())
        .filter(|index| *index != gone_index)
        .collect();
    lab.lab
        .write_manifest("six.yaml", &manifests(&others))
        .expect("manifests");
    let errors = until_moved(&lab.lab, &mut session, &gone);
    assert!(errors.len() <= 1, "{errors:?}");
    let next = session.ask().expect("request after the move");
    assert_eq!(next.source.as_deref(), Some("[fd00:96::10]:53"), "{next:?}");
    assert!(
        lab.lab
            .agent_log()
            .contains("destroyed connected sockets of removed backends"),
        "{}",
        lab.lab.agent_log()
    );
}
