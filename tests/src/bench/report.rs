//! The benchmark's results: every measurement, the medians per (N, mode), the
//! machine they ran on; written as a terminal table, CSV, JSON and an SVG plot.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr as _,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{measure::median, runner::Cell, tc_cost::TcCost, Config, Mode};

/// The machine a run used.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub iptables: String,
    pub nft: String,
}

impl Machine {
    /// Reads `/proc`, `/etc/os-release` and the tools' versions.
    #[must_use]
    pub fn detect() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map_or_else(String::new, |(_, name)| name.trim().to_owned());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME="))
            .map_or_else(String::new, |name| name.trim_matches('"').to_owned());
        let version = |program: &str| {
            Command::new(program)
                .arg("--version")
                .output()
                .ok()
                .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: (memory_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            iptables: version("iptables"),
            nft: version("nft"),
        }
    }
}

/// The run's settings, as recorded.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub modes: Vec<String>,
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub affinity: bool,
    pub duration_s: f64,
    pub stream_duration_s: f64,
    pub rounds: usize,
    pub clients: usize,
    pub tc_repeat: u32,
    pub tc_new_flows: u16,
    pub program_limit_s: f64,
}

/// Medians over the rounds that programmed the services, for one (N, mode).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub services: usize,
    pub mode: String,
    pub rounds: usize,
    /// Rounds whose cell was not programmed within the limit (no figures).
    pub rounds_not_programmed: usize,
    /// "not programmed in 180 s" when every round was; with "in k of n rounds" when
    /// some were.
    pub limit_note: Option<String>,
    /// Rounds whose endpoint change was not applied within the limit.
    pub changes_not_applied: usize,
    pub conn_per_s: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub stream_mb_per_s: f64,
    pub program_ms: Option<f64>,
    pub program_wall_ms: Option<f64>,
    pub program_cpu_ms: Option<f64>,
    pub change_ms: Option<f64>,
    pub change_wall_ms: Option<f64>,
    pub cpu_us_per_conn: f64,
    pub softirq_us_per_conn: f64,
    pub agent_cpu_ms: Option<f64>,
    pub agent_peak_mib: Option<f64>,
    /// SIGTERM to exit (ebpf).
    pub stop_ms: Option<f64>,
    /// Completed connections over all rounds.
    pub connections: u64,
    /// Failed connections over all rounds (refused, timed out, short answer).
    pub errors: u64,
    pub tc_new_flow_ns: Option<f64>,
    pub tc_established_ns: Option<f64>,
    pub tc_single_run_established_ns: Option<f64>,
    pub tc_miss_ns: Option<f64>,
    pub tc_single_run_miss_ns: Option<f64>,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub started_utc: String,
    pub command: String,
    pub machine: Machine,
    pub settings: Settings,
    pub cells: Vec<Cell>,
    pub tc: Vec<TcCost>,
    pub summary: Vec<Summary>,
    pub ratios: Vec<Ratios>,
}

/// How an ebpf mode compares at one N: conn/s as ebpf over the other mode (above 1:
/// ebpf completes more), p99 latency and CPU per connection as ebpf over `none`
/// (above 1: ebpf costs more than no proxy). None where the other mode was not run
/// or not programmed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratios {
    pub services: usize,
    pub mode: String,
    pub conn_per_s_vs_none: Option<f64>,
    pub conn_per_s_vs_nftables: Option<f64>,
    pub conn_per_s_vs_iptables: Option<f64>,
    pub latency_p99_vs_none: Option<f64>,
    pub cpu_per_conn_vs_none: Option<f64>,
}

impl Report {
    /// An empty report for `config`.
    #[must_use]
    pub fn new(config: &Config) -> Self {
        Self {
            started_utc: utc_timestamp(),
            command: config.command.clone(),
            machine: Machine::detect(),
            settings: Settings {
                modes: config
                    .modes
                    .iter()
                    .map(|mode| mode.label().to_owned())
                    .collect(),
                services: config.services.clone(),
                endpoints: config.endpoints,
                affinity: config.affinity,
                duration_s: config.duration.as_secs_f64(),
                stream_duration_s: config.stream_duration.as_secs_f64(),
                rounds: config.rounds,
                clients: config.clients,
                tc_repeat: config.tc_repeat,
                tc_new_flows: config.tc_new_flows,
                program_limit_s: config.program_limit.as_secs_f64(),
            },
            cells: Vec::new(),
            tc: Vec::new(),
            summary: Vec::new(),
            ratios: Vec::new(),
        }
    }

