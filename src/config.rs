//! The configuration tree: one TOML file with every knob, documented defaults, validation that
//! reports every bad key at once, and command-line overrides applied on top.
//!
//! Each stage's constructor takes its own section (`&cfg.tile`, `&cfg.augment`, ...), never the whole
//! [`Config`]. Field docs here are the reference for `deploy/config.toml` and the README.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The seed's band list: the order of the 10-channel tensor the model sees.
pub const SEED_BANDS: [&str; 10] = ["B02", "B03", "B04", "B05", "B06", "B07", "B11", "B08", "B8A", "B12"];

/// Everything dinostream can be told. Every field has a default; a file may set any subset.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Ingest: how files become patches.
    pub tile: TileConfig,
    /// The DINO multi-crop augmenter.
    pub augment: AugmentConfig,
    /// Which model to train.
    pub model: ModelConfig,
    /// The DINO training step, loss and schedules.
    pub train: TrainConfig,
    /// The watched folder, the tile ledger and the replay buffer.
    pub stream: StreamConfig,
    /// The long-running service: state folder, continual schedules, checkpoints, status.
    pub serve: ServeConfig,
    /// ONNX export of the teacher backbone and its verified publishing (`serve`).
    pub export: ExportConfig,
}

/// Ingest settings (`[tile]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TileConfig {
    /// How to name the bands of a stacked multi-band file: a preset (`bigearthnet10`,
    /// `sentinel2-12`, `eurosat13`) or an explicit comma-separated list (`B02,B03,B04`).
    /// GDAL band descriptions inside the file win when present.
    pub layout: String,
    /// The bands the model sees, in channel order. Default: the seed's 10 bands.
    pub bands: Vec<String>,
    /// Side of a square training patch in pixels (10 m grid). Larger images are cut into patches.
    pub patch_px: usize,
    /// Step between patch origins when cutting a large image.
    pub stride_px: usize,
    /// Patches whose nodata/zero fraction is above this are skipped (0..=1).
    pub max_nodata_fraction: f32,
    /// Raw value treated as nodata when the file declares none (GDAL_NODATA wins). Unset: only
    /// NaN/inf and the file's own nodata value are nodata.
    pub nodata: Option<f64>,
    /// Refuse images wider than this before allocating anything.
    pub max_width_px: u32,
    /// Refuse images taller than this before allocating anything.
    pub max_height_px: u32,
    /// Refuse images with more bands than this.
    pub max_bands: u16,
}

impl Default for TileConfig {
    fn default() -> Self {
        TileConfig {
            layout: "bigearthnet10".into(),
            bands: SEED_BANDS.iter().map(|b| b.to_string()).collect(),
            patch_px: 120,
            stride_px: 120,
            max_nodata_fraction: 0.5,
            nodata: None,
            max_width_px: 40_000,
            max_height_px: 40_000,
            max_bands: 16,
        }
    }
}

/// Multi-crop augmentation settings (`[augment]`). Defaults are the seed recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Side of the two global crops.
    pub global_px: usize,
    /// Side of the local crops.
    pub local_px: usize,
    /// Number of local crops per sample.
    pub local_crops: usize,
    /// RandomResizedCrop area fraction range for global crops.
    pub global_scale: [f64; 2],
    /// RandomResizedCrop area fraction range for local crops.
    pub local_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub ratio: [f64; 2],
    /// Probability of Channelaug (copy one random band into all channels) on global crop 1.
    pub channelaug_p: f64,
    /// Probability of a horizontal flip, every view.
    pub flip_p: f64,
    /// Probability of shift-scale-rotate, every view.
    pub ssr_p: f64,
    /// SSR rotation range: angle ~ U(-limit, limit) degrees.
    pub ssr_angle_deg: f64,
    /// SSR scale range: scale ~ U(1 - limit, 1 + limit).
    pub ssr_scale: f64,
    /// SSR shift range as a fraction of the side: dx, dy ~ U(-limit, limit).
    pub ssr_shift: f64,
    /// Gaussian blur probability on global crop 1.
    pub global1_blur_p: f64,
    /// Gaussian blur probability on global crop 2.
    pub global2_blur_p: f64,
    /// Gaussian blur probability on local crops.
    pub local_blur_p: f64,
    /// Solarize probability on global crop 2.
    pub solarize_p: f64,
    /// Solarize threshold in reflectance: x >= threshold becomes 1 - x.
    pub solarize_threshold: f32,
    /// Augmentation worker threads (0 = one per core).
    pub workers: usize,
    /// Ready batches the worker pool may hold before it blocks (backpressure).
    pub queue_batches: usize,
    /// Seed of the augmentation random streams (per sample index, so results do not depend on the
    /// number of workers).
    pub seed: u64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            global_px: 120,
            local_px: 56,
            local_crops: 6,
            global_scale: [0.4, 1.0],
            local_scale: [0.05, 0.4],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            channelaug_p: 1.0,
            flip_p: 0.5,
            ssr_p: 0.5,
            ssr_angle_deg: 45.0,
            ssr_scale: 0.1,
            ssr_shift: 0.0625,
            global1_blur_p: 1.0,
            global2_blur_p: 0.1,
            local_blur_p: 0.5,
            solarize_p: 0.2,
            solarize_threshold: 0.5,
            workers: 0,
            queue_batches: 4,
            seed: 0,
        }
    }
}

