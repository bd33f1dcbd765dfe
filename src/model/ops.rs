//! Training-safe building blocks: every op here has a backward pass in candle.
//!
//! candle's fused `layer_norm`, `softmax_last_dim` and `rms_norm` kernels drop gradients, so the
//! training path defines its own LayerNorm and softmax as single autograd nodes with a backward
//! (forward from candle's primitive kernels, on any device). Also here: the linear layer (2-D matmul
//! over flattened leading dims, so its backward never materialises a broadcast weight), stochastic
//! depth, the bicubic matrix that resizes the positional embedding exactly like PyTorch, the
//! matrix product of bf16 mixed precision, and attention as one node that keeps no `N x N` matrix.
//!
//! The backward passes return detached gradients: a gradient computed from tracked tensors would
//! otherwise carry its own graph (the upstream gradient, recomputed intermediates) and candle
//! keeps the gradients of variables, with that graph, until the backward pass ends.

use candle_core::backend::BackendStorage;
use candle_core::op::{self, ReduceOp};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Module, Result, Shape, Tensor,
};
use candle_nn::{Init, VarBuilder};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// DINO's `trunc_normal_(std=.02)` for Linear weights, cls token and positional embedding.
pub const TRUNC_NORMAL_02: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// `a @ b` computed in `dtype` and returned in `a`'s dtype: with `BF16` both operands are rounded
/// to bf16 and the product (f32-accumulated by the GEMM) comes back as f32, what PyTorch's bf16
/// autocast does for `matmul`, `linear` and `conv`. One autograd node: the graph keeps the f32
/// operands only, not their bf16 copies nor the bf16 product; the backward's products run in
/// `dtype` too.
pub fn matmul_in(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == a.dtype() {
        return a.matmul(b);
    }
    a.apply_op2(b, MatmulIn { dtype })
}

struct MatmulIn {
    dtype: DType,
}

/// `a @ b` at the storage level (batched over leading dims, either operand may be a transposed
/// view), computed in `dtype` and returned in `a`'s dtype; see [`matmul_in`].
fn product<S: BackendStorage>(
    (a, a_layout): (&S, &Layout),
    (b, b_layout): (&S, &Layout),
    dtype: DType,
) -> Result<(S, Shape)> {
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
    let out = Layout::contiguous(out_dims);
    if dtype == a.dtype() {
        let product = a.matmul(b, (batch, m, n, k), a_layout, b_layout)?;
        return Ok((product, out.shape().clone()));
    }
    let (a16, b16) = (a.to_dtype(a_layout, dtype)?, b.to_dtype(b_layout, dtype)?);
    let (a16_layout, b16_layout) = (Layout::contiguous(a_dims), Layout::contiguous(b_dims));
    let product = a16.matmul(&b16, (batch, m, n, k), &a16_layout, &b16_layout)?;
    Ok((product.to_dtype(&out, a.dtype())?, out.shape().clone()))
}

impl MatmulIn {
    fn forward<S: BackendStorage>(&self, a: (&S, &Layout), b: (&S, &Layout)) -> Result<(S, Shape)> {
        product(a, b, self.dtype)
    }
}

impl CustomOp2 for MatmulIn {
    fn name(&self) -> &'static str {
        "matmul-in-dtype"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((a, a_layout), (b, b_layout))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        a_layout: &Layout,
        b: &candle_core::CudaStorage,
        b_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((a, a_layout), (b, b_layout))
    }

    /// `da = g @ b^T`, `db = a^T @ g`, each product in `dtype` (as autocast's backward).
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rank = a.rank();
        let grad_a = matmul_in(grad, &b.transpose(rank - 2, rank - 1)?, self.dtype)?;
        let grad_b = matmul_in(&a.transpose(rank - 2, rank - 1)?, grad, self.dtype)?;
        Ok((Some(grad_a.detach()), Some(grad_b.detach())))
    }
}

/// `nn.Linear(in, out)` with DINO's init (weight trunc-normal .02, bias 0). Names `weight`, `bias`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Arithmetic of the product (see [`matmul_in`]).
    matmul: DType,
}

