//! Ingest throughput, single thread: patches/s decoding the EuroSAT tiles (stacked 13-band
//! GeoTIFFs) and the BigEarthNet folders (12 single-band files, bicubic to 120 px) of
//! `../shared/data`. `benches/ingest_ref.py` does the same with tifffile + OpenCV;
//! `benches/run_ingest.sh` runs both. Not a test: it prints numbers and asserts nothing.
//!
//! Usage: `cargo bench --bench ingest [-- DATA_DIR]` (default `../shared/data`).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use dinostream::config::TileConfig;
use dinostream::tile::{self, Input};

/// Passes over each set; the best pass counts (the first also warms the page cache).
const PASSES: usize = 5;

fn main() {
    let data = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    if !data.is_dir() {
        eprintln!("{}: no data folder; pass one as `cargo bench --bench ingest -- DIR`", data.display());
        return;
    }
    let eurosat = TileConfig { layout: "eurosat13".into(), ..TileConfig::default() };
    for (set, cfg) in [("eurosat-ms", eurosat), ("bigearthnet-s2", TileConfig::default())] {
        let inputs = tile::list_inputs(&data.join(set)).expect("list the benchmark inputs");
        let (patches, wall, cpu) = best_pass(&inputs, &cfg);
        println!(
            "rust {set}: {patches} patches, best of {PASSES} passes: wall {wall:.4} s = {:.0} patches/s, cpu {cpu:.4} s = {:.0} patches/s",
            patches as f64 / wall,
            patches as f64 / cpu
        );
    }
}

/// CPU time this process has run, from `/proc/self/schedstat` (ns; immune to other processes
/// competing for the cores, which wall time is not on a shared machine).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

/// (patches per pass, best wall seconds, best CPU seconds).
fn best_pass(inputs: &[Input], cfg: &TileConfig) -> (usize, f64, f64) {
    let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
    let mut patches = 0;
    for _ in 0..PASSES {
        let started = Instant::now();
        let cpu = cpu_secs();
        patches = 0;
        for input in inputs {
            tile::for_each_patch(input, cfg, |p| {
                std::hint::black_box(&p.data);
                patches += 1;
                ControlFlow::Continue(())
            })
            .expect("benchmark inputs decode");
        }
        best = best.min(started.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(cpu_secs() - cpu);
    }
    (patches, best, best_cpu)
}
