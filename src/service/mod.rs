//! The long-running service (`dinostream serve`): owns the threads, the bounded channels between
//! stages, the stop flag and everything that talks to the operating system (signals, systemd,
//! status files). Stages themselves are plain functions over values.
//!
//! ```text
//! Watcher thread --candidates--> owner --jobs--> ingest thread --patches--> owner
//! owner: ledger, mixer (fresh + replay) --samples--> augment pool --batches--> owner: trainer
//! ```
//!
//! One owner thread holds the ledger, the mixer and the trainer; every other stage runs on its own
//! thread behind a bounded channel. The loop's rules:
//!
//! - **Deterministic batches.** Tiles already in the folder are scanned synchronously in sorted
//!   order before the watcher starts; tiles are ingested one after the other and their patches
//!   enter the mixer in that order; a batch is only mixed when the fresh queue holds a whole batch
//!   or nothing is being read, and sample ids come from a counter saved in the checkpoint. So a
//!   run stopped and resumed trains bit for bit like one that went straight through.
//! - **Rehearsal between arrivals** ([`rehearsal`]): with nothing being read and no fresh patch
//!   waiting, replay-only batches keep the trainer busy (`serve.rehearsal`). They obey the rule
//!   above, and whether one is allowed depends only on checkpointed counts, so resume stays exact.
//!   A newly read patch enters one of the next two batches: at most one batch is ahead of the
//!   trainer when it arrives. `serve.duty_cycle` pauses between steps (before mixing the next
//!   batch); the loop keeps pumping ingest, the watchdog and the stop flag while it pauses.
//! - **Checkpoints only between batches.** Up to [`PREFETCH_BATCHES`] batches are augmented ahead;
//!   once a checkpoint (or the stop) is due no further batch is mixed, and the checkpoint is written
//!   when the ones in flight are trained: the mixer state saved is exactly the trained state.
//! - **Nothing trained is lost.** A tile is marked trained at the step that used its last patch;
//!   on resume, tiles trained after the checkpoint are requeued
//!   ([`Ledger::requeue_trained_after`]). `stream.handled = move/delete` is applied only once a
//!   checkpoint covers the tile.
//! - **Bad tiles never stop the loop**: one `warn!` line, a ledger entry with the reason,
//!   `stream.rejected` applied, the rejected counter in status. Paths that cannot be read and
//!   copies of known content are rejected the same way without a ledger entry ([`intake`]).
//! - **A failing state disk degrades the service, it does not end it** ([`health`]): failed
//!   checkpoints are retried with backoff and reported; training pauses when too much is unsaved.
//!   A ledger the disk cannot take keeps its marks in memory (checkpoints wait for them) and new
//!   tiles are observed again every second until they can be recorded.

pub mod checkpoints;
pub mod health;
pub mod ingest;
pub mod intake;
pub mod schedule;
pub mod signal;
pub mod status;
pub mod systemd;
pub mod publish;
pub mod rehearsal;
pub mod train;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::augment::{AugmentPool, Augmenter, Sample};
use crate::config::Config;
use crate::dino::schedule::ScheduleSpan;
use crate::dino::{StepReport, Trainer, TrainerSetup};
use crate::stream::{self, Candidate, Identity, Ledger, Mixer, Observation, TileId, TileState, Watcher};
use crate::tile::Patch;
use checkpoints::ServeState;
use health::CheckpointHealth;
use ingest::{IngestWorker, Ingested, Job};
use intake::Untracked;
use rehearsal::{DutyCycle, RehearsalPolicy};
use schedule::ContinualSchedule;
use signal::StopFlag;
use status::Status;
use systemd::Systemd;

/// Batches augmented ahead of the trainer.
pub const PREFETCH_BATCHES: usize = 2;
/// Candidates the watcher may queue for the owner.
const CANDIDATE_CAPACITY: usize = 1024;
/// How long the owner sleeps when there is nothing to do (the watchdog is pinged in between).
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// How often candidates the ledger could not record (state disk full) are observed again.
const DEFERRED_RETRY: Duration = Duration::from_secs(1);
/// The longest single sleep of a duty-cycle pause (the loop pumps and checks the stop flag between).
const PAUSE_SLICE: Duration = Duration::from_millis(100);
/// Mixed into `train.seed` for the mixer's RNG.
const MIXER_SEED: u64 = 0x6d69_7865_7200;

