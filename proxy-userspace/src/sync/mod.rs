//! Turns desired frontends into service/backend map writes, writing only the
//! difference with what the maps hold.
//!
//! The syncer keeps a [`Mirror`] of the two maps it owns (read back from the kernel at
//! start, so a restarted agent adopts what a previous one wrote) and, per frontend,
//! emits [`MapOp`]s in an order that keeps every packet on a valid backend:
//!
//! 1. new backends are written before any slot names them;
//! 2. slots `1..=n` are written before the frontend's count is raised to `n`;
//! 3. the count is lowered before the slots above it are deleted;
//! 4. a frontend entry is deleted before its slots, and backends are deleted last,
//!    once no slot names them.
//!
//! A datapath reader that sees count `n` therefore always finds slots `1..=n` and their
//! backends (`proxy-ebpf/src/service.rs` relies on this). Each op updates the mirror only
//! once the writer has applied it, so a failed write (a full map) leaves the mirror equal
//! to the kernel and the next pass retries.
pub mod frontend_addrs;
pub mod services;
#[cfg(test)]
mod tests;

use std::{collections::BTreeSet, net::Ipv4Addr};

use proxy_common::{backend_flags, ServiceValueV4};

pub use self::services::ServiceEntries;
use crate::{
    family::Family,
    model::{sorted::SortedSet, Desired, FrontendKey, FrontendSpec, ModelChanges, ServicePortName},
    FastMap, FastSet,
};

/// One write to the service, backend or source-range map of family `F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp<F: Family = Ipv4Addr> {
    PutBackend {
        id: u32,
        backend: F::Backend,
    },
    DeleteBackend {
        id: u32,
    },
    PutService {
        key: F::ServiceKey,
        value: ServiceValueV4,
    },
    DeleteService {
        key: F::ServiceKey,
    },
    PutSourceRange {
        key: SourceRangeKey<F>,
    },
    DeleteSourceRange {
        key: SourceRangeKey<F>,
    },
}

/// One loadBalancerSourceRanges entry: a service port's id and a CIDR of family `F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRangeKey<F: Family = Ipv4Addr> {
    pub service_id: u32,
    pub addr: F,
    pub prefix_len: u8,
}

impl<F: Family> SourceRangeKey<F> {
    /// The LPM trie key: the service id matches whole, the address by prefix.
    #[must_use]
    pub fn trie_key(&self) -> aya::maps::lpm_trie::Key<F::RangeData> {
        aya::maps::lpm_trie::Key::new(
            32 + u32::from(self.prefix_len),
            F::range_data(self.service_id, self.addr),
        )
    }

    /// The entry a trie key stands for.
    #[must_use]
    pub fn from_trie(key: &aya::maps::lpm_trie::Key<F::RangeData>) -> Self {
        let (service_id, addr) = F::from_range_data(&key.data());
        Self {
            service_id,
            addr,
            prefix_len: u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(F::BITS),
        }
    }
}

/// A map write the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{op:?} failed: {message}")]
pub struct WriteError<F: Family = Ipv4Addr> {
    pub op: MapOp<F>,
    pub message: String,
    /// The map is full (E2BIG / ENOMEM / ENOSPC): a capacity problem, not a bug.
    pub map_full: bool,
}

/// Something that applies map writes of family `F`: the real BPF maps, or in tests a
/// recorder.
pub trait MapWriter<F: Family = Ipv4Addr> {
    /// Applies one op.
    ///
    /// # Errors
    /// When the kernel refuses the write.
    fn apply(&mut self, op: &MapOp<F>) -> Result<(), WriteError<F>>;

    /// Applies `ops` in order, stopping at the first the kernel refuses: how many were
    /// applied (a prefix of `ops`), and the error of the next one. The same writes as
    /// [`Self::apply`] one by one (the default), in fewer calls where the writer can.
    fn apply_batch(&mut self, ops: &[MapOp<F>]) -> (usize, Option<WriteError<F>>) {
        for (applied, op) in ops.iter().enumerate() {
            if let Err(error) = self.apply(op) {
                return (applied, Some(error));
            }
        }
        (ops.len(), None)
    }
}

/// What the syncer believes the service and backend maps of family `F` hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror<F: Family = Ipv4Addr> {
    /// One entry per frontend inside, the map's keys and values outside.
    pub services: ServiceEntries<F>,
    pub backends: FastMap<u32, F::Backend>,
    pub source_ranges: BTreeSet<SourceRangeKey<F>>,
}

impl<F: Family> Default for Mirror<F> {
    fn default() -> Self {
        Self {
            services: ServiceEntries::default(),
            backends: FastMap::default(),
            source_ranges: BTreeSet::new(),
        }
    }
}

impl<F: Family> Mirror<F> {
    fn apply(&mut self, op: &MapOp<F>) {
        match *op {
            MapOp::PutBackend { id, backend } => {
                self.backends.insert(id, backend);
            }
            MapOp::DeleteBackend { id } => {
                self.backends.remove(&id);
            }
            MapOp::PutService { key, value } => {
                self.services.insert(key, value);
            }
            MapOp::DeleteService { key } => {
                self.services.remove(&key);
            }
            MapOp::PutSourceRange { key } => {
                self.source_ranges.insert(key);
            }
            MapOp::DeleteSourceRange { key } => {
                self.source_ranges.remove(&key);
            }
        }
    }

    /// How many entries of each map differ between `self` and `other` (present in
    /// one only, or with another value): service map, backend map, source ranges.
    #[must_use]
    pub fn differences(&self, other: &Self) -> [usize; 3] {
        fn count<K: Eq + std::hash::Hash, V: PartialEq>(
            a: &FastMap<K, V>,
            b: &FastMap<K, V>,
        ) -> usize {
            a.iter()
                .filter(|(key, value)| b.get(*key) != Some(*value))
                .count()
                + b.keys().filter(|key| !a.contains_key(*key)).count()
        }
        [
            self.services.differences(&other.services),
            count(&self.backends, &other.backends),
            self.source_ranges
                .symmetric_difference(&other.source_ranges)
                .count(),
        ]
    }

    /// The frontend entries (slot 0), without walking their slots.
    pub fn frontends(&self) -> impl Iterator<Item = (&F::ServiceKey, &ServiceValueV4)> {
        self.services.heads()
    }

