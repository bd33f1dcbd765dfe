//! The replay store: the patches of the replay buffer on disk, content-addressed, so that the
//! buffer can hold far more patches than fit in memory and a checkpoint names them instead of
//! carrying them.
//!
//! A stored patch never changes. Its file, a *blob*, lives at
//! `<state_dir>/replay/<first two hex digits>/<32 hex digits>.patch`; the name is the xxh3-128
//! hash of the file's bytes ([`BlobId`]), checked on every read, so a damaged or missing blob is
//! a clear error naming its file (the [`super::Mixer`] then drops the reference and goes on).
//!
//! **Encoding (never lossy).** A blob is an 8-byte magic, a postcard header (format version,
//! band names, per-band encoding, height, width, source, window, nodata fraction) and the
//! values band by band, little-endian. A band whose every value is `DN / 10000` for an integer DN
//! in `0..=65535` (what ingest makes of 10 m Sentinel-2 bands) is stored as u16 DN, half the
//! bytes of f32, and decodes to the very same f32 bits; any other band (bicubic-resampled 20 m
//! and 60 m bands, values from elsewhere) is stored as f32. f16 would halve those too, but it
//! keeps 11 significant bits (reflectance 0.1234 would read back as 0.12341): resumed runs would
//! no longer train bit for bit like straight ones, so it is not used.
//!
//! **Durability.** Blobs are written through a temp file and a rename
//! ([`fsio::write_new_deferred`]) but not fsynced one by one: [`PatchStore::sync`] fsyncs every
//! blob written since the last call and their folders (or, past a few dozen, flushes the whole
//! filesystem with one `syncfs`), and the checkpoint writer calls it before it writes a
//! checkpoint that names them. A crash can leave unsynced blobs damaged; nothing
//! durable refers to them, and they are collected.
//!
//! **Budgets.** Decoded patches stay in a [`PatchCache`] of `stream.replay_memory_mb`. The blobs
//! the buffer references may take `stream.replay_disk_mb` ([`PatchStore::fits`]); the buffer
//! stops growing at that size. Released blobs wait for collection on top of that budget.
//!
//! **Collection.** The store counts references. A blob whose last reference is released may still
//! be named by a kept checkpoint: it waits until `serve.keep_checkpoints` further checkpoints were
//! written ([`PatchStore::checkpoint_written`]), then it is deleted unless referenced again. At
//! start-up every blob the restored state does not reference waits the same way (older kept
//! checkpoints may name it); with no checkpoint to resume from they are deleted at once.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use crate::fsio;
use crate::tile::PatchCache;
use crate::tile::{Patch, Window};

/// Folder (under the state folder) holding the replay store.
pub const STORE_DIR: &str = "replay";
const MAGIC: &[u8; 8] = b"dspatch\0";
const VERSION: u32 = 1;
const EXTENSION: &str = "patch";
/// Above this many unsynced blobs, [`PatchStore::sync`] flushes the filesystem (`syncfs`) instead
/// of fsyncing each file and folder.
const SYNCFS_FROM_FILES: usize = 64;
/// DN per unit of reflectance (ingest divides by it).
const DN_SCALE: f32 = 10000.0;

/// The name of a blob: the xxh3-128 hash of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 16]);

impl BlobId {
    fn of(bytes: &[u8]) -> BlobId {
        BlobId(xxh3_128(bytes).to_be_bytes())
    }

    fn parse(hex: &str) -> Option<BlobId> {
        let value = u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32)?;
        Some(BlobId(value.to_be_bytes()))
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", u128::from_be_bytes(self.0))
    }
}

/// A replay store operation that failed; each names the blob's file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The blob cannot be read (missing, unreadable).
    #[error("{path}: cannot read this stored replay patch: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The blob's bytes are not what was stored.
    #[error("{path}: damaged stored replay patch ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    /// The blob cannot be written (disk full, read-only).
    #[error("{path}: cannot store this replay patch: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// A patch encoded as a blob, with its name.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The blob's name.
    pub id: BlobId,
    /// The blob's bytes.
    pub bytes: Vec<u8>,
}

