//! The benchmark against kube-proxy (`cargo xtask bench`, binary `kpr-bench`): the
//! same lab, the same services and the same traffic through each dataplane:
//!
//! - `ebpf`: our agent in the node namespace, reading the services as manifests, with
//!   the socket-layer hooks on the bench's own cgroup (`--socket-lb all`): the client
//!   pod's connections are translated at `connect()`;
//! - `ebpf-tc`: the same agent with the hooks off (`--socket-lb off`): every packet
//!   through the TC programs, as for traffic the hooks cannot see;
//! - `iptables` / `iptables-legacy`: the rules kube-proxy's iptables proxier writes
//!   for those services ([`iptables`]), loaded into the node namespace with
//!   `iptables-nft-restore` (the Debian default backend) or `iptables-legacy-restore`;
//! - `nftables`: kube-proxy's nftables proxier's transaction ([`nftables`]), `nft -f`;
//! - `none`: clients connect straight to the backend pods, the floor.
//!
//! Pods route everything through the node namespace, so the kube-proxy rules see the
//! pods' traffic in PREROUTING exactly as on a node; ClusterIPs are routed nowhere,
//! so only the mode under test makes them answer. Modes alternate within each round
//! (every mode at one service count, then the next count, then the next round) so
//! that drift of the machine spreads over all of them; each figure is the median
//! over rounds. Every measurement gets a fresh lab ([`runner`]).
pub mod bpf_stats;
pub mod hash;
pub mod iptables;
pub mod measure;
pub mod nftables;
pub mod plot;
pub mod report;
pub mod runner;
pub mod services;
pub mod tc_cost;
pub mod workload;

use std::{path::PathBuf, str::FromStr, time::Duration};

use anyhow::{bail, Context as _, Result};

pub use report::Report;
use runner::Programs;
use services::ServiceSet;

/// A dataplane under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Ebpf,
    EbpfTc,
    Iptables,
    IptablesLegacy,
    Nftables,
    None,
}

impl Mode {
    /// The default set, in the order they alternate.
    pub const DEFAULT: [Self; 5] = [
        Self::Ebpf,
        Self::EbpfTc,
        Self::Iptables,
        Self::Nftables,
        Self::None,
    ];

    /// Whether our agent is the dataplane.
    #[must_use]
    pub fn is_ebpf(self) -> bool {
        matches!(self, Self::Ebpf | Self::EbpfTc)
    }

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::EbpfTc => "ebpf-tc",
            Self::Iptables => "iptables",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
            Self::None => "none",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "ebpf" => Ok(Self::Ebpf),
            "ebpf-tc" => Ok(Self::EbpfTc),
            "iptables" => Ok(Self::Iptables),
            "iptables-legacy" => Ok(Self::IptablesLegacy),
            "nftables" => Ok(Self::Nftables),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown mode {other:?} (ebpf, ebpf-tc, iptables, iptables-legacy, nftables, none)"
            )),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub modes: Vec<Mode>,
    /// Service counts N.
    pub services: Vec<usize>,
    /// Endpoints per service M (one backend pod each).
    pub endpoints: usize,
    /// Every service with `sessionAffinity: ClientIP` (kube-proxy's `recent` rules and
    /// affinity sets; our affinity map).
    pub affinity: bool,
    /// Length of each connection-rate test.
    pub duration: Duration,
    /// Length of each long-lived-connection test.
    pub stream_duration: Duration,
    pub rounds: usize,
    /// Client threads opening connections.
    pub clients: usize,
    /// BPF_PROG_TEST_RUN repeat count (established and miss cases).
    pub tc_repeat: u32,
    /// New flows measured one run each.
    pub tc_new_flows: u16,
    /// Per-program run time of the agent's programs during the connection test
    /// ([`bpf_stats`]; machine-wide kernel statistics while on, so opt-in).
    pub bpf_stats: bool,
    /// Where the CSV, JSON and SVG go.
    pub out: PathBuf,
    /// The command line, recorded in the JSON.
    pub command: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            modes: Mode::DEFAULT.to_vec(),
            services: vec![1, 1000, 10_000],
            endpoints: 3,
            affinity: false,
            duration: Duration::from_secs(5),
            stream_duration: Duration::from_secs(2),
            rounds: 3,
            clients: 2,
            tc_repeat: 100_000,
            tc_new_flows: 2000,
            bpf_stats: false,
            out: PathBuf::from("target/bench"),
            command: String::new(),
        }
    }
}

