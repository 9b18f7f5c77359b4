//! The benchmark against kube-proxy (`cargo xtask bench`, binary `kpr-bench`): the
//! same lab, the same services and the same traffic through each dataplane:
//!
//! - `ebpf`: our agent in the node namespace, reading the services as manifests, with
//!   the socket-layer hooks on the bench's own cgroup (`--socket-lb all`): the client
//!   pod's connections are translated at `connect()`;
//! - `ebpf-tc`: the same agent with the hooks off (`--socket-lb off`): every packet
//!   through the TC programs, as for traffic the hooks cannot see;
//! - `ebpf-api`: the `ebpf` agent following a Kubernetes API server instead of
//!   manifests, as in a cluster: the test API server in the node namespace holds the
//!   services ([`api_source`]), the agent lists and watches them with its kube-rs
//!   client, and the endpoint change is an EndpointSlice update there;
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
//! over rounds. Every measurement gets a fresh lab ([`runner`]), and each mode's input
//! (manifests, API objects, rules) is generated for its measurement and dropped after
//! it, so 100 000 services of every mode are never held at once.
//!
//! A mode that does not program the services within `--program-limit` (or apply the
//! endpoint change within it) gets a cell that says so instead of figures, and the run
//! goes on; that mode is not tried at larger N in the same round (it would only take
//! longer), and its cell there says so too.
pub mod api_source;
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

use std::{collections::BTreeMap, path::PathBuf, str::FromStr, time::Duration};

use anyhow::{bail, Context as _, Result};

pub use report::Report;
use services::ServiceSet;

/// A dataplane under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Ebpf,
    EbpfTc,
    EbpfApi,
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

    /// Every mode, in the order they alternate.
    pub const ALL: [Self; 7] = [
        Self::Ebpf,
        Self::EbpfTc,
        Self::EbpfApi,
        Self::Iptables,
        Self::IptablesLegacy,
        Self::Nftables,
        Self::None,
    ];

    /// Whether our agent is the dataplane.
    #[must_use]
    pub fn is_ebpf(self) -> bool {
        matches!(self, Self::Ebpf | Self::EbpfTc | Self::EbpfApi)
    }

    /// Whether the agent's socket-layer hooks translate the clients' connections (on
    /// the bench's own cgroup).
    #[must_use]
    pub fn uses_socket_hooks(self) -> bool {
        matches!(self, Self::Ebpf | Self::EbpfApi)
    }

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::EbpfTc => "ebpf-tc",
            Self::EbpfApi => "ebpf-api",
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
        Self::ALL
            .into_iter()
            .find(|mode| mode.label() == text)
            .ok_or_else(|| {
                let labels: Vec<&str> = Self::ALL.iter().map(|mode| mode.label()).collect();
                format!("unknown mode {text:?} ({})", labels.join(", "))
            })
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
    /// How long a mode may take to program all services (and, separately, to apply
    /// the endpoint change) before its cell says "not programmed in ...".
    pub program_limit: Duration,
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
            program_limit: Duration::from_secs(180),
            out: PathBuf::from("target/bench"),
            command: String::new(),
        }
    }
}

/// Writes what the kube-proxy modes load at each N, for inspection, into `dir`:
/// `iptables-jumps.restore`, `iptables-<N>.restore` and `iptables-<N>-change.restore`
/// (`iptables-restore --noflush` input), `nftables-<N>.nft` and
/// `nftables-<N>-change.nft` (`nft -f` input). Each file is generated, written and
/// dropped before the next. Returns the files written.
///
/// # Errors
/// When a file cannot be written or a service count is invalid.
pub fn dump_rules(config: &Config, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: String, text: String| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    write("iptables-jumps.restore".to_owned(), iptables::jump_rules())?;
    for &count in &config.services {
        let set = ServiceSet::new(count, config.endpoints)?.with_affinity(config.affinity);
        write(
            format!("iptables-{count}.restore"),
            iptables::restore_input(&set, iptables::Sync::Full, false),
        )?;
        write(
            format!("iptables-{count}-change.restore"),
            iptables::restore_input(&set, iptables::Sync::ChangedServiceZero, true),
        )?;
        write(
            format!("nftables-{count}.nft"),
            nftables::transaction(&set, nftables::Sync::Full, false),
        )?;
        write(
            format!("nftables-{count}-change.nft"),
            nftables::transaction(&set, nftables::Sync::ChangedServiceZero, true),
        )?;
    }
    Ok(written)
}

/// Runs the whole benchmark, printing progress to stderr.
///
/// # Errors
/// When a measurement fails (the lab is removed either way). A mode over
/// [`Config::program_limit`] is no failure: its cell says so.
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
                "  new flow {:.0} ns (all to one service: {:.0} ns), established {:.0} ns (one run per call: {:.0} ns), miss {:.0} ns (one run per call: {:.0} ns)",
                cost.new_flow_ns,
                cost.new_flow_one_service_ns,
                cost.established_ns,
                cost.single_run_established_ns,
                cost.miss_ns,
                cost.single_run_miss_ns
            );
            report.tc.push(cost);
            // The IPv6 service map holds 262 144 entries: 50 000 services of 10
            // endpoints (550 000) do not fit. The rest of the bench still runs.
            let cost = match tc_cost::measure_v6(set, config.tc_repeat, config.tc_new_flows) {
                Ok(cost) => cost,
                Err(error) => {
                    eprintln!("  IPv6: not measured at N={}: {error:#}", set.len());
                    continue;
                }
            };
            eprintln!(
                "  IPv6: new flow {:.0} ns (all to one service: {:.0} ns), established {:.0} ns (one run per call: {:.0} ns), miss {:.0} ns (one run per call: {:.0} ns)",
                cost.new_flow_ns,
                cost.new_flow_one_service_ns,
                cost.established_ns,
                cost.single_run_established_ns,
                cost.miss_ns,
                cost.single_run_miss_ns
            );
            report.tc.push(cost);
        }
    }

    // The socket-layer hooks see processes by cgroup: the bench's clients are threads
    // of this process, so it joins a cgroup of its own for the run (and leaves it
    // after). No hook is on it except while an `ebpf` or `ebpf-api` agent runs.
    let cgroup = config
        .modes
        .iter()
        .any(|mode| mode.uses_socket_hooks())
        .then(|| runner::JoinedCgroup::join(&crate::netns::unique_prefix()))
        .transpose()?;
    let socket_cgroup = cgroup.as_ref().map(runner::JoinedCgroup::path);
    for round in 1..=config.rounds {
        // Modes over the limit in this round, and the N where they were.
        let mut over_limit: BTreeMap<Mode, usize> = BTreeMap::new();
        for set in &sets {
            for &mode in &config.modes {
                let cell = if let Some(&at) = over_limit.get(&mode) {
                    runner::Cell::not_tried(config, set, mode, round, at)
                } else {
                    runner::measure(config, set, mode, round, socket_cgroup).with_context(|| {
                        format!(
                            "{} with {} services (round {round})",
                            mode.label(),
                            set.len()
                        )
                    })?
                };
                if cell.over_limit() {
                    over_limit.entry(mode).or_insert(set.len());
                }
                eprintln!("[round {round}/{}] {}", config.rounds, cell.progress_line());
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
