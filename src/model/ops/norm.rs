//! Normalisations over the last dim: LayerNorm and softmax as single autograd nodes (candle's
//! fused kernels for them have no backward), log-softmax and l2 normalisation.

use candle_core::backend::BackendStorage;
use candle_core::op::{self, ReduceOp};
use candle_core::{CustomOp1, CustomOp3, D, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use super::{Fused, Stage, cast, cpu};

/// `nn.LayerNorm(dim, eps)` over the last dim. Names `weight`, `bias`. Statistics and affine
/// map in the input's dtype (f32); the output in `out` (bf16 where a bf16 product consumes it,
/// the rounding autocast applies at that product's input).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    out: DType,
}

impl LayerNorm {
    /// A layer norm under `vb` with weight 1 and bias 0, its output in `out`.
    pub fn new(dim: usize, eps: f64, out: DType, vb: VarBuilder) -> Result<LayerNorm> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(LayerNorm { weight, bias, eps, out })
    }
}

impl LayerNorm {
    /// This layer as a stage of a residual branch ([`super::residual_branch`]).
    pub fn stage(&self) -> Stage {
        let op = LayerNormOp { eps: self.eps, out: self.out };
        Stage::layer_norm(self.weight.clone(), self.bias.clone(), op)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply_op3(&self.weight, &self.bias, LayerNormOp { eps: self.eps, out: self.out })
    }
}

/// The layouts of a reduction over the last dim at the storage level: the input's shape, its last
/// axis, a fresh contiguous result, the reduced `[..., 1]` result, and that broadcast back.
pub(super) struct LastDim {
    shape: Shape,
    last: usize,
    contiguous: Layout,
    reduced_contiguous: Layout,
    reduced: Layout,
}

impl LastDim {
    fn of(layout: &Layout) -> Result<LastDim> {
        let shape = layout.shape().clone();
        let last = shape.rank() - 1;
        let mut reduced_dims = shape.dims().to_vec();
        reduced_dims[last] = 1;
        let reduced_contiguous = Layout::contiguous(reduced_dims);
        let reduced = reduced_contiguous.broadcast_as(shape.clone())?;
        Ok(LastDim {
            contiguous: Layout::contiguous(shape.clone()),
            shape,
            last,
            reduced_contiguous,
            reduced,
        })
    }
}

/// LayerNorm over the last dim as one autograd node: the forward runs candle's kernels at the
/// storage level, so the graph keeps the input and the output only (a composition of tensor ops
/// keeps five full-size intermediates); the backward recomputes the normalised input and applies
/// the closed form `dx = rstd (g - mean(g) - n mean(g n))` with `g = grad * weight`.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerNormOp {
    pub eps: f64,
    pub out: DType,
}

impl LayerNormOp {
    /// `(x - mean) / sqrt(var + eps) * weight + bias` along the last dim, on any backend.
    fn forward<S: Fused>(
        &self,
        (x, layout): (&S, &Layout),
        (weight, weight_layout): (&S, &Layout),
        (bias, bias_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let shape = layout.shape().clone();
        let fused = S::layer_norm((x, layout), (weight, weight_layout), (bias, bias_layout), self.eps);
        let ys = match fused {
            Some(ys) => ys,
            None => Self::composed((x, layout), (weight, weight_layout), (bias, bias_layout), self.eps)?,
        };
        Ok((cast(ys, &Layout::contiguous(shape.clone()), self.out)?, shape))
    }

    /// The forward pass as a chain of candle kernels, on any backend.
    fn composed<S: BackendStorage>(
        (x, layout): (&S, &Layout),
        (weight, weight_layout): (&S, &Layout),
        (bias, bias_layout): (&S, &Layout),
        eps: f64,
    ) -> Result<S> {
        let LastDim { shape, last, contiguous, reduced_contiguous, reduced } = LastDim::of(layout)?;
        let n = shape.dims()[last] as f64;
        let mean = x.reduce_op(ReduceOp::Sum, layout, &[last])?.affine(&reduced_contiguous, 1.0 / n, 0.0)?;
        let centered = x.binary_impl::<op::Sub>(&mean, layout, &reduced)?;
        let sum_sq =
            centered.unary_impl::<op::Sqr>(&contiguous)?.reduce_op(ReduceOp::Sum, &contiguous, &[last])?;
        let std = sum_sq
            .affine(&reduced_contiguous, 1.0 / n, 0.0)?
            .affine(&reduced_contiguous, 1.0, eps)?
            .unary_impl::<op::Sqrt>(&reduced_contiguous)?;
        let normed = centered.binary_impl::<op::Div>(&std, &contiguous, &reduced)?;
        let scaled = normed.binary_impl::<op::Mul>(
            weight,
            &contiguous,
            &weight_layout.broadcast_as(shape.clone())?,
        )?;
        scaled.binary_impl::<op::Add>(bias, &contiguous, &bias_layout.broadcast_as(shape)?)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-with-backward"
    }

    backend_forward!(3, forward);

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [grad_xs, grad_weight, grad_bias] = self.backward(xs, weight, grad)?;
        Ok((Some(grad_xs), Some(grad_weight), Some(grad_bias)))
    }
}

