//! The per-packet cost of our TC program at N services, measured by the kernel with
//! `BPF_PROG_TEST_RUN` on the real object, its maps filled by the real syncer (the
//! datapath test table's harness, [`DatapathHarness`]). Two ways of timing: "one run
//! per call" times each call on its own (the kernel's per-call timer and whatever the
//! previous call left in the caches included), "repeat" runs the same packet `repeat`
//! times in one call and divides (warm caches, the timer spread over the runs).
//!
//! - new flow, one run per call: a SYN to a random ClusterIP (conntrack miss,
//!   frontend hit, backend choice, conntrack creation, DNAT), each from a fresh
//!   source port so every run is a new flow;
//! - established, one run per call: an ACK of each of those new flows in turn, so
//!   every call is a packet of a flow whose conntrack entry exists, spread over as
//!   many flows and services as the new flows: the established packet timed the same
//!   way as the new flow, so new / established (same method) compares like with like;
//! - established, repeat: one ACK of one established flow, `repeat` runs per call
//!   (the per-packet work of every packet after the first, caches warm); new flow /
//!   this is the ratio the bench used to report, which mixes the two timings. The
//!   kernel runs every repeat on the same buffer, as the previous run left it, so a
//!   flow whose translation rewrites the packet would be a miss from the second run
//!   on: this flow goes to one extra frontend whose backend is its own address and
//!   port, so its translation leaves the packet as it was and every run takes the
//!   established path (checked: the per-service counter counts every run). It pays
//!   the conntrack hit, the route and the send, not the header rewrite;
//! - miss: a SYN to a pod address (conntrack miss, frontend miss: what traffic that is
//!   not for a service pays), `repeat` runs per call;
//! - single-run miss: the miss measured one run per call, like new flows: the
//!   difference to the miss is what one-run calls add (timer, cold caches), so
//!   new flow minus (single-run miss minus miss) estimates a new flow's own cost;
//! - established with per-service counters: the established packet (repeat) again
//!   with the per-service traffic counters on for its service (what
//!   `--service-counters on` gives every service): the difference to the
//!   established packet is their cost per packet;
//! - new flow to one service: new flows as above, all to the same ClusterIP, so its
//!   frontend, slot and backend entries stay in the caches: the new flow (random
//!   services) minus this is what the service and backend lookups cost when they miss
//!   the CPU caches and TLB at N services.
use std::{collections::BTreeSet, net::SocketAddrV4};

use anyhow::{bail, Result};
use proxy_common::{proto, service_flags};
use proxy_userspace::datapath::LoadOptions;
use proxy_userspace::service_counters::{Mode as CountersMode, ServiceCounters};
use serde::Serialize;

use super::services::ServiceSet;
use crate::{
    datapath_cases::{frontend, DatapathHarness},
    packets::{Frame, TcpFlags},
    scenario::CLIENT_IP,
};

/// Nanoseconds per packet, as the kernel measured them.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TcCost {
    pub services: usize,
    pub new_flow_ns: f64,
    pub established_ns: f64,
    pub single_run_established_ns: f64,
    pub established_counted_ns: f64,
    pub miss_ns: f64,
    pub single_run_miss_ns: f64,
    pub new_flow_one_service_ns: f64,
}

impl TcCost {
    /// New flow over established, both timed one run per call.
    #[must_use]
    pub fn new_over_established_same_method(&self) -> f64 {
        self.new_flow_ns / self.single_run_established_ns.max(f64::MIN_POSITIVE)
    }

    /// New flow (one run per call) over established (`repeat` runs per call).
    #[must_use]
    pub fn new_over_established_repeated(&self) -> f64 {
        self.new_flow_ns / self.established_ns.max(f64::MIN_POSITIVE)
    }
}