    /// Computes the medians per (N, mode), in the run's order of N and modes, and the
    /// ratios of the ebpf modes.
    pub fn summarize(&mut self) {
        let mut groups: BTreeMap<(usize, usize), Vec<&Cell>> = BTreeMap::new();
        let mode_order = |label: &str| {
            self.settings
                .modes
                .iter()
                .position(|mode| mode == label)
                .unwrap_or(usize::MAX)
        };
        for cell in &self.cells {
            groups
                .entry((cell.services, mode_order(&cell.mode)))
                .or_default()
                .push(cell);
        }
        self.summary = groups
            .into_values()
            .map(|cells| {
                let first = cells[0];
                let measured: Vec<&Cell> = cells
                    .iter()
                    .copied()
                    .filter(|cell| !cell.over_limit())
                    .collect();
                let med = |get: &dyn Fn(&Cell) -> f64| {
                    median(&mut measured.iter().map(|cell| get(cell)).collect::<Vec<_>>())
                        .unwrap_or(0.0)
                };
                let med_opt = |get: &dyn Fn(&Cell) -> Option<f64>| {
                    median(
                        &mut measured
                            .iter()
                            .filter_map(|cell| get(cell))
                            .collect::<Vec<_>>(),
                    )
                };
                let not_programmed = cells.len() - measured.len();
                let limit_note = if measured.is_empty() {
                    // A round that tried says more than one that did not.
                    cells
                        .iter()
                        .find(|cell| cell.not_tried_after.is_none())
                        .unwrap_or(&first)
                        .limit_note()
                } else if not_programmed > 0 {
                    cells
                        .iter()
                        .find_map(|cell| cell.limit_note())
                        .map(|note| format!("{note} in {not_programmed} of {} rounds", cells.len()))
                } else {
                    None
                };
                let tc = Mode::from_str(&first.mode)
                    .is_ok_and(Mode::is_ebpf)
                    .then(|| {
                        self.tc
                            .iter()
                            .find(|tc| tc.services == first.services && tc.family == "IPv4")
                    })
                    .flatten();
                Summary {
                    services: first.services,
                    mode: first.mode.clone(),
                    rounds: cells.len(),
                    rounds_not_programmed: not_programmed,
                    limit_note,
                    changes_not_applied: measured
                        .iter()
                        .filter(|cell| cell.change_not_applied_in_s.is_some())
                        .count(),
                    conn_per_s: med(&|cell| cell.conn_per_s),
                    latency_p50_us: med(&|cell| cell.latency_p50_us),
                    latency_p99_us: med(&|cell| cell.latency_p99_us),
                    stream_mb_per_s: med(&|cell| cell.stream_mb_per_s),
                    program_ms: med_opt(&|cell| cell.program_ms),
                    program_wall_ms: med_opt(&|cell| cell.program_wall_ms),
                    program_cpu_ms: med_opt(&|cell| cell.program_cpu_ms),
                    change_ms: med_opt(&|cell| cell.change_ms),
                    change_wall_ms: med_opt(&|cell| cell.change_wall_ms),
                    cpu_us_per_conn: med(&|cell| cell.cpu_us_per_conn),
                    softirq_us_per_conn: med(&|cell| cell.softirq_us_per_conn),
                    agent_cpu_ms: med_opt(&|cell| cell.agent_cpu_ms),
                    agent_peak_mib: med_opt(&|cell| cell.agent_peak_mib),
                    stop_ms: med_opt(&|cell| cell.stop_ms),
                    connections: measured.iter().map(|cell| cell.connections).sum(),
                    errors: measured.iter().map(|cell| cell.errors).sum(),
                    tc_new_flow_ns: tc.map(|tc| tc.new_flow_ns),
                    tc_established_ns: tc.map(|tc| tc.established_ns),
                    tc_single_run_established_ns: tc.map(|tc| tc.single_run_established_ns),
                    tc_miss_ns: tc.map(|tc| tc.miss_ns),
                    tc_single_run_miss_ns: tc.map(|tc| tc.single_run_miss_ns),
                }
            })
            .collect();
        self.ratios = self.compute_ratios();
    }

