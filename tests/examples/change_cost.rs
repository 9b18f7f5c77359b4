//! What the benchmark's one endpoint change costs each stage of the agent, at N
//! services: the manifest source's read of the changed file, the model's update, and
//! the syncer's pass for the changes (and, for the first pass, the names file) (against a writer that accepts every op, so the
//! figure is the syncer's own work, not the kernel's). The agent logs the same stages
//! per pass (`model_ms`, `syncer_ms`); this runs them without a kernel, many times, so
//! a change to one of them can be measured on its own.
//!
//! `cargo run --release -p kpr-lab --example change_cost -- [services] [endpoints] [rounds]`
//! (50 000, 10 and 20 by default).
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use kpr_lab::bench::services::ServiceSet;
use proxy_userspace::{
    model::{IncrementalModel, ModelSettings},
    names,
    source::manifests::ManifestDir,
    sync::{Capacity, MapOp, MapWriter, Syncer, WriteError},
};

/// Accepts every op: the maps are not what is measured.
struct Accepting {
    ops: usize,
}

impl MapWriter for Accepting {
    fn apply(&mut self, _op: &MapOp) -> Result<(), WriteError> {
        self.ops += 1;
        Ok(())
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().map_or(Ok(50_000), |n| n.parse())?;
    let endpoints: usize = args.next().map_or(Ok(10), |n| n.parse())?;
    let rounds: usize = args.next().map_or(Ok(20), |n| n.parse())?;
    let dir = std::env::temp_dir().join(format!("kpr-change-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("temporary directory")?;
    let result = run(&dir, services, endpoints, rounds);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run(dir: &std::path::Path, services: usize, endpoints: usize, rounds: usize) -> Result<()> {
    let set = ServiceSet::new(services, endpoints)?;
    for (name, yaml) in set.manifest_files(false) {
        std::fs::write(dir.join(name), yaml).context("writing a manifest")?;
    }
    let mut source = ManifestDir::new(dir.to_owned(), Some("node-a".into()));
    let settings = ModelSettings::default();
    let mut model = IncrementalModel::default();
    // Sized for the set, as the agent sizes its maps at start for the cluster it finds.
    let mut syncer = Syncer::default().with_capacity(Capacity {
        services: services * (endpoints + 2) * 2,
        backends: services * (endpoints + 1),
    });
    let mut writer = Accepting { ops: 0 };

    let started = Instant::now();
    let first = source.read()?;
    let read_first = started.elapsed();
    let started = Instant::now();
    model.update(&first.snapshot.state, &settings);
    let model_first = started.elapsed();
    let started = Instant::now();
    syncer.sync(model.desired(), &mut writer);
    let sync_first = started.elapsed();
    let started = Instant::now();
    names::write_current(
        &dir.join("names.json"),
        &first.snapshot.state,
        model.desired(),
        // IPv4 services only here: the one syncer is IPv4's.
        |family: &_, name: &_| {
            (*family == proxy_userspace::state::AddressType::IPv4)
                .then(|| syncer.service_id(name))
                .flatten()
        },
        None,
    )?;
    let names_written = started.elapsed();
    println!(
        "{services} services x {endpoints} endpoints, first pass: read {:.1} ms, model {:.1} ms, \
         syncer {:.1} ms ({} ops), names file {:.1} ms",
        millis(read_first),
        millis(model_first),
        millis(sync_first),
        writer.ops,
        millis(names_written)
    );
    drop(first);

    // The change and its undoing alternate, so every round changes one slice.
    let changed = set.changed_manifest_file();
    let unchanged = set
        .manifest_files(false)
        .into_iter()
        .next()
        .context("the service set has no manifest file")?;
    let (mut read, mut update, mut sync) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (name, yaml) = if round % 2 == 0 { &changed } else { &unchanged };
        std::fs::write(dir.join(name), yaml).context("writing the changed manifest")?;
        let started = Instant::now();
        let next = source.read()?;
        read.push(millis(started.elapsed()));
        let started = Instant::now();
        let changes = model.update(&next.snapshot.state, &settings);
        update.push(millis(started.elapsed()));
        writer.ops = 0;
        let started = Instant::now();
        syncer.sync_changes(model.desired(), &changes, &mut writer);
        sync.push(millis(started.elapsed()));
        anyhow::ensure!(
            changes.frontends.len() == 1 && writer.ops > 0,
            "round {round}: the change touched {} frontends and wrote {} ops, not one frontend",
            changes.frontends.len(),
            writer.ops
        );
    }
    if std::env::var_os("KPR_CHANGE_COST_ROUNDS").is_some() {
        println!("read ms {read:.2?}\nmodel ms {update:.3?}\nsyncer ms {sync:.3?}");
    }
    println!(
        "one endpoint change, median of {rounds}: read {:.2} ms, model {:.3} ms, syncer {:.3} ms",
        median(read),
        median(update),
        median(sync)
    );
    Ok(())
}
