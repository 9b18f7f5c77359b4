//! Faults that must never flush the datapath (issue 11, items 5 and 6), each against
//! the real agent in the lab: what kube-proxy does (keep its rules, repair drift,
//! expose little) is the expected result.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use kpr_lab::{
    lab::{Lab, HEALTHZ, METRICS},
    scenario::{examples_dir, lab_for_manifests, lab_without_agent, sock, CLIENT_IP},
    traffic::tcp_request,
};
use proxy_common::names;
use proxy_userspace::{
    agent::{self, AgentConfig},
    model::ModelSettings,
    source::{self, manifests::parse_documents, Snapshot, SourceConfig},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A service the tests add to the examples.
const EXTRA_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
const TIMEOUT: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

/// A Service `name` on `vip:80` with one endpoint, web-0 (10.244.1.11:8080) of the
/// examples' pods.
fn one_endpoint_service(namespace: &str, name: &str, vip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {vip}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
---
{} [{{addresses: [10.244.1.11], conditions: {{ready: true}}}}]
",
        slice_up_to_endpoints(namespace, name)
    )
}

/// The EndpointSlice `namespace/name-1` of Service `name` (port http, 8080/TCP), up to
/// and including its `endpoints:` key.
fn slice_up_to_endpoints(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:"
    )
}

fn request_from(lab: &Lab, pod: &str, to: SocketAddrV4) -> anyhow::Result<String> {
    Ok(lab.pod(pod).netns.run(|| tcp_request(to, TIMEOUT))?.server)
}

/// Writes `file`: a [`one_endpoint_service`] `namespace/name` on `vip:80`; then waits
/// until the client pod gets an answer through it.
fn add_service_and_wait(
    lab: &Lab,
    file: &str,
    (namespace, name): (&str, &str),
    vip: Ipv4Addr,
) -> anyhow::Result<()> {
    lab.write_manifest(file, &one_endpoint_service(namespace, name, vip))?;
    lab.wait_for(&format!("{namespace}/{name} to answer"), WAIT, || {
        Ok(request_from(lab, "client", sock(vip, 80)).is_ok())
    })
    .map(drop)
}

fn service_map_entries(lab: &Lab) -> Option<f64> {
    lab.metric("kpr_map_entries{map=\"SVC_V4_V1\"}")
        .expect("metrics")
}

#[test]
fn a_removed_and_recreated_manifests_directory_changes_nothing_and_is_followed_again() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
    let entries = service_map_entries(&lab);
    assert!(entries.is_some_and(|n| n > 0.0), "{entries:?}");

    std::fs::remove_dir_all(lab.manifests_dir()).expect("remove the manifests directory");
    lab.wait_for("the failed read to be counted", WAIT, || {
        Ok(lab
            .metric("kpr_source_read_failures_total{reason=\"not_found\"}")?
            .is_some_and(|n| n >= 1.0))
    })
    .expect("a read failure, logged and counted");
    // kube-proxy's column: an unreadable source changes nothing.
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web still answers");
    assert_eq!(
        service_map_entries(&lab),
        entries,
        "the service map changed"
    );
    assert_eq!(lab.healthz().expect("healthz").0, 200);
    assert!(
        lab.agent_log()
            .contains("the manifests directory cannot be read"),
        "{}",
        lab.agent_log()
    );

    // Created again, with the same files and one more: followed again.
    std::fs::create_dir(lab.manifests_dir()).expect("create it again");
    lab.copy_manifests(&examples_dir()).expect("the same files");
    add_service_and_wait(&lab, "extra.yaml", ("demo", "extra"), EXTRA_VIP)
        .expect("the recreated directory is followed");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
}

