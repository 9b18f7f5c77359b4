//! The configuration file (`kpr run --config FILE`).
//!
//! It uses kube-proxy's `KubeProxyConfiguration` names wherever the concept is the
//! same, so operators can carry their settings over; settings of ours sit beside them.
//! Anything unknown, or known to kube-proxy but meaningless here (`mode`, `iptables`,
//! `ipvs`, ...), is rejected at start with a message naming it: a silently ignored
//! setting is worse than a refused one.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use proxy_common::{DatapathConfig, ServiceCidrV4};
use serde::Deserialize;

use crate::{
    agent::{AgentConfig, MapSizes},
    datapath::node_network::NodePortFilter,
    model::ModelSettings,
    source::SourceConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{name}: {message}")]
    Setting { name: &'static str, message: String },
}

/// The file's contents. Every field is optional; flags given on the command line win.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    /// `kubeproxy.config.k8s.io/v1alpha1` (kube-proxy's) or `kpr.dev/v1alpha1`.
    pub api_version: Option<String>,
    /// `KubeProxyConfiguration`.
    pub kind: Option<String>,
    /// kube-proxy: the cluster's pod CIDR(s), comma-separated.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    /// kpr (kube-proxy has no such setting; its nftables mode reads ServiceCIDR
    /// objects): the service CIDR(s), comma-separated; the first IPv4 one counts.
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: Option<String>,
    /// kube-proxy: addresses NodePorts answer on (CIDRs, or `primary`).
    pub node_port_addresses: Option<Vec<String>>,
    /// kube-proxy: `/healthz` and `/livez` address ("" disables).
    pub healthz_bind_address: Option<String>,
    /// kube-proxy: `/metrics` address ("" disables).
    pub metrics_bind_address: Option<String>,
    /// kube-proxy: the node name to use instead of NODE_NAME.
    pub hostname_override: Option<String>,
    /// kube-proxy: the shortest time between two syncs (batches bursts of changes).
    pub min_sync_period: Option<DurationText>,
    /// kube-proxy: how often the datapath is resynced in full (here: read back from the
    /// maps and repaired where it differs).
    pub sync_period: Option<DurationText>,
    /// kube-proxy: conntrack settings.
    pub conntrack: Option<ConntrackConfig>,
    /// kube-proxy (≥1.31 as a flag, here too): serve only services labelled with this
    /// `service.kubernetes.io/service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Ours: the bpffs pin directory.
    pub bpffs: Option<PathBuf>,
    /// Ours: pod-facing interface names or prefixes ending in `*`.
    pub pod_interfaces: Option<Vec<String>>,
    /// Ours: the cgroup v2 directory whose processes get the socket-layer hooks that
    /// translate for host-network clients (the host's cgroup2 root in production; ""
    /// or absent: none).
    pub cgroup_path: Option<PathBuf>,
    /// Ours: which sockets of that cgroup are translated at the socket layer
    /// (`all`, `host` or `off`; default `all`).
    pub socket_lb: Option<crate::socket_lb::Mode>,
    /// Ours: per-service traffic counters (`auto`, `on` or `off`; default `auto`: on
    /// up to 1000 service ports).
    pub service_counters: Option<crate::service_counters::Mode>,
    /// Ours: the least capacity of each BPF map (the agent grows a map further when
    /// the cluster it finds at start needs more).
    pub maps: Option<MapsConfig>,
}

/// Our `maps` block: map capacities in entries. The conntrack table's size follows
/// kube-proxy's `conntrack.maxPerCore`/`min` (or `--conntrack-max`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapsConfig {
    /// Frontends plus their backend slots (a service port with 10 endpoints takes 11).
    pub services: Option<u32>,
    /// Distinct backends (endpoint address, port, protocol).
    pub backends: Option<u32>,
    /// Session affinity entries (client, service port).
    pub affinity: Option<u32>,
    /// loadBalancerSourceRanges entries, all services together.
    pub source_ranges: Option<u32>,
}

