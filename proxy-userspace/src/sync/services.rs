//! The syncer's picture of one family's service map, one entry per frontend.
//!
//! The map itself keeps a key per slot: the frontend entry (slot 0: count, flags,
//! service id) and one per backend slot naming a backend id (50 000 frontends of 10
//! backends are 550 000 keys). Held the same way in a hash map, the picture took
//! 30 MiB at that size; here a frontend is one entry, its head value and its slots as a
//! vector of backend ids, and the slot keys are derived from the frontend's. The map
//! layout the datapath reads is unchanged.
//!
//! What the syncer writes always has that shape. What is read back from a map someone
//! else wrote may not (a slot whose value carries more than a backend id, or a backend
//! id of 0): such slots are kept as they are in a side map, so that equality,
//! [`ServiceEntries::differences`] and readback see exactly what the kernel holds.
use proxy_common::ServiceValueV4;

use crate::{family::Family, FastMap};

/// The value of a slot that names `backend_id`, as the syncer writes it.
fn slot_value(backend_id: u32) -> ServiceValueV4 {
    ServiceValueV4 {
        backend_id,
        ..ServiceValueV4::default()
    }
}

/// The backend id of a slot value of the usual shape (a nonzero backend id, every
/// other field zero); `None` for any other value.
fn plain_backend(value: &ServiceValueV4) -> Option<u32> {
    (value.backend_id != 0 && *value == slot_value(value.backend_id)).then_some(value.backend_id)
}

/// Slot `n` (`n >= 1`) is `slots[n - 1]`.
fn slot_index(slot: u16) -> usize {
    usize::from(slot) - 1
}

/// The slot number of `slots[index]` (a vector of slots never exceeds `u16::MAX`).
fn slot_number(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

/// One frontend's entries: its head (slot 0) and its slots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FrontendEntry {
    head: Option<ServiceValueV4>,
    /// The backend id of slot `i + 1` at `i`; 0 where the map holds no plain slot.
    /// Never ends in a 0, so two pictures of the same entries are equal.
    slots: Vec<u32>,
}

impl FrontendEntry {
    fn is_empty(&self) -> bool {
        self.head.is_none() && self.slots.is_empty()
    }

    /// The backend id of plain slot `slot` (>= 1), 0 if there is none.
    fn slot(&self, slot: u16) -> u32 {
        self.slots.get(slot_index(slot)).copied().unwrap_or(0)
    }

    /// Sets plain slot `slot` (>= 1) to `backend_id` (nonzero); returns the id it held
    /// (0: none).
    fn set_slot(&mut self, slot: u16, backend_id: u32) -> u32 {
        let index = slot_index(slot);
        if index >= self.slots.len() {
            self.slots.resize(index + 1, 0);
        }
        std::mem::replace(&mut self.slots[index], backend_id)
    }

    /// Clears plain slot `slot` (>= 1); returns the id it held (0: none).
    fn clear_slot(&mut self, slot: u16) -> u32 {
        let Some(held) = self.slots.get_mut(slot_index(slot)) else {
            return 0;
        };
        let old = std::mem::take(held);
        while self.slots.last() == Some(&0) {
            self.slots.pop();
        }
        // A frontend that shrank a lot gives its room back (one of 65 535 slots that
        // keeps 10 would hold 256 KiB).
        if self.slots.len() * 4 < self.slots.capacity() {
            self.slots.shrink_to_fit();
        }
        old
    }
}

/// The entries of one family's service map (see the module's notes), with the map's
/// own interface: keys and values of the map, whatever the layout inside.
#[derive(Clone, Debug)]
pub struct ServiceEntries<F: Family> {
    /// By the frontend's key (slot 0; padding as the map holds it).
    frontends: FastMap<F::ServiceKey, FrontendEntry>,
    /// Slot entries of another shape than a backend id alone. Empty unless read back
    /// from maps someone else wrote.
    odd: FastMap<F::ServiceKey, ServiceValueV4>,
    /// Entries of the map, as the kernel counts them.
    len: usize,
}

impl<F: Family> Default for ServiceEntries<F> {
    fn default() -> Self {
        Self {
            frontends: FastMap::default(),
            odd: FastMap::default(),
            len: 0,
        }
    }
}

impl<F: Family> PartialEq for ServiceEntries<F> {
    fn eq(&self, other: &Self) -> bool {
        // Each entry has one place, so equal entries are equal pictures.
        self.len == other.len && self.frontends == other.frontends && self.odd == other.odd
    }
}