#[test]
fn when_the_source_ends_the_datapath_stays_and_the_agent_exits_with_an_error() {
    let mut lab = Lab::new().expect("lab");
    lab.add_pod("client", CLIENT_IP).expect("client pod");
    lab.add_pod("web-0", Ipv4Addr::new(10, 244, 1, 11))
        .expect("backend pod");
    lab.serve("web-0", 8080).expect("serve");
    let mut snapshot = Snapshot::for_node(Some(&lab.node_name));
    parse_documents(
        &one_endpoint_service("demo", "web", WEB_VIP),
        "test",
        &mut snapshot,
    );
    let config = AgentConfig {
        // Unused: the test is the source.
        source: SourceConfig::Manifests(lab.manifests_dir()),
        node_name: Some(lab.node_name.clone()),
        pin_dir: lab.pin_dir(),
        pod_interfaces: vec!["veth*".into()],
        node_interfaces: Some(Vec::new()),
        node_port_filters: Vec::new(),
        node_ip: None,
        node_ip_v6: None,
        cluster_cidr_v6: None,
        cgroup_path: None,
        socket_lb: proxy_userspace::socket_lb::Mode::All,
        service_counters: proxy_userspace::service_counters::Mode::Auto,
        keep_state: false,
        conntrack_max: None,
        service_cidr: proxy_common::ServiceCidrV4::default(),
        map_sizes: proxy_userspace::agent::MapSizes::default(),
        datapath: proxy_common::DatapathConfig::DEFAULT,
        conntrack_gc_interval: Duration::from_secs(10),
        sync_period: Duration::from_secs(30),
        model: ModelSettings::default(),
        healthz_bind_address: None,
        metrics_bind_address: None,
        health_check_addresses: Vec::new(),
    };
    let (snapshots, receiver) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let mut receiver = receiver;
    receiver.mark_unchanged();
    // The agent in this process, on a thread of the node's namespace.
    let agent = lab
        .node
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(agent::run_on(
                config,
                source::Running::new(receiver),
                std::future::pending(),
            ))
        })
        .expect("agent thread");
    snapshots
        .send(Arc::new(snapshot))
        .expect("the agent receives");
    lab.wait_attached().expect("programs attached");
    lab.wait_for("web to answer", WAIT, || {
        Ok(request_from(&lab, "client", sock(WEB_VIP, 80)).is_ok())
    })
    .expect("web answers");

    drop(snapshots);
    let result = agent
        .join()
        .expect("agent thread")
        .expect("in the namespace");
    let error = result.expect_err("a source that ends is an error (a non-zero exit)");
    assert!(format!("{error:#}").contains("stopped"), "{error:#}");
    for map in [names::SERVICES_V4, names::BACKENDS_V4, names::CONNTRACK_V4] {
        assert!(lab.pin_dir().join(map).exists(), "{map} unpinned");
    }
    assert_eq!(
        request_from(&lab, "client", sock(WEB_VIP, 80)).expect("the datapath stays"),
        "web-0"
    );
}

/// Raises this test process's soft open files limit to its hard one: it holds more
/// connections than the usual soft limit of 1024.
fn raise_own_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit), 0);
    }
}

/// The soft open files limit of process `pid`.
fn open_files_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or_else(|| panic!("no open files limit in\n{limits}"))
}

#[test]
fn idle_connections_to_the_health_and_metrics_ports_never_cost_the_datapath() {
    const IDLE: usize = 1100;
    raise_own_open_files_limit();
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    // A container runtime's usual limits: soft 1024, and a hard one to raise it to.
    lab.set_agent_open_files_limit(1024, 2048);
    lab.start_agent(&[]).expect("agent");
    lab.wait_attached().expect("attached");
    let pid = lab.agent_pid().expect("running");
    assert_eq!(
        open_files_limit(pid),
        2048,
        "the agent raises its soft limit"
    );

    // More idle connections than the raised limit, through both ports. A connect may
    // time out (a listener that stopped accepting leaves the queue full).
    let (idle, refused) = lab
        .node
        .run(|| {
            let mut idle = Vec::new();
            let mut refused = 0;
            for addr in [HEALTHZ, METRICS] {
                for _ in 0..IDLE {
                    match std::net::TcpStream::connect_timeout(&addr.into(), TIMEOUT) {
                        Ok(stream) => idle.push(stream),
                        Err(_) => refused += 1,
                    }
                }
            }
            Ok((idle, refused))
        })
        .expect("connections");
    eprintln!("{} idle connections open, {refused} not", idle.len());

    // kube-proxy's column: the rules stay and follow changes.
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
    add_service_and_wait(&lab, "extra.yaml", ("demo", "extra"), EXTRA_VIP)
        .expect("a change is applied under the flood");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web still answers");
    // A pod created now gets its programs.
    lab.add_pod("late", Ipv4Addr::new(10, 244, 1, 50))
        .expect("a new pod");
    lab.wait_attached()
        .expect("the new pod's interface gets programs");
    lab.wait_for("the new pod to reach web", WAIT, || {
        Ok(request_from(&lab, "late", sock(WEB_VIP, 80)).is_ok())
    })
    .expect("the new pod reaches web");
    // The listeners' bound turned the flood away; health answers again.
    lab.wait_for("the health port to answer", WAIT, || {
        Ok(lab.healthz()?.0 == 200)
    })
    .expect("healthy");
    lab.wait_for("the rejected connections to be counted", WAIT, || {
        Ok(lab
            .metric("kpr_http_connections_rejected_total{server=\"healthz\"}")?
            .is_some_and(|n| n > 0.0))
    })
    .expect("the bound turned connections away");
    drop(idle);
}

