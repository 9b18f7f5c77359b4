//! Conntrack upkeep from userspace: reaping expired entries of both tables (established
//! and new flows), and forgetting the flows and affinities of backends that left a
//! service.
//!
//! These walks visit every entry of tables that hold up to millions, one syscall per
//! entry: the agent runs them on a thread of their own ([`crate::upkeep`]), on handles
//! of that thread's own ([`Tables`]), and each walk stops early when asked to
//! (`keep_going`), so neither the event loop nor a shutdown waits for them.
use std::collections::BTreeSet;

use aya::maps::{HashMap, IterableMap as _, MapData};
use proxy_common::{
    names, proto, AffinityKeyV4, AffinityKeyV6, AffinityValueV4, CtEntryV4, CtEntryV6, CtKeyV4,
    CtKeyV6, DatapathConfig,
};

use super::{reopen, Error, Maps, Result};

/// The conntrack and affinity layouts of one family, as the walks read them.
pub trait CtLayout {
    type Key: aya::Pod + Copy;
    type Entry: aya::Pod + Copy;
    type AffinityKey: aya::Pod + Copy;
    const CONNTRACK: &'static str;
    const CONNTRACK_NEW: &'static str;
    const AFFINITY: &'static str;
    fn proto(key: &Self::Key) -> u8;
    fn expired(config: &DatapathConfig, entry: &Self::Entry, proto: u8, now_ns: u64) -> bool;
    /// `(service id, backend id)` of a flow.
    fn pair(entry: &Self::Entry) -> (u32, u32);
    fn affinity_service(key: &Self::AffinityKey) -> u32;
}

/// IPv4's tables.
pub struct V4;
/// IPv6's tables (their entries' timestamps and flags are IPv4's, so one config
/// expires both).
pub struct V6;

impl CtLayout for V4 {
    type Key = CtKeyV4;
    type Entry = CtEntryV4;
    type AffinityKey = AffinityKeyV4;
    const CONNTRACK: &'static str = names::CONNTRACK_V4;
    const CONNTRACK_NEW: &'static str = names::CONNTRACK_NEW_V4;
    const AFFINITY: &'static str = names::AFFINITY_V4;
    fn proto(key: &CtKeyV4) -> u8 {
        key.proto
    }
    fn expired(config: &DatapathConfig, entry: &CtEntryV4, proto: u8, now_ns: u64) -> bool {
        config.ct_expired(entry, proto, now_ns)
    }
    fn pair(entry: &CtEntryV4) -> (u32, u32) {
        (entry.service_id, entry.backend_id)
    }
    fn affinity_service(key: &AffinityKeyV4) -> u32 {
        key.service_id
    }
}

impl CtLayout for V6 {
    type Key = CtKeyV6;
    type Entry = CtEntryV6;
    type AffinityKey = AffinityKeyV6;
    const CONNTRACK: &'static str = names::CONNTRACK_V6;
    const CONNTRACK_NEW: &'static str = names::CONNTRACK_NEW_V6;
    const AFFINITY: &'static str = names::AFFINITY_V6;
    fn proto(key: &CtKeyV6) -> u8 {
        key.proto
    }
    fn expired(config: &DatapathConfig, entry: &CtEntryV6, proto: u8, now_ns: u64) -> bool {
        config.ct_expired_v6(entry, proto, now_ns)
    }
    fn pair(entry: &CtEntryV6) -> (u32, u32) {
        (entry.service_id, entry.backend_id)
    }
    fn affinity_service(key: &AffinityKeyV6) -> u32 {
        key.service_id
    }
}

type Table<L = V4> = HashMap<MapData, <L as CtLayout>::Key, <L as CtLayout>::Entry>;
type AffinityTable<L = V4> = HashMap<MapData, <L as CtLayout>::AffinityKey, AffinityValueV4>;

/// Handles of their own on the conntrack and affinity maps (the same kernel maps as
/// the agent's [`Maps`]), for walks on another thread.
pub struct Tables {
    pub conntrack: Table,
    pub conntrack_new: Table,
    pub affinity: AffinityTable,
    pub conntrack_v6: Table<V6>,
    pub conntrack_new_v6: Table<V6>,
    pub affinity_v6: AffinityTable<V6>,
}

