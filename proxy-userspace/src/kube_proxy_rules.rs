//! `kpr cleanup --kube-proxy-rules`: removes what kube-proxy programmed into netfilter,
//! and nothing else, once kpr serves the node.
//!
//! - iptables (legacy and nft flavours, IPv4 and IPv6; tables nat, filter, mangle):
//!   kube-proxy's chains ([`is_kube_proxy_chain`]) are flushed and deleted, and the
//!   rules of built-in chains that jump to them (kube-proxy's jump rules) go too. A
//!   chain of kube-proxy's that a chain of someone else still jumps to is kept whole
//!   (and reported): deleting it would change that other chain. kubelet's chains
//!   (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`) are kept: `KUBE-FIREWALL`
//!   guards `route_localnet`, which kube-proxy turned on and which stays on.
//! - nftables: kube-proxy's own tables, `ip kube-proxy` and `ip6 kube-proxy`.
//!
//! Established connections survive: their NAT lives in netfilter's conntrack entries,
//! not in the rules, and the datapath leaves those flows to netfilter (see
//! [`crate::takeover`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use tracing::{info, warn};

/// The iptables flavours and families, as their `-save` commands.
const IPTABLES: [&str; 4] = [
    "iptables-legacy",
    "iptables-nft",
    "ip6tables-legacy",
    "ip6tables-nft",
];
/// The tables kube-proxy writes to.
const TABLES: [&str; 3] = ["nat", "filter", "mangle"];
/// The nftables tables kube-proxy's nftables mode creates, as (family, name).
const NFT_TABLES: [(&str, &str); 2] = [("ip", "kube-proxy"), ("ip6", "kube-proxy")];

/// A table of kpr's that keeps netfilter translating the connections kube-proxy set
/// up, added before kube-proxy's rules go while netfilter still translates some.
/// netfilter applies an established connection's NAT (kept in its conntrack entry)
/// only while the namespace has a NAT chain (which registers the NAT hooks) and a
/// rule that needs conntrack (which registers the conntrack hooks, taken per namespace
/// on demand). kube-proxy's rules are often the only ones of either kind: without
/// them every connection kube-proxy translated stops being translated at once
/// (measured: all 202 of the takeover test broke with nftables-mode rules removed).
/// The hold is one NAT chain with one conntrack rule that changes nothing; the agent
/// removes it once those connections are gone ([`release_nat_hold`]).
const NAT_HOLD: (&str, &str) = ("ip", "kpr-nat-hold");

/// kube-proxy's chains with fixed names (`pkg/proxy/iptables/proxier.go`).
const KUBE_PROXY_CHAINS: [&str; 9] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    // IPVS mode's.
    "KUBE-LOAD-BALANCER",
];
/// Prefixes of kube-proxy's per-service and per-endpoint chains.
const KUBE_PROXY_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];

/// Whether `chain` is one kube-proxy creates (and nobody else).
#[must_use]
pub fn is_kube_proxy_chain(chain: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&chain)
        || KUBE_PROXY_PREFIXES
            .iter()
            .any(|prefix| chain.starts_with(prefix))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
}

/// What was done to one table of one iptables flavour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableReport {
    /// `iptables-legacy`, `ip6tables-nft`, ...
    pub flavour: String,
    pub table: String,
    /// Chains flushed and deleted.
    pub removed_chains: Vec<String>,
    /// Jump rules deleted from built-in chains.
    pub removed_jumps: usize,
    /// kube-proxy's chains kept, with the chain of someone else that jumps to them.
    pub kept_chains: Vec<(String, String)>,
}

/// Everything the cleanup did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// nftables tables deleted, as `family name`.
    pub nft_tables: Vec<String>,
    /// Tools not found (what they would show was not checked).
    pub missing_tools: Vec<String>,
    /// The NAT hold table was added ([`NAT_HOLD`]).
    pub nat_hold: bool,
}

/// One table of `iptables-save` output: chains in order, rules by chain.
#[derive(Debug, Default, PartialEq, Eq)]
struct Table {
    chains: Vec<String>,
    builtin: BTreeSet<String>,
    /// Rules as `-A` lines, in order.
    rules: Vec<Rule>,
}