#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_the_first_keeps_them() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let entries = service_map_entries(&lab);
    let first = lab.agent_pid().expect("running");
    // The second agent would sync an empty view over the first one's maps.
    let empty = lab.run_dir().join("empty");
    std::fs::create_dir_all(&empty).expect("an empty manifests directory");
    let binary = kpr_lab::lab::agent_binary().expect("kpr");
    let mut second = std::process::Command::new("ip")
        .args(["netns", "exec", lab.node.name()])
        .arg(&binary)
        .arg("run")
        .arg("--manifests")
        .arg(&empty)
        .arg("--bpffs")
        .arg(lab.pin_dir())
        .args(["--node-name", &lab.node_name])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the second agent");
    let exited = lab.wait_for("the second agent to exit", WAIT, || {
        Ok(second.try_wait()?.is_some())
    });
    if exited.is_err() {
        let _ = second.kill();
    }
    let output = second.wait_with_output().expect("its output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        exited.is_ok(),
        "the second agent was not refused:\n{stderr}"
    );
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("already uses the pin directory") && stderr.contains(&first.to_string()),
        "no clear error naming the first agent:\n{stderr}"
    );
    // The first agent is unharmed: its pins, its maps, its traffic.
    for map in [names::SERVICES_V4, names::BACKENDS_V4, names::CONNTRACK_V4] {
        assert!(lab.pin_dir().join(map).exists(), "{map} unpinned");
    }
    assert_eq!(service_map_entries(&lab), entries);
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
    // `kpr cleanup` is refused too while the agent runs.
    let cleanup = std::process::Command::new(&binary)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(lab.pin_dir())
        .output()
        .expect("kpr cleanup");
    assert!(!cleanup.status.success());
    assert!(lab.pin_dir().join(names::SERVICES_V4).exists());
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web still answers");
}

/// A Service `namespace/name` on `vips` (the first its ClusterIP, the others
/// externalIPs), port 80, with `endpoints` ready endpoints from `first` on, in one
/// slice (more than the API puts in one; the model merges slices anyway).
fn big_service(
    namespace: &str,
    name: &str,
    vips: &[Ipv4Addr],
    first: Ipv4Addr,
    endpoints: u32,
) -> String {
    let external: Vec<String> = vips[1..].iter().map(ToString::to_string).collect();
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {}
  externalIPs: [{}]
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
---
{}
",
        vips[0],
        external.join(", "),
        slice_up_to_endpoints(namespace, name)
    );
    for i in 0..endpoints {
        let ip = Ipv4Addr::from(u32::from(first) + i);
        yaml.push_str(&format!(
            "- {{addresses: [{ip}], conditions: {{ready: true}}}}\n"
        ));
    }
    yaml
}

/// The slot count of the frontend `vip:80/TCP` in the pinned service map, read from
/// the kernel.
fn programmed_count(lab: &Lab, vip: Ipv4Addr) -> Option<u16> {
    let map = lab.pinned_service_map().expect("the service map");
    let key = proxy_common::ServiceKeyV4 {
        addr: proxy_common::Be32::from_ipv4(vip),
        port: proxy_common::Be16::from_host(80),
        slot: 0,
        proto: proxy_common::proto::TCP,
        scope: proxy_common::scope::DEFAULT,
        _pad: [0; 2],
    };
    map.get(&key, 0).ok().map(|value| value.count)
}

