//! A short run of the benchmark (`cargo xtask bench`) so it cannot rot: tiny service
//! counts, about a second per mode, every mode (the three ebpf modes included). It
//! checks that each mode carries traffic and that the result files are written; it
//! asserts nothing about speed. A second run, with a program limit no mode can meet,
//! goes through each limit path (the agent's start, with manifests and with the API
//! server; the kube-proxy modes' commands, killed) and checks the "not programmed"
//! cells and rows; a third test counts failed connections.
use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use kpr_lab::{
    bench::{self, workload, Config, Mode},
    lab::Lab,
    scenario::CLIENT_IP,
};

/// The kube-proxy modes load rules with these (Debian packages iptables, nftables);
/// `cargo xtask bench` installs them.
const TOOLS: &[&str] = &["iptables-nft-restore", "iptables-legacy-restore", "nft"];

#[test]
fn every_mode_carries_connections_and_the_results_are_written() {
    kpr_lab::require_root();
    require_tools();
    let out = std::env::temp_dir().join(format!("kpr-bench-smoke-{}", std::process::id()));
    let config = Config {
        modes: Mode::ALL.to_vec(),
        services: vec![1, 10],
        endpoints: 2,
        affinity: false,
        duration: Duration::from_millis(800),
        stream_duration: Duration::from_millis(300),
        rounds: 1,
        clients: 1,
        tc_repeat: 1000,
        tc_new_flows: 50,
        bpf_stats: true,
        program_limit: Duration::from_secs(60),
        out: out.clone(),
        command: "bench_smoke".into(),
    };
    let report = bench::run(&config).expect("benchmark run");
    eprintln!("{}", report.table());

    assert_eq!(report.summary.len(), 2 * config.modes.len());
    for row in &report.summary {
        assert_eq!(row.rounds_not_programmed, 0, "{row:?}");
        assert!(row.limit_note.is_none(), "{row:?}");
        assert!(
            row.conn_per_s > 0.0,
            "{} at N={} completed no connection",
            row.mode,
            row.services
        );
        assert!(row.stream_mb_per_s > 0.0, "{} streamed nothing", row.mode);
        if row.mode == "none" {
            assert!(row.program_ms.is_none());
        } else {
            assert!(
                row.program_ms.is_some(),
                "{} has no programming time",
                row.mode
            );
            assert!(row.change_ms.is_some(), "{} has no change time", row.mode);
        }
    }
    for mode in ["ebpf", "ebpf-tc", "ebpf-api"] {
        let ebpf = report
            .summary
            .iter()
            .find(|row| row.mode == mode)
            .unwrap_or_else(|| panic!("{mode} row"));
        assert!(ebpf.agent_peak_mib.is_some_and(|mib| mib > 0.0), "{mode}");
        assert!(ebpf.stop_ms.is_some(), "{mode}: the agent's stop time");
        assert!(ebpf.program_wall_ms.is_some(), "{mode}: start to healthy");
        assert!(
            ebpf.change_wall_ms.is_some(),
            "{mode}: change written to applied"
        );
        assert!(ebpf.tc_established_ns.is_some_and(|ns| ns > 0.0), "{mode}");
        assert!(
            ebpf.tc_single_run_established_ns.is_some_and(|ns| ns > 0.0),
            "{mode}"
        );
    }
    // Each ebpf mode at each N has its ratios to the other modes of the run.
    assert_eq!(report.ratios.len(), 2 * 3);
    for ratios in &report.ratios {
        assert!(ratios.conn_per_s_vs_none.is_some(), "{ratios:?}");
        assert!(ratios.conn_per_s_vs_nftables.is_some(), "{ratios:?}");
        assert!(ratios.conn_per_s_vs_iptables.is_some(), "{ratios:?}");
        assert!(ratios.latency_p99_vs_none.is_some(), "{ratios:?}");
        assert!(ratios.cpu_per_conn_vs_none.is_some(), "{ratios:?}");
    }
    // The per-program figures: the socket-hook cells' connect() hook ran once per
    // connection, the ebpf-tc cells' pod ingress program on every packet.
    for cell in &report.cells {
        match cell.mode.as_str() {
            "ebpf" | "ebpf-api" => assert!(
                cell.programs
                    .get("sock_connect4")
                    .is_some_and(|cost| cost.runs_per_conn >= 1.0),
                "{cell:?}"
            ),
            "ebpf-tc" => assert!(
                cell.programs
                    .get("tc_pod_ingress")
                    .is_some_and(|cost| cost.runs_per_conn >= 2.0),
                "{cell:?}"
            ),
            _ => {}
        }
    }
    // Socket-layer translation really ran in the `ebpf` and `ebpf-api` cells, and only
    // there: every such connection was translated at connect(), every `ebpf-tc` one by
    // TC.
    for cell in &report.cells {
        match cell.mode.as_str() {
            "ebpf" | "ebpf-api" => assert!(
                cell.socket_translated >= cell.connections && cell.tc_new_flows == 0,
                "{cell:?}"
            ),
            "ebpf-tc" => assert!(
                cell.socket_translated == 0 && cell.tc_new_flows >= cell.connections,
                "{cell:?}"
            ),
            _ => {}
        }
    }
    // One TC cost row per N and family.
    assert_eq!(report.tc.len(), 4);
    assert_eq!(
        report
            .tc
            .iter()
            .filter(|cost| cost.family == "IPv6")
            .count(),
        2
    );

    let files = report.write(&out).expect("writing results");
    for name in [
        "cells.csv",
        "summary.csv",
        "ratios.csv",
        "summary.md",
        "results.json",
        "plot.svg",
    ] {
        let path = out.join(name);
        assert!(files.contains(&path), "{name} not reported");
        let text = std::fs::read_to_string(&path).expect("result file");
        assert!(!text.is_empty(), "{name} is empty");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("json"))
            .expect("results.json parses");
    assert_eq!(
        json["cells"].as_array().map(Vec::len),
        Some(2 * config.modes.len())
    );
    assert!(std::fs::read_to_string(out.join("plot.svg"))
        .expect("svg")
        .starts_with("<svg"));
    std::fs::remove_dir_all(&out).expect("removing the results");
}

