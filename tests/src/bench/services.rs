//! The services a benchmark installs: `N` ClusterIP services of one TCP port each, all
//! backed by the same few pods (`M` endpoints per service, one per backend pod), so
//! the lab needs `M` pods however large `N` is. Every mode programs exactly this set:
//! the agent reads it as manifests or from the test API server (the same objects,
//! [`ServiceSet::service`] and [`ServiceSet::endpoint_slice`]), the kube-proxy
//! generators as rules.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// The namespace of every generated service.
pub const NAMESPACE: &str = "bench";
/// The service port (ClusterIP side).
pub const SERVICE_PORT: u16 = 80;
/// The port the backend pods serve on.
pub const TARGET_PORT: u16 = 8080;
/// The name of the one service port.
pub const PORT_NAME: &str = "http";
/// The pod CIDR: kube-proxy's `clusterCIDR` (local traffic detection).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service CIDR the ClusterIPs are taken from.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The first ClusterIP handed out.
const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);
/// The endpoint the "one endpoint change" adds to service 0. Nothing serves it and no
/// traffic is sent after the change: only the time to program it counts.
pub const EXTRA_ENDPOINT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 1), 8080);
/// Services per manifest file.
const SERVICES_PER_FILE: usize = 1000;
/// The node name the endpoints carry (the lab's node).
pub const NODE_NAME: &str = "node-a";
/// The most backend pods a run may ask for.
pub const MAX_ENDPOINTS: usize = 64;
/// `sessionAffinityConfig.clientIP.timeoutSeconds` of services with affinity (the
/// Kubernetes default).
pub const AFFINITY_TIMEOUT_S: u32 = 10_800;

/// `N` services with the same `M` endpoints.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    count: usize,
    backends: Vec<SocketAddrV4>,
    /// Every service has `sessionAffinity: ClientIP`.
    affinity: bool,
}

impl ServiceSet {
    /// `count` services with `endpoints` endpoints each.
    ///
    /// # Errors
    /// When a count is zero or the addresses would leave their ranges.
    pub fn new(count: usize, endpoints: usize) -> Result<Self> {
        if count == 0 || endpoints == 0 {
            bail!("a benchmark needs at least one service and one endpoint");
        }
        if endpoints > MAX_ENDPOINTS {
            bail!("at most {MAX_ENDPOINTS} endpoints per service");
        }
        // 10.96.0.0/12 ends at 10.111.255.255.
        if count > 1_000_000 {
            bail!("at most 1 000 000 services fit the service CIDR");
        }
        let backends = (0..endpoints).map(backend_addr).collect();
        Ok(Self {
            count,
            backends,
            affinity: false,
        })
    }

    /// The same services with `sessionAffinity: ClientIP` (or without).
    #[must_use]
    pub fn with_affinity(mut self, affinity: bool) -> Self {
        self.affinity = affinity;
        self
    }

    /// Whether every service has ClientIP session affinity.
    #[must_use]
    pub fn affinity(&self) -> bool {
        self.affinity
    }

    /// How many services.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true (at least one service).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The backend pods' serving addresses (every service's endpoints).
    #[must_use]
    pub fn backends(&self) -> &[SocketAddrV4] {
        &self.backends
    }

    /// Service `index`'s name.
    #[must_use]
    pub fn name(index: usize) -> String {
        format!("svc-{index:05}")
    }

