//! BPF_PROG_TEST_RUN tables of the IPv6 datapath (issue 13): ClusterIP DNAT of TCP
//! and UDP at the pod-facing ingress, its reverse at the pod-facing egress, the
//! extension-header walk, first and later fragments (the later by the fragment map),
//! neighbour discovery left alone, the ICMPv6 reject, ICMPv6 errors about translated
//! flows (packet too big, port unreachable, hop limit exceeded; outer and quoted
//! headers); and the node-facing path: NodePort, LoadBalancer and ClusterIP from
//! outside, SNAT with a claimed port, the FIB redirect with the hop limit decremented,
//! packet too big and time exceeded of the redirect path.
//!
//! Frames are built with etherparse (`kpr_lab::packets::Frame6`) and the program's
//! output is compared with them byte for byte; every output frame's TCP/UDP/ICMPv6
//! checksum is also recomputed here from scratch over its bytes (`verify_checksum`),
//! an implementation that shares nothing with etherparse or the kernel helpers.
//!
//! The agent does not fill the IPv6 maps yet, so each case writes its frontends into
//! them by hand, in the syncer's layout and order (backends and slots, then the
//! frontend; the frontend address set first).
use std::net::{Ipv6Addr, SocketAddrV6};

use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData};
use kpr_lab::{
    datapath_cases::{DatapathHarness, Verdict},
    netns::Netns,
    packets::{
        icmp6_reply, port_unreachable_reply6, sctp_crc_is_valid, sock6, Ext6, Frame6, Icmp6Error,
        SctpChunk, SctpCrc, TcpFlags, Transport6, CLIENT_MAC, NODE_MAC,
    },
};
use proxy_common::{
    backend_flags, counter, ct_flags, frontend_addr, names, proto, scope, service_flags,
    AffinityKeyV6, AffinityValueV6, BackendV6, Be16, Be32, Be32x4, CtEntryV6, CtKeyV6,
    DatapathConfig, FragKeyV6, FragValueV6, FrontendAddrV6, NodeConfigV6, ServiceKeyV6,
    ServiceValueV6, SourceRangeV6,
};
use proxy_userspace::datapath::Hook;

fn client() -> SocketAddrV6 {
    sock6("fd00:10:244:1::2", 40_000)
}
fn vip() -> SocketAddrV6 {
    sock6("fd00:10:96::a", 80)
}
fn vip_dns() -> SocketAddrV6 {
    sock6("fd00:10:96::35", 53)
}
fn empty_vip() -> SocketAddrV6 {
    sock6("fd00:10:96::63", 80)
}
fn backend() -> SocketAddrV6 {
    sock6("fd00:10:244:1::b", 8080)
}
fn dns_backend() -> SocketAddrV6 {
    sock6("fd00:10:244:2::c", 5353)
}
/// A router between the client and its backend, which sends errors from its own
/// address.
fn router() -> Ipv6Addr {
    "fd00:10:244:9::1".parse().expect("an IPv6 literal")
}
/// As much of a small packet as an IPv6 error quotes: all of it.
const WHOLE: usize = 1232;

/// The node-facing side: this node's address on the underlay, its only SNAT port, a
/// client outside the cluster, frontends and backends.
fn node() -> Ipv6Addr {
    "fd00:192:168:1::10".parse().expect("an IPv6 literal")
}
const SNAT_PORT: u16 = 61_000;
fn outside_client() -> SocketAddrV6 {
    sock6("2001:db8:113::7", 40_000)
}
fn node_port() -> SocketAddrV6 {
    SocketAddrV6::new(node(), 30_080, 0, 0)
}
fn lb_ip() -> SocketAddrV6 {
    sock6("2001:db8:100::10", 80)
}
fn local_backend() -> SocketAddrV6 {
    sock6("fd00:10:244:1::11", 8080)
}
fn remote_backend() -> SocketAddrV6 {
    sock6("fd00:10:244:2::11", 8080)
}
fn masqueraded() -> SocketAddrV6 {
    SocketAddrV6::new(node(), SNAT_PORT, 0, 0)
}
/// Another node's pod: inside the cluster CIDR.
fn other_node_pod() -> SocketAddrV6 {
    sock6("fd00:10:244:3::5", 41_000)
}
fn cluster_cidr() -> (Ipv6Addr, u8) {
    ("fd00:10:244::".parse().expect("an IPv6 literal"), 56)
}

/// An IPv6 ClusterIP frontend and its backends.
#[derive(Clone, Debug)]
struct Frontend6 {
    vip: SocketAddrV6,
    proto: u8,
    backends: Vec<SocketAddrV6>,
    /// `service_flags`.
    flags: u16,
    /// `frontend_addr` kinds of its address.
    kinds: u8,
    /// Its backends run on this node (`backend_flags::LOCAL`).
    local: bool,
    /// loadBalancerSourceRanges (with `service_flags::SOURCE_RANGES`).
    source_ranges: Vec<(Ipv6Addr, u8)>,
    affinity_timeout_s: u32,
}

fn frontend6(vip: SocketAddrV6, l4_proto: u8, backends: &[SocketAddrV6]) -> Frontend6 {
    Frontend6 {
        vip,
        proto: l4_proto,
        backends: backends.to_vec(),
        flags: 0,
        kinds: frontend_addr::CLUSTER_IP,
        local: false,
        source_ranges: Vec::new(),
        affinity_timeout_s: 0,
    }
}

/// A NodePort, externalIP or LoadBalancer frontend (`service_flags::EXTERNAL`).
fn external6(addr: SocketAddrV6, backends: &[SocketAddrV6], local: bool) -> Frontend6 {
    Frontend6 {
        flags: service_flags::EXTERNAL,
        kinds: frontend_addr::OTHER,
        local,
        ..frontend6(addr, proto::TCP, backends)
    }
}

/// What the agent would know about the node, for the node-facing cases: its IPv6
/// masquerade address, the only SNAT port (one port makes the translation
/// predictable, and a second flow must then find it taken), the IPv6 cluster CIDR.
#[derive(Clone, Copy, Default)]
struct Node6 {
    snat: Option<Ipv6Addr>,
    cluster_cidr: Option<(Ipv6Addr, u8)>,
}

fn write_node6(harness: &mut DatapathHarness, node: &Node6) {
    harness
        .datapath
        .maps
        .set_config(&DatapathConfig {
            snat_port_min: SNAT_PORT,
            snat_port_max: SNAT_PORT,
            ..DatapathConfig::DEFAULT
        })
        .expect("config");
    let mut config = NodeConfigV6::default();
    if let Some(addr) = node.snat {
        config.snat_addr = Be32x4::from_ipv6(addr);
    }
    if let Some((addr, len)) = node.cluster_cidr {
        config.cluster_cidr_addr = Be32x4::from_ipv6(addr);
        config.cluster_cidr_len = len;
    }
    harness
        .datapath
        .maps
        .set_config_v6(&config)
        .expect("IPv6 config");
}

/// One packet of a case and what must come out (`None`: the input, byte for byte).
struct Step {
    hook: Hook,
    input: Vec<u8>,
    verdict: Verdict,
    output: Option<Vec<u8>>,
}

fn step(hook: Hook, input: &Frame6, verdict: Verdict, output: Option<&Frame6>) -> Step {
    Step {
        hook,
        input: input.to_bytes(),
        verdict,
        output: output.map(Frame6::to_bytes),
    }
}

struct Case {
    name: &'static str,
    frontends: Vec<Frontend6>,
    steps: Vec<Step>,
    counters: Vec<(u32, u64)>,
}

