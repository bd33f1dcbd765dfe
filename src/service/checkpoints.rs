//! The service's checkpoints: one folder per saved step under `<state_dir>/checkpoints/`,
//! `step-<step>/`, holding the trainer ([`crate::dino::checkpoint`]: weights, optimiser moments,
//! centre, RNG) and `serve.bin` (the mixer's whole state and the augmentation sample counter).
//!
//! `serve.bin` is postcard, format 3: the replay buffer as references into the replay store
//! ([`crate::stream::store`], synced before the checkpoint is written), so its size grows with
//! the number of stored patches and the bounded fresh queue, not with their bytes. Formats 1 and 2
//! (the buffer's patches inside `serve.bin`) still load: their patches are written into the store.
//!
//! A checkpoint is written into `.partial-step-<step>/` and renamed into place once every file is
//! complete and synced ([`fsio::rename_durable`]), so the previous checkpoint stays valid until
//! the new one exists. Only then are checkpoints beyond the newest `keep` deleted. Loading takes the
//! newest folder that reads back completely and skips (with a warning) any that do not.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::Precision;
use crate::dino::{Trainer, checkpoint};
use crate::fsio;
use crate::stream::{LegacyMixerState, MixerExtra, MixerState, PatchStore};

/// Folder (under the state folder) holding the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The service's own part of a checkpoint.
pub const SERVE_FILE: &str = "serve.bin";
const PARTIAL_PREFIX: &str = ".partial-";
const STEP_PREFIX: &str = "step-";
const FORMAT: u32 = 3;
/// `serve.bin` with the replay buffer's patches inside ([`LegacyMixerState`]).
const FORMAT_WITH_PATCHES: u32 = 2;
/// `serve.bin` before [`MixerExtra`]: format 2 without its last field.
const FORMAT_WITHOUT_BATCH_COUNTS: u32 = 1;

/// Everything besides the trainer that a bit-exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeState {
    /// Format version of `serve.bin`.
    pub format: u32,
    /// The step this state belongs to (must match the trainer's).
    pub step: u64,
    /// The next augmentation sample id (each sample's views are seeded by its id).
    pub next_sample_id: u64,
    /// The mixer: RNG, replay buffer, fresh queue, per-tile progress.
    pub mixer: MixerState,
}

impl ServeState {
    /// A state for `step`.
    pub fn new(step: u64, next_sample_id: u64, mixer: MixerState) -> ServeState {
        ServeState { format: FORMAT, step, next_sample_id, mixer }
    }
}

/// `serve.bin` of formats 1 and 2: the buffer's patches inside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyServeState {
    /// Format version (1 or 2).
    pub format: u32,
    /// The step this state belongs to.
    pub step: u64,
    /// The next augmentation sample id.
    pub next_sample_id: u64,
    /// The mixer, its buffer's patches included.
    pub mixer: LegacyMixerState,
}

/// What a `serve.bin` holds.
#[derive(Debug, Clone, PartialEq)]
enum Decoded {
    Current(ServeState),
    WithPatches(LegacyServeState),
}

/// A checkpoint read back.
pub struct Resumed {
    /// The trainer, ready for its next step.
    pub trainer: Trainer,
    /// The service state of the same step.
    pub state: ServeState,
    /// Where it was read from.
    pub dir: PathBuf,
}

/// The checkpoints folder of a state folder.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CHECKPOINTS_DIR)
}

/// Write a checkpoint of `trainer` and `state` and keep the newest `keep`. Returns its folder.
pub fn save(state_dir: &Path, trainer: &Trainer, state: &ServeState, keep: usize) -> Result<PathBuf> {
    let root = dir(state_dir);
    let name = format!("{STEP_PREFIX}{:012}", state.step);
    let partial = root.join(format!("{PARTIAL_PREFIX}{name}"));
    let done = root.join(&name);
    remove_dir(&partial)?;
    if let Err(e) = write_complete(&partial, &done, trainer, state) {
        // A failed write (disk full, read-only) must not leave a model's worth of bytes behind.
        if let Err(cleanup) = remove_dir(&partial) {
            log::warn!("{cleanup:#}");
        }
        return Err(e);
    }
    prune(&root, keep);
    Ok(done)
}

