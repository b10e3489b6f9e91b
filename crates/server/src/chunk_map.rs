//! `ChunkMap`: an ordered map of small `Copy` keys and values kept in
//! sorted chunks of up to `CHUNK` entries, for the owner's route tables and
//! a peer's large announcements (`route_set::RouteKeySet`, with `()` values:
//! a zero-sized value takes no storage).
//!
//! Why not `BTreeMap`: its leaves hold 11 entries and a leaf split leaves
//! both halves about half full, which is what ascending inserts (a peer
//! announcing its routes in order, the common case) leave everywhere: a
//! 9-byte key with an 8-byte value cost ~35 bytes per route. Here a full
//! chunk that gets a key past its end starts a new chunk instead of
//! splitting, so ascending inserts fill chunks completely (~18 bytes per
//! route), and other inserts split a chunk in halves as a B-tree would.
//! Keys and values are stored in two arrays, so a 9-byte key next to an
//! 8-byte value wastes no padding.
//!
//! Layout: `chunks` maps an index key to each chunk. Invariant: every key
//! in a chunk is ≥ its index key and < the next chunk's index key; keys in
//! a chunk are sorted and unique. A chunk's index key need not be its
//! first key (removing the first key leaves the index key alone), which
//! keeps removals to one step in the chunk.
//!
//! Must never: know what the keys mean; the table maps routes onto it.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Entries a chunk holds at most.
const CHUNK: usize = 64;
/// Most entries two neighbouring chunks may hold to be merged into one
/// (after removals, or a `retain`): room is left for inserts, so a merged
/// chunk does not split again at once.
const MERGED_AT_MOST: usize = CHUNK * 3 / 4;

/// Sorted keys and their values, `keys[i]` ↦ `vals[i]`.
#[derive(Debug, Clone, Default)]
struct Chunk<K, V> {
    /// Sorted, unique.
    keys: Vec<K>,
    /// Same length as `keys`.
    vals: Vec<V>,
}

