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
        let (patches, secs) = best_pass(&inputs, &cfg);
        println!(
            "rust {set}: {patches} patches, best of {PASSES} passes {secs:.4} s, {:.0} patches/s",
            patches as f64 / secs
        );
    }
}

fn best_pass(inputs: &[Input], cfg: &TileConfig) -> (usize, f64) {
    let mut best = f64::INFINITY;
    let mut patches = 0;
    for _ in 0..PASSES {
        let started = Instant::now();
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
    }
    (patches, best)
}