/// Writes what the kube-proxy modes load at each N, for inspection, into `dir`:
/// `iptables-jumps.restore`, `iptables-<N>.restore` and `iptables-<N>-change.restore`
/// (`iptables-restore --noflush` input), `nftables-<N>.nft` and
/// `nftables-<N>-change.nft` (`nft -f` input). Returns the files written.
///
/// # Errors
/// When a file cannot be written or a service count is invalid.
pub fn dump_rules(config: &Config, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = vec![("iptables-jumps.restore".to_owned(), iptables::jump_rules())];
    for &count in &config.services {
        let set = ServiceSet::new(count, config.endpoints)?.with_affinity(config.affinity);
        files.push((
            format!("iptables-{count}.restore"),
            iptables::restore_input(&set, iptables::Sync::Full, false),
        ));
        files.push((
            format!("iptables-{count}-change.restore"),
            iptables::restore_input(&set, iptables::Sync::ChangedServiceZero, true),
        ));
        files.push((
            format!("nftables-{count}.nft"),
            nftables::transaction(&set, nftables::Sync::Full, false),
        ));
        files.push((
            format!("nftables-{count}-change.nft"),
            nftables::transaction(&set, nftables::Sync::ChangedServiceZero, true),
        ));
    }
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Runs the whole benchmark, printing progress to stderr.
///
/// # Errors
/// When a measurement fails (the lab is removed either way).
pub fn run(config: &Config) -> Result<Report> {
    crate::require_root();
    if config.modes.is_empty() || config.services.is_empty() || config.rounds == 0 {
        bail!("nothing to run: give at least one mode, one service count and one round");
    }
    let sets: Vec<ServiceSet> = config
        .services
        .iter()
        .map(|&count| {
            ServiceSet::new(count, config.endpoints).map(|set| set.with_affinity(config.affinity))
        })
        .collect::<Result<_>>()?;
    let mut report = Report::new(config);

    if config.modes.iter().any(|mode| mode.is_ebpf()) {
        for set in &sets {
            eprintln!("tc program cost at N={} ...", set.len());
            let cost = tc_cost::measure(set, config.tc_repeat, config.tc_new_flows)
                .with_context(|| format!("BPF_PROG_TEST_RUN at N={}", set.len()))?;
            eprintln!(
                "  new flow {:.0} ns (all to one service: {:.0} ns), established {:.0} ns, miss {:.0} ns (one run per call: {:.0} ns)",
                cost.new_flow_ns,
                cost.new_flow_one_service_ns,
                cost.established_ns,
                cost.miss_ns,
                cost.single_run_miss_ns
            );
            report.tc.push(cost);
        }
    }

    let programs: Vec<Programs> = sets
        .into_iter()
        .map(|set| Programs::new(set, &config.modes))
        .collect();
    // The socket-layer hooks see processes by cgroup: the bench's clients are threads
    // of this process, so it joins a cgroup of its own for the run (and leaves it
    // after). No hook is on it except while an `ebpf` agent runs.
    let cgroup = config
        .modes
        .contains(&Mode::Ebpf)
        .then(|| runner::JoinedCgroup::join(&crate::netns::unique_prefix()))
        .transpose()?;
    let socket_cgroup = cgroup.as_ref().map(runner::JoinedCgroup::path);
    for round in 1..=config.rounds {
        for programs in &programs {
            for &mode in &config.modes {
                let cell = runner::measure(config, programs, mode, round, socket_cgroup)
                    .with_context(|| {
                        format!(
                            "{} with {} services (round {round})",
                            mode.label(),
                            programs.set.len()
                        )
                    })?;
                eprintln!(
                    "[round {round}/{}] N={:<6} {:<15} {:>8.0} conn/s  p50 {:>6.0} us  p99 {:>6.0} us  {:>7.0} MB/s  program {} ms  change {} ms",
                    config.rounds,
                    cell.services,
                    cell.mode,
                    cell.conn_per_s,
                    cell.latency_p50_us,
                    cell.latency_p99_us,
                    cell.stream_mb_per_s,
                    report::optional(cell.program_ms, 1),
                    report::optional(cell.change_ms, 2),
                );
                for (program, cost) in &cell.programs {
                    eprintln!(
                        "    {program:<20} {:>5.2} runs/conn {:>7.0} ns/run {:>7.0} ns/conn",
                        cost.runs_per_conn, cost.ns_per_run, cost.ns_per_conn
                    );
                }
                report.cells.push(cell);
            }
        }
    }
    report.summarize();
    Ok(report)
}
