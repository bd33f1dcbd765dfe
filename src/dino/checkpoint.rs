//! Checkpoints: a directory holding a [`Trainer`] and its [`TrainState`] exactly.
//!
//! - `model.safetensors`: `student.backbone.*`, `student.head.*`, `teacher.backbone.*`,
//!   `teacher.head.*` (the reference DINO names) and `center`; metadata `preset` (TOML), `bands`
//!   (comma list), `step`, and `init` (the pretrained file a run began from, if any).
//! - `optimizer.safetensors`: `exp_avg.<name>` and `exp_avg_sq.<name>` per student parameter that
//!   has been updated; metadata `steps`: a JSON map from name to its Adam step count.
//! - `state.json`: step, epoch, RNG state, the schedule span and every setting ([`TrainerSetup`]).
//!
//! Each file is written atomically ([`crate::fsio::write_atomic`]), `state.json` last: loading
//! checks that all three name the same step, so an interrupted save is reported, never half-used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dino::optim::{AdamWState, Moments};
use crate::dino::step::{TrainState, Trainer, TrainerSetup};

/// Model weights file name.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimiser state file name.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Training state file name.
pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file is not what a dinostream checkpoint holds.
    #[error("{path}: not a dinostream checkpoint file: {message}")]
    Format { path: PathBuf, message: String },
    /// The files disagree (an interrupted save, or files mixed from two checkpoints).
    #[error("{path}: {message}; the checkpoint is incomplete, use an earlier one")]
    Inconsistent { path: PathBuf, message: String },
    /// The stored settings no longer build a model.
    #[error("{path}: cannot rebuild the model: {message}")]
    Model { path: PathBuf, message: String },
    /// A tensor operation failed.
    #[error("checkpoint tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// The RNG as plain numbers.
#[derive(Debug, Serialize, Deserialize)]
struct RngState {
    /// ChaCha8 seed, hex.
    seed: String,
    stream: u64,
    /// 128-bit word position, decimal.
    word_pos: String,
}

/// `state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    step: u64,
    epoch: usize,
    rng: RngState,
    setup: TrainerSetup,
}

/// Write `trainer` and its state into `dir` (created if missing).
pub fn save(dir: &Path, trainer: &Trainer) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.into(), source })?;
    let state = trainer.state();
    let setup = trainer.setup();
    let mut model: Vec<(String, Tensor)> = Vec::new();
    for (side, params) in [("student", trainer.student_params()), ("teacher", trainer.teacher_params())] {
        model.extend(params.iter().map(|(n, v)| (format!("{side}.{n}"), v.as_tensor().clone())));
    }
    model.push(("center".into(), state.center.clone()));
    let mut meta = HashMap::from([
        ("preset".to_string(), setup.preset.to_toml()),
        ("bands".to_string(), setup.bands.join(",")),
        ("step".to_string(), state.step.to_string()),
    ]);
    if let Some(init) = &setup.model.init {
        // The run began from this file (also in state.json's settings); resumes never re-import.
        meta.insert("init".to_string(), init.display().to_string());
    }
    write_tensors(&dir.join(MODEL_FILE), model, meta)?;

    let mut moments = Vec::new();
    let mut steps = HashMap::new();
    for (name, m) in &state.optimizer.moments {
        moments.push((format!("exp_avg.{name}"), m.exp_avg.clone()));
        moments.push((format!("exp_avg_sq.{name}"), m.exp_avg_sq.clone()));
        steps.insert(name.clone(), m.step);
    }
    let meta = HashMap::from([
        ("steps".to_string(), serde_json::to_string(&steps).expect("a map of counts serialises")),
        ("step".to_string(), state.step.to_string()),
    ]);
    write_tensors(&dir.join(OPTIMIZER_FILE), moments, meta)?;

    let file = StateFile {
        format: FORMAT,
        step: state.step,
        epoch: trainer.schedules().at(state.step).epoch,
        rng: RngState {
            seed: state.rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: state.rng.get_stream(),
            word_pos: state.rng.get_word_pos().to_string(),
        },
        setup: setup.clone(),
    };
    let path = dir.join(STATE_FILE);
    let json = serde_json::to_string_pretty(&file).expect("the state is plain data");
    crate::fsio::write_atomic(&path, json.as_bytes()).map_err(|source| CheckpointError::Io { path, source })
}

