//! The incremental model against the model run from scratch: a seeded, bounded random
//! sequence of changes (services, slices moving between services, conflicts on
//! frontends and health check ports, local endpoints, node settings), each applied
//! incrementally, must leave what a fresh [`desired`] computes, and report every
//! difference it made; the same when the states say which keys changed (their
//! [`Revision`]) and the model skips some of them, as the agent does.
use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::*;
use crate::model::{desired, FrontendKind};

/// xorshift64: a fixed sequence, the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.below(items.len() as u64)).expect("small")]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const SERVICES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const SLICES: [&str; 8] = ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"];
/// Few addresses and ports, so that services collide on them.
const CLUSTER_IPS: [&str; 4] = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4"];
const CLAIMED_IPS: [&str; 2] = ["203.0.113.1", "203.0.113.2"];
const NODE_PORTS: [i32; 2] = [30_000, 30_001];
const HEALTH_PORTS: [i32; 2] = [32_000, 32_001];
const ENDPOINT_IPS: [&str; 4] = ["10.244.1.1", "10.244.1.2", "10.244.2.1", "10.244.2.2"];
/// The IPv6 twins: a service is IPv4-only, IPv6-only or dual-stack, so both families'
/// claims, conflicts and local endpoints are exercised (and their independence).
const CLUSTER_IPS_V6: [&str; 3] = ["fd00::1", "fd00::2", "fd00::3"];
const CLAIMED_IPS_V6: [&str; 2] = ["2001:db8::1", "2001:db8::2"];
const ENDPOINT_IPS_V6: [&str; 3] = ["fd00:1::1", "fd00:1::2", "fd00:2::1"];

