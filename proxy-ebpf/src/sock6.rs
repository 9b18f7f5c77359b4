//! cgroup v2 sock_addr programs for AF_INET6 sockets: the IPv6 twins of [`crate::sock`]
//! (`connect6`, `sendmsg6`, `recvmsg6`, `getpeername6`), with the same semantics:
//! translated once per socket (per datagram for unconnected UDP), the service
//! address shown again to the application, ECONNREFUSED for a service without
//! endpoints or a port a ClusterIP does not declare, affinity per client namespace.
//!
//! An AF_INET6 socket may address an IPv4 service through an IPv4-mapped address
//! (`::ffff:10.96.0.10`): dual-stack sockets are how Go, Java and most runtimes talk
//! to IPv4 when they open one socket type for both families. Such a socket is
//! translated by the IPv4 maps exactly as an AF_INET one ([`sock::translate_v4`]) and
//! gets the IPv4-mapped form of the backend; its reverse entry is an IPv4 one, so the
//! agent finds it with every other socket of the IPv4 service when a backend leaves.
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use proxy_common::{
    counter, service_flags,
    sock::{self as layouts, rev_flags},
    AffinityValueV6, Be16, Be32, Be32x4, CtKeyV6, SockAffinityKeyV4, SockRevKeyV6, SockRevValueV6,
};

use crate::{
    destination::Destination,
    service6::{self, Chosen},
    sock::{self, Translated, ALLOW, REFUSE},
    stats,
    verdict::{DropReason, Result},
};

/// Per-socket reverse translation of IPv6 services ([`proxy_common::sock::RNAT_V6_NAME`]);
/// LRU as the IPv4 one.
#[map]
pub static SOCK_RNAT_V6_V1: LruHashMap<SockRevKeyV6, SockRevValueV6> =
    LruHashMap::with_max_entries(layouts::RNAT_V6_CAPACITY, 0);

/// Session affinity of socket-layer clients of IPv6 services
/// ([`proxy_common::sock::AFFINITY_V6_NAME`]).
#[map]
pub static SOCK_AFF_V6_V1: LruHashMap<SockAffinityKeyV4, AffinityValueV6> =
    LruHashMap::with_max_entries(layouts::AFFINITY_V6_CAPACITY, 0);

/// `connect()` of AF_INET6 TCP and UDP sockets.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, rev_flags::CONNECTED)
}

/// `sendto()`/`sendmsg()` with a destination on unconnected AF_INET6 UDP sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, 0)
}

/// `recvfrom()`/`recvmsg()` on AF_INET6 UDP sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

/// `getpeername()` of AF_INET6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

/// The first 96 bits of an IPv4-mapped address (`::ffff:0:0/96`), as the words of
/// `user_ip6` hold them (network order).
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, 0x0000_ffff_u32.to_be()];

/// The socket address's IPv6 address. The verifier allows `user_ip6` only loads and
/// stores at a fixed offset from the context pointer (never through a pointer derived
/// from it), one word at a time: volatile accesses keep the compiler from merging
/// them or copying the array through another register.
#[inline(always)]
fn user_ip6(addr: &bpf_sock_addr) -> Be32x4 {
    // SAFETY: reads of the context's own fields.
    unsafe {
        Be32x4([
            core::ptr::read_volatile(&addr.user_ip6[0]),
            core::ptr::read_volatile(&addr.user_ip6[1]),
            core::ptr::read_volatile(&addr.user_ip6[2]),
            core::ptr::read_volatile(&addr.user_ip6[3]),
        ])
    }
}

#[inline(always)]
fn set_user_ip6(addr: &mut bpf_sock_addr, ip: Be32x4) {
    // SAFETY: writes of the context's own fields (see `user_ip6`).
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip6[0], ip.0[0]);
        core::ptr::write_volatile(&mut addr.user_ip6[1], ip.0[1]);
        core::ptr::write_volatile(&mut addr.user_ip6[2], ip.0[2]);
        core::ptr::write_volatile(&mut addr.user_ip6[3], ip.0[3]);
    }
}

/// Writes the IPv4 address of an IPv4-mapped socket address (its last word).
#[inline(always)]
fn set_mapped_v4(addr: &mut bpf_sock_addr, ip: Be32) {
    // SAFETY: as in `set_user_ip6`.
    unsafe { core::ptr::write_volatile(&mut addr.user_ip6[3], ip.0) };
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for.
#[inline(always)]
fn mapped_v4(ip: Be32x4) -> Option<Be32> {
    (ip.0[..3] == V4_MAPPED_PREFIX).then_some(Be32(ip.0[3]))
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, flags: u8) -> i32 {
    match try_translate(ctx, flags) {
        Ok(verdict) => verdict,
        Err(reason) => {
            stats::count(reason.counter());
            REFUSE
        }
    }
}

#[inline(always)]
fn try_translate(ctx: &SockAddrContext, flags: u8) -> Result<i32> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(l4) = sock::l4_proto(addr) else {
        return Ok(ALLOW);
    };
    let dst = user_ip6(addr);
    let port = sock::user_port(addr);
    if let Some(v4) = mapped_v4(dst) {
        return Ok(match sock::translate_v4(ctx, l4, v4, port, flags)? {
            Translated::Leave => ALLOW,
            Translated::Refuse => REFUSE,
            Translated::To(backend_addr, backend_port) => {
                set_mapped_v4(addr, backend_addr);
                addr.user_port = u32::from(backend_port.0);
                ALLOW
            }
        });
    }
    Ok(match translate_v6(ctx, l4, dst, port, flags)? {
        Translated::Leave => ALLOW,
        Translated::Refuse => REFUSE,
        Translated::To(backend_addr, backend_port) => {
            set_user_ip6(addr, backend_addr);
            addr.user_port = u32::from(backend_port.0);
            ALLOW
        }
    })
}

