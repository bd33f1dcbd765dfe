//! [`AugmentPool`]: worker threads turning a stream of samples into ready training batches.
//!
//! A dispatcher thread groups the incoming samples into jobs of `batch_size` in arrival order and
//! numbers them; each worker augments a whole job into one crop-major [`Batch`]; the pool hands
//! batches out in job order. Batch `k` therefore holds the same samples, augmented the same way,
//! whatever the number of workers. At most `queue_batches` finished batches wait (plus one being
//! reordered per worker); when they are not taken, the workers block: backpressure reaches the
//! sender of the samples. Dropping the pool stops and joins every thread, also when the sample
//! channel is still open or the queue is full. A trailing partial batch is dropped (DINO's
//! `drop_last`).
//!
//! A consumer that is done with a batch can hand it back with [`AugmentPool::recycle`]: the
//! workers then write the next batches into its buffers instead of allocating (and faulting in)
//! about 60 MB per batch of 32 at the seed sizes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, select};

use super::augmenter::{AugmentError, Augmenter};
use super::{Batch, CropBatch};
use crate::config::AugmentConfig;
use crate::tile::Patch;

/// One input of the pool: a patch and the global sample index that seeds its views.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Global sample index (the random stream of the views).
    pub id: u64,
    /// The patch (shared: a replay buffer may send it many times).
    pub patch: Arc<Patch>,
}

/// A numbered group of samples that becomes one batch.
struct Job {
    seq: u64,
    samples: Vec<Sample>,
}

type Done = (u64, Result<Batch, AugmentError>);

/// Worker threads producing ready [`Batch`]es from a channel of [`Sample`]s.
pub struct AugmentPool {
    done: Option<Receiver<Done>>,
    free: Sender<Batch>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    pending: BTreeMap<u64, Result<Batch, AugmentError>>,
    next: u64,
}

impl AugmentPool {
    /// Start `workers` threads (at least one) augmenting `samples` into batches of `batch_size`
    /// (at least one), with at most `queue_batches` ready batches waiting.
    pub fn spawn(
        augmenter: Arc<Augmenter>,
        samples: Receiver<Sample>,
        batch_size: usize,
        workers: usize,
        queue_batches: usize,
    ) -> std::io::Result<AugmentPool> {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (job_tx, job_rx) = bounded::<Job>(workers.max(1));
        let (done_tx, done_rx) = bounded::<Done>(queue_batches.max(1));
        let (free_tx, free_rx) = bounded::<Batch>(queue_batches.max(1) + workers.max(1));
        let mut pool = AugmentPool {
            done: Some(done_rx),
            free: free_tx,
            stop: Some(stop_tx),
            threads: Vec::new(),
            pending: BTreeMap::new(),
            next: 0,
        };
        let batch_size = batch_size.max(1);
        let dispatcher = std::thread::Builder::new()
            .name("augment-dispatch".into())
            .spawn(move || dispatch(samples, job_tx, stop_rx, batch_size))?;
        pool.threads.push(dispatcher);
        for i in 0..workers.max(1) {
            let (jobs, done, aug) = (job_rx.clone(), done_tx.clone(), augmenter.clone());
            let free = free_rx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("augment-{i}"))
                .spawn(move || work(&aug, jobs, done, free))?;
            pool.threads.push(worker);
        }
        Ok(pool)
    }

    /// [`spawn`](Self::spawn) with `augment.workers` (0 = one per core) and `augment.queue_batches`.
    pub fn from_config(
        cfg: &AugmentConfig,
        augmenter: Arc<Augmenter>,
        samples: Receiver<Sample>,
        batch_size: usize,
    ) -> std::io::Result<AugmentPool> {
        let workers = match cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        AugmentPool::spawn(augmenter, samples, batch_size, workers, cfg.queue_batches)
    }

    /// The next batch in sample order; `None` once the sample channel is closed and every full
    /// batch was handed out. Blocks while the next batch is being computed.
    pub fn recv(&mut self) -> Option<Result<Batch, AugmentError>> {
        loop {
            if let Some(batch) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(batch);
            }
            let (seq, batch) = self.done.as_ref()?.recv().ok()?;
            self.pending.insert(seq, batch);
        }
    }

    /// Hand a batch from [`recv`](Self::recv) back for reuse: a worker overwrites its buffers
    /// with a later batch. Optional; when enough batches wait for reuse, this one is dropped.
    pub fn recycle(&self, batch: Batch) {
        let _ = self.free.try_send(batch);
    }
}

