//! The transaction kube-proxy's nftables proxier sends for a [`ServiceSet`], as
//! `nft -f -` input. Our own generator, written from a reading of
//! `pkg/proxy/nftables/proxier.go` of the v1.33/v1.34 line (`setupNFTables`,
//! `syncProxyRules`, `writeServiceToEndpointRules`, `nftablesBaseChains`,
//! `nftablesJumpChains`); for ClusterIP services with endpoints it reproduces:
//!
//! - `table ip kube-proxy` with the base chains `filter-prerouting`/`-input`/
//!   `-forward`/`-output` (priority dstnat - 10), `filter-output-post-dnat` (dstnat +
//!   10), `nat-prerouting`/`-output` (dstnat) and `nat-postrouting` (srcnat; written
//!   as numbers, -110, -90, -100 and 100, since nft 1.0.6 rejects the names on the
//!   input, forward and output hooks), created
//!   with kube-proxy's add+delete on the first sync, and their `ct state new` jumps to
//!   `nodeport-endpoints-check`, `service-endpoints-check`, `firewall-check`,
//!   `cluster-ips-check`, and the plain jumps to `services` and `masquerading`;
//! - the sets and verdict maps `cluster-ips`, `nodeport-ips`, `no-endpoint-services`,
//!   `no-endpoint-nodeports`, `firewall-ips`, `service-ips` (keyed by
//!   `ipv4_addr . inet_proto . inet_service`) and `service-nodeports`, flushed on a
//!   full sync; `services` dispatching with `ip daddr . meta l4proto . th dport vmap
//!   @service-ips`;
//! - per service: `service-<hash8>-ns/name/tcp/port` with the masquerade rule for
//!   traffic from outside the cluster CIDR and `numgen random mod M vmap { i : goto
//!   endpoint-... }`; per endpoint `endpoint-<hash8>-ns/name/tcp/port__ip/port` with
//!   the hairpin masquerade and `meta l4proto tcp dnat to ip:port`; chain names hash
//!   (sha256, base32, 8 characters) and truncate as `hashAndTruncate` does;
//! - with ClientIP session affinity (`--affinity`): a set `affinity-<endpoint base>`
//!   per endpoint (`flags dynamic,timeout ; timeout 10800s`), `ip saddr @affinity-...
//!   goto endpoint-...` ahead of the random choice, `update @affinity-... { ip saddr
//!   }` in the endpoint chain;
//! - a partial sync after an endpoint change: only the changed service's chains,
//!   added and flushed, and their rules (map elements are unchanged and not re-sent).
//!
//! Deliberate differences:
//! - nodePortAddresses is taken as the node's primary IP (the nftables-mode default),
//!   a nominal 192.0.2.1: the lab node has no primary address;
//! - the ServiceCIDR drop rule uses the one service CIDR of the lab (10.96.0.0/12);
//! - the stale-chain and stale-set listings kube-proxy runs each sync (`nft --json
//!   list chains/sets`) are run and timed by the benchmark, but their answers are not
//!   used: there is nothing stale;
//! - services are written in index order (kube-proxy: Go's map order); with verdict
//!   maps the order does not matter per packet.
use std::fmt::Write as _;

use super::{
    hash::hash_prefix,
    services::{
        ServiceSet, AFFINITY_TIMEOUT_S, CLUSTER_CIDR, NAMESPACE, PORT_NAME, SERVICE_CIDR,
        SERVICE_PORT,
    },
};

const TABLE: &str = "ip kube-proxy";
/// kube-proxy's masquerade mark (bit 14).
const MASQ_MARK: &str = "0x4000";
/// The node's nominal primary IP (TEST-NET-1): the lab node has none.
const NODE_IP: &str = "192.0.2.1";
/// knftables' NameLengthMax (256) minus the longest chain prefix (16).
const CHAIN_NAME_BASE_MAX: usize = 240;

fn hash_and_truncate(name: &str) -> String {
    let mut base = format!("{}-{name}", hash_prefix(name, 8));
    if base.len() > CHAIN_NAME_BASE_MAX {
        base.truncate(CHAIN_NAME_BASE_MAX - 3);
        base.push_str("...");
    }
    base
}

/// `service-<hash>-bench/svc-NNNNN/tcp/http` of service `index`.
#[must_use]
pub fn service_chain(index: usize) -> String {
    let name = format!("{NAMESPACE}/{}/tcp/{PORT_NAME}", ServiceSet::name(index));
    format!("service-{}", hash_and_truncate(&name))
}