/// Model choice (`[model]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A preset name from `models/` (`vit-tiny-p8`, `vit-small-p8`, `vit-base-p8`,
    /// `vit-small-p8-jetson`) or a path to a preset TOML file.
    pub preset: String,
    /// Student stochastic depth rate (DINO default 0.1; the teacher never drops).
    pub drop_path_rate: f64,
    /// A pretrained backbone the student and the teacher start from (`.pth`/`.pt` or
    /// `.safetensors`; DINO, DINO training-checkpoint or timm names). Used only when no checkpoint
    /// exists yet; the checkpoint records it, so a resume never imports again. Unset: random init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// The band names of `init`'s input channels, in order: `rgb` (B04,B03,B02), `ssl4eo-s12-13`
    /// (B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B10,B11,B12) or a list such as `B02,B03,B04`.
    /// Needed with `init`: weight files carry no band names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_bands: Option<String>,
    /// How a configured band that `init` lacks starts: `mean` (the mean of the imported filters)
    /// or `zeros`.
    pub init_missing_bands: MissingBands,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            preset: "vit-tiny-p8".into(),
            drop_path_rate: 0.1,
            init: None,
            init_bands: None,
            init_missing_bands: MissingBands::Mean,
        }
    }
}

/// How an imported patch embedding fills a band the pretrained file lacks (`model.init_missing_bands`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MissingBands {
    /// The mean over the file's input channels of each filter.
    Mean,
    /// Zero filters: the band adds nothing until training moves it.
    Zeros,
}

/// Named band sets of pretrained files (`model.init_bands`).
pub const INIT_BAND_SETS: [(&str, &[&str]); 2] = [
    ("rgb", &["B04", "B03", "B02"]),
    (
        "ssl4eo-s12-13",
        &["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"],
    ),
];

/// Resolve `model.init_bands`: a named set or a comma list. Names outside Sentinel-2 (a SAR
/// channel such as `VV`) are allowed: they match no configured band and are dropped.
pub fn parse_init_bands(spec: &str) -> Result<Vec<String>, String> {
    if let Some((_, bands)) = INIT_BAND_SETS.iter().find(|(name, _)| *name == spec) {
        return Ok(bands.iter().map(|b| b.to_string()).collect());
    }
    let bands: Vec<String> = spec.split(',').map(|b| b.trim().to_uppercase()).collect();
    if bands.iter().any(String::is_empty) {
        let sets: Vec<_> = INIT_BAND_SETS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "`{spec}` has an empty name; use a set ({}) or a list like B04,B03,B02",
            sets.join(", ")
        ));
    }
    Ok(bands)
}

/// Compute device.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CPU (always available).
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Arithmetic of the training step's matrix products (`train.precision`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout (the mode the golden tests pin to PyTorch).
    #[default]
    F32,
    /// f32 tensors, matrix products on TF32 tensor cores (CUDA; on the CPU the same as `f32`).
    Tf32,
    /// Mixed precision as PyTorch's bf16 autocast: matrix products (linear layers, attention,
    /// patch embedding, head) in bf16 with f32 accumulation; f32 master weights, optimiser state,
    /// normalisation, softmax and loss.
    Bf16,
}

/// DINO training settings (`[train]`); names follow DINO's `main_dino.py` arguments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Where to train.
    pub device: Device,
    /// Matrix-product arithmetic: `f32`, `tf32` or `bf16` (see [`Precision`]).
    pub precision: Precision,
    /// Samples per step (each sample = 2 global + `local_crops` local views).
    pub batch_size: usize,
    /// Peak learning rate per 256 samples; the used peak is `lr * batch_size / 256`.
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Linear learning-rate warmup, in epochs.
    pub warmup_epochs: usize,
    /// Number of epochs the schedules span (`train` command).
    pub epochs: usize,
    /// Weight decay at the start of the cosine schedule.
    pub weight_decay: f64,
    /// Weight decay at the end of the cosine schedule.
    pub weight_decay_end: f64,
    /// Teacher EMA momentum at the start (cosine to 1).
    pub momentum_teacher: f64,
    /// Student softmax temperature.
    pub student_temp: f64,
    /// Teacher temperature at the start of its warmup.
    pub warmup_teacher_temp: f64,
    /// Teacher temperature after warmup.
    pub teacher_temp: f64,
    /// Teacher temperature warmup, in epochs.
    pub warmup_teacher_temp_epochs: usize,
    /// Center EMA momentum.
    pub center_momentum: f64,
    /// Per-tensor gradient clipping threshold (0 = off).
    pub clip_grad: f64,
    /// Epochs during which the head's last layer is frozen.
    pub freeze_last_layer: usize,
    /// Seed for weight initialisation and training randomness.
    pub seed: u64,
    /// Read the loss (mean since the last read) and the collapse indicators every this many
    /// steps; the steps between do not wait for the GPU.
    pub log_every_steps: usize,
    /// Memory for decoded patches in `train`, in MB. `train` indexes the folder and reads patches
    /// on demand through a cache of this size, so a folder larger than memory trains in bounded
    /// memory; one that fits is decoded once.
    pub cache_mb: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            device: Device::Cpu,
            precision: Precision::F32,
            batch_size: 64,
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            epochs: 100,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            student_temp: 0.1,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            center_momentum: 0.9,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            seed: 0,
            log_every_steps: 10,
            cache_mb: 1024,
        }
    }
}

/// What happens to a tile's file after it was trained (`stream.handled`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HandledPolicy {
    /// Leave it where it is; the ledger remembers it was trained.
    Keep,
    /// Move it into `processed/` inside the watched folder.
    Move,
    /// Delete it.
    Delete,
}

