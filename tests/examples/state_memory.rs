//! How much heap the agent's stages take for the benchmark's service set: the
//! manifest source's read (the state it keeps, and its transient peak), a second copy
//! of the snapshot's maps (what the API source publishes from its stores), the
//! incremental model, the syncer's mirror and index, and writing the names file. A counting allocator measures live and
//! peak bytes around each stage; the numbers are a breakdown of the agent's resident
//! memory, whose real figure comes from `cargo xtask bench` (`agent_peak_mib`).
//!
//! `cargo run --release -p kpr-lab --example state_memory -- [services] [endpoints]`
//! (50 000 and 10 by default). With `STATE_MEMORY_STOP=1` it exits right after the
//! syncer's stage, everything still allocated: under `heaptrack`, the "leaked" report
//! is then what the source, the model and the syncer keep, by allocation site.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, Result};
use kpr_lab::bench::services::ServiceSet;
use proxy_userspace::{
    model::{IncrementalModel, ModelSettings},
    names,
    source::manifests::ManifestDir,
    state::{ClusterState, EndpointInfo, ServiceInfo, SliceInfo},
    sync::{Capacity, MapOp, MapWriter, Syncer, WriteError},
};

/// Accepts every op: the syncer's own memory is measured, not the kernel's.
struct Accepting;

impl MapWriter for Accepting {
    fn apply(&mut self, _op: &MapOp) -> Result<(), WriteError> {
        Ok(())
    }
}

/// The system allocator, counting the bytes it holds now and at most.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counters are
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` hold for System too.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from `alloc` with this `layout`.
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

/// Runs `stage`, printing the heap it left allocated and its peak above the start.
fn measure<T>(name: &str, stage: impl FnOnce() -> T) -> T {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let value = stage();
    let after = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed);
    #[expect(clippy::cast_precision_loss, reason = "a printed MiB figure")]
    let (kept, transient) = (
        (after.saturating_sub(before)) as f64 / MIB,
        (peak - before) as f64 / MIB,
    );
    println!("{name:<44} kept {kept:>8.1} MiB   peak {transient:>8.1} MiB");
    value
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().map_or(Ok(50_000), |n| n.parse())?;
    let endpoints: usize = args.next().map_or(Ok(10), |n| n.parse())?;
    let dir = std::env::temp_dir().join(format!("kpr-state-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("temporary directory")?;
    let result = run(&dir, services, endpoints);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &std::path::Path, services: usize, endpoints: usize) -> Result<()> {
    for (name, yaml) in ServiceSet::new(services, endpoints)?.manifest_files(false) {
        std::fs::write(dir.join(name), yaml).context("writing a manifest")?;
    }
    println!(
        "{services} services x {endpoints} endpoints; ServiceInfo {} B, SliceInfo {} B, \
         EndpointInfo {} B",
        size_of::<ServiceInfo>(),
        size_of::<SliceInfo>(),
        size_of::<EndpointInfo>()
    );
    let mut source = ManifestDir::new(dir.to_owned(), Some("node-a".into()));
    let read = measure("manifest source: read the directory", || source.read())?;
    let state = &read.snapshot.state;
    let copy: ClusterState = measure("another copy of the snapshot's maps", || state.clone());
    drop(copy);
    let settings = ModelSettings::default();
    let mut model = IncrementalModel::default();
    measure("model: what the agent keeps of it", || {
        model.update(state, &settings)
    });
    let desired = model.desired();
    let mut syncer = Syncer::default().with_capacity(Capacity {
        services: usize::MAX,
        backends: usize::MAX,
    });
    measure("syncer: its mirror of the maps and index", || {
        syncer.sync(desired, &mut Accepting)
    });
    if std::env::var_os("STATE_MEMORY_STOP").is_some() {
        std::process::exit(0);
    }
    let id = std::cell::Cell::new(0u32);
    let ids = |_: &_, _: &_| {
        id.set(id.get() + 1);
        Some(id.get())
    };
    measure("names: write the file as they are made", || {
        names::write_current(&dir.join("names.json"), state, desired, ids, None)
    })?;
    let named = names::read(&dir.join("names.json"))?.map_or(0, |names| names.endpoints.len());
    println!(
        "frontends {}, endpoints named {named}",
        desired.v4.frontends.len()
    );
    Ok(())
}
