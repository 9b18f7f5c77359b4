//! Socket-layer load balancing (`--socket-lb`): which sockets the cgroup hooks
//! translate at `connect()`/`sendmsg()`, and what happens to translated sockets when
//! their backend leaves.
//!
//! With `all` (the default) every TCP and UDP socket in the hooked cgroup, a pod's or
//! the node's, is translated once at the socket layer: its packets leave addressed to
//! the backend, with no per-packet DNAT, no conntrack entry and no checksum rewrite. The
//! TC programs stay for what no hook sees (traffic from outside the node, replies to
//! it) and take over for every socket with `off` (hooks not attached). `host` keeps the
//! socket layer to the node's own namespace (kubelet, hostNetwork pods) and leaves pods
//! to TC.
//!
//! A backend leaving a service is handled like the TC path's conntrack flush: the
//! reverse and affinity entries that point at it are removed, and connected sockets
//! still tied to it (connected UDP, TCP still in SYN-SENT) are destroyed
//! (`datapath::sock_destroy`), so their applications connect again to a live backend.
//! Established TCP connections stay, as kube-proxy leaves their conntrack entries.
use std::{collections::BTreeSet, path::Path};

use aya::maps::{HashMap, MapData};
use proxy_common::{
    proto,
    sock::{self, rev_flags},
    AffinityValueV4, AffinityValueV6, SockAffinityKeyV4, SockConfig, SockRevKeyV4, SockRevKeyV6,
    SockRevValueV4, SockRevValueV6,
};
use serde::Deserialize;
use tracing::{info, warn};

use crate::datapath::{cgroup, sock_destroy, Datapath, MapAccessError};

/// Which sockets the hooks translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pods and the node's own processes.
    #[default]
    All,
    /// The node's own network namespace only; pods take the TC path.
    Host,
    /// None: the hooks are not attached, every socket takes the TC path.
    Off,
}

impl Mode {
    /// The value of [`SockConfig::mode`].
    #[must_use]
    pub fn map_value(self) -> u32 {
        match self {
            Self::All => sock::mode::ALL,
            Self::Host => sock::mode::HOST,
            Self::Off => sock::mode::OFF,
        }
    }

    /// Whether the cgroup hooks are attached at all.
    #[must_use]
    pub fn hooks_attached(self) -> bool {
        self != Self::Off
    }

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Host => "host",
            Self::Off => "off",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the network namespace cookie")]
    NetnsCookie(#[source] std::io::Error),
    #[error("writing the socket-layer settings")]
    Config(#[source] crate::datapath::Error),
    #[error(transparent)]
    Map(#[from] crate::datapath::MapAccessError),
    #[error("destroying sockets of removed backends")]
    Destroy(#[source] sock_destroy::Error),
}

/// The cgroup the hooks go on: `--cgroup-path`, unless `--socket-lb off`.
#[must_use]
pub fn hooked_cgroup(config: &crate::agent::AgentConfig) -> Option<&Path> {
    config
        .cgroup_path
        .as_deref()
        .filter(|_| config.socket_lb.hooks_attached())
}

/// Writes the settings the hooks read: the node's namespace (the agent runs in it,
/// hostNetwork) and the mode. Also reports at start whether stale sockets can be
/// destroyed on this kernel, when hooks are to be attached.
///
/// # Errors
/// When the cookie cannot be read or the map written.
pub fn configure(datapath: &mut Datapath, config: &crate::agent::AgentConfig) -> Result<(), Error> {
    let mode = config.socket_lb;
    let host_netns_cookie = cgroup::own_netns_cookie().map_err(Error::NetnsCookie)?;
    datapath
        .maps
        .set_sock_config(&SockConfig {
            host_netns_cookie,
            mode: mode.map_value(),
            _pad: 0,
        })
        .map_err(Error::Config)?;
    let hooked = hooked_cgroup(config);
    match hooked {
        Some(cgroup) => {
            info!(mode = mode.label(), cgroup = %cgroup.display(), "socket-layer load balancing")
        }
        None => info!(
            mode = mode.label(),
            "socket-layer load balancing: no hooks (no --cgroup-path, or off)"
        ),
    }
    if hooked.is_some() {
        if let Err(error) = sock_destroy::check(datapath) {
            warn!(error = %crate::error_chain(&error), "connected UDP sockets of removed backends cannot be destroyed on this kernel; they keep their backend until they close");
        }
    }
    Ok(())
}

/// What [`forget_backends`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Reverse entries of connected UDP sockets of the removed backends.
    pub reverse_entries: usize,
    /// Socket-layer affinity entries.
    pub affinities: usize,
    /// Connected sockets listed for destruction.
    pub sockets_listed: usize,
}

/// Every entry of a hash map whose value matches, skipping entries evicted during the
/// walk.
fn matching<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<&mut MapData, K, V>,
    name: &'static str,
    wanted: impl Fn(&K, &V) -> bool,
) -> Result<Vec<(K, V)>, Error> {
    let mut found = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) if wanted(&key, &value) => found.push((key, value)),
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(MapAccessError::kernel(name)(source).into()),
        }
    }
    Ok(found)
}

/// A reverse map's entry, whatever the family.
trait ReverseEntry: aya::Pod + Ord {
    type Value: aya::Pod;
    fn cookie(&self) -> u64;
    fn proto(&self) -> u8;
}

impl ReverseEntry for SockRevKeyV4 {
    type Value = SockRevValueV4;
    fn cookie(&self) -> u64 {
        self.cookie
    }
    fn proto(&self) -> u8 {
        self.proto
    }
}