/// What happens to a file that could not be used (`stream.rejected`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RejectedPolicy {
    /// Move it into `rejected/` inside the watched folder, with a `<name>.reason.txt` beside it.
    Move,
    /// Leave it in place; only the ledger records the reason.
    Record,
}

/// Which patch a full replay buffer evicts (`stream.replay_policy`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReplayPolicy {
    /// Reservoir sampling: every patch ever offered is in the buffer with equal probability.
    Reservoir,
    /// First in, first out: the buffer holds the most recent patches.
    Fifo,
    /// Minimum redundancy (MinRed, Purushwalkam et al., ECCV 2022): evict the stored patch whose
    /// teacher embedding is most similar to another stored patch's, so that the buffer stays
    /// diverse when tiles of one pass arrive together and look alike.
    #[serde(rename = "min-redundancy")]
    MinRedundancy,
}

/// Streaming settings (`[stream]`): the watched folder, the ledger and the replay buffer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Folder watched for new tiles (created when missing). Its `processed/` and `rejected/`
    /// subfolders are never watched.
    pub watch_dir: PathBuf,
    /// Also watch subfolders. BigEarthNet patch folders (`*_B02.tif`-style band files) are one tile
    /// either way; with this off, other subfolders are ignored.
    pub recursive: bool,
    /// A file (or patch folder) is taken once its size and mtime have not changed for this long
    /// after its writer closed it or it was renamed in.
    pub settle_ms: u64,
    /// Full rescan of the watched folder every this many seconds (inotify drops events under
    /// bursts; a rescan finds what was missed).
    pub rescan_secs: u64,
    /// After training: `keep` the file in place, `move` it to `processed/`, or `delete` it.
    pub handled: HandledPolicy,
    /// After a rejection: `move` the file to `rejected/` with a `<name>.reason.txt`, or `record`
    /// the reason in the ledger only.
    pub rejected: RejectedPolicy,
    /// Replay buffer size in patches. They are stored on disk in `<state_dir>/replay/` (about
    /// `C * H * W * 2` bytes each for 10 m bands, 288 KB for 10 bands at 120 px; bands that are not
    /// whole DN / 10000, such as resampled 20 m bands, take 4 bytes a value).
    pub replay_capacity_patches: usize,
    /// Memory for replay patches decoded from the store (MB); the least recently used leave first.
    pub replay_memory_mb: u64,
    /// Disk for the replay buffer's stored patches (MB). Once the next patch would pass it the
    /// buffer stops growing and new patches replace stored ones; patches that older checkpoints
    /// still name come on top until those checkpoints are gone. A full disk only keeps new
    /// patches out of the buffer (they were trained); training goes on.
    pub replay_disk_mb: u64,
    /// Which patch a full replay buffer evicts: `reservoir` (every patch seen equally likely to
    /// stay), `fifo` (the newest stay) or `min-redundancy` (the one whose teacher embedding is
    /// closest to another stored patch's goes; costs one pass over the buffer per patch trained).
    pub replay_policy: ReplayPolicy,
    /// Share of fresh (never trained) patches in each batch (0..=1]; the rest is replayed.
    pub fresh_fraction: f64,
    /// Rewrite the ledger as one record per tile once the log holds this many records more than
    /// there are tiles.
    pub ledger_compact_records: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            watch_dir: PathBuf::from("incoming"),
            recursive: false,
            settle_ms: 1000,
            rescan_secs: 30,
            handled: HandledPolicy::Keep,
            rejected: RejectedPolicy::Move,
            replay_capacity_patches: 1024,
            replay_memory_mb: 512,
            replay_disk_mb: 4096,
            replay_policy: ReplayPolicy::Reservoir,
            fresh_fraction: 0.5,
            ledger_compact_records: 10_000,
        }
    }
}

/// How a value moves over `serve.horizon_steps`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Stays at its start value.
    Constant,
    /// Half-cosine from its start value to its end value over the horizon, then holds the end.
    Cosine,
}

/// What the service trains on while no fresh patch waits (`serve.rehearsal`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Rehearsal {
    /// Keep training on replay-only batches from the replay buffer.
    Continuous,
    /// Train only when fresh patches arrive; idle otherwise.
    Off,
}