impl Iterator for AugmentPool {
    type Item = Result<Batch, AugmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.recv()
    }
}

impl Drop for AugmentPool {
    fn drop(&mut self) {
        // Closing `stop` wakes the dispatcher; dropping `done` fails the workers' pending sends.
        self.stop.take();
        self.done.take();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("an augmentation thread panicked");
            }
        }
    }
}

/// Group samples into numbered jobs until the samples end or the pool stops.
fn dispatch(samples: Receiver<Sample>, jobs: Sender<Job>, stop: Receiver<()>, batch_size: usize) {
    let mut seq = 0;
    let mut group = Vec::with_capacity(batch_size);
    loop {
        let sample = select! {
            recv(samples) -> s => match s { Ok(s) => s, Err(_) => return },
            recv(stop) -> _ => return,
        };
        group.push(sample);
        if group.len() < batch_size {
            continue;
        }
        let job = Job { seq, samples: std::mem::replace(&mut group, Vec::with_capacity(batch_size)) };
        select! {
            send(jobs, job) -> r => if r.is_err() { return },
            recv(stop) -> _ => return,
        }
        seq += 1;
    }
}

/// Augment jobs into batches until the jobs end or nobody takes the batches.
fn work(augmenter: &Augmenter, jobs: Receiver<Job>, done: Sender<Done>, free: Receiver<Batch>) {
    for job in jobs {
        let batch = fill_batch(augmenter, &job.samples, free.try_recv().ok());
        if done.send((job.seq, batch)).is_err() {
            return;
        }
    }
}

/// One crop-major batch: `crops[v]` is view `v` of every sample, `[B, C, S, S]`.
pub fn build_batch(augmenter: &Augmenter, samples: &[Sample]) -> Result<Batch, AugmentError> {
    fill_batch(augmenter, samples, None)
}

