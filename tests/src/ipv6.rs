//! IPv6 addresses and manifests shared by the IPv6 labs (`tests/tests/ipv6_lab.rs`,
//! dual stack; `tests/tests/ipv6_only.rs`, IPv6 only): the pods' addresses, socket
//! addresses, EndpointSlices and LoadBalancer Services in the shape those tests use.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The IPv6 address of pod `host` in the node's pod CIDR `fd00:10:244:1::/64`.
#[must_use]
pub fn pod_v6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, host)
}

/// `[ip]:port`.
#[must_use]
pub fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// `ip:port`.
#[must_use]
pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// An EndpointSlice `<service>-<family>` of `addresses`, all ready on `node-a`, with
/// the ports `http` (8080/TCP) and `dns` (8080/UDP).
#[must_use]
pub fn slice(service: &str, family: &str, addresses: &[String]) -> String {
    let endpoints: String = addresses
        .iter()
        .map(|address| {
            format!("  - addresses: ['{address}']\n    nodeName: node-a\n    conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{family}
  namespace: demo
  labels: {{kubernetes.io/service-name: {service}}}
addressType: {family}
ports:
  - {{name: http, port: 8080, protocol: TCP}}
  - {{name: dns, port: 8080, protocol: UDP}}
endpoints:
{endpoints}"
    )
}

/// An IPv6-only LoadBalancer Service `name` with clusterIP `fd00:96::<host>`, ingress
/// IP `ip`, one source range, `externalTrafficPolicy: <policy>` and
/// healthCheckNodePort `32` then `host` in three decimal digits (0x50: 32080), port 80 to 8080/TCP.
#[must_use]
pub fn load_balancer(name: &str, host: u16, ip: Ipv6Addr, range: &str, policy: &str) -> String {
    let vip = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, host);
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: '{vip}'
  clusterIPs: ['{vip}']
  ipFamilies: [IPv6]
  externalTrafficPolicy: {policy}
  healthCheckNodePort: 32{host:03}
  allocateLoadBalancerNodePorts: false
  loadBalancerSourceRanges: ['{range}']
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
status:
  loadBalancer:
    ingress: [{{ip: '{ip}'}}]
"
    )
}
