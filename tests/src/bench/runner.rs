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

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    api_source::{BenchApiServer, MIN_SYNC_PERIOD_MS},
    iptables,
    measure::{self, find_process_with_argument, MachineCpu, OverLimit, Timed},
    nftables,
    services::{backend_name, ServiceSet},
    workload::{self, BenchServer},
    Config, Mode,
};
use crate::{lab::Lab, scenario::CLIENT_IP};

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
    /// ebpf modes: the agent's log lines of its sync passes ("synced": each pass's
    /// model, syncer, map-write and names times) and its last lines (the exit), as
    /// it wrote them.
    pub agent_log: Vec<String>,
    /// Set when the mode did not program all services within the program limit (its
    /// seconds): nothing else was measured, every other figure is absent.
    pub not_programmed_in_s: Option<f64>,
    /// Set when the mode was not tried at this N because it was not programmed within
    /// the limit at this smaller N in the same round (`not_programmed_in_s` is set too).
    pub not_tried_after: Option<usize>,
    /// Set when the endpoint change was not applied within the limit (its seconds):
    /// `change_ms` is absent, the traffic figures are there.
    pub change_not_applied_in_s: Option<f64>,
}

impl Cell {
    fn new(set: &ServiceSet, mode: Mode, round: usize) -> Self {
        Self {
            round,
            mode: mode.label().to_owned(),
            services: set.len(),
            endpoints: set.backends().len(),
            ..Self::default()
        }
    }

    /// The cell of a mode not tried at `set`'s N because it was over the limit at
    /// `over_at` services in this round.
    #[must_use]
    pub fn not_tried(
        config: &Config,
        set: &ServiceSet,
        mode: Mode,
        round: usize,
        over_at: usize,
    ) -> Self {
        Self {
            not_programmed_in_s: Some(config.program_limit.as_secs_f64()),
            not_tried_after: Some(over_at),
            ..Self::new(set, mode, round)
        }
    }

    /// Whether the mode did not program the services within the limit.
    #[must_use]
    pub fn over_limit(&self) -> bool {
        self.not_programmed_in_s.is_some()
    }

    /// "not programmed in 180 s" (with why it was not tried), or None when it was.
    #[must_use]
    pub fn limit_note(&self) -> Option<String> {
        let limit = self.not_programmed_in_s?;
        Some(match self.not_tried_after {
            Some(at) => format!("not programmed in {limit} s (not tried: over it at N={at})"),
            None => format!("not programmed in {limit} s"),
        })
    }

    /// One line of progress for stderr.
    #[must_use]
    pub fn progress_line(&self) -> String {
        if let Some(note) = self.limit_note() {
            return format!("N={:<6} {:<15} {note}", self.services, self.mode);
        }
        let change = match self.change_not_applied_in_s {
            Some(limit) => format!("not applied in {limit} s"),
            None => format!("{} ms", super::report::optional(self.change_ms, 2)),
        };
        format!(
            "N={:<6} {:<15} {:>8.0} conn/s  p50 {:>6.0} us  p99 {:>6.0} us  {:>7.0} MB/s  program {} ms  change {change}  errors {}",
            self.services,
            self.mode,
            self.conn_per_s,
            self.latency_p50_us,
            self.latency_p99_us,
            self.stream_mb_per_s,
            super::report::optional(self.program_ms, 1),
            self.errors,
        )
    }
}

