//! DINO's loss (facebookresearch/dino `DINOLoss`): cross-entropy between the centred, sharpened
//! teacher distribution of each global view and the student distribution of every other view,
//! averaged over the pairs; then the centre's EMA update.
//!
//! All pair sums come from one matmul: with `Q` the teacher probabilities `[2, B*K]` and `L` the
//! student log-probabilities `[ncrops, B*K]`, `Q L^T / B` holds every pair's `-loss`.

use candle_core::{D, DType, Result, Tensor};

use crate::model::ops;

/// The loss and its outputs for one step.
pub struct LossOutput {
    /// The scalar loss (part of the student's graph).
    pub loss: Tensor,
    /// The updated centre `[1, K]` (detached).
    pub center: Tensor,
    /// Teacher probabilities `[2B, K]` (detached).
    pub teacher_probs: Tensor,
    /// Per-pair losses `[2, ncrops]` (detached; the skipped `v == iq` pairs hold their value too).
    pub pair_losses: Tensor,
}

/// `DINOLoss` without its state: the centre lives in the training state.
pub struct DinoLoss {
    ncrops: usize,
    student_temp: f64,
    center_momentum: f64,
    /// `[2, ncrops]`: 1 for the pairs that count, 0 for a view against itself.
    pair_mask: Tensor,
    pairs: usize,
}

impl DinoLoss {
    /// A loss over `ncrops` views (2 global first) on `device`.
    pub fn new(
        ncrops: usize,
        student_temp: f64,
        center_momentum: f64,
        device: &candle_core::Device,
    ) -> Result<DinoLoss> {
        if ncrops < 2 {
            candle_core::bail!("DINO needs at least the 2 global crops, got {ncrops}");
        }
        let mask: Vec<f32> =
            (0..2).flat_map(|iq| (0..ncrops).map(move |v| if v == iq { 0.0 } else { 1.0 })).collect();
        let pair_mask = Tensor::from_vec(mask, (2, ncrops), device)?;
        Ok(DinoLoss { ncrops, student_temp, center_momentum, pair_mask, pairs: 2 * ncrops - 2 })
    }

    /// Loss of `student` `[ncrops*B, K]` (crop-major) against `teacher` `[2B, K]`, centred by
    /// `center` `[1, K]` at temperature `teacher_temp`.
    pub fn forward(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        center: &Tensor,
        teacher_temp: f64,
    ) -> Result<LossOutput> {
        let (rows, k) = student.dims2()?;
        let b = rows / self.ncrops;
        if b * self.ncrops != rows || teacher.dims2()? != (2 * b, k) {
            candle_core::bail!(
                "DINO loss: student {:?} and teacher {:?} do not fit {} crops of one batch",
                student.dims(),
                teacher.dims(),
                self.ncrops
            );
        }
        let teacher = teacher.detach();
        let teacher_probs = ops::softmax_last_dim(&(teacher.broadcast_sub(center)? / teacher_temp)?)?;
        let student_logp = ops::log_softmax_last_dim(student, 1.0 / self.student_temp)?;
        let q = teacher_probs.reshape((2, b * k))?;
        let l = student_logp.reshape((self.ncrops, b * k))?;
        let pair_losses = (q.matmul(&l.t()?)? * (-1.0 / b as f64))?;
        let loss = (pair_losses.mul(&self.pair_mask)?.sum_all()? / self.pairs as f64)?;
        Ok(LossOutput {
            loss,
            center: self.updated_center(&teacher, center)?,
            teacher_probs,
            pair_losses: pair_losses.detach(),
        })
    }

    /// `center * m + mean_rows(teacher) * (1 - m)`.
    fn updated_center(&self, teacher: &Tensor, center: &Tensor) -> Result<Tensor> {
        let rows = teacher.dim(0)? as f64;
        let batch_center = (teacher.sum_keepdim(0)? / rows)?;
        (center * self.center_momentum)? + (batch_center * (1.0 - self.center_momentum))?
    }
}

/// Mean row entropy of probabilities `[N, K]`, in nats (0 * log 0 counts as 0).
pub fn mean_entropy(probs: &Tensor) -> Result<Tensor> {
    let logp = probs.clamp(1e-30, 1.0)?.log()?;
    (probs.mul(&logp)?.sum(D::Minus1)?.mean_all()? * -1.0)?.to_dtype(DType::F32)
}
