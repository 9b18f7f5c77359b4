//! BPF_PROG_TEST_RUN tests of the pod ingress program: the table in
//! `kpr_lab::datapath_cases`, plus behaviours that need more than one packet in and one
//! out (spread over backends, affinity, expiry, close tracking).
use std::collections::BTreeMap;

use kpr_lab::{
    datapath_cases::{
        addr, cases, frontend, node_cases, routed_cases, sctp_cases, Case, DatapathHarness,
        Expected, ROUTED_GATEWAY, ROUTED_LINK_MTU,
    },
    netns::Netns,
    packets::{sock, Frame, TcpFlags, Transport},
};
use std::time::Duration;

use proxy_common::{counter, ct_flags, proto, service_flags, Be16, Be32, CtEntryV4, CtKeyV4};
use proxy_userspace::datapath::{Hook, LoadOptions};

#[test]
fn datapath_table() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    let mut failures = Vec::new();
    for case in cases() {
        if let Err(error) = harness.run_case(&case) {
            failures.push(format!("{error:#}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs `cases` inside `netns` (the FIB lookups of the redirect path see its routes
/// only, never the machine's) and asserts they all pass.
fn run_cases_in(netns: &Netns, cases: &[Case]) {
    let failures = netns
        .run(|| {
            let mut harness = DatapathHarness::new()?;
            let mut failures = Vec::new();
            for case in cases {
                if let Err(error) = harness.run_case(case) {
                    failures.push(format!("{error:#}"));
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
fn node_datapath_table() {
    // An empty namespace of our own: no route, so the programs leave translated packets
    // to the stack (see `node_cases`).
    let netns =
        Netns::create(&format!("{}-dp", kpr_lab::netns::unique_prefix())).expect("namespace");
    run_cases_in(&netns, &node_cases());
}

/// SCTP (issue 13, item 5): the kernels of the development machines have no SCTP
/// sockets, so SCTP is proven on these frames only.
#[test]
fn sctp_datapath_table() {
    let netns =
        Netns::create(&format!("{}-sctp", kpr_lab::netns::unique_prefix())).expect("namespace");
    run_cases_in(&netns, &sctp_cases());
}

/// The SCTP table's frames, checked by the `crc` crate on their own: every packet
/// built with a valid CRC32c has one, the corrupted ones have not (so the table's byte
/// comparison compares CRCs that are right, and wrong, by an independent reference).
#[test]
fn sctp_table_frames_carry_crc32c_by_an_independent_implementation() {
    use kpr_lab::packets::{sctp_crc_is_valid, SctpCrc};
    let mut valid = 0;
    let mut corrupt = 0;
    for case in sctp_cases() {
        for step in &case.steps {
            let outputs = match &step.output {
                Expected::Frame(frame) => vec![frame.clone()],
                _ => Vec::new(),
            };
            for frame in std::iter::once(step.input.clone()).chain(outputs) {
                let Transport::Sctp { crc, .. } = frame.transport else {
                    continue;
                };
                if frame.fragment.is_some() {
                    continue;
                }
                let bytes = frame.to_bytes();
                let sctp = &bytes[14 + 20..];
                match crc {
                    SctpCrc::Valid => {
                        assert!(sctp_crc_is_valid(sctp), "{}: a valid CRC32c", case.name);
                        valid += 1;
                    }
                    SctpCrc::Corrupt => {
                        assert!(!sctp_crc_is_valid(sctp), "{}: a wrong CRC32c", case.name);
                        corrupt += 1;
                    }
                    SctpCrc::Offload | SctpCrc::Field(_) => {}
                }
            }
        }
    }
    assert!(
        valid >= 12 && corrupt == 2,
        "{valid} valid, {corrupt} corrupt"
    );
}

#[test]
fn routed_datapath_table() {
    // A namespace whose only link (a veth pair of its own) has MTU 1200 and a gateway
    // with a fixed neighbour entry, so the FIB lookup succeeds (see `routed_cases`).
    let netns =
        Netns::create(&format!("{}-rt", kpr_lab::netns::unique_prefix())).expect("namespace");
    let mtu = ROUTED_LINK_MTU.to_string();
    let gateway = ROUTED_GATEWAY.to_string();
    for command in [
        vec!["link", "set", "lo", "up"],
        vec!["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
        vec!["link", "set", "up0", "mtu", &mtu, "up"],
        vec!["link", "set", "up1", "up"],
        vec!["addr", "add", "192.168.1.10/24", "dev", "up0"],
        vec![
            "neigh",
            "add",
            &gateway,
            "lladdr",
            "02:00:00:00:00:aa",
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
        vec!["route", "add", "10.244.2.0/24", "via", &gateway],
        vec!["route", "add", "203.0.113.0/24", "via", &gateway],
        // This node's pods, behind their veth (here the pair's other end).
        vec!["route", "add", "10.244.1.0/24", "dev", "up1"],
    ] {
        netns.ip(&command).expect("routed namespace");
    }
    netns
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding");
    run_cases_in(&netns, &routed_cases());
}

fn backends3() -> Vec<std::net::SocketAddrV4> {
    vec![
        sock(10, 244, 1, 11, 8080),
        sock(10, 244, 1, 12, 8080),
        sock(10, 244, 1, 13, 8080),
    ]
}

/// The backend a translated SYN was sent to.
fn chosen_backend(harness: &mut DatapathHarness, client_port: u16) -> std::net::SocketAddrV4 {
    let client = sock(10, 244, 1, 2, client_port);
    let output = harness
        .run(
            &Frame::tcp(client, addr::vip(), TcpFlags::SYN).to_bytes(),
            1,
        )
        .expect("run");
    assert_eq!(output.verdict, 0);
    backends3()
        .into_iter()
        .find(|backend| output.packet == Frame::tcp(client, *backend, TcpFlags::SYN).to_bytes())
        .expect("the SYN went to one of the backends, with valid checksums")
}

#[test]
fn new_flows_spread_over_every_backend() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    harness
        .install(&[frontend("web", addr::vip(), proto::TCP, &backends3(), 0)])
        .expect("install");
    let mut hits: BTreeMap<_, u32> = BTreeMap::new();
    for port in 0..300 {
        *hits
            .entry(chosen_backend(&mut harness, 20_000 + port))
            .or_default() += 1;
    }
    assert_eq!(hits.len(), 3, "{hits:?}");
    // Uniform choice: each backend gets 100 on average; 50 is > 7 standard deviations off.
    assert!(hits.values().all(|&n| n >= 50), "{hits:?}");
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend_until_the_backend_leaves() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    let all = backends3();
    harness
        .install(&[frontend(
            "sticky",
            addr::vip(),
            proto::TCP,
            &all,
            service_flags::AFFINITY,
        )])
        .expect("install");
    let first = chosen_backend(&mut harness, 30_000);
    for port in 1..50 {
        assert_eq!(chosen_backend(&mut harness, 30_000 + port), first);
    }
    let counters = harness.datapath.maps.counters().expect("counters");
    assert_eq!(counters[counter::AFFINITY_HIT as usize], 49);

    // Another client is free to land elsewhere; its choice is its own.
    let remaining: Vec<_> = all.iter().copied().filter(|b| *b != first).collect();
    harness
        .install(&[frontend(
            "sticky",
            addr::vip(),
            proto::TCP,
            &remaining,
            service_flags::AFFINITY,
        )])
        .expect("shrink");
    // The affinity entry still names the removed backend, whose backend entry is gone:
    // the datapath must not follow it.
    for port in 100..120 {
        assert_ne!(chosen_backend(&mut harness, 30_000 + port), first);
    }
}

#[test]
fn an_affinity_hit_is_honoured_only_while_the_service_still_has_the_backend() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    let all = backends3();
    let other_vip = sock(10, 96, 0, 20, 80);
    let sticky = |backends: &[std::net::SocketAddrV4]| {
        frontend(
            "sticky",
            addr::vip(),
            proto::TCP,
            backends,
            service_flags::AFFINITY,
        )
    };
    // Another service keeps every backend in the backend map throughout.
    let other = frontend("other", other_vip, proto::TCP, &all, 0);
    harness
        .install(&[sticky(&all), other.clone()])
        .expect("install");
    let first = chosen_backend(&mut harness, 31_000);

    // Another backend leaves: the client keeps its own, wherever its slot is now.
    let another = all
        .iter()
        .copied()
        .find(|b| *b != first)
        .expect("three backends");
    let without_another: Vec<_> = all.iter().copied().filter(|b| *b != another).collect();
    harness
        .install(&[sticky(&without_another), other.clone()])
        .expect("shrink by another");
    for port in 1..20 {
        assert_eq!(chosen_backend(&mut harness, 31_000 + port), first, "sticks");
    }

    // Its own backend leaves the service (but not the backend map: `other` uses it).
    let without_first: Vec<_> = all.iter().copied().filter(|b| *b != first).collect();
    harness
        .install(&[sticky(&without_first), other])
        .expect("shrink by the chosen one");
    for port in 100..120 {
        assert_ne!(
            chosen_backend(&mut harness, 31_000 + port),
            first,
            "a backend that left the service is never followed"
        );
    }
}

#[test]
fn an_expired_flow_is_not_reused() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    let backend = sock(10, 244, 1, 11, 8080);
    harness
        .install(&[frontend("web", addr::vip(), proto::TCP, &[backend], 0)])
        .expect("install");
    // A stale established entry pointing elsewhere, idle for longer than the
    // established timeout (10 s here; the clock is the datapath's).
    let stale_key = CtKeyV4 {
        src_addr: Be32::from_ipv4(*addr::client().ip()),
        dst_addr: Be32::from_ipv4(*addr::vip().ip()),
        src_port: Be16::from_host(addr::client().port()),
        dst_port: Be16::from_host(addr::vip().port()),
        proto: proto::TCP,
        _pad: [0; 3],
    };
    let mut config = proxy_common::DatapathConfig::DEFAULT;
    config.tcp_established_timeout_s = 10;
    harness.datapath.maps.set_config(&config).expect("config");
    let now = proxy_userspace::datapath::conntrack::monotonic_now_ns();
    let stale = CtEntryV4 {
        last_seen_ns: now - 11_000_000_000,
        peer_refreshed_ns: now - 11_000_000_000,
        nat_dst_addr: Be32::from_ipv4(std::net::Ipv4Addr::new(10, 244, 9, 9)),
        nat_dst_port: Be16::from_host(9),
        flags: ct_flags::REWRITE_DST | ct_flags::SEEN_REPLY | ct_flags::ASSURED,
        ..CtEntryV4::default()
    };
    harness
        .datapath
        .maps
        .conntrack
        .insert(stale_key, stale, 0)
        .expect("insert");
    let output = harness
        .run(
            &Frame::tcp(addr::client(), addr::vip(), TcpFlags::SYN).to_bytes(),
            1,
        )
        .expect("run");
    assert_eq!(
        output.packet,
        Frame::tcp(addr::client(), backend, TcpFlags::SYN).to_bytes()
    );
    assert!(
        harness.datapath.maps.conntrack.get(&stale_key, 0).is_err(),
        "the datapath removed the expired established entry, which would otherwise \
         shadow the new flow"
    );
    harness
        .datapath
        .maps
        .set_config(&proxy_common::DatapathConfig::DEFAULT)
        .expect("config");
}

/// The conntrack entries of every flow: `(established?, key, entry)`.
fn flow_entries(harness: &DatapathHarness) -> Vec<(bool, CtKeyV4, CtEntryV4)> {
    let maps = &harness.datapath.maps;
    let established = maps
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .map(|(k, e)| (true, k, e));
    let new = maps
        .conntrack_new
        .iter()
        .filter_map(Result::ok)
        .map(|(k, e)| (false, k, e));
    established.chain(new).collect()
}

/// Makes every conntrack entry look `by` older, as if that long passed without a
/// packet (the datapath and the test share CLOCK_MONOTONIC).
fn age(harness: &mut DatapathHarness, by: Duration) {
    let by = u64::try_from(by.as_nanos()).expect("short");
    for (established, key, mut entry) in flow_entries(harness) {
        entry.last_seen_ns = entry.last_seen_ns.saturating_sub(by);
        entry.peer_refreshed_ns = entry.peer_refreshed_ns.saturating_sub(by);
        let maps = &mut harness.datapath.maps;
        let table = if established {
            &mut maps.conntrack
        } else {
            &mut maps.conntrack_new
        };
        table.insert(key, entry, 0).expect("rewrite entry");
    }
}

/// A harness with `web` (TCP) and `dns` (UDP) ClusterIPs of one backend each.
fn lifecycle_harness(options: &LoadOptions) -> DatapathHarness {
    let mut harness = DatapathHarness::with_options(options).expect("load datapath");
    harness.clear().expect("clear");
    harness
        .install(&[
            frontend("web", addr::vip(), proto::TCP, &[addr::backend()], 0),
            frontend(
                "dns",
                addr::vip_dns(),
                proto::UDP,
                &[addr::dns_backend()],
                0,
            ),
        ])
        .expect("install");
    harness
}

/// A TCP segment of the client (from `port`) to the ClusterIP, through pod ingress.
fn from_client(harness: &mut DatapathHarness, port: u16, flags: TcpFlags) -> i32 {
    let client = sock(10, 244, 1, 2, port);
    let output = harness
        .run_on(
            Hook::PodIngress,
            &Frame::tcp(client, addr::vip(), flags).to_bytes(),
            1,
        )
        .expect("run");
    if output.verdict == 0 {
        assert_eq!(
            output.packet,
            Frame::tcp(client, addr::backend(), flags).to_bytes(),
            "the client's segment goes to the backend"
        );
    }
    output.verdict
}

/// A TCP segment of the backend to the client (at `port`), through the client's pod
/// egress. `true` when it was translated back (the flow is alive), `false` when it
/// passed untouched (no live flow).
fn from_server(harness: &mut DatapathHarness, port: u16, flags: TcpFlags) -> bool {
    let client = sock(10, 244, 1, 2, port);
    let input = Frame::tcp(addr::backend(), client, flags);
    let output = harness
        .run_on(Hook::PodEgress, &input.to_bytes(), 1)
        .expect("run");
    assert_eq!(output.verdict, 0);
    if output.packet == input.to_bytes() {
        return false;
    }
    assert_eq!(
        output.packet,
        Frame::tcp(addr::vip(), client, flags).to_bytes(),
        "translated back to the ClusterIP"
    );
    true
}

/// Opens a connection from `port`: SYN, SYN-ACK, ACK.
fn establish(harness: &mut DatapathHarness, port: u16) {
    assert_eq!(from_client(harness, port, TcpFlags::SYN), 0);
    assert!(from_server(harness, port, TcpFlags::SYN_ACK));
    assert_eq!(from_client(harness, port, TcpFlags::ACK), 0);
}

/// The state flags of the flow from `port` (both entries must agree), and whether it
/// is in the established table.
fn flow_state(harness: &DatapathHarness, port: u16) -> (u16, bool) {
    let state_mask = !(ct_flags::REWRITE_SRC | ct_flags::REWRITE_DST | ct_flags::REPLY);
    let mine: Vec<_> = flow_entries(harness)
        .into_iter()
        .filter(|(_, key, _)| {
            key.src_port == Be16::from_host(port) || key.dst_port == Be16::from_host(port)
        })
        .collect();
    assert_eq!(mine.len(), 2, "two entries per flow: {mine:?}");
    let (established, _, entry) = mine[0];
    for (other_table, _, other) in &mine {
        assert_eq!(
            *other_table, established,
            "both entries in one table: {mine:?}"
        );
        assert_eq!(
            other.flags & state_mask,
            entry.flags & state_mask,
            "{mine:?}"
        );
    }
    (entry.flags & state_mask, established)
}

const SYN_TIMEOUT: Duration = Duration::from_secs(60);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
const SECOND: Duration = Duration::from_secs(1);
const FIN: TcpFlags = TcpFlags::FIN_ACK;
const RST: TcpFlags = TcpFlags {
    syn: false,
    ack: true,
    fin: false,
    rst: true,
};

#[test]
fn the_tcp_handshake_moves_a_flow_from_the_new_table_to_the_established_one() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    from_client(&mut harness, 41_000, TcpFlags::SYN);
    assert_eq!(flow_state(&harness, 41_000), (0, false), "SYN sent");
    from_server(&mut harness, 41_000, TcpFlags::SYN_ACK);
    assert_eq!(
        flow_state(&harness, 41_000),
        (ct_flags::SEEN_REPLY, false),
        "SYN received"
    );
    from_client(&mut harness, 41_000, TcpFlags::ACK);
    assert_eq!(
        flow_state(&harness, 41_000),
        (ct_flags::SEEN_REPLY | ct_flags::ASSURED, true),
        "established"
    );
    let counters = harness.datapath.maps.counters().expect("counters");
    assert_eq!(counters[counter::CT_ASSURED as usize], 1);
}

#[test]
fn a_half_open_flow_lives_for_the_syn_timeout() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    from_client(&mut harness, 41_001, TcpFlags::SYN);
    age(&mut harness, SYN_TIMEOUT - SECOND);
    assert!(
        from_server(&mut harness, 41_001, TcpFlags::SYN_ACK),
        "alive"
    );
    from_client(&mut harness, 41_002, TcpFlags::SYN);
    age(&mut harness, SYN_TIMEOUT + SECOND);
    assert!(
        !from_server(&mut harness, 41_002, TcpFlags::SYN_ACK),
        "expired after the SYN timeout, not the 24 h established one"
    );
}

#[test]
fn a_half_closed_flow_keeps_the_established_timeout() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    for (port, closing_side) in [(41_010, "client"), (41_011, "server")] {
        establish(&mut harness, port);
        if closing_side == "client" {
            from_client(&mut harness, port, FIN);
        } else {
            from_server(&mut harness, port, FIN);
        }
        let (state, established) = flow_state(&harness, port);
        assert!(established);
        assert!(
            !ct_flags::is_closed(state),
            "one FIN: half-closed ({closing_side})"
        );
    }
    // Far beyond the close and SYN timeouts: the other side may still be sending.
    age(&mut harness, SYN_TIMEOUT * 2);
    assert!(from_server(&mut harness, 41_010, TcpFlags::ACK));
    assert!(from_server(&mut harness, 41_011, TcpFlags::ACK));
}

#[test]
fn both_fins_or_a_reset_give_the_close_timeout() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    establish(&mut harness, 41_020);
    from_client(&mut harness, 41_020, FIN);
    from_server(&mut harness, 41_020, FIN);
    establish(&mut harness, 41_021);
    from_server(&mut harness, 41_021, RST);
    for port in [41_020, 41_021] {
        assert!(ct_flags::is_closed(flow_state(&harness, port).0), "{port}");
    }
    age(&mut harness, CLOSE_TIMEOUT - SECOND);
    assert!(from_server(&mut harness, 41_020, TcpFlags::ACK), "last ACK");
    assert!(from_server(&mut harness, 41_021, RST), "RST retransmitted");
    age(&mut harness, CLOSE_TIMEOUT + SECOND);
    assert!(!from_server(&mut harness, 41_020, TcpFlags::ACK), "closed");
    assert!(!from_server(&mut harness, 41_021, TcpFlags::ACK), "reset");
}

#[test]
fn a_syn_on_a_closed_tuple_starts_a_new_flow_and_on_an_open_one_does_not() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    establish(&mut harness, 41_030);
    from_client(&mut harness, 41_030, FIN);
    from_server(&mut harness, 41_030, FIN);
    assert_eq!(from_client(&mut harness, 41_030, TcpFlags::SYN), 0);
    assert_eq!(
        flow_state(&harness, 41_030),
        (0, false),
        "a fresh flow in the new table, the closed one gone from the established table"
    );
    establish(&mut harness, 41_031);
    from_client(&mut harness, 41_031, TcpFlags::SYN);
    assert_eq!(
        flow_state(&harness, 41_031),
        (ct_flags::SEEN_REPLY | ct_flags::ASSURED, true),
        "a stray SYN leaves an open connection alone"
    );
    let counters = harness.datapath.maps.counters().expect("counters");
    assert_eq!(counters[counter::NEW_FLOW as usize], 3);
}

#[test]
fn a_one_way_udp_flow_keeps_its_reply_entry_alive() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    let udp_timeout = Duration::from_secs(120);
    let query = Frame::udp(addr::client(), addr::vip_dns(), b"stream");
    let answer = query
        .clone()
        .with_dst(addr::dns_backend())
        .reply(Transport::Udp { checksum: true });
    let seen_answer = query.reply(Transport::Udp { checksum: true });
    // The client streams and the server never answers, for longer than the timeout.
    for _ in 0..3 {
        harness
            .run_on(Hook::PodIngress, &query.to_bytes(), 1)
            .expect("run");
        age(&mut harness, udp_timeout / 2 + SECOND);
    }
    let output = harness
        .run_on(Hook::PodEgress, &answer.to_bytes(), 1)
        .expect("run");
    assert_eq!(
        output.packet,
        seen_answer.to_bytes(),
        "the reply entry lived as long as the flow: the answer comes from the ClusterIP"
    );
}

/// Opens `count` half-open flows (SYNs from other client ports).
fn syn_flood(harness: &mut DatapathHarness, first_port: u16, count: u16) {
    for port in first_port..first_port + count {
        from_client(harness, port, TcpFlags::SYN);
    }
}

#[test]
fn a_flood_of_half_open_flows_never_evicts_an_established_one() {
    // A new-flow table of 256 entries (128 flows), flooded with 2000.
    let options = LoadOptions {
        conntrack_max: Some(64),
        ..LoadOptions::default()
    };
    let mut harness = lifecycle_harness(&options);
    assert_eq!(harness.datapath.maps.capacities.conntrack_new, 256);
    establish(&mut harness, 41_040);
    from_client(&mut harness, 41_041, TcpFlags::SYN);
    syn_flood(&mut harness, 50_000, 2000);
    assert!(
        from_server(&mut harness, 41_040, TcpFlags::ACK),
        "established survives"
    );
    assert!(
        !from_server(&mut harness, 41_041, TcpFlags::SYN_ACK),
        "the oldest half-open flow made room"
    );
    assert_eq!(from_client(&mut harness, 41_040, TcpFlags::ACK), 0);
}

/// The frontend address set is sized from the same demand as the service map (every
/// frontend address takes at least one service entry), and the per-service counters
/// hold one entry per service port: both follow `services_max`, as the kernel reports.
#[test]
fn the_frontend_address_set_and_the_service_counters_follow_the_service_map() {
    let defaults = DatapathHarness::with_options(&LoadOptions::default()).expect("load datapath");
    let capacities = defaults.datapath.maps.capacities;
    assert_eq!(capacities.services, proxy_common::capacity::SERVICES_V4);
    assert_eq!(capacities.frontend_addrs, capacities.services);
    assert_eq!(capacities.service_stats, capacities.services);
    drop(defaults);

    // Above the counters' own floor (65 536 service ports).
    let large = LoadOptions {
        services_max: Some(70_000),
        ..LoadOptions::default()
    };
    let harness = DatapathHarness::with_options(&large).expect("load datapath");
    let capacities = harness.datapath.maps.capacities;
    assert_eq!(capacities.services, 70_000);
    assert_eq!(capacities.frontend_addrs, 70_000);
    assert_eq!(capacities.service_stats, 70_000);
    drop(harness);

    // A small service map: the address set takes exactly as many addresses.
    let small = LoadOptions {
        services_max: Some(16),
        ..LoadOptions::default()
    };
    let mut harness = DatapathHarness::with_options(&small).expect("load datapath");
    assert_eq!(harness.datapath.maps.capacities.frontend_addrs, 16);
    assert_eq!(
        harness.datapath.maps.capacities.service_stats,
        proxy_common::service_stats::CAPACITY
    );
    let value = proxy_common::FrontendAddrV4 {
        kinds: proxy_common::frontend_addr::CLUSTER_IP,
        _pad: [0; 3],
    };
    for i in 0..16u8 {
        let addr = Be32::from_ipv4(std::net::Ipv4Addr::new(10, 96, 0, i));
        harness
            .datapath
            .maps
            .v4
            .frontend_addrs
            .insert(addr.0, value, 0)
            .expect("an address within the capacity");
    }
    let one_more = Be32::from_ipv4(std::net::Ipv4Addr::new(10, 96, 0, 16));
    assert!(
        harness
            .datapath
            .maps
            .v4
            .frontend_addrs
            .insert(one_more.0, value, 0)
            .is_err(),
        "the set is full at the service map's capacity"
    );
}

/// Batched map writes on the real maps (`MapWriter::apply_batch`: one `bpf()` call per
/// run of puts or deletes on one map): they land as single writes would, a delete of a
/// key that is not there is no failure and does not stop the batch, and a full map
/// stops it at the first entry that does not fit, reported as full, with what came
/// before in the map.
#[test]
fn batched_map_writes_land_in_order_and_a_full_map_stops_them_where_it_is_full() {
    use proxy_userspace::{
        model::FrontendKey,
        sync::{backend_value, service_key, MapOp, MapWriter, SourceRangeKey},
    };
    let options = LoadOptions {
        backends_max: Some(8),
        ..LoadOptions::default()
    };
    let mut harness = DatapathHarness::with_options(&options).expect("load datapath");
    let maps = &mut harness.datapath.maps;
    let frontend = FrontendKey {
        addr: std::net::Ipv4Addr::new(10, 96, 0, 1),
        port: 80,
        proto: proto::TCP,
        scope: proxy_common::scope::DEFAULT,
    };
    let put_backend = |id: u8| MapOp::PutBackend {
        id: u32::from(id),
        backend: backend_value::<std::net::Ipv4Addr>(
            std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 244, 1, id), 8080),
            proto::TCP,
            false,
        ),
    };
    let put_slot = |slot: u16| MapOp::PutService {
        key: service_key(&frontend, slot),
        value: proxy_common::ServiceValueV4 {
            backend_id: u32::from(slot),
            ..proxy_common::ServiceValueV4::default()
        },
    };
    let range = SourceRangeKey {
        service_id: 7,
        addr: std::net::Ipv4Addr::new(192, 0, 2, 0),
        prefix_len: 24,
    };

    // Backends, slots then the frontend entry, a source range (a trie): three runs.
    let mut ops: Vec<MapOp> = (1..=4).map(put_backend).collect();
    ops.extend((1..=4).map(put_slot));
    let head = proxy_common::ServiceValueV4 {
        service_id: 7,
        count: 4,
        ..proxy_common::ServiceValueV4::default()
    };
    ops.push(MapOp::PutService {
        key: service_key(&frontend, 0),
        value: head,
    });
    ops.push(MapOp::PutSourceRange { key: range });
    let (applied, error) = maps.apply_batch(&ops);
    assert_eq!(
        (applied, error.map(|e| e.to_string())),
        (ops.len(), None),
        "all applied"
    );
    let mirror = maps.read_mirror().expect("read the maps");
    for op in &ops {
        let landed = match *op {
            MapOp::PutBackend { id, backend } => mirror.backends.get(&id) == Some(&backend),
            MapOp::PutService { key, value } => mirror.services.get(&key) == Some(value),
            MapOp::PutSourceRange { key } => mirror.source_ranges.contains(&key),
            _ => false,
        };
        assert!(landed, "{op:?} is in the maps");
    }
    assert_eq!((mirror.services.len(), mirror.backends.len()), (5, 4));

    // Deletes with a key never written between two that are there: all go.
    let deletes = [4, 9, 3].map(|slot| MapOp::<std::net::Ipv4Addr>::DeleteService {
        key: service_key(&frontend, slot),
    });
    let (applied, error) = maps.apply_batch(&deletes);
    assert_eq!(
        (applied, error.map(|e| e.to_string())),
        (3, None),
        "a missing key is no failure"
    );
    let mirror = maps.read_mirror().expect("read the maps");
    let slots: std::collections::BTreeSet<u16> =
        mirror.services.keys().map(|key| key.slot).collect();
    assert_eq!(slots, [0, 1, 2].into());

    // The backend map holds 8: of 8 more, 4 fit; the 5th is refused as full.
    let more: Vec<MapOp> = (5..=12).map(put_backend).collect();
    let (applied, error) = maps.apply_batch(&more);
    assert_eq!(applied, 4, "the entries that fit");
    let error = error.expect("the map is full");
    assert!(error.map_full, "reported as full: {error}");
    assert_eq!(error.op, more[4], "the first that does not fit");
    let mirror = maps.read_mirror().expect("read the maps");
    let ids: std::collections::BTreeSet<u32> = mirror.backends.keys().copied().collect();
    assert_eq!(ids, (1..=8).collect(), "the applied prefix landed");
}

