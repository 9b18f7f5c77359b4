//! Taking over from kube-proxy: flows netfilter's conntrack translates (kube-proxy's
//! DNAT, set up before kpr) are left to netfilter by the datapath, every other new flow
//! is ours.
//!
//! `the_datapath_asks_netfilter_about_new_flows_while_the_check_is_on` runs the loaded
//! TC programs with BPF_PROG_TEST_RUN inside a namespace whose netfilter holds real
//! entries, made by real sockets through a real DNAT rule: it proves that the
//! `bpf_skb_ct_lookup` kfunc loads and answers with our toolchain.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use kpr_lab::{
    cluster::{Cluster, NODE_IPS},
    datapath_cases::{frontend, DatapathHarness, NodeSetup},
    netns::Netns,
    packets::{sock, Frame, TcpFlags},
    traffic::Conversation,
};
use proxy_common::{counter, proto, takeover::NfCheck};
use proxy_userspace::{
    datapath::Hook,
    takeover::{self, KernelSupport},
};

/// The ClusterIP of the namespace's "kube-proxy" rule.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A ClusterIP netfilter tracks without translating (no rule for it).
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The client's address.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The backend kube-proxy's rule chose.
const KUBE_PROXY_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
/// The backend kpr's maps name (another pod, so a translation by kpr shows).
fn kpr_backend(port: u16) -> SocketAddrV4 {
    sock(10, 244, 1, 12, port)
}

/// Flows netfilter tracks in the namespace, made by real sockets.
struct NetfilterFlows {
    /// An established TCP connection through the DNAT rule (status DST_NAT,
    /// SEEN_REPLY): the client's end, the server's end, the listener.
    tcp: (TcpStream, TcpStream, TcpListener),
    /// A UDP datagram through the DNAT rule, unanswered (DST_NAT only).
    udp: UdpSocket,
    _udp_server: UdpSocket,
    /// A UDP datagram to an address no rule translates (tracked, no NAT).
    plain: UdpSocket,
}

impl NetfilterFlows {
    fn tcp_client(&self) -> Result<SocketAddrV4> {
        v4(self.tcp.0.local_addr()?)
    }
    fn udp_client(&self) -> Result<SocketAddrV4> {
        v4(self.udp.local_addr()?)
    }
    fn plain_client(&self) -> Result<SocketAddrV4> {
        v4(self.plain.local_addr()?)
    }
}

fn v4(addr: std::net::SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        std::net::SocketAddr::V4(addr) => Ok(addr),
        std::net::SocketAddr::V6(addr) => anyhow::bail!("{addr} is not IPv4"),
    }
}

/// A namespace where netfilter DNATs VIP:80/tcp and VIP:53/udp to
/// [`KUBE_PROXY_BACKEND`], as kube-proxy's rules would for the node's own clients.
fn netfilter_namespace() -> Result<Netns> {
    let netns = Netns::create(&format!("{}-nf", kpr_lab::netns::unique_prefix()))?;
    netns.ip(&["link", "set", "lo", "up"])?;
    for addr in [CLIENT, KUBE_PROXY_BACKEND] {
        netns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
    }
    // The service range leads to the loopback, from the client's address.
    netns.ip(&[
        "route",
        "add",
        "10.96.0.0/12",
        "dev",
        "lo",
        "src",
        &CLIENT.to_string(),
    ])?;
    for (l4, port, target) in [("tcp", "80", "8080"), ("udp", "53", "5353")] {
        netns.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                &VIP.to_string(),
                "-p",
                l4,
                "--dport",
                port,
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{KUBE_PROXY_BACKEND}:{target}"),
            ],
        )?;
    }
    Ok(netns)
}

/// Opens the flows (call inside the namespace).
fn open_flows() -> Result<NetfilterFlows> {
    let listener = TcpListener::bind(SocketAddrV4::new(KUBE_PROXY_BACKEND, 8080))?;
    let client =
        TcpStream::connect_timeout(&SocketAddrV4::new(VIP, 80).into(), Duration::from_secs(2))
            .context("connecting through the DNAT rule")?;
    let (server, _) = listener.accept()?;
    let udp_server = UdpSocket::bind(SocketAddrV4::new(KUBE_PROXY_BACKEND, 5353))?;
    let udp = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0))?;
    udp.send_to(b"query", SocketAddrV4::new(VIP, 53))?;
    let plain = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0))?;
    plain.send_to(b"query", SocketAddrV4::new(PLAIN_VIP, 53))?;
    Ok(NetfilterFlows {
        tcp: (client, server, listener),
        udp,
        _udp_server: udp_server,
        plain,
    })
}

