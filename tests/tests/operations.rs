//! Operating the agent in the lab: health and metrics endpoints, restarts and upgrades
//! without dropping traffic, and a clean node after `kpr cleanup`.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use kpr_lab::{
    lab::{sample, Lab},
    scenario::{examples_dir, lab_for_manifests, sock, NewConnections},
    traffic::{tcp_request, Conversation},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn health_and_metrics_endpoints_report_the_datapath() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let (code, body) = lab.healthz().expect("healthz");
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("healthz is JSON");
    assert!(
        health["lastUpdated"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{body}"
    );

    lab.pod("client")
        .netns
        .run(|| {
            (0..20)
                .map(|_| tcp_request(sock(WEB_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("traffic");
    let mut metrics = String::new();
    lab.wait_for(
        "the new flows to show in the metrics",
        Duration::from_secs(10),
        || {
            metrics = lab.metrics()?;
            Ok(
                sample(&metrics, "kpr_datapath_events_total{event=\"new_flow\"}")
                    .is_some_and(|n| n >= 20.0),
            )
        },
    )
    .expect("datapath counters exported");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_count",
        "kpr_skipped_objects",
        "kpr_frontend_failures",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    // web (3 backends) + dns (3) + nobody (0): 3 frontends + 6 backend slots.
    assert_eq!(
        sample(&metrics, "kpr_map_entries{map=\"SVC_V4_V1\"}"),
        Some(9.0),
        "{metrics}"
    );
    let attached = metrics
        .lines()
        .filter(|line| line.starts_with("kpr_programs_attached{"))
        .count();
    assert_eq!(attached, 2 * lab.pods().len(), "{metrics}");
    assert!(
        sample(
            &metrics,
            "kpr_datapath_events_total{event=\"rejected_no_backend\"}"
        )
        .is_some(),
        "{metrics}"
    );

    // A malformed Service is skipped with a metric; the others keep working.
    lab.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: demo}\n\
         spec:\n  clusterIP: 10.96.0.300\n  ports: [{name: http, port: 80, protocol: TCP}]\n",
    )
    .expect("write");
    lab.wait_for(
        "the malformed service to be counted",
        Duration::from_secs(10),
        || Ok(sample(&lab.metrics()?, "kpr_skipped_objects{reason=\"malformed\"}") == Some(1.0)),
    )
    .expect("skipped_objects metric");
    lab.pod("client")
        .netns
        .run(|| tcp_request(sock(WEB_VIP, 80), TIMEOUT))
        .expect("web still answers");
    assert!(lab.agent_log().contains("broken"), "the skip is logged");
}

#[test]
fn established_and_new_connections_survive_a_crash_restart_and_an_upgrade() {
    let mut lab = lab_for_manifests(&examples_dir()).expect("lab");
    let mut conversations: Vec<(Conversation, String)> = lab
        .pod("client")
        .netns
        .run(|| {
            (0..200)
                .map(|_| {
                    let mut conversation = Conversation::open(sock(WEB_VIP, 80), TIMEOUT)?;
                    let server = conversation.ask()?.server;
                    Ok((conversation, server))
                })
                .collect()
        })
        .expect("200 long-lived connections");
    let new_connections = NewConnections::start(&lab.pod("client").netns, sock(WEB_VIP, 80));

    // A crash: SIGKILL leaves programs attached and maps pinned; the next agent adopts
    // them. Meanwhile, with no agent at all, new connections are still answered.
    new_connections.wait_answered(&lab, 20, "before the crash");
    lab.kill_agent().expect("kill");
    new_connections.wait_answered(&lab, 20, "with no agent running");
    let restart = Instant::now();
    lab.start_agent(&["--keep-state"])
        .expect("restart after SIGKILL");
    let crash_restart = restart.elapsed();

    // An upgrade: SIGTERM with --keep-state, then a new agent swaps the programs in place.
    // The old agent is one from before the via-stack interface set existed (its pin is
    // removed): the new agent creates the set and must mark every interface, or the
    // adopted flows' replies would leave the client's interface untranslated.
    new_connections.wait_answered(&lab, 20, "after the restart");
    let upgrade = Instant::now();
    lab.stop_agent().expect("stop with --keep-state");
    std::fs::remove_file(lab.pin_dir().join(proxy_common::names::VIA_STACK_IFACES))
        .expect("remove the via-stack interface set's pin");
    lab.start_agent(&[]).expect("start the new agent");
    let upgrade_restart = upgrade.elapsed();
    new_connections.wait_answered(&lab, 20, "after the upgrade");

    let (ok, failed, longest_gap) = new_connections.finish();
    let mut broken = 0;
    for (conversation, server) in &mut conversations {
        match conversation.ask() {
            Ok(answer) if answer.server == *server => {}
            _ => broken += 1,
        }
    }
    eprintln!(
        "restart figures: {} established connections kept of 200; new connections {ok} ok, \
         {failed} failed; longest gap between new connections {longest_gap:?}; \
         crash restart took {crash_restart:?}, upgrade took {upgrade_restart:?}",
        200 - broken
    );
    assert_eq!(
        broken, 0,
        "established connections broke across the restarts"
    );
    assert_eq!(failed, 0, "new connections failed during the restarts");
    assert!(ok > 0);
    assert!(
        lab.agent_log()
            .contains("adopting the maps of a previous agent"),
        "{}",
        lab.agent_log()
    );
    assert!(
        lab.agent_log()
            .contains("without the via-stack interface set"),
        "{}",
        lab.agent_log()
    );
}

#[test]
fn cleanup_removes_every_program_and_pin() {
    let mut lab = lab_for_manifests(&examples_dir()).expect("lab");
    lab.kill_agent().expect("kill");
    assert!(
        !lab.attached_programs().expect("query").is_empty(),
        "a killed agent leaves its programs"
    );
    let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
        .arg("cleanup")
        .arg("--bpffs")
        .arg(lab.pin_dir())
        .output()
        .expect("kpr cleanup");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    lab.wait_detached_and_unpinned()
        .expect("nothing left attached or pinned");
}

/// Runs `kpr <args> --bpffs <pins> --json` and parses its output.
fn kpr_json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
        .args(args)
        .arg("--bpffs")
        .arg(lab.pin_dir())
        .arg("--json")
        .output()
        .expect("run kpr");
    assert!(
        output.status.success(),
        "kpr {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

/// Runs `kpr <args> --bpffs <pins>` and returns what it printed.
fn kpr_text(lab: &Lab, args: &[&str]) -> String {
    let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
        .args(args)
        .arg("--bpffs")
        .arg(lab.pin_dir())
        .output()
        .expect("run kpr");
    assert!(
        output.status.success(),
        "kpr {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn inspect_and_trace_read_the_running_node() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let mut conversation = lab
        .pod("client")
        .netns
        .run(|| Conversation::open(sock(WEB_VIP, 80), TIMEOUT))
        .expect("connect");
    let server = conversation.ask().expect("ask").server;

    let services = kpr_json(&lab, &["inspect", "services"]);
    let web = services
        .as_array()
        .expect("a list")
        .iter()
        .find(|service| service["frontend"] == "10.96.0.10:80")
        .unwrap_or_else(|| panic!("web missing: {services}"));
    assert_eq!(web["service"], "demo/web:http", "{web}");
    assert_eq!(web["namespace"], "demo");
    assert_eq!(web["name"], "web");
    assert_eq!(web["port"], "http");
    assert_eq!(web["type"], "ClusterIP");
    assert_eq!(web["protocol"], "TCP");
    assert_eq!(web["clients"], "all");
    assert!(
        services.to_string().find("service_id").is_none(),
        "ids where names are: {services}"
    );
    // Backends sorted, with their pods and conditions from the EndpointSlice.
    assert_eq!(
        web["backends"],
        serde_json::json!([
            {"address": "10.244.1.11:8080", "pod": "web-0", "node": "node-a", "ready": true, "serving": true, "terminating": false},
            {"address": "10.244.1.12:8080", "pod": "web-1", "node": "node-a", "ready": true, "serving": true, "terminating": false},
            {"address": "10.244.1.13:8080", "pod": "web-2", "node": "node-a", "ready": true, "serving": true, "terminating": false},
        ])
    );
    // Sorted by namespace/name: every demo service before any other namespace's.
    let keys: Vec<(String, String)> = services
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| (s["namespace"].to_string(), s["name"].to_string()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    let only_web = kpr_json(&lab, &["inspect", "services", "--service", "demo/web"]);
    assert_eq!(only_web, serde_json::json!([web.clone()]));
    let none = kpr_json(&lab, &["inspect", "services", "--service", "demo/nothing"]);
    assert_eq!(none, serde_json::json!([]));
    // The one connection, counted for its service port (the agent reads the per-CPU
    // counters every 2 s).
    let labels = r#"{namespace="demo",service="web",port="http",protocol="TCP"}"#;
    lab.wait_for(
        "web's per-service counters",
        Duration::from_secs(10),
        || {
            let metrics = lab.metrics()?;
            let value = |name: &str| sample(&metrics, &format!("{name}{labels}")).unwrap_or(0.0);
            // SYN, ACK and request one way, SYN-ACK and answer the other, at least.
            Ok(value("kpr_service_connections_total") == 1.0
                && value("kpr_service_packets_total") >= 5.0
                && value("kpr_service_bytes_total") >= 5.0 * 40.0)
        },
    )
    .expect("per-service counters");
    let table = kpr_text(&lab, &["inspect", "services", "--service", "demo/web"]);
    println!("{table}");
    assert!(
        table.contains("demo/web:http")
            && table.contains("ClusterIP")
            && table.contains("10.244.1.11:8080 (web-0 ready)"),
        "{table}"
    );

    // The open connection has both directions in conntrack, the original one rewriting
    // the destination to the backend that answered.
    let flows = kpr_json(
        &lab,
        &[
            "inspect",
            "conntrack",
            "--addr",
            "10.96.0.10",
            "--protocol",
            "tcp",
        ],
    );
    let flows = flows.as_array().expect("a list");
    let original = flows
        .iter()
        .find(|flow| flow["direction"] == "original" && flow["destination"] == "10.96.0.10:80")
        .unwrap_or_else(|| panic!("no original entry: {flows:?}"));
    let backend_ip = match server.as_str() {
        "web-0" => "10.244.1.11",
        "web-1" => "10.244.1.12",
        _ => "10.244.1.13",
    };
    assert_eq!(original["rewrite"], format!("dst -> {backend_ip}:8080"));
    assert!(
        flows.iter().any(|flow| flow["direction"] == "reply"),
        "{flows:?}"
    );

    let counters = kpr_json(&lab, &["inspect", "counters"]);
    assert!(
        counters["new_flow"].as_u64().is_some_and(|n| n >= 1),
        "{counters}"
    );
    let affinity = kpr_json(&lab, &["inspect", "affinity"]);
    assert_eq!(affinity, serde_json::json!([]), "no service uses affinity");

    let refused = kpr_json(
        &lab,
        &["trace", "--client", "10.244.1.2", "--to", "10.96.0.99:80"],
    );
    assert_eq!(refused["verdict"], "reject", "{refused}");
    let fresh = kpr_json(
        &lab,
        &["trace", "--client", "10.244.1.2", "--to", "10.96.0.10:80"],
    );
    assert_eq!(fresh["verdict"], "translate");
    assert_eq!(fresh["service"], "demo/web:http");
    let chosen = fresh["backend"].as_str().unwrap_or_default();
    assert!(
        [
            "10.244.1.11:8080 (web-0)",
            "10.244.1.12:8080 (web-1)",
            "10.244.1.13:8080 (web-2)"
        ]
        .contains(&chosen),
        "{fresh}"
    );
    let other = kpr_json(
        &lab,
        &[
            "trace",
            "--client",
            "10.244.1.2",
            "--to",
            "10.244.1.11:8080",
        ],
    );
    assert_eq!(other["verdict"], "pass");
    let dns = kpr_json(
        &lab,
        &[
            "trace",
            "--client",
            "10.244.1.2",
            "--to",
            "10.96.0.53:53",
            "--protocol",
            "udp",
        ],
    );
    assert_eq!(dns["verdict"], "translate");
}

#[test]
fn an_invalid_config_file_stops_the_agent_at_start_with_the_setting_named() {
    let dir = std::env::temp_dir().join(format!("kpr-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for (text, expected) in [
        (
            "kind: KubeProxyConfiguration\nmode: iptables\n",
            "unknown field `mode`",
        ),
        ("conntrack:\n  udpTimeout: soon\n", "invalid duration"),
        ("metricsBindAddress: everywhere\n", "metricsBindAddress"),
    ] {
        let path = dir.join("config.yaml");
        std::fs::write(&path, text).expect("write");
        let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
            .args(["run", "--manifests"])
            .arg(&dir)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run kpr");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text:?} accepted");
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A LoadBalancer service with externalTrafficPolicy Local in the lab: its
/// healthCheckNodePort answers in the node namespace as kube-proxy's does.
fn health_check_manifest(node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: hc}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.70
  clusterIPs: [10.96.0.70]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  allocateLoadBalancerNodePorts: false
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  namespace: hc
  labels: {{kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: [10.244.1.50], nodeName: {node}, conditions: {{ready: true, serving: true, terminating: false}}}}
"
    )
}

#[test]
fn health_check_node_port_follows_local_endpoints() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let port = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 32100);
    let answer = |lab: &Lab| lab.node.run(|| kpr_lab::lab::http_get(port, "/"));
    let wait_for = |lab: &Lab, what: &str, code: u16, local: u64| {
        lab.wait_for(what, Duration::from_secs(10), || {
            Ok(answer(lab).ok().is_some_and(|(got, body)| {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                got == code && json["localEndpoints"] == local
            }))
        })
    };

    lab.write_manifest("lb.yaml", &health_check_manifest(&lab.node_name))
        .expect("write");
    wait_for(&lab, "200 with one local endpoint", 200, 1).expect("health check up");
    let (_, body) = answer(&lab).expect("answer");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        json,
        serde_json::json!({
            "service": {"namespace": "hc", "name": "lb"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        })
    );

    lab.write_manifest("lb.yaml", &health_check_manifest("node-b"))
        .expect("write");
    wait_for(&lab, "503 once the endpoint is elsewhere", 503, 0).expect("count updated");

    lab.remove_manifest("lb.yaml").expect("remove");
    lab.wait_for("the port to close", Duration::from_secs(10), || {
        Ok(answer(&lab).is_err())
    })
    .expect("port closed");
    let metrics = lab.metrics().expect("metrics");
    assert_eq!(
        sample(
            &metrics,
            "kpr_health_check_bind_failures_total{reason=\"address_in_use\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
}

/// A ClusterIP with sessionAffinity ClientIP on the web pods.
const STICKY: &str = "apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  namespace: demo
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a, targetRef: {kind: Pod, namespace: demo, name: web-0}}
- {addresses: [10.244.1.12], nodeName: node-a, targetRef: {kind: Pod, namespace: demo, name: web-1}}
- {addresses: [10.244.1.13], nodeName: node-a, targetRef: {kind: Pod, namespace: demo, name: web-2}}
";

/// An SCTP Service (a Diameter-like port, translated 3868 -> 3869) and its slice.
const DIAMETER: &str = "apiVersion: v1
kind: Service
metadata: {name: diameter, namespace: demo}
spec:
  clusterIP: 10.96.0.38
  ports: [{name: dia, port: 3868, targetPort: 3869, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: diameter-1
  namespace: demo
  labels: {kubernetes.io/service-name: diameter}
addressType: IPv4
ports: [{name: dia, port: 3869, protocol: SCTP}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a, targetRef: {kind: Pod, namespace: demo, name: web-0}}
";

/// An SCTP Service through the whole agent (manifest, model, syncer, pinned maps),
/// shown by `kpr inspect` and `kpr trace --protocol sctp`: the kernels here have no
/// SCTP sockets, so the trace instance's test run on the live maps stands in for real
/// traffic (the byte-level translation is `sctp_datapath_table`'s).
#[test]
fn an_sctp_service_is_programmed_and_traced_to_its_backend() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    lab.write_manifest("diameter.yaml", DIAMETER)
        .expect("write");
    lab.wait_for("diameter programmed", Duration::from_secs(10), || {
        Ok(
            kpr_json(&lab, &["inspect", "services", "--service", "demo/diameter"])
                .as_array()
                .is_some_and(|rows| !rows.is_empty()),
        )
    })
    .expect("diameter");
    let services = kpr_json(&lab, &["inspect", "services", "--service", "demo/diameter"]);
    println!("{services:#}");
    assert_eq!(services[0]["protocol"], "SCTP", "{services}");
    let trace = trace_json(&lab, "10.96.0.38:3868", &["--protocol", "sctp"]);
    println!("{trace:#}");
    assert_eq!(trace["verdict"], "translate", "{trace}");
    assert_eq!(trace["service"], "demo/diameter:dia", "{trace}");
    assert_eq!(
        trace["packet_out"], "10.244.1.2:41000 -> 10.244.1.11:3869 SCTP",
        "{trace}"
    );
    // The same address's TCP port 3868 is declared for SCTP only: refused.
    let tcp = trace_json(&lab, "10.96.0.38:3868", &[]);
    assert_eq!(tcp["verdict"], "reject", "{tcp}");
}

/// `kpr trace --json` from the client pod's address, run in the node namespace (the
/// redirect path's route lookups see the node's routes).
fn trace_json(lab: &Lab, to: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "trace",
        "--client",
        "10.244.1.2:41000",
        "--to",
        to,
        "--json",
    ];
    args.extend_from_slice(extra);
    let output = lab.kpr(&args).expect("kpr trace");
    serde_json::from_str(&output).expect("JSON")
}

/// `kpr trace` runs the node's real programs on its live maps: it agrees with what real
/// connections from the same client get, and leaves every map as it was.
#[test]
fn trace_agrees_with_real_traffic_and_leaves_every_map_as_it_was() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    lab.write_manifest("sticky.yaml", STICKY).expect("write");
    lab.wait_for("sticky programmed", Duration::from_secs(10), || {
        Ok(
            kpr_json(&lab, &["inspect", "services", "--service", "demo/sticky"])
                .as_array()
                .is_some_and(|rows| !rows.is_empty()),
        )
    })
    .expect("sticky");
    let client = &lab.pod("client").netns;
    // Real traffic first; the connections stay open so nothing expires meanwhile.
    let mut web = client
        .run(|| Conversation::open(sock(WEB_VIP, 80), TIMEOUT))
        .expect("web");
    let mut sticky = client
        .run(|| Conversation::open(sock(Ipv4Addr::new(10, 96, 0, 30), 80), TIMEOUT))
        .expect("sticky");
    let web_server = web.ask().expect("web answers").server;
    let sticky_server = sticky.ask().expect("sticky answers").server;
    let refused = client.run(|| Ok(tcp_request(sock(Ipv4Addr::new(10, 96, 0, 99), 80), TIMEOUT)));
    let refused = refused.expect("run");
    assert!(
        refused
            .as_ref()
            .is_err_and(|error| format!("{error:#}").contains("refused")),
        "{refused:?}"
    );

    let before = kpr_lab::lab::map_snapshot(&lab.pin_dir());
    let cases = [
        ("10.96.0.10:80", "translate", Some("demo/web:http")),
        ("10.96.0.30:80", "translate", Some("demo/sticky:http")),
        ("10.96.0.99:80", "reject", Some("demo/nobody:http")),
        ("10.244.1.11:8080", "pass", None),
    ];
    let mut traces = Vec::new();
    for (to, verdict, service) in cases {
        let trace = trace_json(&lab, to, &[]);
        println!(
            "{}",
            serde_json::to_string_pretty(&trace).unwrap_or_default()
        );
        assert_eq!(trace["verdict"], verdict, "{trace}");
        assert_eq!(trace["service"].as_str(), service, "{trace}");
        traces.push(trace);
    }
    // The text form of the same run.
    let text = lab
        .kpr(&[
            "trace",
            "--client",
            "10.244.1.2:41000",
            "--to",
            "10.96.0.30:80",
        ])
        .expect("kpr trace");
    println!("{text}");
    assert!(
        text.contains("affinity: the client's record chose the backend")
            && text.contains("verdict: translate"),
        "{text}"
    );
    let after = kpr_lab::lab::map_snapshot(&lab.pin_dir());
    assert!(
        before == after,
        "trace changed a map:\nbefore {before}\nafter  {after}"
    );

    // The same client sticks to its backend: trace shows the affinity record at work
    // and the backend the real connection reached.
    let sticky_trace = &traces[1];
    assert!(
        sticky_trace["stages"]
            .as_array()
            .is_some_and(|stages| stages
                .iter()
                .any(|s| s == "affinity: the client's record chose the backend")),
        "{sticky_trace}"
    );
    assert!(
        sticky_trace["backend"]
            .as_str()
            .is_some_and(|backend| backend.ends_with(&format!("({sticky_server})"))),
        "{sticky_trace} vs {sticky_server}"
    );
    // The ClusterIP translates to one of the backends real traffic reaches; the packet
    // that leaves goes there.
    let web_trace = &traces[0];
    let backend = web_trace["backend"].as_str().unwrap_or_default();
    assert!(backend.starts_with("10.244.1.1"), "{web_trace}");
    let address = backend.split(' ').next().unwrap_or_default();
    assert_eq!(
        web_trace["packet_out"],
        format!("10.244.1.2:41000 -> {address} TCP"),
        "{web_trace}"
    );
    assert!(["web-0", "web-1", "web-2"].contains(&web_server.as_str()));
    // No endpoints: the real client was refused; trace answers with ICMP port
    // unreachable (type 3 code 3) back to the client.
    assert_eq!(
        traces[2]["packet_out"], "10.96.0.99 -> 10.244.1.2 ICMP type 3 code 3",
        "{}",
        traces[2]
    );
    drop((web, sticky));
}