#[test]
fn with_the_established_table_full_new_flows_are_dropped_and_counted() {
    let options = LoadOptions {
        conntrack_max: Some(4),
        ..LoadOptions::default()
    };
    let mut harness = lifecycle_harness(&options);
    establish(&mut harness, 41_050);
    establish(&mut harness, 41_051);
    // A third handshake completes, but its flow finds no room to move.
    establish(&mut harness, 41_052);
    assert!(!flow_state(&harness, 41_052).1, "stays new");
    assert_eq!(
        from_client(&mut harness, 41_053, TcpFlags::SYN),
        2,
        "a new flow is dropped while the table is full"
    );
    let counters = harness.datapath.maps.counters().expect("counters");
    assert_eq!(counters[counter::DROP_CT_FULL as usize], 1);
    for port in [41_050, 41_051] {
        assert!(
            from_server(&mut harness, port, TcpFlags::ACK),
            "{port} keeps working"
        );
        assert_eq!(from_client(&mut harness, port, TcpFlags::ACK), 0);
    }
    // Once the reaper freed room (here: the first flow closed and removed) and the
    // refusal's hold passed, new flows are admitted and established again.
    from_client(&mut harness, 41_050, FIN);
    from_server(&mut harness, 41_050, FIN);
    age(&mut harness, CLOSE_TIMEOUT + SECOND);
    let config = proxy_common::DatapathConfig::DEFAULT;
    let now = proxy_userspace::datapath::conntrack::monotonic_now_ns();
    proxy_userspace::datapath::conntrack::collect_expired(&mut harness.datapath.maps, &config, now)
        .expect("reap");
    let hold_passed = now - 2 * proxy_common::CT_FULL_HOLD_NS;
    harness
        .datapath
        .maps
        .conntrack_full
        .set(0, hold_passed, 0)
        .expect("age the refusal");
    establish(&mut harness, 41_054);
    assert!(flow_state(&harness, 41_054).1, "established again");
}

