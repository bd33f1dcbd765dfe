//! A cache of decoded patches bounded in bytes: the one place that decides which patches stay in
//! memory when more exist than fit (the replay store's patches, the windows `train` reads on
//! demand from a folder larger than RAM).
//!
//! Least recently used patches leave first. The budget counts each patch's pixel values and band
//! names (what [`patch_bytes`] says); a patch larger than the whole budget is not kept. Patches
//! handed out stay valid after they leave the cache (they are shared, not copied).

use std::hash::Hash;
use std::sync::Arc;

use lru::LruCache;

use super::Patch;

/// Decoded patches by key, at most `budget` bytes of them.
#[derive(Debug)]
pub struct PatchCache<K: Hash + Eq> {
    entries: LruCache<K, Arc<Patch>>,
    bytes: usize,
    budget: usize,
}

impl<K: Hash + Eq> PatchCache<K> {
    /// An empty cache that holds at most `budget` bytes of patches.
    pub fn new(budget: usize) -> PatchCache<K> {
        PatchCache { entries: LruCache::unbounded(), bytes: 0, budget }
    }

    /// The patch under `key`, now the most recently used one.
    pub fn get(&mut self, key: &K) -> Option<Arc<Patch>> {
        self.entries.get(key).cloned()
    }

    /// Whether `key` is cached (does not change the order).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains(key)
    }

    /// Keep `patch` under `key` (replacing what was there), then drop least recently used patches
    /// until the cache is within its budget.
    pub fn insert(&mut self, key: K, patch: Arc<Patch>) {
        let size = patch_bytes(&patch);
        if size > self.budget {
            self.remove(&key);
            return;
        }
        if let Some(old) = self.entries.put(key, patch) {
            self.bytes -= patch_bytes(&old);
        }
        self.bytes += size;
        while self.bytes > self.budget {
            let Some((_, evicted)) = self.entries.pop_lru() else { break };
            self.bytes -= patch_bytes(&evicted);
        }
    }

    /// Forget the patch under `key`.
    pub fn remove(&mut self, key: &K) {
        if let Some(old) = self.entries.pop(key) {
            self.bytes -= patch_bytes(&old);
        }
    }

    /// Bytes held (never above the budget).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Patches held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a patch counts against a cache's budget: its values and band names.
pub fn patch_bytes(patch: &Patch) -> usize {
    let names: usize = patch.bands.iter().map(String::len).sum();
    patch.data.len() * std::mem::size_of::<f32>() + names
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::tile::Window;

    /// A one-band patch of `n` values.
    fn patch(n: usize) -> Arc<Patch> {
        Arc::new(Patch {
            data: vec![0.5; n],
            bands: vec!["B04".into()],
            height: 1,
            width: n,
            source: PathBuf::from("t.tif"),
            window: Window { x: 0, y: 0, width: n as u32, height: 1 },
            nodata_fraction: 0.0,
        })
    }

    #[test]
    fn least_recently_used_patches_leave_first_and_the_budget_holds() {
        let size = patch_bytes(&patch(10));
        let mut cache = PatchCache::new(3 * size);
        for key in 0..3 {
            cache.insert(key, patch(10));
        }
        assert!(cache.get(&0).is_some()); // 1 is now the least recently used
        cache.insert(3, patch(10));
        assert!(!cache.contains(&1));
        assert!(cache.contains(&0) && cache.contains(&2) && cache.contains(&3));
        assert_eq!(cache.bytes(), 3 * size);
        for key in 4..1000 {
            cache.insert(key, patch(10));
            assert!(cache.bytes() <= cache.budget());
        }
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn replacing_and_removing_keep_the_count_exact() {
        let mut cache = PatchCache::new(1000);
        cache.insert("a", patch(10));
        cache.insert("a", patch(20));
        assert_eq!(cache.bytes(), patch_bytes(&patch(20)));
        cache.remove(&"a");
        assert_eq!((cache.bytes(), cache.len()), (0, 0));
    }

    #[test]
    fn a_patch_larger_than_the_budget_is_not_kept() {
        let mut cache = PatchCache::new(patch_bytes(&patch(10)));
        cache.insert(1, patch(10));
        cache.insert(2, patch(11));
        assert!(cache.contains(&1) && !cache.contains(&2));
        assert!(cache.is_empty() || cache.bytes() <= cache.budget());
    }
}
