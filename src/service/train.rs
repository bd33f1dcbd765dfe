//! `dinostream train`: DINO over a fixed folder of tiles (no watching). The folder is indexed
//! (input and window of every usable patch, not the pixels), a feeder thread reads the patches in
//! a fresh seeded order each epoch through a cache of `train.cache_mb` and streams them into the
//! augmentation pool, and the trainer takes the pool's batches for `steps` steps, then writes a
//! checkpoint. Memory stays bounded whatever the folder holds. A time limit ends the run early (the schedules still span `steps`), and a metrics
//! file records every step for plots. For data that keeps arriving, `serve` is the command.

use std::collections::HashSet;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Sender, bounded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::augment::{AugmentPool, Augmenter, Sample};
use crate::config::Config;
use crate::dino::schedule::ScheduleSpan;
use crate::dino::{StepReport, Trainer, TrainerSetup, checkpoint};
use crate::tile::{self, IndexedPatches, PatchIndex};

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
    let patches = index_patches(&job.data, cfg)?;
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

/// The usable patches of every input under `data`, indexed, read through a cache of
/// `train.cache_mb`; bad inputs are logged and skipped.
fn index_patches(data: &Path, cfg: &Config) -> Result<IndexedPatches> {
    let inputs = if data.is_dir() { tile::list_inputs(data)? } else { vec![tile::Input::detect(data)?] };
    let started = Instant::now();
    let (index, failed) = PatchIndex::build(&inputs, &cfg.tile);
    for err in failed {
        log::warn!("skipped: {err}");
    }
    if index.is_empty() {
        bail!(
            "{}: no usable patches among {} inputs; check the folder, `--layout` and `tile.bands`",
            data.display(),
            inputs.len()
        );
    }
    log::info!(
        "indexed {} patches of {} inputs in {:.1} s ({:.1} MB of index); reading them through a {} MB cache",
        index.len(),
        index.inputs().len(),
        started.elapsed().as_secs_f64(),
        index.bytes() as f64 / 1e6,
        cfg.train.cache_mb
    );
    Ok(IndexedPatches::new(index, &cfg.tile, cfg.train.cache_mb << 20))
}

/// Feed the pool and step the trainer `job.steps` times or until the time limit.
fn train_steps(
    cfg: &Config,
    patches: IndexedPatches,
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
        let Some(batch) = pool.recv() else {
            drop(pool);
            return Err(feeder_failure(feeder));
        };
        let batch = batch?;
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

/// Why the pool ran dry: the feeder's error when it stopped with one.
fn feeder_failure(feeder: JoinHandle<Result<()>>) -> anyhow::Error {
    match feeder.join() {
        Ok(Err(err)) => err.context("the patch feeder stopped"),
        _ => anyhow!("the augmentation pool stopped"),
    }
}

/// Stream the patches, reshuffled each epoch, as numbered samples until the pool hangs up. A
/// patch that cannot be read is skipped (one warning per input); an epoch without a single
/// readable patch ends the feed with an error instead of spinning.
fn feed(mut patches: IndexedPatches, seed: u64, tx: Sender<Sample>) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..patches.len()).collect();
    let mut id = 0u64;
    let mut warned = HashSet::new();
    loop {
        order.shuffle(&mut rng);
        let epoch_start = id;
        for &i in &order {
            let patch = match patches.get(i) {
                Ok(patch) => patch,
                Err(err) => {
                    if warned.insert(patches.index().input_of(i).path.clone()) {
                        log::warn!("skipping its patches while they cannot be read: {err}");
                    }
                    continue;
                }
            };
            if tx.send(Sample { id, patch }).is_err() {
                return Ok(());
            }
            id += 1;
        }
        if id == epoch_start {
            bail!(
                "none of the {} indexed patches could be read in a whole epoch (see the warnings above)",
                order.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crossbeam_channel::Receiver;

    use super::*;
    use crate::config::TileConfig;
    use crate::tile::{Input, Patch};

    fn eurosat() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eurosat-ms")
    }

    /// What `train` fed before the index: every patch read into memory, the list reshuffled
    /// each epoch with the same seeded generator.
    fn in_memory_samples(inputs: &[Input], cfg: &TileConfig, seed: u64, n: usize) -> Vec<(u64, Patch)> {
        let patches: Vec<Patch> = inputs.iter().flat_map(|i| tile::read_patches(i, cfg).unwrap()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..patches.len()).collect();
        let mut out = Vec::new();
        while out.len() < n {
            order.shuffle(&mut rng);
            out.extend(order.iter().map(|&i| patches[i].clone()));
        }
        out.into_iter().take(n).enumerate().map(|(k, p)| (k as u64, p)).collect()
    }

    /// Run the feeder on `patches` until `n` samples arrived, then hang up.
    fn fed(patches: IndexedPatches, seed: u64, n: usize) -> (Vec<Sample>, Result<()>) {
        let (tx, rx): (Sender<Sample>, Receiver<Sample>) = bounded(4);
        let feeder = thread::spawn(move || feed(patches, seed, tx));
        let samples: Vec<Sample> = rx.iter().take(n).collect();
        drop(rx);
        (samples, feeder.join().expect("the feeder does not panic"))
    }

    /// Same order, same patches, same ids as the in-memory feed, over three epochs, whether the
    /// cache holds the whole folder or nothing at all.
    #[test]
    fn indexed_feed_gives_the_samples_of_the_in_memory_feed() {
        let windows =
            TileConfig { layout: "eurosat13".into(), patch_px: 16, stride_px: 8, ..TileConfig::default() };
        let whole = TileConfig { layout: "eurosat13".into(), ..TileConfig::default() };
        let inputs = tile::list_inputs(&eurosat()).unwrap();
        for cfg in [windows, whole] {
            let (index, _) = PatchIndex::build(&inputs, &cfg);
            let n = 3 * index.len() + 1;
            let expected = in_memory_samples(&inputs, &cfg, 11, n);
            for budget in [0, 1 << 30] {
                let (samples, result) = fed(IndexedPatches::new(index.clone(), &cfg, budget), 11, n);
                result.unwrap();
                assert_eq!(samples.len(), n);
                for (sample, (id, patch)) in samples.iter().zip(&expected) {
                    assert_eq!(sample.id, *id);
                    assert!(*sample.patch == *patch, "sample {id} differs (budget {budget})");
                }
            }
        }
    }

    /// A vanished input's patches are skipped (ids stay consecutive); when nothing can be read
    /// the feeder stops with an error instead of spinning.
    #[test]
    fn unreadable_patches_are_skipped_and_an_unreadable_folder_ends_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.tif", "b.tif"] {
            std::fs::copy(eurosat().join("Forest/Forest_1.tif"), dir.path().join(name)).unwrap();
        }
        let cfg = TileConfig { layout: "eurosat13".into(), ..TileConfig::default() };
        let (index, _) = PatchIndex::build(&tile::list_inputs(dir.path()).unwrap(), &cfg);
        std::fs::remove_file(dir.path().join("a.tif")).unwrap();
        let (samples, result) = fed(IndexedPatches::new(index.clone(), &cfg, 0), 1, 5);
        result.unwrap();
        assert_eq!(samples.iter().map(|s| s.id).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert!(samples.iter().all(|s| s.patch.source.ends_with("b.tif")));
        std::fs::remove_file(dir.path().join("b.tif")).unwrap();
        let (samples, result) = fed(IndexedPatches::new(index, &cfg, 0), 1, 5);
        assert!(samples.is_empty());
        assert!(result.unwrap_err().to_string().contains("none of the 2 indexed patches"));
    }
}