#[test]
fn a_snat_port_held_by_an_established_flow_is_never_taken_even_by_a_flood() {
    use kpr_lab::datapath_cases::{node_addr::*, NodeSetup};
    let netns =
        Netns::create(&format!("{}-snat", kpr_lab::netns::unique_prefix())).expect("namespace");
    netns
        .run(|| {
            let options = LoadOptions {
                conntrack_max: Some(64),
                ..LoadOptions::default()
            };
            let mut harness = DatapathHarness::with_options(&options)?;
            harness.clear()?;
            // One SNAT port, so a second masqueraded flow needs exactly that port.
            let node = NodeSetup {
                snat: Some((NODE, SNAT_PORT)),
                cluster_cidr: Some((std::net::Ipv4Addr::new(10, 244, 0, 0), 16)),
                ..NodeSetup::default()
            };
            harness.install_on(
                &[
                    frontend(
                        "np",
                        node_port(),
                        proto::TCP,
                        &[remote_backend()],
                        service_flags::EXTERNAL,
                    ),
                    frontend("web", addr::vip(), proto::TCP, &[addr::backend()], 0),
                ],
                &node,
            )?;
            let mut run = |hook, frame: &Frame| harness.run_on(hook, &frame.to_bytes(), 1);
            let client = outside_client();
            let masqueraded_syn = Frame::tcp(masqueraded(), remote_backend(), TcpFlags::SYN);
            run(
                Hook::NodeIngress,
                &Frame::tcp(client, node_port(), TcpFlags::SYN),
            )?;
            run(
                Hook::NodeIngress,
                &masqueraded_syn.reply(Transport::Tcp(TcpFlags::SYN_ACK)),
            )?;
            run(
                Hook::NodeIngress,
                &Frame::tcp(client, node_port(), TcpFlags::ACK),
            )?;
            // Half-open flows from pods fill the new-flow table many times over.
            for port in 50_000..52_000 {
                run(
                    Hook::PodIngress,
                    &Frame::tcp(sock(10, 244, 1, 2, port), addr::vip(), TcpFlags::SYN),
                )?;
            }
            let second = run(
                Hook::NodeIngress,
                &Frame::tcp(sock(203, 0, 113, 8, 40_000), node_port(), TcpFlags::SYN),
            )?;
            let reply = masqueraded_syn.reply(Transport::Tcp(TcpFlags::ACK));
            let translated = run(Hook::NodeIngress, &reply)?;
            let counters = harness.datapath.maps.counters()?;
            Ok((second.verdict, translated.packet, counters))
        })
        .map(|(second_verdict, translated, counters)| {
            assert_eq!(second_verdict, 2, "the only port is taken: dropped");
            assert_eq!(counters[counter::DROP_SNAT_PORTS as usize], 1);
            assert_eq!(
                translated,
                Frame::tcp(outside_client(), node_port(), TcpFlags::ACK)
                    .reply(Transport::Tcp(TcpFlags::ACK))
                    .to_bytes(),
                "the established flow's replies still reach its client"
            );
        })
        .expect("run in the namespace");
}

