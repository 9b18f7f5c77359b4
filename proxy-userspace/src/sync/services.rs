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
        (1..=count).map(move |slot| match entry.map_or(0, |entry| entry.slot(slot)) {
            0 if self.odd.is_empty() => None,
            0 => self
                .odd
                .get(&F::key_with_slot(&head_key, slot))
                .map(|value| value.backend_id),
            backend_id => Some(backend_id),
        })
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
                + entry.slots.iter().filter(|backend_id| **backend_id != 0).count()
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
