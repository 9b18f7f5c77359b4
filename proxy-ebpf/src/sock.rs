//! cgroup v2 sock_addr programs: ClusterIP translation at the socket layer for clients
//! on this node: pods, and the node's own processes (kubelet, hostNetwork pods), whose
//! packets never cross a pod interface and so never meet the TC programs.
//!
//! The translation happens once per socket (TCP, connected UDP) or once per datagram
//! (unconnected UDP), before the kernel routes anything: `connect4` and `sendmsg4`
//! replace the frontend in the socket address with a backend, so every packet leaves
//! already addressed to the backend, with no conntrack entry and no per-packet NAT. The
//! application must still see the address it asked for, so each translation leaves a
//! reverse entry keyed by the socket's cookie, which `getpeername4` and `recvmsg4` use
//! to show the frontend again.
//!
//! The programs share the service, backend and counter maps with the TC path; the
//! service lookup and backend choice are the same functions. Session affinity has a map
//! of its own, keyed by the client's network namespace ([`SockAffinityKeyV4`]).
//!
//! Which sockets are translated follows [`proxy_common::sock::mode`]: all of the hooked
//! cgroup's, only the node namespace's, or none.
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{Array, LruHashMap},
    programs::SockAddrContext,
    EbpfContext as _,
};
use proxy_common::{
    counter, proto, service_flags,
    sock::{self, mode, rev_flags},
    AffinityValueV4, Be16, Be32, CtKeyV4, SockAffinityKeyV4, SockConfig, SockRevKeyV4,
    SockRevValueV4,
};

use crate::{
    destination::{self, Destination},
    service, service_stats, stats,
    verdict::{DropReason, Result},
};

/// Per-socket reverse translation ([`proxy_common::sock::RNAT_V4_NAME`]). LRU: the
/// datapath never deletes entries, the oldest make room (see
/// [`proxy_common::sock::RNAT_V4_CAPACITY`]).
#[map]
pub static SOCK_RNAT_V4_V2: LruHashMap<SockRevKeyV4, SockRevValueV4> =
    LruHashMap::with_max_entries(sock::RNAT_V4_CAPACITY, 0);

/// Which sockets are translated ([`proxy_common::sock::CONFIG_NAME`]).
#[map]
pub static SOCK_CONFIG_V1: Array<SockConfig> = Array::with_max_entries(1, 0);

/// Session affinity of socket-layer clients ([`proxy_common::sock::AFFINITY_V4_NAME`]).
#[map]
pub static SOCK_AFF_V4_V1: LruHashMap<SockAffinityKeyV4, AffinityValueV4> =
    LruHashMap::with_max_entries(sock::AFFINITY_V4_CAPACITY, 0);

/// Verdicts of sock_addr programs: the syscall goes ahead, or fails (with EPERM, or with
/// the error set by `bpf_set_retval`).
pub(crate) const ALLOW: i32 = 1;
pub(crate) const REFUSE: i32 = 0;

/// `socket(2)` types, from linux/net.h.
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// errno of a refused connection, as kube-proxy's REJECT rule makes the client see.
const ECONNREFUSED: i32 = 111;

/// `connect()` of TCP and UDP sockets: a frontend becomes a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, rev_flags::CONNECTED)
}

/// `sendto()`/`sendmsg()` with a destination on unconnected UDP sockets: the same
/// translation, per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, 0)
}

/// `recvfrom()`/`recvmsg()` on UDP sockets: a reply from a backend this socket was sent
/// to shows the frontend as its source.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    // The verifier accepts nothing but 1 from recvmsg and getpeername programs.
    ALLOW
}

/// `getpeername()`: a translated socket reports the frontend as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_frontend(&ctx);
    ALLOW
}

/// Counts and returns the verdict of a translating hook.
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

/// The protocol the service map knows the socket by, if it is one we translate.
#[inline(always)]
pub(crate) fn l4_proto(addr: &bpf_sock_addr) -> Option<u8> {
    // The type alone is not enough: SCTP has stream sockets too, ICMP datagram ones.
    match (addr.type_, addr.protocol) {
        (SOCK_STREAM, p) if p == u32::from(proto::TCP) => Some(proto::TCP),
        (SOCK_DGRAM, p) if p == u32::from(proto::UDP) => Some(proto::UDP),
        _ => None,
    }
}

