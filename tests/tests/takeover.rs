//! Taking over from kube-proxy: flows netfilter's conntrack translates (kube-proxy's
//! DNAT, set up before kpr) are left to netfilter by the datapath, every other new flow
//! is ours.
//!
//! `the_datapath_asks_netfilter_about_new_flows_while_the_check_is_on` runs the loaded
//! TC programs with BPF_PROG_TEST_RUN inside a namespace whose netfilter holds real
//! entries, made by real sockets through a real DNAT rule: it proves that the
//! `bpf_skb_ct_lookup` kfunc loads and answers with our toolchain.
use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};
use kpr_lab::{
    datapath_cases::{frontend, DatapathHarness, NodeSetup},
    netns::Netns,
    packets::{sock, Frame, TcpFlags},
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
            drop(flows);
            Ok((nat, tcp, udp, seen))
        })
        .expect("run in the namespace");
    let (nat, tcp, udp, seen) = results;
    // netfilter's own view: both flows through the rule are DNAT flows, the plain one
    // is not.
    let nat_clients: Vec<SocketAddrV4> = nat.iter().map(|flow| flow.src).collect();
    assert!(
        nat_clients.contains(&tcp) && nat_clients.contains(&udp),
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
