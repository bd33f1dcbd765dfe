//! An [`ExportSpec`] and the teacher backbone weights from a checkpoint's `model.safetensors`:
//! tensors `teacher.backbone.*`, safetensors metadata `preset` (the preset TOML text), `bands`
//! (comma list) and `step`.

use anyhow::{Context, Result, bail};

use super::graph::{ExportSpec, NamedTensors};
use crate::infer::InputContract;

/// Prefix of the teacher backbone's tensors in a checkpoint.
pub const TEACHER_BACKBONE: &str = "teacher.backbone.";

/// The preset fields the export needs (DINO argument names, as in `models/*.toml`).
#[derive(Debug, serde::Deserialize)]
struct Preset {
    name: String,
    patch_size: usize,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    layernorm_eps: f32,
    img_size: usize,
}

/// Spec (opset 17, cls output only, export size = the trained size) and weights from the bytes of
/// a `model.safetensors`.
pub fn from_checkpoint(bytes: &[u8], input_contract: InputContract) -> Result<(ExportSpec, NamedTensors)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).context("reading safetensors header")?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| meta.get(key).with_context(|| format!("safetensors metadata `{key}` is missing"));
    let preset: Preset = toml::from_str(get("preset")?).context("safetensors metadata `preset`")?;
    let bands: Vec<String> = get("bands")?.split(',').map(|b| b.trim().to_string()).collect();
    let step = get("step")?.parse().context("safetensors metadata `step`")?;
    let weights = NamedTensors::from_safetensors(bytes, TEACHER_BACKBONE)?;
    if weights.is_empty() {
        bail!("no `{TEACHER_BACKBONE}*` tensors in the checkpoint");
    }
    let (band_mean, band_std) = ExportSpec::band_statistics(&bands)?;
    let spec = ExportSpec {
        embed_dim: preset.embed_dim,
        depth: preset.depth,
        num_heads: preset.num_heads,
        patch_size: preset.patch_size,
        img_size: preset.img_size,
        in_chans: bands.len(),
        layernorm_eps: preset.layernorm_eps,
        bands,
        band_mean,
        band_std,
        input_contract,
        preset: preset.name,
        step,
        patch_tokens: false,
        opset: 17,
        created: None,
    };
    Ok((spec, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_metadata_and_teacher_tensors_become_a_spec() {
        let preset = "name = \"t\"\npatch_size = 8\nembed_dim = 4\ndepth = 1\nnum_heads = 2\nlayernorm_eps = 1e-6\nimg_size = 16\n[head]\nout_dim = 8\n";
        let data = vec![0u8; 16];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
        let student = view.clone();
        let meta = [("preset", preset), ("bands", "B04,B03"), ("step", "12")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let tensors = [("teacher.backbone.norm.weight", view), ("student.backbone.norm.weight", student)];
        let bytes = safetensors::serialize(tensors, Some(meta.into_iter().collect())).unwrap();
        let (spec, weights) = from_checkpoint(&bytes, InputContract::Reflectance).unwrap();
        assert_eq!((spec.embed_dim, spec.in_chans, spec.step, spec.preset.as_str()), (4, 2, 12, "t"));
        assert_eq!(weights.len(), 1);
        assert_eq!(weights.shape("norm.weight").unwrap(), &[4]);
    }
}
