//! BPF_PROG_TEST_RUN tests of the pod ingress program: the table in
//! `kpr_lab::datapath_cases`, plus behaviours that need more than one packet in and one
//! out (spread over backends, affinity, expiry, close tracking).
use std::collections::BTreeMap;

use kpr_lab::{
    datapath_cases::{
        addr, cases, frontend, node_cases, routed_cases, Case, DatapathHarness, ROUTED_GATEWAY,
        ROUTED_LINK_MTU,
    },
    netns::Netns,
    packets::{sock, Frame, TcpFlags},
};
use proxy_common::{counter, ct_flags, proto, service_flags, Be16, Be32, CtEntryV4, CtKeyV4};

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
fn an_expired_flow_is_not_reused() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    let backend = sock(10, 244, 1, 11, 8080);
    harness
        .install(&[frontend("web", addr::vip(), proto::TCP, &[backend], 0)])
        .expect("install");
    // A stale entry pointing elsewhere, last seen at boot.
    let stale_key = CtKeyV4 {
        src_addr: Be32::from_ipv4(*addr::client().ip()),
        dst_addr: Be32::from_ipv4(*addr::vip().ip()),
        src_port: Be16::from_host(addr::client().port()),
        dst_port: Be16::from_host(addr::vip().port()),
        proto: proto::TCP,
        _pad: [0; 3],
    };
    let stale = CtEntryV4 {
        last_seen_ns: 0,
        nat_dst_addr: Be32::from_ipv4(std::net::Ipv4Addr::new(10, 244, 9, 9)),
        nat_dst_port: Be16::from_host(9),
        flags: ct_flags::REWRITE_DST,
        ..CtEntryV4::default()
    };
    harness
        .datapath
        .maps
        .conntrack
        .insert(stale_key, stale, 0)
        .expect("insert");
    // The defaults (24 h) would keep a boot-time entry on a young machine; use 1 s.
    let mut config = proxy_common::DatapathConfig::DEFAULT;
    config.tcp_established_timeout_s = 1;
    harness.datapath.maps.set_config(&config).expect("config");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let output = harness
        .run(
            &Frame::tcp(addr::client(), addr::vip(), TcpFlags::SYN).to_bytes(),
            1,
        )
        .expect("run");
    harness
        .datapath
        .maps
        .set_config(&proxy_common::DatapathConfig::DEFAULT)
        .expect("config");
    assert_eq!(
        output.packet,
        Frame::tcp(addr::client(), backend, TcpFlags::SYN).to_bytes()
    );
}

#[test]
fn a_fin_marks_both_directions_closing() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    harness.clear().expect("clear");
    let backend = sock(10, 244, 1, 11, 8080);
    harness
        .install(&[frontend("web", addr::vip(), proto::TCP, &[backend], 0)])
        .expect("install");
    let client = addr::client();
    harness
        .run(
            &Frame::tcp(client, addr::vip(), TcpFlags::SYN).to_bytes(),
            1,
        )
        .expect("syn");
    harness
        .run(
            &Frame::tcp(client, addr::vip(), TcpFlags::FIN_ACK).to_bytes(),
            1,
        )
        .expect("fin");
    let entries: Vec<(CtKeyV4, CtEntryV4)> = harness
        .datapath
        .maps
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for (key, entry) in entries {
        assert_ne!(entry.flags & ct_flags::CLOSING, 0, "{key:?} {entry:?}");
    }
}
