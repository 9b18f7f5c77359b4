//! The datapath test table and its runner: crafted frames through the real, loaded TC
//! program with `BPF_PROG_TEST_RUN`, maps filled by the real syncer, output compared
//! byte for byte (checksums included) with frames built independently.
//!
//! The same table, run with a repeat count, is the per-packet benchmark.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::PerCpuValues,
    programs::{TestRun as _, TestRunOptions},
};
use proxy_common::{counter, proto, scope, service_flags, Be32, DatapathConfig, ServiceCidrV4};
use proxy_userspace::{
    datapath::{Datapath, Hook, LoadOptions},
    model::{Desired, FrontendKey, FrontendKind, FrontendSpec, ServicePortName},
    state::ObjectKey,
    sync::{frontend_addrs::FrontendAddrs, Syncer},
};

use crate::packets::{
    icmp_reply, port_unreachable_reply, sctp_field, sock, Fragment, Frame, IcmpError, SctpChunk,
    SctpCrc, TcpFlags, Transport,
};

/// The verdicts the program returns (TC_ACT_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass = 0,
    Drop = 2,
    Redirect = 7,
}

/// What the program should leave in the packet buffer.
#[derive(Clone, Debug)]
pub enum Expected {
    /// The input, byte for byte.
    Unchanged,
    /// Exactly this frame.
    Frame(Frame),
    /// Exactly these bytes.
    Bytes(Vec<u8>),
}

/// One packet of a case and what must come out.
#[derive(Clone, Debug)]
pub struct Step {
    /// The program the packet goes through.
    pub hook: Hook,
    pub input: Frame,
    pub verdict: Verdict,
    pub output: Expected,
}

/// A datapath test: frontends to program, packets in order (sharing conntrack), and
/// counters to check afterwards.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub frontends: Vec<(FrontendKey, FrontendSpec)>,
    pub steps: Vec<Step>,
    /// The node around the program: masquerade address, cluster CIDR, local backends,
    /// source ranges.
    pub node: NodeSetup,
    pub counters: Vec<(u32, u64)>,
}

impl Case {
    /// A case whose programs need nothing of the node (no masquerade address, cluster
    /// CIDR, local backends or source ranges).
    #[must_use]
    pub fn without_node(
        name: &'static str,
        frontends: Vec<(FrontendKey, FrontendSpec)>,
        steps: Vec<Step>,
        counters: Vec<(u32, u64)>,
    ) -> Self {
        Self {
            name,
            frontends,
            steps,
            node: NodeSetup::default(),
            counters,
        }
    }
}

/// What the agent would know about the node, for cases that need it.
#[derive(Clone, Debug, Default)]
pub struct NodeSetup {
    /// The masquerade address and the only SNAT port (one port makes the translation
    /// predictable, and a second flow must then find it taken).
    pub snat: Option<(Ipv4Addr, u16)>,
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// The service CIDR (`--service-cidr`).
    pub service_cidr: Option<(Ipv4Addr, u8)>,
    /// Backend addresses on this node.
    pub local_backends: Vec<Ipv4Addr>,
    /// loadBalancerSourceRanges of every service in the case.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

impl NodeSetup {
    fn config(&self) -> DatapathConfig {
        let mut config = DatapathConfig::DEFAULT;
        if let Some((addr, port)) = self.snat {
            config.snat_addr = Be32::from_ipv4(addr);
            config.snat_port_min = port;
            config.snat_port_max = port;
        }
        if let Some((addr, len)) = self.cluster_cidr {
            config.cluster_cidr_addr = Be32::from_ipv4(addr);
            config.cluster_cidr_len = len;
        }
        config
    }

    fn service_cidr(&self) -> ServiceCidrV4 {
        self.service_cidr
            .map_or_else(ServiceCidrV4::default, |(addr, len)| ServiceCidrV4 {
                addr: Be32::from_ipv4(addr),
                len,
                _pad: [0; 3],
            })
    }
}

/// A ClusterIP frontend of service `default/<name>`, port `port`.
#[must_use]
pub fn frontend(
    name: &str,
    vip: SocketAddrV4,
    l4_proto: u8,
    backends: &[SocketAddrV4],
    flags: u16,
) -> (FrontendKey, FrontendSpec) {
    (
        FrontendKey {
            addr: *vip.ip(),
            port: vip.port(),
            proto: l4_proto,
            scope: scope::DEFAULT,
        },
        FrontendSpec {
            service_port: ServicePortName {
                service: ObjectKey::new("default", name),
                port: "p".into(),
                proto: l4_proto,
            },
            kind: FrontendKind::ClusterIp,
            backends: backends.to_vec(),
            flags,
            affinity_timeout_s: if flags & service_flags::AFFINITY != 0 {
                10_800
            } else {
                0
            },
        },
    )
}

/// Addresses used by the table.
pub mod addr {
    use std::net::SocketAddrV4;

    use crate::packets::sock;

