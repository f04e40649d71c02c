//! A least-recently-used map with a byte bound: what both tiers keep.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Entries by key, each with its size and the tick of its last use; the
/// oldest tick is evicted first.
#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    map: HashMap<K, (V, u64, u64)>,
    order: BTreeMap<u64, K>,
    bytes: u64,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub(crate) fn new() -> Self {
        Lru { map: HashMap::new(), order: BTreeMap::new(), bytes: 0, tick: 0 }
    }

    /// Bytes of all entries.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The value, marked as just used.
    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        self.tick += 1;
        let tick = self.tick;
        let (_, _, last) = self.map.get_mut(key)?;
        let old = std::mem::replace(last, tick);
        let k = self.order.remove(&old).expect("every entry has its tick");
        self.order.insert(tick, k);
        self.map.get(key).map(|(v, _, _)| v)
    }

    /// The value without marking it used.
    pub(crate) fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _, _)| v)
    }

    /// Inserts (replacing any entry of the key) as the most recently used.
    pub(crate) fn insert(&mut self, key: K, value: V, size: u64) {
        self.remove(&key);
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.map.insert(key, (value, size, self.tick));
        self.bytes += size;
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (v, size, tick) = self.map.remove(key)?;
        self.order.remove(&tick);
        self.bytes -= size;
        Some(v)
    }

    /// Removes and returns the least recently used entry.
    pub(crate) fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (v, size, _) = self.map.remove(&key).expect("every tick has its entry");
        self.bytes -= size;
        Some((key, v))
    }

    /// Evicts the least recently used entries until at most `bound` bytes
    /// remain; returns what was evicted.
    pub(crate) fn shrink_to(&mut self, bound: u64) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while self.bytes > bound {
            match self.pop_oldest() {
                Some(e) => out.push(e),
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first_under_the_byte_bound() {
        let mut lru = Lru::new();
        lru.insert("a", 1, 10);
        lru.insert("b", 2, 10);
        lru.insert("c", 3, 10);
        assert_eq!(lru.get(&"a"), Some(&1)); // a is now the newest
        let gone: Vec<_> = lru.shrink_to(20).into_iter().map(|(k, _)| k).collect();
        assert_eq!(gone, ["b"]);
        assert_eq!(lru.bytes(), 20);
        lru.insert("a", 4, 15); // replacing re-counts the size
        assert_eq!(lru.bytes(), 25);
        let gone: Vec<_> = lru.shrink_to(0).into_iter().map(|(k, _)| k).collect();
        assert_eq!(gone, ["c", "a"]);
        assert_eq!(lru.len(), 0);
    }
}