impl<K: Ord + Copy, V: Copy> Chunk<K, V> {
    fn one(key: K, val: V) -> Chunk<K, V> {
        Chunk {
            keys: vec![key],
            vals: vec![val],
        }
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn insert_at(&mut self, i: usize, key: K, val: V) {
        self.keys.insert(i, key);
        self.vals.insert(i, val);
    }

    /// Gives back storage once the chunk holds a quarter of it (after
    /// removals), so a table that shrinks shrinks in memory too.
    fn trim(&mut self) {
        if self.keys.capacity() >= 8 && self.keys.len() <= self.keys.capacity() / 4 {
            self.keys.shrink_to(self.keys.len() * 2);
            self.vals.shrink_to(self.vals.len() * 2);
        }
    }
}

/// An ordered map from `K` to `V` in sorted chunks (see the module doc).
#[derive(Debug, Clone)]
pub struct ChunkMap<K, V> {
    /// Chunks by index key.
    chunks: BTreeMap<K, Chunk<K, V>>,
    /// Entries in all chunks.
    len: usize,
}

impl<K, V> Default for ChunkMap<K, V> {
    fn default() -> Self {
        ChunkMap {
            chunks: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Copy, V: Copy> ChunkMap<K, V> {
    /// Entries in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        let chunk = self.chunks.range(..=key).next_back()?.1;
        let i = chunk.keys.binary_search(key).ok()?;
        chunk.vals.get(i)
    }

    /// The value of `key`, to change it.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let chunk = self.chunks.range_mut(..=key).next_back()?.1;
        let i = chunk.keys.binary_search(key).ok()?;
        chunk.vals.get_mut(i)
    }

    /// Inserts `key` ↦ `val` if `key` is absent; if it is present, leaves
    /// the map as it is and returns the value it has.
    pub fn insert_new(&mut self, key: K, val: V) -> Result<(), V> {
        let Some((_, chunk)) = self.chunks.range_mut(..=key).next_back() else {
            return self.insert_below_all(key, val);
        };
        let i = match chunk.keys.binary_search(&key) {
            Ok(i) => return Err(chunk.vals[i]),
            Err(i) => i,
        };
        if chunk.len() < CHUNK {
            chunk.insert_at(i, key, val);
        } else if i == CHUNK {
            // Past the end of a full chunk (ascending inserts): a new chunk,
            // leaving this one full, sized for the inserts that follow.
            let mut next = Chunk {
                keys: Vec::with_capacity(CHUNK),
                vals: Vec::with_capacity(CHUNK),
            };
            next.insert_at(0, key, val);
            self.chunks.insert(key, next);
        } else {
            let upper = Chunk {
                keys: chunk.keys.split_off(CHUNK / 2),
                vals: chunk.vals.split_off(CHUNK / 2),
            };
            let upper_index = upper.keys[0];
            if i <= CHUNK / 2 {
                chunk.insert_at(i, key, val);
                self.chunks.insert(upper_index, upper);
            } else {
                let mut upper = upper;
                upper.insert_at(i - CHUNK / 2, key, val);
                self.chunks.insert(upper_index, upper);
            }
        }
        self.len += 1;
        Ok(())
    }

    /// `key` is below every index key: it goes first in the first chunk
    /// (which is re-indexed by it), or into a new first chunk if that one
    /// is full.
    fn insert_below_all(&mut self, key: K, val: V) -> Result<(), V> {
        match self.chunks.pop_first() {
            Some((_, mut first)) if first.len() < CHUNK => {
                first.insert_at(0, key, val);
                self.chunks.insert(key, first);
            }
            Some((index, first)) => {
                self.chunks.insert(index, first);
                self.chunks.insert(key, Chunk::one(key, val));
            }
            None => {
                self.chunks.insert(key, Chunk::one(key, val));
            }
        }
        self.len += 1;
        Ok(())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (&index, chunk) = self.chunks.range_mut(..=key).next_back()?;
        let i = chunk.keys.binary_search(key).ok()?;
        chunk.keys.remove(i);
        let val = chunk.vals.remove(i);
        self.len -= 1;
        let remaining = chunk.len();
        if remaining > 0 && remaining < CHUNK / 4 {
            chunk.trim();
        }
        if remaining == 0 {
            self.chunks.remove(&index);
        } else if remaining == CHUNK / 4 {
            // Once, as the chunk gets small (not on every removal after).
            self.merge_next_into(index);
        }
        Some(val)
    }

    /// The chunk at `index` became small: it takes in the next chunk if
    /// both fit in `MERGED_AT_MOST`, else gives back spare storage.
    fn merge_next_into(&mut self, index: K) {
        let next = self
            .chunks
            .range((Bound::Excluded(index), Bound::Unbounded))
            .next()
            .map(|(k, c)| (*k, c.len()));
        let len = self.chunks.get(&index).map_or(0, Chunk::len);
        match next {
            Some((next_index, next_len)) if len + next_len <= MERGED_AT_MOST => {
                if let Some(next) = self.chunks.remove(&next_index) {
                    if let Some(chunk) = self.chunks.get_mut(&index) {
                        chunk.keys.extend_from_slice(&next.keys);
                        chunk.vals.extend_from_slice(&next.vals);
                    }
                }
            }
            _ => {
                if let Some(chunk) = self.chunks.get_mut(&index) {
                    chunk.trim();
                }
            }
        }
    }

    /// Keeps the entries for which `keep` holds, in key order. Chunks left
    /// empty are dropped and thinned neighbours merged (while two fit in
    /// `MERGED_AT_MOST`), so a map that kept a few of many entries
    /// does not hold them one to a chunk.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let mut kept_chunks: Vec<(K, Chunk<K, V>)> = Vec::new();
        for (index, mut chunk) in std::mem::take(&mut self.chunks) {
            let mut kept = 0;
            for i in 0..chunk.keys.len() {
                if keep(&chunk.keys[i], &chunk.vals[i]) {
                    chunk.keys[kept] = chunk.keys[i];
                    chunk.vals[kept] = chunk.vals[i];
                    kept += 1;
                }
            }
            chunk.keys.truncate(kept);
            chunk.vals.truncate(kept);
            match kept_chunks.last_mut() {
                _ if kept == 0 => {}
                // Every key here is above the previous chunk's keys and
                // below the next index key: appended, the order holds.
                Some((_, previous)) if previous.len() + kept <= MERGED_AT_MOST => {
                    previous.keys.extend_from_slice(&chunk.keys);
                    previous.vals.extend_from_slice(&chunk.vals);
                }
                _ => kept_chunks.push((index, chunk)),
            }
        }
        for (_, chunk) in &mut kept_chunks {
            chunk.trim();
        }
        self.len = kept_chunks.iter().map(|(_, c)| c.len()).sum();
        self.chunks = kept_chunks.into_iter().collect();
    }

