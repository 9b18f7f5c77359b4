//! One measurement: a fresh lab (node, client pod, backend pods with servers), one
//! mode programmed into its node namespace, traffic from the client pod, an endpoint
//! change, and the figures. A fresh lab per measurement means no mode inherits
//! another's rules, conntrack state or TIME_WAIT sockets.
use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::{
    iptables,
    measure::{self, find_process_with_argument, MachineCpu, Timed},
    nftables,
    services::{backend_name, ServiceSet},
    workload::{self, BenchServer},
    Config, Mode,
};
use crate::{lab::Lab, scenario::CLIENT_IP};

/// How long the agent may take to apply the endpoint change before the run fails.
const CHANGE_DEADLINE: Duration = Duration::from_secs(120);
/// Unmeasured traffic before each connection test.
const WARM_UP: Duration = Duration::from_millis(500);

/// Everything one measurement produced. Times in milliseconds; `None` where a figure
/// does not apply to the mode.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cell {
    pub round: usize,
    pub mode: String,
    pub services: usize,
    pub endpoints: usize,
    /// Completed new connections (connect, request, response, close) per second.
    pub conn_per_s: f64,
    pub connections: u64,
    pub errors: u64,
    /// Per-connection latency (connect + request + response), microseconds.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// One long-lived connection, megabytes (10^6) per second.
    pub stream_mb_per_s: f64,
    /// Programming all services from scratch: ebpf: the agent's first sync pass (model
    /// and map writes, its "synced" elapsed_ms); iptables: `iptables-save -t nat`
    /// (outside large-cluster mode) + `iptables-restore`; nftables: kube-proxy's two
    /// listings + `nft -f`.
    pub program_ms: Option<f64>,
    /// ebpf: agent start to healthy (process start, BPF load, reading the manifests,
    /// sync, attach); others: as `program_ms`.
    pub program_wall_ms: Option<f64>,
    /// CPU time of programming: the agent's own until healthy; the commands' (user +
    /// system, so the kernel's commit work included) for the others.
    pub program_cpu_ms: Option<f64>,
    /// One endpoint added to one service at this scale, same definitions as above
    /// (ebpf: the sync pass that applied it).
    pub change_ms: Option<f64>,
    /// ebpf: manifest written to sync done (includes the source's 100 ms debounce and
    /// re-reading every manifest); others: as `change_ms`.
    pub change_wall_ms: Option<f64>,
    /// Machine-wide busy CPU time during the connection test per connection,
    /// microseconds (clients, servers, kernel and dataplane together).
    pub cpu_us_per_conn: f64,
    /// Machine-wide softirq time per connection, microseconds.
    pub softirq_us_per_conn: f64,
    /// The agent's own CPU time during the connection test (ebpf).
    pub agent_cpu_ms: Option<f64>,
    /// The agent's peak resident memory (VmHWM), MiB (ebpf).
    pub agent_peak_mib: Option<f64>,
    /// SIGTERM to the agent's exit (ebpf), milliseconds: it detaches, unpins and
    /// leaves.
    pub stop_ms: Option<f64>,
    /// ebpf modes, during the connection test: sockets the socket-layer hooks
    /// translated (datapath counter `sock_translated`).
    pub socket_translated: u64,
    /// ebpf modes, during the connection test: new flows the TC programs translated
    /// (`new_flow`).
    pub tc_new_flows: u64,
    /// ebpf modes with `--bpf-stats`: each of the agent's programs that ran during the
    /// connection test.
    pub programs: std::collections::BTreeMap<String, super::bpf_stats::ProgramCost>,
}

/// What a measurement programs, generated once per service count.
pub struct Programs {
    pub set: ServiceSet,
    /// Every frontend, for the clients to pick from.
    pub frontends: Arc<Vec<SocketAddrV4>>,
    pub manifests: Vec<(String, String)>,
    pub changed_manifest: (String, String),
    pub iptables_full: String,
    pub iptables_change: String,
    pub nft_full: String,
    pub nft_change: String,
}

