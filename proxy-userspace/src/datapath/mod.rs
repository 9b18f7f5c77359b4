//! Loading the eBPF object, typed handles on its maps, and the writes the agent makes.
pub mod attach;
mod batch;
pub mod cgroup;
pub mod conntrack;
pub mod interfaces;
pub mod link_pins;
pub mod lock;
pub mod node_network;
pub mod pins;
pub mod sock_destroy;
pub mod trace;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{CgroupSockAddr, ProgramError, SchedClassifier},
    Ebpf, EbpfLoader,
};
use proxy_common::{
    counter, names, AffinityKeyV4, AffinityKeyV6, AffinityValueV4, CtEntryV4, CtEntryV6, CtKeyV4,
    CtKeyV6, DatapathConfig, FragKeyV4, FragValueV4, FrontendAddrV4, NodeConfigV6, ServiceValueV4,
};

use crate::{
    family::Family,
    sync::{frontend_addrs::FrontendAddrs, MapOp, MapWriter, Mirror, WriteError},
};

/// The eBPF object, built by `proxy-userspace/build.rs` (see `cargo xtask build-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KPR_EBPF_OBJECT"));

/// Whether this binary carries the stub `build.rs` embeds when the eBPF toolchain is
/// missing (so the userspace crates build, and clippy runs, without bpf-linker) instead
/// of the eBPF object.
#[must_use]
pub fn is_stub_object() -> bool {
    EBPF_OBJECT == crate::ebpf_stub::MARKER
}

/// A TC program of the object and where it attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Ingress of pod-facing interfaces (traffic from pods): `tc_pod_ingress`.
    PodIngress,
    /// Egress of pod-facing interfaces (traffic into pods): `tc_pod_egress`.
    PodEgress,
    /// Ingress of the node's external interfaces (NodePort, externalIPs, LoadBalancer
    /// IPs, replies of remote backends): `tc_node_ingress`.
    NodeIngress,
    /// Egress of the node's external interfaces (replies of local backends to
    /// outside clients): `tc_node_egress`.
    NodeEgress,
}

impl Hook {
    pub const ALL: [Self; 4] = [
        Self::PodIngress,
        Self::PodEgress,
        Self::NodeIngress,
        Self::NodeEgress,
    ];
    /// The hooks of pod-facing interfaces.
    pub const POD: [Self; 2] = [Self::PodIngress, Self::PodEgress];
    /// The hooks of the node's external interfaces.
    pub const NODE: [Self; 2] = [Self::NodeIngress, Self::NodeEgress];

