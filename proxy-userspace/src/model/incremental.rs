//! The model kept up to date from one snapshot to the next, its work proportional to
//! the objects that changed rather than to the cluster.
//!
//! Per service, [`IncrementalModel`] keeps the objects its output was computed from
//! (the `Arc`s the source shares: an unchanged object keeps its `Arc`) and that output
//! (frontends, local endpoints, source ranges, health check, diagnostics). A new
//! [`ClusterState`] is zipped with the previous one in key order; only services whose
//! object or slices changed (by `Arc` identity) are computed again. A slice that moved
//! to another service, or went, changes its old and its new service. Other node
//! settings change everything.
//!
//! What services decide together is kept per contested key: every claimant of a
//! frontend (the smallest [`Claim`] holds it, its cluster-internal twin goes with it)
//! and of a healthCheckNodePort (the first service in key order), so a change
//! re-decides only the keys the changed services claim.
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::jiff::Timestamp;
use proxy_common::scope;

use super::{
    conflict, slice_service_name, Claim, Desired, Diagnostic, DiagnosticReason, FamilyDesired,
    FrontendKey, FrontendSpec, KeyedSlice, ModelSettings, ServiceContext, ServiceHealth,
    ServicePortName, LABEL_SERVICE_NAME, LABEL_TOPOLOGY_ZONE,
};
use crate::{
    family::Family,
    state::{ChangedKeys, ClusterState, NodeInfo, ObjectKey, Revision, ServiceInfo, SliceInfo},
    FastMap, FastSet,
};

use super::sorted::{group_sorted, SortedVec};

/// What one [`IncrementalModel::update`] changed in [`IncrementalModel::desired`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelChanges {
    /// Everything may have changed (the first update, other node settings): the
    /// frontends, source ranges and slices below are then not listed (a full pass
    /// reads none of them; at 50 000 services the first update's lists were 10 MiB).
    pub all: bool,
    /// IPv4 frontends added, changed or removed, with the service port each had
    /// before (`None`: it is new). Also those whose backends' locality changed.
    pub frontends: BTreeMap<FrontendKey, Option<ServicePortName>>,
    /// The same for IPv6 frontends.
    pub frontends_v6: BTreeMap<FrontendKey<Ipv6Addr>, Option<ServicePortName>>,
    /// Service ports whose IPv4 source ranges changed (appeared, went or differ).
    pub source_ranges: BTreeSet<ServicePortName>,
    /// Service ports whose IPv6 source ranges changed.
    pub source_ranges_v6: BTreeSet<ServicePortName>,
    pub local_endpoints: bool,
    pub health_checks: bool,
    pub diagnostics: bool,
    /// EndpointSlices added, changed or removed.
    pub slices: Vec<ObjectKey>,
}

impl ModelChanges {
    /// Whether nothing in the desired state changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.frontends.is_empty()
            && self.frontends_v6.is_empty()
            && self.source_ranges.is_empty()
            && self.source_ranges_v6.is_empty()
            && !self.local_endpoints
            && !self.health_checks
            && !self.diagnostics
    }

    /// Adds what a later update changed (the changes of two updates no pass has
    /// applied yet); the service port a frontend had before stays the earlier one.
    pub fn merge(&mut self, later: Self) {
        self.all |= later.all;
        for (key, before) in later.frontends {
            self.frontends.entry(key).or_insert(before);
        }
        for (key, before) in later.frontends_v6 {
            self.frontends_v6.entry(key).or_insert(before);
        }
        self.source_ranges.extend(later.source_ranges);
        self.source_ranges_v6.extend(later.source_ranges_v6);
        self.local_endpoints |= later.local_endpoints;
        self.health_checks |= later.health_checks;
        self.diagnostics |= later.diagnostics;
        self.slices.extend(later.slices);
    }
}

/// One service: the objects its output was computed from, and that output.
#[derive(Debug)]
struct ServiceEntry {
    service: Arc<ServiceInfo>,
    output: ServiceOutput,
}

/// loadBalancerSourceRanges of one service port: (address, prefix length).
type SourceRanges<F> = BTreeSet<(F, u8)>;

/// A frontend and its shared spec.
type KeyedSpec<F> = (FrontendKey<F>, Arc<FrontendSpec<F>>);

/// What one service asks for in one family before conflicts with other services:
/// frontends (with cluster-internal twins), local endpoints, source ranges. Sorted
/// slices: a service has a handful of each, and a map per field per service was most
/// of the model's memory at 50 000 services (a map node holds eleven entries, however
/// few it has). Its claims on frontends are not kept: [`Self::claims`] derives them.
#[derive(Debug)]
struct FamilyOutput<F: Family> {
    frontends: Box<[KeyedSpec<F>]>,
    local_endpoints: Box<[F]>,
    source_ranges: Box<[(ServicePortName, SourceRanges<F>)]>,
}

