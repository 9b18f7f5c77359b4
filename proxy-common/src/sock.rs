//! Socket-layer translation (cgroup v2 sock_addr hooks) for clients in the node's own
//! network namespace: kubelet, hostNetwork pods, anything that never crosses a pod
//! interface and so never meets the TC programs.
//!
//! `connect4` and `sendmsg4` rewrite a frontend address to a backend before the kernel
//! routes anything, so the packets on the wire already carry the backend and need no
//! per-packet NAT or conntrack. What the socket layer cannot see afterwards is the
//! frontend the application asked for: `getpeername4` and `recvmsg4` would report the
//! backend. The reverse map defined here remembers, per socket, which frontend each
//! backend stands for, so those hooks can show the application the address it used.
use crate::{Be16, Be32};

/// Name of the reverse map ([`SockRevKeyV4`] -> [`SockRevValueV4`]). The rules of
/// [`crate::names`] apply: at most 15 bytes, and a version suffix that changes with the
/// layout.
pub const RNAT_V4_NAME: &str = "SOCK_RNAT_V4_V1";

/// Capacity of the reverse map: one entry per translated TCP or connected UDP socket,
/// one per (socket, backend) pair for unconnected UDP. The datapath never deletes
/// entries (no hook of ours runs when a socket closes), so the map is an LRU and the
/// oldest entries make room. A socket cookie is never reused while the system runs, so a
/// stale entry can never match a new socket.
pub const RNAT_V4_CAPACITY: u32 = 131_072;

/// Name of the one-entry array holding the network namespace cookie
/// (`SO_NETNS_COOKIE`) of the node's own namespace, which the agent writes at start.
///
/// The hooks sit on a cgroup, and a cgroup holds pods as well as host processes: on a
/// node, the host's cgroup2 root holds every pod. Only sockets of the node's namespace
/// are translated at the socket layer; a pod's traffic keeps going through the TC
/// programs, which know the pod's address (session affinity is per client address, and
/// at `connect()` time the socket layer knows none, see [`HOST_AFFINITY_CLIENT`]). Until
/// the agent has written the cookie (0), nothing is translated.
pub const HOST_NETNS_NAME: &str = "SOCK_HOSTNS_V1";

/// The client address session affinity uses for every host-network client.
///
/// At `connect()` time an unbound socket has no source address yet, and every process
/// of the node shares the node's addresses anyway; kube-proxy's `recent` match sees the
/// node's address for all of them too. So host clients share one affinity record per
/// service, keyed by this address. `0.0.0.0` is never a pod's or an external client's
/// address, so it cannot collide with a record of the TC path.
pub const HOST_AFFINITY_CLIENT: Be32 = Be32(0);

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

/// Value of the reverse map: the frontend the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SockRevValueV4 {
    /// The frontend address (a ClusterIP).
    pub frontend_addr: Be32,
    /// The frontend port.
    pub frontend_port: Be16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevValueV4>() == 8);

#[cfg(feature = "user")]
mod pod_impls {
    //! Userspace only: aya's `Pod` marks the types safe to copy to and from the kernel.
    use super::{SockRevKeyV4, SockRevValueV4};

    // SAFETY: #[repr(C)], only integer fields, every padding byte is an explicit field,
    // so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for SockRevKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevValueV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        assert!(RNAT_V4_NAME.len() <= 15);
        assert!(HOST_NETNS_NAME.len() <= 15);
    }

    #[test]
    fn the_host_affinity_client_is_the_unspecified_address() {
        assert_eq!(
            HOST_AFFINITY_CLIENT.to_ipv4(),
            core::net::Ipv4Addr::UNSPECIFIED
        );
    }
}
