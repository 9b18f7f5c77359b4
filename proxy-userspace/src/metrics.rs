//! Prometheus metrics, served on `--metrics-bind-address` (kube-proxy's default port
//! 10249) at `/metrics`.
//!
//! Where kube-proxy has a metric for the same thing, it has kube-proxy's name (prefix
//! `kubeproxy_`), so dashboards and alerts carry over. Ours are prefixed `kpr_`.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use proxy_common::COUNTER_NAMES;

pub use crate::state::TRIGGER_TIME_ANNOTATION;
use crate::state::{ClusterState, ObjectKey, SliceInfo};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: String,
}

/// A service port, as `kpr_service_*_total` name it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
    /// The port's name (empty for an unnamed single port).
    pub port: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttachLabels {
    pub interface: String,
    pub hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub map: String,
    /// `entries` or `pin`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// kubeproxy_sync_proxy_rules_duration_seconds: one model + map sync pass.
    pub sync_duration: Histogram,
    /// kubeproxy_sync_proxy_rules_last_timestamp_seconds.
    pub sync_last_timestamp: Gauge<f64, AtomicU64>,
    /// kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds.
    pub sync_last_queued_timestamp: Gauge<f64, AtomicU64>,
    /// kubeproxy_network_programming_duration_seconds: from an endpoint change (its
    /// trigger-time annotation) to the map writes being done.
    pub network_programming: Histogram,
    /// kpr_map_entries{map}.
    pub map_entries: Family<MapLabels, Gauge>,
    /// kpr_map_capacity{map}.
    pub map_capacity: Family<MapLabels, Gauge>,
    /// kpr_datapath_events_total{event}: the datapath's per-CPU counters, summed.
    pub datapath_events: Family<EventLabels, Counter>,
    /// kpr_programs_attached{interface,hook}: 1 per attached program; the socket-layer
    /// hooks have `interface="cgroup:<path>"`.
    pub programs_attached: Family<AttachLabels, Gauge>,
    /// kpr_skipped_objects{reason}: objects (or parts) skipped as invalid right now.
    pub skipped_objects: Family<ReasonLabels, Gauge>,
    /// kpr_frontend_failures_total{reason}: frontends that could not be programmed
    /// (each time one starts failing; it is retried meanwhile).
    pub frontend_failures: Family<ReasonLabels, Counter>,
    /// kpr_frontends_unprogrammed{reason}: frontends the last pass could not program.
    pub frontends_unprogrammed: Family<ReasonLabels, Gauge>,
    /// kpr_conntrack_reaped_total.
    pub conntrack_reaped: Counter,
    /// kpr_socket_forget_failures_total: sync passes whose socket-layer cleanup (reverse
    /// and affinity entries, destroying connected sockets of removed backends) failed.
    pub socket_forget_failures: Counter,
    /// kpr_frontend_addr_write_failures_total: writes to the frontend address set that
    /// the kernel refused (retried on the next pass).
    pub frontend_addr_write_failures: Counter,
    /// kpr_datapath_drift_repaired_total{map,kind}: map entries (or pins) the periodic
    /// resync found different from what the agent wrote, and repaired.
    pub drift_repaired: Family<DriftLabels, Counter>,
    /// kpr_source_read_failures_total{reason}: reads of the manifest source that failed
    /// (the directory as a whole, or a file); nothing changes in the maps for them.
    pub source_read_failures: Family<ReasonLabels, Counter>,
    /// kpr_api_watch_failures_total{resource}: failed watch or list calls (each is
    /// retried with backoff; the datapath keeps its state meanwhile).
    pub api_watch_failures: Family<ResourceLabels, Counter>,
    /// kpr_api_watch_listed{resource}: 1 once the resource's initial list is complete.
    pub api_watch_listed: Family<ResourceLabels, Gauge>,
    /// kpr_api_last_success_timestamp_seconds: the latest time every watch was known
    /// to work; alert on its age to catch an agent cut off from the API server.
    pub api_last_success: Gauge<f64, AtomicU64>,
    /// Watch failures already counted, per resource.
    last_watch_failures: Mutex<BTreeMap<String, u64>>,
    /// kpr_http_connections_rejected_total{server}: connections closed at once because
    /// their listener served its maximum (see [`crate::http`]).
    pub http_rejected: Family<ServerLabels, Counter>,
    /// kpr_health_check_bind_failures_total{reason}: healthCheckNodePort listeners that
    /// could not be opened (each failed attempt; they are retried).
    pub health_check_bind_failures: Family<ReasonLabels, Counter>,
    /// kpr_takeover_netfilter_flows: IPv4 connections netfilter translates to a
    /// frontend of ours (kube-proxy's, from before the takeover), which the datapath
    /// leaves to it.
    pub takeover_netfilter_flows: Gauge,
    /// kpr_takeover_ipv6_netfilter_flows: the same for IPv6 connections.
    pub takeover_ipv6_netfilter_flows: Gauge,
    /// kpr_takeover_check_enabled: 1 while the datapath asks netfilter's conntrack
    /// about new flows to frontends.
    pub takeover_check_enabled: Gauge,
    /// kpr_takeover_failures_total{reason}: failed reads of netfilter's conntrack or
    /// writes of the check (the check is then left on).
    pub takeover_failures: Family<ReasonLabels, Counter>,
    /// kpr_service_connections_total{namespace,service,port,protocol}: new flows to
    /// the service port (see `crate::service_counters`).
    pub service_connections: Family<ServiceLabels, Counter>,
    /// kpr_service_packets_total{...}: packets the TC path translated, both ways.
    pub service_packets: Family<ServiceLabels, Counter>,
    /// kpr_service_bytes_total{...}: their IP bytes.
    pub service_bytes: Family<ServiceLabels, Counter>,
    /// kpr_service_counter_failures_total: sync passes whose per-service counter
    /// entries could not all be written (retried on the next pass).
    pub service_counter_failures: Counter,
    /// The per-service totals last seen, to turn totals into increments.
    last_service_totals:
        Mutex<BTreeMap<ServiceLabels, proxy_common::service_stats::ServiceStatsV1>>,
    /// The counter totals last seen, to turn totals into increments.
    last_datapath_totals: Mutex<Vec<u64>>,
    /// Trigger times already measured, per slice.
    seen_trigger_times: Mutex<BTreeMap<ObjectKey, Box<str>>>,
    /// When the agent started: trigger times before it are not measured (kube-proxy's
    /// rule: a change made while no proxy ran would count the outage as latency).
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            // kube-proxy's buckets: 1 ms doubling up to ~16 s.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            sync_last_timestamp: Gauge::default(),
            sync_last_queued_timestamp: Gauge::default(),
            // kube-proxy: 0.25 s .. 15 min; ours starts lower, map writes are fast.
            network_programming: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
                300.0,
            ]),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            datapath_events: Family::default(),
            programs_attached: Family::default(),
            skipped_objects: Family::default(),
            frontend_failures: Family::default(),
            frontends_unprogrammed: Family::default(),
            conntrack_reaped: Counter::default(),
            socket_forget_failures: Counter::default(),
            frontend_addr_write_failures: Counter::default(),
            drift_repaired: Family::default(),
            source_read_failures: Family::default(),
            api_watch_failures: Family::default(),
            api_watch_listed: Family::default(),
            api_last_success: Gauge::default(),
            last_watch_failures: Mutex::new(BTreeMap::new()),
            health_check_bind_failures: Family::default(),
            http_rejected: Family::default(),
            takeover_netfilter_flows: Gauge::default(),
            takeover_ipv6_netfilter_flows: Gauge::default(),
            takeover_check_enabled: Gauge::default(),
            takeover_failures: Family::default(),
            service_connections: Family::default(),
            service_packets: Family::default(),
            service_bytes: Family::default(),
            last_service_totals: Mutex::new(BTreeMap::new()),
            service_counter_failures: Counter::default(),
            last_datapath_totals: Mutex::new(Vec::new()),
            seen_trigger_times: Mutex::new(BTreeMap::new()),
            started: SystemTime::now(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time of one pass turning Services and EndpointSlices into map writes",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the maps were last synced",
            metrics.sync_last_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "When a change was last queued for sync",
            metrics.sync_last_queued_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the datapath programmed",
            metrics.network_programming.clone(),
        );
        registry.register(
            "kpr_map_entries",
            "Entries in each BPF map",
            metrics.map_entries.clone(),
        );
        registry.register(
            "kpr_map_capacity",
            "Capacity of each BPF map",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "kpr_datapath_events",
            "Packets and flows seen by the datapath, by event (drop_* are drops by reason)",
            metrics.datapath_events.clone(),
        );
        registry.register(
            "kpr_service_connections",
            "New flows to each service port (per-service counters on: --service-counters)",
            metrics.service_connections.clone(),
        );
        registry.register(
            "kpr_service_packets",
            "Packets of each service port's flows the TC datapath translated, both directions",
            metrics.service_packets.clone(),
        );
        registry.register(
            "kpr_service_bytes",
            "IP bytes of those packets",
            metrics.service_bytes.clone(),
        );
        registry.register(
            "kpr_service_counter_failures",
            "Sync passes whose per-service counter entries could not all be written",
            metrics.service_counter_failures.clone(),
        );
        registry.register(
            "kpr_programs_attached",
            "Programs attached, by interface and hook",
            metrics.programs_attached.clone(),
        );
        registry.register(
            "kpr_skipped_objects",
            "Objects or parts of objects currently skipped as invalid, by reason",
            metrics.skipped_objects.clone(),
        );
        registry.register(
            "kpr_takeover_netfilter_flows",
            "IPv4 connections netfilter translates to our frontends (kube-proxy's), left to it until they end",
            metrics.takeover_netfilter_flows.clone(),
        );
        registry.register(
            "kpr_takeover_ipv6_netfilter_flows",
            "IPv6 connections netfilter translates to our frontends (kube-proxy's), left to it until they end",
            metrics.takeover_ipv6_netfilter_flows.clone(),
        );
        registry.register(
            "kpr_takeover_check_enabled",
            "1 while the datapath asks netfilter's conntrack about new flows to frontends",
            metrics.takeover_check_enabled.clone(),
        );
        registry.register(
            "kpr_takeover_failures",
            "Failed reads of netfilter's conntrack or writes of the takeover check, by reason",
            metrics.takeover_failures.clone(),
        );
        registry.register(
            "kpr_frontend_failures",
            "Frontends that could not be programmed, by reason",
            metrics.frontend_failures.clone(),
        );
        registry.register(
            "kpr_frontends_unprogrammed",
            "Frontends the last sync pass could not program (retried), by reason",
            metrics.frontends_unprogrammed.clone(),
        );
        registry.register(
            "kpr_conntrack_reaped",
            "Expired conntrack entries removed by the agent",
            metrics.conntrack_reaped.clone(),
        );
        registry.register(
            "kpr_socket_forget_failures",
            "Sync passes whose socket-layer cleanup of removed backends failed",
            metrics.socket_forget_failures.clone(),
        );
        registry.register(
            "kpr_frontend_addr_write_failures",
            "Writes to the frontend address set the kernel refused",
            metrics.frontend_addr_write_failures.clone(),
        );
        registry.register(
            "kpr_datapath_drift_repaired",
            "Map entries and pins the periodic resync found changed behind the agent's back, and repaired, by map and kind",
            metrics.drift_repaired.clone(),
        );
        registry.register(
            "kpr_source_read_failures",
            "Failed reads of the manifests directory or one of its files, by reason (nothing changes in the maps; retried)",
            metrics.source_read_failures.clone(),
        );
        registry.register(
            "kpr_api_watch_failures",
            "Failed list or watch calls to the API server, by resource (retried with backoff)",
            metrics.api_watch_failures.clone(),
        );
        registry.register(
            "kpr_api_watch_listed",
            "1 once the resource's initial list from the API server is complete",
            metrics.api_watch_listed.clone(),
        );
        registry.register(
            "kpr_api_last_success_timestamp_seconds",
            "Latest time every API watch was known to work",
            metrics.api_last_success.clone(),
        );
        registry.register(
            "kpr_health_check_bind_failures",
            "Attempts to open a healthCheckNodePort listener that failed, by reason",
            metrics.health_check_bind_failures.clone(),
        );
        registry.register(
            "kpr_http_connections_rejected",
            "Connections to the agent's HTTP listeners closed at once because the listener served its maximum, by server",
            metrics.http_rejected.clone(),
        );
        for server in ["healthz", "metrics", "health_check"] {
            let _ = metrics.http_rejected.get_or_create(&ServerLabels {
                server: server.into(),
            });
        }
        for reason in ["map_full", "write_error"] {
            let labels = ReasonLabels {
                reason: reason.into(),
            };
            let _ = metrics.frontend_failures.get_or_create(&labels);
            let _ = metrics.frontends_unprogrammed.get_or_create(&labels);
        }
        Self {
            registry,
            ..metrics
        }
    }

    /// The rejected-connections counter of one HTTP server.
    #[must_use]
    pub fn http_rejected(&self, server: &str) -> Counter {
        self.http_rejected
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .clone()
    }

    /// Records the API source's watcher status.
    pub fn record_api_status(&self, status: &crate::source::kube::ApiStatus) {
        let mut counted = self
            .last_watch_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (resource, watch) in status.watches() {
            let labels = ResourceLabels {
                resource: resource.label().to_owned(),
            };
            let previous = counted.entry(labels.resource.clone()).or_insert(0);
            self.api_watch_failures
                .get_or_create(&labels)
                .inc_by(watch.failures.saturating_sub(*previous));
            *previous = watch.failures;
            self.api_watch_listed
                .get_or_create(&labels)
                .set(i64::from(watch.listed));
        }
        if let Some(success) = status.last_success() {
            self.api_last_success.set(seconds_since_epoch(success));
        }
    }

    /// Turns the datapath's running totals into counter increments.
    pub fn record_datapath_totals(&self, totals: &[u64]) {
        let mut last = self
            .last_datapath_totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.resize(totals.len(), 0);
        for (index, (&total, previous)) in totals.iter().zip(last.iter_mut()).enumerate() {
            let Some(name) = COUNTER_NAMES.get(index).filter(|name| !name.is_empty()) else {
                continue;
            };
            // A total below the last one means the maps were recreated: count from 0.
            let increment = total.checked_sub(*previous).unwrap_or(total);
            self.datapath_events
                .get_or_create(&EventLabels {
                    event: (*name).to_owned(),
                })
                .inc_by(increment);
            *previous = total;
        }
    }

    /// The same metrics for an agent that started at `at` (tests of the start rule).
    #[must_use]
    pub fn started_at(self, at: SystemTime) -> Self {
        Self {
            started: at,
            ..self
        }
    }

    /// Records the per-service totals read from the datapath: the counters grow by what
    /// each total grew (a total that went down, a service port counted anew, counts
    /// whole), and service ports no longer counted lose their series.
    pub fn record_service_totals(
        &self,
        totals: BTreeMap<ServiceLabels, proxy_common::service_stats::ServiceStatsV1>,
    ) {
        let mut last = self
            .last_service_totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let grown = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
        for (labels, total) in &totals {
            let before = last.get(labels).copied().unwrap_or_default();
            self.service_connections
                .get_or_create(labels)
                .inc_by(grown(total.connections, before.connections));
            self.service_packets
                .get_or_create(labels)
                .inc_by(grown(total.packets, before.packets));
            self.service_bytes
                .get_or_create(labels)
                .inc_by(grown(total.bytes, before.bytes));
        }
        for labels in last.keys().filter(|labels| !totals.contains_key(labels)) {
            self.service_connections.remove(labels);
            self.service_packets.remove(labels);
            self.service_bytes.remove(labels);
        }
        *last = totals;
    }

    /// Observes network programming latency for every EndpointSlice whose trigger time
    /// is new since the last call and not older than the agent; `programmed_at` is
    /// when the maps were written. `changed`: the slices that changed since the last
    /// call (the others keep the trigger time already seen); `None`: any may have.
    pub fn observe_programmed(
        &self,
        state: &ClusterState,
        changed: Option<&[ObjectKey]>,
        programmed_at: SystemTime,
    ) {
        let mut seen = self
            .seen_trigger_times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let observe = |key: &ObjectKey,
                       slice: &SliceInfo,
                       seen: &BTreeMap<ObjectKey, Box<str>>,
                       still_present: &mut BTreeMap<ObjectKey, Box<str>>| {
            let Some(trigger) = trigger_time(slice) else {
                return;
            };
            if seen.get(key) != Some(&trigger.0) && trigger.1 >= self.started {
                if let Ok(latency) = programmed_at.duration_since(trigger.1) {
                    self.network_programming.observe(latency.as_secs_f64());
                }
            }
            still_present.insert(key.clone(), trigger.0);
        };
        match changed {
            None => {
                let mut still_present = BTreeMap::new();
                for (key, slice) in &state.endpoint_slices {
                    observe(key, slice, &seen, &mut still_present);
                }
                *seen = still_present;
            }
            Some(changed) => {
                let mut updated = BTreeMap::new();
                for key in changed {
                    if let Some(slice) = state.endpoint_slices.get(key) {
                        observe(key, slice, &seen, &mut updated);
                    }
                }
                for key in changed {
                    seen.remove(key);
                }
                seen.extend(updated);
            }
        }
    }

    /// Marks a sync pass done.
    pub fn synced(&self, duration: Duration, at: SystemTime) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.sync_last_timestamp.set(seconds_since_epoch(at));
    }

    /// Marks a change queued.
    pub fn queued(&self, at: SystemTime) {
        self.sync_last_queued_timestamp.set(seconds_since_epoch(at));
    }

    /// The text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// The trigger-time annotation of a slice: its text and its parsed time.
