//! IPv6 and dual stack end to end on the TC path: real TCP and UDP sockets in pod
//! namespaces with IPv6 addresses, the agent in the node namespace (IPv6 forwarding on
//! there only) reading manifests with IPv6 and dual-stack Services, an outside client
//! behind the node's external interface for NodePorts. No cgroup is hooked: every
//! connection takes the TC path, except in the last test, whose pod sockets are in a
//! hooked test cgroup and are translated by the AF_INET6 socket hooks.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use kpr_lab::{
    ipv6::{
        common_services, pod_v6, slice, v4, v6, CLIENT_V6, EMPTY_VIP, EXTERNAL_V6, LB_V6, NODE_V6,
        OUTSIDE_V6, RANGED_LB_V6, SIX_VIP, STICKY_VIP,
    },
    lab::{http_get, Lab},
    netns::Netns,
    traffic::{io_error_kind, tcp_request, udp_request},
};
use proxy_common::{Be16, Be32x4, ServiceKeyV6, ServiceValueV6};

const TIMEOUT: Duration = Duration::from_secs(2);

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The dual-stack Service `dual` (RequireDualStack).
const DUAL_VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DUAL_VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
/// `pref`: PreferDualStack with IPv4 endpoints only.
const PREF_VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const PREF_VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30);

fn manifests() -> String {
    let mut documents = common_services();
    documents.extend([
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: dual, namespace: demo}}
spec:
  clusterIP: {DUAL_VIP_V4}
  clusterIPs: [{DUAL_VIP_V4}, '{DUAL_VIP_V6}']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
"
        ),
        slice("dual", "IPv4", &["10.244.1.21".into()]),
        slice("dual", "IPv6", &[pod_v6(0x21).to_string()]),
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: pref, namespace: demo}}
spec:
  clusterIP: {PREF_VIP_V4}
  clusterIPs: [{PREF_VIP_V4}, '{PREF_VIP_V6}']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
"
        ),
        slice("pref", "IPv4", &["10.244.1.31".into()]),
    ]);
    documents.join("---\n")
}

/// The agent's flags in every lab of this file.
const AGENT_ARGS: [&str; 6] = [
    "--node-interfaces",
    "ext0",
    "--socket-lb",
    "off",
    "--cluster-cidr",
    "10.244.0.0/16,fd00:10:244::/56",
];

/// A dual-stack lab node with its pods serving, an outside namespace on the node's
/// external interface `ext0`, and the agent running.
struct Ipv6Lab {
    lab: Lab,
    /// The outside client, behind `ext0`; removed with the lab (its veth goes with it).
    outside: Netns,
}

fn ipv6_lab() -> Result<Ipv6Lab> {
    ipv6_lab_with(&[])
}

fn ipv6_lab_with(extra_args: &[&str]) -> Result<Ipv6Lab> {
    let (mut lab, outside) = ipv6_lab_without_agent()?;
    let mut args = AGENT_ARGS.to_vec();
    args.extend_from_slice(extra_args);
    lab.start_agent(&args)?;
    lab.wait_attached()?;
    Ok(Ipv6Lab { lab, outside })
}

/// The lab of [`ipv6_lab`] and its outside namespace, before the agent starts.
fn ipv6_lab_without_agent() -> Result<(Lab, Netns)> {
    let mut lab = Lab::new()?;
    lab.enable_ipv6()?;
    lab.add_dual_pod("client", CLIENT_V4, Some(CLIENT_V6))?;
    for i in 0..3u8 {
        let name = format!("web-{i}");
        lab.add_dual_pod(
            &name,
            Ipv4Addr::new(10, 244, 1, 11 + i),
            Some(pod_v6(0x11 + u16::from(i))),
        )?;
        lab.serve_v6(&name, 8080)?;
    }
    // Both families served on both pods: what a pod that answers proves is the
    // datapath's choice, never a missing server.
    for (name, v4_host, host) in [("dual-0", 21, 0x21), ("pref-0", 31, 0x31)] {
        lab.add_dual_pod(name, Ipv4Addr::new(10, 244, 1, v4_host), Some(pod_v6(host)))?;
        lab.serve(name, 8080)?;
        lab.serve_v6(name, 8080)?;
    }
    let outside = lab.add_outside_ipv6("out", "ext0", NODE_V6, OUTSIDE_V6)?;
    // The externalIP and LoadBalancer IPs are routed to the node, as a router or a
    // load balancer in front of it would.
    outside.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8::/32",
        "via",
        &NODE_V6.to_string(),
    ])?;
    lab.write_manifest("services.yaml", &manifests())?;
    Ok((lab, outside))
}

fn is_refused(error: &anyhow::Error) -> bool {
    io_error_kind(error) == std::io::ErrorKind::ConnectionRefused
}

