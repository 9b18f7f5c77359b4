//! Keeps the frontend address set (`FE_ADDR_V4_V1`: every address some frontend uses,
//! with what it is used as) equal to the service map's frontends.
//!
//! The datapath checks the set before anything else (`proxy-ebpf/src/destination.rs`):
//! a packet to an address outside it skips conntrack and the service map on pod
//! ingress, and a new flow to a ClusterIP port no frontend declares is rejected. So the
//! order matters, as for the service map's own writes:
//!
//! 1. before the syncer writes frontends, every address they use is in the set
//!    ([`FrontendAddrs::add_desired`]; a kind an address gains is added then, one it
//!    loses is dropped in step 2);
//! 2. after the syncer, the set holds exactly the addresses of the desired frontends
//!    and of the frontends the service map still holds (a frontend whose removal
//!    failed keeps its address): [`FrontendAddrs::remove_stale`].
//!
//! A packet therefore never meets a frontend whose address the set lacks. An address
//! whose frontends are not written yet (or were refused for room) is in the set
//! without them: for a ClusterIP its packets are rejected as undeclared ports, which
//! is what a Service that is not programmed yet should get.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use proxy_common::{frontend_addr, FrontendAddrV4};

use crate::{
    family::Family,
    model::{Desired, FrontendKey, FrontendKind},
};

/// Writes to the frontend address set of family `F`: the BPF map, or in tests a
/// recorder.
pub trait AddrWriter<F: Family = Ipv4Addr> {
    /// Sets the kinds of `addr`.
    ///
    /// # Errors
    /// When the kernel refuses the write (the map is full).
    fn put_frontend_addr(&mut self, addr: F, value: FrontendAddrV4) -> Result<(), String>;

    /// Sets the kinds of each address in order, stopping at the first write the
    /// kernel refuses: how many were written, and why the next was not. The maps do
    /// it in one call (a first pass at 50 000 services sets 50 000 addresses).
    fn put_frontend_addrs(&mut self, entries: &[(F, FrontendAddrV4)]) -> (usize, Option<String>) {
        for (done, (addr, value)) in entries.iter().enumerate() {
            if let Err(message) = self.put_frontend_addr(*addr, *value) {
                return (done, Some(message));
            }
        }
        (entries.len(), None)
    }

    /// Removes `addr` (gone already counts as removed).
    ///
    /// # Errors
    /// When the kernel refuses the delete.
    fn delete_frontend_addr(&mut self, addr: F) -> Result<(), String>;
}

/// A write to the set that failed; the next pass retries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrWriteError<F: Family = Ipv4Addr> {
    pub addr: F,
    pub message: String,
}

impl<F: Family> std::fmt::Display for AddrWriteError<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frontend address {}: {}", self.addr, self.message)
    }
}

/// What the set holds (as far as the agent wrote it), address to [`frontend_addr`] bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendAddrs<F: Family = Ipv4Addr> {
    held: HashMap<F, u8>,
    /// Writes applied (and sets readopted): equal at two moments when the agent did
    /// not touch the set in between (a readback taken meanwhile is then current).
    writes: u64,
    /// The last full pass (and every pass since) wrote everything: a pass over the
    /// addresses of changed frontends is enough ([`Self::add_changed`]). Unset after a
    /// readoption and after any failed write.
    incremental_ready: bool,
}

/// The [`frontend_addr`] bit of a frontend kind.
fn kind_bit(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => frontend_addr::CLUSTER_IP,
        FrontendKind::NodePort | FrontendKind::ExternalIp | FrontendKind::LoadBalancer => {
            frontend_addr::OTHER
        }
    }
}

/// The kinds the desired frontends at `addr` use (0: none), from the frontends at that
/// address only (frontend keys are ordered by address first).
fn desired_kinds_at<F: Family>(desired: &Desired, addr: F) -> u8 {
    let first = FrontendKey {
        addr,
        port: 0,
        proto: 0,
        scope: 0,
    };
    let last = FrontendKey {
        addr,
        port: u16::MAX,
        proto: u8::MAX,
        scope: u8::MAX,
    };
    let mut kinds = 0;
    for spec in F::part(desired)
        .frontends
        .range(first..=last)
        .map(|(_, spec)| spec)
    {
        kinds |= kind_bit(spec.kind);
        if kinds == frontend_addr::CLUSTER_IP | frontend_addr::OTHER {
            break;
        }
    }
    kinds
}