/// How one band's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Encoding {
    /// u16 DN; the value is `DN / 10000`.
    Dn16,
    /// f32 as is.
    F32,
}

/// Everything of a [`Patch`] but its values.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    bands: Vec<String>,
    encodings: Vec<Encoding>,
    height: u32,
    width: u32,
    source: String,
    window: Window,
    nodata_fraction: f32,
}

/// Encode `patch` as a blob (see the module doc).
pub fn encode(patch: &Patch) -> Encoded {
    let plane = patch.height * patch.width;
    let planes: Vec<&[f32]> = patch.data.chunks(plane.max(1)).collect();
    let encodings: Vec<Encoding> = planes
        .iter()
        .map(|p| if p.iter().all(|&v| dn(v).is_some()) { Encoding::Dn16 } else { Encoding::F32 })
        .collect();
    let header = Header {
        version: VERSION,
        bands: patch.bands.clone(),
        encodings: encodings.clone(),
        height: patch.height as u32,
        width: patch.width as u32,
        source: patch.source.to_string_lossy().into_owned(),
        window: patch.window,
        nodata_fraction: patch.nodata_fraction,
    };
    let mut bytes = MAGIC.to_vec();
    bytes = postcard::to_extend(&header, bytes).expect("a patch header always serialises");
    for (values, encoding) in planes.iter().zip(&encodings) {
        for &v in values.iter() {
            match encoding {
                Encoding::Dn16 => bytes.extend(dn(v).expect("checked above").to_le_bytes()),
                Encoding::F32 => bytes.extend(v.to_le_bytes()),
            }
        }
    }
    Encoded { id: BlobId::of(&bytes), bytes }
}

/// The DN whose `DN / 10000` is exactly `v` (same bits), if there is one in `0..=65535`.
fn dn(v: f32) -> Option<u16> {
    let n = (f64::from(v) * f64::from(DN_SCALE)).round();
    if !(0.0..=65535.0).contains(&n) {
        return None;
    }
    let n = n as u16;
    ((f32::from(n) / DN_SCALE).to_bits() == v.to_bits()).then_some(n)
}

/// Decode what [`encode`] wrote; the error says what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Patch, String> {
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or("not a dinostream patch (bad magic)")?;
    let (header, payload): (Header, &[u8]) =
        postcard::take_from_bytes(rest).map_err(|e| format!("unreadable header: {e}"))?;
    if header.version != VERSION {
        return Err(format!("format {} (this build reads {VERSION})", header.version));
    }
    let plane = header.height as usize * header.width as usize;
    let expected: usize =
        header.encodings.iter().map(|e| plane * if *e == Encoding::Dn16 { 2 } else { 4 }).sum();
    if header.encodings.len() != header.bands.len() || payload.len() != expected {
        return Err(format!(
            "{} value bytes for {} bands of {plane} pixels",
            payload.len(),
            header.bands.len()
        ));
    }
    let mut data = Vec::with_capacity(plane * header.bands.len());
    let mut at = payload;
    for encoding in &header.encodings {
        let width = if *encoding == Encoding::Dn16 { 2 } else { 4 };
        let (band, rest) = at.split_at(plane * width);
        at = rest;
        match encoding {
            Encoding::Dn16 => data
                .extend(band.chunks_exact(2).map(|b| f32::from(u16::from_le_bytes([b[0], b[1]])) / DN_SCALE)),
            Encoding::F32 => {
                data.extend(band.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
        }
    }
    Ok(Patch {
        data,
        bands: header.bands,
        height: header.height as usize,
        width: header.width as usize,
        source: PathBuf::from(header.source),
        window: header.window,
        nodata_fraction: header.nodata_fraction,
    })
}

/// A blob on disk.
#[derive(Debug, Clone, Copy)]
struct Blob {
    bytes: u64,
    /// References from the replay buffer.
    refs: u32,
    /// Written by this process (a blob found at start-up may be a damaged leftover of a crash).
    written: bool,
}

/// The store's numbers, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Blobs on disk (referenced or waiting for collection).
    pub blobs: usize,
    /// Their bytes.
    pub disk_bytes: u64,
    /// Bytes of the referenced blobs (what `stream.replay_disk_mb` bounds).
    pub live_bytes: u64,
    /// Bytes of decoded patches in memory.
    pub cache_bytes: usize,
    /// Patches that could not be written (they stayed out of the replay buffer).
    pub write_failures: u64,
    /// Blobs that could not be read back (their references were dropped).
    pub read_failures: u64,
}

