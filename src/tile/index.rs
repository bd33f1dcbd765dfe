//! An index of the usable patches of many inputs, and reading them back on demand: what lets
//! `train` walk a folder far larger than memory.
//!
//! [`PatchIndex::build`] makes one streaming pass over the inputs (the nodata filter needs the
//! pixels) and keeps, per usable patch, only its input number and window (20 bytes), plus each
//! input once. Entries come in the order [`read_patches`](super::read_patches) gives the patches,
//! input after input: entry `i` is the `i`-th patch of reading every input in full.
//!
//! [`IndexedPatches::get`] hands out entry `i`: from its [`PatchCache`] when there, else decoded
//! from the input (for strip and tile TIFFs, only the strips or tiles covering the patch's rows).
//! A miss decodes the patch's whole row band, so when the cache holds at least half of the folder
//! every indexed window of that row is kept too (if the row takes at most [`ROW_SHARE`] of the
//! cache): a folder that fits is decoded once. With a smaller share a shuffled walk rarely comes
//! back to a sibling before it leaves the cache, and cutting them all costs more than it saves
//! (three times slower per CPU second on a scene of overlapping windows holding 2.3 times the
//! cache, BENCHMARKS.md), so then one window is cut per miss. The input read last stays open: a
//! large scene's header and chunk table are read once, not once per patch.

use std::ops::{ControlFlow, Range};
use std::sync::Arc;

use super::cut::{RowSource, cut_row};
use super::{Input, Patch, PatchCache, TileError, Window, for_each_patch, open_source};
use crate::config::TileConfig;

/// A whole patch row goes into the cache only when it takes at most this share (1/4) of the
/// budget, so that one row never flushes most of the cache.
pub const ROW_SHARE: usize = 4;

/// Whole rows are kept only when the cache holds at least this share (1/2) of the folder.
pub const FOLDER_SHARE: usize = 2;

/// One usable patch: which input, which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Position of the input in [`PatchIndex::inputs`].
    pub input: u32,
    /// The patch's window in that input.
    pub window: Window,
}

/// The usable patches of a list of inputs, without their pixels.
#[derive(Debug, Clone, Default)]
pub struct PatchIndex {
    inputs: Vec<Input>,
    entries: Vec<IndexEntry>,
}

impl PatchIndex {
    /// Index every usable patch of `inputs` (one pass, one patch in memory at a time). An input
    /// that fails to read is left out whole, as [`read_patches`](super::read_patches) fails on
    /// it, and its error returned; inputs without a usable patch are left out too.
    pub fn build(inputs: &[Input], cfg: &TileConfig) -> (PatchIndex, Vec<TileError>) {
        let mut index = PatchIndex::default();
        let mut failed = Vec::new();
        for input in inputs {
            let number = u32::try_from(index.inputs.len()).expect("fewer than 2^32 inputs in one listing");
            let start = index.entries.len();
            let read = for_each_patch(input, cfg, |patch| {
                index.entries.push(IndexEntry { input: number, window: patch.window });
                ControlFlow::Continue(())
            });
            match read {
                Ok(_) if index.entries.len() > start => index.inputs.push(input.clone()),
                Ok(_) => {}
                Err(err) => {
                    index.entries.truncate(start);
                    failed.push(err);
                }
            }
        }
        index.entries.shrink_to_fit();
        (index, failed)
    }

    /// Number of patches.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no patch was found.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every patch, in reading order.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// The inputs that gave patches, in listing order.
    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }

    /// The input patch `i` comes from.
    pub fn input_of(&self, i: usize) -> &Input {
        &self.inputs[self.entries[i].input as usize]
    }

    /// Heap bytes the index holds: its entries and its inputs with their paths.
    pub fn bytes(&self) -> usize {
        let paths: usize = self.inputs.iter().map(|i| i.path.as_os_str().len()).sum();
        self.entries.capacity() * size_of::<IndexEntry>()
            + self.inputs.capacity() * size_of::<Input>()
            + paths
    }

    /// The entries of patch `i`'s patch row: same input, same top row (they are contiguous).
    fn row_of(&self, i: usize) -> Range<usize> {
        let e = self.entries[i];
        let same = |o: &&IndexEntry| o.input == e.input && o.window.y == e.window.y;
        let start = i - self.entries[..i].iter().rev().take_while(same).count();
        let end = i + 1 + self.entries[i + 1..].iter().take_while(same).count();
        start..end
    }
}

