//! The DINO head's last layer, a weight-normed linear layer without bias, as one autograd node.

use candle_core::op::{self, ReduceOp};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::matmul::{matmul_in, product_in};
use super::{Fused, cast, cpu, to_dtype};

/// `x W^T` with `W = v * g / ||v||` row-wise (`torch._weight_norm(v, g, 0)`), `x` `[N, d]`,
/// `v` `[K, d]`, `g` `[K, 1]`; the product in `matmul` (see [`matmul_in`]), returned in `x`'s
/// dtype. One autograd node: the graph keeps x, v and g, not `W`, `v^2` or the gradient
/// temporaries that a composition keeps until the backward pass ends (with K = 65536, eight
/// `[K, d]` tensors, half a gigabyte). In f32 both passes do the composition's arithmetic, op for op.
pub fn weight_norm_linear(xs: &Tensor, v: &Tensor, g: &Tensor, matmul: DType) -> Result<Tensor> {
    let (k, _) = v.dims2()?;
    if g.dims() != [k, 1] || xs.rank() != 2 || xs.dim(1)? != v.dim(1)? {
        candle_core::bail!("weight-normed linear: x {:?}, v {:?}, g {:?}", xs.dims(), v.dims(), g.dims());
    }
    xs.apply_op3(v, g, WeightNormLinear { matmul })
}

struct WeightNormLinear {
    matmul: DType,
}

impl WeightNormLinear {
    /// The forward pass at the storage level, on any backend: `||v||`, `g / ||v||`, `W`, `x W^T`.
    fn forward<S: Fused>(
        &self,
        xs: (&S, &Layout),
        (v, v_layout): (&S, &Layout),
        (g, g_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let (k, d) = v_layout.shape().dims2()?;
        let (rows, column) = (Layout::contiguous((k, d)), Layout::contiguous((k, 1)));
        if let Some(weight) = S::weight_norm((v, v_layout), (g, g_layout)) {
            let (ys, layout) = product_in(xs, (&weight, &rows.transpose(0, 1)?), self.matmul)?;
            return Ok((cast(ys, &layout, xs.0.dtype())?, layout.shape().clone()));
        }
        let sum_sq = v.unary_impl::<op::Sqr>(v_layout)?.reduce_op(ReduceOp::Sum, &rows, &[1])?;
        let norm = sum_sq.unary_impl::<op::Sqrt>(&column)?;
        let gain = g.binary_impl::<op::Div>(&norm, g_layout, &column)?;
        let weight = v.binary_impl::<op::Mul>(&gain, v_layout, &column.broadcast_as((k, d))?)?;
        let (ys, layout) = product_in(xs, (&weight, &rows.transpose(0, 1)?), self.matmul)?;
        Ok((cast(ys, &layout, xs.0.dtype())?, layout.shape().clone()))
    }
}

impl CustomOp3 for WeightNormLinear {
    fn name(&self) -> &'static str {
        "weight-norm-linear-with-backward"
    }

    backend_forward!(3, forward);

    /// With `n = ||v||`, `r = g / n`, `W = v r`: `dx = grad W`, `dW = (x^T grad)^T`,
    /// `dr = sum_rows(dW v)`, `dg = dr / n`, `dn = -dr g / n^2`, and
    /// `dv = dW r + 2 v (dn / n / 2)`: candle's backward of the composition, in its order.
    fn bwd(
        &self,
        xs: &Tensor,
        v: &Tensor,
        g: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !v.track_op() && !g.track_op() {
            return Ok((Some(self.input_grad(xs, v, g, grad)?), None, None));
        }
        if let Some(grads) = self.fused_backward(xs, v, g, grad)? {
            return Ok(grads);
        }
        let [norm, gain, weight] = composed_weight(v, g)?;
        let grad_xs = matmul_in(grad, &weight, self.matmul)?.to_dtype(xs.dtype())?;
        let grad_weight = matmul_in(&xs.t()?, grad, self.matmul)?.t()?.to_dtype(v.dtype())?;
        let grad_gain = grad_weight.mul(v)?.sum_keepdim(1)?;
        let grad_g = grad_gain.div(&norm)?;
        let grad_norm = grad_gain.mul(g)?.div(&norm.sqr()?)?.neg()?;
        let grad_sum_sq = grad_norm.div(&norm)?.affine(0.5, 0.)?;
        let grad_v = (grad_weight.broadcast_mul(&gain)? + v.broadcast_mul(&grad_sum_sq)?.affine(2., 0.)?)?;
        Ok((Some(grad_xs.detach()), Some(grad_v.detach()), Some(grad_g.detach())))
    }
}

impl WeightNormLinear {
    /// `dx = g W` alone, for frozen weights: the arithmetic of the full backward's `dx`.
    fn input_grad(&self, xs: &Tensor, v: &Tensor, g: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let weight = match fused_weight(v, g) {
            Some([weight, ..]) => Tensor::from_vec(weight, v.shape(), v.device())?,
            None => composed_weight(v, g)?[2].clone(),
        };
        self.grad_xs(xs, &weight, grad)
    }