/// What the program did with one frame.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Passed byte for byte.
    Untouched,
    /// Passed, rewritten to exactly this frame.
    Translated,
}

fn outcome(
    harness: &mut DatapathHarness,
    hook: Hook,
    input: &Frame,
    translated: &Frame,
) -> Result<Outcome> {
    let output = harness.run_on(hook, &input.to_bytes(), 1)?;
    anyhow::ensure!(output.verdict == 0, "verdict {}", output.verdict);
    if output.packet == input.to_bytes() {
        Ok(Outcome::Untouched)
    } else if output.packet == translated.to_bytes() {
        Ok(Outcome::Translated)
    } else {
        anyhow::bail!("unexpected output {:02x?}", output.packet)
    }
}

/// The check's cost per packet, as the kernel times BPF_PROG_TEST_RUN (a figure for
/// the README, not asserted: no timed assertions). `owned` is a packet of a flow
/// netfilter translates.
fn check_cost(harness: &mut DatapathHarness, owned: &Frame, status_offset: u32) -> Result<String> {
    const REPEAT: u32 = 200_000;
    let mut run = |frame: &Frame, enabled: bool, frontend_flags: u16| -> Result<(i32, Duration)> {
        harness.clear()?;
        let backends = if frontend_flags == 0 {
            vec![kpr_backend(8080)]
        } else {
            Vec::new()
        };
        harness.install(&[frontend(
            "web",
            SocketAddrV4::new(VIP, 80),
            proto::TCP,
            &backends,
            frontend_flags,
        )])?;
        takeover::write_check(
            &mut harness.datapath,
            NfCheck {
                enabled: u32::from(enabled),
                status_offset,
            },
        )?;
        let output = harness.run_on(Hook::PodIngress, &frame.to_bytes(), REPEAT)?;
        Ok((output.verdict, output.duration))
    };
    // A frontend without backends that drops: every run takes the new-flow path
    // (conntrack misses, frontend found) and leaves no state behind.
    let drop_flags = proxy_common::service_flags::DROP_WHEN_EMPTY;
    let stranger = Frame::tcp(
        sock(10, 244, 1, 2, 1),
        SocketAddrV4::new(VIP, 80),
        TcpFlags::ACK,
    );
    let (_, off) = run(&stranger, false, drop_flags)?;
    let (_, missed) = run(&stranger, true, drop_flags)?;
    let (verdict, owned_on) = run(owned, true, 0)?;
    anyhow::ensure!(verdict == 0, "netfilter's packet passes");
    Ok(format!(
        "takeover check, ns per packet on the new-flow path: check off {off:?}, check on and netfilter knows no such flow {missed:?}, check on for a packet of netfilter's (passed) {owned_on:?}"
    ))
}