    pub fn client() -> SocketAddrV4 {
        sock(10, 244, 1, 2, 40_000)
    }
    pub fn vip() -> SocketAddrV4 {
        sock(10, 96, 0, 10, 80)
    }
    pub fn vip_dns() -> SocketAddrV4 {
        sock(10, 96, 0, 53, 53)
    }
    pub fn empty_vip() -> SocketAddrV4 {
        sock(10, 96, 0, 99, 80)
    }
    pub fn backend() -> SocketAddrV4 {
        sock(10, 244, 1, 11, 8080)
    }
    pub fn dns_backend() -> SocketAddrV4 {
        sock(10, 244, 1, 12, 5353)
    }
}

/// The table.
#[must_use]
pub fn cases() -> Vec<Case> {
    use addr::*;
    let syn = Frame::tcp(client(), vip(), TcpFlags::SYN);
    let web = frontend("web", vip(), proto::TCP, &[backend()], 0);
    let dns = frontend("dns", vip_dns(), proto::UDP, &[dns_backend()], 0);
    let query = Frame::udp(client(), vip_dns(), b"query");
    let mut unchecked_query = query.clone();
    unchecked_query.transport = Transport::Udp { checksum: false };
    let fragment = Frame::udp(client(), vip_dns(), &[7; 40]).fragment(Fragment {
        offset: 3,
        len: 24,
        more: false,
    });
    // A client reusing its source port for another ClusterIP after the first
    // connection closed: both are the same tuple once translated to the one backend.
    let other_vip = sock(10, 96, 0, 20, 80);
    let other = frontend("other", other_vip, proto::TCP, &[backend()], 0);
    let reply =
        |from: SocketAddrV4, flags: TcpFlags| Frame::tcp(backend(), client(), flags).with_src(from);
    let step = |hook: Hook, input: Frame, output: Frame| Step {
        hook,
        input,
        verdict: Verdict::Pass,
        output: Expected::Frame(output),
    };

    // One ephemeral port towards two ClusterIPs at once, both to one backend (Linux
    // picks ports per destination): the second flow's source port is remapped to the
    // masquerade range's only port here, its replies get the client's port back.
    let remapped = sock(10, 244, 1, 2, node_addr::SNAT_PORT);
    let one_port = NodeSetup {
        snat: Some((node_addr::NODE, node_addr::SNAT_PORT)),
        local_backends: vec![*backend().ip()],
        ..NodeSetup::default()
    };
    let third_vip = sock(10, 96, 0, 30, 80);
    let third = frontend("third", third_vip, proto::TCP, &[backend()], 0);
    let other_syn = Frame::tcp(client(), other_vip, TcpFlags::SYN);
    let backend_syn_ack = |to: SocketAddrV4| Frame::tcp(backend(), to, TcpFlags::SYN_ACK);

    vec![
        Case {
            name: "one client port to two ClusterIPs of one backend at once, the first flow half-open: the second flow's source port is remapped, each flow's replies come back to the client's port from its own ClusterIP; with no port left a third is dropped",
            frontends: vec![web.clone(), other.clone(), third],
            steps: vec![
                step(Hook::PodIngress, syn.clone(), syn.clone().with_dst(backend())),
                step(Hook::PodIngress, other_syn.clone(), Frame::tcp(remapped, backend(), TcpFlags::SYN)),
                step(Hook::PodEgress, backend_syn_ack(remapped), reply(other_vip, TcpFlags::SYN_ACK)),
                step(Hook::PodEgress, backend_syn_ack(client()), reply(vip(), TcpFlags::SYN_ACK)),
                step(Hook::PodIngress, Frame::tcp(client(), other_vip, TcpFlags::ACK), Frame::tcp(remapped, backend(), TcpFlags::ACK)),
                step(Hook::PodIngress, Frame::tcp(client(), vip(), TcpFlags::ACK), Frame::tcp(client(), backend(), TcpFlags::ACK)),
                // Both flows are established now; data still goes each its own way.
                step(Hook::PodEgress, Frame::tcp(backend(), remapped, TcpFlags::ACK), reply(other_vip, TcpFlags::ACK)),
                step(Hook::PodEgress, Frame::tcp(backend(), client(), TcpFlags::ACK), reply(vip(), TcpFlags::ACK)),
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), third_vip, TcpFlags::SYN),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
            ],
            node: one_port.clone(),
            counters: vec![
                (counter::NEW_FLOW, 2),
                (counter::SOURCE_PORT_REMAPPED, 1),
                (counter::CT_ASSURED, 2),
                (counter::DROP_SNAT_PORTS, 1),
                (counter::DROP_CT_INSERT, 0),
            ],
        },
        Case {
            name: "one client port to two ClusterIPs of one backend, the first flow established: the second flow's source port is remapped instead of the flow refused",
            frontends: vec![web.clone(), other.clone()],
            steps: vec![
                step(Hook::PodIngress, syn.clone(), syn.clone().with_dst(backend())),
                step(Hook::PodEgress, backend_syn_ack(client()), reply(vip(), TcpFlags::SYN_ACK)),
                step(Hook::PodIngress, Frame::tcp(client(), vip(), TcpFlags::ACK), Frame::tcp(client(), backend(), TcpFlags::ACK)),
                step(Hook::PodIngress, other_syn, Frame::tcp(remapped, backend(), TcpFlags::SYN)),
                step(Hook::PodEgress, backend_syn_ack(remapped), reply(other_vip, TcpFlags::SYN_ACK)),
                step(Hook::PodEgress, Frame::tcp(backend(), client(), TcpFlags::ACK), reply(vip(), TcpFlags::ACK)),
            ],
            node: one_port,
            counters: vec![
                (counter::NEW_FLOW, 2),
                (counter::SOURCE_PORT_REMAPPED, 1),
                (counter::DROP_CT_INSERT, 0),
            ],
        },
        Case {
            name: "a port reused for another ClusterIP once the first connection closed: the new flow's replies come from the new ClusterIP, not from the old flow's entry",
            frontends: vec![web.clone(), other],
            steps: vec![
                step(Hook::PodIngress, syn.clone(), syn.clone().with_dst(backend())),
                step(Hook::PodEgress, reply(backend(), TcpFlags::SYN_ACK), reply(vip(), TcpFlags::SYN_ACK)),
                // the handshake completes: the flow moves to the established table
                step(Hook::PodIngress, Frame::tcp(client(), vip(), TcpFlags::ACK), Frame::tcp(client(), backend(), TcpFlags::ACK)),
                step(Hook::PodIngress, Frame::tcp(client(), vip(), TcpFlags::FIN_ACK), Frame::tcp(client(), backend(), TcpFlags::FIN_ACK)),
                step(Hook::PodEgress, reply(backend(), TcpFlags::FIN_ACK), reply(vip(), TcpFlags::FIN_ACK)),
                // the same source port, to the other ClusterIP, the same backend
                step(Hook::PodIngress, Frame::tcp(client(), other_vip, TcpFlags::SYN), syn.clone().with_dst(backend())),
                step(Hook::PodEgress, reply(backend(), TcpFlags::SYN_ACK), reply(other_vip, TcpFlags::SYN_ACK)),
            ],
            node: NodeSetup::default(),
            // The closed flow gave its key up: the client's port is kept.
            counters: vec![(counter::NEW_FLOW, 2), (counter::SOURCE_PORT_REMAPPED, 0)],
        },
        Case {
            name:
                "tcp to a ClusterIP is DNATed to its backend, replies come back from the ClusterIP",
            frontends: vec![web.clone()],
            steps: vec![
                Step {
                    hook: Hook::PodIngress,
                    input: syn.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.clone().with_dst(backend())),
                },
                // the local backend's reply passes its interface after one lookup
                // (no frontend address: the lean path) and goes through the stack,
                // as the request did...
                Step {
                    hook: Hook::PodIngress,
                    input: syn
                        .clone()
                        .with_dst(backend())
                        .reply(Transport::Tcp(TcpFlags::SYN_ACK)),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                // ...and is translated back on its way into the client
                Step {
                    hook: Hook::PodEgress,
                    input: syn
                        .clone()
                        .with_dst(backend())
                        .reply(Transport::Tcp(TcpFlags::SYN_ACK)),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.reply(Transport::Tcp(TcpFlags::SYN_ACK))),
                },
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), vip(), TcpFlags::ACK),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(Frame::tcp(client(), backend(), TcpFlags::ACK)),
                },
            ],
            node: NodeSetup {
                local_backends: vec![*backend().ip()],
                ..NodeSetup::default()
            },
            counters: vec![
                (counter::NEW_FLOW, 1),
                (counter::REPLY_TRANSLATED, 1),
                (counter::FORWARD_TRANSLATED, 1),
            ],
        },
        Case {
            name: "udp to a ClusterIP is DNATed, the response comes back from the ClusterIP",
            frontends: vec![dns.clone()],
            steps: vec![
                Step {
                    hook: Hook::PodIngress,
                    input: query.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(query.clone().with_dst(dns_backend())),
                },
                Step {
                    hook: Hook::PodEgress,
                    input: {
                        let mut answer = query
                            .clone()
                            .with_dst(dns_backend())
                            .reply(Transport::Udp { checksum: true });
                        answer.payload = b"answer".to_vec();
                        answer
                    },
                    verdict: Verdict::Pass,
                    output: Expected::Frame({
                        let mut answer = query.reply(Transport::Udp { checksum: true });
                        answer.payload = b"answer".to_vec();
                        answer
                    }),
                },
            ],
            node: NodeSetup::default(),
            counters: vec![(counter::NEW_FLOW, 1), (counter::REPLY_TRANSLATED, 1)],
        },
        Case {
            name: "udp without a checksum keeps checksum 0 through DNAT",
            frontends: vec![dns.clone()],
            steps: vec![Step {
                hook: Hook::PodIngress,
                input: unchecked_query.clone(),
                verdict: Verdict::Pass,
                output: Expected::Frame(unchecked_query.with_dst(dns_backend())),
            }],
            node: NodeSetup::default(),
            counters: vec![(counter::NEW_FLOW, 1)],
        },
        Case {
            name: "traffic that is not for a service passes untouched",
            frontends: vec![web.clone(), dns.clone()],
            steps: vec![
                // straight to a pod
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), backend(), TcpFlags::SYN),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                // an address of the service CIDR no Service holds, without
                // --service-cidr: nothing is dropped
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), empty_vip(), TcpFlags::SYN),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                // a reply-shaped packet without a flow, at both hooks
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(backend(), client(), TcpFlags::SYN_ACK),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::PodEgress,
                    input: Frame::tcp(backend(), client(), TcpFlags::SYN_ACK),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                // a packet towards a ClusterIP at pod egress (never translated there)
                Step {
                    hook: Hook::PodEgress,
                    input: Frame::tcp(client(), vip(), TcpFlags::SYN),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
            ],
            node: NodeSetup::default(),
            counters: vec![
                (counter::NEW_FLOW, 0),
                (counter::REPLY_TRANSLATED, 0),
                (counter::REJECTED_UNDECLARED_PORT, 0),
                (counter::DROP_UNALLOCATED_SERVICE_IP, 0),
            ],
        },
        Case {
            name: "a port a live ClusterIP does not declare is rejected with ICMP port unreachable (tcp, and udp on a tcp-only port), from pods and from outside",
            frontends: vec![web.clone()],
            steps: vec![
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), sock(10, 96, 0, 10, 81), TcpFlags::SYN),
                    verdict: Verdict::Redirect,
                    output: Expected::Bytes(port_unreachable_reply(&Frame::tcp(
                        client(),
                        sock(10, 96, 0, 10, 81),
                        TcpFlags::SYN,
                    ))),
                },
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::udp(client(), vip(), b"x"),
                    verdict: Verdict::Redirect,
                    output: Expected::Bytes(port_unreachable_reply(&Frame::udp(
                        client(),
                        vip(),
                        b"x",
                    ))),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: Frame::tcp(sock(192, 168, 1, 50, 40_000), sock(10, 96, 0, 10, 81), TcpFlags::SYN),
                    verdict: Verdict::Redirect,
                    output: Expected::Bytes(port_unreachable_reply(&Frame::tcp(
                        sock(192, 168, 1, 50, 40_000),
                        sock(10, 96, 0, 10, 81),
                        TcpFlags::SYN,
                    ))),
                },
                // the declared port still works
                Step {
                    hook: Hook::PodIngress,
                    input: syn.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.clone().with_dst(backend())),
                },
            ],
            node: NodeSetup::default(),
            counters: vec![
                (counter::REJECTED_UNDECLARED_PORT, 3),
                (counter::REJECTED_NO_BACKEND, 0),
                (counter::NEW_FLOW, 1),
            ],
        },
        Case {
            name: "with --service-cidr, an address in it that no Service holds is dropped and counted (pods and outside); ClusterIPs and other addresses work as before",
            frontends: vec![web.clone(), dns.clone()],
            steps: vec![
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), empty_vip(), TcpFlags::SYN),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::udp(client(), sock(10, 111, 255, 254, 53), b"q"),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: Frame::tcp(sock(192, 168, 1, 50, 40_000), empty_vip(), TcpFlags::SYN),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
                // just outside the CIDR: not ours
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), sock(10, 112, 0, 1, 80), TcpFlags::SYN),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::PodIngress,
                    input: Frame::tcp(client(), backend(), TcpFlags::SYN),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::PodIngress,
                    input: query.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(query.clone().with_dst(dns_backend())),
                },
            ],
            node: NodeSetup {
                service_cidr: Some((Ipv4Addr::new(10, 96, 0, 0), 12)),
                ..NodeSetup::default()
            },
            counters: vec![
                (counter::DROP_UNALLOCATED_SERVICE_IP, 3),
                (counter::NEW_FLOW, 1),
                (counter::REJECTED_UNDECLARED_PORT, 0),
            ],
        },
        Case {
            name: "tcp to a service without endpoints is rejected with ICMP port unreachable",
            frontends: vec![frontend("empty", empty_vip(), proto::TCP, &[], 0)],
            steps: vec![Step {
                hook: Hook::PodIngress,
                input: Frame::tcp(client(), empty_vip(), TcpFlags::SYN),
                verdict: Verdict::Redirect,
                output: Expected::Bytes(port_unreachable_reply(&Frame::tcp(
                    client(),
                    empty_vip(),
                    TcpFlags::SYN,
                ))),
            }],
            node: NodeSetup::default(),
            counters: vec![(counter::REJECTED_NO_BACKEND, 1), (counter::NEW_FLOW, 0)],
        },
        Case {
            name: "udp to a service without endpoints is rejected with ICMP port unreachable",
            frontends: vec![frontend("empty", empty_vip(), proto::UDP, &[], 0)],
            steps: vec![Step {
                hook: Hook::PodIngress,
                input: Frame::udp(client(), empty_vip(), b"hi"),
                verdict: Verdict::Redirect,
                output: Expected::Bytes(port_unreachable_reply(&Frame::udp(
                    client(),
                    empty_vip(),
                    b"hi",
                ))),
            }],
            node: NodeSetup::default(),
            counters: vec![(counter::REJECTED_NO_BACKEND, 1)],
        },
        Case {
            name: "a Local-policy service with endpoints elsewhere only drops",
            frontends: vec![frontend(
                "local",
                empty_vip(),
                proto::TCP,
                &[],
                service_flags::DROP_WHEN_EMPTY,
            )],
            steps: vec![Step {
                hook: Hook::PodIngress,
                input: Frame::tcp(client(), empty_vip(), TcpFlags::SYN),
                verdict: Verdict::Drop,
                output: Expected::Unchanged,
            }],
            node: NodeSetup::default(),
            counters: vec![
                (counter::DROP_NO_LOCAL_BACKEND, 1),
                (counter::REJECTED_NO_BACKEND, 0),
            ],
        },
        Case {
            name: "a later IPv4 fragment passes untouched and is counted",
            frontends: vec![dns],
            steps: vec![Step {
                hook: Hook::PodIngress,
                input: fragment,
                verdict: Verdict::Pass,
                output: Expected::Unchanged,
            }],
            node: NodeSetup::default(),
            counters: vec![(counter::FRAGMENT_PASSED, 1), (counter::NEW_FLOW, 0)],
        },
    ]
    .into_iter()
    .chain(icmp_cases())
    .chain(fragment_cases())
    .collect()
}

