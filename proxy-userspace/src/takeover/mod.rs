//! Taking over from kube-proxy without dropping a connection, userspace side.
//!
//! Connections kube-proxy's rules translated live on in netfilter's conntrack: its NAT
//! bindings keep translating their packets after the rules are gone. The TC programs
//! leave those flows to netfilter (`proxy-ebpf/src/takeover.rs`), but asking netfilter
//! costs a conntrack lookup on every packet that misses our own conntrack and hits a
//! frontend, so the agent switches the question on only while netfilter holds flows it
//! translates (`IPS_DST_NAT`) to an address and port that is a frontend of ours
//! ([`Takeover::refresh`], at start before anything is attached, after each sync, and
//! periodically). Once those flows have ended, the check goes off by itself.
//!
//! Both families' NAT flows are read, and both families' new-flow paths ask netfilter
//! while the check is on (`proxy-ebpf/src/service6.rs` `choose` for IPv6, with the
//! IPv6 arm of `bpf_sock_tuple`): flows of either family switch it on, each counted
//! in its own metric (`kpr_takeover_netfilter_flows`,
//! `kpr_takeover_ipv6_netfilter_flows`).
pub mod btf;
pub mod ctnetlink;

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Array, MapError};
use proxy_common::takeover::{NfCheck, NF_CHECK_NAME};
use tracing::{info, warn};

use crate::{
    datapath::Datapath,
    family::Family,
    metrics::{Metrics, ReasonLabels},
    sync::Mirror,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("map {NF_CHECK_NAME} is missing from the eBPF object")]
    MissingMap,
    #[error("map {NF_CHECK_NAME}")]
    Map(#[source] MapError),
    #[error("reading netfilter's conntrack table")]
    Dump(#[source] io::Error),
}

impl Error {
    /// Metric label.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingMap | Self::Map(_) => "map",
            Self::Dump(_) => "conntrack_dump",
        }
    }
}

/// A frontend as netfilter's tuples name it: address (either family), port, protocol.
pub type FrontendAddr = (IpAddr, u16, u8);

/// The frontends of both families' service maps (slot-0 entries), as the datapath
/// holds them.
#[must_use]
pub fn frontends_of(
    mirror: &Mirror<Ipv4Addr>,
    mirror6: &Mirror<Ipv6Addr>,
) -> BTreeSet<FrontendAddr> {
    let mut frontends = family_frontends(mirror);
    frontends.extend(family_frontends(mirror6));
    frontends
}

fn family_frontends<F: Family>(mirror: &Mirror<F>) -> BTreeSet<FrontendAddr> {
    mirror
        .frontends()
        .map(|(key, _)| {
            let frontend = F::key_frontend(key);
            (frontend.addr.into(), frontend.port, frontend.proto)
        })
        .collect()
}

/// Of netfilter's NAT flows, those to `frontends`: (IPv4, IPv6). Before the first sync
/// (`frontends` empty) every flow counts, so the check is on while the agent does not
/// know its frontends.
fn count_frontend_flows(
    flows: &[ctnetlink::NatFlow],
    frontends: &BTreeSet<FrontendAddr>,
) -> (usize, usize) {
    flows
        .iter()
        .filter(|flow| {
            frontends.is_empty()
                || frontends.contains(&(flow.dst.ip(), flow.dst.port(), flow.proto))
        })
        .fold((0, 0), |(v4, v6), flow| {
            if flow.dst.is_ipv4() {
                (v4 + 1, v6)
            } else {
                (v4, v6 + 1)
            }
        })
}

/// Writes the check's setting.
///
/// # Errors
/// When the object lacks the map or the kernel refuses the write.
pub fn write_check(datapath: &mut Datapath, check: NfCheck) -> Result<(), Error> {
    let map = datapath
        .ebpf
        .map_mut(NF_CHECK_NAME)
        .ok_or(Error::MissingMap)?;
    let mut array: Array<_, NfCheck> = Array::try_from(map).map_err(Error::Map)?;
    array.set(0, check, 0).map_err(Error::Map)
}

/// The setting the datapath holds.
///
/// # Errors
/// When the object lacks the map or the kernel refuses the read.
pub fn read_check(datapath: &Datapath) -> Result<NfCheck, Error> {
    let map = datapath.ebpf.map(NF_CHECK_NAME).ok_or(Error::MissingMap)?;
    let array: Array<_, NfCheck> = Array::try_from(map).map_err(Error::Map)?;
    array.get(&0, 0).map_err(Error::Map)
}

