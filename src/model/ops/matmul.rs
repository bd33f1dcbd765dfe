//! Matrix products in a compute dtype: [`matmul_in`], a product as one autograd node, and the
//! linear layer ([`Linear`], [`linear`]), whose output stays in the compute dtype.

use candle_core::{CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, op};
use candle_nn::{Init, VarBuilder};

use super::pointwise::{gelu_erf_grad, gelu_erf_storage};
use super::{Fused, Stage, TRUNC_NORMAL_02, cast, convert, cpu, gelu_erf, to_dtype};

/// `a @ b` computed in `dtype` and returned in `a`'s dtype: with `BF16` and f32 operands both are
/// rounded to bf16 and the product (f32-accumulated by the GEMM, rounded to bf16) comes back as
/// f32, what PyTorch's bf16 autocast does for `matmul`. One autograd node: the graph keeps the
/// operands only, not their bf16 copies; the backward's products run in `dtype` too.
pub fn matmul_in(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == a.dtype() && dtype == b.dtype() {
        return a.matmul(b);
    }
    a.apply_op2(b, MatmulIn { dtype })
}

/// A storage operand as seen in a compute dtype: itself when it is in that dtype already,
/// otherwise a converted contiguous copy (freed with this value).
pub(super) struct Operand<'a, S> {
    original: &'a S,
    converted: Option<S>,
    /// The layout of [`Operand::storage`].
    pub layout: Layout,
}

impl<'a, S: Fused> Operand<'a, S> {
    /// `storage` (laid out as `layout`) in `dtype`.
    pub fn new(storage: &'a S, layout: &Layout, dtype: DType) -> Result<Operand<'a, S>> {
        if storage.dtype() == dtype {
            return Ok(Operand { original: storage, converted: None, layout: layout.clone() });
        }
        let converted = convert(storage, layout, dtype)?;
        Ok(Operand {
            original: storage,
            converted: Some(converted),
            layout: Layout::contiguous(layout.shape()),
        })
    }

    /// The storage in the compute dtype.
    pub fn storage(&self) -> &S {
        self.converted.as_ref().unwrap_or(self.original)
    }
}

/// `a @ b` at the storage level with the product in `dtype` (operands converted when they are
/// not in it). Batched over leading dims; either operand may be a transposed view. Returns the
/// product and its (contiguous) layout.
pub(super) fn product_in<S: Fused>(
    (a, a_layout): (&S, &Layout),
    (b, b_layout): (&S, &Layout),
    dtype: DType,
) -> Result<(S, Layout)> {
    let (a_dims, b_dims) = (a_layout.dims(), b_layout.dims());
    let rank = a_dims.len();
    if rank < 2
        || b_dims.len() != rank
        || a_dims[..rank - 2] != b_dims[..rank - 2]
        || a_dims[rank - 1] != b_dims[rank - 2]
    {
        candle_core::bail!("matmul: shapes {a_dims:?} and {b_dims:?} do not multiply");
    }
    let (m, k, n) = (a_dims[rank - 2], a_dims[rank - 1], b_dims[rank - 1]);
    let batch = a_dims[..rank - 2].iter().product();
    let mut out_dims = a_dims.to_vec();
    out_dims[rank - 1] = n;
    if dtype == DType::BF16
        && let Some(product) = S::matmul_bf16((a, a_layout), (b, b_layout), (batch, m, n, k))
    {
        return Ok((product?, Layout::contiguous(out_dims)));
    }
    let (a, b) = (Operand::new(a, a_layout, dtype)?, Operand::new(b, b_layout, dtype)?);
    let product = a.storage().matmul(b.storage(), (batch, m, n, k), &a.layout, &b.layout)?;
    Ok((product, Layout::contiguous(out_dims)))
}

struct MatmulIn {
    dtype: DType,
}

impl MatmulIn {
    /// The product in `dtype`, returned in `a`'s dtype.
    fn forward<S: Fused>(&self, a: (&S, &Layout), b: (&S, &Layout)) -> Result<(S, Shape)> {
        let (product, layout) = product_in(a, b, self.dtype)?;
        Ok((cast(product, &layout, a.0.dtype())?, layout.shape().clone()))
    }
}

impl CustomOp2 for MatmulIn {
    fn name(&self) -> &'static str {
        "matmul-in-dtype"
    }

