//! Augmentation throughput: samples/s (1 sample = 2 global + 6 local views, all 10 bands) on a
//! preloaded real BigEarthNet patch (120 x 120 x 10, `tests/fixtures/ben_patch.u16`), one thread
//! and through the worker pool. Not a test: run it with `benches/run_augment.sh`, which puts the
//! Python baselines beside it.
//!
//! Each run reports samples per wall-clock second and per CPU second (from `/proc`: the thread's
//! time for the single-thread run, the process's for the pool runs, 10 ms ticks). On a shared
//! machine the wall-clock rate measures the load; the CPU rate still measures our code.
//!
//! ```sh
//! cargo bench --bench augment -- [SECONDS]
//! cargo bench --bench augment -- --checksum   # a hash of the views of samples 0..60, to see
//!                                             # whether a change keeps the output bit for bit
//! cargo bench --bench augment -- 5 --single   # only the one-thread exact run (for rounds
//!                                             # alternating with the Python baselines)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use dinostream::augment::{AugmentPool, Augmenter, Resample, Sample};
use dinostream::config::{AugmentConfig, SEED_BANDS};
use dinostream::tile::{Patch, Window};

/// Samples per batch in the pool runs.
const BATCH: usize = 32;

fn main() {
    let seconds: f64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10.0);
    let patch = Arc::new(real_patch());
    if std::env::args().any(|a| a == "--checksum") {
        return checksums(&patch);
    }
    if std::env::args().any(|a| a == "--single") {
        let aug =
            Augmenter::new(&AugmentConfig::default(), &patch.bands).expect("seed bands have statistics");
        report(Resample::Exact, "1 thread, write_views", 1, single_thread(&aug, &patch, seconds));
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("augment bench: real BigEarthNet patch 10x120x120, {seconds} s per run, {cores} cores");
    for resample in [Resample::Exact, Resample::Fused] {
        let aug = Arc::new(
            Augmenter::new(&AugmentConfig::default(), &patch.bands)
                .expect("seed bands have statistics")
                .with_resample(resample),
        );
        let one = single_thread(&aug, &patch, seconds);
        report(resample, "1 thread, write_views", 1, one);
        let pool1 = pool(&aug, &patch, 1, seconds);
        report(resample, "pool, 1 worker", 1, pool1);
        if cores > 1 {
            let pooln = pool(&aug, &patch, cores, seconds);
            report(resample, &format!("pool, {cores} workers"), cores, pooln);
            println!(
                "  scaling {resample:?}: {cores} workers = {:.2} x 1 worker on the wall clock (target >= {:.1}); \
                 CPU efficiency {:.2} of 1 worker",
                pooln.wall / pool1.wall,
                0.8 * cores as f64,
                pooln.cpu / pool1.cpu
            );
        }
    }
    ablation(&patch, seconds / 2.0);
}

/// Where the time goes, by switching ops off (exact mode, one thread): the difference to the
/// default run is the cost of what was switched off.
fn ablation(patch: &Patch, seconds: f64) {
    let default = AugmentConfig::default();
    let no_blur =
        AugmentConfig { global1_blur_p: 0.0, global2_blur_p: 0.0, local_blur_p: 0.0, ..default.clone() };
    let no_ssr = AugmentConfig { ssr_p: 0.0, ..default.clone() };
    let crop_only = AugmentConfig { ssr_p: 0.0, solarize_p: 0.0, flip_p: 0.0, ..no_blur.clone() };
    let runs = [
        ("default", &default),
        ("no blur", &no_blur),
        ("no SSR", &no_ssr),
        ("crop+resize+normalize", &crop_only),
    ];
    for (name, cfg) in runs {
        let aug = Augmenter::new(cfg, &patch.bands).expect("seed bands have statistics");
        let rate = single_thread(&aug, patch, seconds);
        println!(
            "  ablation, 1 thread, {name}: {:.0} samples/CPU-s = {:.3} CPU-ms/sample",
            rate.cpu,
            1000.0 / rate.cpu
        );
    }
}

