//! Syncer tests against in-memory maps. The syncer's contract is which writes it
//! issues and in what order; the real BPF maps are exercised by the datapath and lab
//! tests. The fake maps:
//! - log every applied op in a readable form (`put slot 10.96.0.10:80/TCP#2 = ...`),
//! - check after every op the invariant the datapath relies on (a frontend with count
//!   `n` has slots `1..=n`, each naming an existing backend),
//! - fail with `map_full` on the Nth write, or when the service map is at capacity.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::{proto, scope, service_flags, BackendV4, Be16, Be32, ServiceKeyV4};

use super::*;
use crate::{
    model::{FrontendKind, ModelChanges, ServicePortName},
    state::ObjectKey,
};

// ---------------------------------------------------------------------------------
// The fake maps.

#[derive(Default)]
struct FakeMaps {
    services: HashMap<ServiceKeyV4, ServiceValueV4>,
    backends: HashMap<u32, BackendV4>,
    source_ranges: std::collections::BTreeSet<crate::sync::SourceRangeKey>,
    /// The service map holds at most this many entries (like a BPF hash map's
    /// max_entries): inserting a new key beyond it fails with `map_full`.
    service_capacity: Option<usize>,
    /// The Nth write from now (1-based, counting failed ones) fails with `map_full`.
    fail_on: Option<usize>,
    writes: usize,
    /// Applied ops, rendered.
    log: Vec<String>,
    /// The length of each [`MapWriter::apply_batch`] call.
    batches: Vec<usize>,
    /// Invariant violations, with the op that caused them.
    violations: Vec<String>,
    /// Skip the invariant check, which walks every slot after every op (quadratic for
    /// a frontend of 65 535 backends).
    unchecked: bool,
}

fn frontend_name(key: &ServiceKeyV4) -> String {
    let mut name = format!(
        "{}:{}/{}",
        key.addr.to_ipv4(),
        key.port.to_host(),
        match key.proto {
            proto::TCP => "TCP",
            proto::UDP => "UDP",
            _ => "?",
        }
    );
    if key.scope == scope::INTERNAL {
        name.push_str("/internal");
    }
    name
}

fn backend_name(backend: &BackendV4) -> String {
    format!("{}:{}", backend.addr.to_ipv4(), backend.port.to_host())
}

impl FakeMaps {
    fn at_capacity(capacity: usize) -> Self {
        Self {
            service_capacity: Some(capacity),
            ..Self::default()
        }
    }

    fn failing_on(write: usize) -> Self {
        Self {
            fail_on: Some(write),
            ..Self::default()
        }
    }

    fn backend(&self, id: u32) -> String {
        self.backends
            .get(&id)
            .map_or_else(|| format!("<no backend {id}>"), backend_name)
    }

    fn render(&self, op: &MapOp) -> String {
        match *op {
            MapOp::PutBackend { backend, .. } => format!("put backend {}", backend_name(&backend)),
            MapOp::DeleteBackend { id } => format!("delete backend {}", self.backend(id)),
            MapOp::PutService { key, value } if key.slot == 0 => {
                let mut line =
                    format!("put frontend {} count={}", frontend_name(&key), value.count);
                if value.flags != 0 {
                    line.push_str(&format!(" flags={:#x}", value.flags));
                }
                if value.affinity_timeout_s != 0 {
                    line.push_str(&format!(" affinity={}", value.affinity_timeout_s));
                }
                line
            }
            MapOp::PutService { key, value } => format!(
                "put slot {}#{} = {}",
                frontend_name(&key),
                key.slot,
                self.backend(value.backend_id)
            ),
            MapOp::DeleteService { key } if key.slot == 0 => {
                format!("delete frontend {}", frontend_name(&key))
            }
            MapOp::DeleteService { key } => {
                format!("delete slot {}#{}", frontend_name(&key), key.slot)
            }
            MapOp::PutSourceRange { key } => format!(
                "put source range {}/{} for #{}",
                key.addr, key.prefix_len, key.service_id
            ),
            MapOp::DeleteSourceRange { key } => format!(
                "delete source range {}/{} for #{}",
                key.addr, key.prefix_len, key.service_id
            ),
        }
    }

    /// What a packet can see: every frontend's count, slots and backends are whole.
    fn check_invariant(&mut self, after: &str) {
        for (key, head) in self.services.iter().filter(|(key, _)| key.slot == 0) {
            for slot in 1..=head.count {
                let value = self.services.get(&ServiceKeyV4 { slot, ..*key });
                let problem = match value {
                    None => Some(format!("slot {slot} missing")),
                    Some(value) if !self.backends.contains_key(&value.backend_id) => Some(format!(
                        "slot {slot} names missing backend {}",
                        value.backend_id
                    )),
                    Some(_) => None,
                };
                if let Some(problem) = problem {
                    self.violations.push(format!(
                        "after `{after}`: {} count={}: {problem}",
                        frontend_name(key),
                        head.count
                    ));
                }
            }
        }
    }

    /// The frontends as the datapath resolves them, one line each, sorted.
    fn resolved(&self) -> Vec<String> {
        let mut heads: Vec<(&ServiceKeyV4, &ServiceValueV4)> = self
            .services
            .iter()
            .filter(|(key, _)| key.slot == 0)
            .collect();
        heads.sort_by_key(|(key, _)| **key);
        heads
            .into_iter()
            .map(|(key, head)| {
                let mut backends: Vec<(Ipv4Addr, u16, u8)> = (1..=head.count)
                    .filter_map(|slot| self.services.get(&ServiceKeyV4 { slot, ..*key }))
                    .filter_map(|value| self.backends.get(&value.backend_id))
                    .map(|b| (b.addr.to_ipv4(), b.port.to_host(), b.flags))
                    .collect();
                backends.sort_unstable();
                let backends: Vec<String> = backends
                    .iter()
                    .map(|(addr, port, flags)| {
                        let local = if flags & backend_flags::LOCAL != 0 {
                            " (local)"
                        } else {
                            ""
                        };
                        format!("{addr}:{port}{local}")
                    })
                    .collect();
                format!("{} -> {}", frontend_name(key), backends.join(","))
            })
            .collect()
    }

    fn mirror(&self) -> Mirror {
        Mirror {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            source_ranges: self.source_ranges.clone(),
        }
    }
}

impl MapWriter for FakeMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), WriteError> {
        self.writes += 1;
        let full = |message: &str| WriteError {
            op: *op,
            message: message.to_owned(),
            map_full: true,
        };
        if self.fail_on == Some(self.writes) {
            return Err(full("injected: ENOSPC"));
        }
        if let (MapOp::PutService { key, .. }, Some(capacity)) = (op, self.service_capacity) {
            if self.services.len() >= capacity && !self.services.contains_key(key) {
                return Err(full("E2BIG"));
            }
        }
        // Rendered before applying, so deletions still show what they delete.
        let line = self.render(op);
        match *op {
            MapOp::PutService { key, value } => {
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
            MapOp::PutSourceRange { key } => {
                self.source_ranges.insert(key);
            }
            MapOp::DeleteSourceRange { key } => {
                self.source_ranges.remove(&key);
            }
        }
        if !self.unchecked {
            self.check_invariant(&line);
        }
        self.log.push(line);
        Ok(())
    }

    /// As the kernel does a batch: in order, stopping at the first op refused.
    fn apply_batch(&mut self, ops: &[MapOp]) -> (usize, Option<WriteError>) {
        self.batches.push(ops.len());
        for (applied, op) in ops.iter().enumerate() {
            if let Err(error) = self.apply(op) {
                return (applied, Some(error));
            }
        }
        (ops.len(), None)
    }
}

// ---------------------------------------------------------------------------------
// Desired frontends, written compactly.

/// A frontend of service `name` (port `http`) on `10.96.0.<octet>:80/TCP` with backends
/// `10.244.1.<b>:8080`.
#[derive(Clone)]
struct Fe {
    name: &'static str,
    key: FrontendKey,
    kind: FrontendKind,
    backends: Vec<u8>,
    flags: u16,
    affinity_timeout_s: u32,
}

fn fe(name: &'static str, octet: u8, backends: &[u8]) -> Fe {
    Fe {
        name,
        key: FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, octet),
            port: 80,
            proto: proto::TCP,
            scope: scope::DEFAULT,
        },
        kind: FrontendKind::ClusterIp,
        backends: backends.to_vec(),
        flags: 0,
        affinity_timeout_s: 0,
    }
}