    /// The program's name in the object.
    #[must_use]
    pub fn program_name(self) -> &'static str {
        match self {
            Self::PodIngress => "tc_pod_ingress",
            Self::PodEgress => "tc_pod_egress",
            Self::NodeIngress => "tc_node_ingress",
            Self::NodeEgress => "tc_node_egress",
        }
    }

    /// The TC direction.
    #[must_use]
    pub fn attach_type(self) -> aya::programs::TcAttachType {
        match self {
            Self::PodIngress | Self::NodeIngress => aya::programs::TcAttachType::Ingress,
            Self::PodEgress | Self::NodeEgress => aya::programs::TcAttachType::Egress,
        }
    }

    /// Short name for pins and logs.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::PodIngress => "pod-ingress",
            Self::PodEgress => "pod-egress",
            Self::NodeIngress => "node-ingress",
            Self::NodeEgress => "node-egress",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "this kpr was built without the eBPF toolchain and carries no eBPF programs; run `cargo xtask build-ebpf` (it says what is missing), then build again"
    )]
    StubObject,
    #[error("{path} is not on a BPF filesystem (mount one: mount -t bpf bpf {path})")]
    NotBpffs { path: PathBuf },
    #[error(
        "{path} cannot be made: {sysfs} is a sysfs with no BPF filesystem on it. `ip netns exec` mounts a fresh /sys for the namespace, hiding the host's /sys/fs/bpf: enter the namespace with `nsenter --net=/run/netns/NAME` (which keeps /sys), mount one (mount -t bpf bpf /sys/fs/bpf), or pass --bpffs DIR on a BPF filesystem"
    )]
    BpffsHidden { path: PathBuf, sysfs: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A map of the loaded object that the socket-layer modules ([`sock_destroy`],
/// [`crate::socket_lb`]) could not use: absent from the object, or refused by the kernel.
#[derive(Debug, thiserror::Error)]
pub enum MapAccessError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}")]
    Kernel {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

impl MapAccessError {
    /// For `map_err`: the kernel refused an operation on map `name`.
    pub fn kernel(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Kernel { name, source }
    }
}

impl Datapath {
    /// The object's hash map `name`, borrowed (it stays owned by the [`Ebpf`]).
    ///
    /// # Errors
    /// When the object has no such map or its type does not match.
    pub fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, MapAccessError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(MapAccessError::Missing(name))?;
        HashMap::try_from(map).map_err(MapAccessError::kernel(name))
    }
}

impl Error {
    /// Metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Load(_) | Self::StubObject => "load",
            Self::Map { .. } | Self::MissingMap(_) => "map",
            Self::MissingProgram(_) | Self::Program { .. } => "program",
            Self::NotBpffs { .. } | Self::BpffsHidden { .. } => "bpffs",
            Self::Io { .. } => "io",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to load the datapath.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Directory on a bpffs to pin maps (and links) under, so they survive the agent.
    /// `None` keeps everything private to this process (tests).
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the established conntrack table (default
    /// [`proxy_common::capacity::CONNTRACK_V4`]); the new-flow table gets a quarter
    /// ([`proxy_common::capacity::conntrack_new_for`]).
    pub conntrack_max: Option<u32>,
    /// Capacity of the service map: frontends plus their backend slots (default
    /// [`proxy_common::capacity::SERVICES_V4`]).
    pub services_max: Option<u32>,
    /// Capacity of the backend map (default [`proxy_common::capacity::BACKENDS_V4`]).
    pub backends_max: Option<u32>,
    /// Capacity of the session affinity map, TC path (default
    /// [`proxy_common::capacity::AFFINITY_V4`]).
    pub affinity_max: Option<u32>,
    /// Capacity of the loadBalancerSourceRanges trie (default
    /// [`proxy_common::capacity::SOURCE_RANGES_V4`]).
    pub source_ranges_max: Option<u32>,
    /// The IPv6 service map (default [`proxy_common::capacity::SERVICES_V6`]).
    pub services_v6_max: Option<u32>,
    /// The IPv6 backend map (default [`proxy_common::capacity::BACKENDS_V6`]).
    pub backends_v6_max: Option<u32>,
    /// The IPv6 source-range trie (default [`proxy_common::capacity::SOURCE_RANGES_V6`]).
    pub source_ranges_v6_max: Option<u32>,
}

/// What the kernel made each sized map hold at most: what was asked for, or, for a map
/// adopted from a pin, what the earlier agent made it (a pinned map keeps its size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacities {
    pub services: u32,
    pub backends: u32,
    /// The established table.
    pub conntrack: u32,
    /// The new-flow table.
    pub conntrack_new: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    /// The frontend address set: as large as the service map, since every frontend
    /// address takes at least one of its entries.
    pub frontend_addrs: u32,
    /// The per-service counters: one entry per service port, so never more than the
    /// service map holds frontends (allocated on insert: a larger map costs nothing).
    pub service_stats: u32,
    /// The IPv6 tables. Their conntrack and affinity tables keep the fixed defaults
    /// of [`proxy_common::capacity`] (a quarter of IPv4's): `--conntrack-max` sizes
    /// the IPv4 tables, as kube-proxy's sizes one netfilter table per node.
    pub services_v6: u32,
    pub backends_v6: u32,
    pub source_ranges_v6: u32,
    pub frontend_addrs_v6: u32,
    pub conntrack_v6: u32,
    pub conntrack_new_v6: u32,
    pub affinity_v6: u32,
}

impl MapCapacities {
    /// The capacities `options` ask for (defaults where they say nothing).
    #[must_use]
    pub fn requested(options: &LoadOptions) -> Self {
        use proxy_common::capacity;
        let conntrack = options.conntrack_max.unwrap_or(capacity::CONNTRACK_V4);
        let services = options.services_max.unwrap_or(capacity::SERVICES_V4);
        Self {
            services,
            backends: options.backends_max.unwrap_or(capacity::BACKENDS_V4),
            conntrack,
            conntrack_new: capacity::conntrack_new_for(conntrack),
            affinity: options.affinity_max.unwrap_or(capacity::AFFINITY_V4),
            source_ranges: options
                .source_ranges_max
                .unwrap_or(capacity::SOURCE_RANGES_V4),
            frontend_addrs: services,
            service_stats: services.max(proxy_common::service_stats::CAPACITY),
            services_v6: options.services_v6_max.unwrap_or(capacity::SERVICES_V6),
            backends_v6: options.backends_v6_max.unwrap_or(capacity::BACKENDS_V6),
            source_ranges_v6: options
                .source_ranges_v6_max
                .unwrap_or(capacity::SOURCE_RANGES_V6),
            frontend_addrs_v6: options.services_v6_max.unwrap_or(capacity::SERVICES_V6),
            conntrack_v6: capacity::CONNTRACK_V6,
            conntrack_new_v6: capacity::CONNTRACK_NEW_V6,
            affinity_v6: capacity::AFFINITY_V6,
        }
    }

    /// `(map name, capacity)` of each sized map.
    #[must_use]
    pub fn by_name(&self) -> [(&'static str, u32); 15] {
        [
            (names::SERVICES_V4, self.services),
            (names::BACKENDS_V4, self.backends),
            (names::CONNTRACK_V4, self.conntrack),
            (names::CONNTRACK_NEW_V4, self.conntrack_new),
            (names::AFFINITY_V4, self.affinity),
            (names::SOURCE_RANGES_V4, self.source_ranges),
            (names::FRONTEND_ADDRS_V4, self.frontend_addrs),
            (proxy_common::service_stats::NAME, self.service_stats),
            (names::SERVICES_V6, self.services_v6),
            (names::BACKENDS_V6, self.backends_v6),
            (names::SOURCE_RANGES_V6, self.source_ranges_v6),
            (names::FRONTEND_ADDRS_V6, self.frontend_addrs_v6),
            (names::CONNTRACK_V6, self.conntrack_v6),
            (names::CONNTRACK_NEW_V6, self.conntrack_new_v6),
            (names::AFFINITY_V6, self.affinity_v6),
        ]
    }
}

/// A capacity of at least `configured` that holds `needed` entries with room to grow:
/// half as many again, so the cluster can grow by half before this agent's maps are
/// full (a BPF map's size is fixed when it is created).
#[must_use]
pub fn grown_for(configured: u32, needed: usize) -> u32 {
    let with_room = needed.saturating_add(needed / 2);
    configured.max(u32::try_from(with_room).unwrap_or(u32::MAX))
}

/// A second handle on the map behind `map` (for another thread).
pub(crate) fn reopen<M>(map: &MapData, name: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    use std::os::fd::AsFd as _;
    let map_error = |source| Error::Map { name, source };
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Io {
            path: name.into(),
            source,
        })?;
    let data = MapData::from_fd(fd).map_err(map_error)?;
    M::try_from(aya::maps::Map::from_map_data(data).map_err(map_error)?).map_err(map_error)
}

/// The maps of one family the syncer and the frontend address set own.
pub struct FamilyMaps<F: Family> {
    pub services: HashMap<MapData, F::ServiceKey, ServiceValueV4>,
    pub backends: HashMap<MapData, u32, F::Backend>,
    pub source_ranges: LpmTrie<MapData, F::RangeData, u8>,
    /// Every frontend address (key: the address as the datapath reads it).
    pub frontend_addrs: HashMap<MapData, F::AddrKey, FrontendAddrV4>,
}

impl<F: Family> FamilyMaps<F> {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: take(ebpf, F::SERVICES_MAP)?,
            backends: take(ebpf, F::BACKENDS_MAP)?,
            source_ranges: {
                let name = F::SOURCE_RANGES_MAP;
                let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                LpmTrie::try_from(map).map_err(|source| Error::Map { name, source })?
            },
            frontend_addrs: take(ebpf, F::FRONTEND_ADDRS_MAP)?,
        })
    }

    /// Second handles on the same maps, for another thread.
    fn reopen(&self) -> Result<Self> {
        use aya::maps::IterableMap as _;
        Ok(Self {
            services: reopen(self.services.map(), F::SERVICES_MAP)?,
            backends: reopen(self.backends.map(), F::BACKENDS_MAP)?,
            source_ranges: reopen(self.source_ranges.map(), F::SOURCE_RANGES_MAP)?,
            frontend_addrs: reopen(self.frontend_addrs.map(), F::FRONTEND_ADDRS_MAP)?,
        })
    }

    /// Reads the service, backend and source-range maps, for the syncer to adopt.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn read_mirror(&self) -> Result<Mirror<F>> {
        let mut mirror = Mirror::default();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(|source| Error::Map {
                name: F::SERVICES_MAP,
                source,
            })?;
            mirror.services.insert(key, value);
        }
        for entry in self.backends.iter() {
            let (id, backend) = entry.map_err(|source| Error::Map {
                name: F::BACKENDS_MAP,
                source,
            })?;
            mirror.backends.insert(id, backend);
        }
        for entry in self.source_ranges.iter() {
            let (key, _) = entry.map_err(|source| Error::Map {
                name: F::SOURCE_RANGES_MAP,
                source,
            })?;
            mirror
                .source_ranges
                .insert(crate::sync::SourceRangeKey::from_trie(&key));
        }
        Ok(mirror)
    }

    /// Reads the frontend address set, for the agent to adopt.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn read_frontend_addrs(&self) -> Result<FrontendAddrs<F>> {
        let mut held = std::collections::HashMap::new();
        for entry in self.frontend_addrs.iter() {
            let (addr, value) = entry.map_err(|source| Error::Map {
                name: F::FRONTEND_ADDRS_MAP,
                source,
            })?;
            held.insert(F::from_addr_key(addr), value.kinds);
        }
        Ok(FrontendAddrs::adopt(held))
    }

    fn capacities(&self) -> Result<[u32; 4]> {
        Ok([
            max_entries(&self.services, F::SERVICES_MAP)?,
            max_entries(&self.backends, F::BACKENDS_MAP)?,
            max_entries(&self.source_ranges, F::SOURCE_RANGES_MAP)?,
            max_entries(&self.frontend_addrs, F::FRONTEND_ADDRS_MAP)?,
        ])
    }
}

