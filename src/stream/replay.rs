//! Replay: a bounded buffer of already-trained patches, and the [`Mixer`] that builds each batch
//! from fresh patches and replayed ones.
//!
//! Fresh patches wait in a fixed-capacity queue ([`FRESH_CAPACITY`], a `heapless::Deque`; a full
//! queue hands the patch back so ingest waits). A batch takes about `fresh_fraction` of its
//! patches from that queue (more when the buffer is still small) and samples the rest, without
//! repetition, from the replay buffer. Fresh patches enter the buffer after their batch was built:
//! reservoir sampling keeps every patch ever seen with equal probability, FIFO keeps the newest,
//! min-redundancy (MinRed, Purushwalkam et al., ECCV 2022) evicts the stored patch whose teacher
//! embedding is most similar to another stored one ([`super::redundancy`]). The buffer never holds
//! more than `replay_capacity_patches` patches, whatever arrives.
//!
//! Min-redundancy learns the embeddings from training: after each step the service hands back
//! the teacher cls embedding of every sample's first global view ([`Mixer::record_embeddings`]).
//! They take effect when batch `number + EMBEDDING_LAG_BATCHES` is mixed, a fixed point in the
//! sequence of batches however fast the trainer runs, so resumed runs evict the same patches.
//!
//! With no fresh patch waiting, [`Mixer::next_replay_batch`] builds a replay-only batch
//! (rehearsal: the service keeps learning between arrivals). When fewer distinct patches exist
//! than a batch holds, every stored patch goes in once and the rest of the batch is drawn with
//! repetition; each draw becomes its own sample, so it gets its own crops.
//!
//! The mixer's whole state (RNG position, buffer, fresh queue, per-tile progress, batch counts)
//! is a plain [`MixerState`] value; restoring it continues the exact same sequence of batches.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ReplayPolicy, StreamConfig};
use crate::stream::TileId;
use crate::stream::redundancy::Redundancy;
use crate::tile::{Patch, Window};

/// Fresh patches that may wait for training at once (backpressure beyond this).
pub const FRESH_CAPACITY: usize = 256;
/// Embeddings of batch `n` take effect when batch `n + EMBEDDING_LAG_BATCHES` is mixed: the service
/// must never have more batches than this mixed but not trained.
pub const EMBEDDING_LAG_BATCHES: u64 = 2;

/// What [`Mixer::push_fresh`] did with a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for training.
    Queued,
    /// Dropped: the restored state already holds (or trained) this patch of the tile.
    AlreadyQueued,
}

/// One batch: `fresh` new patches first, then replayed ones.
#[derive(Debug, Clone)]
pub struct MixedBatch {
    /// The patches, fresh ones first.
    pub patches: Vec<Arc<Patch>>,
    /// The tile each patch came from.
    pub tiles: Vec<TileId>,
    /// How many of `patches` are fresh.
    pub fresh: usize,
    /// Position of this batch among all batches mixed (0 first).
    pub number: u64,
    /// The replay key of each patch (what [`Mixer::record_embeddings`] takes back).
    pub keys: Vec<u64>,
}

/// Teacher embeddings of one trained batch, waiting to take effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedded {
    /// The batch's number.
    pub number: u64,
    /// Replay key and embedding of each sample.
    pub samples: Vec<(u64, Vec<f32>)>,
}

/// Batches built so far, by kind (since the first start: they travel in [`MixerState`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    /// Batches with at least one fresh patch (the rest replayed).
    pub fresh: u64,
    /// Replay-only batches (rehearsal).
    pub replay_only: u64,
}

/// A patch with its tile, as stored in the buffer and the fresh queue.
#[derive(Debug, Clone)]
struct Slot {
    tile: TileId,
    patch: Arc<Patch>,
}

/// Ingest progress of a tile whose patches are (or were just) in the fresh queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileProgress {
    /// Patches pushed so far.
    pub pushed: u64,
    /// Of those, still waiting in the fresh queue.
    pub queued: u64,
    /// Ingest said there are no more patches.
    pub finished: bool,
    /// Patches to drop on re-ingest after a restore (they were pushed before the checkpoint).
    pub skip: u64,
}

