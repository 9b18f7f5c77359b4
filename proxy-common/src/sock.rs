//! Socket-layer translation (cgroup v2 sock_addr hooks) for clients on this node: pods
//! and the node's own processes (kubelet, hostNetwork pods).
//!
//! `connect4` and `sendmsg4` rewrite a frontend address to a backend before the kernel
//! routes anything, so the packets on the wire already carry the backend and need no
//! per-packet NAT or conntrack. What the socket layer cannot see afterwards is the
//! frontend the application asked for: `getpeername4` and `recvmsg4` would report the
//! backend. The reverse map defined here remembers, per socket, which frontend each
//! backend stands for, so those hooks can show the application the address it used.
//!
//! When a backend leaves, connected UDP sockets translated to it would keep sending to
//! it for ever (no hook runs on `send()` of a connected socket). The agent finds them in
//! the reverse map, lists their cookies in [`DESTROY_V4_NAME`] and runs the socket
//! iterator programs, which call `bpf_sock_destroy()` on exactly those sockets: the
//! application sees `ECONNABORTED` and connects again, to a live backend.
use crate::{Be16, Be32, Be32x4};

/// Name of the reverse map ([`SockRevKeyV4`] -> [`SockRevValueV4`]). The rules of
/// [`crate::names`] apply: at most 15 bytes, and a version suffix that changes with the
/// layout.
pub const RNAT_V4_NAME: &str = "SOCK_RNAT_V4_V2";

/// Capacity of the reverse map: one entry per translated TCP or connected UDP socket,
/// one per (socket, backend) pair for unconnected UDP. The datapath never deletes
/// entries (no hook of ours runs when a socket closes), so the map is an LRU and the
/// oldest entries make room. A socket cookie is never reused while the system runs, so a
/// stale entry can never match a new socket.
pub const RNAT_V4_CAPACITY: u32 = 131_072;

/// Name of the one-entry array holding [`SockConfig`], written by the agent at start.
pub const CONFIG_NAME: &str = "SOCK_CONFIG_V1";

/// Name of the socket-layer session affinity map ([`SockAffinityKeyV4`] ->
/// [`crate::AffinityValueV4`]).
pub const AFFINITY_V4_NAME: &str = "SOCK_AFF_V4_V1";

/// Capacity of the socket-layer affinity map: one entry per (client network
/// namespace, service port) with ClientIP affinity. LRU, like the TC path's.
pub const AFFINITY_V4_CAPACITY: u32 = 65_536;

/// Name of the set of socket cookies the iterator programs destroy (cookie -> 1).
pub const DESTROY_V4_NAME: &str = "SOCK_DESTROY_V1";

/// Capacity of the destroy set: the agent fills it in batches of at most this many.
pub const DESTROY_V4_CAPACITY: u32 = 16_384;

/// Which sockets the hooks translate ([`SockConfig::mode`]).
pub mod mode {
    /// None: every socket is left to the TC programs (also what an unwritten config
    /// means, so nothing is translated before the agent has said which namespace is
    /// the node's).
    pub const OFF: u32 = 0;
    /// Only sockets of the node's own network namespace (host-network clients).
    pub const HOST: u32 = 1;
    /// Every socket in the hooked cgroup: pods and the node alike.
    pub const ALL: u32 = 2;
}

/// Settings of the socket-layer hooks (single entry of [`CONFIG_NAME`]).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SockConfig {
    /// `SO_NETNS_COOKIE` of the node's own network namespace.
    pub host_netns_cookie: u64,
    /// [`mode`].
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);

/// Key of the reverse map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SockRevKeyV4 {
    /// `bpf_get_socket_cookie()`: unique per socket for the life of the system.
    pub cookie: u64,
    /// The backend address the socket was translated to.
    pub backend_addr: Be32,
    /// The backend port.
    pub backend_port: Be16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRevKeyV4>() == 16);

/// Flags of a reverse entry ([`SockRevValueV4::flags`]).
pub mod rev_flags {
    /// Written by `connect()`: the socket is connected to this backend, so it stays on
    /// it until it closes (an unconnected UDP socket is translated again per datagram).
    pub const CONNECTED: u8 = 1 << 0;
}