/// The service (`[serve]`): where it keeps state, the continual (step-based, epoch-free)
/// schedules, checkpoints and reporting. Start values of the schedules come from `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Folder for the ledger, checkpoints and status.json (created when missing).
    pub state_dir: PathBuf,
    /// Folder the ONNX exports are published to (used by the export stage).
    pub exports_dir: PathBuf,
    /// Learning rate rises linearly from 0 to `train.lr * batch_size / 256` over this many steps,
    /// then stays constant.
    pub warmup_steps: u64,
    /// With `max_steps` set: the learning rate falls along a half-cosine to `train.min_lr` over
    /// this many final steps (0 = no cooldown).
    pub cooldown_steps: u64,
    /// Steps the cosine schedules span (weight decay, teacher momentum); past it they hold their
    /// end value.
    pub horizon_steps: u64,
    /// Weight decay: `constant` (`train.weight_decay`) or `cosine` (to `train.weight_decay_end`).
    pub weight_decay_schedule: Shape,
    /// Teacher momentum: `constant` (`train.momentum_teacher`) or `cosine` (to 1).
    pub momentum_schedule: Shape,
    /// Teacher temperature rises linearly from `train.warmup_teacher_temp` to `train.teacher_temp`
    /// over this many steps.
    pub teacher_temp_warmup_steps: u64,
    /// The head's last layer gets no updates in the first this many steps.
    pub freeze_last_layer_steps: u64,
    /// Write a checkpoint every this many steps (0 = only by time and at shutdown).
    pub checkpoint_every_steps: u64,
    /// Write a checkpoint at least every this many seconds of training (0 = only by steps).
    pub checkpoint_every_secs: u64,
    /// Checkpoints kept; older ones are deleted once a new one is complete.
    pub keep_checkpoints: usize,
    /// While checkpoints fail (state disk full or read-only), training pauses once this many steps
    /// were trained since the last durable checkpoint, so that work that cannot be saved does not
    /// pile up; it resumes by itself once a checkpoint is written again.
    pub pause_after_unsaved_steps: u64,
    /// After SIGTERM/SIGINT, finish the step, checkpoint and exit within this many seconds; past
    /// it the process exits with status 1 and an error line.
    pub graceful_shutdown_limit_secs: u64,
    /// One status line, status.json and STATUS= every this many steps.
    pub status_every_steps: u64,
    /// Serve Prometheus text on `127.0.0.1:<port>/metrics` (unset: no endpoint).
    pub metrics_port: Option<u16>,
    /// Stop cleanly (checkpoint, exit 0) after this many steps in total (unset: run until stopped).
    pub max_steps: Option<u64>,
    /// Between arrivals: `continuous` keeps training on replay-only batches from the replay
    /// buffer; `off` trains only when fresh patches arrive. Fresh patches always go first.
    pub rehearsal: Rehearsal,
    /// At most this many replay-only steps per fresh patch trained so far (unset: no cap). With
    /// 0.5 and 200 fresh patches, rehearsal stops after 100 replay-only steps until more arrive.
    pub max_rehearsal_steps_per_patch: Option<f64>,
    /// Share of wall time spent in training steps, in (0, 1]: the service sleeps between steps to
    /// hold it (power or thermal budgets, e.g. on a Jetson); 1 = no pause. Signals, the watchdog
    /// and ingest are still answered while it sleeps.
    pub duty_cycle: f64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            state_dir: PathBuf::from("state"),
            exports_dir: PathBuf::from("exports"),
            warmup_steps: 1000,
            cooldown_steps: 0,
            horizon_steps: 100_000,
            weight_decay_schedule: Shape::Constant,
            momentum_schedule: Shape::Constant,
            teacher_temp_warmup_steps: 1000,
            freeze_last_layer_steps: 1000,
            checkpoint_every_steps: 500,
            checkpoint_every_secs: 600,
            keep_checkpoints: 3,
            pause_after_unsaved_steps: 1000,
            graceful_shutdown_limit_secs: 30,
            status_every_steps: 10,
            metrics_port: None,
            max_steps: None,
            rehearsal: Rehearsal::Continuous,
            max_rehearsal_steps_per_patch: None,
            duty_cycle: 1.0,
        }
    }
}

/// ONNX export settings (`[export]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Publish a verified ONNX model of the teacher from `serve`.
    pub enabled: bool,
    /// Publish at a checkpoint once this many steps passed since the last export (0 = at every
    /// checkpoint); always at shutdown.
    pub every_steps: u64,
    /// What the model input holds: `reflectance` (DN / 10000, normalised inside the graph) or
    /// `normalized` (the caller applies the per-band mean/std).
    pub input_contract: String,
    /// Also output the patch tokens `[N, L, D]`.
    pub patch_tokens: bool,
    /// Exports kept in the exports folder (older `dinostream-step*.onnx` are removed).
    pub keep: usize,
    /// Real patches in the probe batch ONNX Runtime must reproduce before a publish.
    pub probe_patches: usize,
    /// `libonnxruntime.so.1.*` to load; unset: `ORT_DYLIB_PATH`, `./.venv`, then python3's
    /// onnxruntime package.
    pub onnxruntime: Option<PathBuf>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            enabled: true,
            every_steps: 0,
            input_contract: "reflectance".into(),
            patch_tokens: false,
            keep: 5,
            probe_patches: 8,
            onnxruntime: None,
        }
    }
}

impl ExportConfig {
    fn check(&self, v: &mut Validator) {
        if !matches!(self.input_contract.as_str(), "reflectance" | "normalized") {
            v.fail(
                "export.input_contract",
                format!("is `{}`; must be `reflectance` or `normalized`", self.input_contract),
            );
        }
        v.positive("export.keep", self.keep);
        v.positive("export.probe_patches", self.probe_patches);
    }
}

/// One invalid setting: the key, the value found, and what is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyError {
    /// Dotted key, e.g. `tile.patch_px`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why a configuration could not be used. Maps to exit code 78 (EX_CONFIG).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has unknown keys / wrong types.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// One or more values are out of range; all are listed.
    #[error("invalid configuration{}:\n  {}", origin(.path), join(.errors))]
    Invalid { path: Option<PathBuf>, errors: Vec<KeyError> },
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

fn join(errors: &[KeyError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  ")
}

impl Config {
    /// Read and validate a TOML file. Missing keys take their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let cfg = Config::from_toml(&text)
            .map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })?;
        cfg.validate().map_err(|errors| ConfigError::Invalid { path: Some(path.to_path_buf()), errors })?;
        Ok(cfg)
    }

    /// Parse TOML text (no validation). The error message names the key and the line.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Check every value; return all problems, not just the first.
    pub fn validate(&self) -> Result<(), Vec<KeyError>> {
        let mut v = Validator::default();
        self.tile.check(&mut v);
        self.augment.check(&mut v);
        self.model.check(&mut v);
        self.train.check(&mut v);
        self.export.check(&mut v);
        self.stream.check(&mut v);
        self.serve.check(&mut v);
        if v.errors.is_empty() { Ok(()) } else { Err(v.errors) }
    }

    /// The configuration as commented-free TOML (what `--print-config` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config tree contains only TOML-representable values")
    }
}