/// The patches of a [`PatchIndex`], read on demand, decoded ones kept in a [`PatchCache`].
pub struct IndexedPatches {
    index: PatchIndex,
    cfg: TileConfig,
    cache: PatchCache<usize>,
    /// Whether a miss keeps the other windows of its patch row.
    whole_rows: bool,
    /// The input read last (by number) and its open rows.
    open: Option<(u32, Box<dyn RowSource + Send>)>,
}

impl IndexedPatches {
    /// Read the patches of `index` per `cfg` (the settings it was built with), keeping at most
    /// `cache_bytes` of decoded patches.
    pub fn new(index: PatchIndex, cfg: &TileConfig, cache_bytes: usize) -> IndexedPatches {
        let mut patches = IndexedPatches {
            index,
            cfg: cfg.clone(),
            cache: PatchCache::new(cache_bytes),
            whole_rows: false,
            open: None,
        };
        let folder: usize = (0..patches.len()).map(|i| patches.entry_bytes(i)).sum();
        patches.whole_rows = folder <= FOLDER_SHARE.saturating_mul(cache_bytes);
        patches
    }

    /// Keep (or not) the other windows of a miss's patch row, whatever the folder's size
    /// (benchmarks compare both).
    pub fn keep_whole_rows(mut self, on: bool) -> IndexedPatches {
        self.whole_rows = on;
        self
    }

    /// Whether a miss keeps the other windows of its patch row.
    pub fn keeps_whole_rows(&self) -> bool {
        self.whole_rows
    }

    /// The index read from.
    pub fn index(&self) -> &PatchIndex {
        &self.index
    }

    /// The decoded patches kept.
    pub fn cache(&self) -> &PatchCache<usize> {
        &self.cache
    }

    /// Number of patches.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there is no patch.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Patch `i` of the index (panics past the end, as slices do), from the cache or read from
    /// its input; an error names the input and why it no longer gives the patch.
    pub fn get(&mut self, i: usize) -> Result<Arc<Patch>, TileError> {
        if let Some(patch) = self.cache.get(&i) {
            return Ok(patch);
        }
        let row = self.index.row_of(i);
        let whole_row = self.whole_rows && row.len() * self.entry_bytes(i) <= self.cache.budget() / ROW_SHARE;
        let read = self.read(i, if whole_row { row } else { i..i + 1 });
        if read.is_err() {
            // Reopen next time: the file may have been replaced.
            self.open = None;
        }
        read
    }

    /// Decode the entries `wanted` (all in patch `i`'s row), cache them and return patch `i`.
    fn read(&mut self, i: usize, wanted: Range<usize>) -> Result<Arc<Patch>, TileError> {
        let entry = self.index.entries[i];
        let IndexedPatches { index, cfg, cache, open, .. } = self;
        let input = &index.inputs[entry.input as usize];
        if open.as_ref().is_none_or(|(n, _)| *n != entry.input) {
            // Close the previous input first: one input open at a time.
            *open = None;
            *open = Some((entry.input, open_source(input, cfg)?));
        }
        let source = open.as_mut().expect("opened just above").1.as_mut();
        let column = (wanted.len() == 1).then_some(entry.window.x as usize);
        let (mut next, mut found) = (wanted.start, None);
        cut_row(source, &cfg.bands, &input.path, cfg, (entry.window.y as usize, column), &mut |patch| {
            // The row's windows come in index order; one the index lacks (the file changed) is
            // passed over.
            while next < wanted.end && index.entries[next].window.x < patch.window.x {
                next += 1;
            }
            if next < wanted.end && index.entries[next].window == patch.window {
                let patch = Arc::new(patch);
                if next == i {
                    found = Some(Arc::clone(&patch));
                }
                cache.insert(next, patch);
                next += 1;
            }
            ControlFlow::Continue(())
        })?;
        found.ok_or_else(|| changed(input, entry.window))
    }