/// Write the checkpoint into `partial`, then rename it to `done`.
fn write_complete(partial: &Path, done: &Path, trainer: &Trainer, state: &ServeState) -> Result<()> {
    checkpoint::save(partial, trainer)
        .with_context(|| format!("{}: writing the trainer", partial.display()))?;
    let bytes = postcard::to_stdvec(state).expect("the service state is plain data");
    let serve_file = partial.join(SERVE_FILE);
    fsio::write_atomic(&serve_file, &bytes)
        .with_context(|| format!("{}: cannot write", serve_file.display()))?;
    remove_dir(done)?;
    fsio::rename_durable(partial, done)
        .with_context(|| format!("{}: cannot rename into {}", partial.display(), done.display()))
}

/// Remove what a killed process can leave behind: partial checkpoints, the temp files of atomic
/// writes in the state folder, and export temp files. Call once at start-up.
pub fn sweep_leftovers(state_dir: &Path, exports_dir: &Path) {
    let partials = sweep_partials(state_dir);
    let temps = fsio::sweep_temp_files(state_dir) + crate::export::publish::sweep_temps(exports_dir);
    if partials + temps > 0 {
        log::info!(
            "removed {partials} partial checkpoint(s) and {temps} temp file(s) an interrupted run left behind"
        );
    }
}

/// Remove the `.partial-*` folders a process killed while checkpointing left behind (at start-up,
/// before anything is written). Returns how many were removed; failures are logged.
pub fn sweep_partials(state_dir: &Path) -> usize {
    let root = dir(state_dir);
    let Ok(entries) = std::fs::read_dir(&root) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
            continue;
        }
        match remove_dir(&entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => log::warn!("{e:#}"),
        }
    }
    removed
}

/// The newest checkpoint that reads back completely, or `None` when there is none. The run goes
/// on with the stored settings, but in the `precision` configured now (an execution choice, like
/// the device).
/// Buffer patches of a format-1 or -2 checkpoint are written into `store`.
pub fn load_newest(
    state_dir: &Path,
    device: &Device,
    precision: Precision,
    store: &mut PatchStore,
) -> Result<Option<Resumed>> {
    let root = dir(state_dir);
    for dir in list(&root)?.into_iter().rev() {
        match load(&dir, device, precision, store) {
            Ok(state) => return Ok(Some(state)),
            Err(e) => log::warn!("{}: skipping this checkpoint: {e:#}", dir.display()),
        }
    }
    Ok(None)
}