    /// The summary row of (N, mode) if it has figures (some round programmed it).
    fn measured_row(&self, services: usize, mode: Mode) -> Option<&Summary> {
        self.summary.iter().find(|row| {
            row.services == services
                && row.mode == mode.label()
                && row.rounds > row.rounds_not_programmed
        })
    }

    fn compute_ratios(&self) -> Vec<Ratios> {
        let ratio = |ours: f64, theirs: f64| (theirs > 0.0).then(|| ours / theirs);
        self.summary
            .iter()
            .filter(|row| Mode::from_str(&row.mode).is_ok_and(Mode::is_ebpf))
            .filter_map(|row| {
                let ours = self.measured_row(row.services, Mode::from_str(&row.mode).ok()?)?;
                let other = |mode| self.measured_row(row.services, mode);
                let conn =
                    |mode| other(mode).and_then(|them| ratio(ours.conn_per_s, them.conn_per_s));
                let none = other(Mode::None);
                Some(Ratios {
                    services: row.services,
                    mode: row.mode.clone(),
                    conn_per_s_vs_none: conn(Mode::None),
                    conn_per_s_vs_nftables: conn(Mode::Nftables),
                    conn_per_s_vs_iptables: conn(Mode::Iptables),
                    latency_p99_vs_none: none
                        .and_then(|none| ratio(ours.latency_p99_us, none.latency_p99_us)),
                    cpu_per_conn_vs_none: none
                        .and_then(|none| ratio(ours.cpu_us_per_conn, none.cpu_us_per_conn)),
                })
            })
            .collect()
    }

    /// The summary, the ratios and the TC costs as fixed-width tables.
    #[must_use]
    pub fn table(&self) -> String {
        self.render(Table::text)
    }

    /// The same tables in Markdown (for the README).
    #[must_use]
    pub fn markdown(&self) -> String {
        self.render(Table::markdown)
    }

    /// Each table with its caption, through `format`.
    fn render(&self, format: fn(&Table) -> String) -> String {
        let mut out = format(&self.summary_table());
        out.push_str(
            "\nprogram/change ms: ebpf modes = the agent's sync pass (in parentheses: agent start to healthy / \
             change written (manifest file, or API object) to the pass that applied it); kube-proxy modes = \
             their commands' wall time. failed: failed connections of the connection tests (refused, timed \
             out, short answer), all rounds; they count in no other figure.\n",
        );
        if !self.ratios.is_empty() {
            out.push_str(
                "\nRatios per N: conn/s of the ebpf mode over the other mode's (above 1: more connections); \
                 p99 latency and CPU per connection over none's (above 1: more than no proxy).\n\n",
            );
            out.push_str(&format(&self.ratio_table()));
        }
        if !self.tc.is_empty() {
            let _ = write!(
                out,
                "\nTC program per packet, ns (BPF_PROG_TEST_RUN): \"1/call\" one run per call (the kernel's \
                 per-call timer and cold caches included), \"rep.\" {} runs per call; new/est same: both \
                 1/call.\n\n",
                self.settings.tc_repeat
            );
            out.push_str(&format(&self.tc_table()));
        }
        out
    }

