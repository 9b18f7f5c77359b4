//! `kpr`: the node agent of the eBPF kube-proxy replacement, and its tools.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{
    parser::ValueSource, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand,
};
use proxy_userspace::{
    agent,
    config::{LogFormat, RunArgs},
    inspect::{self, PinnedMaps},
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
    /// Run a packet through the node's real datapath (BPF_PROG_TEST_RUN on its live
    /// maps, writing none of them) and print each stage's decision and the packet that
    /// would leave.
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
    /// Services: every frontend (ClusterIP, NodePort, externalIP, LoadBalancer) of
    /// both families with its policies and backends (pods and their readiness).
    Services {
        /// Only this service: namespace/name (a bare name means namespace default).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service: Option<String>,
    },
    /// Conntrack entries of both families (two per translated flow).
    Conntrack {
        /// Only flows with this address (IPv4 or IPv6) at either end, before or after
        /// translation.
        #[arg(long)]
        addr: Option<std::net::IpAddr>,
        /// Only flows with this port at either end.
        #[arg(long)]
        port: Option<u16>,
        /// Only this protocol (tcp, udp or sctp).
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
    /// The client: an address, or address:port (`10.244.1.2:40000`,
    /// `[fd00:244::2]:40000`; port 40000 when left out; the port of an open connection
    /// shows that flow's translation).
    #[arg(long, value_parser = parse_client)]
    client: std::net::SocketAddr,
    /// The destination address:port (`10.96.0.10:80`, `[fd00::10]:80`), of the
    /// client's family.
    #[arg(long)]
    to: std::net::SocketAddr,
    /// tcp, udp or sctp.
    #[arg(long, value_parser = parse_protocol, default_value = "tcp")]
    protocol: u8,
    /// The packet arrives from outside the node (the node-facing program) instead of
    /// from a pod on it (the pod-facing one).
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
        "sctp" => Ok(proxy_common::proto::SCTP),
        other => Err(format!("unknown protocol {other:?} (tcp, udp or sctp)")),
    }
}