/// Collects [`KeyError`]s while sections check themselves.
#[derive(Default)]
struct Validator {
    errors: Vec<KeyError>,
}

impl Validator {
    fn fail(&mut self, key: &str, reason: String) {
        self.errors.push(KeyError { key: key.to_string(), reason });
    }

    fn positive(&mut self, key: &str, value: usize) {
        if value == 0 {
            self.fail(key, "is 0; must be at least 1".into());
        }
    }

    fn probability(&mut self, key: &str, value: f64) {
        if !(0.0..=1.0).contains(&value) {
            self.fail(key, format!("is {value}; must be a probability in 0..=1"));
        }
    }

    fn range(&mut self, key: &str, [lo, hi]: [f64; 2], min: f64, max: f64) {
        if !(min <= lo && lo <= hi && hi <= max) {
            self.fail(
                key,
                format!("is [{lo}, {hi}]; must be [low, high] with {min} <= low <= high <= {max}"),
            );
        }
    }

    fn positive_f(&mut self, key: &str, value: f64) {
        if !(value > 0.0 && value.is_finite()) {
            self.fail(key, format!("is {value}; must be a positive number"));
        }
    }
}

/// The band-layout presets and their band names, in file order.
pub const LAYOUT_PRESETS: [(&str, &[&str]); 3] = [
    ("bigearthnet10", &SEED_BANDS),
    ("sentinel2-12", &["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]),
    (
        "eurosat13",
        &["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"],
    ),
];

/// Every Sentinel-2 band name dinostream knows.
pub const S2_BANDS: [&str; 13] =
    ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"];

/// Resolve a layout string (preset name or comma list) to band names.
pub fn parse_layout(spec: &str) -> Result<Vec<String>, String> {
    if let Some((_, bands)) = LAYOUT_PRESETS.iter().find(|(name, _)| *name == spec) {
        return Ok(bands.iter().map(|b| b.to_string()).collect());
    }
    if !spec.contains(',') && !S2_BANDS.contains(&spec) {
        let presets: Vec<_> = LAYOUT_PRESETS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "`{spec}` is neither a layout preset ({}) nor a comma-separated band list like B02,B03,B04",
            presets.join(", ")
        ));
    }
    let bands: Vec<String> = spec.split(',').map(|b| b.trim().to_uppercase()).collect();
    for b in &bands {
        check_band_name(b)?;
    }
    Ok(bands)
}

/// Accept `B01`..`B12`, `B8A` (case-insensitive input is upper-cased by callers).
pub fn check_band_name(name: &str) -> Result<(), String> {
    if S2_BANDS.contains(&name) {
        Ok(())
    } else {
        Err(format!("unknown band `{name}`; Sentinel-2 bands are {}", S2_BANDS.join(", ")))
    }
}

impl TileConfig {
    fn check(&self, v: &mut Validator) {
        if let Err(reason) = parse_layout(&self.layout) {
            v.fail("tile.layout", reason);
        }
        if self.bands.is_empty() {
            v.fail("tile.bands", "is empty; list at least one band, e.g. [\"B04\", \"B03\", \"B02\"]".into());
        }
        for b in &self.bands {
            if let Err(reason) = check_band_name(b) {
                v.fail("tile.bands", reason);
            }
        }
        v.positive("tile.patch_px", self.patch_px);
        v.positive("tile.stride_px", self.stride_px);
        v.probability("tile.max_nodata_fraction", self.max_nodata_fraction as f64);
        if self.max_width_px == 0 || self.max_height_px == 0 || self.max_bands == 0 {
            v.fail("tile.max_width_px/max_height_px/max_bands", "must all be at least 1".into());
        }
    }
}

impl AugmentConfig {
    fn check(&self, v: &mut Validator) {
        v.positive("augment.global_px", self.global_px);
        v.positive("augment.local_px", self.local_px);
        v.range("augment.global_scale", self.global_scale, f64::MIN_POSITIVE, 1.0);
        v.range("augment.local_scale", self.local_scale, f64::MIN_POSITIVE, 1.0);
        v.range("augment.ratio", self.ratio, f64::MIN_POSITIVE, f64::MAX);
        for (key, p) in [
            ("augment.channelaug_p", self.channelaug_p),
            ("augment.flip_p", self.flip_p),
            ("augment.ssr_p", self.ssr_p),
            ("augment.global1_blur_p", self.global1_blur_p),
            ("augment.global2_blur_p", self.global2_blur_p),
            ("augment.local_blur_p", self.local_blur_p),
            ("augment.solarize_p", self.solarize_p),
        ] {
            v.probability(key, p);
        }
        if !(0.0..=180.0).contains(&self.ssr_angle_deg) {
            v.fail("augment.ssr_angle_deg", format!("is {}; must be in 0..=180", self.ssr_angle_deg));
        }
        if !(0.0..1.0).contains(&self.ssr_scale) {
            v.fail("augment.ssr_scale", format!("is {}; must be in 0..1", self.ssr_scale));
        }
        if !(0.0..=0.5).contains(&self.ssr_shift) {
            v.fail("augment.ssr_shift", format!("is {}; must be in 0..=0.5", self.ssr_shift));
        }
        v.positive("augment.queue_batches", self.queue_batches);
    }
}

