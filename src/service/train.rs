//! `dinostream train`: DINO over a fixed folder of tiles (no watching). Every patch of the folder
//! is read once into memory, a feeder thread streams them in a fresh seeded order each epoch into
//! the augmentation pool, and the trainer takes the pool's batches for `steps` steps, then writes a
//! checkpoint. A time limit ends the run early (the schedules still span `steps`), and a metrics
//! file records every step for plots. For data that keeps arriving, `serve` is the command.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Sender, bounded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::augment::{AugmentPool, Augmenter, Sample};
use crate::config::Config;
use crate::dino::schedule::ScheduleSpan;
use crate::dino::{StepReport, Trainer, TrainerSetup, checkpoint};
use crate::tile::{self, Patch};

/// What `train` was asked to do.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Folder (or single tile) with the training data.
    pub data: PathBuf,
    /// Optimizer steps to run.
    pub steps: usize,
    /// Where the final checkpoint goes.
    pub checkpoint: PathBuf,
    /// Stop after the step that crosses this much training time (then checkpoint as usual).
    pub time_limit: Option<Duration>,
    /// JSON-lines file that receives every step's report.
    pub metrics: Option<PathBuf>,
}

/// Reports training progress to the caller (the CLI draws a progress bar).
pub trait Progress {
    /// Called after every step with the report and the samples/s since the start.
    fn step(&mut self, report: &StepReport, samples_per_sec: f64);
}

/// Run `job` with `cfg`; returns the last step's report, `None` for `steps = 0`, which writes the
/// freshly initialised model (the random-init baseline of an evaluation).
pub fn run(cfg: &Config, job: &TrainJob, progress: &mut dyn Progress) -> Result<Option<StepReport>> {
    let patches = load_patches(&job.data, cfg)?;
    let batch_size = cfg.train.batch_size;
    let span = ScheduleSpan::for_steps(job.steps, patches.len(), batch_size);
    let setup = TrainerSetup::new(&cfg.model, &cfg.train, &cfg.tile.bands, cfg.augment.local_crops, span)?;
    let device = crate::model::device(cfg.train.device)?;
    let mut trainer = crate::dino::init::begin(setup, &cfg.augment, &device)?;
    log::info!(
        "training {} on {} patches from {}: {} steps of {batch_size} samples on {device:?}",
        cfg.model.preset,
        patches.len(),
        job.data.display(),
        job.steps
    );
    let last = match job.steps {
        0 => None,
        _ => Some(train_steps(cfg, patches, job, &mut trainer, progress)?),
    };
    checkpoint::save(&job.checkpoint, &trainer)
        .with_context(|| format!("{}: cannot write the checkpoint", job.checkpoint.display()))?;
    log::info!("checkpoint of step {} written to {}", trainer.state().step, job.checkpoint.display());
    Ok(last)
}

/// Every patch of every input under `data`; bad inputs are logged and skipped.
fn load_patches(data: &Path, cfg: &Config) -> Result<Vec<Arc<Patch>>> {
    let inputs = if data.is_dir() { tile::list_inputs(data)? } else { vec![tile::Input::detect(data)?] };
    let mut patches = Vec::new();
    for input in &inputs {
        match tile::read_patches(input, &cfg.tile) {
            Ok(found) => patches.extend(found.into_iter().map(Arc::new)),
            Err(err) => log::warn!("skipped: {err}"),
        }
    }
    if patches.is_empty() {
        bail!(
            "{}: no usable patches among {} inputs; check the folder, `--layout` and `tile.bands`",
            data.display(),
            inputs.len()
        );
    }
    Ok(patches)
}

/// Feed the pool and step the trainer `job.steps` times or until the time limit.
fn train_steps(
    cfg: &Config,
    patches: Vec<Arc<Patch>>,
    job: &TrainJob,
    trainer: &mut Trainer,
    progress: &mut dyn Progress,
) -> Result<StepReport> {
    let mut metrics = MetricsLog::create(job.metrics.as_deref())?;
    let augmenter = Arc::new(Augmenter::new(&cfg.augment, &cfg.tile.bands)?);
    let (tx, rx) = bounded(cfg.train.batch_size);
    let seed = cfg.augment.seed;
    let feeder = thread::Builder::new().name("feeder".into()).spawn(move || feed(patches, seed, tx))?;
    let mut pool = AugmentPool::from_config(&cfg.augment, augmenter, rx, cfg.train.batch_size)?;
    let start = Instant::now();
    let mut waited = Duration::ZERO;
    let mut last = None;
    for done in 1..=job.steps {
        let wait = Instant::now();
        let batch = pool.recv().context("the augmentation pool stopped")??;
        waited += wait.elapsed();
        let mut report = trainer.step(&batch)?;
        pool.recycle(batch);
        let elapsed = start.elapsed();
        let out_of_time = job.time_limit.is_some_and(|limit| elapsed >= limit);
        if done == job.steps || out_of_time {
            report.loss = trainer.flush_loss()?.or(report.loss);
        }
        let rate = (done * cfg.train.batch_size) as f64 / elapsed.as_secs_f64();
        progress.step(&report, rate);
        metrics.write(&report, rate, elapsed, waited)?;
        last = Some(report);
        if out_of_time {
            log::info!("time limit reached after {done} of {} steps", job.steps);
            break;
        }
    }
    drop(pool);
    let _ = feeder.join();
    let wall = start.elapsed().as_secs_f64();
    log::info!(
        "{:.1}% of {wall:.1} s spent waiting for augmented batches",
        100.0 * waited.as_secs_f64() / wall
    );
    last.context("no step was run (steps = 0)")
}

/// `train --metrics FILE`: one JSON object per step, the [`StepReport`] plus `samples_per_s`,
/// `elapsed_s` and `data_wait_s` (time spent waiting for augmented batches so far), flushed line
/// by line so a crashed run keeps its curve.
struct MetricsLog {
    out: Option<(PathBuf, LineWriter<File>)>,
}

impl MetricsLog {
    fn create(path: Option<&Path>) -> Result<MetricsLog> {
        let out = match path {
            Some(path) => {
                let file = File::create(path)
                    .with_context(|| format!("{}: cannot create the metrics file", path.display()))?;
                Some((path.to_path_buf(), LineWriter::new(file)))
            }
            None => None,
        };
        Ok(MetricsLog { out })
    }

    fn write(
        &mut self,
        report: &StepReport,
        samples_per_s: f64,
        elapsed: Duration,
        waited: Duration,
    ) -> Result<()> {
        let Some((path, out)) = &mut self.out else { return Ok(()) };
        let mut line = serde_json::to_value(report)?;
        line["samples_per_s"] = samples_per_s.into();
        line["elapsed_s"] = elapsed.as_secs_f64().into();
        line["data_wait_s"] = waited.as_secs_f64().into();
        writeln!(out, "{line}").with_context(|| format!("{}: cannot write the metrics", path.display()))
    }
}

/// Stream the patches, reshuffled each epoch, as numbered samples until the pool hangs up.
fn feed(patches: Vec<Arc<Patch>>, seed: u64, tx: Sender<Sample>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..patches.len()).collect();
    let mut id = 0u64;
    loop {
        order.shuffle(&mut rng);
        for &i in &order {
            if tx.send(Sample { id, patch: Arc::clone(&patches[i]) }).is_err() {
                return;
            }
            id += 1;
        }
    }
}