impl Linear {
    /// A linear layer under `vb` (`vb.pp("fc1")` gives `fc1.weight`, `fc1.bias`) whose product is
    /// computed in `matmul` (`F32`, or `BF16` for mixed precision).
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, matmul: DType, vb: VarBuilder) -> Result<Linear> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", TRUNC_NORMAL_02)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
        Ok(Linear { weight, bias, matmul })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = xs.elem_count() / in_dim;
        let ys = linear(&xs.reshape((rows, in_dim))?, &self.weight, self.bias.as_ref(), self.matmul)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("a linear input has at least one dim") = self.weight.dim(0)?;
        ys.reshape(out_dims)
    }
}

/// `x W^T + b` for `x` `[rows, in]`, `W` `[out, in]`, product in `matmul` (see [`matmul_in`]).
/// With a bias it is one autograd node (PyTorch's `addmm`): the graph keeps x, W and b, not the
/// product before the bias is added. The arithmetic is that of `matmul_in` then `broadcast_add`.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, matmul: DType) -> Result<Tensor> {
    match bias {
        Some(bias) => xs.apply_op3(weight, bias, LinearOp { matmul }),
        None => matmul_in(xs, &weight.t()?, matmul),
    }
}

struct LinearOp {
    matmul: DType,
}

impl LinearOp {
    /// The forward pass at the storage level, on any backend.
    fn forward<S: BackendStorage>(
        &self,
        xs: (&S, &Layout),
        (weight, weight_layout): (&S, &Layout),
        (bias, bias_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let (ys, shape) = product(xs, (weight, &weight_layout.transpose(0, 1)?), self.matmul)?;
        let bias_rows = bias_layout.broadcast_as(shape.clone())?;
        Ok((ys.binary_impl::<op::Add>(bias, &Layout::contiguous(&shape), &bias_rows)?, shape))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-with-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xs_layout), (weight, weight_layout), (bias, bias_layout))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        bias: &candle_core::CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((xs, xs_layout), (weight, weight_layout), (bias, bias_layout))
    }

    /// `dx = g W`, `dW = (x^T g)^T`, `db = sum_rows(g)`: the backward of the product with the
    /// transposed weight and of the broadcast add.
    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_xs = matmul_in(grad, weight, self.matmul)?;
        let grad_weight = matmul_in(&xs.t()?, grad, self.matmul)?.t()?;
        let grad_bias = grad.sum_keepdim(0)?.squeeze(0)?;
        Ok((Some(grad_xs.detach()), Some(grad_weight.detach()), Some(grad_bias.detach())))
    }
}

/// `nn.LayerNorm(dim, eps)` over the last dim, from primitive ops. Names `weight`, `bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm under `vb` with weight 1 and bias 0.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(LayerNorm { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply_op3(&self.weight, &self.bias, LayerNormOp { eps: self.eps })
    }
}

/// The layouts of a reduction over the last dim at the storage level: the input's shape, its last
/// axis, a fresh contiguous result, the reduced `[..., 1]` result, and that broadcast back.
struct LastDim {
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
struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    /// `(x - mean) / sqrt(var + eps) * weight + bias` along the last dim, on any backend.
    fn forward<S: BackendStorage>(
        &self,
        (x, layout): (&S, &Layout),
        (weight, weight_layout): (&S, &Layout),
        (bias, bias_layout): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let LastDim { shape, last, contiguous, reduced_contiguous, reduced } = LastDim::of(layout)?;
        let n = shape.dims()[last] as f64;
        let mean = x.reduce_op(ReduceOp::Sum, layout, &[last])?.affine(&reduced_contiguous, 1.0 / n, 0.0)?;
        let centered = x.binary_impl::<op::Sub>(&mean, layout, &reduced)?;
        let sum_sq =
            centered.unary_impl::<op::Sqr>(&contiguous)?.reduce_op(ReduceOp::Sum, &contiguous, &[last])?;
        let std = sum_sq
            .affine(&reduced_contiguous, 1.0 / n, 0.0)?
            .affine(&reduced_contiguous, 1.0, self.eps)?
            .unary_impl::<op::Sqrt>(&reduced_contiguous)?;
        let normed = centered.binary_impl::<op::Div>(&std, &contiguous, &reduced)?;
        let scaled = normed.binary_impl::<op::Mul>(
            weight,
            &contiguous,
            &weight_layout.broadcast_as(shape.clone())?,
        )?;
        Ok((
            scaled.binary_impl::<op::Add>(bias, &contiguous, &bias_layout.broadcast_as(shape.clone())?)?,
            shape,
        ))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-with-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, x_layout), (weight, weight_layout), (bias, bias_layout))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        bias: &candle_core::CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward((x, x_layout), (weight, weight_layout), (bias, bias_layout))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let normed = centered.broadcast_mul(&rstd)?;
        let dim = weight.dim(0)?;
        let rows = |t: Tensor| t.reshape(((), dim));
        let grad_weight = rows((grad * &normed)?)?.sum(0)?;
        let grad_bias = rows(grad.clone())?.sum(0)?;
        let g = grad.broadcast_mul(weight)?;
        let inner = (g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?
            - normed.broadcast_mul(&(&g * &normed)?.mean_keepdim(D::Minus1)?)?)?;
        let grad_xs = inner.broadcast_mul(&rstd)?;
        Ok((Some(grad_xs.detach()), Some(grad_weight.detach()), Some(grad_bias.detach())))
    }
}