/// The bounded replay buffer.
#[derive(Debug, Clone)]
struct ReplayBuffer {
    policy: ReplayPolicy,
    capacity: usize,
    /// Patches ever offered (a patch's key is the count before it was offered).
    offered: u64,
    slots: Vec<Slot>,
    /// Key of each slot's patch.
    keys: Vec<u64>,
    /// Teacher embeddings of the slots (min-redundancy only).
    redundancy: Redundancy,
}

impl ReplayBuffer {
    fn new(policy: ReplayPolicy, capacity: usize) -> ReplayBuffer {
        ReplayBuffer {
            policy,
            capacity: capacity.max(1),
            offered: 0,
            slots: Vec::new(),
            keys: Vec::new(),
            redundancy: Redundancy::default(),
        }
    }

    /// Offer a trained patch; it may evict one (FIFO: the oldest; reservoir: Algorithm R;
    /// min-redundancy: the most redundant embedded one, the oldest while fewer than two are).
    fn offer(&mut self, slot: Slot, rng: &mut ChaCha8Rng) {
        let seen = self.offered;
        self.offered += 1;
        if self.slots.len() < self.capacity {
            self.slots.push(slot);
            self.keys.push(seen);
            self.redundancy.clear(self.slots.len() - 1);
            return;
        }
        let oldest = (seen % self.capacity as u64) as usize;
        let victim = match self.policy {
            ReplayPolicy::Fifo => oldest,
            ReplayPolicy::Reservoir => rng.random_range(0..=seen) as usize,
            ReplayPolicy::MinRedundancy => self.redundancy.most_redundant().unwrap_or(oldest),
        };
        if victim < self.capacity {
            self.slots[victim] = slot;
            self.keys[victim] = seen;
            self.redundancy.clear(victim);
        }
    }

    /// Store `embedding` for the patch with `key` (ignored when it left the buffer).
    fn embed(&mut self, key: u64, embedding: &[f32]) {
        if let Some(i) = self.keys.iter().position(|&k| k == key) {
            self.redundancy.set(i, embedding);
        }
    }
}

/// Builds batches from fresh and replayed patches; see the module doc.
#[derive(Debug)]
pub struct Mixer {
    fresh_fraction: f64,
    rng: ChaCha8Rng,
    buffer: ReplayBuffer,
    fresh: heapless::Deque<Slot, FRESH_CAPACITY>,
    tiles: BTreeMap<TileId, TileProgress>,
    completed: Vec<TileId>,
    batches: BatchCounts,
    /// Embeddings of trained batches, in batch order, not yet in effect.
    pending: VecDeque<Embedded>,
}

impl Mixer {
    /// An empty mixer for `cfg` (`replay_capacity_patches`, `replay_policy`, `fresh_fraction`),
    /// its RNG seeded with `seed`.
    pub fn new(cfg: &StreamConfig, seed: u64) -> Mixer {
        Mixer {
            fresh_fraction: cfg.fresh_fraction,
            rng: ChaCha8Rng::seed_from_u64(seed),
            buffer: ReplayBuffer::new(cfg.replay_policy, cfg.replay_capacity_patches),
            fresh: heapless::Deque::new(),
            tiles: BTreeMap::new(),
            completed: Vec::new(),
            batches: BatchCounts::default(),
            pending: VecDeque::new(),
        }
    }

    /// Queue a fresh patch of `tile`. A full queue hands the patch back: build a batch, then retry.
    pub fn push_fresh(&mut self, tile: TileId, patch: Patch) -> Result<Pushed, Patch> {
        let progress = self.tiles.entry(tile).or_default();
        if progress.skip > 0 {
            progress.skip -= 1;
            return Ok(Pushed::AlreadyQueued);
        }
        if self.fresh.is_full() {
            return Err(patch);
        }
        progress.pushed += 1;
        progress.queued += 1;
        let pushed = self.fresh.push_back(Slot { tile, patch: Arc::new(patch) });
        debug_assert!(pushed.is_ok(), "checked is_full above");
        Ok(Pushed::Queued)
    }

