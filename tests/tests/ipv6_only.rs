//! An IPv6-only node end to end: the node, its pods and the outside client have no
//! IPv4 address at all (the loopback aside), the node's only default route is IPv6,
//! the agent gets no `--node-ip` and no `--node-interfaces` (it finds its external
//! interface by that route) and keeps its default health server address. Every
//! service kind is reached with real TCP and UDP sockets, on the TC path and at the
//! socket layer; established connections survive a crash and an upgrade; cleanup
//! leaves nothing.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use kpr_lab::{
    host::Mode,
    ipv6::{
        common_services, pod_v6, slice, v6, CLIENT_V6, EMPTY_VIP, EXTERNAL_V6, LB_V6, NODE_V6,
        OUTSIDE_V6, RANGED_LB_V6, SIX_VIP, STICKY_VIP,
    },
    lab::{http_get, ipv4_state, Lab},
    netns::Netns,
    scenario::NewConnections,
    socket_lab::{
        answered_by, assert_peer, assert_socket_path_only, counter, plain_log, SocketLab,
    },
    traffic::{io_error_kind, tcp_request, udp_request, Conversation},
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// `gone6`: a Service on web-1 that the test removes.
const GONE_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x90);

const WEB: [&str; 3] = ["web-0", "web-1", "web-2"];

/// The agent's flags: the IPv6 cluster CIDR only; no `--node-ip`, no
/// `--node-interfaces`, no `--healthz-bind-address` (the lab leaves the default).
const AGENT_ARGS: [&str; 2] = ["--cluster-cidr", "fd00:10:244::/56"];

fn services() -> String {
    common_services().join("---\n")
}

/// `gone6`, in a file of its own so the test can remove it.
fn gone6() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: gone6, namespace: demo}}
spec:
  clusterIP: '{GONE_VIP}'
  clusterIPs: ['{GONE_VIP}']
  ipFamilies: [IPv6]
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
---
{}",
        slice("gone6", "IPv6", &[pod_v6(0x12).to_string()])
    )
}

/// The IPv6-only lab: a client pod and three web pods serving 8080 (TCP and UDP), an
/// outside namespace behind `ext0` that the node's IPv6 default route points to and
/// that routes the externalIP and LoadBalancer IPs to the node; manifests written,
/// the agent not started.
fn ipv6_only_lab() -> Result<(Lab, Netns)> {
    let mut lab = Lab::new_ipv6_only()?;
    lab.add_ipv6_pod("client", CLIENT_V6)?;
    for (i, name) in WEB.iter().enumerate() {
        let host = 0x11 + u16::try_from(i)?;
        lab.add_ipv6_pod(name, pod_v6(host))?;
        lab.serve_v6(name, 8080)?;
    }
    let outside = lab.add_outside_ipv6("out", "ext0", NODE_V6, OUTSIDE_V6)?;
    lab.add_ipv6_default_route(OUTSIDE_V6, "ext0")?;
    outside.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8::/32",
        "via",
        &NODE_V6.to_string(),
    ])?;
    lab.write_manifest("services.yaml", &services())?;
    lab.write_manifest("gone6.yaml", &gone6())?;
    Ok((lab, outside))
}

fn kpr_client() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kpr-host-client"))
}

fn servers<'a>(answers: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    answers.into_iter().map(str::to_owned).collect()
}