/// Softmax over the last dim, with a backward pass (candle's fused `softmax_last_dim` has none).
/// The forward runs candle's own kernels at the storage level (max, subtract, exp, sum, divide),
/// so only the input and the result stay in the autograd graph, not the three intermediates a
/// composition of tensor ops would keep; the backward is `y * (g - sum(g * y))`.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.apply_op1(SoftmaxLastDim)
}

struct SoftmaxLastDim;

impl SoftmaxLastDim {
    /// `exp(x - max) / sum(exp(x - max))` along the last dim of `layout`, on any backend.
    fn forward<S: BackendStorage>(x: &S, layout: &Layout) -> Result<(S, Shape)> {
        let LastDim { shape, last, contiguous, reduced, .. } = LastDim::of(layout)?;
        let max = x.reduce_op(ReduceOp::Max, layout, &[last])?;
        let exp = x.binary_impl::<op::Sub>(&max, layout, &reduced)?.unary_impl::<op::Exp>(&contiguous)?;
        let sum = exp.reduce_op(ReduceOp::Sum, &contiguous, &[last])?;
        Ok((exp.binary_impl::<op::Div>(&sum, &contiguous, &reduced)?, shape))
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-with-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Self::forward(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Self::forward(storage, layout)
    }

    fn bwd(&self, _xs: &Tensor, ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * ys)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&dot)? * ys)?.detach()))
    }
}

/// Multi-head self-attention's core, `softmax(q k^T * scale) v` per head, from the fused
/// projection `qkv` `[B, N, 3 * H * d]` (DINO's `reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)`)
/// to the heads' outputs side by side, `[B, N, H * d]`. One autograd node, what
/// `F.scaled_dot_product_attention` is to PyTorch: the graph keeps `qkv` and the output, none of
/// the per-head copies of q, k and v nor the `[B, H, N, N]` logits and probabilities (a
/// composition of tensor ops keeps three of those per block, most of a ViT step's memory). The
/// backward recomputes the probabilities. Products run in `matmul` as [`matmul_in`], the softmax
/// in f32; the arithmetic is that of the composition, op for op, in both passes.
pub fn attention(qkv: &Tensor, num_heads: usize, scale: f64, matmul: DType) -> Result<Tensor> {
    let (_, _, width) = qkv.dims3()?;
    if num_heads == 0 || width % (3 * num_heads) != 0 {
        candle_core::bail!("attention: qkv width {width} is not 3 x {num_heads} heads x head dim");
    }
    qkv.apply_op1(Attention { num_heads, scale, matmul })
}

struct Attention {
    num_heads: usize,
    scale: f64,
    matmul: DType,
}

impl Attention {
    /// `[B, N, 3 H d]` -> the layout of `[3, B, H, N, d]` over the same elements.
    fn heads(&self, qkv: &Layout) -> Result<Layout> {
        let (b, n, width) = qkv.shape().dims3()?;
        let (h, d) = (self.num_heads, width / (3 * self.num_heads));
        Layout::contiguous_with_offset((b, n, 3, h, d), qkv.start_offset()).permute(&[2, 0, 3, 1, 4])
    }