    /// Say that `tile` has no more patches. Once all its queued patches are in batches it is
    /// returned by [`Mixer::take_completed`].
    pub fn finish_tile(&mut self, tile: TileId) {
        let progress = self.tiles.entry(tile).or_default();
        progress.finished = true;
        progress.skip = 0;
        self.complete_if_done(tile);
    }

    /// Whether `tile` must be (re-)ingested: false when its patches are all in the restored state.
    pub fn needs_ingest(&self, tile: TileId) -> bool {
        !self.tiles.get(&tile).is_some_and(|p| p.finished)
    }

    /// Tiles whose every patch went into a batch since the last call (mark them trained).
    pub fn take_completed(&mut self) -> Vec<TileId> {
        std::mem::take(&mut self.completed)
    }

    /// Fresh patches waiting.
    pub fn fresh_len(&self) -> usize {
        self.fresh.len()
    }

    /// The first `n` fresh patches waiting, oldest first, without taking them (an export probe
    /// before the first batch).
    pub fn peek_fresh(&self, n: usize) -> Vec<Arc<Patch>> {
        self.fresh.iter().take(n).map(|slot| Arc::clone(&slot.patch)).collect()
    }

    /// Patches in the replay buffer.
    pub fn replay_len(&self) -> usize {
        self.buffer.slots.len()
    }

    /// Patches ever batched as fresh (each entered the buffer once).
    pub fn fresh_patches(&self) -> u64 {
        self.buffer.offered
    }

    /// Batches built so far, by kind.
    pub fn batch_counts(&self) -> BatchCounts {
        self.batches
    }

    /// The next batch of `batch_size` patches with fresh ones first, or `None` while no fresh
    /// patch waits. Patches are distinct while enough exist (see the module doc).
    pub fn next_batch(&mut self, batch_size: usize) -> Option<MixedBatch> {
        let (n_fresh, n_replay) = self.split(batch_size)?;
        self.apply_embeddings();
        let mut used = Vec::with_capacity(n_fresh);
        for _ in 0..n_fresh {
            let slot = self.fresh.pop_front().expect("split() counted the fresh queue");
            self.consumed(slot.tile);
            used.push(slot);
        }
        let first_key = self.buffer.offered;
        let fresh = used.iter().enumerate().map(|(k, slot)| (first_key + k as u64, slot.clone()));
        let replayed: Vec<(u64, Slot)> = fresh.clone().chain(self.replayed(n_replay, &used)).collect();
        let batch = self.batch(replayed, n_fresh);
        for slot in used {
            self.buffer.offer(slot, &mut self.rng);
        }
        self.batches.fresh += 1;
        Some(batch)
    }

    /// A replay-only batch of `batch_size` patches, or `None` while the buffer is empty (or a
    /// fresh patch waits: fresh patches go first, through [`Mixer::next_batch`]).
    pub fn next_replay_batch(&mut self, batch_size: usize) -> Option<MixedBatch> {
        if self.buffer.slots.is_empty() || !self.fresh.is_empty() || batch_size == 0 {
            return None;
        }
        self.apply_embeddings();
        let slots = self.replayed(batch_size, &[]);
        let batch = self.batch(slots, 0);
        self.batches.replay_only += 1;
        Some(batch)
    }

    /// The batch of `slots` (with their keys), numbered as the next one.
    fn batch(&self, slots: Vec<(u64, Slot)>, fresh: usize) -> MixedBatch {
        let number = self.batches.fresh + self.batches.replay_only;
        let mut batch =
            MixedBatch { patches: Vec::new(), tiles: Vec::new(), fresh, number, keys: Vec::new() };
        for (key, slot) in slots {
            batch.keys.push(key);
            batch.tiles.push(slot.tile);
            batch.patches.push(slot.patch);
        }
        batch
    }

    /// Whether the replay policy uses teacher embeddings (then pass them to
    /// [`Mixer::record_embeddings`] after each step).
    pub fn wants_embeddings(&self) -> bool {
        self.buffer.policy == ReplayPolicy::MinRedundancy
    }