/// Handles of their own on the maps the syncer owns, to read them back on another
/// thread (the periodic resync's readback walks every entry).
pub struct MirrorReader {
    v4: FamilyMaps<std::net::Ipv4Addr>,
    v6: FamilyMaps<std::net::Ipv6Addr>,
}

impl MirrorReader {
    /// What the IPv4 maps hold.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn read(&self) -> Result<Mirror> {
        self.v4.read_mirror()
    }

    /// What the IPv4 frontend address set holds.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn read_frontend_addrs(&self) -> Result<FrontendAddrs> {
        self.v4.read_frontend_addrs()
    }

    /// What the IPv6 maps and address set hold.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn read_v6(
        &self,
    ) -> Result<(
        Mirror<std::net::Ipv6Addr>,
        FrontendAddrs<std::net::Ipv6Addr>,
    )> {
        Ok((self.v6.read_mirror()?, self.v6.read_frontend_addrs()?))
    }
}

/// The capacity of a loaded map, as the kernel reports it.
fn max_entries<K: aya::Pod, V>(
    map: &impl aya::maps::IterableMap<K, V>,
    name: &'static str,
) -> Result<u32> {
    map.map()
        .info()
        .map(|info| info.max_entries())
        .map_err(|source| Error::Map { name, source })
}