/// The lean established path: a packet of a flow whose entry was refreshed lately
/// reads it and writes nothing (no cache-line write per packet); once the timestamp is
/// older than `CT_REFRESH_NS` the packet writes it. Either way the packet is translated
/// with its checksums (compared byte for byte).
#[test]
fn an_established_packet_writes_its_entrys_timestamp_only_once_it_is_stale() {
    let mut harness = lifecycle_harness(&LoadOptions::default());
    let key = CtKeyV4 {
        src_addr: Be32::from_ipv4(*addr::client().ip()),
        dst_addr: Be32::from_ipv4(*addr::vip().ip()),
        src_port: Be16::from_host(addr::client().port()),
        dst_port: Be16::from_host(addr::vip().port()),
        proto: proto::TCP,
        _pad: [0; 3],
    };
    let now = proxy_userspace::datapath::conntrack::monotonic_now_ns();
    // Timestamps an hour ahead are "just refreshed" whenever the packet runs (the
    // datapath's age computation saturates at 0), so the test does not race the clock.
    let fresh = CtEntryV4 {
        last_seen_ns: now + 3_600_000_000_000,
        peer_refreshed_ns: now + 3_600_000_000_000,
        nat_dst_addr: Be32::from_ipv4(*addr::backend().ip()),
        nat_dst_port: Be16::from_host(addr::backend().port()),
        flags: ct_flags::REWRITE_DST | ct_flags::SEEN_REPLY | ct_flags::ASSURED,
        ..CtEntryV4::default()
    };
    let conntrack = |harness: &DatapathHarness| harness.datapath.maps.conntrack.get(&key, 0);
    harness
        .datapath
        .maps
        .conntrack
        .insert(key, fresh, 0)
        .expect("insert");
    let ack = Frame::tcp(addr::client(), addr::vip(), TcpFlags::ACK).to_bytes();
    let translated = Frame::tcp(addr::client(), addr::backend(), TcpFlags::ACK).to_bytes();
    let output = harness.run(&ack, 1).expect("run");
    assert_eq!(output.packet, translated);
    assert_eq!(
        conntrack(&harness).expect("entry"),
        fresh,
        "a fresh entry is left as it was"
    );

    let stale = CtEntryV4 {
        last_seen_ns: now - 5_000_000_000,
        ..fresh
    };
    harness
        .datapath
        .maps
        .conntrack
        .insert(key, stale, 0)
        .expect("insert");
    let output = harness.run(&ack, 1).expect("run");
    assert_eq!(output.packet, translated);
    let refreshed = conntrack(&harness).expect("entry");
    assert!(
        refreshed.last_seen_ns > stale.last_seen_ns + 4_000_000_000,
        "a stale timestamp is refreshed: {} -> {}",
        stale.last_seen_ns,
        refreshed.last_seen_ns
    );
    assert_eq!(
        CtEntryV4 {
            last_seen_ns: stale.last_seen_ns,
            ..refreshed
        },
        stale,
        "only the timestamp changes"
    );
}