    /// The forward pass at the storage level, on any backend. q, k and v are gathered into
    /// contiguous `[B, H, N, d]` copies in `matmul`'s dtype (freed on return).
    fn forward<S: BackendStorage>(&self, qkv: &S, layout: &Layout) -> Result<(S, Shape)> {
        if !layout.is_contiguous() {
            candle_core::bail!("attention: qkv must be contiguous");
        }
        let heads = self.heads(layout)?;
        let (_, b, h, n, d) = heads.shape().dims5()?;
        let part = |i: usize| qkv.to_dtype(&heads.narrow(0, i, 1)?, self.matmul);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let per_head = Layout::contiguous((b, h, n, d));
        let (logits, square) = product_in_place((&q, &per_head), (&k, &per_head.transpose(2, 3)?))?;
        let scaled = cast(logits, &square, qkv.dtype())?.affine(&square, self.scale, 0.0)?;
        let (probs, _) = SoftmaxLastDim::forward(&scaled, &square)?;
        let probs = cast(probs, &square, self.matmul)?;
        let (out, _) = product_in_place((&probs, &square), (&v, &per_head))?;
        // [B, H, N, d] read as [B, N, H, d]: copied contiguous, in the input dtype.
        let side_by_side = per_head.transpose(1, 2)?;
        Ok((out.to_dtype(&side_by_side, qkv.dtype())?, Shape::from((b, n, h * d))))
    }

    /// q, k, v as `[B, H, N, d]` tensors (the backward's inputs).
    fn split(&self, qkv: &Tensor) -> Result<[Tensor; 3]> {
        let (b, n, width) = qkv.dims3()?;
        let (h, d) = (self.num_heads, width / (3 * self.num_heads));
        let heads = qkv.reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
        Ok([heads.get(0)?.contiguous()?, heads.get(1)?.contiguous()?, heads.get(2)?.contiguous()?])
    }
}

/// `a @ b` at the storage level in the operands' own dtype; returns the product and its layout.
fn product_in_place<S: BackendStorage>(a: (&S, &Layout), b: (&S, &Layout)) -> Result<(S, Layout)> {
    let (product, shape) = product(a, b, a.0.dtype())?;
    Ok((product, Layout::contiguous(shape)))
}

/// `x` (contiguous, `layout`) in `dtype`: itself when it is already, else a converted copy.
fn cast<S: BackendStorage>(x: S, layout: &Layout, dtype: DType) -> Result<S> {
    if x.dtype() == dtype { Ok(x) } else { x.to_dtype(layout, dtype) }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention-with-backward"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(qkv, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.forward(qkv, layout)
    }

    /// With `p` the recomputed probabilities and `g` the output gradient per head:
    /// `dv = p^T g`, `dp = g v^T`, `ds = (dp - sum(dp * p)) * p * scale`, `dq = ds k`,
    /// `dk = (q^T ds)^T` (the backward of matmul, scale and softmax, in that order), stacked back
    /// into the `qkv` layout.
    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [q, k, v] = self.split(qkv)?;
        let (b, n, width) = qkv.dims3()?;
        let h = self.num_heads;
        let grad = grad.reshape((b, n, h, width / (3 * h)))?.transpose(1, 2)?.contiguous()?;
        let probs = softmax_last_dim(&(matmul_in(&q, &k.t()?, self.matmul)? * self.scale)?)?;
        let grad_v = matmul_in(&probs.t()?, &grad, self.matmul)?;
        let grad_probs = matmul_in(&grad, &v.t()?, self.matmul)?;
        let dot = (&grad_probs * &probs)?.sum_keepdim(D::Minus1)?;
        let grad_logits = ((grad_probs.broadcast_sub(&dot)? * &probs)? * self.scale)?;
        let grad_q = matmul_in(&grad_logits, &k, self.matmul)?;
        let grad_k = matmul_in(&q.t()?, &grad_logits, self.matmul)?.t()?;
        let stacked = Tensor::stack(&[grad_q, grad_k, grad_v], 0)?;
        Ok(Some(stacked.permute((1, 3, 0, 2, 4))?.contiguous()?.reshape((b, n, width))?.detach()))
    }
}

/// Log-softmax over the last dim: `x - max - log(sum(exp(x - max)))`.
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let shifted = xs.broadcast_sub(&xs.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// `F.normalize(x, dim=-1)`: `x / max(||x||_2, 1e-12)` row-wise.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    xs.broadcast_div(&norm)
}

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (`nn.GELU()`), not candle's tanh `gelu`. candle's
/// backward for it rounds `1/sqrt(2 pi)` to 0.398942 (7e-7 relative); the golden gradients still
/// match PyTorch's within 1e-6, so the fused kernel stays.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.gelu_erf()
}