impl<F: Family> Eq for ServiceEntries<F> {}

impl<F: Family> FromIterator<(F::ServiceKey, ServiceValueV4)> for ServiceEntries<F> {
    fn from_iter<I: IntoIterator<Item = (F::ServiceKey, ServiceValueV4)>>(entries: I) -> Self {
        let mut held = Self::default();
        for (key, value) in entries {
            held.insert(key, value);
        }
        held
    }
}

impl<F: Family> ServiceEntries<F> {
    /// How many entries the map holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many frontends (frontend entries, or slots without one) are held.
    #[must_use]
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Makes room for `frontends` more frontends at once: grown one by one, the last
    /// resize holds the old table and the new one together.
    pub fn reserve(&mut self, frontends: usize) {
        self.frontends.reserve(frontends);
    }

    /// Gives back the room slot vectors hold beyond their slots (after a readback,
    /// whose slots arrive in no order and grow their vectors step by step).
    pub fn shrink_to_fit(&mut self) {
        for entry in self.frontends.values_mut() {
            entry.slots.shrink_to_fit();
        }
        self.frontends.shrink_to_fit();
    }

    /// The value of `key`.
    #[must_use]
    pub fn get(&self, key: &F::ServiceKey) -> Option<ServiceValueV4> {
        let slot = F::key_slot(key);
        let entry = self.frontends.get(&F::key_with_slot(key, 0));
        if slot == 0 {
            return entry.and_then(|entry| entry.head);
        }
        match entry.map_or(0, |entry| entry.slot(slot)) {
            0 if self.odd.is_empty() => None,
            0 => self.odd.get(key).copied(),
            backend_id => Some(slot_value(backend_id)),
        }
    }

