//! `cargo xtask bench`: our dataplane against kube-proxy's iptables and nftables
//! modes and against no proxy at all, in the same lab with the same services and the
//! same traffic (see `kpr_lab::bench`). Prints a table and writes CSV, JSON, a
//! Markdown table and an SVG plot under `target/bench/<UTC timestamp>/`.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use kpr_lab::bench::{self, report::utc_timestamp, Config, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "kpr-bench",
    about = "Benchmark the eBPF dataplane against kube-proxy's iptables and nftables rules"
)]
struct Args {
    /// Modes, alternated in this order: ebpf, ebpf-tc, ebpf-api, iptables, iptables-legacy,
    /// nftables, none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ebpf,ebpf-tc,iptables,nftables,none"
    )]
    modes: Vec<Mode>,
    /// Service counts N (add 50000 where the machine holds it).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    services: Vec<usize>,
    /// Endpoints per service M (one backend pod each).
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Give every service `sessionAffinity: ClientIP` (kube-proxy's `recent` matches
    /// and affinity sets).
    #[arg(long)]
    affinity: bool,
    /// Seconds of each connection-rate test.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of each long-lived-connection test.
    #[arg(long, default_value_t = 2.0)]
    stream_duration: f64,
    /// Rounds (each runs every mode at every N); figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client threads opening connections.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// BPF_PROG_TEST_RUN repeat count for the per-packet cost.
    #[arg(long, default_value_t = 100_000)]
    tc_repeat: u32,
    /// Seconds a mode may take to program all services (and, separately, to apply the
    /// endpoint change); a mode over it gets a cell that says so and the run goes on.
    #[arg(long, default_value_t = 180.0)]
    program_limit: f64,
    /// Per-program run time of the agent's programs (kernel BPF statistics, on only
    /// during the ebpf connection tests; they cost every BPF program on the machine two
    /// clock reads per run while on).
    #[arg(long)]
    bpf_stats: bool,
    /// Output directory [default: target/bench/<UTC timestamp>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only write the iptables-restore and nft inputs of the kube-proxy modes at each
    /// N into the output directory, and exit.
    #[arg(long)]
    dump_rules: bool,
    /// Only measure the TC program's per-packet cost (BPF_PROG_TEST_RUN, no lab, no
    /// agent) at each N, print it, and exit.
    #[arg(long)]
    tc_only: bool,
}

fn seconds(value: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("--{what} {value}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let out = args.out.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
            PathBuf::from,
        );
        target.join("bench").join(utc_timestamp())
    });
    let dump_rules = args.dump_rules;
    let config = Config {
        modes: args.modes,
        services: args.services,
        endpoints: args.endpoints,
        affinity: args.affinity,
        duration: seconds(args.duration, "duration")?,
        stream_duration: seconds(args.stream_duration, "stream-duration")?,
        rounds: args.rounds,
        clients: args.clients,
        tc_repeat: args.tc_repeat,
        bpf_stats: args.bpf_stats,
        program_limit: seconds(args.program_limit, "program-limit")?,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        out: out.clone(),
        ..Config::default()
    };
    if args.tc_only {
        for &count in &config.services {
            let set = bench::services::ServiceSet::new(count, config.endpoints)?
                .with_affinity(config.affinity);
            for cost in [
                bench::tc_cost::measure(&set, config.tc_repeat, config.tc_new_flows)
                    .with_context(|| format!("BPF_PROG_TEST_RUN at N={count}"))?,
                bench::tc_cost::measure_v6(&set, config.tc_repeat, config.tc_new_flows)
                    .with_context(|| format!("BPF_PROG_TEST_RUN of IPv6 at N={count}"))?,
            ] {
                println!(
                "N={count} M={} {} TC ns: new / est (1-run est) / miss (1-run miss): {:.0} / {:.0} ({:.0}) / {:.0} ({:.0}); new flows to one service {:.0}; est with per-service counters {:.0}",
                config.endpoints,
                cost.family,
                cost.new_flow_ns,
                cost.established_ns,
                cost.single_run_established_ns,
                cost.miss_ns,
                cost.single_run_miss_ns,
                cost.new_flow_one_service_ns,
                cost.established_counted_ns
            );
            }
        }
        return Ok(());
    }
    if dump_rules {
        for path in bench::dump_rules(&config, &out)? {
            println!("wrote {}", path.display());
        }
        return Ok(());
    }
    let report = bench::run(&config)?;
    println!("\n{}", report.table());
    println!(
        "machine: {} ({} CPUs, {} GiB), kernel {}, {}; {}; {}",
        report.machine.cpu,
        report.machine.cpus,
        report.machine.memory_gib,
        report.machine.kernel,
        report.machine.os,
        report.machine.iptables,
        report.machine.nft
    );
    for path in report.write(&out)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