#[test]
fn a_service_that_does_not_fit_blocks_no_other_and_is_programmed_once_room_is_made() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    let vip = |third: u8, fourth: u8| Ipv4Addr::new(10, 96, third, fourth);
    let vips = |third: u8, count: u8| (1..=count).map(|i| vip(third, i)).collect::<Vec<_>>();
    // aaa/huge: 64 frontends of 3 000 backends, 192 064 of the 262 144 entries
    // (70 071 left beside the examples' 9).
    lab.write_manifest(
        "huge.yaml",
        &big_service(
            "aaa",
            "huge",
            &vips(1, 64),
            Ipv4Addr::new(10, 100, 0, 1),
            3_000,
        ),
    )
    .expect("write");
    lab.wait_for("aaa/huge to be programmed", WAIT, || {
        Ok(programmed_count(&lab, vip(1, 64)) == Some(3_000))
    })
    .expect("huge programmed");
    // bbb/big: 30 frontends of 2 501 entries; 28 fit, the last two do not. ccc/small,
    // sorting after them, needs 2.
    lab.write_manifest(
        "big.yaml",
        &big_service(
            "bbb",
            "big",
            &vips(2, 30),
            Ipv4Addr::new(10, 101, 0, 1),
            2_500,
        ),
    )
    .expect("write");
    add_service_and_wait(&lab, "small.yaml", ("ccc", "small"), vip(3, 1))
        .expect("a small service after the ones that do not fit is programmed");
    lab.wait_for("bbb/big's refusals to be reported", WAIT, || {
        Ok(lab.metric("kpr_frontends_unprogrammed{reason=\"map_full\"}")? == Some(2.0))
    })
    .expect("the refusals are counted");
    assert_eq!(programmed_count(&lab, vip(2, 28)), Some(2_500));
    for refused in [vip(2, 29), vip(2, 30)] {
        assert_eq!(
            programmed_count(&lab, refused),
            None,
            "{refused} written partly"
        );
    }
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
    // Still room for small services.
    add_service_and_wait(&lab, "small2.yaml", ("ddd", "small"), vip(4, 1))
        .expect("small services keep being programmed");

    // Room is made: bbb/big's last frontends go in, with nothing else changing.
    lab.remove_manifest("huge.yaml").expect("remove");
    lab.wait_for("bbb/big to be programmed", WAIT, || {
        Ok(programmed_count(&lab, vip(2, 30)) == Some(2_500))
    })
    .expect("retried once there is room");
    assert_eq!(programmed_count(&lab, vip(2, 29)), Some(2_500));
    lab.wait_for("no frontend to be left unprogrammed", WAIT, || {
        Ok(lab.metric("kpr_frontends_unprogrammed{reason=\"map_full\"}")? == Some(0.0))
    })
    .expect("reported programmed");
    request_from(&lab, "client", sock(vip(3, 1), 80)).expect("ccc/small answers");
}

#[test]
fn an_external_ip_on_another_services_cluster_ip_is_refused_and_reported_on_its_service() {
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    lab.add_pod("evil", Ipv4Addr::new(10, 244, 1, 66))
        .expect("pod");
    lab.serve("evil", 8080).expect("serve");
    // aaa/evil sorts before demo/web, and names web's ClusterIP as its externalIP.
    let evil = one_endpoint_service("aaa", "evil", Ipv4Addr::new(10, 96, 0, 88))
        .replace(
            "  clusterIP: 10.96.0.88\n",
            "  clusterIP: 10.96.0.88\n  externalIPs: [10.96.0.10]\n",
        )
        .replace("10.244.1.11", "10.244.1.66");
    lab.write_manifest("evil.yaml", &evil).expect("write");
    lab.start_agent(&[]).expect("agent");
    lab.wait_attached().expect("attached");
    for _ in 0..20 {
        let server = request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
        assert!(
            server.starts_with("web-"),
            "{server} answered web's ClusterIP"
        );
    }
    assert_eq!(
        request_from(&lab, "client", sock(Ipv4Addr::new(10, 96, 0, 88), 80))
            .expect("evil's own ClusterIP"),
        "evil"
    );
    assert_eq!(
        lab.metric("kpr_skipped_objects{reason=\"frontend_conflict\"}")
            .expect("metrics"),
        Some(1.0)
    );
    let log = lab.agent_log();
    let reported = log
        .lines()
        .find(|line| line.contains("frontend_conflict"))
        .unwrap_or_default();
    assert!(
        reported.contains("aaa/evil") && reported.contains("10.96.0.10:80"),
        "the conflict is reported on the loser:\n{log}"
    );
}