/// Typed handles on every map.
pub struct Maps {
    /// The IPv4 service, backend, source-range maps and frontend address set.
    pub v4: FamilyMaps<std::net::Ipv4Addr>,
    /// The IPv6 ones.
    pub v6: FamilyMaps<std::net::Ipv6Addr>,
    /// Established flows (a plain hash).
    pub conntrack: HashMap<MapData, CtKeyV4, CtEntryV4>,
    /// Flows not yet seen both ways (LRU).
    pub conntrack_new: HashMap<MapData, CtKeyV4, CtEntryV4>,
    /// When the datapath last found the established table full (one entry).
    pub conntrack_full: Array<MapData, u64>,
    pub affinity: HashMap<MapData, AffinityKeyV4, AffinityValueV4>,
    /// The IPv6 conntrack tables and affinity map (the datapath fills them; the agent
    /// reaps and forgets).
    pub conntrack_v6: HashMap<MapData, CtKeyV6, CtEntryV6>,
    pub conntrack_new_v6: HashMap<MapData, CtKeyV6, CtEntryV6>,
    pub affinity_v6: HashMap<MapData, AffinityKeyV6, AffinityValueV4>,
    /// The node's IPv6 settings (one entry).
    pub config_v6: Array<MapData, NodeConfigV6>,
    /// First fragments' ports of datagrams in flight (the datapath keeps it; read by
    /// tests and inspection).
    pub fragments: HashMap<MapData, FragKeyV4, FragValueV4>,
    pub counters: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, DatapathConfig>,
    /// Settings of the socket-layer hooks (which sockets they translate).
    pub sock_config: Array<MapData, proxy_common::SockConfig>,
    /// The service CIDR (one entry).
    pub service_cidr: Array<MapData, proxy_common::ServiceCidrV4>,
    /// Per-service traffic counters by service id (`crate::service_counters`).
    pub service_stats: PerCpuHashMap<MapData, u32, proxy_common::service_stats::ServiceStatsV1>,
    /// What each sized map holds at most (read from the kernel).
    pub capacities: MapCapacities,
}

/// The loaded object: programs plus maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub pin_dir: Option<PathBuf>,
}

/// Every map of the object, pinned under these names.
pub const ALL_MAPS: [&str; 30] = [
    names::SERVICES_V4,
    names::BACKENDS_V4,
    names::CONNTRACK_V4,
    names::CONNTRACK_NEW_V4,
    names::CONNTRACK_FULL,
    names::AFFINITY_V4,
    names::SOURCE_RANGES_V4,
    names::FRAGMENTS_V4,
    names::COUNTERS,
    names::CONFIG,
    proxy_common::sock::RNAT_V4_NAME,
    proxy_common::sock::CONFIG_NAME,
    proxy_common::sock::AFFINITY_V4_NAME,
    proxy_common::sock::DESTROY_V4_NAME,
    proxy_common::sock::RNAT_V6_NAME,
    proxy_common::sock::AFFINITY_V6_NAME,
    proxy_common::takeover::NF_CHECK_NAME,
    names::FRONTEND_ADDRS_V4,
    names::SERVICE_CIDR_V4,
    proxy_common::service_stats::NAME,
    // The IPv6 tables (issue 13): pinned and adopted like the rest; the syncer writes
    // the service, backend, source-range maps and the address set, the agent the
    // config; the datapath fills conntrack, fragments and affinity.
    names::SERVICES_V6,
    names::BACKENDS_V6,
    names::CONNTRACK_V6,
    names::CONNTRACK_NEW_V6,
    names::FRONTEND_ADDRS_V6,
    names::FRAGMENTS_V6,
    names::CONFIG_V6,
    names::AFFINITY_V6,
    names::SOURCE_RANGES_V6,
    names::VIA_STACK_IFACES,
];

