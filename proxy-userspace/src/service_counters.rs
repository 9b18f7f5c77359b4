//! Per-service traffic counters: which service ports the datapath counts for
//! (`proxy_common::service_stats`), and reading their per-CPU totals for
//! `kpr_service_{connections,packets,bytes}_total`.
//!
//! The datapath counts only into entries that exist, so switching the counters on or
//! off is inserting or deleting entries: nothing is reloaded. `auto` (the default)
//! counts while the node has at most [`AUTO_MAX_SERVICE_PORTS`] service ports: each
//! costs three Prometheus series and a per-CPU entry, which a cluster with tens of
//! thousands of services would rather not pay for.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapError, PerCpuValues};
use proxy_common::service_stats::{self, ServiceStatsV1};
use serde::Deserialize;
use tracing::info;

use crate::datapath::Maps;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {MAP_NAME}")]
    Map(#[source] MapError),
    #[error("counting the possible CPUs")]
    Cpus(#[source] std::io::Error),
}

/// Most service ports `auto` counts for.
pub const AUTO_MAX_SERVICE_PORTS: usize = 1_000;

/// Whether the per-service counters are on (`--service-counters`, `serviceCounters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// On while the node has at most [`AUTO_MAX_SERVICE_PORTS`] service ports.
    #[default]
    Auto,
    On,
    Off,
}

impl Mode {
    /// Whether to count on a node with `service_ports` service ports.
    #[must_use]
    pub fn enabled_for(self, service_ports: usize) -> bool {
        match self {
            Self::Auto => service_ports <= AUTO_MAX_SERVICE_PORTS,
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// The service ids the map holds entries for.
#[derive(Debug)]
pub struct ServiceCounters {
    mode: Mode,
    present: BTreeSet<u32>,
    /// The last decision, to log when `auto` switches.
    enabled: Option<bool>,
}

impl ServiceCounters {
    /// Adopts the entries an earlier agent left (their counts carry on).
    #[must_use]
    pub fn adopt(mode: Mode, maps: &Maps) -> Self {
        let present = maps.service_stats.keys().filter_map(Result::ok).collect();
        Self {
            mode,
            present,
            enabled: None,
        }
    }

    /// The service ids counted now.
    #[must_use]
    pub fn counted(&self) -> &BTreeSet<u32> {
        &self.present
    }

    /// Makes the map hold an entry for exactly the ids of `service_ids` when the mode
    /// counts for that many, and none otherwise. New entries start at zero; entries of
    /// ids that stay keep their counts.
    ///
    /// # Errors
    /// The first write the kernel refuses (the others are still tried; the next pass
    /// tries again).
    pub fn sync(&mut self, maps: &mut Maps, service_ids: &BTreeSet<u32>) -> Result<(), Error> {
        let enabled = self.mode.enabled_for(service_ids.len());
        if self.enabled != Some(enabled) {
            info!(
                mode = ?self.mode,
                service_ports = service_ids.len(),
                enabled,
                "per-service traffic counters"
            );
            self.enabled = Some(enabled);
        }
        let empty = BTreeSet::new();
        let wanted = if enabled { service_ids } else { &empty };
        let mut first_error = None;
        let gone: Vec<u32> = self.present.difference(wanted).copied().collect();
        for id in gone {
            match maps.service_stats.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.present.remove(&id);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let new: Vec<u32> = wanted.difference(&self.present).copied().collect();
        if !new.is_empty() {
            let cpus = aya::util::nr_cpus().map_err(|(_, error)| Error::Cpus(error))?;
            for id in new {
                let zeros = PerCpuValues::try_from(vec![ServiceStatsV1::default(); cpus])
                    .map_err(Error::Cpus)?;
                match maps.service_stats.insert(id, zeros, 0) {
                    Ok(()) => {
                        self.present.insert(id);
                    }
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
        }
        first_error.map_or(Ok(()), |error| Err(Error::Map(error)))
    }

    /// Each counted service port's totals over every CPU. An entry that vanished
    /// meanwhile is left out.
    #[must_use]
    pub fn read(&self, maps: &Maps) -> BTreeMap<u32, ServiceStatsV1> {
        self.present
            .iter()
            .filter_map(|&id| {
                let values = maps.service_stats.get(&id, 0).ok()?;
                Some((id, sum(values.iter())))
            })
            .collect()
    }
}

/// The totals of per-CPU values.
#[must_use]
pub fn sum<'a>(values: impl Iterator<Item = &'a ServiceStatsV1>) -> ServiceStatsV1 {
    values.fold(ServiceStatsV1::default(), |total, cpu| ServiceStatsV1 {
        connections: total.connections + cpu.connections,
        packets: total.packets + cpu.packets,
        bytes: total.bytes + cpu.bytes,
    })
}

/// The map's name, for logs.
pub const MAP_NAME: &str = service_stats::NAME;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_counts_up_to_the_threshold() {
        assert!(Mode::Auto.enabled_for(AUTO_MAX_SERVICE_PORTS));
        assert!(!Mode::Auto.enabled_for(AUTO_MAX_SERVICE_PORTS + 1));
        assert!(Mode::On.enabled_for(100_000));
        assert!(!Mode::Off.enabled_for(1));
    }

    #[test]
    fn per_cpu_values_are_summed() {
        let cpus = [
            ServiceStatsV1 {
                connections: 1,
                packets: 10,
                bytes: 600,
            },
            ServiceStatsV1 {
                connections: 2,
                packets: 5,
                bytes: 300,
            },
        ];
        assert_eq!(
            sum(cpus.iter()),
            ServiceStatsV1 {
                connections: 3,
                packets: 15,
                bytes: 900
            }
        );
    }
}