/// A datagram's two fragments: the first with the UDP header and 16 payload bytes,
/// the second with the other 24.
fn halves(datagram: &Frame) -> (Frame, Frame) {
    (
        datagram.clone().fragment(Fragment {
            offset: 0,
            len: 24,
            more: true,
        }),
        datagram.clone().fragment(Fragment {
            offset: 3,
            len: 24,
            more: false,
        }),
    )
}

/// IPv4 fragments of datagrams to and from a ClusterIP: every fragment translated.
#[must_use]
pub fn fragment_cases() -> Vec<Case> {
    use addr::*;
    let dns = frontend("dns", vip_dns(), proto::UDP, &[dns_backend()], 0);
    let big_query = Frame::udp(client(), vip_dns(), &[0x42; 40]);
    let (first, later) = halves(&big_query);
    let (sent_first, sent_later) = halves(&big_query.clone().with_dst(dns_backend()));
    let mut big_answer = big_query
        .clone()
        .with_dst(dns_backend())
        .reply(Transport::Udp { checksum: true });
    big_answer.payload = vec![0x24; 40];
    let mut seen_answer = big_query.reply(Transport::Udp { checksum: true });
    seen_answer.payload = big_answer.payload.clone();
    let (answer_first, answer_later) = halves(&big_answer);
    let (seen_first, seen_later) = halves(&seen_answer);
    let step = |hook, input: &Frame, output: Expected| Step {
        hook,
        input: input.clone(),
        verdict: Verdict::Pass,
        output,
    };
    vec![
        Case {
            name: "every fragment of a datagram to a ClusterIP is DNATed (the first's UDP checksum covers the whole datagram)",
            frontends: vec![dns.clone()],
            steps: vec![
                step(Hook::PodIngress, &first, Expected::Frame(sent_first.clone())),
                step(Hook::PodIngress, &later, Expected::Frame(sent_later.clone())),
            ],
            node: NodeSetup::default(),
            counters: vec![(counter::NEW_FLOW, 1), (counter::FRAGMENT_TRANSLATED, 1)],
        },
        Case {
            name: "every fragment of the reply comes back from the ClusterIP",
            frontends: vec![dns.clone()],
            steps: vec![
                step(Hook::PodIngress, &first, Expected::Frame(sent_first.clone())),
                step(Hook::PodEgress, &answer_first, Expected::Frame(seen_first)),
                step(Hook::PodEgress, &answer_later, Expected::Frame(seen_later)),
            ],
            node: NodeSetup::default(),
            counters: vec![
                (counter::REPLY_TRANSLATED, 1),
                (counter::FRAGMENT_TRANSLATED, 1),
            ],
        },
        Case {
            name: "a later fragment ahead of its first passes untouched and is counted; once the first passed, later ones are translated",
            frontends: vec![dns],
            steps: vec![
                step(Hook::PodIngress, &later, Expected::Unchanged),
                step(Hook::PodIngress, &first, Expected::Frame(sent_first)),
                step(Hook::PodIngress, &later, Expected::Frame(sent_later)),
            ],
            node: NodeSetup::default(),
            counters: vec![
                (counter::FRAGMENT_PASSED, 1),
                (counter::FRAGMENT_TRANSLATED, 1),
            ],
        },
    ]
}