    #[must_use]
    pub fn contains_key(&self, key: &F::ServiceKey) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: F::ServiceKey, value: ServiceValueV4) -> Option<ServiceValueV4> {
        let slot = F::key_slot(&key);
        let head_key = F::key_with_slot(&key, 0);
        let old = if slot == 0 {
            let entry = self.frontends.entry(head_key).or_default();
            // The syncer writes a frontend's slots before its head: the vector they
            // grew is then as long as it gets (until the next change).
            if entry.slots.capacity() > entry.slots.len() {
                entry.slots.shrink_to_fit();
            }
            entry.head.replace(value)
        } else {
            let old_odd = if self.odd.is_empty() {
                None
            } else {
                self.odd.remove(&key)
            };
            let old_id = if let Some(backend_id) = plain_backend(&value) {
                self.frontends
                    .entry(head_key)
                    .or_default()
                    .set_slot(slot, backend_id)
            } else {
                self.odd.insert(key, value);
                self.clear_plain_slot(&head_key, slot)
            };
            // A key is in one place: at most one of them held it.
            old_odd.or((old_id != 0).then(|| slot_value(old_id)))
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`; returns the value it held.
    pub fn remove(&mut self, key: &F::ServiceKey) -> Option<ServiceValueV4> {
        let slot = F::key_slot(key);
        let head_key = F::key_with_slot(key, 0);
        let old = if slot == 0 {
            let entry = self.frontends.get_mut(&head_key)?;
            let old = entry.head.take();
            if entry.is_empty() {
                self.frontends.remove(&head_key);
            }
            old
        } else {
            match self.clear_plain_slot(&head_key, slot) {
                0 if self.odd.is_empty() => None,
                0 => self.odd.remove(key),
                backend_id => Some(slot_value(backend_id)),
            }
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Clears a plain slot, dropping the frontend's entry if it held nothing else;
    /// the backend id it held (0: none).
    fn clear_plain_slot(&mut self, head_key: &F::ServiceKey, slot: u16) -> u32 {
        let Some(entry) = self.frontends.get_mut(head_key) else {
            return 0;
        };
        let old = entry.clear_slot(slot);
        if entry.is_empty() {
            self.frontends.remove(head_key);
        }
        old
    }

    /// Every entry, as the map holds it (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (F::ServiceKey, ServiceValueV4)> + '_ {
        self.frontends
            .iter()
            .flat_map(|(head_key, entry)| {
                let head = entry.head.map(|head| (*head_key, head));
                let slots = entry
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, backend_id)| **backend_id != 0)
                    .map(|(index, backend_id)| {
                        (
                            F::key_with_slot(head_key, slot_number(index)),
                            slot_value(*backend_id),
                        )
                    });
                head.into_iter().chain(slots)
            })
            .chain(self.odd.iter().map(|(key, value)| (*key, *value)))
    }

    /// Every key the map holds.
    pub fn keys(&self) -> impl Iterator<Item = F::ServiceKey> + '_ {
        self.iter().map(|(key, _)| key)
    }

    /// The frontend entries (slot 0).
    pub fn heads(&self) -> impl Iterator<Item = (&F::ServiceKey, &ServiceValueV4)> {
        self.frontends
            .iter()
            .filter_map(|(key, entry)| entry.head.as_ref().map(|head| (key, head)))
    }

    /// The backend id of each slot `1..=count` of the frontend `head_key` (its key,
    /// slot 0): `None` where the map holds no such slot.
    pub fn slots(
        &self,
        head_key: &F::ServiceKey,
        count: u16,
    ) -> impl Iterator<Item = Option<u32>> + '_ {
        let entry = self.frontends.get(head_key);
        let head_key = *head_key;
        (1..=count).map(
            move |slot| match entry.map_or(0, |entry| entry.slot(slot)) {
                0 if self.odd.is_empty() => None,
                0 => self
                    .odd
                    .get(&F::key_with_slot(&head_key, slot))
                    .map(|value| value.backend_id),
                backend_id => Some(backend_id),
            },
        )
    }

    /// The slot entries no frontend count covers: slots above their frontend entry's
    /// count, and slots of no frontend entry. Sorted.
    #[must_use]
    pub fn orphan_slots(&self) -> Vec<F::ServiceKey> {
        let count_of = |head_key: &F::ServiceKey| {
            self.frontends
                .get(head_key)
                .and_then(|entry| entry.head)
                .map_or(0, |head| head.count)
        };
        let mut orphans: Vec<F::ServiceKey> = self
            .frontends
            .iter()
            .filter(|(_, entry)| {
                entry.slots.len() > usize::from(entry.head.map_or(0, |head| head.count))
            })
            .flat_map(|(head_key, entry)| {
                let count = usize::from(entry.head.map_or(0, |head| head.count));
                entry
                    .slots
                    .iter()
                    .enumerate()
                    .skip(count)
                    .filter(|(_, backend_id)| **backend_id != 0)
                    .map(|(index, _)| F::key_with_slot(head_key, slot_number(index)))
            })
            .chain(
                self.odd
                    .keys()
                    .filter(|key| F::key_slot(key) > count_of(&F::key_with_slot(key, 0)))
                    .copied(),
            )
            .collect();
        orphans.sort_unstable();
        orphans
    }

    /// How many entries differ between `self` and `other` (held by one only, or with
    /// another value).
    #[must_use]
    pub fn differences(&self, other: &Self) -> usize {
        if !self.odd.is_empty() || !other.odd.is_empty() {
            // A slot can be plain on one side and odd on the other: key by key.
            return self
                .iter()
                .filter(|(key, value)| other.get(key) != Some(*value))
                .count()
                + other.keys().filter(|key| !self.contains_key(key)).count();
        }
        let empty = FrontendEntry::default();
        let held = |entry: &FrontendEntry| {
            usize::from(entry.head.is_some())
                + entry
                    .slots
                    .iter()
                    .filter(|backend_id| **backend_id != 0)
                    .count()
        };
        let mut differ = 0;
        for (key, mine) in &self.frontends {
            let theirs = other.frontends.get(key).unwrap_or(&empty);
            differ += usize::from(mine.head != theirs.head);
            let longest = mine.slots.len().max(theirs.slots.len());
            // 0 and past the end both mean no slot.
            let slot = |slots: &[u32], index: usize| slots.get(index).copied().unwrap_or(0);
            differ += (0..longest)
                .filter(|index| slot(&mine.slots, *index) != slot(&theirs.slots, *index))
                .count();
        }
        differ
            + other
                .frontends
                .iter()
                .filter(|(key, _)| !self.frontends.contains_key(*key))
                .map(|(_, entry)| held(entry))
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    //! Each row applies puts and deletes to [`ServiceEntries`] and to a plain map of
    //! the same keys (what the kernel holds, one entry per key), and checks after
    //! every step that the two agree on everything the syncer asks.
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::Ipv4Addr,
    };

    use proxy_common::{Be16, Be32, ServiceKeyV4};

    use super::*;

    type Entries = ServiceEntries<Ipv4Addr>;

    /// Frontend `f` (10.96.0.f:80/TCP), slot `slot`.
    fn key(frontend: u8, slot: u16) -> ServiceKeyV4 {
        ServiceKeyV4 {
            addr: Be32::from_ipv4(Ipv4Addr::new(10, 96, 0, frontend)),
            port: Be16::from_host(80),
            slot,
            proto: 6,
            scope: 0,
            _pad: [0; 2],
        }
    }

    fn head(count: u16) -> ServiceValueV4 {
        ServiceValueV4 {
            service_id: 7,
            count,
            ..ServiceValueV4::default()
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Step {
        Put(ServiceKeyV4, ServiceValueV4),
        Delete(ServiceKeyV4),
    }
    use Step::{Delete, Put};

    fn put_head(frontend: u8, count: u16) -> Step {
        Put(key(frontend, 0), head(count))
    }

    fn put_slot(frontend: u8, slot: u16, backend_id: u32) -> Step {
        Put(key(frontend, slot), slot_value(backend_id))
    }

    fn delete(frontend: u8, slot: u16) -> Step {
        Delete(key(frontend, slot))
    }

    /// A slot value read back from a map someone else wrote: more than a backend id.
    fn odd(backend_id: u32) -> ServiceValueV4 {
        ServiceValueV4 {
            backend_id,
            service_id: 99,
            ..ServiceValueV4::default()
        }
    }

    type Reference = BTreeMap<ServiceKeyV4, ServiceValueV4>;

    /// Every way `entries` must agree with `reference`; the problems found.
    fn disagreements(entries: &Entries, reference: &Reference) -> Vec<String> {
        let mut problems = Vec::new();
        if entries.len() != reference.len() {
            problems.push(format!("len {} != {}", entries.len(), reference.len()));
        }
        let iterated: Reference = entries.iter().collect();
        if entries.iter().count() != iterated.len() {
            problems.push("iter yields a key twice".to_owned());
        }
        if &iterated != reference {
            problems.push(format!("iter {iterated:?} != {reference:?}"));
        }
        // Every key of the reference, and the neighbours of each (absent ones).
        let probes: BTreeSet<ServiceKeyV4> = reference
            .keys()
            .flat_map(|key| {
                [0, 1, 2, key.slot.saturating_add(1)]
                    .map(|slot| ServiceKeyV4 { slot, ..*key })
                    .into_iter()
                    .chain([*key])
            })
            .collect();
        for probe in &probes {
            if entries.get(probe) != reference.get(probe).copied() {
                problems.push(format!(
                    "get {probe:?}: {:?} != {:?}",
                    entries.get(probe),
                    reference.get(probe)
                ));
            }
        }
        let heads: Reference = entries.heads().map(|(k, v)| (*k, *v)).collect();
        let want_heads: Reference = reference
            .iter()
            .filter(|(key, _)| key.slot == 0)
            .map(|(k, v)| (*k, *v))
            .collect();
        if heads != want_heads {
            problems.push(format!("heads {heads:?} != {want_heads:?}"));
        }
        for (head_key, value) in &want_heads {
            let slots: Vec<Option<u32>> = entries.slots(head_key, value.count).collect();
            let want: Vec<Option<u32>> = (1..=value.count)
                .map(|slot| {
                    reference
                        .get(&ServiceKeyV4 { slot, ..*head_key })
                        .map(|value| value.backend_id)
                })
                .collect();
            if slots != want {
                problems.push(format!("slots of {head_key:?}: {slots:?} != {want:?}"));
            }
        }
        let orphans: Vec<ServiceKeyV4> = reference
            .keys()
            .filter(|key| key.slot != 0)
            .filter(|key| {
                reference
                    .get(&ServiceKeyV4 { slot: 0, ..**key })
                    .is_none_or(|head| key.slot > head.count)
            })
            .copied()
            .collect();
        if entries.orphan_slots() != orphans {
            problems.push(format!(
                "orphans {:?} != {orphans:?}",
                entries.orphan_slots()
            ));
        }
        // Built again from the map's entries, in another order: the same picture.
        let rebuilt: Entries = reference.iter().rev().map(|(k, v)| (*k, *v)).collect();
        if &rebuilt != entries {
            problems.push("not equal to the same entries inserted in another order".into());
        }
        if entries.differences(&rebuilt) != 0 || rebuilt.differences(entries) != 0 {
            problems.push("differences from an equal picture".into());
        }
        problems
    }

    struct Row {
        name: &'static str,
        steps: Vec<Step>,
        /// How many frontends (map keys ignoring the slot) are held at the end.
        frontends: usize,
    }

    fn rows() -> Vec<Row> {
        vec![
            Row {
                name: "a frontend written as the syncer does: slots, then its entry",
                steps: vec![put_slot(1, 1, 11), put_slot(1, 2, 12), put_head(1, 2)],
                frontends: 1,
            },
            Row {
                name: "grow: slots 3 and 4 added, the count raised",
                steps: vec![
                    put_slot(1, 1, 11),
                    put_head(1, 1),
                    put_slot(1, 2, 12),
                    put_slot(1, 3, 13),
                    put_head(1, 3),
                ],
                frontends: 1,
            },
            Row {
                name: "shrink: the count lowered, then the slots above it deleted",
                steps: vec![
                    put_slot(1, 1, 11),
                    put_slot(1, 2, 12),
                    put_slot(1, 3, 13),
                    put_slot(1, 4, 14),
                    put_head(1, 4),
                    put_head(1, 1),
                    delete(1, 2),
                    delete(1, 3),
                    delete(1, 4),
                ],
                frontends: 1,
            },
            Row {
                name: "shrink in the middle: a hole, then the last slot",
                steps: vec![
                    put_slot(1, 1, 11),
                    put_slot(1, 2, 12),
                    put_slot(1, 3, 13),
                    put_head(1, 3),
                    delete(1, 2),
                    delete(1, 3),
                    put_slot(1, 2, 13),
                ],
                frontends: 1,
            },
            Row {
                name: "a slot rewritten to another backend",
                steps: vec![put_slot(1, 1, 11), put_head(1, 1), put_slot(1, 1, 12)],
                frontends: 1,
            },
            Row {
                name: "removed: its entry first, then its slots; nothing left",
                steps: vec![
                    put_slot(1, 1, 11),
                    put_slot(1, 2, 12),
                    put_head(1, 2),
                    delete(1, 0),
                    delete(1, 1),
                    delete(1, 2),
                ],
                frontends: 0,
            },
            Row {
                name: "read back: a slot of another shape, then written plainly, then deleted",
                steps: vec![
                    put_head(1, 2),
                    put_slot(1, 1, 11),
                    Put(key(1, 2), odd(12)),
                    put_slot(1, 2, 12),
                    Put(key(1, 2), odd(13)),
                    delete(1, 2),
                ],
                frontends: 1,
            },
            Row {
                name: "read back: a slot naming backend 0 (no backend has it)",
                steps: vec![put_head(1, 1), Put(key(1, 1), slot_value(0))],
                frontends: 1,
            },
            Row {
                name: "read back: a slot value with a count, in a frontend's last slot",
                steps: vec![
                    put_slot(1, 1, 11),
                    Put(
                        key(1, 2),
                        ServiceValueV4 {
                            count: 3,
                            ..slot_value(12)
                        },
                    ),
                    put_head(1, 2),
                ],
                frontends: 1,
            },
            Row {
                name: "read back: orphans, slots of no frontend entry and above a count",
                steps: vec![
                    put_slot(2, 1, 21),
                    put_slot(2, 3, 23),
                    Put(key(2, 4), odd(24)),
                    put_head(3, 1),
                    put_slot(3, 1, 31),
                    put_slot(3, 2, 32),
                    Put(key(3, 5), odd(35)),
                ],
                frontends: 2,
            },
            Row {
                name: "read back: a key with padding set is another frontend",
                steps: vec![
                    put_head(1, 1),
                    put_slot(1, 1, 11),
                    Put(
                        ServiceKeyV4 {
                            _pad: [1, 0],
                            ..key(1, 1)
                        },
                        slot_value(12),
                    ),
                ],
                frontends: 2,
            },
            Row {
                name: "the top slot number",
                steps: vec![
                    put_slot(1, u16::MAX, 11),
                    put_head(1, u16::MAX),
                    delete(1, u16::MAX),
                ],
                frontends: 1,
            },
            Row {
                name: "deleting what is not held changes nothing",
                steps: vec![delete(1, 0), delete(1, 3), put_head(1, 0), delete(1, 1)],
                frontends: 1,
            },
        ]
    }

    #[test]
    fn service_entries_hold_what_the_map_holds() {
        let mut failures = Vec::new();
        for row in rows() {
            let mut entries = Entries::default();
            let mut reference = Reference::new();
            for (at, step) in row.steps.iter().enumerate() {
                let (held, want) = match *step {
                    Put(key, value) => (entries.insert(key, value), reference.insert(key, value)),
                    Delete(key) => (entries.remove(&key), reference.remove(&key)),
                };
                if held != want {
                    failures.push(format!(
                        "{}: step {at} {step:?} returned {held:?}, want {want:?}",
                        row.name
                    ));
                }
                for problem in disagreements(&entries, &reference) {
                    failures.push(format!("{}: after step {at} {step:?}: {problem}", row.name));
                }
            }
            if entries.frontend_count() != row.frontends {
                failures.push(format!(
                    "{}: {} frontends held, want {}",
                    row.name,
                    entries.frontend_count(),
                    row.frontends
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn differences_count_entries_as_the_map_holds_them() {
        let plain = || vec![put_slot(1, 1, 11), put_slot(1, 2, 12), put_head(1, 2)];
        let with = |extra: &[Step]| {
            let mut steps = plain();
            steps.extend_from_slice(extra);
            steps
        };
        // (name, one side, other side, entries that differ)
        let rows: Vec<(&str, Vec<Step>, Vec<Step>, usize)> = vec![
            ("the same", plain(), plain(), 0),
            (
                "a slot names another backend",
                plain(),
                with(&[put_slot(1, 2, 13)]),
                1,
            ),
            (
                "the frontend entry deleted",
                plain(),
                with(&[delete(1, 0)]),
                1,
            ),
            ("the count changed", plain(), with(&[put_head(1, 1)]), 1),
            (
                "a slot above the count",
                plain(),
                with(&[put_slot(1, 3, 13)]),
                1,
            ),
            ("a hole", plain(), with(&[delete(1, 1)]), 1),
            (
                "the same slot of another shape",
                plain(),
                with(&[Put(key(1, 2), odd(12))]),
                1,
            ),
            (
                "a second frontend",
                plain(),
                with(&[put_slot(2, 1, 21), put_head(2, 1)]),
                2,
            ),
            ("everything gone", plain(), vec![], 3),
            (
                "odd on both sides, equal",
                with(&[Put(key(1, 3), odd(13))]),
                with(&[Put(key(1, 3), odd(13))]),
                0,
            ),
        ];
        let build = |steps: &[Step]| {
            let mut entries = Entries::default();
            let mut reference = Reference::new();
            for step in steps {
                match *step {
                    Put(key, value) => {
                        entries.insert(key, value);
                        reference.insert(key, value);
                    }
                    Delete(key) => {
                        entries.remove(&key);
                        reference.remove(&key);
                    }
                }
            }
            (entries, reference)
        };
        let mut failures = Vec::new();
        for (name, one, other, want) in rows {
            let ((a, ref_a), (b, ref_b)) = (build(&one), build(&other));
            let by_key = ref_a
                .iter()
                .filter(|(key, value)| ref_b.get(*key) != Some(*value))
                .count()
                + ref_b.keys().filter(|key| !ref_a.contains_key(*key)).count();
            for (direction, got) in [("a-b", a.differences(&b)), ("b-a", b.differences(&a))] {
                if got != want || by_key != want {
                    failures.push(format!(
                        "{name} ({direction}): {got} differ, key by key {by_key}, want {want}"
                    ));
                }
            }
            if (a == b) != (want == 0) {
                failures.push(format!("{name}: equality disagrees with differences"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_shrunk_frontend_gives_its_room_back() {
        let mut entries = Entries::default();
        for slot in 1..=1000 {
            entries.insert(key(1, slot), slot_value(u32::from(slot)));
        }
        entries.insert(key(1, 0), head(1000));
        entries.insert(key(1, 0), head(10));
        for slot in 11..=1000 {
            entries.remove(&key(1, slot));
        }
        let entry = &entries.frontends[&key(1, 0)];
        assert_eq!(entry.slots.len(), 10);
        assert!(entry.slots.capacity() < 40, "{}", entry.slots.capacity());
        // Written as the syncer writes a frontend, the vector holds its slots exactly.
        let mut entries = Entries::default();
        for slot in 1..=10 {
            entries.insert(key(2, slot), slot_value(u32::from(slot)));
        }
        entries.insert(key(2, 0), head(10));
        assert_eq!(entries.frontends[&key(2, 0)].slots.capacity(), 10);
    }
}