fn endpoint_base(index: usize, endpoint: std::net::SocketAddrV4) -> String {
    let name = format!(
        "{NAMESPACE}/{}/tcp/{PORT_NAME}__{}/{}",
        ServiceSet::name(index),
        endpoint.ip(),
        endpoint.port()
    );
    hash_and_truncate(&name)
}

/// `endpoint-<hash>-bench/svc-NNNNN/tcp/http__ip/port` of `endpoint` of service `index`.
#[must_use]
pub fn endpoint_chain(index: usize, endpoint: std::net::SocketAddrV4) -> String {
    format!("endpoint-{}", endpoint_base(index, endpoint))
}

/// `affinity-<hash>-...`: the affinity set of `endpoint` of service `index`.
#[must_use]
pub fn affinity_set(index: usize, endpoint: std::net::SocketAddrV4) -> String {
    format!("affinity-{}", endpoint_base(index, endpoint))
}

/// What a sync sends (see [`super::iptables::Sync`]).
pub use super::iptables::Sync;

/// The `nft -f -` input of one kube-proxy sync; `changed` selects the endpoint set
/// after the change (service 0 gained an endpoint).
#[must_use]
pub fn transaction(set: &ServiceSet, sync: Sync, changed: bool) -> String {
    let mut out = String::with_capacity(set.len() * (700 + 400 * set.backends().len()));
    if sync == Sync::Full {
        write_setup(&mut out);
    }
    for index in 0..set.len() {
        if sync == Sync::Full || index == 0 {
            write_service(&mut out, set, index, changed, sync == Sync::Full);
        }
    }
    out
}

fn chain(out: &mut String, name: &str) {
    let _ = writeln!(out, "add chain {TABLE} {name}\nflush chain {TABLE} {name}");
}

fn rule(out: &mut String, chain: &str, rule: &str) {
    let _ = writeln!(out, "add rule {TABLE} {chain} {rule}");
}

/// `setupNFTables` of a first (full) sync.
fn write_setup(out: &mut String) {
    const BASE_CHAINS: &[(&str, &str, &str, &str)] = &[
        // Numeric priorities (dstnat = -100, srcnat = 100): nft 1.0.6 accepts the
        // names only on some hooks, and knftables writes numbers where it must.
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("filter-output-post-dnat", "filter", "output", "-90"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ];
    // (chain jumped to, base chain, match)
    const JUMPS: &[(&str, &str, &str)] = &[
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ];
    let _ = writeln!(
        out,
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    );
    for &(name, _, _, _) in BASE_CHAINS {
        let _ = writeln!(out, "add chain {TABLE} {name}\ndelete chain {TABLE} {name}");
    }
    for &(name, kind, hook, priority) in BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}\nflush chain {TABLE} {name}"
        );
    }
    let mut created: Vec<&str> = Vec::new();
    for &(target, from, matches) in JUMPS {
        if !created.contains(&target) {
            created.push(target);
            chain(out, target);
        }
        rule(out, from, &format!("{matches}jump {target}"));
    }
    chain(out, "mark-for-masquerade");
    rule(
        out,
        "mark-for-masquerade",
        &format!("mark set mark or {MASQ_MARK}"),
    );
    rule(
        out,
        "masquerading",
        &format!("mark and {MASQ_MARK} == 0 return"),
    );
    rule(
        out,
        "masquerading",
        &format!("mark set mark xor {MASQ_MARK}"),
    );
    rule(out, "masquerading", "masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    rule(
        out,
        "cluster-ips-check",
        "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
    );
    rule(
        out,
        "cluster-ips-check",
        &format!(
            "ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
        ),
    );
    let _ = writeln!(
        out,
        "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         flush set {TABLE} nodeport-ips\n\
         add element {TABLE} nodeport-ips {{ {NODE_IP} }}"
    );
    let _ = writeln!(
        out,
        "add map {TABLE} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add chain {TABLE} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
         flush chain {TABLE} reject-chain"
    );
    rule(out, "reject-chain", "reject");
    rule(
        out,
        "service-endpoints-check",
        "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    );
    rule(
        out,
        "nodeport-endpoints-check",
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
    );
    let _ = writeln!(
        out,
        "add map {TABLE} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    rule(
        out,
        "firewall-check",
        "ip daddr . meta l4proto . th dport vmap @firewall-ips",
    );
    let _ = writeln!(
        out,
        "add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    rule(
        out,
        "services",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
    );
    rule(
        out,
        "services",
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
    );
    for (kind, name) in [
        ("set", "cluster-ips"),
        ("map", "service-ips"),
        ("map", "firewall-ips"),
        ("map", "no-endpoint-services"),
        ("map", "no-endpoint-nodeports"),
        ("map", "service-nodeports"),
    ] {
        let _ = writeln!(out, "flush {kind} {TABLE} {name}");
    }
}

