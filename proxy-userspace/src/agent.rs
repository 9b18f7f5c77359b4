//! The agent's main loop: load and adopt the datapath, follow the source, keep maps and
//! attachments in step, reap conntrack, and leave the node clean on exit.
//!
//! [`run`] starts an [`Agent`] (the loop's whole state) and hands each event to one
//! method: a new snapshot from the source ([`Agent::on_source_change`]), a link
//! notification ([`Agent::on_link_change`]), the periodic rescan ([`Agent::on_rescan`]),
//! the metrics and conntrack GC ticks, and shutdown ([`Agent::finish`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use proxy_common::DatapathConfig;
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        attach::Attachments,
        cgroup::{self, CgroupHooks},
        conntrack,
        interfaces::{self, LinkEvents},
        lock::PinDirLock,
        node_network::{self, NodeNetwork, NodePortFilter},
        pins::MapPins,
        Datapath, Hook, LoadOptions,
    },
    health::{self, SyncHealth},
    healthcheck::HealthCheckServers,
    metrics::{AttachLabels, DriftLabels, MapLabels, Metrics, ReasonLabels},
    model::{
        Desired, Diagnostic, DiagnosticReason, FamilyDesired, IncrementalModel, ModelChanges,
        ModelSettings,
    },
    names,
    service_counters::{self, ServiceCounters},
    socket_lb,
    source::{self, Snapshot, SourceConfig},
    sync::{
        frontend_addrs::FrontendAddrs, Capacity as SyncCapacity, FrontendFailure, MapOp, MapWriter,
        Mirror, SyncReport, Syncer, WriteError,
    },
    takeover::{self, KernelSupport, Takeover},
    upkeep::Upkeep,
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
    /// The IPv6 masquerade address (`None`: the first global IPv6 address of the
    /// external interfaces).
    pub node_ip_v6: Option<std::net::Ipv6Addr>,
    /// The IPv6 half of kube-proxy's clusterCIDR.
    pub cluster_cidr_v6: Option<(std::net::Ipv6Addr, u8)>,
    /// The cgroup v2 directory whose processes (and their descendants') get the
    /// socket-layer hooks that translate for host-network clients. `None`: no cgroup
    /// hook at all (the default: attaching is a node-wide decision, and a lab or test
    /// must never touch the machine's own cgroups).
    pub cgroup_path: Option<PathBuf>,
    /// Which sockets in that cgroup are translated at the socket layer (`--socket-lb`).
    pub socket_lb: socket_lb::Mode,
    /// Whether the datapath counts traffic per service port (`--service-counters`).
    pub service_counters: service_counters::Mode,
    /// Leave programs and maps in place on exit.
    pub keep_state: bool,
    /// Conntrack capacity.
    pub conntrack_max: Option<u32>,
    /// The service CIDR (`--service-cidr`; length 0: unset): its addresses that no
    /// Service holds are dropped.
    pub service_cidr: proxy_common::ServiceCidrV4,
    /// The least capacities of the other sized maps (`None`: the default); each grows
    /// to what the cluster found at start needs, with room to spare.
    pub map_sizes: MapSizes,
    /// Conntrack timeouts.
    pub datapath: DatapathConfig,
    /// How often expired conntrack entries are reaped.
    pub conntrack_gc_interval: Duration,
    /// How often the maps are read back and repaired (kube-proxy's syncPeriod).
    pub sync_period: Duration,
    /// Model settings (proxy name, NodePort addresses).
    pub model: ModelSettings,
    /// Where `/healthz` listens (`None`: no health server).
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where `/metrics` listens (`None`: no metrics server).
    pub metrics_bind_address: Option<SocketAddr>,
    /// Addresses healthCheckNodePorts listen on while `node_port_filters` is empty
    /// (kube-proxy: `0.0.0.0`); with filters, they listen on the NodePort addresses
    /// instead ([`health_check_addresses`]). Empty: none.
    pub health_check_addresses: Vec<IpAddr>,
}

/// Configured least capacities of the maps sized by the cluster (`--services-max`,
/// ...; `None`: the default of [`proxy_common::capacity`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    pub services: Option<u32>,
    pub backends: Option<u32>,
    pub affinity: Option<u32>,
    pub source_ranges: Option<u32>,
}

/// How many entries of each cluster-sized map a desired state fills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapDemand {
    /// Frontends plus their backend slots.
    pub services: usize,
    /// Distinct backends.
    pub backends: usize,
    pub source_ranges: usize,
    /// The same for the IPv6 maps.
    pub services_v6: usize,
    pub backends_v6: usize,
    pub source_ranges_v6: usize,
}

/// `(service entries, distinct backends, source ranges)` one family fills.
fn family_demand<F: crate::family::Family>(part: &FamilyDesired<F>) -> (usize, usize, usize) {
    let backends: std::collections::HashSet<(F::Socket, u8)> = part
        .frontends
        .iter()
        .flat_map(|(key, spec)| spec.backends.iter().map(|addr| (*addr, key.proto)))
        .collect();
    (
        part.frontends
            .values()
            .map(|spec| 1 + spec.backends.len())
            .sum(),
        backends.len(),
        part.source_ranges.values().map(BTreeSet::len).sum(),
    )
}

impl MapDemand {
    /// What `desired` fills in the maps.
    #[must_use]
    pub fn of(desired: &Desired) -> Self {
        let (services, backends, source_ranges) = family_demand(&desired.v4);
        let (services_v6, backends_v6, source_ranges_v6) = family_demand(&desired.v6);
        Self {
            services,
            backends,
            source_ranges,
            services_v6,
            backends_v6,
            source_ranges_v6,
        }
    }
}

/// The load options for `config`: the configured capacities, each grown to hold
/// `demand` with room to spare.
fn load_options(config: &AgentConfig, demand: &MapDemand) -> LoadOptions {
    use crate::datapath::grown_for;
    use proxy_common::capacity;
    let sizes = &config.map_sizes;
    LoadOptions {
        pin_dir: Some(config.pin_dir.clone()),
        conntrack_max: config.conntrack_max,
        services_max: Some(grown_for(
            sizes.services.unwrap_or(capacity::SERVICES_V4),
            demand.services,
        )),
        backends_max: Some(grown_for(
            sizes.backends.unwrap_or(capacity::BACKENDS_V4),
            demand.backends,
        )),
        affinity_max: sizes.affinity,
        source_ranges_max: Some(grown_for(
            sizes.source_ranges.unwrap_or(capacity::SOURCE_RANGES_V4),
            demand.source_ranges,
        )),
        // The IPv6 maps from their own defaults, grown as the IPv4 ones are.
        services_v6_max: Some(grown_for(capacity::SERVICES_V6, demand.services_v6)),
        backends_v6_max: Some(grown_for(capacity::BACKENDS_V6, demand.backends_v6)),
        source_ranges_v6_max: Some(grown_for(
            capacity::SOURCE_RANGES_V6,
            demand.source_ranges_v6,
        )),
    }
}

/// How the loop ended.
enum Exit {
    /// Asked to stop (SIGTERM): leave the node as configured.
    Shutdown,
    /// The source stopped publishing: keep the datapath and fail.
    SourceEnded,
}

/// A backstop for lost link notifications.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// How often the names file is brought up to date after passes that changed only
/// part of the desired state: collecting it walks every service, which such a pass
/// must not (a full pass writes it itself).
const NAMES_REFRESH: Duration = Duration::from_secs(1);

/// How often gauges read from the maps (fill, counters, attachments) are refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(2);

/// How long a change may wait to be applied before the node reports unhealthy
/// (kube-proxy's healthzBindAddress timeout is the same).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// When the datapath cannot be loaded or its maps cannot be read at start, and when
/// the source ends (the datapath is then left in place for the next agent); later
/// failures are logged and retried instead.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let prepared = Prepared::new(config)?;
    let source = source::start(
        &prepared.config.source,
        prepared.config.node_name.clone(),
        &prepared.metrics,
    )
    .await
    .context("starting the source")?;
    prepared.serve(source, shutdown).await
}

/// Runs the agent like [`run`], on a source of the caller's own instead of the one
/// `config.source` names (an embedding; the lab's tests of what a source can do).
///
/// # Errors
/// As [`run`].
pub async fn run_on(
    config: AgentConfig,
    source: source::Running,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    Prepared::new(config)?.serve(source, shutdown).await
}