impl Fe {
    /// The same service port on a NodePort.
    fn node_port(mut self, node_port: u16) -> Self {
        self.key.addr = Ipv4Addr::new(192, 168, 1, 10);
        self.key.port = node_port;
        self.kind = FrontendKind::NodePort;
        self.flags |= service_flags::EXTERNAL;
        self
    }

    fn affinity(mut self, timeout: u32) -> Self {
        self.flags |= service_flags::AFFINITY;
        self.affinity_timeout_s = timeout;
        self
    }

    fn udp(mut self) -> Self {
        self.key.proto = proto::UDP;
        self
    }

    fn service_port(&self) -> ServicePortName {
        ServicePortName {
            service: ObjectKey::new("default", self.name),
            port: "http".into(),
            proto: self.key.proto,
        }
    }

    fn spec(&self) -> FrontendSpec {
        FrontendSpec {
            service_port: self.service_port(),
            kind: self.kind,
            backends: self
                .backends
                .iter()
                .map(|b| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, *b), 8080))
                .collect(),
            flags: self.flags,
            affinity_timeout_s: self.affinity_timeout_s,
        }
    }
}

fn desired(frontends: &[Fe]) -> Desired {
    Desired {
        v4: crate::model::FamilyDesired {
            frontends: frontends
                .iter()
                .map(|fe| (fe.key, std::sync::Arc::new(fe.spec())))
                .collect(),
            ..crate::model::FamilyDesired::default()
        },
        ..Desired::default()
    }
}

/// What `desired` resolves to, as [`FakeMaps::resolved`] writes it.
fn resolved(frontends: &[Fe]) -> Vec<String> {
    let mut sorted = frontends.to_vec();
    sorted.sort_by_key(|fe| service_key(&fe.key, 0));
    sorted
        .iter()
        .map(|fe| {
            let mut backends = fe.backends.clone();
            backends.sort_unstable();
            let backends: Vec<String> = backends
                .iter()
                .map(|b| format!("10.244.1.{b}:8080"))
                .collect();
            format!(
                "{} -> {}",
                frontend_name(&service_key(&fe.key, 0)),
                backends.join(",")
            )
        })
        .collect()
}

/// Syncs and checks what must hold after every pass: the mirror equals the maps, and
/// no op broke the datapath invariant.
fn sync(syncer: &mut Syncer, fake: &mut FakeMaps, frontends: &[Fe]) -> SyncReport {
    let before = fake.log.len();
    let report = syncer.sync(&desired(frontends), fake);
    assert!(fake.violations.is_empty(), "{:#?}", fake.violations);
    assert_eq!(
        syncer.mirror(),
        &fake.mirror(),
        "mirror differs from the maps"
    );
    assert_eq!(report.ops_applied, fake.log.len() - before, "ops_applied");
    report
}