fn random_service(rng: &mut Rng, name: &str) -> Service {
    let service_type = *rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
    let mut ports = vec![json!({"name": "http", "port": 80, "protocol": "TCP",
        "nodePort": rng.pick(&NODE_PORTS)})];
    if rng.chance(40) {
        ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP",
            "nodePort": rng.pick(&NODE_PORTS)}));
    }
    let (families, cluster_ips) = match rng.below(4) {
        0 => (json!(["IPv6"]), json!([rng.pick(&CLUSTER_IPS_V6)])),
        1 => (
            json!(["IPv4", "IPv6"]),
            json!([rng.pick(&CLUSTER_IPS), rng.pick(&CLUSTER_IPS_V6)]),
        ),
        _ => (json!(["IPv4"]), json!([rng.pick(&CLUSTER_IPS)])),
    };
    let mut spec = json!({
        "type": service_type,
        "clusterIP": cluster_ips[0],
        "clusterIPs": cluster_ips,
        "ipFamilies": families,
        "ports": ports,
    });
    if rng.chance(30) {
        spec["externalIPs"] = json!([rng.pick(&CLAIMED_IPS), rng.pick(&CLAIMED_IPS_V6)]);
    }
    if rng.chance(50) {
        spec["externalTrafficPolicy"] = json!("Local");
        spec["healthCheckNodePort"] = json!(rng.pick(&HEALTH_PORTS));
    }
    if rng.chance(30) {
        spec["loadBalancerSourceRanges"] = json!([
            *rng.pick(&["192.0.2.0/24", "198.51.100.0/24"]),
            *rng.pick(&["2001:db8:1::/48", "2001:db8:2::/48"]),
        ]);
    }
    let mut metadata = json!({"name": name, "namespace": "ns"});
    if rng.chance(70) {
        metadata["creationTimestamp"] =
            json!(rng.pick(&["2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]));
    }
    let status = json!({"loadBalancer": {"ingress": [
        {"ip": rng.pick(&CLAIMED_IPS)},
        {"ip": rng.pick(&CLAIMED_IPS_V6)},
    ]}});
    serde_json::from_value(json!({"metadata": metadata, "spec": spec, "status": status}))
        .expect("a valid Service")
}

fn random_slice(rng: &mut Rng, name: &str) -> EndpointSlice {
    let mut metadata = json!({"name": name, "namespace": "ns"});
    if !rng.chance(10) {
        // Now and then a service that does not exist.
        let service = *rng.pick(&["a", "b", "c", "d", "e", "f", "gone"]);
        metadata["labels"] = json!({ LABEL_SERVICE_NAME: service });
    }
    let v6 = rng.chance(40);
    let endpoints: Vec<serde_json::Value> = (0..rng.below(4))
        .map(|_| {
            let address = if v6 {
                *rng.pick(&ENDPOINT_IPS_V6)
            } else {
                *rng.pick(&ENDPOINT_IPS)
            };
            json!({
                "addresses": [address],
                "conditions": {"ready": rng.chance(80)},
                "nodeName": rng.pick(&["node-a", "node-b"]),
            })
        })
        .collect();
    let ports = json!([
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
    ]);
    serde_json::from_value(json!({
        "metadata": metadata, "addressType": if v6 { "IPv6" } else { "IPv4" },
        "endpoints": endpoints, "ports": ports,
    }))
    .expect("a valid EndpointSlice")
}

/// Every difference between `before` and `after` in family `F` is among `changes`.
fn assert_family_reported<F: Family>(
    before: &Desired,
    after: &Desired,
    changes: &ModelChanges,
    step: usize,
) {
    let (before, after) = (F::part(before), F::part(after));
    let keys: BTreeSet<&FrontendKey<F>> = before
        .frontends
        .keys()
        .chain(after.frontends.keys())
        .collect();
    for key in keys {
        let (old, new) = (before.frontends.get(key), after.frontends.get(key));
        if old != new {
            assert_eq!(
                F::changed_frontends(changes).get(key),
                Some(&old.map(|spec| spec.service_port.clone())),
                "step {step}: {} frontend {key:?} changed unreported",
                F::NAME
            );
        }
    }
    let names: BTreeSet<&ServicePortName> = before
        .source_ranges
        .keys()
        .chain(after.source_ranges.keys())
        .collect();
    for name in names {
        if before.source_ranges.get(name) != after.source_ranges.get(name) {
            assert!(
                F::changed_ranges(changes).contains(name),
                "step {step}: {} ranges of {name}",
                F::NAME
            );
        }
    }
}

/// Every difference between `before` and `after` is among `changes`.
fn assert_reported(before: &Desired, after: &Desired, changes: &ModelChanges, step: usize) {
    if changes.all {
        return;
    }
    assert_family_reported::<Ipv4Addr>(before, after, changes, step);
    assert_family_reported::<std::net::Ipv6Addr>(before, after, changes, step);
    assert_eq!(
        changes.local_endpoints,
        before.v4.local_endpoints != after.v4.local_endpoints
            || before.v6.local_endpoints != after.v6.local_endpoints,
        "step {step}: local endpoints"
    );
    assert_eq!(
        changes.health_checks,
        before.health_checks != after.health_checks,
        "step {step}: health checks"
    );
    if before.diagnostics != after.diagnostics {
        assert!(changes.diagnostics, "step {step}: diagnostics");
    }
}

#[test]
fn changes_applied_one_by_one_leave_what_a_fresh_model_computes() {
    random_changes(false);
}

#[test]
fn changes_named_by_the_revisions_leave_what_a_fresh_model_computes() {
    random_changes(true);
}

/// The random sequence; `with_revisions`: every state says which keys changed (now
/// and then it cannot say), and the model sees only some of the states.
fn random_changes(with_revisions: bool) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut revisions = crate::state::Revisions::default();
    let mut changed = ChangedKeys::default();
    let mut updates = 0;
    let mut state = ClusterState::default();
    state.node.name = Some("node-a".into());
    let mut settings = ModelSettings {
        proxy_name: None,
        node_port_addresses: vec![Ipv4Addr::new(192, 168, 1, 10)],
        node_port_addresses_v6: vec!["fd00::10".parse().expect("v6")],
    };
    let mut model = IncrementalModel::default();
    let mut conflicts_seen = 0;
    let mut v6_frontends_seen = 0;
    let mut before = model.desired().clone();
    for step in 0..400 {
        for _ in 0..=rng.below(3) {
            match rng.below(10) {
                0..=3 => {
                    let name = *rng.pick(&SERVICES);
                    let key = ObjectKey::new("ns", name);
                    changed.services.insert(key.clone());
                    if rng.chance(25) {
                        state.services.remove(&key);
                    } else {
                        state.services.insert(
                            key,
                            Arc::new(ServiceInfo::from(&random_service(&mut rng, name))),
                        );
                    }
                }
                4..=8 => {
                    let name = *rng.pick(&SLICES);
                    let key = ObjectKey::new("ns", name);
                    changed.endpoint_slices.insert(key.clone());
                    if rng.chance(25) {
                        state.endpoint_slices.remove(&key);
                    } else {
                        state.endpoint_slices.insert(
                            key,
                            Arc::new(SliceInfo::from(&random_slice(&mut rng, name))),
                        );
                    }
                }
                _ if rng.chance(30) => {
                    // Other node settings: everything is computed again.
                    settings.node_port_addresses =
                        vec![Ipv4Addr::new(192, 168, 1, 10 + u8::from(rng.chance(50)))];
                }
                _ => {}
            }
        }
        if with_revisions {
            let step_changes = std::mem::take(&mut changed);
            state.revision = revisions.next((!rng.chance(5)).then_some(step_changes));
            if rng.chance(40) {
                // A state the model never sees: the next one's steps cover it.
                continue;
            }
        }
        updates += 1;
        let changes = model.update(&state, &settings);
        let fresh = desired(&state, &settings);
        assert_eq!(model.desired(), &fresh, "step {step}");
        assert_reported(&before, &fresh, &changes, step);
        conflicts_seen += fresh
            .diagnostics
            .iter()
            .filter(|d| d.reason == DiagnosticReason::FrontendConflict)
            .count();
        v6_frontends_seen += fresh.v6.frontends.len();
        // Nothing changed since: nothing to do.
        let again = model.update(&state, &settings);
        assert!(
            again.is_empty() && again.slices.is_empty(),
            "step {step}: {again:?}"
        );
        before = fresh;
    }
    assert!(updates > 200, "the model saw {updates} states");
    assert!(
        conflicts_seen > 100,
        "the sequence exercises conflicts: {conflicts_seen}"
    );
    assert!(
        v6_frontends_seen > 200,
        "the sequence exercises IPv6 frontends: {v6_frontends_seen}"
    );
}

/// The model trusts a state's revision: a change its steps do not name is not looked
/// for (so a source must name every key it changed), and a state of another lineage,
/// or one further on than the steps cover, is compared whole.
#[test]
fn only_the_keys_the_revision_names_are_compared() {
    let mut rng = Rng(7);
    let settings = ModelSettings::default();
    let mut state = ClusterState::default();
    let mut revisions = crate::state::Revisions::default();
    let key = ObjectKey::new("ns", "web");
    state.services.insert(
        key.clone(),
        Arc::new(ServiceInfo::from(&random_service(&mut rng, "web"))),
    );
    state.revision = revisions.next(None);
    let mut model = IncrementalModel::default();
    model.update(&state, &settings);

    let replace = |state: &mut ClusterState, rng: &mut Rng| loop {
        let service = Arc::new(ServiceInfo::from(&random_service(rng, "web")));
        if Some(&service) != state.services.get(&key) {
            state.services.insert(key.clone(), service);
            return;
        }
    };
    // Changed, but the step names nothing: not seen.
    replace(&mut state, &mut rng);
    state.revision = revisions.next(Some(ChangedKeys::default()));
    model.update(&state, &settings);
    assert_ne!(model.desired(), &desired(&state, &settings));

    // Named: seen.
    state.revision = revisions.next(Some(ChangedKeys {
        services: [key.clone()].into(),
        ..ChangedKeys::default()
    }));
    model.update(&state, &settings);
    assert_eq!(model.desired(), &desired(&state, &settings));

    // Unnamed again, but in another lineage: compared whole.
    replace(&mut state, &mut rng);
    state.revision = crate::state::Revisions::default().next(Some(ChangedKeys::default()));
    model.update(&state, &settings);
    assert_eq!(model.desired(), &desired(&state, &settings));
}

/// Many entries rebuild the map from both sorted runs, a few are inserted: either way
/// the map holds the union, in order.
#[test]
fn extend_sorted_keeps_every_entry() {
    for (held, added) in [
        (0..0, 0..10),
        (0..100, 100..110),
        (0..10, 10..100),
        (5..6, 0..5),
    ] {
        let mut map: BTreeMap<u32, u32> = held.clone().map(|k| (k * 2, k)).collect();
        let entries: Vec<(u32, u32)> = added.clone().map(|k| (k * 2 + 1, k)).collect();
        extend_sorted(&mut map, entries);
        let mut want: Vec<(u32, u32)> = held
            .map(|k| (k * 2, k))
            .chain(added.map(|k| (k * 2 + 1, k)))
            .collect();
        want.sort_unstable();
        assert_eq!(map.into_iter().collect::<Vec<_>>(), want);
    }
}

/// Claimants stay sorted best first, go from one inline to many and back, and say
/// when the last one left.
#[test]
fn claimants_keep_the_best_first() {
    let claim = |name: &str, rank: FrontendKind| Claim::new(rank, None, ObjectKey::new("ns", name));
    let mut claimants = Claimants::One(claim("b", FrontendKind::ClusterIp));
    claimants.insert(claim("c", FrontendKind::ExternalIp));
    claimants.insert(claim("a", FrontendKind::ClusterIp));
    let names = |claimants: &Claimants| -> Vec<String> {
        claimants
            .as_slice()
            .iter()
            .map(|claim| claim.service.name.to_string())
            .collect()
    };
    assert_eq!(names(&claimants), ["a", "b", "c"]);
    assert!(!claimants.remove(&ObjectKey::new("ns", "a")));
    assert!(!claimants.remove(&ObjectKey::new("ns", "c")));
    assert!(matches!(claimants, Claimants::One(_)), "one left, inline");
    assert!(
        !claimants.remove(&ObjectKey::new("ns", "zz")),
        "not a claimant"
    );
    assert!(
        claimants.remove(&ObjectKey::new("ns", "b")),
        "the last one left"
    );
}
