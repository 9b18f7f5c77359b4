//! Table tests of the model: Kubernetes objects as the API serves them (YAML, parsed by
//! the manifest source's own parser, so malformed objects are covered too) in, frontends
//! and diagnostics out. Then a table of `categorize` on hand-made endpoints.
//!
//! A frontend is written as one line:
//! `addr:port/PROTO[/internal] namespace/service[:port-name] kind -> backends [flags]`,
//! with `-` for no backends and flags `affinity=<s>`, `drop`, `ext`, `ext-local`,
//! `has-internal`, `src-ranges`.
//!
//! A health check (healthCheckNodePort) is written `port namespace/service local=N`.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
};

use proxy_common::{scope, service_flags};

use super::{
    DiagnosticReason::{
        EndpointLimit, FrontendConflict, Malformed, OrphanEndpointSlice, UnreadableSource,
        UnsupportedIpFamily,
    },
    *,
};
use crate::source::{manifests::parse_documents, Snapshot};

/// The node the agent runs on in every case.
const NODE: &str = "node-a";
/// Addresses NodePorts listen on in every case.
const NODE_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 1, 10),
    Ipv4Addr::new(192, 168, 1, 11),
];

/// The node's IPv6 NodePort addresses in every case.
const NODE_IPS_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0x192, 0x168, 1, 0, 0, 0, 0x10)];

// Endpoint conditions as the EndpointSlice controller writes them.
const READY: &str = "conditions: {ready: true, serving: true, terminating: false}";
const TERMINATING: &str = "conditions: {ready: false, serving: true, terminating: true}";
const TERMINATING_NOT_SERVING: &str =
    "conditions: {ready: false, serving: false, terminating: true}";
const NOT_READY: &str = "conditions: {ready: false, serving: false, terminating: false}";
/// No `conditions` at all (hand-written slices): ready.
const UNSET: &str = "";

// ---------------------------------------------------------------------------------
// Object builders: YAML as `kubectl get -o yaml` shows it.

/// The `web` Service: ClusterIP 10.96.0.10, port `http` 80 -> targetPort 8080.
fn web() -> String {
    web_with("")
}

/// The `web` Service with extra `spec` lines (each indented by two spaces).
fn web_with(extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  uid: 6f1a9c1e-0d7b-4a55-9d0e-3c1f3f1b7a10
  resourceVersion: \"1201\"
  creationTimestamp: \"2024-05-01T10:00:00Z\"
  labels: {{app: web}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  internalTrafficPolicy: Cluster
  sessionAffinity: None
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
{extra_spec}status:
  loadBalancer: {{}}
"
    )
}

/// A Service in `default` with a flow-style spec (and optional flow-style labels).
fn service(name: &str, labels: &str, spec: &str) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(", labels: {labels}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, uid: uid-{name}, resourceVersion: \"7\"{labels}}}
spec: {spec}
"
    )
}

/// An endpoint of a slice: its address, node, and extra fields (conditions, zone, hints).
fn ep(ip: &str, node: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        "{{addresses: ['{ip}'], nodeName: {node}, \
         targetRef: {{kind: Pod, namespace: default, name: pod-{node}}}{extra}}}"
    )
}

/// An IPv4 EndpointSlice of `service` as the EndpointSlice controller writes it.
fn slice(name: &str, service: &str, ports: &str, endpoints: &[String]) -> String {
    typed_slice(name, service, "IPv4", ports, endpoints)
}

fn typed_slice(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &str,
    endpoints: &[String],
) -> String {
    let endpoints: String = endpoints.iter().map(|ep| format!("- {ep}\n")).collect();
    let endpoints = if endpoints.is_empty() {
        " []\n".to_owned()
    } else {
        format!("\n{endpoints}")
    };
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  generateName: {service}-
  labels:
    kubernetes.io/service-name: {service}
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
  ownerReferences:
  - {{apiVersion: v1, kind: Service, name: {service}, uid: uid-{service}, controller: true, blockOwnerDeletion: true}}
addressType: {address_type}
ports: {ports}
endpoints:{endpoints}"
    )
}

/// A slice of `web` with port `http` 8080.
fn web_slice(name: &str, endpoints: &[String]) -> String {
    slice(
        name,
        "web",
        "[{name: http, port: 8080, protocol: TCP}]",
        endpoints,
    )
}

/// A Node with flow-style labels.
fn node(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata: {{name: {name}, labels: {labels}}}
status: {{addresses: [{{type: InternalIP, address: 192.168.1.10}}]}}
"
    )
}

/// One multi-document YAML file.
fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

// ---------------------------------------------------------------------------------
// Running and rendering.

fn settings(proxy_name: Option<&str>) -> ModelSettings {
    ModelSettings {
        proxy_name: proxy_name.map(str::to_owned),
        node_port_addresses: NODE_IPS.to_vec(),
        node_port_addresses_v6: NODE_IPS_V6.to_vec(),
    }
}

/// Parses `yaml` as the manifest source does, for node [`NODE`], and runs the model.
/// Returns the model's output and every diagnostic (source's and model's).
fn run(yaml: &str, settings: &ModelSettings) -> (Desired, Vec<Diagnostic>) {
    let mut snapshot = Snapshot::for_node(Some(NODE));
    parse_documents(yaml, "test.yaml", &mut snapshot);
    let desired = desired(&snapshot.state, settings);
    let mut diagnostics = snapshot.diagnostics;
    diagnostics.extend(desired.diagnostics.iter().cloned());
    (desired, diagnostics)
}

fn render<F: crate::family::Family>(key: &FrontendKey<F>, spec: &FrontendSpec<F>) -> String {
    // IPv6 frontends as `[addr]:port`, like their backends (SocketAddrV6's Display).
    let addr = match key.addr.into() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut line = format!(
        "{addr}:{}/{}",
        key.port,
        proto_name(key.proto).to_uppercase()
    );
    if key.scope == scope::INTERNAL {
        line.push_str("/internal");
    }
    let name = &spec.service_port;
    assert_eq!(name.proto, key.proto, "frontend and service port protocols");
    line.push_str(&format!(" {}", name.service));
    if !name.port.is_empty() {
        line.push_str(&format!(":{}", name.port));
    }
    let kind = match spec.kind {
        FrontendKind::ClusterIp => "cluster",
        FrontendKind::NodePort => "nodeport",
        FrontendKind::ExternalIp => "external",
        FrontendKind::LoadBalancer => "lb",
    };
    let backends: Vec<String> = spec.backends.iter().map(ToString::to_string).collect();
    let backends = if backends.is_empty() {
        "-".to_owned()
    } else {
        backends.join(",")
    };
    line.push_str(&format!(" {kind} -> {backends}"));
    let flags = [
        (service_flags::DROP_WHEN_EMPTY, "drop"),
        (service_flags::EXTERNAL, "ext"),
        (service_flags::EXTERNAL_LOCAL, "ext-local"),
        (service_flags::HAS_INTERNAL_SCOPE, "has-internal"),
        (service_flags::SOURCE_RANGES, "src-ranges"),
    ];
    if spec.flags & service_flags::AFFINITY != 0 {
        line.push_str(&format!(" affinity={}", spec.affinity_timeout_s));
    } else if spec.affinity_timeout_s != 0 {
        line.push_str(&format!(
            " timeout-without-affinity={}",
            spec.affinity_timeout_s
        ));
    }
    for (flag, label) in flags {
        if spec.flags & flag != 0 {
            line.push(' ');
            line.push_str(label);
        }
    }
    line
}

fn render_health_check(port: u16, health: &ServiceHealth) -> String {
    format!("{port} {} local={}", health.service, health.local_endpoints)
}

// ---------------------------------------------------------------------------------
// The table.

