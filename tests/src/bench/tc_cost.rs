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
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use anyhow::{bail, Result};
use proxy_common::{proto, service_flags};
use proxy_userspace::datapath::LoadOptions;
use proxy_userspace::service_counters::{Mode as CountersMode, ServiceCounters};
use serde::Serialize;

use super::services::ServiceSet;
use proxy_userspace::{
    model::{Desired, FamilyDesired, FrontendKey, FrontendKind, FrontendSpec, ServicePortName},
    state::ObjectKey,
    sync::{frontend_addrs::FrontendAddrs, Syncer},
};

use crate::{
    datapath_cases::{frontend, DatapathHarness},
    packets::{Frame, Frame6, TcpFlags},
    scenario::CLIENT_IP,
};

/// Nanoseconds per packet, as the kernel measured them.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TcCost {
    pub services: usize,
    /// `IPv4` or `IPv6`: the family of the services and packets.
    pub family: &'static str,
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

/// The frames one family's measurement sends through pod ingress.
trait Frames {
    /// A TCP segment from client port `port` to service `index`'s frontend, or with
    /// `None` to the looped frontend (see the module doc).
    fn to_service(&self, port: u16, index: Option<usize>, flags: TcpFlags) -> Vec<u8>;
    /// A SYN from client port `port` to a pod address (no frontend).
    fn to_pod(&self, port: u16) -> Vec<u8>;
}

/// IPv4: the bench's services as they are.
struct Ipv4Frames<'a>(&'a ServiceSet);

impl Frames for Ipv4Frames<'_> {
    fn to_service(&self, port: u16, index: Option<usize>, flags: TcpFlags) -> Vec<u8> {
        let index = index.unwrap_or(self.0.len());
        Frame::tcp(
            SocketAddrV4::new(CLIENT_IP, port),
            ServiceSet::frontend(index),
            flags,
        )
        .to_bytes()
    }

    fn to_pod(&self, port: u16) -> Vec<u8> {
        Frame::tcp(
            SocketAddrV4::new(CLIENT_IP, port),
            self.0.backends()[0],
            TcpFlags::SYN,
        )
        .to_bytes()
    }
}

/// IPv6: the same services and pods with IPv6 addresses (`fd00:96::/64` ClusterIPs,
/// `fd00:10:244:1::/64` pods, the IPv4 address's low 32 bits as the interface id).
struct Ipv6Frames<'a>(&'a ServiceSet);

/// The IPv6 twin of an IPv4 address of the bench (see [`Ipv6Frames`]).
fn twin(prefix: [u16; 4], addr: Ipv4Addr) -> Ipv6Addr {
    let low = u32::from(addr);
    #[expect(clippy::cast_possible_truncation, reason = "the two halves of a u32")]
    let (high, low) = ((low >> 16) as u16, low as u16);
    Ipv6Addr::new(prefix[0], prefix[1], prefix[2], prefix[3], 0, 0, high, low)
}

const CLUSTER_IPS_V6: [u16; 4] = [0xfd00, 0x96, 0, 0];
const PODS_V6: [u16; 4] = [0xfd00, 0x10, 0x244, 1];

fn frontend_v6(index: usize) -> SocketAddrV6 {
    let v4 = ServiceSet::frontend(index);
    SocketAddrV6::new(twin(CLUSTER_IPS_V6, *v4.ip()), v4.port(), 0, 0)
}

fn pod_v6(addr: SocketAddrV4) -> SocketAddrV6 {
    SocketAddrV6::new(twin(PODS_V6, *addr.ip()), addr.port(), 0, 0)
}

impl Frames for Ipv6Frames<'_> {
    fn to_service(&self, port: u16, index: Option<usize>, flags: TcpFlags) -> Vec<u8> {
        let index = index.unwrap_or(self.0.len());
        let client = pod_v6(SocketAddrV4::new(CLIENT_IP, port));
        Frame6::tcp(client, frontend_v6(index), flags).to_bytes()
    }

    fn to_pod(&self, port: u16) -> Vec<u8> {
        let client = pod_v6(SocketAddrV4::new(CLIENT_IP, port));
        Frame6::tcp(client, pod_v6(self.0.backends()[0]), TcpFlags::SYN).to_bytes()
    }
}