fn load(dir: &Path, device: &Device, precision: Precision, store: &mut PatchStore) -> Result<Resumed> {
    let trainer = checkpoint::load_with(dir, device, |setup| setup.train.precision = precision)?;
    let path = dir.join(SERVE_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let decoded =
        decode(&bytes).with_context(|| format!("{}: not a dinostream service state", path.display()))?;
    let step = match &decoded {
        Decoded::Current(state) => state.step,
        Decoded::WithPatches(state) => state.step,
    };
    if step != trainer.state().step {
        anyhow::bail!("{}: step {step} but the trainer is at step {}", path.display(), trainer.state().step);
    }
    let state = match decoded {
        Decoded::Current(state) => state,
        Decoded::WithPatches(old) => {
            log::info!(
                "{}: format {} holds the replay buffer's patches; moving them into the replay store",
                path.display(),
                old.format
            );
            let mixer = old.mixer.into_stored(store);
            ServeState { format: FORMAT, step: old.step, next_sample_id: old.next_sample_id, mixer }
        }
    };
    Ok(Resumed { trainer, state, dir: dir.to_path_buf() })
}

/// Read `serve.bin` of any format this build knows. A format-1 file is a format-2 file without
/// its last field (the mixer's [`MixerExtra`], the last field of the last field): it reads as one
/// that ends with the default.
fn decode(bytes: &[u8]) -> anyhow::Result<Decoded> {
    let (format, _) = postcard::take_from_bytes::<u32>(bytes)?;
    let legacy = match format {
        FORMAT => return Ok(Decoded::Current(postcard::from_bytes(bytes)?)),
        FORMAT_WITH_PATCHES => postcard::from_bytes(bytes)?,
        FORMAT_WITHOUT_BATCH_COUNTS => {
            let mut upgraded = bytes.to_vec();
            upgraded.extend(postcard::to_stdvec(&MixerExtra::default())?);
            postcard::from_bytes(&upgraded)?
        }
        other => anyhow::bail!("format {other} (this build reads {FORMAT} and, converting them, 1 and 2)"),
    };
    Ok(Decoded::WithPatches(legacy))
}

/// Complete checkpoint folders, oldest first.
fn list(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list checkpoints", root.display())),
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let step = name.strip_prefix(STEP_PREFIX)?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Delete all but the newest `keep` checkpoints (failures are logged: an old checkpoint left
/// behind costs disk space, nothing else).
fn prune(root: &Path, keep: usize) {
    let all = list(root).unwrap_or_default();
    for old in &all[..all.len().saturating_sub(keep.max(1))] {
        if let Err(e) = std::fs::remove_dir_all(old) {
            log::warn!("{}: cannot delete this old checkpoint: {e}", old.display());
        }
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("{}: cannot remove", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamConfig;
    use crate::dino::step::tests::micro_trainer;
    use crate::stream::Mixer;

    fn store(dir: &Path) -> PatchStore {
        PatchStore::open(&dir.join(crate::stream::store::STORE_DIR), 1 << 20, 1 << 20).unwrap()
    }

    fn state(step: u64) -> ServeState {
        let dir = tempfile::tempdir().unwrap();
        ServeState::new(step, 7 * step, Mixer::new(&StreamConfig::default(), step, store(dir.path())).state())
    }

    fn load_newest_in(dir: &Path, precision: Precision) -> Result<Option<Resumed>> {
        load_newest(dir, &Device::Cpu, precision, &mut store(dir))
    }

    #[test]
    fn the_newest_complete_checkpoint_is_loaded_and_only_the_last_k_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = micro_trainer();
        for step in [0, 0] {
            save(dir.path(), &trainer, &state(step), 2).unwrap();
        }
        let resumed = load_newest_in(dir.path(), Precision::F32).unwrap().unwrap();
        assert_eq!(resumed.state, state(0));
        assert!(resumed.dir.ends_with("step-000000000000"));
        assert_eq!(list(&super::dir(dir.path())).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_newest_checkpoint_is_skipped_for_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = micro_trainer();
        save(dir.path(), &trainer, &state(0), 3).unwrap();
        let fake = super::dir(dir.path()).join("step-000000000009");
        std::fs::create_dir_all(&fake).unwrap();
        std::fs::write(fake.join(SERVE_FILE), b"garbage").unwrap();
        let resumed = load_newest_in(dir.path(), Precision::F32).unwrap().unwrap();
        assert_eq!(resumed.state.step, 0);
        assert!(load_newest_in(&dir.path().join("nothing"), Precision::F32).unwrap().is_none());
    }

    /// A format-2 `serve.bin` (patches inside) of one buffer patch and one fresh patch, as the
    /// previous build wrote it.
    fn format_2_state(dir: &Path) -> (LegacyServeState, crate::tile::Patch) {
        let patch = |x: u32| crate::tile::Patch {
            data: vec![0.25, 0.5, 0.1, 1.0 / 3.0],
            bands: vec!["B04".into()],
            height: 2,
            width: 2,
            source: "t.tif".into(),
            window: crate::tile::Window { x, y: 0, width: 2, height: 2 },
            nodata_fraction: 0.0,
        };
        let mixer = Mixer::new(&StreamConfig::default(), 3, store(dir)).state();
        let tile = crate::stream::TileId(1);
        let legacy = LegacyMixerState {
            rng: mixer.rng,
            offered: 1,
            buffer: vec![crate::stream::replay::StoredPatch::new(tile, &patch(0))],
            fresh: vec![crate::stream::replay::StoredPatch::new(tile, &patch(2))],
            tiles: vec![],
            completed: vec![],
            extra: MixerExtra { keys: vec![0], embeddings: vec![None], ..MixerExtra::default() },
        };
        (
            LegacyServeState { format: FORMAT_WITH_PATCHES, step: 5, next_sample_id: 9, mixer: legacy },
            patch(0),
        )
    }

    #[test]
    fn format_2_and_1_states_read_back_and_their_patches_move_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (old, stored_patch) = format_2_state(dir.path());
        let bytes = postcard::to_stdvec(&old).unwrap();
        assert_eq!(decode(&bytes).unwrap(), Decoded::WithPatches(old.clone()));
        let mut format_1 = postcard::to_stdvec(&LegacyServeState { format: 1, ..old.clone() }).unwrap();
        format_1.truncate(format_1.len() - postcard::to_stdvec(&MixerExtra::default()).unwrap().len());
        let mut as_1 = old.clone();
        (as_1.format, as_1.mixer.extra) = (1, MixerExtra::default());
        assert_eq!(decode(&format_1).unwrap(), Decoded::WithPatches(as_1));
        // a real checkpoint with that serve.bin loads, and the patch is replayed from the store
        save(dir.path(), &micro_trainer(), &state(0), 2).unwrap();
        let serve = super::dir(dir.path()).join("step-000000000000").join(SERVE_FILE);
        std::fs::write(&serve, postcard::to_stdvec(&LegacyServeState { step: 0, ..old }).unwrap()).unwrap();
        let mut store = store(dir.path());
        let resumed = load_newest(dir.path(), &Device::Cpu, Precision::F32, &mut store).unwrap().unwrap();
        assert_eq!((resumed.state.format, resumed.state.mixer.buffer.len()), (FORMAT, 1));
        let mut mixer = Mixer::restore(&StreamConfig::default(), resumed.state.mixer, store);
        assert_eq!((mixer.fresh_len(), mixer.replay_len()), (1, 1));
        let batch = mixer.next_batch(2).unwrap();
        assert_eq!(batch.patches[0].window.x, 2, "the fresh patch first");
        assert!(batch.patches[1].as_ref() == &stored_patch, "then the stored one, bit for bit");
        assert_eq!(mixer.replay_len(), 2);
        let mut batch_counts = state(0);
        batch_counts.mixer.extra.batches = crate::stream::BatchCounts { fresh: 300, replay_only: 70_000 };
        let bytes = postcard::to_stdvec(&batch_counts).unwrap();
        assert_eq!(decode(&bytes).unwrap(), Decoded::Current(batch_counts));
    }

    #[test]
    fn a_failed_save_leaves_no_partial_and_stale_partials_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let root = super::dir(dir.path());
        std::fs::create_dir_all(root.join(".partial-step-000000000003")).unwrap();
        std::fs::write(root.join(".partial-step-000000000003/model.safetensors"), b"half").unwrap();
        assert_eq!(sweep_partials(dir.path()), 1);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        // a file where the finished folder goes: the save fails after every byte was written
        std::fs::write(root.join("step-000000000000"), b"in the way").unwrap();
        assert!(save(dir.path(), &micro_trainer(), &state(0), 2).is_err());
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["step-000000000000"], "the partial checkpoint is removed");
    }

    #[test]
    fn a_resumed_run_takes_the_configured_precision() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &micro_trainer(), &state(0), 2).unwrap();
        let resumed = load_newest_in(dir.path(), Precision::Bf16).unwrap().unwrap();
        assert_eq!(resumed.trainer.setup().train.precision, Precision::Bf16);
    }
}
