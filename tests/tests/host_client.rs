//! Host-network clients (kubelet, hostNetwork pods) in the lab: processes in the node's
//! network namespace, which never cross a pod interface, reach ClusterIPs through the
//! cgroup v2 socket-layer hooks, and see the ClusterIP as their peer.
//!
//! Each test makes a cgroup of its own (named with the lab's prefix, under the machine's
//! cgroup2 mount), points the agent at it with `--cgroup-path`, and runs
//! `kpr-host-client` processes in the node namespace, inside that cgroup and outside it.
//! Nothing is attached to any other cgroup; the cgroup is removed at the end, also when
//! a test fails.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use kpr_lab::{
    host::Mode,
    lab::GATEWAY,
    scenario::sock,
    socket_lab::{answered_by, assert_peer, hooks, metric, plain_log, SocketLab, DEADLINE},
};
use proxy_userspace::datapath::cgroup::SockHook;

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const NOBODY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
/// A UDP service without endpoints, added by the test.
const NOBODY_UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 98);
const WEB_BACKENDS: [&str; 3] = ["web-0", "web-1", "web-2"];

fn host_lab() -> SocketLab {
    SocketLab::new(Path::new(env!("CARGO_BIN_EXE_kpr-host-client")), &[])
}

#[test]
fn host_clients_in_the_cgroup_reach_cluster_ips_and_see_the_frontend() {
    let mut host = host_lab();
    // Host clients only: pods stay on the TC path (socket_lb.rs covers `all`).
    host.start_agent(&["--socket-lb", "host"]);
    let web = sock(WEB_VIP, 80);
    let dns = sock(DNS_VIP, 53);

    // TCP: the connection goes straight to a backend, which sees the node's own
    // address; getpeername() shows the ClusterIP the client asked for.
    let tcp = host.client(true, Mode::Tcp, web, 30);
    let servers = answered_by(&tcp, &WEB_BACKENDS);
    assert!(servers.len() >= 2, "30 connections all went to {servers:?}");
    assert_peer(&tcp, "10.96.0.10:80");
    for outcome in &tcp {
        let seen: SocketAddrV4 = outcome
            .seen_client
            .as_deref()
            .and_then(|seen| seen.parse().ok())
            .unwrap_or_else(|| panic!("{outcome:?}"));
        assert_eq!(
            *seen.ip(),
            GATEWAY,
            "the backend sees the node: {outcome:?}"
        );
    }

    // UDP, connected and unconnected: recvfrom() reports the ClusterIP as the source
    // (and getpeername() as the peer) although the datagrams went to and came from a
    // backend.
    for mode in [Mode::UdpConnected, Mode::UdpUnconnected] {
        let udp = host.client(true, mode, dns, 10);
        answered_by(&udp, &WEB_BACKENDS);
        for outcome in &udp {
            assert_eq!(
                outcome.source.as_deref(),
                Some("10.96.0.53:53"),
                "{mode:?}: {outcome:?}"
            );
            let expected_peer = (mode == Mode::UdpConnected).then_some("10.96.0.53:53");
            assert_eq!(
                outcome.peer.as_deref(),
                expected_peer,
                "{mode:?}: {outcome:?}"
            );
        }
    }

    // A service without endpoints refuses at once, as kube-proxy's REJECT does.
    for outcome in host.client(true, Mode::Tcp, sock(NOBODY_VIP, 80), 3) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }
    // Likewise for UDP, on connect() and on sendto().
    host.lab
        .write_manifest(
            "nobody-udp.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: nobody-udp, namespace: demo}\n\
             spec:\n  clusterIP: 10.96.0.98\n  selector: {app: nobody}\n  \
             ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]\n",
        )
        .expect("write");
    host.lab
        .wait_for("the endpoint-less UDP service", DEADLINE, || {
            let outcomes = host.client(true, Mode::UdpUnconnected, sock(NOBODY_UDP_VIP, 53), 1);
            Ok(outcomes
                .iter()
                .all(|outcome| outcome.errno == Some(libc::ECONNREFUSED)))
        })
        .expect("sendto() to an endpoint-less UDP service is refused");
    for outcome in host.client(true, Mode::UdpConnected, sock(NOBODY_UDP_VIP, 53), 2) {
        assert_eq!(outcome.errno, Some(libc::ECONNREFUSED), "{outcome:?}");
    }

    // A process outside the cgroup is not translated: the node has no route to a
    // ClusterIP, so its connect() fails at once with ENETUNREACH, where a translated
    // one would have reached a backend. The same process reaches a backend directly,
    // so the failure is the missing translation, not the client.
    for outcome in host.client(false, Mode::Tcp, web, 3) {
        assert_eq!(outcome.errno, Some(libc::ENETUNREACH), "{outcome:?}");
    }
    let direct = host.client(
        false,
        Mode::Tcp,
        sock(Ipv4Addr::new(10, 244, 1, 11), 8080),
        1,
    );
    assert_eq!(
        answered_by(&direct, &WEB_BACKENDS),
        BTreeSet::from(["web-0"])
    );
    assert_eq!(direct[0].peer.as_deref(), Some("10.244.1.11:8080"));

    // With `--socket-lb host`, a pod's process in the cgroup is left to the TC
    // programs: the cgroup tree holds pods as well as host processes, but only the
    // node's namespace is translated at the socket layer. The pod still reaches the
    // ClusterIP, through TC.
    let before = host.counters();
    let pod_netns = host.lab.pod("client").netns.path();
    let from_pod = host.client_in(&pod_netns, true, Mode::Tcp, web, 3);
    answered_by(&from_pod, &WEB_BACKENDS);
    assert_peer(&from_pod, "10.96.0.10:80");
    let after = host.counters();
    assert_eq!(
        after["sock_translated"], before["sock_translated"],
        "a pod's socket was translated by the cgroup hook"
    );
    let new_flows = |counters: &serde_json::Value| counters["new_flow"].as_u64().unwrap_or(0);
    assert!(
        new_flows(&after) >= new_flows(&before) + 3,
        "the pod's connections went through TC: {before} -> {after}"
    );

    // The metrics show the hooks and count the translations and refusals.
    let interface = format!("cgroup:{}", host.cgroup.path().display());
    let mut metrics = String::new();
    host.lab
        .wait_for("the socket-layer counters in the metrics", DEADLINE, || {
            metrics = host.lab.metrics()?;
            Ok(metric(
                &metrics,
                "kpr_datapath_events_total{event=\"sock_translated\"}",
            )
            .is_some_and(|n| n >= 50.0)
                && metric(
                    &metrics,
                    "kpr_datapath_events_total{event=\"sock_rejected\"}",
                )
                .is_some_and(|n| n >= 5.0))
        })
        .expect("sock counters exported");
    for hook in SockHook::ALL {
        let labels = format!(
            "kpr_programs_attached{{interface=\"{interface}\",hook=\"{}\"}}",
            hook.label()
        );
        assert_eq!(metric(&metrics, &labels), Some(1.0), "{labels}:\n{metrics}");
    }
    let log = plain_log(&host.lab);
    assert!(
        log.lines()
            .any(|line| line.contains("socket-layer hooks go on this cgroup")
                && line.contains(&format!("cgroup={}", host.cgroup.path().display()))),
        "the agent logs which cgroup it hooks:\n{log}"
    );
}