impl LayerNormOp {
    /// The gradients of x, weight and bias (detached) for the output gradient `grad`.
    pub(super) fn backward(&self, xs: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<[Tensor; 3]> {
        let grad = grad.to_dtype(xs.dtype())?;
        let fused =
            cpu::with_f32([xs, weight, &grad], |[x, w, g]| cpu::layer_norm_backward(x, w, g, self.eps));
        if let Some([grad_xs, grad_weight, grad_bias]) = fused {
            let (device, dim) = (xs.device(), weight.dims());
            return Ok([
                Tensor::from_vec(grad_xs, xs.shape(), device)?,
                Tensor::from_vec(grad_weight, dim, device)?,
                Tensor::from_vec(grad_bias, dim, device)?,
            ]);
        }
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let normed = centered.broadcast_mul(&rstd)?;
        let dim = weight.dim(0)?;
        let rows = |t: Tensor| t.reshape(((), dim));
        let grad_weight = rows((&grad * &normed)?)?.sum(0)?;
        let grad_bias = rows(grad.clone())?.sum(0)?;
        let g = grad.broadcast_mul(weight)?;
        let inner = (g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?
            - normed.broadcast_mul(&(&g * &normed)?.mean_keepdim(D::Minus1)?)?)?;
        let grad_xs = inner.broadcast_mul(&rstd)?;
        Ok([grad_xs.detach(), grad_weight.detach(), grad_bias.detach()])
    }
}

/// Softmax over the last dim, with a backward pass (candle's fused `softmax_last_dim` has none).
/// The forward runs candle's own kernels at the storage level (max, subtract, exp, sum, divide),
/// so only the input and the result stay in the autograd graph, not the three intermediates a
/// composition of tensor ops would keep; the backward is `y * (g - sum(g * y))`.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.apply_op1(Softmax { scale: 1.0 })
}

/// `softmax(x * scale)` over the last dim: `affine(scale, 0)` first (left out at scale 1), as
/// attention scales its logits.
pub(super) struct Softmax {
    pub scale: f64,
}

impl Softmax {
    /// `exp(z - max) / sum(exp(z - max))` with `z = x * scale` along the last dim of `layout`, on
    /// any backend.
    pub(super) fn forward<S: Fused>(&self, (x, layout): (&S, &Layout)) -> Result<(S, Shape)> {
        let scale = self.scale;
        if let Some(ys) = x.scaled_softmax(layout, scale) {
            return Ok((ys, layout.shape().clone()));
        }
        let LastDim { shape, last, contiguous, reduced, .. } = LastDim::of(layout)?;
        let scaled;
        let (x, layout) = match scale {
            1.0 => (x, layout),
            _ => {
                scaled = x.affine(layout, scale, 0.0)?;
                (&scaled, &contiguous)
            }
        };
        let max = x.reduce_op(ReduceOp::Max, layout, &[last])?;
        let exp = x.binary_impl::<op::Sub>(&max, layout, &reduced)?.unary_impl::<op::Exp>(&contiguous)?;
        let sum = exp.reduce_op(ReduceOp::Sum, &contiguous, &[last])?;
        Ok((exp.binary_impl::<op::Div>(&sum, &contiguous, &reduced)?, shape))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim-with-backward"
    }

    backend_forward!(1, forward);

    fn bwd(&self, _xs: &Tensor, ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(ys, grad, self.scale)?.detach()))
    }
}

/// The gradient of `softmax(x * scale)` from its output `ys` and the output gradient:
/// `(grad - sum(grad * ys)) * ys`, times `scale` (left out at 1).
pub(super) fn softmax_backward(ys: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    let n = ys.dim(D::Minus1)?;
    if let Some(fused) = cpu::with_f32([ys, grad], |[y, g]| cpu::softmax_backward(y, g, n, scale)) {
        return Tensor::from_vec(fused, ys.shape(), ys.device());
    }
    let dot = (grad * ys)?.sum_keepdim(D::Minus1)?;
    let unscaled = (grad.broadcast_sub(&dot)? * ys)?;
    if scale == 1.0 { Ok(unscaled) } else { unscaled * scale }
}

/// Log-softmax of `x * scale` over the last dim (`affine(scale, 0)` first, left out at scale 1):
/// `z - max - log(sum(exp(z - max)))` with the max detached. On the CPU (contiguous f32) one
/// autograd node whose passes are row-parallel loops with the composition's arithmetic (the
/// backward recomputes the exponentials); elsewhere the composition of tensor ops.
pub fn log_softmax_last_dim(xs: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu::with_f32([xs], |_| ()).is_some() {
        return xs.apply_op1(LogSoftmax { scale });
    }
    let xs = if scale == 1.0 { xs.clone() } else { xs.affine(scale, 0.0)? };
    let shifted = xs.broadcast_sub(&xs.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// The CPU node of [`log_softmax_last_dim`].
struct LogSoftmax {
    scale: f64,
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "log-softmax-last-dim-with-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        let n = *layout.dims().last().unwrap_or(&0);
        match (cpu::contiguous_cpu_f32(storage, layout), n) {
            (Some(x), 1..) => {
                Ok((candle_core::CpuStorage::F32(cpu::log_softmax(x, n, self.scale)), layout.shape().clone()))
            }
            _ => {
                candle_core::bail!("log-softmax: expected a contiguous f32 tensor with a non-empty last dim")
            }
        }
    }

    fn bwd(&self, xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = xs.dim(D::Minus1)?;
        let grad = grad.contiguous()?;
        match cpu::with_f32([xs, &grad], |[x, g]| cpu::log_softmax_backward(x, g, n, self.scale)) {
            Some(grad_xs) => Ok(Some(Tensor::from_vec(grad_xs, xs.shape(), xs.device())?)),
            None => {
                candle_core::bail!("log-softmax: the backward pass needs contiguous f32 tensors on the CPU")
            }
        }
    }
}

/// `F.normalize(x, dim=-1)`: `x / max(||x||_2, 1e-12)` row-wise.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    xs.broadcast_div(&norm)
}