/// The frontend address set's writes: a batch of puts lands whole (read back from the
/// kernel), and deleting an address the set no longer holds is no failure (the kernel
/// says ENOENT, which the agent must not count as a failed write and retry forever).
#[test]
fn frontend_address_batches_land_and_deleting_a_gone_address_succeeds() {
    use proxy_userspace::sync::frontend_addrs::AddrWriter as _;
    let mut harness = DatapathHarness::new().expect("load datapath");
    let maps = &mut harness.datapath.maps;
    let entries: Vec<(std::net::Ipv4Addr, proxy_common::FrontendAddrV4)> = (1..=200u8)
        .map(|i| {
            (
                std::net::Ipv4Addr::new(10, 96, 1, i),
                proxy_common::FrontendAddrV4 {
                    kinds: proxy_common::frontend_addr::CLUSTER_IP,
                    _pad: [0; 3],
                },
            )
        })
        .collect();
    assert_eq!(maps.put_frontend_addrs(&entries), (200, None));
    let read = maps.read_frontend_addrs().expect("read the set");
    let held: std::collections::BTreeSet<std::net::Ipv4Addr> =
        read.held().keys().copied().collect();
    let wanted: std::collections::BTreeSet<std::net::Ipv4Addr> =
        entries.iter().map(|(addr, _)| *addr).collect();
    assert_eq!(
        held, wanted,
        "every address of the batch is in the kernel's set"
    );
    let gone = std::net::Ipv4Addr::new(10, 96, 2, 1);
    assert_eq!(maps.delete_frontend_addr(gone), Ok(()));
    assert_eq!(maps.delete_frontend_addr(entries[0].0), Ok(()));
    assert_eq!(maps.delete_frontend_addr(entries[0].0), Ok(()), "twice");
}