/// Pins of maps whose layout an earlier version used. Nothing reads them any more (a
/// layout change renames the map), so a loading agent and `kpr cleanup` remove them;
/// otherwise an upgraded node would keep the old tables' memory forever.
pub const RETIRED_MAPS: [&str; 6] = [
    "CT_V4_V1",
    "AFFINITY_V4_V1",
    "CONFIG_V2",
    "COUNTERS_V2",
    "SOCK_RNAT_V4_V1",
    "SOCK_HOSTNS_V1",
];

/// Whether `dir` holds the conntrack tables of an earlier agent but no
/// [`names::VIA_STACK_IFACES`] set: an agent from before the set existed, whose flows
/// through the stack no slot records.
fn conntrack_pinned_without_via_stack_set(dir: &Path) -> bool {
    let conntrack = [
        names::CONNTRACK_V4,
        names::CONNTRACK_NEW_V4,
        names::CONNTRACK_V6,
        names::CONNTRACK_NEW_V6,
    ];
    conntrack.iter().any(|name| dir.join(name).exists())
        && !dir.join(names::VIA_STACK_IFACES).exists()
}

/// Sets every slot of [`names::VIA_STACK_IFACES`], so the pod egress programs look up
/// every packet as before the set existed: the adopted flows' replies (and those the
/// previous agent's programs create until ours replace them) are still translated.
/// Interfaces whose slot is set for no flow only pay the lookups they paid before.
fn mark_every_interface(ebpf: &mut Ebpf) -> Result<()> {
    let name = names::VIA_STACK_IFACES;
    let map = ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
    let mut slots: Array<&mut aya::maps::MapData, u32> =
        Array::try_from(map).map_err(|source| Error::Map { name, source })?;
    for slot in 0..proxy_common::capacity::VIA_STACK_IFACES {
        slots
            .set(slot, 1, 0)
            .map_err(|source| Error::Map { name, source })?;
    }
    tracing::info!(
        slots = proxy_common::capacity::VIA_STACK_IFACES,
        "adopted conntrack tables from an agent without the via-stack interface set: every pod interface's replies are looked up"
    );
    Ok(())
}

/// Removes the pins of [`RETIRED_MAPS`] under `dir`.
pub fn remove_retired_pins(dir: &Path) {
    for name in RETIRED_MAPS {
        if std::fs::remove_file(dir.join(name)).is_ok() {
            tracing::info!(map = name, "removed the pin of a retired map layout");
        }
    }
}

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Whether `path` lives on a bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        // f_type's width differs between architectures; the magic fits in 32 bits.
        libc::statfs(c_path.as_ptr(), &raw mut stat) == 0
            && (stat.f_type as u64 & 0xffff_ffff) == BPF_FS_MAGIC
    }
}

/// The error for a pin directory whose nearest existing ancestor is a sysfs (a
/// directory cannot be made there): what `ip netns exec` leaves of /sys/fs/bpf.
pub(super) fn pin_dir_on_sysfs(dir: &Path) -> Option<Error> {
    let existing = dir.ancestors().find(|ancestor| ancestor.exists())?;
    (cgroup::fs_magic(existing) == Some(cgroup::SYSFS_MAGIC)).then(|| Error::BpffsHidden {
        path: dir.to_path_buf(),
        sysfs: existing.to_path_buf(),
    })
}

fn take<K, V>(ebpf: &mut Ebpf, name: &'static str) -> Result<HashMap<MapData, K, V>>
where
    K: aya::Pod,
    V: aya::Pod,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    HashMap::try_from(map).map_err(|source| Error::Map { name, source })
}