impl<F: Family> FamilyOutput<F> {
    fn of(desired: FamilyDesired<F>) -> Self {
        // Each map iterates in key order: the slices are sorted.
        Self {
            frontends: desired.frontends.into_iter().collect(),
            local_endpoints: desired.local_endpoints.into_iter().collect(),
            source_ranges: desired.source_ranges.into_iter().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.local_endpoints.is_empty()
            && self.source_ranges.is_empty()
    }

    /// The service's claim on each frontend of default scope it holds (its
    /// cluster-internal twins follow them): what [`super::ServiceContext`] claimed
    /// when it added them, from the frontend's kind and the service's age and key.
    /// Derived rather than kept, a copy of the key and age per frontend (10 MiB at
    /// 50 000 services with the claimants' vectors).
    fn claims<'a>(
        &'a self,
        service: &'a ObjectKey,
        created: Option<Timestamp>,
    ) -> impl Iterator<Item = (FrontendKey<F>, Claim)> + 'a {
        self.frontends
            .iter()
            .filter(|(key, _)| key.scope == scope::DEFAULT)
            .map(move |(key, spec)| (*key, Claim::new(spec.kind, created, service.clone())))
    }
}

/// What one service asks for: each family's output, its health check, its own
/// diagnostics. What most services have none of (an IPv6 output, health checks,
/// diagnostics) is boxed together and absent for a service without any of it.
#[derive(Debug)]
struct ServiceOutput {
    v4: FamilyOutput<Ipv4Addr>,
    rare: Option<Box<RareOutput>>,
}

/// The parts of a [`ServiceOutput`] most services have none of.
#[derive(Debug)]
struct RareOutput {
    v6: Option<FamilyOutput<Ipv6Addr>>,
    health_checks: Box<[(u16, ServiceHealth)]>,
    diagnostics: Box<[Diagnostic]>,
}

impl ServiceOutput {
    fn of(desired: Desired) -> Self {
        let v6 = FamilyOutput::of(desired.v6);
        let rare = RareOutput {
            v6: (!v6.is_empty()).then_some(v6),
            health_checks: desired.health_checks.into_iter().collect(),
            diagnostics: desired.diagnostics.into_boxed_slice(),
        };
        let none =
            rare.v6.is_none() && rare.health_checks.is_empty() && rare.diagnostics.is_empty();
        Self {
            v4: FamilyOutput::of(desired.v4),
            rare: (!none).then(|| Box::new(rare)),
        }
    }

    fn v6(&self) -> Option<&FamilyOutput<Ipv6Addr>> {
        self.rare.as_ref()?.v6.as_ref()
    }

    fn health_checks(&self) -> &[(u16, ServiceHealth)] {
        self.rare.as_ref().map_or(&[], |rare| &rare.health_checks)
    }

    fn diagnostics(&self) -> &[Diagnostic] {
        self.rare.as_ref().map_or(&[], |rare| &rare.diagnostics)
    }
}

// What the model keeps per service beside its frontends: 64 bytes (120 with the
// IPv6 output's pointer, health checks and diagnostics inline and the claims kept).
const _: () = assert!(size_of::<ServiceEntry>() == 64);

/// How generic code finds its family's half of a service's output.
trait OutputFamily: Family {
    fn output(output: &ServiceOutput) -> Option<&FamilyOutput<Self>>;
}

impl OutputFamily for Ipv4Addr {
    fn output(output: &ServiceOutput) -> Option<&FamilyOutput<Self>> {
        Some(&output.v4)
    }
}

impl OutputFamily for Ipv6Addr {
    fn output(output: &ServiceOutput) -> Option<&FamilyOutput<Self>> {
        output.v6()
    }
}

/// Every service claiming one frontend, best first: almost always one, held inline
/// (a vector of one was a heap block per frontend).
#[derive(Debug)]
enum Claimants {
    One(Claim),
    Many(Vec<Claim>),
}

impl Claimants {
    fn as_slice(&self) -> &[Claim] {
        match self {
            Self::One(claim) => std::slice::from_ref(claim),
            Self::Many(claims) => claims,
        }
    }

