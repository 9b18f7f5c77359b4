//! The per-packet cost of our TC program at N services, measured by the kernel with
//! `BPF_PROG_TEST_RUN` on the real object, its maps filled by the real syncer (the
//! datapath test table's harness, [`DatapathHarness`]):
//!
//! - new flow: a SYN to a ClusterIP (conntrack miss, frontend hit, backend choice,
//!   conntrack creation, DNAT), each run from a fresh source port so every run is a
//!   new flow; one run per call, so the kernel's per-call timer overhead is included;
//! - established: a packet of a flow that already has its conntrack entry (the
//!   per-packet work of every packet after the first), `repeat` runs per call;
//! - miss: a SYN to a pod address (conntrack miss, frontend miss: what traffic that is
//!   not for a service pays), `repeat` runs per call;
//! - single-run miss: the miss measured one run per call, like new flows: the
//!   difference to the miss is what one-run calls add (timer, cold caches), so
//!   new flow minus (single-run miss minus miss) estimates a new flow's own cost;
//! - established with per-service counters: the established packet again with the
//!   per-service traffic counters on for every service (`--service-counters on`):
//!   the difference to the established packet is their cost per packet;
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
    pub established_counted_ns: f64,
    pub miss_ns: f64,
    pub single_run_miss_ns: f64,
    pub new_flow_one_service_ns: f64,
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
    harness.install(&frontends)?;
    let client = |port: u16| SocketAddrV4::new(CLIENT_IP, port);

    let miss = Frame::tcp(client(40_000), set.backends()[0], TcpFlags::SYN).to_bytes();
    let miss_ns = run_checked(&mut harness, &miss, repeat, "miss")?;

    let middle = ServiceSet::frontend(set.len() / 2);
    let first = Frame::tcp(client(40_001), middle, TcpFlags::SYN).to_bytes();
    run_checked(
        &mut harness,
        &first,
        1,
        "first packet of the established flow",
    )?;
    let established = Frame::tcp(client(40_001), middle, TcpFlags::ACK).to_bytes();
    let established_ns = run_checked(&mut harness, &established, repeat, "established")?;
    let service_ids: BTreeSet<u32> = frontends
        .iter()
        .filter_map(|(_, spec)| harness.service_id(&spec.service_port))
        .collect();
    let mut counters = ServiceCounters::adopt(CountersMode::On, &harness.datapath.maps);
    counters.sync(&mut harness.datapath.maps, &service_ids)?;
    let established_counted_ns = run_checked(
        &mut harness,
        &established,
        repeat,
        "established, per-service counters on",
    )?;
    let mut counters = ServiceCounters::adopt(CountersMode::Off, &harness.datapath.maps);
    counters.sync(&mut harness.datapath.maps, &service_ids)?;

    let mut single = 0.0;
    for flow in 0..new_flows {
        let miss = Frame::tcp(client(1024 + flow), set.backends()[0], TcpFlags::SYN).to_bytes();
        single += run_checked(&mut harness, &miss, 1, "single-run miss")?;
    }
    let single_run_miss_ns = single / f64::from(new_flows.max(1));

    let mut total = 0.0;
    let mut random = 0x2545_f491_4f6c_dd1d_u64;
    for flow in 0..new_flows {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an index modulo the length"
        )]
        let index = (random % set.len() as u64) as usize;
        let syn = Frame::tcp(
            client(1024 + flow),
            ServiceSet::frontend(index),
            TcpFlags::SYN,
        )
        .to_bytes();
        total += run_checked(&mut harness, &syn, 1, "new flow")?;
    }
    let new_flow_ns = total / f64::from(new_flows.max(1));

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