/// Stochastic depth (DINO `drop_path`): zero whole samples with probability `rate`, scale the
/// others by `1 / (1 - rate)`. The mask is drawn on the host from `rng` (a few bytes), so runs
/// are reproducible on every device.
pub fn drop_path(xs: &Tensor, rate: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if rate == 0.0 {
        return Ok(xs.clone());
    }
    let keep = 1.0 - rate;
    let batch = xs.dim(0)?;
    let mask: Vec<f32> =
        (0..batch).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
    let mut shape = vec![1; xs.rank()];
    shape[0] = batch;
    xs.broadcast_mul(&Tensor::from_vec(mask, shape, xs.device())?.to_dtype(xs.dtype())?)
}

/// One axis of PyTorch's `F.interpolate(mode="bicubic", align_corners=False, scale_factor=s)`
/// as a `[dst, src]` matrix: output `d` reads `x = (d + 0.5) / s - 0.5`, taps
/// `clamp(floor(x) - 1 + k, 0, src - 1)`, Keys cubic weights with A = -0.75.
pub fn bicubic_axis(src: usize, dst: usize, scale: f64) -> Vec<f64> {
    let mut m = vec![0.0; dst * src];
    for d in 0..dst {
        let x = (d as f64 + 0.5) / scale - 0.5;
        let i0 = x.floor();
        for (k, w) in cubic_weights(x - i0).into_iter().enumerate() {
            let tap = (i0 as i64 - 1 + k as i64).clamp(0, src as i64 - 1) as usize;
            m[d * src + tap] += w;
        }
    }
    m
}

