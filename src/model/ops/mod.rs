//! Training-safe building blocks: every op here has a backward pass in candle, and the heavy ones
//! are single autograd nodes that keep only what their backward needs.
//!
//! candle's fused `layer_norm`, `softmax_last_dim` and `rms_norm` kernels drop gradients, and a
//! composition of tensor ops keeps every intermediate alive until the backward pass. So the
//! training path defines its ops as custom ops whose forward runs candle's own kernels at the
//! storage level (generic over the backend: the same code runs on CUDA) and whose backward is
//! written out: the product in a compute dtype and the linear layer ([`matmul_in`], [`Linear`]),
//! LayerNorm and softmax ([`LayerNorm`], [`softmax_last_dim`]), multi-head attention
//! ([`attention`]), exact GELU and the residual add with stochastic depth ([`gelu_erf`],
//! [`residual`]), GELU followed by a linear layer as one node that recomputes the activation in
//! its backward instead of keeping it ([`gelu_linear`], the MLP's second half), and the head's weight-normed last layer ([`weight_norm_linear`]).
//! While training, a block's two residual branches are one node each ([`residual_branch`]), whose
//! backward chains those ops' backward passes without candle's per-node gradient sums. Also here:
//! the bicubic matrices that resize the positional embedding exactly like PyTorch
//! ([`bicubic_grid`]).
//!
//! On the CPU, LayerNorm, softmax, GELU, the weight-normed matrix (both passes), the linear layer's
//! bias add, the residual add and the f32/bf16 conversions run as fused, multi-threaded loops with
//! the composition's arithmetic, bit for bit (`cpu.rs`, through the `Fused` trait); bf16 products
//! multiply bf16-rounded f32 copies of the operands' spans (made in parallel) with the f32 GEMM,
//! what candle's bf16 product does after widening the whole storage on one thread. Other backends
//! and inputs run the composition.
//!
//! Mixed precision (`matmul = BF16`, PyTorch's bf16 autocast): products run in bf16 and the
//! activations between them stay bf16 (layer-norm outputs that feed a product, linear and
//! attention outputs, GELU); the residual stream, normalisation statistics, softmax and all the
//! loss sees stay f32. With `matmul = F32` every op does exactly the arithmetic of the tensor-op
//! composition it replaces.
//!
//! The backward passes return detached gradients: a gradient computed from tracked tensors would
//! otherwise carry its own graph (the upstream gradient, recomputed intermediates), and candle
//! keeps the variables' gradients, with that graph, until the backward pass ends.

/// A custom op's `cpu_fwd` and `cuda_fwd`, both calling its backend-generic storage-level method
/// `$method(&self, (&S, &Layout), ...)` with 1, 2 or 3 inputs: every op here runs the same code on
/// the CPU and on CUDA.
macro_rules! backend_forward {
    ($inputs:tt, $method:ident) => {
        backend_forward!(@fwd cpu_fwd, candle_core::CpuStorage, $inputs, $method);
        #[cfg(feature = "cuda")]
        backend_forward!(@fwd cuda_fwd, candle_core::CudaStorage, $inputs, $method);
    };
    (@fwd $name:ident, $storage:ty, 1, $method:ident) => {
        fn $name(
            &self,
            a: &$storage,
            a_l: &candle_core::Layout,
        ) -> candle_core::Result<($storage, candle_core::Shape)> {
            self.$method((a, a_l))
        }
    };
    (@fwd $name:ident, $storage:ty, 2, $method:ident) => {
        fn $name(
            &self,
            a: &$storage,
            a_l: &candle_core::Layout,
            b: &$storage,
            b_l: &candle_core::Layout,
        ) -> candle_core::Result<($storage, candle_core::Shape)> {
            self.$method((a, a_l), (b, b_l))
        }
    };
    (@fwd $name:ident, $storage:ty, 3, $method:ident) => {
        fn $name(
            &self,
            a: &$storage,
            a_l: &candle_core::Layout,
            b: &$storage,
            b_l: &candle_core::Layout,
            c: &$storage,
            c_l: &candle_core::Layout,
        ) -> candle_core::Result<($storage, candle_core::Shape)> {
            self.$method((a, a_l), (b, b_l), (c, c_l))
        }
    };
}

