//! The agent's map walks, on a thread of their own: conntrack reaping, forgetting the
//! flows and affinities of removed backends, and the affinity map's fill.
//!
//! Each walk costs a syscall per entry, and the conntrack tables hold up to millions:
//! on the event loop, one walk would hold back a sync, the health and metrics
//! refreshes, and SIGTERM. Here the loop only sends a request; the thread walks on
//! handles of its own ([`Tables`]) and records the results in the metrics. A stop
//! request ends a walk between two entries, so shutdown never waits for one.
use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
};

use aya::maps::{HashMap, MapData};
use proxy_common::DatapathConfig;
use tracing::{debug, info, warn};

use crate::{
    datapath::{
        conntrack::{self, Tables},
        MapCapacities,
    },
    metrics::{MapLabels, Metrics},
};

/// A request to the upkeep thread.
enum Request {
    /// Reap expired conntrack entries (and count both tables' and the affinity
    /// map's live entries).
    Reap,
    /// Forget the UDP flows and affinities of these `(service id, backend id)` pairs.
    Forget(BTreeSet<(u32, u32)>),
    /// The same for IPv6 pairs (backend ids of the IPv6 backend map).
    ForgetV6(BTreeSet<(u32, u32)>),
}

/// The running upkeep thread.
pub struct Upkeep {
    /// Unbounded, so the event loop never waits for a walk: forgets are small and
    /// rare, and at most one reap waits at a time ([`Self::reap_queued`]).
    requests: Option<mpsc::Sender<Request>>,
    /// A reap is queued and not started yet: a tick meanwhile asks for nothing more.
    reap_queued: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upkeep {
    /// Starts the thread on `tables`; `config` carries the conntrack timeouts.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(
        mut tables: Tables,
        config: DatapathConfig,
        capacities: MapCapacities,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (requests, receiver) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let reap_queued = Arc::new(AtomicBool::new(false));
        let reap_started = Arc::clone(&reap_queued);
        let thread = std::thread::Builder::new()
            .name("kpr-upkeep".into())
            .spawn(move || {
                let keep_going = || !stopping.load(Ordering::Relaxed);
                while let Ok(request) = receiver.recv() {
                    if !keep_going() {
                        break;
                    }
                    match request {
                        Request::Reap => {
                            reap_started.store(false, Ordering::Relaxed);
                            reap(&mut tables, &config, capacities, &metrics, &keep_going);
                        }
                        Request::Forget(pairs) => forget::<conntrack::V4>(
                            [&mut tables.conntrack, &mut tables.conntrack_new],
                            &mut tables.affinity,
                            &pairs,
                            &keep_going,
                        ),
                        Request::ForgetV6(pairs) => forget::<conntrack::V6>(
                            [&mut tables.conntrack_v6, &mut tables.conntrack_new_v6],
                            &mut tables.affinity_v6,
                            &pairs,
                            &keep_going,
                        ),
                    }
                }
            })?;
        Ok(Self {
            requests: Some(requests),
            reap_queued,
            stop,
            thread: Some(thread),
        })
    }

    /// Asks for a reaping pass; skipped while one is queued and not started (that one
    /// will do).
    pub fn reap(&self) {
        if self.reap_queued.swap(true, Ordering::Relaxed) {
            debug!("conntrack reaping is behind; skipping a pass");
            return;
        }
        self.send(Request::Reap);
    }

    /// Asks to forget what tied clients to `pairs`.
    pub fn forget(&self, pairs: &BTreeSet<(u32, u32)>) {
        if !pairs.is_empty() {
            self.send(Request::Forget(pairs.clone()));
        }
    }

    /// Asks to forget what tied clients to IPv6 `pairs`.
    pub fn forget_v6(&self, pairs: &BTreeSet<(u32, u32)>) {
        if !pairs.is_empty() {
            self.send(Request::ForgetV6(pairs.clone()));
        }
    }

