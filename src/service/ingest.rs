//! The ingest worker: one thread reading tiles into patches, in the order the tiles were handed
//! to it, so that the patches reach the mixer in a deterministic order. Both channels are bounded:
//! a slow trainer stops the reader after a few patches, whatever the size of the scene.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::config::TileConfig;
use crate::stream::TileId;
use crate::tile::{self, Patch};

/// Tiles handed to the worker that may wait at once.
const JOB_CAPACITY: usize = 2;
/// Patches read ahead of the mixer.
const PATCH_CAPACITY: usize = 16;

/// A tile to read.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its ledger id.
    pub tile: TileId,
    /// Its file or patch folder.
    pub path: PathBuf,
}

/// What the worker reports, per tile in job order: its patches, then how it ended.
#[derive(Debug)]
pub enum Ingested {
    /// One patch of `tile`.
    Patch(TileId, Patch),
    /// `tile` is read completely; it gave `patches` patches.
    Done { tile: TileId, patches: usize },
    /// `tile` could not be read (patches sent before the failure stay valid).
    Failed { tile: TileId, reason: String },
}

/// The worker thread and its two channels.
pub struct IngestWorker {
    jobs: Option<Sender<Job>>,
    out: Option<Receiver<Ingested>>,
    thread: Option<JoinHandle<()>>,
}

impl IngestWorker {
    /// Start the worker with the `[tile]` settings.
    pub fn spawn(cfg: &TileConfig) -> std::io::Result<IngestWorker> {
        let (job_tx, job_rx) = bounded::<Job>(JOB_CAPACITY);
        let (out_tx, out_rx) = bounded::<Ingested>(PATCH_CAPACITY);
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("dinostream-ingest".into())
            .spawn(move || work(&cfg, job_rx, out_tx))?;
        Ok(IngestWorker { jobs: Some(job_tx), out: Some(out_rx), thread: Some(thread) })
    }

    /// Hand over a tile; gives it back when the job queue is full.
    pub fn offer(&self, job: Job) -> Result<(), Job> {
        let jobs = self.jobs.as_ref().expect("jobs is only taken in drop");
        jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
        })
    }

    /// The worker's reports.
    pub fn output(&self) -> &Receiver<Ingested> {
        self.out.as_ref().expect("out is only taken in drop")
    }
}

impl Drop for IngestWorker {
    fn drop(&mut self) {
        // No more jobs, and the worker's next send fails: it ends after the current patch.
        self.jobs.take();
        self.out.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the ingest thread panicked");
        }
    }
}

fn work(cfg: &TileConfig, jobs: Receiver<Job>, out: Sender<Ingested>) {
    for job in jobs {
        let mut gone = false;
        let result = tile::Input::detect(&job.path).and_then(|input| {
            tile::for_each_patch(&input, cfg, |patch| {
                if out.send(Ingested::Patch(job.tile, patch)).is_err() {
                    gone = true;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
        });
        if gone {
            return;
        }
        let report = match result {
            Ok(count) => Ingested::Done { tile: job.tile, patches: count.yielded },
            Err(e) => Ingested::Failed { tile: job.tile, reason: e.to_string() },
        };
        if out.send(report).is_err() {
            return;
        }
    }
}