/// Rebuild the trainer saved in `dir` on `device`, ready to take the next step.
pub fn load(dir: &Path, device: &Device) -> Result<Trainer, CheckpointError> {
    load_with(dir, device, |_| {})
}

/// [`load`], letting `adjust` change the stored settings first (a resumed run with a new
/// `--steps` span, say). Changes that alter tensor shapes fail with the tensor's name.
pub fn load_with(
    dir: &Path,
    device: &Device,
    adjust: impl FnOnce(&mut TrainerSetup),
) -> Result<Trainer, CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    let text = read(&state_path)?;
    let file: StateFile = serde_json::from_slice(&text)
        .map_err(|e| CheckpointError::Format { path: state_path.clone(), message: e.to_string() })?;
    if file.format != FORMAT {
        let message = format!("format {} (this build reads {FORMAT})", file.format);
        return Err(CheckpointError::Format { path: state_path, message });
    }
    let mut setup = file.setup;
    adjust(&mut setup);
    let mut trainer = Trainer::new(setup, device)
        .map_err(|e| CheckpointError::Model { path: state_path.clone(), message: format!("{e:#}") })?;

    let model_path = dir.join(MODEL_FILE);
    let (model, _) = read_tensors(&model_path, file.step, device)?;
    let lookup = |key: &str| model.get(key).cloned();
    trainer.student_params().assign("student.", lookup).map_err(|e| format_error(&model_path, e))?;
    trainer.teacher_params().assign("teacher.", lookup).map_err(|e| format_error(&model_path, e))?;
    let center = lookup("center").ok_or_else(|| format_error(&model_path, "tensor `center` is missing"))?;

    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let (moments, meta) = read_tensors(&optimizer_path, file.step, device)?;
    let optimizer = adam_state(&optimizer_path, moments, &meta)?;
    let rng = rng_from(&file.rng).ok_or_else(|| format_error(&state_path, "malformed `rng`"))?;
    trainer.set_state(TrainState { step: file.step, center, optimizer, rng });
    Ok(trainer)
}

fn adam_state(
    path: &Path,
    mut tensors: HashMap<String, Tensor>,
    meta: &Metadata,
) -> Result<AdamWState, CheckpointError> {
    let steps: HashMap<String, u64> = meta
        .get("steps")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| format_error(path, "metadata `steps` is missing or malformed"))?;
    let mut state = AdamWState::default();
    for (name, step) in steps {
        let mut take = |kind: &str| {
            tensors
                .remove(&format!("{kind}.{name}"))
                .ok_or_else(|| format_error(path, format!("`{kind}.{name}` is missing")))
        };
        let moments = Moments { exp_avg: take("exp_avg")?, exp_avg_sq: take("exp_avg_sq")?, step };
        state.moments.insert(name, moments);
    }
    Ok(state)
}

fn rng_from(r: &RngState) -> Option<ChaCha8Rng> {
    use rand::SeedableRng;
    let mut seed = [0u8; 32];
    if r.seed.len() != 64 {
        return None;
    }
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&r.seed[2 * i..2 * i + 2], 16).ok()?;
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(r.stream);
    rng.set_word_pos(r.word_pos.parse().ok()?);
    Some(rng)
}

fn format_error(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::Format { path: path.into(), message: message.to_string() }
}

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.into(), source })
}

/// A safetensors file's string metadata.
type Metadata = HashMap<String, String>;

/// A host copy of one f32 tensor, as safetensors writes it.
struct HostTensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes).into()
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn write_tensors(path: &Path, tensors: Vec<(String, Tensor)>, meta: Metadata) -> Result<(), CheckpointError> {
    let host = tensors
        .into_iter()
        .map(|(name, t)| {
            let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name, HostTensor { shape: t.dims().to_vec(), bytes }))
        })
        .collect::<Result<Vec<_>, candle_core::Error>>()?;
    let bytes = safetensors::serialize(host, Some(meta)).map_err(|e| format_error(path, e))?;
    crate::fsio::write_atomic(path, &bytes)
        .map_err(|source| CheckpointError::Io { path: path.into(), source })
}