/// The lab of one measurement. Servers are declared first so they stop before the
/// lab removes their namespaces; the API server last, after the lab stopped the agent.
struct Bench {
    servers: Vec<BenchServer>,
    lab: Lab,
    api: Option<BenchApiServer>,
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
    Ok(Bench {
        servers,
        lab,
        api: None,
    })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Measures `mode` at `set`'s scale. A mode over [`Config::program_limit`] gets a
/// cell that says so (see [`Cell::limit_note`]).
///
/// # Errors
/// When the lab, the programming, the check or the traffic fails.
pub fn measure(
    config: &Config,
    set: &ServiceSet,
    mode: Mode,
    round: usize,
    socket_cgroup: Option<&Path>,
) -> Result<Cell> {
    let mut bench = build_lab(config, set)?;
    let mut cell = Cell::new(set, mode, round);
    let limit = config.program_limit;
    let agent_pid = match program(&mut bench, set, mode, socket_cgroup, limit, &mut cell) {
        Err(error) if error.downcast_ref::<OverLimit>().is_some() => {
            cell.not_programmed_in_s = Some(limit.as_secs_f64());
            return Ok(cell);
        }
        other => other?,
    };

    let frontends: Vec<SocketAddrV4> = (0..set.len()).map(ServiceSet::frontend).collect();
    let targets: Arc<Vec<SocketAddrV4>> = Arc::new(if mode == Mode::None {
        set.backends().to_vec()
    } else {
        frontends
    });
    let client = &bench.lab.pod("client").netns;
    let sample: Vec<SocketAddrV4> = {
        let step = (targets.len() / 8).max(1);
        targets.iter().step_by(step).copied().collect()
    };
    client
        .run(|| workload::check_targets(&sample, 3 * sample.len().max(4)))
        .with_context(|| format!("{} does not carry traffic", mode.label()))
        .map_err(|error| {
            if mode.is_ebpf() {
                error.context(format!("agent log:\n{}", bench.lab.agent_log()))
            } else {
                error
            }
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

    match change(&bench, set, mode, limit, &mut cell) {
        Err(error) if error.downcast_ref::<OverLimit>().is_some() => {
            cell.change_not_applied_in_s = Some(limit.as_secs_f64());
        }
        other => other?,
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
        cell.agent_log = passes_and_exit(&bench.lab.agent_log());
    }
    // Servers first, then the lab and its namespaces, then the API server.
    let Bench { servers, lab, api } = bench;
    drop(servers);
    drop(lab);
    drop(api);
    Ok(cell)
}

/// Programs `set` into the lab with `mode`, within `limit` (else [`OverLimit`]), and
/// records the programming figures in `cell`. Each mode's input is generated here and
/// dropped when programmed. Returns the agent's pid in the ebpf modes.
fn program(
    bench: &mut Bench,
    set: &ServiceSet,
    mode: Mode,
    socket_cgroup: Option<&Path>,
    limit: Duration,
    cell: &mut Cell,
) -> Result<Option<u32>> {
    match mode {
        Mode::Ebpf | Mode::EbpfTc | Mode::EbpfApi => {
            if mode == Mode::EbpfApi {
                let api = BenchApiServer::start(&bench.lab, set)?;
                bench
                    .lab
                    .use_api_source(api.kubeconfig(), MIN_SYNC_PERIOD_MS);
                bench.api = Some(api);
            } else {
                for (file, yaml) in set.manifest_files(false) {
                    bench.lab.write_manifest(&file, &yaml)?;
                }
            }
            let args = agent_args(mode, socket_cgroup)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started = Instant::now();
            bench.lab.spawn_agent(&args)?;
            if let Err(error) = bench.lab.wait_healthy(limit) {
                if started.elapsed() >= limit {
                    return Err(OverLimit {
                        what: "the agent's start to healthy".into(),
                        limit,
                    }
                    .into());
                }
                return Err(error);
            }
            cell.program_wall_ms = Some(millis(started.elapsed()));
            bench.lab.wait_attached()?;
            let pid = find_process_with_argument(&bench.lab.pin_dir())
                .context("finding the agent's process")?;
            cell.program_cpu_ms = Some(millis(measure::process_cpu(pid)?));
            let passes = measure::synced_passes(&bench.lab.agent_log());
            cell.program_ms = Some(
                *passes
                    .first()
                    .context("the agent logged no \"synced\" line")?,
            );
            Ok(Some(pid))
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
            let input = iptables::restore_input(set, iptables::Sync::Full, false);
            let timed = iptables_sync(
                node,
                restore,
                save,
                &input,
                iptables::large_cluster(set, false),
                limit,
            )?;
            cell.program_ms = Some(millis(timed.wall));
            cell.program_wall_ms = cell.program_ms;
            cell.program_cpu_ms = Some(millis(timed.cpu));
            Ok(None)
        }
        Mode::Nftables => {
            let transaction = nftables::transaction(set, nftables::Sync::Full, false);
            let timed = nft_sync(&bench.lab.node, &transaction, limit)?;
            cell.program_ms = Some(millis(timed.wall));
            cell.program_wall_ms = cell.program_ms;
            cell.program_cpu_ms = Some(millis(timed.cpu));
            Ok(None)
        }
        Mode::None => Ok(None),
    }
}

/// Makes the one endpoint change (service 0 gains [`super::services::EXTRA_ENDPOINT`])
/// the way `mode` gets it, within `limit` (else [`OverLimit`]), and records its times
/// in `cell`.
fn change(
    bench: &Bench,
    set: &ServiceSet,
    mode: Mode,
    limit: Duration,
    cell: &mut Cell,
) -> Result<()> {
    match mode {
        Mode::Ebpf | Mode::EbpfTc | Mode::EbpfApi => {
            let before = measure::synced_passes(&bench.lab.agent_log()).len();
            // Generated before the clock starts: the manifest modes' file, or the
            // server for the API mode.
            let manifest = (mode != Mode::EbpfApi).then(|| set.changed_manifest_file());
            let written = Instant::now();
            match (&manifest, &bench.api) {
                (Some((file, yaml)), _) => bench.lab.write_manifest(file, yaml)?,
                (None, Some(api)) => api.change_endpoints(set)?,
                (None, None) => anyhow::bail!("the ebpf-api mode has no API server"),
            }
            let elapsed = loop {
                let passes = measure::synced_passes(&bench.lab.agent_log());
                if passes.len() > before {
                    break passes[passes.len() - 1];
                }
                if written.elapsed() > limit {
                    return Err(OverLimit {
                        what: "the agent's pass applying the endpoint change".into(),
                        limit,
                    }
                    .into());
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            cell.change_wall_ms = Some(millis(written.elapsed()));
            cell.change_ms = Some(elapsed);
        }
        Mode::Iptables | Mode::IptablesLegacy => {
            let (restore, save) = iptables_tools(mode);
            let input = iptables::restore_input(set, iptables::Sync::ChangedServiceZero, true);
            let timed = iptables_sync(
                &bench.lab.node,
                restore,
                save,
                &input,
                iptables::large_cluster(set, true),
                limit,
            )?;
            cell.change_ms = Some(millis(timed.wall));
            cell.change_wall_ms = cell.change_ms;
        }
        Mode::Nftables => {
            let transaction = nftables::transaction(set, nftables::Sync::ChangedServiceZero, true);
            let timed = nft_sync(&bench.lab.node, &transaction, limit)?;
            cell.change_ms = Some(millis(timed.wall));
            cell.change_wall_ms = cell.change_ms;
        }
        Mode::None => {}
    }
    Ok(())
}

/// The datapath counters of the lab's agent, from its pinned maps.
fn datapath_counters(lab: &Lab) -> Result<std::collections::BTreeMap<&'static str, u64>> {
    let maps = proxy_userspace::inspect::PinnedMaps::open(&lab.pin_dir())?;
    Ok(proxy_userspace::inspect::counters(&maps)?)
}

/// The agent's arguments in an ebpf mode: the hooks on the bench's cgroup (`ebpf`,
/// `ebpf-api`) or off (`ebpf-tc`).
fn agent_args(mode: Mode, socket_cgroup: Option<&Path>) -> Result<Vec<String>> {
    if !mode.uses_socket_hooks() {
        return Ok(vec!["--socket-lb".into(), "off".into()]);
    }
    let cgroup = socket_cgroup.context("the socket-hook modes need the bench's cgroup")?;
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
    /// Dropped after [`Drop::drop`] has moved the process back.
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Cgroup membership belongs to the whole process: two measurements in one process
/// (the smoke tests, run in parallel) joining at once would move each other's client
/// threads out of their cgroup, away from their socket hooks, and the later one would
/// return "home" to a cgroup the earlier one removed. One joined cgroup at a time.
static ONE_JOINED_CGROUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl JoinedCgroup {
    /// Creates `<cgroup2 mount>/<prefix>-bench` and moves this process into it.
    ///
    /// # Errors
    /// When there is no cgroup2 mount or the move fails.
    pub fn join(prefix: &str) -> Result<Self> {
        let one_at_a_time = ONE_JOINED_CGROUP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let joined = Self {
            path,
            home,
            _one_at_a_time: one_at_a_time,
        };
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
/// stale chains (skipped in large-cluster mode), then one restore of its input; all of
/// it within `limit` (else [`OverLimit`]).
fn iptables_sync(
    node: &crate::netns::Netns,
    restore: &str,
    save: &str,
    input: &str,
    large: bool,
    limit: Duration,
) -> Result<Timed> {
    let deadline = Instant::now() + limit;
    let mut timed = Timed::default();
    if !large {
        timed = timed
            + measure::run_timed_within(node, save, &["-t", "nat"], None, true, deadline, limit)?;
    }
    Ok(timed
        + measure::run_timed_within(
            node,
            restore,
            &["-w", "5", "-W", "100000", "--noflush", "--counters"],
            Some(input),
            true,
            deadline,
            limit,
        )?)
}

/// What kube-proxy's nftables proxier runs per sync: the listings of chains and sets
/// (for stale ones; they fail harmlessly before the table exists), then the
/// transaction; all of it within `limit` (else [`OverLimit`]).
fn nft_sync(node: &crate::netns::Netns, transaction: &str, limit: Duration) -> Result<Timed> {
    let deadline = Instant::now() + limit;
    let list = |what: &str| {
        measure::run_timed_within(
            node,
            "nft",
            &["--json", "list", what, "ip", "kube-proxy"],
            None,
            false,
            deadline,
            limit,
        )
    };
    let chains = list("chains")?;
    let sets = list("sets")?;
    let apply = measure::run_timed_within(
        node,
        "nft",
        &["-f", "-"],
        Some(transaction),
        true,
        deadline,
        limit,
    )?;
    Ok(chains + sets + apply)
}

/// The "synced" lines of an agent's log and its last ones (how it stopped).
fn passes_and_exit(log: &str) -> Vec<String> {
    const LAST: usize = 8;
    let lines: Vec<&str> = log.lines().collect();
    let tail_from = lines.len().saturating_sub(LAST);
    lines
        .iter()
        .enumerate()
        .filter(|(index, line)| *index >= tail_from || line.contains(" synced"))
        .map(|(_, line)| (*line).to_owned())
        .collect()
}