/// Value of the reverse map: the frontend the application addressed, and what the agent
/// needs to find the socket again when its backend leaves.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SockRevValueV4 {
    /// `bpf_get_netns_cookie()` of the socket's network namespace: the namespace the
    /// agent must enter to run the socket iterator that can destroy it.
    pub netns_cookie: u64,
    /// The service port the frontend belongs to.
    pub service_id: u32,
    /// The backend chosen.
    pub backend_id: u32,
    /// The frontend address (a ClusterIP).
    pub frontend_addr: Be32,
    /// The frontend port.
    pub frontend_port: Be16,
    /// [`rev_flags`].
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRevValueV4>() == 24);

/// Key of the socket-layer affinity map: a client network namespace and a service port.
///
/// At `connect()` an unbound socket has no source address yet, so the socket layer
/// cannot key affinity by client address as the TC path does. A pod is a network
/// namespace, so its namespace cookie names the client pod; every process of the node
/// shares the node's namespace, as they share its addresses for kube-proxy's `recent`
/// match.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SockAffinityKeyV4 {
    /// `bpf_get_netns_cookie()` of the client's network namespace.
    pub netns_cookie: u64,
    /// The service port's id.
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockAffinityKeyV4>() == 16);

/// Name of the IPv6 reverse map ([`SockRevKeyV6`] -> [`SockRevValueV6`]): sockets of
/// AF_INET6 translated to an IPv6 backend. An AF_INET6 socket that reaches an IPv4
/// service through an IPv4-mapped address (`::ffff:10.96.0.10`, how Go and Java
/// clients on dual-stack sockets talk to IPv4) is translated by the IPv4 maps and
/// recorded in [`RNAT_V4_NAME`], so every socket of an IPv4 service is found there.
pub const RNAT_V6_NAME: &str = "SOCK_RNAT_V6_V1";

/// Capacity of the IPv6 reverse map (LRU, as [`RNAT_V4_CAPACITY`]).
pub const RNAT_V6_CAPACITY: u32 = RNAT_V4_CAPACITY / 2;

/// Name of the socket-layer affinity map of IPv6 services ([`SockAffinityKeyV4`]:
/// namespace and service port, whatever the family -> [`crate::AffinityValueV6`]).
pub const AFFINITY_V6_NAME: &str = "SOCK_AFF_V6_V1";

/// Capacity of the IPv6 socket-layer affinity map.
pub const AFFINITY_V6_CAPACITY: u32 = AFFINITY_V4_CAPACITY / 2;

/// Key of the IPv6 reverse map: a socket and the IPv6 backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SockRevKeyV6 {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// The backend address the socket was translated to.
    pub backend_addr: Be32x4,
    /// The backend port.
    pub backend_port: Be16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SockRevKeyV6>() == 32);

/// Value of the IPv6 reverse map (the fields of [`SockRevValueV4`], an IPv6 frontend).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SockRevValueV6 {
    /// `bpf_get_netns_cookie()` of the socket's network namespace.
    pub netns_cookie: u64,
    /// The service port the frontend belongs to.
    pub service_id: u32,
    /// The backend chosen (an id of [`crate::names::BACKENDS_V6`]).
    pub backend_id: u32,
    /// The frontend address (a ClusterIP).
    pub frontend_addr: Be32x4,
    /// The frontend port.
    pub frontend_port: Be16,
    /// [`rev_flags`].
    pub flags: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SockRevValueV6>() == 40);

#[cfg(feature = "user")]
mod pod_impls {
    //! Userspace only: aya's `Pod` marks the types safe to copy to and from the kernel.
    use super::{
        SockAffinityKeyV4, SockConfig, SockRevKeyV4, SockRevKeyV6, SockRevValueV4, SockRevValueV6,
    };

    // SAFETY: as for the IPv4 layouts below.
    unsafe impl aya::Pod for SockRevKeyV6 {}
    // SAFETY: as for the IPv4 layouts below.
    unsafe impl aya::Pod for SockRevValueV6 {}

    // SAFETY: #[repr(C)], only integer fields, every padding byte is an explicit field,
    // so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for SockRevKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevValueV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAffinityKeyV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            RNAT_V4_NAME,
            CONFIG_NAME,
            AFFINITY_V4_NAME,
            DESTROY_V4_NAME,
            RNAT_V6_NAME,
            AFFINITY_V6_NAME,
        ] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn an_unwritten_config_translates_nothing() {
        assert_eq!(SockConfig::default().mode, mode::OFF);
    }
}