#[test]
fn the_datapath_asks_netfilter_about_new_flows_while_the_check_is_on() {
    let support = KernelSupport::probe();
    assert!(
        support.usable(),
        "this kernel lacks bpf_skb_ct_lookup or nf_conn's BTF: {support:?}"
    );
    let netns = netfilter_namespace().expect("namespace");
    let results = netns
        .run(|| {
            let flows = open_flows()?;
            // What netfilter itself says about them, over ctnetlink.
            let nat = takeover::ctnetlink::nat_flows()?;
            let mut harness = DatapathHarness::new()?;
            let web = frontend(
                "web",
                SocketAddrV4::new(VIP, 80),
                proto::TCP,
                &[kpr_backend(8080)],
                0,
            );
            let dns = frontend(
                "dns",
                SocketAddrV4::new(VIP, 53),
                proto::UDP,
                &[kpr_backend(5353)],
                0,
            );
            let plain = frontend(
                "plain",
                SocketAddrV4::new(PLAIN_VIP, 53),
                proto::UDP,
                &[kpr_backend(5353)],
                0,
            );
            let tcp = flows.tcp_client()?;
            let udp = flows.udp_client()?;
            let plain_client = flows.plain_client()?;
            let ack = Frame::tcp(tcp, SocketAddrV4::new(VIP, 80), TcpFlags::ACK);
            let syn = Frame::tcp(tcp, SocketAddrV4::new(VIP, 80), TcpFlags::SYN);
            let stranger = Frame::tcp(
                sock(10, 244, 1, 2, 1),
                SocketAddrV4::new(VIP, 80),
                TcpFlags::ACK,
            );
            let query = Frame::udp(udp, SocketAddrV4::new(VIP, 53), b"query");
            let plain_query = Frame::udp(plain_client, SocketAddrV4::new(PLAIN_VIP, 53), b"query");
            let cases: Vec<(&str, Hook, &Frame, SocketAddrV4)> = vec![
                (
                    "tcp of netfilter's established flow",
                    Hook::PodIngress,
                    &ack,
                    kpr_backend(8080),
                ),
                (
                    "the same from outside the node",
                    Hook::NodeIngress,
                    &ack,
                    kpr_backend(8080),
                ),
                (
                    "a SYN reusing the finished flow's tuple",
                    Hook::PodIngress,
                    &syn,
                    kpr_backend(8080),
                ),
                (
                    "tcp of a tuple netfilter does not know",
                    Hook::PodIngress,
                    &stranger,
                    kpr_backend(8080),
                ),
                (
                    "udp netfilter translates, unanswered",
                    Hook::PodIngress,
                    &query,
                    kpr_backend(5353),
                ),
                (
                    "udp netfilter tracks without NAT",
                    Hook::PodIngress,
                    &plain_query,
                    kpr_backend(5353),
                ),
            ];
            // The client is a pod of the cluster: no masquerade from outside either.
            let node = NodeSetup {
                cluster_cidr: Some((Ipv4Addr::new(10, 244, 0, 0), 16)),
                ..NodeSetup::default()
            };
            let mut seen = Vec::new();
            for enabled in [false, true] {
                for (name, hook, input, backend) in &cases {
                    harness.clear()?;
                    harness.install_on(&[web.clone(), dns.clone(), plain.clone()], &node)?;
                    takeover::write_check(
                        &mut harness.datapath,
                        NfCheck {
                            enabled: u32::from(enabled),
                            status_offset: support.status_offset.unwrap_or(0),
                        },
                    )?;
                    let translated = (*input).clone().with_dst(*backend);
                    let result = outcome(&mut harness, *hook, input, &translated)
                        .with_context(|| format!("{name} (check {enabled})"))?;
                    let passed =
                        harness.datapath.maps.counters()?[counter::NF_TRACKED_PASSED as usize];
                    seen.push((*name, enabled, result, passed));
                }
            }
            let cost = check_cost(&mut harness, &ack, support.status_offset.unwrap_or(0))?;
            drop(flows);
            eprintln!("{cost}");
            Ok((nat, tcp, udp, seen))
        })
        .expect("run in the namespace");
    let (nat, tcp, udp, seen) = results;
    // netfilter's own view: both flows through the rule are DNAT flows, the plain one
    // is not.
    let nat_clients: Vec<std::net::SocketAddr> = nat.iter().map(|flow| flow.src).collect();
    assert!(
        nat_clients.contains(&tcp.into()) && nat_clients.contains(&udp.into()),
        "{nat:?}"
    );
    assert_eq!(nat.len(), 2, "{nat:?}");

    use Outcome::{Translated, Untouched};
    let expected = [
        ("tcp of netfilter's established flow", false, Translated, 0),
        ("the same from outside the node", false, Translated, 0),
        (
            "a SYN reusing the finished flow's tuple",
            false,
            Translated,
            0,
        ),
        (
            "tcp of a tuple netfilter does not know",
            false,
            Translated,
            0,
        ),
        ("udp netfilter translates, unanswered", false, Translated, 0),
        ("udp netfilter tracks without NAT", false, Translated, 0),
        ("tcp of netfilter's established flow", true, Untouched, 1),
        ("the same from outside the node", true, Untouched, 1),
        (
            "a SYN reusing the finished flow's tuple",
            true,
            Translated,
            0,
        ),
        (
            "tcp of a tuple netfilter does not know",
            true,
            Translated,
            0,
        ),
        ("udp netfilter translates, unanswered", true, Untouched, 1),
        ("udp netfilter tracks without NAT", true, Translated, 0),
    ];
    assert_eq!(seen, expected);
}

