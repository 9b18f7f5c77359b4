//! Per-program run time of the agent's programs during a measurement (`--bpf-stats`):
//! the kernel's BPF statistics (`BPF_ENABLE_STATS`, the call behind
//! `sysctl kernel.bpf_stats_enabled=1`, switched on only while a descriptor is held) give
//! each program's run count and total run time, here per connection.
//!
//! A program's run time includes its helpers, so a header rewrite that must first copy a
//! cloned skb's header (`bpf_skb_store_bytes` -> `skb_ensure_writable` ->
//! `pskb_expand_head`: TCP transmits clones) shows up in the live figure but not in
//! BPF_PROG_TEST_RUN, whose crafted frames are never clones: comparing the two
//! measures that cost.
//!
//! The statistics are machine-wide while enabled (every BPF program on the machine pays
//! two clock reads per run), which is why they are opt-in. Only programs using the lab
//! agent's own counters map are read, so other labs' agents on the machine never mix in.
use std::{collections::BTreeMap, os::fd::OwnedFd, path::Path};

use anyhow::{Context as _, Result};
use aya::{maps::MapData, programs::loaded_programs};
use serde::Serialize;

/// Statistics stay on while this is held.
pub struct Enabled {
    _fd: OwnedFd,
}

/// Switches run-time statistics on until the result is dropped.
///
/// # Errors
/// When the kernel refuses (not root, or too old).
pub fn enable() -> Result<Enabled> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    Ok(Enabled { _fd: fd })
}

/// Run count and run time per program name, summed over programs of that name.
pub type Snapshot = BTreeMap<String, (u64, u64)>;

/// The lab agent's programs (those using the counters map pinned in `pin_dir`).
///
/// # Errors
/// When the map or the program list cannot be read.
pub fn snapshot(pin_dir: &Path) -> Result<Snapshot> {
    let counters = MapData::from_pin(pin_dir.join(proxy_common::names::COUNTERS))
        .context("opening the agent's counters map")?;
    let map_id = counters.info().context("map info")?.id();
    let mut totals = Snapshot::new();
    for program in loaded_programs() {
        // A program unloaded between listing and reading is no longer ours to count.
        let Ok(program) = program else { continue };
        let uses_map = program
            .map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.contains(&map_id));
        if !uses_map {
            continue;
        }
        let name = program.name_as_str().unwrap_or("?").to_owned();
        let entry = totals.entry(name).or_default();
        entry.0 += program.run_count();
        entry.1 += u64::try_from(program.run_time().as_nanos()).unwrap_or(u64::MAX);
    }
    Ok(totals)
}

/// One program's cost over a measurement.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProgramCost {
    /// Runs per connection.
    pub runs_per_conn: f64,
    /// Mean run time, nanoseconds.
    pub ns_per_run: f64,
    /// Run time per connection, nanoseconds.
    pub ns_per_conn: f64,
}

/// The cost of each program that ran between `before` and `after`, over `connections`.
#[must_use]
pub fn costs(
    before: &Snapshot,
    after: &Snapshot,
    connections: u64,
) -> BTreeMap<String, ProgramCost> {
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per = |value: u64, over: u64| value as f64 / over.max(1) as f64;
    after
        .iter()
        .filter_map(|(name, (runs, ns))| {
            let (runs_before, ns_before) = before.get(name).copied().unwrap_or_default();
            let runs = runs.saturating_sub(runs_before);
            let ns = ns.saturating_sub(ns_before);
            (runs > 0).then(|| {
                (
                    name.clone(),
                    ProgramCost {
                        runs_per_conn: per(runs, connections),
                        ns_per_run: per(ns, runs),
                        ns_per_conn: per(ns, connections),
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_per_connection_and_per_run() {
        let before = Snapshot::from([("tc_pod_ingress".into(), (10, 1_000))]);
        let after = Snapshot::from([
            ("tc_pod_ingress".into(), (110, 21_000)),
            ("idle".into(), (0, 0)),
        ]);
        let costs = costs(&before, &after, 20);
        assert_eq!(costs.len(), 1, "{costs:?}");
        let ingress = &costs["tc_pod_ingress"];
        assert!((ingress.runs_per_conn - 5.0).abs() < 1e-9);
        assert!((ingress.ns_per_run - 200.0).abs() < 1e-9);
        assert!((ingress.ns_per_conn - 1_000.0).abs() < 1e-9);
    }
}
