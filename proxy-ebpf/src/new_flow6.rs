//! IPv6 on the TC hooks: DNAT of TCP/UDP flows from pods (ClusterIPs) and from outside
//! the node (NodePorts, externalIPs, LoadBalancer IPs), with masquerade where the
//! IPv4 path masquerades, and the reverse on the replies. The entry points dispatch
//! here on the ethertype before the IPv4 code runs, so an IPv4 packet runs the code it
//! ran before plus that one comparison.
//!
//! ICMPv6 errors about a flow ([`crate::icmp6_error`]) and its datagrams' later
//! fragments ([`crate::fragments6`]) follow the flow's entry, in the same hooks.
//!
//! A flow from a pod, and one to a local backend, go through the stack in both
//! directions ([`proxy_common::ct_flags::VIA_STACK`]): its requests are DNATed at
//! ingress and routed by the kernel, its replies translated back at the egress of the
//! client's interface, after routing. A flow from outside to a remote backend is sent
//! to its next hop both ways ([`crate::forward6`]), as for IPv4. Netfilter thus sees
//! each flow both ways or not at all. A pod reaching itself through a frontend (the
//! hairpin) is masqueraded to the node's IPv6 address and redirected both ways, as for
//! IPv4: its own reply would otherwise never leave it.
//!
//! The stages are BPF-to-BPF calls ([`crate::parse6::parse`] says why); this frame
//! holds the packet and its entry, which they fill.
use aya_ebpf::bindings::__sk_buff;
use proxy_common::{
    backend_flags, counter, ct_flags, service_flags, trace::stage, Be32x4, CtEntryV6,
};

use crate::{
    conntrack6::{self, Translation},
    destination::Destination,
    forward6::{self, Flow},
    fragments6,
    icmp6_reply::{self, Reason},
    maps, nat6,
    parse::Kind,
    parse6::{self, Packet6},
    service6::{self, Chosen, Outcome},
    snat6, stats, trace,
    verdict::{DropReason, Result, PASS},
};

/// `tc_pod_ingress` for an IPv6 frame: packets leaving pods. Returns the verdict, a
/// drop already counted.
#[inline(never)]
pub fn pod_ingress(skb: *mut __sk_buff, now: u64) -> i32 {
    crate::verdict_of(try_pod_ingress(skb, now))
}

/// The egress programs for an IPv6 frame, as [`pod_ingress`].
#[inline(never)]
pub fn reply_egress(skb: *mut __sk_buff, now: u64) -> i32 {
    crate::verdict_of(try_reply_egress(skb, now))
}

#[inline(always)]
fn try_pod_ingress(skb: *mut __sk_buff, now: u64) -> Result<i32> {
    let mut pkt = Packet6::default();
    if !parse6::parse(skb, &mut pkt) {
        return Ok(PASS);
    }
    trace::stage(stage::PARSED);
    // The lean path: a packet to no frontend address is a pod's own traffic, or the
    // reply of a local backend (or an error travelling as one), which is translated at
    // the client's egress; except a reply to the node's masquerade address, which
    // only a hairpin flow's backend sends from a pod. A later fragment has its
    // addresses, so this comes before the fragment map is asked for its ports.
    if !matches!(
        service6::classify(&pkt.tuple.dst_addr),
        Destination::Frontend { .. }
    ) && !is_masquerade_address(&pkt.tuple.dst_addr)
    {
        return Ok(PASS);
    }
    if pkt.kind == Kind::LaterFragment && !fragments6::resolve(&mut pkt, now) {
        return Ok(PASS);
    }
    let mut entry = CtEntryV6::default();
    if conntrack6::lookup(&pkt, now, &mut entry) {
        fragments6::remember(&pkt, now);
        // A flow through the stack has its requests translated here, its replies at
        // the client's egress; the hairpin is translated both ways and sent back. An
        // ICMPv6 error about a hairpin flow passes untranslated, to the node.
        let hairpin = pkt.kind != Kind::IcmpError && forward6::is_hairpin(&pkt, &entry);
        if hairpin {
            forward6::hairpin_hop(&pkt)?;
        }
        if hairpin || entry.flags & ct_flags::REPLY == 0 {
            nat6::translate(skb, &pkt, &entry)?;
        }
        if hairpin {
            return forward6::send_back(skb, &pkt);
        }
        return Ok(PASS);
    }
    // An error or a later fragment of no flow we know is not ours, nor is a packet to
    // the masquerade address of no flow. Classified again rather than carried over the
    // lookup: a value live across it would double the states the verifier walks there.
    if pkt.kind != Kind::Transport {
        return Ok(PASS);
    }
    let Destination::Frontend { cluster_ip } = service6::classify(&pkt.tuple.dst_addr) else {
        return Ok(PASS);
    };
    new_flow(skb, &pkt, now, Origin::Pod, cluster_ip, &mut entry)
}