    /// Adds a claim in its place.
    fn insert(&mut self, claim: Claim) {
        match self {
            Self::One(held) => {
                let held = held.clone();
                let mut claims = vec![held, claim];
                claims.sort();
                *self = Self::Many(claims);
            }
            Self::Many(claims) => {
                let at = claims.partition_point(|held| *held < claim);
                claims.insert(at, claim);
            }
        }
    }

    /// Removes `service`'s claim; returns whether none is left.
    fn remove(&mut self, service: &ObjectKey) -> bool {
        match self {
            Self::One(held) => held.service == *service,
            Self::Many(claims) => {
                claims.retain(|held| held.service != *service);
                match claims.len() {
                    0 => true,
                    1 => {
                        let last = claims.remove(0);
                        *self = Self::One(last);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// What services decide together in one family: who claims each frontend, and which
/// frontends use each local endpoint address.
#[derive(Debug)]
struct FamilyIndex<F: Family> {
    /// Every service claiming each frontend of default scope, best first.
    claimants: FastMap<FrontendKey<F>, Claimants>,
    /// The claimants that do not hold a frontend, reported.
    conflicts: BTreeMap<FrontendKey<F>, Vec<Diagnostic>>,
    /// How many services name each local endpoint address.
    local_refs: FastMap<F, usize>,
    /// Desired frontends by their backends' addresses: those whose backends change
    /// locality when an address joins or leaves the local endpoints.
    by_backend_ip: FastMap<F, FastSet<FrontendKey<F>>>,
}

impl<F: Family> Default for FamilyIndex<F> {
    fn default() -> Self {
        Self {
            claimants: FastMap::default(),
            conflicts: BTreeMap::new(),
            local_refs: FastMap::default(),
            by_backend_ip: FastMap::default(),
        }
    }
}

/// What one update touched in one family, to be decided once every dirty service
/// is recomputed.
#[derive(Debug)]
struct Touched<F: Family> {
    frontends: BTreeSet<FrontendKey<F>>,
    local_candidates: BTreeSet<F>,
    old_ranges: BTreeMap<ServicePortName, Option<SourceRanges<F>>>,
}

impl<F: Family> Default for Touched<F> {
    fn default() -> Self {
        Self {
            frontends: BTreeSet::new(),
            local_candidates: BTreeSet::new(),
            old_ranges: BTreeMap::new(),
        }
    }
}

/// The value of `key` in a slice sorted by key.
fn sorted_get<'a, K: Ord, V>(entries: &'a [(K, V)], key: &K) -> Option<&'a V> {
    entries
        .binary_search_by(|(held, _)| held.cmp(key))
        .ok()
        .map(|at| &entries[at].1)
}

/// One EndpointSlice and the service it names.
#[derive(Debug)]
struct SliceEntry {
    slice: Arc<SliceInfo>,
    service: Option<ObjectKey>,
}

/// The slices one update adds, put into the model's maps together once every
/// changed slice is seen (see [`extend_sorted`]).
#[derive(Default)]
struct AddedSlices {
    /// In key order.
    slices: Vec<(ObjectKey, SliceEntry)>,
    /// (service, slice key, slice) of the labelled ones.
    by_service: Vec<(ObjectKey, ObjectKey, Arc<SliceInfo>)>,
}

/// Puts `entries`, in key order and of keys `map` does not hold, into `map`. When
/// they are many against what it holds (a first update, every service recomputed),
/// the map is built again from both sorted runs in one go: that packs its nodes full
/// where inserting in key order leaves each about half full (a node of
/// `ServiceEntry`s is over 1 KiB; 7 MiB at 50 000 services), and costs no more than
/// the inserts. A few are inserted.
fn extend_sorted<K: Ord, V>(map: &mut BTreeMap<K, V>, entries: Vec<(K, V)>) {
    if entries.len() * 4 < map.len() {
        map.extend(entries);
        return;
    }
    let held = std::mem::take(map);
    // Two sorted runs: the stable sort `collect` does merges them in linear time.
    *map = held.into_iter().chain(entries).collect();
}

/// The model's state between snapshots; [`Self::desired`] is what [`super::desired`]
/// returns for the last state given.
#[derive(Debug, Default)]
pub struct IncrementalModel {
    /// What the outputs were computed with (`None` before the first update).
    computed_with: Option<(ModelSettings, NodeInfo)>,
    services: BTreeMap<ObjectKey, ServiceEntry>,
    slices: BTreeMap<ObjectKey, SliceEntry>,
    /// Labelled slices by the service they name, whether or not it exists.
    slices_by_service: BTreeMap<ObjectKey, SortedVec<ObjectKey, Arc<SliceInfo>>>,
    /// Slices without a label or whose service does not exist.
    orphans: BTreeMap<ObjectKey, Diagnostic>,
    /// Frontend claims and local endpoints, per family.
    v4: FamilyIndex<Ipv4Addr>,
    v6: FamilyIndex<Ipv6Addr>,
    /// Every service asking for each healthCheckNodePort.
    health_claimants: BTreeMap<u16, BTreeSet<ObjectKey>>,
    health_conflicts: BTreeMap<u16, Vec<Diagnostic>>,
    /// Services with diagnostics of their own.
    diagnosed: BTreeSet<ObjectKey>,
    /// The revision of the last state given (its steps not kept): the next state's
    /// steps since it name the keys to compare.
    seen: Revision,
    desired: Desired,
}

/// Keys whose value differs between `old` and `new` (present in one only, or `same`
/// says so), by one walk of both in key order. `same` may take the new `Arc` of an
/// equal object into its entry.
fn changed_keys<K: Ord + Clone, A, B>(
    old: &mut BTreeMap<K, A>,
    new: &BTreeMap<K, Arc<B>>,
    mut same: impl FnMut(&K, &mut A, &Arc<B>) -> bool,
) -> Vec<K> {
    let mut changed = Vec::new();
    let mut old_iter = old.iter_mut().peekable();
    let mut new_iter = new.iter().peekable();
    loop {
        match (old_iter.peek(), new_iter.peek()) {
            (None, None) => break,
            (Some((key, _)), None) => {
                changed.push((*key).clone());
                old_iter.next();
            }
            (None, Some((key, _))) => {
                changed.push((*key).clone());
                new_iter.next();
            }
            (Some((old_key, _)), Some((new_key, new_value))) => match old_key.cmp(new_key) {
                std::cmp::Ordering::Less => {
                    changed.push((*old_key).clone());
                    old_iter.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push((*new_key).clone());
                    new_iter.next();
                }
                std::cmp::Ordering::Equal => {
                    if let Some((key, old_value)) = old_iter.next() {
                        if !same(key, old_value, new_value) {
                            changed.push(key.clone());
                        }
                    }
                    new_iter.next();
                }
            },
        }
    }
    changed
}

/// [`changed_keys`] for the keys `candidates` only: the others are known to be
/// unchanged.
fn changed_among<'k, K: Ord + Clone + 'k, A, B>(
    old: &mut BTreeMap<K, A>,
    new: &BTreeMap<K, Arc<B>>,
    candidates: impl IntoIterator<Item = &'k K>,
    mut same: impl FnMut(&K, &mut A, &Arc<B>) -> bool,
) -> Vec<K> {
    candidates
        .into_iter()
        .filter(|key| match (old.get_mut(*key), new.get(*key)) {
            (None, None) => false,
            (Some(entry), Some(value)) => !same(key, entry, value),
            _ => true,
        })
        .cloned()
        .collect()
}

/// Whether `new` is the object `held` is: the same `Arc` (what sources keep for an
/// unchanged object), or an equal object (a manifest file re-read whole gives every
/// object in it a new `Arc`), whose `Arc` `held` then takes, so the next update finds
/// it by identity.
fn same_object<T: PartialEq>(held: &mut Arc<T>, new: &Arc<T>) -> bool {
    if Arc::ptr_eq(held, new) {
        return true;
    }
    if **held == **new {
        *held = Arc::clone(new);
        return true;
    }
    false
}

/// The twin of a default-scope frontend, for cluster-internal clients.
fn twin_of<F: Family>(key: &FrontendKey<F>) -> FrontendKey<F> {
    FrontendKey {
        scope: scope::INTERNAL,
        ..*key
    }
}

impl<F: OutputFamily> FamilyIndex<F> {
    /// Takes `service`'s output of this family out of the shared state.
    fn remove(
        &mut self,
        service: &ObjectKey,
        old: Option<&FamilyOutput<F>>,
        desired: &mut FamilyDesired<F>,
        touched: &mut Touched<F>,
    ) {
        let Some(old) = old else {
            return;
        };
        for (frontend, _) in old
            .frontends
            .iter()
            .filter(|(key, _)| key.scope == scope::DEFAULT)
        {
            if let Some(claims) = self.claimants.get_mut(frontend) {
                if claims.remove(service) {
                    self.claimants.remove(frontend);
                }
            }
            touched.frontends.insert(*frontend);
        }
        for addr in &old.local_endpoints {
            if let Some(count) = self.local_refs.get_mut(addr) {
                *count -= 1;
                if *count == 0 {
                    self.local_refs.remove(addr);
                }
            }
            touched.local_candidates.insert(*addr);
        }
        for (name, _) in &old.source_ranges {
            let before = desired.source_ranges.remove(name);
            touched.old_ranges.entry(name.clone()).or_insert(before);
        }
    }

    /// Puts `service`'s output of this family into the shared state.
    fn add(
        &mut self,
        service: &ObjectKey,
        created: Option<Timestamp>,
        new: Option<&FamilyOutput<F>>,
        desired: &mut FamilyDesired<F>,
        touched: &mut Touched<F>,
    ) {
        let Some(new) = new else {
            return;
        };
        for (frontend, claim) in new.claims(service, created) {
            match self.claimants.entry(frontend) {
                std::collections::hash_map::Entry::Vacant(vacant) => {
                    vacant.insert(Claimants::One(claim));
                }
                std::collections::hash_map::Entry::Occupied(held) => held.into_mut().insert(claim),
            }
            touched.frontends.insert(frontend);
        }
        for addr in &new.local_endpoints {
            *self.local_refs.entry(*addr).or_default() += 1;
            touched.local_candidates.insert(*addr);
        }
        for (name, ranges) in &new.source_ranges {
            let before = desired.source_ranges.insert(name.clone(), ranges.clone());
            touched.old_ranges.entry(name.clone()).or_insert(before);
        }
    }

    /// Decides everything `touched` names, noting the changes.
    fn resolve(
        &mut self,
        touched: Touched<F>,
        services: &BTreeMap<ObjectKey, ServiceEntry>,
        desired: &mut FamilyDesired<F>,
        all: bool,
        changes: &mut ModelChanges,
    ) {
        for (name, before) in touched.old_ranges {
            if !all && desired.source_ranges.get(&name) != before.as_ref() {
                F::changed_ranges_mut(changes).insert(name);
            }
        }
        for key in touched.frontends {
            self.resolve_frontend(&key, services, desired, changes);
        }
        for addr in touched.local_candidates {
            let local = self.local_refs.contains_key(&addr);
            if local == desired.local_endpoints.contains(&addr) {
                continue;
            }
            changes.local_endpoints = true;
            if local {
                desired.local_endpoints.insert(addr);
            } else {
                desired.local_endpoints.remove(&addr);
            }
            if all {
                // Every frontend is written anyway.
                continue;
            }
            // Their backends at `addr` change locality (a backend flag in the maps).
            for key in self.by_backend_ip.get(&addr).into_iter().flatten() {
                let port = desired
                    .frontends
                    .get(key)
                    .map(|spec| spec.service_port.clone());
                F::changed_frontends_mut(changes)
                    .entry(*key)
                    .or_insert(port);
            }
        }
    }

    /// Decides who holds `key` (and its cluster-internal twin) among its claimants,
    /// and reports the others.
    fn resolve_frontend(
        &mut self,
        key: &FrontendKey<F>,
        services: &BTreeMap<ObjectKey, ServiceEntry>,
        desired: &mut FamilyDesired<F>,
        changes: &mut ModelChanges,
    ) {
        let twin = twin_of(key);
        let claims = self.claimants.get(key).map_or(&[][..], Claimants::as_slice);
        let holder = claims.first().and_then(|claim| {
            let output = F::output(&services.get(&claim.service)?.output)?;
            Some((claim, output))
        });
        let (spec, twin_spec) = holder.map_or((None, None), |(_, output)| {
            (
                sorted_get(&output.frontends, key).cloned(),
                sorted_get(&output.frontends, &twin).cloned(),
            )
        });
        let diagnostics: Vec<Diagnostic> = match (holder, &spec) {
            (Some((winner, _)), Some(spec)) => claims[1..]
                .iter()
                .map(|loser| Diagnostic {
                    object: format!("Service {}", loser.service),
                    reason: DiagnosticReason::FrontendConflict,
                    message: conflict(key, &spec.service_port, winner.beats(loser)),
                })
                .collect(),
            _ => Vec::new(),
        };
        let reported = self.conflicts.get(key).map_or(&[][..], Vec::as_slice);
        if reported != diagnostics.as_slice() {
            changes.diagnostics = true;
            if diagnostics.is_empty() {
                self.conflicts.remove(key);
            } else {
                self.conflicts.insert(*key, diagnostics);
            }
        }
        self.set_frontend(*key, spec, desired, changes);
        self.set_frontend(twin, twin_spec, desired, changes);
    }

    /// Sets one desired frontend, noting the change.
    fn set_frontend(
        &mut self,
        key: FrontendKey<F>,
        spec: Option<Arc<FrontendSpec<F>>>,
        desired: &mut FamilyDesired<F>,
        changes: &mut ModelChanges,
    ) {
        if desired.frontends.get(&key) == spec.as_ref() {
            return;
        }
        let before = desired.frontends.remove(&key);
        if let Some(before) = &before {
            self.index_backends(&key, before, false);
        }
        if let Some(spec) = spec {
            self.index_backends(&key, &spec, true);
            desired.frontends.insert(key, spec);
        }
        if !changes.all {
            let port = before.map(|before| before.service_port.clone());
            F::changed_frontends_mut(changes).entry(key).or_insert(port);
        }
    }

    fn index_backends(&mut self, key: &FrontendKey<F>, spec: &FrontendSpec<F>, add: bool) {
        for backend in &spec.backends {
            let addr = F::socket_ip(backend);
            if add {
                self.by_backend_ip.entry(addr).or_default().insert(*key);
            } else if let Some(keys) = self.by_backend_ip.get_mut(&addr) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_backend_ip.remove(&addr);
                }
            }
        }
    }
}

impl IncrementalModel {
    /// The desired state for the last [`ClusterState`] given.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The desired state, taking it.
    #[must_use]
    pub fn into_desired(self) -> Desired {
        self.desired
    }

    /// Brings [`Self::desired`] to `state` and `settings`, computing again only what
    /// changed since the last update; returns what changed.
    pub fn update(&mut self, state: &ClusterState, settings: &ModelSettings) -> ModelChanges {
        let mut changes = ModelChanges::default();
        let settings_changed =
            self.computed_with
                .as_ref()
                .is_none_or(|(old_settings, old_node)| {
                    old_settings != settings || *old_node != state.node
                });
        // What the source says changed since the last state; else every key is compared.
        let candidates: Option<ChangedKeys> = state.revision.changed_since(&self.seen);
        self.seen = Revision {
            steps: std::collections::VecDeque::new(),
            ..state.revision.clone()
        };
        let same_service = |_: &ObjectKey, entry: &mut ServiceEntry, service: &Arc<ServiceInfo>| {
            same_object(&mut entry.service, service)
        };
        let mut dirty: BTreeSet<ObjectKey> = if settings_changed {
            changes.all = true;
            self.computed_with = Some((settings.clone(), state.node.clone()));
            self.services
                .keys()
                .chain(state.services.keys())
                .cloned()
                .collect()
        } else if let Some(candidates) = &candidates {
            changed_among(
                &mut self.services,
                &state.services,
                &candidates.services,
                same_service,
            )
            .into_iter()
            .collect()
        } else {
            changed_keys(&mut self.services, &state.services, same_service)
                .into_iter()
                .collect()
        };
        let by_service = &mut self.slices_by_service;
        let same_slice = |key: &ObjectKey, entry: &mut SliceEntry, slice: &Arc<SliceInfo>| {
            if Arc::ptr_eq(&entry.slice, slice) {
                return true;
            }
            if !same_object(&mut entry.slice, slice) {
                return false;
            }
            // An equal slice in a new Arc: the index shares the slice, so it takes
            // the new Arc too.
            if let Some(indexed) = entry
                .service
                .as_ref()
                .and_then(|service| by_service.get_mut(service))
                .and_then(|slices| slices.get_mut(key))
            {
                *indexed = Arc::clone(slice);
            }
            true
        };
        let changed_slices = match &candidates {
            Some(candidates) => changed_among(
                &mut self.slices,
                &state.endpoint_slices,
                &candidates.endpoint_slices,
                same_slice,
            ),
            None => changed_keys(&mut self.slices, &state.endpoint_slices, same_slice),
        };
        let mut added = AddedSlices::default();
        for key in changed_slices {
            changes.diagnostics |= self.replace_slice(
                &key,
                state.endpoint_slices.get(&key),
                &state.services,
                &mut dirty,
                &mut added,
            );
            if !changes.all {
                changes.slices.push(key);
            }
        }
        extend_sorted(&mut self.slices, added.slices);
        if self.slices_by_service.is_empty() {
            added
                .by_service
                .sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            self.slices_by_service = group_sorted(added.by_service);
        } else {
            for (service, key, slice) in added.by_service {
                self.slices_by_service
                    .entry(service)
                    .or_default()
                    .insert(key, slice);
            }
        }

        let node_name = state.node.name.as_deref().unwrap_or_default();
        let zone = state
            .node
            .labels
            .get(LABEL_TOPOLOGY_ZONE)
            .map_or("", String::as_str);
        let mut touched_v4 = Touched::default();
        let mut touched_v6 = Touched::default();
        let mut touched_ports = BTreeSet::new();
        // Computed in key order, put into the map together (see `extend_sorted`).
        let mut computed = Vec::new();
        for key in &dirty {
            let old_diagnostics =
                self.remove_service(key, &mut touched_v4, &mut touched_v6, &mut touched_ports);
            let new_diagnostics = match state.services.get(key) {
                Some(service) => {
                    let entry = self.compute_service(key, service, node_name, zone, settings);
                    let diagnostics = entry.output.diagnostics().to_vec();
                    self.add_service(
                        key,
                        &entry,
                        &mut touched_v4,
                        &mut touched_v6,
                        &mut touched_ports,
                    );
                    computed.push((key.clone(), entry));
                    diagnostics
                }
                None => Vec::new(),
            };
            changes.diagnostics |= old_diagnostics != new_diagnostics;
            changes.diagnostics |= self.check_orphans(key, state.services.contains_key(key));
        }
        extend_sorted(&mut self.services, computed);
        let all = changes.all;
        self.v4.resolve(
            touched_v4,
            &self.services,
            &mut self.desired.v4,
            all,
            &mut changes,
        );
        self.v6.resolve(
            touched_v6,
            &self.services,
            &mut self.desired.v6,
            all,
            &mut changes,
        );
        for port in touched_ports {
            self.resolve_health_check(port, &mut changes);
        }
        if changes.diagnostics {
            self.collect_diagnostics();
        }
        changes
    }

    /// Follows one slice from its old state to `new` in the per-service index; the
    /// services it belonged to and belongs to now become dirty. Returns whether its
    /// orphan report changed.
    fn replace_slice(
        &mut self,
        key: &ObjectKey,
        new: Option<&Arc<SliceInfo>>,
        services: &BTreeMap<ObjectKey, Arc<ServiceInfo>>,
        dirty: &mut BTreeSet<ObjectKey>,
        added: &mut AddedSlices,
    ) -> bool {
        let old_report = self.orphans.remove(key);
        if let Some(old) = self.slices.remove(key) {
            if let Some(service) = old.service {
                if let Some(slices) = self.slices_by_service.get_mut(&service) {
                    slices.remove(key);
                    if slices.is_empty() {
                        self.slices_by_service.remove(&service);
                    }
                }
                dirty.insert(service);
            }
        }
        let Some(slice) = new else {
            return old_report.is_some();
        };
        // The service's own key when it exists: its strings are shared, not copied.
        let service = slice_service_name(slice).map(|name| {
            let named = ObjectKey::new(key.namespace.clone(), name.to_owned());
            services
                .get_key_value(&named)
                .map_or(named, |(known, _)| known.clone())
        });
        match &service {
            Some(service) => {
                added
                    .by_service
                    .push((service.clone(), key.clone(), Arc::clone(slice)));
                dirty.insert(service.clone());
            }
            None => {
                self.orphans.insert(
                    key.clone(),
                    Diagnostic {
                        object: format!("EndpointSlice {key}"),
                        reason: DiagnosticReason::OrphanEndpointSlice,
                        message: format!("no {LABEL_SERVICE_NAME} label"),
                    },
                );
            }
        }
        added.slices.push((
            key.clone(),
            SliceEntry {
                slice: Arc::clone(slice),
                service,
            },
        ));
        // A labelled slice's report is decided with its service (check_orphans).
        old_report.as_ref() != self.orphans.get(key)
    }

    /// Reports the slices naming `service` as orphans exactly when it does not exist;
    /// returns whether that changed anything.
    fn check_orphans(&mut self, service: &ObjectKey, exists: bool) -> bool {
        let Some(slices) = self.slices_by_service.get(service) else {
            return false;
        };
        let mut changed = false;
        for key in slices.keys() {
            if exists {
                changed |= self.orphans.remove(key).is_some();
            } else if !self.orphans.contains_key(key) {
                self.orphans.insert(
                    key.clone(),
                    Diagnostic {
                        object: format!("EndpointSlice {key}"),
                        reason: DiagnosticReason::OrphanEndpointSlice,
                        message: format!("service {service} does not exist"),
                    },
                );
                changed = true;
            }
        }
        changed
    }

    /// Runs the model's rules over one service and its slices.
    fn compute_service(
        &self,
        key: &ObjectKey,
        service: &Arc<ServiceInfo>,
        node_name: &str,
        zone: &str,
        settings: &ModelSettings,
    ) -> ServiceEntry {
        let slices: Vec<KeyedSlice<'_>> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flat_map(SortedVec::iter)
            .map(|(slice_key, slice)| (slice_key, slice.as_ref()))
            .collect();
        let context = ServiceContext {
            key,
            service,
            slices: &slices,
            node_name,
            zone,
            settings,
        };
        let mut output = Desired::default();
        context.add_frontends(&mut output);
        ServiceEntry {
            service: Arc::clone(service),
            output: ServiceOutput::of(output),
        }
    }

    /// Takes a service's output out of the shared state; returns its diagnostics.
    fn remove_service(
        &mut self,
        key: &ObjectKey,
        touched_v4: &mut Touched<Ipv4Addr>,
        touched_v6: &mut Touched<Ipv6Addr>,
        touched_ports: &mut BTreeSet<u16>,
    ) -> Vec<Diagnostic> {
        let Some(old) = self.services.remove(key) else {
            return Vec::new();
        };
        self.v4
            .remove(key, Some(&old.output.v4), &mut self.desired.v4, touched_v4);
        self.v6
            .remove(key, old.output.v6(), &mut self.desired.v6, touched_v6);
        for (port, _) in old.output.health_checks() {
            let port = *port;
            if let Some(claimants) = self.health_claimants.get_mut(&port) {
                claimants.remove(key);
                if claimants.is_empty() {
                    self.health_claimants.remove(&port);
                }
            }
            touched_ports.insert(port);
        }
        self.diagnosed.remove(key);
        old.output.diagnostics().to_vec()
    }

    /// Puts a service's output into the shared state (the entry itself goes into
    /// `self.services` after the pass's other services: `extend_sorted`).
    fn add_service(
        &mut self,
        key: &ObjectKey,
        entry: &ServiceEntry,
        touched_v4: &mut Touched<Ipv4Addr>,
        touched_v6: &mut Touched<Ipv6Addr>,
        touched_ports: &mut BTreeSet<u16>,
    ) {
        let created = entry.service.created;
        self.v4.add(
            key,
            created,
            Some(&entry.output.v4),
            &mut self.desired.v4,
            touched_v4,
        );
        self.v6.add(
            key,
            created,
            entry.output.v6(),
            &mut self.desired.v6,
            touched_v6,
        );
        for (port, _) in entry.output.health_checks() {
            self.health_claimants
                .entry(*port)
                .or_default()
                .insert(key.clone());
            touched_ports.insert(*port);
        }
        if !entry.output.diagnostics().is_empty() {
            self.diagnosed.insert(key.clone());
        }
    }

    /// Decides which service serves a healthCheckNodePort: the first in key order
    /// (kube-proxy would fail to bind the others on every sync); the others are
    /// reported.
    fn resolve_health_check(&mut self, port: u16, changes: &mut ModelChanges) {
        let claimants = self.health_claimants.get(&port);
        let winner = claimants.and_then(|claimants| claimants.first());
        let health = winner
            .and_then(|winner| self.services.get(winner))
            .and_then(|entry| sorted_get(entry.output.health_checks(), &port).cloned());
        let diagnostics: Vec<Diagnostic> = match winner {
            Some(winner) => claimants
                .into_iter()
                .flatten()
                .skip(1)
                .map(|loser| Diagnostic {
                    object: format!("Service {loser}"),
                    reason: DiagnosticReason::FrontendConflict,
                    message: format!("healthCheckNodePort {port} is already used by {winner}"),
                })
                .collect(),
            None => Vec::new(),
        };
        let reported = self
            .health_conflicts
            .get(&port)
            .map_or(&[][..], Vec::as_slice);
        if reported != diagnostics.as_slice() {
            changes.diagnostics = true;
            if diagnostics.is_empty() {
                self.health_conflicts.remove(&port);
            } else {
                self.health_conflicts.insert(port, diagnostics);
            }
        }
        if self.desired.health_checks.get(&port) != health.as_ref() {
            changes.health_checks = true;
            match health {
                Some(health) => self.desired.health_checks.insert(port, health),
                None => self.desired.health_checks.remove(&port),
            };
        }
    }

    /// The desired state's diagnostics, in a fixed order: orphan slices, each
    /// service's own (in key order), then frontend and health check conflicts.
    fn collect_diagnostics(&mut self) {
        let own = self
            .diagnosed
            .iter()
            .filter_map(|key| self.services.get(key))
            .flat_map(|entry| entry.output.diagnostics().iter());
        self.desired.diagnostics = self
            .orphans
            .values()
            .chain(own)
            .chain(self.v4.conflicts.values().flatten())
            .chain(self.v6.conflicts.values().flatten())
            .chain(self.health_conflicts.values().flatten())
            .cloned()
            .collect();
    }
}
