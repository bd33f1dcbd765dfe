//! Verify-then-publish: an export becomes `latest.onnx` only after ONNX Runtime reproduced the
//! reference outputs on a probe batch.
//!
//! 1. write `<dir>/dinostream-step<N>.onnx.tmp` and fsync it;
//! 2. open it in ONNX Runtime, check its metadata, run the probe batch and compare with the
//!    caller's reference (the candle teacher forward): max abs diff <= 1e-4 and cosine >= 0.99999,
//!    else [`PublishError::Rejected`], the temp file removed and the previous publish untouched;
//! 3. rename it to `dinostream-step<N>.onnx`, then atomically replace `latest.onnx` and
//!    `latest.json` (metadata + check results) through [`crate::fsio`];
//! 4. keep the newest K `dinostream-step*.onnx`.
//!
//! A consumer polling the folder sees either the previous `latest.onnx` or the new, checked one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fsio;
use crate::infer::ModelMetadata;
use crate::infer::runtime::{Runtime, RuntimeError};

/// Largest accepted absolute difference between ONNX Runtime and the reference.
pub const MAX_ABS_DIFF: f32 = 1e-4;
/// Smallest accepted cosine similarity between an ONNX Runtime row and its reference row.
pub const MIN_COSINE: f32 = 0.99999;

/// The probe batch and what the reference model produced for it.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `[n, c, h, w]` input in the model's input contract.
    pub pixels: Vec<f32>,
    /// Its shape.
    pub shape: [usize; 4],
    /// Reference cls embeddings `[n, d]`, row-major.
    pub expected_cls: Vec<f32>,
}

/// How the export compared with the reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    /// Probe batch size.
    pub batch: usize,
    /// Largest |onnx - reference| over all values.
    pub max_abs_diff: f32,
    /// Smallest per-row cosine similarity.
    pub min_cosine: f32,
    /// Whether both limits held.
    pub passed: bool,
}

/// What a successful publish produced.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// `dinostream-step<N>.onnx`.
    pub model: PathBuf,
    /// `latest.onnx`.
    pub latest: PathBuf,
    /// The metadata written into the file.
    pub metadata: ModelMetadata,
    /// The check it passed.
    pub check: CheckReport,
    /// Older exports removed to keep K.
    pub removed: Vec<PathBuf>,
}

/// Why an export was not published. `latest.onnx` is untouched in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// ONNX Runtime ran the export but its outputs differ from the reference.
    #[error(
        "{}: rejected: max abs diff {:.3e} (limit {MAX_ABS_DIFF:e}), min cosine {:.7} (limit {MIN_COSINE}) on a batch of {}",
        path.display(), report.max_abs_diff, report.min_cosine, report.batch
    )]
    Rejected {
        /// The temp file that was checked (now removed).
        path: PathBuf,
        /// The failed comparison.
        report: CheckReport,
    },
    /// The file's metadata is not what was exported.
    #[error("{}: rejected: metadata read back differs: {reason}", path.display())]
    Metadata {
        /// The temp file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// ONNX Runtime could not load or run the export.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A file operation in the export folder failed (the OS error is the source, printed once).
    #[error("{}: cannot write", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Check `onnx` (the bytes of an export at `step`) against `probe` and publish it into `dir`,
/// keeping the newest `keep` step files.
pub fn publish(
    runtime: &Runtime,
    dir: &Path,
    step: u64,
    onnx: &[u8],
    metadata: &ModelMetadata,
    probe: &Probe,
    keep: usize,
) -> Result<Published, PublishError> {
    let model = dir.join(format!("dinostream-step{step}.onnx"));
    let tmp = stage(dir, step, onnx)?;
    let check = match verify(runtime, &tmp, metadata, probe) {
        Ok(check) => check,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fsio::rename_durable(&tmp, &model).map_err(io_err(&model))?;
    let latest = dir.join("latest.onnx");
    fsio::write_atomic(&latest, onnx).map_err(io_err(&latest))?;
    let mut published = Published { model, latest, metadata: metadata.clone(), check, removed: Vec::new() };
    let json_path = dir.join("latest.json");
    let json = serde_json::to_vec_pretty(&published).expect("plain data always serialises");
    fsio::write_atomic(&json_path, &json).map_err(io_err(&json_path))?;
    published.removed = prune(dir, keep.max(1)).map_err(io_err(dir))?;
    Ok(published)
}

/// Write `onnx` to `<dir>/dinostream-step<step>.onnx.tmp` and fsync it; on failure (a full disk)
/// nothing of it is left.
fn stage(dir: &Path, step: u64, onnx: &[u8]) -> Result<PathBuf, PublishError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!("dinostream-step{step}.onnx.tmp"));
    if let Err(e) = write_synced(&tmp, onnx) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    Ok(tmp)
}