    /// `(service id, backend id)` pairs a packet can reach: the slots `1..=count` of
    /// every frontend (slots above a count are never read by the datapath). The full
    /// walk the syncer's index spares it; the tests check the two agree.
    #[cfg(test)]
    fn pairs_in_use(&self) -> BTreeSet<(u32, u32)> {
        let mut pairs = BTreeSet::new();
        for (head_key, head) in self.frontends() {
            for slot in 1..=head.count {
                let key = F::key_with_slot(head_key, slot);
                if let Some(value) = self.services.get(&key) {
                    pairs.insert((head.service_id, value.backend_id));
                }
            }
        }
        pairs
    }
}

/// The map key of a frontend's slot.
#[must_use]
pub fn service_key<F: Family>(frontend: &FrontendKey<F>, slot: u16) -> F::ServiceKey {
    F::service_key(frontend, slot)
}

/// The map value of a backend; `local`: the endpoint runs on this node.
#[must_use]
pub fn backend_value<F: Family>(addr: F::Socket, proto: u8, local: bool) -> F::Backend {
    F::backend(&addr, proto, if local { backend_flags::LOCAL } else { 0 })
}

/// A frontend the kernel refused to take (fully or partly).
#[derive(Debug)]
pub struct FrontendFailure<F: Family = Ipv4Addr> {
    pub frontend: FrontendKey<F>,
    pub service_port: ServicePortName,
    pub error: WriteError<F>,
}

/// What one sync pass did.
#[derive(Debug)]
pub struct SyncReport<F: Family = Ipv4Addr> {
    /// Frontends written (created or changed).
    pub frontends_written: usize,
    /// Frontends removed.
    pub frontends_removed: usize,
    /// Map writes applied.
    pub ops_applied: usize,
    /// Frontends the kernel refused; their old state (if any) stays in place.
    pub failures: Vec<FrontendFailure<F>>,
    /// Ops on leftover entries that failed (retried on the next pass).
    pub cleanup_errors: Vec<WriteError<F>>,
    /// `(service id, backend id)` pairs that stopped being used: their UDP flows and
    /// affinity entries must go.
    pub removed_pairs: BTreeSet<(u32, u32)>,
    /// A frontend entry (slot 0) was created or deleted: the set of frontends the maps
    /// hold changed (what needs a look at every frontend only then).
    pub frontend_set_changed: bool,
}

impl<F: Family> Default for SyncReport<F> {
    fn default() -> Self {
        Self {
            frontends_written: 0,
            frontends_removed: 0,
            ops_applied: 0,
            failures: Vec::new(),
            cleanup_errors: Vec::new(),
            removed_pairs: BTreeSet::new(),
            frontend_set_changed: false,
        }
    }
}

impl<F: Family> SyncReport<F> {
    /// Adds what a second pass right after this one did: its failures replace these
    /// (they are the state now), the rest adds up.
    pub fn merge(&mut self, later: Self) {
        self.frontends_written += later.frontends_written;
        self.frontends_removed += later.frontends_removed;
        self.ops_applied += later.ops_applied;
        self.frontend_set_changed |= later.frontend_set_changed;
        self.failures = later.failures;
        self.cleanup_errors.extend(later.cleanup_errors);
        self.removed_pairs.extend(later.removed_pairs);
    }

    /// Whether the pass wrote the maps: nothing failed but frontends that do not fit
    /// (a capacity limit, reported per frontend). A failed write of any other kind
    /// means the maps could not be written, and the pass must be retried.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.failures.iter().all(|failure| failure.error.map_full)
            && self.cleanup_errors.iter().all(|error| error.map_full)
    }
}

/// How many entries the service and backend maps hold at most (their max_entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: proxy_common::capacity::SERVICES_V4 as usize,
            backends: proxy_common::capacity::BACKENDS_V4 as usize,
        }
    }
}

/// Keeps the service and backend maps equal to the desired state.
///
/// A frontend that does not fit the room left in the maps is refused before anything
/// of it is written (its old state, if any, stays): it can neither fill the maps and
/// be rolled back on every pass, nor take the room of the frontends after it. Room is
/// made first: frontends nobody wants any more are removed before the desired ones are
/// written.
#[derive(Debug)]
pub struct Syncer<F: Family = Ipv4Addr> {
    capacity: Capacity,
    mirror: Mirror<F>,
    backend_ids: FastMap<F::Backend, u32>,
    next_backend_id: u32,
    /// Every service port of the desired state: its id and how many desired
    /// frontends it has (one map, not one for each: a map of 50 000 service port
    /// names is 4.7 MiB).
    ports: FastMap<ServicePortName, PortEntry>,
    /// The ids in `ports`.
    ids_in_use: FastSet<u32>,
    next_service_id: u32,
    /// The last full pass (and every pass since) wrote everything: the maps equal the
    /// last desired state, so a pass over what changed since is enough. Unset after
    /// an adoption and after any failed write.
    incremental_ready: bool,
    /// See [`Self::service_id_changes`].
    service_id_changes: u64,
    /// Writes applied (and mirrors adopted) so far: tells whether the maps changed
    /// between two moments.
    writes: u64,
    /// What keeps a pass's cleanup from walking every entry (the service map holds a
    /// frontend plus a slot per backend: 550 000 entries at 50 000 x 10).
    index: MirrorIndex<F>,
}

impl<F: Family> Default for Syncer<F> {
    fn default() -> Self {
        Self::adopt(Mirror::default())
    }
}

/// A desired service port's id and how many desired frontends it has.
#[derive(Debug, Default)]
struct PortEntry {
    /// `None` only while a pass is giving ids out.
    id: Option<u32>,
    refs: u32,
}

/// The most ops a pass hands the writer in one call (the kernel writes a batch of
/// them entry by entry, so more would save no syscall worth having, and hold more
/// memory).
const BATCH_OPS: usize = 8192;

/// Frontends planned for one writer call, with their ops in write order: every
/// backend they need written first (a backend before any slot that names it), then
/// each frontend's service map ops in the order of the module's notes.
struct Chunk<'a, F: Family> {
    backend_ops: Vec<MapOp<F>>,
    /// The index in `frontends` of the frontend that queued each backend op.
    backend_owners: Vec<usize>,
    /// The backend ids `backend_ops` writes, with the index of their op.
    queued_backends: FastMap<u32, usize>,
    service_ops: Vec<MapOp<F>>,
    frontends: Vec<Planned<'a, F>>,
    /// Entries the chunk adds to the service map and removes from it, and adds to
    /// the backend map: room taken before the next frontend's check.
    services_added: usize,
    services_removed: usize,
    backends_added: usize,
}