impl Datapath {
    /// Loads the object, reusing maps pinned by an earlier agent in `pin_dir`.
    ///
    /// # Errors
    /// When the kernel refuses the object or a pin directory is unusable.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        if is_stub_object() {
            return Err(Error::StubObject);
        }
        let mut loader = EbpfLoader::new();
        let flows_without_interfaces = options
            .pin_dir
            .as_deref()
            .is_some_and(conntrack_pinned_without_via_stack_set);
        let map_pins: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| {
                    pin_dir_on_sysfs(dir).unwrap_or(Error::Io {
                        path: dir.clone(),
                        source,
                    })
                })?;
                if !is_bpffs(dir) {
                    return Err(Error::NotBpffs { path: dir.clone() });
                }
                remove_retired_pins(dir);
                ALL_MAPS
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let requested = MapCapacities::requested(options);
        for (name, capacity) in requested.by_name() {
            loader.map_max_entries(name, capacity);
        }
        // The kernel's BTF, also to turn the object's kfunc calls into ones the kernel
        // resolves (see sock_destroy).
        let btf = aya::Btf::from_sys_fs().ok();
        loader.btf(btf.as_ref());
        let object = sock_destroy::patch_kfunc_calls(EBPF_OBJECT, btf.as_ref());
        let started = std::time::Instant::now();
        let mut ebpf = loader.load(&object)?;
        let maps_made = started.elapsed();
        if flows_without_interfaces {
            mark_every_interface(&mut ebpf)?;
        }
        let mut maps = Maps {
            v4: FamilyMaps::take(&mut ebpf)?,
            v6: FamilyMaps::take(&mut ebpf)?,
            conntrack: take(&mut ebpf, names::CONNTRACK_V4)?,
            conntrack_new: take(&mut ebpf, names::CONNTRACK_NEW_V4)?,
            conntrack_full: {
                let name = names::CONNTRACK_FULL;
                let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                Array::try_from(map).map_err(|source| Error::Map { name, source })?
            },
            affinity: take(&mut ebpf, names::AFFINITY_V4)?,
            conntrack_v6: take(&mut ebpf, names::CONNTRACK_V6)?,
            conntrack_new_v6: take(&mut ebpf, names::CONNTRACK_NEW_V6)?,
            affinity_v6: take(&mut ebpf, names::AFFINITY_V6)?,
            config_v6: {
                let name = names::CONFIG_V6;
                let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                Array::try_from(map).map_err(|source| Error::Map { name, source })?
            },
            fragments: take(&mut ebpf, names::FRAGMENTS_V4)?,
            counters: {
                let map = ebpf
                    .take_map(names::COUNTERS)
                    .ok_or(Error::MissingMap(names::COUNTERS))?;
                PerCpuArray::try_from(map).map_err(|source| Error::Map {
                    name: names::COUNTERS,
                    source,
                })?
            },
            config: {
                let map = ebpf
                    .take_map(names::CONFIG)
                    .ok_or(Error::MissingMap(names::CONFIG))?;
                Array::try_from(map).map_err(|source| Error::Map {
                    name: names::CONFIG,
                    source,
                })?
            },
            sock_config: {
                let name = proxy_common::sock::CONFIG_NAME;
                let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                Array::try_from(map).map_err(|source| Error::Map { name, source })?
            },
            service_cidr: {
                let name = names::SERVICE_CIDR_V4;
                let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                Array::try_from(map).map_err(|source| Error::Map { name, source })?
            },
            service_stats: {
                let name = proxy_common::service_stats::NAME;
                let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
                PerCpuHashMap::try_from(map).map_err(|source| Error::Map { name, source })?
            },
            capacities: requested,
        };
        maps.capacities = maps.read_capacities()?;
        for ((name, wanted), (_, actual)) in requested
            .by_name()
            .into_iter()
            .zip(maps.capacities.by_name())
        {
            if actual < wanted {
                tracing::warn!(
                    map = name,
                    capacity = actual,
                    wanted,
                    "a map adopted from a previous agent is smaller than asked for (a pinned map keeps its size); it grows when the node restarts without pins (kpr cleanup, or a stop without --keep-state)"
                );
            }
        }
        let mut datapath = Self {
            ebpf,
            maps,
            pin_dir: options.pin_dir.clone(),
        };
        let verifying = std::time::Instant::now();
        datapath.load_tc_programs()?;
        tracing::info!(
            maps_ms = maps_made.as_millis() as u64,
            programs_ms = verifying.elapsed().as_millis() as u64,
            "datapath loaded: maps made or adopted, TC programs verified"
        );
        Ok(datapath)
    }

    /// Loads the TC programs, each on a thread of its own: the kernel verifies one
    /// program per `bpf()` call on the calling thread, and verifying them is most of
    /// the agent's start (the pod-facing ingress alone about 1.7 s, the node-facing
    /// one 1 s, on this project's 2-vCPU machines), so on a node with two CPUs or
    /// more the start waits for the dearest program rather than for their sum.
    fn load_tc_programs(&mut self) -> Result<()> {
        // Each program with the static name its errors carry.
        let programs: Vec<(&'static str, &mut aya::programs::Program)> = self
            .ebpf
            .programs_mut()
            .filter_map(|(name, program)| {
                let known = Hook::ALL
                    .into_iter()
                    .map(Hook::program_name)
                    .find(|known| *known == name)?;
                Some((known, program))
            })
            .collect();
        if let Some(missing) = Hook::ALL
            .into_iter()
            .map(Hook::program_name)
            .find(|name| !programs.iter().any(|(found, _)| found == name))
        {
            return Err(Error::MissingProgram(missing));
        }
        std::thread::scope(|scope| {
            let loads: Vec<_> = programs
                .into_iter()
                .map(|(name, program)| {
                    scope.spawn(move || {
                        let program: &mut SchedClassifier = program
                            .try_into()
                            .map_err(|source| Error::Program { name, source })?;
                        program
                            .load()
                            .map_err(|source| Error::Program { name, source })
                    })
                })
                .collect();
            loads.into_iter().try_for_each(|load| {
                load.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        })
    }

    /// The program of a hook.
    ///
    /// # Errors
    /// When the object lacks it (a build problem).
    pub fn program(&mut self, hook: Hook) -> Result<&mut SchedClassifier> {
        let name = hook.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }
}

impl Datapath {
    /// The socket-layer program of a cgroup hook, loaded on first use: an agent without
    /// `--cgroup-path` never asks the kernel to verify programs it will not attach.
    ///
    /// # Errors
    /// When the object lacks it or the kernel refuses it.
    pub fn sock_program(&mut self, hook: cgroup::SockHook) -> Result<&mut CgroupSockAddr> {
        let name = hook.program_name();
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(program)
    }
}

impl Maps {
    /// Each sized map's capacity, as the kernel holds it.
    ///
    /// # Errors
    /// When the kernel does not say.
    pub fn read_capacities(&self) -> Result<MapCapacities> {
        let [services, backends, source_ranges, frontend_addrs] = self.v4.capacities()?;
        let [services_v6, backends_v6, source_ranges_v6, frontend_addrs_v6] =
            self.v6.capacities()?;
        Ok(MapCapacities {
            services,
            backends,
            conntrack: max_entries(&self.conntrack, names::CONNTRACK_V4)?,
            conntrack_new: max_entries(&self.conntrack_new, names::CONNTRACK_NEW_V4)?,
            affinity: max_entries(&self.affinity, names::AFFINITY_V4)?,
            source_ranges,
            frontend_addrs,
            service_stats: max_entries(&self.service_stats, proxy_common::service_stats::NAME)?,
            services_v6,
            backends_v6,
            source_ranges_v6,
            frontend_addrs_v6,
            conntrack_v6: max_entries(&self.conntrack_v6, names::CONNTRACK_V6)?,
            conntrack_new_v6: max_entries(&self.conntrack_new_v6, names::CONNTRACK_NEW_V6)?,
            affinity_v6: max_entries(&self.affinity_v6, names::AFFINITY_V6)?,
        })
    }

    /// Writes the datapath settings.
    ///
    /// # Errors
    /// When the kernel refuses the write.
    pub fn set_config(&mut self, config: &DatapathConfig) -> Result<()> {
        self.config.set(0, config, 0).map_err(|source| Error::Map {
            name: names::CONFIG,
            source,
        })
    }

    /// Writes the node's IPv6 settings (masquerade address, IPv6 cluster CIDR).
    ///
    /// # Errors
    /// When the kernel refuses the write.
    pub fn set_config_v6(&mut self, config: &NodeConfigV6) -> Result<()> {
        self.config_v6
            .set(0, config, 0)
            .map_err(|source| Error::Map {
                name: names::CONFIG_V6,
                source,
            })
    }

    /// Writes the service CIDR (length 0: none, nothing is dropped).
    ///
    /// # Errors
    /// When the kernel refuses the write.
    pub fn set_service_cidr(&mut self, cidr: &proxy_common::ServiceCidrV4) -> Result<()> {
        self.service_cidr
            .set(0, cidr, 0)
            .map_err(|source| Error::Map {
                name: names::SERVICE_CIDR_V4,
                source,
            })
    }

    /// Reads the IPv4 frontend address set, for the agent to adopt.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn read_frontend_addrs(&self) -> Result<FrontendAddrs> {
        self.v4.read_frontend_addrs()
    }

    /// Tells the socket-layer hooks which network namespace is the node's and which
    /// sockets to translate.
    ///
    /// # Errors
    /// When the kernel refuses the write.
    pub fn set_sock_config(&mut self, config: &proxy_common::SockConfig) -> Result<()> {
        self.sock_config
            .set(0, config, 0)
            .map_err(|source| Error::Map {
                name: proxy_common::sock::CONFIG_NAME,
                source,
            })
    }

    /// Reads the IPv4 service and backend maps, for the syncer to adopt.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn read_mirror(&self) -> Result<Mirror> {
        self.v4.read_mirror()
    }

    /// Second handles on the maps [`Self::read_mirror`] (and its IPv6 twin) read, for
    /// another thread.
    ///
    /// # Errors
    /// When the kernel refuses a handle.
    pub fn mirror_reader(&self) -> Result<MirrorReader> {
        Ok(MirrorReader {
            v4: self.v4.reopen()?,
            v6: self.v6.reopen()?,
        })
    }

    /// Sums each per-CPU counter.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize]> {
        let mut totals = [0u64; counter::COUNT as usize];
        for (index, total) in (0..counter::COUNT).zip(totals.iter_mut()) {
            let values = self.counters.get(&index, 0).map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
            *total = values.iter().sum();
        }
        Ok(totals)
    }
}

