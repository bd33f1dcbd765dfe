//! Replay store at scale: `N` patches of 120 px x 10 bands (whole DN / 10000, as ingest makes
//! them) pass through a [`Mixer`] whose buffer holds all `N` (FIFO, capacity `N`) with the default
//! `stream.replay_memory_mb` cache, in batches of 64; then replay-only batches are drawn from the
//! whole store. Prints the peak RSS (VmHWM), the store's disk bytes, the bytes of the mixer state
//! a checkpoint writes and the time to sync the store and encode that state. Not a test: it
//! prints numbers and asserts nothing.
//!
//! Usage: `cargo bench --bench replay_store [-- N [DIR]]` (default 100000 patches in a temp
//! folder under `target/`; about 2.9 GB of disk per 10,000 patches, deleted at the end).

use std::path::PathBuf;
use std::time::Instant;

use dinostream::config::{ReplayPolicy, StreamConfig};
use dinostream::stream::{Mixer, PatchStore, TileId};
use dinostream::tile::{Patch, Window};

const SIDE: usize = 120;
const BANDS: usize = 10;
const BATCH: usize = 64;
const REPLAY_BATCHES: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let n: usize = args.first().map_or(100_000, |a| a.parse().expect("N: a number of patches"));
    let parent =
        args.get(1).map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    let dir = tempfile::tempdir_in(&parent).expect("a temp folder for the store");
    let cfg = StreamConfig {
        replay_capacity_patches: n,
        replay_policy: ReplayPolicy::Fifo,
        fresh_fraction: 1.0,
        ..StreamConfig::default()
    };
    let store = PatchStore::open(dir.path(), cfg.replay_memory_mb << 20, u64::MAX).expect("open the store");
    let mut mixer = Mixer::new(&cfg, 1, store);
    let bands: Vec<String> = (0..BANDS).map(|b| format!("B{b:02}")).collect();
    let started = Instant::now();
    for i in 0..n {
        mixer.push_fresh(TileId(i as u64), patch(i, &bands)).expect("the queue is drained every batch");
        if mixer.fresh_len() == BATCH {
            mixer.next_batch(BATCH).expect("a batch is queued");
        }
        if (i + 1) % 10_000 == 0 {
            eprintln!(
                "{} patches stored, {:.0} s, VmHWM {} MB",
                i + 1,
                started.elapsed().as_secs_f64(),
                vm_hwm_mb()
            );
        }
    }
    while mixer.next_batch(BATCH).is_some() {}
    let fill_secs = started.elapsed().as_secs_f64();
    let checkpoint = Instant::now();
    mixer.store_mut().sync().expect("sync the store");
    let synced = checkpoint.elapsed().as_secs_f64();
    let state = mixer.state().to_bytes();
    let checkpoint_secs = checkpoint.elapsed().as_secs_f64();
    let replay = Instant::now();
    for _ in 0..REPLAY_BATCHES {
        mixer.next_replay_batch(BATCH).expect("the buffer is full");
    }
    let replay_secs = replay.elapsed().as_secs_f64();
    let stats = mixer.store().stats();
    println!(
        "replay store, {n} patches of {SIDE} px x {BANDS} bands: fill {fill_secs:.1} s ({:.0} patches/s), disk {:.2} GB in {} files, \
         checkpoint: mixer state {:.2} MB, store sync {synced:.1} s + state {:.2} s, replay-only batches of {BATCH}: {:.1} ms each, \
         cache {} MB, peak RSS (VmHWM) {} MB",
        n as f64 / fill_secs,
        stats.disk_bytes as f64 / 1e9,
        stats.blobs,
        state.len() as f64 / 1e6,
        checkpoint_secs - synced,
        1000.0 * replay_secs / REPLAY_BATCHES as f64,
        stats.cache_bytes >> 20,
        vm_hwm_mb()
    );
}

/// Patch `i`: distinct whole-DN values from an integer hash (cheap, so the store is what is timed).
fn patch(i: usize, bands: &[String]) -> Patch {
    let data = (0..BANDS * SIDE * SIDE)
        .map(|j| {
            let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (j as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
            ((h >> 40) % 10_000) as f32 / 10000.0
        })
        .collect();
    Patch {
        data,
        bands: bands.to_vec(),
        height: SIDE,
        width: SIDE,
        source: PathBuf::from(format!("tiles/t{:06}.tif", i / 100)),
        window: Window { x: (i % 100) as u32 * SIDE as u32, y: 0, width: SIDE as u32, height: SIDE as u32 },
        nodata_fraction: 0.0,
    }
}

/// Peak resident set size of this process, MB (`VmHWM` in `/proc/self/status`).
fn vm_hwm_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.unwrap_or(0) / 1024
}