mod attention;
mod branch;
pub(crate) mod cpu;
mod cpu_attention;
mod matmul;
mod norm;
mod pointwise;
mod resize;
mod verf;
mod vexp;
mod weight_norm;

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, Result, Storage, Tensor};
use candle_nn::Init;

pub use attention::{attention, first_token_attention};
pub use branch::{Stage, residual_branch};
pub use matmul::{Linear, gelu_linear, linear, matmul_in};
pub use norm::{LayerNorm, l2_normalize, log_softmax_last_dim, softmax_last_dim};
pub use pointwise::{drop_path_scale, gelu_erf, residual};
pub use resize::{bicubic_axis, bicubic_grid};
pub use weight_norm::weight_norm_linear;

/// DINO's `trunc_normal_(std=.02)` for Linear weights, cls token and positional embedding.
pub const TRUNC_NORMAL_02: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// Fused storage-level kernels for the ops whose candle composition is a chain of passes, where
/// a backend has them: the CPU's (`cpu.rs`) do the composition's arithmetic in one multi-threaded
/// pass. `None` means "none for these inputs": the op runs the composition of candle kernels
/// instead (always on CUDA, whose behaviour these kernels leave as it is).
pub(super) trait Fused: BackendStorage {
    /// `storage` when it is this backend's.
    fn of(storage: &Storage) -> Option<&Self>;

    /// LayerNorm over the last dim, in `x`'s dtype (see [`LayerNorm`]).
    fn layer_norm(
        _x: (&Self, &Layout),
        _weight: (&Self, &Layout),
        _bias: (&Self, &Layout),
        _eps: f64,
    ) -> Option<Self> {
        None
    }

    /// `softmax(x * scale)` over the last dim (see [`softmax_last_dim`], [`attention`]).
    fn scaled_softmax(&self, _layout: &Layout, _scale: f64) -> Option<Self> {
        None
    }

    /// Multi-head attention's forward pass from a contiguous `qkv` `[B, N, 3 H d]` to
    /// `[B, N, H d]` in `qkv`'s dtype, products in `matmul` (see [`attention`]).
    fn attention(_qkv: (&Self, &Layout), _heads: usize, _scale: f64, _matmul: DType) -> Option<Self> {
        None
    }

    /// Exact GELU (see [`gelu_erf`]).
    fn gelu_erf(&self, _layout: &Layout) -> Option<Self> {
        None
    }

    /// The weight-normed matrix `W = v * (g / ||v||)` row-wise (see [`weight_norm_linear`]),
    /// `[K, d]` contiguous.
    fn weight_norm(_v: (&Self, &Layout), _g: (&Self, &Layout)) -> Option<Self> {
        None
    }

    /// `self` under `layout` converted to `dtype`, contiguous (candle's `to_dtype`).
    fn convert(&self, _layout: &Layout, _dtype: DType) -> Option<Self> {
        None
    }

    /// The product `a @ b` (`bmnk` as in `BackendStorage::matmul`) of the operands rounded to
    /// bf16, accumulated in f32 and rounded to bf16: what candle's bf16 product computes, from f32
    /// or bf16 operands.
    fn matmul_bf16(
        _a: (&Self, &Layout),
        _b: (&Self, &Layout),
        _bmnk: (usize, usize, usize, usize),
    ) -> Option<Result<Self>> {
        None
    }

    /// `ys + bias` with `ys` a contiguous `[rows, n]` product in this dtype and `bias` `[n]` (the
    /// linear layer's `broadcast_add`), written over `ys`.
    fn add_bias(_ys: &mut Self, _bias: (&Self, &Layout)) -> Option<()> {
        None
    }

    /// `xs + branch * scale` (see [`residual`]): `branch` in any dtype, promoted to `xs`'s,
    /// `scale` a per-sample factor `[B, 1, ...]`.
    fn residual(
        _xs: (&Self, &Layout),
        _branch: (&Self, &Layout),
        _scale: Option<(&Self, &Layout)>,
    ) -> Option<Self> {
        None
    }
}

#[cfg(feature = "cuda")]
impl Fused for candle_core::CudaStorage {
    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(storage) => Some(storage),
            _ => None,
        }
    }
}