impl ModelConfig {
    fn check(&self, v: &mut Validator) {
        if self.preset.trim().is_empty() {
            v.fail("model.preset", "is empty; use vit-tiny-p8, vit-small-p8, vit-base-p8 or a path".into());
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            v.fail("model.drop_path_rate", format!("is {}; must be in 0..1", self.drop_path_rate));
        }
        match (&self.init, &self.init_bands) {
            (Some(_), None) => v.fail(
                "model.init_bands",
                "is unset; weight files carry no band names: name the channels of model.init, e.g. `rgb` or `ssl4eo-s12-13` (--init-bands)".into(),
            ),
            (_, Some(bands)) => {
                if let Err(reason) = parse_init_bands(bands) {
                    v.fail("model.init_bands", reason);
                }
            }
            (None, None) => {}
        }
    }
}

impl TrainConfig {
    fn check(&self, v: &mut Validator) {
        v.positive("train.batch_size", self.batch_size);
        v.positive("train.epochs", self.epochs);
        v.positive_f("train.lr", self.lr);
        v.positive_f("train.student_temp", self.student_temp);
        v.positive_f("train.teacher_temp", self.teacher_temp);
        v.positive_f("train.warmup_teacher_temp", self.warmup_teacher_temp);
        v.probability("train.momentum_teacher", self.momentum_teacher);
        v.probability("train.center_momentum", self.center_momentum);
        if self.min_lr < 0.0 || self.weight_decay < 0.0 || self.weight_decay_end < 0.0 || self.clip_grad < 0.0
        {
            v.fail("train.min_lr/weight_decay/weight_decay_end/clip_grad", "must not be negative".into());
        }
        v.positive("train.log_every_steps", self.log_every_steps);
        v.positive("train.cache_mb", self.cache_mb);
    }
}

impl StreamConfig {
    fn check(&self, v: &mut Validator) {
        if self.watch_dir.as_os_str().is_empty() {
            v.fail("stream.watch_dir", "is empty; name the folder to watch, e.g. \"incoming\"".into());
        }
        v.positive("stream.rescan_secs", self.rescan_secs as usize);
        v.positive("stream.replay_capacity_patches", self.replay_capacity_patches);
        v.positive("stream.replay_memory_mb", self.replay_memory_mb as usize);
        v.positive("stream.replay_disk_mb", self.replay_disk_mb as usize);
        if !(self.fresh_fraction > 0.0 && self.fresh_fraction <= 1.0) {
            v.fail("stream.fresh_fraction", format!("is {}; must be in (0, 1]", self.fresh_fraction));
        }
        v.positive("stream.ledger_compact_records", self.ledger_compact_records);
    }
}

impl ServeConfig {
    fn check(&self, v: &mut Validator) {
        for (key, dir) in [("serve.state_dir", &self.state_dir), ("serve.exports_dir", &self.exports_dir)] {
            if dir.as_os_str().is_empty() {
                v.fail(key, "is empty; name a folder, e.g. \"state\"".into());
            }
        }
        v.positive("serve.horizon_steps", self.horizon_steps as usize);
        v.positive("serve.keep_checkpoints", self.keep_checkpoints);
        v.positive("serve.pause_after_unsaved_steps", self.pause_after_unsaved_steps as usize);
        v.positive("serve.graceful_shutdown_limit_secs", self.graceful_shutdown_limit_secs as usize);
        v.positive("serve.status_every_steps", self.status_every_steps as usize);
        if self.checkpoint_every_steps == 0 && self.checkpoint_every_secs == 0 {
            v.fail(
                "serve.checkpoint_every_steps/checkpoint_every_secs",
                "are both 0; set at least one so that training is saved while running".into(),
            );
        }
        if let (Some(max), cooldown) = (self.max_steps, self.cooldown_steps)
            && cooldown > max
        {
            v.fail("serve.cooldown_steps", format!("is {cooldown}; must not exceed serve.max_steps ({max})"));
        }
        if self.max_steps == Some(0) {
            v.fail("serve.max_steps", "is 0; must be at least 1 (or unset to run until stopped)".into());
        }
        if let Some(cap) = self.max_rehearsal_steps_per_patch
            && !(cap >= 0.0 && cap.is_finite())
        {
            v.fail(
                "serve.max_rehearsal_steps_per_patch",
                format!("is {cap}; must be a number >= 0 (or unset for no cap; `serve.rehearsal = \"off\"` turns rehearsal off)"),
            );
        }
        if !(self.duty_cycle > 0.0 && self.duty_cycle <= 1.0) {
            v.fail(
                "serve.duty_cycle",
                format!("is {}; must be in (0, 1] (1 = no pause between steps)", self.duty_cycle),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<KeyError> {
        Config::from_toml(text).unwrap().validate().unwrap_err()
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.tile.bands, SEED_BANDS);
        assert_eq!(cfg.tile.patch_px, 120);
        assert_eq!(cfg.augment.local_crops, 6);
        assert_eq!(cfg.train.clip_grad, 3.0);
        cfg.validate().unwrap();
    }

    #[test]
    fn defaults_survive_a_round_trip_through_toml() {
        let cfg = Config::default();
        assert_eq!(Config::from_toml(&cfg.to_toml()).unwrap(), cfg);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = Config::from_toml("[tile]\npatch_size = 3\n").unwrap_err();
        assert!(err.contains("patch_size"), "{err}");
    }

    #[test]
    fn every_invalid_value_is_reported_with_its_key() {
        let errs = errors_of("[tile]\npatch_px = 0\nlayout = \"landsat\"\n[augment]\nflip_p = 1.5\n");
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["tile.layout", "tile.patch_px", "augment.flip_p"]);
        assert!(errs[0].reason.contains("eurosat13"), "{}", errs[0].reason);
    }

    #[test]
    fn unknown_band_name_lists_the_valid_ones() {
        let errs = errors_of("[tile]\nbands = [\"B02\", \"B13\"]\n");
        assert_eq!(errs[0].key, "tile.bands");
        assert!(errs[0].reason.contains("B8A"));
    }

    #[test]
    fn layout_accepts_presets_and_explicit_lists() {
        assert_eq!(parse_layout("eurosat13").unwrap().last().unwrap(), "B8A");
        assert_eq!(parse_layout("sentinel2-12").unwrap().len(), 12);
        assert_eq!(parse_layout("b04,B03, B02").unwrap(), ["B04", "B03", "B02"]);
        assert!(parse_layout("B04,B99").is_err());
    }

    #[test]
    fn export_defaults_and_a_rejected_contract() {
        let cfg = Config::default();
        assert!(cfg.export.enabled);
        assert_eq!(cfg.export.input_contract, "reflectance");
        let errs = errors_of("[export]\ninput_contract = \"dn\"\nkeep = 0\n");
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["export.input_contract", "export.keep"]);
    }

