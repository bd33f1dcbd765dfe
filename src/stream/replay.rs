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
//! The buffer holds references: its patches live in the [`PatchStore`] on disk (a bounded cache
//! keeps recently used ones in memory), so it may hold far more patches than fit in RAM. It stops
//! growing when the store's disk budget is reached (then it evicts as at capacity), a patch the
//! store cannot write (disk full) stays out of it, and a stored patch that cannot be read back
//! leaves it with a warning: training never stops for the store.
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
//! The mixer's whole state (RNG position, buffer references, fresh queue, per-tile progress, batch
//! counts) is a plain [`MixerState`] value; restoring it over the same store continues the exact
//! same sequence of batches. Its size grows with the number of references and the bounded fresh
//! queue, never with the stored patches' bytes.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ReplayPolicy, StreamConfig};
use crate::stream::TileId;
use crate::stream::redundancy::Redundancy;
use crate::stream::store::{self, BlobId, Encoded, PatchStore};
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

/// A fresh patch with its tile, waiting in the fresh queue.
#[derive(Debug, Clone)]
struct Slot {
    tile: TileId,
    patch: Arc<Patch>,
}

/// A patch in the replay buffer: its blob in the [`PatchStore`] and its tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferRef {
    /// The tile it came from.
    pub tile: TileId,
    /// Its blob (the patch, with its source, window and nodata share).
    pub blob: BlobId,
}