    /// The teacher embeddings of trained batch `number`, one per patch in the batch's order
    /// (`keys` from [`MixedBatch::keys`]). A patch drawn twice keeps its first embedding.
    pub fn record_embeddings(&mut self, number: u64, keys: &[u64], embeddings: Vec<Vec<f32>>) {
        let mut samples: Vec<(u64, Vec<f32>)> = Vec::with_capacity(keys.len());
        for (&key, embedding) in keys.iter().zip(embeddings) {
            if !samples.iter().any(|(k, _)| *k == key) {
                samples.push((key, embedding));
            }
        }
        self.pending.push_back(Embedded { number, samples });
    }

    /// Put into effect the embeddings of batches at least [`EMBEDDING_LAG_BATCHES`] before the
    /// one being mixed now.
    fn apply_embeddings(&mut self) {
        let now = self.batches.fresh + self.batches.replay_only;
        while self.pending.front().is_some_and(|e| e.number + EMBEDDING_LAG_BATCHES <= now) {
            let done = self.pending.pop_front().expect("front checked");
            for (key, embedding) in &done.samples {
                self.buffer.embed(*key, embedding);
            }
        }
    }

    /// How many fresh and replayed patches the next batch takes.
    fn split(&self, batch_size: usize) -> Option<(usize, usize)> {
        if self.fresh.is_empty() || batch_size == 0 {
            return None;
        }
        let target = ((batch_size as f64 * self.fresh_fraction).ceil() as usize).clamp(1, batch_size);
        let needed = target.max(batch_size.saturating_sub(self.buffer.slots.len()));
        let n_fresh = needed.min(self.fresh.len());
        Some((n_fresh, batch_size - n_fresh))
    }

    /// `n` patches to replay: distinct ones from the buffer while it holds `n`; otherwise every
    /// stored patch once and the rest drawn with repetition from the stored patches and this
    /// batch's `fresh` ones. `n > 0` needs a stored or a fresh patch.
    fn replayed(&mut self, n: usize, fresh: &[Slot]) -> Vec<(u64, Slot)> {
        let stored = self.buffer.slots.len();
        let distinct = n.min(stored);
        let picks = rand::seq::index::sample(&mut self.rng, stored, distinct);
        let mut out: Vec<(u64, Slot)> = picks.into_iter().map(|i| self.stored(i)).collect();
        let pool = stored + fresh.len();
        for _ in distinct..n {
            let i = self.rng.random_range(0..pool);
            out.push(if i < stored {
                self.stored(i)
            } else {
                (self.buffer.offered + (i - stored) as u64, fresh[i - stored].clone())
            });
        }
        out
    }

    /// Buffer slot `i` with its key.
    fn stored(&self, i: usize) -> (u64, Slot) {
        (self.buffer.keys[i], self.buffer.slots[i].clone())
    }

    fn consumed(&mut self, tile: TileId) {
        if let Some(progress) = self.tiles.get_mut(&tile) {
            progress.queued -= 1;
        }
        self.complete_if_done(tile);
    }

    fn complete_if_done(&mut self, tile: TileId) {
        if self.tiles.get(&tile).is_some_and(|p| p.finished && p.queued == 0) {
            self.tiles.remove(&tile);
            self.completed.push(tile);
        }
    }

    /// The whole state, for a checkpoint.
    pub fn state(&self) -> MixerState {
        MixerState {
            rng: RngState::of(&self.rng),
            offered: self.buffer.offered,
            buffer: self.buffer.slots.iter().map(StoredPatch::from).collect(),
            fresh: self.fresh.iter().map(StoredPatch::from).collect(),
            tiles: self.tiles.iter().map(|(&t, &p)| (t, p)).collect(),
            completed: self.completed.clone(),
            extra: MixerExtra {
                batches: self.batches,
                keys: self.buffer.keys.clone(),
                embeddings: self.buffer.redundancy.embeddings().to_vec(),
                pending: self.pending.iter().cloned().collect(),
            },
        }
    }