impl<F: Family> Default for Chunk<'_, F> {
    fn default() -> Self {
        Self {
            backend_ops: Vec::new(),
            backend_owners: Vec::new(),
            queued_backends: FastMap::default(),
            service_ops: Vec::new(),
            frontends: Vec::new(),
            services_added: 0,
            services_removed: 0,
            backends_added: 0,
        }
    }
}

impl<F: Family> Chunk<'_, F> {
    fn len(&self) -> usize {
        self.backend_ops.len() + self.service_ops.len()
    }

    /// Empty, keeping the room of its buffers.
    fn clear(&mut self) {
        self.backend_ops.clear();
        self.backend_owners.clear();
        self.queued_backends.clear();
        self.service_ops.clear();
        self.frontends.clear();
        self.services_added = 0;
        self.services_removed = 0;
        self.backends_added = 0;
    }
}

/// One frontend of a [`Chunk`].
struct Planned<'a, F: Family> {
    frontend: &'a FrontendKey<F>,
    spec: &'a FrontendSpec<F>,
    /// The last of the chunk's backend ops it needs (its own or another's).
    last_backend_op: Option<usize>,
    /// Its ops in the chunk's `service_ops`.
    service_ops: std::ops::Range<usize>,
}

/// Indexes over the mirror, kept by [`Syncer::apply`] op by op, so that a pass looks
/// only at what it touched: which backends lost their last slot, which frontends share
/// a service id, and whether orphan slots can exist at all.
#[derive(Debug)]
struct MirrorIndex<F: Family> {
    /// Slot entries (slot > 0, whatever the count) naming each backend id.
    backend_refs: FastMap<u32, u32>,
    /// Frontend entries (slot 0) by service id.
    heads_by_service: FastMap<u32, SortedSet<F::ServiceKey>>,
    /// How many frontend entries (slot 0) each address has.
    heads_by_addr: FastMap<F, usize>,
    /// Backends that may be named by no slot: written, or lost their last slot, since
    /// the last collection (all of them after an adoption).
    maybe_unused: BTreeSet<u32>,
    /// Slots no frontend count covers may exist: after an adoption and after any
    /// failed write (an update or removal stopped part-way). Without a failure, a pass
    /// deletes the slots above every count it lowers itself.
    orphans_possible: bool,
    /// This pass: each frontend it touched, with its `(service id, backend id)` pairs
    /// before the first change.
    touched: FastMap<F::ServiceKey, Vec<(u32, u32)>>,
    /// This pass: backend ids handed out (they may never be written).
    allocated: Vec<(F::Backend, u32)>,
}

impl<F: Family> MirrorIndex<F> {
    fn of(mirror: &Mirror<F>) -> Self {
        let mut index = Self {
            backend_refs: FastMap::default(),
            heads_by_service: FastMap::default(),
            heads_by_addr: FastMap::default(),
            maybe_unused: mirror.backends.keys().copied().collect(),
            orphans_possible: true,
            touched: FastMap::default(),
            allocated: Vec::new(),
        };
        for (key, value) in mirror.services.iter() {
            if F::key_slot(&key) == 0 {
                index
                    .heads_by_service
                    .entry(value.service_id)
                    .or_default()
                    .insert_key(key);
                *index.heads_by_addr.entry(F::key_addr(&key)).or_default() += 1;
            } else {
                *index.backend_refs.entry(value.backend_id).or_default() += 1;
            }
        }
        index
    }

    fn add_ref(&mut self, id: u32) {
        *self.backend_refs.entry(id).or_default() += 1;
    }

    fn drop_ref(&mut self, id: u32) {
        if let Some(count) = self.backend_refs.get_mut(&id) {
            *count -= 1;
            if *count == 0 {
                self.backend_refs.remove(&id);
                self.maybe_unused.insert(id);
            }
        }
    }
}

/// Whether `id` is one of the service ids family `F` hands out.
fn in_id_range<F: Family>(id: u32) -> bool {
    (F::SERVICE_IDS.0..F::SERVICE_IDS.1).contains(&id)
}

impl<F: Family> Syncer<F> {
    /// A syncer for maps that hold `mirror` (empty maps, or what the kernel holds
    /// after a restart).
    #[must_use]
    pub fn adopt(mut mirror: Mirror<F>) -> Self {
        mirror.services.shrink_to_fit();
        let backend_ids = mirror.backends.iter().map(|(&id, &b)| (b, id)).collect();
        let next_backend_id = mirror
            .backends
            .keys()
            .max()
            .map_or(1, |max| max.wrapping_add(1));
        let next_service_id = mirror
            .frontends()
            .map(|(_, value)| value.service_id)
            .filter(|id| in_id_range::<F>(*id))
            .max()
            .map_or(F::SERVICE_IDS.0, |max| max.wrapping_add(1));
        Self {
            capacity: Capacity::default(),
            backend_ids,
            next_backend_id,
            ports: FastMap::default(),
            ids_in_use: FastSet::default(),
            next_service_id,
            incremental_ready: false,
            service_id_changes: 0,
            writes: 0,
            index: MirrorIndex::of(&mirror),
            mirror,
        }
    }

    /// How many writes the syncer applied (and mirrors it adopted): equal at two
    /// moments when it did not touch the maps in between.
    #[must_use]
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Takes `mirror`, read from the maps themselves, as what they hold (after someone
    /// else wrote them): the next [`Self::sync`] repairs whatever differs from the
    /// desired state. Service ids stay; ids in use in `mirror` are never handed out.
    pub fn readopt(&mut self, mirror: Mirror<F>) {
        let adopted = Self::adopt(mirror);
        self.backend_ids = adopted.backend_ids;
        self.next_backend_id = self.next_backend_id.max(adopted.next_backend_id);
        self.next_service_id = self.next_service_id.max(adopted.next_service_id);
        self.mirror = adopted.mirror;
        self.index = adopted.index;
        self.incremental_ready = false;
        self.writes += 1;
    }

    /// The same syncer, for maps of `capacity`.
    #[must_use]
    pub fn with_capacity(self, capacity: Capacity) -> Self {
        Self { capacity, ..self }
    }

    /// What the syncer believes the maps hold.
    #[must_use]
    pub fn mirror(&self) -> &Mirror<F> {
        &self.mirror
    }

    /// The address of every frontend the service map holds (once per frontend entry),
    /// from the index: what a walk of the mirror's frontend entries finds, without
    /// walking their slots.
    pub fn frontend_addrs(&self) -> impl Iterator<Item = F> + '_ {
        self.index
            .heads_by_service
            .values()
            .flatten()
            .map(F::key_addr)
    }