// ---------------------------------------------------------------------------------
// The lab: kube-proxy's rules live on node-a, connections established under them,
// kpr started, kube-proxy's rules removed.

/// How kube-proxy programmed node-a.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KubeProxyMode {
    /// iptables mode, Debian's default backend (`iptables-nft`).
    IptablesNft,
    /// iptables mode with the legacy backend.
    IptablesLegacy,
    /// nftables mode.
    Nftables,
}

const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const HTTP_NODE_PORT: u16 = 30080;
const DNS_NODE_PORT: u16 = 30053;
/// Long-lived connections per path (ClusterIP from a pod, NodePort from outside).
const CONNECTIONS_PER_PATH: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new connection may take (short: some are expected to fail while
/// kube-proxy's filter rules are still there).
const NEW_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);

fn web_service() -> kpr_lab::kube_proxy::Service {
    use kpr_lab::kube_proxy::{Port, Service};
    Service {
        namespace: "demo",
        name: "web",
        cluster_ip: VIP,
        ports: vec![
            Port {
                name: "http",
                protocol: "tcp",
                port: 80,
                node_port: HTTP_NODE_PORT,
                endpoints: vec![
                    SocketAddrV4::new(WEB_A, 8080),
                    SocketAddrV4::new(WEB_B, 8080),
                ],
            },
            Port {
                name: "dns",
                protocol: "udp",
                port: 53,
                node_port: DNS_NODE_PORT,
                endpoints: vec![
                    SocketAddrV4::new(WEB_A, 5353),
                    SocketAddrV4::new(WEB_B, 5353),
                ],
            },
        ],
        cluster_cidr: "10.244.0.0/16",
        node_ips: vec![NODE_IPS[0]],
    }
}

/// The same Service as kpr reads it.
fn web_manifest() -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {HTTP_NODE_PORT}}}
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {DNS_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}, {{name: dns, protocol: UDP, port: 5353}}]
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

/// Loads kube-proxy's rules into `node`.
fn load_kube_proxy(node: &Netns, mode: KubeProxyMode) -> Result<()> {
    let service = web_service();
    let (program, args, input) = match mode {
        KubeProxyMode::IptablesNft => (
            "iptables-nft-restore",
            vec!["--noflush"],
            service.iptables(),
        ),
        KubeProxyMode::IptablesLegacy => (
            "iptables-legacy-restore",
            vec!["--noflush"],
            service.iptables(),
        ),
        KubeProxyMode::Nftables => ("nft", vec!["-f", "-"], service.nftables()),
    };
    kpr_lab::bench::measure::run_timed(node, program, &args, Some(&input), true)
        .with_context(|| format!("loading kube-proxy's rules with {program}"))?;
    Ok(())
}

/// Everything of kube-proxy's the node's netfilter holds: iptables chains of either
/// backend that kube-proxy owns, rules that jump to them, nftables tables named
/// kube-proxy.
fn kube_proxy_leftovers(node: &Netns) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let text = String::from_utf8_lossy(&node.exec(save, &[])?.stdout).into_owned();
        for line in text.lines() {
            let chain = line
                .strip_prefix(':')
                .and_then(|rest| rest.split_whitespace().next());
            let owned = |name: &str| proxy_userspace::kube_proxy_rules::is_kube_proxy_chain(name);
            let jumps_to_owned = line.starts_with("-A ")
                && line
                    .split_whitespace()
                    .skip_while(|word| *word != "-j")
                    .nth(1)
                    .is_some_and(owned);
            if chain.is_some_and(owned) || jumps_to_owned {
                left.push(format!("{save}: {line}"));
            }
        }
    }
    let tables =
        String::from_utf8_lossy(&node.exec("nft", &["list", "tables"])?.stdout).into_owned();
    left.extend(
        tables
            .lines()
            .filter(|line| line.ends_with(" kube-proxy"))
            .map(|line| format!("nft: {line}")),
    );
    Ok(left)
}