    /// A mixer that continues exactly where `state` was taken. Tiles that were still being
    /// ingested skip the patches already pushed when they are pushed again.
    pub fn restore(cfg: &StreamConfig, state: MixerState) -> Mixer {
        let mut mixer = Mixer::new(cfg, 0);
        mixer.rng = state.rng.rng();
        mixer.buffer.offered = state.offered;
        mixer.buffer.slots = state.buffer.into_iter().map(Slot::from).collect();
        let n = mixer.buffer.slots.len();
        let MixerExtra { batches, mut keys, mut embeddings, pending } = state.extra;
        if keys.len() != n {
            // a checkpoint from before the keys: any keys below `offered` are unique and unused
            keys = (0..n as u64).map(|i| state.offered.saturating_sub(n as u64) + i).collect();
        }
        embeddings.resize(n, None);
        if n > mixer.buffer.capacity {
            log::warn!(
                "replay buffer: the checkpoint holds {n} patches, stream.replay_capacity_patches is {}; dropping the rest",
                mixer.buffer.capacity
            );
            mixer.buffer.slots.truncate(mixer.buffer.capacity);
            keys.truncate(mixer.buffer.capacity);
            embeddings.truncate(mixer.buffer.capacity);
        }
        mixer.buffer.keys = keys;
        mixer.buffer.redundancy = Redundancy::from_embeddings(embeddings);
        mixer.batches = batches;
        mixer.pending = pending.into();
        for stored in state.fresh {
            if mixer.fresh.push_back(Slot::from(stored)).is_err() {
                log::warn!(
                    "replay: more fresh patches in the checkpoint than fit the queue; the rest is re-ingested"
                );
                break;
            }
        }
        mixer.tiles =
            state.tiles.into_iter().map(|(t, p)| (t, TileProgress { skip: p.pushed, ..p })).collect();
        mixer.completed = state.completed;
        mixer
    }
}

/// Everything a [`Mixer`] needs to continue bit-exactly: plain, serialisable data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerState {
    /// RNG position.
    pub rng: RngState,
    /// Patches ever offered to the buffer (reservoir and FIFO positions depend on it).
    pub offered: u64,
    /// Replay buffer contents, slot by slot.
    pub buffer: Vec<StoredPatch>,
    /// Fresh queue contents, oldest first.
    pub fresh: Vec<StoredPatch>,
    /// Tiles being ingested or in the fresh queue.
    pub tiles: Vec<(TileId, TileProgress)>,
    /// Completed tiles not yet taken.
    pub completed: Vec<TileId>,
    /// What was added after the first format. The last field: a checkpoint written before it
    /// existed reads as one that ends with `MixerExtra::default()` (see `service::checkpoints`).
    pub extra: MixerExtra,
}

/// The part of a [`MixerState`] added after the first checkpoint format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MixerExtra {
    /// Batches built so far, by kind.
    pub batches: BatchCounts,
    /// Replay key of each buffer slot.
    pub keys: Vec<u64>,
    /// Teacher embedding of each buffer slot (min-redundancy; `None` until trained after it was
    /// stored).
    pub embeddings: Vec<Option<Vec<f32>>>,
    /// Embeddings of trained batches not in effect yet.
    pub pending: Vec<Embedded>,
}

impl MixerState {
    /// Encode with postcard (for a checkpoint file).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("mixer state always serialises")
    }

    /// Decode what [`MixerState::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<MixerState, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A ChaCha8 RNG's exact position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The seed.
    pub seed: [u8; 32],
    /// The stream number.
    pub stream: u64,
    /// Words consumed.
    pub word_pos: u128,
}

impl RngState {
    fn of(rng: &ChaCha8Rng) -> RngState {
        RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos() }
    }

    fn rng(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// A [`Patch`] with its tile, as serialisable data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPatch {
    /// The tile it came from.
    pub tile: TileId,
    /// `[C, H, W]` values.
    pub data: Vec<f32>,
    /// Band names.
    pub bands: Vec<String>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Source file or folder (lossy for non-UTF-8 names; informational).
    pub source: String,
    /// Window in the source.
    pub window: Window,
    /// Nodata share.
    pub nodata_fraction: f32,
}

impl From<&Slot> for StoredPatch {
    fn from(slot: &Slot) -> Self {
        let p = &slot.patch;
        StoredPatch {
            tile: slot.tile,
            data: p.data.clone(),
            bands: p.bands.clone(),
            height: p.height,
            width: p.width,
            source: p.source.to_string_lossy().into_owned(),
            window: p.window,
            nodata_fraction: p.nodata_fraction,
        }
    }
}