/// The addresses the desired frontends use, with their kinds.
fn desired_addrs<F: Family>(desired: &Desired) -> BTreeMap<F, u8> {
    let mut wanted = BTreeMap::new();
    for (frontend, spec) in &F::part(desired).frontends {
        *wanted.entry(frontend.addr).or_insert(0) |= kind_bit(spec.kind);
    }
    wanted
}

fn value(kinds: u8) -> FrontendAddrV4 {
    FrontendAddrV4 {
        kinds,
        _pad: [0; 3],
    }
}

impl<F: Family> Default for FrontendAddrs<F> {
    fn default() -> Self {
        Self::adopt(HashMap::new())
    }
}

impl<F: Family> FrontendAddrs<F> {
    /// A set that holds `held` (read back from the kernel after a restart).
    #[must_use]
    pub fn adopt(held: HashMap<F, u8>) -> Self {
        Self {
            held,
            writes: 0,
            incremental_ready: false,
        }
    }

    /// Takes `real`, read back from the kernel, as what the set holds (someone else
    /// wrote it): the next pass writes whatever differs from the desired set.
    pub fn readopt(&mut self, real: Self) {
        self.held = real.held;
        self.writes += 1;
        self.incremental_ready = false;
    }

    /// Whether [`Self::add_changed`] and [`Self::remove_changed`] may stand in for a
    /// full pass.
    #[must_use]
    pub fn incremental_ready(&self) -> bool {
        self.incremental_ready
    }

    /// Step 1 for the addresses of changed frontends only (`addrs`), as
    /// [`Self::add_desired`] does for all.
    pub fn add_changed(
        &mut self,
        desired: &Desired,
        addrs: &BTreeSet<F>,
        writer: &mut impl AddrWriter<F>,
    ) -> Vec<AddrWriteError<F>> {
        let wanted: Vec<(F, u8)> = addrs
            .iter()
            .map(|&addr| (addr, desired_kinds_at(desired, addr)))
            .filter(|&(_, kinds)| kinds != 0)
            .map(|(addr, kinds)| (addr, kinds | self.held.get(&addr).copied().unwrap_or(0)))
            .collect();
        let errors = self.put_all(wanted, writer);
        self.incremental_ready &= errors.is_empty();
        errors
    }

    /// Step 2 for the addresses of changed frontends only (`addrs`), as
    /// [`Self::remove_stale`] does for all; `programmed`: whether the service map
    /// still holds a frontend at an address.
    pub fn remove_changed(
        &mut self,
        desired: &Desired,
        addrs: &BTreeSet<F>,
        programmed: impl Fn(F) -> bool,
        writer: &mut impl AddrWriter<F>,
    ) -> Vec<AddrWriteError<F>> {
        let mut errors = Vec::new();
        for &addr in addrs {
            let mut kinds = desired_kinds_at(desired, addr);
            if kinds == 0 && programmed(addr) {
                kinds = frontend_addr::OTHER;
            }
            if kinds != 0 {
                self.put(addr, kinds, writer, &mut errors);
            } else {
                self.delete(addr, writer, &mut errors);
            }
        }
        self.incremental_ready &= errors.is_empty();
        errors
    }

    fn delete(
        &mut self,
        addr: F,
        writer: &mut impl AddrWriter<F>,
        errors: &mut Vec<AddrWriteError<F>>,
    ) {
        if !self.held.contains_key(&addr) {
            return;
        }
        match writer.delete_frontend_addr(addr) {
            Ok(()) => {
                self.held.remove(&addr);
                self.writes += 1;
            }
            Err(message) => errors.push(AddrWriteError { addr, message }),
        }
    }

    /// How many writes the set saw (see the field).
    #[must_use]
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// What the agent believes the set holds.
    #[must_use]
    pub fn held(&self) -> &HashMap<F, u8> {
        &self.held
    }

    fn put(
        &mut self,
        addr: F,
        kinds: u8,
        writer: &mut impl AddrWriter<F>,
        errors: &mut Vec<AddrWriteError<F>>,
    ) {
        if self.held.get(&addr) == Some(&kinds) {
            return;
        }
        match writer.put_frontend_addr(addr, value(kinds)) {
            Ok(()) => {
                self.held.insert(addr, kinds);
                self.writes += 1;
            }
            Err(message) => errors.push(AddrWriteError { addr, message }),
        }
    }