    /// Whether the service map holds a frontend at `addr`.
    #[must_use]
    pub fn holds_frontend_at(&self, addr: F) -> bool {
        self.index.heads_by_addr.contains_key(&addr)
    }

    /// The ids of the service ports of the desired state last synced.
    pub fn service_ids_in_use(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids_in_use.iter().copied()
    }

    /// Moves whenever the set of service ids in use changes.
    #[must_use]
    pub fn service_id_changes(&self) -> u64 {
        self.service_id_changes
    }

    /// The id of a service port, if it has one.
    #[must_use]
    pub fn service_id(&self, name: &ServicePortName) -> Option<u32> {
        self.ports.get(name).and_then(|port| port.id)
    }

    /// Brings the maps to `desired`, through `writer`.
    pub fn sync(&mut self, desired: &Desired, writer: &mut impl MapWriter<F>) -> SyncReport<F> {
        let mut report = SyncReport::default();
        self.index.touched.clear();
        self.index.allocated.clear();
        self.reserve_for(desired);
        self.assign_service_ids(desired);
        // Ranges before the frontends that check them, stale ones after: a client in
        // range is never dropped while a service is being written.
        let wanted_ranges = self.wanted_source_ranges(desired);
        for key in wanted_ranges.difference(&self.mirror.source_ranges.clone()) {
            if let Err(error) = self.apply(MapOp::PutSourceRange { key: *key }, writer, &mut report)
            {
                report.cleanup_errors.push(error);
            }
        }
        // Room first: what nobody wants goes before anything new is written.
        self.remove_undesired(desired, writer, &mut report);
        let part = F::part(desired);
        let frontends = part.frontends.iter().map(|(key, spec)| (key, &**spec));
        self.write_frontends(frontends, &part.local_endpoints, writer, &mut report);
        self.remove_orphan_slots(writer, &mut report);
        let stale_ranges: Vec<SourceRangeKey<F>> = self
            .mirror
            .source_ranges
            .difference(&wanted_ranges)
            .copied()
            .collect();
        for key in stale_ranges {
            if let Err(error) = self.apply(MapOp::DeleteSourceRange { key }, writer, &mut report) {
                report.cleanup_errors.push(error);
            }
        }
        self.finish_pass(writer, &mut report);
        report
    }

    /// Makes room in the mirror for every frontend `desired` asks for, at once: grown
    /// entry by entry, its last resize holds the old table and the new one together.
    fn reserve_for(&mut self, desired: &Desired) {
        let wanted = F::part(desired).frontends.len();
        let services = &mut self.mirror.services;
        services.reserve(wanted.saturating_sub(services.frontend_count()));
    }

    /// Whether [`Self::sync_changes`] can bring the maps to a desired state from what
    /// changed alone (else it runs a full pass).
    #[must_use]
    pub fn incremental_ready(&self) -> bool {
        self.incremental_ready
    }

    /// Brings the maps to `desired` looking only at what `changes` names, when the
    /// maps held the desired state before those changes (every pass since the last
    /// full one wrote everything); otherwise, and when everything changed, a full
    /// [`Self::sync`]. Same writes in the same order as a full pass.
    pub fn sync_changes(
        &mut self,
        desired: &Desired,
        changes: &ModelChanges,
        writer: &mut impl MapWriter<F>,
    ) -> SyncReport<F> {
        if !self.incremental_ready || changes.all {
            return self.sync(desired, writer);
        }
        let mut report = SyncReport::default();
        self.index.touched.clear();
        self.index.allocated.clear();
        let (range_ports, mut range_ids) = self.assign_changed_service_ids(desired, changes);
        let mut wanted_ranges = BTreeSet::new();
        for name in &range_ports {
            let Some(service_id) = self.service_id(name) else {
                continue;
            };
            range_ids.insert(service_id);
            for &(addr, prefix_len) in F::part(desired)
                .source_ranges
                .get(name)
                .into_iter()
                .flatten()
            {
                wanted_ranges.insert(SourceRangeKey {
                    service_id,
                    addr,
                    prefix_len,
                });
            }
        }
        let held_ranges: BTreeSet<SourceRangeKey<F>> = range_ids
            .iter()
            .flat_map(|&service_id| self.held_source_ranges(service_id))
            .collect();
        // Ranges before the frontends that check them, stale ones after (as in sync).
        for key in wanted_ranges.difference(&held_ranges) {
            if let Err(error) = self.apply(MapOp::PutSourceRange { key: *key }, writer, &mut report)
            {
                report.cleanup_errors.push(error);
            }
        }
        // Room first: what nobody wants goes before anything new is written.
        let part = F::part(desired);
        for frontend in F::changed_frontends(changes).keys() {
            if part.frontends.contains_key(frontend) {
                continue;
            }
            let head_key = service_key(frontend, 0);
            if let Some(head) = self.mirror.services.get(&head_key) {
                self.remove_frontend(head_key, head, writer, &mut report);
            }
        }
        let frontends = F::changed_frontends(changes)
            .keys()
            .filter_map(|frontend| part.frontends.get_key_value(frontend))
            .map(|(key, spec)| (key, &**spec));
        self.write_frontends(frontends, &part.local_endpoints, writer, &mut report);
        self.remove_orphan_slots(writer, &mut report);
        for key in held_ranges.difference(&wanted_ranges) {
            if let Err(error) =
                self.apply(MapOp::DeleteSourceRange { key: *key }, writer, &mut report)
            {
                report.cleanup_errors.push(error);
            }
        }
        self.finish_pass(writer, &mut report);
        report
    }