    fn summary_table(&self) -> Table {
        let rows = self
            .summary
            .iter()
            .map(|row| {
                let mut cells = vec![row.services.to_string(), row.mode.clone()];
                if row.rounds == row.rounds_not_programmed {
                    cells.push(row.limit_note.clone().unwrap_or_default());
                    return cells;
                }
                cells.extend([
                    format!("{:.0}", row.conn_per_s),
                    format!("{:.0}", row.latency_p50_us),
                    format!("{:.0}", row.latency_p99_us),
                    format!("{:.0}", row.stream_mb_per_s),
                    with_wall(row.program_ms, row.program_wall_ms, 1),
                    change_figure(row, self.settings.program_limit_s),
                    format!("{:.1}", row.cpu_us_per_conn),
                    format!("{:.1}", row.softirq_us_per_conn),
                    optional(row.agent_peak_mib, 1),
                    optional(row.stop_ms, 0),
                    row.errors.to_string(),
                    row.limit_note.clone().unwrap_or_default(),
                ]);
                cells
            })
            .collect();
        Table {
            headers: vec![
                "N",
                "mode",
                "conn/s",
                "p50 µs",
                "p99 µs",
                "MB/s",
                "program ms",
                "change ms",
                "CPU µs/conn",
                "softirq µs/conn",
                "agent MiB",
                "stop ms",
                "failed",
                "note",
            ],
            left: vec![1, 13],
            rows,
        }
    }

    fn ratio_table(&self) -> Table {
        Table {
            headers: vec![
                "N",
                "mode",
                "conn/s ÷ none",
                "÷ nftables",
                "÷ iptables",
                "p99 ÷ none",
                "CPU/conn ÷ none",
            ],
            left: vec![1],
            rows: self
                .ratios
                .iter()
                .map(|ratios| {
                    let mut cells = vec![ratios.services.to_string(), ratios.mode.clone()];
                    cells.extend(self.ratio_cells(ratios));
                    cells
                })
                .collect(),
        }
    }

    fn tc_table(&self) -> Table {
        Table {
            headers: vec![
                "N",
                "family",
                "new 1/call",
                "est 1/call",
                "est rep.",
                "miss rep.",
                "miss 1/call",
                "new, 1 service",
                "est counted",
                "new/est same",
                "new/est rep.",
            ],
            left: Vec::new(),
            rows: self
                .tc
                .iter()
                .map(|tc| {
                    vec![
                        tc.services.to_string(),
                        tc.family.to_owned(),
                        format!("{:.0}", tc.new_flow_ns),
                        format!("{:.0}", tc.single_run_established_ns),
                        format!("{:.0}", tc.established_ns),
                        format!("{:.0}", tc.miss_ns),
                        format!("{:.0}", tc.single_run_miss_ns),
                        format!("{:.0}", tc.new_flow_one_service_ns),
                        if tc.family == "IPv4" {
                            format!("{:.0}", tc.established_counted_ns)
                        } else {
                            "-".to_owned()
                        },
                        format!("{:.1}", tc.new_over_established_same_method()),
                        format!("{:.1}", tc.new_over_established_repeated()),
                    ]
                })
                .collect(),
        }
    }

    /// The five figures of `ratios` as text: the ratio, or why there is none (the
    /// other mode not programmed, or not run or no figure: "-").
    fn ratio_cells(&self, ratios: &Ratios) -> [String; 5] {
        let cell = |value: Option<f64>, other: Mode| match value {
            Some(value) => format!("{value:.2}"),
            None if self.summary.iter().any(|row| {
                row.services == ratios.services
                    && row.mode == other.label()
                    && row.rounds == row.rounds_not_programmed
            }) =>
            {
                format!("{} not prog.", short_label(other))
            }
            None => "-".to_owned(),
        };
        [
            cell(ratios.conn_per_s_vs_none, Mode::None),
            cell(ratios.conn_per_s_vs_nftables, Mode::Nftables),
            cell(ratios.conn_per_s_vs_iptables, Mode::Iptables),
            cell(ratios.latency_p99_vs_none, Mode::None),
            cell(ratios.cpu_per_conn_vs_none, Mode::None),
        ]
    }