    /// Step 1 (before the syncer): every address of a desired frontend is in the set,
    /// with the kinds it has and the kinds it gains.
    pub fn add_desired(
        &mut self,
        desired: &Desired,
        writer: &mut impl AddrWriter<F>,
    ) -> Vec<AddrWriteError<F>> {
        let wanted = desired_addrs::<F>(desired)
            .into_iter()
            .map(|(addr, kinds)| (addr, kinds | self.held.get(&addr).copied().unwrap_or(0)))
            .collect::<Vec<_>>();
        let errors = self.put_all(wanted, writer);
        self.incremental_ready &= errors.is_empty();
        errors
    }

    /// [`Self::put`] for each of `wanted`, in batches: a refused write is reported and
    /// the rest go on.
    fn put_all(
        &mut self,
        wanted: impl IntoIterator<Item = (F, u8)>,
        writer: &mut impl AddrWriter<F>,
    ) -> Vec<AddrWriteError<F>> {
        let puts: Vec<(F, u8)> = wanted
            .into_iter()
            .filter(|(addr, kinds)| self.held.get(addr) != Some(kinds))
            .collect();
        let entries: Vec<(F, FrontendAddrV4)> = puts
            .iter()
            .map(|&(addr, kinds)| (addr, value(kinds)))
            .collect();
        let mut errors = Vec::new();
        let mut next = 0;
        while next < entries.len() {
            let (written, error) = writer.put_frontend_addrs(&entries[next..]);
            for &(addr, kinds) in &puts[next..next + written] {
                self.held.insert(addr, kinds);
                self.writes += 1;
            }
            next += written;
            if let Some(message) = error {
                errors.push(AddrWriteError {
                    addr: puts[next].0,
                    message,
                });
                next += 1;
            }
        }
        errors
    }