/// `user_port` holds the port as `sin_port` does (network order) in its low 16 bits.
#[inline(always)]
pub(crate) fn user_port(addr: &bpf_sock_addr) -> Be16 {
    Be16(addr.user_port as u16)
}

/// Where a socket to translate lives.
#[derive(Clone, Copy)]
pub(crate) struct Client {
    /// Its network namespace's cookie.
    pub netns_cookie: u64,
    /// Whether that is the node's own namespace.
    pub host: bool,
}

/// The socket's namespace, if the configured [`mode`] translates its sockets. Pods
/// share the cgroup tree with host processes but not their namespace, so with
/// [`mode::HOST`] their traffic is left to the TC programs.
#[inline(always)]
pub(crate) fn client(ctx: &SockAddrContext) -> Option<Client> {
    let config = SOCK_CONFIG_V1.get(0).copied().unwrap_or_default();
    if config.mode == mode::OFF || config.host_netns_cookie == 0 {
        return None;
    }
    // SAFETY: the helper only reads the namespace of the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = netns_cookie == config.host_netns_cookie;
    (host || config.mode == mode::ALL).then_some(Client { netns_cookie, host })
}

#[inline(always)]
pub(crate) fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the socket behind the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// What a translating hook does with the socket address it was given.
#[derive(Clone, Copy)]
pub(crate) enum Translated<A> {
    /// Not a frontend (or not a socket we translate): the syscall goes ahead unchanged.
    Leave,
    /// Refused, with the errno already set.
    Refuse,
    /// The backend to write into the socket address.
    To(A, Be16),
}

/// Rewrites a frontend destination to a backend and records the reverse entry. `Ok`
/// carries the verdict; `Err` a drop reason (the syscall is refused with EPERM).
#[inline(always)]
fn try_translate(ctx: &SockAddrContext, flags: u8) -> Result<i32> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(l4) = l4_proto(addr) else {
        return Ok(ALLOW);
    };
    match translate_v4(ctx, l4, Be32(addr.user_ip4), user_port(addr), flags)? {
        Translated::Leave => Ok(ALLOW),
        Translated::Refuse => Ok(REFUSE),
        Translated::To(backend_addr, backend_port) => {
            addr.user_ip4 = backend_addr.0;
            addr.user_port = u32::from(backend_port.0);
            Ok(ALLOW)
        }
    }
}

/// The IPv4 translation of a socket addressed to `dst_addr:dst_port`, whether the
/// socket is AF_INET or an AF_INET6 one using an IPv4-mapped address
/// ([`crate::sock6`]): the frontend, the refusal of a service without endpoints, the
/// backend choice, and the reverse entry that shows the frontend again.
#[inline(always)]
pub(crate) fn translate_v4(
    ctx: &SockAddrContext,
    l4: u8,
    dst_addr: Be32,
    dst_port: Be16,
    flags: u8,
) -> Result<Translated<Be32>> {
    let Some(client) = client(ctx) else {
        return Ok(Translated::Leave);
    };
    let tuple = CtKeyV4 {
        dst_addr,
        dst_port,
        proto: l4,
        ..CtKeyV4::default()
    };
    // Clients on the node, pods or not, are inside the cluster: they get the internal
    // backend set (internalTrafficPolicy), as pods do on the TC path.
    let Some(frontend) = service::lookup(&tuple, true) else {
        // A port a live ClusterIP does not declare: refused at once, as the TC path
        // rejects it. Everything else (an unallocated service address included) goes
        // ahead; a pod's packets then meet the TC path, which drops the latter.
        if let Destination::Frontend { cluster_ip: true } = destination::classify(tuple.dst_addr) {
            refuse(counter::REJECTED_UNDECLARED_PORT);
            return Ok(Translated::Refuse);
        }
        return Ok(Translated::Leave);
    };
    if frontend.value.count == 0 {
        // No endpoints, or (DROP_WHEN_EMPTY, Local traffic policies) none on this
        // node: fail at once with what kube-proxy's REJECT gives a client. The TC path
        // drops silently in the second case, but a syscall has no silent drop to offer
        // short of sending into the void and letting the client time out, which helps
        // nobody; so both refuse.
        refuse(counter::SOCK_REJECTED);
        return Ok(Translated::Refuse);
    }
    let (backend_id, backend) = select_backend(&frontend, client.netns_cookie)?;
    let key = SockRevKeyV4 {
        cookie: cookie(ctx),
        backend_addr: backend.addr,
        backend_port: backend.port,
        proto: l4,
        _pad: 0,
    };
    let value = SockRevValueV4 {
        netns_cookie: client.netns_cookie,
        service_id: frontend.value.service_id,
        backend_id,
        frontend_addr: tuple.dst_addr,
        frontend_port: tuple.dst_port,
        flags,
        _pad: 0,
    };
    SOCK_RNAT_V4_V2
        .insert(key, value, u64::from(BPF_ANY))
        .map_err(|_| DropReason::SOCK_RNAT_INSERT)?;
    count_translated(frontend.value.service_id, flags, client);
    Ok(Translated::To(backend.addr, backend.port))
}