    /// Writes `cells.csv`, `summary.csv`, `ratios.csv`, `summary.md`, `results.json`
    /// and `plot.svg` into `dir`. Returns the files written.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = [
            ("cells.csv", self.cells_csv()),
            ("summary.csv", self.summary_csv()),
            ("ratios.csv", self.ratios_csv()),
            ("summary.md", self.markdown()),
            (
                "results.json",
                serde_json::to_string_pretty(self).context("serializing the results")?,
            ),
            ("plot.svg", super::plot::svg(self)),
        ];
        let mut written = Vec::new();
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }

    fn cells_csv(&self) -> String {
        let mut out = String::from(
            "round,mode,services,endpoints,not_programmed_in_s,not_tried_after,change_not_applied_in_s,conn_per_s,connections,errors,latency_p50_us,latency_p99_us,stream_mb_per_s,program_ms,program_wall_ms,program_cpu_ms,change_ms,change_wall_ms,cpu_us_per_conn,softirq_us_per_conn,agent_cpu_ms,agent_peak_mib,stop_ms,socket_translated,tc_new_flows\n",
        );
        for cell in &self.cells {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{:.1},{},{},{:.1},{:.1},{:.1},{},{},{},{},{},{:.2},{:.2},{},{},{},{},{}",
                cell.round,
                cell.mode,
                cell.services,
                cell.endpoints,
                csv_optional(cell.not_programmed_in_s),
                cell.not_tried_after.map_or_else(String::new, |at| at.to_string()),
                csv_optional(cell.change_not_applied_in_s),
                cell.conn_per_s,
                cell.connections,
                cell.errors,
                cell.latency_p50_us,
                cell.latency_p99_us,
                cell.stream_mb_per_s,
                csv_optional(cell.program_ms),
                csv_optional(cell.program_wall_ms),
                csv_optional(cell.program_cpu_ms),
                csv_optional(cell.change_ms),
                csv_optional(cell.change_wall_ms),
                cell.cpu_us_per_conn,
                cell.softirq_us_per_conn,
                csv_optional(cell.agent_cpu_ms),
                csv_optional(cell.agent_peak_mib),
                csv_optional(cell.stop_ms),
                cell.socket_translated,
                cell.tc_new_flows,
            );
        }
        out
    }

    fn summary_csv(&self) -> String {
        let mut out = String::from(
            "services,mode,rounds,rounds_not_programmed,limit_note,changes_not_applied,conn_per_s,latency_p50_us,latency_p99_us,stream_mb_per_s,program_ms,program_wall_ms,program_cpu_ms,change_ms,change_wall_ms,cpu_us_per_conn,softirq_us_per_conn,agent_cpu_ms,agent_peak_mib,stop_ms,connections,errors,tc_new_flow_ns,tc_established_ns,tc_single_run_established_ns,tc_miss_ns,tc_single_run_miss_ns\n",
        );
        for row in &self.summary {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{:.2},{:.2},{},{},{},{},{},{},{},{},{},{}",
                row.services,
                row.mode,
                row.rounds,
                row.rounds_not_programmed,
                row.limit_note.as_deref().unwrap_or_default(),
                row.changes_not_applied,
                row.conn_per_s,
                row.latency_p50_us,
                row.latency_p99_us,
                row.stream_mb_per_s,
                csv_optional(row.program_ms),
                csv_optional(row.program_wall_ms),
                csv_optional(row.program_cpu_ms),
                csv_optional(row.change_ms),
                csv_optional(row.change_wall_ms),
                row.cpu_us_per_conn,
                row.softirq_us_per_conn,
                csv_optional(row.agent_cpu_ms),
                csv_optional(row.agent_peak_mib),
                csv_optional(row.stop_ms),
                row.connections,
                row.errors,
                csv_optional(row.tc_new_flow_ns),
                csv_optional(row.tc_established_ns),
                csv_optional(row.tc_single_run_established_ns),
                csv_optional(row.tc_miss_ns),
                csv_optional(row.tc_single_run_miss_ns),
            );
        }
        out
    }

    fn ratios_csv(&self) -> String {
        let mut out = String::from(
            "services,mode,conn_per_s_vs_none,conn_per_s_vs_nftables,conn_per_s_vs_iptables,latency_p99_vs_none,cpu_per_conn_vs_none\n",
        );
        for ratios in &self.ratios {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{}",
                ratios.services,
                ratios.mode,
                csv_optional(ratios.conn_per_s_vs_none),
                csv_optional(ratios.conn_per_s_vs_nftables),
                csv_optional(ratios.conn_per_s_vs_iptables),
                csv_optional(ratios.latency_p99_vs_none),
                csv_optional(ratios.cpu_per_conn_vs_none),
            );
        }
        out
    }
}