/// Whether `addr` is the node's IPv6 masquerade address.
#[inline(always)]
fn is_masquerade_address(addr: &Be32x4) -> bool {
    snat6::address().is_ok_and(|snat| snat == addr)
}

/// Replies of flows through the stack get their frontend back as the source.
#[inline(always)]
fn try_reply_egress(skb: *mut __sk_buff, now: u64) -> Result<i32> {
    let mut pkt = Packet6::default();
    if !parse6::parse(skb, &mut pkt) {
        return Ok(PASS);
    }
    if pkt.kind == Kind::LaterFragment && !fragments6::resolve(&mut pkt, now) {
        return Ok(PASS);
    }
    let mut entry = CtEntryV6::default();
    if conntrack6::lookup(&pkt, now, &mut entry) {
        fragments6::remember(&pkt, now);
        if entry.flags & ct_flags::REPLY != 0 {
            nat6::translate(skb, &pkt, &entry)?;
        }
    }
    Ok(PASS)
}

/// Where the client of a new flow is ([`crate::new_flow::Origin`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A pod on this node (pod-facing ingress).
    Pod,
    /// Outside this node (node-facing ingress).
    Outside,
}

/// `tc_node_ingress` for an IPv6 frame: NodePorts, externalIPs and LoadBalancer IPs
/// from outside the node, and the replies of the flows it sends to remote backends
/// ([`crate::node_ingress`] for IPv4).
#[inline(never)]
pub fn node_ingress(skb: *mut __sk_buff, now: u64) -> i32 {
    crate::verdict_of(try_node_ingress(skb, now))
}

/// Replies come to addresses that are no frontend (the node's masquerade address, a
/// local pod), so conntrack is asked first, as for IPv4.
#[inline(always)]
fn try_node_ingress(skb: *mut __sk_buff, now: u64) -> Result<i32> {
    let mut pkt = Packet6::default();
    if !parse6::parse(skb, &mut pkt) {
        return Ok(PASS);
    }
    trace::stage(stage::PARSED);
    if pkt.kind == Kind::LaterFragment && !fragments6::resolve(&mut pkt, now) {
        return Ok(PASS);
    }
    let mut entry = CtEntryV6::default();
    if conntrack6::lookup(&pkt, now, &mut entry) {
        fragments6::remember(&pkt, now);
        return forward6::known_flow(skb, &pkt, &entry);
    }
    if pkt.kind != Kind::Transport {
        return Ok(PASS);
    }
    let Destination::Frontend { cluster_ip } = service6::classify(&pkt.tuple.dst_addr) else {
        return Ok(PASS);
    };
    new_flow(skb, &pkt, now, Origin::Outside, cluster_ip, &mut entry)
}

/// Whether a new flow is masqueraded to the node's IPv6 address, by
/// [`crate::new_flow`]'s rule: from a pod, only when the pod reaches itself (the
/// hairpin); from outside, a remote backend of a NodePort, externalIP or LoadBalancer
/// frontend, or of a ClusterIP reached from outside the cluster CIDR, so its replies
/// come back here. Local backends of outside clients never are.
#[inline(always)]
fn needs_masquerade(origin: Origin, client: &Be32x4, chosen: &Chosen) -> bool {
    match origin {
        Origin::Pod => chosen.backend.addr == *client,
        Origin::Outside => {
            chosen.backend.flags & backend_flags::LOCAL == 0
                && (chosen.frontend_flags & service_flags::EXTERNAL != 0
                    || !maps::config_v6().is_some_and(|config| config.in_cluster_cidr(client)))
        }
    }
}