/// `(service, backend)` pairs of a report, by name, sorted.
fn removed_pairs(
    report: &SyncReport,
    service_names: &HashMap<u32, &str>,
    backend_names: &HashMap<u32, String>,
) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = report
        .removed_pairs
        .iter()
        .map(|(service, backend)| {
            (
                service_names
                    .get(service)
                    .map_or_else(|| format!("<service {service}>"), |name| (*name).to_owned()),
                backend_names
                    .get(backend)
                    .cloned()
                    .unwrap_or_else(|| format!("<backend {backend}>")),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

// ---------------------------------------------------------------------------------
// Transitions: sync `before`, then `after`; check the exact ops of the second pass.

struct Transition {
    name: &'static str,
    description: &'static str,
    before: Vec<Fe>,
    after: Vec<Fe>,
    /// The second pass's ops, in order.
    ops: &'static [&'static str],
    /// `(service, backend)` pairs reported for flow cleanup.
    removed: &'static [(&'static str, &'static str)],
}

fn transitions() -> Vec<Transition> {
    let web = |backends: &[u8]| fe("web", 10, backends);
    let dns = fe("dns", 53, &[21]);
    vec![
        Transition {
            name: "first_sync",
            description: "empty maps: every frontend's backends (one batch), then for each frontend its slots, then its frontend entry",
            before: vec![],
            after: vec![web(&[11, 12]), dns.clone()],
            ops: &[
                "put backend 10.244.1.11:8080",
                "put backend 10.244.1.12:8080",
                "put backend 10.244.1.21:8080",
                "put slot 10.96.0.10:80/TCP#1 = 10.244.1.11:8080",
                "put slot 10.96.0.10:80/TCP#2 = 10.244.1.12:8080",
                "put frontend 10.96.0.10:80/TCP count=2",
                "put slot 10.96.0.53:80/TCP#1 = 10.244.1.21:8080",
                "put frontend 10.96.0.53:80/TCP count=1",
            ],
            removed: &[],
        },
        Transition {
            name: "identical",
            description: "the same desired state again writes nothing",
            before: vec![web(&[11, 12]), dns.clone()],
            after: vec![web(&[11, 12]), dns.clone()],
            ops: &[],
            removed: &[],
        },
        Transition {
            name: "last_backend_removed",
            description:
                "count lowered first, then the slot, then the unused backend; dns untouched",
            before: vec![web(&[11, 12, 13]), dns.clone()],
            after: vec![web(&[11, 12]), dns.clone()],
            ops: &[
                "put frontend 10.96.0.10:80/TCP count=2",
                "delete slot 10.96.0.10:80/TCP#3",
                "delete backend 10.244.1.13:8080",
            ],
            removed: &[("web", "10.244.1.13:8080")],
        },
        Transition {
            name: "middle_backend_removed",
            description: "the last backend moves into the freed slot before the count shrinks",
            before: vec![web(&[11, 12, 13])],
            after: vec![web(&[11, 13])],
            ops: &[
                "put slot 10.96.0.10:80/TCP#2 = 10.244.1.13:8080",
                "put frontend 10.96.0.10:80/TCP count=2",
                "delete slot 10.96.0.10:80/TCP#3",
                "delete backend 10.244.1.12:8080",
            ],
            removed: &[("web", "10.244.1.12:8080")],
        },
        Transition {
            name: "backend_added",
            description: "backend, then slot, then the raised count; nothing reported removed",
            before: vec![web(&[11])],
            after: vec![web(&[11, 12])],
            ops: &[
                "put backend 10.244.1.12:8080",
                "put slot 10.96.0.10:80/TCP#2 = 10.244.1.12:8080",
                "put frontend 10.96.0.10:80/TCP count=2",
            ],
            removed: &[],
        },
        Transition {
            name: "backend_replaced",
            description: "same count: the slot is rewritten, the frontend entry is not",
            before: vec![web(&[11])],
            after: vec![web(&[12])],
            ops: &[
                "put backend 10.244.1.12:8080",
                "put slot 10.96.0.10:80/TCP#1 = 10.244.1.12:8080",
                "delete backend 10.244.1.11:8080",
            ],
            removed: &[("web", "10.244.1.11:8080")],
        },
        Transition {
            name: "to_no_backends",
            description: "the frontend stays with count 0 (to reject or drop)",
            before: vec![web(&[11])],
            after: vec![web(&[])],
            ops: &[
                "put frontend 10.96.0.10:80/TCP count=0",
                "delete slot 10.96.0.10:80/TCP#1",
                "delete backend 10.244.1.11:8080",
            ],
            removed: &[("web", "10.244.1.11:8080")],
        },
        Transition {
            name: "service_deleted",
            description: "frontend entry first, then its slots, then its backends; dns untouched",
            before: vec![web(&[11, 12]), dns.clone()],
            after: vec![dns.clone()],
            ops: &[
                "delete frontend 10.96.0.10:80/TCP",
                "delete slot 10.96.0.10:80/TCP#1",
                "delete slot 10.96.0.10:80/TCP#2",
                "delete backend 10.244.1.11:8080",
                "delete backend 10.244.1.12:8080",
            ],
            removed: &[("web", "10.244.1.11:8080"), ("web", "10.244.1.12:8080")],
        },
        Transition {
            name: "everything_deleted",
            description: "an empty desired state empties the maps",
            before: vec![web(&[11]), dns.clone()],
            after: vec![],
            ops: &[
                "delete frontend 10.96.0.10:80/TCP",
                "delete slot 10.96.0.10:80/TCP#1",
                "delete frontend 10.96.0.53:80/TCP",
                "delete slot 10.96.0.53:80/TCP#1",
                "delete backend 10.244.1.11:8080",
                "delete backend 10.244.1.21:8080",
            ],
            removed: &[("dns", "10.244.1.21:8080"), ("web", "10.244.1.11:8080")],
        },
        Transition {
            name: "flags_changed",
            description: "only the frontend entry is rewritten when affinity is turned on",
            before: vec![web(&[11])],
            after: vec![web(&[11]).affinity(10_800)],
            ops: &["put frontend 10.96.0.10:80/TCP count=1 flags=0x1 affinity=10800"],
            removed: &[],
        },
        Transition {
            name: "shared_backend",
            description: "a backend another service still uses is not deleted",
            before: vec![web(&[11, 12]), fe("api", 20, &[11])],
            after: vec![web(&[12]), fe("api", 20, &[11])],
            ops: &[
                "put slot 10.96.0.10:80/TCP#1 = 10.244.1.12:8080",
                "put frontend 10.96.0.10:80/TCP count=1",
                "delete slot 10.96.0.10:80/TCP#2",
            ],
            removed: &[("web", "10.244.1.11:8080")],
        },
        Transition {
            name: "node_port_added",
            description: "a new frontend of a service reuses its backends (no backend write)",
            before: vec![web(&[11])],
            after: vec![web(&[11]), web(&[11]).node_port(30080)],
            ops: &[
                "put slot 192.168.1.10:30080/TCP#1 = 10.244.1.11:8080",
                "put frontend 192.168.1.10:30080/TCP count=1 flags=0x8",
            ],
            removed: &[],
        },
        Transition {
            name: "udp_twin",
            description: "the same address over UDP is another backend entry",
            before: vec![web(&[11])],
            after: vec![web(&[11]), fe("web", 10, &[11]).udp()],
            ops: &[
                "put backend 10.244.1.11:8080",
                "put slot 10.96.0.10:80/UDP#1 = 10.244.1.11:8080",
                "put frontend 10.96.0.10:80/UDP count=1",
            ],
            removed: &[],
        },
    ]
}

#[test]
fn transition_table() {
    let mut failures = Vec::new();
    for case in transitions() {
        let mut fake = FakeMaps::default();
        let mut syncer = Syncer::default();
        let first = sync(&mut syncer, &mut fake, &case.before);
        assert!(
            first.failures.is_empty(),
            "{}: {:?}",
            case.name,
            first.failures
        );
        assert_eq!(
            fake.resolved(),
            resolved(&case.before),
            "{}: before",
            case.name
        );

        // Names of ids, as known before the second pass (deleted things included).
        let mut service_names: HashMap<u32, &str> = HashMap::new();
        for fe in case.before.iter().chain(&case.after) {
            if let Some(id) = syncer.service_id(&fe.service_port()) {
                service_names.insert(id, fe.name);
            }
        }
        let mut backend_names: HashMap<u32, String> = fake
            .backends
            .iter()
            .map(|(id, b)| (*id, backend_name(b)))
            .collect();

        fake.log.clear();
        let report = sync(&mut syncer, &mut fake, &case.after);
        backend_names.extend(fake.backends.iter().map(|(id, b)| (*id, backend_name(b))));
        let problems = [
            (fake.log != case.ops)
                .then(|| format!("ops\n    want {:#?}\n    got  {:#?}", case.ops, fake.log)),
            (fake.resolved() != resolved(&case.after)).then(|| {
                format!(
                    "maps\n    want {:#?}\n    got  {:#?}",
                    resolved(&case.after),
                    fake.resolved()
                )
            }),
            {
                let got = removed_pairs(&report, &service_names, &backend_names);
                let want: Vec<(String, String)> = case
                    .removed
                    .iter()
                    .map(|(s, b)| ((*s).to_owned(), (*b).to_owned()))
                    .collect();
                (got != want).then(|| format!("removed pairs\n    want {want:?}\n    got  {got:?}"))
            },
            (!report.failures.is_empty() || !report.cleanup_errors.is_empty())
                .then(|| format!("errors {:?} {:?}", report.failures, report.cleanup_errors)),
        ];
        for problem in problems.into_iter().flatten() {
            failures.push(format!("{} ({}): {problem}", case.name, case.description));
        }

        // Whatever the transition, one more pass has nothing to do.
        fake.log.clear();
        let again = sync(&mut syncer, &mut fake, &case.after);
        if again.ops_applied != 0 {
            failures.push(format!("{}: third pass wrote {:?}", case.name, fake.log));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// Failures: a write refused (map full) fails that frontend only.

enum Fault {
    /// The Nth write of the second pass fails.
    OnWrite(usize),
    /// The service map holds this many entries at most during the second pass.
    Capacity(usize),
}

struct FailureCase {
    name: &'static str,
    description: &'static str,
    before: Vec<Fe>,
    after: Vec<Fe>,
    fault: Fault,
    /// Services in `report.failures`.
    failed: &'static [&'static str],
    cleanup_errors: usize,
    /// What the maps resolve to after the failed pass.
    programmed: Vec<Fe>,
}

fn failure_cases() -> Vec<FailureCase> {
    let a = fe("a", 10, &[11, 12]);
    let b = fe("b", 20, &[13]);
    let c = fe("c", 30, &[14]);
    vec![
        FailureCase {
            name: "new_frontend_head_refused",
            description: "b's frontend entry is refused (write 9, after the 4 backends and a's and b's slots): a and c programmed, b's slot and backend cleaned",
            before: vec![],
            after: vec![a.clone(), b.clone(), c.clone()],
            fault: Fault::OnWrite(9),
            failed: &["b"],
            cleanup_errors: 0,
            programmed: vec![a.clone(), c.clone()],
        },
        FailureCase {
            name: "new_backend_refused",
            description: "b's backend is refused (write 3, after a's two): nothing of b is written, a and c are finished alone",
            before: vec![],
            after: vec![a.clone(), b.clone(), c.clone()],
            fault: Fault::OnWrite(3),
            failed: &["b"],
            cleanup_errors: 0,
            programmed: vec![a.clone(), c.clone()],
        },
        FailureCase {
            name: "service_map_full",
            description: "room for a (3 entries): b and c are refused, a stays whole",
            before: vec![],
            after: vec![a.clone(), b.clone(), c.clone()],
            fault: Fault::Capacity(3),
            failed: &["b", "c"],
            cleanup_errors: 0,
            programmed: vec![a.clone()],
        },
        FailureCase {
            name: "growing_frontend_refused",
            description: "a new slot for a does not fit: a keeps its old backends, b is untouched",
            before: vec![a.clone(), b.clone()],
            after: vec![fe("a", 10, &[11, 12, 15]), b.clone()],
            fault: Fault::Capacity(5),
            failed: &["a"],
            cleanup_errors: 0,
            programmed: vec![a.clone(), b.clone()],
        },
        FailureCase {
            name: "first_write_refused",
            description: "the very first write fails: that frontend only",
            before: vec![],
            after: vec![a.clone(), b.clone()],
            fault: Fault::OnWrite(1),
            failed: &["a"],
            cleanup_errors: 0,
            programmed: vec![b.clone()],
        },
        FailureCase {
            name: "delete_refused",
            description: "deleting b's frontend fails: reported as cleanup error, b stays whole, a unaffected",
            before: vec![a.clone(), b.clone()],
            after: vec![a.clone()],
            fault: Fault::OnWrite(1),
            failed: &[],
            cleanup_errors: 1,
            programmed: vec![a.clone(), b.clone()],
        },
        FailureCase {
            name: "backend_delete_refused",
            description: "deleting b's unused backend fails: b is gone from the service map, error reported",
            before: vec![a.clone(), b.clone()],
            after: vec![a.clone()],
            fault: Fault::OnWrite(3),
            failed: &[],
            cleanup_errors: 1,
            programmed: vec![a.clone()],
        },
    ]
}

#[test]
fn failure_table() {
    let mut failures = Vec::new();
    for case in failure_cases() {
        let mut fake = FakeMaps::default();
        let mut syncer = Syncer::default();
        let first = sync(&mut syncer, &mut fake, &case.before);
        assert!(first.failures.is_empty(), "{}", case.name);

        match case.fault {
            Fault::OnWrite(n) => {
                fake.writes = 0;
                fake.fail_on = Some(n);
            }
            Fault::Capacity(n) => fake.service_capacity = Some(n),
        }
        let report = sync(&mut syncer, &mut fake, &case.after);
        let mut failed: Vec<&str> = report
            .failures
            .iter()
            .map(|f| f.service_port.service.name.as_ref())
            .collect();
        failed.sort_unstable();
        if failed != case.failed {
            failures.push(format!(
                "{} ({}): failed {failed:?}, want {:?}",
                case.name, case.description, case.failed
            ));
        }
        if report.failures.iter().any(|f| !f.error.map_full)
            || report.cleanup_errors.iter().any(|e| !e.map_full)
        {
            failures.push(format!("{}: map_full lost", case.name));
        }
        for failure in &report.failures {
            let fe = case.after.iter().find(|fe| fe.key == failure.frontend);
            if fe.map(Fe::service_port) != Some(failure.service_port.clone()) {
                failures.push(format!("{}: failure names the wrong frontend", case.name));
            }
        }
        if report.cleanup_errors.len() != case.cleanup_errors {
            failures.push(format!(
                "{}: cleanup errors {:?}, want {}",
                case.name, report.cleanup_errors, case.cleanup_errors
            ));
        }
        if fake.resolved() != resolved(&case.programmed) {
            failures.push(format!(
                "{} ({}): after the failed pass\n    want {:#?}\n    got  {:#?}",
                case.name,
                case.description,
                resolved(&case.programmed),
                fake.resolved()
            ));
        }
        // No backend the maps hold is unused, unless a failed delete left it.
        if case.cleanup_errors == 0 {
            let used: BTreeSet<u32> = fake
                .services
                .iter()
                .filter(|(key, _)| key.slot != 0)
                .map(|(_, value)| value.backend_id)
                .collect();
            if fake.backends.keys().any(|id| !used.contains(id)) {
                failures.push(format!("{}: unused backend left behind", case.name));
            }
        }

        // The fault goes away: the next pass completes the job.
        fake.fail_on = None;
        fake.service_capacity = None;
        let retry = sync(&mut syncer, &mut fake, &case.after);
        if !retry.failures.is_empty() || !retry.cleanup_errors.is_empty() {
            failures.push(format!("{}: retry failed {:?}", case.name, retry.failures));
        }
        if fake.resolved() != resolved(&case.after) {
            failures.push(format!(
                "{}: after the retry\n    want {:#?}\n    got  {:#?}",
                case.name,
                resolved(&case.after),
                fake.resolved()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// Room: a frontend that does not fit is refused whole, before any write, and blocks
// nobody; it fits once room is made.

/// Failed service names of a report, sorted.
fn failed_names(report: &SyncReport) -> Vec<&str> {
    let mut names: Vec<&str> = report
        .failures
        .iter()
        .map(|failure| failure.service_port.service.name.as_ref())
        .collect();
    names.sort_unstable();
    names
}

#[test]
fn a_frontend_without_room_is_refused_unwritten_and_the_others_are_programmed() {
    // a: 3 entries, b: 6, c: 2; the service map holds 8.
    let (a, b, c) = (
        fe("a", 10, &[11, 12]),
        fe("b", 20, &[13, 14, 15, 16, 17]),
        fe("c", 30, &[18]),
    );
    let capacity = Capacity {
        services: 8,
        backends: 100,
    };
    let mut fake = FakeMaps::at_capacity(capacity.services);
    let mut syncer = Syncer::default().with_capacity(capacity);
    let all = [a.clone(), b.clone(), c.clone()];
    let report = sync(&mut syncer, &mut fake, &all);
    assert_eq!(failed_names(&report), ["b"]);
    let failure = &report.failures[0];
    assert!(failure.error.map_full, "{:?}", failure.error);
    assert!(
        failure.error.message.contains("SVC_V4_V1"),
        "the refusal names the map: {}",
        failure.error.message
    );
    assert!(
        !fake.log.iter().any(|op| op.contains("10.96.0.20")),
        "b was partly written: {:#?}",
        fake.log
    );
    assert_eq!(fake.resolved(), resolved(&[a.clone(), c.clone()]));
    assert!(
        report.complete(),
        "a frontend that does not fit is not a failed pass"
    );

    // Retrying without room writes nothing: no fill-and-roll-back.
    fake.log.clear();
    let again = sync(&mut syncer, &mut fake, &all);
    assert_eq!(failed_names(&again), ["b"]);
    assert_eq!(again.ops_applied, 0, "{:#?}", fake.log);

    // a goes: its room is made before b is tried, in the same pass.
    let report = sync(&mut syncer, &mut fake, &[b.clone(), c.clone()]);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(fake.resolved(), resolved(&[b, c]));
}

#[test]
fn a_frontend_without_room_for_its_backends_is_refused_and_shared_ones_still_fit() {
    let (a, b, c) = (
        fe("a", 10, &[11, 12]),
        fe("b", 20, &[13, 14]),
        // Reuses a's backends: nothing new in the backend map.
        fe("c", 30, &[11, 12]),
    );
    let capacity = Capacity {
        services: 100,
        backends: 3,
    };
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default().with_capacity(capacity);
    let report = sync(&mut syncer, &mut fake, &[a.clone(), b, c.clone()]);
    assert_eq!(failed_names(&report), ["b"]);
    assert!(report.failures[0].error.message.contains("BACKEND_V4_V1"));
    assert_eq!(fake.resolved(), resolved(&[a, c]));
}

/// A frontend with every one of its 65 535 slots in use, then one fewer: slot numbers
/// at the top of their range (an overflow there would panic the agent).
#[test]
fn a_frontend_using_every_slot_syncs_and_shrinks() {
    let spec = |count: u32| {
        let mut spec = fe("web", 10, &[]).spec();
        spec.backends = (0..count)
            .map(|i| std::net::SocketAddrV4::new(Ipv4Addr::from(0x0a64_0000 + i), 8080))
            .collect();
        spec
    };
    let key = fe("web", 10, &[]).key;
    let desired_with = |count| Desired {
        v4: crate::model::FamilyDesired {
            frontends: [(key, std::sync::Arc::new(spec(count)))].into(),
            ..crate::model::FamilyDesired::default()
        },
        ..Desired::default()
    };
    let mut fake = FakeMaps {
        unchecked: true,
        ..FakeMaps::default()
    };
    let mut syncer = Syncer::default();
    let full = syncer.sync(&desired_with(65_535), &mut fake);
    assert!(full.failures.is_empty(), "{:?}", full.failures);
    assert_eq!(full.ops_applied, 2 * 65_535 + 1);
    assert_eq!(syncer.sync(&desired_with(65_535), &mut fake).ops_applied, 0);
    let shrunk = syncer.sync(&desired_with(65_534), &mut fake);
    assert!(shrunk.failures.is_empty() && shrunk.cleanup_errors.is_empty());
    assert!(!fake.services.contains_key(&service_key(&key, 65_535)));
    assert_eq!(fake.services[&service_key(&key, 0)].count, 65_534);
    fake.check_invariant("the last op");
    assert!(fake.violations.is_empty(), "{:?}", fake.violations);
}

/// Someone else wrote the maps (another agent, bpftool): read back and re-adopted,
/// the next pass repairs every difference with the desired state.
#[test]
fn maps_changed_behind_the_syncers_back_are_repaired_after_readopting_them() {
    let (web, dns) = (fe("web", 10, &[11, 12]), fe("dns", 53, &[21]));
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    sync(&mut syncer, &mut fake, &[web.clone(), dns.clone()]);
    // Behind its back: web's frontend entry deleted, dns's backend rewritten, a
    // stray frontend added.
    fake.services.remove(&service_key(&web.key, 0));
    let dns_backend = fake.services[&service_key(&dns.key, 1)].backend_id;
    fake.backends
        .get_mut(&dns_backend)
        .expect("dns backend")
        .port = Be16::from_host(9);
    let stray = fe("stray", 99, &[]);
    fake.services.insert(
        service_key(&stray.key, 0),
        ServiceValueV4 {
            service_id: 4242,
            ..ServiceValueV4::default()
        },
    );
    assert_eq!(syncer.mirror().differences(&fake.mirror()), [2, 1, 0]);
    syncer.readopt(fake.mirror());
    let report = sync(&mut syncer, &mut fake, &[web.clone(), dns.clone()]);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(fake.resolved(), resolved(&[web.clone(), dns.clone()]));
    assert_eq!(syncer.mirror().differences(&fake.mirror()), [0; 3]);
    // The stray frontend's id is never handed out to a new service.
    let new = fe("new", 77, &[]);
    sync(&mut syncer, &mut fake, &[web, dns, new.clone()]);
    assert_ne!(syncer.service_id(&new.service_port()), Some(4242));
}

/// When a frontend's update fails part-way, the slots already rewritten (or cut by the
/// lowered count) no longer name the old backends, which are then deleted as unused;
/// their (service, backend) pairs must still be reported so their UDP flows and
/// affinities are forgotten.
#[test]
fn a_part_way_failure_still_reports_removed_pairs() {
    // Replacing every backend; the third slot does not fit.
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    sync(&mut syncer, &mut fake, &[fe("web", 10, &[11, 12])]);
    let web = syncer
        .service_id(&fe("web", 10, &[]).service_port())
        .expect("web has an id");
    let old: BTreeSet<u32> = fake.backends.keys().copied().collect();
    fake.service_capacity = Some(3);
    let report = sync(&mut syncer, &mut fake, &[fe("web", 10, &[13, 14, 15])]);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(
        fake.resolved(),
        ["10.96.0.10:80/TCP -> 10.244.1.13:8080,10.244.1.14:8080"],
        "part-way state"
    );
    assert!(
        old.iter().all(|id| !fake.backends.contains_key(id)),
        "old backends deleted"
    );
    let want: BTreeSet<(u32, u32)> = old.iter().map(|id| (web, *id)).collect();
    assert_eq!(report.removed_pairs, want);
}

/// The same, shrinking: the count is lowered, then deleting a slot fails.
#[test]
fn a_failed_slot_delete_still_reports_removed_pairs() {
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    sync(&mut syncer, &mut fake, &[fe("web", 10, &[11, 12, 13])]);
    let web = syncer
        .service_id(&fe("web", 10, &[]).service_port())
        .expect("web has an id");
    let ids: HashMap<String, u32> = fake
        .backends
        .iter()
        .map(|(id, b)| (backend_name(b), *id))
        .collect();
    // Ops: count=1, delete slot 2 (refused), delete slot 3.
    fake.writes = 0;
    fake.fail_on = Some(2);
    let report = sync(&mut syncer, &mut fake, &[fe("web", 10, &[11])]);
    assert_eq!(fake.resolved(), ["10.96.0.10:80/TCP -> 10.244.1.11:8080"]);
    let want: BTreeSet<(u32, u32)> = ["10.244.1.12:8080", "10.244.1.13:8080"]
        .iter()
        .map(|b| (web, ids[*b]))
        .collect();
    assert_eq!(report.removed_pairs, want);
}

// ---------------------------------------------------------------------------------
// Batches: the syncer hands whole runs of ops to the writer, and keeps the mirror to
// the part of a run the writer applied.

#[test]
fn a_refused_op_in_the_middle_of_a_frontends_batch_keeps_only_the_applied_prefix() {
    let a = fe("a", 10, &[11, 12]);
    let b = fe("b", 20, &[13, 14, 15]);
    let c = fe("c", 30, &[16]);
    // One batch: the 6 backends (writes 1-6), a's 2 slots and frontend (7-9), b's slot 1
    // (10), slot 2 (11, refused), ...
    let mut fake = FakeMaps::failing_on(11);
    let mut syncer = Syncer::default();
    let report = sync(&mut syncer, &mut fake, &[a.clone(), b.clone(), c.clone()]);
    assert_eq!(failed_names(&report), ["b"]);
    let refused = &report.failures[0].error.op;
    assert!(
        matches!(refused, MapOp::PutService { key, .. } if key.slot == 2),
        "the refused op is b's second slot: {refused:?}"
    );
    assert!(report.failures[0].error.map_full);
    assert_eq!(fake.resolved(), resolved(&[a.clone(), c.clone()]));
    // One batch for all three (6 backends, 3 + 4 + 2 service ops); c, which it did not
    // finish, alone (its slot and frontend: its backend was written); then the cleanup
    // of what b left: its slot 1, then its 3 backends.
    assert_eq!(fake.batches, [15, 2, 1, 3]);
    assert!(!fake
        .services
        .keys()
        .any(|key| key.addr == service_key(&b.key, 0).addr));

    fake.fail_on = None;
    let retry = sync(&mut syncer, &mut fake, &[a.clone(), b.clone(), c.clone()]);
    assert!(retry.failures.is_empty() && retry.cleanup_errors.is_empty());
    assert_eq!(fake.resolved(), resolved(&[a, b, c]));
}

/// A pass writes its frontends in one batch (here: two new ones sharing a backend,
/// one that grows, one that shrinks). A refusal at any op of it fails the frontend
/// that op belongs to (a backend's: the first frontend that needs it) and no other:
/// the rest of the batch is finished in the same pass.
#[test]
fn a_refused_op_anywhere_in_a_shared_batch_fails_its_frontend_only() {
    let before = [fe("c", 30, &[14]), fe("d", 40, &[15, 16, 17])];
    let after = [
        fe("a", 10, &[11, 12]),
        fe("b", 20, &[12, 13]),
        fe("c", 30, &[14, 18]),
        fe("d", 40, &[15]),
    ];
    let mut clean = FakeMaps::default();
    let mut syncer = Syncer::default();
    sync(&mut syncer, &mut clean, &before);
    clean.log.clear();
    clean.batches.clear();
    sync(&mut syncer, &mut clean, &after);
    // 4 backends, a's and b's 2 slots and frontend, c's slot and count, d's count and
    // 2 slot deletions: one batch; then d's 2 unused backends.
    assert_eq!(clean.batches, [15, 2], "{:#?}", clean.log);
    let owner = |line: &str| -> &'static str {
        let by_frontend = after.iter().find(|fe| {
            let name = frontend_name(&service_key(&fe.key, 0));
            line.contains(&format!("{name} ")) || line.contains(&format!("{name}#"))
        });
        let by_backend = || {
            after.iter().find(|fe| {
                line.starts_with("put backend ")
                    && fe
                        .backends
                        .iter()
                        .any(|b| line.ends_with(&format!(" 10.244.1.{b}:8080")))
            })
        };
        by_frontend.or_else(by_backend).map_or("?", |fe| fe.name)
    };
    let line_of = |fake: &FakeMaps, name: &str| -> Option<String> {
        let fe = after.iter().find(|fe| fe.name == name)?;
        let head = frontend_name(&service_key(&fe.key, 0));
        fake.resolved()
            .into_iter()
            .find(|line| line.starts_with(&format!("{head} ")))
    };
    let mut failures = Vec::new();
    for write in 1..=15 {
        let refused = owner(&clean.log[write - 1]);
        let mut fake = FakeMaps::default();
        let mut syncer = Syncer::default();
        sync(&mut syncer, &mut fake, &before);
        fake.writes = 0;
        fake.fail_on = Some(write);
        let report = sync(&mut syncer, &mut fake, &after);
        let case = format!("write {write} ({}, {refused}'s)", clean.log[write - 1]);
        if failed_names(&report) != [refused] {
            failures.push(format!("{case}: failed {:?}", failed_names(&report)));
        }
        if report.frontends_written != 3 {
            failures.push(format!("{case}: {} written", report.frontends_written));
        }
        let mut programmed = FakeMaps::default();
        sync(&mut Syncer::default(), &mut programmed, &after);
        let mut old = FakeMaps::default();
        sync(&mut Syncer::default(), &mut old, &before);
        for fe in &after {
            let got = line_of(&fake, fe.name);
            let new = line_of(&programmed, fe.name);
            let fine = if fe.name == refused {
                // Its old state, none if it had none, or done (a refused deletion of
                // a slot its lowered count no longer covers).
                got == line_of(&old, fe.name) || got == new
            } else {
                got == new
            };
            if !fine {
                failures.push(format!("{case}: {} resolves to {got:?}", fe.name));
            }
        }
        fake.fail_on = None;
        let retry = sync(&mut syncer, &mut fake, &after);
        if !retry.failures.is_empty() || fake.resolved() != resolved(&after) {
            failures.push(format!("{case}: the retry left {:#?}", fake.resolved()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A first pass of thousands of frontends hands the writer a few batches, none much
/// longer than [`BATCH_OPS`], instead of two per frontend.
#[test]
fn a_first_pass_of_thousands_of_frontends_takes_a_few_writer_calls() {
    let template = fe("web", 10, &[]);
    let frontends = (0..3000u32)
        .map(|i| {
            let key = FrontendKey {
                addr: Ipv4Addr::from(0x0a60_0000 + i),
                ..template.key
            };
            let mut spec = template.spec();
            spec.backends = (0..2)
                .map(|b| SocketAddrV4::new(Ipv4Addr::from(0x0a64_0000 + 2 * i + b), 8080))
                .collect();
            (key, std::sync::Arc::new(spec))
        })
        .collect();
    let desired = Desired {
        v4: crate::model::FamilyDesired {
            frontends,
            ..crate::model::FamilyDesired::default()
        },
        ..Desired::default()
    };
    let mut fake = FakeMaps {
        unchecked: true,
        ..FakeMaps::default()
    };
    let mut syncer = Syncer::default();
    let report = syncer.sync(&desired, &mut fake);
    assert!(report.failures.is_empty() && report.cleanup_errors.is_empty());
    assert_eq!(
        (report.ops_applied, report.frontends_written),
        (3000 * 5, 3000)
    );
    // 5 ops a frontend: 1639 frontends fill the first batch past 8192, 1361 the second.
    assert_eq!(fake.batches, [8195, 6805]);
    fake.check_invariant("the pass");
    assert!(fake.violations.is_empty(), "{:?}", &fake.violations[..1]);
    assert_eq!(syncer.mirror(), &fake.mirror());
}

#[test]
fn a_refused_delete_in_the_middle_of_a_cleanup_batch_does_not_stop_the_rest() {
    let a = fe("a", 10, &[11]);
    let b = fe("b", 20, &[12, 13, 14]);
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    sync(&mut syncer, &mut fake, &[a.clone(), b.clone()]);
    // Removing b: its frontend (write 1), then its slots 1, 2 (refused), 3 in one batch.
    fake.writes = 0;
    fake.fail_on = Some(3);
    fake.batches.clear();
    let report = sync(&mut syncer, &mut fake, std::slice::from_ref(&a));
    assert_eq!(
        report.cleanup_errors.len(),
        1,
        "{:?}",
        report.cleanup_errors
    );
    let refused = &report.cleanup_errors[0].op;
    assert!(
        matches!(refused, MapOp::DeleteService { key } if key.slot == 2),
        "the refused op is b's slot 2: {refused:?}"
    );
    assert_eq!(fake.resolved(), resolved(&[a]));
    // The slots' batch stops at slot 2 and slot 3 goes in the next; slot 2 in the
    // orphan sweep the failure asked for; then b's backends.
    assert_eq!(fake.batches, [3, 1, 1, 3]);
    assert_eq!(fake.services.len(), 2, "a's frontend and slot");
    assert_eq!(fake.backends.len(), 1, "a's backend");
}

// ---------------------------------------------------------------------------------
// Ids and adoption.

#[test]
fn service_ids_are_shared_and_stable() {
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    let web = fe("web", 10, &[11]);
    let state = [
        web.clone(),
        web.clone().node_port(30080),
        fe("dns", 53, &[21]),
    ];
    sync(&mut syncer, &mut fake, &state);
    let id = |syncer: &Syncer, fe: &Fe| syncer.service_id(&fe.service_port()).expect("an id");
    let web_id = id(&syncer, &web);
    assert_ne!(web_id, 0);
    assert_ne!(web_id, id(&syncer, &state[2]), "one id per service port");
    let heads: Vec<u32> = fake
        .services
        .iter()
        .filter(|(key, _)| {
            key.slot == 0 && key.addr != Be32::from_ipv4(Ipv4Addr::new(10, 96, 0, 53))
        })
        .map(|(_, value)| value.service_id)
        .collect();
    assert_eq!(
        heads,
        [web_id, web_id],
        "every frontend of web carries its id"
    );

    // Backends change: the id does not.
    sync(
        &mut syncer,
        &mut fake,
        &[fe("web", 10, &[12]), state[2].clone()],
    );
    assert_eq!(id(&syncer, &web), web_id);

    // web goes and comes back: its id is forgotten, and it gets another.
    sync(&mut syncer, &mut fake, &[state[2].clone()]);
    assert_eq!(syncer.service_id(&web.service_port()), None);
    sync(&mut syncer, &mut fake, &state);
    assert_ne!(id(&syncer, &web), web_id);
}

/// The id of a service deleted in one pass is not handed to the next new service at
/// once. Conntrack and affinity entries are keyed by service id, and the datapath trusts
/// an affinity entry's backend, so an entry whose cleanup was missed would otherwise
/// steer the new service's clients.
#[test]
fn a_deleted_services_id_is_not_handed_out_at_once() {
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    let (a, b, c) = (fe("a", 10, &[11]), fe("b", 20, &[11]), fe("c", 30, &[11]));
    sync(&mut syncer, &mut fake, &[a.clone(), b.clone()]);
    let b_id = syncer.service_id(&b.service_port()).expect("id");
    sync(&mut syncer, &mut fake, std::slice::from_ref(&a));
    sync(&mut syncer, &mut fake, &[a, c.clone()]);
    assert_ne!(syncer.service_id(&c.service_port()), Some(b_id));
}

#[test]
fn adopting_the_maps_then_syncing_the_same_state_writes_nothing() {
    let state = [
        fe("web", 10, &[11, 12, 13]).affinity(60),
        fe("web", 10, &[11, 12, 13]).affinity(60).node_port(30080),
        fe("dns", 53, &[21]).udp(),
    ];
    let mut fake = FakeMaps::default();
    let mut first = Syncer::default();
    sync(&mut first, &mut fake, &state);

    // A restarted agent reads the maps back.
    let mut adopted = Syncer::adopt(fake.mirror());
    fake.log.clear();
    let report = sync(&mut adopted, &mut fake, &state);
    assert_eq!(report.ops_applied, 0, "{:#?}", fake.log);
    assert!(report.removed_pairs.is_empty());
    for fe in &state {
        assert_eq!(
            adopted.service_id(&fe.service_port()),
            first.service_id(&fe.service_port()),
            "{} keeps its id",
            fe.name
        );
    }

    // The adopted syncer then writes differences only, and new ids do not collide.
    let mut changed = state.to_vec();
    changed[0].backends = vec![11, 12];
    changed[1].backends = vec![11, 12];
    changed.push(fe("new", 99, &[31]));
    let report = sync(&mut adopted, &mut fake, &changed);
    assert_eq!(
        fake.log,
        [
            "put backend 10.244.1.31:8080",
            "put frontend 10.96.0.10:80/TCP count=2 flags=0x1 affinity=60",
            "delete slot 10.96.0.10:80/TCP#3",
            "put slot 10.96.0.99:80/TCP#1 = 10.244.1.31:8080",
            "put frontend 10.96.0.99:80/TCP count=1",
            "put frontend 192.168.1.10:30080/TCP count=2 flags=0x9 affinity=60",
            "delete slot 192.168.1.10:30080/TCP#3",
            "delete backend 10.244.1.13:8080",
        ]
    );
    assert_eq!(
        report.removed_pairs.len(),
        1,
        "(web, 13) once: one id for both frontends"
    );
    let new_id = adopted.service_id(&changed[3].service_port()).expect("id");
    let old_ids: BTreeSet<u32> = state
        .iter()
        .filter_map(|fe| first.service_id(&fe.service_port()))
        .collect();
    assert!(!old_ids.contains(&new_id));
}

#[test]
fn adopting_cleans_what_an_interrupted_agent_left() {
    let web = fe("web", 10, &[11, 12]);
    let gone = fe("gone", 20, &[13]);
    let mut fake = FakeMaps::default();
    sync(&mut Syncer::default(), &mut fake, &[web.clone(), gone]);
    // Left-overs: a slot above web's count, a backend nothing names.
    let web_head = service_key(&web.key, 0);
    let backend_id = fake.services[&ServiceKeyV4 {
        slot: 1,
        ..web_head
    }]
        .backend_id;
    fake.services.insert(
        ServiceKeyV4 {
            slot: 5,
            ..web_head
        },
        ServiceValueV4 {
            backend_id,
            ..ServiceValueV4::default()
        },
    );
    fake.backends.insert(
        77,
        backend_value::<Ipv4Addr>(
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 77), 8080),
            proto::TCP,
            false,
        ),
    );

    let mut syncer = Syncer::adopt(fake.mirror());
    fake.log.clear();
    let report = sync(&mut syncer, &mut fake, std::slice::from_ref(&web));
    assert_eq!(
        fake.log,
        [
            "delete frontend 10.96.0.20:80/TCP",
            "delete slot 10.96.0.20:80/TCP#1",
            "delete slot 10.96.0.10:80/TCP#5",
            "delete backend 10.244.1.13:8080",
            "delete backend 10.244.1.77:8080",
        ]
    );
    assert_eq!(report.frontends_removed, 1);
    assert_eq!(fake.resolved(), resolved(&[web]));
}

#[test]
fn report_counts() {
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    let report = sync(
        &mut syncer,
        &mut fake,
        &[fe("a", 10, &[11]), fe("b", 20, &[12])],
    );
    assert_eq!((report.frontends_written, report.frontends_removed), (2, 0));
    let report = sync(&mut syncer, &mut fake, &[fe("a", 10, &[11, 13])]);
    assert_eq!((report.frontends_written, report.frontends_removed), (1, 1));
    let report = sync(&mut syncer, &mut fake, &[fe("a", 10, &[11, 13])]);
    assert_eq!((report.frontends_written, report.frontends_removed), (0, 0));
}

#[test]
fn the_fake_counts_writes_and_capacity() {
    // The fakes themselves: failing on the Nth write and at capacity.
    let op = MapOp::DeleteBackend { id: 1 };
    let mut fake = FakeMaps::failing_on(2);
    assert!(fake.apply(&op).is_ok());
    assert!(fake.apply(&op).is_err_and(|e| e.map_full));
    assert!(fake.apply(&op).is_ok());
    let mut fake = FakeMaps::at_capacity(1);
    let put = |slot| MapOp::PutService {
        key: ServiceKeyV4 {
            slot,
            ..ServiceKeyV4::default()
        },
        value: ServiceValueV4::default(),
    };
    assert!(fake.apply(&put(1)).is_ok());
    assert!(fake.apply(&put(1)).is_ok(), "overwriting needs no room");
    assert!(fake.apply(&put(2)).is_err_and(|e| e.map_full));

    // The invariant check: a frontend counting a slot that does not exist.
    let mut fake = FakeMaps::default();
    let head = MapOp::PutService {
        key: ServiceKeyV4::default(),
        value: ServiceValueV4 {
            count: 1,
            ..ServiceValueV4::default()
        },
    };
    assert!(fake.apply(&head).is_ok());
    assert_eq!(fake.violations.len(), 1, "{:?}", fake.violations);
}

// ---------------------------------------------------------------------------------
// A pass looks only at what it touched: the same maps as a pass that walks them all.

#[test]
fn passes_that_look_only_at_what_changed_leave_what_a_full_walk_and_a_fresh_build_would() {
    const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
    // xorshift64: a fixed sequence, the same on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let mut fake = FakeMaps::default();
    let mut syncer = Syncer::default();
    let mut services: BTreeMap<usize, (Vec<u8>, bool)> = BTreeMap::new();
    let mut previous = Desired::default();
    let mut incremental_passes = 0;
    for pass in 0..300 {
        // Change a few services: add, drop, new backends, a NodePort twin on or off.
        for _ in 0..=next(3) {
            let index = usize::try_from(next(NAMES.len() as u64)).expect("small");
            match next(4) {
                0 => {
                    services.remove(&index);
                }
                _ => {
                    let count = next(5);
                    let backends: Vec<u8> = (0..count)
                        .map(|_| u8::try_from(1 + next(12)).expect("small"))
                        .collect::<BTreeSet<u8>>()
                        .into_iter()
                        .collect();
                    services.insert(index, (backends, next(2) == 0));
                }
            }
        }
        let frontends: Vec<Fe> = services
            .iter()
            .flat_map(|(index, (backends, node_port))| {
                let octet = u8::try_from(index + 10).expect("small");
                let cluster_ip = fe(NAMES[*index], octet, backends);
                let twin =
                    node_port.then(|| cluster_ip.clone().node_port(30_000 + u16::from(octet)));
                std::iter::once(cluster_ip).chain(twin)
            })
            .collect();
        let mut wanted = desired(&frontends);
        // Source ranges on some service ports, some backends on this node.
        for index in services.keys() {
            if next(3) != 0 {
                continue;
            }
            let octet = u8::try_from(next(4)).expect("small");
            let ranges = BTreeSet::from([(Ipv4Addr::new(192, 0, 2, octet * 64), 26)]);
            let name = fe(NAMES[*index], 0, &[]).service_port();
            wanted.v4.source_ranges.insert(name, ranges);
        }
        wanted.v4.local_endpoints = (1..=12)
            .filter(|_| next(4) == 0)
            .map(|octet| Ipv4Addr::new(10, 244, 1, octet))
            .collect();
        // Now and then a write fails part-way (a full map).
        fake.fail_on = (next(6) == 0).then(|| usize::try_from(1 + next(6)).expect("small"));
        fake.writes = 0;
        let before = syncer.mirror().pairs_in_use();
        // What changed since the last desired state, as the model reports it.
        let changes = changes_between(&previous, &wanted);
        incremental_passes += usize::from(syncer.incremental_ready());
        let report = syncer.sync_changes(&wanted, &changes, &mut fake);
        fake.fail_on = None;
        let walked: BTreeSet<(u32, u32)> = before
            .difference(&syncer.mirror().pairs_in_use())
            .copied()
            .collect();
        assert_eq!(report.removed_pairs, walked, "pass {pass}: removed pairs");
        assert_eq!(
            syncer.mirror(),
            &fake.mirror(),
            "pass {pass}: the mirror is the maps"
        );
        let walked_addrs: BTreeSet<std::net::Ipv4Addr> = syncer
            .mirror()
            .services
            .keys()
            .filter(|key| key.slot == 0)
            .map(|key| key.addr.to_ipv4())
            .collect();
        assert_eq!(
            syncer.frontend_addrs().collect::<BTreeSet<_>>(),
            walked_addrs,
            "pass {pass}: the indexed frontend addresses"
        );
        assert!(
            fake.violations.is_empty(),
            "pass {pass}: {:?}",
            fake.violations
        );
        if !report.failures.is_empty() || !report.cleanup_errors.is_empty() {
            // The next pass (nothing failing) finishes what this one left.
            let again = syncer.sync(&wanted, &mut fake);
            assert!(again.failures.is_empty() && again.cleanup_errors.is_empty());
        }
        // What a fresh syncer builds from nothing.
        let mut fresh = FakeMaps::default();
        let mut fresh_syncer = Syncer::default();
        fresh_syncer.sync(&wanted, &mut fresh);
        assert_eq!(
            fake.resolved(),
            fresh.resolved(),
            "pass {pass}: the same frontends"
        );
        assert_eq!(
            named_source_ranges(&fake, &syncer, &NAMES),
            named_source_ranges(&fresh, &fresh_syncer, &NAMES),
            "pass {pass}: the same source ranges"
        );
        previous = wanted;
        // Nothing left behind: no slot above a count, no backend no slot names.
        let heads: HashMap<ServiceKeyV4, u16> = fake
            .services
            .iter()
            .filter(|(key, _)| key.slot == 0)
            .map(|(key, value)| (*key, value.count))
            .collect();
        for key in fake.services.keys().filter(|key| key.slot != 0) {
            let count = heads.get(&ServiceKeyV4 { slot: 0, ..*key });
            assert!(
                count.is_some_and(|count| key.slot <= *count),
                "pass {pass}: orphan slot {key:?}"
            );
        }
        let named: BTreeSet<u32> = fake
            .services
            .iter()
            .filter(|(key, _)| key.slot != 0)
            .map(|(_, value)| value.backend_id)
            .collect();
        let held: BTreeSet<u32> = fake.backends.keys().copied().collect();
        assert_eq!(held, named, "pass {pass}: every backend named, no other");
    }
    assert!(
        incremental_passes > 200,
        "most passes looked only at changes: {incremental_passes}"
    );
}

/// The changes the model reports between two desired states: frontends whose spec
/// or whose backends' locality differ, with the service port they had; service ports
/// whose source ranges differ.
fn changes_between(before: &Desired, after: &Desired) -> ModelChanges {
    let moved_locality: BTreeSet<Ipv4Addr> = before
        .v4
        .local_endpoints
        .symmetric_difference(&after.v4.local_endpoints)
        .copied()
        .collect();
    let keys: BTreeSet<&FrontendKey> = before
        .v4
        .frontends
        .keys()
        .chain(after.v4.frontends.keys())
        .collect();
    let frontends = keys
        .into_iter()
        .filter(|key| {
            let (old, new) = (before.v4.frontends.get(key), after.v4.frontends.get(key));
            old != new
                || new.is_some_and(|spec| {
                    spec.backends
                        .iter()
                        .any(|backend| moved_locality.contains(backend.ip()))
                })
        })
        .map(|key| {
            (
                *key,
                before
                    .v4
                    .frontends
                    .get(key)
                    .map(|spec| spec.service_port.clone()),
            )
        })
        .collect();
    let names: BTreeSet<&ServicePortName> = before
        .v4
        .source_ranges
        .keys()
        .chain(after.v4.source_ranges.keys())
        .collect();
    let source_ranges = names
        .into_iter()
        .filter(|name| before.v4.source_ranges.get(name) != after.v4.source_ranges.get(name))
        .cloned()
        .collect();
    ModelChanges {
        frontends,
        source_ranges,
        local_endpoints: !moved_locality.is_empty(),
        ..ModelChanges::default()
    }
}

/// The source range entries of `fake`, by service name (ids differ between syncers).
fn named_source_ranges(
    fake: &FakeMaps,
    syncer: &Syncer,
    names: &[&'static str],
) -> BTreeSet<(&'static str, Ipv4Addr, u8)> {
    fake.source_ranges
        .iter()
        .map(|key| {
            let name = names
                .iter()
                .find(|name| {
                    syncer.service_id(&fe(name, 0, &[]).service_port()) == Some(key.service_id)
                })
                .copied()
                .unwrap_or("<no service>");
            (name, key.addr, key.prefix_len)
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// IPv6: the same syncer on the IPv6 maps.

/// In-memory IPv6 maps that check, after every op, the invariant the datapath reads
/// by (a frontend of count `n` has slots `1..=n`, each naming a backend).
#[derive(Default)]
struct FakeMapsV6 {
    mirror: Mirror<std::net::Ipv6Addr>,
    log: Vec<MapOp<std::net::Ipv6Addr>>,
    violations: Vec<String>,
}

impl MapWriter<std::net::Ipv6Addr> for FakeMapsV6 {
    fn apply(
        &mut self,
        op: &MapOp<std::net::Ipv6Addr>,
    ) -> Result<(), WriteError<std::net::Ipv6Addr>> {
        self.mirror.apply(op);
        self.log.push(*op);
        for (key, head) in self.mirror.frontends() {
            for slot in 1..=head.count {
                let slot_key = proxy_common::ServiceKeyV6 { slot, ..*key };
                match self.mirror.services.get(&slot_key) {
                    Some(value) if self.mirror.backends.contains_key(&value.backend_id) => {}
                    _ => self
                        .violations
                        .push(format!("after {op:?}: {key:?} slot {slot} unusable")),
                }
            }
        }
        Ok(())
    }
}

fn v6_desired(backends: &[u16], ranges: &[(&str, u8)]) -> Desired {
    let addr: std::net::Ipv6Addr = "fd00::10".parse().expect("v6");
    let key = FrontendKey {
        addr,
        port: 80,
        proto: proto::TCP,
        scope: scope::DEFAULT,
    };
    let service_port = ServicePortName {
        service: ObjectKey::new("default", "six"),
        port: "http".into(),
        proto: proto::TCP,
    };
    let spec = FrontendSpec::<std::net::Ipv6Addr> {
        service_port: service_port.clone(),
        kind: FrontendKind::LoadBalancer,
        backends: backends
            .iter()
            .map(|i| {
                std::net::SocketAddrV6::new(
                    std::net::Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, *i),
                    8080,
                    0,
                    0,
                )
            })
            .collect(),
        flags: if ranges.is_empty() {
            0
        } else {
            service_flags::SOURCE_RANGES
        },
        affinity_timeout_s: 0,
    };
    let mut desired = desired(&[fe("web", 10, &[1])]);
    desired.v6.frontends.insert(key, std::sync::Arc::new(spec));
    if !ranges.is_empty() {
        desired.v6.source_ranges.insert(
            service_port,
            ranges
                .iter()
                .map(|(addr, len)| (addr.parse().expect("v6"), *len))
                .collect(),
        );
    }
    desired
}

#[test]
fn ipv6_frontends_are_written_to_their_own_maps_in_the_same_order() {
    let mut v6 = Syncer::<std::net::Ipv6Addr>::default();
    let mut maps = FakeMapsV6::default();
    let desired = v6_desired(&[1, 2], &[("2001:db8::", 48)]);
    let report = v6.sync(&desired, &mut maps);
    assert!(
        report.complete() && report.failures.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        report.frontends_written, 1,
        "the IPv4 frontend is not this syncer's"
    );
    // The range first, then backends, slots, and the frontend last.
    let kinds: Vec<&str> = maps
        .log
        .iter()
        .map(|op| match op {
            MapOp::PutSourceRange { .. } => "range",
            MapOp::PutBackend { .. } => "backend",
            MapOp::PutService { key, .. } if key.slot == 0 => "frontend",
            MapOp::PutService { .. } => "slot",
            _ => "delete",
        })
        .collect();
    assert_eq!(
        kinds,
        ["range", "backend", "backend", "slot", "slot", "frontend"]
    );
    let (head_key, head) = maps.mirror.frontends().next().expect("one frontend");
    assert_eq!(
        head_key.addr,
        proxy_common::Be32x4::from_ipv6("fd00::10".parse().expect("v6"))
    );
    assert_eq!(head.count, 2);
    // The service id is of IPv6's range, and so is the range entry's.
    let service_id = head.service_id;
    assert!(service_id >= <std::net::Ipv6Addr as crate::family::Family>::SERVICE_IDS.0);
    let range = maps.mirror.source_ranges.iter().next().expect("one range");
    assert_eq!((range.service_id, range.prefix_len), (service_id, 48));
    assert_eq!(range.trie_key().prefix_len(), 32 + 48);
    // One backend leaves: the count is lowered before its slot and backend go.
    maps.log.clear();
    let report = v6.sync(&v6_desired(&[2], &[]), &mut maps);
    assert_eq!(report.removed_pairs.len(), 1, "{report:?}");
    let order: Vec<String> = maps.log.iter().map(|op| format!("{op:?}")).collect();
    let at = |needle: &str| {
        order
            .iter()
            .position(|op| op.contains(needle))
            .unwrap_or_else(|| panic!("{needle} in {order:#?}"))
    };
    assert!(at("DeleteBackend") > at("DeleteService"), "{order:#?}");
    assert!(at("DeleteSourceRange") > at("slot: 0"), "{order:#?}");
    assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
    // The same state again: nothing to write.
    maps.log.clear();
    v6.sync(&v6_desired(&[2], &[]), &mut maps);
    assert!(maps.log.is_empty(), "{:#?}", maps.log);
}

#[test]
fn an_ipv6_change_is_synced_incrementally() {
    let mut v6 = Syncer::<std::net::Ipv6Addr>::default();
    let mut maps = FakeMapsV6::default();
    v6.sync(&v6_desired(&[1], &[]), &mut maps);
    assert!(v6.incremental_ready());
    let after = v6_desired(&[1, 3], &[]);
    let key = *after.v6.frontends.keys().next().expect("one");
    let mut changes = ModelChanges::default();
    changes
        .frontends_v6
        .insert(key, Some(after.v6.frontends[&key].service_port.clone()));
    maps.log.clear();
    v6.sync_changes(&after, &changes, &mut maps);
    // One new backend, its slot, the raised count: nothing else looked at or written.
    assert_eq!(maps.log.len(), 3, "{:#?}", maps.log);
    let mut full = Syncer::<std::net::Ipv6Addr>::default();
    let mut fresh = FakeMapsV6::default();
    full.sync(&after, &mut fresh);
    assert_eq!(maps.mirror.services.len(), fresh.mirror.services.len());
    assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
}
