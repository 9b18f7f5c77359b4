//! `kpr`: the node agent of the eBPF kube-proxy replacement, and its tools.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{
    parser::ValueSource, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand,
};
use proxy_common::DatapathConfig;
use proxy_userspace::{
    agent::{self, AgentConfig},
    config,
    datapath::node_network::NodePortFilter,
    inspect::{self, PinnedMaps},
    model::ModelSettings,
    source::SourceConfig,
};
use tracing_subscriber::EnvFilter;

/// eBPF replacement for kube-proxy: translates Service traffic in the kernel.
#[derive(Parser, Debug)]
#[command(name = "kpr", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: load the datapath, follow Services and EndpointSlices, attach to
    /// pod interfaces.
    Run(Box<RunArgs>),
    /// Remove every program link and pinned map the agent left (like kube-proxy --cleanup).
    Cleanup(CleanupArgs),
    /// Print what a running node's maps hold: services, conntrack, affinity, sockets,
    /// counters.
    Inspect(InspectArgs),
    /// Say which frontend a packet matches and which backend the datapath would choose.
    Trace(TraceArgs),
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(subcommand)]
    what: InspectWhat,
    /// The pin directory of the running agent.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/sys/fs/bpf/kpr",
        global = true
    )]
    bpffs: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum InspectWhat {
    /// Frontends with their backends.
    Services,
    /// Conntrack entries (two per translated flow).
    Conntrack {
        /// Only flows with this address at either end, before or after translation.
        #[arg(long)]
        addr: Option<std::net::Ipv4Addr>,
        /// Only flows with this port at either end.
        #[arg(long)]
        port: Option<u16>,
        /// Only this protocol (tcp or udp).
        #[arg(long, value_parser = parse_protocol)]
        protocol: Option<u8>,
    },
    /// Session affinity records (TC path by client address, socket path by client
    /// network namespace).
    Affinity,
    /// Sockets translated at connect()/sendmsg() by the socket-layer hooks (flows that
    /// took the socket path and so have no conntrack entry).
    Sockets,
    /// Datapath event counters, summed over CPUs.
    Counters,
}

#[derive(Args, Debug)]
struct TraceArgs {
    /// The client: an address, or address:port to also match an existing flow.
    #[arg(long, value_parser = parse_client)]
    client: std::net::SocketAddrV4,
    /// The destination address:port.
    #[arg(long)]
    to: std::net::SocketAddrV4,
    /// tcp or udp.
    #[arg(long, value_parser = parse_protocol, default_value = "tcp")]
    protocol: u8,
    /// The client is outside the cluster (not a pod): no internal backend set.
    #[arg(long)]
    from_outside: bool,
    /// The pin directory of the running agent.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kpr")]
    bpffs: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_protocol(text: &str) -> Result<u8, String> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(proxy_common::proto::TCP),
        "udp" => Ok(proxy_common::proto::UDP),
        other => Err(format!("unknown protocol {other:?} (tcp or udp)")),
    }
}

fn parse_client(text: &str) -> Result<std::net::SocketAddrV4, String> {
    text.parse()
        .or_else(|_| text.parse().map(|ip| std::net::SocketAddrV4::new(ip, 0)))
        .map_err(|_| format!("{text:?} is neither an IPv4 address nor address:port"))
}

#[derive(Args, Debug)]
struct RunArgs {
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
    /// default route.
    #[arg(long, value_delimiter = ',')]
    node_interfaces: Option<Vec<String>>,

    /// Addresses NodePorts answer on, as kube-proxy's nodePortAddresses: IPv4 CIDRs or
    /// `primary`, comma-separated. Default: every address of the external interfaces.
    #[arg(long, value_delimiter = ',')]
    node_port_addresses: Vec<String>,

    /// The node's primary address: masqueraded (SNAT) traffic leaves with it. Default:
    /// the first address of the external interfaces.
    #[arg(long)]
    node_ip: Option<std::net::Ipv4Addr>,

    /// The cluster's pod CIDR (kube-proxy's clusterCIDR): ClusterIP traffic from
    /// outside it is masqueraded when its backend is on another node. Unset: all such
    /// traffic is.
    #[arg(long)]
    cluster_cidr: Option<String>,

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
    #[arg(long, value_enum, default_value_t = proxy_userspace::socket_lb::Mode::All)]
    socket_lb: proxy_userspace::socket_lb::Mode,