/// The content-addressed patch store; see the module doc.
#[derive(Debug)]
pub struct PatchStore {
    root: PathBuf,
    cache: PatchCache<BlobId>,
    blobs: HashMap<BlobId, Blob>,
    disk_bytes: u64,
    live_bytes: u64,
    budget_bytes: u64,
    /// Released blobs and the number of checkpoints written when they were released.
    graveyard: HashMap<BlobId, u64>,
    /// Checkpoints written since the store was opened.
    generation: u64,
    /// Blob files written since the last [`PatchStore::sync`].
    unsynced: Vec<PathBuf>,
    /// Folders with entries created since the last sync.
    unsynced_dirs: BTreeSet<PathBuf>,
    write_failures: u64,
    read_failures: u64,
}

impl PatchStore {
    /// Open (or create) the store in `root`, with `memory_bytes` of decoded patches in memory and
    /// `disk_bytes` of referenced blobs on disk. Lists the blobs there (none referenced yet) and
    /// removes the temp files of interrupted writes.
    pub fn open(root: &Path, memory_bytes: u64, disk_bytes: u64) -> Result<PatchStore, StoreError> {
        let failed = |source| StoreError::Write { path: root.to_path_buf(), source };
        std::fs::create_dir_all(root).map_err(failed)?;
        let mut store = PatchStore {
            root: root.to_path_buf(),
            cache: PatchCache::new(usize::try_from(memory_bytes).unwrap_or(usize::MAX)),
            blobs: HashMap::new(),
            disk_bytes: 0,
            live_bytes: 0,
            budget_bytes: disk_bytes,
            graveyard: HashMap::new(),
            generation: 0,
            unsynced: Vec::new(),
            unsynced_dirs: BTreeSet::new(),
            write_failures: 0,
            read_failures: 0,
        };
        store.scan().map_err(failed)?;
        Ok(store)
    }