/// kube-proxy's `conntrack` block. Timeouts apply to our own conntrack map.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConntrackConfig {
    /// Entries per CPU core (the table holds `maxPerCore * cores`, at least `min`).
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<DurationText>,
    pub tcp_close_wait_timeout: Option<DurationText>,
    pub udp_timeout: Option<DurationText>,
    /// Accepted for compatibility; our datapath has no separate UDP stream timeout.
    pub udp_stream_timeout: Option<DurationText>,
}

/// A Go-style duration (`1s`, `500ms`, `1h30m`, `24h0m0s`), as kube-proxy's file has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationText(pub Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a Go duration: a sequence of `<number><unit>` with units h, m, s, ms, us, ns.
///
/// # Errors
/// When the text is not such a sequence.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (examples: 30s, 500ms, 1h30m)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(invalid)?;
        let number: f64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total += Duration::from_secs_f64(number * seconds_per_unit);
    }
    Ok(total)
}

const API_VERSIONS: [&str; 2] = ["kubeproxy.config.k8s.io/v1alpha1", "kpr.dev/v1alpha1"];

/// Reads and validates `path`.
///
/// # Errors
/// When the file cannot be read, has unknown fields, or has invalid values.
pub fn load(path: &std::path::Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|message| Error::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses and validates a configuration text.
///
/// # Errors
/// A message naming the offending setting.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    let config: FileConfig = serde_yaml::from_str(text).map_err(|error| {
        let message = error.to_string();
        if message.contains("unknown field") {
            format!("{message}; kube-proxy settings that have no meaning for an eBPF dataplane (mode, iptables, ipvs, nftables, winkernel, ...) are not accepted")
        } else {
            message
        }
    })?;
    if let Some(version) = &config.api_version {
        if !API_VERSIONS.contains(&version.as_str()) {
            return Err(format!(
                "apiVersion {version:?} is not one of {API_VERSIONS:?}"
            ));
        }
    }
    if let Some(kind) = &config.kind {
        if kind != "KubeProxyConfiguration" {
            return Err(format!("kind {kind:?} must be KubeProxyConfiguration"));
        }
    }
    for (name, value) in [
        ("healthzBindAddress", &config.healthz_bind_address),
        ("metricsBindAddress", &config.metrics_bind_address),
    ] {
        if let Some(text) = value.as_deref().filter(|text| !text.is_empty()) {
            text.parse::<SocketAddr>()
                .map_err(|_| format!("{name}: {text:?} is not an address:port"))?;
        }
    }
    if let Some(cidrs) = &config.cluster_cidr {
        // kube-proxy's dual-stack form: one CIDR per family, comma-separated.
        for cidr in cidrs.split(',').filter(|cidr| !cidr.is_empty()) {
            parse_ip_cidr(cidr).map_err(|message| format!("clusterCIDR: {message}"))?;
        }
    }
    if let Some(cidrs) = &config.service_cidr {
        for cidr in cidrs.split(',').filter(|cidr| !cidr.is_empty()) {
            parse_ipv4_cidr(cidr).map_err(|message| format!("serviceCIDR: {message}"))?;
        }
    }
    for address in config.node_port_addresses.iter().flatten() {
        if address != "primary" {
            parse_ip_cidr(address).map_err(|message| format!("nodePortAddresses: {message}"))?;
        }
    }
    if let Some(conntrack) = &config.conntrack {
        for (name, value) in [
            (
                "conntrack.tcpEstablishedTimeout",
                conntrack.tcp_established_timeout,
            ),
            (
                "conntrack.tcpCloseWaitTimeout",
                conntrack.tcp_close_wait_timeout,
            ),
            ("conntrack.udpTimeout", conntrack.udp_timeout),
        ] {
            if value.is_some_and(|duration| duration.0.as_secs() > u64::from(u32::MAX)) {
                return Err(format!("{name} is too long"));
            }
        }
    }
    if let Some(path) = config
        .cgroup_path
        .as_ref()
        .filter(|path| !path.as_os_str().is_empty())
    {
        if !path.is_absolute() {
            return Err(format!(
                "cgroupPath: {} is not an absolute path",
                path.display()
            ));
        }
    }
    if config.pod_interfaces.as_ref().is_some_and(Vec::is_empty) {
        return Err("podInterfaces must name at least one interface or prefix".into());
    }
    Ok(config)
}