/// The service map key of `vip:port/TCP`'s frontend entry.
fn frontend_key(vip: Ipv4Addr, port: u16) -> proxy_common::ServiceKeyV4 {
    proxy_common::ServiceKeyV4 {
        addr: proxy_common::Be32::from_ipv4(vip),
        port: proxy_common::Be16::from_host(port),
        slot: 0,
        proto: proxy_common::proto::TCP,
        scope: proxy_common::scope::DEFAULT,
        _pad: [0; 2],
    }
}

#[test]
fn entries_and_pins_changed_behind_the_agents_back_are_repaired_by_the_periodic_resync() {
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    lab.start_agent(&["--sync-period-ms", "500"])
        .expect("agent");
    lab.wait_attached().expect("attached");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");

    // What `bpftool map delete` would do: web's frontend entry goes, and a map pin.
    let mut services = lab.pinned_service_map().expect("the service map");
    services
        .remove(&frontend_key(WEB_VIP, 80))
        .expect("delete web's frontend entry");
    assert!(
        request_from(&lab, "client", sock(WEB_VIP, 80)).is_err(),
        "web answers without its frontend entry"
    );
    let backends_pin = lab.pin_dir().join(names::BACKENDS_V4);
    std::fs::remove_file(&backends_pin).expect("unpin the backend map");
    // And a link pin: the program stays attached while the agent holds the link, but
    // would be detached when it exits.
    let link_pin = std::fs::read_dir(lab.pin_dir().join("links"))
        .expect("the link pins")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().ends_with(":pod-ingress"))
        .expect("a pod-ingress link pin");
    std::fs::remove_file(&link_pin).expect("unpin a link");

    // kube-proxy's column: the periodic full sync puts it back.
    lab.wait_for("web to answer again", WAIT, || {
        Ok(request_from(&lab, "client", sock(WEB_VIP, 80)).is_ok())
    })
    .expect("the entry is repaired");
    lab.wait_for("the backend map to be pinned again", WAIT, || {
        Ok(backends_pin.exists())
    })
    .expect("the pin is repaired");
    lab.wait_for(
        "the link to be pinned again",
        WAIT,
        || Ok(link_pin.exists()),
    )
    .expect("the link pin is repaired");
    aya::programs::links::PinnedLink::from_pin(&link_pin).expect("the pin is a link");
    // The pin names the map in use: the examples' six backends are in it.
    let backends = aya::maps::HashMap::<_, u32, proxy_common::BackendV4>::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&backends_pin).expect("open")),
    )
    .expect("the backend map");
    assert_eq!(backends.keys().count(), 6);
    lab.wait_for("the repairs to be counted", WAIT, || {
        let metrics = lab.metrics()?;
        let entries = kpr_lab::lab::sample(
            &metrics,
            "kpr_datapath_drift_repaired_total{map=\"SVC_V4_V1\",kind=\"entries\"}",
        );
        let pins = kpr_lab::lab::sample(
            &metrics,
            "kpr_datapath_drift_repaired_total{map=\"BACKEND_V4_V1\",kind=\"pin\"}",
        );
        let links = kpr_lab::lab::sample(
            &metrics,
            "kpr_datapath_drift_repaired_total{map=\"links\",kind=\"pin\"}",
        );
        Ok(entries.is_some_and(|n| n >= 1.0) && pins == Some(1.0) && links == Some(1.0))
    })
    .expect("counted");
    assert!(lab.agent_log().contains("repairing"), "logged");
}