    /// Changes every value in place (keys and order stay).
    pub fn for_each_value_mut(&mut self, mut f: impl FnMut(&mut V)) {
        for chunk in self.chunks.values_mut() {
            chunk.vals.iter_mut().for_each(&mut f);
        }
    }

    /// Entries from `from` on (after the key for `Excluded`, from it for
    /// `Included`, all for `Unbounded`), in key order.
    pub fn range_from(&self, from: Bound<K>) -> impl Iterator<Item = (K, V)> + '_ {
        // The chunk the first wanted key would live in, and where in it.
        let (start, skip) = match from {
            Bound::Unbounded => (None, 0),
            Bound::Included(k) | Bound::Excluded(k) => match self.chunks.range(..=k).next_back() {
                None => (None, 0),
                Some((index, chunk)) => {
                    let skip = match from {
                        Bound::Excluded(_) => chunk.keys.partition_point(|x| *x <= k),
                        _ => chunk.keys.partition_point(|x| *x < k),
                    };
                    (Some(*index), skip)
                }
            },
        };
        let rest = match start {
            None => self.chunks.range(..),
            Some(index) => self.chunks.range(index..),
        };
        rest.enumerate().flat_map(move |(n, (_, chunk))| {
            let from = if n == 0 { skip } else { 0 };
            chunk.keys[from..]
                .iter()
                .copied()
                .zip(chunk.vals[from..].iter().copied())
        })
    }
}

/// The entries of a `ChunkMap`, consumed in key order; each chunk's storage
/// is freed as soon as its entries are taken.
pub struct ChunkMapIntoIter<K, V> {
    /// Chunks not yet started.
    chunks: std::collections::btree_map::IntoValues<K, Chunk<K, V>>,
    /// The keys and values of the chunk being taken.
    current: std::iter::Zip<std::vec::IntoIter<K>, std::vec::IntoIter<V>>,
}

impl<K, V> Iterator for ChunkMapIntoIter<K, V> {
    type Item = (K, V);

    fn next(&mut self) -> Option<(K, V)> {
        loop {
            if let Some(entry) = self.current.next() {
                return Some(entry);
            }
            let chunk = self.chunks.next()?;
            self.current = chunk.keys.into_iter().zip(chunk.vals);
        }
    }
}

impl<K, V> IntoIterator for ChunkMap<K, V> {
    type Item = (K, V);
    type IntoIter = ChunkMapIntoIter<K, V>;

