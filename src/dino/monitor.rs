//! Collapse indicators, logged every `train.log_every_steps` steps.
//!
//! DINO can collapse two ways: to a uniform teacher (entropy / ln K -> 1) or to one dominant
//! prototype (entropy -> 0). A healthy run keeps the teacher sharp while the student follows it:
//! `KL(teacher || student)` falls. The spread of the l2-normalised teacher cls embedding, averaged
//! over dimensions, is about `1/sqrt(d)` for well-spread features and drops to 0 when every
//! input maps to the same embedding.

use candle_core::{D, Result, Tensor};

use crate::dino::loss::mean_entropy;
use crate::model::ops;

/// One reading of the indicators.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Collapse {
    /// Mean teacher entropy divided by ln K (1 = uniform, 0 = one-hot).
    pub teacher_entropy_ratio: f32,
    /// Mean `KL(teacher || student)` over the loss pairs, in nats: the loss minus the mean teacher
    /// entropy (each teacher view enters the same number of pairs).
    pub kl_teacher_student: f32,
    /// Std over the batch of the l2-normalised teacher cls embedding, averaged over dims.
    pub teacher_cls_std: f32,
    /// `1 / sqrt(d)`, the value of `teacher_cls_std` for features spread over the sphere.
    pub uniform_cls_std: f32,
}

/// Read the indicators from the teacher's probabilities `[2B, K]`, its backbone features
/// `[2B, d]` and the step's loss value. Syncs with the device (call only when logging).
pub fn collapse(teacher_probs: &Tensor, teacher_features: &Tensor, loss: f32) -> Result<Collapse> {
    let k = teacher_probs.dim(1)? as f32;
    let entropy = mean_entropy(teacher_probs)?.to_scalar::<f32>()?;
    let d = teacher_features.dim(1)?;
    let unit = ops::l2_normalize(teacher_features)?;
    let centered = unit.broadcast_sub(&unit.mean_keepdim(0)?)?;
    let std = centered.sqr()?.mean_keepdim(0)?.sqrt()?.mean(D::Minus1)?.squeeze(0)?.to_scalar::<f32>()?;
    Ok(Collapse {
        teacher_entropy_ratio: entropy / k.ln(),
        kl_teacher_student: loss - entropy,
        teacher_cls_std: std,
        uniform_cls_std: 1.0 / (d as f32).sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_uniform_teacher_and_identical_features_read_as_collapse() {
        let probs = Tensor::full(0.25f32, (4, 4), &Device::Cpu).unwrap();
        let feats = Tensor::ones((4, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let c = collapse(&probs, &feats, 1.5).unwrap();
        assert!((c.teacher_entropy_ratio - 1.0).abs() < 1e-5, "{c:?}");
        assert!((c.kl_teacher_student - (1.5 - 4f32.ln())).abs() < 1e-5, "{c:?}");
        assert!(c.teacher_cls_std.abs() < 1e-6, "{c:?}");
        assert_eq!(c.uniform_cls_std, 0.25);
    }
}