/// What the CRC32c update costs a known SCTP flow's packet (1000 bytes of DATA), beside
/// the same flow without a port change and a UDP flow with one: medians of 20 000
/// single runs (each one `BPF_PROG_TEST_RUN` call, so the kernel's own per-call setup
/// is in every figure; a repeat count would run every repetition on the already
/// translated packet). Printed with `--nocapture`; the bound only catches an update
/// gone far off its fixed cost (it reads no payload).
#[test]
fn sctp_crc_update_cost() {
    use kpr_lab::packets::SctpChunk;
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    let client = sock(10, 244, 1, 2, 40_000);
    let changed = sock(10, 96, 0, 30, 3868);
    let same = sock(10, 96, 0, 32, 3869);
    let udp_vip = sock(10, 96, 0, 31, 53);
    harness
        .install(&[
            frontend(
                "sctp",
                changed,
                proto::SCTP,
                &[sock(10, 244, 1, 13, 3869)],
                0,
            ),
            frontend(
                "sctp-same",
                same,
                proto::SCTP,
                &[sock(10, 244, 1, 15, 3869)],
                0,
            ),
            frontend("udp", udp_vip, proto::UDP, &[sock(10, 244, 1, 14, 5353)], 0),
        ])
        .expect("install");
    let sctp_data = |dst| {
        let mut frame = Frame::sctp(client, dst, SctpChunk::Data);
        frame.payload = vec![7; 1000];
        frame
    };
    let mut medians = Vec::new();
    for (name, frame) in [
        ("sctp, port changed", sctp_data(changed)),
        ("sctp, same port", sctp_data(same)),
        ("udp, port changed", Frame::udp(client, udp_vip, &[7; 1000])),
    ] {
        let bytes = frame.to_bytes();
        harness
            .run_on(Hook::PodIngress, &bytes, 1)
            .expect("first packet");
        let mut runs: Vec<u128> = (0..20_000)
            .map(|_| {
                harness
                    .run_on(Hook::PodIngress, &bytes, 1)
                    .expect("run")
                    .duration
                    .as_nanos()
            })
            .collect();
        runs.sort_unstable();
        println!("{name}: median {} ns per call", runs[runs.len() / 2]);
        medians.push(runs[runs.len() / 2]);
    }
    assert!(
        medians[0] < 3 * medians[2],
        "the SCTP update costs {} ns against UDP's {} ns",
        medians[0],
        medians[2]
    );
}