impl Programs {
    /// Generates every mode's input for `set`.
    #[must_use]
    pub fn new(set: ServiceSet, modes: &[Mode]) -> Self {
        let wants_iptables = modes
            .iter()
            .any(|mode| matches!(mode, Mode::Iptables | Mode::IptablesLegacy));
        let wants_nft = modes.contains(&Mode::Nftables);
        let wants_ebpf = modes.iter().any(|mode| mode.is_ebpf());
        let frontends = Arc::new((0..set.len()).map(ServiceSet::frontend).collect());
        Self {
            frontends,
            manifests: if wants_ebpf {
                set.manifest_files(false)
            } else {
                Vec::new()
            },
            changed_manifest: if wants_ebpf {
                set.changed_manifest_file()
            } else {
                (String::new(), String::new())
            },
            iptables_full: if wants_iptables {
                iptables::restore_input(&set, iptables::Sync::Full, false)
            } else {
                String::new()
            },
            iptables_change: if wants_iptables {
                iptables::restore_input(&set, iptables::Sync::ChangedServiceZero, true)
            } else {
                String::new()
            },
            nft_full: if wants_nft {
                nftables::transaction(&set, nftables::Sync::Full, false)
            } else {
                String::new()
            },
            nft_change: if wants_nft {
                nftables::transaction(&set, nftables::Sync::ChangedServiceZero, true)
            } else {
                String::new()
            },
            set,
        }
    }
}

/// The lab of one measurement. Servers are declared first so they stop before the
/// lab removes their namespaces.
struct Bench {
    servers: Vec<BenchServer>,
    lab: Lab,
}