fn parse_client(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .or_else(|_| text.parse().map(|ip| std::net::SocketAddr::new(ip, 40_000)))
        .map_err(|_| {
            format!("{text:?} is neither an address nor address:port ([address]:port for IPv6)")
        })
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

/// glibc's allocator as a long-running agent with a few threads wants it: one arena
/// and a fixed mmap threshold.
///
/// By default every thread that allocates gets an arena of its own (up to eight per
/// core), and memory freed in one arena serves no other: the manifests parsed on a
/// blocking thread, the model built on a runtime worker and the upkeep thread each
/// left their freed blocks where only they could reuse them (tens of MiB of the
/// agent's peak at 50 000 services). And the mmap threshold rises to 32 MiB after the
/// first large free, so the hash tables and vectors of a first pass (a few MiB each,
/// freed when they grow) stay in the heap as holes instead of going back to the
/// kernel. The agent's threads mostly take turns, so one arena's lock costs little.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Allocations from this size up get their own mapping, returned when freed.
        const MMAP_THRESHOLD: libc::c_int = 256 * 1024;
        // SAFETY: mallopt only sets allocator parameters; it is called before the
        // runtime starts its threads.
        let set = unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        };
        if !set {
            tracing::warn!("glibc refused the allocator settings; memory use may be higher");
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does at start
/// for kube-proxy: the soft default (often 1024) is a relic of `select()`, which the
/// agent never uses, and running out means maps, links and manifests it cannot open.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open files limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } == 0 {
        tracing::info!(
            from = soft,
            to = limit.rlim_max,
            "raised the open files limit"
        );
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open files limit");
    }
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Run(args) => {
            init_logging(args.log_level(), args.log_format());
            let explicit = |id: &str| {
                matches
                    .subcommand_matches("run")
                    .and_then(|run| run.value_source(id))
                    .is_some_and(|source| {
                        matches!(source, ValueSource::CommandLine | ValueSource::EnvVariable)
                    })
            };
            let config = (*args).agent_config(&explicit)?;
            tune_allocator();
            raise_open_files_limit();
            if let Err(missing) = proxy_userspace::kernel::check() {
                anyhow::bail!("this kernel lacks what the datapath needs:\n{missing}");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let outcome = runtime.block_on(agent::run(config, shutdown_signal()));
            // The agent has left the node as asked (detached and unpinned, or kept).
            // Dropping the runtime would wait for whatever its threads still hold: a
            // read-back of the maps in progress, the source's store being freed (a
            // second at 100 000 services). A pod's termination waits on this exit.
            runtime.shutdown_background();
            outcome
        }
        Command::Cleanup(args) if args.kube_proxy_rules => {
            init_logging("info", LogFormat::Text);
            proxy_userspace::kube_proxy_rules::cleanup()
                .context("removing kube-proxy's rules")
                .map(drop)
        }
        Command::Cleanup(args) => {
            init_logging("info", LogFormat::Text);
            agent::cleanup(&args.bpffs)?;
            Ok(())
        }
        Command::Inspect(args) => inspect(&args),
        Command::Trace(args) => trace(&args),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.bpffs)?;
    let now = proxy_userspace::datapath::conntrack::monotonic_now_ns();
    match &args.what {
        InspectWhat::Services { service } => {
            let index = inspect::NameIndex::read(&args.bpffs)?;
            let filter = inspect::ServiceFilter {
                service: service.clone(),
            };
            let services = inspect::services(&maps, &index, &filter)?;
            if args.json {
                return print_json(&services);
            }
            print_services(&services);
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
            // IPv6 ends are wider than the IPv4 columns: as wide as the widest.
            let end = flows
                .iter()
                .map(|flow| flow.source.len().max(flow.destination.len()))
                .fold(22, usize::max);
            let rewrite = flows
                .iter()
                .map(|flow| flow.rewrite.len())
                .fold(30, usize::max);
            println!(
                "{:<5} {:<end$} {:<end$} {:<8} {:<rewrite$} {:>8} {:<11} STATE",
                "PROTO", "SOURCE", "DESTINATION", "DIR", "REWRITE", "IDLE_S", "TABLE"
            );
            for flow in flows {
                println!(
                    "{:<5} {:<end$} {:<end$} {:<8} {:<rewrite$} {:>8.1} {:<11} {}",
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
            let client = records
                .iter()
                .map(|record| record.client.len())
                .fold(26, usize::max);
            let backend = records
                .iter()
                .map(|record| record.backend.as_ref().map_or(0, String::len))
                .fold(22, usize::max);
            println!(
                "{:<6} {:<client$} {:>4} {:<backend$} {:>8}",
                "PATH", "CLIENT", "ID", "BACKEND", "IDLE_S"
            );
            for record in records {
                println!(
                    "{:<6} {:<client$} {:>4} {:<backend$} {:>8.1}",
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
            let end = sockets
                .iter()
                .map(|socket| socket.frontend.len().max(socket.backend.len()))
                .fold(22, usize::max);
            println!(
                "{:<5} {:<22} {:<5} {:<end$} {:<end$} {:>4} CONNECTED",
                "NETNS", "NETNS_COOKIE", "PROTO", "FRONTEND", "BACKEND", "ID"
            );
            for socket in sockets {
                println!(
                    "{:<5} {:<22} {:<5} {:<end$} {:<end$} {:>4} {}",
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

/// The services table: one line per frontend, backends (pod, readiness) after it.
fn print_services(services: &[inspect::ServiceView]) {
    // An IPv6 frontend is wider than the IPv4 column: as wide as the widest.
    let frontend = services
        .iter()
        .map(|service| service.frontend.len())
        .fold(21, usize::max);
    println!(
        "{:<28} {:<12} {:<frontend$} {:<5} {:<10} {:<40} BACKENDS",
        "SERVICE", "TYPE", "FRONTEND", "PROTO", "CLIENTS", "POLICY"
    );
    for service in services {
        let backends = if service.backends.is_empty() {
            format!("(none: {})", service.when_empty)
        } else {
            service
                .backends
                .iter()
                .map(inspect::BackendView::describe)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let policy = if service.policy.is_empty() {
            "-".to_owned()
        } else {
            service.policy.join("; ")
        };
        println!(
            "{:<28} {:<12} {:<frontend$} {:<5} {:<10} {:<40} {backends}",
            service.service,
            service.kind,
            service.frontend,
            service.protocol,
            service.clients,
            policy
        );
    }
}

fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    use proxy_userspace::datapath::{trace, Hook};
    let maps = PinnedMaps::open(&args.bpffs)?;
    let index = inspect::NameIndex::read(&args.bpffs)?;
    let mut tracer = trace::Tracer::load(&args.bpffs).context("loading the trace instance")?;
    let Some(frame) = trace::first_packet(args.client, args.to, args.protocol) else {
        anyhow::bail!(
            "--client {} and --to {} are of different families: a packet has one",
            args.client,
            args.to
        );
    };
    let hook = if args.from_outside {
        Hook::NodeIngress
    } else {
        Hook::PodIngress
    };
    let run = tracer.run(hook, &frame).context("running the packet")?;
    let view = inspect::trace_view(
        &maps,
        &index,
        (args.client, args.to, args.protocol),
        args.from_outside,
        &run,
    );
    if args.json {
        return print_json(&view);
    }
    println!(
        "{} -> {} {} ({})",
        view.client, view.destination, view.protocol, view.program
    );
    for stage in &view.stages {
        println!("  {stage}");
    }
    println!("verdict: {}", view.verdict);
    println!("packet out: {}", view.packet_out);
    Ok(())
}