    /// Register every blob in the shard folders; sweep temp files.
    fn scan(&mut self) -> io::Result<()> {
        for shard in std::fs::read_dir(&self.root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            fsio::sweep_temp_files(&shard.path());
            for entry in std::fs::read_dir(shard.path())?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(&format!(".{EXTENSION}")).and_then(BlobId::parse) else {
                    continue;
                };
                let bytes = entry.metadata()?.len();
                self.blobs.insert(id, Blob { bytes, refs: 0, written: false });
                self.disk_bytes += bytes;
            }
        }
        Ok(())
    }

    /// The folder of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `id` lives.
    pub fn path(&self, id: BlobId) -> PathBuf {
        let hex = id.to_string();
        self.root.join(&hex[..2]).join(format!("{hex}.{EXTENSION}"))
    }

    /// Whether referencing `blob` keeps the referenced blobs within `stream.replay_disk_mb`.
    pub fn fits(&self, blob: &Encoded) -> bool {
        self.blobs.get(&blob.id).is_some_and(|b| b.refs > 0)
            || self.live_bytes + blob.bytes.len() as u64 <= self.budget_bytes
    }

    /// Write `blob` unless this process wrote it already (then nothing is written). A blob found
    /// at start-up, or one that failed to read back, is written again: it may be damaged. It is
    /// durable after the next [`PatchStore::sync`]. A failure is counted.
    pub fn write(&mut self, blob: &Encoded) -> Result<(), StoreError> {
        let found = self.blobs.get(&blob.id).copied();
        if found.is_some_and(|b| b.written) {
            return Ok(());
        }
        let path = self.path(blob.id);
        let shard = path.parent().expect("a blob path has a shard folder").to_path_buf();
        let written = (|| {
            if !shard.exists() {
                std::fs::create_dir_all(&shard)?;
                self.unsynced_dirs.insert(self.root.clone());
            }
            fsio::write_new_deferred(&path, &blob.bytes)
        })();
        if let Err(source) = written {
            self.write_failures += 1;
            return Err(StoreError::Write { path, source });
        }
        self.unsynced.push(path);
        self.unsynced_dirs.insert(shard);
        let (bytes, old) =
            (blob.bytes.len() as u64, found.unwrap_or(Blob { bytes: 0, refs: 0, written: false }));
        self.blobs.insert(blob.id, Blob { bytes, refs: old.refs, written: true });
        self.disk_bytes = self.disk_bytes + bytes - old.bytes;
        if old.refs > 0 {
            self.live_bytes = self.live_bytes + bytes - old.bytes;
        }
        Ok(())
    }

    /// Keep the decoded `patch` of blob `id` in memory (within the memory budget).
    pub fn cache(&mut self, id: BlobId, patch: Arc<Patch>) {
        self.cache.insert(id, patch);
    }

    /// Reference blob `id` once more; false when the store does not hold it.
    pub fn acquire(&mut self, id: BlobId) -> bool {
        let Some(blob) = self.blobs.get_mut(&id) else { return false };
        if blob.refs == 0 {
            self.live_bytes += blob.bytes;
            self.graveyard.remove(&id);
        }
        blob.refs += 1;
        true
    }

    /// Drop one reference to blob `id`; without references it waits for collection.
    pub fn release(&mut self, id: BlobId) {
        let Some(blob) = self.blobs.get_mut(&id).filter(|b| b.refs > 0) else { return };
        blob.refs -= 1;
        if blob.refs == 0 {
            self.live_bytes -= blob.bytes;
            self.graveyard.insert(id, self.generation);
            self.cache.remove(&id);
        }
    }

    /// The patch of blob `id`, from memory or read (and checked) from disk.
    pub fn get(&mut self, id: BlobId) -> Result<Arc<Patch>, StoreError> {
        if let Some(patch) = self.cache.get(&id) {
            return Ok(patch);
        }
        let path = self.path(id);
        let read = match std::fs::read(&path) {
            Ok(bytes) => check(id, &bytes).map_err(|reason| StoreError::Corrupt { path, reason }),
            Err(source) => Err(StoreError::Read { path, source }),
        };
        if read.is_err() {
            self.read_failures += 1;
            if let Some(blob) = self.blobs.get_mut(&id) {
                blob.written = false; // written again if the same patch is stored again
            }
        }
        let patch = Arc::new(read?);
        self.cache.insert(id, Arc::clone(&patch));
        Ok(patch)
    }

    /// Make every blob written so far durable (fsync the files, then their folders). Call before
    /// writing a checkpoint that references them.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced.len() > SYNCFS_FROM_FILES {
            // one filesystem flush costs far less than thousands of fsyncs (each a journal commit)
            fsio::sync_filesystem(&self.root).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: cannot sync: {e}", self.root.display()))
            })?;
            self.unsynced.clear();
            self.unsynced_dirs.clear();
            return Ok(());
        }
        for path in &self.unsynced {
            match File::open(path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // collected before it was synced: nothing refers to it any more
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("{}: cannot fsync: {e}", path.display())));
                }
            }
        }
        self.unsynced.clear();
        for dir in std::mem::take(&mut self.unsynced_dirs) {
            fsio::sync_dir(&dir)?;
        }
        Ok(())
    }

    /// A checkpoint was written (and older ones beyond `keep` removed): delete the released blobs
    /// no kept checkpoint can name any more. Returns how many were deleted.
    pub fn checkpoint_written(&mut self, keep: usize) -> usize {
        self.generation += 1;
        let generation = self.generation;
        let due: Vec<BlobId> = self
            .graveyard
            .iter()
            .filter(|&(_, &g)| g + keep as u64 <= generation)
            .map(|(&id, _)| id)
            .collect();
        due.into_iter().filter(|&id| self.delete(id)).count()
    }

    /// Every blob without a reference now: wait for collection (a kept checkpoint may name it),
    /// or, with `no_checkpoint` (nothing to resume from), delete it at once.
    pub fn retire_unreferenced(&mut self, no_checkpoint: bool) {
        let unreferenced: Vec<BlobId> =
            self.blobs.iter().filter(|(_, b)| b.refs == 0).map(|(&id, _)| id).collect();
        for id in unreferenced {
            if no_checkpoint {
                self.delete(id);
            } else {
                self.graveyard.insert(id, self.generation);
            }
        }
    }

    /// Delete an unreferenced blob; false when it could not be deleted (logged; tried again at
    /// the next start).
    fn delete(&mut self, id: BlobId) -> bool {
        self.graveyard.remove(&id);
        let Some(blob) = self.blobs.get(&id).copied().filter(|b| b.refs == 0) else { return false };
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                log::warn!("{}: cannot delete this unused replay patch: {e}", path.display());
                return false;
            }
        }
        self.blobs.remove(&id);
        self.disk_bytes -= blob.bytes;
        self.cache.remove(&id);
        true
    }

    /// The store's numbers.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            blobs: self.blobs.len(),
            disk_bytes: self.disk_bytes,
            live_bytes: self.live_bytes,
            cache_bytes: self.cache.bytes(),
            write_failures: self.write_failures,
            read_failures: self.read_failures,
        }
    }

    /// `stream.replay_disk_mb` in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }
}

