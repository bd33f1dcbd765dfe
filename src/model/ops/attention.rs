//! Multi-head self-attention's core as one autograd node, from the fused qkv projection to the
//! heads' outputs side by side.

use candle_core::{CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::cpu_attention;
use super::matmul::{matmul_in, product_in};
use super::norm::{Softmax, softmax_backward};
use super::{Fused, cast, to_dtype};

/// `softmax(q k^T * scale) v` per head, from `qkv` `[B, N, 3 * H * d]` (DINO's
/// `reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)`) to `[B, N, H * d]`, in `qkv`'s dtype. One
/// autograd node, what `F.scaled_dot_product_attention` is to PyTorch: the graph keeps `qkv` and
/// the output, none of the per-head copies of q, k and v nor the `[B, H, N, N]` logits and
/// probabilities (a composition of tensor ops keeps three of those per block, most of a ViT
/// step's memory). The backward recomputes the probabilities. Products run in `matmul` (see
/// [`matmul_in`]), the scaling and softmax in f32; in f32 the arithmetic is that of the
/// composition, op for op, in both passes.
pub fn attention(qkv: &Tensor, num_heads: usize, scale: f64, matmul: DType) -> Result<Tensor> {
    let (_, _, width) = qkv.dims3()?;
    if num_heads == 0 || width % (3 * num_heads) != 0 {
        candle_core::bail!("attention: qkv width {width} is not 3 x {num_heads} heads x head dim");
    }
    qkv.apply_op1(Attention { num_heads, scale, matmul })
}

/// [`attention`]'s first token's row alone, `[B, 1, H d]`: its query against every token's key
/// and value, as a composition of tensor ops (each with its backward) in the same arithmetic:
/// products in `matmul`, scaling and softmax in f32. A single product row may round differently
/// from the same row of the full product.
pub fn first_token_attention(qkv: &Tensor, num_heads: usize, scale: f64, matmul: DType) -> Result<Tensor> {
    let (b, _, width) = qkv.dims3()?;
    let [q, k, v] = Attention { num_heads, scale, matmul }.split(qkv)?;
    let query = q.narrow(2, 0, 1)?.contiguous()?;
    let logits = matmul_in(&query, &k.t()?, matmul)?.to_dtype(DType::F32)?;
    let probs = super::softmax_last_dim(&(logits * scale)?)?.to_dtype(qkv.dtype())?;
    matmul_in(&probs, &v, matmul)?.transpose(1, 2)?.reshape((b, 1, width / 3))
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Attention {
    pub num_heads: usize,
    pub scale: f64,
    pub matmul: DType,
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
    fn forward<S: Fused>(&self, (qkv, layout): (&S, &Layout)) -> Result<(S, Shape)> {
        if !layout.is_contiguous() {
            candle_core::bail!("attention: qkv must be contiguous");
        }
        let heads = self.heads(layout)?;
        let (_, b, h, n, d) = heads.shape().dims5()?;
        if let Some(out) = S::attention((qkv, layout), h, self.scale, self.matmul) {
            return Ok((out, Shape::from((b, n, h * d))));
        }
        let part = |i: usize| qkv.to_dtype(&heads.narrow(0, i, 1)?, self.matmul);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let per_head = Layout::contiguous((b, h, n, d));
        let (logits, square) = product_in((&q, &per_head), (&k, &per_head.transpose(2, 3)?), self.matmul)?;
        let logits = cast(logits, &square, DType::F32)?;
        let (probs, _) = Softmax { scale: self.scale }.forward((&logits, &square))?;
        let probs = cast(probs, &square, self.matmul)?;
        let (out, _) = product_in((&probs, &square), (&v, &per_head), self.matmul)?;
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

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention-with-backward"
    }

    backend_forward!(1, forward);

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(qkv, grad)?))
    }
}

impl Attention {
    /// The gradient of `qkv` (detached) for the output gradient `grad`. In f32, with `p` the
    /// recomputed probabilities and `g` the output gradient per head: `dv = p^T g`,
    /// `dp = g v^T`, `ds = (dp - sum(dp * p)) * p * scale`, `dq = ds k`, `dk = (q^T ds)^T` (the
    /// backward of matmul, scale and softmax, in that order), stacked back into the `qkv` layout
    /// and dtype.
    pub(super) fn backward(&self, qkv: &Tensor, grad: &Tensor) -> Result<Tensor> {
        if let Some(grad_qkv) = cpu_attention::backward(qkv, grad, self.num_heads, self.scale, self.matmul) {
            return Ok(grad_qkv?.detach());
        }
        let [q, k, v] = self.split(&to_dtype(qkv, DType::F32)?)?;
        let (b, n, width) = qkv.dims3()?;
        let h = self.num_heads;
        let grad =
            to_dtype(grad, DType::F32)?.reshape((b, n, h, width / (3 * h)))?.transpose(1, 2)?.contiguous()?;
        let probs = matmul_in(&q, &k.t()?, self.matmul)?.apply_op1_no_bwd(&Softmax { scale: self.scale })?;
        let grad_v = matmul_in(&probs.t()?, &grad, self.matmul)?;
        let grad_probs = matmul_in(&grad, &v.t()?, self.matmul)?;
        let grad_logits = softmax_backward(&probs, &grad_probs, self.scale)?;
        let grad_q = matmul_in(&grad_logits, &k, self.matmul)?;
        let grad_k = matmul_in(&q.t()?, &grad_logits, self.matmul)?.t()?;
        let stacked = Tensor::stack(&[grad_q, grad_k, grad_v], 0)?;
        let grad_qkv = stacked.permute((1, 3, 0, 2, 4))?.contiguous()?.reshape((b, n, width))?;
        Ok(to_dtype(&grad_qkv, qkv.dtype())?.detach())
    }
}