#[derive(Debug, PartialEq, Eq)]
struct Rule {
    chain: String,
    /// The rule text after `-A CHAIN `.
    spec: String,
    /// Its `-j`/`-g` target.
    target: Option<String>,
}

/// Splits a rule as `iptables-save` quotes it (double quotes, backslash escapes).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// Parses `iptables-save` output into its tables.
fn parse_save(text: &str) -> BTreeMap<String, Table> {
    let mut tables = BTreeMap::new();
    let mut current: Option<(String, Table)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = Some((name.trim().to_owned(), Table::default()));
        } else if line.trim() == "COMMIT" {
            if let Some((name, table)) = current.take() {
                tables.insert(name, table);
            }
        } else if let Some(chain_line) = line.strip_prefix(':') {
            if let Some((_, table)) = current.as_mut() {
                let mut parts = chain_line.split_whitespace();
                if let Some(chain) = parts.next() {
                    if parts.next().is_some_and(|policy| policy != "-") {
                        table.builtin.insert(chain.to_owned());
                    }
                    table.chains.push(chain.to_owned());
                }
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            if let Some((_, table)) = current.as_mut() {
                let Some((chain, spec)) = rest.split_once(' ') else {
                    continue;
                };
                let tokens = words(spec);
                let target = tokens
                    .iter()
                    .position(|word| {
                        word == "-j" || word == "-g" || word == "--jump" || word == "--goto"
                    })
                    .and_then(|at| tokens.get(at + 1))
                    .cloned();
                table.rules.push(Rule {
                    chain: chain.to_owned(),
                    spec: spec.to_owned(),
                    target,
                });
            }
        }
    }
    tables
}