/// A batch member: replay key, tile and patch.
type Member = (u64, TileId, Arc<Patch>);

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
    slots: Vec<BufferRef>,
    /// Key of each slot's patch.
    keys: Vec<u64>,
    /// Teacher embeddings of the slots (min-redundancy only).
    redundancy: Redundancy,
    /// The disk budget stopped the buffer's growth (logged once).
    budget_logged: bool,
    /// The store failed the last write (logged once per spell of failures).
    write_failing: bool,
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
            budget_logged: false,
            write_failing: false,
        }
    }

    /// Offer a trained patch; it may evict one (FIFO: the oldest; reservoir: Algorithm R;
    /// min-redundancy: the most redundant embedded one, the oldest while fewer than two are).
    /// The buffer grows while below capacity and within the store's disk budget; beyond the
    /// budget it evicts as at capacity. A patch the store cannot write stays out.
    fn offer(&mut self, slot: &Slot, rng: &mut ChaCha8Rng, store: &mut PatchStore) {
        let seen = self.offered;
        self.offered += 1;
        let len = self.slots.len();
        if len < self.capacity {
            let blob = store::encode(&slot.patch);
            if store.fits(&blob) {
                if let Some(stored) = self.put(slot, blob, store) {
                    self.slots.push(stored);
                    self.keys.push(seen);
                    self.redundancy.clear(self.slots.len() - 1);
                }
                return;
            }
            self.budget_reached(store);
            if len == 0 {
                return;
            }
        }
        let oldest = (seen % len as u64) as usize;
        let victim = match self.policy {
            ReplayPolicy::Fifo => oldest,
            ReplayPolicy::Reservoir => rng.random_range(0..=seen) as usize,
            ReplayPolicy::MinRedundancy => self.redundancy.most_redundant().unwrap_or(oldest),
        };
        if victim < len
            && let Some(stored) = self.put(slot, store::encode(&slot.patch), store)
        {
            store.release(self.slots[victim].blob);
            self.slots[victim] = stored;
            self.keys[victim] = seen;
            self.redundancy.clear(victim);
        }
    }

    /// Write `slot`'s patch as `blob` and reference it; `None` (logged once per spell) when the
    /// store cannot write it.
    fn put(&mut self, slot: &Slot, blob: Encoded, store: &mut PatchStore) -> Option<BufferRef> {
        if let Err(e) = store.write(&blob) {
            if !self.write_failing {
                log::warn!(
                    "{e}; trained patches stay out of the replay buffer until the store can write again"
                );
            }
            self.write_failing = true;
            return None;
        }
        self.write_failing = false;
        store.acquire(blob.id);
        store.cache(blob.id, Arc::clone(&slot.patch));
        Some(BufferRef { tile: slot.tile, blob: blob.id })
    }

    fn budget_reached(&mut self, store: &PatchStore) {
        if !self.budget_logged {
            log::warn!(
                "replay buffer: {} patches take the whole stream.replay_disk_mb ({} MB); it stops growing and new patches replace stored ones",
                self.slots.len(),
                store.budget_bytes() >> 20
            );
        }
        self.budget_logged = true;
    }

    /// Remove the slots at `indices` (their blobs could not be read back).
    fn drop_slots(&mut self, mut indices: Vec<usize>, store: &mut PatchStore) {
        indices.sort_unstable();
        indices.dedup();
        for &i in indices.iter().rev() {
            store.release(self.slots[i].blob);
            self.slots.swap_remove(i);
            self.keys.swap_remove(i);
            self.redundancy.swap_remove(i);
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
    store: PatchStore,
    fresh: heapless::Deque<Slot, FRESH_CAPACITY>,
    tiles: BTreeMap<TileId, TileProgress>,
    completed: Vec<TileId>,
    batches: BatchCounts,
    /// Embeddings of trained batches, in batch order, not yet in effect.
    pending: VecDeque<Embedded>,
}

impl Mixer {
    /// An empty mixer for `cfg` (`replay_capacity_patches`, `replay_policy`, `fresh_fraction`),
    /// its RNG seeded with `seed`, its buffer's patches in `store`.
    pub fn new(cfg: &StreamConfig, seed: u64, store: PatchStore) -> Mixer {
        Mixer {
            fresh_fraction: cfg.fresh_fraction,
            rng: ChaCha8Rng::seed_from_u64(seed),
            buffer: ReplayBuffer::new(cfg.replay_policy, cfg.replay_capacity_patches),
            store,
            fresh: heapless::Deque::new(),
            tiles: BTreeMap::new(),
            completed: Vec::new(),
            batches: BatchCounts::default(),
            pending: VecDeque::new(),
        }
    }

    /// The replay store (for its numbers).
    pub fn store(&self) -> &PatchStore {
        &self.store
    }

    /// The replay store: sync it before a checkpoint, tell it when one was written.
    pub fn store_mut(&mut self) -> &mut PatchStore {
        &mut self.store
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

    /// Whether the store's disk budget stopped the buffer's growth.
    pub fn replay_disk_full(&self) -> bool {
        self.buffer.budget_logged
    }

    /// Patches ever batched as fresh (each was offered to the buffer once).
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
        let mut members: Vec<Member> = (used.iter().enumerate())
            .map(|(k, slot)| (first_key + k as u64, slot.tile, Arc::clone(&slot.patch)))
            .collect();
        members.extend(self.replayed(n_replay, &used).expect("this batch's fresh patches are a pool"));
        let batch = self.batch(members, n_fresh);
        for slot in &used {
            self.buffer.offer(slot, &mut self.rng, &mut self.store);
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
        let members = self.replayed(batch_size, &[])?;
        let batch = self.batch(members, 0);
        self.batches.replay_only += 1;
        Some(batch)
    }

    /// The batch of `members`, numbered as the next one.
    fn batch(&self, members: Vec<Member>, fresh: usize) -> MixedBatch {
        let number = self.batches.fresh + self.batches.replay_only;
        let mut batch =
            MixedBatch { patches: Vec::new(), tiles: Vec::new(), fresh, number, keys: Vec::new() };
        for (key, tile, patch) in members {
            batch.keys.push(key);
            batch.tiles.push(tile);
            batch.patches.push(patch);
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
    /// batch's `fresh` ones. Stored patches that cannot be read leave the buffer and the draw is
    /// made again; `None` when no patch is left to draw from.
    fn replayed(&mut self, n: usize, fresh: &[Slot]) -> Option<Vec<Member>> {
        loop {
            let stored = self.buffer.slots.len();
            if n > 0 && stored + fresh.len() == 0 {
                return None;
            }
            let distinct = n.min(stored);
            let mut picks = rand::seq::index::sample(&mut self.rng, stored, distinct).into_vec();
            let pool = stored + fresh.len();
            picks.extend((distinct..n).map(|_| self.rng.random_range(0..pool)));
            match self.load(&picks, fresh) {
                Ok(members) => return Some(members),
                Err(unreadable) => self.buffer.drop_slots(unreadable, &mut self.store),
            }
        }
    }

    /// The members at `picks` (buffer slots, then `fresh`), or the slots that cannot be read.
    fn load(&mut self, picks: &[usize], fresh: &[Slot]) -> Result<Vec<Member>, Vec<usize>> {
        let stored = self.buffer.slots.len();
        let mut members = Vec::with_capacity(picks.len());
        let mut unreadable = Vec::new();
        for &i in picks {
            if let Some(slot) = i.checked_sub(stored).map(|j| &fresh[j]) {
                members.push((self.buffer.offered + (i - stored) as u64, slot.tile, Arc::clone(&slot.patch)));
                continue;
            }
            let BufferRef { tile, blob } = self.buffer.slots[i];
            match self.store.get(blob) {
                Ok(patch) => members.push((self.buffer.keys[i], tile, patch)),
                Err(e) => {
                    log::warn!("{e}; the patch leaves the replay buffer");
                    unreadable.push(i);
                }
            }
        }
        if unreadable.is_empty() { Ok(members) } else { Err(unreadable) }
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

    /// The whole state, for a checkpoint (sync the store before writing it).
    pub fn state(&self) -> MixerState {
        MixerState {
            rng: RngState::of(&self.rng),
            offered: self.buffer.offered,
            buffer: self.buffer.slots.clone(),
            fresh: (self.fresh.iter())
                .map(|slot| FreshPatch { tile: slot.tile, blob: store::encode(&slot.patch).bytes })
                .collect(),
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

    /// A mixer that continues exactly where `state` was taken, its buffer's patches in `store`.
    /// Tiles that were still being ingested skip the patches already pushed when they are pushed
    /// again. References to blobs the store lacks are dropped with a warning; blobs the state
    /// does not reference wait for collection.
    pub fn restore(cfg: &StreamConfig, state: MixerState, store: PatchStore) -> Mixer {
        let mut mixer = Mixer::new(cfg, 0, store);
        mixer.rng = state.rng.rng();
        mixer.buffer.offered = state.offered;
        let mut slots = state.buffer;
        let n = slots.len();
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
            slots.truncate(mixer.buffer.capacity);
            keys.truncate(mixer.buffer.capacity);
            embeddings.truncate(mixer.buffer.capacity);
        }
        let mut kept = (Vec::new(), Vec::new(), Vec::new());
        for ((slot, key), embedding) in slots.into_iter().zip(keys).zip(embeddings) {
            if mixer.store.acquire(slot.blob) {
                kept.0.push(slot);
                kept.1.push(key);
                kept.2.push(embedding);
            } else {
                let path = mixer.store.path(slot.blob);
                log::warn!("{}: stored replay patch missing; it leaves the replay buffer", path.display());
            }
        }
        mixer.store.retire_unreferenced(false);
        (mixer.buffer.slots, mixer.buffer.keys) = (kept.0, kept.1);
        mixer.buffer.redundancy = Redundancy::from_embeddings(kept.2);
        mixer.batches = batches;
        mixer.pending = pending.into();
        for fresh in state.fresh {
            let patch = match store::decode(&fresh.blob) {
                Ok(patch) => patch,
                Err(reason) => {
                    log::warn!(
                        "replay: a fresh patch of the checkpoint is damaged ({reason}); it is skipped"
                    );
                    continue;
                }
            };
            if mixer.fresh.push_back(Slot { tile: fresh.tile, patch: Arc::new(patch) }).is_err() {
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

/// Everything a [`Mixer`] needs to continue bit-exactly over its store: plain, serialisable data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerState {
    /// RNG position.
    pub rng: RngState,
    /// Patches ever offered to the buffer (reservoir and FIFO positions depend on it).
    pub offered: u64,
    /// Replay buffer references, slot by slot.
    pub buffer: Vec<BufferRef>,
    /// Fresh queue contents, oldest first (at most [`FRESH_CAPACITY`]).
    pub fresh: Vec<FreshPatch>,
    /// Tiles being ingested or in the fresh queue.
    pub tiles: Vec<(TileId, TileProgress)>,
    /// Completed tiles not yet taken.
    pub completed: Vec<TileId>,
    /// Batch counts, keys, embeddings.
    pub extra: MixerExtra,
}

/// A fresh patch in a [`MixerState`]: its tile and the patch encoded as a store blob (not
/// written to the store: fresh patches are not stored before they enter the buffer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreshPatch {
    /// The tile it came from.
    pub tile: TileId,
    /// [`store::encode`]'s bytes.
    pub blob: Vec<u8>,
}

/// The part of a mixer state added after the first checkpoint format.
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

/// The mixer state of checkpoint formats 1 and 2 (`serve.bin` before the replay store): the
/// buffer's patches themselves. [`LegacyMixerState::into_stored`] moves them into the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyMixerState {
    /// RNG position.
    pub rng: RngState,
    /// Patches ever offered to the buffer.
    pub offered: u64,
    /// Replay buffer contents, slot by slot.
    pub buffer: Vec<StoredPatch>,
    /// Fresh queue contents, oldest first.
    pub fresh: Vec<StoredPatch>,
    /// Tiles being ingested or in the fresh queue.
    pub tiles: Vec<(TileId, TileProgress)>,
    /// Completed tiles not yet taken.
    pub completed: Vec<TileId>,
    /// Added by format 2; the last field: a format-1 file reads as one that ends with
    /// `MixerExtra::default()` (see `service::checkpoints`).
    pub extra: MixerExtra,
}

impl LegacyMixerState {
    /// The current state: the buffer's patches written into `store` (durable after its next
    /// sync). A patch the store cannot write leaves the buffer with a warning.
    pub fn into_stored(self, store: &mut PatchStore) -> MixerState {
        let n = self.buffer.len();
        let MixerExtra { batches, mut keys, mut embeddings, pending } = self.extra;
        let aligned = keys.len() == n;
        embeddings.resize(n, None);
        let mut buffer = Vec::with_capacity(n);
        let mut written = vec![false; n];
        for (i, stored) in self.buffer.into_iter().enumerate() {
            let (tile, patch) = stored.into_patch();
            let blob = store::encode(&patch);
            match store.write(&blob) {
                Ok(()) => {
                    buffer.push(BufferRef { tile, blob: blob.id });
                    written[i] = true;
                }
                Err(e) => log::warn!("{e}; this patch of the checkpoint leaves the replay buffer"),
            }
        }
        let mut at = written.iter();
        embeddings.retain(|_| *at.next().expect("one flag per slot"));
        if aligned {
            let mut at = written.iter();
            keys.retain(|_| *at.next().expect("one flag per slot"));
        }
        let fresh = (self.fresh.into_iter())
            .map(|stored| {
                let (tile, patch) = stored.into_patch();
                FreshPatch { tile, blob: store::encode(&patch).bytes }
            })
            .collect();
        MixerState {
            rng: self.rng,
            offered: self.offered,
            buffer,
            fresh,
            tiles: self.tiles,
            completed: self.completed,
            extra: MixerExtra { batches, keys, embeddings, pending },
        }
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

/// A [`Patch`] with its tile, as checkpoint formats 1 and 2 held it.
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

impl StoredPatch {
    /// `patch` of `tile` as a format-2 checkpoint held it.
    pub fn new(tile: TileId, patch: &Patch) -> StoredPatch {
        StoredPatch {
            tile,
            data: patch.data.clone(),
            bands: patch.bands.clone(),
            height: patch.height,
            width: patch.width,
            source: patch.source.to_string_lossy().into_owned(),
            window: patch.window,
            nodata_fraction: patch.nodata_fraction,
        }
    }

    fn into_patch(self) -> (TileId, Patch) {
        let patch = Patch {
            data: self.data,
            bands: self.bands,
            height: self.height,
            width: self.width,
            source: PathBuf::from(self.source),
            window: self.window,
            nodata_fraction: self.nodata_fraction,
        };
        (self.tile, patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    /// A store in a new temp folder (keep the folder alive), 1 MB in memory, 1 GB on disk.
    fn store() -> (PatchStore, TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (PatchStore::open(dir.path(), 1 << 20, 1 << 30).unwrap(), dir)
    }

    /// A mixer over a store in a new temp folder.
    fn new_mixer(c: &StreamConfig, seed: u64) -> (Mixer, TempDir) {
        let (store, dir) = store();
        (Mixer::new(c, seed, store), dir)
    }

    /// A second store over `dir` (what a restarted service opens).
    fn reopen(dir: &TempDir) -> PatchStore {
        PatchStore::open(dir.path(), 1 << 20, 1 << 30).unwrap()
    }

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
            let (mut store, _dir) = store();
            let mut buffer = ReplayBuffer::new(ReplayPolicy::Reservoir, 100);
            for n in 0..10_000 {
                buffer.offer(&Slot { tile: TileId(n), patch: Arc::new(patch(0)) }, &mut rng, &mut store);
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
        let (mut store, _dir) = store();
        let mut buffer = ReplayBuffer::new(ReplayPolicy::Fifo, 10);
        for n in 0..95 {
            buffer.offer(&Slot { tile: TileId(n), patch: Arc::new(patch(0)) }, &mut rng, &mut store);
        }
        let mut kept: Vec<u64> = buffer.slots.iter().map(|s| s.tile.0).collect();
        kept.sort();
        assert_eq!(kept, (85..95).collect::<Vec<_>>());
    }

    #[test]
    fn memory_stays_bounded_however_many_patches_arrive() {
        let (mut mixer, _dir) = new_mixer(&cfg(50, ReplayPolicy::Reservoir, 0.5), 1);
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
        let (mut mixer, _dir) = new_mixer(&cfg(100, ReplayPolicy::Reservoir, 0.25), 3);
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
        let (mut mixer, _dir) = new_mixer(&cfg(100, ReplayPolicy::Reservoir, 0.5), 5);
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
        let (mut mixer, _dir) = new_mixer(&cfg(100, ReplayPolicy::Reservoir, 0.5), 9);
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
        let (mut mixer, _dir) = new_mixer(&cfg(100, ReplayPolicy::Reservoir, 1.0), 0);
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
        let (mut straight, _dir) = new_mixer(&c, 42);
        let first = feed(&mut straight, 0, 40, 6);
        // a tile half pushed at the checkpoint
        for n in 40..43 {
            straight.push_fresh(TileId(40), patch(n)).unwrap();
        }
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        assert_eq!(saved, straight.state());
        let mut resumed = Mixer::restore(&c, saved, reopen(&_dir));
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
        let (a, b) = (rehearse(&mut straight), rehearse(&mut Mixer::restore(&c, saved, reopen(&_dir))));
        assert_eq!(a, b, "replay-only batches continue the same way after a restore");
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        resumed = Mixer::restore(&c, saved, reopen(&_dir));
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

    fn kept(mixer: &mut Mixer) -> Vec<u32> {
        let blobs: Vec<BlobId> = mixer.buffer.slots.iter().map(|s| s.blob).collect();
        let mut kept: Vec<u32> = blobs.iter().map(|&b| mixer.store.get(b).unwrap().window.x).collect();
        kept.sort();
        kept
    }

    #[test]
    fn min_redundancy_keeps_the_distinct_patches_that_reservoir_sampling_loses() {
        let run = |policy| {
            let (mut mixer, _dir) = new_mixer(&cfg(10, policy, 0.5), 4);
            stream_with_embeddings(&mut mixer, 0, 60);
            kept(&mut mixer)
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
        let (mut straight, _dir) = new_mixer(&c, 8);
        stream_with_embeddings(&mut straight, 0, 31);
        let saved = MixerState::from_bytes(&straight.state().to_bytes()).unwrap();
        assert!(!saved.extra.pending.is_empty() && saved.extra.embeddings.iter().any(Option::is_some));
        let mut resumed = Mixer::restore(&c, saved, reopen(&_dir));
        let (a, b) =
            (stream_with_embeddings(&mut straight, 31, 80), stream_with_embeddings(&mut resumed, 31, 80));
        assert_eq!(a, b);
        assert_eq!(straight.state(), resumed.state());
    }

    /// A `side` x `side` one-band patch whose values (whole DN / 10000) and window encode `n`.
    fn square(n: u32, side: usize) -> Patch {
        Patch {
            data: (0..side * side).map(|i| ((n as usize * 7 + i) % 60_000) as f32 / 10000.0).collect(),
            bands: vec!["B04".into()],
            height: side,
            width: side,
            source: PathBuf::from("t.tif"),
            window: Window { x: n, y: 0, width: side as u32, height: side as u32 },
            nodata_fraction: 0.0,
        }
    }

    /// Push `n` patches of `side` px through `mixer` in batches of 8, as tiles 0..n, until each
    /// was offered to the buffer.
    fn fill(mixer: &mut Mixer, n: u32, side: usize) {
        for i in 0..n {
            mixer.push_fresh(TileId(i as u64), square(i, side)).unwrap();
            mixer.finish_tile(TileId(i as u64));
            if mixer.fresh_len() == 8 {
                mixer.next_batch(8).unwrap();
            }
        }
        while mixer.next_batch(8).is_some() {}
        assert_eq!(mixer.fresh_patches(), u64::from(n));
    }

    #[test]
    fn a_damaged_or_missing_stored_patch_leaves_the_buffer_and_batches_go_on() {
        let (mut mixer, _dir) = new_mixer(&cfg(100, ReplayPolicy::Fifo, 0.5), 2);
        fill(&mut mixer, 16, 4);
        assert_eq!(mixer.replay_len(), 16);
        let blobs: Vec<BlobId> = mixer.buffer.slots.iter().map(|s| s.blob).collect();
        // evict from memory, then damage one blob and delete another
        mixer.store = reopen(&_dir);
        for &b in &blobs {
            assert!(mixer.store.acquire(b));
        }
        let damaged = mixer.store.path(blobs[3]);
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&damaged, bytes).unwrap();
        std::fs::remove_file(mixer.store.path(blobs[9])).unwrap();
        for _ in 0..4 {
            let batch = mixer.next_replay_batch(16).expect("the readable patches still make batches");
            assert_eq!(batch.patches.len(), 16);
            assert!(batch.patches.iter().all(|p| p.window.x != 3 && p.window.x != 9));
        }
        assert_eq!(mixer.replay_len(), 14);
        assert_eq!(mixer.store.stats().read_failures, 2);
        assert!(!mixer.buffer.slots.iter().any(|s| s.blob == blobs[3] || s.blob == blobs[9]));
    }

    #[test]
    fn the_memory_budget_holds_while_100_000_patches_pass_through_the_store() {
        // reservoir sampling into 1,000 slots: about 5,600 of the 100,000 patches are written
        // (keeping the test fast on a slow disk), the rest only pass the mixer
        let c = cfg(1_000, ReplayPolicy::Reservoir, 0.5);
        let dir = tempfile::tempdir().unwrap();
        let budget = 64 * 1024;
        let mut mixer = Mixer::new(&c, 6, PatchStore::open(dir.path(), budget, 1 << 30).unwrap());
        for i in 0..100_000u32 {
            mixer.push_fresh(TileId(i as u64), square(i, 8)).unwrap();
            if mixer.fresh_len() == 8 {
                mixer.next_batch(16).unwrap();
            }
            if i % 10_000 == 9_999 {
                mixer.next_replay_batch(64).unwrap();
                assert!(mixer.store.stats().cache_bytes <= budget as usize);
            }
            if i % 25_000 == 24_999 {
                mixer.store.sync().unwrap();
                mixer.store.checkpoint_written(1);
            }
        }
        let stats = mixer.store.stats();
        assert_eq!(mixer.replay_len(), 1_000);
        assert!(stats.cache_bytes <= budget as usize && stats.cache_bytes > budget as usize / 2, "{stats:?}");
        assert!(stats.blobs < 3_000, "evicted blobs were collected: {stats:?}");
    }

    #[test]
    fn the_state_grows_with_the_number_of_stored_patches_not_their_size() {
        let sizes: Vec<usize> = [8, 64]
            .into_iter()
            .map(|side| {
                let (mut mixer, _dir) = new_mixer(&cfg(100, ReplayPolicy::Reservoir, 0.5), 1);
                fill(&mut mixer, 200, side);
                assert_eq!((mixer.replay_len(), mixer.fresh_len()), (100, 0));
                mixer.state().to_bytes().len()
            })
            .collect();
        assert_eq!(sizes[0], sizes[1]);
        assert!(sizes[0] < 100 * 40, "{} bytes for 100 references", sizes[0]);
    }

    #[test]
    fn past_the_disk_budget_the_buffer_stops_growing_and_replaces_patches_as_at_capacity() {
        let blob_bytes = store::encode(&square(0, 4)).bytes.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let store = PatchStore::open(dir.path(), 1 << 20, 10 * blob_bytes + blob_bytes / 2).unwrap();
        let mut mixer = Mixer::new(&cfg(100, ReplayPolicy::Fifo, 0.5), 1, store);
        fill(&mut mixer, 40, 4);
        assert_eq!(mixer.replay_len(), 10);
        assert!(mixer.replay_disk_full());
        assert_eq!(kept(&mut mixer), (30..40).collect::<Vec<_>>(), "FIFO keeps the newest ten");
    }

    #[test]
    fn a_patch_the_store_cannot_write_stays_out_of_the_buffer_and_training_goes_on() {
        let (mut mixer, dir) = new_mixer(&cfg(100, ReplayPolicy::Fifo, 0.5), 1);
        // a file where patch 5's shard folder goes: its write fails as on a broken disk
        let shard = mixer.store.path(store::encode(&square(5, 4)).id).parent().unwrap().to_path_buf();
        std::fs::write(&shard, b"in the way").unwrap();
        fill(&mut mixer, 16, 4);
        assert_eq!(mixer.store.stats().write_failures, 1);
        assert!(!kept(&mut mixer).contains(&5));
        assert_eq!(mixer.replay_len(), 15);
        drop(dir);
    }
}