    backend_forward!(2, forward);

    /// `da = g @ b^T`, `db = a^T @ g`, each product in `dtype` (as autocast's backward), each
    /// gradient in its operand's dtype.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_a = to_dtype(&matmul_in(grad, &b.t()?, self.dtype)?, a.dtype())?;
        let grad_b = to_dtype(&matmul_in(&a.t()?, grad, self.dtype)?, b.dtype())?;
        Ok((Some(grad_a.detach()), Some(grad_b.detach())))
    }
}

/// `nn.Linear(in, out)` with DINO's init (weight trunc-normal .02, bias 0). Names `weight`, `bias`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Arithmetic of the product and dtype of the output (see [`linear`]).
    matmul: DType,
}

impl Linear {
    /// A linear layer under `vb` (`vb.pp("fc1")` gives `fc1.weight`, `fc1.bias`) whose product is
    /// computed in, and whose output is, `matmul` (`F32`, or `BF16` for mixed precision).
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, matmul: DType, vb: VarBuilder) -> Result<Linear> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", TRUNC_NORMAL_02)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Linear { weight, bias, matmul })
    }
}

impl Linear {
    /// This layer applied to `gelu(xs)` ([`gelu_linear`]).
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        gelu_linear(xs, &self.weight, self.bias.as_ref(), self.matmul)
    }

    /// This layer as a stage of a residual branch ([`super::residual_branch`]), applied to
    /// `gelu(xs)` with `gelu_input`.
    pub fn stage(&self, gelu_input: bool) -> Stage {
        let op = LinearOp { matmul: self.matmul, gelu_input };
        Stage::linear(self.weight.clone(), self.bias.clone(), op)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        linear(xs, &self.weight, self.bias.as_ref(), self.matmul)
    }
}

/// `x W^T + b` for `x` `[..., in]`, `W` `[out, in]`, computed in `matmul` and returned in it
/// (autocast's `linear`: bf16 in, bf16 out), `[..., out]`. With a bias it is one autograd node
/// (PyTorch's `addmm`) whatever the rank of `x`: the graph keeps x, W and b, neither the product
/// before the bias is added nor reshaped copies of x and the output (each a node whose gradient
/// candle would add up on its own). In f32 the arithmetic is that of `matmul` then `broadcast_add`
/// on the rows of x.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, matmul: DType) -> Result<Tensor> {
    match bias {
        Some(bias) => xs.contiguous()?.apply_op3(weight, bias, LinearOp { matmul, gelu_input: false }),
        None => {
            let (rows, out_shape) = rows_and_output(xs.shape(), weight.dims())?;
            let ys = matmul_in(&xs.reshape(rows)?.to_dtype(matmul)?, &weight.t()?, matmul)?;
            ys.reshape(out_shape)
        }
    }
}

/// `gelu(x) W^T + b`, exact GELU ([`gelu_erf`]) then [`linear`] (the MLP's second layer), as one
/// autograd node that keeps `x`, not `gelu(x)`: the backward recomputes the activation, which saves
/// keeping it (an activation four times the width of the stream in a ViT block) and candle's
/// summing of its gradient onto a zero tensor. The same arithmetic as the two ops.
pub fn gelu_linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, matmul: DType) -> Result<Tensor> {
    match bias {
        Some(bias) => xs.contiguous()?.apply_op3(weight, bias, LinearOp { matmul, gelu_input: true }),
        None => linear(&gelu_erf(xs)?, weight, None, matmul),
    }
}