impl From<StoredPatch> for Slot {
    fn from(s: StoredPatch) -> Self {
        let patch = Patch {
            data: s.data,
            bands: s.bands,
            height: s.height,
            width: s.width,
            source: PathBuf::from(s.source),
            window: s.window,
            nodata_fraction: s.nodata_fraction,
        };
        Slot { tile: s.tile, patch: Arc::new(patch) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1x2x2 patch whose values and window encode `n`.
    fn patch(n: u32) -> Patch {
        Patch {
            data: vec![n as f32; 4],
            bands: vec!["B04".into()],
            height: 2,
            width: 2,
            source: PathBuf::from(format!("t{n}.tif")),
            window: Window { x: n, y: 0, width: 2, height: 2 },
            nodata_fraction: 0.0,
        }
    }

    fn cfg(capacity: usize, policy: ReplayPolicy, fresh_fraction: f64) -> StreamConfig {
        StreamConfig {
            replay_capacity_patches: capacity,
            replay_policy: policy,
            fresh_fraction,
            ..StreamConfig::default()
        }
    }

    fn ids(batch: &MixedBatch) -> Vec<u32> {
        batch.patches.iter().map(|p| p.window.x).collect()
    }

    /// Push patches `from..to` (tile = patch number, one patch per tile) and take a batch whenever
    /// a whole one is queued (as the service does while tiles are being read).
    fn feed(mixer: &mut Mixer, from: u32, to: u32, batch_size: usize) -> Vec<Vec<u32>> {
        let mut batches = Vec::new();
        for n in from..to {
            mixer.push_fresh(TileId(n as u64), patch(n)).unwrap();
            mixer.finish_tile(TileId(n as u64));
            if mixer.fresh_len() >= batch_size {
                batches.push(ids(&mixer.next_batch(batch_size).expect("a whole batch is queued")));
            }
        }
        batches
    }

    #[test]
    fn reservoir_keeps_every_part_of_the_stream_about_equally() {
        let mut per_decile = [0u32; 10];
        for seed in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut buffer = ReplayBuffer::new(ReplayPolicy::Reservoir, 100);
            for n in 0..10_000 {
                buffer.offer(Slot { tile: TileId(n), patch: Arc::new(patch(0)) }, &mut rng);
            }
            assert_eq!(buffer.slots.len(), 100);
            for slot in &buffer.slots {
                per_decile[(slot.tile.0 / 1000) as usize] += 1;
            }
        }
        // 2000 kept patches, 200 expected per decile
        assert!(per_decile.iter().all(|&c| (150..=250).contains(&c)), "{per_decile:?}");
    }

    #[test]
    fn fifo_keeps_the_newest_patches() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut buffer = ReplayBuffer::new(ReplayPolicy::Fifo, 10);
        for n in 0..95 {
            buffer.offer(Slot { tile: TileId(n), patch: Arc::new(patch(0)) }, &mut rng);
        }
        let mut kept: Vec<u64> = buffer.slots.iter().map(|s| s.tile.0).collect();
        kept.sort();
        assert_eq!(kept, (85..95).collect::<Vec<_>>());
    }

    #[test]
    fn memory_stays_bounded_however_many_patches_arrive() {
        let mut mixer = Mixer::new(&cfg(50, ReplayPolicy::Reservoir, 0.5), 1);
        let mut refused = 0;
        for n in 0..10_000 {
            if mixer.push_fresh(TileId(n), patch(n as u32)).is_err() {
                refused += 1;
            }
            assert!(mixer.fresh_len() <= FRESH_CAPACITY);
            if n % 7 == 0 {
                mixer.next_batch(8);
            }
            assert!(mixer.replay_len() <= 50);
        }
        assert!(refused > 0, "a full fresh queue must push back");
    }