/// [`build_batch`] into the buffers of `reuse` when its shapes fit (every value is overwritten).
fn fill_batch(
    augmenter: &Augmenter,
    samples: &[Sample],
    reuse: Option<Batch>,
) -> Result<Batch, AugmentError> {
    let b = samples.len();
    let c = augmenter.bands().len();
    let shapes: Vec<[usize; 4]> =
        (0..augmenter.view_count()).map(|v| [b, c, augmenter.view_size(v), augmenter.view_size(v)]).collect();
    let mut crops = match reuse {
        Some(batch) if batch.crops.iter().map(|crop| crop.shape).eq(shapes.iter().copied()) => batch.crops,
        _ => {
            shapes.iter().map(|&shape| CropBatch { data: vec![0.0; shape.iter().product()], shape }).collect()
        }
    };
    for (i, sample) in samples.iter().enumerate() {
        let mut outs: Vec<&mut [f32]> = crops
            .iter_mut()
            .map(|crop| {
                let n = crop.data.len() / b;
                &mut crop.data[i * n..(i + 1) * n]
            })
            .collect();
        augmenter.write_views(&sample.patch, sample.id, &mut outs)?;
    }
    Ok(Batch { crops, sample_ids: samples.iter().map(|s| s.id).collect() })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::augment::augmenter::tests::patch;

    const RGB: [&str; 3] = ["B02", "B03", "B04"];

    fn augmenter() -> Arc<Augmenter> {
        let bands: Vec<String> = RGB.iter().map(|b| b.to_string()).collect();
        let cfg = AugmentConfig { global_px: 24, local_px: 12, local_crops: 2, ..AugmentConfig::default() };
        Arc::new(Augmenter::new(&cfg, &bands).unwrap())
    }

    /// Run `n` samples through a pool of `workers` and collect the batches.
    fn run(workers: usize, n: u64, batch_size: usize) -> Vec<Batch> {
        let (tx, rx) = bounded(4);
        let pool = AugmentPool::spawn(augmenter(), rx, batch_size, workers, 2).unwrap();
        let feeder = std::thread::spawn(move || {
            for id in 0..n {
                let p = Arc::new(patch(&RGB, 20 + (id % 3) as usize, 24));
                tx.send(Sample { id, patch: p }).unwrap();
            }
        });
        let batches: Vec<Batch> = pool.map(|b| b.unwrap()).collect();
        feeder.join().unwrap();
        batches
    }

    #[test]
    fn batches_are_crop_major_with_the_sample_ids_in_order() {
        let batches = run(2, 10, 4);
        assert_eq!(batches.len(), 2, "the partial third batch is dropped");
        assert_eq!(batches[1].sample_ids, [4, 5, 6, 7]);
        let shapes: Vec<[usize; 4]> = batches[0].crops.iter().map(|c| c.shape).collect();
        assert_eq!(shapes, [[4, 3, 24, 24], [4, 3, 24, 24], [4, 3, 12, 12], [4, 3, 12, 12]]);
    }

    #[test]
    fn batch_content_does_not_depend_on_the_number_of_workers() {
        let one = run(1, 24, 3);
        assert_eq!(one, run(3, 24, 3));
        // Sample 4 (second batch, second slot) is its own views, wherever it was computed.
        let p = patch(&RGB, 20 + 1, 24);
        let views = augmenter().views(&p, 4).unwrap();
        let n = views.views[2].data.len();
        assert_eq!(&one[1].crops[2].data[n..2 * n], views.views[2].data.as_slice());
    }

    #[test]
    fn recycled_batches_give_the_same_content_as_fresh_ones() {
        let (tx, rx) = bounded(4);
        let mut pool = AugmentPool::spawn(augmenter(), rx, 3, 1, 1).unwrap();
        let feeder = std::thread::spawn(move || {
            for id in 0..12 {
                tx.send(Sample { id, patch: Arc::new(patch(&RGB, 20 + (id % 3) as usize, 24)) }).unwrap();
            }
        });
        let mut recycled = Vec::new();
        while let Some(batch) = pool.recv() {
            let batch = batch.unwrap();
            recycled.push(batch.clone());
            pool.recycle(batch);
        }
        feeder.join().unwrap();
        assert_eq!(recycled, run(2, 12, 3));
    }

    #[test]
    fn workers_block_when_the_queue_is_full_and_dropping_the_pool_stops_them() {
        let (tx, rx) = bounded(1);
        let pool = AugmentPool::spawn(augmenter(), rx, 1, 2, 1).unwrap();
        let p = Arc::new(patch(&RGB, 20, 20));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (sent2, tx2) = (sent.clone(), tx.clone());
        let feeder = std::thread::spawn(move || {
            for id in 0..1000 {
                if tx2.send(Sample { id, patch: p.clone() }).is_err() {
                    return;
                }
                sent2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        // Queue 1 + 2 workers holding a batch + 2 jobs queued + dispatcher + channel: a handful.
        let accepted = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(accepted < 12, "no backpressure: {accepted} samples accepted");
        let start = Instant::now();
        drop(pool);
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(tx);
        feeder.join().unwrap();
    }

    #[test]
    fn a_pool_whose_input_stays_open_shuts_down_on_drop() {
        let (_tx, rx) = bounded::<Sample>(1);
        let pool = AugmentPool::from_config(&AugmentConfig::default(), augmenter(), rx, 2).unwrap();
        let start = Instant::now();
        drop(pool);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_bad_patch_becomes_an_error_batch_and_the_pool_goes_on() {
        let (tx, rx) = bounded(8);
        let mut pool = AugmentPool::spawn(augmenter(), rx, 1, 2, 2).unwrap();
        tx.send(Sample { id: 0, patch: Arc::new(patch(&["B02", "B03", "B08"], 20, 20)) }).unwrap();
        tx.send(Sample { id: 1, patch: Arc::new(patch(&RGB, 20, 20)) }).unwrap();
        drop(tx);
        assert!(matches!(pool.recv(), Some(Err(AugmentError::BandMismatch { .. }))));
        assert_eq!(pool.recv().unwrap().unwrap().sample_ids, [1]);
        assert!(pool.recv().is_none());
    }
}