/// What to do with one table: the `iptables-restore --noflush` input (empty when there
/// is nothing of kube-proxy's) and the report.
fn plan(name: &str, table: &Table) -> (String, TableReport) {
    let mut report = TableReport {
        table: name.to_owned(),
        ..TableReport::default()
    };
    let ours: BTreeSet<&str> = table
        .chains
        .iter()
        .map(String::as_str)
        .filter(|chain| !table.builtin.contains(*chain) && is_kube_proxy_chain(chain))
        .collect();
    // Chains of kube-proxy's that another user chain jumps to stay, with everything
    // they jump to in turn.
    let mut kept: BTreeMap<&str, &str> = BTreeMap::new();
    for rule in &table.rules {
        let Some(target) = rule.target.as_deref() else {
            continue;
        };
        if ours.contains(target)
            && !ours.contains(rule.chain.as_str())
            && !table.builtin.contains(&rule.chain)
        {
            kept.entry(target).or_insert(rule.chain.as_str());
        }
    }
    loop {
        let more: Vec<(&str, &str)> = table
            .rules
            .iter()
            .filter_map(|rule| {
                let target = rule.target.as_deref()?;
                (kept.contains_key(rule.chain.as_str())
                    && ours.contains(target)
                    && !kept.contains_key(target))
                .then_some((target, rule.chain.as_str()))
            })
            .collect();
        if more.is_empty() {
            break;
        }
        kept.extend(more);
    }
    let removed: Vec<&str> = table
        .chains
        .iter()
        .map(String::as_str)
        .filter(|chain| ours.contains(chain) && !kept.contains_key(chain))
        .collect();
    let mut input = String::new();
    for rule in &table.rules {
        let jumps_to_ours = rule
            .target
            .as_deref()
            .is_some_and(|target| ours.contains(target));
        if jumps_to_ours && table.builtin.contains(&rule.chain) {
            input.push_str(&format!("-D {} {}\n", rule.chain, rule.spec));
            report.removed_jumps += 1;
        }
    }
    // Flush first: the chains jump to each other, and a chain is deleted only once
    // nothing refers to it.
    for chain in &removed {
        input.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for chain in &removed {
        input.push_str(&format!("-X {chain}\n"));
    }
    report.removed_chains = removed.iter().map(|chain| (*chain).to_owned()).collect();
    report.kept_chains = kept
        .iter()
        .map(|(chain, user)| ((*chain).to_owned(), (*user).to_owned()))
        .collect();
    if input.is_empty() {
        return (input, report);
    }
    (format!("*{name}\n{input}COMMIT\n"), report)
}

/// A tool by name on PATH or in the sbin directories (root's PATH may lack them).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let name = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: name.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| Error::Spawn {
                program: name.clone(),
                source,
            })?;
    }
    let output = child.wait_with_output().map_err(|source| Error::Spawn {
        program: name.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(Error::Failed {
            program: format!("{name} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Removes kube-proxy's chains of one iptables flavour.
fn clean_iptables(flavour: &str, report: &mut Report) -> Result<(), Error> {
    let (Some(save), Some(restore)) = (
        find_tool(&format!("{flavour}-save")),
        find_tool(&format!("{flavour}-restore")),
    ) else {
        report
            .missing_tools
            .push(format!("{flavour}-save/-restore"));
        return Ok(());
    };
    let saved = parse_save(&run(&save, &[], None)?);
    for name in TABLES {
        let Some(table) = saved.get(name) else {
            continue;
        };
        let (input, mut table_report) = plan(name, table);
        table_report.flavour = flavour.to_owned();
        if !input.is_empty() {
            run(&restore, &["--noflush", "--wait"], Some(&input))?;
        }
        if !table_report.removed_chains.is_empty()
            || table_report.removed_jumps > 0
            || !table_report.kept_chains.is_empty()
        {
            report.tables.push(table_report);
        }
    }
    Ok(())
}

/// Deletes kube-proxy's nftables tables.
fn clean_nftables(report: &mut Report) -> Result<(), Error> {
    let Some(nft) = find_tool("nft") else {
        report.missing_tools.push("nft".to_owned());
        return Ok(());
    };
    let tables = nft_tables(&nft)?;
    let theirs: Vec<&(String, String)> = tables
        .iter()
        .filter(|(family, name)| NFT_TABLES.contains(&(family.as_str(), name.as_str())))
        .collect();
    if theirs.is_empty() {
        return Ok(());
    }
    for (family, name) in theirs {
        run(&nft, &["delete", "table", family, name], None)?;
        report.nft_tables.push(format!("{family} {name}"));
    }
    Ok(())
}

/// Adds the NAT hold ([`NAT_HOLD`]) while netfilter translates connections (an
/// unreadable conntrack table counts as translating: the hold is harmless).
fn hold_nat(report: &mut Report) -> Result<(), Error> {
    let translating =
        crate::takeover::ctnetlink::nat_flows().map_or(true, |flows| !flows.is_empty());
    if !translating {
        return Ok(());
    }
    let Some(nft) = find_tool("nft") else {
        report.missing_tools.push("nft".to_owned());
        warn!("nft is not installed: cannot keep netfilter translating; connections kube-proxy translated may break once its rules are gone");
        return Ok(());
    };
    let (family, name) = NAT_HOLD;
    let input = format!(
        "add table {family} {name} {{ comment \"kpr: keeps netfilter translating kube-proxy's connections until they end\" ; }}\n\
         add chain {family} {name} hold {{ type nat hook postrouting priority 100 ; }}\n\
         flush chain {family} {name} hold\n\
         add rule {family} {name} hold ct state established counter\n"
    );
    run(&nft, &["-f", "-"], Some(&input))?;
    report.nat_hold = true;
    Ok(())
}

/// The tables nft lists, as (family, name).
fn nft_tables(nft: &Path) -> Result<Vec<(String, String)>, Error> {
    let listed = run(nft, &["list", "tables"], None)?;
    Ok(listed
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("table"), Some(family), Some(name)) => {
                    Some((family.to_owned(), name.to_owned()))
                }
                _ => None,
            }
        })
        .collect())
}

/// Removes the NAT hold table ([`NAT_HOLD`]) if there is one; returns whether there was.
/// Called by the agent once netfilter translates no connection to a frontend any more.
///
/// # Errors
/// When nft fails.
pub fn release_nat_hold() -> Result<bool, Error> {
    let Some(nft) = find_tool("nft") else {
        return Ok(false);
    };
    let (family, name) = NAT_HOLD;
    let held = nft_tables(&nft)?
        .iter()
        .any(|(listed_family, listed)| listed_family == family && listed == name);
    if held {
        run(&nft, &["delete", "table", family, name], None)?;
    }
    Ok(held)
}

/// Removes kube-proxy's rules from every flavour of this network namespace, logging
/// what it removed and kept.
///
/// # Errors
/// The first tool that failed; what came before it is already removed (running the
/// cleanup again finishes the job).
pub fn cleanup() -> Result<Report, Error> {
    let mut report = Report::default();
    hold_nat(&mut report)?;
    for flavour in IPTABLES {
        clean_iptables(flavour, &mut report)?;
    }
    clean_nftables(&mut report)?;
    for table in &report.tables {
        info!(
            flavour = table.flavour,
            table = table.table,
            chains = table.removed_chains.len(),
            jumps = table.removed_jumps,
            "removed kube-proxy's chains"
        );
        for (chain, user) in &table.kept_chains {
            warn!(
                flavour = table.flavour,
                table = table.table,
                chain,
                used_by = user,
                "kept a chain of kube-proxy's that another chain still jumps to"
            );
        }
    }
    for table in &report.nft_tables {
        info!(table, "removed kube-proxy's nftables table");
    }
    if report.nat_hold {
        info!(
            table = format!("{} {}", NAT_HOLD.0, NAT_HOLD.1),
            "netfilter still translates kube-proxy's connections: a table of kpr's keeps them translated, and the agent removes it once they have ended"
        );
    }
    for tool in &report.missing_tools {
        info!(tool, "not installed: its rules were not checked");
    }
    if report.tables.is_empty() && report.nft_tables.is_empty() {
        info!("no rules of kube-proxy's found");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 1970
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-FORWARD - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j CNI-FORWARD
-A KUBE-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -j DROP
-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-MASQ - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -j CNI-HOSTPORT-MASQ
-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j KUBE-MARK-MASQ
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-DEF
-A KUBE-SEP-DEF -s 10.244.1.11/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-DEF -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:8080
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
COMMIT
"#;

    #[test]
    fn removes_kube_proxys_chains_and_jumps_and_keeps_kubelets_and_others() {
        let tables = parse_save(SAVED);
        let (input, report) = plan("filter", &tables["filter"]);
        assert_eq!(
            input,
            "*filter\n\
             -D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-SERVICES\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             :KUBE-FORWARD - [0:0]\n\
             :KUBE-SERVICES - [0:0]\n\
             -X KUBE-FORWARD\n\
             -X KUBE-SERVICES\n\
             COMMIT\n"
        );
        assert_eq!(report.removed_jumps, 2);
        assert!(report.kept_chains.is_empty());
    }

    #[test]
    fn a_chain_someone_else_jumps_to_is_kept() {
        let tables = parse_save(SAVED);
        let (input, report) = plan("nat", &tables["nat"]);
        // CNI-HOSTPORT-MASQ jumps to KUBE-MARK-MASQ: it stays, the rest goes.
        assert_eq!(
            report.kept_chains,
            vec![("KUBE-MARK-MASQ".to_owned(), "CNI-HOSTPORT-MASQ".to_owned())]
        );
        assert_eq!(
            report.removed_chains,
            [
                "KUBE-POSTROUTING",
                "KUBE-SERVICES",
                "KUBE-SVC-ABC",
                "KUBE-SEP-DEF"
            ]
        );
        assert!(!input.contains("KUBE-MARK-MASQ"), "{input}");
        assert!(!input.contains("CNI-"), "{input}");
        assert_eq!(report.removed_jumps, 2);
    }

    #[test]
    fn nothing_of_kube_proxys_means_no_restore() {
        let tables = parse_save(
            "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK --set-mark 1\nCOMMIT\n",
        );
        let (input, report) = plan("mangle", &tables["mangle"]);
        assert!(input.is_empty());
        assert_eq!(
            report,
            TableReport {
                table: "mangle".into(),
                ..TableReport::default()
            }
        );
    }

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            words(r#"-m comment --comment "a \"b\" c" -j X"#),
            ["-m", "comment", "--comment", "a \"b\" c", "-j", "X"]
        );
    }

    #[test]
    fn kubelets_chains_are_not_kube_proxys() {
        for chain in [
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBE-MARK-DROP",
            "CNI-X",
        ] {
            assert!(!is_kube_proxy_chain(chain), "{chain}");
        }
        for chain in [
            "KUBE-SVC-X",
            "KUBE-SEP-X",
            "KUBE-SERVICES",
            "KUBE-PROXY-CANARY",
        ] {
            assert!(is_kube_proxy_chain(chain), "{chain}");
        }
    }
}
