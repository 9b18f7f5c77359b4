//! Per-service traffic counters (`SVC_STATS_V1`): what the datapath counts, run with
//! BPF_PROG_TEST_RUN on the real object with maps the real syncer filled, and what the
//! counting costs per packet.
use std::collections::BTreeSet;

use kpr_lab::{
    datapath_cases::{addr, frontend, DatapathHarness},
    packets::{sock, Frame, TcpFlags},
};
use proxy_common::{proto, service_stats::ServiceStatsV1};
use proxy_userspace::{
    datapath::Hook,
    service_counters::{Mode, ServiceCounters},
};

/// IP bytes of a frame (what the counters add): the frame minus its Ethernet header.
fn ip_len(frame: &[u8]) -> u64 {
    (frame.len() - 14) as u64
}

fn run_ok(harness: &mut DatapathHarness, hook: Hook, frame: &[u8]) {
    let output = harness.run_on(hook, frame, 1).expect("test run");
    assert_eq!(output.verdict, 0, "TC_ACT_OK");
}

#[test]
fn the_datapath_counts_connections_packets_and_bytes_per_service_port() {
    let mut harness = DatapathHarness::new().expect("load datapath");
    let web = frontend("web", addr::vip(), proto::TCP, &[addr::backend()], 0);
    let dns = frontend(
        "dns",
        addr::vip_dns(),
        proto::UDP,
        &[addr::dns_backend()],
        0,
    );
    harness
        .install(&[web.clone(), dns.clone()])
        .expect("install");
    let web_id = harness.service_id(&web.1.service_port).expect("web's id");
    let dns_id = harness.service_id(&dns.1.service_port).expect("dns's id");
    let mut counters = ServiceCounters::adopt(Mode::On, &harness.datapath.maps);
    counters
        .sync(
            &mut harness.datapath.maps,
            &BTreeSet::from([web_id, dns_id]),
        )
        .expect("counter entries");

    let syn = Frame::tcp(addr::client(), addr::vip(), TcpFlags::SYN).to_bytes();
    let ack = Frame::tcp(addr::client(), addr::vip(), TcpFlags::ACK).to_bytes();
    let reply = Frame::tcp(addr::backend(), addr::client(), TcpFlags::SYN_ACK).to_bytes();
    run_ok(&mut harness, Hook::PodIngress, &syn);
    run_ok(&mut harness, Hook::PodEgress, &reply);
    for _ in 0..3 {
        run_ok(&mut harness, Hook::PodIngress, &ack);
    }
    // Traffic for no service counts nowhere.
    let other = Frame::tcp(addr::client(), sock(10, 244, 1, 99, 80), TcpFlags::SYN).to_bytes();
    run_ok(&mut harness, Hook::PodIngress, &other);

    let totals = counters.read(&harness.datapath.maps);
    assert_eq!(
        totals.get(&web_id),
        Some(&ServiceStatsV1 {
            connections: 1,
            packets: 5,
            bytes: ip_len(&syn) + ip_len(&reply) + 3 * ip_len(&ack),
        })
    );
    assert_eq!(totals.get(&dns_id), Some(&ServiceStatsV1::default()));

    // Off: the entries go, and nothing brings them back.
    let mut off = ServiceCounters::adopt(Mode::Off, &harness.datapath.maps);
    assert_eq!(off.counted(), &BTreeSet::from([web_id, dns_id]), "adopted");
    off.sync(
        &mut harness.datapath.maps,
        &BTreeSet::from([web_id, dns_id]),
    )
    .expect("remove entries");
    run_ok(&mut harness, Hook::PodIngress, &ack);
    assert_eq!(harness.datapath.maps.service_stats.keys().count(), 0);
}

/// Kernel-measured time per run of `repeat` runs of `frame` in one call.
fn per_run_ns(harness: &mut DatapathHarness, frame: &[u8], repeat: u32) -> f64 {
    let output = harness
        .run_on(Hook::PodIngress, frame, repeat)
        .expect("test run");
    assert_eq!(output.verdict, 0);
    output.duration.as_nanos() as f64
}

/// The cost of counting, per packet of an established flow, as BPF_PROG_TEST_RUN
/// times it: printed for the README, not asserted (no timed assertions).
///
/// The service's backend is its own address, so the translation rewrites nothing and
/// every one of `REPEAT` runs in a call sees the same packet: a conntrack hit, the
/// (identity) rewrite and the counting, the path of every packet after a flow's
/// first. Rounds alternate off and on, so other work on the machine hits both alike.
#[test]
fn per_service_counters_cost_per_packet() {
    const REPEAT: u32 = 200_000;
    const ROUNDS: u32 = 9;
    let mut harness = DatapathHarness::new().expect("load datapath");
    let web = frontend("web", addr::vip(), proto::TCP, &[addr::vip()], 0);
    harness
        .install(std::slice::from_ref(&web))
        .expect("install");
    let id = harness.service_id(&web.1.service_port).expect("id");
    let syn = Frame::tcp(addr::client(), addr::vip(), TcpFlags::SYN).to_bytes();
    run_ok(&mut harness, Hook::PodIngress, &syn);
    let ack = Frame::tcp(addr::client(), addr::vip(), TcpFlags::ACK).to_bytes();
    let (mut off_ns, mut on_ns) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut off = ServiceCounters::adopt(Mode::Off, &harness.datapath.maps);
        off.sync(&mut harness.datapath.maps, &BTreeSet::from([id]))
            .expect("off");
        off_ns.push(per_run_ns(&mut harness, &ack, REPEAT));
        let mut on = ServiceCounters::adopt(Mode::On, &harness.datapath.maps);
        on.sync(&mut harness.datapath.maps, &BTreeSet::from([id]))
            .expect("on");
        on_ns.push(per_run_ns(&mut harness, &ack, REPEAT));
        let counted = on.read(&harness.datapath.maps)[&id].packets;
        assert_eq!(counted, u64::from(REPEAT), "every run counted");
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (off, on) = (median(&mut off_ns), median(&mut on_ns));
    println!(
        "per-service counters, established packet (pod ingress, conntrack hit), ns per \
         packet (median of {ROUNDS} rounds of {REPEAT} runs): off {off:.1}, on {on:.1}, \
         cost {:.1}",
        on - off
    );
}
