//! The first packet of a flow to a frontend: source ranges, reject or drop when there
//! is no backend, backend choice, masquerade decision, conntrack entries, rewrite.
//! Shared by the pod-facing and the node-facing ingress programs, which differ only in
//! where the client is ([`Origin`]).
use aya_ebpf::programs::TcContext;
use proxy_common::{
    backend_flags, counter, ct_flags, service_flags, trace::stage, CtEntryV4, CtKeyV4,
};

use crate::{
    conntrack::{self, Translation},
    destination::Destination,
    forward::{self, Flow},
    fragments,
    icmp_reply::{self, IcmpReply},
    maps, nat,
    parse::{Kind, Packet},
    service, service_stats, snat, stats, takeover, trace,
    verdict::{DropReason, Result, PASS},
};

/// Where the client of a new flow is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod on this node (pod-facing ingress).
    Pod,
    /// Outside this node: another node's pod or host, or a client outside the cluster
    /// (node-facing ingress).
    Outside,
}

/// Whether a new flow must be masqueraded to the node's address.
///
/// - From a pod: only when the pod reaches itself (hairpin). Its own reply would
///   otherwise never leave it; every other pod flow keeps the pod's address, as
///   kube-proxy does.
/// - From outside to a remote backend: always for NodePort, externalIP and
///   LoadBalancer (with externalTrafficPolicy Cluster; Local frontends have local
///   backends only), and for ClusterIPs when the client is outside the cluster CIDR
///   (kube-proxy's masquerade rule). The backend's reply then comes back here to be
///   translated. Local backends are never masqueraded: their replies pass this node
///   anyway, so the backend can see the real client (kube-proxy masquerades these too;
///   keeping the source is a deliberate improvement).
#[inline(always)]
fn needs_masquerade(
    origin: Origin,
    client: &CtKeyV4,
    frontend_flags: u16,
    backend: &proxy_common::BackendV4,
) -> bool {
    match origin {
        Origin::Pod => backend.addr == client.src_addr,
        Origin::Outside => {
            backend.flags & backend_flags::LOCAL == 0
                && (frontend_flags & service_flags::EXTERNAL != 0
                    || !maps::config().in_cluster_cidr(client.src_addr))
        }
    }
}

/// Handles a packet that matched no conntrack entry, going to `destination`. Returns
/// the verdict; packets not addressed to a frontend pass untouched, and only a packet
/// with ports (not an ICMP error, not a later fragment) can start a flow.
///
/// kube-proxy's nftables semantics for the service CIDR: a packet to an address no
/// Service holds is dropped (never an ICMP error: it says nothing of its own), and a
/// new flow to a port a live ClusterIP does not declare is answered with ICMP port
/// unreachable, as a ClusterIP without endpoints is.
#[inline(always)]
pub fn handle(
    ctx: &TcContext,
    pkt: &Packet,
    now: u64,
    origin: Origin,
    destination: Destination,
) -> Result<i32> {
    let cluster_ip = match destination {
        Destination::Elsewhere => return Ok(PASS),
        Destination::UnallocatedServiceIp if pkt.kind == Kind::IcmpError => return Ok(PASS),
        Destination::UnallocatedServiceIp => return Err(DropReason::UNALLOCATED_SERVICE_IP),
        Destination::Frontend { cluster_ip } => cluster_ip,
    };
    if pkt.kind != Kind::Transport {
        return Ok(PASS);
    }
    let Some(frontend) = service::lookup(&pkt.tuple, origin == Origin::Pod) else {
        if cluster_ip {
            trace::stage(stage::UNDECLARED_REJECT);
            return icmp_reply::send(ctx, pkt, IcmpReply::PortUndeclared);
        }
        return Ok(PASS);
    };
    trace::note(|record| {
        record.stages |= stage::FRONTEND;
        if frontend.key.scope == proxy_common::scope::INTERNAL {
            record.stages |= stage::INTERNAL_SCOPE;
        }
        record.service_id = frontend.value.service_id;
        record.frontend_flags = frontend.value.flags;
        record.frontend_count = frontend.value.count;
    });
    if takeover::netfilter_translates(ctx, pkt) {
        trace::stage(stage::NETFILTER);
        return Ok(PASS);
    }
    let flags = frontend.value.flags;
    if flags & service_flags::SOURCE_RANGES != 0 {
        if !service::source_allowed(&frontend, pkt.tuple.src_addr) {
            trace::stage(stage::SOURCE_DENIED);
            return Err(DropReason::SOURCE_RANGE);
        }
        trace::stage(stage::SOURCE_ALLOWED);
    }
    if frontend.value.count == 0 {
        if flags & service_flags::DROP_WHEN_EMPTY != 0 {
            trace::stage(stage::EMPTY_DROP);
            return Err(DropReason::NO_LOCAL_BACKEND);
        }
        trace::stage(stage::EMPTY_REJECT);
        return icmp_reply::send(ctx, pkt, IcmpReply::PortUnreachable);
    }

    let (backend_id, backend) = service::select_backend(&frontend, pkt.tuple.src_addr)?;
    let service_id = frontend.value.service_id;
    let masquerade = needs_masquerade(origin, &pkt.tuple, flags, &backend);
    // A local backend's replies leave its pod through the pod-ingress program of its
    // veth, which lets traffic to no frontend pass before any conntrack lookup (the
    // lean path), so they go through the stack and are translated at egress: the
    // flow's requests must then go through the stack too (see `ct_flags::VIA_STACK`).
    let via_stack = !masquerade && backend.flags & backend_flags::LOCAL != 0;
    trace::note(|record| {
        record.stages |= stage::BACKEND;
        record.backend_id = backend_id;
        if masquerade {
            record.stages |= stage::MASQUERADE;
        }
    });
    let translation = Translation {
        new_src: (
            if masquerade {
                snat::address()?
            } else {
                pkt.tuple.src_addr
            },
            pkt.tuple.src_port,
        ),
        new_dst: (backend.addr, backend.port),
        backend_id,
        service_id,
        via_stack,
        masquerade,
    };
    // One call site for every kind of flow: the claim loop in it is verified once per
    // state that reaches it.
    let mut entry = CtEntryV4::default();
    if !conntrack::create(&pkt.tuple, &translation, now, &mut entry)? {
        // Every port tried is held by a live flow to that backend.
        return Err(DropReason::SNAT_PORTS);
    }
    if !masquerade && entry.flags & ct_flags::REWRITE_SRC != 0 {
        stats::count(counter::SOURCE_PORT_REMAPPED);
    }
    fragments::remember(pkt, now);
    stats::count(counter::NEW_FLOW);
    service_stats::count_new_flow(service_id, pkt);
    if masquerade {
        stats::count(if origin == Origin::Pod {
            counter::HAIRPIN_FLOW
        } else {
            counter::SNAT_FLOW
        });
    }
    if origin == Origin::Pod {
        // Any pod flow's replies may meet the egress program of the client's interface:
        // a flow through the stack's always do, another's when its packets could not be
        // redirected and went through the stack ([`forward::send`]).
        // SAFETY: the context's skb is valid for the program's run.
        crate::via_stack::note_client_interface(unsafe { (*ctx.skb.skb).ifindex });
    }
    if via_stack {
        nat::apply(ctx, pkt, &entry)?;
        return Ok(PASS);
    }
    // Straight to the next hop, as the ingress programs send its replies.
    forward::translate_and_send(ctx, pkt, &entry, Flow::New)
}
