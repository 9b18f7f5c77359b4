//! Table tests of the model: Kubernetes objects as the API serves them (YAML) in,
//! frontends and diagnostics out.
use std::collections::BTreeMap;

use proxy_common::{proto, scope, service_flags};

use super::*;
use crate::{
    source::manifests::{parse_documents, Snapshot},
    state::NodeInfo,
};

/// A frontend as the table writes it: `ip:port/PROTO` (plus `/internal` for the
/// internal scope) → sorted backends.
type Summary = BTreeMap<String, Vec<String>>;

fn run(
    yaml: &str,
    node_labels: &[(&str, &str)],
    settings: &ModelSettings,
) -> (Desired, Vec<Diagnostic>) {
    let mut snapshot = Snapshot::default();
    parse_documents(yaml, "test.yaml", &mut snapshot);
    snapshot.state.node = NodeInfo {
        name: Some("node-a".into()),
        labels: node_labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    let desired = desired(&snapshot.state, settings);
    let mut diagnostics = snapshot.diagnostics.clone();
    diagnostics.extend(desired.diagnostics.iter().cloned());
    (desired, diagnostics)
}

fn summary(desired: &Desired) -> Summary {
    desired
        .frontends
        .iter()
        .map(|(key, spec)| {
            let mut name = format!(
                "{}:{}/{}",
                key.addr,
                key.port,
                proto_name(key.proto).to_uppercase()
            );
            if key.scope == scope::INTERNAL {
                name.push_str("/internal");
            }
            (
                name,
                spec.backends.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

fn expect(pairs: &[(&str, &[&str])]) -> Summary {
    pairs
        .iter()
        .map(|(frontend, backends)| {
            (
                (*frontend).to_owned(),
                backends.iter().map(|b| (*b).to_owned()).collect(),
            )
        })
        .collect()
}

const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
";

fn slice(name: &str, service: &str, port_name: &str, port: u16, endpoints: &str) -> String {
    format!(
        "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: '{port_name}', port: {port}, protocol: TCP}}]
endpoints: {endpoints}
"
    )
}

struct Case {
    name: &'static str,
    yaml: String,
    node_labels: &'static [(&'static str, &'static str)],
    frontends: Summary,
    /// Diagnostic reasons expected, in any order.
    diagnostics: Vec<DiagnosticReason>,
}

#[allow(clippy::too_many_lines, reason = "one table")]
fn cases() -> Vec<Case> {
    let web_8080 = ["10.244.1.11:8080", "10.244.1.12:8080"];
    vec![
        Case {
            name: "slices of one service are merged",
            yaml: format!(
                "{WEB}{}{}",
                slice("web-a", "web", "http", 8080, "[{addresses: [10.244.1.11]}]"),
                slice("web-b", "web", "http", 8080, "[{addresses: [10.244.1.12]}]")
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.10:80/TCP", &web_8080)]),
            diagnostics: vec![],
        },
        Case {
            name: "only ready endpoints; ready unset counts as ready",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-a",
                    "web",
                    "http",
                    8080,
                    "[{addresses: [10.244.1.11]}, {addresses: [10.244.1.12], conditions: {ready: true}},
                      {addresses: [10.244.1.13], conditions: {ready: false}}]"
                )
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.10:80/TCP", &web_8080)]),
            diagnostics: vec![],
        },
        Case {
            name: "no ready endpoints: serving and terminating ones are used (KEP-1669)",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-a",
                    "web",
                    "http",
                    8080,
                    "[{addresses: [10.244.1.11], conditions: {ready: false, serving: true, terminating: true}},
                      {addresses: [10.244.1.12], conditions: {ready: false, serving: false, terminating: true}}]"
                )
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.10:80/TCP", &["10.244.1.11:8080"])]),
            diagnostics: vec![],
        },
        Case {
            name: "ports are matched by name",
            yaml: format!(
                "
apiVersion: v1
kind: Service
metadata: {{name: two, namespace: default}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{name: http, port: 80, targetPort: web}}, {{name: metrics, port: 9090, targetPort: 9100}}]
{}{}",
                slice("two-a", "two", "http", 8080, "[{addresses: [10.244.1.11]}]"),
                slice("two-b", "two", "metrics", 9100, "[{addresses: [10.244.1.12]}]")
            ),
            node_labels: &[],
            frontends: expect(&[
                ("10.96.0.20:80/TCP", &["10.244.1.11:8080"]),
                ("10.96.0.20:9090/TCP", &["10.244.1.12:9100"]),
            ]),
            diagnostics: vec![],
        },
        Case {
            name: "a service without selector works with manual slices",
            yaml: format!(
                "
apiVersion: v1
kind: Service
metadata: {{name: manual, namespace: default}}
spec:
  clusterIP: 10.96.0.30
  ports: [{{name: '', port: 5432}}]
{}",
                slice("manual-1", "manual", "", 5432, "[{addresses: [192.168.5.5]}]")
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.30:5432/TCP", &["192.168.5.5:5432"])]),
            diagnostics: vec![],
        },
        Case {
            name: "ExternalName and headless services produce nothing",
            yaml: "
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: labelled, namespace: default, labels: {service.kubernetes.io/headless: ''}}
spec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}
"
            .into(),
            node_labels: &[],
            frontends: expect(&[]),
            diagnostics: vec![],
        },
        Case {
            name: "services of another proxy are skipped",
            yaml: "
apiVersion: v1
kind: Service
metadata: {name: theirs, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.41, ports: [{port: 80}]}
"
            .into(),
            node_labels: &[],
            frontends: expect(&[]),
            diagnostics: vec![],
        },
        Case {
            name: "a malformed service is skipped with a diagnostic; the others stay",
            yaml: format!(
                "{WEB}{}
---
apiVersion: v1
kind: Service
metadata: {{name: broken, namespace: default}}
spec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: badport, namespace: default}}
spec: {{clusterIP: 10.96.0.51, ports: [{{port: 70000}}]}}
",
                slice("web-a", "web", "http", 8080, "[{addresses: [10.244.1.11]}, {addresses: [10.244.1.12]}]")
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.10:80/TCP", &web_8080)]),
            diagnostics: vec![DiagnosticReason::Malformed, DiagnosticReason::Malformed],
        },
        Case {
            name: "bad endpoint addresses and slices of unknown services are reported",
            yaml: format!(
                "{WEB}{}{}",
                slice("web-a", "web", "http", 8080, "[{addresses: [10.244.1.11]}, {addresses: [not-an-ip]}]"),
                slice("ghost-a", "ghost", "http", 8080, "[{addresses: [10.244.1.12]}]")
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.10:80/TCP", &["10.244.1.11:8080"])]),
            diagnostics: vec![DiagnosticReason::Malformed, DiagnosticReason::OrphanEndpointSlice],
        },
        Case {
            name: "IPv6 services are rejected cleanly",
            yaml: "
apiVersion: v1
kind: Service
metadata: {name: six, namespace: default}
spec: {clusterIP: 'fd00::10', ipFamilies: [IPv6], ports: [{port: 80}]}
"
            .into(),
            node_labels: &[],
            frontends: expect(&[]),
            diagnostics: vec![DiagnosticReason::UnsupportedIpFamily],
        },
        Case {
            name: "internalTrafficPolicy Local keeps this node's endpoints only",
            yaml: format!(
                "
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  clusterIP: 10.96.0.60
  internalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080}}]
{}",
                slice(
                    "local-a",
                    "local",
                    "http",
                    8080,
                    "[{addresses: [10.244.1.11], nodeName: node-a}, {addresses: [10.244.2.11], nodeName: node-b}]"
                )
            ),
            node_labels: &[],
            frontends: expect(&[("10.96.0.60:80/TCP", &["10.244.1.11:8080"])]),
            diagnostics: vec![],
        },
        Case {
            name: "topology hints are honoured when every endpoint has them",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-a",
                    "web",
                    "http",
                    8080,
                    "[{addresses: [10.244.1.11], zone: z1, hints: {forZones: [{name: z1}]}},
                      {addresses: [10.244.1.12], zone: z2, hints: {forZones: [{name: z2}]}}]"
                )
            ),
            node_labels: &[("topology.kubernetes.io/zone", "z1")],
            frontends: expect(&[("10.96.0.10:80/TCP", &["10.244.1.11:8080"])]),
            diagnostics: vec![],
        },
        Case {
            name: "topology hints are ignored when one endpoint lacks them",
            yaml: format!(
                "{WEB}{}",
                slice(
                    "web-a",
                    "web",
                    "http",
                    8080,
                    "[{addresses: [10.244.1.11], zone: z1, hints: {forZones: [{name: z1}]}},
                      {addresses: [10.244.1.12], zone: z2}]"
                )
            ),
            node_labels: &[("topology.kubernetes.io/zone", "z1")],
            frontends: expect(&[("10.96.0.10:80/TCP", &web_8080)]),
            diagnostics: vec![],
        },
    ]
}