/// What runs before the source's first snapshot: the lock, the health and metrics
/// servers. The datapath is loaded only once the first snapshot says how large the
/// cluster is, so its maps are made large enough for it.
struct Prepared {
    lock: PinDirLock,
    config: AgentConfig,
    health: SyncHealth,
    metrics: Arc<Metrics>,
}

impl Prepared {
    fn new(mut config: AgentConfig) -> anyhow::Result<Self> {
        // Before anything is opened, written or removed: a second agent on the same
        // pins must leave the first one's alone.
        let lock = PinDirLock::acquire(&config.pin_dir)?;
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
        let health = SyncHealth::new(HEALTH_TIMEOUT);
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
            let rejected = metrics.http_rejected("healthz");
            tokio::spawn(async move {
                if let Err(error) = health::serve(addr, health, rejected).await {
                    error!(%addr, %error, "health server stopped");
                }
            });
        }
        Ok(Self {
            lock,
            config,
            health,
            metrics,
        })
    }

    /// Waits for the source's first snapshot (or `shutdown`), starts the agent on it
    /// and follows the source.
    async fn serve(
        self,
        mut source: source::Running,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let first = tokio::select! {
            () = &mut shutdown => {
                info!("stopped before the source's first snapshot; the datapath was not touched");
                return Ok(());
            }
            changed = source.snapshots.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the source of Services and EndpointSlices stopped before its first snapshot");
                }
                Arc::clone(&source.snapshots.borrow_and_update())
            }
        };
        let mut agent = Agent::start(self, first)?;
        agent.api_status.clone_from(&source.api_status);
        agent.on_first_snapshot().await;
        let exit = agent.follow(&mut source, shutdown).await;
        drop(source);
        agent.finish(exit)
    }
}

/// The agent loop's state.
struct Agent {
    /// Held from before the datapath is loaded until its pins are removed (or left).
    lock: Option<PinDirLock>,
    config: AgentConfig,
    datapath: Datapath,
    /// The map pins and the ids they must name.
    map_pins: MapPins,
    /// The node's external interfaces and addresses, as last read.
    node: NodeNetwork,
    /// The configured model settings plus the node's NodePort addresses.
    model_settings: ModelSettings,
    syncer: Syncer,
    /// The frontend address set, kept in step with the syncer's frontends.
    frontend_addrs: FrontendAddrs,
    /// The IPv6 syncer and address set: the same code on the IPv6 maps, its own
    /// backend and service ids (see `crate::family`).
    syncer6: Syncer<Ipv6Addr>,
    frontend_addrs6: FrontendAddrs<Ipv6Addr>,
    attachments: Attachments,
    cgroup_hooks: Option<CgroupHooks>,
    health: SyncHealth,
    metrics: Arc<Metrics>,
    health_checks: HealthCheckServers,
    /// Whether the datapath leaves flows netfilter already translates to it (taking
    /// over from kube-proxy).
    takeover: Takeover,
    /// The API source's status, for the metrics.
    api_status: Option<Arc<source::kube::ApiStatus>>,
    /// Diagnostics already logged (each is logged once, and again when resolved).
    known_diagnostics: BTreeSet<Diagnostic>,
    /// The last snapshot the source published (`None` before the first).
    snapshot: Option<Arc<Snapshot>>,
    /// The model, kept up to date with each snapshot (and the node's settings); its
    /// output is the desired state.
    model: IncrementalModel,
    /// What the model changed since the last sync pass.
    pending: ModelChanges,
    /// The time the model took for those changes: part of the pass that applies them.
    pending_model_time: Duration,
    /// The source's own diagnostics last reported.
    source_diagnostics: Vec<Diagnostic>,
    /// The names may have changed since the names file was written.
    names_stale: bool,
    /// Whether the first sync pass is done (programs attach only after it).
    synced_once: bool,
    /// The last pass left something unwritten: the next rescan tries again.
    retry_pending: bool,
    /// Frontends (of either family, as `addr:port`) the last pass could not
    /// program, with the reason label.
    failing: BTreeMap<String, &'static str>,
    /// The digest of the names file last written ([`names::write_current`]), so an
    /// unchanged one is not replaced.
    published_names: Option<u64>,
    /// Which service ports the datapath counts traffic for.
    service_counters: ServiceCounters,
    /// The syncer's [`Syncer::service_id_changes`] the counters were last synced at.
    service_counter_ids: u64,
    /// The thread that walks the conntrack and affinity maps.
    upkeep: Upkeep,
}

impl Agent {
    /// Loads (or adopts) the datapath, its maps sized for the `first` snapshot.
    fn start(prepared: Prepared, first: Arc<Snapshot>) -> anyhow::Result<Self> {
        let Prepared {
            lock,
            config,
            health,
            metrics,
        } = prepared;
        let node = read_node_network(&config);
        log_node_network(&node, "the node's network");
        let mut model_settings = config.model.clone();
        model_settings
            .node_port_addresses
            .clone_from(&node.node_port_addresses);
        model_settings
            .node_port_addresses_v6
            .clone_from(&node.node_port_addresses_v6);
        let mut model = IncrementalModel::default();
        let model_started = Instant::now();
        let pending = model.update(&first.state, &model_settings);
        let pending_model_time = model_started.elapsed();
        let demand = MapDemand::of(model.desired());
        let options = load_options(&config, &demand);
        let mut datapath = Datapath::load(&options).context("loading the datapath")?;
        let capacities = datapath.maps.capacities;
        info!(
            services = capacities.services,
            backends = capacities.backends,
            conntrack = capacities.conntrack,
            affinity = capacities.affinity,
            source_ranges = capacities.source_ranges,
            needed_services = demand.services,
            needed_backends = demand.backends,
            "map capacities"
        );
        datapath
            .maps
            .set_config(&datapath_config(&config, &node))
            .context("writing the datapath settings")?;
        datapath
            .maps
            .set_config_v6(&datapath_config_v6(&config, &node))
            .context("writing the IPv6 datapath settings")?;
        socket_lb::configure(&mut datapath, &config)?;
        let map_pins = MapPins::record(&config.pin_dir, &crate::datapath::ALL_MAPS)
            .context("reading the map pins")?;
        let mirror = datapath.maps.read_mirror().context("reading pinned maps")?;
        if !mirror.services.is_empty() {
            info!(
                entries = mirror.services.len(),
                backends = mirror.backends.len(),
                "adopting the maps of a previous agent"
            );
        }
        let upkeep = Upkeep::start(
            conntrack::Tables::open(&datapath.maps).context("opening the conntrack maps")?,
            datapath_config(&config, &node),
            capacities,
            Arc::clone(&metrics),
        )
        .context("starting the upkeep thread")?;
        let syncer = Syncer::adopt(mirror).with_capacity(SyncCapacity {
            services: capacities.services as usize,
            backends: capacities.backends as usize,
        });
        let frontend_addrs = datapath
            .maps
            .read_frontend_addrs()
            .context("reading the pinned frontend address set")?;
        let mirror6 = datapath
            .maps
            .v6
            .read_mirror()
            .context("reading pinned IPv6 maps")?;
        if !mirror6.services.is_empty() {
            info!(
                entries = mirror6.services.len(),
                backends = mirror6.backends.len(),
                "adopting the IPv6 maps of a previous agent"
            );
        }
        let syncer6 = Syncer::adopt(mirror6).with_capacity(SyncCapacity {
            services: capacities.services_v6 as usize,
            backends: capacities.backends_v6 as usize,
        });
        let frontend_addrs6 = datapath
            .maps
            .v6
            .read_frontend_addrs()
            .context("reading the pinned IPv6 frontend address set")?;
        datapath
            .maps
            .set_service_cidr(&config.service_cidr)
            .context("writing the service CIDR")?;
        let service_counters = ServiceCounters::adopt(config.service_counters, &datapath.maps);
        let attachments = Attachments::new(Some(&config.pin_dir));
        let cgroup_hooks = socket_lb::hooked_cgroup(&config)
            .map(|path| CgroupHooks::new(path, Some(&config.pin_dir)));
        let health_checks = HealthCheckServers::new(
            health_check_addresses(&config, &node),
            health.clone(),
            metrics.health_check_bind_failures.clone(),
        )
        .with_rejected_counter(metrics.http_rejected("health_check"));
        // Before anything is attached: connections kube-proxy translated stay netfilter's.
        let mut takeover = Takeover::new(KernelSupport::probe());
        takeover.refresh_recorded(&mut datapath, (syncer.mirror(), syncer6.mirror()), &metrics);
        Ok(Self {
            lock: Some(lock),
            config,
            datapath,
            map_pins,
            node,
            model_settings,
            syncer,
            frontend_addrs,
            syncer6,
            frontend_addrs6,
            attachments,
            cgroup_hooks,
            health,
            metrics,
            health_checks,
            takeover,
            api_status: None,
            known_diagnostics: BTreeSet::new(),
            snapshot: Some(first),
            model,
            pending,
            pending_model_time,
            source_diagnostics: Vec::new(),
            names_stale: false,
            synced_once: false,
            retry_pending: false,
            failing: BTreeMap::new(),
            published_names: None,
            service_counters,
            service_counter_ids: 0,
            upkeep,
        })
    }