fn build_lab(config: &Config, set: &ServiceSet) -> Result<Bench> {
    let mut lab = Lab::new()?;
    lab.add_pod("client", CLIENT_IP)?;
    {
        let client = &lab.pod("client").netns;
        // Short connections from one address to a few destinations: let TIME_WAIT
        // ports be reused and use the whole port range, as load generators do.
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let mut servers = Vec::new();
    for (index, backend) in set.backends().iter().enumerate() {
        let name = backend_name(index);
        lab.add_pod(&name, *backend.ip())?;
        servers.push(BenchServer::start(
            &lab.pod(&name).netns,
            *backend,
            config.clients + 2,
        )?);
    }
    Ok(Bench { servers, lab })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Measures `mode` at `programs.set`'s scale.
///
/// # Errors
/// When the lab, the programming, the check or the traffic fails.
pub fn measure(
    config: &Config,
    programs: &Programs,
    mode: Mode,
    round: usize,
    socket_cgroup: Option<&Path>,
) -> Result<Cell> {
    let set = &programs.set;
    let mut bench = build_lab(config, set)?;
    let mut cell = Cell {
        round,
        mode: mode.label().to_owned(),
        services: set.len(),
        endpoints: set.backends().len(),
        ..Cell::default()
    };
    let mut agent_pid = None;
    match mode {
        Mode::Ebpf | Mode::EbpfTc => {
            for (file, yaml) in &programs.manifests {
                bench.lab.write_manifest(file, yaml)?;
            }
            let args = agent_args(mode, socket_cgroup)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            bench.lab.start_agent(&args)?;
            cell.program_wall_ms = Some(millis(started.elapsed()));
            bench.lab.wait_attached()?;
            let pid = find_process_with_argument(&bench.lab.pin_dir())
                .context("finding the agent's process")?;
            agent_pid = Some(pid);
            cell.program_cpu_ms = Some(millis(measure::process_cpu(pid)?));
            let passes = measure::synced_passes(&bench.lab.agent_log());
            cell.program_ms = Some(
                *passes
                    .first()
                    .context("the agent logged no \"synced\" line")?,
            );
        }
        Mode::Iptables | Mode::IptablesLegacy => {
            let (restore, save) = iptables_tools(mode);
            let node = &bench.lab.node;
            measure::run_timed(
                node,
                restore,
                &["-w", "5", "--noflush"],
                Some(&iptables::jump_rules()),
                true,
            )?;
            let timed = iptables_sync(
                node,
                restore,
                save,
                &programs.iptables_full,
                iptables::large_cluster(set, false),
            )?;
            cell.program_ms = Some(millis(timed.wall));
            cell.program_wall_ms = cell.program_ms;
            cell.program_cpu_ms = Some(millis(timed.cpu));
        }
        Mode::Nftables => {
            let timed = nft_sync(&bench.lab.node, &programs.nft_full)?;
            cell.program_ms = Some(millis(timed.wall));
            cell.program_wall_ms = cell.program_ms;
            cell.program_cpu_ms = Some(millis(timed.cpu));
        }
        Mode::None => {}
    }

    let targets: Arc<Vec<SocketAddrV4>> = if mode == Mode::None {
        Arc::new(set.backends().to_vec())
    } else {
        Arc::clone(&programs.frontends)
    };
    let client = &bench.lab.pod("client").netns;
    let sample: Vec<SocketAddrV4> = {
        let step = (targets.len() / 8).max(1);
        targets.iter().step_by(step).copied().collect()
    };
    client
        .run(|| workload::check_targets(&sample, 3 * sample.len().max(4)))
        .with_context(|| format!("{} does not carry traffic", mode.label()))
        .map_err(|error| match mode {
            Mode::Ebpf | Mode::EbpfTc => {
                error.context(format!("agent log:\n{}", bench.lab.agent_log()))
            }
            _ => error,
        })?;

    // Warm-up, unmeasured: caches, neighbour entries, the first conntrack entries.
    workload::connect_request_close(
        client,
        &targets,
        config.clients,
        WARM_UP.min(config.duration),
    )?;
    let agent_before = agent_pid.map(measure::process_cpu).transpose()?;
    let counters_before = mode
        .is_ebpf()
        .then(|| datapath_counters(&bench.lab))
        .transpose()?;
    let stats = (config.bpf_stats && mode.is_ebpf())
        .then(|| -> Result<_> {
            let enabled = super::bpf_stats::enable()?;
            Ok((enabled, super::bpf_stats::snapshot(&bench.lab.pin_dir())?))
        })
        .transpose()?;
    let cpu_before = MachineCpu::read()?;
    let crr = workload::connect_request_close(client, &targets, config.clients, config.duration)?;
    let cpu = MachineCpu::read()?.since(cpu_before);
    if let Some((_enabled, before)) = &stats {
        let after = super::bpf_stats::snapshot(&bench.lab.pin_dir())?;
        cell.programs = super::bpf_stats::costs(before, &after, crr.connections);
    }
    drop(stats);
    if let Some(before) = counters_before {
        let after = datapath_counters(&bench.lab)?;
        let delta = |name: &str| {
            after
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(name).copied().unwrap_or(0))
        };
        cell.socket_translated = delta("sock_translated");
        cell.tc_new_flows = delta("new_flow");
    }
    if let (Some(pid), Some(before)) = (agent_pid, agent_before) {
        cell.agent_cpu_ms = Some(millis(measure::process_cpu(pid)?.saturating_sub(before)));
    }
    cell.connections = crr.connections;
    cell.errors = crr.errors;
    cell.conn_per_s = crr.rate();
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds far below 2^52")]
    {
        cell.latency_p50_us = measure::percentile(&crr.latencies_ns, 0.50) as f64 / 1e3;
        cell.latency_p99_us = measure::percentile(&crr.latencies_ns, 0.99) as f64 / 1e3;
    }
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let connections = crr.connections.max(1) as f64;
    cell.cpu_us_per_conn = cpu.busy.as_secs_f64() * 1e6 / connections;
    cell.softirq_us_per_conn = cpu.softirq.as_secs_f64() * 1e6 / connections;

    let stream_target = targets[0];
    let stream_duration = config.stream_duration;
    let bytes_per_s = client.run(|| workload::stream_throughput(stream_target, stream_duration))?;
    cell.stream_mb_per_s = bytes_per_s / 1e6;

    match mode {
        Mode::Ebpf | Mode::EbpfTc => {
            let before = measure::synced_passes(&bench.lab.agent_log()).len();
            let (file, yaml) = &programs.changed_manifest;
            let written = Instant::now();
            bench.lab.write_manifest(file, yaml)?;
            let elapsed = loop {
                let passes = measure::synced_passes(&bench.lab.agent_log());
                if passes.len() > before {
                    break passes[passes.len() - 1];
                }
                if written.elapsed() > CHANGE_DEADLINE {
                    bail!(
                        "the agent did not apply the endpoint change; log:\n{}",
                        bench.lab.agent_log()
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            cell.change_wall_ms = Some(millis(written.elapsed()));
            cell.change_ms = Some(elapsed);
        }
        Mode::Iptables | Mode::IptablesLegacy => {
            let (restore, save) = iptables_tools(mode);
            let timed = iptables_sync(
                &bench.lab.node,
                restore,
                save,
                &programs.iptables_change,
                iptables::large_cluster(set, true),
            )?;
            cell.change_ms = Some(millis(timed.wall));
            cell.change_wall_ms = cell.change_ms;
        }
        Mode::Nftables => {
            let timed = nft_sync(&bench.lab.node, &programs.nft_change)?;
            cell.change_ms = Some(millis(timed.wall));
            cell.change_wall_ms = cell.change_ms;
        }
        Mode::None => {}
    }
    if let Some(pid) = agent_pid {
        #[expect(clippy::cast_precision_loss, reason = "bytes far below 2^52")]
        let peak = measure::peak_memory(pid)? as f64;
        cell.agent_peak_mib = Some(peak / (1024.0 * 1024.0));
    }
    let stopping = Instant::now();
    bench.lab.stop_agent()?;
    if agent_pid.is_some() {
        cell.stop_ms = Some(millis(stopping.elapsed()));
    }
    drop(bench.servers);
    drop(bench.lab);
    Ok(cell)
}

/// The datapath counters of the lab's agent, from its pinned maps.
fn datapath_counters(lab: &Lab) -> Result<std::collections::BTreeMap<&'static str, u64>> {
    let maps = proxy_userspace::inspect::PinnedMaps::open(&lab.pin_dir())?;
    Ok(proxy_userspace::inspect::counters(&maps)?)
}

/// The agent's arguments in an ebpf mode: the hooks on the bench's cgroup (`ebpf`) or
/// off (`ebpf-tc`).
fn agent_args(mode: Mode, socket_cgroup: Option<&Path>) -> Result<Vec<String>> {
    if mode == Mode::EbpfTc {
        return Ok(vec!["--socket-lb".into(), "off".into()]);
    }
    let cgroup = socket_cgroup.context("the ebpf mode needs the bench's cgroup")?;
    Ok(vec![
        "--cgroup-path".into(),
        cgroup.display().to_string(),
        "--socket-lb".into(),
        "all".into(),
    ])
}

/// A cgroup of the bench's own that the bench process has joined, so the sockets of
/// its client threads are the ones the socket-layer hooks see. On drop the process goes
/// back to the cgroup it came from and the cgroup is removed.
pub struct JoinedCgroup {
    path: PathBuf,
    home: PathBuf,
}

impl JoinedCgroup {
    /// Creates `<cgroup2 mount>/<prefix>-bench` and moves this process into it.
    ///
    /// # Errors
    /// When there is no cgroup2 mount or the move fails.
    pub fn join(prefix: &str) -> Result<Self> {
        let mount = crate::host::cgroup2_mount()?;
        // Empty cgroups of crashed runs (a SIGKILLed bench cannot move back).
        crate::host::sweep_stale(&mount);
        let own = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
        // cgroup v2: the one line `0::/path`.
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .context("this process is in no cgroup v2")?;
        let home = mount.join(relative.trim_start_matches('/'));
        let path = mount.join(format!("{prefix}-bench"));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let joined = Self { path, home };
        std::fs::write(joined.path.join("cgroup.procs"), "0")
            .with_context(|| format!("joining {}", joined.path.display()))?;
        Ok(joined)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for JoinedCgroup {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(self.home.join("cgroup.procs"), "0") {
            eprintln!("bench: cannot return to {}: {error}", self.home.display());
        }
        if let Err(error) = std::fs::remove_dir(&self.path) {
            eprintln!("bench: cannot remove {}: {error}", self.path.display());
        }
    }
}

fn iptables_tools(mode: Mode) -> (&'static str, &'static str) {
    if mode == Mode::IptablesLegacy {
        ("iptables-legacy-restore", "iptables-legacy-save")
    } else {
        ("iptables-nft-restore", "iptables-nft-save")
    }
}

/// What kube-proxy's iptables proxier runs per sync: `iptables-save -t nat` to find
/// stale chains (skipped in large-cluster mode), then one restore of its input.
fn iptables_sync(
    node: &crate::netns::Netns,
    restore: &str,
    save: &str,
    input: &str,
    large: bool,
) -> Result<Timed> {
    let mut timed = Timed::default();
    if !large {
        timed = timed + measure::run_timed(node, save, &["-t", "nat"], None, true)?;
    }
    Ok(timed
        + measure::run_timed(
            node,
            restore,
            &["-w", "5", "-W", "100000", "--noflush", "--counters"],
            Some(input),
            true,
        )?)
}

/// What kube-proxy's nftables proxier runs per sync: the listings of chains and sets
/// (for stale ones; they fail harmlessly before the table exists), then the
/// transaction.
fn nft_sync(node: &crate::netns::Netns, transaction: &str) -> Result<Timed> {
    let chains = measure::run_timed(
        node,
        "nft",
        &["--json", "list", "chains", "ip", "kube-proxy"],
        None,
        false,
    )?;
    let sets = measure::run_timed(
        node,
        "nft",
        &["--json", "list", "sets", "ip", "kube-proxy"],
        None,
        false,
    )?;
    let apply = measure::run_timed(node, "nft", &["-f", "-"], Some(transaction), true)?;
    Ok(chains + sets + apply)
}