/// The map `name` on a handle of its own: the agent's `Maps` owns the IPv6 maps it
/// writes or walks (taken from the object when it loaded), the others stay in the
/// object.
fn raw_map(harness: &mut DatapathHarness, name: &str) -> aya::maps::Map {
    use std::os::fd::AsFd as _;

    use aya::maps::IterableMap as _;
    let maps = &harness.datapath.maps;
    let owned: Option<&MapData> = match name {
        names::SERVICES_V6 => Some(maps.v6.services.map()),
        names::BACKENDS_V6 => Some(maps.v6.backends.map()),
        names::FRONTEND_ADDRS_V6 => Some(maps.v6.frontend_addrs.map()),
        names::SOURCE_RANGES_V6 => Some(maps.v6.source_ranges.map()),
        names::CONNTRACK_V6 => Some(maps.conntrack_v6.map()),
        names::CONNTRACK_NEW_V6 => Some(maps.conntrack_new_v6.map()),
        names::AFFINITY_V6 => Some(maps.affinity_v6.map()),
        _ => None,
    };
    let data = match owned {
        Some(data) => data,
        None => harness
            .datapath
            .ebpf
            .map(name)
            .and_then(|map| match map {
                aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => Some(data),
                _ => None,
            })
            .unwrap_or_else(|| panic!("the object has no map {name}")),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .unwrap_or_else(|error| panic!("{name}: {error}"));
    let data = MapData::from_fd(fd).unwrap_or_else(|error| panic!("{name}: {error}"));
    aya::maps::Map::from_map_data(data).unwrap_or_else(|error| panic!("{name}: {error}"))
}

fn map<K: aya::Pod, V: aya::Pod>(
    harness: &mut DatapathHarness,
    name: &str,
) -> HashMap<MapData, K, V> {
    HashMap::try_from(raw_map(harness, name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

/// Empties every IPv6 map (the IPv4 ones and the counters: `DatapathHarness::clear`).
fn clear_v6(harness: &mut DatapathHarness) {
    fn empty<K: aya::Pod, V: aya::Pod>(harness: &mut DatapathHarness, name: &str) {
        let mut map = map::<K, V>(harness, name);
        let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            // Gone already (an LRU eviction) is as good as removed.
            let _ = map.remove(&key);
        }
    }
    empty::<ServiceKeyV6, ServiceValueV6>(harness, names::SERVICES_V6);
    empty::<u32, BackendV6>(harness, names::BACKENDS_V6);
    empty::<Be32x4, FrontendAddrV6>(harness, names::FRONTEND_ADDRS_V6);
    empty::<CtKeyV6, CtEntryV6>(harness, names::CONNTRACK_V6);
    empty::<CtKeyV6, CtEntryV6>(harness, names::CONNTRACK_NEW_V6);
    empty::<FragKeyV6, FragValueV6>(harness, names::FRAGMENTS_V6);
    empty::<AffinityKeyV6, AffinityValueV6>(harness, names::AFFINITY_V6);
    let ranges = raw_map(harness, names::SOURCE_RANGES_V6);
    let mut ranges = LpmTrie::<_, SourceRangeV6, u8>::try_from(ranges).expect("a trie");
    let keys: Vec<_> = ranges.keys().filter_map(Result::ok).collect();
    for key in keys {
        // Gone already is as good as removed.
        let _ = ranges.remove(&key);
    }
}

/// Writes `frontends` into the IPv6 maps, in the syncer's order.
fn install_v6(harness: &mut DatapathHarness, frontends: &[Frontend6]) {
    let mut backend_id = 0u32;
    for (index, frontend) in frontends.iter().enumerate() {
        let addr = Be32x4::from_ipv6(*frontend.vip.ip());
        let mut addrs = map::<Be32x4, FrontendAddrV6>(harness, names::FRONTEND_ADDRS_V6);
        let kinds = addrs.get(&addr, 0).map_or(0, |found| found.kinds) | frontend.kinds;
        addrs
            .insert(
                addr,
                FrontendAddrV6 {
                    kinds,
                    _pad: [0; 3],
                },
                0,
            )
            .expect("frontend address");
        let key = ServiceKeyV6 {
            addr,
            port: Be16::from_host(frontend.vip.port()),
            slot: 0,
            proto: frontend.proto,
            scope: scope::DEFAULT,
            _pad: [0; 2],
        };
        for (slot, backend) in frontend.backends.iter().enumerate() {
            backend_id += 1;
            map::<u32, BackendV6>(harness, names::BACKENDS_V6)
                .insert(
                    backend_id,
                    BackendV6 {
                        addr: Be32x4::from_ipv6(*backend.ip()),
                        port: Be16::from_host(backend.port()),
                        proto: frontend.proto,
                        flags: if frontend.local {
                            backend_flags::LOCAL
                        } else {
                            0
                        },
                    },
                    0,
                )
                .expect("backend");
            map::<ServiceKeyV6, ServiceValueV6>(harness, names::SERVICES_V6)
                .insert(
                    ServiceKeyV6 {
                        slot: u16::try_from(slot + 1).expect("few backends"),
                        ..key
                    },
                    ServiceValueV6 {
                        backend_id,
                        ..ServiceValueV6::default()
                    },
                    0,
                )
                .expect("slot");
        }
        let service_id = u32::try_from(index + 1).expect("few frontends");
        let ranges = raw_map(harness, names::SOURCE_RANGES_V6);
        let mut ranges = LpmTrie::<_, SourceRangeV6, u8>::try_from(ranges).expect("a trie");
        for &(range, len) in &frontend.source_ranges {
            let data = SourceRangeV6 {
                service_id: Be32::from_host(service_id),
                addr: Be32x4::from_ipv6(range),
            };
            ranges
                .insert(&Key::new(32 + u32::from(len), data), 1, 0)
                .expect("source range");
        }
        map::<ServiceKeyV6, ServiceValueV6>(harness, names::SERVICES_V6)
            .insert(
                key,
                ServiceValueV6 {
                    service_id,
                    count: u16::try_from(frontend.backends.len()).expect("few backends"),
                    flags: frontend.flags,
                    affinity_timeout_s: frontend.affinity_timeout_s,
                    ..ServiceValueV6::default()
                },
                0,
            )
            .expect("frontend");
    }
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words (RFC 1071), an odd
/// last byte padded with zero.
fn ones_complement_sum(bytes: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let high = u32::from(pair[0]) << 8;
        let low = pair.get(1).map_or(0, |&byte| u32::from(byte));
        sum += high | low;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Where the upper layer of an IPv6 frame starts and what it is, by our own walk of
/// its extension headers; `None` for a non-first fragment.
fn upper_layer(frame: &[u8]) -> Option<(usize, u8)> {
    assert_eq!(&frame[12..14], &[0x86, 0xdd], "an IPv6 frame");
    let mut next = frame[14 + 6];
    let mut at = 14 + 40;
    loop {
        match next {
            0 | 43 | 60 => {
                next = frame[at];
                at += (usize::from(frame[at + 1]) + 1) * 8;
            }
            44 => {
                let offset = u16::from_be_bytes([frame[at + 2], frame[at + 3]]) >> 3;
                if offset != 0 {
                    return None;
                }
                next = frame[at];
                at += 8;
            }
            _ => return Some((at, next)),
        }
    }
}

/// Checks the TCP, UDP or ICMPv6 checksum of `frame` (an Ethernet + IPv6 frame) from
/// scratch: the pseudo-header (RFC 8200 section 8.1) plus the upper-layer message,
/// checksum field included, must sum to 0xffff; a UDP checksum must not be 0 (IPv6
/// forbids "no checksum"). `rest`: the upper-layer bytes of the datagram's later
/// fragments, when `frame` is a first fragment.
fn verify_checksum(frame: &[u8], rest: &[u8]) {
    let (start, next) = upper_layer(frame).expect("a frame with its upper-layer header");
    let mut message = frame[start..].to_vec();
    message.extend_from_slice(rest);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[14 + 8..14 + 40]);
    pseudo.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next]);
    pseudo.extend_from_slice(&message);
    assert_eq!(
        ones_complement_sum(&pseudo),
        0xffff,
        "upper-layer {next} checksum of {}",
        hex(frame)
    );
    if next == proto::UDP {
        assert_ne!(&message[6..8], &[0, 0], "IPv6 UDP checksum 0");
    }
}

/// For an ICMPv6 error quoting the whole of a packet: checks the quoted packet's
/// TCP/UDP checksum as [`verify_checksum`] does, with the quoted addresses. `false`
/// when `frame` is no such error (nothing checked).
fn verify_quoted_checksum(frame: &[u8]) -> bool {
    let Some((start, 58)) = upper_layer(frame) else {
        return false;
    };
    let inner = start + 8;
    if frame[start] >= 128 || frame.len() < inner + 40 {
        return false;
    }
    let inner_len = 40 + usize::from(u16::from_be_bytes([frame[inner + 4], frame[inner + 5]]));
    if frame.len() != inner + inner_len {
        return false;
    }
    let mut quoted = frame[..14].to_vec();
    quoted.extend_from_slice(&frame[inner..]);
    verify_checksum(&quoted, &[]);
    true
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `case` from empty maps; the first mismatch, described.
fn run_case(harness: &mut DatapathHarness, case: &Case) -> Result<(), String> {
    run_case_on(harness, case, &Node6::default())
}

/// [`run_case`] on a node with `node`'s settings.
fn run_case_on(harness: &mut DatapathHarness, case: &Case, node: &Node6) -> Result<(), String> {
    harness.clear().map_err(|error| format!("{error:#}"))?;
    clear_v6(harness);
    write_node6(harness, node);
    install_v6(harness, &case.frontends);
    for (index, step) in case.steps.iter().enumerate() {
        let context = format!("{}: step {} ({})", case.name, index + 1, step.hook.label());
        let output = harness
            .run_on(step.hook, &step.input, 1)
            .map_err(|error| format!("{context}: {error:#}"))?;
        if output.verdict != step.verdict as i32 {
            return Err(format!(
                "{context}: verdict {} instead of {:?}",
                output.verdict, step.verdict
            ));
        }
        let expected = step.output.as_ref().unwrap_or(&step.input);
        if &output.packet != expected {
            return Err(format!(
                "{context}: packet differs\n  expected {}\n  got      {}",
                hex(expected),
                hex(&output.packet)
            ));
        }
    }
    let counters = harness
        .datapath
        .maps
        .counters()
        .map_err(|error| format!("{error:#}"))?;
    for &(index, expected) in &case.counters {
        let name = proxy_common::COUNTER_NAMES[index as usize];
        if counters[index as usize] != expected {
            return Err(format!(
                "{}: counter {name} is {} instead of {expected}",
                case.name, counters[index as usize]
            ));
        }
    }
    Ok(())
}

fn cases() -> Vec<Case> {
    let web = frontend6(vip(), proto::TCP, &[backend()]);
    let dns = frontend6(vip_dns(), proto::UDP, &[dns_backend()]);
    let empty = frontend6(empty_vip(), proto::TCP, &[]);
    let syn = Frame6::tcp(client(), vip(), TcpFlags::SYN);
    let syn_to_backend = syn.clone().with_dst(backend());
    let query = Frame6::udp(client(), vip_dns(), b"query");
    let walked = |ext: &[Ext6]| {
        (
            syn.clone().with_ext(ext),
            syn_to_backend.clone().with_ext(ext),
        )
    };
    let (hbh_dest, hbh_dest_out) = walked(&[Ext6::HopByHop, Ext6::DestOpts]);
    let (four, four_out) = walked(&[
        Ext6::HopByHop,
        Ext6::DestOpts,
        Ext6::Routing { segments_left: 0 },
        Ext6::DestOpts,
    ]);
    let five = syn.clone().with_ext(&[
        Ext6::HopByHop,
        Ext6::DestOpts,
        Ext6::Routing { segments_left: 0 },
        Ext6::DestOpts,
        Ext6::DestOpts,
    ]);
    let waypoint = syn.clone().with_ext(&[Ext6::Routing { segments_left: 1 }]);
    let datagram = Frame6::udp(client(), vip_dns(), &[7; 40]);
    let first = |frame: Frame6| {
        frame.with_ext(&[Ext6::Fragment {
            offset: 0,
            more: true,
            id: 0x1234_5678,
            len: Some(24),
        }])
    };
    let later_of = |frame: Frame6| {
        frame.with_ext(&[Ext6::Fragment {
            offset: 3,
            more: false,
            id: 0x1234_5678,
            len: None,
        }])
    };
    let later = later_of(datagram.clone());
    // The backend's answer, in the same split as the query's datagram.
    let answer = Frame6::udp(dns_backend(), client(), &[7; 40]);
    let too_big = Icmp6Error::PacketTooBig { mtu: 1280 };
    let solicitation = |dst: &str| Frame6 {
        transport: Transport6::NeighbourSolicitation,
        ..Frame6::tcp(client(), sock6(dst, 0), TcpFlags::SYN)
    };
    // A payload whose datagram, once translated, sums so that its checksum computes to
    // 0, which IPv6 UDP must send as 0xffff (0 means "none", invalid in IPv6): etherparse
    // writes 0xffff there, so that is what the frame to the backend carries.
    let zero_sum_payload = (0..=u16::MAX)
        .map(u16::to_be_bytes)
        .find(|payload| {
            let bytes = Frame6::udp(client(), dns_backend(), payload).to_bytes();
            bytes[14 + 40 + 6..14 + 40 + 8] == [0xff, 0xff]
        })
        .expect("some 2-byte payload sums to zero");
    let zero_sum = Frame6::udp(client(), vip_dns(), &zero_sum_payload);
    let reject = |name, frame: Frame6, reason| Case {
        name,
        frontends: vec![web.clone(), empty.clone()],
        steps: vec![Step {
            hook: Hook::PodIngress,
            input: frame.to_bytes(),
            verdict: Verdict::Redirect,
            output: Some(port_unreachable_reply6(&frame)),
        }],
        counters: vec![(reason, 1), (counter::NEW_FLOW, 0)],
    };
    // One ephemeral port towards two ClusterIPs at once, both to one backend: the
    // second flow's source port is remapped to the masquerade range's only port (no
    // masquerade address is needed for it), and its replies get the client's port back.
    let other_vip = sock6("fd00:10:96::14", 80);
    let third_vip = sock6("fd00:10:96::1e", 80);
    let remapped = SocketAddrV6::new(*client().ip(), SNAT_PORT, 0, 0);
    let tcp = |src, dst, flags| Frame6::tcp(src, dst, flags);
    let pass =
        |hook, input: &Frame6, output: &Frame6| step(hook, input, Verdict::Pass, Some(output));
    vec![
        Case {
            name: "one client port to two ClusterIPs of one backend at once: the second flow's source port is remapped, each flow's replies come back to the client's port from its own ClusterIP; with no port left a third is dropped",
            frontends: vec![
                web.clone(),
                frontend6(other_vip, proto::TCP, &[backend()]),
                frontend6(third_vip, proto::TCP, &[backend()]),
            ],
            steps: vec![
                pass(Hook::PodIngress, &syn, &syn_to_backend),
                pass(
                    Hook::PodIngress,
                    &tcp(client(), other_vip, TcpFlags::SYN),
                    &tcp(remapped, backend(), TcpFlags::SYN),
                ),
                pass(
                    Hook::PodEgress,
                    &tcp(backend(), remapped, TcpFlags::SYN_ACK),
                    &tcp(other_vip, client(), TcpFlags::SYN_ACK),
                ),
                pass(
                    Hook::PodEgress,
                    &tcp(backend(), client(), TcpFlags::SYN_ACK),
                    &tcp(vip(), client(), TcpFlags::SYN_ACK),
                ),
                pass(
                    Hook::PodIngress,
                    &tcp(client(), other_vip, TcpFlags::ACK),
                    &tcp(remapped, backend(), TcpFlags::ACK),
                ),
                pass(
                    Hook::PodIngress,
                    &tcp(client(), vip(), TcpFlags::ACK),
                    &tcp(client(), backend(), TcpFlags::ACK),
                ),
                // Both established: each flow's data still goes its own way.
                pass(
                    Hook::PodEgress,
                    &tcp(backend(), remapped, TcpFlags::ACK),
                    &tcp(other_vip, client(), TcpFlags::ACK),
                ),
                pass(
                    Hook::PodEgress,
                    &tcp(backend(), client(), TcpFlags::ACK),
                    &tcp(vip(), client(), TcpFlags::ACK),
                ),
                step(
                    Hook::PodIngress,
                    &tcp(client(), third_vip, TcpFlags::SYN),
                    Verdict::Drop,
                    None,
                ),
            ],
            counters: vec![
                (counter::NEW_FLOW, 2),
                (counter::SOURCE_PORT_REMAPPED, 1),
                (counter::CT_ASSURED, 2),
                (counter::DROP_SNAT_PORTS, 1),
                (counter::DROP_CT_INSERT, 0),
            ],
        },
        Case {
            name: "TCP SYN to a ClusterIP is DNATed to its backend",
            frontends: vec![web.clone()],
            steps: vec![step(
                Hook::PodIngress,
                &syn,
                Verdict::Pass,
                Some(&syn_to_backend),
            )],
            counters: vec![(counter::NEW_FLOW, 1)],
        },
        Case {
            name: "UDP to a ClusterIP is DNATed to its backend",
            frontends: vec![dns.clone()],
            steps: vec![step(
                Hook::PodIngress,
                &query,
                Verdict::Pass,
                Some(&query.clone().with_dst(dns_backend())),
            )],
            counters: vec![(counter::NEW_FLOW, 1)],
        },
        Case {
            name: "a UDP checksum that comes out 0 is sent as 0xffff",
            frontends: vec![dns.clone()],
            steps: vec![step(
                Hook::PodIngress,
                &zero_sum,
                Verdict::Pass,
                Some(&zero_sum.clone().with_dst(dns_backend())),
            )],
            counters: vec![(counter::NEW_FLOW, 1)],
        },
        Case {
            name: "the reply is translated back at egress, and the handshake establishes the flow",
            frontends: vec![web.clone()],
            steps: vec![
                step(Hook::PodIngress, &syn, Verdict::Pass, Some(&syn_to_backend)),
                step(
                    Hook::PodEgress,
                    &syn_to_backend.reply(Transport6::Tcp(TcpFlags::SYN_ACK)),
                    Verdict::Pass,
                    Some(&syn.reply(Transport6::Tcp(TcpFlags::SYN_ACK))),
                ),
                step(
                    Hook::PodIngress,
                    &Frame6::tcp(client(), vip(), TcpFlags::ACK),
                    Verdict::Pass,
                    Some(&Frame6::tcp(client(), backend(), TcpFlags::ACK)),
                ),
            ],
            counters: vec![
                (counter::NEW_FLOW, 1),
                (counter::REPLY_TRANSLATED, 1),
                (counter::FORWARD_TRANSLATED, 1),
                (counter::CT_ASSURED, 1),
            ],
        },
        Case {
            name: "UDP reply is translated back at egress",
            frontends: vec![dns.clone()],
            steps: vec![
                step(
                    Hook::PodIngress,
                    &query,
                    Verdict::Pass,
                    Some(&query.clone().with_dst(dns_backend())),
                ),
                step(
                    Hook::PodEgress,
                    &Frame6::udp(dns_backend(), client(), b"answer"),
                    Verdict::Pass,
                    Some(&Frame6::udp(vip_dns(), client(), b"answer")),
                ),
            ],
            counters: vec![(counter::NEW_FLOW, 1), (counter::REPLY_TRANSLATED, 1)],
        },
        Case {
            name: "hop-by-hop and destination options are walked and the packet translated",
            frontends: vec![web.clone()],
            steps: vec![step(
                Hook::PodIngress,
                &hbh_dest,
                Verdict::Pass,
                Some(&hbh_dest_out),
            )],
            counters: vec![(counter::NEW_FLOW, 1)],
        },
        Case {
            name: "four extension headers (routing with no segments left among them) are walked",
            frontends: vec![web.clone()],
            steps: vec![step(Hook::PodIngress, &four, Verdict::Pass, Some(&four_out))],
            counters: vec![(counter::NEW_FLOW, 1)],
        },
        Case {
            name: "five extension headers are more than the walk takes: passed untouched",
            frontends: vec![web.clone()],
            steps: vec![step(Hook::PodIngress, &five, Verdict::Pass, None)],
            counters: vec![
                (counter::NEW_FLOW, 0),
                (counter::IPV6_EXT_HEADERS_PASSED, 1),
            ],
        },
        Case {
            name: "120 bytes of extension headers are walked; 128 are more than the walk takes",
            frontends: vec![web.clone()],
            steps: vec![
                step(
                    Hook::PodIngress,
                    &syn.clone().with_ext(&[Ext6::LongDestOpts { units: 15 }]),
                    Verdict::Pass,
                    Some(&syn_to_backend.clone().with_ext(&[Ext6::LongDestOpts { units: 15 }])),
                ),
                step(
                    Hook::PodIngress,
                    &syn.clone()
                        .with_src(sock6("fd00:10:244:1::2", 40_001))
                        .with_ext(&[Ext6::LongDestOpts { units: 16 }]),
                    Verdict::Pass,
                    None,
                ),
            ],
            counters: vec![
                (counter::NEW_FLOW, 1),
                (counter::IPV6_EXT_HEADERS_PASSED, 1),
            ],
        },
        Case {
            name: "a routing header with segments left names a waypoint: passed untouched",
            frontends: vec![web.clone()],
            steps: vec![step(Hook::PodIngress, &waypoint, Verdict::Pass, None)],
            counters: vec![
                (counter::NEW_FLOW, 0),
                (counter::IPV6_EXT_HEADERS_PASSED, 1),
            ],
        },
        Case {
            name: "a first fragment is translated, and the later one follows it",
            frontends: vec![dns.clone()],
            steps: vec![
                step(
                    Hook::PodIngress,
                    &first(datagram.clone()),
                    Verdict::Pass,
                    Some(&first(datagram.clone().with_dst(dns_backend()))),
                ),
                step(
                    Hook::PodIngress,
                    &later,
                    Verdict::Pass,
                    Some(&later.clone().with_dst(dns_backend())),
                ),
            ],
            counters: vec![
                (counter::NEW_FLOW, 1),
                (counter::FRAGMENT_TRANSLATED, 1),
                (counter::FRAGMENT_PASSED, 0),
            ],
        },
        Case {
            name: "a reply's fragments are translated back at egress, the later one by the first's ports",
            frontends: vec![dns.clone()],
            steps: vec![
                step(
                    Hook::PodIngress,
                    &query,
                    Verdict::Pass,
                    Some(&query.clone().with_dst(dns_backend())),
                ),
                step(
                    Hook::PodEgress,
                    &first(answer.clone()),
                    Verdict::Pass,
                    Some(&first(answer.clone().with_src(vip_dns()))),
                ),
                step(
                    Hook::PodEgress,
                    &later_of(answer.clone()),
                    Verdict::Pass,
                    Some(&later_of(answer.clone().with_src(vip_dns()))),
                ),
            ],
            counters: vec![
                (counter::REPLY_TRANSLATED, 1),
                (counter::FRAGMENT_TRANSLATED, 1),
            ],
        },
        Case {
            name: "a later fragment before its first (or of an unknown datagram) passes",
            frontends: vec![dns.clone()],
            steps: vec![
                step(Hook::PodIngress, &later, Verdict::Pass, None),
                step(
                    Hook::PodIngress,
                    &first(datagram.clone()),
                    Verdict::Pass,
                    Some(&first(datagram.clone().with_dst(dns_backend()))),
                ),
                step(Hook::PodEgress, &later_of(answer.clone()), Verdict::Pass, None),
            ],
            counters: vec![
                (counter::NEW_FLOW, 1),
                (counter::FRAGMENT_TRANSLATED, 0),
                (counter::FRAGMENT_PASSED, 2),
            ],
        },
        Case {
            name: "a packet too big from a router about a request quotes the service to the client",
            frontends: vec![web.clone()],
            steps: vec![
                step(Hook::PodIngress, &syn, Verdict::Pass, Some(&syn_to_backend)),
                step(
                    Hook::PodEgress,
                    &Frame6::icmp_error(router(), &syn_to_backend, too_big, WHOLE),
                    Verdict::Pass,
                    Some(&Frame6::icmp_error(router(), &syn, too_big, WHOLE)),
                ),
            ],
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        },
        Case {
            name: "hop limit exceeded from a router about a request with extension headers",
            frontends: vec![web.clone()],
            steps: vec![
                step(Hook::PodIngress, &hbh_dest, Verdict::Pass, Some(&hbh_dest_out)),
                step(
                    Hook::PodEgress,
                    &Frame6::icmp_error(router(), &hbh_dest_out, Icmp6Error::HopLimitExceeded, WHOLE),
                    Verdict::Pass,
                    Some(&Frame6::icmp_error(router(), &hbh_dest, Icmp6Error::HopLimitExceeded, WHOLE)),
                ),
            ],
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        },
        Case {
            name: "a port unreachable from the backend itself comes from the service address",
            frontends: vec![dns.clone()],
            steps: vec![
                step(
                    Hook::PodIngress,
                    &query,
                    Verdict::Pass,
                    Some(&query.clone().with_dst(dns_backend())),
                ),
                step(
                    Hook::PodEgress,
                    &Frame6::icmp_error(
                        *dns_backend().ip(),
                        &query.clone().with_dst(dns_backend()),
                        Icmp6Error::PortUnreachable,
                        WHOLE,
                    ),
                    Verdict::Pass,
                    Some(&Frame6::icmp_error(
                        *vip_dns().ip(),
                        &query,
                        Icmp6Error::PortUnreachable,
                        WHOLE,
                    )),
                ),
            ],
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        },
        Case {
            name: "the client's error about a reply goes to the backend, quoting the backend's reply",
            frontends: vec![dns.clone()],
            steps: vec![
                step(
                    Hook::PodIngress,
                    &query,
                    Verdict::Pass,
                    Some(&query.clone().with_dst(dns_backend())),
                ),
                step(
                    Hook::PodEgress,
                    &answer,
                    Verdict::Pass,
                    Some(&answer.clone().with_src(vip_dns())),
                ),
                step(
                    Hook::PodIngress,
                    &Frame6::icmp_error(
                        *client().ip(),
                        &answer.clone().with_src(vip_dns()),
                        Icmp6Error::PortUnreachable,
                        WHOLE,
                    ),
                    Verdict::Pass,
                    Some(&Frame6::icmp_error(
                        *client().ip(),
                        &answer,
                        Icmp6Error::PortUnreachable,
                        WHOLE,
                    )),
                ),
            ],
            counters: vec![
                (counter::REPLY_TRANSLATED, 1),
                (counter::ICMP_ERROR_TRANSLATED, 1),
            ],
        },
        Case {
            name: "an error quoting only the ports of a TCP header is translated without its checksum",
            frontends: vec![web.clone()],
            steps: vec![
                step(Hook::PodIngress, &syn, Verdict::Pass, Some(&syn_to_backend)),
                step(
                    Hook::PodEgress,
                    &Frame6::icmp_error(router(), &syn_to_backend, too_big, 40 + 8),
                    Verdict::Pass,
                    Some(&Frame6::icmp_error(router(), &syn, too_big, 40 + 8)),
                ),
            ],
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        },
        Case {
            name: "an error about no flow we know passes untouched",
            frontends: vec![web.clone()],
            steps: vec![
                step(
                    Hook::PodEgress,
                    &Frame6::icmp_error(router(), &syn_to_backend, too_big, WHOLE),
                    Verdict::Pass,
                    None,
                ),
                step(
                    Hook::PodIngress,
                    &Frame6::icmp_error(
                        *client().ip(),
                        &syn.reply(Transport6::Tcp(TcpFlags::SYN_ACK)),
                        Icmp6Error::PortUnreachable,
                        WHOLE,
                    ),
                    Verdict::Pass,
                    None,
                ),
            ],
            counters: vec![(counter::ICMP_ERROR_TRANSLATED, 0), (counter::NEW_FLOW, 0)],
        },
        Case {
            name: "neighbour solicitations, to a frontend address or its solicited-node group, are untouched",
            frontends: vec![web.clone()],
            steps: vec![
                step(Hook::PodIngress, &solicitation("fd00:10:96::a"), Verdict::Pass, None),
                step(
                    Hook::PodIngress,
                    &solicitation("ff02::1:ff00:a"),
                    Verdict::Pass,
                    None,
                ),
                step(Hook::PodEgress, &solicitation("fd00:10:96::a"), Verdict::Pass, None),
            ],
            counters: vec![(counter::NEW_FLOW, 0)],
        },
        Case {
            name: "traffic to an address no frontend uses passes untouched",
            frontends: vec![web.clone()],
            steps: vec![step(
                Hook::PodIngress,
                &syn.clone().with_dst(sock6("fd00:10:244:3::7", 80)),
                Verdict::Pass,
                None,
            )],
            counters: vec![(counter::NEW_FLOW, 0)],
        },
        Case {
            name: "a frontend with source ranges, none of them the client's, drops",
            frontends: vec![Frontend6 {
                flags: service_flags::SOURCE_RANGES,
                ..web.clone()
            }],
            steps: vec![step(Hook::PodIngress, &syn, Verdict::Drop, None)],
            counters: vec![(counter::DROP_SOURCE_RANGE, 1), (counter::NEW_FLOW, 0)],
        },
        Case {
            name: "a Local-policy frontend without local endpoints drops",
            frontends: vec![Frontend6 {
                flags: service_flags::DROP_WHEN_EMPTY,
                ..empty.clone()
            }],
            steps: vec![step(
                Hook::PodIngress,
                &syn.clone().with_dst(empty_vip()),
                Verdict::Drop,
                None,
            )],
            counters: vec![
                (counter::DROP_NO_LOCAL_BACKEND, 1),
                (counter::REJECTED_NO_BACKEND, 0),
            ],
        },
        reject(
            "a ClusterIP without endpoints answers ICMPv6 port unreachable",
            syn.clone().with_dst(empty_vip()),
            counter::REJECTED_NO_BACKEND,
        ),
        reject(
            "the reject quotes the extension headers",
            hbh_dest.clone().with_dst(empty_vip()),
            counter::REJECTED_NO_BACKEND,
        ),
        reject(
            "a port the ClusterIP does not declare answers ICMPv6 port unreachable",
            syn.clone().with_dst(sock6("fd00:10:96::a", 81)),
            counter::REJECTED_UNDECLARED_PORT,
        ),
    ]
}

#[test]
fn ipv6_datapath_table() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    let mut failures = Vec::new();
    for case in cases() {
        if let Err(error) = run_case(&mut harness, &case) {
            failures.push(error);
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every frame the table expects out (and every input, as a check of the builder)
/// has a right checksum by the independent computation; fragments are checked with the
/// rest of their datagram.
#[test]
fn ipv6_table_frames_have_right_checksums_by_an_independent_computation() {
    let mut checked = 0;
    let mut quoted = 0;
    for case in cases() {
        for step in &case.steps {
            for frame in [Some(&step.input), step.output.as_ref()]
                .into_iter()
                .flatten()
            {
                if upper_layer(frame).is_none() {
                    continue;
                }
                let is_first_fragment = frame[14 + 6] == 44;
                if is_first_fragment {
                    // The datagram's rest is in the case's later fragment: the last 24
                    // of its 48 UDP bytes.
                    verify_checksum(frame, &[7; 24]);
                } else {
                    verify_checksum(frame, &[]);
                }
                checked += 1;
                if verify_quoted_checksum(frame) {
                    quoted += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} frames checked");
    assert!(quoted >= 8, "only {quoted} quoted packets checked");
}

/// The program's own outputs, checked with the independent computation (rather than
/// against etherparse): DNAT, the reverse, an extension-header chain, a first fragment
/// and the reject.
#[test]
fn ipv6_outputs_have_right_checksums_by_an_independent_computation() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    clear_v6(&mut harness);
    install_v6(
        &mut harness,
        &[
            frontend6(vip(), proto::TCP, &[backend()]),
            frontend6(vip_dns(), proto::UDP, &[dns_backend()]),
            frontend6(empty_vip(), proto::TCP, &[]),
        ],
    );
    let mut run = |hook, frame: &Frame6, verdict: Verdict| {
        let output = harness
            .run_on(hook, &frame.to_bytes(), 1)
            .expect("test run");
        assert_eq!(output.verdict, verdict as i32, "{frame:?}");
        output.packet
    };
    let syn = Frame6::tcp(client(), vip(), TcpFlags::SYN).with_ext(&[Ext6::HopByHop]);
    let out = run(Hook::PodIngress, &syn, Verdict::Pass);
    assert_ne!(out, syn.to_bytes(), "translated");
    verify_checksum(&out, &[]);
    let reply = Frame6::tcp(backend(), client(), TcpFlags::SYN_ACK);
    let out = run(Hook::PodEgress, &reply, Verdict::Pass);
    assert_eq!(
        &out[14 + 8..14 + 24],
        &vip().ip().octets(),
        "source back to the VIP"
    );
    verify_checksum(&out, &[]);
    let datagram = Frame6::udp(client(), vip_dns(), &[7; 40]).with_ext(&[Ext6::Fragment {
        offset: 0,
        more: true,
        id: 9,
        len: Some(24),
    }]);
    let out = run(Hook::PodIngress, &datagram, Verdict::Pass);
    verify_checksum(&out, &[7; 24]);
    // A router's packet too big about the translated SYN, and the client's port
    // unreachable about a UDP reply: the outer and the quoted checksums.
    let too_big = Frame6::icmp_error(
        router(),
        &Frame6::tcp(client(), backend(), TcpFlags::SYN).with_ext(&[Ext6::HopByHop]),
        Icmp6Error::PacketTooBig { mtu: 1280 },
        WHOLE,
    );
    let out = run(Hook::PodEgress, &too_big, Verdict::Pass);
    assert_eq!(
        &out[14 + 40 + 8 + 24..14 + 40 + 8 + 40],
        &vip().ip().octets()
    );
    verify_checksum(&out, &[]);
    assert!(verify_quoted_checksum(&out), "the whole quote");
    let query = Frame6::udp(client(), vip_dns(), b"query");
    run(Hook::PodIngress, &query, Verdict::Pass);
    let unreachable = Frame6::icmp_error(
        *client().ip(),
        &Frame6::udp(vip_dns(), client(), b"answer"),
        Icmp6Error::PortUnreachable,
        WHOLE,
    );
    let out = run(Hook::PodIngress, &unreachable, Verdict::Pass);
    assert_eq!(&out[14 + 24..14 + 40], &dns_backend().ip().octets());
    verify_checksum(&out, &[]);
    assert!(verify_quoted_checksum(&out), "the whole quote");
    let rejected = Frame6::tcp(client(), empty_vip(), TcpFlags::SYN);
    let out = run(Hook::PodIngress, &rejected, Verdict::Redirect);
    assert_eq!(
        &out[14 + 40..14 + 42],
        &[1, 4],
        "destination unreachable, port"
    );
    verify_checksum(&out, &[]);
}

/// The flow's two entries are in the IPv6 tables, through the stack, with the
/// translation and its reverse.
#[test]
fn a_new_ipv6_flow_records_both_directions_in_the_ipv6_conntrack() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    clear_v6(&mut harness);
    install_v6(&mut harness, &[frontend6(vip(), proto::TCP, &[backend()])]);
    let syn = Frame6::tcp(client(), vip(), TcpFlags::SYN);
    let output = harness
        .run_on(Hook::PodIngress, &syn.to_bytes(), 1)
        .expect("test run");
    assert_eq!(output.verdict, Verdict::Pass as i32);
    let key = |src: SocketAddrV6, dst: SocketAddrV6| CtKeyV6 {
        src_addr: Be32x4::from_ipv6(*src.ip()),
        dst_addr: Be32x4::from_ipv6(*dst.ip()),
        src_port: Be16::from_host(src.port()),
        dst_port: Be16::from_host(dst.port()),
        proto: proto::TCP,
        _pad: [0; 3],
    };
    let table = map::<CtKeyV6, CtEntryV6>(&mut harness, names::CONNTRACK_NEW_V6);
    let forward = table.get(&key(client(), vip()), 0).expect("forward entry");
    assert_eq!(
        forward.flags,
        ct_flags::VIA_STACK | ct_flags::REWRITE_DST,
        "forward flags"
    );
    assert_eq!(forward.nat_dst_addr, Be32x4::from_ipv6(*backend().ip()));
    assert_eq!(forward.nat_dst_port, Be16::from_host(backend().port()));
    let reply = table
        .get(&key(backend(), client()), 0)
        .expect("reply entry");
    assert_eq!(
        reply.flags,
        ct_flags::VIA_STACK | ct_flags::REPLY | ct_flags::REWRITE_SRC,
        "reply flags"
    );
    assert_eq!(reply.nat_src_addr, Be32x4::from_ipv6(*vip().ip()));
    assert_eq!(reply.nat_src_port, Be16::from_host(vip().port()));
}

/// The node-facing table: NodePort, LoadBalancer and ClusterIP from outside, SNAT
/// with its one port, the reject, ICMPv6 errors and fragments of masqueraded flows.
/// Run in an empty network namespace, where IPv6 forwarding is off and the FIB lookup
/// refuses: the programs then pass the translated packet to the stack, so the verdict
/// is Pass and the bytes are what is compared (the redirect: [`routed_cases`]).
fn node_cases() -> Vec<(Case, Node6)> {
    let snat = Node6 {
        snat: Some(node()),
        cluster_cidr: Some(cluster_cidr()),
    };
    let syn = Frame6::tcp(outside_client(), node_port(), TcpFlags::SYN);
    let syn_ack = Transport6::Tcp(TcpFlags::SYN_ACK);
    let masqueraded_syn = Frame6::tcp(masqueraded(), remote_backend(), TcpFlags::SYN);
    let np_remote = external6(node_port(), &[remote_backend()], false);
    let cluster_ip = frontend6(vip(), proto::TCP, &[remote_backend()]);
    let backend_router: Ipv6Addr = "fd00:10:244:2::1".parse().expect("an IPv6 literal");
    let datagram = |src, dst| Frame6::udp(src, dst, &[7; 40]);
    let split = |frame: Frame6, first: bool| {
        frame.with_ext(&[Ext6::Fragment {
            offset: if first { 0 } else { 3 },
            more: first,
            id: 0x0bad_cafe,
            len: first.then_some(24),
        }])
    };
    let np_udp = Frontend6 {
        proto: proto::UDP,
        ..np_remote.clone()
    };
    vec![
        (
            Case {
                name: "NodePort to a local backend: DNAT only, the reply leaves from the NodePort",
                frontends: vec![external6(node_port(), &[local_backend()], true)],
                steps: vec![
                    step(
                        Hook::NodeIngress,
                        &syn,
                        Verdict::Pass,
                        Some(&syn.clone().with_dst(local_backend())),
                    ),
                    step(
                        Hook::NodeEgress,
                        &syn.clone().with_dst(local_backend()).reply(syn_ack),
                        Verdict::Pass,
                        Some(&syn.reply(syn_ack)),
                    ),
                ],
                counters: vec![
                    (counter::NEW_FLOW, 1),
                    (counter::SNAT_FLOW, 0),
                    (counter::REPLY_TRANSLATED, 1),
                ],
            },
            snat,
        ),
        (
            Case {
                name: "NodePort to a remote backend: DNAT and SNAT to the node's port, the reply translated back at ingress",
                frontends: vec![np_remote.clone()],
                steps: vec![
                    step(Hook::NodeIngress, &syn, Verdict::Pass, Some(&masqueraded_syn)),
                    step(
                        Hook::NodeIngress,
                        &masqueraded_syn.reply(syn_ack),
                        Verdict::Pass,
                        Some(&syn.reply(syn_ack)),
                    ),
                ],
                counters: vec![
                    (counter::NEW_FLOW, 1),
                    (counter::SNAT_FLOW, 1),
                    (counter::REPLY_TRANSLATED, 1),
                ],
            },
            snat,
        ),
        (
            Case {
                name: "the only SNAT port held by a live flow: a second client's flow is dropped",
                frontends: vec![np_remote.clone()],
                steps: vec![
                    step(Hook::NodeIngress, &syn, Verdict::Pass, Some(&masqueraded_syn)),
                    step(
                        Hook::NodeIngress,
                        &syn.clone().with_src(sock6("2001:db8:113::8", 40_000)),
                        Verdict::Drop,
                        None,
                    ),
                ],
                counters: vec![(counter::SNAT_FLOW, 1), (counter::DROP_SNAT_PORTS, 1)],
            },
            snat,
        ),
        (
            Case {
                name: "no IPv6 masquerade address: a flow that needs SNAT is dropped",
                frontends: vec![np_remote.clone()],
                steps: vec![step(Hook::NodeIngress, &syn, Verdict::Drop, None)],
                counters: vec![(counter::DROP_NO_SNAT_ADDR, 1), (counter::NEW_FLOW, 0)],
            },
            Node6 {
                snat: None,
                ..snat
            },
        ),
        (
            Case {
                name: "LoadBalancer IP to a remote backend is masqueraded",
                frontends: vec![external6(lb_ip(), &[remote_backend()], false)],
                steps: vec![step(
                    Hook::NodeIngress,
                    &Frame6::tcp(outside_client(), lb_ip(), TcpFlags::SYN),
                    Verdict::Pass,
                    Some(&masqueraded_syn),
                )],
                counters: vec![(counter::SNAT_FLOW, 1)],
            },
            snat,
        ),
        (
            Case {
                name: "ClusterIP from another node's pod (inside the cluster CIDR): DNAT only",
                frontends: vec![cluster_ip.clone()],
                steps: vec![step(
                    Hook::NodeIngress,
                    &Frame6::tcp(other_node_pod(), vip(), TcpFlags::SYN),
                    Verdict::Pass,
                    Some(&Frame6::tcp(other_node_pod(), remote_backend(), TcpFlags::SYN)),
                )],
                counters: vec![(counter::NEW_FLOW, 1), (counter::SNAT_FLOW, 0)],
            },
            snat,
        ),
        (
            Case {
                name: "ClusterIP from outside the cluster CIDR is masqueraded",
                frontends: vec![cluster_ip],
                steps: vec![step(
                    Hook::NodeIngress,
                    &Frame6::tcp(outside_client(), vip(), TcpFlags::SYN),
                    Verdict::Pass,
                    Some(&masqueraded_syn),
                )],
                counters: vec![(counter::SNAT_FLOW, 1)],
            },
            snat,
        ),
        (
            Case {
                name: "LoadBalancer source ranges: a client inside one is served, one outside every range dropped",
                frontends: vec![Frontend6 {
                    flags: service_flags::EXTERNAL | service_flags::SOURCE_RANGES,
                    source_ranges: vec![
                        ("2001:db8:113::".parse().expect("an IPv6 literal"), 48),
                        ("2001:db8:200::1".parse().expect("an IPv6 literal"), 128),
                    ],
                    ..external6(lb_ip(), &[remote_backend()], false)
                }],
                steps: vec![
                    step(
                        Hook::NodeIngress,
                        &Frame6::tcp(outside_client(), lb_ip(), TcpFlags::SYN),
                        Verdict::Pass,
                        Some(&masqueraded_syn),
                    ),
                    step(
                        Hook::NodeIngress,
                        &Frame6::tcp(sock6("2001:db8:114::7", 40_000), lb_ip(), TcpFlags::SYN),
                        Verdict::Drop,
                        None,
                    ),
                    step(
                        Hook::NodeIngress,
                        &Frame6::tcp(sock6("2001:db8:200::2", 40_000), lb_ip(), TcpFlags::SYN),
                        Verdict::Drop,
                        None,
                    ),
                ],
                counters: vec![(counter::SNAT_FLOW, 1), (counter::DROP_SOURCE_RANGE, 2)],
            },
            snat,
        ),
        (
            Case {
                name: "a NodePort without endpoints answers port unreachable from the node's address",
                frontends: vec![external6(node_port(), &[], false)],
                steps: vec![Step {
                    hook: Hook::NodeIngress,
                    input: syn.to_bytes(),
                    verdict: Verdict::Redirect,
                    output: Some(port_unreachable_reply6(&syn)),
                }],
                counters: vec![(counter::REJECTED_NO_BACKEND, 1)],
            },
            snat,
        ),
        (
            Case {
                name: "a node port no frontend declares is the node's own: untouched",
                frontends: vec![np_remote.clone()],
                steps: vec![step(
                    Hook::NodeIngress,
                    &Frame6::tcp(outside_client(), SocketAddrV6::new(node(), 22, 0, 0), TcpFlags::SYN),
                    Verdict::Pass,
                    None,
                )],
                counters: vec![(counter::NEW_FLOW, 0)],
            },
            snat,
        ),
        (
            Case {
                name: "a router's packet too big about the masqueraded packet reaches the client about its own",
                frontends: vec![np_remote.clone()],
                steps: vec![
                    step(Hook::NodeIngress, &syn, Verdict::Pass, Some(&masqueraded_syn)),
                    step(
                        Hook::NodeIngress,
                        &Frame6::icmp_error(
                            backend_router,
                            &masqueraded_syn,
                            Icmp6Error::PacketTooBig { mtu: 1280 },
                            WHOLE,
                        ),
                        Verdict::Pass,
                        Some(&Frame6::icmp_error(
                            backend_router,
                            &syn,
                            Icmp6Error::PacketTooBig { mtu: 1280 },
                            WHOLE,
                        )),
                    ),
                ],
                counters: vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
            },
            snat,
        ),
        (
            Case {
                name: "a NodePort datagram's fragments are masqueraded alike, the later by the first's ports",
                frontends: vec![np_udp],
                steps: vec![
                    step(
                        Hook::NodeIngress,
                        &split(datagram(outside_client(), node_port()), true),
                        Verdict::Pass,
                        Some(&split(datagram(masqueraded(), remote_backend()), true)),
                    ),
                    step(
                        Hook::NodeIngress,
                        &split(datagram(outside_client(), node_port()), false),
                        Verdict::Pass,
                        Some(&split(datagram(masqueraded(), remote_backend()), false)),
                    ),
                ],
                counters: vec![
                    (counter::SNAT_FLOW, 1),
                    (counter::FRAGMENT_TRANSLATED, 1),
                ],
            },
            snat,
        ),
    ]
}

/// The routed namespace's link: MTU, the gateway towards the other nodes' pods and
/// the outside clients.
const ROUTED_MTU: u16 = 1400;
const ROUTED_GATEWAY: &str = "fd00:192:168:1::1";

/// Cases of the redirect path, run where the routes of `ipv6_routed_datapath_table`
/// exist: the hop limit decremented on each redirect, both ways; hop limit 1 answered
/// with time exceeded and a packet bigger than the route's MTU with packet too big,
/// both quoting the packet as the client sent it, from the address it sent to.
fn routed_cases() -> Vec<(Case, Node6)> {
    let snat = Node6 {
        snat: Some(node()),
        cluster_cidr: Some(cluster_cidr()),
    };
    let np = external6(node_port(), &[remote_backend()], false);
    let syn = Frame6::tcp(outside_client(), node_port(), TcpFlags::SYN);
    let masqueraded_syn = Frame6::tcp(masqueraded(), remote_backend(), TcpFlags::SYN);
    let syn_ack = Transport6::Tcp(TcpFlags::SYN_ACK);
    let hop = |mut frame: Frame6, hop_limit| {
        frame.hop_limit = hop_limit;
        frame
    };
    let mut big = Frame6::tcp(outside_client(), node_port(), TcpFlags::ACK);
    big.payload = vec![0x11; usize::from(ROUTED_MTU)];
    let mut fits = big.clone();
    // The IPv6 header (40) and TCP header (20) with the payload fill the MTU exactly.
    fits.payload.truncate(usize::from(ROUTED_MTU) - 60);
    let mut fits_out = hop(
        Frame6::tcp(masqueraded(), remote_backend(), TcpFlags::ACK),
        63,
    );
    fits_out.payload = fits.payload.clone();
    // The hairpin: a pod reaching itself through its ClusterIP (the backend is the
    // client's own address) is masqueraded to the node and redirected both ways.
    let own = SocketAddrV6::new(*client().ip(), 8080, 0, 0);
    let hairpin = frontend6(vip(), proto::TCP, &[own]);
    let pod_syn = Frame6::tcp(client(), vip(), TcpFlags::SYN);
    let hairpin_syn = Frame6::tcp(masqueraded(), own, TcpFlags::SYN);
    // Sent back out of the interface it came in on, as a router: from the node's MAC
    // to the pod's, one hop less.
    let back_to_pod = |mut frame: Frame6| {
        frame.src_mac = NODE_MAC;
        frame.dst_mac = CLIENT_MAC;
        frame.hop_limit -= 1;
        frame
    };
    // The pod's reply, from its MAC to the node's.
    let mut hairpin_syn_ack = hairpin_syn.reply(syn_ack);
    hairpin_syn_ack.src_mac = CLIENT_MAC;
    hairpin_syn_ack.dst_mac = NODE_MAC;
    vec![
        (
            Case {
                name: "NodePort to a remote backend is redirected with the hop limit decremented, and so is its reply",
                frontends: vec![np.clone()],
                steps: vec![
                    step(
                        Hook::NodeIngress,
                        &syn,
                        Verdict::Redirect,
                        Some(&hop(masqueraded_syn.clone(), 63)),
                    ),
                    step(
                        Hook::NodeIngress,
                        &masqueraded_syn.reply(syn_ack),
                        Verdict::Redirect,
                        Some(&hop(syn.reply(syn_ack), 63)),
                    ),
                ],
                counters: vec![(counter::REDIRECTED, 2), (counter::SNAT_FLOW, 1)],
            },
            snat,
        ),
        (
            Case {
                name: "a pod reaching itself is masqueraded to the node and redirected, and so is its reply",
                frontends: vec![hairpin],
                steps: vec![
                    // A new flow whose first packet has hop limit 1 is dropped before it
                    // claims the only masquerade port, which the next flow then gets.
                    step(
                        Hook::PodIngress,
                        &hop(
                            pod_syn
                                .clone()
                                .with_src(SocketAddrV6::new(*client().ip(), 40_001, 0, 0)),
                            1,
                        ),
                        Verdict::Drop,
                        None,
                    ),
                    step(
                        Hook::PodIngress,
                        &pod_syn,
                        Verdict::Redirect,
                        Some(&back_to_pod(hairpin_syn.clone())),
                    ),
                    step(
                        Hook::PodIngress,
                        &hairpin_syn_ack,
                        Verdict::Redirect,
                        Some(&back_to_pod(pod_syn.reply(syn_ack))),
                    ),
                    // Hop limit 1 would run out on this hop: dropped, not answered.
                    step(Hook::PodIngress, &hop(pod_syn.clone(), 1), Verdict::Drop, None),
                ],
                counters: vec![
                    (counter::REDIRECTED, 2),
                    (counter::HAIRPIN_FLOW, 1),
                    (counter::SNAT_FLOW, 0),
                    (counter::DROP_TTL_EXCEEDED, 2),
                    (counter::DROP_SNAT_PORTS, 0),
                ],
            },
            snat,
        ),
        (
            Case {
                name: "hop limit 1 is answered with time exceeded, quoting the packet untranslated",
                frontends: vec![np.clone()],
                steps: vec![Step {
                    hook: Hook::NodeIngress,
                    input: hop(syn.clone(), 1).to_bytes(),
                    verdict: Verdict::Redirect,
                    output: Some(icmp6_reply(&hop(syn.clone(), 1), Icmp6Error::HopLimitExceeded)),
                }],
                counters: vec![(counter::TIME_EXCEEDED_SENT, 1), (counter::REDIRECTED, 0)],
            },
            snat,
        ),
        (
            Case {
                name: "a packet bigger than the route's MTU is answered with packet too big (MTU 1400); one that fits is redirected",
                frontends: vec![np],
                steps: vec![
                    step(Hook::NodeIngress, &syn, Verdict::Redirect, Some(&hop(masqueraded_syn, 63))),
                    Step {
                        hook: Hook::NodeIngress,
                        input: big.to_bytes(),
                        verdict: Verdict::Redirect,
                        output: Some(icmp6_reply(
                            &big,
                            Icmp6Error::PacketTooBig {
                                mtu: u32::from(ROUTED_MTU),
                            },
                        )),
                    },
                    step(Hook::NodeIngress, &fits, Verdict::Redirect, Some(&fits_out)),
                ],
                counters: vec![(counter::FRAG_NEEDED_SENT, 1), (counter::REDIRECTED, 2)],
            },
            snat,
        ),
    ]
}

/// Runs `cases` in `netns` (whose FIB the lookups see, never the machine's) and
/// asserts they all pass.
fn run_cases_in(netns: &Netns, cases: Vec<(Case, Node6)>) {
    let failures = netns
        .run(move || {
            let mut harness = DatapathHarness::new()?;
            let mut failures = Vec::new();
            for (case, node) in &cases {
                if let Err(error) = run_case_on(&mut harness, case, node) {
                    failures.push(error);
                }
            }
            Ok(failures)
        })
        .expect("run in the namespace");
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ipv6_node_datapath_table() {
    let netns =
        Netns::create(&format!("{}-dp6", kpr_lab::netns::unique_prefix())).expect("namespace");
    run_cases_in(&netns, node_cases());
}

#[test]
fn ipv6_routed_datapath_table() {
    // A namespace whose only link (a veth pair of its own) has MTU 1400 and a gateway
    // with a fixed neighbour entry, so the FIB lookup succeeds.
    let netns =
        Netns::create(&format!("{}-rt6", kpr_lab::netns::unique_prefix())).expect("namespace");
    let mtu = ROUTED_MTU.to_string();
    for command in [
        vec!["link", "set", "lo", "up"],
        vec!["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
        vec!["link", "set", "up0", "mtu", &mtu, "up"],
        vec!["link", "set", "up1", "up"],
        vec![
            "-6",
            "addr",
            "add",
            "fd00:192:168:1::10/64",
            "dev",
            "up0",
            "nodad",
        ],
        vec![
            "-6",
            "neigh",
            "add",
            ROUTED_GATEWAY,
            "lladdr",
            "02:00:00:00:00:aa",
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
        vec![
            "-6",
            "route",
            "add",
            "fd00:10:244:2::/64",
            "via",
            ROUTED_GATEWAY,
        ],
        vec!["-6", "route", "add", "2001:db8::/32", "via", ROUTED_GATEWAY],
        // This node's pods, behind their veth (here the pair's other end).
        vec!["-6", "route", "add", "fd00:10:244:1::/64", "dev", "up1"],
    ] {
        netns.ip(&command).expect("routed namespace");
    }
    netns
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("forwarding");
    run_cases_in(&netns, routed_cases());
}

/// Every frame the node tables expect out (which the program's output must equal byte
/// for byte) and every input has a right checksum by the independent computation:
/// the masqueraded and redirected packets, replies translated back, the errors the
/// redirect path answers with, the translated ICMPv6 error (and its quoted packet).
#[test]
fn ipv6_node_table_frames_have_right_checksums_by_an_independent_computation() {
    let mut quoted = 0;
    for (case, _) in node_cases().into_iter().chain(routed_cases()) {
        for step in &case.steps {
            for frame in [Some(&step.input), step.output.as_ref()]
                .into_iter()
                .flatten()
            {
                match upper_layer(frame) {
                    None => {}
                    Some(_) if frame[14 + 6] == 44 => verify_checksum(frame, &[7; 24]),
                    Some(_) => verify_checksum(frame, &[]),
                }
                if verify_quoted_checksum(frame) {
                    quoted += 1;
                }
            }
        }
    }
    assert!(quoted >= 2, "only {quoted} quoted packets checked");
}

/// Session affinity per client address: every flow of one client goes to the backend
/// its first flow got (of three), and the record names that client; without affinity
/// the flows spread.
#[test]
fn ipv6_affinity_keeps_a_client_on_its_backend() {
    let backends = [
        sock6("fd00:10:244:1::11", 8080),
        sock6("fd00:10:244:1::12", 8080),
        sock6("fd00:10:244:1::13", 8080),
    ];
    let run_flows = |frontend: Frontend6| {
        let mut harness = DatapathHarness::new().expect("load datapath");
        harness.clear().expect("clear");
        clear_v6(&mut harness);
        install_v6(&mut harness, &[frontend]);
        let mut seen = std::collections::BTreeSet::new();
        for port in 0..16 {
            let syn = Frame6::tcp(
                sock6("fd00:10:244:1::2", 40_000 + port),
                vip(),
                TcpFlags::SYN,
            );
            let output = harness
                .run_on(Hook::PodIngress, &syn.to_bytes(), 1)
                .expect("test run");
            assert_eq!(output.verdict, Verdict::Pass as i32);
            verify_checksum(&output.packet, &[]);
            seen.insert(output.packet[14 + 24..14 + 40].to_vec());
        }
        let hits =
            harness.datapath.maps.counters().expect("counters")[counter::AFFINITY_HIT as usize];
        (harness, seen, hits)
    };
    let sticky = Frontend6 {
        flags: service_flags::AFFINITY,
        affinity_timeout_s: 10_800,
        ..frontend6(vip(), proto::TCP, &backends)
    };
    let (mut harness, seen, hits) = run_flows(sticky);
    assert_eq!(seen.len(), 1, "one backend for every flow of the client");
    assert_eq!(hits, 15, "the first flow chose, the others hit");
    let chosen = seen.into_iter().next().expect("one");
    assert!(
        backends
            .iter()
            .any(|backend| backend.ip().octets()[..] == chosen[..]),
        "a backend of the service"
    );
    let records: Vec<AffinityKeyV6> =
        map::<AffinityKeyV6, AffinityValueV6>(&mut harness, names::AFFINITY_V6)
            .keys()
            .filter_map(Result::ok)
            .collect();
    assert_eq!(
        records,
        vec![AffinityKeyV6 {
            client_addr: Be32x4::from_ipv6("fd00:10:244:1::2".parse().expect("literal")),
            service_id: 1,
        }]
    );
    // Sixteen random picks of three land on one backend with probability 3^-15.
    let (_, seen, hits) = run_flows(frontend6(vip(), proto::TCP, &backends));
    assert!(seen.len() > 1, "without affinity the flows spread");
    assert_eq!(hits, 0);
}

/// The IPv6 paths made the TC programs the dearest the verifier checks (each IPv6
/// stage is re-verified for every state that reaches it): each must stay well inside
/// the kernel's limit of 1,000,000 instructions processed, so that the next stage
/// added is not the one that makes the object fail to load on every machine.
#[test]
fn tc_programs_leave_the_verifier_headroom() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    let mut report = Vec::new();
    for hook in [
        Hook::PodIngress,
        Hook::PodEgress,
        Hook::NodeIngress,
        Hook::NodeEgress,
    ] {
        let program = harness.datapath.program(hook).expect("program");
        let count = program
            .info()
            .expect("program info")
            .verified_instruction_count()
            .expect("the kernel reports verified instructions");
        report.push((hook.label(), count));
    }
    eprintln!("verified instructions: {report:?}");
    for (label, count) in report {
        assert!(
            count < 750_000,
            "{label}: {count} instructions verified, near the limit"
        );
    }
}

/// SCTP over IPv6, as `datapath_cases::sctp_cases` for IPv4: the CRC32c of every
/// expected frame comes from the `crc` crate, never from the datapath's code; the
/// SCTP packet's length (which the CRC update needs) is the payload's less the
/// extension headers, so one case carries two.
fn sctp_cases6() -> Vec<(Case, Node6)> {
    let sctp = frontend6(vip(), proto::SCTP, &[backend()]);
    let init = Frame6::sctp(client(), vip(), SctpChunk::Init);
    let sent_init = init.clone().with_dst(backend());
    let init_ack = |from| Frame6::sctp(from, client(), SctpChunk::InitAck);
    let data = |dst| {
        let mut frame = Frame6::sctp(client(), dst, SctpChunk::Data);
        frame.payload = b"capabilities-exchange".to_vec();
        frame
    };
    let with_crc = |mut frame: Frame6, crc| {
        if let Transport6::Sctp { chunk, .. } = frame.transport {
            frame.transport = Transport6::Sctp { chunk, crc };
        }
        frame
    };
    let ext = [Ext6::HopByHop, Ext6::DestOpts];
    // The backend's port unreachable about the translated INIT, quoting all of it: the
    // client gets it about its own INIT, whose quoted CRC stays the translated one's.
    let unreachable_in = Frame6::icmp_error(
        *backend().ip(),
        &sent_init,
        Icmp6Error::PortUnreachable,
        WHOLE,
    );
    let sent_bytes = sent_init.to_bytes();
    let sent_field = u32::from_le_bytes(
        sent_bytes[14 + 40 + 8..14 + 40 + 12]
            .try_into()
            .expect("4 bytes"),
    );
    let unreachable_out = unreachable_in.clone().with_quoted(
        *vip().ip(),
        &with_crc(init.clone(), SctpCrc::Field(sent_field)),
    );
    let first_fragment = data(vip()).with_ext(&[Ext6::Fragment {
        offset: 0,
        more: true,
        id: 0x5c7f,
        len: Some(24),
    }]);
    let snat = Node6 {
        snat: Some(node()),
        cluster_cidr: Some(cluster_cidr()),
    };
    let outside_init = Frame6::sctp(outside_client(), node_port(), SctpChunk::Init);
    let masqueraded_init = Frame6::sctp(masqueraded(), remote_backend(), SctpChunk::Init);
    let init_ack_transport = Transport6::Sctp {
        chunk: SctpChunk::InitAck,
        crc: SctpCrc::Valid,
    };
    let pod = |name, steps, counters| {
        (
            Case {
                name,
                frontends: vec![sctp.clone()],
                steps,
                counters,
            },
            Node6::default(),
        )
    };
    vec![
        pod(
            "SCTP INIT to an IPv6 ClusterIP is DNATed with its port changed and its CRC32c updated; the INIT ACK comes back from the ClusterIP; DATA follows the flow",
            vec![
                step(Hook::PodIngress, &init, Verdict::Pass, Some(&sent_init)),
                step(Hook::PodEgress, &init_ack(backend()), Verdict::Pass, Some(&init_ack(vip()))),
                step(Hook::PodIngress, &data(vip()), Verdict::Pass, Some(&data(backend()))),
            ],
            vec![
                (counter::NEW_FLOW, 1),
                (counter::REPLY_TRANSLATED, 1),
                (counter::FORWARD_TRANSLATED, 1),
                (counter::DROP_REWRITE, 0),
            ],
        ),
        pod(
            "SCTP behind hop-by-hop and destination options: the CRC32c update counts the SCTP packet only",
            vec![step(
                Hook::PodIngress,
                &data(vip()).with_ext(&ext),
                Verdict::Pass,
                Some(&data(backend()).with_ext(&ext)),
            )],
            vec![(counter::NEW_FLOW, 1)],
        ),
        pod(
            "an IPv6 SCTP packet with a wrong CRC32c leaves as wrong as it came; one left to offload (0) keeps 0",
            vec![
                step(
                    Hook::PodIngress,
                    &with_crc(init.clone(), SctpCrc::Corrupt),
                    Verdict::Pass,
                    Some(&with_crc(sent_init.clone(), SctpCrc::Corrupt)),
                ),
                step(
                    Hook::PodIngress,
                    &with_crc(data(vip()), SctpCrc::Offload),
                    Verdict::Pass,
                    Some(&with_crc(data(backend()), SctpCrc::Offload)),
                ),
            ],
            vec![(counter::NEW_FLOW, 1), (counter::DROP_REWRITE, 0)],
        ),
        pod(
            "ICMPv6 port unreachable from the backend about an SCTP flow reaches the client about its own packet",
            vec![
                step(Hook::PodIngress, &init, Verdict::Pass, Some(&sent_init)),
                step(Hook::PodEgress, &unreachable_in, Verdict::Pass, Some(&unreachable_out)),
            ],
            vec![(counter::ICMP_ERROR_TRANSLATED, 1)],
        ),
        pod(
            "IPv6 SCTP with a fragment header passes untouched",
            vec![step(Hook::PodIngress, &first_fragment, Verdict::Pass, None)],
            vec![(counter::NEW_FLOW, 0)],
        ),
        (
            Case {
                name: "SCTP to an IPv6 NodePort with a remote backend: masqueraded with a claimed port (both ports change, the CRC32c follows), the INIT ACK translated back",
                frontends: vec![Frontend6 {
                    proto: proto::SCTP,
                    ..external6(node_port(), &[remote_backend()], false)
                }],
                steps: vec![
                    step(Hook::NodeIngress, &outside_init, Verdict::Pass, Some(&masqueraded_init)),
                    step(
                        Hook::NodeIngress,
                        &masqueraded_init.reply(init_ack_transport),
                        Verdict::Pass,
                        Some(&outside_init.reply(init_ack_transport)),
                    ),
                ],
                counters: vec![
                    (counter::NEW_FLOW, 1),
                    (counter::SNAT_FLOW, 1),
                    (counter::REPLY_TRANSLATED, 1),
                ],
            },
            snat,
        ),
    ]
}

/// SCTP (issue 13, item 5) over IPv6, in an empty namespace of its own (the NodePort
/// case's FIB lookup finds no route: Pass). The kernels of the development machines
/// have no SCTP sockets: these frames are SCTP's proof.
#[test]
fn ipv6_sctp_datapath_table() {
    let netns =
        Netns::create(&format!("{}-sctp6", kpr_lab::netns::unique_prefix())).expect("namespace");
    run_cases_in(&netns, sctp_cases6());
}

/// Every SCTP frame of the IPv6 table built with a valid CRC32c has one by the `crc`
/// crate, the corrupted ones have not.
#[test]
fn ipv6_sctp_table_frames_carry_crc32c_by_an_independent_implementation() {
    let (mut valid, mut corrupt) = (0, 0);
    for (case, _) in sctp_cases6() {
        for step in &case.steps {
            for frame in [Some(&step.input), step.output.as_ref()]
                .into_iter()
                .flatten()
            {
                // SCTP right after the fixed header or after the case's two options.
                let sctp = match frame[14 + 6] {
                    132 => &frame[14 + 40..],
                    0 if frame[14 + 40 + 8] == 132 => &frame[14 + 40 + 16..],
                    _ => continue,
                };
                if sctp_crc_is_valid(sctp) {
                    valid += 1;
                } else {
                    corrupt += 1;
                }
            }
        }
    }
    // Offloaded packets (field 0) count as wrong: 2 corrupted, 2 offloaded.
    assert!(valid >= 12 && corrupt == 4, "{valid} valid, {corrupt} not");
}