impl ReverseEntry for SockRevKeyV6 {
    type Value = SockRevValueV6;
    fn cookie(&self) -> u64 {
        self.cookie
    }
    fn proto(&self) -> u8 {
        self.proto
    }
}

/// What a reverse value says of its socket: (service id, backend id), netns cookie,
/// flags.
trait ReverseValue {
    fn pair(&self) -> (u32, u32);
    fn netns_cookie(&self) -> u64;
    fn flags(&self) -> u8;
}

impl ReverseValue for SockRevValueV4 {
    fn pair(&self) -> (u32, u32) {
        (self.service_id, self.backend_id)
    }
    fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }
    fn flags(&self) -> u8 {
        self.flags
    }
}

impl ReverseValue for SockRevValueV6 {
    fn pair(&self) -> (u32, u32) {
        (self.service_id, self.backend_id)
    }
    fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }
    fn flags(&self) -> u8 {
        self.flags
    }
}

/// Collects the connected sockets of one family's reverse map tied to `pairs` into
/// `cookies` and `namespaces`, and removes the entries of connected UDP sockets.
fn forget_reverse<K>(
    datapath: &mut Datapath,
    name: &'static str,
    pairs: &BTreeSet<(u32, u32)>,
    cookies: &mut BTreeSet<u64>,
    namespaces: &mut BTreeSet<u64>,
) -> Result<usize, Error>
where
    K: ReverseEntry,
    K::Value: ReverseValue,
{
    let mut reverse: HashMap<_, K, K::Value> = datapath.hash_map(name)?;
    let stale = matching(&reverse, name, |_, value| pairs.contains(&value.pair()))?;
    let mut removed = 0;
    for (key, value) in &stale {
        if value.flags() & rev_flags::CONNECTED == 0 {
            // Unconnected UDP: translated again on its next datagram; the entry
            // still shows the frontend for a late reply of the old backend.
            continue;
        }
        cookies.insert(key.cookie());
        namespaces.insert(value.netns_cookie());
        // A connected UDP socket is destroyed below: its entry has nothing left to
        // restore. A TCP socket is destroyed only while still connecting; an
        // established one keeps its backend, and getpeername() its frontend.
        if key.proto() == proto::UDP && reverse.remove(key).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes the socket-layer affinity entries of one family tied to `pairs`.
fn forget_affinities<V: aya::Pod>(
    datapath: &mut Datapath,
    name: &'static str,
    pairs: &BTreeSet<(u32, u32)>,
    backend_id: impl Fn(&V) -> u32,
) -> Result<usize, Error> {
    let mut affinity: HashMap<_, SockAffinityKeyV4, V> = datapath.hash_map(name)?;
    let stale = matching(&affinity, name, |key, value| {
        pairs.contains(&(key.service_id, backend_id(value)))
    })?;
    Ok(stale
        .iter()
        .filter(|(key, _)| affinity.remove(key).is_ok())
        .count())
}

/// Forgets the socket-layer state of `(service id, backend id)` pairs that are gone
/// (`pairs` of IPv4 services, `pairs_v6` of IPv6 ones: each family has its own backend
/// ids) and destroys the connected sockets still tied to them, in the namespaces of
/// the processes of `cgroup` (the hooked cgroup; `None`: no hooks, nothing to destroy).
/// AF_INET6 sockets of IPv4 services (IPv4-mapped addresses) are in the IPv4 map.
///
/// # Errors
/// When a map cannot be read or the sockets cannot be destroyed.
pub fn forget_backends(
    datapath: &mut Datapath,
    cgroup: Option<&Path>,
    pairs: &BTreeSet<(u32, u32)>,
    pairs_v6: &BTreeSet<(u32, u32)>,
) -> Result<Forgotten, Error> {
    if pairs.is_empty() && pairs_v6.is_empty() {
        return Ok(Forgotten::default());
    }
    let mut forgotten = Forgotten::default();
    let mut cookies = BTreeSet::new();
    let mut namespaces = BTreeSet::new();
    if !pairs.is_empty() {
        forgotten.reverse_entries += forget_reverse::<SockRevKeyV4>(
            datapath,
            sock::RNAT_V4_NAME,
            pairs,
            &mut cookies,
            &mut namespaces,
        )?;
        forgotten.affinities += forget_affinities(
            datapath,
            sock::AFFINITY_V4_NAME,
            pairs,
            |value: &AffinityValueV4| value.backend_id,
        )?;
    }
    if !pairs_v6.is_empty() {
        forgotten.reverse_entries += forget_reverse::<SockRevKeyV6>(
            datapath,
            sock::RNAT_V6_NAME,
            pairs_v6,
            &mut cookies,
            &mut namespaces,
        )?;
        forgotten.affinities += forget_affinities(
            datapath,
            sock::AFFINITY_V6_NAME,
            pairs_v6,
            |value: &AffinityValueV6| value.backend_id,
        )?;
    }
    forgotten.sockets_listed = cookies.len();
    if let Some(cgroup) = cgroup.filter(|_| !cookies.is_empty()) {
        let report = sock_destroy::destroy(datapath, cgroup, &cookies, &namespaces)
            .map_err(Error::Destroy)?;
        info!(
            sockets = cookies.len(),
            namespaces = report.namespaces,
            gone = report.namespaces_missing,
            "destroyed connected sockets of removed backends"
        );
    }
    Ok(forgotten)
}