    #[test]
    fn batches_mix_fresh_and_replayed_patches_by_the_configured_share() {
        let mut mixer = Mixer::new(&cfg(100, ReplayPolicy::Reservoir, 0.25), 3);
        for n in 0..8 {
            mixer.push_fresh(TileId(n), patch(n as u32)).unwrap();
        }
        assert_eq!(
            ids(&mixer.next_batch(8).unwrap()),
            (0..8).collect::<Vec<_>>(),
            "an empty buffer: all fresh"
        );
        for n in 8..16 {
            mixer.push_fresh(TileId(n), patch(n as u32)).unwrap();
        }
        let batch = mixer.next_batch(8).unwrap();
        assert_eq!(batch.fresh, 2);
        assert_eq!(ids(&batch)[..2], [8, 9]);
        assert!(ids(&batch)[2..].iter().all(|&n| n < 8), "replayed patches are trained ones");
        assert_eq!(distinct(&batch), 8, "no patch twice in a batch");
    }

    fn distinct(batch: &MixedBatch) -> usize {
        let mut unique = ids(batch);
        unique.sort();
        unique.dedup();
        unique.len()
    }

    #[test]
    fn replay_only_batches_come_from_trained_patches_once_the_fresh_queue_is_empty() {
        let mut mixer = Mixer::new(&cfg(100, ReplayPolicy::Reservoir, 0.5), 5);
        assert!(mixer.next_replay_batch(4).is_none(), "nothing stored yet");
        for n in 0..6 {
            mixer.push_fresh(TileId(n), patch(n as u32)).unwrap();
        }
        assert!(mixer.next_replay_batch(4).is_none(), "fresh patches go first");
        mixer.next_batch(4).unwrap();
        mixer.next_batch(4).unwrap();
        assert_eq!((mixer.fresh_len(), mixer.fresh_patches()), (0, 6));
        for _ in 0..20 {
            let batch = mixer.next_replay_batch(4).unwrap();
            assert_eq!(batch.fresh, 0);
            assert_eq!(distinct(&batch), 4, "the buffer holds a batch: distinct patches");
            assert!(ids(&batch).iter().all(|&n| n < 6));
        }
        assert_eq!(mixer.batch_counts(), BatchCounts { fresh: 2, replay_only: 20 });
    }

    #[test]
    fn fewer_patches_than_a_batch_still_make_batches_with_every_patch_in_them() {
        let mut mixer = Mixer::new(&cfg(100, ReplayPolicy::Reservoir, 0.5), 9);
        for n in 0..3 {
            mixer.push_fresh(TileId(n), patch(n as u32)).unwrap();
        }
        let first = mixer.next_batch(8).expect("3 patches make a batch of 8");
        assert_eq!((first.fresh, first.patches.len()), (3, 8));
        assert_eq!(ids(&first)[..3], [0, 1, 2]);
        assert_eq!(distinct(&first), 3);
        mixer.push_fresh(TileId(3), patch(3)).unwrap();
        let second = mixer.next_batch(8).unwrap();
        assert_eq!((second.fresh, distinct(&second)), (1, 4), "the new patch and every stored one");
        let replay = mixer.next_replay_batch(8).unwrap();
        assert_eq!((replay.patches.len(), distinct(&replay)), (8, 4));
    }

    #[test]
    fn a_tile_completes_when_its_last_patch_was_batched() {
        let mut mixer = Mixer::new(&cfg(100, ReplayPolicy::Reservoir, 1.0), 0);
        for n in 0..3 {
            mixer.push_fresh(TileId(7), patch(n)).unwrap();
        }
        mixer.next_batch(2).unwrap();
        mixer.finish_tile(TileId(7));
        assert!(mixer.take_completed().is_empty());
        mixer.push_fresh(TileId(8), patch(9)).unwrap();
        mixer.next_batch(2).unwrap();
        assert_eq!(mixer.take_completed(), [TileId(7)]);
        mixer.finish_tile(TileId(9));
        assert_eq!(mixer.take_completed(), [TileId(9)], "a tile without patches completes at once");
    }