    /// `dx = g W` for the weight-normed matrix `weight`, in x's dtype, detached.
    fn grad_xs(&self, xs: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<Tensor> {
        Ok(to_dtype(&matmul_in(grad, weight, self.matmul)?, xs.dtype())?.detach())
    }

    /// The backward pass with the row-wise parts in the CPU's fused kernels ([`cpu::weight_norm`],
    /// [`cpu::weight_norm_backward`]): the same arithmetic; `None` where they do not apply.
    fn fused_backward(&self, xs: &Tensor, v: &Tensor, g: &Tensor, grad: &Tensor) -> Result<Option<Grads3>> {
        let Some([weight, norm, gain]) = fused_weight(v, g) else {
            return Ok(None);
        };
        let weight = Tensor::from_vec(weight, v.shape(), v.device())?;
        let grad_xs = self.grad_xs(xs, &weight, grad)?;
        // dW^T, [d, K] as the product leaves it.
        let grad_weight_t = to_dtype(&matmul_in(&xs.t()?, grad, self.matmul)?, v.dtype())?;
        let fused = cpu::with_f32([v, g, &grad_weight_t], |[v, g, gwt]| {
            cpu::weight_norm_backward(v, g, gwt, &norm, &gain)
        });
        let Some([grad_v, grad_g]) = fused.flatten() else { return Ok(None) };
        let (grad_v, grad_g) = (
            Tensor::from_vec(grad_v, v.shape(), v.device())?,
            Tensor::from_vec(grad_g, g.shape(), g.device())?,
        );
        Ok(Some((Some(grad_xs), Some(grad_v), Some(grad_g))))
    }
}

/// `[W, ||v||, g / ||v||]` from the CPU's fused kernel ([`cpu::weight_norm`]); `None` where it
/// does not apply.
fn fused_weight(v: &Tensor, g: &Tensor) -> Option<[Vec<f32>; 3]> {
    cpu::with_f32([v, g], |[v, g]| cpu::weight_norm(v, g)).flatten()
}

/// `[||v||, g / ||v||, W]` as tensor ops, the arithmetic [`fused_weight`] reproduces.
fn composed_weight(v: &Tensor, g: &Tensor) -> Result<[Tensor; 3]> {
    let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?;
    let gain = g.div(&norm)?;
    let weight = v.broadcast_mul(&gain)?;
    Ok([norm, gain, weight])
}

/// A three-input op's gradients.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// x `[5, 8]`, v `[12, 8]`, g `[12, 1]` (variables) and the weights `[5, 12]` of a linear loss.
    fn inputs() -> (Var, Var, Var, Tensor) {
        let dev = Device::Cpu;
        (
            Var::randn(0f32, 1.0, (5, 8), &dev).unwrap(),
            Var::randn(0f32, 0.5, (12, 8), &dev).unwrap(),
            Var::randn(1f32, 0.3, (12, 1), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (5, 12), &dev).unwrap(),
        )
    }

    #[test]
    fn equals_the_tensor_op_composition_in_both_passes() {
        let (x, v, g, r) = inputs();
        // DINOHead.last_layer: weight_norm(nn.Linear(bottleneck, K, bias=False)).
        let composed = |dtype: DType| -> Result<Tensor> {
            let norm = v.as_tensor().sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            let weight = v.as_tensor().broadcast_mul(&g.as_tensor().div(&norm)?)?;
            matmul_in(x.as_tensor(), &weight.t()?, dtype)
        };
        let max_diff = |a: &Tensor, b: &Tensor| {
            a.sub(b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        for dtype in [DType::F32, DType::BF16] {
            let ours = weight_norm_linear(x.as_tensor(), v.as_tensor(), g.as_tensor(), dtype).unwrap();
            let theirs = composed(dtype).unwrap();
            assert_eq!(max_diff(&ours, &theirs), 0.0, "{dtype:?} forward");
            let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("x", &x), ("v", &v), ("g", &g)] {
                let (a, b) = (g_ours.get(var.as_tensor()).unwrap(), g_theirs.get(var.as_tensor()).unwrap());
                assert_eq!(max_diff(a, b), 0.0, "{dtype:?} d{name}");
            }
        }
    }

    #[test]
    fn frozen_weights_get_no_gradient_and_leave_the_input_gradient_as_it_is() {
        let (x, v, g, r) = inputs();
        for dtype in [DType::F32, DType::BF16] {
            let grads = |v: &Tensor, g: &Tensor| {
                let ys = weight_norm_linear(x.as_tensor(), v, g, dtype).unwrap();
                (ys * &r).unwrap().sum_all().unwrap().backward().unwrap()
            };
            let trained = grads(v.as_tensor(), g.as_tensor());
            let frozen = grads(&v.as_tensor().detach(), &g.as_tensor().detach());
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            let dx = |grads: &candle_core::backprop::GradStore| bits(grads.get(x.as_tensor()).unwrap());
            assert_eq!(dx(&frozen), dx(&trained), "{dtype:?} dx");
            assert!(frozen.get(v.as_tensor()).is_none() && frozen.get(g.as_tensor()).is_none());
        }
    }
}