/// The frontend address set is read back off the event loop with the other maps: an
/// address deleted behind the agent's back (pod ingress then passes the ClusterIP's
/// packets untranslated) is put back by the periodic resync and counted.
#[test]
fn a_frontend_address_deleted_behind_the_agents_back_is_repaired_by_the_periodic_resync() {
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    lab.start_agent(&["--sync-period-ms", "500"])
        .expect("agent");
    lab.wait_attached().expect("attached");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");

    let pin = lab.pin_dir().join(names::FRONTEND_ADDRS_V4);
    let mut addrs = aya::maps::HashMap::<_, u32, proxy_common::FrontendAddrV4>::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pin).expect("open the set")),
    )
    .expect("the frontend address set");
    let web = proxy_common::Be32::from_ipv4(WEB_VIP).0;
    addrs.remove(&web).expect("delete web's address");

    lab.wait_for("web's address to be written again", WAIT, || {
        Ok(addrs.get(&web, 0).is_ok())
    })
    .expect("the address is repaired");
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers again");
    lab.wait_for("the repair to be counted", WAIT, || {
        let metrics = lab.metrics()?;
        Ok(kpr_lab::lab::sample(
            &metrics,
            "kpr_datapath_drift_repaired_total{map=\"FE_ADDR_V4_V1\",kind=\"entries\"}",
        )
        .is_some_and(|n| n >= 1.0))
    })
    .expect("counted");
    assert!(lab.agent_log().contains("repairing"), "logged");
}

#[test]
fn a_deeply_nested_manifest_is_refused_at_once_and_health_stays_answered() {
    let lab = lab_for_manifests(&examples_dir()).expect("lab");
    // 200 KB of `[`: libyaml alone takes half a minute over it.
    let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    lab.write_manifest("deep.yaml", &deep).expect("write");
    lab.write_manifest(
        "extra.yaml",
        &one_endpoint_service("demo", "extra", EXTRA_VIP),
    )
    .expect("a change after it");
    // Every health request is answered (within the client's 2 s read timeout) while
    // the file is read, and the change behind it is applied.
    lab.wait_for("the change after the deep file to be applied", WAIT, || {
        let (code, _) = lab.healthz()?;
        anyhow::ensure!(code == 200, "healthz answered {code}");
        Ok(request_from(&lab, "client", sock(EXTRA_VIP, 80)).is_ok())
    })
    .expect("health answered and the change applied");
    assert_eq!(
        lab.metric("kpr_skipped_objects{reason=\"unreadable_source\"}")
            .expect("metrics"),
        Some(1.0)
    );
    assert!(lab.agent_log().contains("nested deeper than 128"));
    request_from(&lab, "client", sock(WEB_VIP, 80)).expect("web answers");
}

/// Every pin under `dir` (recursively) with its permission bits.
fn pin_modes(dir: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut modes = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("the pin directory") {
            let entry = entry.expect("an entry");
            let meta = entry.metadata().expect("metadata");
            let name = entry
                .path()
                .strip_prefix(dir.as_path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            modes.push((name, meta.permissions().mode() & 0o7777));
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    modes
}

#[test]
fn metrics_listen_on_the_loopback_by_default_and_pins_are_the_owners_only() {
    let mut lab = lab_without_agent(&examples_dir()).expect("lab");
    lab.use_default_metrics_address();
    lab.start_agent(&[]).expect("agent");
    lab.wait_attached().expect("attached");
    // kube-proxy's default: 127.0.0.1:10249. The node answers on it...
    assert!(lab
        .metrics()
        .expect("metrics on the loopback")
        .contains("kpr_map_entries"));
    // ...and a pod reaching the node's address does not get in.
    let from_pod = lab.pod("client").netns.run(|| {
        Ok(std::net::TcpStream::connect_timeout(
            &SocketAddrV4::new(kpr_lab::lab::GATEWAY, METRICS.port()).into(),
            TIMEOUT,
        ))
    });
    assert!(
        from_pod.expect("in the pod").is_err(),
        "a pod reached the metrics port"
    );
    // The pins are readable and writable by their owner (root) only; what the README's
    // security section says.
    let modes = pin_modes(&lab.pin_dir());
    assert!(modes.len() > 9, "{modes:?}");
    for (name, mode) in &modes {
        if name == "links" {
            assert_eq!(mode & 0o022, 0, "{name}: {mode:o} is writable by others");
        } else {
            assert_eq!(*mode, 0o600, "{name}: {mode:o} ({modes:?})");
        }
    }
    let dir_mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(lab.pin_dir())
            .expect("the pin directory")
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(dir_mode, 0o700);
}
