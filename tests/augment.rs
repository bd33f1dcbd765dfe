//! Whole views against the reference: per-view statistics of `augment_ref.py --sem v1` on two real
//! patches (BigEarthNet 120 px, EuroSAT 64 px), stored with their generator in `tests/fixtures/`
//! (`gen_augment.py`), compared with the same statistics of our views.
//!
//! Every z value (difference over the combined standard error) is printed; the reference README's
//! yardstick is |z| <= 2 per statistic. With 9 statistics per patch a true match would break that
//! somewhere by chance about a third of the time, so the tests fail at |z| > 3 (a chance failure
//! below 3 %), and BENCHMARKS.md lists the full-run z values.
//!
//! The quick tests draw 150 samples (a few seconds in the test profile); the full comparison with
//! 1500 draws, as many as the reference, runs with
//! `cargo test --release --test integration augment:: -- --ignored --nocapture`.

use std::path::Path;

use dinostream::augment::{Augmenter, Resample};
use dinostream::config::{AugmentConfig, SEED_BANDS};
use dinostream::tile::{Patch, Window};

/// The largest |z| a statistic may have (see the module doc).
const MAX_Z: f64 = 3.0;
/// Draws per patch in the quick tests (each gives 1 global 1, 1 global 2 and 6 local views).
const QUICK_DRAWS: u64 = 150;
/// Draws per patch in the full comparison, as many as the reference made.
const FULL_DRAWS: u64 = 1500;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A `[10, side, side]` little-endian u16 fixture as reflectance (DN / 10000).
fn real_patch(name: &str, side: usize) -> Patch {
    let bytes = std::fs::read(fixture(name)).expect("fixture exists");
    let data: Vec<f32> =
        bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 / 10000.0).collect();
    assert_eq!(data.len(), 10 * side * side);
    Patch {
        data,
        bands: SEED_BANDS.iter().map(|b| b.to_string()).collect(),
        height: side,
        width: side,
        source: fixture(name),
        window: Window { x: 0, y: 0, width: side as u32, height: side as u32 },
        nodata_fraction: 0.0,
    }
}

/// Mean and standard error over draws of (view mean, view std, view mean |dx|).
#[derive(Default)]
struct Summary {
    rows: Vec<[f64; 3]>,
}

impl Summary {
    fn add(&mut self, data: &[f32], size: usize) {
        let n = data.len() as f64;
        let mean = data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let dx: f64 =
            data.chunks_exact(size).flat_map(|r| r.windows(2).map(|w| (w[1] - w[0]).abs() as f64)).sum();
        self.rows.push([mean, var.sqrt(), dx / (data.len() / size * (size - 1)) as f64]);
    }

    fn stat(&self, k: usize) -> (f64, f64) {
        let n = self.rows.len() as f64;
        let mean = self.rows.iter().map(|r| r[k]).sum::<f64>() / n;
        let var = self.rows.iter().map(|r| (r[k] - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, (var / n).sqrt())
    }
}

/// Compare our statistics of `patch` with the reference's; returns the failures.
fn compare(patch: &Patch, reference: &serde_json::Value, resample: Resample, draws: u64) -> Vec<String> {
    let aug = Augmenter::new(&AugmentConfig::default(), &patch.bands).unwrap().with_resample(resample);
    let mut kinds: [Summary; 3] = Default::default();
    for id in 0..draws {
        for (i, v) in aug.views(patch, id).unwrap().views.iter().enumerate() {
            kinds[i.min(2)].add(&v.data, v.size);
        }
    }
    let mut failures = Vec::new();
    for (kind, ours) in ["global1", "global2", "local"].iter().zip(&kinds) {
        for (k, stat) in ["mean", "std", "mean_abs_dx"].iter().enumerate() {
            let (m, se) = ours.stat(k);
            let r = &reference[kind][stat];
            let (rm, rse) = (r["mean"].as_f64().unwrap(), r["se"].as_f64().unwrap());
            let z = (m - rm) / (se * se + rse * rse).sqrt();
            let line = format!(
                "{resample:?} {kind} {stat}: ours {m:.5} ± {se:.5}, reference {rm:.5} ± {rse:.5}, z {z:+.2}"
            );
            eprintln!("{line}");
            if z.abs() > MAX_Z {
                failures.push(line);
            }
        }
    }
    failures
}

fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("augment_stats.json")).expect("fixture exists");
    serde_json::from_str::<serde_json::Value>(&text).expect("JSON")[name].clone()
}

fn check(name: &str, side: usize, resample: Resample, draws: u64) {
    let reference = reference(name);
    let failures = compare(&real_patch(&format!("{name}.u16"), side), &reference, resample, draws);
    assert!(failures.is_empty(), "{name}: more than 3 SE off:\n{}", failures.join("\n"));
}

#[test]
fn views_of_a_bigearthnet_patch_match_the_reference_statistics() {
    check("ben_patch", 120, Resample::Exact, QUICK_DRAWS);
}

#[test]
fn views_of_a_small_eurosat_patch_match_the_reference_statistics() {
    check("eurosat_patch", 64, Resample::Exact, QUICK_DRAWS);
}

#[test]
#[ignore = "1500 draws per patch: run in release"]
fn views_match_the_reference_statistics_over_as_many_draws_as_the_reference() {
    check("ben_patch", 120, Resample::Exact, FULL_DRAWS);
    check("eurosat_patch", 64, Resample::Exact, FULL_DRAWS);
}
