//! kube-proxy's rules for one lab Service, loaded into a lab node to play kube-proxy
//! before kpr takes over (`tests/tests/takeover.rs`).
//!
//! The Service is a NodePort with externalTrafficPolicy Cluster and ports of both
//! protocols; the rules follow the layout of kube-proxy's iptables and nftables
//! proxiers of the v1.33/v1.34 line, as the benchmark's generators do for ClusterIPs
//! (`crate::bench::iptables`, `crate::bench::nftables`, same chain-name hashes), with
//! the parts a NodePort adds: `KUBE-NODEPORTS` and `KUBE-EXT-*` chains (iptables), the
//! `service-nodeports` map and `external-*` chains (nftables), masquerade of external
//! traffic, and kube-proxy's canary chains. The filter-table jumps and kubelet's
//! `KUBE-FIREWALL` come from the benchmark's [`crate::bench::iptables::jump_rules`].
use std::{fmt::Write as _, net::SocketAddrV4};

use crate::bench::hash::hash_prefix;

/// kube-proxy's masquerade mark (bit 14).
const MASQ_MARK: &str = "0x4000";

/// One port of the Service.
#[derive(Clone, Debug)]
pub struct Port {
    /// The port's name (`http`).
    pub name: &'static str,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    pub port: u16,
    pub node_port: u16,
    /// Endpoints serving it.
    pub endpoints: Vec<SocketAddrV4>,
}

/// The Service kube-proxy's rules translate.
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: std::net::Ipv4Addr,
    pub ports: Vec<Port>,
    /// kube-proxy's clusterCIDR (traffic from outside it is masqueraded).
    pub cluster_cidr: &'static str,
    /// The node addresses NodePorts answer on (nftables mode; iptables matches every
    /// local address).
    pub node_ips: Vec<std::net::Ipv4Addr>,
}

impl Service {
    fn port_name(&self, port: &Port) -> String {
        format!("{}/{}:{}", self.namespace, self.name, port.name)
    }

    /// `iptables-restore --noflush` input: the jump rules, then the nat, filter and
    /// mangle tables as kube-proxy's iptables proxier writes them.
    #[must_use]
    pub fn iptables(&self) -> String {
        let mut out = crate::bench::iptables::jump_rules();
        let mut chains = String::new();
        let mut rules = String::new();
        crate::bench::iptables::write_nat_base(&mut chains, &mut rules, &["KUBE-PROXY-CANARY"]);
        for port in &self.ports {
            self.iptables_port(&mut chains, &mut rules, port);
        }
        rules.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        let _ = write!(out, "*nat\n{chains}{rules}COMMIT\n");
        out.push_str("*filter\n:KUBE-PROXY-CANARY - [0:0]\n");
        out.push_str(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
             -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        );
        let _ = writeln!(
            out,
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             COMMIT\n\
             *mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT"
        );
        out
    }