    /// Step 2 (after the syncer): the set holds the addresses of the desired frontends
    /// with their kinds, and those of frontends the service map still holds
    /// (`programmed`: [`super::Syncer::frontend_addrs`]) as [`frontend_addr::OTHER`]
    /// (never rejected); every other address is removed.
    pub fn remove_stale(
        &mut self,
        desired: &Desired,
        programmed: impl IntoIterator<Item = F>,
        writer: &mut impl AddrWriter<F>,
    ) -> Vec<AddrWriteError<F>> {
        let mut wanted = desired_addrs::<F>(desired);
        for addr in programmed {
            wanted.entry(addr).or_insert(frontend_addr::OTHER);
        }
        let mut errors = self.put_all(wanted.iter().map(|(&addr, &kinds)| (addr, kinds)), writer);
        let stale: Vec<F> = self
            .held
            .keys()
            .filter(|addr| !wanted.contains_key(addr))
            .copied()
            .collect();
        for addr in stale {
            self.delete(addr, writer, &mut errors);
        }
        self.incremental_ready = errors.is_empty();
        errors
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proxy_common::{proto, scope};

    use super::*;
    use crate::{
        model::{FrontendKey, FrontendSpec, ServicePortName},
        state::ObjectKey,
    };

    /// A recorder of writes, failing those to `refuse`.
    #[derive(Default)]
    struct FakeSet {
        held: HashMap<Ipv4Addr, u8>,
        log: Vec<String>,
        refuse: BTreeSet<Ipv4Addr>,
    }

    impl AddrWriter for FakeSet {
        fn put_frontend_addr(
            &mut self,
            addr: Ipv4Addr,
            value: FrontendAddrV4,
        ) -> Result<(), String> {
            if self.refuse.contains(&addr) {
                return Err("E2BIG".to_owned());
            }
            self.log.push(format!("put {addr} {}", value.kinds));
            self.held.insert(addr, value.kinds);
            Ok(())
        }

        fn delete_frontend_addr(&mut self, addr: Ipv4Addr) -> Result<(), String> {
            self.log.push(format!("delete {addr}"));
            self.held.remove(&addr);
            Ok(())
        }
    }

    fn desired(frontends: &[(Ipv4Addr, u16, FrontendKind)]) -> Desired {
        let mut out = Desired::default();
        for &(addr, port, kind) in frontends {
            out.v4.frontends.insert(
                FrontendKey {
                    addr,
                    port,
                    proto: proto::TCP,
                    scope: scope::DEFAULT,
                },
                std::sync::Arc::new(FrontendSpec {
                    service_port: ServicePortName {
                        service: ObjectKey {
                            namespace: "default".into(),
                            name: format!("svc-{addr}").into(),
                        },
                        port: "http".into(),
                        proto: proto::TCP,
                    },
                    kind,
                    backends: Vec::new(),
                    flags: 0,
                    affinity_timeout_s: 0,
                }),
            );
        }
        out
    }

    const CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    #[test]
    fn addresses_are_added_before_and_removed_after_the_frontends() {
        let mut set = FrontendAddrs::default();
        let mut kernel = FakeSet::default();
        let first = desired(&[
            (CLUSTER, 80, FrontendKind::ClusterIp),
            (CLUSTER, 443, FrontendKind::ClusterIp),
            (NODE, 30080, FrontendKind::NodePort),
        ]);
        assert!(set.add_desired(&first, &mut kernel).is_empty());
        assert_eq!(
            kernel.log,
            ["put 10.96.0.10 1", "put 192.168.1.2 2"],
            "one write per address"
        );
        assert!(set.remove_stale(&first, [], &mut kernel).is_empty());
        assert_eq!(kernel.log.len(), 2, "nothing left to change");

        // The NodePort goes; the service map still holds its frontend (a failed
        // delete): the address stays until the map lets it go, as a non-ClusterIP.
        kernel.log.clear();
        let second = desired(&[(CLUSTER, 80, FrontendKind::ClusterIp)]);
        assert!(set.add_desired(&second, &mut kernel).is_empty());
        assert!(kernel.log.is_empty());
        assert!(set.remove_stale(&second, [NODE], &mut kernel).is_empty());
        assert!(kernel.log.is_empty());
        assert!(set.remove_stale(&second, [], &mut kernel).is_empty());
        assert_eq!(kernel.log, ["delete 192.168.1.2"]);
        assert_eq!(kernel.held, set.held);
    }

    #[test]
    fn a_kind_is_gained_before_and_lost_after() {
        let mut set = FrontendAddrs::default();
        let mut kernel = FakeSet::default();
        let cluster = desired(&[(CLUSTER, 80, FrontendKind::ClusterIp)]);
        set.add_desired(&cluster, &mut kernel);
        set.remove_stale(&cluster, [], &mut kernel);
        kernel.log.clear();
        let external = desired(&[(CLUSTER, 80, FrontendKind::ExternalIp)]);
        set.add_desired(&external, &mut kernel);
        assert_eq!(kernel.log, ["put 10.96.0.10 3"]);
        set.remove_stale(&external, [], &mut kernel);
        assert_eq!(kernel.log, ["put 10.96.0.10 3", "put 10.96.0.10 2"]);
    }

    #[test]
    fn a_refused_write_is_reported_and_retried() {
        let mut set = FrontendAddrs::default();
        let mut kernel = FakeSet {
            refuse: [CLUSTER].into(),
            ..FakeSet::default()
        };
        // The refused address comes first: the one after it is still written.
        let cluster = desired(&[
            (CLUSTER, 80, FrontendKind::ClusterIp),
            (NODE, 30080, FrontendKind::NodePort),
        ]);
        let errors = set.add_desired(&cluster, &mut kernel);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].addr, CLUSTER);
        assert_eq!(
            set.held().keys().collect::<Vec<_>>(),
            [&NODE],
            "only what was written is held"
        );
        kernel.refuse.clear();
        assert!(set.add_desired(&cluster, &mut kernel).is_empty());
        assert_eq!(kernel.held, set.held);
    }

    /// The resync compares a readback only when the write count did not move while it
    /// ran: every applied write and every readopted set moves it, a refused write or a
    /// pass with nothing to write does not.
    #[test]
    fn the_write_count_moves_exactly_when_the_set_changes() {
        let mut set = FrontendAddrs::default();
        let mut kernel = FakeSet {
            refuse: [CLUSTER].into(),
            ..FakeSet::default()
        };
        let cluster = desired(&[(CLUSTER, 80, FrontendKind::ClusterIp)]);
        set.add_desired(&cluster, &mut kernel);
        assert_eq!(set.writes(), 0, "refused");
        kernel.refuse.clear();
        set.add_desired(&cluster, &mut kernel);
        assert_eq!(set.writes(), 1);
        set.remove_stale(&cluster, [], &mut kernel);
        assert_eq!(set.writes(), 1, "nothing to write");
        set.readopt(FrontendAddrs::adopt(HashMap::new()));
        assert_eq!(set.writes(), 2);
        assert!(set.held().is_empty(), "takes what the kernel holds");
        set.remove_stale(&desired(&[]), [], &mut kernel);
        assert_eq!(set.writes(), 2, "nothing held, nothing to delete");
        set.add_desired(&cluster, &mut kernel);
        assert_eq!(set.writes(), 3, "written again");
    }
}