/// The pod egress program translates replies of flows through the stack only on the
/// interface whose ingress created them, and lets every packet leaving through an
/// interface that never had one pass without a conntrack lookup (`VIA_STACK_IF_V1`):
/// the same reply, on another pod's interface, is left as it is.
#[test]
fn pod_egress_translates_replies_only_where_a_flow_through_the_stack_began() {
    let netns =
        Netns::create(&format!("{}-via", kpr_lab::netns::unique_prefix())).expect("namespace");
    // Another pod's interface: one end of a veth pair of the namespace's own.
    netns
        .ip(&[
            "link", "add", "kprvia0", "type", "veth", "peer", "name", "kprvia1",
        ])
        .expect("veth pair");
    let outcome = netns
        .run(|| {
            // SAFETY: a NUL-terminated name; the call only reads it.
            let other = unsafe { libc::if_nametoindex(c"kprvia0".as_ptr()) };
            anyhow::ensure!(other > 1, "kprvia0 has no index");
            let loopback = 1;
            let mut harness = DatapathHarness::new()?;
            harness.clear()?;
            harness.install(&[frontend(
                "web",
                addr::vip(),
                proto::TCP,
                &[addr::backend()],
                0,
            )])?;
            let syn = Frame::tcp(addr::client(), addr::vip(), TcpFlags::SYN);
            let reply = Frame::tcp(addr::backend(), addr::client(), TcpFlags::SYN_ACK);
            let before = harness.run_on_interface(Hook::PodEgress, &reply.to_bytes(), loopback)?;
            let dnat = harness.run_on_interface(Hook::PodIngress, &syn.to_bytes(), loopback)?;
            let elsewhere = harness.run_on_interface(Hook::PodEgress, &reply.to_bytes(), other)?;
            let at_client =
                harness.run_on_interface(Hook::PodEgress, &reply.to_bytes(), loopback)?;
            Ok((before, dnat, elsewhere, at_client))
        })
        .expect("run in the namespace");
    let (before, dnat, elsewhere, at_client) = outcome;
    let reply = Frame::tcp(addr::backend(), addr::client(), TcpFlags::SYN_ACK).to_bytes();
    assert_eq!(before.packet, reply, "no flow yet: nothing to translate");
    assert_eq!(
        dnat.packet,
        Frame::tcp(addr::client(), addr::backend(), TcpFlags::SYN).to_bytes(),
        "the SYN is DNATed through the stack"
    );
    assert_eq!(
        (elsewhere.verdict, elsewhere.packet),
        (0, reply),
        "another interface's egress leaves the reply alone"
    );
    assert_eq!(
        at_client.packet,
        Frame::tcp(addr::vip(), addr::client(), TcpFlags::SYN_ACK).to_bytes(),
        "the client's interface gives the reply its ClusterIP back"
    );
}
