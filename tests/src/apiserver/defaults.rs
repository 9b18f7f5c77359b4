//! A small subset of the real API server's defaulting and allocation for Services
//! and EndpointSlices, so objects written without the allocated fields look like the
//! ones a cluster returns.
//!
//! Services: `type` (ClusterIP), `sessionAffinity` (None), port `protocol` (TCP) and
//! `targetPort` (= port); ClusterIP allocation (IPv4 from 10.96.0.0/16, IPv6 from
//! fd00:10:96::/112, both for dual-stack policies), `clusterIPs`, `ipFamilies`,
//! `ipFamilyPolicy`, `internalTrafficPolicy`; for NodePort / LoadBalancer,
//! `externalTrafficPolicy` (Cluster), node ports from 30000-32767, and a
//! `healthCheckNodePort` for LoadBalancer + `Local`. On update, allocated values missing
//! from the new object are kept from the old one (as `patchAllocatedValues` does).
//! No validation (immutability of clusterIP, port ranges, ...) is done.
//! EndpointSlices: port `protocol` (TCP).

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use serde_json::{json, Map, Value};

const NODE_PORT_MIN: u64 = 30000;
const NODE_PORT_MAX: u64 = 32767;

fn set_default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    let missing = match obj.get(key) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    if missing {
        obj.insert(key.to_owned(), value);
    }
}

fn str_of<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Values allocated to other Services, so new allocations do not collide.
#[derive(Default)]
pub struct Allocated {
    ips: HashSet<String>,
    node_ports: HashSet<u64>,
}

impl Allocated {
    /// Collects the cluster IPs and node ports of `services`.
    pub fn from_services<'a>(services: impl Iterator<Item = &'a Value>) -> Self {
        let mut a = Self::default();
        for svc in services {
            let Some(spec) = svc.get("spec") else {
                continue;
            };
            if let Some(ip) = spec.get("clusterIP").and_then(Value::as_str) {
                a.ips.insert(ip.to_owned());
            }
            for ip in spec
                .get("clusterIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                a.ips.insert(ip.to_owned());
            }
            for p in spec
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(np) = p.get("nodePort").and_then(Value::as_u64) {
                    a.node_ports.insert(np);
                }
            }
            if let Some(np) = spec.get("healthCheckNodePort").and_then(Value::as_u64) {
                a.node_ports.insert(np);
            }
        }
        a
    }

    fn ip(&mut self, family: &str) -> Option<String> {
        let candidate = |i: u32| -> String {
            if family == "IPv6" {
                Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, (i & 0xffff) as u16).to_string()
            } else {
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i).to_string()
            }
        };
        let ip = (1..0xffff)
            .map(candidate)
            .find(|ip| !self.ips.contains(ip))?;
        self.ips.insert(ip.clone());
        Some(ip)
    }

    fn node_port(&mut self) -> Option<u64> {
        let np = (NODE_PORT_MIN..=NODE_PORT_MAX).find(|p| !self.node_ports.contains(p))?;
        self.node_ports.insert(np);
        Some(np)
    }
}

fn family_of(ip: &str) -> &'static str {
    if ip.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// Defaults and allocates `svc` (a Service object) in place; `old` is the stored
/// object on update.
pub fn service(svc: &mut Value, old: Option<&Value>, allocated: &mut Allocated) {
    let Some(obj) = svc.as_object_mut() else {
        return;
    };
    let spec = obj.entry("spec").or_insert_with(|| json!({}));
    if !spec.is_object() {
        *spec = json!({});
    }
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    let old_spec = old.and_then(|o| o.get("spec")).and_then(Value::as_object);

    // Keep allocated values the update leaves out.
    if let Some(old_spec) = old_spec {
        for key in [
            "clusterIP",
            "clusterIPs",
            "ipFamilies",
            "ipFamilyPolicy",
            "healthCheckNodePort",
        ] {
            if let Some(v) = old_spec.get(key) {
                set_default(spec, key, v.clone());
            }
        }
    }

    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    let svc_type = str_of(spec, "type").unwrap_or("ClusterIP").to_owned();
    let external_name = svc_type == "ExternalName";
    let node_ports = matches!(svc_type.as_str(), "NodePort" | "LoadBalancer")
        && !(svc_type == "LoadBalancer"
            && spec.get("allocateLoadBalancerNodePorts") == Some(&Value::Bool(false)));

    // This object's own explicit node ports are taken too.
    for p in spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p.get("nodePort").and_then(Value::as_u64) {
            allocated.node_ports.insert(np);
        }
    }

    if !external_name {
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
        allocate_cluster_ips(spec, allocated);
    }
    if matches!(svc_type.as_str(), "NodePort" | "LoadBalancer") {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }

    let old_ports: Vec<Value> = old_spec
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                let unset = matches!(p.get("targetPort"), None | Some(Value::Null))
                    || p.get("targetPort") == Some(&json!(0));
                if unset {
                    p.insert("targetPort".to_owned(), port);
                }
            }
            if node_ports
                && p.get("nodePort")
                    .and_then(Value::as_u64)
                    .is_none_or(|n| n == 0)
            {
                let kept = old_ports
                    .iter()
                    .find(|o| {
                        o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol")
                    })
                    .and_then(|o| o.get("nodePort"))
                    .and_then(Value::as_u64);
                if let Some(np) = kept.or_else(|| allocated.node_port()) {
                    p.insert("nodePort".to_owned(), json!(np));
                }
            }
        }
    }

    if svc_type == "LoadBalancer"
        && str_of(spec, "externalTrafficPolicy") == Some("Local")
        && spec
            .get("healthCheckNodePort")
            .and_then(Value::as_u64)
            .is_none_or(|n| n == 0)
    {
        if let Some(np) = allocated.node_port() {
            spec.insert("healthCheckNodePort".to_owned(), json!(np));
        }
    }
}