/// Check `bytes` against their name `id` and decode them.
fn check(id: BlobId, bytes: &[u8]) -> Result<Patch, String> {
    let found = BlobId::of(bytes);
    if found != id {
        return Err(format!("its content hashes to {found}, not to its name; it was changed or cut short"));
    }
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-band 2x3 patch with `values` in both bands (band 2 scaled by `second`).
    fn patch(values: [f32; 6], second: f32) -> Patch {
        let mut data = values.to_vec();
        data.extend(values.iter().map(|v| v * second));
        Patch {
            data,
            bands: vec!["B04".into(), "B08".into()],
            height: 2,
            width: 3,
            source: PathBuf::from("tiles/t.tif"),
            window: Window { x: 5, y: 7, width: 3, height: 2 },
            nodata_fraction: 0.25,
        }
    }

    fn bits(p: &Patch) -> Vec<u32> {
        p.data.iter().map(|v| v.to_bits()).collect()
    }

    fn open(dir: &Path, memory: u64, disk: u64) -> PatchStore {
        PatchStore::open(dir, memory, disk).unwrap()
    }

    #[test]
    fn dn_bands_are_stored_as_u16_other_values_as_f32_and_both_read_back_bit_for_bit() {
        let whole = [0.0, 1.0 / 10000.0, 1234.0 / 10000.0, 0.5, 6.5535, 42.0 / 10000.0];
        for (p, u16_bands) in [
            (patch(whole, 1.0), 2),
            // band 2 is 3 * DN / 10000: not DN / 10000 of a whole DN for every value
            (patch(whole, 3.000_001), 1),
            (patch([1.0 / 3.0, -0.0, 7.0, f32::NAN, -1e-3, 0.1], 1.0), 0),
        ] {
            let blob = encode(&p);
            let values = p.data.len();
            let header = blob.bytes.len() - (u16_bands * 6 * 2 + (2 - u16_bands) * 6 * 4);
            assert!(header < 100, "{header} header bytes");
            let back = decode(&blob.bytes).unwrap();
            assert_eq!(bits(&back), bits(&p), "{values} values");
            assert_eq!(
                (&back.bands, back.window, back.source.clone()),
                (&p.bands, p.window, p.source.clone())
            );
            assert_eq!((back.height, back.width, back.nodata_fraction), (2, 3, 0.25));
        }
        assert_eq!(dn(6.5536), None, "past u16");
        assert_eq!(dn(-0.0), None, "-0.0 would read back as +0.0");
    }

    #[test]
    fn a_stored_patch_reads_back_from_disk_and_damage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 0, 1 << 20);
        let p = patch([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1.0);
        let blob = encode(&p);
        store.write(&blob).unwrap();
        store.sync().unwrap();
        assert!(store.acquire(blob.id));
        let path = store.path(blob.id);
        assert!(path.starts_with(dir.path().join(&blob.id.to_string()[..2])), "{}", path.display());
        assert_eq!(bits(&store.get(blob.id).unwrap()), bits(&p), "read from disk (no memory budget)");
        let mut damaged = std::fs::read(&path).unwrap();
        *damaged.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let err = store.get(blob.id).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = store.get(blob.id).unwrap_err();
        assert!(
            matches!(err, StoreError::Read { .. }) && err.to_string().contains(&blob.id.to_string()),
            "{err}"
        );
        assert_eq!(store.stats().read_failures, 2);
        // the same patch stored again replaces the damaged file
        store.write(&blob).unwrap();
        assert_eq!(bits(&store.get(blob.id).unwrap()), bits(&p));
    }

    #[test]
    fn released_blobs_are_deleted_only_once_every_kept_checkpoint_is_newer() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 1 << 20, 1 << 20);
        let blobs: Vec<Encoded> = (0..3).map(|i| encode(&patch([i as f32; 6], 1.0))).collect();
        for blob in &blobs {
            store.write(blob).unwrap();
            store.acquire(blob.id);
        }
        let keep = 2;
        assert_eq!(store.checkpoint_written(keep), 0); // checkpoint 1 names all three
        store.release(blobs[0].id);
        store.release(blobs[1].id);
        assert_eq!(store.checkpoint_written(keep), 0, "checkpoint 1 is kept and names them");
        store.acquire(blobs[1].id); // stored again: referenced, never deleted
        assert_eq!(store.checkpoint_written(keep), 1, "checkpoints 2 and 3 do not name blob 0");
        assert!(!store.path(blobs[0].id).exists() && store.path(blobs[1].id).exists());
        assert_eq!(store.stats().blobs, 2);
        store.release(blobs[1].id);
        for _ in 0..keep - 1 {
            assert_eq!(store.checkpoint_written(keep), 0);
        }
        assert_eq!(store.checkpoint_written(keep), 1);
        assert!(store.path(blobs[2].id).exists());
        assert_eq!(store.stats().live_bytes, blobs[2].bytes.len() as u64);
    }

    #[test]
    fn at_start_up_unreferenced_blobs_wait_for_the_kept_checkpoints_or_go_at_once_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), 1 << 20, 1 << 20);
        let (a, b) = (encode(&patch([0.1; 6], 1.0)), encode(&patch([0.2; 6], 1.0)));
        store.write(&a).unwrap();
        store.write(&b).unwrap();
        let temp = store.path(a.id).with_file_name(".x.patch.tmp.123");
        std::fs::write(&temp, b"half").unwrap();
        drop(store);
        let mut restarted = open(dir.path(), 1 << 20, 1 << 20);
        assert!(!temp.exists(), "an interrupted write's temp file is swept");
        assert_eq!(restarted.stats().blobs, 2);
        assert!(restarted.acquire(a.id), "the restored state names a");
        restarted.retire_unreferenced(false);
        assert_eq!(restarted.checkpoint_written(1), 1, "b goes once the new checkpoint is the only one kept");
        assert!(restarted.path(a.id).exists() && !restarted.path(b.id).exists());
        drop(restarted);
        let mut fresh_start = open(dir.path(), 1 << 20, 1 << 20);
        fresh_start.retire_unreferenced(true);
        assert_eq!(fresh_start.stats(), StoreStats::default());
    }

    #[test]
    fn the_disk_budget_counts_referenced_blobs_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = encode(&patch([0.1; 6], 1.0));
        let mut store = open(dir.path(), 1 << 20, a.bytes.len() as u64);
        assert!(store.fits(&a));
        store.write(&a).unwrap();
        store.acquire(a.id);
        assert!(store.fits(&a), "a second reference takes no more disk");
        assert!(!store.fits(&encode(&patch([0.2; 6], 1.0))));
        store.release(a.id);
        assert!(store.fits(&encode(&patch([0.2; 6], 1.0))), "released blobs do not count");
    }
}