    fn into_iter(self) -> ChunkMapIntoIter<K, V> {
        ChunkMapIntoIter {
            chunks: self.chunks.into_values(),
            current: Vec::new().into_iter().zip(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) for scattered keys.
    fn scattered(n: usize, seed: u64) -> Vec<u32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 50_000) as u32
            })
            .collect()
    }

    fn check_invariants(m: &ChunkMap<u32, u64>) {
        let mut prev: Option<u32> = None;
        let mut total = 0;
        let indexes: Vec<u32> = m.chunks.keys().copied().collect();
        for (n, (index, chunk)) in m.chunks.iter().enumerate() {
            assert!(!chunk.keys.is_empty(), "empty chunk kept");
            assert!(chunk.len() <= CHUNK);
            assert_eq!(chunk.keys.len(), chunk.vals.len());
            assert!(chunk.keys[0] >= *index);
            if let Some(next) = indexes.get(n + 1) {
                assert!(chunk.keys[chunk.len() - 1] < *next);
            }
            for k in &chunk.keys {
                assert!(prev.is_none_or(|p| p < *k), "keys out of order");
                prev = Some(*k);
            }
            total += chunk.len();
        }
        assert_eq!(total, m.len());
    }

    /// Every operation against `BTreeMap` as the reference, with ascending,
    /// descending and scattered keys, inserts and removals interleaved.
    #[test]
    fn behaves_like_an_ordered_map() {
        let mut m: ChunkMap<u32, u64> = ChunkMap::default();
        let mut reference: BTreeMap<u32, u64> = BTreeMap::new();
        let ascending = (0..2_000u32).map(|k| k * 3 + 100_000);
        let descending = (0..2_000u32).rev().map(|k| k * 3 + 200_000);
        let keys: Vec<u32> = ascending
            .chain(descending)
            .chain(scattered(20_000, 0x9e37_79b9))
            .collect();
        for (n, &k) in keys.iter().enumerate() {
            let expect = match reference.get(&k) {
                Some(v) => Err(*v),
                None => {
                    reference.insert(k, n as u64);
                    Ok(())
                }
            };
            assert_eq!(m.insert_new(k, n as u64), expect, "insert {k}");
            if n % 3 == 0 {
                let gone = keys[n / 2];
                assert_eq!(m.remove(&gone), reference.remove(&gone), "remove {gone}");
            }
            if n % 997 == 0 {
                check_invariants(&m);
            }
        }
        check_invariants(&m);
        assert_eq!(m.len(), reference.len());
        assert!(m
            .range_from(Bound::Unbounded)
            .eq(reference.iter().map(|(k, v)| (*k, *v))));
        for probe in scattered(2_000, 7).into_iter().chain([0, 99_999, 300_000]) {
            assert_eq!(m.get(&probe), reference.get(&probe));
            let after: Vec<(u32, u64)> = m.range_from(Bound::Excluded(probe)).take(5).collect();
            let expect: Vec<(u32, u64)> = reference
                .range((Bound::Excluded(probe), Bound::Unbounded))
                .take(5)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert_eq!(after, expect, "after {probe}");
            let from: Vec<(u32, u64)> = m.range_from(Bound::Included(probe)).take(3).collect();
            let expect: Vec<(u32, u64)> = reference
                .range(probe..)
                .take(3)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert_eq!(from, expect, "from {probe}");
        }
        if let Some(v) = m.get_mut(&keys[1]) {
            *v = 7;
        }
        assert_eq!(m.get(&keys[1]).copied(), reference.get(&keys[1]).map(|_| 7));
        // Everything out again: no chunk is left behind.
        for k in reference.keys().copied().collect::<Vec<_>>() {
            assert!(m.remove(&k).is_some());
        }
        assert_eq!(m.len(), 0);
        assert!(m.chunks.is_empty());
    }

    /// `retain` and consuming iteration keep the order and the invariants.
    #[test]
    fn retain_and_into_iter_agree_with_an_ordered_map() {
        let mut m: ChunkMap<u32, u64> = ChunkMap::default();
        let mut reference: BTreeMap<u32, u64> = BTreeMap::new();
        for (n, k) in scattered(10_000, 42).into_iter().enumerate() {
            if m.insert_new(k, n as u64).is_ok() {
                reference.insert(k, n as u64);
            }
        }
        m.retain(|k, v| k % 3 != 0 && v % 2 == 0);
        reference.retain(|k, v| k % 3 != 0 && *v % 2 == 0);
        check_invariants(&m);
        assert_eq!(m.len(), reference.len());
        m.retain(|k, _| *k < 1_000);
        reference.retain(|k, _| *k < 1_000);
        check_invariants(&m);
        // Any two neighbours hold more than MERGED_AT_MOST between them.
        assert!(
            m.chunks.len() <= m.len() / (MERGED_AT_MOST / 2) + 1,
            "thinned chunks merged: {} chunks for {} keys",
            m.chunks.len(),
            m.len()
        );
        assert!(m.into_iter().eq(reference.into_iter()));
        let empty: ChunkMap<u32, u64> = ChunkMap::default();
        assert_eq!(empty.into_iter().count(), 0);
    }

    /// Ascending inserts fill chunks completely: what makes this map
    /// smaller than a `BTreeMap` for the usual announcement order.
    #[test]
    fn ascending_inserts_fill_chunks() {
        let mut m: ChunkMap<u32, u64> = ChunkMap::default();
        for k in 0..CHUNK as u32 * 100 {
            assert_eq!(m.insert_new(k, 0), Ok(()));
        }
        assert_eq!(m.chunks.len(), 100);
        assert!(m.chunks.values().all(|c| c.len() == CHUNK));
        check_invariants(&m);
    }
}