    /// The first snapshot, whose desired state [`Self::start`] computed: sync it and
    /// attach.
    async fn on_first_snapshot(&mut self) {
        self.metrics.queued(SystemTime::now());
        if let Some(snapshot) = self.snapshot.clone() {
            self.report_diagnostics(&snapshot);
        }
        self.apply_desired().await;
    }

    /// The event loop: one method per event, until shutdown or the source's end.
    async fn follow(
        &mut self,
        source: &mut source::Running,
        mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Exit {
        let mut link_events = match LinkEvents::subscribe() {
            Ok(events) => Some(events),
            Err(error) => {
                warn!(%error, "cannot subscribe to link notifications; relying on periodic rescans");
                None
            }
        };
        let mut gc_timer = tokio::time::interval(self.config.conntrack_gc_interval);
        let mut rescan_timer = tokio::time::interval(RESCAN_INTERVAL);
        let mut metrics_timer = tokio::time::interval(METRICS_REFRESH);
        let mut names_timer = tokio::time::interval(NAMES_REFRESH);
        let mut takeover_timer = tokio::time::interval(takeover::SCAN_INTERVAL);
        let period = self.config.sync_period;
        let mut resync_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // The resync's read of the maps, running on a blocking thread.
        let mut readback: Option<Readback> = None;
        loop {
            tokio::select! {
                () = shutdown.as_mut() => return Exit::Shutdown,
                changed = source.snapshots.changed() => {
                    if changed.is_err() {
                        return Exit::SourceEnded;
                    }
                    let snapshot = Arc::clone(&source.snapshots.borrow_and_update());
                    self.on_source_change(snapshot).await;
                }
                event = next_link_event(&mut link_events) => {
                    if let Err(error) = event {
                        warn!(%error, "link notifications failed; resubscribing, with periodic rescans meanwhile");
                        link_events = LinkEvents::subscribe()
                            .inspect_err(|error| warn!(%error, "cannot resubscribe to link notifications"))
                            .ok();
                    }
                    self.on_link_change().await;
                }
                _ = rescan_timer.tick() => self.on_rescan().await,
                _ = metrics_timer.tick() => self.on_metrics_tick(),
                _ = names_timer.tick() => self.on_names_tick(),
                _ = gc_timer.tick() => self.on_gc_tick(),
                _ = resync_timer.tick() => {
                    if readback.is_none() {
                        readback = self.on_resync_tick();
                    }
                }
                read = next_readback(&mut readback) => {
                    readback = None;
                    self.on_readback(read).await;
                }
                _ = takeover_timer.tick() => self.on_takeover_tick(),
            }
        }
    }

    /// A new snapshot: sync the maps to it; the first one also attaches the programs.
    async fn on_source_change(&mut self, snapshot: Arc<Snapshot>) {
        self.health.queued();
        self.metrics.queued(SystemTime::now());
        self.snapshot = Some(snapshot);
        self.compute_desired();
        self.apply_desired().await;
    }

    /// Syncs the maps (and health check ports) to the desired state last computed.
    async fn apply_desired(&mut self) {
        let Some(PassOutcome {
            report,
            complete,
            health_checks_changed,
            full,
        }) = self.sync_pass()
        else {
            return;
        };
        if health_checks_changed || !self.synced_once {
            self.health_checks
                .update(&self.model.desired().health_checks)
                .await;
        }
        // Listing the frontends walks the whole mirror: only when the set changed.
        if report.frontend_set_changed || !self.synced_once {
            self.takeover.after_sync(
                &mut self.datapath,
                (self.syncer.mirror(), self.syncer6.mirror()),
                &self.metrics,
            );
        }
        if !self.synced_once {
            // Attach only once the maps hold the whole desired state, so no pod ever
            // sees a half-programmed datapath; healthy only after both.
            self.synced_once = true;
            self.reconcile_interfaces(true);
            match self.cgroup_hooks.as_mut() {
                Some(hooks) => attach_cgroup_hooks(hooks, &mut self.datapath),
                // Hooks an earlier agent left would go on translating with whatever it
                // last knew: this configuration wants none.
                None => cgroup::remove_pins(&self.config.pin_dir),
            }
        }
        if full {
            // Everything may have been renamed: `kpr inspect` reads the names of what
            // the maps now hold before the agent says it is healthy.
            self.on_names_tick();
        }
        // kube-proxy's rule: healthy again once a pass has written the maps; a pass
        // that could not write them leaves the change pending (unhealthy once it has
        // waited too long). A frontend that does not fit is logged and counted only.
        if complete {
            self.health.synced();
        }
        self.refresh_metrics();
    }

    /// Whether netfilter still holds flows kube-proxy translated to our frontends: the
    /// datapath's check stays on exactly as long.
    fn on_takeover_tick(&mut self) {
        self.takeover.refresh_recorded(
            &mut self.datapath,
            (self.syncer.mirror(), self.syncer6.mirror()),
            &self.metrics,
        );
    }

    /// A link came, went or changed: follow the node's network and attach.
    async fn on_link_change(&mut self) {
        if !self.synced_once {
            return;
        }
        let now = read_node_network(&self.config);
        if now != self.node {
            self.node = now;
            self.apply_node_network().await;
        }
        self.reconcile_interfaces(false);
    }

    /// The periodic rescan: what a link change does (notifications can be lost), plus
    /// the retries of cgroup hooks and health check ports.
    async fn on_rescan(&mut self) {
        if !self.synced_once {
            return;
        }
        self.on_link_change().await;
        if self.retry_pending {
            info!("retrying what the last sync pass could not write");
            self.apply_desired().await;
        }
        if let Some(hooks) = self.cgroup_hooks.as_mut() {
            attach_cgroup_hooks(hooks, &mut self.datapath);
        }
        // A health check port another process held may be free by now.
        self.health_checks.retry().await;
    }

    /// Brings the names file up to date when passes since it was written may have
    /// changed a name.
    fn on_names_tick(&mut self) {
        if self.names_stale {
            if let Some(snapshot) = self.snapshot.clone() {
                self.publish_names(&snapshot);
            }
        }
    }

    fn on_metrics_tick(&mut self) {
        self.refresh_metrics();
        if let Some(status) = &self.api_status {
            self.metrics.record_api_status(status);
        }
    }

    /// The periodic full resync (kube-proxy's syncPeriod): the maps themselves, not
    /// the agent's copy of them, against the desired state; whatever differs (written
    /// or deleted by someone else) is logged, counted and repaired, and so are missing
    /// or replaced pins.
    fn on_resync_tick(&mut self) -> Option<Readback> {
        if !self.synced_once {
            return None;
        }
        let (repaired, errors) = self.map_pins.repair();
        for map in repaired {
            warn!(map, "a map pin was missing or replaced; pinned it again");
            self.drift_repaired(map, "pin", 1);
        }
        for error in errors {
            warn!(error = %crate::error_chain(&error), "cannot pin a map again; retrying on the next resync");
        }
        let (mut relinked, mut link_errors) = self.attachments.repair_pins();
        if let Some(hooks) = &self.cgroup_hooks {
            let (more, more_errors) = hooks.repair_pins();
            relinked.extend(more);
            link_errors.extend(more_errors);
        }
        for pin in &relinked {
            warn!(pin = %pin.display(), "a link pin was missing or replaced; pinned it again");
        }
        if !relinked.is_empty() {
            self.drift_repaired("links", "pin", relinked.len());
        }
        for error in link_errors {
            warn!(error = %crate::error_chain(&error), "cannot pin a link again; retrying on the next resync");
        }
        // Reading every entry back takes a syscall each: not on the event loop.
        let reader = match self.datapath.maps.mirror_reader() {
            Ok(reader) => reader,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot read the maps back; retrying on the next resync");
                return None;
            }
        };
        Some(Readback {
            writes: self.syncer.writes(),
            addr_writes: self.frontend_addrs.writes(),
            writes_v6: (self.syncer6.writes(), self.frontend_addrs6.writes()),
            task: tokio::task::spawn_blocking(move || {
                (
                    reader.read(),
                    reader.read_frontend_addrs(),
                    reader.read_v6(),
                )
            }),
        })
    }