impl<F: Family> crate::sync::frontend_addrs::AddrWriter<F> for FamilyMaps<F> {
    fn put_frontend_addr(
        &mut self,
        addr: F,
        value: FrontendAddrV4,
    ) -> std::result::Result<(), String> {
        self.frontend_addrs
            .insert(F::addr_key(addr), value, 0)
            .map_err(|error| error.to_string())
    }

    fn put_frontend_addrs(&mut self, entries: &[(F, FrontendAddrV4)]) -> (usize, Option<String>) {
        self.put_frontend_addrs_batched(entries)
    }

    fn delete_frontend_addr(&mut self, addr: F) -> std::result::Result<(), String> {
        match self.frontend_addrs.remove(&F::addr_key(addr)) {
            Ok(()) => Ok(()),
            // Gone already: removed.
            Err(error) if is_missing(&error) => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// The agent writes every family's maps through its one [`Maps`].
impl<F: Family> crate::sync::frontend_addrs::AddrWriter<F> for Maps {
    fn put_frontend_addr(
        &mut self,
        addr: F,
        value: FrontendAddrV4,
    ) -> std::result::Result<(), String> {
        F::maps_mut(self).put_frontend_addr(addr, value)
    }

    fn put_frontend_addrs(&mut self, entries: &[(F, FrontendAddrV4)]) -> (usize, Option<String>) {
        F::maps_mut(self).put_frontend_addrs(entries)
    }

    fn delete_frontend_addr(&mut self, addr: F) -> std::result::Result<(), String> {
        F::maps_mut(self).delete_frontend_addr(addr)
    }
}

/// Whether a map error means "no such key". aya 0.14 reports a hash map's or a trie's
/// refused delete as the syscall's ENOENT, not as `KeyNotFound`.
fn is_missing(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(syscall) => syscall.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Whether a map error means "the map is full".
fn is_full(error: &MapError) -> bool {
    match error {
        MapError::SyscallError(syscall) => matches!(
            syscall.io_error.raw_os_error(),
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
        ),
        _ => false,
    }
}

impl<F: Family> MapWriter<F> for FamilyMaps<F> {
    fn apply(&mut self, op: &MapOp<F>) -> std::result::Result<(), WriteError<F>> {
        let result = match *op {
            MapOp::PutBackend { id, backend } => self.backends.insert(id, backend, 0),
            MapOp::DeleteBackend { id } => self.backends.remove(&id),
            MapOp::PutService { key, value } => self.services.insert(key, value, 0),
            MapOp::DeleteService { key } => self.services.remove(&key),
            MapOp::PutSourceRange { key } => self.source_ranges.insert(&key.trie_key(), 1, 0),
            MapOp::DeleteSourceRange { key } => self.source_ranges.remove(&key.trie_key()),
        };
        match result {
            Ok(()) => Ok(()),
            // Deleting what is already gone reaches the desired state.
            Err(error)
                if is_missing(&error)
                    && matches!(
                        op,
                        MapOp::DeleteBackend { .. }
                            | MapOp::DeleteService { .. }
                            | MapOp::DeleteSourceRange { .. }
                    ) =>
            {
                Ok(())
            }
            Err(error) => Err(WriteError {
                op: *op,
                map_full: is_full(&error),
                // With the cause: the errno says why (E2BIG: full).
                message: crate::error_chain(&error),
            }),
        }
    }

    fn apply_batch(&mut self, ops: &[MapOp<F>]) -> (usize, Option<WriteError<F>>) {
        self.apply_batched(ops)
    }
}

impl<F: Family> MapWriter<F> for Maps {
    fn apply(&mut self, op: &MapOp<F>) -> std::result::Result<(), WriteError<F>> {
        F::maps_mut(self).apply(op)
    }

    fn apply_batch(&mut self, ops: &[MapOp<F>]) -> (usize, Option<WriteError<F>>) {
        F::maps_mut(self).apply_batch(ops)
    }
}