fn trigger_time(slice: &SliceInfo) -> Option<(Box<str>, SystemTime)> {
    let text = slice.trigger_time.as_ref()?;
    let parsed = parse_rfc3339(text)?;
    Some((text.clone(), parsed))
}

/// RFC 3339 in UTC as Kubernetes writes it (`2024-01-02T03:04:05Z`, optionally with a
/// fraction or a numeric offset).
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let parsed: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(parsed))
}

/// Serves `/metrics` until the task is dropped, within [`crate::http::Limits::DEFAULT`].
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let rejected = metrics.http_rejected("metrics");
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    StatusCode::OK,
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
                    .into_response()
            }
        }),
    );
    crate::http::bind_and_serve(addr, app, rejected).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;

    use k8s_openapi::{
        api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    /// A slice with a trigger time, as the sources convert it.
    fn slice(trigger: &str) -> SliceInfo {
        SliceInfo::from(&EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("default".into()),
                annotations: Some(Map::from([(
                    TRIGGER_TIME_ANNOTATION.to_owned(),
                    trigger.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        })
    }

    #[test]
    fn api_watch_status_becomes_counters_and_gauges() {
        use crate::source::kube::{ApiStatus, Resource};
        let metrics = Metrics::new();
        let status = ApiStatus::default();
        status.succeeded(Resource::Services, true);
        status.failed(Resource::EndpointSlices, "connection refused".into());
        status.failed(Resource::EndpointSlices, "connection refused".into());
        metrics.record_api_status(&status);
        // Recording the same status again must not count its failures twice.
        metrics.record_api_status(&status);
        let text = metrics.render();
        for line in [
            "kpr_api_watch_failures_total{resource=\"endpointslices\"} 2",
            "kpr_api_watch_failures_total{resource=\"services\"} 0",
            "kpr_api_watch_listed{resource=\"services\"} 1",
            "kpr_api_watch_listed{resource=\"endpointslices\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Not every watch has succeeded yet: no timestamp.
        assert!(text.contains("kpr_api_last_success_timestamp_seconds 0"));
        status.succeeded(Resource::EndpointSlices, true);
        metrics.record_api_status(&status);
        assert!(!metrics
            .render()
            .contains("kpr_api_last_success_timestamp_seconds 0"));
    }

    #[test]
    fn kube_proxy_metric_names_are_exported() {
        let metrics = Metrics::new();
        metrics.synced(Duration::from_millis(3), SystemTime::now());
        let text = metrics.render();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds_count",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    fn at(seconds: i64) -> SystemTime {
        SystemTime::from(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("time"))
    }

    #[test]
    fn trigger_times_before_the_agent_started_are_not_measured() {
        // 2026-01-01T00:00:00Z is 1_767_225_600.
        let metrics = Metrics::new().started_at(at(1_767_225_601));
        let mut state = ClusterState::default();
        state.endpoint_slices.insert(
            ObjectKey::new("default", "web-abc"),
            std::sync::Arc::new(slice("2026-01-01T00:00:00Z")),
        );
        metrics.observe_programmed(&state, None, at(1_767_225_602));
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 0"),
            "{text}"
        );
        // A change after the start is measured.
        state.endpoint_slices.insert(
            ObjectKey::new("default", "web-abc"),
            std::sync::Arc::new(slice("2026-01-01T00:00:03Z")),
        );
        metrics.observe_programmed(&state, None, at(1_767_225_605));
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_sum 2.0"),
            "{text}"
        );
    }

    #[test]
    fn each_trigger_time_is_measured_once() {
        let metrics = Metrics::new().started_at(at(1_767_225_000));
        let mut state = ClusterState::default();
        state.endpoint_slices.insert(
            ObjectKey::new("default", "web-abc"),
            slice("2026-01-01T00:00:00Z").into(),
        );
        let later = SystemTime::from(
            k8s_openapi::jiff::Timestamp::from_second(1_767_225_602).expect("time"),
        );
        metrics.observe_programmed(&state, None, later);
        metrics.observe_programmed(&state, None, later);
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_sum 2.0"),
            "{text}"
        );
    }

    #[test]
    fn service_totals_become_counters_and_leave_with_their_service() {
        use proxy_common::service_stats::ServiceStatsV1;
        let metrics = Metrics::new();
        let web = ServiceLabels {
            namespace: "demo".into(),
            service: "web".into(),
            port: "http".into(),
            protocol: "TCP".into(),
        };
        let totals = |connections, packets, bytes| {
            BTreeMap::from([(
                web.clone(),
                ServiceStatsV1 {
                    connections,
                    packets,
                    bytes,
                },
            )])
        };
        metrics.record_service_totals(totals(1, 4, 240));
        metrics.record_service_totals(totals(3, 10, 600));
        let text = metrics.render();
        let labels = "{namespace=\"demo\",service=\"web\",port=\"http\",protocol=\"TCP\"}";
        for line in [
            format!("kpr_service_connections_total{labels} 3"),
            format!("kpr_service_packets_total{labels} 10"),
            format!("kpr_service_bytes_total{labels} 600"),
        ] {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        metrics.record_service_totals(BTreeMap::new());
        assert!(!metrics.render().contains("kpr_service_packets_total{"));
    }

    #[test]
    fn datapath_totals_become_increments() {
        let metrics = Metrics::new();
        metrics.record_datapath_totals(&[5, 0, 1]);
        metrics.record_datapath_totals(&[7, 0, 1]);
        let text = metrics.render();
        assert!(
            text.contains("kpr_datapath_events_total{event=\"new_flow\"} 7"),
            "{text}"
        );
    }
}