#[test]
fn an_ipv6_cluster_ip_spreads_tcp_and_udp_from_a_pod_over_every_backend() {
    let lab = ipv6_lab().expect("lab");
    let client = &lab.lab.pod("client").netns;
    let answers = client
        .run(|| {
            (0..90)
                .map(|_| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("90 connections to the IPv6 ClusterIP");
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        *per_backend.entry(answer.server.clone()).or_default() += 1;
        // The backend sees the client pod's own IPv6 address.
        assert_eq!(answer.seen_client.ip(), IpAddr::V6(CLIENT_V6), "{answer:?}");
    }
    eprintln!("IPv6 connections per backend: {per_backend:?}");
    assert_eq!(
        per_backend.keys().cloned().collect::<Vec<_>>(),
        ["web-0", "web-1", "web-2"]
    );
    assert!(
        per_backend.values().all(|count| *count >= 10),
        "{per_backend:?}"
    );
    let replies = client
        .run(|| {
            (0..30)
                .map(|_| udp_request(v6(SIX_VIP, 53), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("UDP answers through the IPv6 ClusterIP");
    for (answer, from) in &replies {
        // The reply comes from the ClusterIP: it was translated back.
        assert_eq!(*from, v6(SIX_VIP, 53));
        assert_eq!(answer.seen_client.ip(), IpAddr::V6(CLIENT_V6));
    }
    // The agent reports what it programmed in the IPv6 maps.
    let entries = lab
        .lab
        .metric("kpr_map_entries{map=\"SVC_V6_V1\"}")
        .expect("metrics")
        .expect("an IPv6 service map fill");
    // six: 2 ClusterIP + 2 NodePort frontends of 3 slots; dual, pref, empty: 1 + n.
    assert!(entries >= 16.0, "SVC_V6_V1 holds {entries}");
}

/// The hairpin over IPv6: a pod reaching itself through its service's ClusterIP is
/// masqueraded to the node's IPv6 address, so its reply leaves the pod and comes back
/// translated (without masquerade the pod would answer itself and the connection
/// would never open). Fails before IPv6 masqueraded pod flows.
#[test]
fn an_ipv6_pod_reaches_itself_through_its_service_masqueraded_to_the_node() {
    let lab = ipv6_lab().expect("lab");
    let web_0 = &lab.lab.pod("web-0").netns;
    let answers = web_0
        .run(|| {
            (0..30)
                .map(|_| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("web-0 to its own service over IPv6");
    let to_itself: Vec<_> = answers.iter().filter(|a| a.server == "web-0").collect();
    // Thirty picks of three miss web-0 with probability (2/3)^30, about 5e-6.
    assert!(
        !to_itself.is_empty(),
        "never chose itself in 30 tries: {answers:?}"
    );
    for answer in to_itself {
        assert_eq!(answer.seen_client.ip(), IpAddr::V6(NODE_V6), "{answer:?}");
    }
    for answer in answers.iter().filter(|a| a.server != "web-0") {
        assert_eq!(
            answer.seen_client.ip(),
            IpAddr::V6(pod_v6(0x11)),
            "other backends see the pod: {answer:?}"
        );
    }
    // Counted in the datapath (the metrics refresh every 2 s).
    lab.lab
        .wait_for(
            "hairpin_flow in the metrics",
            Duration::from_secs(10),
            || {
                Ok(lab
                    .lab
                    .metric("kpr_datapath_events_total{event=\"hairpin_flow\"}")?
                    .is_some_and(|flows| flows >= 1.0))
            },
        )
        .expect("hairpin flows counted");
}

/// A node whose only default route is IPv6 (as an IPv6-only node's) finds its
/// external interface by that route, without `--node-interfaces`: its NodePorts
/// answer on the interface's IPv6 address. Before, only IPv4 default routes counted,
/// and such a node had no external interface.
#[test]
fn the_interface_of_an_ipv6_default_route_is_external_without_node_interfaces() {
    let (mut lab, outside) = ipv6_lab_without_agent().expect("lab");
    lab.node
        .ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &OUTSIDE_V6.to_string(),
            "dev",
            "ext0",
        ])
        .expect("the IPv6 default route");
    let [interfaces_flag, _, rest @ ..] = AGENT_ARGS;
    assert_eq!(interfaces_flag, "--node-interfaces");
    lab.start_agent(&rest).expect("agent");
    lab.wait_attached().expect("attached");
    let answer = outside
        .run(|| tcp_request(v6(NODE_V6, 30080), TIMEOUT))
        .expect("the IPv6 NodePort on the default route's interface");
    assert!(answer.server.starts_with("web-"), "{answer:?}");
}

#[test]
fn an_ipv6_node_port_answers_a_client_outside_the_node() {
    let lab = ipv6_lab().expect("lab");
    let answers = lab
        .outside
        .run(|| {
            (0..30)
                .map(|_| tcp_request(v6(NODE_V6, 30080), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("TCP through the IPv6 NodePort");
    let servers: std::collections::BTreeSet<&str> = answers
        .iter()
        .map(|answer| answer.server.as_str())
        .collect();
    assert!(
        servers.iter().all(|server| server.starts_with("web-")) && servers.len() >= 2,
        "{servers:?}"
    );
    let (answer, from) = lab
        .outside
        .run(|| udp_request(v6(NODE_V6, 30053), TIMEOUT))
        .expect("UDP through the IPv6 NodePort");
    assert_eq!(
        from,
        v6(NODE_V6, 30053),
        "the reply comes from the NodePort"
    );
    assert!(answer.server.starts_with("web-"), "{answer:?}");
}

#[test]
fn a_dual_stack_service_answers_on_both_cluster_ips_from_one_client() {
    let lab = ipv6_lab().expect("lab");
    let client = &lab.lab.pod("client").netns;
    let (over_v4, over_v6) = client
        .run(|| {
            Ok((
                tcp_request(v4(DUAL_VIP_V4, 80), TIMEOUT)?,
                tcp_request(v6(DUAL_VIP_V6, 80), TIMEOUT)?,
            ))
        })
        .expect("both clusterIPs answer");
    // Each family's frontend goes to that family's endpoint of the same pod.
    assert_eq!(over_v4.server, "dual-0");
    assert_eq!(over_v4.seen_client.ip(), IpAddr::V4(CLIENT_V4));
    assert_eq!(over_v6.server, "dual-0");
    assert_eq!(over_v6.seen_client.ip(), IpAddr::V6(CLIENT_V6));
}

#[test]
fn prefer_dual_stack_with_ipv4_endpoints_only_serves_ipv4_and_refuses_ipv6() {
    let lab = ipv6_lab().expect("lab");
    let client = &lab.lab.pod("client").netns;
    let answer = client
        .run(|| tcp_request(v4(PREF_VIP_V4, 80), TIMEOUT))
        .expect("the IPv4 clusterIP serves its IPv4 endpoint");
    assert_eq!(answer.server, "pref-0");
    // The pod serves IPv6 too, but no IPv6 slice names it: its IPv6 frontend has no
    // endpoints and rejects (ICMPv6 port unreachable), as kube-proxy's IPv6 proxier.
    let error = client
        .run(|| Ok(tcp_request(v6(PREF_VIP_V6, 80), TIMEOUT)))
        .expect("run")
        .expect_err("the IPv6 clusterIP has no endpoints");
    assert!(
        is_refused(&error),
        "expected connection refused, got {error:#}"
    );
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_and_the_ipv6_pins_go_with_the_agent() {
    let mut lab = ipv6_lab().expect("lab");
    let error = lab
        .lab
        .pod("client")
        .netns
        .run(|| Ok(tcp_request(v6(EMPTY_VIP, 80), TIMEOUT)))
        .expect("run")
        .expect_err("nobody serves this service");
    assert!(
        is_refused(&error),
        "expected connection refused, got {error:#}"
    );
    let pins = lab.lab.pin_dir();
    for map in [
        "SVC_V6_V1",
        "BACKEND_V6_V1",
        "FE_ADDR_V6_V1",
        "CONFIG_V6_V1",
    ] {
        assert!(
            pins.join(map).exists(),
            "{map} is pinned while the agent runs"
        );
    }
    lab.lab.stop_agent().expect("stop");
    lab.lab.wait_detached_and_unpinned().expect("unpinned");
    assert!(!pins.join("SVC_V6_V1").exists());
}

#[test]
fn an_ipv6_frontend_deleted_behind_the_agents_back_is_repaired_by_the_periodic_resync() {
    let lab = ipv6_lab_with(&["--sync-period-ms", "3000"]).expect("lab");
    let client = &lab.lab.pod("client").netns;
    client
        .run(|| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
        .expect("six answers");
    // What `bpftool map delete` would do to six's IPv6 frontend entry.
    let path = lab.lab.pin_dir().join(proxy_common::names::SERVICES_V6);
    let mut services = aya::maps::HashMap::<_, ServiceKeyV6, ServiceValueV6>::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&path).expect("pinned")),
    )
    .expect("the IPv6 service map");
    let key = ServiceKeyV6 {
        addr: Be32x4::from_ipv6(SIX_VIP),
        port: Be16::from_host(80),
        slot: 0,
        proto: proxy_common::proto::TCP,
        scope: proxy_common::scope::DEFAULT,
        _pad: [0; 2],
    };
    services.remove(&key).expect("delete six's frontend entry");
    assert!(
        client
            .run(|| Ok(tcp_request(v6(SIX_VIP, 80), TIMEOUT).is_err()))
            .expect("run"),
        "six answers without its frontend entry"
    );
    lab.lab
        .wait_for("six to answer again", Duration::from_secs(10), || {
            client.run(|| Ok(tcp_request(v6(SIX_VIP, 80), TIMEOUT).is_ok()))
        })
        .expect("the entry is repaired");
    let repaired = lab
        .lab
        .metric("kpr_datapath_drift_repaired_total{map=\"SVC_V6_V1\",kind=\"entries\"}")
        .expect("metrics");
    assert!(repaired.is_some_and(|n| n >= 1.0), "{repaired:?}");
}

#[test]
fn ipv6_external_and_load_balancer_ips_follow_the_policy_and_the_source_ranges() {
    let lab = ipv6_lab().expect("lab");
    let outside = &lab.outside;
    let answer = outside
        .run(|| tcp_request(v6(EXTERNAL_V6, 80), TIMEOUT))
        .expect("the IPv6 externalIP answers");
    assert!(answer.server.starts_with("web-"), "{answer:?}");
    // externalTrafficPolicy Local, a local endpoint: the client's own address is kept.
    let answer = outside
        .run(|| tcp_request(v6(LB_V6, 80), TIMEOUT))
        .expect("the IPv6 LoadBalancer IP answers a client in its source range");
    assert_eq!(answer.server, "web-0");
    assert_eq!(answer.seen_client.ip(), IpAddr::V6(OUTSIDE_V6));
    // A client outside the only range is dropped: no answer, no refusal.
    let error = outside
        .run(|| {
            Ok(tcp_request(
                v6(RANGED_LB_V6, 80),
                Duration::from_millis(700),
            ))
        })
        .expect("run")
        .expect_err("a client outside the source ranges gets nothing");
    assert_eq!(
        io_error_kind(&error),
        std::io::ErrorKind::TimedOut,
        "dropped, not refused: {error:#}"
    );
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_backend() {
    let lab = ipv6_lab().expect("lab");
    let servers: std::collections::BTreeSet<String> = lab
        .lab
        .pod("client")
        .netns
        .run(|| {
            (0..20)
                .map(|_| tcp_request(v6(STICKY_VIP, 80), TIMEOUT).map(|answer| answer.server))
                .collect::<Result<_>>()
        })
        .expect("20 connections");
    assert_eq!(servers.len(), 1, "one backend for one client: {servers:?}");
}

#[test]
fn ipv6_connections_survive_an_agent_crash_and_the_next_agent_adopts_the_ipv6_maps() {
    let mut lab = ipv6_lab().expect("lab");
    let mut conversation = lab
        .lab
        .pod("client")
        .netns
        .run(|| kpr_lab::traffic::Conversation::open(v6(SIX_VIP, 80), TIMEOUT))
        .expect("a long-lived IPv6 connection");
    let server = conversation.ask().expect("first answer").server;
    let entries = |lab: &Lab| lab.metric("kpr_map_entries{map=\"SVC_V6_V1\"}");
    let before = entries(&lab.lab).expect("metrics");
    // SIGKILL leaves programs attached and maps pinned: IPv6 keeps being translated.
    lab.lab.kill_agent().expect("kill");
    lab.lab
        .pod("client")
        .netns
        .run(|| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
        .expect("a new IPv6 connection with no agent running");
    lab.lab.start_agent(&AGENT_ARGS).expect("restart");
    let client = &lab.lab.pod("client").netns;
    assert!(
        lab.lab
            .agent_log()
            .contains("adopting the IPv6 maps of a previous agent"),
        "{}",
        lab.lab.agent_log()
    );
    assert_eq!(
        conversation.ask().expect("the connection survived").server,
        server
    );
    client
        .run(|| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
        .expect("a new IPv6 connection after the restart");
    assert_eq!(
        entries(&lab.lab).expect("metrics"),
        before,
        "the same entries, adopted"
    );
}

#[test]
fn ipv6_sockets_in_the_hooked_cgroup_are_translated_at_connect_by_the_ipv6_maps() {
    use kpr_lab::{
        host::Mode,
        socket_lab::{answered_by, assert_peer, counter, SocketLab},
    };
    let (lab, _outside) = ipv6_lab_without_agent().expect("lab");
    let mut lab = SocketLab::from_lab(
        lab,
        std::path::Path::new(env!("CARGO_BIN_EXE_kpr-host-client")),
    );
    // The socket hooks on (the default mode), on the test's cgroup: the connect6 and
    // sendmsg6 hooks find the IPv6 frontends in the maps this agent fills.
    lab.start_agent(&AGENT_ARGS[..2]);
    let before = lab.counters();
    let tcp = lab.pod_client("client", true, Mode::Tcp, v6(SIX_VIP, 80), 30);
    let servers = answered_by(&tcp, &["web-0", "web-1", "web-2"]);
    assert!(servers.len() >= 2, "30 connections all went to {servers:?}");
    // getpeername() shows the ClusterIP, the backend sees the pod itself.
    assert_peer(&tcp, &format!("[{SIX_VIP}]:80"));
    for outcome in &tcp {
        let seen: Option<SocketAddr> = outcome.seen_client.as_deref().and_then(|s| s.parse().ok());
        assert_eq!(
            seen.map(|s| s.ip()),
            Some(IpAddr::V6(CLIENT_V6)),
            "{outcome:?}"
        );
    }
    let udp = lab.pod_client("client", true, Mode::UdpConnected, v6(SIX_VIP, 53), 10);
    let _ = answered_by(&udp, &["web-0", "web-1", "web-2"]);
    let after = lab.counters();
    assert!(
        counter(&after, "sock_translated_pod") >= counter(&before, "sock_translated_pod") + 40,
        "{before} -> {after}"
    );
    assert_eq!(
        counter(&after, "new_flow"),
        counter(&before, "new_flow"),
        "an IPv6 connection in the hooked cgroup went through TC: {before} -> {after}"
    );
}

/// `solo6`: an IPv6-only UDP service on one of the web pods.
const SOLO_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x80);

fn solo6(pod: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: solo6, namespace: demo}}
spec:
  clusterIP: '{SOLO_VIP}'
  clusterIPs: ['{SOLO_VIP}']
  ipFamilies: [IPv6]
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080}}
---
{}",
        slice("solo6", "IPv6", &[pod_v6(pod).to_string()])
    )
}

#[test]
fn a_connected_ipv6_udp_socket_of_a_removed_backend_is_destroyed_and_reconnects() {
    use kpr_lab::{host::Mode, socket_lab::SocketLab};
    let (lab, _outside) = ipv6_lab_without_agent().expect("lab");
    lab.write_manifest("solo6.yaml", &solo6(0x11))
        .expect("write");
    let mut lab = SocketLab::from_lab(
        lab,
        std::path::Path::new(env!("CARGO_BIN_EXE_kpr-host-client")),
    );
    lab.start_agent(&AGENT_ARGS[..2]);
    let pod = lab.lab.pod("client").netns.path();
    let mut session = lab.session(&pod, Mode::UdpSession, v6(SOLO_VIP, 53));
    let first = session.ask().expect("first request");
    assert_eq!(first.server.as_deref(), Some("web-0"), "{first:?}");
    // web-0 leaves for web-1; it keeps serving, so a socket left connected to it would
    // go on getting its answers.
    lab.lab
        .write_manifest("solo6.yaml", &solo6(0x12))
        .expect("write");
    let mut errors = Vec::new();
    let mut last = None;
    lab.lab
        .wait_for("the socket to leave web-0", Duration::from_secs(10), || {
            let outcome = session.ask()?;
            let server = outcome.server.clone();
            if server.is_none() {
                errors.push(outcome.clone());
            }
            last = Some(outcome);
            Ok(server.as_deref() == Some("web-1"))
        })
        .unwrap_or_else(|error| panic!("still pinned: {last:?} {errors:?}: {error:#}"));
    // Destroyed (one failed request at most), connected again to the live backend.
    assert!(errors.len() <= 1, "{errors:?}");
    for error in &errors {
        assert!(
            matches!(error.errno, Some(libc::ECONNABORTED | libc::EDESTADDRREQ)),
            "{error:?}"
        );
    }
    let next = session.ask().expect("request after the move");
    assert_eq!(next.server.as_deref(), Some("web-1"), "{next:?}");
    assert_eq!(
        next.source.as_deref(),
        Some(format!("[{SOLO_VIP}]:53").as_str())
    );
}

#[test]
fn ipv6_health_check_node_ports_answer_on_the_nodes_ipv6_address() {
    // `lb6` (externalTrafficPolicy Local, healthCheckNodePort 32080) has its endpoint
    // on this node: a load balancer asking over IPv6 hears 200 and one local endpoint,
    // as it would over IPv4 (kube-proxy runs a health check server per family).
    let lab = ipv6_lab().expect("lab");
    let (code, body) = lab
        .outside
        .run(|| http_get(v6(NODE_V6, 32080), "/healthz"))
        .expect("the health check port answers on the node's IPv6 address");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
}

/// `kpr <args> --json` on the lab's node, parsed.
fn kpr_json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = lab.kpr(&args).expect("kpr");
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("kpr {args:?}: {error}: {text}"))
}

fn find<'v>(list: &'v serde_json::Value, key: &str, value: &str) -> &'v serde_json::Value {
    list.as_array()
        .expect("a list")
        .iter()
        .find(|item| item[key] == value)
        .unwrap_or_else(|| panic!("no {key} {value} in {list}"))
}

/// `kpr inspect` shows the IPv6 maps as it shows the IPv4 ones (frontends named from
/// the names file, `[addr]:port`, backends with their endpoints' conditions, flows,
/// affinity records), a dual-stack service under one name in both families, the
/// IPv6 tables' fill in `kpr_map_entries`; `kpr trace` runs IPv6 packets through the
/// IPv6 path's stages (new flow, known flow, affinity, reject, source ranges) and
/// writes nothing.
#[test]
fn inspect_and_trace_show_the_ipv6_and_dual_stack_services() {
    let lab = ipv6_lab().expect("lab");
    let client = &lab.lab.pod("client").netns;
    let mut conversation = client
        .run(|| kpr_lab::traffic::Conversation::open(v6(SIX_VIP, 80), TIMEOUT))
        .expect("connect to the IPv6 ClusterIP");
    let server = conversation.ask().expect("ask").server;
    client
        .run(|| tcp_request(v6(STICKY_VIP, 80), TIMEOUT))
        .expect("a connection to the affinity service");

    let services = kpr_json(&lab.lab, &["inspect", "services"]);
    let six = find(&services, "frontend", &v6(SIX_VIP, 80).to_string());
    assert_eq!(six["service"], "demo/six:http", "{six}");
    assert_eq!(six["type"], "ClusterIP");
    assert_eq!(six["protocol"], "TCP");
    let backends: Vec<&str> = six["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|backend| backend["address"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        backends,
        [
            "[fd00:10:244:1::11]:8080",
            "[fd00:10:244:1::12]:8080",
            "[fd00:10:244:1::13]:8080"
        ],
        "{six}"
    );
    // The endpoints' conditions come from the IPv6 slice.
    assert!(
        six["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .all(|backend| backend["ready"] == true && backend["node"] == "node-a"),
        "{six}"
    );
    let node_port = find(&services, "frontend", &v6(NODE_V6, 30080).to_string());
    assert_eq!(node_port["type"], "NodePort", "{node_port}");
    let udp = find(&services, "frontend", &v6(SIX_VIP, 53).to_string());
    assert_eq!(
        (&udp["service"], &udp["protocol"]),
        (&"demo/six:dns".into(), &"UDP".into())
    );
    // A dual-stack service: one name, a frontend per family, each family's endpoint.
    let dual = kpr_json(&lab.lab, &["inspect", "services", "--service", "demo/dual"]);
    let frontends: Vec<(&str, &str, &str)> = dual
        .as_array()
        .expect("a list")
        .iter()
        .map(|view| {
            (
                view["service"].as_str().unwrap_or_default(),
                view["frontend"].as_str().unwrap_or_default(),
                view["backends"][0]["address"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        frontends,
        [
            ("demo/dual:http", "10.96.0.20:80", "10.244.1.21:8080"),
            (
                "demo/dual:http",
                "[fd00:96::20]:80",
                "[fd00:10:244:1::21]:8080"
            ),
        ],
        "{dual}"
    );
    let pref = kpr_json(&lab.lab, &["inspect", "services", "--service", "demo/pref"]);
    let pref6 = find(&pref, "frontend", &v6(PREF_VIP_V6, 80).to_string());
    assert_eq!(pref6["backends"], serde_json::json!([]), "{pref6}");
    assert_eq!(pref6["when_empty"], "reject (ICMPv6 port unreachable)");
    let table = lab
        .lab
        .kpr(&["inspect", "services", "--service", "demo/six"])
        .expect("table");
    println!("{table}");
    assert!(
        table.contains("demo/six:http") && table.contains("[fd00:96::10]:80"),
        "{table}"
    );

    // The open connection's two entries in CT_V6, found by the IPv6 ClusterIP.
    let flows = kpr_json(
        &lab.lab,
        &[
            "inspect",
            "conntrack",
            "--addr",
            &SIX_VIP.to_string(),
            "--protocol",
            "tcp",
        ],
    );
    let local = conversation.local_addr().expect("local address");
    let original = flows
        .as_array()
        .expect("a list")
        .iter()
        .find(|flow| flow["direction"] == "original" && flow["source"] == local.to_string())
        .unwrap_or_else(|| panic!("no original entry of {local}: {flows}"));
    let backend = match server.as_str() {
        "web-0" => pod_v6(0x11),
        "web-1" => pod_v6(0x12),
        _ => pod_v6(0x13),
    };
    assert_eq!(original["destination"], v6(SIX_VIP, 80).to_string());
    assert_eq!(
        original["rewrite"],
        format!("dst -> {}", v6(backend, 8080)),
        "{original}"
    );
    assert!(
        flows
            .as_array()
            .expect("a list")
            .iter()
            .any(|flow| flow["direction"] == "reply"),
        "{flows}"
    );
    // The affinity record of the IPv6 client.
    let affinity = kpr_json(&lab.lab, &["inspect", "affinity"]);
    let record = find(&affinity, "client", &CLIENT_V6.to_string());
    assert_eq!(record["path"], "tc", "{record}");
    assert!(
        record["backend"]
            .as_str()
            .is_some_and(|backend| backend.starts_with("[fd00:10:244:1::1")),
        "{record}"
    );

    // The IPv6 conntrack and affinity tables' fill, from the upkeep thread's walk
    // (every 10 s).
    lab.lab
        .wait_for(
            "the IPv6 tables' fill in kpr_map_entries",
            Duration::from_secs(25),
            || {
                let metrics = lab.lab.metrics()?;
                let entries = |map: &str| {
                    kpr_lab::lab::sample(&metrics, &format!("kpr_map_entries{{map=\"{map}\"}}"))
                };
                Ok(entries("CT_V6_V1").is_some_and(|n| n >= 2.0)
                    && entries("AFFINITY_V6_V1").is_some_and(|n| n >= 1.0)
                    && entries("SRCRANGE_V6_V1").is_some_and(|n| n >= 2.0)
                    && entries("FE_ADDR_V6_V1").is_some_and(|n| n >= 1.0)
                    // And IPv4's (dual's and pref's ClusterIPs; no IPv4 ranges).
                    && entries("FE_ADDR_V4_V1").is_some_and(|n| n >= 2.0)
                    && entries("SRCRANGE_V4_V1") == Some(0.0))
            },
        )
        .expect("IPv6 map fill");

    // kpr trace runs an IPv6 packet through the IPv6 path's trace instance: each
    // stage's decision, the backend, the verdict and the packet as it leaves.
    let trace = kpr_json(
        &lab.lab,
        &[
            "trace",
            "--client",
            &CLIENT_V6.to_string(),
            "--to",
            &v6(SIX_VIP, 80).to_string(),
        ],
    );
    assert_eq!(
        trace["client"],
        v6(CLIENT_V6, 40_000).to_string(),
        "{trace}"
    );
    assert_eq!(trace["destination"], "[fd00:96::10]:80");
    assert_eq!(trace["program"], "pod-ingress");
    assert_eq!(trace["service"], "demo/six:http", "{trace}");
    let chosen = trace["backend"].as_str().unwrap_or_default().to_owned();
    let chosen_addr = chosen.split(' ').next().unwrap_or_default().to_owned();
    assert!(
        [0x11, 0x12, 0x13]
            .iter()
            .any(|host| chosen_addr == v6(pod_v6(*host), 8080).to_string()),
        "{trace}"
    );
    assert_eq!(
        trace["stages"],
        serde_json::json!([
            "conntrack: no flow for this 5-tuple",
            "frontend: demo/six:http ClusterIP [fd00:96::10]:80, 3 backend(s)",
            "scope: the frontend's backend set",
            format!("backend: {chosen}"),
            "masquerade: no, the client's address is kept",
        ]),
        "{trace}"
    );
    assert_eq!(trace["verdict"], "translate", "{trace}");
    assert_eq!(
        trace["packet_out"],
        format!("{} -> {chosen_addr} TCP", v6(CLIENT_V6, 40_000)),
        "{trace}"
    );
    // The open connection's port: its conntrack entry, and the backend it talks to.
    let known = kpr_json(
        &lab.lab,
        &[
            "trace",
            "--client",
            &local.to_string(),
            "--to",
            &v6(SIX_VIP, 80).to_string(),
        ],
    );
    assert_eq!(
        known["stages"][0],
        "conntrack: a flow of demo/six:http matches (original direction); its rewrite applies",
        "{known}"
    );
    assert!(
        known["backend"]
            .as_str()
            .is_some_and(|name| name.starts_with(&v6(backend, 8080).to_string())),
        "{known}"
    );
    assert_eq!(known["verdict"], "translate", "{known}");
    // The affinity service: the client's record (written by the connection above)
    // chooses.
    let sticky = kpr_json(
        &lab.lab,
        &[
            "trace",
            "--client",
            &CLIENT_V6.to_string(),
            "--to",
            &v6(STICKY_VIP, 80).to_string(),
        ],
    );
    let stages = sticky["stages"].as_array().expect("stages");
    assert!(
        stages.contains(&"affinity: the client's record chose the backend".into()),
        "{sticky}"
    );
    let address = |value: &serde_json::Value| {
        value
            .as_str()
            .and_then(|text| text.split(' ').next())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        address(&sticky["backend"]),
        address(&record["backend"]),
        "{sticky}"
    );
    // No endpoints: rejected with ICMPv6. Outside the source ranges: dropped.
    let empty = kpr_json(
        &lab.lab,
        &[
            "trace",
            "--client",
            &CLIENT_V6.to_string(),
            "--to",
            &v6(EMPTY_VIP, 80).to_string(),
        ],
    );
    assert!(
        empty["stages"]
            .as_array()
            .expect("stages")
            .contains(&"backends: none (no endpoints)".into()),
        "{empty}"
    );
    assert_eq!(empty["verdict"], "reject", "{empty}");
    let denied = kpr_json(
        &lab.lab,
        &[
            "trace",
            "--from-outside",
            "--client",
            &OUTSIDE_V6.to_string(),
            "--to",
            &v6(RANGED_LB_V6, 80).to_string(),
        ],
    );
    assert_eq!(denied["program"], "node-ingress");
    assert!(
        denied["stages"]
            .as_array()
            .expect("stages")
            .contains(&"source ranges: the client is outside loadBalancerSourceRanges".into()),
        "{denied}"
    );
    assert_eq!(denied["verdict"], "drop: drop_source_range", "{denied}");
    // The trace instance, which the verifier walks with TRACE set, stays well within
    // the kernel's limit.
    let verified = lab
        .lab
        .node
        .run(|| {
            let mut tracer = proxy_userspace::datapath::trace::Tracer::load(&lab.lab.pin_dir())?;
            Ok(tracer.verified_instructions()?)
        })
        .expect("the trace instance");
    eprintln!("trace instance, verified instructions: {verified:?}");
    for (label, count) in verified {
        assert!(
            count.is_some_and(|count| count < 750_000),
            "{label}: {count:?}"
        );
    }
    // The trace instance wrote nothing: no flow of the traced client port.
    let flows = kpr_json(
        &lab.lab,
        &[
            "inspect",
            "conntrack",
            "--addr",
            &SIX_VIP.to_string(),
            "--protocol",
            "tcp",
        ],
    );
    assert!(
        !flows
            .as_array()
            .expect("a list")
            .iter()
            .any(|flow| flow["source"] == v6(CLIENT_V6, 40_000).to_string()),
        "{flows}"
    );
    let text = lab
        .lab
        .kpr(&[
            "trace",
            "--client",
            &format!("[{CLIENT_V6}]:40001"),
            "--to",
            "[fd00:96::10]:53",
            "--protocol",
            "udp",
        ])
        .expect("an IPv6 UDP trace");
    println!("{text}");
    assert!(
        text.starts_with("[fd00:10:244:1::2]:40001 -> [fd00:96::10]:53 UDP (pod-ingress)"),
        "{text}"
    );
    let mixed = lab
        .lab
        .kpr(&[
            "trace",
            "--client",
            "10.244.1.2",
            "--to",
            "[fd00:96::10]:80",
        ])
        .expect_err("a packet has one family");
    assert!(
        format!("{mixed:#}").contains("different families"),
        "{mixed:#}"
    );
    // The dual-stack service's IPv4 frontend traces as before, named.
    let over_v4 = kpr_json(
        &lab.lab,
        &["trace", "--client", "10.244.1.2", "--to", "10.96.0.20:80"],
    );
    assert_eq!(over_v4["verdict"], "translate", "{over_v4}");
    assert_eq!(over_v4["service"], "demo/dual:http");
    assert_eq!(over_v4["backend"], "10.244.1.21:8080");
    drop(conversation);
}

/// kube-proxy's IPv6 connections at takeover: netfilter DNATs a pod's connections to
/// the IPv6 ClusterIP before the agent starts (kube-proxy's rule, one nft line), all to
/// web-0. The agent reads the AF_INET6 conntrack dump, counts them as connections to
/// its own frontend and switches the datapath's netfilter check on; the IPv6 path
/// then leaves their packets to netfilter, so each keeps talking to web-0 (translated
/// again, most would land on another of the three backends and be reset).
#[test]
fn kube_proxys_ipv6_connections_survive_the_takeover() {
    let (mut lab, _outside) = ipv6_lab_without_agent().expect("lab");
    let backend = format!("[{}]:8080", pod_v6(0x11));
    let vip = SIX_VIP.to_string();
    for command in [
        &["add", "table", "ip6", "kube-proxy-v6"][..],
        &[
            "add",
            "chain",
            "ip6",
            "kube-proxy-v6",
            "pre",
            "{ type nat hook prerouting priority dstnat ; }",
        ],
        &[
            "add",
            "rule",
            "ip6",
            "kube-proxy-v6",
            "pre",
            "ip6",
            "daddr",
            &vip,
            "tcp",
            "dport",
            "80",
            "dnat",
            "to",
            &backend,
        ],
    ] {
        lab.node
            .exec("nft", command)
            .expect("kube-proxy's DNAT rule");
    }
    // Four connections: translated again at random, all four would stay on web-0
    // once in 81 runs.
    let mut conversations = (0..4)
        .map(|_| {
            lab.pod("client")
                .netns
                .run(|| kpr_lab::traffic::Conversation::open(v6(SIX_VIP, 80), TIMEOUT))
                .expect("netfilter's connection to the IPv6 ClusterIP")
        })
        .collect::<Vec<_>>();
    for conversation in &mut conversations {
        assert_eq!(conversation.ask().expect("ask").server, "web-0");
    }
    let flows = lab
        .node
        .run(|| Ok(proxy_userspace::takeover::ctnetlink::nat_flows()?))
        .expect("netfilter's DNAT flows");
    assert_eq!(
        flows
            .iter()
            .filter(|flow| flow.dst == v6(SIX_VIP, 80))
            .count(),
        4,
        "the AF_INET6 dump holds the connections: {flows:?}"
    );
    lab.start_agent(&AGENT_ARGS).expect("agent");
    lab.wait_for(
        "kube-proxy's IPv6 connections counted, the check on",
        Duration::from_secs(10),
        || {
            Ok(
                lab.metric("kpr_takeover_ipv6_netfilter_flows")? == Some(4.0)
                    && lab.metric("kpr_takeover_check_enabled")? == Some(1.0),
            )
        },
    )
    .expect("kpr_takeover_ipv6_netfilter_flows and the check");
    // The agent has synced: the IPv6 ClusterIP is a frontend of the datapath's.
    lab.wait_for(
        "the IPv6 ClusterIP in the service map",
        Duration::from_secs(10),
        || {
            let services = lab.kpr(&["inspect", "services", "--json"])?;
            Ok(services.contains(&v6(SIX_VIP, 80).to_string()))
        },
    )
    .expect("synced");
    for conversation in &mut conversations {
        assert_eq!(
            conversation.ask().expect("ask after the takeover").server,
            "web-0",
            "kube-proxy's connection keeps its backend"
        );
    }
    // Each of their packets was passed to netfilter, counted.
    lab.wait_for(
        "the passed packets counted",
        Duration::from_secs(25),
        || {
            Ok(lab
                .metric("kpr_datapath_events_total{event=\"nf_tracked_passed\"}")?
                .is_some_and(|n| n >= 4.0))
        },
    )
    .expect("nf_tracked_passed");
    let log = lab.agent_log();
    assert!(
        !log.contains("does not leave them to it yet"),
        "no warning left: {log}"
    );
    drop(conversations);
}