    fn iptables_port(&self, chains: &mut String, rules: &mut String, port: &Port) {
        let name = self.port_name(port);
        let hash = hash_prefix(&format!("{name}{}", port.protocol), 16);
        let (svc, ext) = (format!("KUBE-SVC-{hash}"), format!("KUBE-EXT-{hash}"));
        let (vip, proto, dport) = (self.cluster_ip, port.protocol, port.port);
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {vip} --dport {dport} -j {svc}\n\
             -A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {} -j {ext}\n\
             -A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {ext} -j {svc}\n\
             -A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {vip} --dport {dport} ! -s {} -j KUBE-MARK-MASQ",
            port.node_port, self.cluster_cidr
        );
        let count = port.endpoints.len();
        for (position, endpoint) in port.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                hash_prefix(&format!("{name}{proto}{endpoint}"), 16)
            );
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let mut rule = format!("-A {svc} -m comment --comment \"{name} -> {endpoint}\"");
            if position + 1 < count {
                #[expect(clippy::cast_precision_loss, reason = "a handful of endpoints")]
                let probability = 1.0 / (count - position) as f64;
                let _ = write!(
                    rule,
                    " -m statistic --mode random --probability {probability:.10}"
                );
            }
            let _ = writeln!(
                rules,
                "{rule} -j {sep}\n\
                 -A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {endpoint}",
                endpoint.ip()
            );
        }
    }

    /// `nft -f -` input: kube-proxy's nftables proxier's table for the Service.
    #[must_use]
    pub fn nftables(&self) -> String {
        const TABLE: &str = "ip kube-proxy";
        let mut out = format!("add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}\n");
        for (name, kind, hook, priority) in [
            ("filter-forward", "filter", "forward", "-110"),
            ("nat-prerouting", "nat", "prerouting", "-100"),
            ("nat-output", "nat", "output", "-100"),
            ("nat-postrouting", "nat", "postrouting", "100"),
        ] {
            let _ = writeln!(
                out,
                "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
            );
        }
        for chain in [
            "services",
            "masquerading",
            "mark-for-masquerade",
            "cluster-ips-check",
        ] {
            let _ = writeln!(out, "add chain {TABLE} {chain}");
        }
        let node_ips: Vec<String> = self.node_ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "add rule {TABLE} nat-prerouting jump services\n\
             add rule {TABLE} nat-output jump services\n\
             add rule {TABLE} nat-postrouting jump masquerading\n\
             add rule {TABLE} filter-forward ct state new jump cluster-ips-check\n\
             add rule {TABLE} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
             add rule {TABLE} masquerading mark and {MASQ_MARK} == 0 return\n\
             add rule {TABLE} masquerading mark set mark xor {MASQ_MARK}\n\
             add rule {TABLE} masquerading masquerade fully-random\n\
             add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
             add element {TABLE} cluster-ips {{ {} }}\n\
             add rule {TABLE} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
             add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
             add element {TABLE} nodeport-ips {{ {} }}\n\
             add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
             add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
             add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add rule {TABLE} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            self.cluster_ip,
            node_ips.join(", ")
        );
        for port in &self.ports {
            self.nftables_port(&mut out, TABLE, port);
        }
        out
    }

    fn nftables_port(&self, out: &mut String, table: &str, port: &Port) {
        let base = format!(
            "{}/{}/{}/{}",
            self.namespace, self.name, port.protocol, port.name
        );
        let with_hash = |name: &str| format!("{}-{name}", hash_prefix(name, 8));
        let svc = format!("service-{}", with_hash(&base));
        let ext = format!("external-{}", with_hash(&base));
        let (vip, proto, dport) = (self.cluster_ip, port.protocol, port.port);
        let endpoint_chains: Vec<String> = port
            .endpoints
            .iter()
            .map(|endpoint| {
                format!(
                    "endpoint-{}",
                    with_hash(&format!("{base}__{}/{}", endpoint.ip(), endpoint.port()))
                )
            })
            .collect();
        for chain in endpoint_chains.iter().chain([&svc, &ext]) {
            let _ = writeln!(out, "add chain {table} {chain}");
        }
        let vmap: Vec<String> = endpoint_chains
            .iter()
            .enumerate()
            .map(|(index, chain)| format!("{index} : goto {chain}"))
            .collect();
        let _ = writeln!(
            out,
            "add element {table} service-ips {{ {vip} . {proto} . {dport} : goto {svc} }}\n\
             add element {table} service-nodeports {{ {proto} . {} : goto {ext} }}\n\
             add rule {table} {svc} ip daddr {vip} {proto} dport {dport} ip saddr != {} jump mark-for-masquerade\n\
             add rule {table} {svc} numgen random mod {} vmap {{ {} }}\n\
             add rule {table} {ext} jump mark-for-masquerade comment \"masquerade\"\n\
             add rule {table} {ext} goto {svc}",
            port.node_port,
            self.cluster_cidr,
            endpoint_chains.len(),
            vmap.join(" , ")
        );
        for (endpoint, chain) in port.endpoints.iter().zip(&endpoint_chains) {
            let _ = writeln!(
                out,
                "add rule {table} {chain} ip saddr {} jump mark-for-masquerade\n\
                 add rule {table} {chain} meta l4proto {proto} dnat to {endpoint}",
                endpoint.ip()
            );
        }
    }
}