impl Tables {
    /// Opens second handles on the maps of `maps`.
    ///
    /// # Errors
    /// When the kernel refuses a handle.
    pub fn open(maps: &Maps) -> Result<Self> {
        Ok(Self {
            conntrack: reopen(maps.conntrack.map(), names::CONNTRACK_V4)?,
            conntrack_new: reopen(maps.conntrack_new.map(), names::CONNTRACK_NEW_V4)?,
            affinity: reopen(maps.affinity.map(), names::AFFINITY_V4)?,
            conntrack_v6: reopen(maps.conntrack_v6.map(), names::CONNTRACK_V6)?,
            conntrack_new_v6: reopen(maps.conntrack_new_v6.map(), names::CONNTRACK_NEW_V6)?,
            affinity_v6: reopen(maps.affinity_v6.map(), names::AFFINITY_V6)?,
        })
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Result of one reaping pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries of the established table alive after the pass.
    pub live: usize,
    /// Entries of the new-flow table alive after the pass.
    pub live_new: usize,
    /// Entries removed, both tables.
    pub removed: usize,
}

fn ct_error(name: &'static str, source: aya::maps::MapError) -> Error {
    Error::Map { name, source }
}

/// Removes the entries of one table idle for longer than their timeout; returns
/// `(live, removed)`. Keys are collected first: deleting while walking with
/// get_next_key restarts the walk.
fn collect_table<L: CtLayout>(
    table: &mut Table<L>,
    name: &'static str,
    config: &DatapathConfig,
    now_ns: u64,
    keep_going: &dyn Fn() -> bool,
) -> Result<(usize, usize)> {
    let mut expired = Vec::new();
    let mut live = 0;
    for entry in table.iter() {
        if !keep_going() {
            return Ok((live, 0));
        }
        let (key, value) = match entry {
            Ok(entry) => entry,
            // An entry evicted or moved between get_next_key and lookup: skip it.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(error) => return Err(ct_error(name, error)),
        };
        if L::expired(config, &value, L::proto(&key), now_ns) {
            expired.push(key);
        } else {
            live += 1;
        }
    }
    // The datapath may have reused a key since the walk (an expired flow's 5-tuple
    // seen again starts a new flow under the same key): only delete what is still
    // expired now, or a fresh connection would lose its entry.
    let still_expired: Vec<L::Key> = expired
        .into_iter()
        .filter(|key| {
            table
                .get(key, 0)
                .is_ok_and(|value| L::expired(config, &value, L::proto(key), now_ns))
        })
        .collect();
    Ok((live, remove_all::<L>(table, &still_expired)))
}

/// Removes conntrack entries idle for longer than their timeout, in both tables.
///
/// # Errors
/// When a table cannot be read.
pub fn collect_expired(maps: &mut Maps, config: &DatapathConfig, now_ns: u64) -> Result<GcReport> {
    collect_expired_in::<V4>(
        &mut maps.conntrack,
        &mut maps.conntrack_new,
        config,
        now_ns,
        &|| true,
    )
}

/// [`collect_expired`] on the tables of [`Tables`]; stops early (with what it counted
/// so far) once `keep_going` says no.
///
/// # Errors
/// When a table cannot be read.
pub fn collect_expired_in<L: CtLayout>(
    conntrack: &mut Table<L>,
    conntrack_new: &mut Table<L>,
    config: &DatapathConfig,
    now_ns: u64,
    keep_going: &dyn Fn() -> bool,
) -> Result<GcReport> {
    let (live, removed) = collect_table::<L>(conntrack, L::CONNTRACK, config, now_ns, keep_going)?;
    let (live_new, removed_new) =
        collect_table::<L>(conntrack_new, L::CONNTRACK_NEW, config, now_ns, keep_going)?;
    Ok(GcReport {
        live,
        live_new,
        removed: removed + removed_new,
    })
}

fn remove_all<L: CtLayout>(table: &mut Table<L>, keys: &[L::Key]) -> usize {
    keys.iter().filter(|key| table.remove(key).is_ok()).count()
}

/// Forgets what tied clients to `(service id, backend id)` pairs that are gone: UDP
/// conntrack entries (so a client's next datagram picks a live backend instead of
/// blackholing, which matters for DNS) and session affinity entries. TCP entries stay
/// until the connection closes, as kube-proxy leaves established connections alone.
///
/// Returns the number of conntrack and affinity entries removed.
///
/// # Errors
/// When a map cannot be read.
pub fn forget_backends(maps: &mut Maps, pairs: &BTreeSet<(u32, u32)>) -> Result<(usize, usize)> {
    forget_backends_in::<V4>(
        [&mut maps.conntrack, &mut maps.conntrack_new],
        &mut maps.affinity,
        pairs,
        &|| true,
    )
}

/// [`forget_backends`] on the tables of [`Tables`]; stops early once `keep_going`
/// says no.
///
/// # Errors
/// When a map cannot be read.
pub fn forget_backends_in<L: CtLayout>(
    conntrack_tables: [&mut Table<L>; 2],
    affinity: &mut AffinityTable<L>,
    pairs: &BTreeSet<(u32, u32)>,
    keep_going: &dyn Fn() -> bool,
) -> Result<(usize, usize)> {
    if pairs.is_empty() {
        return Ok((0, 0));
    }
    let mut flows_removed = 0;
    for (table, name) in conntrack_tables
        .into_iter()
        .zip([L::CONNTRACK, L::CONNTRACK_NEW])
    {
        let mut flows = Vec::new();
        for entry in table.iter() {
            if !keep_going() {
                return Ok((flows_removed, 0));
            }
            let (key, value) = match entry {
                Ok(entry) => entry,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(error) => return Err(ct_error(name, error)),
            };
            if L::proto(&key) == proto::UDP && pairs.contains(&L::pair(&value)) {
                flows.push(key);
            }
        }
        flows_removed += remove_all::<L>(table, &flows);
    }

    let mut affinities: Vec<L::AffinityKey> = Vec::new();
    for entry in affinity.iter() {
        if !keep_going() {
            break;
        }
        let (key, value) = match entry {
            Ok(entry) => entry,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(source) => {
                return Err(Error::Map {
                    name: L::AFFINITY,
                    source,
                })
            }
        };
        if pairs.contains(&(L::affinity_service(&key), value.backend_id)) {
            affinities.push(key);
        }
    }
    let affinity_removed = affinities
        .iter()
        .filter(|key| affinity.remove(key).is_ok())
        .count();
    Ok((flows_removed, affinity_removed))
}

/// How many entries the affinity table holds (a walk; stops early once `keep_going`
/// says no).
pub fn count_affinities<L: CtLayout>(
    affinity: &AffinityTable<L>,
    keep_going: &dyn Fn() -> bool,
) -> usize {
    affinity.keys().take_while(|_| keep_going()).count()
}