struct Case {
    name: &'static str,
    description: &'static str,
    yaml: String,
    proxy_name: Option<&'static str>,
    /// Every frontend, rendered (order does not matter).
    frontends: Vec<&'static str>,
    /// Every health check, rendered (order does not matter).
    health_checks: Vec<&'static str>,
    /// Every diagnostic as (reason, object) (order does not matter).
    diagnostics: Vec<(DiagnosticReason, &'static str)>,
}

fn case(name: &'static str, description: &'static str, parts: &[String]) -> Case {
    Case {
        name,
        description,
        yaml: docs(parts),
        proxy_name: None,
        frontends: Vec::new(),
        health_checks: Vec::new(),
        diagnostics: Vec::new(),
    }
}

impl Case {
    fn frontends(mut self, frontends: &[&'static str]) -> Self {
        self.frontends = frontends.to_vec();
        self
    }

    fn health_checks(mut self, health_checks: &[&'static str]) -> Self {
        self.health_checks = health_checks.to_vec();
        self
    }

    fn diagnostics(mut self, diagnostics: &[(DiagnosticReason, &'static str)]) -> Self {
        self.diagnostics = diagnostics.to_vec();
        self
    }

    fn proxy_name(mut self, name: &'static str) -> Self {
        self.proxy_name = Some(name);
        self
    }
}

const WEB_11_12: &str =
    "10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:8080,10.244.1.12:8080";
const WEB_11: &str = "10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:8080";

fn endpoint_cases() -> Vec<Case> {
    vec![
        case(
            "merge_slices",
            "two EndpointSlices of one Service are merged; an endpoint in both counts once",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY), ep("10.244.1.12", "node-b", READY)]),
                web_slice("web-9fj3q", &[ep("10.244.1.12", "node-b", READY), ep("10.244.1.13", "node-c", READY)]),
            ],
        )
        .frontends(&["10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:8080,10.244.1.12:8080,10.244.1.13:8080"]),
        case(
            "ready_only",
            "only ready endpoints are used; conditions unset count as ready",
            &[
                web(),
                web_slice(
                    "web-7xk2p",
                    &[
                        ep("10.244.1.11", NODE, UNSET),
                        ep("10.244.1.12", "node-b", READY),
                        ep("10.244.1.13", "node-b", NOT_READY),
                        ep("10.244.1.14", "node-b", TERMINATING),
                        ep("10.244.1.15", "node-b", "conditions: {}"),
                    ],
                ),
            ],
        )
        .frontends(&["10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:8080,10.244.1.12:8080,10.244.1.15:8080"]),
        case(
            "terminating_fallback",
            "no ready endpoint: serving-and-terminating ones are used (KEP-1669), others not",
            &[
                web(),
                web_slice(
                    "web-7xk2p",
                    &[
                        ep("10.244.1.11", NODE, TERMINATING),
                        ep("10.244.1.12", "node-b", TERMINATING_NOT_SERVING),
                        ep("10.244.1.13", "node-b", NOT_READY),
                        ep("10.244.1.14", "node-b", "conditions: {ready: false, serving: true, terminating: false}"),
                    ],
                ),
            ],
        )
        .frontends(&[WEB_11]),
        case(
            "no_usable_endpoints_rejects",
            "a service with no usable endpoint (or no slice) keeps its frontend, empty, to reject",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, NOT_READY), ep("10.244.1.12", NODE, TERMINATING_NOT_SERVING)]),
                service("lonely", "", "{clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}"),
                service("emptyslice", "", "{clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}"),
                slice("emptyslice-1", "emptyslice", "[{name: http, port: 8080}]", &[]),
            ],
        )
        .frontends(&[
            "10.96.0.10:80/TCP default/web:http cluster -> -",
            "10.96.0.11:80/TCP default/lonely:http cluster -> -",
            "10.96.0.12:80/TCP default/emptyslice:http cluster -> -",
        ]),
        case(
            "ports_by_name",
            "each service port takes the slice port of the same name; targetPort by name or number",
            &[
                service(
                    "two",
                    "",
                    "{clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: web}, {name: metrics, port: 9090, targetPort: 9100}]}",
                ),
                slice(
                    "two-abcde",
                    "two",
                    "[{name: metrics, port: 9100, protocol: TCP}, {name: http, port: 8080, protocol: TCP}]",
                    &[ep("10.244.1.11", NODE, READY)],
                ),
                slice("two-fghij", "two", "[{name: http, port: 8080, protocol: TCP}]", &[ep("10.244.1.12", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.20:80/TCP default/two:http cluster -> 10.244.1.11:8080,10.244.1.12:8080",
            "10.96.0.20:9090/TCP default/two:metrics cluster -> 10.244.1.11:9100",
        ]),
        case(
            "ports_by_name_and_protocol",
            "DNS: port 53 over UDP and TCP are two frontends, each matched by name and protocol",
            &[
                service(
                    "kube-dns",
                    "",
                    "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP, targetPort: 53}, \
                     {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}]}",
                ),
                slice(
                    "kube-dns-x1",
                    "kube-dns",
                    "[{name: dns-tcp, port: 5353, protocol: TCP}, {name: dns, port: 53, protocol: UDP}, {name: dns, port: 9999, protocol: TCP}]",
                    &[ep("10.244.1.11", NODE, READY)],
                ),
            ],
        )
        .frontends(&[
            "10.96.0.53:53/TCP default/kube-dns:dns-tcp cluster -> 10.244.1.11:5353",
            "10.96.0.53:53/UDP default/kube-dns:dns cluster -> 10.244.1.11:53",
        ]),
        case(
            "unnamed_single_port",
            "an unnamed service port matches a slice port named '' or with no name",
            &[
                service("plain", "", "{clusterIP: 10.96.0.21, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}"),
                slice("plain-1", "plain", "[{name: '', port: 8080, protocol: TCP}]", &[ep("10.244.1.11", NODE, READY)]),
                service("bare", "", "{clusterIP: 10.96.0.22, ports: [{port: 80}]}"),
                slice("bare-1", "bare", "[{port: 8080}]", &[ep("10.244.1.12", NODE, READY)]),
                slice("bare-2", "bare", "[{name: http, port: 9090}]", &[ep("10.244.1.13", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.21:80/TCP default/plain cluster -> 10.244.1.11:8080",
            "10.96.0.22:80/TCP default/bare cluster -> 10.244.1.12:8080",
        ]),
        case(
            "target_port_from_slice",
            "the backend port is the slice's port (resolved targetPort), not the Service's targetPort",
            &[
                web(),
                slice("web-7xk2p", "web", "[{name: http, port: 9090, protocol: TCP}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&["10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:9090"]),
        case(
            "selectorless_manual_slice",
            "a Service without selector works with a hand-made slice carrying kubernetes.io/service-name",
            &[
                service("db", "", "{clusterIP: 10.96.0.30, ports: [{name: pg, port: 5432, protocol: TCP}]}"),
                "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-manual
  namespace: default
  labels: {kubernetes.io/service-name: db, endpointslice.kubernetes.io/managed-by: staff}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints: [{addresses: [192.168.5.5]}]
"
                .to_owned(),
            ],
        )
        .frontends(&["10.96.0.30:5432/TCP default/db:pg cluster -> 192.168.5.5:5432"]),
        case(
            "other_namespace_slice",
            "a slice names a service of its own namespace: a same-named service elsewhere is not it",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                web_slice("web-other", &[ep("10.244.9.9", NODE, READY)]).replace("namespace: default", "namespace: other"),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[(OrphanEndpointSlice, "EndpointSlice other/web-other")]),
        case(
            "duplicate_endpoint_later_slice_wins",
            "an address in two slices is used once; a later slice's copy wins unless it is terminating (kube-proxy)",
            &[
                web(),
                web_slice("web-a", &[ep("10.244.1.11", NODE, NOT_READY), ep("10.244.1.12", NODE, READY)]),
                web_slice("web-b", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[WEB_11_12]),
    ]
}

fn selection_cases() -> Vec<Case> {
    vec![
        case(
            "external_name",
            "an ExternalName service produces nothing (no diagnostic)",
            &[service("ext", "", "{type: ExternalName, externalName: db.example.com}")],
        ),
        case(
            "headless_cluster_ip_none",
            "clusterIP None produces nothing; its slices are not orphans",
            &[
                service("hl", "", "{clusterIP: None, clusterIPs: [None], selector: {app: hl}, ports: [{name: http, port: 80}]}"),
                slice("hl-1", "hl", "[{name: http, port: 80}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        ),
        case(
            "headless_label",
            "the service.kubernetes.io/headless label skips a service even with a clusterIP",
            &[
                service("hl", "{service.kubernetes.io/headless: ''}", "{clusterIP: 10.96.0.40, ports: [{name: http, port: 80}]}"),
                slice("hl-1", "hl", "[{name: http, port: 80}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        ),
        case(
            "other_proxy_skipped",
            "service-proxy-name set while we have no proxy name: not ours",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service(
                    "theirs",
                    "{service.kubernetes.io/service-proxy-name: kpr}",
                    "{clusterIP: 10.96.0.41, ports: [{name: http, port: 80}]}",
                ),
            ],
        )
        .frontends(&[WEB_11]),
        case(
            "proxy_name_selects",
            "with proxy name kpr: services labelled kpr and unlabelled ones are ours, others not",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service(
                    "ours",
                    "{service.kubernetes.io/service-proxy-name: kpr}",
                    "{clusterIP: 10.96.0.42, ports: [{name: http, port: 80}]}",
                ),
                service(
                    "theirs",
                    "{service.kubernetes.io/service-proxy-name: cilium}",
                    "{clusterIP: 10.96.0.43, ports: [{name: http, port: 80}]}",
                ),
                service(
                    "empty-label",
                    "{service.kubernetes.io/service-proxy-name: ''}",
                    "{clusterIP: 10.96.0.44, ports: [{name: http, port: 80}]}",
                ),
            ],
        )
        .proxy_name("kpr")
        .frontends(&[WEB_11, "10.96.0.42:80/TCP default/ours:http cluster -> -"]),
        case(
            "cluster_ip_not_allocated",
            "a service without any clusterIP (hand-written manifest) produces nothing",
            &[service("raw", "", "{ports: [{name: http, port: 80}]}")],
        ),
        case(
            "frontend_conflict",
            "two services on one clusterIP:port: the first by namespace/name keeps it, reported",
            &[
                service("a", "", "{clusterIP: 10.96.0.45, ports: [{name: http, port: 80}]}"),
                service("b", "", "{clusterIP: 10.96.0.45, ports: [{name: http, port: 80}, {name: https, port: 443}]}"),
            ],
        )
        .frontends(&[
            "10.96.0.45:80/TCP default/a:http cluster -> -",
            "10.96.0.45:443/TCP default/b:https cluster -> -",
        ])
        .diagnostics(&[(FrontendConflict, "Service default/b")]),
    ]
}

/// A Service `namespace/name` created at `created` (RFC 3339, or "" for none) with
/// the flow-style `spec`.
fn service_in(namespace: &str, name: &str, created: &str, spec: &str) -> String {
    let created = if created.is_empty() {
        String::new()
    } else {
        format!(", creationTimestamp: '{created}'")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}{created}}}
spec: {spec}
"
    )
}

/// Frontend conflicts, decided as the API would: an allocated ClusterIP beats any
/// externalIP or LoadBalancer claim; between equal claims the older Service wins, then
/// namespace/name. The loser is reported.
fn conflict_cases() -> Vec<Case> {
    let evil = |spec: &str| service_in("aaa", "evil", "2024-06-01T00:00:00Z", spec);
    vec![
        case(
            "external_ip_hijack_refused",
            "aaa/evil's externalIP is web's ClusterIP: web keeps it (allocated beats claimed), evil is reported and keeps its own ClusterIP",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                evil("{clusterIP: 10.96.0.66, externalIPs: [10.96.0.10], ports: [{name: http, port: 80}]}"),
            ],
        )
        .frontends(&[
            WEB_11,
            "10.96.0.66:80/TCP aaa/evil:http cluster -> -",
        ])
        .diagnostics(&[(FrontendConflict, "Service aaa/evil")]),
        case(
            "load_balancer_ip_hijack_refused",
            "a LoadBalancer ingress IP equal to another service's ClusterIP loses too, whatever the names",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service_in("aaa", "lb", "", "{type: LoadBalancer, clusterIP: 10.96.0.67, ports: [{name: http, port: 80}]}")
                    .replace("spec:", "status: {loadBalancer: {ingress: [{ip: 10.96.0.10}]}}\nspec:"),
            ],
        )
        .frontends(&[
            WEB_11,
            "10.96.0.67:80/TCP aaa/lb:http cluster -> -",
        ])
        .diagnostics(&[(FrontendConflict, "Service aaa/lb")]),
        case(
            "older_external_claim_wins",
            "two services name one externalIP: the older keeps it, though its name sorts last",
            &[
                service_in("aaa", "new", "2025-01-01T00:00:00Z", "{clusterIP: 10.96.0.68, externalIPs: [203.0.113.5], ports: [{name: http, port: 80}]}"),
                service_in("zzz", "old", "2023-01-01T00:00:00Z", "{clusterIP: 10.96.0.69, externalIPs: [203.0.113.5], ports: [{name: http, port: 80}]}"),
            ],
        )
        .frontends(&[
            "10.96.0.68:80/TCP aaa/new:http cluster -> -",
            "10.96.0.69:80/TCP zzz/old:http cluster -> -",
            "203.0.113.5:80/TCP zzz/old:http external -> - ext",
        ])
        .diagnostics(&[(FrontendConflict, "Service aaa/new")]),
        case(
            "unknown_age_counts_as_newest",
            "a claim with a creationTimestamp beats one without (a hand-written manifest)",
            &[
                service_in("aaa", "undated", "", "{clusterIP: 10.96.0.70, externalIPs: [203.0.113.6], ports: [{name: http, port: 80}]}"),
                service_in("bbb", "dated", "2025-01-01T00:00:00Z", "{clusterIP: 10.96.0.71, externalIPs: [203.0.113.6], ports: [{name: http, port: 80}]}"),
            ],
        )
        .frontends(&[
            "10.96.0.70:80/TCP aaa/undated:http cluster -> -",
            "10.96.0.71:80/TCP bbb/dated:http cluster -> -",
            "203.0.113.6:80/TCP bbb/dated:http external -> - ext",
        ])
        .diagnostics(&[(FrontendConflict, "Service aaa/undated")]),
        case(
            "equal_claims_same_age_by_name",
            "the same age (or none): namespace/name decides",
            &[
                service_in("bbb", "b", "", "{clusterIP: 10.96.0.72, externalIPs: [203.0.113.7], ports: [{name: http, port: 80}]}"),
                service_in("aaa", "a", "", "{clusterIP: 10.96.0.73, externalIPs: [203.0.113.7], ports: [{name: http, port: 80}]}"),
            ],
        )
        .frontends(&[
            "10.96.0.72:80/TCP bbb/b:http cluster -> -",
            "10.96.0.73:80/TCP aaa/a:http cluster -> -",
            "203.0.113.7:80/TCP aaa/a:http external -> - ext",
        ])
        .diagnostics(&[(FrontendConflict, "Service bbb/b")]),
        case(
            "a_lost_local_claim_leaves_no_internal_twin",
            "an externalTrafficPolicy Local externalIP that loses to a ClusterIP takes its cluster-internal entry with it",
            &[
                service_in("aaa", "local", "", "{type: NodePort, externalTrafficPolicy: Local, clusterIP: 10.96.0.74, externalIPs: [10.96.0.75], ports: [{name: http, port: 80}]}"),
                service_in("zzz", "victim", "", "{clusterIP: 10.96.0.75, ports: [{name: http, port: 80}]}"),
            ],
        )
        .frontends(&[
            "10.96.0.74:80/TCP aaa/local:http cluster -> -",
            "10.96.0.75:80/TCP zzz/victim:http cluster -> -",
        ])
        .diagnostics(&[(FrontendConflict, "Service aaa/local")]),
    ]
}

fn malformed_cases() -> Vec<Case> {
    vec![
        case(
            "bad_cluster_ip",
            "an unparsable clusterIP skips that service only",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service("broken", "", "{clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[(Malformed, "Service default/broken")]),
        case(
            "bad_service_ports",
            "service ports 0 and 70000 are skipped; the service's valid port stays",
            &[service(
                "ports",
                "",
                "{clusterIP: 10.96.0.50, ports: [{name: zero, port: 0}, {name: big, port: 70000}, {name: ok, port: 81}]}",
            )],
        )
        .frontends(&["10.96.0.50:81/TCP default/ports:ok cluster -> -"])
        .diagnostics(&[(Malformed, "Service default/ports"), (Malformed, "Service default/ports")]),
        case(
            "bad_protocols",
            "an unknown protocol is malformed; the SCTP and TCP ports stay",
            &[service(
                "protos",
                "",
                "{clusterIP: 10.96.0.51, ports: [{name: s, port: 80, protocol: SCTP}, {name: i, port: 81, protocol: ICMP}, \
                 {name: t, port: 82, protocol: TCP}]}",
            )],
        )
        .frontends(&["10.96.0.51:80/SCTP default/protos:s cluster -> -", "10.96.0.51:82/TCP default/protos:t cluster -> -"])
        .diagnostics(&[(Malformed, "Service default/protos")]),
        case(
            "sctp",
            "SCTP ports get every frontend TCP and UDP get (ClusterIP, NodePort, externalIP, LoadBalancer), with the slice's SCTP port",
            &[
                service(
                    "diameter",
                    "",
                    "{type: LoadBalancer, clusterIP: 10.96.0.52, externalIPs: [203.0.113.52], \
                     ports: [{name: dia, port: 3868, protocol: SCTP, targetPort: 3869, nodePort: 30868}, \
                     {name: dia-tcp, port: 3868, protocol: TCP, targetPort: 3869, nodePort: 30869}]}",
                )
                .replace("spec:", "status: {loadBalancer: {ingress: [{ip: 198.51.100.52}]}}\nspec:"),
                slice(
                    "diameter-1",
                    "diameter",
                    "[{name: dia, port: 3869, protocol: SCTP}, {name: dia-tcp, port: 3869, protocol: TCP}]",
                    &[ep("10.244.1.11", NODE, READY)],
                ),
            ],
        )
        .frontends(&[
            "10.96.0.52:3868/SCTP default/diameter:dia cluster -> 10.244.1.11:3869",
            "192.168.1.10:30868/SCTP default/diameter:dia nodeport -> 10.244.1.11:3869 ext",
            "192.168.1.11:30868/SCTP default/diameter:dia nodeport -> 10.244.1.11:3869 ext",
            "203.0.113.52:3868/SCTP default/diameter:dia external -> 10.244.1.11:3869 ext",
            "198.51.100.52:3868/SCTP default/diameter:dia lb -> 10.244.1.11:3869 ext",
            "10.96.0.52:3868/TCP default/diameter:dia-tcp cluster -> 10.244.1.11:3869",
            "192.168.1.10:30869/TCP default/diameter:dia-tcp nodeport -> 10.244.1.11:3869 ext",
            "192.168.1.11:30869/TCP default/diameter:dia-tcp nodeport -> 10.244.1.11:3869 ext",
            "203.0.113.52:3868/TCP default/diameter:dia-tcp external -> 10.244.1.11:3869 ext",
            "198.51.100.52:3868/TCP default/diameter:dia-tcp lb -> 10.244.1.11:3869 ext",
        ]),
        case(
            "bad_endpoint_addresses",
            "a non-IP and an IPv6 address in an IPv4 slice are skipped; the slice's other endpoints stay",
            &[
                web(),
                web_slice(
                    "web-7xk2p",
                    &[ep("10.244.1.11", NODE, READY), ep("not-an-ip", NODE, READY), ep("fd00::11", NODE, READY)],
                ),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[(Malformed, "EndpointSlice default/web-7xk2p"), (Malformed, "EndpointSlice default/web-7xk2p")]),
        case(
            "bad_slice_ports",
            "slices with port 0 or 70000 are skipped; another slice of the service stays",
            &[
                web(),
                slice("web-zero", "web", "[{name: http, port: 0}]", &[ep("10.244.1.13", NODE, READY)]),
                slice("web-big", "web", "[{name: http, port: 70000}]", &[ep("10.244.1.14", NODE, READY)]),
                slice("web-none", "web", "[{name: http}]", &[ep("10.244.1.15", NODE, READY)]),
                web_slice("web-ok", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[(Malformed, "EndpointSlice default/web-zero"), (Malformed, "EndpointSlice default/web-big")]),
        case(
            "orphan_slices",
            "slices for an unknown service or without the service-name label are reported",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                slice("ghost-1", "ghost", "[{name: http, port: 8080}]", &[ep("10.244.1.12", NODE, READY)]),
                "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: nolabel, namespace: default}
addressType: IPv4
endpoints: [{addresses: [10.244.1.13]}]
"
                .to_owned(),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[
            (OrphanEndpointSlice, "EndpointSlice default/ghost-1"),
            (OrphanEndpointSlice, "EndpointSlice default/nolabel"),
        ]),
        case(
            "address_types",
            "an FQDN slice is reported, an IPv6 slice is not read for IPv4 frontends; an unknown addressType is malformed",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                typed_slice("web-fqdn", "web", "FQDN", "[{name: http, port: 8080}]", &[ep("db.example.com", NODE, READY)]),
                typed_slice("web-v6", "web", "IPv6", "[{name: http, port: 8080}]", &[ep("fd00::12", NODE, READY)]),
                typed_slice("web-ipx", "web", "IPX", "[{name: http, port: 8080}]", &[ep("10.244.1.13", NODE, READY)]),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[
            (UnsupportedIpFamily, "EndpointSlice default/web-fqdn"),
            (Malformed, "EndpointSlice default/web-ipx"),
        ]),
        case(
            "unparsable_objects",
            "objects the API types reject are reported (by the source or the model); the rest is used",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service("words", "", "{clusterIP: 10.96.0.52, ports: [{name: http, port: eighty}]}"),
                "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-notype, namespace: default, labels: {kubernetes.io/service-name: web}}
endpoints: [{addresses: [10.244.1.12]}]
"
                .to_owned(),
                "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: [not, a, map]}\n".to_owned(),
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\ndata: {a: b}\n".to_owned(),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[
            (Malformed, "Service in test.yaml (document 3)"),
            // k8s-openapi reads a missing addressType as ""; the model reports it.
            (Malformed, "EndpointSlice default/web-notype"),
            (Malformed, "Node in test.yaml (document 5)"),
        ]),
        case(
            "yaml_syntax_error",
            "a YAML syntax error reports the file; documents before it are used",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                "kind: Service\nmetadata: {name: [unclosed\n".to_owned(),
            ],
        )
        .frontends(&[WEB_11])
        .diagnostics(&[(UnreadableSource, "test.yaml (document 3)")]),
        case(
            "no_spec",
            "a Service without spec is malformed",
            &["apiVersion: v1\nkind: Service\nmetadata: {name: nospec, namespace: default}\n".to_owned()],
        )
        .diagnostics(&[(Malformed, "Service default/nospec")]),
    ]
}

fn policy_cases() -> Vec<Case> {
    let local = |extra: &str| {
        service(
            "local",
            "",
            &format!(
                "{{clusterIP: 10.96.0.60, internalTrafficPolicy: Local, {extra}ports: [{{name: http, port: 80, targetPort: 8080}}]}}"
            ),
        )
    };
    let local_slice =
        |endpoints: &[String]| slice("local-1", "local", "[{name: http, port: 8080}]", endpoints);
    vec![
        case(
            "itp_local",
            "internalTrafficPolicy Local: only endpoints with nodeName == this node",
            &[local(""), local_slice(&[ep("10.244.1.11", NODE, READY), ep("10.244.2.11", "node-b", READY)])],
        )
        .frontends(&["10.96.0.60:80/TCP default/local:http cluster -> 10.244.1.11:8080"]),
        case(
            "itp_local_none_here",
            "internalTrafficPolicy Local with endpoints on other nodes only: empty frontend that drops",
            &[local(""), local_slice(&[ep("10.244.2.11", "node-b", READY)])],
        )
        .frontends(&["10.96.0.60:80/TCP default/local:http cluster -> - drop"]),
        case(
            "itp_local_none_anywhere",
            "internalTrafficPolicy Local with no usable endpoint anywhere: empty frontend that rejects",
            &[local(""), local_slice(&[ep("10.244.1.11", NODE, NOT_READY)])],
        )
        .frontends(&["10.96.0.60:80/TCP default/local:http cluster -> -"]),
        case(
            "itp_local_terminating_fallback",
            "internalTrafficPolicy Local: a local serving-terminating endpoint beats a remote ready one",
            &[
                local(""),
                local_slice(&[
                    ep("10.244.1.11", NODE, TERMINATING),
                    ep("10.244.1.12", NODE, NOT_READY),
                    ep("10.244.2.11", "node-b", READY),
                ]),
            ],
        )
        .frontends(&["10.96.0.60:80/TCP default/local:http cluster -> 10.244.1.11:8080"]),
        case(
            "affinity_default_timeout",
            "sessionAffinity ClientIP without config: AFFINITY with 10800 s",
            &[
                web_with("  sessionAffinityConfig: {}\n").replace("sessionAffinity: None", "sessionAffinity: ClientIP"),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&["10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:8080 affinity=10800"]),
        case(
            "affinity_custom_timeout",
            "sessionAffinity ClientIP with timeoutSeconds 60: AFFINITY with 60 s",
            &[
                web_with("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n")
                    .replace("sessionAffinity: None", "sessionAffinity: ClientIP"),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&["10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.11:8080 affinity=60"]),
        case(
            "affinity_timeout_out_of_range",
            "timeoutSeconds 0 or above 86400 is reported and 10800 used",
            &[
                service(
                    "zero",
                    "",
                    "{clusterIP: 10.96.0.71, sessionAffinity: ClientIP, \
                     sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{name: http, port: 80}]}",
                ),
                service(
                    "long",
                    "",
                    "{clusterIP: 10.96.0.72, sessionAffinity: ClientIP, \
                     sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{name: http, port: 80}]}",
                ),
            ],
        )
        .frontends(&[
            "10.96.0.71:80/TCP default/zero:http cluster -> - affinity=10800",
            "10.96.0.72:80/TCP default/long:http cluster -> - affinity=10800",
        ])
        .diagnostics(&[(Malformed, "Service default/zero"), (Malformed, "Service default/long")]),
        case(
            "affinity_none",
            "sessionAffinity None with a config left over: no AFFINITY",
            &[
                web_with("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[WEB_11]),
    ]
}

fn topology_cases() -> Vec<Case> {
    let hinted = |ip: &str, zone: &str| {
        ep(
            ip,
            "node-x",
            &format!("{READY}, zone: {zone}, hints: {{forZones: [{{name: {zone}}}]}}"),
        )
    };
    let zoned = |ip: &str, zone: &str| ep(ip, "node-x", &format!("{READY}, zone: {zone}"));
    let prefer_close = "  trafficDistribution: PreferClose\n";
    vec![
        case(
            "hints_same_zone",
            "every endpoint hinted and the node in zone z1: z1 endpoints only",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice("web-7xk2p", &[hinted("10.244.1.11", "z1"), hinted("10.244.1.12", "z2")]),
            ],
        )
        .frontends(&[WEB_11]),
        case(
            "hints_incomplete",
            "one ready endpoint without hints: hints ignored, all endpoints",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice("web-7xk2p", &[hinted("10.244.1.11", "z1"), zoned("10.244.1.12", "z2")]),
            ],
        )
        .frontends(&[WEB_11_12]),
        case(
            "hints_not_ready_unhinted",
            "an unhinted endpoint that is not ready does not disable hints",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice(
                    "web-7xk2p",
                    &[hinted("10.244.1.11", "z1"), hinted("10.244.1.12", "z2"), ep("10.244.1.13", "node-x", NOT_READY)],
                ),
            ],
        )
        .frontends(&[WEB_11]),
        case(
            "hints_node_without_zone",
            "this node has no zone label (another node's label is not ours): hints ignored",
            &[
                node(NODE, "{kubernetes.io/hostname: node-a}"),
                node("node-b", "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice("web-7xk2p", &[hinted("10.244.1.11", "z1"), hinted("10.244.1.12", "z2")]),
            ],
        )
        .frontends(&[WEB_11_12]),
        case(
            "hints_other_zones_only",
            "no endpoint is hinted for this node's zone: hints ignored",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z3}"),
                web(),
                web_slice("web-7xk2p", &[hinted("10.244.1.11", "z1"), hinted("10.244.1.12", "z2")]),
            ],
        )
        .frontends(&[WEB_11_12]),
        case(
            "prefer_close_with_hints",
            "trafficDistribution PreferClose: the controller's zone hints are honoured",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z2}"),
                web_with(prefer_close),
                web_slice("web-7xk2p", &[hinted("10.244.1.11", "z1"), hinted("10.244.1.12", "z2")]),
            ],
        )
        .frontends(&["10.96.0.10:80/TCP default/web:http cluster -> 10.244.1.12:8080"]),
        case(
            "prefer_close_without_hints",
            "trafficDistribution PreferClose before the controller wrote hints: all endpoints",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web_with(prefer_close),
                web_slice("web-7xk2p", &[zoned("10.244.1.11", "z1"), zoned("10.244.1.12", "z2")]),
            ],
        )
        .frontends(&[WEB_11_12]),
        case(
            "node_hints",
            "forNodes hints on every endpoint (PreferSameNode): this node's endpoints, before zones",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice(
                    "web-7xk2p",
                    &[
                        ep("10.244.1.11", NODE, &format!("{READY}, hints: {{forNodes: [{{name: node-a}}], forZones: [{{name: z2}}]}}")),
                        ep("10.244.1.12", "node-b", &format!("{READY}, hints: {{forNodes: [{{name: node-b}}], forZones: [{{name: z1}}]}}")),
                    ],
                ),
            ],
        )
        .frontends(&[WEB_11]),
        case(
            "node_hints_not_for_us",
            "forNodes hints naming other nodes only: zone hints decide",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice(
                    "web-7xk2p",
                    &[
                        ep("10.244.1.11", "node-b", &format!("{READY}, hints: {{forNodes: [{{name: node-b}}], forZones: [{{name: z1}}]}}")),
                        ep("10.244.1.12", "node-c", &format!("{READY}, hints: {{forNodes: [{{name: node-c}}], forZones: [{{name: z2}}]}}")),
                    ],
                ),
            ],
        )
        .frontends(&[WEB_11]),
        case(
            "terminating_fallback_ignores_hints",
            "no ready endpoint: every serving-terminating endpoint, whatever its hints",
            &[
                node(NODE, "{topology.kubernetes.io/zone: z1}"),
                web(),
                web_slice(
                    "web-7xk2p",
                    &[
                        ep("10.244.1.11", "node-x", &format!("{TERMINATING}, hints: {{forZones: [{{name: z1}}]}}")),
                        ep("10.244.1.12", "node-x", &format!("{TERMINATING}, hints: {{forZones: [{{name: z2}}]}}")),
                    ],
                ),
            ],
        )
        .frontends(&[WEB_11_12]),
    ]
}

fn external_cases() -> Vec<Case> {
    let lb = |extra_spec: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]
  selector: {{app: lb}}
{extra_spec}status:
  loadBalancer:
    ingress:
    - {{ip: 198.51.100.7, ipMode: VIP}}
    - {{hostname: lb.example.com}}
    - {{ip: 198.51.100.8, ipMode: Proxy}}
    - {{ip: 198.51.100.9}}
"
        )
    };
    let lb_slice =
        |endpoints: &[String]| slice("lb-1", "lb", "[{name: http, port: 8080}]", endpoints);
    let both = [
        ep("10.244.1.11", NODE, READY),
        ep("10.244.2.11", "node-b", READY),
    ];
    vec![
        case(
            "external_ips",
            "externalIPs get EXTERNAL frontends with the cluster backends; duplicates once",
            &[
                web_with("  externalIPs: [203.0.113.10, 203.0.113.11, 203.0.113.10]\n"),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            WEB_11,
            "203.0.113.10:80/TCP default/web:http external -> 10.244.1.11:8080 ext",
            "203.0.113.11:80/TCP default/web:http external -> 10.244.1.11:8080 ext",
        ]),
        case(
            "node_port",
            "type NodePort: a frontend per node address on the nodePort",
            &[
                service(
                    "np",
                    "",
                    "{type: NodePort, clusterIP: 10.96.0.81, externalTrafficPolicy: Cluster, \
                     ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]}",
                ),
                slice("np-1", "np", "[{name: http, port: 8080}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.81:80/TCP default/np:http cluster -> 10.244.1.11:8080",
            "192.168.1.10:30081/TCP default/np:http nodeport -> 10.244.1.11:8080 ext",
            "192.168.1.11:30081/TCP default/np:http nodeport -> 10.244.1.11:8080 ext",
        ]),
        case(
            "node_port_ignored_on_cluster_ip_type",
            "a nodePort on a ClusterIP-type service opens nothing",
            &[service(
                "cip",
                "",
                "{type: ClusterIP, clusterIP: 10.96.0.82, ports: [{name: http, port: 80, nodePort: 30082}]}",
            )],
        )
        .frontends(&["10.96.0.82:80/TCP default/cip:http cluster -> -"]),
        case(
            "load_balancer",
            "LoadBalancer: VIP-mode ingress IPs (not Proxy, not hostnames), NodePorts, source ranges on LB only",
            &[lb("  loadBalancerSourceRanges: [203.0.113.0/24]\n"), lb_slice(&both)],
        )
        .frontends(&[
            "10.96.0.80:80/TCP default/lb:http cluster -> 10.244.1.11:8080,10.244.2.11:8080",
            "198.51.100.7:80/TCP default/lb:http lb -> 10.244.1.11:8080,10.244.2.11:8080 ext src-ranges",
            "198.51.100.9:80/TCP default/lb:http lb -> 10.244.1.11:8080,10.244.2.11:8080 ext src-ranges",
            "192.168.1.10:30080/TCP default/lb:http nodeport -> 10.244.1.11:8080,10.244.2.11:8080 ext",
            "192.168.1.11:30080/TCP default/lb:http nodeport -> 10.244.1.11:8080,10.244.2.11:8080 ext",
        ]),
        case(
            "external_traffic_policy_local",
            "externalTrafficPolicy Local: external frontends get local endpoints, plus an internal-scope twin",
            &[lb("  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000\n"), lb_slice(&both)],
        )
        .frontends(&[
            "10.96.0.80:80/TCP default/lb:http cluster -> 10.244.1.11:8080,10.244.2.11:8080",
            "198.51.100.7:80/TCP default/lb:http lb -> 10.244.1.11:8080 ext ext-local has-internal",
            "198.51.100.7:80/TCP/internal default/lb:http lb -> 10.244.1.11:8080,10.244.2.11:8080 ext",
            "198.51.100.9:80/TCP default/lb:http lb -> 10.244.1.11:8080 ext ext-local has-internal",
            "198.51.100.9:80/TCP/internal default/lb:http lb -> 10.244.1.11:8080,10.244.2.11:8080 ext",
            "192.168.1.10:30080/TCP default/lb:http nodeport -> 10.244.1.11:8080 ext ext-local has-internal",
            "192.168.1.10:30080/TCP/internal default/lb:http nodeport -> 10.244.1.11:8080,10.244.2.11:8080 ext",
            "192.168.1.11:30080/TCP default/lb:http nodeport -> 10.244.1.11:8080 ext ext-local has-internal",
            "192.168.1.11:30080/TCP/internal default/lb:http nodeport -> 10.244.1.11:8080,10.244.2.11:8080 ext",
        ])
        .health_checks(&["31000 default/lb local=1"]),
        case(
            "external_traffic_policy_local_none_here",
            "externalTrafficPolicy Local with endpoints elsewhere only: external frontends drop",
            &[
                lb("  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000\n"),
                lb_slice(&[ep("10.244.2.11", "node-b", READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.80:80/TCP default/lb:http cluster -> 10.244.2.11:8080",
            "198.51.100.7:80/TCP default/lb:http lb -> - drop ext ext-local has-internal",
            "198.51.100.7:80/TCP/internal default/lb:http lb -> 10.244.2.11:8080 ext",
            "198.51.100.9:80/TCP default/lb:http lb -> - drop ext ext-local has-internal",
            "198.51.100.9:80/TCP/internal default/lb:http lb -> 10.244.2.11:8080 ext",
            "192.168.1.10:30080/TCP default/lb:http nodeport -> - drop ext ext-local has-internal",
            "192.168.1.10:30080/TCP/internal default/lb:http nodeport -> 10.244.2.11:8080 ext",
            "192.168.1.11:30080/TCP default/lb:http nodeport -> - drop ext ext-local has-internal",
            "192.168.1.11:30080/TCP/internal default/lb:http nodeport -> 10.244.2.11:8080 ext",
        ])
        .health_checks(&["31000 default/lb local=0"]),
        case(
            "load_balancer_without_node_ports",
            "allocateLoadBalancerNodePorts false: ingress IPs only",
            &[
                lb("  allocateLoadBalancerNodePorts: false\n").replace(", nodePort: 30080", ""),
                lb_slice(&[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.80:80/TCP default/lb:http cluster -> 10.244.1.11:8080",
            "198.51.100.7:80/TCP default/lb:http lb -> 10.244.1.11:8080 ext",
            "198.51.100.9:80/TCP default/lb:http lb -> 10.244.1.11:8080 ext",
        ]),
        case(
            "bad_external_addresses",
            "a bad externalIP, an IPv6 externalIP and a bad nodePort are reported; the rest stays",
            &[
                service(
                    "np",
                    "",
                    "{type: NodePort, clusterIP: 10.96.0.83, externalIPs: [203.0.113.20, 203.0.113.999, '2001:db8::20'], \
                     ports: [{name: http, port: 80, nodePort: 70000}]}",
                ),
            ],
        )
        .frontends(&[
            "10.96.0.83:80/TCP default/np:http cluster -> -",
            "203.0.113.20:80/TCP default/np:http external -> - ext",
        ])
        .diagnostics(&[
            (Malformed, "Service default/np"),
            (UnsupportedIpFamily, "Service default/np"),
            (Malformed, "Service default/np"),
        ]),
    ]
}

/// A Service with a status (LoadBalancer ingress IPs), flow-style.
fn service_with_status(name: &str, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, uid: uid-{name}, resourceVersion: \"7\"}}
spec: {spec}
status: {status}
"
    )
}

fn ip_family_cases() -> Vec<Case> {
    vec![
        case(
            "ipv6_only",
            "ipFamilies [IPv6]: IPv6 ClusterIP and NodePorts (on the node's IPv6 addresses) from the IPv6 slice only",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service(
                    "six",
                    "",
                    "{clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ipFamilies: [IPv6], ipFamilyPolicy: SingleStack, \
                     type: NodePort, ports: [{name: http, port: 80, nodePort: 30090}]}",
                ),
                typed_slice("six-1", "six", "IPv6", "[{name: http, port: 8080}]", &[ep("fd00::1:11", NODE, READY)]),
                // An IPv4 slice of an IPv6-only service is not read (no IPv4 proxier sees it).
                slice("six-v4", "six", "[{name: http, port: 8080}]", &[ep("10.244.1.99", NODE, READY)]),
            ],
        )
        .frontends(&[
            WEB_11,
            "[fd00::10]:80/TCP default/six:http cluster -> [fd00::1:11]:8080",
            "[fd00:192:168:1::10]:30090/TCP default/six:http nodeport -> [fd00::1:11]:8080 ext",
        ]),
        case(
            "dual_stack",
            "dual-stack service: each family's clusterIP with its own family's slices, NodePorts on each family's addresses",
            &[
                service(
                    "dual",
                    "",
                    "{type: NodePort, clusterIP: 10.96.0.90, clusterIPs: [10.96.0.90, 'fd00::90'], ipFamilies: [IPv4, IPv6], \
                     ipFamilyPolicy: RequireDualStack, ports: [{name: http, port: 80, nodePort: 30091}]}",
                ),
                slice("dual-v4", "dual", "[{name: http, port: 8080}]", &[ep("10.244.1.11", NODE, READY)]),
                typed_slice("dual-v6", "dual", "IPv6", "[{name: http, port: 8080}]", &[
                    ep("fd00::1:11", NODE, READY),
                    ep("fd00::1:12", "node-b", READY),
                ]),
            ],
        )
        .frontends(&[
            "10.96.0.90:80/TCP default/dual:http cluster -> 10.244.1.11:8080",
            "192.168.1.10:30091/TCP default/dual:http nodeport -> 10.244.1.11:8080 ext",
            "192.168.1.11:30091/TCP default/dual:http nodeport -> 10.244.1.11:8080 ext",
            "[fd00::90]:80/TCP default/dual:http cluster -> [fd00::1:11]:8080,[fd00::1:12]:8080",
            "[fd00:192:168:1::10]:30091/TCP default/dual:http nodeport -> [fd00::1:11]:8080,[fd00::1:12]:8080 ext",
        ]),
        case(
            "ipv6_primary_family",
            "ipFamilies [IPv6, IPv4]: the order of clusterIPs follows ipFamilies; both families served",
            &[
                service(
                    "six4",
                    "",
                    "{clusterIP: 'fd00::91', clusterIPs: ['fd00::91', 10.96.0.91], ipFamilies: [IPv6, IPv4], \
                     ipFamilyPolicy: PreferDualStack, ports: [{name: http, port: 80}]}",
                ),
                typed_slice("six4-v6", "six4", "IPv6", "[{name: http, port: 8080}]", &[ep("fd00::1:11", NODE, READY)]),
                slice("six4-v4", "six4", "[{name: http, port: 8080}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.91:80/TCP default/six4:http cluster -> 10.244.1.11:8080",
            "[fd00::91]:80/TCP default/six4:http cluster -> [fd00::1:11]:8080",
        ]),
        case(
            "prefer_dual_stack_ipv4_endpoints_only",
            "PreferDualStack with IPv4 slices only: IPv4 serves them, the IPv6 frontend has none (rejects)",
            &[
                service(
                    "pref",
                    "",
                    "{clusterIP: 10.96.0.92, clusterIPs: [10.96.0.92, 'fd00::92'], ipFamilies: [IPv4, IPv6], \
                     ipFamilyPolicy: PreferDualStack, ports: [{name: http, port: 80}]}",
                ),
                slice("pref-v4", "pref", "[{name: http, port: 8080}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.92:80/TCP default/pref:http cluster -> 10.244.1.11:8080",
            "[fd00::92]:80/TCP default/pref:http cluster -> -",
        ]),
        case(
            "ipv6_external_and_load_balancer",
            "IPv6 externalIPs, LoadBalancer IPs and source ranges apply to the IPv6 frontends, IPv4 ones to IPv4's; \
             eTP Local gives each family its local endpoints and an internal twin",
            &[
                service_with_status(
                    "lb6",
                    "{type: LoadBalancer, clusterIP: 10.96.0.93, clusterIPs: [10.96.0.93, 'fd00::93'], \
                     ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, externalTrafficPolicy: Local, \
                     healthCheckNodePort: 32010, allocateLoadBalancerNodePorts: false, \
                     externalIPs: [203.0.113.93, '2001:db8::93'], \
                     loadBalancerSourceRanges: [198.51.100.0/24, '2001:db8:1::/48'], \
                     ports: [{name: http, port: 80}]}",
                    "{loadBalancer: {ingress: [{ip: 198.51.100.93}, {ip: '2001:db8:2::93'}]}}",
                ),
                slice("lb6-v4", "lb6", "[{name: http, port: 8080}]", &[
                    ep("10.244.1.11", NODE, READY),
                    ep("10.244.2.11", "node-b", READY),
                ]),
                typed_slice("lb6-v6", "lb6", "IPv6", "[{name: http, port: 8080}]", &[
                    ep("fd00::1:11", NODE, READY),
                    ep("fd00::2:11", "node-b", READY),
                ]),
            ],
        )
        .frontends(&[
            "10.96.0.93:80/TCP default/lb6:http cluster -> 10.244.1.11:8080,10.244.2.11:8080",
            "203.0.113.93:80/TCP default/lb6:http external -> 10.244.1.11:8080 ext ext-local has-internal",
            "203.0.113.93:80/TCP/internal default/lb6:http external -> 10.244.1.11:8080,10.244.2.11:8080 ext",
            "198.51.100.93:80/TCP default/lb6:http lb -> 10.244.1.11:8080 ext ext-local has-internal src-ranges",
            "198.51.100.93:80/TCP/internal default/lb6:http lb -> 10.244.1.11:8080,10.244.2.11:8080 ext",
            "[fd00::93]:80/TCP default/lb6:http cluster -> [fd00::1:11]:8080,[fd00::2:11]:8080",
            "[2001:db8::93]:80/TCP default/lb6:http external -> [fd00::1:11]:8080 ext ext-local has-internal",
            "[2001:db8::93]:80/TCP/internal default/lb6:http external -> [fd00::1:11]:8080,[fd00::2:11]:8080 ext",
            "[2001:db8:2::93]:80/TCP default/lb6:http lb -> [fd00::1:11]:8080 ext ext-local has-internal src-ranges",
            "[2001:db8:2::93]:80/TCP/internal default/lb6:http lb -> [fd00::1:11]:8080,[fd00::2:11]:8080 ext",
        ])
        .health_checks(&["32010 default/lb6 local=1"]),
        case(
            "cluster_ip_under_the_other_family",
            "a clusterIP listed under the other ipFamilies entry is reported and skipped; the valid one stays",
            &[
                service(
                    "mixed",
                    "",
                    "{clusterIP: 10.96.0.94, clusterIPs: [10.96.0.94, 10.96.0.95], ipFamilies: [IPv4, IPv6], \
                     ipFamilyPolicy: RequireDualStack, ports: [{name: http, port: 80}]}",
                ),
                slice("mixed-v4", "mixed", "[{name: http, port: 8080}]", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&["10.96.0.94:80/TCP default/mixed:http cluster -> 10.244.1.11:8080"])
        .diagnostics(&[(Malformed, "Service default/mixed")]),
        case(
            "v4_mapped_addresses",
            "IPv4-mapped IPv6 addresses (clusterIP, externalIP, source range, endpoint) are reported and skipped; \
             the rest of the service and other services stay",
            &[
                web(),
                web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
                service(
                    "mapped",
                    "",
                    "{clusterIP: '::ffff:10.96.0.96', clusterIPs: ['::ffff:10.96.0.96'], ipFamilies: [IPv6], \
                     ports: [{name: http, port: 80}]}",
                ),
                service(
                    "six",
                    "",
                    "{clusterIP: 'fd00::97', clusterIPs: ['fd00::97'], ipFamilies: [IPv6], \
                     externalIPs: ['::ffff:203.0.113.97'], type: LoadBalancer, allocateLoadBalancerNodePorts: false, \
                     loadBalancerSourceRanges: ['::ffff:198.51.100.0/120'], ports: [{name: http, port: 80}]}",
                ),
                typed_slice("six-1", "six", "IPv6", "[{name: http, port: 8080}]", &[
                    ep("fd00::1:11", NODE, READY),
                    ep("::ffff:10.244.1.12", NODE, READY),
                    ep("10.244.1.13", NODE, READY),
                ]),
            ],
        )
        .frontends(&[WEB_11, "[fd00::97]:80/TCP default/six:http cluster -> [fd00::1:11]:8080"])
        .diagnostics(&[
            (Malformed, "Service default/mapped"),
            (Malformed, "Service default/six"),
            (Malformed, "Service default/six"),
            // The mapped and the IPv4 address in an IPv6 slice.
            (Malformed, "EndpointSlice default/six-1"),
            (Malformed, "EndpointSlice default/six-1"),
        ]),
        case(
            "other_family_addresses_of_single_stack",
            "an IPv6 externalIP of an IPv4-only service is reported; an IPv6 ingress IP and range are not served, silently",
            &[
                service_with_status(
                    "four",
                    "{type: LoadBalancer, clusterIP: 10.96.0.98, clusterIPs: [10.96.0.98], ipFamilies: [IPv4], \
                     allocateLoadBalancerNodePorts: false, externalIPs: ['2001:db8::98'], \
                     loadBalancerSourceRanges: ['2001:db8:1::/48'], ports: [{name: http, port: 80}]}",
                    "{loadBalancer: {ingress: [{ip: 198.51.100.98}, {ip: '2001:db8:2::98'}]}}",
                ),
            ],
        )
        .frontends(&[
            "10.96.0.98:80/TCP default/four:http cluster -> -",
            "198.51.100.98:80/TCP default/four:http lb -> - ext",
        ])
        .diagnostics(&[(UnsupportedIpFamily, "Service default/four")]),
    ]
}

/// A Service waiting for its load balancer, as the API stores it before the cloud
/// controller writes an ingress IP (and without NodePorts), so its only frontends are
/// ClusterIP ones; `spec` lines (type, policies, ports) are indented by two spaces.
fn pending_lb(name: &str, cluster_ip: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, uid: uid-{name}, resourceVersion: \"9\"}}
spec:
  clusterIP: {cluster_ip}
  clusterIPs: [{cluster_ip}]
  allocateLoadBalancerNodePorts: false
  selector: {{app: {name}}}
{spec}status:
  loadBalancer: {{}}
"
    )
}

const LB_LOCAL: &str = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n";
const HTTP_PORT: &str = "  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n";

fn health_check_cases() -> Vec<Case> {
    let lb_local = |name: &str, cluster_ip: &str, health_check_port: &str| {
        pending_lb(
            name,
            cluster_ip,
            &format!("{LB_LOCAL}  healthCheckNodePort: {health_check_port}\n{HTTP_PORT}"),
        )
    };
    let http_slice = |name: &str, service: &str, endpoints: &[String]| {
        slice(
            name,
            service,
            "[{name: http, port: 8080, protocol: TCP}]",
            endpoints,
        )
    };
    vec![
        case(
            "health_check_counts_local_ready",
            "LoadBalancer + Local: the health check counts this node's ready endpoints (unset conditions count as ready)",
            &[
                lb_local("lb", "10.96.0.70", "32000"),
                http_slice("lb-1", "lb", &[
                    ep("10.244.1.11", NODE, READY),
                    ep("10.244.1.12", NODE, UNSET),
                    ep("10.244.1.13", NODE, NOT_READY),
                    ep("10.244.2.11", "node-b", READY),
                ]),
            ],
        )
        .frontends(&["10.96.0.70:80/TCP default/lb:http cluster -> 10.244.1.11:8080,10.244.1.12:8080,10.244.2.11:8080"])
        .health_checks(&["32000 default/lb local=2"]),
        case(
            "health_check_counts_pods_not_ports",
            "an endpoint is counted once by IP across ports and slices (kube-proxy squashes 10.0.0.1:80 and :443)",
            &[
                pending_lb(
                    "lb",
                    "10.96.0.70",
                    &format!(
                        "{LB_LOCAL}  healthCheckNodePort: 32000\n  ports:\n  \
                         - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n  \
                         - {{name: metrics, port: 9090, targetPort: 9090, protocol: TCP}}\n"
                    ),
                ),
                slice("lb-1", "lb", "[{name: http, port: 8080, protocol: TCP}, {name: metrics, port: 9090, protocol: TCP}]", &[
                    ep("10.244.1.11", NODE, READY),
                    ep("10.244.1.12", NODE, READY),
                ]),
                http_slice("lb-2", "lb", &[ep("10.244.1.12", NODE, READY), ep("10.244.1.14", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.70:80/TCP default/lb:http cluster -> 10.244.1.11:8080,10.244.1.12:8080,10.244.1.14:8080",
            "10.96.0.70:9090/TCP default/lb:metrics cluster -> 10.244.1.11:9090,10.244.1.12:9090",
        ])
        .health_checks(&["32000 default/lb local=3"]),
        case(
            "health_check_terminating_does_not_count",
            "only terminating endpoints here: traffic falls back to them, the health check says 0 so load balancers drain the node",
            &[
                lb_local("lb", "10.96.0.70", "32000"),
                http_slice("lb-1", "lb", &[
                    ep("10.244.1.11", NODE, TERMINATING),
                    ep("10.244.1.12", NODE, TERMINATING_NOT_SERVING),
                ]),
            ],
        )
        .frontends(&["10.96.0.70:80/TCP default/lb:http cluster -> 10.244.1.11:8080"])
        .health_checks(&["32000 default/lb local=0"]),
        case(
            "health_check_no_endpoints_here",
            "ready endpoints on other nodes only, and a service without slices: both checks say 0",
            &[
                lb_local("lb", "10.96.0.70", "32000"),
                http_slice("lb-1", "lb", &[ep("10.244.2.11", "node-b", READY)]),
                lb_local("empty", "10.96.0.71", "32001"),
            ],
        )
        .frontends(&[
            "10.96.0.70:80/TCP default/lb:http cluster -> 10.244.2.11:8080",
            "10.96.0.71:80/TCP default/empty:http cluster -> -",
        ])
        .health_checks(&["32000 default/lb local=0", "32001 default/empty local=0"]),
        case(
            "health_check_only_for_load_balancer_local",
            "kube-proxy's NeedsHealthCheck: a Local NodePort service or a Cluster LoadBalancer gets none, even with a port set",
            &[
                service(
                    "np",
                    "",
                    "{type: NodePort, clusterIP: 10.96.0.72, externalTrafficPolicy: Local, healthCheckNodePort: 32002, \
                     ports: [{name: http, port: 80}]}",
                ),
                pending_lb(
                    "lbc",
                    "10.96.0.73",
                    &format!("  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n  healthCheckNodePort: 32003\n{HTTP_PORT}"),
                ),
                http_slice("lbc-1", "lbc", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.72:80/TCP default/np:http cluster -> -",
            "10.96.0.73:80/TCP default/lbc:http cluster -> 10.244.1.11:8080",
        ]),
        case(
            "health_check_port_missing_or_out_of_range",
            "Local without healthCheckNodePort, or with 0, 70000 or -5: reported, the frontends stay",
            &[
                pending_lb("lb-a", "10.96.0.74", &format!("{LB_LOCAL}{HTTP_PORT}")),
                lb_local("lb-b", "10.96.0.75", "0"),
                lb_local("lb-c", "10.96.0.76", "70000"),
                lb_local("lb-d", "10.96.0.77", "-5"),
                http_slice("lb-c-1", "lb-c", &[ep("10.244.1.11", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.74:80/TCP default/lb-a:http cluster -> -",
            "10.96.0.75:80/TCP default/lb-b:http cluster -> -",
            "10.96.0.76:80/TCP default/lb-c:http cluster -> 10.244.1.11:8080",
            "10.96.0.77:80/TCP default/lb-d:http cluster -> -",
        ])
        .diagnostics(&[
            (Malformed, "Service default/lb-a"),
            (Malformed, "Service default/lb-b"),
            (Malformed, "Service default/lb-c"),
            (Malformed, "Service default/lb-d"),
        ]),
        case(
            "health_check_port_conflict",
            "two services claim one healthCheckNodePort: the first by key keeps it, the second is reported",
            &[
                lb_local("lb-b", "10.96.0.79", "32000"),
                lb_local("lb-a", "10.96.0.78", "32000"),
                http_slice("lb-a-1", "lb-a", &[ep("10.244.1.11", NODE, READY)]),
                http_slice("lb-b-1", "lb-b", &[ep("10.244.1.12", NODE, READY)]),
            ],
        )
        .frontends(&[
            "10.96.0.78:80/TCP default/lb-a:http cluster -> 10.244.1.11:8080",
            "10.96.0.79:80/TCP default/lb-b:http cluster -> 10.244.1.12:8080",
        ])
        .health_checks(&["32000 default/lb-a local=1"])
        .diagnostics(&[(FrontendConflict, "Service default/lb-b")]),
        case(
            "health_check_not_ours",
            "a service for another proxy gets no health check",
            &[
                service(
                    "theirs",
                    "{service.kubernetes.io/service-proxy-name: other}",
                    "{type: LoadBalancer, clusterIP: 10.96.0.80, externalTrafficPolicy: Local, healthCheckNodePort: 32004, \
                     allocateLoadBalancerNodePorts: false, ports: [{name: http, port: 80}]}",
                ),
                http_slice("theirs-1", "theirs", &[ep("10.244.1.11", NODE, READY)]),
            ],
        ),
        case(
            "health_check_ip_families",
            "IPv6-only: the check counts IPv6 endpoints; dual-stack: the IPv4 ones (the first family's)",
            &[
                pending_lb(
                    "six",
                    "'fd00::81'",
                    &format!("  ipFamilies: [IPv6]\n{LB_LOCAL}  healthCheckNodePort: 32005\n{HTTP_PORT}"),
                ),
                typed_slice("six-1", "six", "IPv6", "[{name: http, port: 8080}]", &[ep("fd00::1:11", NODE, READY)]),
                service(
                    "dual",
                    "",
                    "{type: LoadBalancer, clusterIP: 10.96.0.82, clusterIPs: [10.96.0.82, 'fd00::82'], \
                     ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, externalTrafficPolicy: Local, \
                     healthCheckNodePort: 32006, allocateLoadBalancerNodePorts: false, ports: [{name: http, port: 80}]}",
                ),
                slice("dual-v4", "dual", "[{name: http, port: 8080}]", &[ep("10.244.1.11", NODE, READY)]),
                typed_slice("dual-v6", "dual", "IPv6", "[{name: http, port: 8080}]", &[
                    ep("fd00::1:11", NODE, READY),
                    ep("fd00::1:12", NODE, READY),
                ]),
            ],
        )
        .frontends(&[
            "10.96.0.82:80/TCP default/dual:http cluster -> 10.244.1.11:8080",
            "[fd00::81]:80/TCP default/six:http cluster -> [fd00::1:11]:8080",
            "[fd00::82]:80/TCP default/dual:http cluster -> [fd00::1:11]:8080,[fd00::1:12]:8080",
        ])
        .health_checks(&["32005 default/six local=1", "32006 default/dual local=1"]),
    ]
}

fn all_cases() -> Vec<Case> {
    let mut cases = endpoint_cases();
    cases.extend(selection_cases());
    cases.extend(conflict_cases());
    cases.extend(malformed_cases());
    cases.extend(policy_cases());
    cases.extend(topology_cases());
    cases.extend(external_cases());
    cases.extend(ip_family_cases());
    cases.extend(health_check_cases());
    cases
}

/// Runs every case and reports all mismatches at once.
#[test]
fn model_table() {
    let mut failures = Vec::new();
    let mut names = BTreeSet::new();
    let cases = all_cases();
    for case in &cases {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        let (desired, diagnostics) = run(&case.yaml, &settings(case.proxy_name));
        // Both families' frontends, each rendered as its address reads.
        let got: BTreeSet<String> = desired
            .v4
            .frontends
            .iter()
            .map(|(key, spec)| render(key, spec))
            .chain(
                desired
                    .v6
                    .frontends
                    .iter()
                    .map(|(key, spec)| render(key, spec)),
            )
            .collect();
        let want: BTreeSet<String> = case.frontends.iter().map(|s| (*s).to_owned()).collect();
        if got != want {
            failures.push(format!(
                "{} ({}): frontends\n  missing    {:#?}\n  unexpected {:#?}",
                case.name,
                case.description,
                want.difference(&got).collect::<Vec<_>>(),
                got.difference(&want).collect::<Vec<_>>(),
            ));
        }
        let got: BTreeSet<String> = desired
            .health_checks
            .iter()
            .map(|(port, health)| render_health_check(*port, health))
            .collect();
        let want: BTreeSet<String> = case.health_checks.iter().map(|s| (*s).to_owned()).collect();
        if got != want {
            failures.push(format!(
                "{} ({}): health checks\n  want {want:?}\n  got  {got:?}",
                case.name, case.description
            ));
        }
        let mut got: Vec<(DiagnosticReason, &str)> = diagnostics
            .iter()
            .map(|d| (d.reason, d.object.as_str()))
            .collect();
        got.sort_unstable();
        let mut want = case.diagnostics.clone();
        want.sort_unstable();
        if got != want {
            failures.push(format!(
                "{} ({}): diagnostics\n  want {want:?}\n  got  {diagnostics:#?}",
                case.name, case.description
            ));
        }
        if let Some(empty) = diagnostics.iter().find(|d| d.message.is_empty()) {
            failures.push(format!(
                "{}: diagnostic without message {empty:?}",
                case.name
            ));
        }
        // The model is a function: the same input gives the same output.
        if run(&case.yaml, &settings(case.proxy_name)).0 != desired {
            failures.push(format!("{}: not deterministic", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// All the malformed rows in one cluster at once: however many objects are broken,
/// `web` keeps exactly its frontend.
#[test]
fn malformed_objects_do_not_disturb_others() {
    let mut parts = vec![
        web(),
        web_slice("web-7xk2p", &[ep("10.244.1.11", NODE, READY)]),
    ];
    for case in malformed_cases() {
        // Drop syntax errors (they end the stream) and the cases' own web objects.
        if case.name == "yaml_syntax_error" {
            continue;
        }
        parts.extend(
            case.yaml
                .split("---\n")
                .filter(|doc| !doc.contains("name: web\n") && !doc.contains("name: web-7xk2p\n"))
                .map(str::to_owned),
        );
    }
    let (desired, diagnostics) = run(&docs(&parts), &settings(None));
    assert!(!diagnostics.is_empty());
    let web = desired
        .v4
        .frontends
        .iter()
        .find(|(_, spec)| spec.service_port.service.name.as_ref() == "web")
        .map(|(key, spec)| render(key, spec));
    assert_eq!(web.as_deref(), Some(WEB_11), "{diagnostics:#?}");
}

#[test]
fn default_settings_open_no_node_ports() {
    let yaml = service(
        "np",
        "",
        "{type: NodePort, clusterIP: 10.96.0.81, ports: [{name: http, port: 80, nodePort: 30081}]}",
    );
    let (desired, diagnostics) = run(&yaml, &ModelSettings::default());
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    let kinds: Vec<FrontendKind> = desired
        .v4
        .frontends
        .values()
        .map(|spec| spec.kind)
        .collect();
    assert_eq!(kinds, [FrontendKind::ClusterIp]);
}

#[test]
fn empty_state_gives_nothing() {
    let desired = desired(&ClusterState::default(), &ModelSettings::default());
    assert_eq!(desired, Desired::default());
}

/// Reproduces a divergence from kube-proxy, see the helper's report: the API (and
/// kube-proxy's `endpointslicecache.go`) read an unset `serving` as true, so a
/// not-ready terminating endpoint without `serving` is a fallback endpoint.
#[test]
fn serving_unset_counts_as_serving() {
    let yaml = docs(&[
        web(),
        web_slice(
            "web-7xk2p",
            &[ep(
                "10.244.1.11",
                NODE,
                "conditions: {ready: false, terminating: true}",
            )],
        ),
    ]);
    let (desired, _) = run(&yaml, &settings(None));
    let lines: Vec<String> = desired
        .v4
        .frontends
        .iter()
        .map(|(k, s)| render(k, s))
        .collect();
    assert_eq!(lines, [WEB_11]);
}

/// Reproduces a divergence from kube-proxy, see the helper's report: when one address
/// is in two slices (pod IP reused, or an endpoint moving between slices), kube-proxy
/// prefers the non-terminating entry; the model keeps the first slice's by name.
#[test]
fn duplicate_endpoint_prefers_the_non_terminating_one() {
    let yaml = docs(&[
        web(),
        web_slice(
            "web-a",
            &[
                ep("10.244.1.11", NODE, TERMINATING),
                ep("10.244.1.12", NODE, READY),
            ],
        ),
        web_slice("web-b", &[ep("10.244.1.11", NODE, READY)]),
    ]);
    let (desired, _) = run(&yaml, &settings(None));
    let lines: Vec<String> = desired
        .v4
        .frontends
        .iter()
        .map(|(k, s)| render(k, s))
        .collect();
    assert_eq!(lines, [WEB_11_12]);
}

// ---------------------------------------------------------------------------------
// `categorize` (model/endpoints.rs) on hand-made endpoints.

/// Endpoint shorthand: `10.244.<node>.<n>:8080`; node 1 is local.
#[derive(Clone, Copy)]
struct Ep {
    node: u8,
    n: u8,
    /// ready, serving, terminating.
    state: (bool, bool, bool),
    zones: &'static [&'static str],
    nodes: &'static [&'static str],
}

const R: (bool, bool, bool) = (true, true, false);
const T: (bool, bool, bool) = (false, true, true);
const N: (bool, bool, bool) = (false, false, false);

const fn e(node: u8, n: u8, state: (bool, bool, bool)) -> Ep {
    Ep {
        node,
        n,
        state,
        zones: &[],
        nodes: &[],
    }
}

const fn z(node: u8, n: u8, zones: &'static [&'static str]) -> Ep {
    Ep {
        node,
        n,
        state: R,
        zones,
        nodes: &[],
    }
}

impl Ep {
    fn addr(self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, self.node, self.n), 8080)
    }

    fn endpoint(self) -> Endpoint {
        let set = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        Endpoint {
            addr: self.addr(),
            ready: self.state.0,
            serving: self.state.1,
            terminating: self.state.2,
            is_local: self.node == 1,
            zone_hints: set(self.zones),
            node_hints: set(self.nodes),
        }
    }
}

const CLUSTER: Policies = Policies {
    internal_local: false,
    external_local: false,
    has_external: false,
};
const INTERNAL_LOCAL: Policies = Policies {
    internal_local: true,
    external_local: false,
    has_external: false,
};
const EXTERNAL_LOCAL: Policies = Policies {
    internal_local: false,
    external_local: true,
    has_external: true,
};
const INTERNAL_LOCAL_EXTERNAL_CLUSTER: Policies = Policies {
    internal_local: true,
    external_local: false,
    has_external: true,
};

struct CategorizeCase {
    name: &'static str,
    description: &'static str,
    endpoints: Vec<Ep>,
    policies: Policies,
    zone: &'static str,
    cluster: &'static [(u8, u8)],
    local: &'static [(u8, u8)],
    has_any: bool,
}

fn categorize_cases() -> Vec<CategorizeCase> {
    const NODE_HINTED: &[Ep] = &[
        Ep {
            nodes: &["node-a"],
            ..z(1, 1, &["z2"])
        },
        Ep {
            nodes: &["node-b"],
            ..z(2, 1, &["z1"])
        },
    ];
    vec![
        CategorizeCase {
            name: "empty",
            description: "no endpoints: nothing, and nothing anywhere (reject)",
            endpoints: vec![],
            policies: EXTERNAL_LOCAL,
            zone: "z1",
            cluster: &[],
            local: &[],
            has_any: false,
        },
        CategorizeCase {
            name: "cluster_ready",
            description: "Cluster policy: ready endpoints on any node; no local set computed",
            endpoints: vec![e(1, 1, R), e(2, 1, R), e(2, 2, T), e(2, 3, N)],
            policies: CLUSTER,
            zone: "",
            cluster: &[(1, 1), (2, 1)],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "cluster_terminating_fallback",
            description: "Cluster policy, none ready: serving-terminating endpoints",
            endpoints: vec![e(1, 1, N), e(2, 1, T), e(2, 2, (false, false, true))],
            policies: CLUSTER,
            zone: "",
            cluster: &[(2, 1)],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "cluster_none_usable",
            description: "Cluster policy, nothing ready or serving-terminating: reject",
            endpoints: vec![e(1, 1, N), e(2, 1, (false, true, false))],
            policies: CLUSTER,
            zone: "",
            cluster: &[],
            local: &[],
            has_any: false,
        },
        CategorizeCase {
            name: "internal_local",
            description: "internal Local: local ready endpoints; no cluster set computed",
            endpoints: vec![e(1, 1, R), e(1, 2, T), e(2, 1, R)],
            policies: INTERNAL_LOCAL,
            zone: "",
            cluster: &[],
            local: &[(1, 1)],
            has_any: true,
        },
        CategorizeCase {
            name: "internal_local_terminating_fallback",
            description: "internal Local, no local ready: local serving-terminating ones",
            endpoints: vec![e(1, 1, N), e(1, 2, T), e(2, 1, R)],
            policies: INTERNAL_LOCAL,
            zone: "",
            cluster: &[],
            local: &[(1, 2)],
            has_any: true,
        },
        CategorizeCase {
            name: "internal_local_none_here",
            description: "internal Local, endpoints elsewhere only: empty but has_any (drop)",
            endpoints: vec![e(2, 1, R), e(1, 1, N)],
            policies: INTERNAL_LOCAL,
            zone: "",
            cluster: &[],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "internal_local_terminating_elsewhere",
            description:
                "internal Local, only a remote serving-terminating endpoint: has_any (drop)",
            endpoints: vec![e(2, 1, T)],
            policies: INTERNAL_LOCAL,
            zone: "",
            cluster: &[],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "external_local",
            description: "external Local: cluster set for internal traffic, local set for external",
            endpoints: vec![e(1, 1, R), e(2, 1, R)],
            policies: EXTERNAL_LOCAL,
            zone: "",
            cluster: &[(1, 1), (2, 1)],
            local: &[(1, 1)],
            has_any: true,
        },
        CategorizeCase {
            name: "internal_local_external_cluster",
            description: "internal Local with external Cluster: both sets",
            endpoints: vec![e(1, 1, R), e(2, 1, R)],
            policies: INTERNAL_LOCAL_EXTERNAL_CLUSTER,
            zone: "",
            cluster: &[(1, 1), (2, 1)],
            local: &[(1, 1)],
            has_any: true,
        },
        CategorizeCase {
            name: "zone_hints",
            description: "every ready endpoint zone-hinted, one for our zone: hinted ones only",
            endpoints: vec![
                z(1, 1, &["z2"]),
                z(2, 1, &["z1"]),
                z(2, 2, &["z1", "z2"]),
                e(3, 1, N),
            ],
            policies: CLUSTER,
            zone: "z1",
            cluster: &[(2, 1), (2, 2)],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "zone_hints_no_zone",
            description: "zone hints but this node has no zone: all ready endpoints",
            endpoints: vec![z(1, 1, &["z2"]), z(2, 1, &["z1"])],
            policies: CLUSTER,
            zone: "",
            cluster: &[(1, 1), (2, 1)],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "zone_hints_partial",
            description: "one ready endpoint without zone hints: all ready endpoints",
            endpoints: vec![z(1, 1, &["z2"]), z(2, 1, &["z1"]), e(2, 2, R)],
            policies: CLUSTER,
            zone: "z1",
            cluster: &[(1, 1), (2, 1), (2, 2)],
            local: &[],
            has_any: true,
        },
        CategorizeCase {
            name: "zone_hints_do_not_touch_local",
            description: "external Local: zone hints shape the cluster set, never the local one",
            endpoints: vec![z(1, 1, &["z2"]), z(2, 1, &["z1"])],
            policies: EXTERNAL_LOCAL,
            zone: "z1",
            cluster: &[(2, 1)],
            local: &[(1, 1)],
            has_any: true,
        },
        CategorizeCase {
            name: "node_hints",
            description: "every ready endpoint node-hinted, one for us: same node beats same zone",
            endpoints: NODE_HINTED.to_vec(),
            policies: CLUSTER,
            zone: "z1",
            cluster: &[(1, 1)],
            local: &[],
            has_any: true,
        },
    ]
}

#[test]
fn categorize_table() {
    let mut failures = Vec::new();
    for case in categorize_cases() {
        let endpoints: Vec<Endpoint> = case.endpoints.iter().map(|ep| ep.endpoint()).collect();
        let got = categorize(&endpoints, case.policies, NODE, case.zone);
        let addrs = |pairs: &[(u8, u8)]| -> Vec<SocketAddrV4> {
            pairs
                .iter()
                .map(|&(node, n)| e(node, n, R).addr())
                .collect()
        };
        let want = Categorized {
            cluster: addrs(case.cluster),
            local: addrs(case.local),
            has_any: case.has_any,
        };
        if got != want {
            failures.push(format!(
                "{} ({}):\n  want {want:?}\n  got  {got:?}",
                case.name, case.description
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// More endpoints than a frontend holds.

/// `count` endpoint addresses 10.<a>.<b>.<c>.
fn endpoint_addresses(count: usize) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|i| Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).expect("small") + 1))
        .collect()
}

/// The `web` Service with ready endpoints at `addresses` (port 8080) in slices of
/// 1000, the API's most per slice; objects built directly (and converted as the
/// sources do), 66 000 endpoints as YAML would only test the parser's speed.
fn web_with_endpoints(addresses: &[Ipv4Addr]) -> ClusterState {
    use k8s_openapi::{
        api::discovery::v1::{
            Endpoint as ApiEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    let mut snapshot = Snapshot::for_node(Some(NODE));
    parse_documents(&web(), "test.yaml", &mut snapshot);
    for (index, chunk) in addresses.chunks(1000).enumerate() {
        snapshot.add_endpoint_slice(&EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("web-{index:03}")),
                namespace: Some("default".into()),
                labels: Some([(LABEL_SERVICE_NAME.to_owned(), "web".to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: chunk
                .iter()
                .map(|ip| ApiEndpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..EndpointConditions::default()
                    }),
                    ..ApiEndpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        });
    }
    snapshot.state
}

#[test]
fn a_service_port_with_more_endpoints_than_a_frontend_holds_serves_as_many_as_fit() {
    let extra = 100;
    let mut addresses = endpoint_addresses(MAX_BACKENDS_PER_FRONTEND + extra);
    let state = web_with_endpoints(&addresses);
    let settings = settings(None);
    let first = desired(&state, &settings);
    let [(_, spec)] = first.v4.frontends.iter().collect::<Vec<_>>()[..] else {
        panic!("one frontend: {:?}", first.v4.frontends.keys());
    };
    assert_eq!(spec.backends.len(), MAX_BACKENDS_PER_FRONTEND);
    assert!(spec.backends.is_sorted(), "backends stay sorted");
    let reasons: Vec<(DiagnosticReason, &str, &str)> = first
        .diagnostics
        .iter()
        .map(|d| (d.reason, d.object.as_str(), d.message.as_str()))
        .collect();
    assert!(
        matches!(reasons[..], [(EndpointLimit, "Service default/web", message)] if message.contains("65535")),
        "{reasons:?}"
    );
    // Stable: the same choice again, and a chosen endpoint leaving lets exactly one of
    // the others in.
    assert_eq!(desired(&state, &settings), first);
    let leaving = spec.backends[7];
    addresses.retain(|address| address != leaving.ip());
    let second = desired(&web_with_endpoints(&addresses), &settings);
    let after: BTreeSet<SocketAddrV4> = second
        .v4
        .frontends
        .values()
        .flat_map(|spec| spec.backends.iter().copied())
        .collect();
    let before: BTreeSet<SocketAddrV4> = spec.backends.iter().copied().collect();
    assert_eq!(after.len(), MAX_BACKENDS_PER_FRONTEND);
    assert_eq!(
        before.difference(&after).copied().collect::<Vec<_>>(),
        [leaving]
    );
    assert_eq!(after.difference(&before).count(), 1);
}

#[test]
fn choose_backends_is_a_stable_subset_that_differs_between_services() {
    let backends: Vec<SocketAddrV4> = (1..=20)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i), 8080))
        .collect();
    let name = |service: &str| ServicePortName {
        service: ObjectKey::new("default", service),
        port: "http".into(),
        proto: proxy_common::proto::TCP,
    };
    let web = choose_backends::<Ipv4Addr>(&name("web"), &backends, 5);
    assert_eq!(web.len(), 5);
    assert!(web.is_sorted() && web.iter().all(|b| backends.contains(b)));
    assert_eq!(
        choose_backends::<Ipv4Addr>(&name("web"), &backends, 5),
        web,
        "stable"
    );
    assert_ne!(
        choose_backends::<Ipv4Addr>(&name("api"), &backends, 5),
        web,
        "every service chooses its own"
    );
    assert_eq!(
        choose_backends::<Ipv4Addr>(&name("web"), &backends[..4], 5),
        backends[..4],
        "within the limit: all"
    );
}