/// Run the service until `stop` is set or `serve.max_steps` is reached. Returns after the final
/// checkpoint; errors are environmental (state folder unwritable, watch folder gone, model).
pub fn serve(cfg: &Config, stop: StopFlag) -> Result<()> {
    guard_shutdown(&stop, Duration::from_secs(cfg.serve.graceful_shutdown_limit_secs))?;
    let mut service = Service::start(cfg, stop)?;
    let outcome = service.run();
    service.finish(outcome)
}

/// After a stop request, exit with status 1 if the graceful path takes longer than `limit`.
fn guard_shutdown(stop: &StopFlag, limit: Duration) -> Result<()> {
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("dinostream-shutdown-guard".into())
        .spawn(move || {
            while !stop.is_requested() {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(limit);
            log::error!(
                "graceful shutdown did not finish within {} s (serve.graceful_shutdown_limit_secs); exiting without a final checkpoint",
                limit.as_secs()
            );
            std::process::exit(1);
        })
        .context("cannot start the shutdown guard thread")?;
    Ok(())
}

/// A batch being augmented, with the tiles whose last patch it holds.
struct InFlight {
    completed: Vec<TileId>,
    replay_only: bool,
    /// The batch's number and replay keys (for the teacher embeddings of `min-redundancy`).
    number: u64,
    keys: Vec<u64>,
}

const _: () = assert!(
    PREFETCH_BATCHES as u64 <= stream::replay::EMBEDDING_LAG_BATCHES,
    "a batch is mixed only after the embeddings it waits for were recorded"
);

/// The owner thread's state.
struct Service {
    cfg: Config,
    stop: StopFlag,
    systemd: Systemd,
    ledger: Ledger,
    mixer: Mixer,
    trainer: Trainer,
    schedule: ContinualSchedule,
    next_sample_id: u64,
    ingest: IngestWorker,
    /// Tiles waiting to be handed to the ingest worker, in order.
    to_ingest: VecDeque<TileId>,
    /// Tiles handed to the worker and not finished yet.
    ingesting: usize,
    /// Tiles queued or being read in this process (a tile seen again is not read twice).
    scheduled: HashSet<TileId>,
    /// A patch the full fresh queue gave back; no further patch is read before it is queued.
    stalled: Option<(TileId, Patch)>,
    samples: Sender<Sample>,
    pool: AugmentPool,
    in_flight: VecDeque<InFlight>,
    candidates: Receiver<Candidate>,
    watcher: Option<Watcher>,
    /// Trained tiles whose `stream.handled` waits for the next checkpoint.
    to_dispose: Vec<TileId>,
    /// The step of the newest durable checkpoint (`None`: none yet).
    last_checkpoint: Option<u64>,
    /// When the last checkpoint was attempted (or the service started): `checkpoint_every_secs`
    /// counts from here.
    checkpoint_clock: Instant,
    /// Whether checkpoints are being written (a failing state disk degrades the service).
    health: CheckpointHealth,
    /// Paths rejected without a ledger entry (unreadable, special files, duplicates).
    untracked: Untracked,
    /// New candidates the ledger could not record yet (state disk full), and the last retry.
    deferred: (BTreeSet<PathBuf>, Instant),
    /// The last status.json write failed (logged once until one succeeds).
    status_unwritable: bool,
    status: Arc<Mutex<Status>>,
    last_report: Option<StepReport>,
    /// Collapse indicators of the last step that computed them (every `train.log_every_steps`).
    last_collapse: Option<crate::dino::monitor::Collapse>,
    interval: (Instant, u64),
    /// Tile counts of the last status report.
    reported_counts: Option<stream::Counts>,
    /// Real patches of the latest batch: the probe an ONNX export must reproduce.
    probe: Vec<Arc<Patch>>,
    /// Step of the last published export.
    last_export: Option<u64>,
    rehearsal: RehearsalPolicy,
    duty: DutyCycle,
}

impl Service {
    fn start(cfg: &Config, stop: StopFlag) -> Result<Service> {
        let state_dir = &cfg.serve.state_dir;
        std::fs::create_dir_all(state_dir).with_context(|| {
            format!("{}: cannot create the state folder (serve.state_dir)", state_dir.display())
        })?;
        checkpoints::sweep_leftovers(state_dir, &cfg.serve.exports_dir);
        let mut ledger = Ledger::open(state_dir, cfg.stream.ledger_compact_records)?;
        let device = crate::model::device(cfg.train.device)?;
        let (trainer, mixer, next_sample_id, step) = resume_or_begin(cfg, &device)?;
        let requeued = ledger.requeue_trained_after(step);
        if requeued > 0 {
            log::info!("{requeued} tile(s) trained after the checkpoint of step {step} are queued again");
        }
        let augmenter = Arc::new(Augmenter::new(&cfg.augment, &cfg.tile.bands)?);
        let batch_size = cfg.train.batch_size;
        let (samples, sample_rx) = bounded(batch_size * PREFETCH_BATCHES);
        let workers = match cfg.augment.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            n => n,
        };
        let pool = AugmentPool::spawn(augmenter, sample_rx, batch_size, workers, PREFETCH_BATCHES)
            .context("cannot start the augmentation threads")?;
        let status = Arc::new(Mutex::new(Status::default()));
        if let Some(port) = cfg.serve.metrics_port {
            let bound = status::serve_metrics(port, Arc::clone(&status))
                .with_context(|| format!("serve.metrics_port {port}: cannot listen on 127.0.0.1:{port}"))?;
            log::info!("Prometheus metrics on http://127.0.0.1:{bound}/metrics");
        }
        let (_, never) = bounded(0);
        let mut service = Service {
            schedule: ContinualSchedule::new(&cfg.serve, &cfg.train),
            cfg: cfg.clone(),
            stop,
            systemd: Systemd::detect(),
            ledger,
            mixer,
            trainer,
            next_sample_id,
            ingest: IngestWorker::spawn(&cfg.tile).context("cannot start the ingest thread")?,
            to_ingest: VecDeque::new(),
            ingesting: 0,
            scheduled: HashSet::new(),
            stalled: None,
            samples,
            pool,
            in_flight: VecDeque::new(),
            candidates: never,
            watcher: None,
            to_dispose: Vec::new(),
            last_checkpoint: (step > 0).then_some(step),
            checkpoint_clock: Instant::now(),
            health: CheckpointHealth::default(),
            untracked: Untracked::default(),
            deferred: (BTreeSet::new(), Instant::now()),
            status_unwritable: false,
            status,
            last_report: None,
            last_collapse: None,
            interval: (Instant::now(), step),
            reported_counts: None,
            probe: Vec::new(),
            last_export: None,
            rehearsal: RehearsalPolicy::new(&cfg.serve),
            duty: DutyCycle::new(cfg.serve.duty_cycle),
        };
        service.queue_pending()?;
        service.scan_folder()?;
        service.start_watcher()?;
        service.systemd.ready();
        let c = service.ledger.counts();
        log::info!(
            "serving {} at step {step}: {} tile(s) pending, {} trained, {} rejected; state in {}",
            cfg.stream.watch_dir.display(),
            c.pending,
            c.trained,
            c.rejected,
            state_dir.display()
        );
        Ok(service)
    }

    /// Tiles the ledger knows as pending (from earlier runs), in ledger order.
    fn queue_pending(&mut self) -> Result<()> {
        let pending: Vec<TileId> = self.ledger.pending().into_iter().map(|(id, _)| id).collect();
        for id in pending {
            self.schedule_tile(id);
        }
        Ok(())
    }

    /// What the folder already holds, in sorted order, before the watcher reports anything.
    fn scan_folder(&mut self) -> Result<()> {
        let settle = Duration::from_millis(self.cfg.stream.settle_ms);
        let mut found = Vec::new();
        let root = self.cfg.stream.watch_dir.clone();
        std::fs::create_dir_all(&root).with_context(|| {
            format!("{}: cannot create the watched folder (stream.watch_dir)", root.display())
        })?;
        // the watcher reports canonical paths: the same spelling keeps one file one path
        let root = root.canonicalize().with_context(|| format!("{}: cannot resolve", root.display()))?;
        scan(&root, self.cfg.stream.recursive, settle, &mut found);
        found.sort();
        for path in found {
            self.observe(&path)?;
        }
        Ok(())
    }

    fn start_watcher(&mut self) -> Result<()> {
        let (tx, rx) = bounded(CANDIDATE_CAPACITY);
        self.watcher = Some(Watcher::start(&self.cfg.stream, tx)?);
        self.candidates = rx;
        Ok(())
    }

    /// Record a complete file or folder in the ledger and queue it when it still needs training.
    fn observe(&mut self, path: &Path) -> Result<()> {
        let identity = match Identity::read(path) {
            Ok(identity) => identity,
            Err(e) if intake::is_gone(&e) => {
                log::debug!("{}: gone before it could be identified: {e}", path.display());
                return Ok(());
            }
            Err(e) => {
                self.reject_untracked(path, &format!("cannot be read: {e}"));
                return Ok(());
            }
        };
        self.untracked.forget(path);
        let handled = self.cfg.stream.handled;
        let duplicate = self
            .ledger
            .lookup(&identity)
            .and_then(|(_, known, state)| intake::duplicate_reason(known, state, path, handled));
        if let Some(reason) = duplicate {
            self.reject_untracked(path, &reason);
            return Ok(());
        }
        let observation = match self.ledger.observe(&identity) {
            Ok(observation) => observation,
            Err(e) => {
                // the ledger warns once per spell of failing writes
                log::debug!("{}: not recorded yet, tried again later: {e}", path.display());
                self.deferred.0.insert(path.to_path_buf());
                return Ok(());
            }
        };
        match observation {
            Observation::New(id) | Observation::Known { id, state: TileState::Pending } => {
                self.schedule_tile(id)
            }
            // Trained and saved, yet still here: the process was killed before `stream.handled`
            // was applied after the checkpoint. Apply it now.
            Observation::Known { id, state: TileState::Trained { step } } if step <= self.durable_step() => {
                self.dispose_trained(id)
            }
            Observation::Known { id, state } => {
                log::debug!("{}: already known as tile {} ({state:?})", path.display(), id.0)
            }
        }
        Ok(())
    }

    /// Observe the candidates the ledger could not record again (every [`DEFERRED_RETRY`]), up to
    /// the first that still cannot be recorded.
    fn retry_deferred(&mut self) -> Result<()> {
        if self.deferred.0.is_empty() || self.deferred.1.elapsed() < DEFERRED_RETRY {
            return Ok(());
        }
        self.deferred.1 = Instant::now();
        let mut waiting = std::mem::take(&mut self.deferred.0).into_iter();
        while let Some(path) = waiting.next() {
            self.observe(&path)?;
            if self.deferred.0.contains(&path) {
                self.deferred.0.extend(waiting);
                break;
            }
        }
        Ok(())
    }

    /// Reject a path that gets no ledger entry (unreadable, or a copy of a known tile): one
    /// warning per path and reason, and `stream.rejected` applied.
    fn reject_untracked(&mut self, path: &Path, reason: &str) {
        if !self.untracked.note(path, reason) {
            log::debug!("{}: still rejected: {reason}", path.display());
            return;
        }
        log::warn!("{}: rejected: {reason}", path.display());
        match stream::dispose_rejected(&self.cfg.stream, path, reason) {
            Ok(stream::Disposition::Moved(_)) => self.untracked.forget(path),
            Ok(_) => {}
            Err(e) => log::warn!("{e}"),
        }
    }

    fn schedule_tile(&mut self, id: TileId) {
        if self.scheduled.insert(id) && self.mixer.needs_ingest(id) {
            self.to_ingest.push_back(id);
        }
    }

    /// Train until stopped or `max_steps`; then drain the batches in flight.
    fn run(&mut self) -> Result<()> {
        loop {
            self.pump()?;
            self.systemd.watchdog();
            if self.pause_changed() {
                self.report();
            }
            if self.pause() {
                continue;
            }
            while !self.health.paused() && self.may_mix() && self.mix()? {}
            if !self.in_flight.is_empty() {
                self.train_one()?;
                continue;
            }
            if self.stopping() {
                return Ok(());
            }
            if self.checkpoint_due() {
                self.checkpoint()?;
                continue;
            }
            self.report_if_counts_changed();
            self.wait_for_input();
        }
    }

    /// Sleep a slice of the duty-cycle pause before the next step; false when none is due (or a
    /// stop was requested: the remaining batches are trained without pauses).
    fn pause(&self) -> bool {
        if self.stop.is_requested() || self.in_flight.is_empty() && !self.may_mix() {
            return false;
        }
        let Some(left) = self.duty.pause_left(Instant::now()) else { return false };
        std::thread::sleep(left.min(PAUSE_SLICE));
        true
    }

    fn stopping(&self) -> bool {
        self.stop.is_requested() || self.cfg.serve.max_steps.is_some_and(|max| self.step() >= max)
    }

    fn step(&self) -> u64 {
        self.trainer.state().step
    }

    /// Whether another batch may be mixed now (see the module doc).
    fn may_mix(&self) -> bool {
        let planned = self.step() + self.in_flight.len() as u64;
        self.in_flight.len() < PREFETCH_BATCHES
            && !self.stop.is_requested()
            && self.cfg.serve.max_steps.is_none_or(|max| planned < max)
            && !self.checkpoint_due_at(planned)
            && self.ingest_settled()
    }

    /// The fresh queue holds a whole batch or is full, or nothing more is coming right now.
    fn ingest_settled(&self) -> bool {
        self.mixer.fresh_len() >= self.cfg.train.batch_size
            || self.stalled.is_some()
            || (self.ingesting == 0 && self.to_ingest.is_empty())
    }

    /// Mix one batch (fresh patches first, else a replay-only one when rehearsal allows) and send
    /// its samples to the pool; false when there is no batch to mix.
    fn mix(&mut self) -> Result<bool> {
        let batch_size = self.cfg.train.batch_size;
        let mixer = &mut self.mixer;
        let rehearse = self.rehearsal.allows(mixer.batch_counts(), mixer.fresh_patches());
        let batch = mixer
            .next_batch(batch_size)
            .or_else(|| rehearse.then(|| mixer.next_replay_batch(batch_size)).flatten());
        let Some(batch) = batch else { return Ok(false) };
        let (replay_only, number, keys) = (batch.fresh == 0, batch.number, batch.keys);
        self.probe = batch.patches.iter().take(self.cfg.export.probe_patches).cloned().collect();
        for patch in batch.patches {
            let sample = Sample { id: self.next_sample_id, patch };
            self.next_sample_id += 1;
            self.samples.send(sample).context("the augmentation threads stopped")?;
        }
        let completed = self.mixer.take_completed();
        self.in_flight.push_back(InFlight { completed, replay_only, number, keys });
        Ok(true)
    }

    fn train_one(&mut self) -> Result<()> {
        let started = Instant::now();
        let done = self.in_flight.pop_front().expect("run() checked that a batch is in flight");
        let batch = self.pool.recv().context("the augmentation threads stopped")?;
        let report = match batch {
            Ok(batch) => {
                let settings = self.schedule.at(self.step());
                let report = if self.mixer.wants_embeddings() {
                    let (report, cls) = self.trainer.step_batch_embedding(&batch, &settings)?;
                    self.mixer.record_embeddings(done.number, &done.keys, cls);
                    report
                } else {
                    self.trainer.step_batch_with(&batch, &settings)?
                };
                self.pool.recycle(batch);
                Some(report)
            }
            Err(e) => {
                log::warn!("a batch could not be augmented and is skipped: {e}");
                None
            }
        };
        self.duty.worked(started, Instant::now());
        let step = self.step();
        for tile in done.completed {
            if self.ledger.state(tile)? == &TileState::Pending {
                log::debug!("tile {}: trained at step {step}", tile.0);
                self.ledger.mark_trained(tile, step)?;
                self.to_dispose.push(tile);
                self.scheduled.remove(&tile);
            }
        }
        if let Some(report) = report {
            self.after_step(report);
        }
        Ok(())
    }

    fn after_step(&mut self, mut report: StepReport) {
        // The trainer reads the loss every `log_every_steps` steps: keep the last one read.
        report.loss = report.loss.or(self.last_report.and_then(|r| r.loss));
        if report.collapse.is_some() {
            self.last_collapse = report.collapse;
        }
        if report.step == 1 || report.step % self.cfg.serve.status_every_steps == 0 {
            self.last_report = Some(report);
            self.report();
        }
        self.last_report = Some(report);
    }

    /// Whether training pauses (checkpoints fail and too many steps are unsaved) changed.
    fn pause_changed(&mut self) -> bool {
        let was = self.health.paused();
        let unsaved = self.step() - self.durable_step();
        was != self.health.must_pause(unsaved, self.cfg.serve.pause_after_unsaved_steps)
    }

    /// The step of the last checkpoint written (0: none yet).
    fn durable_step(&self) -> u64 {
        self.last_checkpoint.unwrap_or(0)
    }

    fn checkpoint_due(&self) -> bool {
        self.checkpoint_due_at(self.step())
    }

    fn checkpoint_due_at(&self, step: u64) -> bool {
        if step == 0 && self.last_checkpoint.is_none() && self.cfg.model.init.is_some() {
            // A pretrained start is saved and published before its first step, once a patch has
            // arrived to probe the export with: a restart resumes from it, not from the file.
            return self.mixer.fresh_len() > 0 && self.health.retry_due().unwrap_or(true);
        }
        let saved = self.durable_step();
        if step == saved {
            return false;
        }
        if let Some(retry_due) = self.health.retry_due() {
            return retry_due;
        }
        let every = self.cfg.serve.checkpoint_every_steps;
        let secs = Duration::from_secs(self.cfg.serve.checkpoint_every_secs);
        (every > 0 && step - saved >= every) || (!secs.is_zero() && self.checkpoint_clock.elapsed() >= secs)
    }

    /// Write a checkpoint, export, then apply `stream.handled` to the tiles it covers. A failed
    /// write degrades the service (see [`health`]) instead of ending it.
    fn checkpoint(&mut self) -> Result<()> {
        self.checkpoint_clock = Instant::now();
        let state = ServeState::new(self.step(), self.next_sample_id, self.mixer.state());
        let keep = self.cfg.serve.keep_checkpoints;
        let saved = self.ledger.sync().map_err(anyhow::Error::from).and_then(|()| {
            // the blobs the checkpoint names are durable before it is
            self.mixer.store_mut().sync().context("replay store")?;
            checkpoints::save(&self.cfg.serve.state_dir, &self.trainer, &state, keep)
        });
        let dir = match saved {
            Ok(dir) => dir,
            Err(e) => {
                self.health.failed(self.step(), self.durable_step(), &e);
                self.report();
                return Ok(());
            }
        };
        self.health.succeeded(self.step());
        let collected = self.mixer.store_mut().checkpoint_written(keep);
        log::info!("checkpoint {}", dir.display());
        if collected > 0 {
            log::debug!("replay store: {collected} patch(es) no kept checkpoint names were deleted");
        }
        if self.export_due() {
            self.export(&dir);
        }
        self.last_checkpoint = Some(self.step());
        for tile in std::mem::take(&mut self.to_dispose) {
            self.dispose_trained(tile);
        }
        Ok(())
    }

    /// Exports are due every `export.every_steps` (0: at every checkpoint) and at shutdown.
    fn export_due(&self) -> bool {
        let every = self.cfg.export.every_steps;
        self.cfg.export.enabled
            && (self.stopping() || every == 0 || self.last_export.is_none_or(|s| self.step() - s >= every))
    }

    /// Publish the teacher of checkpoint `dir`; a failure keeps the previous model published.
    fn export(&mut self, dir: &Path) {
        if self.probe.is_empty() {
            self.probe = self.mixer.peek_fresh(self.cfg.export.probe_patches);
        }
        let exports = &self.cfg.serve.exports_dir;
        match publish::publish_checkpoint(&self.cfg.export, exports, dir, &self.trainer, &self.probe) {
            Ok(p) => {
                log::info!(
                    "published {} (max abs diff {:.2e}, min cosine {:.7})",
                    p.model.display(),
                    p.check.max_abs_diff,
                    p.check.min_cosine
                );
                self.last_export = Some(self.step());
            }
            Err(e) => log::warn!("export of step {} not published: {e:#}", self.step()),
        }
    }

    /// Move candidates and ingest results along without blocking (except to keep batches
    /// deterministic: see [`Service::ingest_settled`]).
    fn pump(&mut self) -> Result<()> {
        while let Ok(candidate) = self.candidates.try_recv() {
            self.observe(&candidate.path)?;
        }
        self.retry_deferred()?;
        loop {
            self.feed_ingest()?;
            if !self.unstall() {
                return Ok(());
            }
            let wait = self.mixer.fresh_len() < self.cfg.train.batch_size
                && self.ingesting > 0
                && !self.stop.is_requested();
            let message = if wait {
                match self.ingest.output().recv_timeout(IDLE_WAIT) {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                }
            } else {
                match self.ingest.output().try_recv() {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                }
            };
            self.on_ingested(message)?;
            self.systemd.watchdog();
        }
    }

    fn feed_ingest(&mut self) -> Result<()> {
        while let Some(&tile) = self.to_ingest.front() {
            let path = self.ledger.identity(tile)?.path.clone();
            if self.ingest.offer(Job { tile, path }).is_err() {
                break;
            }
            self.to_ingest.pop_front();
            self.ingesting += 1;
        }
        Ok(())
    }

    /// Queue the stalled patch if there is room; false while it still waits.
    fn unstall(&mut self) -> bool {
        let Some((tile, patch)) = self.stalled.take() else { return true };
        match self.mixer.push_fresh(tile, patch) {
            Ok(_) => true,
            Err(patch) => {
                self.stalled = Some((tile, patch));
                false
            }
        }
    }

    fn on_ingested(&mut self, message: Ingested) -> Result<()> {
        match message {
            Ingested::Patch(tile, patch) => {
                if let Err(patch) = self.mixer.push_fresh(tile, patch) {
                    self.stalled = Some((tile, patch));
                }
            }
            Ingested::Done { tile, patches } => {
                self.ingesting -= 1;
                if patches == 0 {
                    let reason = "no usable patch: every window is over tile.max_nodata_fraction or the image is smaller than tile.patch_px";
                    self.reject(tile, reason)?;
                } else {
                    log::debug!("tile {}: {patches} patch(es) queued at step {}", tile.0, self.step());
                    self.mixer.finish_tile(tile);
                }
            }
            Ingested::Failed { tile, reason } => {
                self.ingesting -= 1;
                self.reject(tile, &reason)?;
                self.mixer.finish_tile(tile);
            }
        }
        Ok(())
    }

    fn reject(&mut self, tile: TileId, reason: &str) -> Result<()> {
        let path = self.ledger.identity(tile)?.path.clone();
        log::warn!("{}: rejected: {reason}", path.display());
        self.ledger.mark_rejected(tile, reason)?;
        self.scheduled.remove(&tile);
        if let Err(e) = stream::dispose_rejected(&self.cfg.stream, &path, reason) {
            log::warn!("{e}");
        }
        Ok(())
    }

    fn dispose_trained(&mut self, tile: TileId) {
        let Ok(identity) = self.ledger.identity(tile) else { return };
        match stream::dispose_trained(&self.cfg.stream, &identity.path) {
            Ok(done) => log::debug!("tile {}: {done:?}", tile.0),
            Err(e) => log::warn!("{e}"),
        }
    }

    /// Sleep until a candidate or an ingest result arrives, at most [`IDLE_WAIT`].
    fn wait_for_input(&mut self) {
        let mut select = crossbeam_channel::Select::new();
        select.recv(&self.candidates);
        select.recv(self.ingest.output());
        let _ = select.ready_timeout(IDLE_WAIT);
    }

    /// While idle, rewrite the status when tiles were seen or rejected since the last report.
    fn report_if_counts_changed(&mut self) {
        let counts = self.ledger.counts();
        if self.reported_counts != Some(counts) {
            self.report();
        }
    }

    /// The periodic status line, status.json, STATUS= and the metrics endpoint.
    fn report(&mut self) {
        let status = self.current_status();
        log::info!("{}", status.line());
        self.systemd.status(&status.systemd_line());
        match status.write_json(&self.cfg.serve.state_dir) {
            // once per failing spell: a full state disk would otherwise warn at every report
            Err(e) if !self.status_unwritable => {
                log::warn!("{}: cannot write status.json: {e}", self.cfg.serve.state_dir.display());
                self.status_unwritable = true;
            }
            Err(_) => {}
            Ok(()) => self.status_unwritable = false,
        }
        if let Ok(mut shared) = self.status.lock() {
            *shared = status;
        }
    }

    fn current_status(&mut self) -> Status {
        let (since, first) = self.interval;
        let step = self.step();
        let secs = since.elapsed().as_secs_f64().max(1e-9);
        let samples_per_sec = (step - first) as f64 * self.cfg.train.batch_size as f64 / secs;
        let busy_fraction = (self.duty.take_busy().as_secs_f64() / secs).min(1.0);
        let mixed = self.mixer.batch_counts();
        let replay_in_flight = self.in_flight.iter().filter(|b| b.replay_only).count() as u64;
        let fresh_in_flight = self.in_flight.len() as u64 - replay_in_flight;
        self.interval = (Instant::now(), step);
        let counts = self.ledger.counts();
        self.reported_counts = Some(counts);
        let report = self.last_report;
        let collapse = self.last_collapse;
        Status {
            step,
            loss: report.and_then(|r| r.loss).map(f64::from),
            lr: report.map_or(0.0, |r| r.lr),
            momentum: report.map_or(0.0, |r| r.momentum),
            samples_per_sec,
            busy_fraction,
            fresh_steps: mixed.fresh - fresh_in_flight,
            replay_only_steps: mixed.replay_only - replay_in_flight,
            patch_queue: self.mixer.fresh_len(),
            batch_queue: self.in_flight.len(),
            replay_patches: self.mixer.replay_len(),
            replay_disk_bytes: self.mixer.store().stats().disk_bytes,
            replay_store_failures: self.mixer.store().stats().write_failures
                + self.mixer.store().stats().read_failures,
            replay_disk_full: self.mixer.replay_disk_full(),
            tiles_seen: counts.seen,
            tiles_trained: counts.trained,
            tiles_rejected: counts.rejected,
            tiles_pending: counts.pending,
            teacher_entropy_ratio: collapse.map(|c| c.teacher_entropy_ratio as f64),
            kl_teacher_student: collapse.map(|c| c.kl_teacher_student as f64),
            teacher_embedding_std_ratio: collapse
                .map(|c| (c.teacher_cls_std / c.uniform_cls_std.max(1e-12)) as f64),
            files_refused: self.untracked.refused(),
            checkpoint_failures: u64::from(self.health.failures()),
            checkpoint_error: self.health.error().map(str::to_string),
            unsaved_steps: step - self.durable_step(),
            training_paused: self.health.paused(),
            updated_unix_secs: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Stop the threads, write the final checkpoint, report. Runs after errors too, so that
    /// training done so far is saved when possible.
    fn finish(mut self, outcome: Result<()>) -> Result<()> {
        self.systemd.stopping();
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
        let step = self.step();
        let saved = self.last_checkpoint == Some(step);
        let result = if outcome.is_ok() && self.in_flight.is_empty() && step > 0 && !saved {
            self.checkpoint()
        } else {
            Ok(())
        };
        if self.health.failures() > 0 {
            log::error!(
                "the final checkpoint could not be written: the training since step {} is lost",
                self.durable_step()
            );
        }
        self.report();
        log::info!("stopped at step {step}");
        outcome.and(result)
    }
}

/// The trainer, mixer, sample counter and step to continue from: the newest checkpoint, or a
/// fresh run.
fn resume_or_begin(cfg: &Config, device: &candle_core::Device) -> Result<(Trainer, Mixer, u64, u64)> {
    let mut store = open_store(cfg)?;
    let state_dir = &cfg.serve.state_dir;
    if let Some(resumed) = checkpoints::load_newest(state_dir, device, cfg.train.precision, &mut store)? {
        let step = resumed.state.step;
        log::info!("resuming from {} (step {step})", resumed.dir.display());
        if let Some(init) = &cfg.model.init {
            log::info!(
                "model.init {} is not imported again: the checkpoint continues the run",
                init.display()
            );
        }
        let mixer = Mixer::restore(&cfg.stream, resumed.state.mixer, store);
        return Ok((resumed.trainer, mixer, resumed.state.next_sample_id, step));
    }
    // The continual schedules replace the epoch span; it only sizes schedules nobody reads.
    let span = ScheduleSpan { epochs: 1, niter_per_ep: 1 };
    let setup = TrainerSetup::new(&cfg.model, &cfg.train, &cfg.tile.bands, cfg.augment.local_crops, span)?;
    let trainer = crate::dino::init::begin(setup, &cfg.augment, device)?;
    // nothing to resume from: no checkpoint names a stored patch
    store.retire_unreferenced(true);
    let mixer = Mixer::new(&cfg.stream, cfg.train.seed ^ MIXER_SEED, store);
    Ok((trainer, mixer, 0, 0))
}

/// The replay store in the state folder, with the configured budgets.
fn open_store(cfg: &Config) -> Result<stream::PatchStore> {
    let root = cfg.serve.state_dir.join(stream::store::STORE_DIR);
    let (memory_mb, disk_mb) = (cfg.stream.replay_memory_mb, cfg.stream.replay_disk_mb);
    stream::PatchStore::open(&root, memory_mb.saturating_mul(1 << 20), disk_mb.saturating_mul(1 << 20))
        .with_context(|| format!("{}: cannot open the replay store", root.display()))
}

/// Complete-looking entries of `dir` (older than `settle`), as the watcher would report them.
fn scan(dir: &Path, recursive: bool, settle: Duration, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part") {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if name == stream::PROCESSED_DIR || name == stream::REJECTED_DIR {
                continue;
            }
            if stream::watch::is_patch_folder(&path) {
                out.push(path);
            } else if recursive {
                scan(&path, recursive, settle, out);
            }
        } else if meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= settle) {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_up_scan_takes_settled_files_and_patch_folders_but_skips_partial_and_handled_ones() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["b.tif", "a.tif", ".hidden.tif", "c.tif.part", "d.tmp", "notes.txt"] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        for sub in [stream::PROCESSED_DIR, stream::REJECTED_DIR, "S2A_patch", "other"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("S2A_patch/S2A_patch_B02.tif"), b"x").unwrap();
        std::fs::write(d.join("processed/old.tif"), b"x").unwrap();
        std::fs::write(d.join("other/deep.tif"), b"x").unwrap();
        let mut found = Vec::new();
        scan(d, false, Duration::ZERO, &mut found);
        found.sort();
        let names: Vec<_> = found.iter().map(|p| p.strip_prefix(d).unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["S2A_patch", "a.tif", "b.tif", "notes.txt"]);
        let mut recursive = Vec::new();
        scan(d, true, Duration::ZERO, &mut recursive);
        assert!(
            recursive.contains(&d.join("other/deep.tif"))
                && !recursive.contains(&d.join("processed/old.tif"))
        );
        let mut fresh = Vec::new();
        scan(d, false, Duration::from_secs(3600), &mut fresh);
        assert_eq!(
            fresh,
            [d.join("S2A_patch")],
            "files younger than the settle time are left to the watcher"
        );
    }
}
