//! DINO's `MultiCropWrapper`: one backbone pass per run of consecutive equal-resolution crops
//! (2 global, then the locals), the cls features concatenated, one head pass. Rows are crop-major:
//! `[crop0 x B, crop1 x B, ...]`.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use super::config::Preset;
use super::head::DinoHead;
use super::vit::VisionTransformer;

/// A backbone with its head (names `backbone.*`, `head.*`).
pub struct MultiCropWrapper {
    /// The ViT.
    pub backbone: VisionTransformer,
    /// The DINO head.
    pub head: DinoHead,
}

/// What one multi-crop pass returns.
pub struct MultiCropOutput {
    /// Backbone cls features `[crops * B, D]`, crop-major.
    pub features: Tensor,
    /// Head outputs `[crops * B, K]`, crop-major.
    pub logits: Tensor,
}

impl MultiCropWrapper {
    /// Build both parts under `vb.pp("backbone")` and `vb.pp("head")`, matrix products in `matmul`.
    pub fn new(cfg: &Preset, drop_path_rate: f64, matmul: DType, vb: VarBuilder) -> Result<MultiCropWrapper> {
        let backbone = VisionTransformer::new(cfg, drop_path_rate, matmul, vb.pp("backbone"))?;
        let head = DinoHead::new(cfg.embed_dim, &cfg.head, matmul, vb.pp("head"))?;
        Ok(MultiCropWrapper { backbone, head })
    }

    /// Run `crops` (each `[B, C, H, W]`); `rng` switches on stochastic depth (training),
    /// `train_last_layer` off leaves the head's last layer out of the backward pass (see
    /// [`DinoHead::forward_t`]).
    pub fn forward_t(
        &self,
        crops: &[Tensor],
        mut rng: Option<&mut ChaCha8Rng>,
        train_last_layer: bool,
    ) -> Result<MultiCropOutput> {
        let mut features = Vec::new();
        for run in equal_resolution_runs(crops)? {
            let input = if run.len() == 1 { run[0].clone() } else { Tensor::cat(run, 0)? };
            features.push(self.backbone.forward_t(&input, rng.as_deref_mut())?);
        }
        let features = if features.len() == 1 { features.remove(0) } else { Tensor::cat(&features, 0)? };
        let logits = self.head.forward_t(&features, train_last_layer)?;
        Ok(MultiCropOutput { features, logits })
    }
}

/// Split `crops` where the width changes (PyTorch: `unique_consecutive` of `shape[-1]`).
fn equal_resolution_runs(crops: &[Tensor]) -> Result<Vec<&[Tensor]>> {
    if crops.is_empty() {
        candle_core::bail!("multi-crop pass with no crops");
    }
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=crops.len() {
        if i == crops.len() || crops[i].dim(3)? != crops[start].dim(3)? {
            runs.push(&crops[start..i]);
            start = i;
        }
    }
    Ok(runs)
}