#[test]
fn model_table() {
    let settings = ModelSettings::default();
    let mut failures = Vec::new();
    for case in cases() {
        let (desired, diagnostics) = run(&case.yaml, case.node_labels, &settings);
        let got = summary(&desired);
        if got != case.frontends {
            failures.push(format!(
                "{}: frontends\n  want {:?}\n  got  {:?}",
                case.name, case.frontends, got
            ));
        }
        let mut reasons: Vec<DiagnosticReason> = diagnostics.iter().map(|d| d.reason).collect();
        reasons.sort();
        let mut want = case.diagnostics.clone();
        want.sort();
        if reasons != want {
            failures.push(format!(
                "{}: diagnostics\n  want {want:?}\n  got  {diagnostics:?}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn session_affinity_sets_the_flag_and_timeout() {
    let yaml = |config: &str| {
        format!(
            "
apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: default}}
spec:
  clusterIP: 10.96.0.70
  sessionAffinity: ClientIP
  {config}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
{}",
            slice(
                "sticky-a",
                "sticky",
                "http",
                8080,
                "[{addresses: [10.244.1.11]}]"
            )
        )
    };
    for (config, timeout) in [
        ("", 10_800),
        (
            "sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
            60,
        ),
    ] {
        let (desired, _) = run(&yaml(config), &[], &ModelSettings::default());
        let spec = desired.frontends.values().next().expect("one frontend");
        assert_ne!(spec.flags & service_flags::AFFINITY, 0);
        assert_eq!(spec.affinity_timeout_s, timeout, "{config}");
    }
}

#[test]
fn a_service_without_endpoints_is_kept_to_reject() {
    let (desired, _) = run(WEB, &[], &ModelSettings::default());
    let spec = desired.frontends.values().next().expect("frontend kept");
    assert!(spec.backends.is_empty());
    assert_eq!(
        spec.flags & service_flags::DROP_WHEN_EMPTY,
        0,
        "rejects, not drops"
    );
}

#[test]
fn our_proxy_name_selects_labelled_services() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: ours, namespace: default, labels: {service.kubernetes.io/service-proxy-name: kpr}}
spec: {clusterIP: 10.96.0.42, ports: [{port: 80}]}
";
    let settings = ModelSettings {
        proxy_name: Some("kpr".into()),
        ..ModelSettings::default()
    };
    let (desired, _) = run(yaml, &[], &settings);
    assert_eq!(desired.frontends.len(), 1);
    let key = desired.frontends.keys().next().expect("frontend");
    assert_eq!((key.port, key.proto), (80, proto::TCP));
}
