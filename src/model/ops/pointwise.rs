//! Element-wise ops of the blocks as single autograd nodes: exact GELU with its backward in f32,
//! and the residual add with stochastic depth, which promotes a bf16 branch to the f32 stream.

use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, op};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::matmul::Operand;
use super::{Fused, cpu, to_dtype};

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (`nn.GELU()`), not candle's tanh `gelu`, in the
/// input's dtype (on the CPU a bf16 input is computed in f32 and rounded, as PyTorch does; other
/// backends run candle's kernel). The backward is candle's (which rounds `1/sqrt(2 pi)` to 0.398942, 7e-7
/// relative; the golden gradients still match PyTorch's within 1e-6) evaluated in f32 for bf16
/// inputs, as PyTorch does.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.apply_op1(GeluErf)
}

struct GeluErf;

impl GeluErf {
    fn forward<S: Fused>(&self, (xs, layout): (&S, &Layout)) -> Result<(S, Shape)> {
        Ok((gelu_erf_storage(xs, layout)?, layout.shape().clone()))
    }
}

/// [`gelu_erf`] at the storage level, on any backend: contiguous, in the input's dtype.
pub(super) fn gelu_erf_storage<S: Fused>(xs: &S, layout: &Layout) -> Result<S> {
    match xs.gelu_erf(layout) {
        Some(ys) => Ok(ys),
        None => xs.unary_impl::<op::GeluErf>(layout),
    }
}

/// The gradient of [`gelu_erf`] at `xs` for the output gradient `grad`, in `xs`'s dtype, detached:
/// `g * (0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x / sqrt 2))` evaluated in f32.
pub(super) fn gelu_erf_grad(xs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (x, grad) = (to_dtype(xs, DType::F32)?, to_dtype(grad, DType::F32)?);
    if let Some(fused) = cpu::with_f32([&x, &grad], |[x, g]| cpu::gelu_erf_backward(x, g)) {
        return Ok(to_dtype(&Tensor::from_vec(fused, xs.shape(), xs.device())?, xs.dtype())?.detach());
    }
    let neg_half_square = (x.sqr()?.neg()? / 2.)?;
    let scaled_exp_arg = (0.398942 * neg_half_square.exp()? * &x)?;
    let erf_scaled_sqrt = (0.5 * (&x / 2f64.sqrt())?.erf()?)?;
    let derivative = (0.5 + scaled_exp_arg + erf_scaled_sqrt)?;
    Ok((grad * derivative)?.to_dtype(xs.dtype())?.detach())
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-with-f32-backward"
    }

    backend_forward!(1, forward);

    /// `g * (0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x / sqrt 2))`.
    fn bwd(&self, xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_grad(xs, grad)?))
    }
}

/// Stochastic depth's per-sample factor (DINO `drop_path`): 0 with probability `rate`, else
/// `1 / (1 - rate)`, shaped `[batch, 1, ...]` to `rank` dims; `None` at rate 0. Drawn on the host
/// from `rng` (a few bytes), so runs are reproducible on every device.
pub fn drop_path_scale(
    batch: usize,
    rank: usize,
    rate: f64,
    rng: &mut ChaCha8Rng,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    if rate == 0.0 {
        return Ok(None);
    }
    let keep = 1.0 - rate;
    let mask: Vec<f32> =
        (0..batch).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
    let mut shape = vec![1; rank];
    shape[0] = batch;
    Ok(Some(Tensor::from_vec(mask, shape, device)?))
}

/// `x + branch * scale` in `x`'s dtype (the f32 residual stream; a bf16 branch is promoted),
/// `scale` a per-sample factor from [`drop_path_scale`]. One autograd node that keeps only its
/// inputs: the scaled and promoted branch is not kept.
pub fn residual(xs: &Tensor, branch: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
    if xs.dims() != branch.dims() {
        candle_core::bail!("residual: stream {:?} and branch {:?} differ", xs.dims(), branch.dims());
    }
    match scale {
        Some(scale) => xs.apply_op3(branch, scale, Residual),
        None => xs.apply_op2(branch, Residual),
    }
}

pub(super) struct Residual;

impl Residual {
    /// The forward pass at the storage level, on any backend: the branch is converted to the
    /// stream's dtype, multiplied by the broadcast scale, then added.
    fn forward_unscaled<S: Fused>(&self, xs: (&S, &Layout), branch: (&S, &Layout)) -> Result<(S, Shape)> {
        Self::forward(xs, branch, None)
    }

    fn forward_scaled<S: Fused>(
        &self,
        xs: (&S, &Layout),
        branch: (&S, &Layout),
        scale: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        Self::forward(xs, branch, Some(scale))
    }

    pub(super) fn forward<S: Fused>(
        (xs, xs_layout): (&S, &Layout),
        (branch, branch_layout): (&S, &Layout),
        scale: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let shape = xs_layout.shape().clone();
        if let Some(ys) = S::residual((xs, xs_layout), (branch, branch_layout), scale) {
            return Ok((ys, shape));
        }
        let branch = Operand::new(branch, branch_layout, xs.dtype())?;
        let scaled = match scale {
            Some((scale, scale_layout)) => {
                let scale = Operand::new(scale, scale_layout, xs.dtype())?;
                let factors = scale.layout.broadcast_as(shape.clone())?;
                Some(branch.storage().binary_impl::<op::Mul>(scale.storage(), &branch.layout, &factors)?)
            }
            None => None,
        };
        let (addend, addend_layout) = match &scaled {
            Some(scaled) => (scaled, Layout::contiguous(shape.clone())),
            None => (branch.storage(), branch.layout.clone()),
        };
        Ok((xs.binary_impl::<op::Add>(addend, xs_layout, &addend_layout)?, shape))
    }

    /// `dx = g`, `dbranch = g * scale` in the branch's dtype.
    pub(super) fn backward(branch: DType, scale: Option<&Tensor>, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let grad_branch = match scale {
            Some(scale) => grad.broadcast_mul(&scale.to_dtype(grad.dtype())?)?,
            None => grad.clone(),
        };
        Ok((grad.detach(), to_dtype(&grad_branch, branch)?.detach()))
    }
}

impl CustomOp2 for Residual {
    fn name(&self) -> &'static str {
        "residual-add"
    }

    backend_forward!(2, forward_unscaled);

    fn bwd(
        &self,
        _xs: &Tensor,
        branch: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, grad_branch) = Self::backward(branch.dtype(), None, grad)?;
        Ok((Some(grad_xs), Some(grad_branch)))
    }
}

impl CustomOp3 for Residual {
    fn name(&self) -> &'static str {
        "residual-add-drop-path"
    }

    backend_forward!(3, forward_scaled);

    fn bwd(
        &self,
        _xs: &Tensor,
        branch: &Tensor,
        scale: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, grad_branch) = Self::backward(branch.dtype(), Some(scale), grad)?;
        Ok((Some(grad_xs), Some(grad_branch), None))
    }
}