/// What the kernel offers for the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSupport {
    /// `bpf_skb_ct_lookup` exists (without it the agent loaded the programs with the
    /// call replaced by "found nothing").
    pub kfunc: bool,
    /// Where `nf_conn.status` sits.
    pub status_offset: Option<u32>,
}

impl KernelSupport {
    /// Reads the kernel's BTF.
    #[must_use]
    pub fn probe() -> Self {
        let kfunc = aya::Btf::from_sys_fs().is_ok_and(|btf| {
            btf.id_by_type_name_kind("bpf_skb_ct_lookup", aya_obj::btf::BtfKind::Func)
                .is_ok()
        });
        let status_offset = std::fs::read("/sys/kernel/btf/vmlinux")
            .ok()
            .and_then(|bytes| btf::nf_conn_status_offset(&bytes));
        Self {
            kfunc,
            status_offset,
        }
    }

    /// The check can run on this kernel.
    #[must_use]
    pub fn usable(self) -> bool {
        self.kfunc && self.status_offset.is_some()
    }
}

/// What a refresh found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Flows netfilter translates (any destination).
    pub nat_flows: usize,
    /// Of those, the IPv4 flows to a frontend of ours: kube-proxy's connections still
    /// open, which the datapath leaves to netfilter.
    pub frontend_flows: usize,
    /// The IPv6 flows to a frontend of ours, left to netfilter likewise.
    pub frontend_flows_v6: usize,
    /// Whether the datapath now asks netfilter.
    pub enabled: bool,
}

/// How often netfilter's conntrack is read again: the check goes off this long after
/// kube-proxy's last connection ended at the latest, and on this long after kube-proxy
/// (still running beside kpr) translated a connection the datapath does not see first,
/// e.g. one from the node itself.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps the datapath's check in step with netfilter's conntrack.
pub struct Takeover {
    support: KernelSupport,
    /// What the map holds, as last written (`None`: not written yet).
    written: Option<NfCheck>,
    /// The frontends of the last refresh.
    frontends: Option<BTreeSet<FrontendAddr>>,
    /// Whether `kpr cleanup --kube-proxy-rules`'s NAT hold was looked for since
    /// netfilter last translated a connection to a frontend.
    hold_released: bool,
}

impl Takeover {
    /// A takeover tracker for this kernel.
    #[must_use]
    pub fn new(support: KernelSupport) -> Self {
        Self {
            support,
            written: None,
            frontends: None,
            hold_released: false,
        }
    }

    /// Dumps netfilter's NAT flows, counts those to `frontends` (either family) and
    /// switches the check on while there are any. Before the first sync `frontends` is empty: then every
    /// NAT flow counts, so nothing kube-proxy set up is translated again while the
    /// agent does not yet know its frontends.
    ///
    /// # Errors
    /// When netfilter's table cannot be read (the check is then left on, the safe
    /// side) or the map cannot be written.
    pub fn refresh(
        &mut self,
        datapath: &mut Datapath,
        frontends: &BTreeSet<FrontendAddr>,
    ) -> Result<Report, Error> {
        let flows = match ctnetlink::nat_flows() {
            Ok(flows) => flows,
            Err(error) => {
                self.write(datapath, true)?;
                return Err(Error::Dump(error));
            }
        };
        let (frontend_flows, frontend_flows_v6) = count_frontend_flows(&flows, frontends);
        let enabled = self.write(datapath, frontend_flows + frontend_flows_v6 > 0)?;
        Ok(Report {
            nat_flows: flows.len(),
            frontend_flows,
            frontend_flows_v6,
            enabled,
        })
    }