    fn send(&self, request: Request) {
        let Some(requests) = &self.requests else {
            return;
        };
        if requests.send(request).is_err() {
            warn!("the upkeep thread is gone; conntrack entries are not reaped, nor flows of removed backends forgotten");
        }
    }

    /// Stops the thread: a walk in progress ends after its current entry.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the upkeep thread panicked");
            }
        }
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reap(
    tables: &mut Tables,
    config: &DatapathConfig,
    capacities: MapCapacities,
    metrics: &Metrics,
    keep_going: &dyn Fn() -> bool,
) {
    let now = conntrack::monotonic_now_ns();
    reap_family::<conntrack::V4>(
        [&mut tables.conntrack, &mut tables.conntrack_new],
        &tables.affinity,
        [
            capacities.conntrack,
            capacities.conntrack_new,
            capacities.affinity,
        ],
        config,
        now,
        metrics,
        keep_going,
    );
    reap_family::<conntrack::V6>(
        [&mut tables.conntrack_v6, &mut tables.conntrack_new_v6],
        &tables.affinity_v6,
        [
            capacities.conntrack_v6,
            capacities.conntrack_new_v6,
            capacities.affinity_v6,
        ],
        config,
        now,
        metrics,
        keep_going,
    );
}

/// One family's reaping pass and fill (both conntrack tables, the affinity map).
fn reap_family<L: conntrack::CtLayout>(
    [table, table_new]: [&mut HashMap<MapData, L::Key, L::Entry>; 2],
    affinity: &HashMap<MapData, L::AffinityKey, proxy_common::AffinityValueV4>,
    [capacity, capacity_new, capacity_affinity]: [u32; 3],
    config: &DatapathConfig,
    now: u64,
    metrics: &Metrics,
    keep_going: &dyn Fn() -> bool,
) {
    match conntrack::collect_expired_in::<L>(table, table_new, config, now, keep_going) {
        Ok(report) if keep_going() => {
            debug!(
                table = L::CONNTRACK,
                live = report.live,
                removed = report.removed,
                "conntrack reaped"
            );
            metrics.conntrack_reaped.inc_by(report.removed as u64);
            record_fill(metrics, L::CONNTRACK, report.live, capacity);
            record_fill(metrics, L::CONNTRACK_NEW, report.live_new, capacity_new);
        }
        Ok(_) => {}
        Err(error) => warn!(error = %crate::error_chain(&error), "conntrack reaping failed"),
    }
    let affinities = conntrack::count_affinities::<L>(affinity, keep_going);
    if keep_going() {
        record_fill(metrics, L::AFFINITY, affinities, capacity_affinity);
    }
}

fn forget<L: conntrack::CtLayout>(
    tables: [&mut HashMap<MapData, L::Key, L::Entry>; 2],
    affinity: &mut HashMap<MapData, L::AffinityKey, proxy_common::AffinityValueV4>,
    pairs: &BTreeSet<(u32, u32)>,
    keep_going: &dyn Fn() -> bool,
) {
    match conntrack::forget_backends_in::<L>(tables, affinity, pairs, keep_going) {
        Ok((flows, affinities)) if flows + affinities > 0 => {
            info!(
                udp_flows = flows,
                affinities, "forgot flows of removed backends"
            );
        }
        Ok(_) => {}
        Err(error) => {
            warn!(error = %crate::error_chain(&error), "cannot flush flows of removed backends");
        }
    }
}

/// Sets a map's fill from a walk's count of live entries.
pub fn record_fill(metrics: &Metrics, map: &str, live: usize, capacity: u32) {
    let labels = MapLabels {
        map: map.to_owned(),
    };
    metrics
        .map_entries
        .get_or_create(&labels)
        .set(i64::try_from(live).unwrap_or(i64::MAX));
    metrics
        .map_capacity
        .get_or_create(&labels)
        .set(i64::from(capacity));
}