    #[test]
    fn model_init_is_unset_by_default_and_needs_named_bands() {
        let cfg = Config::default().model;
        assert_eq!((cfg.init, cfg.init_bands, cfg.init_missing_bands), (None, None, MissingBands::Mean));
        let errs = errors_of("[model]\ninit = \"dino.pth\"\n");
        assert_eq!(errs[0].key, "model.init_bands");
        assert!(errs[0].reason.contains("ssl4eo-s12-13"), "{}", errs[0].reason);
        let errs = errors_of("[model]\ninit = \"dino.pth\"\ninit_bands = \"B04,,B02\"\n");
        assert_eq!(errs[0].key, "model.init_bands");
        assert!(Config::from_toml("[model]\ninit_missing_bands = \"median\"\n").is_err());
        assert_eq!(parse_init_bands("rgb").unwrap(), ["B04", "B03", "B02"]);
        assert_eq!(parse_init_bands("ssl4eo-s12-13").unwrap()[8], "B8A");
        assert_eq!(parse_init_bands("vv, b02").unwrap(), ["VV", "B02"]);
    }

    #[test]
    fn train_cache_defaults_to_a_gigabyte_and_must_be_positive() {
        assert_eq!(Config::default().train.cache_mb, 1024);
        assert_eq!(errors_of("[train]\ncache_mb = 0\n")[0].key, "train.cache_mb");
    }

    #[test]
    fn overridden_key_keeps_the_other_defaults() {
        let cfg = Config::from_toml("[train]\nbatch_size = 8\n").unwrap();
        assert_eq!(cfg.train.batch_size, 8);
        assert_eq!(cfg.train.lr, 5e-4);
    }

    #[test]
    fn stream_section_defaults_match_the_docs() {
        let cfg = Config::from_toml("").unwrap().stream;
        assert_eq!(cfg.watch_dir, Path::new("incoming"));
        assert!(!cfg.recursive);
        assert_eq!((cfg.settle_ms, cfg.rescan_secs), (1000, 30));
        assert_eq!((cfg.handled, cfg.rejected), (HandledPolicy::Keep, RejectedPolicy::Move));
        assert_eq!(cfg.replay_capacity_patches, 1024);
        assert_eq!((cfg.replay_memory_mb, cfg.replay_disk_mb), (512, 4096));
        assert_eq!(cfg.replay_policy, ReplayPolicy::Reservoir);
        assert_eq!(cfg.fresh_fraction, 0.5);
        assert_eq!(cfg.ledger_compact_records, 10_000);
    }

    #[test]
    fn stream_policies_are_read_in_lowercase() {
        let cfg = Config::from_toml(
            "[stream]\nhandled = \"delete\"\nrejected = \"record\"\nreplay_policy = \"fifo\"\nrecursive = true\n",
        )
        .unwrap();
        assert_eq!(cfg.stream.handled, HandledPolicy::Delete);
        assert_eq!(cfg.stream.rejected, RejectedPolicy::Record);
        assert_eq!(cfg.stream.replay_policy, ReplayPolicy::Fifo);
        assert!(cfg.stream.recursive);
        assert!(Config::from_toml("[stream]\nhandled = \"archive\"\n").unwrap_err().contains("archive"));
        let minred = Config::from_toml("[stream]\nreplay_policy = \"min-redundancy\"\n").unwrap();
        assert_eq!(minred.stream.replay_policy, ReplayPolicy::MinRedundancy);
        assert!(Config::from_toml("[stream]\nreplay_policy = \"minred\"\n").unwrap_err().contains("minred"));
    }

