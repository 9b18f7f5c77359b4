//! The rules kube-proxy's iptables proxier writes for a [`ServiceSet`], as
//! `iptables-restore` input. Our own generator, written from a reading of
//! `pkg/proxy/iptables/proxier.go` of the v1.33/v1.34 line (`syncProxyRules`,
//! `writeServiceToEndpointRules`, `iptablesJumpChains`); the rule text of ClusterIP
//! services with endpoints is reproduced rule for rule:
//!
//! - jumps: nat `PREROUTING`/`OUTPUT` -> `KUBE-SERVICES`, nat `POSTROUTING` ->
//!   `KUBE-POSTROUTING`, and the filter-table jumps (`KUBE-EXTERNAL-SERVICES`,
//!   `KUBE-NODEPORTS`, `KUBE-SERVICES`, `KUBE-FORWARD`, `KUBE-PROXY-FIREWALL`, kubelet's
//!   `KUBE-FIREWALL`), prepended, with their `ctstate NEW` matches and comments;
//! - nat: one `KUBE-SERVICES` rule per service port (`-m tcp -p tcp -d VIP --dport P
//!   -j KUBE-SVC-<hash>`), a `KUBE-SVC-<hash>` chain that first marks traffic from
//!   outside the cluster CIDR for masquerade (`! -s 10.244.0.0/16 -j KUBE-MARK-MASQ`,
//!   the ClusterCIDR local-traffic detector) and then picks an endpoint with
//!   `-m statistic --mode random --probability 1/n, 1/(n-1), ...` (ten decimals, last
//!   rule unconditional), a `KUBE-SEP-<hash>` chain per endpoint (hairpin
//!   `-s EP -j KUBE-MARK-MASQ`, then `-j DNAT --to-destination EP`), the trailing
//!   `KUBE-NODEPORTS` rule (`-m addrtype --dst-type LOCAL`, as with
//!   `localhostNodePorts`), `KUBE-MARK-MASQ` (`--or-mark 0x4000`) and
//!   `KUBE-POSTROUTING` (`RETURN` unless marked, `--xor-mark`, `MASQUERADE
//!   --random-fully`);
//! - filter: `KUBE-FORWARD` (`INVALID` drop, marked and `RELATED,ESTABLISHED`
//!   accept) and `KUBE-FIREWALL`'s localnet rule;
//! - chain names: `KUBE-SVC-` + the first 16 characters of base32(sha256(
//!   servicePortName + "tcp")), `KUBE-SEP-` + the same of servicePortName + "tcp" +
//!   "ip:port";
//! - "large cluster mode" (more than 1000 endpoints): no comments on the endpoint
//!   rules, and no `iptables-save` before each sync;
//! - with ClientIP session affinity (`--affinity`): `-m recent --name KUBE-SEP-...
//!   --rcheck --seconds 10800 --reap` jumps ahead of the random choice, and
//!   `-m recent --name KUBE-SEP-... --set` on the DNAT rule.
//!
//! Deliberate differences (none changes the per-packet path of a ClusterIP):
//! - the jump rules are loaded by one `iptables-restore --noflush` before the timed
//!   restore, where kube-proxy runs `iptables -C/-I` per jump rule (about 30 calls) on
//!   a full sync; the timed part is the one restore kube-proxy runs per sync, plus its
//!   `iptables-save -t nat` outside large-cluster mode;
//! - no nfacct matches (`--nfacct-name`): their counters are metrics only;
//! - the masquerade mark is written `0x4000` (kube-proxy formats `0x004000`, which
//!   iptables reads as the same number);
//! - no `KUBE-PROXY-CANARY` chains in mangle/nat/filter (kube-proxy's flush monitor);
//! - services are written in index order where kube-proxy follows Go's random map
//!   order; clients pick services uniformly, so the mean `KUBE-SERVICES` scan length
//!   (N/2) is the same.
use std::fmt::Write as _;

use super::{
    hash::hash_prefix,
    services::{ServiceSet, AFFINITY_TIMEOUT_S, CLUSTER_CIDR, SERVICE_PORT},
};

/// kube-proxy's masquerade mark (bit 14).
const MASQ_MARK: &str = "0x4000";
/// Above this many endpoints kube-proxy drops per-endpoint comments and the
/// per-sync `iptables-save`.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// `KUBE-SVC-<hash>` of service `index`.
#[must_use]
pub fn service_chain(index: usize) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_prefix(&format!("{}tcp", ServiceSet::port_name(index)), 16)
    )
}

/// `KUBE-SEP-<hash>` of `endpoint` of service `index`.
#[must_use]
pub fn endpoint_chain(index: usize, endpoint: std::net::SocketAddrV4) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_prefix(
            &format!("{}tcp{endpoint}", ServiceSet::port_name(index)),
            16
        )
    )
}

