//! Syncer tests against an in-memory map pair that behaves like the kernel's hash maps
//! (capacity included). The syncer's contract is about which writes it issues and in
//! what order; the real maps are exercised by the datapath and lab tests.
use std::{collections::HashMap, net::Ipv4Addr};

use proxy_common::{proto, scope};

use super::*;
use crate::{
    model::{FrontendKind, ServicePortName},
    state::ObjectKey,
};

/// Hash maps with a capacity, recording every op.
#[derive(Default)]
struct FakeMaps {
    services: HashMap<ServiceKeyV4, ServiceValueV4>,
    backends: HashMap<u32, BackendV4>,
    service_capacity: Option<usize>,
    ops: Vec<MapOp>,
}

impl MapWriter for FakeMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), WriteError> {
        match *op {
            MapOp::PutService { key, value } => {
                let full = self
                    .service_capacity
                    .is_some_and(|capacity| self.services.len() >= capacity);
                if full && !self.services.contains_key(&key) {
                    return Err(WriteError {
                        op: *op,
                        message: "E2BIG".into(),
                        map_full: true,
                    });
                }
                self.services.insert(key, value);
            }
            MapOp::DeleteService { key } => {
                self.services.remove(&key);
            }
            MapOp::PutBackend { id, backend } => {
                self.backends.insert(id, backend);
            }
            MapOp::DeleteBackend { id } => {
                self.backends.remove(&id);
            }
        }
        self.ops.push(*op);
        Ok(())
    }
}

fn frontend(name: &str, last_octet: u8, backends: &[u8]) -> (FrontendKey, FrontendSpec) {
    (
        FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, last_octet),
            port: 80,
            proto: proto::TCP,
            scope: scope::DEFAULT,
        },
        FrontendSpec {
            service_port: ServicePortName {
                service: ObjectKey::new("default", name),
                port: "http".into(),
                proto: proto::TCP,
            },
            kind: FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|octet| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, *octet), 8080))
                .collect(),
            flags: 0,
            affinity_timeout_s: 0,
        },
    )
}

fn desired(frontends: &[(FrontendKey, FrontendSpec)]) -> Desired {
    Desired {
        frontends: frontends.iter().cloned().collect(),
        diagnostics: Vec::new(),
    }
}

/// Every frontend's backends as the maps resolve them.
fn resolved(maps: &FakeMaps) -> BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> {
    maps.services
        .iter()
        .filter(|(key, _)| key.slot == 0)
        .map(|(key, value)| {
            let mut backends: Vec<Ipv4Addr> = (1..=value.count)
                .map(|slot| maps.services[&ServiceKeyV4 { slot, ..*key }].backend_id)
                .map(|id| maps.backends[&id].addr.to_ipv4())
                .collect();
            backends.sort();
            (key.addr.to_ipv4(), backends)
        })
        .collect()
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, last)
}

#[test]
fn writes_only_the_difference() {
    let mut maps = FakeMaps::default();
    let mut syncer = Syncer::default();
    let state = desired(&[
        frontend("web", 10, &[11, 12, 13]),
        frontend("dns", 53, &[21]),
    ]);
    let report = syncer.sync(&state, &mut maps);
    assert!(report.failures.is_empty());
    assert_eq!(
        resolved(&maps)[&Ipv4Addr::new(10, 96, 0, 10)],
        [ip(11), ip(12), ip(13)]
    );
    let first_ops = maps.ops.len();

    // The same state again: nothing to write.
    let report = syncer.sync(&state, &mut maps);
    assert_eq!(report.ops_applied, 0);
    assert_eq!(maps.ops.len(), first_ops);

    // One backend leaves web: dns is not touched, and the pair is reported for flow cleanup.
    maps.ops.clear();
    let report = syncer.sync(
        &desired(&[frontend("web", 10, &[11, 12]), frontend("dns", 53, &[21])]),
        &mut maps,
    );
    assert_eq!(
        resolved(&maps)[&Ipv4Addr::new(10, 96, 0, 10)],
        [ip(11), ip(12)]
    );
    assert_eq!(report.removed_pairs.len(), 1, "{:?}", report.removed_pairs);
    assert!(maps.ops.iter().all(|op| match op {
        MapOp::PutService { key, .. } | MapOp::DeleteService { key } =>
            key.addr.to_ipv4() == Ipv4Addr::new(10, 96, 0, 10),
        _ => true,
    }));

    // A service deleted: its entries go.
    syncer.sync(&desired(&[frontend("dns", 53, &[21])]), &mut maps);
    assert_eq!(
        resolved(&maps).keys().copied().collect::<Vec<_>>(),
        [Ipv4Addr::new(10, 96, 0, 53)]
    );
    assert_eq!(maps.backends.len(), 1, "unused backends are removed");
}

#[test]
fn a_full_map_fails_one_service_and_keeps_the_others() {
    // Room for web (1 frontend + 2 slots) and nothing more.
    let mut maps = FakeMaps {
        service_capacity: Some(3),
        ..FakeMaps::default()
    };
    let mut syncer = Syncer::default();
    let report = syncer.sync(
        &desired(&[
            frontend("a-web", 10, &[11, 12]),
            frontend("b-big", 20, &[11, 12, 13]),
        ]),
        &mut maps,
    );
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(report.failures[0].error.map_full);
    assert_eq!(report.failures[0].service_port.service.name, "b-big");
    assert_eq!(
        resolved(&maps)[&Ipv4Addr::new(10, 96, 0, 10)],
        [ip(11), ip(12)]
    );
    assert!(
        !resolved(&maps).contains_key(&Ipv4Addr::new(10, 96, 0, 20)),
        "no half-written frontend"
    );
}

#[test]
fn an_adopted_mirror_needs_no_writes() {
    let mut maps = FakeMaps::default();
    let state = desired(&[frontend("web", 10, &[11, 12, 13])]);
    Syncer::default().sync(&state, &mut maps);
    // A restarted agent reads the maps back and syncs the same state.
    let mirror = Mirror {
        services: maps.services.clone(),
        backends: maps.backends.clone(),
    };
    maps.ops.clear();
    let report = Syncer::adopt(mirror).sync(&state, &mut maps);
    assert_eq!(report.ops_applied, 0, "{:?}", maps.ops);
}