/// A limit no mode can meet: each limit path gives a "not programmed" cell, the run
/// goes on, and at the larger N the modes are not tried.
#[test]
fn a_mode_over_the_program_limit_gets_a_cell_that_says_so() {
    kpr_lab::require_root();
    require_tools();
    let out = std::env::temp_dir().join(format!("kpr-bench-limit-{}", std::process::id()));
    let config = Config {
        modes: vec![Mode::Ebpf, Mode::EbpfApi, Mode::Iptables, Mode::Nftables],
        services: vec![1, 2],
        endpoints: 1,
        duration: Duration::from_millis(200),
        stream_duration: Duration::from_millis(100),
        rounds: 1,
        clients: 1,
        tc_repeat: 100,
        tc_new_flows: 10,
        // Over before anything can finish.
        program_limit: Duration::from_nanos(1),
        out: out.clone(),
        command: "bench_smoke limit".into(),
        ..Config::default()
    };
    let report = bench::run(&config).expect("the run goes on past every limit");
    let table = report.table();
    eprintln!("{table}");
    assert_eq!(report.cells.len(), 2 * config.modes.len());
    for cell in &report.cells {
        assert!(cell.over_limit(), "{cell:?}");
        assert_eq!(cell.connections, 0, "{cell:?}");
        assert!(cell.program_ms.is_none(), "{cell:?}");
        let not_tried_after = (cell.services == 2).then_some(1);
        assert_eq!(cell.not_tried_after, not_tried_after, "{cell:?}");
    }
    let markdown = report.markdown();
    assert_eq!(report.summary.len(), report.cells.len());
    for row in &report.summary {
        let note = row.limit_note.as_deref().expect("a limit note");
        assert!(
            note.starts_with("not programmed in 0.000000001 s"),
            "{note}"
        );
        let line = table
            .lines()
            .find(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                words.first() == Some(&row.services.to_string().as_str())
                    && words.get(1) == Some(&row.mode.as_str())
            })
            .unwrap_or_else(|| panic!("no table row for {} at N={}", row.mode, row.services));
        assert!(line.contains(note), "{line}");
        assert!(
            markdown.contains(&format!("| {} | {} | {note} |", row.services, row.mode)),
            "{markdown}"
        );
    }
    // Nothing to compare with: no ratios.
    assert!(report.ratios.is_empty(), "{:?}", report.ratios);
    report.write(&out).expect("writing results");
    let cells = std::fs::read_to_string(out.join("cells.csv")).expect("cells.csv");
    assert_eq!(cells.lines().count(), 1 + report.cells.len());
    std::fs::remove_dir_all(&out).expect("removing the results");
}

/// A connection that fails is counted as an error, not dropped: every request to a
/// port where nothing listens (the client pod's own address) is refused, none
/// completes.
#[test]
fn failed_connections_are_counted() {
    kpr_lab::require_root();
    let mut lab = Lab::new().expect("lab");
    lab.add_pod("client", CLIENT_IP).expect("client pod");
    let nothing_listens = Arc::new(vec![SocketAddrV4::new(CLIENT_IP, 9)]);
    let result = workload::connect_request_close(
        &lab.pod("client").netns,
        &nothing_listens,
        1,
        Duration::from_millis(100),
    )
    .expect("the clients ran");
    assert_eq!(result.connections, 0);
    assert!(result.errors > 0, "{result:?}");
}

/// The kube-proxy modes load rules with [`TOOLS`].
fn require_tools() {
    for tool in TOOLS {
        let found = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .any(|dir| std::path::Path::new(dir).join(tool).is_file());
        assert!(
            found,
            "{tool} is missing: apt-get install iptables nftables (or run `cargo xtask bench` once)"
        );
    }
}