/// Whether kube-proxy would be in large-cluster mode for this set.
#[must_use]
pub fn large_cluster(set: &ServiceSet, changed: bool) -> bool {
    set.total_endpoints(changed) > LARGE_CLUSTER_ENDPOINTS
}

/// The jump rules and chains kube-proxy ensures with single `iptables` calls before
/// its first restore, as one `--noflush` restore input.
#[must_use]
pub fn jump_rules() -> String {
    // (table, chain kube-proxy owns, built-in chain it is jumped from, comment, extra)
    const JUMPS: &[(&str, &str, &str, &str, &str)] = &[
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "INPUT",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW",
        ),
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "FORWARD",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW",
        ),
        (
            "filter",
            "KUBE-NODEPORTS",
            "INPUT",
            "kubernetes health check service ports",
            "",
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "FORWARD",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW",
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW",
        ),
        (
            "filter",
            "KUBE-FORWARD",
            "FORWARD",
            "kubernetes forwarding rules",
            "",
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "INPUT",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW",
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "OUTPUT",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW",
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "FORWARD",
            "kubernetes load balancer firewall",
            "-m conntrack --ctstate NEW",
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            "",
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "PREROUTING",
            "kubernetes service portals",
            "",
        ),
        (
            "nat",
            "KUBE-POSTROUTING",
            "POSTROUTING",
            "kubernetes postrouting rules",
            "",
        ),
        // kubelet's duplicate of its own firewall chain, which kube-proxy also ensures
        ("filter", "KUBE-FIREWALL", "INPUT", "", ""),
        ("filter", "KUBE-FIREWALL", "OUTPUT", "", ""),
    ];
    let mut out = String::new();
    for table in ["filter", "nat"] {
        let _ = writeln!(out, "*{table}");
        let mut declared: Vec<&str> = Vec::new();
        for &(jump_table, chain, _, _, _) in JUMPS {
            if jump_table == table && !declared.contains(&chain) {
                declared.push(chain);
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
        }
        for &(jump_table, chain, from, comment, extra) in JUMPS {
            if jump_table != table {
                continue;
            }
            let mut rule = format!("-I {from} 1");
            if !extra.is_empty() {
                let _ = write!(rule, " {extra}");
            }
            if !comment.is_empty() {
                let _ = write!(rule, " -m comment --comment \"{comment}\"");
            }
            let _ = writeln!(out, "{rule} -j {chain}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// What a sync writes: every service's chains (a full sync) or only service 0's
/// (the partial sync after service 0's endpoints changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    Full,
    ChangedServiceZero,
}

/// The nat table's fixed part as kube-proxy writes it: its base chains (plus `extra`)
/// into `chains`, the masquerade rules of KUBE-POSTROUTING and KUBE-MARK-MASQ into
/// `rules`.
pub fn write_nat_base(chains: &mut String, rules: &mut String, extra: &[&str]) {
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ]
    .iter()
    .chain(extra)
    {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    );
}

/// The `iptables-restore --noflush` input of one kube-proxy sync. `changed` selects
/// the endpoint set after the change (service 0 gained an endpoint).
#[must_use]
pub fn restore_input(set: &ServiceSet, sync: Sync, changed: bool) -> String {
    let large = large_cluster(set, changed);
    let mut out = String::with_capacity(set.len() * (400 + 450 * set.backends().len()));
    write_filter_table(&mut out);

    let mut chains = String::new();
    let mut rules = String::new();
    write_nat_base(&mut chains, &mut rules, &[]);
    for index in 0..set.len() {
        let write_chains = sync == Sync::Full || index == 0;
        write_service(
            &mut chains,
            &mut rules,
            set,
            index,
            changed,
            large,
            write_chains,
        );
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    out.push_str("*nat\n");
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// The filter table as every sync writes it (it holds nothing per service when all
/// services have endpoints).
fn write_filter_table(out: &mut String) {
    out.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT"
    );
}

/// One service's `KUBE-SERVICES` rule, and (with `write_chains`) its SVC and SEP
/// chains, in kube-proxy's order.
fn write_service(
    chains: &mut String,
    rules: &mut String,
    set: &ServiceSet,
    index: usize,
    changed: bool,
    large: bool,
    write_chains: bool,
) {
    let port_name = ServiceSet::port_name(index);
    let vip = ServiceSet::vip(index);
    let svc = service_chain(index);
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"{port_name} cluster IP\" -m tcp -p tcp -d {vip} --dport {SERVICE_PORT} -j {svc}"
    );
    if !write_chains {
        return;
    }
    let endpoints = set.endpoints(index, changed);
    let _ = writeln!(chains, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{port_name} cluster IP\" -m tcp -p tcp -d {vip} --dport {SERVICE_PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
    );
    if set.affinity() {
        for endpoint in &endpoints {
            let sep = endpoint_chain(index, *endpoint);
            let mut rule = format!("-A {svc}");
            if !large {
                let _ = write!(rule, " -m comment --comment \"{port_name} -> {endpoint}\"");
            }
            let _ = writeln!(
                rules,
                "{rule} -m recent --name {sep} --rcheck --seconds {AFFINITY_TIMEOUT_S} --reap -j {sep}"
            );
        }
    }
    let count = endpoints.len();
    for (position, endpoint) in endpoints.iter().enumerate() {
        let mut rule = format!("-A {svc}");
        if !large {
            let _ = write!(rule, " -m comment --comment \"{port_name} -> {endpoint}\"");
        }
        if position + 1 < count {
            #[expect(
                clippy::cast_precision_loss,
                reason = "endpoint counts are far below 2^52"
            )]
            let probability = 1.0 / (count - position) as f64;
            let _ = write!(
                rule,
                " -m statistic --mode random --probability {probability:.10}"
            );
        }
        let _ = writeln!(rules, "{rule} -j {}", endpoint_chain(index, *endpoint));
    }
    for endpoint in &endpoints {
        let sep = endpoint_chain(index, *endpoint);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {port_name}")
        };
        let recent = if set.affinity() {
            format!(" -m recent --name {sep} --set")
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ\n-A {sep}{comment}{recent} -m tcp -p tcp -j DNAT --to-destination {endpoint}",
            endpoint.ip()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_service_with_two_endpoints() {
        let set = ServiceSet::new(1, 2).expect("set");
        let rules = restore_input(&set, Sync::Full, false);
        let svc = service_chain(0);
        let sep0 = endpoint_chain(0, set.backends()[0]);
        let sep1 = endpoint_chain(0, set.backends()[1]);
        for expected in [
            format!("-A KUBE-SERVICES -m comment --comment \"bench/svc-00000:http cluster IP\" -m tcp -p tcp -d 10.96.0.100 --dport 80 -j {svc}"),
            format!("-A {svc} -m comment --comment \"bench/svc-00000:http -> 10.244.1.10:8080\" -m statistic --mode random --probability 0.5000000000 -j {sep0}"),
            format!("-A {svc} -m comment --comment \"bench/svc-00000:http -> 10.244.1.11:8080\" -j {sep1}"),
            format!("-A {sep0} -m comment --comment bench/svc-00000:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.10:8080"),
        ] {
            assert!(rules.contains(&expected), "missing {expected}\n{rules}");
        }
        // The nodeports jump stays last in KUBE-SERVICES.
        let last_services_rule = rules
            .lines()
            .rfind(|line| line.starts_with("-A KUBE-SERVICES"))
            .expect("rules");
        assert!(last_services_rule.ends_with("-j KUBE-NODEPORTS"));
    }

    #[test]
    fn partial_sync_rewrites_every_services_rule_but_only_the_changed_chains() {
        let set = ServiceSet::new(3, 1).expect("set");
        let partial = restore_input(&set, Sync::ChangedServiceZero, true);
        assert_eq!(
            partial
                .matches("-A KUBE-SERVICES -m comment --comment \"bench/")
                .count(),
            3
        );
        assert!(partial.contains(&format!(":{} - [0:0]", service_chain(0))));
        assert!(!partial.contains(&format!(":{} - [0:0]", service_chain(1))));
        assert!(partial.contains("--to-destination 10.244.2.1:8080"));
    }

    #[test]
    fn affinity_uses_recent_lists_named_after_the_endpoint_chains() {
        let set = ServiceSet::new(1, 2).expect("set").with_affinity(true);
        let rules = restore_input(&set, Sync::Full, false);
        let svc = service_chain(0);
        let sep0 = endpoint_chain(0, set.backends()[0]);
        for expected in [
            format!("-A {svc} -m comment --comment \"bench/svc-00000:http -> 10.244.1.10:8080\" -m recent --name {sep0} --rcheck --seconds 10800 --reap -j {sep0}"),
            format!("-A {sep0} -m comment --comment bench/svc-00000:http -m recent --name {sep0} --set -m tcp -p tcp -j DNAT --to-destination 10.244.1.10:8080"),
        ] {
            assert!(rules.contains(&expected), "missing {expected}\n{rules}");
        }
        // The affinity checks come before the random choice.
        let rcheck = rules.find("--rcheck").expect("rcheck");
        let statistic = rules.find("-m statistic").expect("statistic");
        assert!(rcheck < statistic);
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let set = ServiceSet::new(600, 2).expect("set");
        assert!(large_cluster(&set, false));
        let rules = restore_input(&set, Sync::Full, false);
        assert!(!rules.contains(" -> "));
        assert!(rules.contains("\"bench/svc-00599:http cluster IP\""));
    }
}