fn allocate_cluster_ips(spec: &mut Map<String, Value>, allocated: &mut Allocated) {
    let headless = str_of(spec, "clusterIP") == Some("None");
    let mut ips: Vec<String> = spec
        .get("clusterIPs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if ips.is_empty() {
        if let Some(ip) = str_of(spec, "clusterIP") {
            ips.push(ip.to_owned());
        }
    }
    let policy = str_of(spec, "ipFamilyPolicy")
        .unwrap_or("SingleStack")
        .to_owned();
    let mut families: Vec<String> = spec
        .get("ipFamilies")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if families.is_empty() {
        families = ips
            .iter()
            .filter(|ip| *ip != "None")
            .map(|ip| family_of(ip).to_owned())
            .collect();
    }
    if families.is_empty() {
        families.push("IPv4".to_owned());
    }
    if policy != "SingleStack" && families.len() == 1 {
        let other = if families[0] == "IPv4" {
            "IPv6"
        } else {
            "IPv4"
        };
        families.push(other.to_owned());
    }
    if headless {
        ips = vec!["None".to_owned()];
        families.truncate(if policy == "SingleStack" { 1 } else { 2 });
    } else {
        for family in families.iter().skip(ips.len()) {
            if let Some(ip) = allocated.ip(family) {
                ips.push(ip);
            }
        }
    }
    if let Some(first) = ips.first() {
        spec.insert("clusterIP".to_owned(), json!(first));
    }
    spec.insert("clusterIPs".to_owned(), json!(ips));
    spec.insert("ipFamilies".to_owned(), json!(families));
    spec.insert("ipFamilyPolicy".to_owned(), json!(policy));
}

/// Defaults `slice` (an EndpointSlice object) in place.
pub fn endpoint_slice(slice: &mut Value) {
    if let Some(ports) = slice.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ip_service_defaults() {
        let mut a = Allocated::from_services([json!({"spec": {"clusterIP": "10.96.0.1"}})].iter());
        let mut svc = json!({"spec": {"ports": [{"port": 80}]}});
        service(&mut svc, None, &mut a);
        assert_eq!(
            svc["spec"],
            json!({
                "type": "ClusterIP", "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                "clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
            })
        );
    }

    #[test]
    fn explicit_values_are_kept() {
        let mut a = Allocated::default();
        let mut svc = json!({"spec": {"clusterIP": "10.0.0.5", "ports": [{"port": 53, "protocol": "UDP", "targetPort": "dns"}]}});
        service(&mut svc, None, &mut a);
        assert_eq!(svc["spec"]["clusterIP"], "10.0.0.5");
        assert_eq!(svc["spec"]["clusterIPs"], json!(["10.0.0.5"]));
        assert_eq!(
            svc["spec"]["ports"][0],
            json!({"port": 53, "protocol": "UDP", "targetPort": "dns"})
        );
    }

    #[test]
    fn node_port_dual_stack_and_headless() {
        let mut a = Allocated::default();
        let mut svc = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}, {"port": 443, "nodePort": 30000}]}});
        service(&mut svc, None, &mut a);
        let spec = &svc["spec"];
        assert_eq!(spec["clusterIPs"], json!(["10.96.0.1", "fd00:10:96::1"]));
        assert_eq!(spec["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(spec["ports"][0]["nodePort"], 30001);
        assert_eq!(spec["ports"][1]["nodePort"], 30000);
        assert_eq!(spec["healthCheckNodePort"], 30002);

        let mut headless = json!({"spec": {"clusterIP": "None"}});
        service(&mut headless, None, &mut a);
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        assert_eq!(headless["spec"]["ipFamilies"], json!(["IPv4"]));

        let mut ext = json!({"spec": {"type": "ExternalName", "externalName": "example.com"}});
        service(&mut ext, None, &mut a);
        assert!(ext["spec"].get("clusterIP").is_none());
    }

    #[test]
    fn update_keeps_allocated_values() {
        let mut a = Allocated::default();
        let old = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9"],
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 31000}]}});
        let mut new = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}});
        service(&mut new, Some(&old), &mut a);
        assert_eq!(new["spec"]["clusterIP"], "10.96.0.9");
        assert_eq!(new["spec"]["ports"][0]["nodePort"], 31000);
        assert_eq!(new["spec"]["ports"][1]["nodePort"], 30000);
    }
}