    #[test]
    fn every_invalid_stream_value_is_reported_with_its_key() {
        let errs = errors_of(
            "[stream]\nwatch_dir = \"\"\nrescan_secs = 0\nreplay_capacity_patches = 0\nreplay_memory_mb = 0\nreplay_disk_mb = 0\nfresh_fraction = 0.0\nledger_compact_records = 0\n",
        );
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "stream.watch_dir",
                "stream.rescan_secs",
                "stream.replay_capacity_patches",
                "stream.replay_memory_mb",
                "stream.replay_disk_mb",
                "stream.fresh_fraction",
                "stream.ledger_compact_records"
            ]
        );
        assert!(errors_of("[stream]\nfresh_fraction = 1.5\n")[0].reason.contains("(0, 1]"));
    }
    #[test]
    fn serve_section_defaults_match_the_docs() {
        let cfg = Config::from_toml("").unwrap().serve;
        assert_eq!(
            (cfg.state_dir.as_path(), cfg.exports_dir.as_path()),
            (Path::new("state"), Path::new("exports"))
        );
        assert_eq!((cfg.warmup_steps, cfg.cooldown_steps, cfg.horizon_steps), (1000, 0, 100_000));
        assert_eq!((cfg.weight_decay_schedule, cfg.momentum_schedule), (Shape::Constant, Shape::Constant));
        assert_eq!((cfg.teacher_temp_warmup_steps, cfg.freeze_last_layer_steps), (1000, 1000));
        assert_eq!(
            (cfg.checkpoint_every_steps, cfg.checkpoint_every_secs, cfg.keep_checkpoints),
            (500, 600, 3)
        );
        assert_eq!((cfg.graceful_shutdown_limit_secs, cfg.status_every_steps), (30, 10));
        assert_eq!((cfg.metrics_port, cfg.max_steps), (None, None));
        assert_eq!(
            (cfg.rehearsal, cfg.max_rehearsal_steps_per_patch, cfg.duty_cycle),
            (Rehearsal::Continuous, None, 1.0)
        );
        assert_eq!(cfg.pause_after_unsaved_steps, 1000);
    }

    #[test]
    fn rehearsal_keys_are_read_and_bad_values_rejected_with_their_key() {
        let cfg = Config::from_toml(
            "[serve]\nrehearsal = \"off\"\nmax_rehearsal_steps_per_patch = 2.5\nduty_cycle = 0.25\n",
        )
        .unwrap();
        assert_eq!(
            (cfg.serve.rehearsal, cfg.serve.max_rehearsal_steps_per_patch, cfg.serve.duty_cycle),
            (Rehearsal::Off, Some(2.5), 0.25)
        );
        assert!(Config::from_toml("[serve]\nrehearsal = \"always\"\n").unwrap_err().contains("always"));
        let errs = errors_of("[serve]\nmax_rehearsal_steps_per_patch = -1.0\nduty_cycle = 0.0\n");
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["serve.max_rehearsal_steps_per_patch", "serve.duty_cycle"]);
        assert!(errors_of("[serve]\nduty_cycle = 1.5\n")[0].reason.contains("(0, 1]"));
    }

    #[test]
    fn pause_after_unsaved_steps_must_be_positive() {
        let errs = errors_of("[serve]\npause_after_unsaved_steps = 0\n");
        assert_eq!(errs[0].key, "serve.pause_after_unsaved_steps");
    }

    #[test]
    fn serve_keys_are_overridden_and_schedule_shapes_read_in_lowercase() {
        let cfg = Config::from_toml(
            "[serve]\nmomentum_schedule = \"cosine\"\nweight_decay_schedule = \"cosine\"\nmetrics_port = 9100\nmax_steps = 7\n",
        )
        .unwrap();
        assert_eq!(
            (cfg.serve.momentum_schedule, cfg.serve.weight_decay_schedule),
            (Shape::Cosine, Shape::Cosine)
        );
        assert_eq!((cfg.serve.metrics_port, cfg.serve.max_steps), (Some(9100), Some(7)));
        assert!(
            Config::from_toml("[serve]\nmomentum_schedule = \"linear\"\n").unwrap_err().contains("linear")
        );
    }

    #[test]
    fn every_invalid_serve_value_is_reported_with_its_key() {
        let errs = errors_of(
            "[serve]\nstate_dir = \"\"\nhorizon_steps = 0\nkeep_checkpoints = 0\ngraceful_shutdown_limit_secs = 0\nstatus_every_steps = 0\ncheckpoint_every_steps = 0\ncheckpoint_every_secs = 0\nmax_steps = 3\ncooldown_steps = 5\n",
        );
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "serve.state_dir",
                "serve.horizon_steps",
                "serve.keep_checkpoints",
                "serve.graceful_shutdown_limit_secs",
                "serve.status_every_steps",
                "serve.checkpoint_every_steps/checkpoint_every_secs",
                "serve.cooldown_steps"
            ]
        );
        assert_eq!(errors_of("[serve]\nmax_steps = 0\n")[0].key, "serve.max_steps");
    }

    #[test]
    fn deploy_config_parses_and_documents_every_key() {
        let text = include_str!("../deploy/config.toml");
        let cfg = Config::from_toml(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.stream.watch_dir, Path::new("/srv/dinostream/incoming"));
        let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        for (section, keys) in &defaults {
            assert!(text.contains(&format!("[{section}]")), "deploy/config.toml lacks [{section}]");
            for key in keys.as_table().unwrap().keys() {
                assert!(text.contains(&format!("\n{key} = ")), "deploy/config.toml lacks {section}.{key}");
            }
        }
        for optional in [
            "# nodata = ",
            "# metrics_port = ",
            "# max_steps = ",
            "# max_rehearsal_steps_per_patch = ",
            "# init = ",
            "# init_bands = ",
        ] {
            assert!(text.contains(optional), "deploy/config.toml lacks {optional}");
        }
    }
}