/// One service: its chains (added and flushed), map elements (on a full sync) and
/// rules, in kube-proxy's order.
fn write_service(out: &mut String, set: &ServiceSet, index: usize, changed: bool, elements: bool) {
    let endpoints = set.endpoints(index, changed);
    let endpoint_chains: Vec<String> = endpoints
        .iter()
        .map(|endpoint| endpoint_chain(index, *endpoint))
        .collect();
    for name in &endpoint_chains {
        chain(out, name);
    }
    let svc = service_chain(index);
    chain(out, &svc);
    let vip = ServiceSet::vip(index);
    if elements {
        let _ = writeln!(
            out,
            "add element {TABLE} cluster-ips {{ {vip} }}\n\
             add element {TABLE} service-ips {{ {vip} . tcp . {SERVICE_PORT} : goto {svc} }}"
        );
    }
    rule(
        out,
        &svc,
        &format!("ip daddr {vip} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"),
    );
    let affinity_sets: Vec<String> = if set.affinity() {
        endpoints
            .iter()
            .map(|endpoint| affinity_set(index, *endpoint))
            .collect()
    } else {
        Vec::new()
    };
    for name in &affinity_sets {
        let _ = writeln!(
            out,
            "add set {TABLE} {name} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {AFFINITY_TIMEOUT_S}s ; }}"
        );
    }
    for (name, endpoint_chain) in affinity_sets.iter().zip(&endpoint_chains) {
        rule(
            out,
            &svc,
            &format!("ip saddr @{name} goto {endpoint_chain}"),
        );
    }
    let mut vmap = format!("numgen random mod {} vmap {{ ", endpoints.len());
    for (position, name) in endpoint_chains.iter().enumerate() {
        if position > 0 {
            vmap.push_str(" , ");
        }
        let _ = write!(vmap, "{position} : goto {name}");
    }
    vmap.push_str(" }");
    rule(out, &svc, &vmap);
    for (position, (endpoint, name)) in endpoints.iter().zip(&endpoint_chains).enumerate() {
        rule(
            out,
            name,
            &format!("ip saddr {} jump mark-for-masquerade", endpoint.ip()),
        );
        if let Some(affinity) = affinity_sets.get(position) {
            rule(out, name, &format!("update @{affinity} {{ ip saddr }}"));
        }
        rule(out, name, &format!("meta l4proto tcp dnat to {endpoint}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_carry_hash_and_name() {
        let name = service_chain(3);
        assert!(name.starts_with("service-"));
        assert!(name.ends_with("-bench/svc-00003/tcp/http"));
        let endpoint = endpoint_chain(3, crate::bench::services::backend_addr(0));
        assert!(endpoint.ends_with("-bench/svc-00003/tcp/http__10.244.1.10/8080"));
    }

    #[test]
    fn full_and_partial_syncs() {
        let set = ServiceSet::new(2, 2).expect("set");
        let full = transaction(&set, Sync::Full, false);
        assert!(full.starts_with("add table ip kube-proxy"));
        assert_eq!(
            full.matches("add element ip kube-proxy service-ips")
                .count(),
            2
        );
        assert!(full.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        let partial = transaction(&set, Sync::ChangedServiceZero, true);
        assert!(!partial.contains("add table"));
        assert!(!partial.contains("add element"));
        assert!(partial.contains("numgen random mod 3 vmap"));
        assert!(partial.contains("dnat to 10.244.2.1:8080"));
        assert!(!partial.contains("svc-00001"));
    }

    #[test]
    fn affinity_sets_per_endpoint() {
        let set = ServiceSet::new(1, 2).expect("set").with_affinity(true);
        let full = transaction(&set, Sync::Full, false);
        let backend = crate::bench::services::backend_addr(0);
        let affinity = affinity_set(0, backend);
        let endpoint = endpoint_chain(0, backend);
        for expected in [
            format!("add set ip kube-proxy {affinity} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}"),
            format!("add rule ip kube-proxy {} ip saddr @{affinity} goto {endpoint}", service_chain(0)),
            format!("add rule ip kube-proxy {endpoint} update @{affinity} {{ ip saddr }}"),
        ] {
            assert!(full.contains(&expected), "missing {expected}\n{full}");
        }
    }
}