/// The IPv6 translation: [`sock::translate_v4`] with the IPv6 service maps.
#[inline(always)]
fn translate_v6(
    ctx: &SockAddrContext,
    l4: u8,
    dst_addr: Be32x4,
    dst_port: Be16,
    flags: u8,
) -> Result<Translated<Be32x4>> {
    let Some(client) = sock::client(ctx) else {
        return Ok(Translated::Leave);
    };
    let tuple = CtKeyV6 {
        dst_addr,
        dst_port,
        proto: l4,
        ..CtKeyV6::default()
    };
    let Some(frontend) = service6::lookup(&tuple, true) else {
        if let Destination::Frontend { cluster_ip: true } = service6::classify(&dst_addr) {
            sock::refuse(counter::REJECTED_UNDECLARED_PORT);
            return Ok(Translated::Refuse);
        }
        return Ok(Translated::Leave);
    };
    if frontend.value.count == 0 {
        sock::refuse(counter::SOCK_REJECTED);
        return Ok(Translated::Refuse);
    }
    let mut chosen = Chosen::default();
    select_backend(&frontend, client.netns_cookie, &mut chosen)?;
    let key = SockRevKeyV6 {
        cookie: sock::cookie(ctx),
        backend_addr: chosen.backend.addr,
        backend_port: chosen.backend.port,
        proto: l4,
        _pad: [0; 5],
    };
    let value = SockRevValueV6 {
        netns_cookie: client.netns_cookie,
        service_id: frontend.value.service_id,
        backend_id: chosen.backend_id,
        frontend_addr: dst_addr,
        frontend_port: dst_port,
        flags,
        _pad: [0; 5],
    };
    SOCK_RNAT_V6_V1
        .insert(key, value, u64::from(BPF_ANY))
        .map_err(|_| DropReason::SOCK_RNAT_INSERT)?;
    sock::count_translated(frontend.value.service_id, flags, client);
    Ok(Translated::To(chosen.backend.addr, chosen.backend.port))
}

/// The backend, with affinity per client namespace as for IPv4 ([`crate::sock`]).
#[inline(always)]
fn select_backend(
    frontend: &service6::Frontend,
    netns_cookie: u64,
    out: &mut Chosen,
) -> Result<()> {
    if frontend.value.flags & service_flags::AFFINITY == 0 {
        service6::pick_random(frontend, out)?;
        return Ok(());
    }
    let key = SockAffinityKeyV4 {
        netns_cookie,
        service_id: frontend.value.service_id,
        _pad: 0,
    };
    let now = crate::conntrack::now();
    // SAFETY: copied out at once; entries are replaced, never edited in place.
    let record = SOCK_AFF_V6_V1.get_ptr(key).map(|found| unsafe { *found });
    let slot = match record.and_then(|record| service6::honoured(frontend, record, now, out)) {
        Some(slot) => {
            stats::count(counter::AFFINITY_HIT);
            slot
        }
        None => service6::pick_random(frontend, out)?,
    };
    let record = AffinityValueV6 {
        last_used_ns: now,
        backend_id: out.backend_id,
        slot,
        _pad: [0; 2],
    };
    // Losing an affinity record only costs stickiness for one socket; never refuse for it.
    let _ = SOCK_AFF_V6_V1.insert(key, record, u64::from(BPF_ANY));
    Ok(())
}

/// Shows the frontend in place of a backend this socket was translated to, for both
/// kinds of address an AF_INET6 socket has.
#[inline(always)]
fn restore_frontend(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(l4) = sock::l4_proto(addr) else {
        return;
    };
    let peer = user_ip6(addr);
    let port = sock::user_port(addr);
    if let Some(v4) = mapped_v4(peer) {
        if let Some((frontend_addr, frontend_port)) = sock::frontend_of_v4(ctx, l4, v4, port) {
            set_mapped_v4(addr, frontend_addr);
            addr.user_port = u32::from(frontend_port.0);
        }
        return;
    }
    let key = SockRevKeyV6 {
        cookie: sock::cookie(ctx),
        backend_addr: peer,
        backend_port: port,
        proto: l4,
        _pad: [0; 5],
    };
    let Some(found) = SOCK_RNAT_V6_V1.get_ptr(key) else {
        return;
    };
    // SAFETY: copied out at once; entries are replaced, never edited in place.
    let found = unsafe { *found };
    set_user_ip6(addr, found.frontend_addr);
    addr.user_port = u32::from(found.frontend_port.0);
}