/// Loads the datapath, programs `set` and measures. `repeat` runs per call for the
/// established and miss cases, `new_flows` single runs for new flows.
///
/// # Errors
/// When loading, programming or a run fails, or a packet gets an unexpected verdict.
pub fn measure(set: &ServiceSet, repeat: u32, new_flows: u16) -> Result<TcCost> {
    // A service map as large as the agent would make it for this set (frontends plus
    // a slot per backend, half again to grow), not the default.
    let entries = set.len() * (1 + set.backends().len());
    let mut harness = DatapathHarness::with_options(&LoadOptions {
        services_max: Some(proxy_userspace::datapath::grown_for(
            proxy_common::capacity::SERVICES_V4,
            entries,
        )),
        ..LoadOptions::default()
    })?;
    let frontends: Vec<_> = (0..set.len())
        .map(|index| {
            frontend(
                &ServiceSet::name(index),
                ServiceSet::frontend(index),
                proto::TCP,
                set.backends(),
                if set.affinity() {
                    service_flags::AFFINITY
                } else {
                    0
                },
            )
        })
        .collect();
    // The repeated established packet's own frontend (see the module doc).
    let looped = ServiceSet::frontend(set.len());
    let mut installed = frontends.clone();
    installed.push(frontend("looped", looped, proto::TCP, &[looped], 0));
    harness.install(&installed)?;
    let client = |port: u16| SocketAddrV4::new(CLIENT_IP, port);

    let miss = Frame::tcp(client(40_000), set.backends()[0], TcpFlags::SYN).to_bytes();
    let miss_ns = run_checked(&mut harness, &miss, repeat, "miss")?;

    let middle = ServiceSet::frontend(set.len() / 2);
    let first = Frame::tcp(client(40_001), looped, TcpFlags::SYN).to_bytes();
    run_checked(
        &mut harness,
        &first,
        1,
        "first packet of the established flow",
    )?;
    let established = Frame::tcp(client(40_001), looped, TcpFlags::ACK).to_bytes();
    let established_ns = run_checked(&mut harness, &established, repeat, "established")?;
    let Some(looped_id) = installed
        .last()
        .and_then(|(_, spec)| harness.service_id(&spec.service_port))
    else {
        bail!("the looped frontend has no service id");
    };
    let mut counters = ServiceCounters::adopt(CountersMode::On, &harness.datapath.maps);
    counters.sync(&mut harness.datapath.maps, &BTreeSet::from([looped_id]))?;
    let established_counted_ns = run_checked(
        &mut harness,
        &established,
        repeat,
        "established, per-service counters on",
    )?;
    let counted = counters
        .read(&harness.datapath.maps)
        .get(&looped_id)
        .map_or(0, |stats| stats.packets);
    if counted != u64::from(repeat) {
        bail!("established, repeat: {counted} of {repeat} runs took the established path");
    }
    let mut counters = ServiceCounters::adopt(CountersMode::Off, &harness.datapath.maps);
    counters.sync(&mut harness.datapath.maps, &BTreeSet::from([looped_id]))?;

    let mut single = 0.0;
    for flow in 0..new_flows {
        let miss = Frame::tcp(client(1024 + flow), set.backends()[0], TcpFlags::SYN).to_bytes();
        single += run_checked(&mut harness, &miss, 1, "single-run miss")?;
    }
    let single_run_miss_ns = single / f64::from(new_flows.max(1));

    let mut total = 0.0;
    let mut random = 0x2545_f491_4f6c_dd1d_u64;
    let mut flows = Vec::with_capacity(usize::from(new_flows));
    for flow in 0..new_flows {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an index modulo the length"
        )]
        let index = (random % set.len() as u64) as usize;
        let (source, destination) = (client(1024 + flow), ServiceSet::frontend(index));
        let syn = Frame::tcp(source, destination, TcpFlags::SYN).to_bytes();
        total += run_checked(&mut harness, &syn, 1, "new flow")?;
        flows.push((source, destination));
    }
    let new_flow_ns = total / f64::from(new_flows.max(1));

    // The same flows again, now established, each once in turn.
    let mut established_total = 0.0;
    for &(source, destination) in &flows {
        let ack = Frame::tcp(source, destination, TcpFlags::ACK).to_bytes();
        established_total += run_checked(&mut harness, &ack, 1, "established, one run per call")?;
    }
    let single_run_established_ns = established_total / f64::from(new_flows.max(1));

    let mut one_service = 0.0;
    for flow in 0..new_flows {
        let syn = Frame::tcp(client(30_000 + flow), middle, TcpFlags::SYN).to_bytes();
        one_service += run_checked(&mut harness, &syn, 1, "new flow to one service")?;
    }
    let new_flow_one_service_ns = one_service / f64::from(new_flows.max(1));
    Ok(TcCost {
        services: set.len(),
        new_flow_ns,
        established_ns,
        single_run_established_ns,
        established_counted_ns,
        miss_ns,
        single_run_miss_ns,
        new_flow_one_service_ns,
    })
}

/// Runs pod ingress and insists on TC_ACT_OK (a translated or untouched packet).
fn run_checked(
    harness: &mut DatapathHarness,
    frame: &[u8],
    repeat: u32,
    what: &str,
) -> Result<f64> {
    let output = harness.run(frame, repeat)?;
    if output.verdict != 0 {
        bail!("{what}: verdict {} instead of TC_ACT_OK", output.verdict);
    }
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds far below 2^52")]
    let nanos = output.duration.as_nanos() as f64;
    Ok(nanos)
}