/// Turns an OS error on `path` into [`PublishError::Io`].
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError {
    let path = path.to_path_buf();
    move |source| PublishError::Io { path, source }
}

/// Write and fsync `path` (not yet visible under its final name).
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Open the file in ONNX Runtime, compare its metadata and its probe outputs.
fn verify(
    runtime: &Runtime,
    path: &Path,
    metadata: &ModelMetadata,
    probe: &Probe,
) -> Result<CheckReport, PublishError> {
    let mut model = runtime.open(path, false)?;
    let read_back = model.metadata()?;
    if &read_back != metadata {
        let reason = format!("wrote {metadata:?}, read {read_back:?}");
        return Err(PublishError::Metadata { path: path.to_path_buf(), reason });
    }
    let out = model.run(&probe.pixels, probe.shape)?;
    let report = compare(&out.cls, &probe.expected_cls, probe.shape[0]);
    if report.passed { Ok(report) } else { Err(PublishError::Rejected { path: path.to_path_buf(), report }) }
}

/// Max abs diff and min row cosine of `got` vs `want`, both `[batch, d]`. A length mismatch or a
/// NaN fails the check.
pub fn compare(got: &[f32], want: &[f32], batch: usize) -> CheckReport {
    let fail = CheckReport { batch, max_abs_diff: f32::INFINITY, min_cosine: -1.0, passed: false };
    let shapes_differ = got.len() != want.len() || batch == 0 || got.len() % batch != 0 || got.is_empty();
    if shapes_differ || got.iter().any(|v| !v.is_finite()) {
        return fail;
    }
    let d = got.len() / batch;
    let max_abs_diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let min_cosine = got.chunks(d).zip(want.chunks(d)).map(|(a, b)| cosine(a, b)).fold(1.0f32, f32::min);
    let passed = max_abs_diff <= MAX_ABS_DIFF && min_cosine >= MIN_COSINE;
    CheckReport { batch, max_abs_diff, min_cosine, passed }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-30)) as f32
}

/// Remove the temp files a killed export left in `dir` (`*.onnx.tmp` and the atomic writes'
/// temps); call it at start-up. Returns how many.
pub fn sweep_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let stale = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx.tmp"))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count();
    stale + fsio::sweep_temp_files(dir)
}

/// Remove all but the newest `keep` `dinostream-step<N>.onnx` files, and stale `.onnx.tmp` files a
/// killed export left behind.
fn prune(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut steps = Vec::new();
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(rest) = name.strip_prefix("dinostream-step") else { continue };
        if rest.ends_with(".onnx.tmp") {
            fs::remove_file(&path)?;
            removed.push(path);
        } else if let Some(step) = rest.strip_suffix(".onnx").and_then(|s| s.parse::<u64>().ok()) {
            steps.push((step, path));
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in steps.into_iter().take(excess) {
        fs::remove_file(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_accepts_equal_rows_and_rejects_a_shifted_value() {
        let want = vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
        assert!(compare(&want, &want, 2).passed);
        let mut got = want.clone();
        got[4] += 2e-4;
        let report = compare(&got, &want, 2);
        assert!(!report.passed);
        assert!((report.max_abs_diff - 2e-4).abs() < 1e-6);
    }

    #[test]
    fn compare_rejects_nan_and_length_mismatch() {
        assert!(!compare(&[f32::NAN, 1.0], &[1.0, 1.0], 1).passed);
        assert!(!compare(&[1.0], &[1.0, 1.0], 1).passed);
    }

    #[test]
    fn a_full_disk_leaves_no_temp_file_and_names_the_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        // writes to /dev/full fail with ENOSPC, as on a full exports disk
        std::os::unix::fs::symlink("/dev/full", dir.path().join("dinostream-step7.onnx.tmp")).unwrap();
        let err = stage(dir.path(), 7, &[1u8; 4096]).unwrap_err();
        assert!(fs::read_dir(dir.path()).unwrap().next().is_none(), "the temp file is removed");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("No space left on device").count(), 1, "{chain}");
        assert!(chain.contains("dinostream-step7.onnx.tmp"), "{chain}");
    }

    #[test]
    fn stale_export_temps_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        for name in
            ["dinostream-step3.onnx.tmp", ".latest.onnx.tmp.77", "latest.onnx", "dinostream-step2.onnx"]
        {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(sweep_temps(dir.path()), 2);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn prune_keeps_the_newest_steps_by_number_and_removes_stale_temps() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "dinostream-step9.onnx",
            "dinostream-step10.onnx",
            "dinostream-step100.onnx",
            "dinostream-step7.onnx.tmp",
            "latest.onnx",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["dinostream-step10.onnx", "dinostream-step100.onnx", "latest.onnx"]);
    }
}