/// All tensors of a file, checked to belong to step `step`, and its metadata.
fn read_tensors(
    path: &Path,
    step: u64,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Metadata), CheckpointError> {
    let bytes = read(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format_error(path, e))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let saved_step = meta.get("step").and_then(|s| s.parse::<u64>().ok());
    if saved_step != Some(step) {
        let message = format!("holds step {saved_step:?} but state.json step {step}");
        return Err(CheckpointError::Inconsistent { path: path.into(), message });
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    Ok((tensors, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dino::step::tests::{micro_trainer, noise_batch};

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    fn assert_same_tensors(a: &Trainer, b: &Trainer) {
        for (pa, pb) in [(a.student_params(), b.student_params()), (a.teacher_params(), b.teacher_params())] {
            assert_eq!(pa.len(), pb.len());
            for (name, var) in pa.iter() {
                assert_eq!(bits(var.as_tensor()), bits(pb.get(name).unwrap().as_tensor()), "{name}");
            }
        }
        assert_eq!(bits(&a.state().center), bits(&b.state().center), "center");
        let (ma, mb) = (&a.state().optimizer.moments, &b.state().optimizer.moments);
        assert_eq!(ma.keys().collect::<Vec<_>>(), mb.keys().collect::<Vec<_>>());
        for (name, m) in ma {
            assert_eq!(m.step, mb[name].step, "{name}");
            assert_eq!(bits(&m.exp_avg), bits(&mb[name].exp_avg), "{name}");
            assert_eq!(bits(&m.exp_avg_sq), bits(&mb[name].exp_avg_sq), "{name}");
        }
        assert_eq!(a.state().step, b.state().step);
    }

    #[test]
    fn a_step_after_reload_equals_a_step_without_reload_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let mut straight = micro_trainer();
        straight.step(&noise_batch(1)).unwrap();
        save(dir.path(), &straight).unwrap();
        let mut resumed = load(dir.path(), &Device::Cpu).unwrap();
        assert_same_tensors(&straight, &resumed);
        assert!(
            !resumed.state().optimizer.moments.contains_key("head.last_layer.weight_v"),
            "frozen in epoch 0"
        );
        for seed in [2, 3] {
            let a = straight.step(&noise_batch(seed)).unwrap();
            let b = resumed.step(&noise_batch(seed)).unwrap();
            assert_eq!(a, b);
        }
        assert_same_tensors(&straight, &resumed);
    }

    #[test]
    fn the_model_file_carries_the_preset_bands_and_step() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &micro_trainer()).unwrap();
        let bytes = std::fs::read(dir.path().join(MODEL_FILE)).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta["step"], "0");
        assert!(meta["bands"].starts_with("B02,B03"));
        assert!(meta["preset"].contains("vit-micro-p8"));
        let names = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().len();
        assert_eq!(names, 2 * micro_trainer().student_params().len() + 1);
    }

    #[test]
    fn files_from_two_different_steps_are_reported_as_an_incomplete_checkpoint() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut trainer = micro_trainer();
        save(old.path(), &trainer).unwrap();
        trainer.step(&noise_batch(1)).unwrap();
        save(new.path(), &trainer).unwrap();
        std::fs::copy(new.path().join(STATE_FILE), old.path().join(STATE_FILE)).unwrap();
        let err = load(old.path(), &Device::Cpu).err().expect("mixed files must not load");
        assert!(matches!(err, CheckpointError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn a_resumed_run_can_take_a_new_schedule_span() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &micro_trainer()).unwrap();
        let span = crate::dino::schedule::ScheduleSpan { epochs: 7, niter_per_ep: 3 };
        let resumed = load_with(dir.path(), &Device::Cpu, |s| s.span = span).unwrap();
        assert_eq!(resumed.schedules().span(), span);
    }

    #[test]
    fn a_missing_checkpoint_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("nope"), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("state.json"), "{err}");
    }
}