/// Parses a CIDR of either family (`a.b.c.d/len`, `x:y::/len`).
///
/// # Errors
/// When it is not one.
pub fn parse_ip_cidr(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR"))?;
    let addr = addr
        .parse::<std::net::IpAddr>()
        .map_err(|_| format!("{text:?}: not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|len| *len <= max)
        .ok_or_else(|| format!("{text:?}: bad prefix length"))?;
    Ok((addr, len))
}

/// Parses `a.b.c.d/len` (IPv4 only: the settings that take it are IPv4's, such as
/// the service CIDR).
///
/// # Errors
/// When it is not an IPv4 CIDR.
pub fn parse_ipv4_cidr(text: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (addr, len) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR"))?;
    let addr = addr.parse::<std::net::Ipv4Addr>().map_err(|_| {
        format!("{text:?}: not an IPv4 address (IPv6 is not supported by the datapath yet)")
    })?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|len| *len <= 32)
        .ok_or_else(|| format!("{text:?}: bad prefix length"))?;
    Ok((addr, len))
}

impl ConntrackConfig {
    /// The conntrack map capacity kube-proxy's settings ask for on this machine.
    #[must_use]
    pub fn capacity(&self, cores: u32) -> Option<u32> {
        let per_core = self.max_per_core.filter(|n| *n > 0)?;
        Some(per_core.saturating_mul(cores).max(self.min.unwrap_or(0)))
    }
}

/// The flags of `kpr run`; [`RunArgs::agent_config`] merges them with the file.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Configuration file with kube-proxy's KubeProxyConfiguration names (clusterCIDR,
    /// conntrack.*, healthzBindAddress, metricsBindAddress, ...) plus ours (bpffs,
    /// podInterfaces, cgroupPath, socketLb). Flags given on the command line win over it. Unknown settings
    /// are rejected.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Read Services, EndpointSlices and the Node from this directory of YAML/JSON
    /// manifests, following changes to it, instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,

    /// Kubeconfig for the API server. Without it and without --manifests, the
    /// in-cluster configuration (service account) is used.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,

    /// After a change from the API, further changes are collected for this many
    /// milliseconds and applied in one sync (kube-proxy's minSyncPeriod).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    min_sync_period_ms: u64,

    /// How often the maps themselves are read back and compared with the desired
    /// state, repairing what differs (entries changed or deleted behind the agent's
    /// back, missing pins): kube-proxy's syncPeriod.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    sync_period_ms: u64,

    /// This node's name: endpoints with this nodeName are local (traffic policies,
    /// topology).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Directory on a BPF filesystem where maps and program links are pinned, so they
    /// outlive the agent across restarts.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kpr")]
    bpffs: PathBuf,

    /// Pod-facing interfaces to attach to: exact names or prefixes ending in `*`,
    /// comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "veth*,cali*,lxc*")]
    pod_interfaces: Vec<String>,

    /// The node's external interfaces, where traffic from other nodes and from outside
    /// the cluster arrives (NodePort, externalIPs, LoadBalancer IPs): exact names or
    /// prefixes ending in `*`, comma-separated. Default: the interfaces that carry a
    /// default route (IPv4 or IPv6).
    #[arg(long, value_delimiter = ',')]
    node_interfaces: Option<Vec<String>>,

    /// Addresses NodePorts answer on, as kube-proxy's nodePortAddresses: IPv4 CIDRs or
    /// `primary`, comma-separated. Default: every address of the external interfaces.
    #[arg(long, value_delimiter = ',')]
    node_port_addresses: Vec<String>,

    /// The node's primary address: masqueraded (SNAT) traffic leaves with it. Default:
    /// the first address of the external interfaces. Given twice, one per family
    /// (kube-proxy's nodeIPOverride on a dual-stack node): `--node-ip 10.0.0.5
    /// --node-ip fd00::5`.
    #[arg(long)]
    node_ip: Vec<std::net::IpAddr>,

    /// The cluster's pod CIDR (kube-proxy's clusterCIDR): ClusterIP traffic from
    /// outside it is masqueraded when its backend is on another node. Unset: all such
    /// traffic is.
    #[arg(long)]
    cluster_cidr: Option<String>,

    /// The service CIDR (the range ClusterIPs are allocated from, the API server's
    /// --service-cluster-ip-range; comma-separated, the first IPv4 one counts): traffic
    /// to an address inside it that no Service holds is dropped (counted as
    /// drop_unallocated_service_ip) instead of routed out of the node, as kube-proxy's
    /// nftables mode does. Unset: no such drop.
    #[arg(long)]
    service_cidr: Option<String>,

    /// Translate for host-network clients (kubelet, hostNetwork pods) too: attach the
    /// socket-layer hooks (cgroup v2 connect4, sendmsg4, recvmsg4, getpeername4) to this
    /// cgroup v2 directory, which covers every process in it and below it. In production
    /// the host's cgroup2 root (often /sys/fs/cgroup). Off by default ("" turns it off
    /// when the config file sets cgroupPath).
    #[arg(long, value_name = "DIR")]
    cgroup_path: Option<PathBuf>,

    /// Which sockets in the --cgroup-path cgroup are translated at connect()/sendmsg()
    /// (no per-packet NAT): all (pods and the node's own processes), host (the node's
    /// network namespace only; pods take the TC path) or off (no hooks attached).
    #[arg(long, value_enum, default_value_t = crate::socket_lb::Mode::All)]
    socket_lb: crate::socket_lb::Mode,

    /// Count new connections, packets and bytes per service port in the datapath
    /// (kpr_service_{connections,packets,bytes}_total): auto (on while the node has at
    /// most 1000 service ports), on or off.
    #[arg(long, value_enum, default_value_t = crate::service_counters::Mode::Auto)]
    service_counters: crate::service_counters::Mode,

    /// Leave programs attached and maps pinned on exit (for a restart or an upgrade).
    #[arg(long)]
    keep_state: bool,

    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, value_name = "ENTRIES")]
    conntrack_max: Option<u32>,

    /// Least capacity of the service map (frontends plus backend slots; default
    /// 262144). The agent makes it larger when the cluster it finds at start needs more.
    #[arg(long, value_name = "ENTRIES")]
    services_max: Option<u32>,

    /// Least capacity of the backend map (distinct endpoints; default 131072), grown
    /// like --services-max.
    #[arg(long, value_name = "ENTRIES")]
    backends_max: Option<u32>,

    /// Capacity of the session affinity map (default 131072).
    #[arg(long, value_name = "ENTRIES")]
    affinity_max: Option<u32>,

    /// Least capacity of the loadBalancerSourceRanges map (default 16384), grown like
    /// --services-max.
    #[arg(long, value_name = "ENTRIES")]
    source_ranges_max: Option<u32>,

    /// Idle timeout of established TCP flows, seconds.
    #[arg(long, default_value_t = DatapathConfig::DEFAULT.tcp_established_timeout_s)]
    conntrack_tcp_timeout: u32,

    /// Idle timeout of TCP flows after FIN or RST, seconds.
    #[arg(long, default_value_t = DatapathConfig::DEFAULT.tcp_closing_timeout_s)]
    conntrack_tcp_close_timeout: u32,

    /// Idle timeout of UDP flows, seconds.
    #[arg(long, default_value_t = DatapathConfig::DEFAULT.udp_timeout_s)]
    conntrack_udp_timeout: u32,

    /// Handle services labelled service.kubernetes.io/service-proxy-name=NAME (services
    /// labelled with another name are skipped, as kube-proxy does).
    #[arg(long)]
    proxy_name: Option<String>,

    /// Address of the /healthz and /livez server ("" to disable). The IPv4 wildcard
    /// serves both families (a dual-stack `[::]` socket where the node has IPv6), as
    /// kube-proxy's default does.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,

    /// Address of the Prometheus /metrics server ("" to disable). The loopback by
    /// default, as kube-proxy's: metrics tell anyone who reads them every service and
    /// backend count of the node.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,

    /// Log filter (tracing EnvFilter syntax), overridden by RUST_LOG.
    #[arg(long, default_value = "info")]
    log_level: String,

    /// Log line format: `text` (coloured only when stderr is a terminal) or `json`
    /// (one object per line, for log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// An address setting where "" means off.
