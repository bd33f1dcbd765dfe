//! Periodic ONNX publishing for `serve`: the teacher of a complete checkpoint becomes an ONNX model,
//! ONNX Runtime must reproduce the candle teacher on a probe batch of real patches, and only then
//! the model replaces `latest.onnx` (see [`crate::export::publish`]). A failed check leaves the
//! previous model published.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use crate::config::ExportConfig;
use crate::dino::Trainer;
use crate::export::publish::{Probe, Published, publish};
use crate::export::{ExportSpec, export_bytes, from_checkpoint};
use crate::infer::runtime::{LibrarySearch, Runtime};
use crate::infer::{InputContract, ModelMetadata, embed};
use crate::tile::Patch;

/// Export the teacher saved in `checkpoint` and publish it into `exports` if ONNX Runtime
/// reproduces `trainer`'s teacher on `probe`.
pub fn publish_checkpoint(
    cfg: &ExportConfig,
    exports: &Path,
    checkpoint: &Path,
    trainer: &Trainer,
    probe: &[Arc<Patch>],
) -> Result<Published> {
    let runtime = Runtime::get(&LibrarySearch::standard(cfg.onnxruntime.clone()))?;
    let weights = checkpoint.join("model.safetensors");
    let bytes = std::fs::read(&weights).with_context(|| format!("{}: cannot read", weights.display()))?;
    let contract: InputContract = cfg.input_contract.parse().map_err(anyhow::Error::msg)?;
    let (mut spec, tensors) =
        from_checkpoint(&bytes, contract).with_context(|| format!("{}: cannot export", weights.display()))?;
    spec.patch_tokens = cfg.patch_tokens;
    let onnx = export_bytes(&spec, &tensors)?;
    let metadata = spec.metadata();
    let probe = probe_batch(&spec, &metadata, trainer, probe, cfg.probe_patches)?;
    std::fs::create_dir_all(exports).with_context(|| format!("{}: cannot create", exports.display()))?;
    Ok(publish(&runtime, exports, spec.step, &onnx, &metadata, &probe, cfg.keep)?)
}

/// Up to `n` real patches prepared as the model expects them, and the candle teacher's cls
/// embeddings of the same pixels.
fn probe_batch(
    spec: &ExportSpec,
    metadata: &ModelMetadata,
    trainer: &Trainer,
    patches: &[Arc<Patch>],
    n: usize,
) -> Result<Probe> {
    let mut pixels = Vec::new();
    let mut rows = 0;
    for patch in patches {
        for input in embed::prepare(patch, metadata)?.into_iter().take(n - rows) {
            pixels.extend(input.data);
            rows += 1;
        }
        if rows == n {
            break;
        }
    }
    if rows == 0 {
        bail!("no patch to probe the export with yet");
    }
    let (c, s) = (spec.in_chans, spec.img_size);
    let normalized = normalize(&pixels, &spec.band_mean, &spec.band_std, s * s);
    let expected_cls = teacher_cls(trainer, &normalized, [rows, c, s, s])?;
    let pixels = match spec.input_contract {
        InputContract::Reflectance => pixels,
        InputContract::Normalized => normalized,
    };
    Ok(Probe { pixels, shape: [rows, c, s, s], expected_cls })
}

/// `(x - mean[c]) / std[c]` over `[n, c, plane]` values.
fn normalize(pixels: &[f32], mean: &[f32], std: &[f32], plane: usize) -> Vec<f32> {
    pixels
        .chunks(plane)
        .enumerate()
        .flat_map(|(i, chunk)| {
            let c = i % mean.len();
            chunk.iter().map(move |x| (x - mean[c]) / std[c])
        })
        .collect()
}

/// The teacher backbone's cls embeddings `[n, d]`, row-major.
fn teacher_cls(trainer: &Trainer, normalized: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(normalized, shape.to_vec(), trainer.device())?;
    let cls = trainer.teacher().backbone.forward_t(&x, None)?;
    Ok(cls.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_uses_each_channels_own_statistics() {
        let pixels = [1.0, 3.0, 10.0, 30.0, 5.0, 7.0, 50.0, 70.0]; // [2 rows, 2 channels, plane 2]
        let got = normalize(&pixels, &[1.0, 10.0], &[2.0, 20.0], 2);
        assert_eq!(got, [0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]);
    }
}