/// Fails the syscall with ECONNREFUSED, what kube-proxy's REJECT gives a client, and
/// counts why.
#[inline(always)]
pub(crate) fn refuse(reason: u32) {
    // SAFETY: the helper only sets the syscall's return value; connect and sendmsg
    // hooks may call it (6.18 allows it for every sock_addr hook that can refuse).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    stats::count(reason);
}

/// Counts a translation of either family.
#[inline(always)]
pub(crate) fn count_translated(service_id: u32, flags: u8, client: Client) {
    stats::count(counter::SOCK_TRANSLATED);
    if flags & rev_flags::CONNECTED != 0 {
        // A connected socket is one connection; unconnected datagrams are not counted
        // as connections (each sendmsg() passes here).
        service_stats::count_socket_connection(service_id);
    }
    if !client.host {
        stats::count(counter::SOCK_TRANSLATED_POD);
    }
}

/// Picks the backend as the TC path does, with session affinity kept per client network
/// namespace instead of per client address (a socket has no source address yet at
/// `connect()`); a record holds only while its backend is still the service's.
#[inline(always)]
fn select_backend(
    frontend: &service::Frontend,
    netns_cookie: u64,
) -> Result<(u32, proxy_common::BackendV4)> {
    if frontend.value.flags & service_flags::AFFINITY == 0 {
        let chosen = service::pick_random(frontend)?;
        return Ok((chosen.backend_id, chosen.backend));
    }
    let key = SockAffinityKeyV4 {
        netns_cookie,
        service_id: frontend.value.service_id,
        _pad: 0,
    };
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: copied out at once; entries are replaced, never edited in place.
    let record = SOCK_AFF_V4_V1.get_ptr(key).map(|found| unsafe { *found });
    let chosen = match record.and_then(|record| service::remembered(frontend, &record, now)) {
        Some(chosen) => {
            stats::count(counter::AFFINITY_HIT);
            chosen
        }
        None => service::pick_random(frontend)?,
    };
    // Losing an affinity record only costs stickiness for one socket; never refuse for it.
    let _ = SOCK_AFF_V4_V1.insert(
        key,
        service::affinity_record(&chosen, now),
        u64::from(BPF_ANY),
    );
    Ok((chosen.backend_id, chosen.backend))
}

/// Shows the frontend in place of a backend this socket was translated to. Only a
/// translated socket has reverse entries (they are keyed by its cookie), so there is no
/// namespace test here.
#[inline(always)]
fn restore_frontend(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(l4) = l4_proto(addr) else {
        return;
    };
    if let Some((frontend_addr, frontend_port)) =
        frontend_of_v4(ctx, l4, Be32(addr.user_ip4), user_port(addr))
    {
        addr.user_ip4 = frontend_addr.0;
        addr.user_port = u32::from(frontend_port.0);
    }
}

/// The frontend a socket translated to IPv4 backend `backend_addr:backend_port`
/// addressed, if it was.
#[inline(always)]
pub(crate) fn frontend_of_v4(
    ctx: &SockAddrContext,
    l4: u8,
    backend_addr: Be32,
    backend_port: Be16,
) -> Option<(Be32, Be16)> {
    let key = SockRevKeyV4 {
        cookie: cookie(ctx),
        backend_addr,
        backend_port,
        proto: l4,
        _pad: 0,
    };
    let found = SOCK_RNAT_V4_V2.get_ptr(key)?;
    // SAFETY: copied out at once; entries are replaced, never edited in place.
    let found = unsafe { *found };
    Some((found.frontend_addr, found.frontend_port))
}