fn optional_address(name: &'static str, text: &str) -> Result<Option<SocketAddr>, Error> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| Error::Setting {
        name,
        message: format!("{text:?} is not an address:port"),
    })
}

impl RunArgs {
    /// Where `kpr run` reads its configuration file, if anywhere.
    #[must_use]
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The log filter flag.
    #[must_use]
    pub fn log_level(&self) -> &str {
        &self.log_level
    }

    /// The log format flag.
    #[must_use]
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// The agent's configuration: flags given on the command line (or by environment),
    /// as `explicit` tells, win over the `--config` file, which wins over the flags'
    /// defaults.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn agent_config(self, explicit: &dyn Fn(&str) -> bool) -> Result<AgentConfig, Error> {
        let mut args = self;
        let file = match &args.config {
            Some(path) => load(path)?,
            None => FileConfig::default(),
        };
        if let Some(value) = file
            .healthz_bind_address
            .clone()
            .filter(|_| !explicit("healthz_bind_address"))
        {
            args.healthz_bind_address = value;
        }
        if let Some(value) = file
            .metrics_bind_address
            .clone()
            .filter(|_| !explicit("metrics_bind_address"))
        {
            args.metrics_bind_address = value;
        }
        if let Some(value) = file
            .hostname_override
            .clone()
            .filter(|_| !explicit("node_name"))
        {
            args.node_name = Some(value);
        }
        if let Some(value) = file.bpffs.clone().filter(|_| !explicit("bpffs")) {
            args.bpffs = value;
        }
        if let Some(value) = file
            .pod_interfaces
            .clone()
            .filter(|_| !explicit("pod_interfaces"))
        {
            args.pod_interfaces = value;
        }
        if let Some(value) = file
            .cgroup_path
            .clone()
            .filter(|_| !explicit("cgroup_path"))
        {
            args.cgroup_path = Some(value);
        }
        if let Some(value) = file.socket_lb.filter(|_| !explicit("socket_lb")) {
            args.socket_lb = value;
        }
        if let Some(value) = file
            .service_counters
            .filter(|_| !explicit("service_counters"))
        {
            args.service_counters = value;
        }
        if let Some(value) = file
            .service_proxy_name
            .clone()
            .filter(|_| !explicit("proxy_name"))
        {
            args.proxy_name = Some(value);
        }
        if let Some(value) = file
            .min_sync_period
            .filter(|_| !explicit("min_sync_period_ms"))
        {
            args.min_sync_period_ms = u64::try_from(value.0.as_millis()).unwrap_or(u64::MAX);
        }
        if let Some(value) = file.sync_period.filter(|_| !explicit("sync_period_ms")) {
            args.sync_period_ms = u64::try_from(value.0.as_millis()).unwrap_or(u64::MAX);
        }
        if args.sync_period_ms == 0 {
            return Err(Error::Setting {
                name: "syncPeriod",
                message: "must be longer than 0".into(),
            });
        }
        let seconds =
            |duration: DurationText| u32::try_from(duration.0.as_secs()).unwrap_or(u32::MAX);
        if let Some(conntrack) = &file.conntrack {
            if let Some(value) = conntrack
                .tcp_established_timeout
                .filter(|_| !explicit("conntrack_tcp_timeout"))
            {
                args.conntrack_tcp_timeout = seconds(value);
            }
            if let Some(value) = conntrack
                .tcp_close_wait_timeout
                .filter(|_| !explicit("conntrack_tcp_close_timeout"))
            {
                args.conntrack_tcp_close_timeout = seconds(value);
            }
            if let Some(value) = conntrack
                .udp_timeout
                .filter(|_| !explicit("conntrack_udp_timeout"))
            {
                args.conntrack_udp_timeout = seconds(value);
            }
            let cores = std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
            if let Some(capacity) = conntrack
                .capacity(cores)
                .filter(|_| !explicit("conntrack_max"))
            {
                args.conntrack_max = Some(capacity);
            }
        }
        if let Some(maps) = &file.maps {
            for (id, value, arg) in [
                ("services_max", maps.services, &mut args.services_max),
                ("backends_max", maps.backends, &mut args.backends_max),
                ("affinity_max", maps.affinity, &mut args.affinity_max),
                (
                    "source_ranges_max",
                    maps.source_ranges,
                    &mut args.source_ranges_max,
                ),
            ] {
                if let Some(value) = value.filter(|_| !explicit(id)) {
                    *arg = Some(value);
                }
            }
        }
        if let Some(value) = file
            .cluster_cidr
            .clone()
            .filter(|_| !explicit("cluster_cidr"))
        {
            args.cluster_cidr = Some(value);
        }
        if let Some(value) = file
            .service_cidr
            .clone()
            .filter(|_| !explicit("service_cidr"))
        {
            args.service_cidr = Some(value);
        }
        if let Some(value) = file
            .node_port_addresses
            .clone()
            .filter(|_| !explicit("node_port_addresses"))
        {
            args.node_port_addresses = value;
        }
        let node_port_filters = args
            .node_port_addresses
            .iter()
            .filter(|text| !text.trim().is_empty())
            .map(|text| NodePortFilter::parse(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| Error::Setting {
                name: "nodePortAddresses",
                message,
            })?;
        // kube-proxy takes a comma-separated list, one CIDR per family; the first of
        // each family counts.
        let (cluster_cidr, cluster_cidr_v6) = match args.cluster_cidr.as_deref() {
            None | Some("") => (None, None),
            Some(list) => {
                let cidrs = list
                    .split(',')
                    .filter(|cidr| !cidr.trim().is_empty())
                    .map(parse_ip_cidr)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|message| Error::Setting {
                        name: "clusterCIDR",
                        message,
                    })?;
                let v4 = cidrs.iter().find_map(|&(addr, len)| match addr {
                    std::net::IpAddr::V4(v4) => Some((v4, len)),
                    std::net::IpAddr::V6(_) => None,
                });
                let v6 = cidrs.iter().find_map(|&(addr, len)| match addr {
                    std::net::IpAddr::V6(v6) => Some((v6, len)),
                    std::net::IpAddr::V4(_) => None,
                });
                (v4, v6)
            }
        };
        let (node_ip, node_ip_v6) = node_ips(&args.node_ip)?;
        let service_cidr = match args.service_cidr.as_deref() {
            None | Some("") => None,
            Some(list) => Some(
                list.split(',')
                    .map(parse_ipv4_cidr)
                    .find_map(Result::ok)
                    .ok_or_else(|| Error::Setting {
                        name: "serviceCIDR",
                        message: format!("no IPv4 CIDR in {list:?}"),
                    })?,
            ),
        };
        Ok(AgentConfig {
            source: match args.manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Api {
                    kubeconfig: args.kubeconfig,
                    min_sync_period: Duration::from_millis(args.min_sync_period_ms),
                },
            },
            sync_period: Duration::from_millis(args.sync_period_ms),
            node_name: args.node_name,
            pin_dir: args.bpffs,
            pod_interfaces: args.pod_interfaces,
            node_interfaces: args.node_interfaces,
            node_port_filters,
            node_ip,
            node_ip_v6,
            cluster_cidr_v6,
            cgroup_path: args.cgroup_path.filter(|path| !path.as_os_str().is_empty()),
            socket_lb: args.socket_lb,
            service_counters: args.service_counters,
            keep_state: args.keep_state,
            conntrack_max: args.conntrack_max,
            service_cidr: service_cidr.map_or_else(ServiceCidrV4::default, |(addr, len)| {
                ServiceCidrV4 {
                    addr: proxy_common::Be32::from_ipv4(addr),
                    len,
                    _pad: [0; 3],
                }
            }),
            map_sizes: MapSizes {
                services: args.services_max,
                backends: args.backends_max,
                affinity: args.affinity_max,
                source_ranges: args.source_ranges_max,
            },
            datapath: DatapathConfig {
                tcp_established_timeout_s: args.conntrack_tcp_timeout,
                tcp_closing_timeout_s: args.conntrack_tcp_close_timeout,
                udp_timeout_s: args.conntrack_udp_timeout,
                cluster_cidr_addr: cluster_cidr.map_or(proxy_common::Be32(0), |(addr, _)| {
                    proxy_common::Be32::from_ipv4(addr)
                }),
                cluster_cidr_len: cluster_cidr.map_or(0, |(_, len)| len),
                ..DatapathConfig::DEFAULT
            },
            conntrack_gc_interval: Duration::from_secs(10),
            model: ModelSettings {
                proxy_name: args.proxy_name,
                node_port_addresses: Vec::new(),
                node_port_addresses_v6: Vec::new(),
            },
            healthz_bind_address: optional_address(
                "healthzBindAddress",
                &args.healthz_bind_address,
            )?,
            metrics_bind_address: optional_address(
                "metricsBindAddress",
                &args.metrics_bind_address,
            )?,
            // kube-proxy's choice while nodePortAddresses is unset: every address.
            health_check_addresses: vec![std::net::Ipv4Addr::UNSPECIFIED.into()],
        })
    }
}