/// A table, rendered as fixed-width text or as Markdown from the same cells, so the
/// two cannot differ. A row with fewer cells than headers ends in a note that spans
/// the rest (a mode not programmed within the limit).
struct Table {
    headers: Vec<&'static str>,
    /// The left-aligned columns (names, notes); the others are numbers.
    left: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn text(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            // A spanning note does not widen its column.
            let aligned = if row.len() == self.headers.len() {
                &row[..]
            } else {
                &row[..row.len().saturating_sub(1)]
            };
            for (width, cell) in widths.iter_mut().zip(aligned) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (column, cell) in cells.enumerate() {
                let width = widths.get(column).copied().unwrap_or(0);
                if column > 0 {
                    text.push(' ');
                }
                if self.left.contains(&column) {
                    let _ = write!(text, "{cell:<width$}");
                } else {
                    let _ = write!(text, "{cell:>width$}");
                }
            }
            text.trim_end().to_owned() + "\n"
        };
        let mut out = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            if row.len() == self.headers.len() {
                out.push_str(&line(&mut row.iter().map(String::as_str)));
            } else if let Some((note, lead)) = row.split_last() {
                let lead = line(&mut lead.iter().map(String::as_str));
                let _ = writeln!(out, "{} {note}", lead.trim_end());
            }
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = format!("| {} |\n|", self.headers.join(" | "));
        for column in 0..self.headers.len() {
            out.push_str(if self.left.contains(&column) {
                "---|"
            } else {
                "---:|"
            });
        }
        out.push('\n');
        for row in &self.rows {
            let empty = self.headers.len().saturating_sub(row.len());
            let _ = writeln!(out, "| {} |{}", row.join(" | "), " |".repeat(empty));
        }
        out
    }
}

/// A mode's name in a ratio cell.
fn short_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Nftables => "nft",
        Mode::Iptables => "ipt",
        other => other.label(),
    }
}

/// The change column: the figure, or that the change was not applied within the
/// limit (in how many rounds, when not all).
fn change_figure(row: &Summary, limit_s: f64) -> String {
    let measured = row.rounds - row.rounds_not_programmed;
    match row.changes_not_applied {
        0 => with_wall(row.change_ms, row.change_wall_ms, 1),
        all if all == measured => format!("over {limit_s} s"),
        some => format!(
            "{} (over {limit_s} s: {some}/{measured})",
            optional(row.change_ms, 1)
        ),
    }
}

/// `value`, followed by `wall` in parentheses when it differs (the agent's start or
/// change as a whole, around its own sync pass); "-" without a value.
fn with_wall(value: Option<f64>, wall: Option<f64>, decimals: usize) -> String {
    match (value, wall) {
        (Some(value), Some(wall)) if (wall - value).abs() > value.abs() * 0.005 => {
            format!("{value:.decimals$} ({wall:.decimals$})")
        }
        _ => optional(value, decimals),
    }
}

/// `value` with `decimals`, or "-".
#[must_use]
pub fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.decimals$}"))
}

fn csv_optional(value: Option<f64>) -> String {
    value.map_or_else(String::new, |value| format!("{value:.3}"))
}