    /// Leave programs attached and maps pinned on exit (for a restart or an upgrade).
    #[arg(long)]
    keep_state: bool,

    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, value_name = "ENTRIES")]
    conntrack_max: Option<u32>,

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

    /// Address of the /healthz and /livez server ("" to disable).
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,

    /// Address of the Prometheus /metrics server ("" to disable).
    #[arg(long, default_value = "0.0.0.0:10249")]
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
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// The pin directory the agent used.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/kpr")]
    bpffs: PathBuf,
    /// Remove kube-proxy's iptables chains and nftables tables instead (and nothing
    /// of kpr's): the last step of a takeover, once kpr serves the node. Connections
    /// kube-proxy set up keep their backend until they end.
    #[arg(long)]
    kube_proxy_rules: bool,
}

/// An address flag where "" means off.
fn optional_address(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(text.parse()?))
}

/// Logs to stderr: colour only on a terminal (a file or a pipe gets plain text), or
/// JSON lines.
fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Run(args) => {
            init_logging(&args.log_level, args.log_format);
            let explicit = |id: &str| {
                matches
                    .subcommand_matches("run")
                    .and_then(|run| run.value_source(id))
                    .is_some_and(|source| {
                        matches!(source, ValueSource::CommandLine | ValueSource::EnvVariable)
                    })
            };
            let config = agent_config(*args, &explicit)?;
            if let Err(missing) = proxy_userspace::kernel::check() {
                anyhow::bail!("this kernel lacks what the datapath needs:\n{missing}");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(agent::run(config, shutdown_signal()))
        }
        Command::Cleanup(args) if args.kube_proxy_rules => {
            init_logging("info", LogFormat::Text);
            proxy_userspace::kube_proxy_rules::cleanup()
                .context("removing kube-proxy's rules")
                .map(drop)
        }
        Command::Cleanup(args) => {
            init_logging("info", LogFormat::Text);
            agent::cleanup(&args.bpffs);
            Ok(())
        }
        Command::Inspect(args) => inspect(&args),
        Command::Trace(args) => trace(&args),
    }
}