    /// kube-proxy's ServicePortName string of service `index`: `namespace/name:port`.
    #[must_use]
    pub fn port_name(index: usize) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", Self::name(index))
    }

    /// Service `index`'s ClusterIP.
    #[must_use]
    pub fn vip(index: usize) -> Ipv4Addr {
        let offset = u32::try_from(index).unwrap_or(u32::MAX);
        Ipv4Addr::from(u32::from(FIRST_VIP).saturating_add(offset))
    }

    /// Service `index`'s frontend (ClusterIP and port).
    #[must_use]
    pub fn frontend(index: usize) -> SocketAddrV4 {
        SocketAddrV4::new(Self::vip(index), SERVICE_PORT)
    }

    /// Service `index`'s endpoints; `changed` adds [`EXTRA_ENDPOINT`] to service 0.
    #[must_use]
    pub fn endpoints(&self, index: usize, changed: bool) -> Vec<SocketAddrV4> {
        let mut endpoints = self.backends.clone();
        if changed && index == 0 {
            endpoints.push(EXTRA_ENDPOINT);
        }
        endpoints
    }

    /// Endpoints over all services (kube-proxy's "large cluster" test counts these).
    #[must_use]
    pub fn total_endpoints(&self, changed: bool) -> usize {
        self.count * self.backends.len() + usize::from(changed)
    }

    /// The manifest files (name, YAML) holding every Service and EndpointSlice, as
    /// the agent's manifest source reads them.
    #[must_use]
    pub fn manifest_files(&self, changed: bool) -> Vec<(String, String)> {
        (0..self.count)
            .step_by(SERVICES_PER_FILE)
            .map(|first| {
                let last = (first + SERVICES_PER_FILE).min(self.count);
                let mut yaml = String::new();
                for index in first..last {
                    self.write_manifest(&mut yaml, index, changed);
                }
                (Self::manifest_file_name(first), yaml)
            })
            .collect()
    }

    /// The file that holds service 0 after the change (the only one that changes).
    #[must_use]
    pub fn changed_manifest_file(&self) -> (String, String) {
        let last = SERVICES_PER_FILE.min(self.count);
        let mut yaml = String::new();
        for index in 0..last {
            self.write_manifest(&mut yaml, index, true);
        }
        (Self::manifest_file_name(0), yaml)
    }

    fn manifest_file_name(first: usize) -> String {
        format!("services-{:04}.yaml", first / SERVICES_PER_FILE)
    }

    fn write_manifest(&self, yaml: &mut String, index: usize, changed: bool) {
        for object in [self.service(index), self.endpoint_slice(index, changed)] {
            yaml.push_str("---\n");
            // A JSON value always serializes as YAML.
            if let Ok(text) = serde_yaml::to_string(&object) {
                yaml.push_str(&text);
            }
        }
    }

    /// Service `index` as a client creates it (with the fields the API server's
    /// defaulting would add, so a server that does not default stores the same).
    #[must_use]
    pub fn service(&self, index: usize) -> Value {
        let vip = Self::vip(index).to_string();
        let mut spec = json!({
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ports": [{
                "name": PORT_NAME,
                "protocol": "TCP",
                "port": SERVICE_PORT,
                "targetPort": TARGET_PORT,
            }],
        });
        if self.affinity {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] =
                json!({"clientIP": {"timeoutSeconds": AFFINITY_TIMEOUT_S}});
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": Self::name(index), "namespace": NAMESPACE},
            "spec": spec,
        })
    }

    /// The EndpointSlice of service `index`; `changed` adds [`EXTRA_ENDPOINT`] to
    /// service 0.
    #[must_use]
    pub fn endpoint_slice(&self, index: usize, changed: bool) -> Value {
        let name = Self::name(index);
        let endpoints: Vec<Value> = self
            .endpoints(index, changed)
            .iter()
            .map(|endpoint| {
                json!({
                    "addresses": [endpoint.ip().to_string()],
                    "conditions": {"ready": true},
                    "nodeName": NODE_NAME,
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-bench"),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": TARGET_PORT}],
            "endpoints": endpoints,
        })
    }
}

/// Backend pod `index`'s address: 10.244.1.10 and up (the client is 10.244.1.2).
#[must_use]
pub fn backend_addr(index: usize) -> SocketAddrV4 {
    let offset = u8::try_from(index).unwrap_or(u8::MAX);
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10 + offset.min(200)), TARGET_PORT)
}

/// Backend pod `index`'s name.
#[must_use]
pub fn backend_name(index: usize) -> String {
    format!("be-{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_are_distinct() {
        assert_eq!(ServiceSet::vip(0), Ipv4Addr::new(10, 96, 0, 100));
        assert_eq!(ServiceSet::vip(50_000), Ipv4Addr::new(10, 96, 195, 180));
        assert_eq!(ServiceSet::port_name(7), "bench/svc-00007:http");
        assert_eq!(
            backend_addr(2),
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 12), 8080)
        );
    }

    #[test]
    fn manifests_hold_every_service_and_parse() {
        let set = ServiceSet::new(1500, 2).expect("set");
        let files = set.manifest_files(false);
        assert_eq!(files.len(), 2);
        let mut services = 0;
        let mut endpoints = 0;
        for (_, yaml) in &files {
            for document in serde_yaml::Deserializer::from_str(yaml) {
                let value: serde_yaml::Value =
                    serde::Deserialize::deserialize(document).expect("yaml");
                match value["kind"].as_str() {
                    Some("Service") => services += 1,
                    Some("EndpointSlice") => {
                        endpoints += value["endpoints"].as_sequence().map_or(0, Vec::len);
                    }
                    other => panic!("unexpected kind {other:?}"),
                }
            }
        }
        assert_eq!(services, 1500);
        assert_eq!(endpoints, 3000);
        let with_affinity = set.clone().with_affinity(true).manifest_files(false);
        let value: serde_yaml::Value = serde::Deserialize::deserialize(
            serde_yaml::Deserializer::from_str(&with_affinity[0].1)
                .next()
                .expect("a document"),
        )
        .expect("yaml");
        assert_eq!(value["spec"]["sessionAffinity"].as_str(), Some("ClientIP"));
        assert_eq!(
            value["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"].as_u64(),
            Some(10_800)
        );
        let (name, changed) = set.changed_manifest_file();
        assert_eq!(name, files[0].0);
        assert!(changed.contains(&EXTRA_ENDPOINT.ip().to_string()));
        assert!(!files[0].1.contains(&EXTRA_ENDPOINT.ip().to_string()));
    }
}
