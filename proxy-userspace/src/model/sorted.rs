//! Small sorted collections for the per-service indexes of the model and the syncer.

/// A small map as a vector sorted by key. The model and the syncer keep one per
/// service (its slices; its frontend entries), almost always of one entry, and a
/// `BTreeMap` of one entry allocates a whole node of eleven: 456 bytes for a slice
/// key and its `Arc`, 22 MiB at 50 000 services.
#[derive(Debug)]
pub(crate) struct SortedVec<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedVec<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> SortedVec<K, V> {
    pub(crate) fn find(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(held, _)| held.cmp(key))
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let at = self.find(key).ok()?;
        Some(&mut self.0[at].1)
    }

    /// Inserts or replaces the value of `key`; returns the one it replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, value)),
            Err(at) => {
                // Exactly the room needed: one slice per service is the rule.
                self.0.reserve_exact(1);
                self.0.insert(at, (key, value));
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let at = self.find(key).ok()?;
        let (_, value) = self.0.remove(at);
        if self.0.len() * 2 < self.0.capacity() {
            self.0.shrink_to_fit();
        }
        Some(value)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(key, value)| (key, value))
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(key, _)| key)
    }
}

impl<'a, K, V> IntoIterator for &'a SortedVec<K, V> {
    type Item = &'a K;
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> &'a K>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(key, _)| key)
    }
}

/// The map of groups of `entries` sorted by group, then key (unique): each group's
/// entries in a [`SortedVec`] with room for exactly those, the map built in one go
/// (its nodes full: inserting in key order leaves them about half full).
pub(crate) fn group_sorted<G: Ord, K: Ord, V>(
    entries: Vec<(G, K, V)>,
) -> std::collections::BTreeMap<G, SortedVec<K, V>> {
    let mut groups = Vec::new();
    let mut entries = entries.into_iter().peekable();
    while let Some((group, key, value)) = entries.next() {
        let mut run = vec![(key, value)];
        while let Some((_, key, value)) = entries.next_if(|(next, _, _)| *next == group) {
            run.push((key, value));
        }
        run.shrink_to_fit();
        groups.push((group, SortedVec(run)));
    }
    groups.into_iter().collect()
}

/// A small set as a sorted vector: a [`SortedVec`] of keys alone.
pub(crate) type SortedSet<T> = SortedVec<T, ()>;

impl<T: Ord> SortedVec<T, ()> {
    /// Adds `item`; returns whether it was new.
    pub(crate) fn insert_key(&mut self, item: T) -> bool {
        self.insert(item, ()).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_entries_sorted_and_unique() {
        let mut map = SortedVec::default();
        for (key, value) in [(3, "c"), (1, "a"), (2, "b"), (1, "A")] {
            map.insert(key, value);
        }
        assert_eq!(
            map.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(1, "A"), (2, "b"), (3, "c")]
        );
        assert_eq!(map.insert(2, "B"), Some("b"));
        assert_eq!(map.get_mut(&2).copied(), Some("B"));
        assert_eq!(map.remove(&1), Some("A"));
        assert_eq!(map.remove(&1), None);
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert!(!map.is_empty());
        map.remove(&2);
        map.remove(&3);
        assert!(map.is_empty());
    }

    #[test]
    fn groups_take_room_for_their_entries() {
        let entries = vec![(1, "a", 10), (1, "b", 11), (2, "a", 20), (5, "z", 50)];
        let groups = group_sorted(entries);
        let flat: Vec<(i32, &str, i32)> = groups
            .iter()
            .flat_map(|(group, entries)| entries.iter().map(|(k, v)| (*group, *k, *v)))
            .collect();
        assert_eq!(
            flat,
            [(1, "a", 10), (1, "b", 11), (2, "a", 20), (5, "z", 50)]
        );
        let room: Vec<usize> = groups
            .values()
            .map(|entries| entries.0.capacity())
            .collect();
        assert_eq!(room, [2, 1, 1]);
        assert!(group_sorted(Vec::<(u8, u8, u8)>::new()).is_empty());
    }

    #[test]
    fn one_entry_takes_room_for_one() {
        let mut map = SortedVec::default();
        map.insert("slice", 1u64);
        assert_eq!(map.0.capacity(), 1);
        let mut set = SortedSet::default();
        assert!(set.insert_key(7u32));
        assert!(!set.insert_key(7));
        assert!(set.insert_key(5));
        assert_eq!((&set).into_iter().copied().collect::<Vec<_>>(), [5, 7]);
    }
}