    /// The source range entries the maps hold for one service id.
    fn held_source_ranges(&self, service_id: u32) -> impl Iterator<Item = SourceRangeKey<F>> + '_ {
        let first = SourceRangeKey {
            service_id,
            addr: F::unspecified(),
            prefix_len: 0,
        };
        self.mirror
            .source_ranges
            .range(first..)
            .take_while(move |key| key.service_id == service_id)
            .copied()
    }

    /// What ends every pass: backends no slot names go, the pairs taken out of use are
    /// reported, and whether the next pass may look at changes alone.
    fn finish_pass(&mut self, writer: &mut impl MapWriter<F>, report: &mut SyncReport<F>) {
        self.collect_backends(writer, report);
        // From the maps' state before and after, not from what the pass meant to do:
        // a pass that fails part-way still reports every pair it took out of use.
        report.removed_pairs = self.removed_pairs();
        // This pass's bookkeeping goes with it: after a first pass it held every
        // frontend (2.7 MiB at 50 000), and a later pass touches a handful.
        self.index.touched = FastMap::default();
        self.incremental_ready = report.failures.is_empty() && report.cleanup_errors.is_empty();
    }

    /// [`Self::assign_service_ids`] for the service ports of changed frontends only: a
    /// port that lost its last frontend loses its id, one that gained its first gets
    /// one. Returns the ports whose source ranges need a look (changed, or their id
    /// did) and the ids that went.
    fn assign_changed_service_ids(
        &mut self,
        desired: &Desired,
        changes: &ModelChanges,
    ) -> (BTreeSet<ServicePortName>, BTreeSet<u32>) {
        let mut range_ports = F::changed_ranges(changes).clone();
        let mut gone_ids = BTreeSet::new();
        let moved: Vec<(
            &FrontendKey<F>,
            Option<&ServicePortName>,
            Option<&ServicePortName>,
        )> = F::changed_frontends(changes)
            .iter()
            .map(|(key, before)| {
                let after = F::part(desired)
                    .frontends
                    .get(key)
                    .map(|spec| &spec.service_port);
                (key, before.as_ref(), after)
            })
            .filter(|(_, before, after)| before != after)
            .collect();
        // Ports that went first, then new ones (a full pass drops before it adopts).
        for (_, before, _) in &moved {
            let Some(before) = before else {
                continue;
            };
            let Some(port) = self.ports.get_mut(*before) else {
                continue;
            };
            port.refs -= 1;
            if port.refs == 0 {
                let id = self.ports.remove(*before).and_then(|port| port.id);
                if let Some(id) = id {
                    self.ids_in_use.remove(&id);
                    self.service_id_changes += 1;
                    gone_ids.insert(id);
                }
                range_ports.insert((*before).clone());
            }
        }
        for (frontend, _, after) in moved {
            let Some(after) = after else {
                continue;
            };
            let port = self.ports.entry(after.clone()).or_default();
            port.refs += 1;
            if port.refs == 1 && port.id.is_none() {
                self.give_service_id(frontend, after);
                range_ports.insert(after.clone());
            }
        }
        (range_ports, gone_ids)
    }

    /// Gives `name` the id its frontend carries in the maps (adoption) unless another
    /// port has it, else a new one.
    fn give_service_id(&mut self, frontend: &FrontendKey<F>, name: &ServicePortName) {
        let adopted = self
            .mirror
            .services
            .get(&service_key(frontend, 0))
            .map(|value| value.service_id)
            .filter(|id| in_id_range::<F>(*id) && !self.ids_in_use.contains(id));
        let id = adopted.unwrap_or_else(|| {
            // Within the family's range, wrapping to its start.
            while self.ids_in_use.contains(&self.next_service_id)
                || !in_id_range::<F>(self.next_service_id)
            {
                self.next_service_id = if self.next_service_id < F::SERVICE_IDS.1 - 1
                    && self.next_service_id >= F::SERVICE_IDS.0
                {
                    self.next_service_id + 1
                } else {
                    F::SERVICE_IDS.0
                };
            }
            let id = self.next_service_id;
            // Never hand a just-freed id to the next new service: flows and
            // affinities of the old one may still carry it.
            self.next_service_id = self.next_service_id.wrapping_add(1);
            id
        });
        self.ids_in_use.insert(id);
        self.set_service_id(name, id);
        self.service_id_changes += 1;
    }

    fn set_service_id(&mut self, name: &ServicePortName, id: u32) {
        match self.ports.get_mut(name) {
            Some(port) => port.id = Some(id),
            None => {
                self.ports.insert(
                    name.clone(),
                    PortEntry {
                        id: Some(id),
                        refs: 0,
                    },
                );
            }
        }
    }

    /// The `(service id, backend id)` pairs of this pass's touched frontends that no
    /// frontend of their service reaches any more. Untouched frontends kept theirs, so
    /// this is what the pairs of all frontends before the pass and after it differ by.
    fn removed_pairs(&self) -> BTreeSet<(u32, u32)> {
        let before: BTreeSet<(u32, u32)> = self.index.touched.values().flatten().copied().collect();
        let services: BTreeSet<u32> = before.iter().map(|(service, _)| *service).collect();
        let after: BTreeSet<(u32, u32)> = services
            .iter()
            .filter_map(|service| self.index.heads_by_service.get(service))
            .flatten()
            .flat_map(|head| self.frontend_pairs(head))
            .collect();
        before.difference(&after).copied().collect()
    }

    /// The pairs a packet can reach through the frontend entry `head`: its slots
    /// `1..=count` (slots above a count are never read by the datapath).
    fn frontend_pairs(&self, head: &F::ServiceKey) -> Vec<(u32, u32)> {
        let Some(value) = self.mirror.services.get(head) else {
            return Vec::new();
        };
        self.mirror
            .services
            .slots(head, value.count)
            .flatten()
            .map(|backend_id| (value.service_id, backend_id))
            .collect()
    }

    /// Gives every desired service port a stable id: the one it has, else the one its
    /// frontends carry in the maps (adoption), else a new one.
    fn assign_service_ids(&mut self, desired: &Desired) {
        for port in self.ports.values_mut() {
            port.refs = 0;
        }
        for spec in F::part(desired).frontends.values() {
            match self.ports.get_mut(&spec.service_port) {
                Some(port) => port.refs += 1,
                None => {
                    self.ports
                        .insert(spec.service_port.clone(), PortEntry { id: None, refs: 1 });
                }
            }
        }
        self.ports.retain(|_, port| port.refs > 0);
        self.ids_in_use = self.ports.values().filter_map(|port| port.id).collect();
        // Adoption before any new id, so that no new id takes an adoptable one.
        for (frontend, spec) in &F::part(desired).frontends {
            if self.service_id(&spec.service_port).is_some() {
                continue;
            }
            let adopted = self
                .mirror
                .services
                .get(&service_key(frontend, 0))
                .map(|value| value.service_id)
                .filter(|id| in_id_range::<F>(*id) && !self.ids_in_use.contains(id));
            if let Some(id) = adopted {
                self.ids_in_use.insert(id);
                self.set_service_id(&spec.service_port, id);
                self.service_id_changes += 1;
            }
        }
        for (frontend, spec) in &F::part(desired).frontends {
            if self.service_id(&spec.service_port).is_none() {
                self.give_service_id(frontend, &spec.service_port);
            }
        }
    }

    /// The source range entries the desired state asks for, by service id.
    fn wanted_source_ranges(&self, desired: &Desired) -> BTreeSet<SourceRangeKey<F>> {
        let mut wanted = BTreeSet::new();
        for (name, ranges) in &F::part(desired).source_ranges {
            let Some(service_id) = self.service_id(name) else {
                continue;
            };
            for &(addr, prefix_len) in ranges {
                wanted.insert(SourceRangeKey {
                    service_id,
                    addr,
                    prefix_len,
                });
            }
        }
        wanted
    }

    /// The id of a backend, allocating one if it has none yet.
    fn backend_id(&mut self, backend: F::Backend) -> u32 {
        if let Some(&id) = self.backend_ids.get(&backend) {
            return id;
        }
        while self.next_backend_id == 0 || self.mirror.backends.contains_key(&self.next_backend_id)
        {
            self.next_backend_id = self.next_backend_id.wrapping_add(1);
        }
        let id = self.next_backend_id;
        self.next_backend_id = self.next_backend_id.wrapping_add(1);
        self.backend_ids.insert(backend, id);
        self.index.allocated.push((backend, id));
        id
    }

    fn apply(
        &mut self,
        op: MapOp<F>,
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) -> Result<(), WriteError<F>> {
        if let Err(error) = writer.apply(&op) {
            // Whatever this op was part of stopped part-way.
            self.index.orphans_possible = true;
            return Err(error);
        }
        self.record(&op, report);
        Ok(())
    }

    /// [`Self::apply`] for each op of `ops` in order, in as few writer calls as it
    /// can (one batch per run of ops on one map), stopping at the first op refused:
    /// how many were applied, and the refusal.
    fn apply_prefix(
        &mut self,
        ops: &[MapOp<F>],
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) -> (usize, Option<WriteError<F>>) {
        let (applied, error) = writer.apply_batch(ops);
        let applied = applied.min(ops.len());
        // Bookkeeping for what the kernel holds now: the applied prefix only.
        for op in &ops[..applied] {
            self.record(op, report);
        }
        if error.is_some() {
            // Whatever these ops were part of stopped part-way.
            self.index.orphans_possible = true;
        }
        (applied, error)
    }

    /// [`Self::apply_prefix`] going on past refused ops (cleanup: each op stands
    /// alone); the errors of those refused.
    fn apply_each(
        &mut self,
        mut ops: &[MapOp<F>],
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) -> Vec<WriteError<F>> {
        let mut errors = Vec::new();
        while !ops.is_empty() {
            let (applied, error) = self.apply_prefix(ops, writer, report);
            let Some(error) = error else {
                break;
            };
            errors.push(error);
            // Past the applied prefix and the op refused.
            ops = ops.get(applied + 1..).unwrap_or_default();
        }
        errors
    }

    /// The bookkeeping of one op the writer applied: index, mirror, counters.
    fn record(&mut self, op: &MapOp<F>, report: &mut SyncReport<F>) {
        let op = *op;
        self.index_op(&op);
        report.frontend_set_changed |= match op {
            MapOp::PutService { key, .. } => {
                F::key_slot(&key) == 0 && !self.mirror.services.contains_key(&key)
            }
            MapOp::DeleteService { key } => {
                F::key_slot(&key) == 0 && self.mirror.services.contains_key(&key)
            }
            _ => false,
        };
        if let MapOp::DeleteBackend { id } = op {
            // By the deleted entry's value, not by a scan of every id.
            if let Some(backend) = self.mirror.backends.get(&id) {
                if self.backend_ids.get(backend) == Some(&id) {
                    self.backend_ids.remove(backend);
                }
            }
        }
        self.mirror.apply(&op);
        self.writes += 1;
        report.ops_applied += 1;
    }

    /// Keeps [`MirrorIndex`] in step with `op`, which the writer applied and the
    /// mirror is about to.
    fn index_op(&mut self, op: &MapOp<F>) {
        let key = match *op {
            MapOp::PutService { key, .. } | MapOp::DeleteService { key } => key,
            MapOp::PutBackend { id, .. } => {
                if !self.index.backend_refs.contains_key(&id) {
                    self.index.maybe_unused.insert(id);
                }
                return;
            }
            _ => return,
        };
        let head = F::key_with_slot(&key, 0);
        if !self.index.touched.contains_key(&head) {
            // A frontend that reached no pair before its first change has none to
            // report: not kept (a first pass would keep every frontend, 2.4 MiB at
            // 50 000). Looked up again on its next op, which may then keep the pairs
            // this pass gave it; still reachable afterwards, they are not reported.
            let pairs = self.frontend_pairs(&head);
            if !pairs.is_empty() {
                self.index.touched.insert(head, pairs);
            }
        }
        let old = self.mirror.services.get(&key);
        if F::key_slot(&key) == 0 {
            let addr = F::key_addr(&key);
            if let Some(old) = old {
                if let Some(heads) = self.index.heads_by_service.get_mut(&old.service_id) {
                    heads.remove(&key);
                    if heads.is_empty() {
                        self.index.heads_by_service.remove(&old.service_id);
                    }
                }
                if let Some(count) = self.index.heads_by_addr.get_mut(&addr) {
                    *count -= 1;
                    if *count == 0 {
                        self.index.heads_by_addr.remove(&addr);
                    }
                }
            }
            if let MapOp::PutService { value, .. } = *op {
                *self.index.heads_by_addr.entry(addr).or_default() += 1;
                self.index
                    .heads_by_service
                    .entry(value.service_id)
                    .or_default()
                    .insert_key(key);
            }
        } else {
            if let MapOp::PutService { value, .. } = *op {
                self.index.add_ref(value.backend_id);
            }
            if let Some(old) = old {
                self.index.drop_ref(old.backend_id);
            }
        }
    }

    /// Writes `frontends`, each as [`Self::plan_frontend`] plans it, many of them to
    /// one writer call (one `bpf()` call per map and [`BATCH_OPS`] ops instead of two
    /// per frontend: 100 000 at 50 000 services).
    fn write_frontends<'a>(
        &mut self,
        frontends: impl Iterator<Item = (&'a FrontendKey<F>, &'a FrontendSpec<F>)>,
        local_endpoints: &BTreeSet<F>,
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) {
        let mut chunk = Chunk::default();
        for (frontend, spec) in frontends {
            self.plan_frontend(frontend, spec, local_endpoints, &mut chunk, report);
            if chunk.len() >= BATCH_OPS {
                self.write_chunk(&mut chunk, local_endpoints, writer, report);
            }
        }
        self.write_chunk(&mut chunk, local_endpoints, writer, report);
    }

    /// Writes what `chunk` planned, in one writer call. A refused op fails the
    /// frontend it belongs to; every other frontend the call did not finish is then
    /// planned again from what the maps now hold and written alone, so that one
    /// refusal fails one frontend, as it would have written one by one.
    fn write_chunk<'a>(
        &mut self,
        chunk: &mut Chunk<'a, F>,
        local_endpoints: &BTreeSet<F>,
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) {
        if chunk.frontends.is_empty() {
            return;
        }
        let backend_ops = chunk.backend_ops.len();
        let mut ops = std::mem::take(&mut chunk.backend_ops);
        ops.append(&mut chunk.service_ops);
        let planned = std::mem::take(&mut chunk.frontends);
        let owners = std::mem::take(&mut chunk.backend_owners);
        chunk.clear();
        let (applied, error) = self.apply_prefix(&ops, writer, report);
        let error = error.or_else(|| {
            ops.get(applied).map(|op| WriteError {
                op: *op,
                message: "the writer stopped before this op without saying why".to_owned(),
                map_full: false,
            })
        });
        // The ops buffer goes back for the next chunk.
        ops.clear();
        chunk.backend_ops = ops;
        let Some(error) = error else {
            report.frontends_written += planned.len();
            return;
        };
        let owner = if applied < backend_ops {
            owners.get(applied).copied()
        } else {
            Some(
                planned
                    .partition_point(|frontend| backend_ops + frontend.service_ops.end <= applied),
            )
        };
        let mut error = Some(error);
        let mut unfinished = Vec::new();
        for (index, frontend) in planned.into_iter().enumerate() {
            if Some(index) == owner {
                if let Some(error) = error.take() {
                    report.failures.push(FrontendFailure {
                        frontend: *frontend.frontend,
                        service_port: frontend.spec.service_port.clone(),
                        error,
                    });
                }
                continue;
            }
            let finished = frontend.last_backend_op.is_none_or(|at| at < applied)
                && backend_ops + frontend.service_ops.end <= applied;
            if finished {
                report.frontends_written += 1;
            } else {
                unfinished.push((frontend.frontend, frontend.spec));
            }
        }
        for (frontend, spec) in unfinished {
            let mut alone = Chunk::default();
            self.plan_frontend(frontend, spec, local_endpoints, &mut alone, report);
            self.write_chunk(&mut alone, local_endpoints, writer, report);
        }
    }

    /// Plans the ops that bring one frontend to `spec` into `chunk`, in the order of
    /// the module's notes: its new backends (with the chunk's, before any slot), then
    /// its slots, its frontend entry, and the deletion of the slots above its count.
    /// Nothing when the maps hold it already; a failure when it does not fit.
    fn plan_frontend<'a>(
        &mut self,
        frontend: &'a FrontendKey<F>,
        spec: &'a FrontendSpec<F>,
        local_endpoints: &BTreeSet<F>,
        chunk: &mut Chunk<'a, F>,
        report: &mut SyncReport<F>,
    ) {
        let Some(service_id) = self.service_id(&spec.service_port) else {
            return;
        };
        let Ok(count) = u16::try_from(spec.backends.len()) else {
            report.failures.push(FrontendFailure {
                frontend: *frontend,
                service_port: spec.service_port.clone(),
                error: WriteError {
                    op: MapOp::PutService {
                        key: service_key(frontend, 0),
                        value: ServiceValueV4::default(),
                    },
                    message: format!(
                        "{} backends exceed the 65535 slots of a frontend",
                        spec.backends.len()
                    ),
                    map_full: true,
                },
            });
            return;
        };
        let backends: Vec<F::Backend> = spec
            .backends
            .iter()
            .map(|addr| {
                let local = local_endpoints.contains(&F::socket_ip(addr));
                backend_value::<F>(*addr, frontend.proto, local)
            })
            .collect();
        let wanted_ids: Vec<u32> = backends.iter().map(|b| self.backend_id(*b)).collect();
        let head_key = service_key(frontend, 0);
        let head = ServiceValueV4 {
            backend_id: 0,
            service_id,
            affinity_timeout_s: spec.affinity_timeout_s,
            count,
            flags: spec.flags,
        };
        let current_head = self.mirror.services.get(&head_key);
        let current_count = current_head.map_or(0, |value| value.count);
        let current_ids: Vec<Option<u32>> = self
            .mirror
            .services
            .slots(&head_key, current_count)
            .collect();
        let unchanged_slots = current_ids.len() == wanted_ids.len()
            && current_ids
                .iter()
                .zip(&wanted_ids)
                .all(|(current, wanted)| *current == Some(*wanted));
        if current_head == Some(head) && unchanged_slots {
            return;
        }
        let new_services = match self.check_room(frontend, count, &wanted_ids, chunk) {
            Ok(new_services) => new_services,
            Err(error) => {
                report.failures.push(FrontendFailure {
                    frontend: *frontend,
                    service_port: spec.service_port.clone(),
                    error,
                });
                return;
            }
        };

        let this = chunk.frontends.len();
        let mut last_backend_op = None;
        for (id, backend) in wanted_ids.iter().zip(&backends) {
            // Once per chunk, the first frontend that needs it writing it.
            if let Some(&at) = chunk.queued_backends.get(id) {
                last_backend_op = last_backend_op.max(Some(at));
                continue;
            }
            let held = self.mirror.backends.get(id);
            if held != Some(backend) {
                let at = chunk.backend_ops.len();
                chunk.queued_backends.insert(*id, at);
                chunk.backend_ops.push(MapOp::PutBackend {
                    id: *id,
                    backend: *backend,
                });
                chunk.backend_owners.push(this);
                chunk.backends_added += usize::from(held.is_none());
                last_backend_op = Some(at);
            }
        }
        let first_op = chunk.service_ops.len();
        for (index, id) in wanted_ids.iter().enumerate() {
            if current_ids.get(index) != Some(&Some(*id)) {
                let slot = (index + 1) as u16;
                chunk.service_ops.push(MapOp::PutService {
                    key: service_key(frontend, slot),
                    value: ServiceValueV4 {
                        backend_id: *id,
                        ..ServiceValueV4::default()
                    },
                });
            }
        }
        if current_head != Some(head) {
            chunk.service_ops.push(MapOp::PutService {
                key: head_key,
                value: head,
            });
        }
        // Counted in u32: a full frontend has slot 65535, and no slot above it.
        for slot in (u32::from(count) + 1)..=u32::from(current_count) {
            let slot = u16::try_from(slot).unwrap_or(u16::MAX);
            chunk.service_ops.push(MapOp::DeleteService {
                key: service_key(frontend, slot),
            });
        }
        chunk.services_added += new_services;
        chunk.services_removed += current_ids
            .iter()
            .skip(usize::from(count))
            .filter(|held| held.is_some())
            .count();
        chunk.frontends.push(Planned {
            frontend,
            spec,
            last_backend_op,
            service_ops: first_op..chunk.service_ops.len(),
        });
    }

    /// Whether the maps have room for the new entries a frontend of `count` slots
    /// naming `backend_ids` needs, after what `chunk` writes before it: how many
    /// service map entries it adds, or the refusal, which names the map and the
    /// numbers.
    fn check_room(
        &self,
        frontend: &FrontendKey<F>,
        count: u16,
        backend_ids: &[u32],
        chunk: &Chunk<'_, F>,
    ) -> Result<usize, WriteError<F>> {
        let head_key = service_key(frontend, 0);
        let new_services = usize::from(!self.mirror.services.contains_key(&head_key))
            + self
                .mirror
                .services
                .slots(&head_key, count)
                .filter(Option::is_none)
                .count();
        let new_backends = backend_ids
            .iter()
            .filter(|id| {
                !self.mirror.backends.contains_key(id) && !chunk.queued_backends.contains_key(id)
            })
            .collect::<BTreeSet<_>>()
            .len();
        let checks = [
            (
                F::SERVICES_MAP,
                new_services,
                (self.mirror.services.len() + chunk.services_added)
                    .saturating_sub(chunk.services_removed),
                self.capacity.services,
            ),
            (
                F::BACKENDS_MAP,
                new_backends,
                self.mirror.backends.len() + chunk.backends_added,
                self.capacity.backends,
            ),
        ];
        for (map, needed, used, capacity) in checks {
            let free = capacity.saturating_sub(used);
            if needed > free {
                return Err(WriteError {
                    op: MapOp::PutService {
                        key: service_key(frontend, 0),
                        value: ServiceValueV4::default(),
                    },
                    message: format!(
                        "needs {needed} more entries in {map}, which has {free} free of {capacity}; retried when there is room"
                    ),
                    map_full: true,
                });
            }
        }
        Ok(new_services)
    }

    /// Deletes frontends nobody wants, and slots no frontend count covers.
    fn remove_undesired(
        &mut self,
        desired: &Desired,
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) {
        let desired_keys: BTreeSet<F::ServiceKey> = F::part(desired)
            .frontends
            .keys()
            .map(|key| service_key(key, 0))
            .collect();
        let mut stale: Vec<(F::ServiceKey, ServiceValueV4)> = self
            .mirror
            .frontends()
            .filter(|(key, _)| !desired_keys.contains(key))
            .map(|(key, value)| (*key, *value))
            .collect();
        stale.sort_by_key(|(key, _)| *key);
        for (head_key, head) in stale {
            self.remove_frontend(head_key, head, writer, report);
        }
        self.remove_orphan_slots(writer, report);
    }

    /// Deletes one frontend: its entry, then its slots.
    fn remove_frontend(
        &mut self,
        head_key: F::ServiceKey,
        head: ServiceValueV4,
        writer: &mut impl MapWriter<F>,
        report: &mut SyncReport<F>,
    ) {
        if let Err(error) = self.apply(MapOp::DeleteService { key: head_key }, writer, report) {
            report.cleanup_errors.push(error);
            return;
        }
        report.frontends_removed += 1;
        let slots: Vec<MapOp<F>> = (1..=head.count)
            .zip(self.mirror.services.slots(&head_key, head.count))
            .filter(|(_, backend_id)| backend_id.is_some())
            .map(|(slot, _)| MapOp::DeleteService {
                key: F::key_with_slot(&head_key, slot),
            })
            .collect();
        let errors = self.apply_each(&slots, writer, report);
        report.cleanup_errors.extend(errors);
    }

    /// Deletes slots no frontend count covers (left by an interrupted agent, or by a
    /// frontend whose update failed part-way).
    fn remove_orphan_slots(&mut self, writer: &mut impl MapWriter<F>, report: &mut SyncReport<F>) {
        if !self.index.orphans_possible {
            return;
        }
        // Set again by any delete below that fails.
        self.index.orphans_possible = false;
        let ops: Vec<MapOp<F>> = self
            .mirror
            .services
            .orphan_slots()
            .into_iter()
            .map(|key| MapOp::DeleteService { key })
            .collect();
        let errors = self.apply_each(&ops, writer, report);
        report.cleanup_errors.extend(errors);
    }

    /// Deletes backends that no slot names any more (of those that may have become
    /// unnamed since the last collection).
    fn collect_backends(&mut self, writer: &mut impl MapWriter<F>, report: &mut SyncReport<F>) {
        let candidates = std::mem::take(&mut self.index.maybe_unused);
        let unused: Vec<MapOp<F>> = candidates
            .into_iter()
            .filter(|id| {
                !self.index.backend_refs.contains_key(id) && self.mirror.backends.contains_key(id)
            })
            .map(|id| MapOp::DeleteBackend { id })
            .collect();
        for error in self.apply_each(&unused, writer, report) {
            if let MapOp::DeleteBackend { id } = error.op {
                self.index.maybe_unused.insert(id);
            }
            report.cleanup_errors.push(error);
        }
        // Ids allocated for backends whose frontend failed were never written.
        for (backend, id) in std::mem::take(&mut self.index.allocated) {
            if !self.mirror.backends.contains_key(&id)
                && self.backend_ids.get(&backend) == Some(&id)
            {
                self.backend_ids.remove(&backend);
            }
        }
    }
}