    #[test]
    fn restored_state_continues_with_the_same_batches() {
        let c = cfg(16, ReplayPolicy::Reservoir, 0.5);
        let mut straight = Mixer::new(&c, 42);
        let first = feed(&mut straight, 0, 40, 6);
        // a tile half pushed at the checkpoint
        for n in 40..43 {
            straight.push_fresh(TileId(40), patch(n)).unwrap();
        }
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        assert_eq!(saved, straight.state());
        let mut resumed = Mixer::restore(&c, saved);
        // re-ingest of the half-pushed tile: its first three patches are dropped
        for n in 40..46 {
            let r = resumed.push_fresh(TileId(40), patch(n)).unwrap();
            assert_eq!(r == Pushed::AlreadyQueued, n < 43);
        }
        for n in 43..46 {
            straight.push_fresh(TileId(40), patch(n)).unwrap();
        }
        for m in [&mut straight, &mut resumed] {
            m.finish_tile(TileId(40));
        }
        let a = feed(&mut straight, 46, 90, 6);
        let b = feed(&mut resumed, 46, 90, 6);
        assert!(!first.is_empty() && !a.is_empty());
        assert_eq!(a, b);
        let rehearse = |m: &mut Mixer| -> Vec<Vec<u32>> {
            let mut out: Vec<_> = std::iter::from_fn(|| m.next_batch(6)).map(|b| ids(&b)).collect();
            out.extend((0..5).map(|_| ids(&m.next_replay_batch(6).unwrap())));
            out
        };
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        let (a, b) = (rehearse(&mut straight), rehearse(&mut Mixer::restore(&c, saved)));
        assert_eq!(a, b, "replay-only batches continue the same way after a restore");
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        resumed = Mixer::restore(&c, saved);
        assert_eq!(straight.take_completed(), resumed.take_completed());
        assert_eq!(straight.state(), resumed.state());
    }

    /// A teacher embedding for patch `n`: patches below 5 each point their own way, the others
    /// all (nearly) the same way, as tiles of one pass that look alike.
    fn embedding(n: u32) -> Vec<f32> {
        let mut e = vec![0.0; 8];
        if n < 5 {
            e[n as usize] = 1.0;
        } else {
            e[5] = 1.0;
            e[6] = n as f32 * 1e-3;
        }
        e
    }

    /// Push patches `from..to`, mixing a batch of 4 whenever two are queued and handing back the
    /// batch's embeddings after it, as the service does. Returns the batches.
    fn stream_with_embeddings(mixer: &mut Mixer, from: u32, to: u32) -> Vec<Vec<u32>> {
        let mut batches = Vec::new();
        for n in from..to {
            mixer.push_fresh(TileId(n as u64), patch(n)).unwrap();
            mixer.finish_tile(TileId(n as u64));
            if mixer.fresh_len() >= 2 {
                let batch = mixer.next_batch(4).unwrap();
                let cls = batch.patches.iter().map(|p| embedding(p.window.x)).collect();
                mixer.record_embeddings(batch.number, &batch.keys, cls);
                batches.push(ids(&batch));
            }
        }
        batches
    }

    fn kept(mixer: &Mixer) -> Vec<u32> {
        let mut kept: Vec<u32> = mixer.buffer.slots.iter().map(|s| s.patch.window.x).collect();
        kept.sort();
        kept
    }

    #[test]
    fn min_redundancy_keeps_the_distinct_patches_that_reservoir_sampling_loses() {
        let run = |policy| {
            let mut mixer = Mixer::new(&cfg(10, policy, 0.5), 4);
            stream_with_embeddings(&mut mixer, 0, 60);
            kept(&mixer)
        };
        let minred = run(ReplayPolicy::MinRedundancy);
        assert_eq!(minred.len(), 10);
        assert_eq!(minred[..5], [0, 1, 2, 3, 4], "every distinct patch stays: {minred:?}");
        let reservoir = run(ReplayPolicy::Reservoir);
        assert!(reservoir.iter().filter(|&&n| n < 5).count() < 5, "{reservoir:?}");
    }

    #[test]
    fn min_redundancy_state_with_embeddings_in_flight_restores_exactly() {
        let c = cfg(10, ReplayPolicy::MinRedundancy, 0.5);
        let mut straight = Mixer::new(&c, 8);
        stream_with_embeddings(&mut straight, 0, 31);
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        assert!(!saved.extra.pending.is_empty() && saved.extra.embeddings.iter().any(Option::is_some));
        let mut resumed = Mixer::restore(&c, saved);
        let (a, b) =
            (stream_with_embeddings(&mut straight, 31, 80), stream_with_embeddings(&mut resumed, 31, 80));
        assert_eq!(a, b);
        assert_eq!(straight.state(), resumed.state());
    }
}