    /// The resync's read of the maps is done: repair what differs from what the agent
    /// wrote (unless the agent wrote the maps meanwhile: then the next resync looks).
    async fn on_readback(&mut self, read: MapsRead) {
        // The IPv6 maps first: whether they need a pass joins the IPv4 decision, so
        // one pass repairs both.
        let v6_drift = family_drift(
            &mut self.syncer6,
            &mut self.frontend_addrs6,
            read.writes_v6,
            read.v6,
            &self.metrics,
        );
        let addr_drift = self.frontend_addr_drift(read.addr_writes, read.frontend_addrs) + v6_drift;
        let real = match read.mirror {
            Ok(real) => real,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot read the maps back; retrying on the next resync");
                if addr_drift > 0 {
                    self.apply_desired().await;
                }
                return;
            }
        };
        if read.writes != self.syncer.writes() {
            debug!(
                "resync: the maps were written while being read back; comparing on the next resync"
            );
            if addr_drift > 0 {
                self.apply_desired().await;
            }
            return;
        }
        let differences = self.syncer.mirror().differences(&real);
        if differences == [0; 3] {
            if addr_drift > 0 {
                self.apply_desired().await;
                return;
            }
            debug!("resync: the maps hold what the agent wrote");
            return;
        }
        let maps = [
            proxy_common::names::SERVICES_V4,
            proxy_common::names::BACKENDS_V4,
            proxy_common::names::SOURCE_RANGES_V4,
        ];
        for (map, count) in maps.into_iter().zip(differences) {
            if count > 0 {
                warn!(
                    map,
                    entries = count,
                    "the map differs from what the agent wrote; repairing"
                );
                self.drift_repaired(map, "entries", count);
            }
        }
        self.syncer.readopt(real);
        self.apply_desired().await;
    }

    /// Compares the frontend address set read back (`read`, begun when the set had
    /// seen `writes_then` writes) with what the agent wrote, and takes what the kernel
    /// holds when they differ, so the next pass writes whatever differs from the
    /// desired set. Returns how many addresses differ (0 when the agent wrote the set
    /// during the read: the next resync compares).
    fn frontend_addr_drift(
        &mut self,
        writes_then: u64,
        read: crate::datapath::Result<FrontendAddrs>,
    ) -> usize {
        let real_addrs = match read {
            Ok(real_addrs) => real_addrs,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot read the frontend address set back; retrying on the next resync");
                return 0;
            }
        };
        if writes_then != self.frontend_addrs.writes() {
            debug!("resync: the frontend address set was written while being read back; comparing on the next resync");
            return 0;
        }
        let held = self.frontend_addrs.held();
        let drift = real_addrs
            .held()
            .iter()
            .filter(|(addr, kinds)| held.get(*addr) != Some(*kinds))
            .count()
            + held
                .keys()
                .filter(|addr| !real_addrs.held().contains_key(*addr))
                .count();
        if drift > 0 {
            let map = proxy_common::names::FRONTEND_ADDRS_V4;
            warn!(
                map,
                entries = drift,
                "the map differs from what the agent wrote; repairing"
            );
            self.drift_repaired(map, "entries", drift);
            self.frontend_addrs.readopt(real_addrs);
        }
        drift
    }

    fn drift_repaired(&self, map: &str, kind: &str, count: usize) {
        drift_repaired(&self.metrics, map, kind, count);
    }

    /// Conntrack reaping, on the upkeep thread.
    fn on_gc_tick(&mut self) {
        self.upkeep.reap();
    }

    /// Leaves the node as `exit` asks: on shutdown, detached and unpinned unless
    /// `--keep-state`; when the source ended, as it is (an error, so the agent exits
    /// non-zero and is restarted, adopting the datapath).
    fn finish(mut self, exit: Exit) -> anyhow::Result<()> {
        // A walk in progress ends after its current entry.
        self.upkeep.stop();
        // Freeing the cluster's objects and the map mirror (a million allocations at
        // 100 000 services) would hold the exit back by a second: a thread of its own
        // frees them, and the process does not wait for it.
        let state = (
            self.snapshot.take(),
            std::mem::take(&mut self.model),
            std::mem::take(&mut self.syncer),
            std::mem::take(&mut self.syncer6),
        );
        let _ = std::thread::Builder::new()
            .name("kpr-free".into())
            .spawn(move || drop(state));
        let keep = match exit {
            Exit::Shutdown => self.config.keep_state,
            Exit::SourceEnded => {
                error!("the source stopped; keeping the datapath as it is and exiting");
                true
            }
        };
        if keep {
            info!(pin_dir = %self.config.pin_dir.display(), "leaving programs and maps in place");
            self.attachments.keep_all();
            if let Some(hooks) = self.cgroup_hooks.as_mut() {
                hooks.keep_all();
            }
        } else {
            self.attachments.detach_all();
            if let Some(hooks) = self.cgroup_hooks.as_mut() {
                hooks.detach_all();
            }
            let pin_dir = self.config.pin_dir.clone();
            // Unlocked only once the pins are gone, so no agent starting meanwhile
            // loses them.
            let lock = self.lock.take();
            drop(self);
            remove_pins(&pin_dir);
            drop(lock);
            info!("detached all programs and removed the pinned maps");
        }
        match exit {
            Exit::Shutdown => Ok(()),
            // Non-zero, so the DaemonSet restarts it: the next agent adopts the datapath.
            Exit::SourceEnded => {
                anyhow::bail!("the source of Services and EndpointSlices stopped")
            }
        }
    }

    /// Brings the model to the last snapshot and the node's settings (computing only
    /// what changed), and reports what it skipped.
    fn compute_desired(&mut self) {
        let Some(snapshot) = self.snapshot.clone() else {
            return;
        };
        let model_started = Instant::now();
        let changes = self.model.update(&snapshot.state, &self.model_settings);
        self.pending_model_time += model_started.elapsed();
        let diagnostics_changed =
            changes.diagnostics || changes.all || self.source_diagnostics != snapshot.diagnostics;
        self.pending.merge(changes);
        if diagnostics_changed {
            self.report_diagnostics(&snapshot);
        }
    }

    /// One pass bringing the maps to the desired state last computed: sync, flow
    /// cleanup, logs. Retries run it again without running the model again. A pass
    /// writes what changed since the last one when the last wrote everything, else
    /// everything. `None` before the source's first snapshot.
    fn sync_pass(&mut self) -> Option<PassOutcome> {
        let snapshot = Arc::clone(self.snapshot.as_ref()?);
        let started = Instant::now();
        let model_time = std::mem::take(&mut self.pending_model_time);
        let changes = std::mem::take(&mut self.pending);
        let full = changes.all
            || !self.syncer.incremental_ready()
            || !self.frontend_addrs.incremental_ready()
            || !self.syncer6.incremental_ready()
            || !self.frontend_addrs6.incremental_ready();
        let desired = self.model.desired();
        let changed_addrs: BTreeSet<std::net::Ipv4Addr> =
            changes.frontends.keys().map(|key| key.addr).collect();
        // Addresses before the frontends that use them, stale ones after (see
        // sync::frontend_addrs).
        let mut addr_errors = if full {
            self.frontend_addrs
                .add_desired(desired, &mut self.datapath.maps)
        } else {
            self.frontend_addrs
                .add_changed(desired, &changed_addrs, &mut self.datapath.maps)
        };
        let maps_started = Instant::now();
        let mut writer = TimedWriter {
            inner: &mut self.datapath.maps,
            spent: Duration::ZERO,
        };
        let mut report = if full {
            self.syncer.sync(desired, &mut writer)
        } else {
            self.syncer.sync_changes(desired, &changes, &mut writer)
        };
        if report.failures.iter().any(|f| f.error.map_full) && report.ops_applied > 0 {
            // The pass may have made room only after a frontend was refused (backends
            // are deleted last, once no slot names them): one more pass takes it.
            let again = self.syncer.sync(desired, &mut writer);
            report.merge(again);
        }
        let (maps_time, map_writes_time) = (maps_started.elapsed(), writer.spent);
        addr_errors.extend(if full {
            self.frontend_addrs.remove_stale(
                desired,
                self.syncer.frontend_addrs(),
                &mut self.datapath.maps,
            )
        } else {
            let syncer = &self.syncer;
            self.frontend_addrs.remove_changed(
                desired,
                &changed_addrs,
                |addr| syncer.holds_frontend_at(addr),
                &mut self.datapath.maps,
            )
        });
        for error in &addr_errors {
            warn!(%error, "frontend address set write failed; retrying on the next pass");
            self.metrics.frontend_addr_write_failures.inc();
        }
        // The IPv6 family, on its own maps, by the same rules.
        let v6 = sync_family(
            &mut self.syncer6,
            &mut self.frontend_addrs6,
            &mut self.datapath.maps,
            desired,
            &changes,
            full,
        );
        for error in &v6.addr_errors {
            warn!(%error, "frontend address set write failed; retrying on the next pass");
            self.metrics.frontend_addr_write_failures.inc();
        }
        for error in &v6.report.cleanup_errors {
            warn!(%error, "cleanup write failed; retrying on the next pass");
        }
        self.upkeep.forget_v6(&v6.report.removed_pairs);
        if full
            || !report.failures.is_empty()
            || !v6.report.failures.is_empty()
            || !self.failing.is_empty()
        {
            self.report_failures(&report, &v6.report);
        }
        for error in &report.cleanup_errors {
            warn!(%error, "cleanup write failed; retrying on the next pass");
        }
        self.upkeep.forget(&report.removed_pairs);
        let socket_cgroup = socket_lb::hooked_cgroup(&self.config);
        if let Err(error) = socket_lb::forget_backends(
            &mut self.datapath,
            socket_cgroup,
            &report.removed_pairs,
            &v6.report.removed_pairs,
        ) {
            warn!(error = %crate::error_chain(&error), "cannot forget the sockets of removed backends");
            self.metrics.socket_forget_failures.inc();
        }
        self.metrics
            .synced(model_time + started.elapsed(), SystemTime::now());
        let changed_slices = (!full).then_some(changes.slices.as_slice());
        self.metrics
            .observe_programmed(&snapshot.state, changed_slices, SystemTime::now());
        // Names are not the datapath: written after the pass (after a full one before
        // the agent says it is healthy, see apply_desired; else by the names tick).
        if full || !changes.is_empty() || !changes.slices.is_empty() {
            self.names_stale = true;
        }
        let counters_started = Instant::now();
        if full || self.service_counter_ids != self.service_id_changes() {
            self.sync_service_counters();
        }
        let counters_time = counters_started.elapsed();
        let frontends = self.model.desired().v4.frontends.len();
        let frontends_v6 = self.model.desired().v6.frontends.len();
        info!(
            services = snapshot.state.services.len(),
            frontends,
            frontends_v6,
            written = report.frontends_written + v6.report.frontends_written,
            removed = report.frontends_removed,
            map_writes = report.ops_applied,
            failed = report.failures.len(),
            full,
            // Whole microseconds: the shortest float that prints them has no noise.
            model_ms = model_time.as_micros() as f64 / 1000.0,
            syncer_ms = maps_time.as_micros() as f64 / 1000.0,
            map_writes_ms = map_writes_time.as_micros() as f64 / 1000.0,
            service_counters_ms = counters_time.as_micros() as f64 / 1000.0,
            // The whole pass: the model's update for the snapshot, then everything
            // that brings the maps to it.
            elapsed_ms = (model_time + started.elapsed()).as_micros() as f64 / 1000.0,
            "synced"
        );
        self.retry_pending = !report.failures.is_empty()
            || !report.cleanup_errors.is_empty()
            || !addr_errors.is_empty()
            || !v6.report.failures.is_empty()
            || !v6.report.cleanup_errors.is_empty()
            || !v6.addr_errors.is_empty();
        Some(PassOutcome {
            complete: report.complete() && v6.report.complete(),
            report,
            health_checks_changed: full || changes.health_checks,
            full,
        })
    }

    /// Writes the names of what the maps hold for `kpr inspect` and `kpr trace`
    /// ([`names`]), when they changed. A failure costs only the names: logged, retried
    /// on the next pass.
    fn publish_names(&mut self, snapshot: &Snapshot) {
        let started = Instant::now();
        self.names_stale = false;
        let path = names::path_for(&self.config.pin_dir);
        let (syncer, syncer6) = (&self.syncer, &self.syncer6);
        match names::write_current(
            &path,
            &snapshot.state,
            self.model.desired(),
            |family: &crate::state::AddressType, name: &crate::model::ServicePortName| match family
            {
                crate::state::AddressType::IPv4 => syncer.service_id(name),
                crate::state::AddressType::IPv6 => syncer6.service_id(name),
                crate::state::AddressType::Fqdn | crate::state::AddressType::Unknown(_) => None,
            },
            self.published_names,
        ) {
            Ok(names::Written::Replaced(digest)) => {
                self.published_names = Some(digest);
                debug!(
                    names_ms = started.elapsed().as_micros() as f64 / 1000.0,
                    "names written"
                );
            }
            Ok(names::Written::Unchanged) => {}
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot write the names file; kpr inspect shows service ids until a pass writes it");
                self.published_names = None;
            }
        }
    }

    /// Moves whenever either family's set of service ids changes.
    fn service_id_changes(&self) -> u64 {
        self.syncer
            .service_id_changes()
            .wrapping_add(self.syncer6.service_id_changes())
    }

    /// Gives every programmed service port a counter entry (or none, when the counters
    /// are off). A failure costs only counts: logged, counted, retried on the next pass.
    fn sync_service_counters(&mut self) {
        self.service_counter_ids = self.service_id_changes();
        // The families' service ids are disjoint: one counters map holds both.
        let ids: BTreeSet<u32> = self
            .syncer
            .service_ids_in_use()
            .chain(self.syncer6.service_ids_in_use())
            .collect();
        if let Err(error) = self.service_counters.sync(&mut self.datapath.maps, &ids) {
            warn!(error = %crate::error_chain(&error), "cannot update the per-service counters; retrying on the next pass");
            self.metrics.service_counter_failures.inc();
        }
    }

    /// Reads the per-service counters into `kpr_service_*_total`, named as the
    /// desired state names their service ports.
    fn record_service_counters(&self) {
        let read = self.service_counters.read(&self.datapath.maps);
        if read.is_empty() {
            // Counters off (or none yet): nothing to name, no walk of the frontends.
            self.metrics.record_service_totals(BTreeMap::new());
            return;
        }
        let desired = self.model.desired();
        let mut labels = BTreeMap::new();
        let ports = desired
            .v4
            .frontends
            .values()
            .map(|spec| {
                (
                    self.syncer.service_id(&spec.service_port),
                    &spec.service_port,
                )
            })
            .chain(desired.v6.frontends.values().map(|spec| {
                (
                    self.syncer6.service_id(&spec.service_port),
                    &spec.service_port,
                )
            }));
        for (id, port) in ports {
            if let Some(id) = id {
                labels
                    .entry(id)
                    .or_insert_with(|| crate::metrics::ServiceLabels {
                        namespace: port.service.namespace.to_string(),
                        service: port.service.name.to_string(),
                        port: port.port.to_string(),
                        protocol: names::protocol_name(port.proto),
                    });
            }
        }
        // A dual-stack service port has an id per family: its totals are their sum.
        let mut totals: BTreeMap<crate::metrics::ServiceLabels, _> = BTreeMap::new();
        for (id, total) in read {
            let Some(label) = labels.get(&id) else {
                continue;
            };
            let sum: &mut proxy_common::service_stats::ServiceStatsV1 =
                totals.entry(label.clone()).or_default();
            sum.connections += total.connections;
            sum.packets += total.packets;
            sum.bytes += total.bytes;
        }
        self.metrics.record_service_totals(totals);
    }

    /// Logs frontends that newly failed (and those programmed again) and counts them;
    /// one that keeps failing on every retry is logged once.
    fn report_failures(&mut self, report: &SyncReport, report_v6: &SyncReport<Ipv6Addr>) {
        let failures: Vec<FailureView<'_>> = report
            .failures
            .iter()
            .map(FailureView::of)
            .chain(report_v6.failures.iter().map(FailureView::of))
            .collect();
        let failing: BTreeMap<String, &'static str> = failures
            .iter()
            .map(|failure| (failure.frontend.clone(), failure.label))
            .collect();
        for failure in &failures {
            if self.failing.contains_key(&failure.frontend) {
                continue;
            }
            self.metrics
                .frontend_failures
                .get_or_create(&ReasonLabels {
                    reason: failure.label.to_owned(),
                })
                .inc();
            error!(
                service = %failure.service_port,
                frontend = %failure.frontend,
                map_full = failure.map_full,
                "cannot program frontend (retrying): {}",
                failure.message
            );
        }
        for frontend in self
            .failing
            .keys()
            .filter(|key| !failing.contains_key(*key))
        {
            info!(frontend = %frontend, "frontend programmed after failures");
        }
        for reason in FAILURE_LABELS {
            let count = failing.values().filter(|label| **label == reason).count();
            self.metrics
                .frontends_unprogrammed
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.failing = failing;
    }

    /// Logs new and resolved diagnostics and exports their counts.
    fn report_diagnostics(&mut self, snapshot: &Snapshot) {
        self.source_diagnostics.clone_from(&snapshot.diagnostics);
        let diagnostics: BTreeSet<Diagnostic> = snapshot
            .diagnostics
            .iter()
            .chain(&self.model.desired().diagnostics)
            .cloned()
            .collect();
        for diagnostic in diagnostics.difference(&self.known_diagnostics) {
            warn!(
                object = %diagnostic.object,
                reason = diagnostic.reason.label(),
                "skipped: {}",
                diagnostic.message
            );
        }
        for diagnostic in self.known_diagnostics.difference(&diagnostics) {
            info!(object = %diagnostic.object, reason = diagnostic.reason.label(), "resolved");
        }
        // Every reason is exported, at 0 when nothing is skipped for it.
        for reason in DiagnosticReason::ALL {
            let count = diagnostics
                .iter()
                .filter(|diagnostic| diagnostic.reason == reason)
                .count();
            self.metrics
                .skipped_objects
                .get_or_create(&ReasonLabels {
                    reason: reason.label().to_owned(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        self.known_diagnostics = diagnostics;
    }

    /// Applies a changed node network: settings, then a sync pass for the NodePorts,
    /// and the health check ports to the new NodePort addresses.
    async fn apply_node_network(&mut self) {
        let node = &self.node;
        log_node_network(node, "the node's network changed");
        if let Err(error) = self
            .datapath
            .maps
            .set_config(&datapath_config(&self.config, node))
        {
            warn!(error = %crate::error_chain(&error), "cannot update the datapath settings");
        }
        if let Err(error) = self
            .datapath
            .maps
            .set_config_v6(&datapath_config_v6(&self.config, node))
        {
            warn!(error = %crate::error_chain(&error), "cannot update the IPv6 datapath settings");
        }
        self.model_settings
            .node_port_addresses
            .clone_from(&node.node_port_addresses);
        self.model_settings
            .node_port_addresses_v6
            .clone_from(&node.node_port_addresses_v6);
        self.compute_desired();
        self.sync_pass();
        let addresses = health_check_addresses(&self.config, &self.node);
        self.health_checks.set_addresses(addresses).await;
    }

    /// Attaches the programs to the interfaces that want them (and forgets vanished
    /// ones); `first`: also sweep pins of interfaces gone while no agent ran.
    fn reconcile_interfaces(&mut self, first: bool) {
        let all = match interfaces::list() {
            Ok(all) => all,
            Err(error) => {
                warn!(%error, "cannot list interfaces");
                return;
            }
        };
        if first {
            self.attachments.sweep_stale_pins(&all);
        }
        let mut wanted = Vec::new();
        for interface in &all {
            // An external interface is never treated as a pod interface, whatever the
            // patterns say.
            let hooks = if self.node.interfaces.contains(&interface.name) {
                &Hook::NODE
            } else if interfaces::matches(&interface.name, &self.config.pod_interfaces) {
                &Hook::POD
            } else {
                continue;
            };
            wanted.extend(hooks.iter().map(|hook| (interface.clone(), *hook)));
        }
        for error in self.attachments.reconcile(&mut self.datapath, &wanted) {
            warn!(error = %crate::error_chain(&error), "attach failed; retrying on the next interface change");
        }
    }

    /// Reads map fill, datapath counters and attachments into the metrics. The
    /// conntrack and affinity maps' fill comes from the upkeep thread, which walks
    /// those maps anyway ([`crate::upkeep`]).
    fn refresh_metrics(&self) {
        let metrics = &self.metrics;
        let mirror = self.syncer.mirror();
        let mirror6 = self.syncer6.mirror();
        let capacities = self.datapath.maps.capacities;
        // Each family's four maps the syncer writes, by one function.
        let fill = family_fill(
            mirror,
            self.frontend_addrs.held().len(),
            [
                capacities.services,
                capacities.backends,
                capacities.source_ranges,
                capacities.frontend_addrs,
            ],
        )
        .into_iter()
        .chain(family_fill(
            mirror6,
            self.frontend_addrs6.held().len(),
            [
                capacities.services_v6,
                capacities.backends_v6,
                capacities.source_ranges_v6,
                capacities.frontend_addrs_v6,
            ],
        ));
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
        self.record_service_counters();
        match self.datapath.maps.counters() {
            Ok(totals) => metrics.record_datapath_totals(&totals),
            Err(error) => {
                debug!(error = %crate::error_chain(&error), "cannot read the datapath counters");
            }
        }
        metrics.programs_attached.clear();
        for (interface, hook) in self.attachments.attached() {
            metrics
                .programs_attached
                .get_or_create(&AttachLabels {
                    interface: interface.name.clone(),
                    hook: hook.label().to_owned(),
                })
                .set(1);
        }
        if let Some(hooks) = &self.cgroup_hooks {
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
}

/// A writer that adds up the time the kernel takes for the map writes, which the pass
/// log tells apart from the syncer's own work.
struct TimedWriter<'a, W> {
    inner: &'a mut W,
    spent: Duration,
}

impl<W: MapWriter> MapWriter for TimedWriter<'_, W> {
    fn apply(&mut self, op: &MapOp) -> Result<(), WriteError> {
        let started = Instant::now();
        let result = self.inner.apply(op);
        self.spent += started.elapsed();
        result
    }

    fn apply_batch(&mut self, ops: &[MapOp]) -> (usize, Option<WriteError>) {
        let started = Instant::now();
        let result = self.inner.apply_batch(ops);
        self.spent += started.elapsed();
        result
    }
}

/// What the IPv6 half of a sync pass did.
struct FamilyPass<F: crate::family::Family> {
    report: SyncReport<F>,
    addr_errors: Vec<crate::sync::frontend_addrs::AddrWriteError<F>>,
}

/// One family's part of a sync pass: its address set before and after its syncer, as
/// the IPv4 part of [`Agent::sync_pass`] does it (see `sync::frontend_addrs`).
fn sync_family<F: crate::family::Family>(
    syncer: &mut Syncer<F>,
    addrs: &mut FrontendAddrs<F>,
    maps: &mut crate::datapath::Maps,
    desired: &Desired,
    changes: &ModelChanges,
    full: bool,
) -> FamilyPass<F> {
    let changed_addrs: BTreeSet<F> = F::changed_frontends(changes)
        .keys()
        .map(|key| key.addr)
        .collect();
    let mut addr_errors = if full {
        addrs.add_desired(desired, maps)
    } else {
        addrs.add_changed(desired, &changed_addrs, maps)
    };
    let mut report = if full {
        syncer.sync(desired, maps)
    } else {
        syncer.sync_changes(desired, changes, maps)
    };
    if report.failures.iter().any(|f| f.error.map_full) && report.ops_applied > 0 {
        // Room may have been made only after a frontend was refused (as for IPv4).
        let again = syncer.sync(desired, maps);
        report.merge(again);
    }
    addr_errors.extend(if full {
        addrs.remove_stale(desired, syncer.frontend_addrs(), maps)
    } else {
        addrs.remove_changed(
            desired,
            &changed_addrs,
            |addr| syncer.holds_frontend_at(addr),
            maps,
        )
    });
    FamilyPass {
        report,
        addr_errors,
    }
}

/// What a sync pass tells the rest of [`Agent::apply_desired`].
struct PassOutcome {
    report: SyncReport,
    /// Both families' maps were written (see [`SyncReport::complete`]).
    complete: bool,
    /// The health check servers' desired state may have changed.
    health_checks_changed: bool,
    /// The pass wrote everything.
    full: bool,
}

/// Labels of `kpr_frontend_failures_total{reason}` and `kpr_frontends_unprogrammed`.
const FAILURE_LABELS: [&str; 2] = ["map_full", "write_error"];

fn failure_label<F: crate::family::Family>(failure: &FrontendFailure<F>) -> &'static str {
    if failure.error.map_full {
        FAILURE_LABELS[0]
    } else {
        FAILURE_LABELS[1]
    }
}

/// A frontend failure of either family, as the logs and metrics show it.
struct FailureView<'a> {
    /// `addr:port/proto` (`[addr]:port/proto` for IPv6).
    frontend: String,
    service_port: &'a crate::model::ServicePortName,
    label: &'static str,
    map_full: bool,
    message: &'a str,
}

impl<'a> FailureView<'a> {
    fn of<F: crate::family::Family>(failure: &'a FrontendFailure<F>) -> Self {
        let key = &failure.frontend;
        let addr = match key.addr.into() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        Self {
            frontend: format!(
                "{addr}:{}/{}",
                key.port,
                crate::model::proto_name(key.proto)
            ),
            service_port: &failure.service_port,
            label: failure_label(failure),
            map_full: failure.error.map_full,
            message: &failure.error.message,
        }
    }
}

/// The resync's read of the maps in progress, with the write counts when it began.
struct Readback {
    writes: u64,
    addr_writes: u64,
    /// The IPv6 syncer's and address set's write counts.
    writes_v6: (u64, u64),
    task: tokio::task::JoinHandle<(
        crate::datapath::Result<Mirror>,
        crate::datapath::Result<FrontendAddrs>,
        crate::datapath::Result<ReadV6>,
    )>,
}

/// What the readback found in the IPv6 maps and address set.
type ReadV6 = (Mirror<Ipv6Addr>, FrontendAddrs<Ipv6Addr>);

/// Counts a repair in `kpr_drift_repaired_total`.
/// The fill of one family's service, backend, source-range maps and frontend address
/// set (`capacities` in that order), for `kpr_map_entries`/`kpr_map_capacity`.
fn family_fill<F: crate::family::Family>(
    mirror: &crate::sync::Mirror<F>,
    frontend_addrs: usize,
    [services, backends, source_ranges, addrs]: [u32; 4],
) -> [(&'static str, usize, u32); 4] {
    [
        (F::SERVICES_MAP, mirror.services.len(), services),
        (F::BACKENDS_MAP, mirror.backends.len(), backends),
        (
            F::SOURCE_RANGES_MAP,
            mirror.source_ranges.len(),
            source_ranges,
        ),
        (F::FRONTEND_ADDRS_MAP, frontend_addrs, addrs),
    ]
}

fn drift_repaired(metrics: &Metrics, map: &str, kind: &str, count: usize) {
    metrics
        .drift_repaired
        .get_or_create(&DriftLabels {
            map: map.to_owned(),
            kind: kind.to_owned(),
        })
        .inc_by(count as u64);
}

/// One family's resync comparison ([`Agent::on_readback`] does IPv4's the same way):
/// what the kernel holds is taken as the syncer's and the address set's state when it
/// differs from what they wrote, unless they wrote during the read (`writes_then`).
/// Returns how many entries differ (the next pass repairs them).
fn family_drift<F: crate::family::Family>(
    syncer: &mut Syncer<F>,
    addrs: &mut FrontendAddrs<F>,
    (writes_then, addr_writes_then): (u64, u64),
    read: crate::datapath::Result<(Mirror<F>, FrontendAddrs<F>)>,
    metrics: &Metrics,
) -> usize {
    let (real, real_addrs) = match read {
        Ok(read) => read,
        Err(error) => {
            warn!(error = %crate::error_chain(&error), family = F::NAME, "cannot read the maps back; retrying on the next resync");
            return 0;
        }
    };
    let mut drift = 0;
    if writes_then == syncer.writes() {
        let differences = syncer.mirror().differences(&real);
        let maps = [F::SERVICES_MAP, F::BACKENDS_MAP, F::SOURCE_RANGES_MAP];
        for (map, count) in maps.into_iter().zip(differences) {
            if count > 0 {
                warn!(
                    map,
                    entries = count,
                    "the map differs from what the agent wrote; repairing"
                );
                drift_repaired(metrics, map, "entries", count);
                drift += count;
            }
        }
        if drift > 0 {
            syncer.readopt(real);
        }
    }
    if addr_writes_then == addrs.writes() {
        let held = addrs.held();
        let addr_drift = real_addrs
            .held()
            .iter()
            .filter(|(addr, kinds)| held.get(*addr) != Some(*kinds))
            .count()
            + held
                .keys()
                .filter(|addr| !real_addrs.held().contains_key(*addr))
                .count();
        if addr_drift > 0 {
            let map = F::FRONTEND_ADDRS_MAP;
            warn!(
                map,
                entries = addr_drift,
                "the map differs from what the agent wrote; repairing"
            );
            drift_repaired(metrics, map, "entries", addr_drift);
            addrs.readopt(real_addrs);
            drift += addr_drift;
        }
    }
    drift
}

/// What the resync's read of the maps found: the syncer's maps and the frontend
/// address set, with the write counts from when it began (a read the agent wrote
/// during is not compared).
struct MapsRead {
    writes: u64,
    addr_writes: u64,
    mirror: crate::datapath::Result<Mirror>,
    frontend_addrs: crate::datapath::Result<FrontendAddrs>,
    writes_v6: (u64, u64),
    v6: crate::datapath::Result<ReadV6>,
}

/// The result of the read in progress; never, without one.
async fn next_readback(readback: &mut Option<Readback>) -> MapsRead {
    let Some(pending) = readback else {
        return std::future::pending().await;
    };
    let (mirror, frontend_addrs, v6) = match (&mut pending.task).await {
        Ok(read) => read,
        Err(error) => {
            let failed = || crate::datapath::Error::Io {
                path: "the map readback".into(),
                source: std::io::Error::other(error.to_string()),
            };
            (Err(failed()), Err(failed()), Err(failed()))
        }
    };
    MapsRead {
        writes: pending.writes,
        addr_writes: pending.addr_writes,
        mirror,
        frontend_addrs,
        writes_v6: pending.writes_v6,
        v6,
    }
}

/// The next link notification; never, without a subscription.
async fn next_link_event(events: &mut Option<LinkEvents>) -> std::io::Result<()> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
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
/// One log line of the node's network, both families: an IPv6-only node has no IPv4
/// field to show, and its NodePorts and masquerade address are the IPv6 ones.
fn log_node_network(node: &NodeNetwork, what: &str) {
    info!(
        interfaces = ?node.interfaces,
        node_port_addresses = ?node.node_port_addresses,
        snat_addr = ?node.snat_addr,
        node_port_addresses_v6 = ?node.node_port_addresses_v6,
        snat_addr_v6 = ?node.snat_addr_v6,
        "{what}"
    );
}

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
    let addresses_v6 =
        match node_network::ipv6_addresses(|name| interfaces::matches(name, &patterns)) {
            Ok(addresses) => addresses,
            Err(error) => {
                warn!(%error, "cannot list the node's IPv6 addresses");
                Vec::new()
            }
        };
    node_network::decide_v6(
        &mut node,
        &addresses_v6,
        &config.node_port_filters,
        config.node_ip_v6,
    );
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
/// Where healthCheckNodePorts listen: kube-proxy's rule, the node addresses that
/// nodePortAddresses admits, or every address (`0.0.0.0`) when it is unset.
/// Where healthCheckNodePorts listen, as kube-proxy's per-family servers: every address
/// of nodePortAddresses of both families, or without it the wildcard of each family the
/// node has NodePort addresses of (IPv6's only then: a node without IPv6 could not
/// bind it, and a port is bound on all its addresses or on none).
fn health_check_addresses(config: &AgentConfig, node: &NodeNetwork) -> Vec<IpAddr> {
    if config.node_port_filters.is_empty() {
        let mut addresses = config.health_check_addresses.clone();
        let all_of_ipv4 = addresses.contains(&IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if all_of_ipv4 && !node.node_port_addresses_v6.is_empty() {
            addresses.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        }
        addresses
    } else {
        node.node_port_addresses
            .iter()
            .map(|addr| IpAddr::V4(*addr))
            .chain(
                node.node_port_addresses_v6
                    .iter()
                    .map(|addr| IpAddr::V6(*addr)),
            )
            .collect()
    }
}

/// The node's IPv6 settings: its IPv6 masquerade address and the IPv6 cluster CIDR.
fn datapath_config_v6(config: &AgentConfig, node: &NodeNetwork) -> proxy_common::NodeConfigV6 {
    let (cidr, len) = config
        .cluster_cidr_v6
        .map_or((Ipv6Addr::UNSPECIFIED, 0), |(addr, len)| (addr, len));
    proxy_common::NodeConfigV6 {
        snat_addr: proxy_common::Be32x4::from_ipv6(
            node.snat_addr_v6.unwrap_or(Ipv6Addr::UNSPECIFIED),
        ),
        cluster_cidr_addr: proxy_common::Be32x4::from_ipv6(cidr),
        cluster_cidr_len: len,
        _pad: [0; 7],
    }
}

fn datapath_config(config: &AgentConfig, node: &NodeNetwork) -> DatapathConfig {
    DatapathConfig {
        snat_addr: node
            .snat_addr
            .map_or(proxy_common::Be32(0), proxy_common::Be32::from_ipv4),
        ..config.datapath
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
    names::remove(&names::path_for(pin_dir));
    let _ = std::fs::remove_dir(pin_dir.join("links"));
    let _ = std::fs::remove_dir(pin_dir);
}

/// Removes everything an agent pinned under `pin_dir`: link pins (which detaches the
/// programs once no process holds them) and map pins.
///
/// # Errors
/// When an agent is running on `pin_dir` (its lock is held): its pins stay.
pub fn cleanup(pin_dir: &Path) -> Result<(), crate::datapath::lock::Error> {
    let Some(_lock) = PinDirLock::acquire_existing(pin_dir)? else {
        info!(pin_dir = %pin_dir.display(), "nothing to clean up");
        return Ok(());
    };
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_documents;

    fn config(map_sizes: MapSizes) -> AgentConfig {
        AgentConfig {
            source: SourceConfig::Manifests(PathBuf::from("/nonexistent")),
            node_name: None,
            pin_dir: PathBuf::from("/sys/fs/bpf/test"),
            pod_interfaces: Vec::new(),
            node_interfaces: None,
            node_port_filters: Vec::new(),
            node_ip: None,
            node_ip_v6: None,
            cluster_cidr_v6: None,
            cgroup_path: None,
            socket_lb: socket_lb::Mode::Off,
            service_counters: service_counters::Mode::Auto,
            keep_state: false,
            conntrack_max: None,
            service_cidr: proxy_common::ServiceCidrV4::default(),
            map_sizes,
            datapath: DatapathConfig::DEFAULT,
            conntrack_gc_interval: Duration::from_secs(10),
            sync_period: Duration::from_secs(30),
            model: ModelSettings::default(),
            healthz_bind_address: None,
            metrics_bind_address: None,
            health_check_addresses: Vec::new(),
        }
    }

    /// `services` ClusterIP services of one port, each with the same `endpoints`
    /// endpoints, as the model sees them.
    fn desired_for(services: usize, endpoints: usize) -> Desired {
        let mut snapshot = Snapshot::for_node(None);
        let addresses: Vec<String> = (0..endpoints)
            .map(|i| format!("\"10.1.0.{}\"", i + 1))
            .collect();
        let mut text = String::new();
        for i in 0..services {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{}], conditions: {{ready: true}}}}]\n",
                i / 250,
                i % 250 + 1,
                addresses.join("]}, {addresses: [")
            ));
        }
        parse_documents(&text, "test.yaml", &mut snapshot);
        crate::model::desired(&snapshot.state, &ModelSettings::default())
    }

    #[test]
    fn the_demand_counts_frontends_slots_and_distinct_backends() {
        let desired = desired_for(20, 10);
        assert_eq!(desired.v4.frontends.len(), 20, "{:?}", desired.diagnostics);
        assert_eq!(
            MapDemand::of(&desired),
            MapDemand {
                services: 20 * 11,
                backends: 10,
                source_ranges: 0,
                ..MapDemand::default()
            }
        );
    }

    #[test]
    fn the_ipv6_datapath_config_carries_the_node_address_and_cluster_cidr() {
        let mut config = config(MapSizes::default());
        let v6 = |text: &str| text.parse::<Ipv6Addr>().expect("v6");
        config.cluster_cidr_v6 = Some((v6("fd00:10:244::"), 56));
        let node = NodeNetwork {
            snat_addr_v6: Some(v6("fd00::5")),
            ..NodeNetwork::default()
        };
        let settings = datapath_config_v6(&config, &node);
        assert!(settings.has_snat_addr());
        assert_eq!(settings.snat_addr.to_ipv6(), v6("fd00::5"));
        let inside = proxy_common::Be32x4::from_ipv6(v6("fd00:10:244:1::7"));
        let outside = proxy_common::Be32x4::from_ipv6(v6("fd00:10:245::7"));
        assert!(settings.in_cluster_cidr(&inside));
        assert!(!settings.in_cluster_cidr(&outside));
        // Without an IPv6 address, masquerade has none (the datapath then drops).
        let bare = datapath_config_v6(&config, &NodeNetwork::default());
        assert!(!bare.has_snat_addr());
    }

    #[test]
    fn maps_grow_past_the_configured_size_for_the_cluster_found_at_start() {
        use proxy_common::capacity;
        // 100 000 services of 10 endpoints: 1.1 million service entries.
        let demand = MapDemand {
            services: 1_100_000,
            backends: 10,
            source_ranges: 0,
            services_v6: 2_000,
            ..MapDemand::default()
        };
        let options = load_options(&config(MapSizes::default()), &demand);
        assert_eq!(options.services_max, Some(1_650_000), "half again as room");
        // The IPv6 service map from its own default: 2 000 entries fit in it.
        assert_eq!(options.services_v6_max, Some(capacity::SERVICES_V6));
        assert_eq!(options.backends_max, Some(capacity::BACKENDS_V4));
        assert_eq!(options.source_ranges_max, Some(capacity::SOURCE_RANGES_V4));
        assert_eq!(options.affinity_max, None);
        // A configured size is the least one.
        let sizes = MapSizes {
            services: Some(4_000_000),
            backends: Some(16),
            affinity: Some(1024),
            source_ranges: None,
        };
        let options = load_options(&config(sizes), &demand);
        assert_eq!(options.services_max, Some(4_000_000));
        assert_eq!(options.backends_max, Some(16), "10 backends fit");
        assert_eq!(options.affinity_max, Some(1024));
    }
}