/// For `x` of `shape` `[..., in]` and `weight` `[out, in]`: x's shape as rows `[n, in]`, and the
/// output's shape `[..., out]`.
fn rows_and_output(shape: &Shape, weight: &[usize]) -> Result<(Shape, Shape)> {
    let dims = shape.dims();
    let Some((&in_dim, leading)) = dims.split_last() else {
        candle_core::bail!("linear: a scalar input has no features");
    };
    let rows = leading.iter().product::<usize>();
    let Some(&out_dim) = weight.first() else {
        candle_core::bail!("linear: a weight without dims");
    };
    let out_dims: Vec<usize> = leading.iter().copied().chain([out_dim]).collect();
    Ok(((rows, in_dim).into(), out_dims.into()))
}

#[derive(Debug, Clone, Copy)]
pub(super) struct LinearOp {
    pub matmul: DType,
    /// The input goes through exact GELU first ([`gelu_linear`]).
    pub gelu_input: bool,
}

impl LinearOp {
    /// The forward pass at the storage level, on any backend; `xs` is contiguous (see [`linear`]).
    fn forward<S: Fused>(
        &self,
        (xs, xs_layout): (&S, &Layout),
        (weight, weight_layout): (&S, &Layout),
        (bias, bias_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        if !xs_layout.is_contiguous() {
            candle_core::bail!("linear: the input must be contiguous (linear() makes it so)");
        }
        let (rows, out_shape) = rows_and_output(xs_layout.shape(), weight_layout.dims())?;
        let activated = match self.gelu_input {
            true => Some(gelu_erf_storage(xs, xs_layout)?),
            false => None,
        };
        let (xs, rows) = match &activated {
            Some(activated) => (activated, Layout::contiguous(rows)),
            None => (xs, Layout::contiguous_with_offset(rows, xs_layout.start_offset())),
        };
        let (mut ys, layout) =
            product_in((xs, &rows), (weight, &weight_layout.transpose(0, 1)?), self.matmul)?;
        let bias = Operand::new(bias, bias_layout, self.matmul)?;
        let bias_rows = bias.layout.broadcast_as(layout.shape())?;
        if S::add_bias(&mut ys, (bias.storage(), &bias.layout)).is_some() {
            return Ok((ys, out_shape));
        }
        Ok((ys.binary_impl::<op::Add>(bias.storage(), &layout, &bias_rows)?, out_shape))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-with-backward"
    }

    backend_forward!(3, forward);

    /// `dx = g W`, `dW = (x^T g)^T`, `db = sum_rows(g)`: the backward of the product with the
    /// transposed weight and of the broadcast add, each gradient in its input's dtype.
    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [grad_xs, grad_weight, grad_bias] = self.backward(xs, weight, bias, grad)?;
        Ok((Some(grad_xs), Some(grad_weight), Some(grad_bias)))
    }
}

impl LinearOp {
    /// The gradients of x, weight and bias (detached) for the output gradient `grad`.
    pub(super) fn backward(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        grad: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let input = match self.gelu_input {
            true => gelu_erf(&xs.detach())?,
            false => xs.clone(),
        };
        let (rows, _) = rows_and_output(xs.shape(), weight.dims())?;
        let (input_rows, grad) = (input.reshape(rows)?, grad.reshape(((), weight.dim(0)?))?);
        let grad_input =
            to_dtype(&matmul_in(&grad, weight, self.matmul)?, xs.dtype())?.reshape(xs.shape())?;
        let grad_xs = match self.gelu_input {
            true => gelu_erf_grad(xs, &grad_input)?,
            false => grad_input,
        };
        let grad_weight = matmul_in(&input_rows.t()?, &grad, self.matmul)?.t()?.to_dtype(weight.dtype())?;
        let grad = to_dtype(&grad, bias.dtype())?;
        let grad_bias = match cpu::with_f32([&grad], |[g]| cpu::column_sum(g, bias.elem_count())) {
            Some(sum) => Tensor::from_vec(sum, bias.shape(), bias.device())?,
            None => grad.sum_keepdim(0)?.squeeze(0)?,
        };
        Ok([grad_xs.detach(), grad_weight.detach(), grad_bias.detach()])
    }
}