    /// What patch `i` takes in the cache.
    fn entry_bytes(&self, i: usize) -> usize {
        let w = self.index.entries[i].window;
        let names: usize = self.cfg.bands.iter().map(String::len).sum();
        self.cfg.bands.len() * w.width as usize * w.height as usize * size_of::<f32>() + names
    }
}

/// The error of an indexed window the input no longer gives.
fn changed(input: &Input, w: Window) -> TileError {
    TileError::Changed {
        path: input.path.clone(),
        detail: format!(
            "the {}x{} px window at ({}, {}) is no longer a usable patch (smaller image or more nodata)",
            w.width, w.height, w.x, w.y
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::tile::{list_inputs, patch_bytes, read_patches};

    fn data(set: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(set)
    }

    /// EuroSAT's 64 px tiles cut into overlapping 16 px windows (49 per tile, rows inside strips).
    fn windows_cfg() -> TileConfig {
        TileConfig { layout: "eurosat13".into(), patch_px: 16, stride_px: 8, ..TileConfig::default() }
    }

    fn everything(inputs: &[Input], cfg: &TileConfig) -> Vec<Patch> {
        inputs.iter().flat_map(|i| read_patches(i, cfg).expect("bundled tiles decode")).collect()
    }

    /// The one-window read, the whole-row read and a full read (`read_patches`) must agree
    /// patch for patch, in stacked tiles (windows and whole tiles) and BigEarthNet folders.
    #[test]
    fn indexed_patches_equal_a_full_read_with_and_without_whole_rows() {
        let eurosat = TileConfig { layout: "eurosat13".into(), ..TileConfig::default() };
        for (set, cfg) in [
            ("eurosat-ms", windows_cfg()),
            ("eurosat-ms", eurosat),
            ("bigearthnet-s2", TileConfig::default()),
        ] {
            let inputs = list_inputs(&data(set)).unwrap();
            let expected = everything(&inputs, &cfg);
            let (index, failed) = PatchIndex::build(&inputs, &cfg);
            assert!(failed.is_empty(), "{failed:?}");
            let windows: Vec<Window> = index.entries().iter().map(|e| e.window).collect();
            assert_eq!(windows, expected.iter().map(|p| p.window).collect::<Vec<_>>(), "{set}");
            // Budget 0 reads one window per miss; a large budget keeps whole rows.
            for budget in [0, 1 << 30] {
                let mut patches = IndexedPatches::new(index.clone(), &cfg, budget);
                for (i, want) in expected.iter().enumerate().rev() {
                    assert_eq!(*patches.get(i).unwrap(), *want, "{set} patch {i}, budget {budget}");
                    assert_eq!(patches.index().input_of(i).path, want.source);
                }
            }
        }
    }

    /// The whole-row read fills the cache with the row's siblings: the second window of a row
    /// is then a hit.
    #[test]
    fn a_miss_keeps_the_other_windows_of_its_row() {
        let cfg = windows_cfg();
        let inputs = list_inputs(&data("eurosat-ms")).unwrap();
        let (index, _) = PatchIndex::build(&inputs[..1], &cfg);
        let mut patches = IndexedPatches::new(index, &cfg, 1 << 30);
        patches.get(3).unwrap();
        // 7 windows per row of a 64 px tile at stride 8: entries 0..7 are the first row.
        assert_eq!(patches.cache().len(), 7);
        assert!((0..7).all(|k| patches.cache().contains(&k)) && !patches.cache().contains(&7));
    }

    /// When the cache holds less than half of the folder, a miss cuts only its own window.
    #[test]
    fn a_folder_more_than_twice_the_cache_is_read_one_window_per_miss() {
        let cfg = windows_cfg();
        let inputs = list_inputs(&data("eurosat-ms")).unwrap();
        let one = patch_bytes(&read_patches(&inputs[0], &cfg).unwrap()[0]);
        let (index, _) = PatchIndex::build(&inputs, &cfg);
        assert_eq!(index.len(), 4 * 49);
        let half = index.len() / 2 * one;
        let mut patches = IndexedPatches::new(index.clone(), &cfg, half - 1);
        patches.get(3).unwrap();
        assert_eq!(patches.cache().len(), 1);
        let mut patches = IndexedPatches::new(index, &cfg, half);
        patches.get(3).unwrap();
        assert_eq!(patches.cache().len(), 7);
    }

    /// A folder far larger than the cache, walked for three shuffled epochs: the cache never
    /// holds more than its budget, and every patch is still the right one.
    #[test]
    fn the_cache_budget_holds_over_epochs_of_a_folder_far_larger_than_it() {
        let cfg = windows_cfg();
        let inputs = list_inputs(&data("eurosat-ms")).unwrap();
        let expected = everything(&inputs, &cfg);
        let folder_bytes: usize = expected.iter().map(patch_bytes).sum();
        let (index, _) = PatchIndex::build(&inputs, &cfg);
        // One window per miss, and whole rows (7 windows) forced into a cache of 30 windows.
        for (windows, whole_rows) in [(3, false), (30, true)] {
            let budget = windows * patch_bytes(&expected[0]);
            assert!(folder_bytes > 6 * budget, "the folder ({folder_bytes} B) should dwarf the cache");
            let mut patches = IndexedPatches::new(index.clone(), &cfg, budget).keep_whole_rows(whole_rows);
            let mut order: Vec<usize> = (0..patches.len()).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            for _ in 0..3 {
                order.shuffle(&mut rng);
                for &i in &order {
                    assert_eq!(*patches.get(i).unwrap(), expected[i]);
                    assert!(patches.cache().bytes() <= budget, "{} > {budget}", patches.cache().bytes());
                }
            }
            assert!(patches.cache().len() <= windows);
        }
    }

    #[test]
    fn the_index_takes_twenty_bytes_a_patch_plus_the_paths() {
        let cfg = windows_cfg();
        let inputs = list_inputs(&data("eurosat-ms")).unwrap();
        let (index, _) = PatchIndex::build(&inputs, &cfg);
        assert_eq!(size_of::<IndexEntry>(), 20);
        assert_eq!(index.len(), 4 * 49);
        assert!(index.bytes() < index.len() * 20 + 4 * 200, "{} bytes", index.bytes());
    }

    /// An input that vanishes after indexing gives an error naming it, and the next read of
    /// another input still works.
    #[test]
    fn a_vanished_input_is_an_error_naming_it_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.tif", "b.tif"] {
            std::fs::copy(data("eurosat-ms").join("Forest/Forest_1.tif"), dir.path().join(name)).unwrap();
        }
        let cfg = windows_cfg();
        let (index, _) = PatchIndex::build(&list_inputs(dir.path()).unwrap(), &cfg);
        let mut patches = IndexedPatches::new(index, &cfg, 0);
        std::fs::remove_file(dir.path().join("a.tif")).unwrap();
        let err = patches.get(0).unwrap_err();
        assert_eq!(err.path(), dir.path().join("a.tif"), "{err}");
        assert!(patches.get(49).is_ok());
    }

    /// A window the input no longer gives (here: an entry moved off the window grid) is a
    /// `changed` error, not a wrong patch.
    #[test]
    fn a_window_the_input_no_longer_gives_is_reported_as_changed() {
        let cfg = windows_cfg();
        let inputs = list_inputs(&data("eurosat-ms")).unwrap();
        let (mut index, _) = PatchIndex::build(&inputs[..1], &cfg);
        index.entries[0].window.x = 3;
        let mut patches = IndexedPatches::new(index, &cfg, 0);
        let err = patches.get(0).unwrap_err();
        assert_eq!(err.kind(), "changed", "{err}");
        assert!(err.to_string().contains("window at (3, 0)"), "{err}");
    }
}