/// The `--node-ip` values by family: at most one of each, as kube-proxy's
/// `--node-ip`/`nodeIPOverride` on a dual-stack node.
fn node_ips(
    ips: &[std::net::IpAddr],
) -> Result<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>), Error> {
    let mut v4 = None;
    let mut v6 = None;
    for ip in ips {
        let duplicate = match *ip {
            std::net::IpAddr::V4(addr) => v4.replace(addr).is_some(),
            std::net::IpAddr::V6(addr) => v6.replace(addr).is_some(),
        };
        if duplicate {
            return Err(Error::Setting {
                name: "nodeIP",
                message: format!(
                    "{ip}: --node-ip takes one address per family (given twice: one IPv4, one IPv6)"
                ),
            });
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ip_takes_one_address_per_family() {
        let v4: std::net::IpAddr = "10.0.0.5".parse().expect("v4");
        let v6: std::net::IpAddr = "fd00::5".parse().expect("v6");
        let (a, b) = node_ips(&[v4, v6]).expect("one of each");
        assert_eq!(a, Some("10.0.0.5".parse().expect("v4")));
        assert_eq!(b, Some("fd00::5".parse().expect("v6")));
        assert!(node_ips(&[v4, v4]).is_err());
        assert!(node_ips(&[v6, v6]).is_err());
        assert_eq!(node_ips(&[]).expect("none"), (None, None));
    }

    /// `kpr run` with these flags, merged as main.rs merges them (no config file).
    fn run_config(args: &[&str]) -> Result<AgentConfig, Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("kpr").chain(args.iter().copied()),
        )
        .map_err(|error| Error::Setting {
            name: "args",
            message: error.to_string(),
        })?;
        cli.run.agent_config(&|_| true)
    }

    #[test]
    fn dual_stack_flags_give_each_family_its_node_ip_and_cluster_cidr() {
        let config = run_config(&[
            "--node-ip",
            "10.0.0.5",
            "--node-ip",
            "fd00::5",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
        ])
        .expect("valid");
        assert_eq!(config.node_ip, Some("10.0.0.5".parse().expect("v4")));
        assert_eq!(config.node_ip_v6, Some("fd00::5".parse().expect("v6")));
        assert_eq!(config.datapath.cluster_cidr_len, 16);
        assert_eq!(
            config.cluster_cidr_v6,
            Some(("fd00:10:244::".parse().expect("v6"), 56))
        );
        // An IPv6-only cluster: no IPv4 CIDR, no IPv4 node IP.
        let six = run_config(&["--node-ip", "fd00::5", "--cluster-cidr", "fd00:10:244::/56"])
            .expect("valid");
        assert_eq!((six.node_ip, six.datapath.cluster_cidr_len), (None, 0));
        assert!(six.cluster_cidr_v6.is_some());
        assert!(run_config(&["--node-ip", "10.0.0.5", "--node-ip", "10.0.0.6"]).is_err());
        assert!(run_config(&["--cluster-cidr", "10.244.0.0/16,nonsense"]).is_err());
    }

    #[test]
    fn cluster_cidr_takes_kube_proxys_dual_stack_form() {
        let config = parse("clusterCIDR: \"10.244.0.0/16,fd00:10:244::/56\"\n").expect("valid");
        assert_eq!(
            config.cluster_cidr.as_deref(),
            Some("10.244.0.0/16,fd00:10:244::/56")
        );
        assert!(parse("nodePortAddresses: [\"fd00::/64\", primary]\n").is_ok());
    }

    #[test]
    fn map_capacities_come_from_the_maps_block() {
        let config = parse(
            "maps:
  services: 2000000
  backends: 300000
  affinity: 65536
  sourceRanges: 1024
",
        )
        .expect("valid");
        assert_eq!(
            config.maps,
            Some(MapsConfig {
                services: Some(2_000_000),
                backends: Some(300_000),
                affinity: Some(65_536),
                source_ranges: Some(1024),
            })
        );
        assert!(
            parse("maps: {conntrack: 5}\n").is_err(),
            "conntrack is kube-proxy's block"
        );
    }

    #[test]
    fn a_kube_proxy_file_carries_over() {
        let config = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clusterCIDR: 10.244.0.0/16
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
minSyncPeriod: 1s
syncPeriod: 30s
nodePortAddresses: [primary, 192.168.0.0/24]
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpEstablishedTimeout: 24h0m0s
  tcpCloseWaitTimeout: 1h0m0s
  udpTimeout: 30s
",
        )
        .expect("valid");
        assert_eq!(
            config.min_sync_period,
            Some(DurationText(Duration::from_secs(1)))
        );
        assert_eq!(
            config.sync_period,
            Some(DurationText(Duration::from_secs(30)))
        );
        let conntrack = config.conntrack.expect("conntrack");
        assert_eq!(
            conntrack.tcp_established_timeout,
            Some(DurationText(Duration::from_secs(86_400)))
        );
        assert_eq!(conntrack.capacity(2), Some(131_072));
        assert_eq!(conntrack.capacity(8), Some(262_144));
    }

    #[test]
    fn bad_settings_are_rejected_with_their_name() {
        let table = [
            ("mode: iptables\n", "unknown field `mode`"),
            (
                "iptables: {masqueradeAll: true}\n",
                "unknown field `iptables`",
            ),
            ("healthzBindAddress: nonsense\n", "healthzBindAddress"),
            ("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR"),
            ("clusterCIDR: 10.244.0.0/16,fd00::/129\n", "clusterCIDR"),
            ("minSyncPeriod: 5 parsecs\n", "invalid duration"),
            ("kind: Deployment\n", "kind"),
            ("apiVersion: v1\n", "apiVersion"),
            ("podInterfaces: []\n", "podInterfaces"),
            ("cgroupPath: sys/fs/cgroup\n", "cgroupPath"),
            (
                "conntrack: {tcpTimeout: 1s}\n",
                "unknown field `tcpTimeout`",
            ),
        ];
        for (text, expected) in table {
            let error = parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn service_cidr_is_ours_and_checked() {
        let config = parse("serviceCIDR: 10.96.0.0/12\n").expect("valid");
        assert_eq!(config.service_cidr.as_deref(), Some("10.96.0.0/12"));
        assert_eq!(parse("{}\n").expect("valid").service_cidr, None);
        let error = parse("serviceCIDR: 10.96.0.0/40\n").expect_err("bad length");
        assert!(error.contains("serviceCIDR"), "{error}");
    }

    #[test]
    fn socket_lb_is_ours_and_checked() {
        let config = parse("socketLb: host\n").expect("valid");
        assert_eq!(config.socket_lb, Some(crate::socket_lb::Mode::Host));
        assert_eq!(parse("{}\n").expect("valid").socket_lb, None);
        assert!(parse("socketLb: pods\n").is_err());
    }

    #[test]
    fn cgroup_path_is_ours_and_optional() {
        let config = parse("cgroupPath: /sys/fs/cgroup\n").expect("valid");
        assert_eq!(
            config.cgroup_path.as_deref(),
            Some(std::path::Path::new("/sys/fs/cgroup"))
        );
        assert_eq!(parse("{}\n").expect("valid").cgroup_path, None);
        // "" is accepted and means no hooks, as "" turns the bind addresses off.
        assert!(parse("cgroupPath: \"\"\n").is_ok());
    }

    #[test]
    fn go_durations() {
        for (text, seconds) in [
            ("1s", 1.0),
            ("500ms", 0.5),
            ("1h30m", 5400.0),
            ("24h0m0s", 86_400.0),
            ("0", 0.0),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs_f64(seconds)),
                "{text}"
            );
        }
        for text in ["", "1", "s", "1x", "-1s"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }
}