/// A router between this node and the backends (this node's own address on the pod
/// veths, which is what the kernel sends its forwarding errors from).
const ROUTER: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Linux quotes up to 576 bytes of the offending packet; RFC 792 asks for 28.
const QUOTE_ALL: usize = 576;
const QUOTE_MIN: usize = 28;

/// ICMP errors about translated pod flows, from each side, of each type: translated
/// outer and quoted headers, every checksum recomputed independently by etherparse.
#[must_use]
pub fn icmp_cases() -> Vec<Case> {
    use addr::*;
    let web = frontend("web", vip(), proto::TCP, &[backend()], 0);
    let dns = frontend("dns", vip_dns(), proto::UDP, &[dns_backend()], 0);
    let query = Frame::udp(client(), vip_dns(), b"query");
    let sent_query = query.clone().with_dst(dns_backend());
    let syn = Frame::tcp(client(), vip(), TcpFlags::SYN);
    let mut data = Frame::tcp(client(), vip(), TcpFlags::ACK);
    data.payload = vec![0x5a; 1400];
    let sent_data = data.clone().with_dst(backend());
    // An error the backend or a router sends about the translated packet, and the
    // error the client must receive: about its own packet, to the service.
    let about = |from, sent: &Frame, original: &Frame, error, quote, endpoint| {
        let arriving = Frame::icmp_error(from, sent, error, quote);
        let delivered = arriving
            .clone()
            .with_quoted(if endpoint { *original.dst.ip() } else { from }, original);
        (arriving, delivered)
    };
    let (unreachable_in, unreachable_out) = about(
        *dns_backend().ip(),
        &sent_query,
        &query,
        IcmpError::PortUnreachable,
        QUOTE_ALL,
        true,
    );
    let (frag_in, frag_out) = about(
        ROUTER,
        &sent_data,
        &data,
        IcmpError::FragNeeded { mtu: 1200 },
        QUOTE_ALL,
        false,
    );
    let (short_frag_in, short_frag_out) = about(
        ROUTER,
        &sent_data,
        &data,
        IcmpError::FragNeeded { mtu: 1200 },
        QUOTE_MIN,
        false,
    );
    let (ttl_in, ttl_out) = about(
        ROUTER,
        &sent_query,
        &query,
        IcmpError::TimeExceeded,
        QUOTE_MIN,
        false,
    );
    // The client's own error about a reply (a response to a socket it closed): it
    // leaves about the service's packet and must reach the backend about the backend's.
    let answer = sent_query.reply(Transport::Udp { checksum: true });
    let seen_answer = query.reply(Transport::Udp { checksum: true });
    let client_error = Frame::icmp_error(
        *client().ip(),
        &seen_answer,
        IcmpError::PortUnreachable,
        QUOTE_ALL,
    );
    let mut client_error_out = client_error.clone().with_quoted(*client().ip(), &answer);
    client_error_out.dst = SocketAddrV4::new(*dns_backend().ip(), 0);
    let step = |hook, input: &Frame, output: Expected| Step {
        hook,
        input: input.clone(),
        verdict: Verdict::Pass,
        output,
    };
    // The flow most cases start with: the client's query, translated to the backend.
    let query_sent = || {
        step(
            Hook::PodIngress,
            &query,
            Expected::Frame(sent_query.clone()),
        )
    };
    vec![
        Case {
            name: "ICMP port unreachable from a local UDP backend: left alone at the backend, translated into the client (outer source, quoted packet, UDP and ICMP checksums)",
            frontends: vec![dns.clone()],
            steps: vec![
                query_sent(),
                step(Hook::PodIngress, &unreachable_in, Expected::Unchanged),
                step(Hook::PodEgress, &unreachable_in, Expected::Frame(unreachable_out)),
            ],
            node: NodeSetup {
                local_backends: vec![*backend().ip()],
                ..NodeSetup::default()
            },
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1), (counter::NEW_FLOW, 1)],
        },
        Case::without_node(
            "ICMP fragmentation needed from a router quoting the whole TCP header: the router's address stays, the quoted TCP checksum follows",
            vec![web.clone()],
            vec![
                step(Hook::PodIngress, &syn, Expected::Frame(syn.clone().with_dst(backend()))),
                step(Hook::PodEgress, &frag_in, Expected::Frame(frag_out)),
                step(Hook::PodEgress, &short_frag_in, Expected::Frame(short_frag_out)),
            ],
            vec![(counter::ICMP_ERROR_TRANSLATED, 2)],
        ),
        Case::without_node(
            "ICMP time exceeded from a router quoting 8 bytes of UDP (its checksum among them)",
            vec![dns.clone()],
            vec![
                query_sent(),
                step(Hook::PodEgress, &ttl_in, Expected::Frame(ttl_out)),
            ],
            vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        ),
        Case::without_node(
            "the client's ICMP error about a reply reaches the backend about the backend's packet",
            vec![dns.clone()],
            vec![
                query_sent(),
                step(Hook::PodIngress, &client_error, Expected::Frame(client_error_out)),
            ],
            vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        ),
        Case::without_node(
            "ICMP errors about no known flow pass untouched and start nothing; they never refresh a flow",
            vec![dns],
            vec![
                // about a packet to the service itself: no flow starts from an error
                step(
                    Hook::PodIngress,
                    &Frame::icmp_error(ROUTER, &query, IcmpError::PortUnreachable, QUOTE_ALL)
                        .with_quoted(*client().ip(), &query.reply(Transport::Udp { checksum: true })),
                    Expected::Unchanged,
                ),
                step(Hook::PodEgress, &unreachable_in, Expected::Unchanged),
            ],
            vec![(counter::ICMP_ERROR_TRANSLATED, 0), (counter::NEW_FLOW, 0)],
        ),
    ]
}

/// Addresses of the node cases: this node, a client outside the cluster, a local and
/// a remote backend.
pub mod node_addr {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use crate::packets::sock;

    pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    pub const SNAT_PORT: u16 = 61_000;
    pub fn outside_client() -> SocketAddrV4 {
        sock(203, 0, 113, 7, 40_000)
    }
    pub fn node_port() -> SocketAddrV4 {
        sock(192, 168, 1, 10, 30_080)
    }
    pub fn lb_ip() -> SocketAddrV4 {
        sock(198, 51, 100, 10, 80)
    }
    pub fn local_backend() -> SocketAddrV4 {
        sock(10, 244, 1, 11, 8080)
    }
    pub fn remote_backend() -> SocketAddrV4 {
        sock(10, 244, 2, 11, 8080)
    }
    pub fn masqueraded() -> SocketAddrV4 {
        SocketAddrV4::new(NODE, SNAT_PORT)
    }
}