/// FNV-1a of the bits of every view value of samples 0..60, default recipe and SSR on every
/// view, both resample modes.
fn checksums(patch: &Patch) {
    let ssr_always = AugmentConfig { ssr_p: 1.0, ..AugmentConfig::default() };
    for (name, cfg) in [("default", AugmentConfig::default()), ("ssr1", ssr_always)] {
        for resample in [Resample::Exact, Resample::Fused] {
            let aug = Augmenter::new(&cfg, &patch.bands)
                .expect("seed bands have statistics")
                .with_resample(resample);
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for id in 0..60 {
                for view in aug.views(patch, id).expect("bands match").views {
                    for x in view.data {
                        hash = (hash ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3);
                    }
                }
            }
            println!("{name} {resample:?} {hash:016x}");
        }
    }
}

/// Samples per wall-clock second and per CPU second of one run.
#[derive(Debug, Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

fn report(resample: Resample, what: &str, threads: usize, rate: Rate) {
    println!(
        "{{\"what\":\"augment_bench\",\"impl\":\"rust\",\"resample\":\"{resample:?}\",\"run\":\"{what}\",\
         \"threads\":{threads},\"samples_per_s\":{:.1},\"samples_per_cpu_s\":{:.1}}}",
        rate.wall, rate.cpu
    );
}

/// CPU seconds (user + system) from a `/proc/.../stat` file (10 ms ticks).
fn cpu_seconds(stat: &str) -> f64 {
    let text = std::fs::read_to_string(stat).expect("Linux /proc");
    // After the ")" that closes the command name, utime and stime are the 12th and 13th fields.
    let fields: Vec<&str> = text.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
    let ticks = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Time `body` (which returns the samples it made) on the wall clock and on `stat`'s CPU clock.
fn measure(stat: &str, body: impl FnOnce() -> u64) -> Rate {
    let (start, cpu0) = (Instant::now(), cpu_seconds(stat));
    let n = body() as f64;
    let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds(stat) - cpu0);
    Rate { wall: n / wall, cpu: n / cpu.max(0.01) }
}

/// Views of one sample after another into reused buffers, as a worker computes them.
fn single_thread(aug: &Augmenter, patch: &Patch, seconds: f64) -> Rate {
    let c = patch.channels();
    let mut bufs: Vec<Vec<f32>> =
        (0..aug.view_count()).map(|v| vec![0.0; c * aug.view_size(v).pow(2)]).collect();
    let mut run = |id: u64| {
        let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        aug.write_views(patch, id, &mut outs).expect("bands match");
    };
    (0..20).for_each(&mut run);
    measure("/proc/thread-self/stat", || {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let mut n = 0;
        while Instant::now() < deadline {
            run(1000 + n);
            n += 1;
        }
        n
    })
}

/// Whole batches through the pool, fed as fast as it takes samples; each batch is recycled, as
/// the trainer does.
fn pool(aug: &Arc<Augmenter>, patch: &Arc<Patch>, workers: usize, seconds: f64) -> Rate {
    let (tx, rx) = bounded(2 * BATCH);
    let mut pool = AugmentPool::spawn(aug.clone(), rx, BATCH, workers, 4).expect("threads start");
    let p = patch.clone();
    let feeder = std::thread::spawn(move || {
        for id in 0.. {
            if tx.send(Sample { id, patch: p.clone() }).is_err() {
                return;
            }
        }
    });
    for _ in 0..2 {
        let batch = pool.recv().expect("batch").expect("bands match");
        pool.recycle(batch);
    }
    let rate = measure("/proc/self/stat", || {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let mut n = 0;
        while Instant::now() < deadline {
            let batch = pool.recv().expect("batch").expect("bands match");
            n += batch.sample_ids.len() as u64;
            pool.recycle(batch);
        }
        n
    });
    drop(pool);
    feeder.join().expect("feeder stops when the pool is gone");
    rate
}

fn real_patch() -> Patch {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ben_patch.u16");
    let bytes = std::fs::read(&path).expect("tests/fixtures/ben_patch.u16 exists");
    let data = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 / 10000.0).collect();
    Patch {
        data,
        bands: SEED_BANDS.iter().map(|b| b.to_string()).collect(),
        height: 120,
        width: 120,
        source: path,
        window: Window { x: 0, y: 0, width: 120, height: 120 },
        nodata_fraction: 0.0,
    }
}
