//! A short run of the benchmark (`cargo xtask bench`) so it cannot rot: tiny service
//! counts, about a second per mode, every mode. It checks that each mode carries
//! traffic and that the result files are written; it asserts nothing about speed.
use std::time::Duration;

use kpr_lab::bench::{self, Config, Mode};

/// The kube-proxy modes load rules with these (Debian packages iptables, nftables);
/// `cargo xtask bench` installs them.
const TOOLS: &[&str] = &["iptables-nft-restore", "iptables-legacy-restore", "nft"];

#[test]
fn every_mode_carries_connections_and_the_results_are_written() {
    kpr_lab::require_root();
    for tool in TOOLS {
        let found = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .any(|dir| std::path::Path::new(dir).join(tool).is_file());
        assert!(
            found,
            "{tool} is missing: apt-get install iptables nftables (or run `cargo xtask bench` once)"
        );
    }
    let out = std::env::temp_dir().join(format!("kpr-bench-smoke-{}", std::process::id()));
    let config = Config {
        modes: vec![
            Mode::Ebpf,
            Mode::EbpfTc,
            Mode::Iptables,
            Mode::IptablesLegacy,
            Mode::Nftables,
            Mode::None,
        ],
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
        out: out.clone(),
        command: "bench_smoke".into(),
    };
    let report = bench::run(&config).expect("benchmark run");
    eprintln!("{}", report.table());

    assert_eq!(report.summary.len(), 2 * config.modes.len());
    for row in &report.summary {
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
    for mode in ["ebpf", "ebpf-tc"] {
        let ebpf = report
            .summary
            .iter()
            .find(|row| row.mode == mode)
            .unwrap_or_else(|| panic!("{mode} row"));
        assert!(ebpf.agent_peak_mib.is_some_and(|mib| mib > 0.0), "{mode}");
        assert!(ebpf.stop_ms.is_some(), "{mode}: the agent's stop time");
        assert!(ebpf.tc_established_ns.is_some_and(|ns| ns > 0.0), "{mode}");
    }
    // The per-program figures: the ebpf cells' connect() hook ran once per connection,
    // the ebpf-tc cells' pod ingress program on every packet.
    for cell in &report.cells {
        match cell.mode.as_str() {
            "ebpf" => assert!(
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
    // Socket-layer translation really ran in the `ebpf` cells, and only there: every
    // `ebpf` connection was translated at connect(), every `ebpf-tc` one by TC.
    for cell in &report.cells {
        match cell.mode.as_str() {
            "ebpf" => assert!(
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
    assert_eq!(report.tc.len(), 2);

    let files = report.write(&out).expect("writing results");
    for name in [
        "cells.csv",
        "summary.csv",
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