/// The node-facing table: NodePort, LoadBalancer and ClusterIP from outside, SNAT,
/// source ranges, hairpin. Run in an empty network namespace, where the FIB lookup
/// finds no route: the programs then pass the translated packet to the stack, so the
/// verdict is Pass and the bytes are what is compared (the redirect itself is shown by
/// the lab tests).
#[must_use]
pub fn node_cases() -> Vec<Case> {
    use node_addr::*;
    let tcp = |src, dst| Frame::tcp(src, dst, TcpFlags::SYN);
    let syn_ack = Transport::Tcp(TcpFlags::SYN_ACK);
    let external = service_flags::EXTERNAL;
    let snat = NodeSetup {
        snat: Some((NODE, SNAT_PORT)),
        cluster_cidr: Some((Ipv4Addr::new(10, 244, 0, 0), 16)),
        local_backends: vec![*local_backend().ip()],
        source_ranges: Vec::new(),
        ..NodeSetup::default()
    };
    let syn = tcp(outside_client(), node_port());
    vec![
        Case {
            name: "NodePort to a local backend: DNAT only (the backend sees the client), the reply leaves from the NodePort",
            frontends: vec![frontend("np", node_port(), proto::TCP, &[local_backend()], external)],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: syn.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.clone().with_dst(local_backend())),
                },
                Step {
                    hook: Hook::NodeEgress,
                    input: syn.clone().with_dst(local_backend()).reply(syn_ack),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.reply(syn_ack)),
                },
            ],
            node: snat.clone(),
            counters: vec![(counter::NEW_FLOW, 1), (counter::SNAT_FLOW, 0), (counter::REPLY_TRANSLATED, 1)],
        },
        Case {
            name: "NodePort to a remote backend: masqueraded with a claimed port, the reply translated back; a second flow finds the only port taken",
            frontends: vec![frontend("np", node_port(), proto::TCP, &[remote_backend()], external)],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: syn.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(tcp(masqueraded(), remote_backend())),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(masqueraded(), remote_backend()).reply(syn_ack),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.reply(syn_ack)),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(sock(203, 0, 113, 7, 40_001), node_port()),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
            ],
            node: snat.clone(),
            counters: vec![
                (counter::SNAT_FLOW, 1),
                (counter::REPLY_TRANSLATED, 1),
                (counter::DROP_SNAT_PORTS, 1),
            ],
        },
        Case {
            name: "ClusterIP from outside: masqueraded from outside the cluster CIDR, not from a pod of another node",
            frontends: vec![frontend("web", addr::vip(), proto::TCP, &[remote_backend()], 0)],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(sock(10, 244, 3, 5, 40_000), addr::vip()),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(tcp(sock(10, 244, 3, 5, 40_000), remote_backend())),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(outside_client(), addr::vip()),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(tcp(masqueraded(), remote_backend())),
                },
            ],
            node: snat.clone(),
            counters: vec![(counter::NEW_FLOW, 2), (counter::SNAT_FLOW, 1)],
        },
        Case {
            name: "loadBalancerSourceRanges: a client in range is served, others are dropped",
            frontends: vec![frontend(
                "lb",
                lb_ip(),
                proto::TCP,
                &[local_backend()],
                external | service_flags::SOURCE_RANGES,
            )],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(outside_client(), lb_ip()),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(tcp(outside_client(), local_backend())),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(sock(192, 0, 2, 1, 40_000), lb_ip()),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
            ],
            node: NodeSetup {
                source_ranges: vec![(Ipv4Addr::new(203, 0, 113, 0), 24)],
                ..snat.clone()
            },
            counters: vec![(counter::NEW_FLOW, 1), (counter::DROP_SOURCE_RANGE, 1)],
        },
        Case {
            name: "externalTrafficPolicy Local with no endpoint here drops; without a masquerade address SNAT drops",
            frontends: vec![
                frontend(
                    "etp-local",
                    lb_ip(),
                    proto::TCP,
                    &[],
                    external | service_flags::EXTERNAL_LOCAL | service_flags::DROP_WHEN_EMPTY,
                ),
                frontend("np", node_port(), proto::TCP, &[remote_backend()], external),
            ],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: tcp(outside_client(), lb_ip()),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: syn.clone(),
                    verdict: Verdict::Drop,
                    output: Expected::Unchanged,
                },
            ],
            node: NodeSetup::default(),
            counters: vec![(counter::DROP_NO_LOCAL_BACKEND, 1), (counter::DROP_NO_SNAT_ADDR, 1)],
        },
        Case {
            name: "hairpin: a pod reaching itself through its ClusterIP is masqueraded, the reply comes back from the ClusterIP",
            frontends: vec![frontend("self", addr::vip(), proto::TCP, &[sock(10, 244, 1, 2, 8080)], 0)],
            steps: vec![
                Step {
                    hook: Hook::PodIngress,
                    input: tcp(addr::client(), addr::vip()),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(tcp(masqueraded(), sock(10, 244, 1, 2, 8080))),
                },
                Step {
                    hook: Hook::PodIngress,
                    input: tcp(masqueraded(), sock(10, 244, 1, 2, 8080)).reply(syn_ack),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(tcp(addr::client(), addr::vip()).reply(syn_ack)),
                },
            ],
            node: NodeSetup {
                local_backends: vec![Ipv4Addr::new(10, 244, 1, 2)],
                ..snat
            },
            counters: vec![(counter::HAIRPIN_FLOW, 1), (counter::REPLY_TRANSLATED, 1)],
        },
    ]
    .into_iter()
    .chain(node_icmp_cases())
    .collect()
}

/// ICMP errors across SNAT and on the node-facing paths: from the backend, from a
/// router on the backend's side, from a router on the client's side.
#[must_use]
pub fn node_icmp_cases() -> Vec<Case> {
    use node_addr::*;
    let external = service_flags::EXTERNAL;
    let snat = NodeSetup {
        snat: Some((NODE, SNAT_PORT)),
        cluster_cidr: Some((Ipv4Addr::new(10, 244, 0, 0), 16)),
        local_backends: vec![*local_backend().ip()],
        source_ranges: Vec::new(),
        ..NodeSetup::default()
    };
    let backend_router = Ipv4Addr::new(10, 244, 2, 1);
    let client_router = Ipv4Addr::new(203, 0, 113, 1);
    let syn = Frame::tcp(outside_client(), node_port(), TcpFlags::SYN);
    let masqueraded_syn = Frame::tcp(masqueraded(), remote_backend(), TcpFlags::SYN);
    let mut data = Frame::tcp(outside_client(), node_port(), TcpFlags::ACK);
    data.payload = vec![0xa5; 1400];
    let mut masqueraded_data = Frame::tcp(masqueraded(), remote_backend(), TcpFlags::ACK);
    masqueraded_data.payload = data.payload.clone();
    let mut response = masqueraded_data.reply(Transport::Tcp(TcpFlags::ACK));
    response.payload = data.payload.clone();
    let mut seen_response = data.reply(Transport::Tcp(TcpFlags::ACK));
    seen_response.payload = data.payload.clone();

    let frag = IcmpError::FragNeeded { mtu: 1200 };
    let from_backend_router = Frame::icmp_error(backend_router, &masqueraded_data, frag, QUOTE_ALL);
    let from_backend = Frame::icmp_error(
        *remote_backend().ip(),
        &masqueraded_syn,
        IcmpError::PortUnreachable,
        QUOTE_MIN,
    );
    let from_client_router = Frame::icmp_error(client_router, &seen_response, frag, QUOTE_ALL);
    let mut to_backend = from_client_router
        .clone()
        .with_quoted(client_router, &response);
    to_backend.dst = SocketAddrV4::new(*remote_backend().ip(), 0);
    let local_syn = syn.clone().with_dst(local_backend());
    let from_local_backend = Frame::icmp_error(
        *local_backend().ip(),
        &local_syn,
        IcmpError::PortUnreachable,
        QUOTE_MIN,
    );
    let step = |hook, input: &Frame, output: Expected| Step {
        hook,
        input: input.clone(),
        verdict: Verdict::Pass,
        output,
    };
    let big = Frame::udp(outside_client(), node_port(), &[0x33; 40]);
    let (big_first, big_later) = halves(&big);
    let masqueraded_big = Frame::udp(masqueraded(), remote_backend(), &[0x33; 40]);
    let (masqueraded_first, masqueraded_later) = halves(&masqueraded_big);
    let mut big_reply = masqueraded_big.reply(Transport::Udp { checksum: true });
    big_reply.payload = vec![0x44; 40];
    let (reply_first, reply_later) = halves(&big_reply);
    let mut seen_reply = big.reply(Transport::Udp { checksum: true });
    seen_reply.payload = big_reply.payload.clone();
    let (seen_first, seen_later) = halves(&seen_reply);
    vec![
        Case {
            name: "every fragment of a datagram to a NodePort is masqueraded, and every fragment of its reply translated back",
            frontends: vec![frontend("np-udp", node_port(), proto::UDP, &[remote_backend()], external)],
            steps: vec![
                step(Hook::NodeIngress, &big_first, Expected::Frame(masqueraded_first)),
                step(Hook::NodeIngress, &big_later, Expected::Frame(masqueraded_later)),
                step(Hook::NodeIngress, &reply_first, Expected::Frame(seen_first)),
                step(Hook::NodeIngress, &reply_later, Expected::Frame(seen_later)),
            ],
            node: snat.clone(),
            counters: vec![(counter::SNAT_FLOW, 1), (counter::FRAGMENT_TRANSLATED, 2)],
        },
        Case {
            name: "NodePort with SNAT: errors from a router near the backend and from the backend reach the client about its own packet; the client side's router error reaches the backend about the masqueraded one",
            frontends: vec![frontend("np", node_port(), proto::TCP, &[remote_backend()], external)],
            steps: vec![
                step(Hook::NodeIngress, &syn, Expected::Frame(masqueraded_syn.clone())),
                step(
                    Hook::NodeIngress,
                    &from_backend_router,
                    Expected::Frame(from_backend_router.clone().with_quoted(backend_router, &data)),
                ),
                step(
                    Hook::NodeIngress,
                    &from_backend,
                    Expected::Frame(from_backend.clone().with_quoted(NODE, &syn)),
                ),
                step(Hook::NodeIngress, &from_client_router, Expected::Frame(to_backend)),
            ],
            node: snat.clone(),
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 3), (counter::SNAT_FLOW, 1)],
        },
        Case {
            name: "NodePort to a local backend: the backend's port unreachable leaves the node from the NodePort",
            frontends: vec![frontend("np", node_port(), proto::TCP, &[local_backend()], external)],
            steps: vec![
                step(Hook::NodeIngress, &syn, Expected::Frame(local_syn.clone())),
                step(
                    Hook::NodeEgress,
                    &from_local_backend,
                    Expected::Frame(from_local_backend.clone().with_quoted(NODE, &syn)),
                ),
            ],
            node: snat,
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        },
    ]
}