/// Keys cubic convolution weights for the 4 taps around fraction `t` (A = -0.75, as PyTorch).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The separable 2-D resize of a row-major `src x src` grid to `rows x cols` as one
/// `[rows * cols, src * src]` matrix (the Kronecker product of the two axis matrices).
pub fn bicubic_grid(src: usize, (rows, cols): (usize, usize), (scale_r, scale_c): (f64, f64)) -> Vec<f64> {
    let (mr, mc) = (bicubic_axis(src, rows, scale_r), bicubic_axis(src, cols, scale_c));
    let mut m = Vec::with_capacity(rows * cols * src * src);
    for r in 0..rows {
        for c in 0..cols {
            for sr in 0..src {
                m.extend((0..src).map(|sc| mr[r * src + sr] * mc[c * src + sc]));
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads_agree(f: impl Fn(&Tensor) -> Result<Tensor>, x: &[f32]) {
        // Central differences in f64 against candle's backward in f32.
        let var = Var::new(x, &Device::Cpu).unwrap();
        let g = f(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(var.as_tensor()).unwrap().to_vec1().unwrap();
        for i in 0..x.len() {
            let at = |h: f64| {
                let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                y[i] += h;
                let t = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
                f(&t).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(1e-5) - at(-1e-5)) / 2e-5;
            assert!(
                (numeric - g[i] as f64).abs() < 1e-3,
                "element {i}: numeric {numeric} vs backward {}",
                g[i]
            );
        }
    }

    #[test]
    fn our_softmax_equals_the_fused_kernel() {
        let x = Tensor::new(&[[1.0f32, 2.0, -3.0, 0.5], [10.0, 10.0, 9.0, -20.0]], &Device::Cpu).unwrap();
        let ours: Vec<Vec<f32>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        let fused: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        for (a, b) in ours.iter().flatten().zip(fused.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let log: Vec<Vec<f32>> = log_softmax_last_dim(&x).unwrap().exp().unwrap().to_vec2().unwrap();
        for (a, b) in log.iter().flatten().zip(fused.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn softmax_layer_norm_and_normalize_have_correct_gradients() {
        let x = [0.3f32, -1.2, 2.0, 0.7, -0.1, 1.5];
        let w =
            |t: &Tensor| Tensor::new(&[1.0f32, -2.0, 0.5, 3.0, 1.5, -1.0], t.device())?.to_dtype(t.dtype());
        grads_agree(|t| softmax_last_dim(&t.reshape((2, 3))?)?.flatten_all()?.mul(&w(t)?), &x);
        grads_agree(|t| log_softmax_last_dim(&t.reshape((2, 3))?)?.flatten_all()?.mul(&w(t)?), &x);
        grads_agree(|t| l2_normalize(&t.reshape((3, 2))?)?.flatten_all()?.mul(&w(t)?), &x);
        grads_agree(|t| gelu_erf(t)?.mul(&w(t)?), &x);
        grads_agree(
            |t| {
                let vb = VarBuilder::zeros(t.dtype(), t.device());
                let ln = LayerNorm::new(3, 1e-6, vb)?;
                let ln = LayerNorm { weight: ln.weight.ones_like()?, ..ln };
                ln.forward(&t.reshape((2, 3))?)?.flatten_all()?.mul(&w(t)?)
            },
            &x,
        );
    }

    #[test]
    fn layer_norm_gradients_equal_those_of_the_tensor_op_composition() {
        let dev = Device::Cpu;
        let (x, w, b) = (
            Var::randn(0f32, 1.0, (3, 4, 5), &dev).unwrap(),
            Var::randn(1f32, 0.3, 5, &dev).unwrap(),
            Var::randn(0f32, 0.3, 5, &dev).unwrap(),
        );
        let r = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev).unwrap();
        let composed = |x: &Tensor| -> Result<Tensor> {
            let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = centered.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
            normed.broadcast_mul(w.as_tensor())?.broadcast_add(b.as_tensor())
        };
        let ln = LayerNorm { weight: w.as_tensor().clone(), bias: b.as_tensor().clone(), eps: 1e-6 };
        let (ours, theirs) = (ln.forward(x.as_tensor()).unwrap(), composed(x.as_tensor()).unwrap());
        let diff = |a: &Tensor, b: &Tensor| {
            a.sub(b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&ours, &theirs) < 1e-6);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&x, &w, &b] {
            let (a, b) = (g_ours.get(var.as_tensor()).unwrap(), g_theirs.get(var.as_tensor()).unwrap());
            assert!(diff(a, b) < 1e-5, "gradient differs by {}", diff(a, b));
        }
    }

    #[test]
    fn attention_equals_the_tensor_op_composition_in_both_passes() {
        let dev = Device::Cpu;
        let (b, n, h, d) = (2, 7, 3, 4);
        let qkv = Var::randn(0f32, 1.0, (b, n, 3 * h * d), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (b, n, h * d), &dev).unwrap();
        // DINO's Attention.forward between the qkv and the proj layers.
        let composed = |dtype: DType| -> Result<Tensor> {
            let heads = qkv.as_tensor().reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
            let (q, k, v) =
                (heads.get(0)?.contiguous()?, heads.get(1)?.contiguous()?, heads.get(2)?.contiguous()?);
            let attn = softmax_last_dim(&(matmul_in(&q, &k.t()?, dtype)? * 0.5)?)?;
            matmul_in(&attn, &v, dtype)?.transpose(1, 2)?.reshape((b, n, h * d))
        };
        let max_diff = |a: &Tensor, b: &Tensor| {
            a.sub(b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        for dtype in [DType::F32, DType::BF16] {
            let ours = attention(qkv.as_tensor(), h, 0.5, dtype).unwrap();
            let theirs = composed(dtype).unwrap();
            assert_eq!(max_diff(&ours, &theirs), 0.0, "{dtype:?} forward");
            let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g_ours.get(qkv.as_tensor()).unwrap(), g_theirs.get(qkv.as_tensor()).unwrap());
            assert_eq!(max_diff(a, b), 0.0, "{dtype:?} backward");
            assert!(a.abs().unwrap().min_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        }
    }

    #[test]
    fn bicubic_rows_sum_to_one_and_upscale_identity_is_exact() {
        // DINO's 15 -> 7 resize (scale 7.1 / 15).
        let m = bicubic_axis(15, 7, 7.1 / 15.0);
        for row in m.chunks(15) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        // Scale 1 samples the grid at integer points: the identity.
        let id = bicubic_axis(4, 4, 1.0);
        for (i, row) in id.chunks(4).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12, "{i},{j}: {v}");
            }
        }
    }

    #[test]
    fn drop_path_zeroes_whole_samples_and_rescales_the_rest() {
        use rand::SeedableRng;
        let x = Tensor::ones((64, 3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let y: Vec<Vec<Vec<f32>>> = drop_path(&x, 0.25, &mut rng).unwrap().to_vec3().unwrap();
        let kept = y.iter().filter(|s| s.iter().flatten().all(|&v| (v - 1.0 / 0.75).abs() < 1e-6)).count();
        let dropped = y.iter().filter(|s| s.iter().flatten().all(|&v| v == 0.0)).count();
        assert_eq!(kept + dropped, 64);
        assert!((8..=28).contains(&dropped), "{dropped} of 64 dropped at rate .25");
    }
}