/// The agent's configuration: flags given on the command line (or by environment)
/// win over the `--config` file, which wins over the flags' defaults.
fn agent_config(mut args: RunArgs, explicit: &dyn Fn(&str) -> bool) -> anyhow::Result<AgentConfig> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => config::FileConfig::default(),
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
    let seconds =
        |duration: config::DurationText| u32::try_from(duration.0.as_secs()).unwrap_or(u32::MAX);
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
    if let Some(value) = file
        .cluster_cidr
        .clone()
        .filter(|_| !explicit("cluster_cidr"))
    {
        args.cluster_cidr = Some(value);
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
        .map_err(|message| anyhow::anyhow!("nodePortAddresses: {message}"))?;
    // kube-proxy takes a comma-separated list per family; the datapath is IPv4, so the
    // first IPv4 CIDR counts.
    let cluster_cidr = match args.cluster_cidr.as_deref() {
        None | Some("") => None,
        Some(list) => Some(
            list.split(',')
                .map(config::parse_ipv4_cidr)
                .find_map(Result::ok)
                .ok_or_else(|| anyhow::anyhow!("clusterCIDR: no IPv4 CIDR in {list:?}"))?,
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
        node_name: args.node_name,
        pin_dir: args.bpffs,
        pod_interfaces: args.pod_interfaces,
        node_interfaces: args.node_interfaces,
        node_port_filters,
        node_ip: args.node_ip,
        cgroup_path: args.cgroup_path.filter(|path| !path.as_os_str().is_empty()),
        socket_lb: args.socket_lb,
        keep_state: args.keep_state,
        conntrack_max: args.conntrack_max,
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
        },
        healthz_bind_address: optional_address(&args.healthz_bind_address)
            .context("healthz bind address")?,
        metrics_bind_address: optional_address(&args.metrics_bind_address)
            .context("metrics bind address")?,
        // kube-proxy's choice while nodePortAddresses is unset: every address.
        health_check_addresses: vec![std::net::Ipv4Addr::UNSPECIFIED.into()],
    })
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.bpffs)?;
    let now = proxy_userspace::datapath::conntrack::monotonic_now_ns();
    match &args.what {
        InspectWhat::Services => {
            let services = inspect::services(&maps)?;
            if args.json {
                return print_json(&services);
            }
            println!(
                "{:<22} {:<5} {:<8} {:>4} {:<24} BACKENDS",
                "FRONTEND", "PROTO", "SCOPE", "ID", "FLAGS"
            );
            for service in services {
                println!(
                    "{:<22} {:<5} {:<8} {:>4} {:<24} {}",
                    service.frontend,
                    service.protocol,
                    service.scope,
                    service.service_id,
                    service.flags.join(","),
                    if service.backends.is_empty() {
                        "(none)".to_owned()
                    } else {
                        service.backends.join(" ")
                    }
                );
            }
        }
        InspectWhat::Conntrack {
            addr,
            port,
            protocol,
        } => {
            let filter = inspect::FlowFilter {
                addr: *addr,
                port: *port,
                protocol: *protocol,
            };
            let flows = inspect::conntrack(&maps, &filter, now)?;
            if args.json {
                return print_json(&flows);
            }
            println!(
                "{:<5} {:<22} {:<22} {:<8} {:<30} {:>8} {:<11} STATE",
                "PROTO", "SOURCE", "DESTINATION", "DIR", "REWRITE", "IDLE_S", "TABLE"
            );
            for flow in flows {
                println!(
                    "{:<5} {:<22} {:<22} {:<8} {:<30} {:>8.1} {:<11} {}",
                    flow.protocol,
                    flow.source,
                    flow.destination,
                    flow.direction,
                    flow.rewrite,
                    flow.idle_s,
                    flow.table,
                    flow.state
                );
            }
        }
        InspectWhat::Affinity => {
            let records = inspect::affinity(&maps, now)?;
            if args.json {
                return print_json(&records);
            }
            println!(
                "{:<6} {:<26} {:>4} {:<22} {:>8}",
                "PATH", "CLIENT", "ID", "BACKEND", "IDLE_S"
            );
            for record in records {
                println!(
                    "{:<6} {:<26} {:>4} {:<22} {:>8.1}",
                    record.path,
                    record.client,
                    record.service_id,
                    record.backend.unwrap_or_else(|| "(gone)".into()),
                    record.idle_s
                );
            }
        }
        InspectWhat::Sockets => {
            let sockets = inspect::sockets(&maps)?;
            if args.json {
                return print_json(&sockets);
            }
            println!(
                "{:<5} {:<22} {:<5} {:<22} {:<22} {:>4} CONNECTED",
                "NETNS", "NETNS_COOKIE", "PROTO", "FRONTEND", "BACKEND", "ID"
            );
            for socket in sockets {
                println!(
                    "{:<5} {:<22} {:<5} {:<22} {:<22} {:>4} {}",
                    socket.netns,
                    socket.netns_cookie,
                    socket.protocol,
                    socket.frontend,
                    socket.backend,
                    socket.service_id,
                    if socket.connected { "yes" } else { "no" }
                );
            }
        }
        InspectWhat::Counters => {
            let counters = inspect::counters(&maps)?;
            if args.json {
                return print_json(&counters);
            }
            for (name, value) in counters {
                println!("{name:<24} {value}");
            }
        }
    }
    Ok(())
}

fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.bpffs)?;
    let view = inspect::trace(
        &maps,
        args.client,
        args.to,
        args.protocol,
        !args.from_outside,
    )?;
    if args.json {
        return print_json(&view);
    }
    println!("{} -> {} {}", view.client, view.destination, view.protocol);
    for step in &view.steps {
        println!("  {step}");
    }
    match (&view.backend, view.candidates.is_empty()) {
        (Some(backend), _) => println!("verdict: {} to {backend}", view.verdict),
        (None, false) => println!(
            "verdict: {} to one of {}",
            view.verdict,
            view.candidates.join(", ")
        ),
        (None, true) => println!("verdict: {}", view.verdict),
    }
    Ok(())
}