/// The routes of [`routed_cases`]: the node's address on a link of MTU 1200
/// ([`ROUTED_LINK_MTU`]) with a gateway towards the other nodes' pods and the outside
/// clients, so the FIB lookup succeeds and the programs redirect.
pub const ROUTED_LINK_MTU: u16 = 1200;
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);

/// Cases of the redirect path (run where the routes above exist): the TTL decremented
/// as by any router; TTL 1 answered with time exceeded; a DF packet bigger than the
/// route's MTU answered with fragmentation needed; both errors quote the packet as the
/// client sent it and come from the address it sent to.
#[must_use]
pub fn routed_cases() -> Vec<Case> {
    use node_addr::*;
    let external = service_flags::EXTERNAL;
    let snat = NodeSetup {
        snat: Some((NODE, SNAT_PORT)),
        cluster_cidr: Some((Ipv4Addr::new(10, 244, 0, 0), 16)),
        local_backends: Vec::new(),
        source_ranges: Vec::new(),
        ..NodeSetup::default()
    };
    let np = frontend("np", node_port(), proto::TCP, &[remote_backend()], external);
    let syn = Frame::tcp(outside_client(), node_port(), TcpFlags::SYN);
    let masqueraded_syn = Frame::tcp(masqueraded(), remote_backend(), TcpFlags::SYN);
    let syn_ack = masqueraded_syn.reply(Transport::Tcp(TcpFlags::SYN_ACK));
    let mut big = Frame::tcp(outside_client(), node_port(), TcpFlags::ACK);
    big.payload = vec![0x11; usize::from(ROUTED_LINK_MTU)];
    let mut fits = big.clone();
    fits.payload.truncate(usize::from(ROUTED_LINK_MTU) - 40);
    let mut fits_out = Frame::tcp(masqueraded(), remote_backend(), TcpFlags::ACK).with_ttl(63);
    fits_out.payload = fits.payload.clone();
    let pod_client = sock(10, 244, 1, 2, 40_000);
    let vip = sock(10, 96, 0, 10, 80);
    let pod_syn = Frame::tcp(pod_client, vip, TcpFlags::SYN);
    let local_syn = syn.clone().with_dst(local_backend());
    vec![
        // A flow passes netfilter both ways or not at all: otherwise a forward-path
        // `ct state invalid drop` (kube-proxy's KUBE-FORWARD) sees half a handshake.
        Case {
            name: "a pod's flow to a remote backend is redirected both ways: the request at the pod's interface, the reply at the node's",
            frontends: vec![frontend("web", vip, proto::TCP, &[remote_backend()], 0)],
            steps: vec![
                Step {
                    hook: Hook::PodIngress,
                    input: pod_syn.clone(),
                    verdict: Verdict::Redirect,
                    output: Expected::Frame(pod_syn.clone().with_dst(remote_backend()).with_ttl(63)),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: pod_syn
                        .clone()
                        .with_dst(remote_backend())
                        .reply(Transport::Tcp(TcpFlags::SYN_ACK)),
                    verdict: Verdict::Redirect,
                    output: Expected::Frame(
                        pod_syn.reply(Transport::Tcp(TcpFlags::SYN_ACK)).with_ttl(63),
                    ),
                },
            ],
            node: snat.clone(),
            counters: vec![(counter::REDIRECTED, 2), (counter::NEW_FLOW, 1)],
        },
        Case {
            name: "NodePort to a local backend goes through the stack both ways: translated at the node's ingress, the reply left alone at the backend's interface and translated at the node's egress",
            frontends: vec![frontend("np", node_port(), proto::TCP, &[local_backend()], external)],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: syn.clone(),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(local_syn.clone()),
                },
                Step {
                    hook: Hook::PodIngress,
                    input: local_syn.reply(Transport::Tcp(TcpFlags::SYN_ACK)),
                    verdict: Verdict::Pass,
                    output: Expected::Unchanged,
                },
                Step {
                    hook: Hook::NodeEgress,
                    input: local_syn.reply(Transport::Tcp(TcpFlags::SYN_ACK)),
                    verdict: Verdict::Pass,
                    output: Expected::Frame(syn.reply(Transport::Tcp(TcpFlags::SYN_ACK))),
                },
            ],
            node: NodeSetup {
                local_backends: vec![*local_backend().ip()],
                ..snat.clone()
            },
            counters: vec![(counter::REDIRECTED, 0), (counter::SNAT_FLOW, 0)],
        },
        Case {
            name: "redirected packets leave with their TTL decremented, both directions",
            frontends: vec![np.clone()],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: syn.clone(),
                    verdict: Verdict::Redirect,
                    output: Expected::Frame(masqueraded_syn.clone().with_ttl(63)),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: syn_ack.clone(),
                    verdict: Verdict::Redirect,
                    output: Expected::Frame(
                        syn.reply(Transport::Tcp(TcpFlags::SYN_ACK)).with_ttl(63),
                    ),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: fits.clone(),
                    verdict: Verdict::Redirect,
                    output: Expected::Frame(fits_out),
                },
            ],
            node: snat.clone(),
            counters: vec![(counter::REDIRECTED, 3), (counter::FRAG_NEEDED_SENT, 0)],
        },
        Case {
            name: "TTL 1 is answered with ICMP time exceeded from the NodePort, quoting the client's packet",
            frontends: vec![np.clone()],
            steps: vec![Step {
                hook: Hook::NodeIngress,
                input: syn.clone().with_ttl(1),
                verdict: Verdict::Redirect,
                output: Expected::Bytes(icmp_reply(&syn.clone().with_ttl(1), IcmpError::TimeExceeded)),
            }],
            node: snat.clone(),
            counters: vec![(counter::TIME_EXCEEDED_SENT, 1), (counter::REDIRECTED, 0)],
        },
        Case {
            name: "a DF packet bigger than the route's MTU is answered with ICMP fragmentation needed (MTU 1200), quoting it untranslated",
            frontends: vec![np],
            steps: vec![
                Step {
                    hook: Hook::NodeIngress,
                    input: syn,
                    verdict: Verdict::Redirect,
                    output: Expected::Frame(masqueraded_syn.with_ttl(63)),
                },
                Step {
                    hook: Hook::NodeIngress,
                    input: big.clone(),
                    verdict: Verdict::Redirect,
                    output: Expected::Bytes(icmp_reply(
                        &big,
                        IcmpError::FragNeeded {
                            mtu: ROUTED_LINK_MTU,
                        },
                    )),
                },
            ],
            node: snat,
            counters: vec![(counter::FRAG_NEEDED_SENT, 1), (counter::REDIRECTED, 1)],
        },
    ]
}