/// A UDP stream: a connected socket that sends a datagram every [`STREAM_PERIOD`]
/// from a thread of its own and notes who answered, as a media or tunnel client would.
/// Its flow stays alive in netfilter's conntrack only as long as it keeps sending.
struct UdpStream {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<StreamLog>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a stream saw since it was last asked.
#[derive(Debug, Default)]
struct StreamLog {
    answers: BTreeMap<String, usize>,
    unanswered: usize,
    errors: Vec<String>,
}

const STREAM_PERIOD: Duration = Duration::from_millis(100);

impl UdpStream {
    /// Opens the stream (inside the client's namespace) and waits for its first answer.
    fn open(dst: SocketAddrV4) -> Result<(Self, String)> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(dst)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let first = Self::exchange(&socket)?.context("no first UDP answer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(StreamLog::default()));
        let thread = {
            let (stop, log) = (Arc::clone(&stop), Arc::clone(&log));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let outcome = Self::exchange(&socket);
                    let mut log = log
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match outcome {
                        Ok(Some(server)) => *log.answers.entry(server).or_default() += 1,
                        Ok(None) => log.unanswered += 1,
                        Err(error) => log.errors.push(format!("{error:#}")),
                    }
                    drop(log);
                    std::thread::sleep(STREAM_PERIOD);
                }
            })
        };
        Ok((
            Self {
                stop,
                log,
                thread: Some(thread),
            },
            first,
        ))
    }

    /// One datagram each way: the server that answered, `None` when none did in time.
    fn exchange(socket: &UdpSocket) -> Result<Option<String>> {
        socket.send(b"again\n")?;
        let mut buffer = [0u8; 1500];
        match socket.recv(&mut buffer) {
            Ok(len) => Ok(Some(
                kpr_lab::traffic::Answer::parse(&String::from_utf8_lossy(&buffer[..len]))?.server,
            )),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// What the stream saw since the last call.
    fn take(&self) -> StreamLog {
        std::mem::take(
            &mut *self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The long-lived flows, each with the backend that answered it first.
struct Flows {
    tcp: Vec<(String, Conversation, String)>,
    udp: Vec<(String, UdpStream, String)>,
}

impl Flows {
    /// Asks every flow once more; returns the flows that broke or moved, with why.
    fn check(&mut self) -> Vec<String> {
        // All at once: a broken connection costs its read timeout, once.
        let mut broken: Vec<String> = std::thread::scope(|scope| {
            let asks: Vec<_> = self
                .tcp
                .iter_mut()
                .map(|(name, conversation, backend)| {
                    scope.spawn(move || match conversation.ask() {
                        Ok(answer) if answer.server == *backend => None,
                        Ok(answer) => {
                            Some(format!("{name}: moved from {backend} to {}", answer.server))
                        }
                        Err(error) => Some(format!("{name} (to {backend}): {error:#}")),
                    })
                })
                .collect();
            asks.into_iter()
                .filter_map(|ask| {
                    ask.join()
                        .unwrap_or_else(|_| Some("a check panicked".into()))
                })
                .collect()
        });
        for (name, stream, backend) in &self.udp {
            let log = stream.take();
            let moved = log.answers.keys().any(|server| server != backend);
            if moved
                || log.unanswered > 0
                || !log.errors.is_empty()
                || !log.answers.contains_key(backend)
            {
                broken.push(format!("{name} (to {backend}): {log:?}"));
            }
        }
        broken
    }

    fn len(&self) -> usize {
        self.tcp.len() + self.udp.len()
    }
}

/// Opens the flows from the client pod (ClusterIP) and the outside client (NodePort).
fn open_lab_flows(cluster: &Cluster) -> Result<Flows> {
    let node_port = |port| SocketAddrV4::new(NODE_IPS[0], port);
    let paths: [(&Netns, &str, SocketAddrV4, SocketAddrV4); 2] = [
        (
            &cluster.nodes[0].pod("client").netns,
            "ClusterIP",
            SocketAddrV4::new(VIP, 80),
            SocketAddrV4::new(VIP, 53),
        ),
        (
            &cluster.client,
            "NodePort",
            node_port(HTTP_NODE_PORT),
            node_port(DNS_NODE_PORT),
        ),
    ];
    let mut flows = Flows {
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    for (netns, path, tcp, udp) in paths {
        let (tcp_flows, udp_flow) = netns.run(|| {
            let mut conversations = Vec::new();
            for index in 0..CONNECTIONS_PER_PATH {
                let mut conversation = Conversation::open(tcp, TIMEOUT)?;
                let answer = conversation.ask()?;
                conversations.push((format!("{path} tcp #{index}"), conversation, answer.server));
            }
            let (stream, first) = UdpStream::open(udp)?;
            Ok((conversations, (format!("{path} udp"), stream, first)))
        })?;
        flows.tcp.extend(tcp_flows);
        flows.udp.push(udp_flow);
    }
    Ok(flows)
}

/// What `count` new connections from outside (NodePort) and from the client pod
/// (ClusterIP) each did: (answered, of those the ones netfilter translates by their
/// 5-tuples in its DNAT flows, failures).
fn new_connections(cluster: &Cluster, count: usize) -> Result<(usize, usize, Vec<String>)> {
    let node_port = SocketAddrV4::new(NODE_IPS[0], HTTP_NODE_PORT);
    let sources = [
        ("NodePort", &cluster.client, node_port),
        (
            "ClusterIP",
            &cluster.nodes[0].pod("client").netns,
            SocketAddrV4::new(VIP, 80),
        ),
    ];
    let mut answered = Vec::new();
    let mut failed = Vec::new();
    for (path, netns, dst) in sources {
        let (ok, errors) = netns.run(|| {
            let mut ok = Vec::new();
            let mut errors = Vec::new();
            for index in 0..count {
                match Conversation::open(dst, NEW_CONNECTION_TIMEOUT).and_then(
                    |mut conversation| {
                        conversation.ask()?;
                        Ok(conversation)
                    },
                ) {
                    Ok(conversation) => ok.push((conversation, dst)),
                    Err(error) => errors.push(format!("new {path} connection #{index}: {error:#}")),
                }
            }
            Ok((ok, errors))
        })?;
        answered.extend(ok);
        failed.extend(errors);
    }
    let nat = cluster.nodes[0]
        .node
        .run(|| Ok(takeover::ctnetlink::nat_flows()?))?;
    let translated_by_netfilter = answered
        .iter()
        .filter(|(conversation, dst)| {
            conversation.local_addr().is_ok_and(|local| {
                nat.iter()
                    .any(|flow| flow.dst == (*dst).into() && flow.src.port() == local.port())
            })
        })
        .count();
    Ok((answered.len(), translated_by_netfilter, failed))
}

fn metric(lab: &kpr_lab::lab::Lab, name: &str) -> Result<Option<f64>> {
    Ok(lab
        .metrics()?
        .lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok()))
}

/// Two nodes with a web pod each (TCP and UDP echo), a client pod on node-a, and
/// short conntrack timeouts for closed and silent flows on node-a: netfilter forgets
/// them within seconds, so the end of a takeover comes soon after its flows end (the
/// streams send every 100 ms and wait at most 3 s for an answer, well inside 5 s).
fn lab_cluster() -> Cluster {
    let mut cluster = Cluster::new().expect("cluster");
    for (node, name, ip) in [(0, "web-a", WEB_A), (1, "web-b", WEB_B)] {
        let lab = &mut cluster.nodes[node];
        lab.add_pod(name, ip).expect("pod");
        lab.serve(name, 8080).expect("serve http");
        lab.serve(name, 5353).expect("serve dns");
    }
    cluster.nodes[0]
        .add_pod("client", CLIENT_POD)
        .expect("client pod");
    for (key, value) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
        ("net.netfilter.nf_conntrack_udp_timeout", "5"),
        ("net.netfilter.nf_conntrack_udp_timeout_stream", "5"),
    ] {
        cluster.nodes[0]
            .node
            .sysctl(key, value)
            .expect("conntrack timeout");
    }
    cluster.nodes[0]
        .write_manifest("web.yaml", &web_manifest())
        .expect("manifest");
    cluster
}

fn takeover_from(mode: KubeProxyMode) {
    let mut cluster = lab_cluster();
    load_kube_proxy(&cluster.nodes[0].node, mode).expect("kube-proxy's rules");

    // 1. Under kube-proxy: 200 connections and 2 UDP streams, spread over both
    //    backends (kube-proxy picks at random).
    let mut flows = open_lab_flows(&cluster).expect("flows under kube-proxy");
    let backends: std::collections::BTreeSet<&str> = flows
        .tcp
        .iter()
        .map(|(_, _, backend)| backend.as_str())
        .collect();
    assert_eq!(
        backends,
        ["web-a", "web-b"].into(),
        "kube-proxy spreads connections"
    );
    let established = flows.len();

    // 2. kpr starts beside kube-proxy's rules: it finds netfilter's flows and leaves
    //    them to it; new connections are its own.
    cluster.nodes[0]
        .start_agent(&["--cluster-cidr", "10.244.0.0/16"])
        .expect("agent");
    let lab = &cluster.nodes[0];
    assert_eq!(
        metric(lab, "kpr_takeover_check_enabled").expect("metrics"),
        Some(1.0)
    );
    assert_eq!(
        metric(lab, "kpr_takeover_netfilter_flows").expect("metrics"),
        Some(established as f64),
        "every flow established under kube-proxy is one netfilter translates"
    );
    let broken = flows.check();
    assert!(
        broken.is_empty(),
        "{} of {established} broke with kpr started:\n{}",
        broken.len(),
        broken.join("\n")
    );
    // kube-proxy's filter rules are still there, with the INVALID drop of
    // KUBE-FORWARD: kpr's flows pass netfilter in neither direction, so none of them
    // is half a handshake to it.
    let (answered, by_netfilter, failed) = new_connections(&cluster, 10).expect("new connections");
    assert!(
        failed.is_empty(),
        "{mode:?}, kube-proxy's rules still there: {} of 20 new connections failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(
        (answered, by_netfilter),
        (20, 0),
        "new connections are kpr's"
    );

    // 3. kube-proxy's rules go: established flows keep their backends, new
    //    connections still work (only kpr can translate them now), nothing of
    //    kube-proxy's is left.
    let kpr = kpr_lab::lab::agent_binary().expect("kpr binary");
    let cleanup = lab
        .node
        .exec(
            &kpr.display().to_string(),
            &["cleanup", "--kube-proxy-rules"],
        )
        .expect("kpr cleanup --kube-proxy-rules");
    eprintln!("cleanup: {}", String::from_utf8_lossy(&cleanup.stderr));
    let left = kube_proxy_leftovers(&lab.node).expect("listing rules");
    assert!(
        left.is_empty(),
        "kube-proxy's rules left:\n{}",
        left.join("\n")
    );
    let broken = flows.check();
    assert!(
        broken.is_empty(),
        "{} of {established} broke after the cleanup:\n{}",
        broken.len(),
        broken.join("\n")
    );
    let (answered, by_netfilter, failed) = new_connections(&cluster, 10).expect("new connections");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!(
        (answered, by_netfilter),
        (20, 0),
        "new connections are kpr's"
    );
    eprintln!(
        "{mode:?}: {established} of {established} flows established under kube-proxy kept their backend after kpr started and after kube-proxy's rules were removed"
    );
    // kubelet's chain stays (it guards route_localnet, which kube-proxy set).
    if mode != KubeProxyMode::Nftables {
        let save = if mode == KubeProxyMode::IptablesNft {
            "iptables-nft-save"
        } else {
            "iptables-legacy-save"
        };
        let filter =
            String::from_utf8_lossy(&lab.node.exec(save, &["-t", "filter"]).expect("save").stdout)
                .into_owned();
        assert!(filter.contains("-A INPUT -j KUBE-FIREWALL"), "{filter}");
    }
    // Without kube-proxy's rules netfilter would stop translating its connections
    // (no NAT chain, no rule needing conntrack): kpr's hold keeps them going.
    let held = || -> Result<bool> {
        let tables = lab.node.exec("nft", &["list", "tables"])?;
        Ok(String::from_utf8_lossy(&tables.stdout)
            .lines()
            .any(|line| line == "table ip kpr-nat-hold"))
    };
    assert!(held().expect("nft"), "the NAT hold is there");

    // 4. kube-proxy's connections end (netfilter forgets them within seconds here):
    //    the datapath stops asking netfilter, the hold goes, new connections still work.
    drop(flows);
    lab.wait_for(
        "the takeover check to go off",
        Duration::from_secs(60),
        || {
            Ok(metric(lab, "kpr_takeover_check_enabled")? == Some(0.0)
                && metric(lab, "kpr_takeover_netfilter_flows")? == Some(0.0))
        },
    )
    .unwrap_or_else(|error| {
        let left = lab.node.run(|| Ok(takeover::ctnetlink::nat_flows()?));
        panic!("{error:#}\nnetfilter's DNAT flows: {left:?}")
    });
    assert!(!held().expect("nft"), "the NAT hold is gone");
    let (answered, by_netfilter, failed) = new_connections(&cluster, 10).expect("new connections");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!((answered, by_netfilter), (20, 0));
}

#[test]
fn takeover_from_kube_proxys_iptables_mode_keeps_every_connection() {
    takeover_from(KubeProxyMode::IptablesNft);
}

#[test]
fn takeover_from_kube_proxys_iptables_legacy_mode_keeps_every_connection() {
    takeover_from(KubeProxyMode::IptablesLegacy);
}

#[test]
fn takeover_from_kube_proxys_nftables_mode_keeps_every_connection() {
    takeover_from(KubeProxyMode::Nftables);
}

/// The reverse, measured: kpr stops (programs detached) and kube-proxy's rules come
/// back. Connections kpr translated per packet (TC) were never netfilter's: their next
/// packets reach kube-proxy's rules as new flows and get a backend chosen again. A
/// ClusterIP connection survives when kube-proxy happens to choose the backend kpr
/// chose (one in the number of endpoints); the others are reset by a backend that
/// never saw them. NodePort connections are masqueraded again to a new source port
/// (`--random-fully`), so none survives. UDP streams carry on, to kube-proxy's choice.
/// New connections are kube-proxy's at once.
#[test]
fn rolling_back_to_kube_proxy_keeps_only_connections_it_sends_to_the_same_backend() {
    let mut cluster = lab_cluster();
    cluster.nodes[0]
        .start_agent(&["--cluster-cidr", "10.244.0.0/16"])
        .expect("agent");
    let mut flows = open_lab_flows(&cluster).expect("flows under kpr");
    assert!(flows.check().is_empty(), "every flow works under kpr");

    cluster.nodes[0].stop_agent().expect("stopping kpr");
    load_kube_proxy(&cluster.nodes[0].node, KubeProxyMode::IptablesNft)
        .expect("kube-proxy's rules");
    let broken = flows.check();
    let broken_on = |path: &str| {
        broken
            .iter()
            .filter(|line| line.starts_with(&format!("{path} tcp #")))
            .count()
    };
    let (cluster_ip, node_port) = (broken_on("ClusterIP"), broken_on("NodePort"));
    eprintln!(
        "rollback to kube-proxy (iptables): of {CONNECTIONS_PER_PATH} TCP connections per path kpr translated, {} ClusterIP and {} NodePort survived; UDP streams: {:?}",
        CONNECTIONS_PER_PATH - cluster_ip,
        CONNECTIONS_PER_PATH - node_port,
        broken.iter().filter(|line| line.contains(" udp")).collect::<Vec<_>>()
    );
    assert_eq!(node_port, CONNECTIONS_PER_PATH, "{broken:#?}");
    // Two endpoints: about half survive; none or all would mean the mechanism above
    // is not what happens (the odds of either by chance are 2^-99).
    assert!(
        cluster_ip > 0 && cluster_ip < CONNECTIONS_PER_PATH,
        "{broken:#?}"
    );
    let (answered, by_netfilter, failed) = new_connections(&cluster, 10).expect("new connections");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!(
        (answered, by_netfilter),
        (20, 20),
        "new connections are kube-proxy's"
    );
}