/// The current UTC time as `YYYYMMDDTHHMMSSZ` (a directory name).
#[must_use]
pub fn utc_timestamp() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let time = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_look_right() {
        let stamp = utc_timestamp();
        assert_eq!(stamp.len(), 16, "{stamp}");
        assert!(stamp.starts_with("20"));
        assert!(stamp.ends_with('Z'));
    }

    #[test]
    fn summary_takes_medians_per_count_and_mode() {
        let config = Config {
            modes: vec![Mode::Ebpf, Mode::None],
            ..Config::default()
        };
        let mut report = Report::new(&config);
        for (round, rate) in [(1, 100.0), (2, 300.0), (3, 200.0)] {
            for mode in ["none", "ebpf"] {
                report.cells.push(Cell {
                    round,
                    mode: mode.to_owned(),
                    services: 10,
                    conn_per_s: rate,
                    program_ms: (mode == "ebpf").then_some(rate / 100.0),
                    ..Cell::default()
                });
            }
        }
        report.tc.push(TcCost {
            services: 10,
            family: "IPv4",
            new_flow_ns: 300.0,
            established_ns: 60.0,
            single_run_established_ns: 150.0,
            established_counted_ns: 66.0,
            miss_ns: 30.0,
            single_run_miss_ns: 200.0,
            new_flow_one_service_ns: 250.0,
        });
        report.summarize();
        assert_eq!(report.summary.len(), 2);
        assert_eq!(report.summary[0].mode, "ebpf");
        assert!((report.summary[0].conn_per_s - 200.0).abs() < 1e-9);
        assert_eq!(report.summary[0].program_ms, Some(2.0));
        assert_eq!(report.summary[0].tc_miss_ns, Some(30.0));
        assert_eq!(report.summary[1].program_ms, None);
        assert_eq!(report.summary[1].tc_miss_ns, None);
        assert!(report.table().contains("ebpf"));
        assert!(report.markdown().starts_with("| N |"));
        assert!(report.cells_csv().lines().count() == 7);
    }

    #[test]
    fn failed_connections_and_limits_are_shown() {
        let config = Config {
            modes: vec![Mode::Ebpf, Mode::Nftables, Mode::None],
            ..Config::default()
        };
        let mut report = Report::new(&config);
        let limit = Some(180.0);
        for round in 1..=2 {
            report.cells.extend([
                Cell {
                    round,
                    mode: "ebpf".into(),
                    services: 100,
                    conn_per_s: 900.0,
                    connections: 1000,
                    errors: 7,
                    // One round over the limit, one not.
                    not_programmed_in_s: (round == 2).then_some(180.0),
                    ..Cell::default()
                },
                Cell {
                    round,
                    mode: "nftables".into(),
                    services: 100,
                    not_programmed_in_s: limit,
                    ..Cell::default()
                },
                Cell {
                    round,
                    mode: "none".into(),
                    services: 100,
                    conn_per_s: 1000.0,
                    connections: 1000,
                    ..Cell::default()
                },
            ]);
        }
        report.summarize();
        let ebpf = &report.summary[0];
        assert_eq!((ebpf.rounds, ebpf.rounds_not_programmed), (2, 1));
        // Only the round with figures: its errors, its rate.
        assert_eq!((ebpf.errors, ebpf.connections), (7, 1000));
        assert!((ebpf.conn_per_s - 900.0).abs() < 1e-9);
        assert_eq!(
            ebpf.limit_note.as_deref(),
            Some("not programmed in 180 s in 1 of 2 rounds")
        );
        let nft = &report.summary[1];
        assert_eq!(nft.limit_note.as_deref(), Some("not programmed in 180 s"));

        let table = report.table();
        let ebpf_line = table
            .lines()
            .find(|line| line.trim_start().starts_with("100 ebpf "))
            .expect("the ebpf row");
        assert!(
            ebpf_line.contains(" 7 not programmed in 180 s in 1 of 2 rounds"),
            "{ebpf_line}"
        );
        assert!(
            table.contains("100 nftables not programmed in 180 s\n"),
            "{table}"
        );
        // ebpf over none is 0.9; nftables has no figures to divide by ("not prog."),
        // none no CPU time here ("-").
        let ratio_line = table
            .lines()
            .filter(|line| line.trim_start().starts_with("100 ebpf "))
            .nth(1)
            .expect("the ratio row");
        assert!(ratio_line.contains("0.90"), "{ratio_line}");
        assert!(ratio_line.contains("nft not prog."), "{ratio_line}");
        assert!(ratio_line.trim_end().ends_with(" -"), "{ratio_line}");
        let markdown = report.markdown();
        assert!(
            markdown.contains("| 100 | nftables | not programmed in 180 s |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("| 7 | not programmed in 180 s in 1 of 2 rounds |"),
            "{markdown}"
        );
        assert!(report
            .summary_csv()
            .contains(",1,not programmed in 180 s in 1 of 2 rounds,"));
        assert_eq!(report.ratios[0].conn_per_s_vs_nftables, None);
        assert_eq!(report.ratios[0].conn_per_s_vs_iptables, None);
    }
}