/// What one program run produced.
#[derive(Debug)]
pub struct RunOutput {
    pub verdict: i32,
    pub packet: Vec<u8>,
    /// Average time per run as the kernel measured it.
    pub duration: Duration,
}

/// The loaded datapath, private to this process (no pins).
pub struct DatapathHarness {
    pub datapath: Datapath,
    syncer: Syncer,
    frontend_addrs: FrontendAddrs,
}

impl DatapathHarness {
    /// Loads the eBPF object.
    ///
    /// # Errors
    /// When the kernel refuses it.
    pub fn new() -> Result<Self> {
        Self::with_options(&LoadOptions::default())
    }

    /// Loads the eBPF object with `options` (e.g. a small conntrack table).
    ///
    /// # Errors
    /// When the kernel refuses it.
    pub fn with_options(options: &LoadOptions) -> Result<Self> {
        crate::require_root();
        let datapath = Datapath::load(options).context("loading the datapath")?;
        let capacities = datapath.maps.capacities;
        Ok(Self {
            datapath,
            syncer: Syncer::default().with_capacity(proxy_userspace::sync::Capacity {
                services: capacities.services as usize,
                backends: capacities.backends as usize,
            }),
            frontend_addrs: FrontendAddrs::default(),
        })
    }

    /// Empties every map and zeroes the counters.
    ///
    /// # Errors
    /// When a map write fails.
    pub fn clear(&mut self) -> Result<()> {
        self.syncer = Syncer::default();
        self.frontend_addrs = FrontendAddrs::default();
        let maps = &mut self.datapath.maps;
        let keys: Vec<_> = maps.v4.frontend_addrs.keys().collect::<Result<_, _>>()?;
        for key in keys {
            maps.v4.frontend_addrs.remove(&key)?;
        }
        maps.set_service_cidr(&ServiceCidrV4::default())?;
        let keys: Vec<_> = maps.v4.services.keys().collect::<Result<_, _>>()?;
        for key in keys {
            maps.v4.services.remove(&key)?;
        }
        let keys: Vec<_> = maps.v4.backends.keys().collect::<Result<_, _>>()?;
        for key in keys {
            maps.v4.backends.remove(&key)?;
        }
        for table in [&mut maps.conntrack, &mut maps.conntrack_new] {
            let keys: Vec<_> = table.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = table.remove(&key);
            }
        }
        maps.conntrack_full.set(0, 0, 0)?;
        let keys: Vec<_> = maps.affinity.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = maps.affinity.remove(&key);
        }
        let keys: Vec<_> = maps
            .v4
            .source_ranges
            .keys()
            .filter_map(Result::ok)
            .collect();
        for key in keys {
            let _ = maps.v4.source_ranges.remove(&key);
        }
        let keys: Vec<_> = maps.fragments.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = maps.fragments.remove(&key);
        }
        let keys: Vec<_> = maps.service_stats.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = maps.service_stats.remove(&key);
        }
        maps.set_config(&DatapathConfig::DEFAULT)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| error)?;
        for index in 0..counter::COUNT {
            maps.counters
                .set(index, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        }
        Ok(())
    }

    /// Programs `frontends` through the real syncer.
    ///
    /// # Errors
    /// When the kernel refuses a write.
    pub fn install(&mut self, frontends: &[(FrontendKey, FrontendSpec)]) -> Result<()> {
        self.install_on(frontends, &NodeSetup::default())
    }

    /// Programs `frontends` and the node's settings through the real syncer.
    ///
    /// # Errors
    /// When the kernel refuses a write.
    pub fn install_on(
        &mut self,
        frontends: &[(FrontendKey, FrontendSpec)],
        node: &NodeSetup,
    ) -> Result<()> {
        self.datapath.maps.set_config(&node.config())?;
        let desired = Desired {
            v4: proxy_userspace::model::FamilyDesired {
                frontends: frontends
                    .iter()
                    .map(|(key, spec)| (*key, std::sync::Arc::new(spec.clone())))
                    .collect(),
                local_endpoints: node.local_backends.iter().copied().collect(),
                source_ranges: if node.source_ranges.is_empty() {
                    std::collections::BTreeMap::new()
                } else {
                    frontends
                        .iter()
                        .map(|(_, spec)| {
                            (
                                spec.service_port.clone(),
                                node.source_ranges.iter().copied().collect(),
                            )
                        })
                        .collect()
                },
            },
            ..Desired::default()
        };
        self.datapath.maps.set_service_cidr(&node.service_cidr())?;
        if let Some(error) = self
            .frontend_addrs
            .add_desired(&desired, &mut self.datapath.maps)
            .first()
        {
            bail!("programming the frontend address set: {error}");
        }
        let report = self.syncer.sync(&desired, &mut self.datapath.maps);
        if let Some(failure) = report.failures.first() {
            bail!("programming {}: {}", failure.service_port, failure.error);
        }
        if let Some(error) = self
            .frontend_addrs
            .remove_stale(
                &desired,
                self.syncer.frontend_addrs(),
                &mut self.datapath.maps,
            )
            .first()
        {
            bail!("programming the frontend address set: {error}");
        }
        Ok(())
    }

    /// The id the syncer gave a service port.
    #[must_use]
    pub fn service_id(&self, name: &proxy_userspace::model::ServicePortName) -> Option<u32> {
        self.syncer.service_id(name)
    }

    /// Runs the pod ingress program `repeat` times on `frame`.
    ///
    /// # Errors
    /// When BPF_PROG_TEST_RUN fails.
    pub fn run(&mut self, frame: &[u8], repeat: u32) -> Result<RunOutput> {
        self.run_on(Hook::PodIngress, frame, repeat)
    }

    /// Runs the program of `hook` `repeat` times on `frame`.
    ///
    /// # Errors
    /// When BPF_PROG_TEST_RUN fails.
    pub fn run_on(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<RunOutput> {
        let mut out = vec![0u8; 2048];
        let program = self.datapath.program(hook)?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(RunOutput {
            verdict: result.return_value as i32,
            packet: out,
            duration: result.duration,
        })
    }

    /// Runs the program of `hook` once on `frame` as if it went through the interface
    /// with index `ifindex` (which must exist in the calling thread's namespace; without
    /// one the kernel runs every program on the loopback device, index 1).
    ///
    /// # Errors
    /// When BPF_PROG_TEST_RUN fails.
    pub fn run_on_interface(
        &mut self,
        hook: Hook,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<RunOutput> {
        // A `struct __sk_buff` up to and including `ifindex` (offset 40): the kernel
        // takes its size from what is passed and wants every field it does not accept
        // from user space zero.
        const IFINDEX_OFF: usize = 40;
        let mut context = [0u8; IFINDEX_OFF + 4];
        context[IFINDEX_OFF..].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; 2048];
        let program = self.datapath.program(hook)?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&context),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(RunOutput {
            verdict: result.return_value as i32,
            packet: out,
            duration: result.duration,
        })
    }

    /// Runs a case from a clean state. Returns a description of the first mismatch.
    ///
    /// # Errors
    /// When the case fails or the kernel refuses something.
    pub fn run_case(&mut self, case: &Case) -> Result<()> {
        self.clear()?;
        self.install_on(&case.frontends, &case.node)?;
        for (index, step) in case.steps.iter().enumerate() {
            let input = step.input.to_bytes();
            let output = self.run_on(step.hook, &input, 1)?;
            let context = || format!("{}: step {} ({})", case.name, index + 1, step.hook.label());
            if output.verdict != step.verdict as i32 {
                bail!(
                    "{}: verdict {} instead of {:?}",
                    context(),
                    output.verdict,
                    step.verdict
                );
            }
            let expected = match &step.output {
                Expected::Unchanged => input.clone(),
                Expected::Frame(frame) => frame.to_bytes(),
                Expected::Bytes(bytes) => bytes.clone(),
            };
            if output.packet != expected {
                bail!(
                    "{}: packet differs\n  expected {}\n  got      {}",
                    context(),
                    hex(&expected),
                    hex(&output.packet)
                );
            }
        }
        let counters = self.datapath.maps.counters()?;
        for &(index, expected) in &case.counters {
            let name = proxy_common::COUNTER_NAMES[index as usize];
            if counters[index as usize] != expected {
                bail!(
                    "{}: counter {name} is {} instead of {expected}",
                    case.name,
                    counters[index as usize]
                );
            }
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("")
}

/// SCTP over IPv4 (translated as UDP is, its CRC32c kept valid across port changes):
/// pod to ClusterIP both ways, the address-only DNAT, a corrupted CRC, a CRC left to
/// offload, an ICMP error about a flow, fragments, and a NodePort flow masqueraded with
/// a claimed port. Every expected frame's CRC32c comes from the `crc` crate
/// ([`crate::packets::crc32c`]), never from the datapath's code. Run in an empty
/// network namespace (the node case's FIB lookup finds no route: Pass).
#[must_use]
pub fn sctp_cases() -> Vec<Case> {
    use addr::client;
    use node_addr::*;
    let vip = sock(10, 96, 0, 30, 3868);
    let backend = sock(10, 244, 1, 13, 3869);
    let same_port_vip = sock(10, 96, 0, 31, 3869);
    let diameter = frontend("diameter", vip, proto::SCTP, &[backend], 0);
    let same_port = frontend("diameter-same", same_port_vip, proto::SCTP, &[backend], 0);
    let init = Frame::sctp(client(), vip, SctpChunk::Init);
    let sent_init = init.clone().with_dst(backend);
    let init_ack = |from| Frame::sctp(from, client(), SctpChunk::InitAck);
    let data = |dst| {
        let mut frame = Frame::sctp(client(), dst, SctpChunk::Data);
        frame.payload = b"capabilities-exchange".to_vec();
        frame
    };
    let with_crc = |mut frame: Frame, crc| {
        if let Transport::Sctp { chunk, .. } = frame.transport {
            frame.transport = Transport::Sctp { chunk, crc };
        }
        frame
    };
    let step = |hook: Hook, input: Frame, output: Expected| Step {
        hook,
        input,
        verdict: Verdict::Pass,
        output,
    };
    // The backend's port unreachable about the translated INIT, quoting all of it: the
    // client must get it about its own INIT (ports and addresses), whose quoted CRC
    // stays the translated packet's (a quote's CRC is never updated, see icmp_error.rs).
    let unreachable_in = Frame::icmp_error(
        *backend.ip(),
        &sent_init,
        IcmpError::PortUnreachable,
        QUOTE_ALL,
    );
    let quoted_as_sent = with_crc(
        init.clone(),
        SctpCrc::Field(sctp_field(&sent_init.to_bytes())),
    );
    let unreachable_out = unreachable_in
        .clone()
        .with_quoted(*vip.ip(), &quoted_as_sent);
    let first_fragment = data(vip).fragment(Fragment {
        offset: 0,
        len: 24,
        more: true,
    });
    let snat = NodeSetup {
        snat: Some((NODE, SNAT_PORT)),
        cluster_cidr: Some((Ipv4Addr::new(10, 244, 0, 0), 16)),
        ..NodeSetup::default()
    };
    let outside_init = Frame::sctp(outside_client(), node_port(), SctpChunk::Init);
    let masqueraded_init = Frame::sctp(masqueraded(), remote_backend(), SctpChunk::Init);
    let init_ack_transport = Transport::Sctp {
        chunk: SctpChunk::InitAck,
        crc: SctpCrc::Valid,
    };
    vec![
        Case::without_node(
            "SCTP INIT to a ClusterIP is DNATed with its port changed and its CRC32c updated; the INIT ACK comes back from the ClusterIP; DATA follows the flow",
            vec![diameter.clone()],
            vec![
                step(Hook::PodIngress, init.clone(), Expected::Frame(sent_init.clone())),
                step(Hook::PodEgress, init_ack(backend), Expected::Frame(init_ack(vip))),
                step(Hook::PodIngress, data(vip), Expected::Frame(data(backend))),
            ],
            vec![
                (counter::NEW_FLOW, 1),
                (counter::REPLY_TRANSLATED, 1),
                (counter::FORWARD_TRANSLATED, 1),
                (counter::DROP_REWRITE, 0),
            ],
        ),
        Case::without_node(
            "SCTP to a ClusterIP whose port is its targetPort: the address changes, the CRC32c (no pseudo-header) does not",
            vec![same_port],
            vec![step(
                Hook::PodIngress,
                Frame::sctp(client(), same_port_vip, SctpChunk::Init),
                Expected::Frame(Frame::sctp(client(), backend, SctpChunk::Init)),
            )],
            vec![(counter::NEW_FLOW, 1)],
        ),
        Case::without_node(
            "an SCTP packet with a wrong CRC32c is translated, not validated: it leaves as wrong as it came, for its receiver to drop",
            vec![diameter.clone()],
            vec![step(
                Hook::PodIngress,
                with_crc(init.clone(), SctpCrc::Corrupt),
                Expected::Frame(with_crc(sent_init.clone(), SctpCrc::Corrupt)),
            )],
            vec![(counter::NEW_FLOW, 1), (counter::DROP_REWRITE, 0)],
        ),
        Case::without_node(
            "an SCTP packet whose CRC32c is left to offload (field 0, CHECKSUM_PARTIAL) keeps the field 0 through DNAT",
            vec![diameter.clone()],
            vec![step(
                Hook::PodIngress,
                with_crc(init.clone(), SctpCrc::Offload),
                Expected::Frame(with_crc(sent_init.clone(), SctpCrc::Offload)),
            )],
            vec![(counter::NEW_FLOW, 1)],
        ),
        Case::without_node(
            "ICMP port unreachable from the backend about an SCTP flow reaches the client about its own packet (ports, addresses, ICMP checksum)",
            vec![diameter.clone()],
            vec![
                step(Hook::PodIngress, init.clone(), Expected::Frame(sent_init.clone())),
                step(Hook::PodEgress, unreachable_in, Expected::Frame(unreachable_out)),
            ],
            vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        ),
        Case::without_node(
            "SCTP to a ClusterIP without endpoints, or to a port it declares for TCP only, is refused with ICMP port unreachable (kube-proxy's reject), and the association starts nothing",
            vec![
                frontend("diameter-empty", sock(10, 96, 0, 32, 3868), proto::SCTP, &[], 0),
                frontend("web", sock(10, 96, 0, 33, 3868), proto::TCP, &[backend], 0),
            ],
            [sock(10, 96, 0, 32, 3868), sock(10, 96, 0, 33, 3868)]
                .into_iter()
                .map(|dst| {
                    let refused = Frame::sctp(client(), dst, SctpChunk::Init);
                    Step {
                        hook: Hook::PodIngress,
                        output: Expected::Bytes(port_unreachable_reply(&refused)),
                        input: refused,
                        verdict: Verdict::Redirect,
                    }
                })
                .collect(),
            vec![
                (counter::REJECTED_NO_BACKEND, 1),
                (counter::REJECTED_UNDECLARED_PORT, 1),
                (counter::NEW_FLOW, 0),
            ],
        ),
        Case::without_node(
            "SCTP over IP fragments passes untouched (the CRC of a fragmented packet cannot be updated from its first fragment)",
            vec![diameter],
            vec![step(Hook::PodIngress, first_fragment, Expected::Unchanged)],
            vec![(counter::NEW_FLOW, 0)],
        ),
        Case {
            name: "SCTP NodePort to a remote backend: masqueraded with a claimed port (both ports change, the CRC32c follows), the INIT ACK translated back",
            frontends: vec![frontend(
                "np-sctp",
                node_port(),
                proto::SCTP,
                &[remote_backend()],
                service_flags::EXTERNAL,
            )],
            steps: vec![
                step(Hook::NodeIngress, outside_init.clone(), Expected::Frame(masqueraded_init.clone())),
                step(
                    Hook::NodeIngress,
                    masqueraded_init.reply(init_ack_transport),
                    Expected::Frame(outside_init.reply(init_ack_transport)),
                ),
            ],
            node: snat,
            counters: vec![
                (counter::NEW_FLOW, 1),
                (counter::SNAT_FLOW, 1),
                (counter::REPLY_TRANSLATED, 1),
            ],
        },
    ]
}