/// The first packet of a flow to a frontend address: the frontend's backend, or the
/// reject (no endpoints, or a port the ClusterIP does not declare), as
/// [`crate::new_flow::handle`] decides for IPv4. `entry` is scratch space for the new
/// flow's entry.
///
/// A flow from a pod, and one to a local backend, go through the stack both ways
/// ([`ct_flags::VIA_STACK`]) unless masqueraded; the others (from outside to a remote
/// backend, a pod reaching itself) are sent to their next hop ([`crate::forward6`]),
/// masqueraded ([`crate::snat6`]) when [`needs_masquerade`] says so.
#[inline(always)]
fn new_flow(
    skb: *mut __sk_buff,
    pkt: &Packet6,
    now: u64,
    origin: Origin,
    cluster_ip: bool,
    entry: &mut CtEntryV6,
) -> Result<i32> {
    let mut chosen = Chosen::default();
    match service6::choose(skb, pkt, origin == Origin::Pod, &mut chosen)? {
        Outcome::Backend => {}
        Outcome::NoFrontend if cluster_ip => {
            trace::stage(stage::UNDECLARED_REJECT);
            return icmp6_reply::send(skb, pkt, Reason::UndeclaredPort, 0);
        }
        Outcome::NoFrontend | Outcome::Netfilter => return Ok(PASS),
        Outcome::SourceRanges => return Err(DropReason::SOURCE_RANGE),
        Outcome::EmptyDrop => return Err(DropReason::NO_LOCAL_BACKEND),
        Outcome::Empty => return icmp6_reply::send(skb, pkt, Reason::NoBackend, 0),
    }
    let masquerade = needs_masquerade(origin, &pkt.tuple.src_addr, &chosen);
    trace::note(|record| {
        record.stages |= stage::BACKEND;
        record.backend_id = chosen.backend_id;
        if masquerade {
            record.stages |= stage::MASQUERADE;
        }
    });
    let via_stack =
        !masquerade && (origin == Origin::Pod || chosen.backend.flags & backend_flags::LOCAL != 0);
    let new_src = if masquerade {
        snat6::address()?
    } else {
        &pkt.tuple.src_addr
    };
    // One call for every kind of flow: each call site of `create` is verified once per
    // state that reaches it, and its claim retries (masquerade, remapped ports) make
    // that the dearest part of this program for the verifier.
    let translation = Translation {
        new_src: (new_src, pkt.tuple.src_port),
        chosen: &chosen,
        via_stack,
        masquerade,
    };
    // A hairpin packet that could not be sent back is dropped before it claims a port
    // (a flow that never starts must not hold one for its timeout).
    if origin == Origin::Pod && !via_stack {
        forward6::hairpin_hop(pkt)?;
    }
    if !conntrack6::create(&pkt.tuple, &translation, now, entry)? {
        // Every port tried is held by a live flow to that backend.
        return Err(DropReason::SNAT_PORTS);
    }
    if masquerade {
        stats::count(if origin == Origin::Pod {
            counter::HAIRPIN_FLOW
        } else {
            counter::SNAT_FLOW
        });
    } else if entry.flags & ct_flags::REWRITE_SRC != 0 {
        stats::count(counter::SOURCE_PORT_REMAPPED);
    }
    fragments6::remember(pkt, now);
    stats::count(counter::NEW_FLOW);
    if origin == Origin::Pod {
        // As for IPv4 ([`crate::via_stack`]): this flow's replies may meet the egress
        // program of the client's interface.
        // SAFETY: the program's skb is valid for its run.
        crate::via_stack::note_client_interface(unsafe { (*skb).ifindex });
    }
    // A pod's flow that is not through the stack is masqueraded: the hairpin, sent
    // back where it came from.
    if via_stack || origin == Origin::Pod {
        nat6::apply(skb, pkt, entry)?;
        if via_stack {
            return Ok(PASS);
        }
        return forward6::send_back(skb, pkt);
    }
    forward6::translate_and_send(skb, pkt, entry, Flow::New)
}
