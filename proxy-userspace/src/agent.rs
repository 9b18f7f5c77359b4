//! The agent's main loop: load and adopt the datapath, follow the source, keep maps and
//! attachments in step, reap conntrack, and leave the node clean on exit.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use proxy_common::DatapathConfig;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        attach::Attachments,
        cgroup::{self, CgroupHooks},
        conntrack,
        interfaces::{self, LinkEvents},
        node_network::{self, NodeNetwork, NodePortFilter},
        Datapath, Hook, LoadOptions,
    },
    health::{self, SyncHealth},
    healthcheck::HealthCheckServers,
    metrics::{AttachLabels, MapLabels, Metrics, ReasonLabels},
    model::{self, Diagnostic, DiagnosticReason, ModelSettings, ServiceHealth},
    socket_lb,
    source::{
        self,
        manifests::{self, Snapshot},
        SourceConfig,
    },
    sync::Syncer,
    takeover::{self, KernelSupport, Takeover},
};

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where Services, EndpointSlices and the Node come from.
    pub source: SourceConfig,
    /// This node's name (local endpoints, topology).
    pub node_name: Option<String>,
    /// Pin directory on a bpffs.
    pub pin_dir: PathBuf,
    /// Interfaces facing pods (exact names or `prefix*`).
    pub pod_interfaces: Vec<String>,
    /// The node's external interfaces (exact names or `prefix*`); `None`: those that
    /// carry a default route.
    pub node_interfaces: Option<Vec<String>>,
    /// kube-proxy's nodePortAddresses (empty: every address of the external
    /// interfaces).
    pub node_port_filters: Vec<NodePortFilter>,
    /// The masquerade address (`None`: the first address of the external interfaces).
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// The cgroup v2 directory whose processes (and their descendants') get the
    /// socket-layer hooks that translate for host-network clients. `None`: no cgroup
    /// hook at all (the default: attaching is a node-wide decision, and a lab or test
    /// must never touch the machine's own cgroups).
    pub cgroup_path: Option<PathBuf>,
    /// Which sockets in that cgroup are translated at the socket layer (`--socket-lb`).
    pub socket_lb: socket_lb::Mode,
    /// Leave programs and maps in place on exit.
    pub keep_state: bool,
    /// Conntrack capacity.
    pub conntrack_max: Option<u32>,
    /// Conntrack timeouts.
    pub datapath: DatapathConfig,
    /// How often expired conntrack entries are reaped.
    pub conntrack_gc_interval: Duration,
    /// Model settings (proxy name, NodePort addresses).
    pub model: ModelSettings,
    /// Where `/healthz` listens (`None`: no health server).
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where `/metrics` listens (`None`: no metrics server).
    pub metrics_bind_address: Option<SocketAddr>,
    /// Addresses healthCheckNodePorts listen on (kube-proxy: the nodePortAddresses,
    /// else `0.0.0.0`); empty: none.
    pub health_check_addresses: Vec<IpAddr>,
}

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// When the datapath cannot be loaded or its maps cannot be read at start; later
/// failures are logged and retried instead.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut config = config;
    if let Some(path) = &config.cgroup_path {
        config.cgroup_path = Some(cgroup::resolve_cgroup2(path).context("--cgroup-path")?);
    }
    match &config.cgroup_path {
        Some(path) => {
            info!(cgroup = %path.display(), "host-network clients: socket-layer hooks go on this cgroup");
        }
        None => info!(
            "host-network clients are not translated: no --cgroup-path, so no socket-layer hooks"
        ),
    }
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: Some(config.pin_dir.clone()),
        conntrack_max: config.conntrack_max,
    })
    .context("loading the datapath")?;
    let mut node = read_node_network(&config);
    let mut model_settings = config.model.clone();
    model_settings
        .node_port_addresses
        .clone_from(&node.node_port_addresses);
    datapath
        .maps
        .set_config(&datapath_config(&config, &node))
        .context("writing the datapath settings")?;
    socket_lb::configure(&mut datapath, &config)?;
    let mirror = datapath.maps.read_mirror().context("reading pinned maps")?;
    if !mirror.services.is_empty() {
        info!(
            entries = mirror.services.len(),
            backends = mirror.backends.len(),
            "adopting the maps of a previous agent"
        );
    }
    let mut syncer = Syncer::adopt(mirror);
    let mut attachments = Attachments::new(Some(&config.pin_dir));
    let mut cgroup_hooks =
        socket_lb::hooked_cgroup(&config).map(|path| CgroupHooks::new(path, Some(&config.pin_dir)));
    let health = SyncHealth::new(Duration::from_secs(60));
    health.queued();
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = config.metrics_bind_address {
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            if let Err(error) = crate::metrics::serve(addr, metrics).await {
                error!(%addr, %error, "metrics server stopped");
            }
        });
    }
    if let Some(addr) = config.healthz_bind_address {
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(error) = health::serve(addr, health).await {
                error!(%addr, %error, "health server stopped");
            }
        });
    }

    // Before anything is attached: connections kube-proxy translated stay netfilter's.
    let mut takeover = Takeover::new(KernelSupport::probe());
    takeover.refresh_recorded(&mut datapath, syncer.mirror(), &metrics);

    let mut health_checks = HealthCheckServers::new(
        config.health_check_addresses.clone(),
        health.clone(),
        metrics.health_check_bind_failures.clone(),
    );

    let (snapshots_tx, mut snapshots) = watch::channel(Snapshot::default());
    snapshots.mark_unchanged();
    let mut api_status = None;
    let watcher = match &config.source {
        SourceConfig::Manifests(dir) => {
            let watch = manifests::watch_dir(dir.clone(), config.node_name.clone(), snapshots_tx);
            tokio::spawn(async move {
                if let Err(error) = watch.await {
                    error!(%error, "the manifest source failed");
                }
            })
        }
        SourceConfig::Api {
            kubeconfig,
            min_sync_period,
        } => {
            let client = source::kube::client(kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            let api =
                source::kube::ApiSource::new(client, config.node_name.clone(), *min_sync_period);
            api_status = Some(api.status());
            tokio::spawn(api.run(snapshots_tx))
        }
    };

    let mut link_events = LinkEvents::subscribe().context("subscribing to link notifications")?;
    let mut gc_timer = tokio::time::interval(config.conntrack_gc_interval);
    // A backstop for lost link notifications.
    let mut rescan_timer = tokio::time::interval(Duration::from_secs(5));
    let mut metrics_timer = tokio::time::interval(METRICS_REFRESH);
    let mut takeover_timer = tokio::time::interval(takeover::SCAN_INTERVAL);
    let mut known_diagnostics = BTreeSet::new();
    let mut synced_once = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    warn!("the manifest source stopped; keeping the datapath as it is");
                    break;
                }
                health.queued();
                metrics.queued(SystemTime::now());
                let snapshot = snapshots.borrow_and_update().clone();
                let wanted_health_checks = sync_once(&model_settings, &snapshot, &mut syncer, &mut datapath, &mut known_diagnostics, &metrics, socket_lb::hooked_cgroup(&config));
                health_checks.update(&wanted_health_checks).await;
                takeover.after_sync(&mut datapath, syncer.mirror(), &metrics);
                if !synced_once {
                    // Attach only once the maps hold the whole desired state, so no pod
                    // ever sees a half-programmed datapath; healthy only after both.
                    synced_once = true;
                    reconcile_interfaces(&config, &node, &mut datapath, &mut attachments, true);
                    match cgroup_hooks.as_mut() {
                        Some(hooks) => attach_cgroup_hooks(hooks, &mut datapath),
                        // Hooks an earlier agent left would go on translating with
                        // whatever it last knew: this configuration wants none.
                        None => cgroup::remove_pins(&config.pin_dir),
                    }
                }
                health.synced();
                refresh_metrics(&metrics, &datapath, &syncer, &attachments, cgroup_hooks.as_ref());
            }
            event = link_events.changed() => {
                if let Err(error) = event {
                    warn!(%error, "link notifications failed; relying on periodic rescans");
                    link_events = LinkEvents::subscribe().context("resubscribing to link notifications")?;
                }
                if synced_once {
                    let now = read_node_network(&config);
                    if now != node {
                        node = now;
                        apply_node_network(&config, &node, &mut model_settings, &snapshots.borrow().clone(), &mut syncer, &mut datapath, &mut known_diagnostics, &metrics);
                    }
                    reconcile_interfaces(&config, &node, &mut datapath, &mut attachments, false);
                }
            }
            _ = rescan_timer.tick() => {
                if synced_once {
                    let now = read_node_network(&config);
                    if now != node {
                        node = now;
                        apply_node_network(&config, &node, &mut model_settings, &snapshots.borrow().clone(), &mut syncer, &mut datapath, &mut known_diagnostics, &metrics);
                    }
                    reconcile_interfaces(&config, &node, &mut datapath, &mut attachments, false);
                    if let Some(hooks) = cgroup_hooks.as_mut() {
                        attach_cgroup_hooks(hooks, &mut datapath);
                    }
                    // A health check port another process held may be free by now.
                    health_checks.retry().await;
                }
            }
            _ = takeover_timer.tick() => takeover.refresh_recorded(&mut datapath, syncer.mirror(), &metrics),
            _ = metrics_timer.tick() => {
                refresh_metrics(&metrics, &datapath, &syncer, &attachments, cgroup_hooks.as_ref());
                if let Some(status) = &api_status {
                    metrics.record_api_status(status);
                }
            }
            _ = gc_timer.tick() => {
                let now = conntrack::monotonic_now_ns();
                match conntrack::collect_expired(&mut datapath.maps, &datapath_config(&config, &node), now) {
                    Ok(report) => {
                        debug!(live = report.live, removed = report.removed, "conntrack reaped");
                        metrics.conntrack_reaped.inc_by(report.removed as u64);
                        record_conntrack_fill(&metrics, proxy_common::names::CONNTRACK_V4, report.live, datapath.maps.conntrack_capacity);
                        record_conntrack_fill(&metrics, proxy_common::names::CONNTRACK_NEW_V4, report.live_new, datapath.maps.conntrack_new_capacity);
                    }
                    Err(error) => warn!(%error, "conntrack reaping failed"),
                }
            }
        }
    }
    watcher.abort();
    if config.keep_state {
        info!(pin_dir = %config.pin_dir.display(), "leaving programs and maps in place (--keep-state)");
        attachments.keep_all();
        if let Some(hooks) = cgroup_hooks.as_mut() {
            hooks.keep_all();
        }
    } else {
        attachments.detach_all();
        if let Some(hooks) = cgroup_hooks.as_mut() {
            hooks.detach_all();
        }
        drop(datapath);
        remove_pins(&config.pin_dir);
        info!("detached all programs and removed the pinned maps");
    }
    Ok(())
}