    /// [`Self::refresh`] against the frontends the maps hold, with its outcome in the
    /// metrics and failures logged.
    pub fn refresh_recorded(
        &mut self,
        datapath: &mut Datapath,
        (mirror, mirror6): (&Mirror<Ipv4Addr>, &Mirror<Ipv6Addr>),
        metrics: &Metrics,
    ) {
        let frontends = frontends_of(mirror, mirror6);
        let result = self.refresh(datapath, &frontends);
        self.frontends = Some(frontends);
        match result {
            Ok(report) => {
                self.release_hold_when_done(report.frontend_flows + report.frontend_flows_v6);
                metrics
                    .takeover_netfilter_flows
                    .set(i64::try_from(report.frontend_flows).unwrap_or(i64::MAX));
                metrics
                    .takeover_ipv6_netfilter_flows
                    .set(i64::try_from(report.frontend_flows_v6).unwrap_or(i64::MAX));
                metrics
                    .takeover_check_enabled
                    .set(i64::from(report.enabled));
            }
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "takeover from kube-proxy: cannot tell whether netfilter translates connections to our frontends; the datapath keeps asking it");
                metrics
                    .takeover_failures
                    .get_or_create(&ReasonLabels {
                        reason: error.metric_label().to_owned(),
                    })
                    .inc();
                if let Ok(check) = read_check(datapath) {
                    metrics
                        .takeover_check_enabled
                        .set(i64::from(check.enabled != 0));
                }
            }
        }
    }

    /// Once no connection of kube-proxy's is left, removes the table that kept
    /// netfilter's NAT working for them after kube-proxy's nftables table went
    /// ([`crate::kube_proxy_rules::release_nat_hold`]); looked for once per takeover.
    fn release_hold_when_done(&mut self, frontend_flows: usize) {
        if frontend_flows > 0 {
            self.hold_released = false;
            return;
        }
        if self.hold_released {
            return;
        }
        self.hold_released = true;
        match crate::kube_proxy_rules::release_nat_hold() {
            Ok(true) => info!("kube-proxy's last connection ended: removed the NAT hold table"),
            Ok(false) => {}
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot remove the NAT hold table");
            }
        }
    }

    /// After a sync: refreshes when the frontends changed, so a frontend that
    /// netfilter holds connections for is never translated before the next scan.
    pub fn after_sync(
        &mut self,
        datapath: &mut Datapath,
        mirrors: (&Mirror<Ipv4Addr>, &Mirror<Ipv6Addr>),
        metrics: &Metrics,
    ) {
        if self.frontends.as_ref() != Some(&frontends_of(mirrors.0, mirrors.1)) {
            self.refresh_recorded(datapath, mirrors, metrics);
        }
    }

    /// Sets the check on or off (on only where the kernel supports it); returns what
    /// the datapath now does. Logs each change.
    fn write(&mut self, datapath: &mut Datapath, wanted: bool) -> Result<bool, Error> {
        let enabled = wanted && self.support.usable();
        let check = NfCheck {
            enabled: u32::from(enabled),
            status_offset: self.support.status_offset.unwrap_or(0),
        };
        if self.written == Some(check) {
            return Ok(enabled);
        }
        write_check(datapath, check)?;
        let first = self.written.is_none();
        self.written = Some(check);
        match (wanted, enabled) {
            (true, true) => info!(
                "netfilter translates connections to our frontends (kube-proxy's): the datapath leaves them to it until they end"
            ),
            (true, false) => warn!(
                kfunc = self.support.kfunc,
                nf_conn_layout = self.support.status_offset.is_some(),
                "netfilter translates connections to our frontends, but this kernel cannot tell the datapath about them (bpf_skb_ct_lookup or nf_conn's BTF missing): they will be translated again and break"
            ),
            (false, _) if !first => info!(
                "no connection kube-proxy translated is left: the datapath stops asking netfilter"
            ),
            (false, _) => {}
        }
        Ok(enabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(dst: &str) -> ctnetlink::NatFlow {
        let dst: std::net::SocketAddr = dst.parse().expect("address");
        let src = if dst.is_ipv4() {
            "10.244.1.2:40000"
        } else {
            "[fd00:10:244:1::2]:40000"
        };
        ctnetlink::NatFlow {
            proto: proxy_common::proto::TCP,
            src: src.parse().expect("address"),
            dst,
        }
    }

    #[test]
    fn flows_are_counted_per_family_all_before_the_first_sync() {
        let flows = [
            flow("10.96.0.10:80"),
            flow("10.96.0.99:80"),
            flow("[fd00:96::10]:80"),
            flow("[fd00:96::99]:80"),
        ];
        // Before the first sync: every flow of both families.
        assert_eq!(count_frontend_flows(&flows, &BTreeSet::new()), (2, 2));
        let frontends: BTreeSet<FrontendAddr> = [
            (
                "10.96.0.10".parse().expect("v4"),
                80,
                proxy_common::proto::TCP,
            ),
            (
                "fd00:96::10".parse().expect("v6"),
                80,
                proxy_common::proto::TCP,
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(count_frontend_flows(&flows, &frontends), (1, 1));
    }
}