/// Program ids per hook, asserting exactly one program per hook (no duplicate attach).
fn one_program_per_hook(cgroup: &Path) -> Vec<u32> {
    let attached = hooks(cgroup);
    SockHook::ALL
        .iter()
        .map(|hook| {
            let ids: Vec<u32> = attached
                .iter()
                .filter(|(attached_hook, _)| attached_hook == hook)
                .map(|(_, id)| *id)
                .collect();
            assert_eq!(ids.len(), 1, "{hook:?}: {attached:?}");
            ids[0]
        })
        .collect()
}

/// One TCP request through the hooks answers and shows the ClusterIP.
fn assert_translated(host: &SocketLab, when: &str) {
    let outcomes = host.client(true, Mode::Tcp, sock(WEB_VIP, 80), 3);
    for outcome in &outcomes {
        assert!(outcome.server.is_some(), "{when}: {outcome:?}");
        assert_eq!(
            outcome.peer.as_deref(),
            Some("10.96.0.10:80"),
            "{when}: {outcome:?}"
        );
    }
}

#[test]
fn keep_state_restarts_adopt_the_cgroup_links_and_stops_unconfigured_agents_and_cleanup_detach_them(
) {
    let mut host = host_lab();
    let cgroup_path = host.cgroup.path().to_path_buf();
    host.start_agent(&["--keep-state"]);
    let first = one_program_per_hook(&cgroup_path);
    assert_translated(&host, "first agent");

    // SIGTERM with --keep-state: the hooks stay attached and keep translating with no
    // agent running.
    host.lab.stop_agent().expect("stop with --keep-state");
    assert_eq!(one_program_per_hook(&cgroup_path), first);
    assert_translated(&host, "no agent, state kept");

    // The next agent takes the pinned links over and swaps its own programs in: still
    // exactly one program per hook, now the new ones.
    host.start_agent(&[]);
    let second = one_program_per_hook(&cgroup_path);
    for (old, new) in first.iter().zip(&second) {
        assert_ne!(
            old, new,
            "the new agent's programs run: {first:?} -> {second:?}"
        );
    }
    let log = plain_log(&host.lab);
    assert_eq!(
        log.lines()
            .filter(|line| line.contains("adopted the pinned link") && line.contains("cgroup="))
            .count(),
        SockHook::ALL.len(),
        "{log}"
    );
    assert_translated(&host, "after adoption");

    // A normal stop detaches the hooks and removes every pin.
    host.lab.stop_agent().expect("stop");
    host.lab
        .wait_for("the cgroup hooks to be detached", DEADLINE, || {
            Ok(hooks(&cgroup_path).is_empty())
        })
        .expect("detached after a normal stop");
    host.lab
        .wait_detached_and_unpinned()
        .expect("nothing left attached or pinned");
    for outcome in host.client(true, Mode::Tcp, sock(WEB_VIP, 80), 1) {
        assert_eq!(outcome.errno, Some(libc::ENETUNREACH), "{outcome:?}");
    }

    // An agent started without --cgroup-path removes hooks an earlier one left.
    host.start_agent(&["--keep-state"]);
    host.lab.stop_agent().expect("stop with --keep-state");
    one_program_per_hook(&cgroup_path);
    host.lab
        .start_agent(&[])
        .expect("agent without --cgroup-path");
    host.lab
        .wait_for(
            "the left-over cgroup hooks to be detached",
            DEADLINE,
            || Ok(hooks(&cgroup_path).is_empty()),
        )
        .expect("an agent without --cgroup-path detaches earlier hooks");
    host.lab.stop_agent().expect("stop");

    // After a crash the hooks stay; `kpr cleanup` removes them.
    host.start_agent(&[]);
    host.lab.kill_agent().expect("kill");
    one_program_per_hook(&cgroup_path);
    let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
        .arg("cleanup")
        .arg("--bpffs")
        .arg(host.lab.pin_dir())
        .output()
        .expect("kpr cleanup");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    host.lab
        .wait_for("the cgroup hooks to be detached", DEADLINE, || {
            Ok(hooks(&cgroup_path).is_empty())
        })
        .expect("detached by kpr cleanup");
    host.lab
        .wait_detached_and_unpinned()
        .expect("nothing left attached or pinned");
}

#[test]
fn a_cgroup_path_that_is_no_cgroup_stops_the_agent_at_start() {
    kpr_lab::require_root();
    let dir = std::env::temp_dir().join(format!("kpr-cgroup-path-{}", std::process::id()));
    let not_a_cgroup = dir.join("not-a-cgroup");
    std::fs::create_dir_all(&not_a_cgroup).expect("dir");
    let output = std::process::Command::new(kpr_lab::lab::agent_binary().expect("kpr"))
        .args(["run", "--manifests"])
        .arg(&dir)
        .arg("--cgroup-path")
        .arg(&not_a_cgroup)
        // Not a bpffs either, and no servers: nothing could be pinned or bound even if
        // the check were missing.
        .arg("--bpffs")
        .arg(dir.join("pins"))
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("run kpr");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted: {stderr}");
    assert!(stderr.contains("cgroup v2"), "{stderr}");
}