/// Every service kind on an IPv6-only node, TCP and UDP: ClusterIP from a pod on the TC
/// path and at the socket layer, from a host-network client, a pod reaching itself
/// (hairpin), session affinity, a Service without endpoints, NodePort, externalIP,
/// LoadBalancer with eTP Local and its health check node port, source ranges letting
/// one client in and keeping it out of another, the agent's `/healthz` over IPv6, and
/// a removed Service no longer answering.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one lab, every scenario: building it once per scenario would cost a minute"
)]
fn every_service_kind_answers_on_an_ipv6_only_node() {
    let (lab, outside) = ipv6_only_lab().expect("lab");
    // IPv6 only: no IPv4 address or route anywhere but the loopbacks.
    for (name, netns) in [("node", &lab.node), ("outside", &outside)]
        .into_iter()
        .chain(
            lab.pods()
                .values()
                .map(|pod| (pod.name.as_str(), &pod.netns)),
        )
    {
        let ipv4 = ipv4_state(netns).expect("ip -4");
        assert!(ipv4.is_empty(), "{name} has IPv4: {ipv4:?}");
    }
    let mut lab = SocketLab::from_lab(lab, kpr_client());
    // Healthy means `/healthz` answered on [::1]: the default address serves IPv6.
    lab.start_agent(&AGENT_ARGS);
    let log = plain_log(&lab.lab);
    assert!(
        log.contains(&format!("snat_addr_v6=Some({NODE_V6})"))
            && log.contains("the node's network"),
        "the start-up line names the node's IPv6 network: {log}"
    );
    // The external interface, found by the IPv6 default route, has the node programs.
    let external = lab
        .lab
        .attached_programs_on(&["ext0".to_owned()])
        .expect("tcx of ext0");
    for (direction, program) in [("ingress", "tc_node_ingress"), ("egress", "tc_node_egress")] {
        assert!(
            external.contains(&("ext0".to_owned(), direction, program.to_owned())),
            "{program} missing on ext0: {external:?}"
        );
    }

    // The agent's health server, from outside the node, over IPv6.
    let (code, body) = outside
        .run(|| http_get(v6(NODE_V6, 10256), "/healthz"))
        .expect("/healthz on the node's IPv6 address");
    assert_eq!(code, 200, "{body}");

    // ClusterIP on the TC path (the test's own sockets are in no hooked cgroup).
    let client = &lab.lab.pod("client").netns;
    let before_tc = lab.counters();
    let answers = client
        .run(|| {
            (0..30)
                .map(|_| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("TCP to the ClusterIP");
    assert_eq!(
        servers(answers.iter().map(|answer| answer.server.as_str())),
        servers(WEB),
        "30 connections spread over the three backends"
    );
    for answer in &answers {
        assert_eq!(answer.seen_client.ip(), IpAddr::V6(CLIENT_V6), "{answer:?}");
    }
    for (answer, from) in client
        .run(|| {
            (0..10)
                .map(|_| udp_request(v6(SIX_VIP, 53), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("UDP to the ClusterIP")
    {
        assert_eq!(from, v6(SIX_VIP, 53), "the reply comes from the ClusterIP");
        assert!(WEB.contains(&answer.server.as_str()), "{answer:?}");
    }
    let after_tc = lab.counters();
    assert!(
        counter(&after_tc, "new_flow") >= counter(&before_tc, "new_flow") + 40,
        "the TC path made the flows: {before_tc} -> {after_tc}"
    );

    // ClusterIP at the socket layer: a pod's process in the hooked cgroup.
    let before = lab.counters();
    let tcp = lab.pod_client("client", true, Mode::Tcp, v6(SIX_VIP, 80), 20);
    answered_by(&tcp, &WEB);
    assert_peer(&tcp, &v6(SIX_VIP, 80).to_string());
    let udp = lab.pod_client("client", true, Mode::UdpConnected, v6(SIX_VIP, 53), 10);
    answered_by(&udp, &WEB);
    assert_peer(&udp, &v6(SIX_VIP, 53).to_string());
    let after = lab.counters();
    assert_socket_path_only(&before, &after, 30, "a hooked pod's IPv6 connection");

    // A host-network client in the hooked cgroup: translated at connect, the backend
    // sees the node's own IPv6 address (the node has no other).
    let before = lab.counters();
    let host = lab.client(true, Mode::Tcp, v6(SIX_VIP, 80), 10);
    answered_by(&host, &WEB);
    assert_peer(&host, &v6(SIX_VIP, 80).to_string());
    for outcome in &host {
        let seen: Option<SocketAddr> = outcome.seen_client.as_deref().and_then(|s| s.parse().ok());
        assert_eq!(
            seen.map(|s| s.ip()),
            Some(IpAddr::V6(NODE_V6)),
            "{outcome:?}"
        );
    }
    let host_udp = lab.client(true, Mode::UdpUnconnected, v6(SIX_VIP, 53), 5);
    answered_by(&host_udp, &WEB);
    for outcome in &host_udp {
        assert_eq!(
            outcome.source.as_deref(),
            Some(v6(SIX_VIP, 53).to_string().as_str()),
            "recvfrom() shows the ClusterIP: {outcome:?}"
        );
    }
    let after = lab.counters();
    assert!(
        counter(&after, "sock_translated") >= counter(&before, "sock_translated") + 15,
        "{before} -> {after}"
    );

    // Hairpin: web-0 through its own service, masqueraded to the node when it lands
    // on itself (else it would answer itself from its own address and never connect).
    let answers = lab
        .lab
        .pod("web-0")
        .netns
        .run(|| {
            (0..30)
                .map(|_| tcp_request(v6(SIX_VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("web-0 to its own service");
    let to_itself: Vec<_> = answers.iter().filter(|a| a.server == "web-0").collect();
    // Thirty picks of three miss web-0 with probability (2/3)^30, about 5e-6.
    assert!(!to_itself.is_empty(), "never chose itself: {answers:?}");
    for answer in to_itself {
        assert_eq!(answer.seen_client.ip(), IpAddr::V6(NODE_V6), "{answer:?}");
    }

    // Session affinity: one client, one backend.
    let sticky = client
        .run(|| {
            (0..20)
                .map(|_| tcp_request(v6(STICKY_VIP, 80), TIMEOUT).map(|answer| answer.server))
                .collect::<Result<BTreeSet<_>>>()
        })
        .expect("20 connections to the affinity service");
    assert_eq!(sticky.len(), 1, "{sticky:?}");

    // No endpoints: refused at once (ICMPv6 port unreachable), as kube-proxy's reject.
    let error = client
        .run(|| Ok(tcp_request(v6(EMPTY_VIP, 80), TIMEOUT)))
        .expect("run")
        .expect_err("nobody serves `empty`");
    assert_eq!(
        io_error_kind(&error),
        std::io::ErrorKind::ConnectionRefused,
        "{error:#}"
    );

    // NodePort from outside, TCP and UDP, on the node's IPv6 address.
    let answers = outside
        .run(|| {
            (0..20)
                .map(|_| tcp_request(v6(NODE_V6, 30080), TIMEOUT))
                .collect::<Result<Vec<_>>>()
        })
        .expect("TCP through the NodePort");
    let answered = servers(answers.iter().map(|answer| answer.server.as_str()));
    assert!(
        answered.len() >= 2 && answered.iter().all(|s| WEB.contains(&s.as_str())),
        "{answered:?}"
    );
    let (answer, from) = outside
        .run(|| udp_request(v6(NODE_V6, 30053), TIMEOUT))
        .expect("UDP through the NodePort");
    assert_eq!(
        from,
        v6(NODE_V6, 30053),
        "the reply comes from the NodePort"
    );
    assert!(WEB.contains(&answer.server.as_str()), "{answer:?}");

    // externalIP.
    let answer = outside
        .run(|| tcp_request(v6(EXTERNAL_V6, 80), TIMEOUT))
        .expect("the externalIP");
    assert!(WEB.contains(&answer.server.as_str()), "{answer:?}");

    // LoadBalancer, eTP Local: the local endpoint, the client's address kept; the
    // client is inside the source range. Its health check node port says 1 local
    // endpoint over IPv6.
    let answer = outside
        .run(|| tcp_request(v6(LB_V6, 80), TIMEOUT))
        .expect("the LoadBalancer IP lets its source range in");
    assert_eq!(answer.server, "web-0");
    assert_eq!(answer.seen_client.ip(), IpAddr::V6(OUTSIDE_V6));
    let (code, body) = outside
        .run(|| http_get(v6(NODE_V6, 32080), "/healthz"))
        .expect("the health check node port over IPv6");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    // The same client outside `ranged6`'s only range: dropped, not refused.
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

    // Removal: `gone6` answers, its manifest goes, its frontend goes, and it answers
    // no more.
    let answer = client
        .run(|| tcp_request(v6(GONE_VIP, 80), TIMEOUT))
        .expect("gone6 before its removal");
    assert_eq!(answer.server, "web-1");
    lab.lab.remove_manifest("gone6.yaml").expect("remove");
    lab.lab
        .wait_for("gone6's frontend to go", Duration::from_secs(10), || {
            let services = lab.lab.kpr(&["inspect", "services", "--json"])?;
            Ok(!services.contains(&v6(GONE_VIP, 80).to_string()))
        })
        .expect("gone6 removed from the maps");
    let gone = client
        .run(|| Ok(tcp_request(v6(GONE_VIP, 80), Duration::from_millis(700))))
        .expect("run");
    assert!(gone.is_err(), "a removed service answered: {gone:?}");
}

/// Established IPv6 connections, from a pod to a ClusterIP (TC path) and from outside
/// through a NodePort (masqueraded, the IPv6 SNAT port claim), survive an agent killed
/// with SIGKILL and restarted, then an upgrade in place (stopped keeping its state, a
/// new agent started over the pins); new connections are answered all along, also with
/// no agent running; `kpr cleanup` then removes every program and pin.
#[test]
fn ipv6_connections_survive_a_crash_and_an_upgrade_and_cleanup_removes_everything() {
    const POD_CONNECTIONS: usize = 100;
    const OUTSIDE_CONNECTIONS: usize = 20;
    let (mut lab, outside) = ipv6_only_lab().expect("lab");
    lab.start_agent(&AGENT_ARGS).expect("agent");
    lab.wait_attached().expect("attached");
    let open = |netns: &Netns, target: SocketAddr, count: usize| {
        netns
            .run(|| {
                (0..count)
                    .map(|_| {
                        let mut conversation = Conversation::open(target, TIMEOUT)?;
                        let server = conversation.ask()?.server;
                        Ok((conversation, server))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap_or_else(|error| panic!("connections to {target}: {error:#}"))
    };
    let mut conversations = open(&lab.pod("client").netns, v6(SIX_VIP, 80), POD_CONNECTIONS);
    conversations.extend(open(&outside, v6(NODE_V6, 30080), OUTSIDE_CONNECTIONS));
    let new_connections = NewConnections::start(&lab.pod("client").netns, v6(SIX_VIP, 80));

    new_connections.wait_answered(&lab, 20, "before the crash");
    lab.kill_agent().expect("kill");
    new_connections.wait_answered(&lab, 20, "with no agent running");
    let restart = Instant::now();
    let mut args = AGENT_ARGS.to_vec();
    args.push("--keep-state");
    lab.start_agent(&args).expect("restart after SIGKILL");
    let crash_restart = restart.elapsed();
    assert!(
        lab.agent_log()
            .contains("adopting the IPv6 maps of a previous agent"),
        "{}",
        lab.agent_log()
    );
    new_connections.wait_answered(&lab, 20, "after the restart");

    let upgrade = Instant::now();
    lab.stop_agent().expect("stop with --keep-state");
    assert!(lab.pin_dir().exists(), "--keep-state keeps the pins");
    lab.start_agent(&AGENT_ARGS).expect("start the new agent");
    let upgrade_restart = upgrade.elapsed();
    new_connections.wait_answered(&lab, 20, "after the upgrade");

    let (ok, failed, longest_gap) = new_connections.finish();
    let total = conversations.len();
    let kept = conversations
        .iter_mut()
        .map(|(conversation, server)| {
            conversation
                .ask()
                .is_ok_and(|answer| answer.server == *server)
        })
        .filter(|kept| *kept)
        .count();
    eprintln!(
        "IPv6-only restart figures: {kept} of {total} established connections kept \
         ({POD_CONNECTIONS} pod -> ClusterIP, {OUTSIDE_CONNECTIONS} outside -> NodePort); \
         new connections {ok} ok, {failed} failed; longest gap between new connections \
         {longest_gap:?}; crash restart took {crash_restart:?}, upgrade took {upgrade_restart:?}"
    );
    assert_eq!(kept, total, "established IPv6 connections broke");
    assert_eq!(failed, 0, "new IPv6 connections failed during the restarts");
    drop(conversations);

    // A crash leaves everything in place; `kpr cleanup` removes it all.
    lab.kill_agent().expect("kill");
    assert!(
        !lab.attached_programs().expect("query").is_empty(),
        "a killed agent leaves its programs"
    );
    lab.kpr(&["cleanup"]).expect("kpr cleanup");
    lab.wait_detached_and_unpinned()
        .expect("nothing left attached or pinned");
    let external = lab
        .attached_programs_on(&["ext0".to_owned()])
        .expect("tcx of ext0");
    assert!(external.is_empty(), "left on ext0: {external:?}");
}
