//! IPv6 addresses and manifests shared by the IPv6 labs (`tests/tests/ipv6_lab.rs`,
//! dual stack; `tests/tests/ipv6_only.rs`, IPv6 only): the pods' addresses, socket
//! addresses, EndpointSlices, LoadBalancer Services and the Services both labs serve.
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

/// The client pod's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
/// `six`: IPv6 SingleStack NodePort Service (80/TCP on 30080, 53/UDP on 30053) with
/// an externalIP, over the three web pods.
pub const SIX_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// `empty`: IPv6, no endpoints.
pub const EMPTY_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x40);
/// `sticky6`: IPv6, sessionAffinity ClientIP over the three web pods.
pub const STICKY_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x70);
/// `six`'s IPv6 externalIP.
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x30, 0, 0, 0, 0, 1);
/// `lb6`'s LoadBalancer IP: eTP Local, open to the outside client only.
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 1);
/// `ranged6`'s LoadBalancer IP: open to another range only.
pub const RANGED_LB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x60, 0, 0, 0, 0, 1);
/// The node's address on its external interface `ext0`.
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0, 0, 0, 0, 1);
/// The outside client's address, behind `ext0`.
pub const OUTSIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0, 0, 0, 0, 0x100);

/// The IPv6 Services (and their slices) both IPv6 labs serve: `six`, `sticky6`,
/// `lb6`, `ranged6` and `empty`, one manifest document each.
#[must_use]
pub fn common_services() -> Vec<String> {
    let web: Vec<String> = (0..3).map(|i| pod_v6(0x11 + i).to_string()).collect();
    vec![
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: six, namespace: demo}}
spec:
  type: NodePort
  clusterIP: '{SIX_VIP}'
  clusterIPs: ['{SIX_VIP}']
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  externalIPs: ['{EXTERNAL_V6}']
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}}
"
        ),
        slice("six", "IPv6", &web),
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: sticky6, namespace: demo}}
spec:
  clusterIP: '{STICKY_VIP}'
  clusterIPs: ['{STICKY_VIP}']
  ipFamilies: [IPv6]
  sessionAffinity: ClientIP
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
"
        ),
        slice("sticky6", "IPv6", &web),
        load_balancer("lb6", 0x50, LB_V6, &format!("{OUTSIDE_V6}/128"), "Local"),
        slice("lb6", "IPv6", &[pod_v6(0x11).to_string()]),
        load_balancer(
            "ranged6",
            0x60,
            RANGED_LB_V6,
            "2001:db8:ffff::/48",
            "Cluster",
        ),
        slice("ranged6", "IPv6", &[pod_v6(0x11).to_string()]),
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  clusterIP: '{EMPTY_VIP}'
  clusterIPs: ['{EMPTY_VIP}']
  ipFamilies: [IPv6]
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
"
        ),
    ]
}