/// A harness with a service map as large as the agent would make it for `set`
/// (frontends plus a slot per backend, half again to grow), not the default.
fn harness_for(set: &ServiceSet) -> Result<DatapathHarness> {
    let entries = set.len() * (1 + set.backends().len());
    let grown = |default| proxy_userspace::datapath::grown_for(default, entries);
    DatapathHarness::with_options(&LoadOptions {
        services_max: Some(grown(proxy_common::capacity::SERVICES_V4)),
        services_v6_max: Some(grown(proxy_common::capacity::SERVICES_V6)),
        ..LoadOptions::default()
    })
}

fn affinity_flags(set: &ServiceSet) -> u16 {
    if set.affinity() {
        service_flags::AFFINITY
    } else {
        0
    }
}

/// Loads the datapath, programs `set` and measures. `repeat` runs per call for the
/// established and miss cases, `new_flows` single runs for new flows.
///
/// # Errors
/// When loading, programming or a run fails, or a packet gets an unexpected verdict.
pub fn measure(set: &ServiceSet, repeat: u32, new_flows: u16) -> Result<TcCost> {
    let mut harness = harness_for(set)?;
    let mut installed: Vec<_> = (0..set.len())
        .map(|index| {
            frontend(
                &ServiceSet::name(index),
                ServiceSet::frontend(index),
                proto::TCP,
                set.backends(),
                affinity_flags(set),
            )
        })
        .collect();
    // The repeated established packet's own frontend (see the module doc).
    let looped = ServiceSet::frontend(set.len());
    installed.push(frontend("looped", looped, proto::TCP, &[looped], 0));
    harness.install(&installed)?;
    let frames = Ipv4Frames(set);
    let mut cost = timings(&mut harness, "IPv4", &frames, set.len(), repeat, new_flows)?;

    // The established packet again with its service's counters on.
    let Some(looped_id) = installed
        .last()
        .and_then(|(_, spec)| harness.service_id(&spec.service_port))
    else {
        bail!("the looped frontend has no service id");
    };
    let established = frames.to_service(LOOPED_PORT, None, TcpFlags::ACK);
    let mut counters = ServiceCounters::adopt(CountersMode::On, &harness.datapath.maps);
    counters.sync(&mut harness.datapath.maps, &BTreeSet::from([looped_id]))?;
    cost.established_counted_ns = run_checked(
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
    Ok(cost)
}

/// [`measure`] for the same services and pods with IPv6 addresses, programmed by the
/// IPv6 syncer. Per-service counters are IPv4-only, so `established_counted_ns` is 0.
///
/// # Errors
/// As [`measure`].
pub fn measure_v6(set: &ServiceSet, repeat: u32, new_flows: u16) -> Result<TcCost> {
    let mut harness = harness_for(set)?;
    let backends: Vec<SocketAddrV6> = set.backends().iter().copied().map(pod_v6).collect();
    let spec = |name: String, backends: Vec<SocketAddrV6>, flags| FrontendSpec::<Ipv6Addr> {
        service_port: ServicePortName {
            service: ObjectKey::new("bench", name.as_str()),
            port: "http".into(),
            proto: proto::TCP,
        },
        kind: FrontendKind::ClusterIp,
        backends,
        flags,
        affinity_timeout_s: if flags & service_flags::AFFINITY != 0 {
            10_800
        } else {
            0
        },
    };
    let key = |addr: SocketAddrV6| FrontendKey::<Ipv6Addr> {
        addr: *addr.ip(),
        port: addr.port(),
        proto: proto::TCP,
        scope: proxy_common::scope::DEFAULT,
    };
    let mut installed: Vec<_> = (0..set.len())
        .map(|index| {
            (
                key(frontend_v6(index)),
                spec(
                    ServiceSet::name(index),
                    backends.clone(),
                    affinity_flags(set),
                ),
            )
        })
        .collect();
    let looped = frontend_v6(set.len());
    installed.push((key(looped), spec("looped".to_owned(), vec![looped], 0)));
    install_v6(&mut harness, &installed)?;
    timings(
        &mut harness,
        "IPv6",
        &Ipv6Frames(set),
        set.len(),
        repeat,
        new_flows,
    )
}

/// Programs `frontends` into the IPv6 maps through the real IPv6 syncer and frontend
/// address set, in the agent's order (addresses, then frontends).
fn install_v6(
    harness: &mut DatapathHarness,
    frontends: &[(FrontendKey<Ipv6Addr>, FrontendSpec<Ipv6Addr>)],
) -> Result<()> {
    let desired = Desired {
        v6: FamilyDesired {
            frontends: frontends
                .iter()
                .map(|(key, spec)| (*key, std::sync::Arc::new(spec.clone())))
                .collect(),
            ..FamilyDesired::default()
        },
        ..Desired::default()
    };
    let maps = &mut harness.datapath.maps;
    let mut addrs = FrontendAddrs::<Ipv6Addr>::default();
    if let Some(error) = addrs.add_desired(&desired, maps).first() {
        bail!("programming the IPv6 frontend address set: {error}");
    }
    let report = Syncer::<Ipv6Addr>::default().sync(&desired, maps);
    if let Some(failure) = report.failures.first() {
        bail!("programming {}: {}", failure.service_port, failure.error);
    }
    Ok(())
}

/// The client port of the looped flow (the repeated established packet).
const LOOPED_PORT: u16 = 40_001;

/// Every figure but `established_counted_ns`, on a harness that holds `services`
/// frontends plus the looped one.
fn timings(
    harness: &mut DatapathHarness,
    family: &'static str,
    frames: &impl Frames,
    services: usize,
    repeat: u32,
    new_flows: u16,
) -> Result<TcCost> {
    let miss_ns = run_checked(harness, &frames.to_pod(40_000), repeat, "miss")?;

    let first = frames.to_service(LOOPED_PORT, None, TcpFlags::SYN);
    run_checked(harness, &first, 1, "first packet of the established flow")?;
    let established = frames.to_service(LOOPED_PORT, None, TcpFlags::ACK);
    let established_ns = run_checked(harness, &established, repeat, "established")?;

    let mut single = 0.0;
    for flow in 0..new_flows {
        single += run_checked(harness, &frames.to_pod(1024 + flow), 1, "single-run miss")?;
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
        let index = (random % services as u64) as usize;
        let syn = frames.to_service(1024 + flow, Some(index), TcpFlags::SYN);
        total += run_checked(harness, &syn, 1, "new flow")?;
        flows.push((1024 + flow, index));
    }
    let new_flow_ns = total / f64::from(new_flows.max(1));

    // The same flows again, now established, each once in turn.
    let mut established_total = 0.0;
    for &(port, index) in &flows {
        let ack = frames.to_service(port, Some(index), TcpFlags::ACK);
        established_total += run_checked(harness, &ack, 1, "established, one run per call")?;
    }
    let single_run_established_ns = established_total / f64::from(new_flows.max(1));

    let mut one_service = 0.0;
    for flow in 0..new_flows {
        let syn = frames.to_service(30_000 + flow, Some(services / 2), TcpFlags::SYN);
        one_service += run_checked(harness, &syn, 1, "new flow to one service")?;
    }
    let new_flow_one_service_ns = one_service / f64::from(new_flows.max(1));
    Ok(TcCost {
        services,
        family,
        new_flow_ns,
        established_ns,
        single_run_established_ns,
        established_counted_ns: 0.0,
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