/// `x` (contiguous, `layout`) in `dtype`: itself when it is already, else a converted copy.
fn cast<S: Fused>(x: S, layout: &Layout, dtype: DType) -> Result<S> {
    if x.dtype() == dtype { Ok(x) } else { convert(&x, layout, dtype) }
}

/// `x` under `layout` in `dtype`, contiguous: the fused conversion where there is one.
fn convert<S: Fused>(x: &S, layout: &Layout, dtype: DType) -> Result<S> {
    match x.convert(layout, dtype) {
        Some(converted) => Ok(converted),
        None => x.to_dtype(layout, dtype),
    }
}

/// `t.to_dtype(dtype)`, detached: converted in parallel on the CPU (a gradient's conversion in
/// a backward pass).
fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    match cpu::to_dtype(t, dtype) {
        Some(converted) => converted,
        None => t.to_dtype(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Module, Tensor, Var};
    use candle_nn::VarBuilder;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

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

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        a.sub(&b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// A layer norm whose weight and bias are the given tensors (variables, for their gradients).
    fn layer_norm(weight: &Tensor, bias: &Tensor, out: DType) -> LayerNorm {
        let tensors = [("weight".to_string(), weight.clone()), ("bias".to_string(), bias.clone())];
        let vb = VarBuilder::from_tensors(tensors.into(), weight.dtype(), weight.device());
        LayerNorm::new(weight.dim(0).unwrap(), 1e-6, out, vb).unwrap()
    }

    #[test]
    fn our_softmax_equals_the_fused_kernel() {
        let x = Tensor::new(&[[1.0f32, 2.0, -3.0, 0.5], [10.0, 10.0, 9.0, -20.0]], &Device::Cpu).unwrap();
        let ours: Vec<Vec<f32>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        let fused: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        for (a, b) in ours.iter().flatten().zip(fused.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let log: Vec<Vec<f32>> = log_softmax_last_dim(&x, 1.0).unwrap().exp().unwrap().to_vec2().unwrap();
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
        grads_agree(|t| log_softmax_last_dim(&t.reshape((2, 3))?, 1.0)?.flatten_all()?.mul(&w(t)?), &x);
        grads_agree(|t| l2_normalize(&t.reshape((3, 2))?)?.flatten_all()?.mul(&w(t)?), &x);
        grads_agree(|t| gelu_erf(t)?.mul(&w(t)?), &x);
        grads_agree(
            |t| {
                let ln = layer_norm(
                    &t.ones_like()?.narrow(0, 0, 3)?,
                    &t.zeros_like()?.narrow(0, 0, 3)?,
                    t.dtype(),
                );
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
        let ln = layer_norm(w.as_tensor(), b.as_tensor(), DType::F32);
        let (ours, theirs) = (ln.forward(x.as_tensor()).unwrap(), composed(x.as_tensor()).unwrap());
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&x, &w, &b] {
            let (a, b) = (g_ours.get(var.as_tensor()).unwrap(), g_theirs.get(var.as_tensor()).unwrap());
            assert!(max_diff(a, b) < 1e-5, "gradient differs by {}", max_diff(a, b));
        }
    }

    type UnaryOp<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

    #[test]
    fn fused_cpu_kernels_equal_the_composition_bit_for_bit_in_both_passes() {
        // The same input through the fused CPU kernels and through the composition of candle
        // kernels (as on CUDA); 37 and 70 columns cover the SIMD sums' tails, bf16 GELU its own kernel.
        let dev = Device::Cpu;
        for cols in [37, 70] {
            let x = Var::randn(0f32, 2.0, (5, cols), &dev).unwrap();
            let (w, b) =
                (Var::randn(1f32, 0.3, cols, &dev).unwrap(), Var::randn(0f32, 0.3, cols, &dev).unwrap());
            let r = Tensor::randn(0f32, 1.0, (cols, 5), &dev).unwrap();
            let ln = layer_norm(w.as_tensor(), b.as_tensor(), DType::F32);
            let ops: [&UnaryOp; 5] = [
                &|t| ln.forward(t),
                &|t| softmax_last_dim(t),
                &|t| gelu_erf(t),
                &|t| log_softmax_last_dim(t, 1.0),
                &|t| log_softmax_last_dim(t, 1.0 / 0.1),
            ];
            for (i, op) in ops.iter().enumerate() {
                let run = |composed: bool| {
                    cpu::COMPOSED_ONLY.with(|c| c.set(composed));
                    let out = op(x.as_tensor()).unwrap();
                    let loss = (out.t().unwrap() * &r).unwrap().sum_all().unwrap();
                    let grads = loss.backward().unwrap();
                    let grad = |v: &Var| {
                        grads.get(v.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    };
                    cpu::COMPOSED_ONLY.with(|c| c.set(false));
                    (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [grad(&x), grad(&w), grad(&b)])
                };
                assert_eq!(run(false), run(true), "op {i}, {cols} columns");
            }
            // bf16 GELU: the f32 GELU rounded to bf16 (PyTorch's), one bf16 step at most from
            // candle's kernel (f64 per element), except where `1 + erf` cancels in f32 (x below
            // about -4, results under 1e-6, as in PyTorch's f32 GELU).
            let bf16 = x.as_tensor().to_dtype(DType::BF16).unwrap();
            let values =
                |t: Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gelu = |composed: bool| {
                cpu::COMPOSED_ONLY.with(|c| c.set(composed));
                let out = gelu_erf(&bf16).unwrap();
                cpu::COMPOSED_ONLY.with(|c| c.set(false));
                values(out)
            };
            let widened = bf16.to_dtype(DType::F32).unwrap();
            let rounded = values(gelu_erf(&widened).unwrap().to_dtype(DType::BF16).unwrap());
            let (ours, candle) = (gelu(false), gelu(true));
            assert_eq!(ours, rounded, "bf16 GELU, {cols} columns");
            for (a, b) in ours.iter().zip(&candle) {
                let steps = (a.to_bits() as i64 - b.to_bits() as i64).abs() >> 16;
                assert!(steps <= 1 || (a - b).abs() < 1e-6, "bf16 GELU {a} vs {b}");
            }
        }
    }

    #[test]
    fn fused_linear_residual_and_bf16_products_equal_the_composition_bit_for_bit() {
        // The bias add, the residual add (with and without drop-path factors, from an f32 and a
        // bf16 branch), the bf16 products and the gradients' conversions, both passes.
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (6, 37), &dev).unwrap();
        let w = Var::randn(0f32, 0.3, (70, 37), &dev).unwrap();
        let b = Var::randn(0f32, 0.3, 70, &dev).unwrap();
        let stream = Var::randn(0f32, 1.0, (6, 70), &dev).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let scale = drop_path_scale(6, 2, 0.5, &mut rng, &dev).unwrap();
        let values =
            |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for scale in [None, scale.as_ref()] {
                let run = |composed: bool| {
                    cpu::COMPOSED_ONLY.with(|c| c.set(composed));
                    let branch = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), dtype).unwrap();
                    let out = residual(stream.as_tensor(), &branch, scale).unwrap();
                    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    cpu::COMPOSED_ONLY.with(|c| c.set(false));
                    let mut all = vec![values(&branch), values(&out)];
                    all.extend([&x, &w, &b, &stream].map(|v| values(grads.get(v.as_tensor()).unwrap())));
                    all
                };
                assert_eq!(run(false), run(true), "{dtype:?}, drop path {}", scale.is_some());
            }
        }
    }

    /// x `[2, 3, 37]` with standard deviation `spread`, W `[70, 37]`, b `[70]` (variables) and
    /// the weights `[2, 3, 70]` of a linear loss.
    fn linear_inputs(spread: f32) -> (Var, Var, Var, Tensor) {
        let dev = Device::Cpu;
        (
            Var::randn(0f32, spread, (2, 3, 37), &dev).unwrap(),
            Var::randn(0f32, 0.3, (70, 37), &dev).unwrap(),
            Var::randn(0f32, 0.3, 70, &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (2, 3, 70), &dev).unwrap(),
        )
    }

    #[test]
    fn linear_on_batches_of_rows_equals_linear_on_the_rows_in_both_passes() {
        // [2, 3, 37] contiguous and [3, 2, 37] transposed (made contiguous first), with and
        // without a bias, against the same rows as one [6, 37] matrix.
        let (x, w, b, r) = linear_inputs(1.0);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for bias in [Some(b.as_tensor()), None] {
            let run = |batched: bool, transposed: bool| {
                let input = if transposed { x.transpose(0, 1).unwrap() } else { x.as_tensor().clone() };
                let out = if batched {
                    linear(&input, w.as_tensor(), bias, DType::F32).unwrap()
                } else {
                    let rows = input.contiguous().unwrap().reshape((6, 37)).unwrap();
                    let out = linear(&rows, w.as_tensor(), bias, DType::F32).unwrap();
                    out.reshape(input.dims()[..2].iter().copied().chain([70]).collect::<Vec<_>>()).unwrap()
                };
                let out = if transposed { out.transpose(0, 1).unwrap() } else { out };
                let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let mut all = vec![values(&out)];
                all.extend([&x, &w].map(|v| values(grads.get(v.as_tensor()).unwrap())));
                all.extend(bias.map(|b| values(grads.get(b).unwrap())));
                all
            };
            for transposed in [false, true] {
                assert_eq!(run(true, transposed), run(false, transposed), "bias {}", bias.is_some());
            }
        }
    }

    #[test]
    fn gelu_linear_equals_gelu_then_linear_bit_for_bit_in_both_passes() {
        // [2, 3, 37] activations with a spread that reaches every branch of erf, f32 and bf16
        // products, with and without a bias; the output and the gradients of x, W and b.
        let (x, w, b, r) = linear_inputs(3.0);
        let values =
            |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for bias in [Some(b.as_tensor()), None] {
                let run = |fused: bool| {
                    let xs = x.as_tensor().to_dtype(dtype).unwrap();
                    let out = match fused {
                        true => gelu_linear(&xs, w.as_tensor(), bias, dtype).unwrap(),
                        false => linear(&gelu_erf(&xs).unwrap(), w.as_tensor(), bias, dtype).unwrap(),
                    };
                    let loss = (out.to_dtype(DType::F32).unwrap() * &r).unwrap().sum_all().unwrap();
                    let grads = loss.backward().unwrap();
                    let mut all = vec![values(&out)];
                    all.extend([&x, &w].map(|v| values(grads.get(v.as_tensor()).unwrap())));
                    all.extend(bias.map(|b| values(grads.get(b).unwrap())));
                    all
                };
                assert_eq!(run(true), run(false), "{dtype:?}, bias {}", bias.is_some());
            }
        }
    }

    #[test]
    fn attention_equals_the_tensor_op_composition_in_both_passes() {
        // A toy size, and the sizes of a ViT's 56 px and 120 px views (50 and 226 tokens, heads
        // of 16): the per-head CPU kernel against DINO's composition, f32 and bf16, with f32 and
        // bf16 qkv (bf16 products from bf16 activations, as the model runs them).
        for (b, n, h, d) in [(2, 7, 3, 4), (3, 50, 3, 16), (2, 226, 3, 16)] {
            for (qkv_dtype, dtype) in
                [(DType::F32, DType::F32), (DType::F32, DType::BF16), (DType::BF16, DType::BF16)]
            {
                attention_case((b, n, h, d), qkv_dtype, dtype);
            }
        }
    }

    fn attention_case((b, n, h, d): (usize, usize, usize, usize), qkv_dtype: DType, dtype: DType) {
        let dev = Device::Cpu;
        let qkv = Var::randn(0f32, 1.0, (b, n, 3 * h * d), &dev).unwrap();
        let input = qkv.as_tensor().to_dtype(qkv_dtype).unwrap();
        let r = Tensor::randn(0f32, 1.0, (b, n, h * d), &dev).unwrap().to_dtype(qkv_dtype).unwrap();
        let scale = (d as f64).powf(-0.5);
        // DINO's Attention.forward between the qkv and the proj layers.
        let composed = |dtype: DType| -> Result<Tensor> {
            let heads = input.reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
            let (q, k, v) =
                (heads.get(0)?.contiguous()?, heads.get(1)?.contiguous()?, heads.get(2)?.contiguous()?);
            let logits = matmul_in(&q.to_dtype(DType::F32)?, &k.to_dtype(DType::F32)?.t()?, dtype)?;
            let attn = softmax_last_dim(&(logits * scale)?)?;
            let out = matmul_in(&attn, &v.to_dtype(DType::F32)?, dtype)?.to_dtype(qkv_dtype)?;
            out.transpose(1, 2)?.reshape((b, n, h * d))
        };
        let case = format!("{qkv_dtype:?} qkv, {dtype:?} products, {b}x{n} tokens, {h} heads of {d}");
        let ours = attention(&input, h, scale, dtype).unwrap();
        let theirs = composed(dtype).unwrap();
        assert_eq!(ours.dtype(), qkv_dtype);
        assert_eq!(max_diff(&ours, &theirs), 0.0, "{case}: forward");
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g_ours.get(qkv.as_tensor()).unwrap(), g_theirs.get(qkv.as_tensor()).unwrap());
        assert_eq!(max_diff(a, b), 0.0, "{case}: backward");
        assert!(a.abs().unwrap().min_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{case}");
    }

    /// One pre-norm MLP block, `x + fc2(gelu(fc1(ln(x)))) * scale`, its output and gradients.
    fn mlp_block(
        x: &Var,
        weights: &[Var; 6],
        scale: Option<&Tensor>,
        matmul: DType,
    ) -> (Tensor, Vec<Tensor>) {
        let [ln_w, ln_b, w1, b1, w2, b2] = weights;
        let ln = layer_norm(ln_w.as_tensor(), ln_b.as_tensor(), matmul);
        let normed = ln.forward(x.as_tensor()).unwrap();
        let hidden =
            gelu_erf(&linear(&normed, w1.as_tensor(), Some(b1.as_tensor()), matmul).unwrap()).unwrap();
        let branch = linear(&hidden, w2.as_tensor(), Some(b2.as_tensor()), matmul).unwrap();
        assert_eq!((normed.dtype(), hidden.dtype(), branch.dtype()), (matmul, matmul, matmul));
        let out = residual(x.as_tensor(), &branch, scale).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let all = std::iter::once(x).chain(weights);
        (out, all.map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect())
    }

    #[test]
    fn bf16_activations_keep_the_stream_and_the_gradients_in_f32_close_to_the_f32_block() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Uniform values with standard deviation `std`, from the seeded stream.
        let mut randn = |shape: &[usize], std: f32| {
            let n = shape.iter().product();
            let values: Vec<f32> =
                (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 3f32.sqrt()).collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &dev).unwrap()).unwrap()
        };
        let x = randn(&[6, 16], 1.0);
        let weights = [
            randn(&[16], 1.0),
            randn(&[16], 0.1),
            randn(&[32, 16], 0.2),
            randn(&[32], 0.1),
            randn(&[16, 32], 0.2),
            randn(&[16], 0.1),
        ];
        let scale = drop_path_scale(6, 2, 0.5, &mut rng, &dev).unwrap();
        for scale in [None, scale.as_ref()] {
            let (out32, grads32) = mlp_block(&x, &weights, scale, DType::F32);
            let (out16, grads16) = mlp_block(&x, &weights, scale, DType::BF16);
            assert_eq!(out16.dtype(), DType::F32);
            let off = max_diff(&out16, &out32);
            assert!(off > 0.0 && off < 3e-2, "output off by {off}: is bf16 applied, and sound?");
            for (i, (g16, g32)) in grads16.iter().zip(&grads32).enumerate() {
                assert_eq!(g16.dtype(), DType::F32, "gradient {i}");
                let size = g32.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(max_diff(g16, g32) < 3e-2 * size, "gradient {i}: {} of {size}", max_diff(g16, g32));
            }
        }
    }

    #[test]
    fn drop_path_zeroes_whole_samples_and_rescales_the_rest() {
        let x = Tensor::zeros((64, 3, 2), DType::F32, &Device::Cpu).unwrap();
        let branch = x.ones_like().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let scale = drop_path_scale(64, 3, 0.25, &mut rng, &Device::Cpu).unwrap();
        let y: Vec<Vec<Vec<f32>>> = residual(&x, &branch, scale.as_ref()).unwrap().to_vec3().unwrap();
        let kept = y.iter().filter(|s| s.iter().flatten().all(|&v| (v - 1.0 / 0.75).abs() < 1e-6)).count();
        let dropped = y.iter().filter(|s| s.iter().flatten().all(|&v| v == 0.0)).count();
        assert_eq!(kept + dropped, 64);
        assert!((8..=28).contains(&dropped), "{dropped} of 64 dropped at rate .25");
        assert!(drop_path_scale(64, 3, 0.0, &mut rng, &Device::Cpu).unwrap().is_none());
    }
}