/// One pass: model, sync, flow cleanup, logs. Returns the health checks to serve.
fn sync_once(
    model_settings: &ModelSettings,
    snapshot: &Snapshot,
    syncer: &mut Syncer,
    datapath: &mut Datapath,
    known_diagnostics: &mut BTreeSet<Diagnostic>,
    metrics: &Metrics,
    socket_cgroup: Option<&Path>,
) -> BTreeMap<u16, ServiceHealth> {
    let started = Instant::now();
    let desired = model::desired(&snapshot.state, model_settings);
    let diagnostics: BTreeSet<Diagnostic> = snapshot
        .diagnostics
        .iter()
        .chain(&desired.diagnostics)
        .cloned()
        .collect();
    for diagnostic in diagnostics.difference(known_diagnostics) {
        warn!(
            object = %diagnostic.object,
            reason = diagnostic.reason.label(),
            "skipped: {}",
            diagnostic.message
        );
    }
    for diagnostic in known_diagnostics.difference(&diagnostics) {
        info!(object = %diagnostic.object, reason = diagnostic.reason.label(), "resolved");
    }
    // Every reason is exported, at 0 when nothing is skipped for it.
    for reason in DiagnosticReason::ALL {
        let count = diagnostics
            .iter()
            .filter(|diagnostic| diagnostic.reason == reason)
            .count();
        metrics
            .skipped_objects
            .get_or_create(&ReasonLabels {
                reason: reason.label().to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    *known_diagnostics = diagnostics;

    let report = syncer.sync(&desired, &mut datapath.maps);
    for failure in &report.failures {
        let reason = if failure.error.map_full {
            "map_full"
        } else {
            "write_error"
        };
        metrics
            .frontend_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        error!(
            service = %failure.service_port,
            frontend = %format!("{}:{}", failure.frontend.addr, failure.frontend.port),
            map_full = failure.error.map_full,
            "cannot program frontend: {}",
            failure.error.message
        );
    }
    for error in &report.cleanup_errors {
        warn!(%error, "cleanup write failed; retrying on the next pass");
    }
    match conntrack::forget_backends(&mut datapath.maps, &report.removed_pairs) {
        Ok((flows, affinities)) if flows + affinities > 0 => {
            info!(
                udp_flows = flows,
                affinities, "forgot flows of removed backends"
            );
        }
        Ok(_) => {}
        Err(error) => warn!(%error, "cannot flush flows of removed backends"),
    }
    if let Err(error) = socket_lb::forget_backends(datapath, socket_cgroup, &report.removed_pairs) {
        warn!(error = %crate::error_chain(&error), "cannot forget the sockets of removed backends");
        metrics.socket_forget_failures.inc();
    }
    metrics.synced(started.elapsed(), SystemTime::now());
    metrics.observe_programmed(&snapshot.state, SystemTime::now());
    info!(
        services = snapshot.state.services.len(),
        frontends = desired.frontends.len(),
        written = report.frontends_written,
        removed = report.frontends_removed,
        map_writes = report.ops_applied,
        failed = report.failures.len(),
        // Whole microseconds: the shortest float that prints them has no noise.
        elapsed_ms = started.elapsed().as_micros() as f64 / 1000.0,
        "synced"
    );
    desired.health_checks
}

/// Sets a conntrack table's fill from the reaper's count of live entries.
fn record_conntrack_fill(metrics: &Metrics, map: &str, live: usize, capacity: u32) {
    let labels = MapLabels {
        map: map.to_owned(),
    };
    metrics
        .map_entries
        .get_or_create(&labels)
        .set(i64::try_from(live).unwrap_or(i64::MAX));
    metrics
        .map_capacity
        .get_or_create(&labels)
        .set(i64::from(capacity));
}

/// How often gauges read from the maps (fill, counters, attachments) are refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(2);

/// Reads map fill, datapath counters and attachments into the metrics. The conntrack
/// map's fill comes from the reaper, which walks that map anyway (see
/// [`record_conntrack_fill`]): a second walk every refresh would double the agent's
/// busiest work.
fn refresh_metrics(
    metrics: &Metrics,
    datapath: &Datapath,
    syncer: &Syncer,
    attachments: &Attachments,
    cgroup_hooks: Option<&CgroupHooks>,
) {
    let mirror = syncer.mirror();
    let fill = [
        (
            proxy_common::names::SERVICES_V4,
            mirror.services.len(),
            proxy_common::capacity::SERVICES_V4,
        ),
        (
            proxy_common::names::BACKENDS_V4,
            mirror.backends.len(),
            proxy_common::capacity::BACKENDS_V4,
        ),
        (
            proxy_common::names::AFFINITY_V4,
            datapath.maps.affinity.keys().count(),
            proxy_common::capacity::AFFINITY_V4,
        ),
    ];
    for (map, entries, capacity) in fill {
        let labels = MapLabels {
            map: map.to_owned(),
        };
        metrics
            .map_entries
            .get_or_create(&labels)
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        metrics
            .map_capacity
            .get_or_create(&labels)
            .set(i64::from(capacity));
    }
    match datapath.maps.counters() {
        Ok(totals) => metrics.record_datapath_totals(&totals),
        Err(error) => debug!(%error, "cannot read the datapath counters"),
    }
    metrics.programs_attached.clear();
    for (interface, hook) in attachments.attached() {
        metrics
            .programs_attached
            .get_or_create(&AttachLabels {
                interface: interface.name.clone(),
                hook: hook.label().to_owned(),
            })
            .set(1);
    }
    if let Some(hooks) = cgroup_hooks {
        let interface = format!("cgroup:{}", hooks.cgroup().display());
        for hook in hooks.attached() {
            metrics
                .programs_attached
                .get_or_create(&AttachLabels {
                    interface: interface.clone(),
                    hook: hook.label().to_owned(),
                })
                .set(1);
        }
    }
}

/// Attaches the socket-layer hooks that are not attached yet (all of them the first
/// time; failures are retried on the next rescan).
fn attach_cgroup_hooks(hooks: &mut CgroupHooks, datapath: &mut Datapath) {
    for error in hooks.attach(datapath) {
        warn!(error = %crate::error_chain(&error), "cgroup attach failed; retrying on the next rescan");
    }
}

/// The node's external interfaces and addresses, as the namespace holds them now.
fn read_node_network(config: &AgentConfig) -> NodeNetwork {
    let patterns = match &config.node_interfaces {
        Some(patterns) => patterns.clone(),
        None => match node_network::default_route_interfaces() {
            Ok(names) => names.into_iter().collect(),
            Err(error) => {
                warn!(%error, "cannot read the routing table; no external interfaces");
                Vec::new()
            }
        },
    };
    let addresses = match node_network::ipv4_addresses(|name| interfaces::matches(name, &patterns))
    {
        Ok(addresses) => addresses,
        Err(error) => {
            warn!(%error, "cannot list the node's addresses");
            Vec::new()
        }
    };
    let mut node = node_network::decide(&addresses, &config.node_port_filters, config.node_ip);
    // Interfaces without an IPv4 address still get the node hooks (replies of remote
    // backends may arrive on them).
    if let Ok(all) = interfaces::list() {
        node.interfaces.extend(
            all.into_iter()
                .map(|interface| interface.name)
                .filter(|name| interfaces::matches(name, &patterns)),
        );
    }
    node
}

/// The datapath settings: the configured ones plus the node's masquerade address.
fn datapath_config(config: &AgentConfig, node: &NodeNetwork) -> DatapathConfig {
    DatapathConfig {
        snat_addr: node
            .snat_addr
            .map_or(proxy_common::Be32(0), proxy_common::Be32::from_ipv4),
        ..config.datapath
    }
}

/// Applies a changed node network: settings, then a sync pass for the NodePorts.
#[expect(
    clippy::too_many_arguments,
    reason = "the agent loop's state, passed through"
)]
fn apply_node_network(
    config: &AgentConfig,
    node: &NodeNetwork,
    model_settings: &mut ModelSettings,
    snapshot: &Snapshot,
    syncer: &mut Syncer,
    datapath: &mut Datapath,
    known_diagnostics: &mut BTreeSet<Diagnostic>,
    metrics: &Metrics,
) {
    info!(
        interfaces = ?node.interfaces,
        node_port_addresses = ?node.node_port_addresses,
        snat_addr = ?node.snat_addr,
        "the node's network changed"
    );
    if let Err(error) = datapath.maps.set_config(&datapath_config(config, node)) {
        warn!(%error, "cannot update the datapath settings");
    }
    model_settings
        .node_port_addresses
        .clone_from(&node.node_port_addresses);
    sync_once(
        model_settings,
        snapshot,
        syncer,
        datapath,
        known_diagnostics,
        metrics,
        socket_lb::hooked_cgroup(config),
    );
}

fn reconcile_interfaces(
    config: &AgentConfig,
    node: &NodeNetwork,
    datapath: &mut Datapath,
    attachments: &mut Attachments,
    first: bool,
) {
    let all = match interfaces::list() {
        Ok(all) => all,
        Err(error) => {
            warn!(%error, "cannot list interfaces");
            return;
        }
    };
    if first {
        attachments.sweep_stale_pins(&all);
    }
    let mut wanted = Vec::new();
    for interface in &all {
        // An external interface is never treated as a pod interface, whatever the
        // patterns say.
        let hooks = if node.interfaces.contains(&interface.name) {
            &Hook::NODE
        } else if interfaces::matches(&interface.name, &config.pod_interfaces) {
            &Hook::POD
        } else {
            continue;
        };
        wanted.extend(hooks.iter().map(|hook| (interface.clone(), *hook)));
    }
    for error in attachments.reconcile(datapath, &wanted) {
        warn!(error = %crate::error_chain(&error), "attach failed; retrying on the next interface change");
    }
}

/// Removes the pinned maps and the pin directory (what `cleanup` and a normal exit do).
pub fn remove_pins(pin_dir: &Path) {
    for name in crate::datapath::ALL_MAPS {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => debug!(path = %path.display(), "unpinned"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => warn!(path = %path.display(), %error, "cannot unpin"),
        }
    }
    crate::datapath::remove_retired_pins(pin_dir);
    let _ = std::fs::remove_dir(pin_dir.join("links"));
    let _ = std::fs::remove_dir(pin_dir);
}

/// Removes everything an agent pinned under `pin_dir`: link pins (which detaches the
/// programs once no process holds them) and map pins.
pub fn cleanup(pin_dir: &Path) {
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.filter_map(Result::ok) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!(link = %entry.path().display(), "detached"),
                Err(error) => {
                    warn!(link = %entry.path().display(), %error, "cannot remove link pin")
                }
            }
        }
    }
    remove_pins(pin_dir);
}
