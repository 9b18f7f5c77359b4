//! The benchmark's results: every measurement, the medians per (N, mode), the
//! machine they ran on; written as a terminal table, CSV, JSON and an SVG plot.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
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
}

/// Medians over rounds for one (N, mode).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub services: usize,
    pub mode: String,
    pub rounds: usize,
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
    /// Failed connections over all rounds.
    pub errors: u64,
    pub tc_new_flow_ns: Option<f64>,
    pub tc_established_ns: Option<f64>,
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
            },
            cells: Vec::new(),
            tc: Vec::new(),
            summary: Vec::new(),
        }
    }

    /// Computes the medians per (N, mode), in the run's order of N and modes.
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
                let med = |get: &dyn Fn(&Cell) -> f64| {
                    median(&mut cells.iter().map(|cell| get(cell)).collect::<Vec<_>>())
                        .unwrap_or(0.0)
                };
                let med_opt = |get: &dyn Fn(&Cell) -> Option<f64>| {
                    median(
                        &mut cells
                            .iter()
                            .filter_map(|cell| get(cell))
                            .collect::<Vec<_>>(),
                    )
                };
                let first = cells[0];
                let tc = (first.mode == Mode::Ebpf.label() || first.mode == Mode::EbpfTc.label())
                    .then(|| self.tc.iter().find(|tc| tc.services == first.services))
                    .flatten();
                Summary {
                    services: first.services,
                    mode: first.mode.clone(),
                    rounds: cells.len(),
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
                    errors: cells.iter().map(|cell| cell.errors).sum(),
                    tc_new_flow_ns: tc.map(|tc| tc.new_flow_ns),
                    tc_established_ns: tc.map(|tc| tc.established_ns),
                    tc_miss_ns: tc.map(|tc| tc.miss_ns),
                    tc_single_run_miss_ns: tc.map(|tc| tc.single_run_miss_ns),
                }
            })
            .collect();
    }

    /// The summary as a fixed-width table.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>6} {:<15} {:>8} {:>7} {:>7} {:>7} {:>17} {:>15} {:>9} {:>9} {:>9} {:>7} {:>6}  tc ns new/est/miss (1-run miss)",
            "N",
            "mode",
            "conn/s",
            "p50 us",
            "p99 us",
            "MB/s",
            "program ms",
            "change ms",
            "cpu us/c",
            "sirq us/c",
            "agent MiB",
            "stop ms",
            "errors",
        );
        for row in &self.summary {
            let tc = tc_figures(row, "/");
            let _ = writeln!(
                out,
                "{:>6} {:<15} {:>8.0} {:>7.0} {:>7.0} {:>7.0} {:>17} {:>15} {:>9.1} {:>9.1} {:>9} {:>7} {:>6}  {}",
                row.services,
                row.mode,
                row.conn_per_s,
                row.latency_p50_us,
                row.latency_p99_us,
                row.stream_mb_per_s,
                with_wall(row.program_ms, row.program_wall_ms, 1),
                with_wall(row.change_ms, row.change_wall_ms, 1),
                row.cpu_us_per_conn,
                row.softirq_us_per_conn,
                optional(row.agent_peak_mib, 1),
                optional(row.stop_ms, 0),
                row.errors,
                tc,
            );
        }
        out.push_str(
            "program/change ms: ebpf = the agent's sync pass (in parentheses: agent start to healthy / \
             manifest written to change applied); kube-proxy modes = their commands' wall time\n",
        );
        out
    }

    /// The summary as a Markdown table (for the README).
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| N | mode | conn/s | p50 µs | p99 µs | stream MB/s | program ms | change ms | CPU µs/conn | softirq µs/conn | agent peak MiB | stop ms | TC ns: new / est / miss (1-run miss) |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in &self.summary {
            let tc = tc_figures(row, " / ");
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {} | {} | {} |",
                row.services,
                row.mode,
                row.conn_per_s,
                row.latency_p50_us,
                row.latency_p99_us,
                row.stream_mb_per_s,
                with_wall(row.program_ms, row.program_wall_ms, 1),
                with_wall(row.change_ms, row.change_wall_ms, 1),
                row.cpu_us_per_conn,
                row.softirq_us_per_conn,
                optional(row.agent_peak_mib, 1),
                optional(row.stop_ms, 0),
                tc,
            );
        }
        out
    }

    /// Writes `cells.csv`, `summary.csv`, `summary.md`, `results.json` and
    /// `plot.svg` into `dir`. Returns the files written.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = [
            ("cells.csv", self.cells_csv()),
            ("summary.csv", self.summary_csv()),
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
            "round,mode,services,endpoints,conn_per_s,connections,errors,latency_p50_us,latency_p99_us,stream_mb_per_s,program_ms,program_wall_ms,program_cpu_ms,change_ms,change_wall_ms,cpu_us_per_conn,softirq_us_per_conn,agent_cpu_ms,agent_peak_mib,stop_ms,socket_translated,tc_new_flows\n",
        );
        for cell in &self.cells {
            let _ = writeln!(
                out,
                "{},{},{},{},{:.1},{},{},{:.1},{:.1},{:.1},{},{},{},{},{},{:.2},{:.2},{},{},{},{},{}",
                cell.round,
                cell.mode,
                cell.services,
                cell.endpoints,
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
            "services,mode,rounds,conn_per_s,latency_p50_us,latency_p99_us,stream_mb_per_s,program_ms,program_wall_ms,program_cpu_ms,change_ms,change_wall_ms,cpu_us_per_conn,softirq_us_per_conn,agent_cpu_ms,agent_peak_mib,stop_ms,errors,tc_new_flow_ns,tc_established_ns,tc_miss_ns,tc_single_run_miss_ns\n",
        );
        for row in &self.summary {
            let _ = writeln!(
                out,
                "{},{},{},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{:.2},{:.2},{},{},{},{},{},{},{},{}",
                row.services,
                row.mode,
                row.rounds,
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
                row.errors,
                csv_optional(row.tc_new_flow_ns),
                csv_optional(row.tc_established_ns),
                csv_optional(row.tc_miss_ns),
                csv_optional(row.tc_single_run_miss_ns),
            );
        }
        out
    }
}

/// The TC program's figures of an ebpf row: new flow, established, miss, and the
/// single-run miss in parentheses; "-" for other modes.
fn tc_figures(row: &Summary, separator: &str) -> String {
    match (
        row.tc_new_flow_ns,
        row.tc_established_ns,
        row.tc_miss_ns,
        row.tc_single_run_miss_ns,
    ) {
        (Some(new), Some(established), Some(miss), Some(single)) => {
            format!("{new:.0}{separator}{established:.0}{separator}{miss:.0} ({single:.0})")
        }
        _ => "-".to_owned(),
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
            new_flow_ns: 300.0,
            established_ns: 60.0,
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
}
