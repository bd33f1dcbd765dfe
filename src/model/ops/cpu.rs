//! The CPU side of the custom ops: fused f32 loops, parallel over rows on rayon's pool (the one
//! candle's GEMM uses), each doing its op's arithmetic element for element as the chain of candle
//! kernels it replaces. Row sums and maxima go through candle's own `VecOps` (same summation
//! order), `exp` and `erf` eight at a time with candle's values (`vexp.rs`, `verf.rs`), and each intermediate
//! is rounded to f32 where the chain stored it: the results are bit-identical, while the chain's
//! passes over memory, its allocations and its single thread are gone. A sum over rows (a
//! parameter gradient) runs in parallel over columns, each column summed in row order as candle does.
//!
//! Everything here works on contiguous f32 slices; the ops fall back to the backend-generic
//! composition for other dtypes, strided inputs and other devices.

use candle_core::backend::BackendStorage;
use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::Fused;

#[cfg(test)]
thread_local! {
    /// Set by tests to run the composition of candle kernels on this thread, for comparison.
    pub(crate) static COMPOSED_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the fused kernels run (always, outside the tests that compare them with the composition).
pub(crate) fn fused() -> bool {
    #[cfg(test)]
    if COMPOSED_ONLY.with(std::cell::Cell::get) {
        return false;
    }
    true
}

impl Fused for CpuStorage {
    fn of(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(storage) => Some(storage),
            _ => None,
        }
    }

    fn layer_norm(
        (x, layout): (&Self, &Layout),
        (weight, weight_layout): (&Self, &Layout),
        (bias, bias_layout): (&Self, &Layout),
        eps: f64,
    ) -> Option<Self> {
        if !fused() {
            return None;
        }
        let (x, w, b) = (cpu_f32(x, layout)?, cpu_f32(weight, weight_layout)?, cpu_f32(bias, bias_layout)?);
        let n = *layout.dims().last()?;
        (n > 0 && w.len() == n && b.len() == n).then(|| CpuStorage::F32(layer_norm(x, w, b, eps)))
    }

    fn scaled_softmax(&self, layout: &Layout, scale: f64) -> Option<Self> {
        if !fused() {
            return None;
        }
        let (x, n) = (cpu_f32(self, layout)?, *layout.dims().last()?);
        (n > 0).then(|| CpuStorage::F32(softmax(x, n, scale)))
    }

    fn attention((qkv, layout): (&Self, &Layout), heads: usize, scale: f64, matmul: DType) -> Option<Self> {
        super::cpu_attention::forward(qkv, layout, heads, scale, matmul)
    }

    fn gelu_erf(&self, layout: &Layout) -> Option<Self> {
        if !fused() {
            return None;
        }
        match self {
            // In f32 and rounded to bf16, as PyTorch computes a bf16 GELU (candle's CPU kernel
            // evaluates erf in f64 per element, one bf16 step apart on a few values in 10^4).
            CpuStorage::BF16(data) => {
                let (start, end) = layout.contiguous_offsets()?;
                Some(CpuStorage::BF16(gelu_erf_bf16(&data[start..end])))
            }
            _ => Some(CpuStorage::F32(gelu_erf(cpu_f32(self, layout)?))),
        }
    }

    fn weight_norm((v, v_layout): (&Self, &Layout), (g, g_layout): (&Self, &Layout)) -> Option<Self> {
        if !fused() {
            return None;
        }
        let (v, g) = (cpu_f32(v, v_layout)?, cpu_f32(g, g_layout)?);
        let [weight, _, _] = weight_norm(v, g)?;
        Some(CpuStorage::F32(weight))
    }

    fn convert(&self, layout: &Layout, dtype: DType) -> Option<Self> {
        if !fused() {
            return None;
        }
        let (start, end) = layout.contiguous_offsets()?;
        match (self, dtype) {
            (CpuStorage::F32(data), DType::BF16) => Some(CpuStorage::BF16(narrow(&data[start..end]))),
            (CpuStorage::BF16(data), DType::F32) => Some(CpuStorage::F32(widen(&data[start..end]))),
            _ => None,
        }
    }

    fn matmul_bf16(
        (a, a_layout): (&Self, &Layout),
        (b, b_layout): (&Self, &Layout),
        bmnk: (usize, usize, usize, usize),
    ) -> Option<candle_core::Result<Self>> {
        if !fused() {
            return None;
        }
        let (a, a_layout) = rounded_to_bf16(a, a_layout)?;
        let (b, b_layout) = rounded_to_bf16(b, b_layout)?;
        let product = CpuStorage::F32(a).matmul(&CpuStorage::F32(b), bmnk, &a_layout, &b_layout);
        Some(product.and_then(|product| match product {
            CpuStorage::F32(data) => Ok(CpuStorage::BF16(narrow(&data))),
            _ => candle_core::bail!("matmul: an f32 product came back in another dtype"),
        }))
    }

    fn add_bias(ys: &mut Self, (bias, bias_layout): (&Self, &Layout)) -> Option<()> {
        if !fused() {
            return None;
        }
        let (start, end) = bias_layout.contiguous_offsets()?;
        match (ys, bias) {
            (CpuStorage::F32(ys), CpuStorage::F32(bias)) => add_rows(ys, &bias[start..end], |y, b| y + b),
            (CpuStorage::BF16(ys), CpuStorage::BF16(bias)) => add_rows(ys, &bias[start..end], |y, b| y + b),
            _ => None,
        }
    }

    fn residual(
        (xs, xs_layout): (&Self, &Layout),
        (branch, branch_layout): (&Self, &Layout),
        scale: Option<(&Self, &Layout)>,
    ) -> Option<Self> {
        if !fused() {
            return None;
        }
        let xs = cpu_f32(xs, xs_layout)?;
        let scale = match scale {
            Some((scale, layout)) => Some(cpu_f32(scale, layout)?),
            None => None,
        };
        let (start, end) = branch_layout.contiguous_offsets()?;
        let out = match branch {
            CpuStorage::F32(branch) => residual(xs, &branch[start..end], scale, |v| v),
            CpuStorage::BF16(branch) => residual(xs, &branch[start..end], scale, bf16::to_f32),
            _ => return None,
        }?;
        Some(CpuStorage::F32(out))
    }
}

/// `[W, ||v||, g / ||v||]` for `v` `[K, d]` and `g` `[K]`: per row the sum of squares (candle's
/// `sqr` then `sum_keepdim`), its square root, the gain `g / norm` and `W = v * gain`, in
/// parallel over rows. `None` when the sizes do not fit.
pub fn weight_norm(v: &[f32], g: &[f32]) -> Option<[Vec<f32>; 3]> {
    let k = g.len();
    if k == 0 || v.len() % k != 0 || v.is_empty() {
        return None;
    }
    let d = v.len() / k;
    let (mut weight, mut norm, mut gain) = (vec![0f32; v.len()], vec![0f32; k], vec![0f32; k]);
    let rows = rows_per_task(d);
    let outs = weight.par_chunks_mut(rows * d).zip(norm.par_chunks_mut(rows).zip(gain.par_chunks_mut(rows)));
    outs.zip(v.par_chunks(rows * d).zip(g.par_chunks(rows))).for_each(|((w, (norm, gain)), (v, g))| {
        let mut squares = vec![0f32; d];
        for (((w, v), (norm, gain)), &g) in
            w.chunks_mut(d).zip(v.chunks(d)).zip(norm.iter_mut().zip(gain)).zip(g)
        {
            for (s, &x) in squares.iter_mut().zip(v) {
                *s = x * x;
            }
            *norm = row_sum(&squares).sqrt();
            *gain = g / *norm;
            for (w, &x) in w.iter_mut().zip(v) {
                *w = x * *gain;
            }
        }
    });
    Some([weight, norm, gain])
}

/// The weight-normed layer's parameter gradients `[dv, dg]` from `v` `[K, d]`, `g` `[K]`, the
/// product's `dW^T` `[d, K]` and the forward's `norm` and `gain`, per row as candle's backward of
/// the composition: `dr = sum(dW v)`, `dg = dr / n`, `dn = -(dr g / n^2)`, `s = (dn / n) * 0.5`,
/// `dv = dW gain + (v s) * 2`. Parallel over blocks of rows, each gathering its rows of `dW`
/// from `dW^T` a cache line at a time. `None` when the sizes do not fit.
pub fn weight_norm_backward(
    v: &[f32],
    g: &[f32],
    grad_weight_t: &[f32],
    norm: &[f32],
    gain: &[f32],
) -> Option<[Vec<f32>; 2]> {
    const BLOCK: usize = 16;
    let k = g.len();
    if k == 0 || v.len() % k != 0 || grad_weight_t.len() != v.len() || norm.len() != k || gain.len() != k {
        return None;
    }
    let d = v.len() / k;
    let (mut dv, mut dg) = (vec![0f32; v.len()], vec![0f32; k]);
    dv.par_chunks_mut(BLOCK * d).zip(dg.par_chunks_mut(BLOCK)).enumerate().for_each(|(block, (dv, dg))| {
        let (first, rows) = (block * BLOCK, dg.len());
        let mut gw = vec![0f32; rows * d];
        for j in 0..d {
            for (r, &x) in grad_weight_t[j * k + first..j * k + first + rows].iter().enumerate() {
                gw[r * d + j] = x;
            }
        }
        let mut products = vec![0f32; d];
        for (r, (dv, gw)) in dv.chunks_mut(d).zip(gw.chunks(d)).enumerate() {
            let row = first + r;
            let (v, n) = (&v[row * d..(row + 1) * d], norm[row]);
            for ((p, &a), &b) in products.iter_mut().zip(gw).zip(v) {
                *p = a * b;
            }
            let grad_gain = row_sum(&products);
            dg[r] = grad_gain / n;
            let grad_norm = -((grad_gain * g[row]) / (n * n));
            let grad_sum_sq = affine(grad_norm / n, 0.5, 0.0);
            for ((o, &a), &x) in dv.iter_mut().zip(gw).zip(v) {
                *o = a * gain[row] + affine(x * grad_sum_sq, 2.0, 0.0);
            }
        }
    });
    Some([dv, dg])
}

/// f32 values rounded to bf16 (candle's `to_dtype`: `bf16::from_f32`), in parallel.
pub(crate) fn narrow(xs: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; xs.len()];
    out.par_chunks_mut(GRAIN).zip(xs.par_chunks(GRAIN)).for_each(|(out, xs)| narrow_into(out, xs));
    out
}

fn narrow_into(out: &mut [bf16], xs: &[f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = bf16::from_bits(bf16_bits(x));
    }
}

/// bf16 values widened to f32, in parallel.
fn widen(xs: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(GRAIN).zip(xs.par_chunks(GRAIN)).for_each(|(out, xs)| widen_into(out, xs));
    out
}

fn widen_into(out: &mut [f32], xs: &[bf16]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = f32::from_bits(u32::from(x.to_bits()) << 16);
    }
}

/// The bits of `bf16::from_f32(x)` (round to nearest even, NaN kept and made quiet) without
/// branches, so that loops over slices vectorise.
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    let round_up = bits & 0x8000 != 0 && bits & 0x1_7fff != 0;
    let rounded = (bits >> 16) + u32::from(round_up);
    (if nan { (bits >> 16) | 0x40 } else { rounded }) as u16
}

/// The f32 values of a product operand rounded to bf16, as f32 (exactly what candle's bf16
/// product multiplies), with the layout to read them: the operand's strides over the elements it
/// spans, copied. `None` for another dtype or negative strides.
fn rounded_to_bf16(storage: &CpuStorage, layout: &Layout) -> Option<(Vec<f32>, Layout)> {
    let start = layout.start_offset();
    let last = layout.dims().iter().zip(layout.stride()).map(|(&d, &s)| d.checked_sub(1).map(|d| d * s));
    let end = start + last.sum::<Option<usize>>()? + 1;
    let values = match storage {
        CpuStorage::F32(data) => {
            let data = data.get(start..end)?;
            let mut out = vec![0f32; data.len()];
            out.par_chunks_mut(GRAIN).zip(data.par_chunks(GRAIN)).for_each(|(out, xs)| {
                for (o, &x) in out.iter_mut().zip(xs) {
                    *o = f32::from_bits(u32::from(bf16_bits(x)) << 16);
                }
            });
            out
        }
        CpuStorage::BF16(data) => widen(data.get(start..end)?),
        _ => return None,
    };
    Some((values, Layout::new(layout.shape().clone(), layout.stride().to_vec(), 0)))
}

/// `y = f(y, bias[column])` over the rows of `ys` (`[rows, bias.len()]`), in parallel over rows.
fn add_rows<T: Copy + Send + Sync>(ys: &mut [T], bias: &[T], f: impl Fn(T, T) -> T + Sync) -> Option<()> {
    let n = bias.len();
    if n == 0 || ys.len() % n != 0 {
        return None;
    }
    ys.par_chunks_mut(rows_per_task(n) * n).for_each(|ys| {
        for row in ys.chunks_mut(n) {
            for (y, &b) in row.iter_mut().zip(bias) {
                *y = f(*y, b);
            }
        }
    });
    Some(())
}

/// `xs + f32(branch) * scale[sample]` (or without the factor), samples of equal size along the
/// first dim, in parallel.
fn residual<T: Copy + Sync>(
    xs: &[f32],
    branch: &[T],
    scale: Option<&[f32]>,
    to_f32: impl Fn(T) -> f32 + Sync,
) -> Option<Vec<f32>> {
    if branch.len() != xs.len() {
        return None;
    }
    let per_sample = match scale {
        Some(scale) if !scale.is_empty() && xs.len() % scale.len() == 0 => xs.len() / scale.len(),
        Some(_) => return None,
        // No factor: any chunking will do.
        None => GRAIN,
    };
    let mut out = vec![0f32; xs.len()];
    let chunk = rows_per_task(per_sample) * per_sample;
    let chunks = out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk).zip(branch.par_chunks(chunk)));
    chunks.enumerate().for_each(|(c, (out, (xs, branch)))| {
        let samples = out.chunks_mut(per_sample).zip(xs.chunks(per_sample).zip(branch.chunks(per_sample)));
        for (i, (out, (xs, branch))) in samples.enumerate() {
            let factor = scale.map(|s| s[c * chunk / per_sample + i]);
            for ((o, &x), &b) in out.iter_mut().zip(xs).zip(branch) {
                *o = match factor {
                    Some(f) => x + to_f32(b) * f,
                    None => x + to_f32(b),
                };
            }
        }
    });
    Some(out)
}

/// `t` in `dtype`, converted in parallel, for contiguous f32 and bf16 CPU tensors (detached);
/// `None` otherwise.
pub fn to_dtype(t: &Tensor, dtype: DType) -> Option<candle_core::Result<Tensor>> {
    if !fused() || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { return None };
    let (start, end) = layout.contiguous_offsets()?;
    Some(match (storage, dtype) {
        (CpuStorage::F32(data), DType::BF16) => {
            Tensor::from_vec(narrow(&data[start..end]), t.shape(), t.device())
        }
        (CpuStorage::BF16(data), DType::F32) => {
            Tensor::from_vec(widen(&data[start..end]), t.shape(), t.device())
        }
        _ => return None,
    })
}

/// Elements per parallel task: below this, handing work to another thread costs more than it saves.
pub(crate) const GRAIN: usize = 1 << 14;

/// Rows of length `n` per parallel task.
fn rows_per_task(n: usize) -> usize {
    (GRAIN / n.max(1)).max(1)
}

/// candle's `sum_keepdim` over a contiguous last dim.
fn row_sum(row: &[f32]) -> f32 {
    let mut sum = 0.0;
    // SAFETY: `row.len()` elements are readable from `row.as_ptr()`.
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, row.len()) };
    sum
}

/// candle's `max_keepdim` over a contiguous last dim (`row` non-empty): the first element, replaced
/// by each later one that compares greater.
fn row_max(row: &[f32]) -> f32 {
    row.iter().fold(row[0], |max, &v| if max < v { v } else { max })
}

/// candle's `affine(mul, add)` on one f32 value: both constants rounded to f32 first.
pub(crate) fn affine(v: f32, mul: f64, add: f64) -> f32 {
    v * mul as f32 + add as f32
}

/// `mean_keepdim` of a row as candle computes it: the sum, then `affine(1 / n, 0)`.
fn row_mean(row: &[f32]) -> f32 {
    affine(row_sum(row), 1.0 / row.len() as f64, 0.0)
}

/// The sums over rows of `[rows, n]` matrices (`sum(0)`), each column added in row order from 0,
/// as candle's reduction does; parallel over blocks of columns.
fn column_sums<const K: usize>(xs: [&[f32]; K], n: usize) -> [Vec<f32>; K] {
    let block = n.clamp(1, 64);
    xs.map(|x| {
        let mut sum = vec![0f32; n];
        sum.par_chunks_mut(block).enumerate().for_each(|(b, acc)| {
            let columns = b * block..b * block + acc.len();
            for row in x.chunks(n) {
                for (a, &v) in acc.iter_mut().zip(&row[columns.clone()]) {
                    *a += v;
                }
            }
        });
        sum
    })
}

/// The sum over the rows of a `[rows, n]` matrix (`sum(0)`), each column in row order.
pub fn column_sum(x: &[f32], n: usize) -> Vec<f32> {
    let [sum] = column_sums([x], n);
    sum
}

/// LayerNorm's forward pass (`LayerNormOp::forward`): per row of length `w.len()`,
/// `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f32> {
    let n = w.len();
    let chunk = rows_per_task(n) * n;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| {
        let mut squares = vec![0f32; n];
        for (out, x) in out.chunks_mut(n).zip(x.chunks(n)) {
            let mean = row_mean(x);
            for ((o, s), &v) in out.iter_mut().zip(&mut squares).zip(x) {
                *o = v - mean;
                *s = *o * *o;
            }
            let std = affine(row_mean(&squares), 1.0, eps).sqrt();
            for ((o, &w), &b) in out.iter_mut().zip(w).zip(b) {
                *o = *o / std * w + b;
            }
        }
    });
    out
}

/// LayerNorm's backward pass (`LayerNormOp::bwd`): `[dx, dw, db]` from the input, the weight and
/// the output gradient: with `n = (x - mean) rstd` and `g = grad w`,
/// `dx = ((g - mean(g)) - n mean(g n)) rstd`, `dw = sum_rows(grad n)`, `db = sum_rows(grad)`.
pub fn layer_norm_backward(x: &[f32], w: &[f32], grad: &[f32], eps: f64) -> [Vec<f32>; 3] {
    let n = w.len();
    let chunk = rows_per_task(n) * n;
    let (mut dx, mut grad_normed) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    let outs = dx.par_chunks_mut(chunk).zip(grad_normed.par_chunks_mut(chunk));
    outs.zip(x.par_chunks(chunk).zip(grad.par_chunks(chunk))).for_each(|((dx, gn), (x, grad))| {
        let (mut normed, mut g, mut scratch) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let rows = dx.chunks_mut(n).zip(gn.chunks_mut(n)).zip(x.chunks(n).zip(grad.chunks(n)));
        for ((dx, gn), (x, grad)) in rows {
            let mean = row_mean(x);
            for ((c, s), &v) in normed.iter_mut().zip(&mut scratch).zip(x) {
                *c = v - mean;
                *s = *c * *c;
            }
            let rstd = affine(row_mean(&scratch), 1.0, eps).sqrt().recip();
            for (((c, gn), (gi, s)), (&gr, &w)) in normed
                .iter_mut()
                .zip(gn.iter_mut())
                .zip(g.iter_mut().zip(&mut scratch))
                .zip(grad.iter().zip(w))
            {
                *c *= rstd;
                *gn = gr * *c;
                *gi = gr * w;
                *s = *gi * *c;
            }
            let (mean_g, mean_gn) = (row_mean(&g), row_mean(&scratch));
            for ((d, &gi), &c) in dx.iter_mut().zip(&g).zip(&normed) {
                *d = ((gi - mean_g) - c * mean_gn) * rstd;
            }
        }
    });
    let [dw, db] = column_sums([&grad_normed, grad], n);
    [dx, dw, db]
}

/// Softmax over rows of length `n` of `x * scale` (see [`softmax_row`]), in parallel over rows.
pub fn softmax(x: &[f32], n: usize, scale: f64) -> Vec<f32> {
    let chunk = rows_per_task(n) * n;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| {
        for (out, x) in out.chunks_mut(n).zip(x.chunks(n)) {
            out.copy_from_slice(x);
            softmax_row(out, scale);
        }
    });
    out
}

/// One row of softmax of `x * scale`, in place (`affine(scale, 0)` first, as attention scales its
/// logits; `scale` 1 for a plain softmax: `x * 1 + 0` is `x`): `exp(z - max) / sum(exp(z - max))`.
pub(crate) fn softmax_row(row: &mut [f32], scale: f64) {
    for o in row.iter_mut() {
        *o = affine(*o, scale, 0.0);
    }
    let max = row_max(row);
    super::vexp::exp_shifted(row, max);
    let sum = row_sum(row);
    for o in row.iter_mut() {
        *o /= sum;
    }
}

/// Softmax's backward pass for rows of length `n` (see [`softmax_backward_row`]), in parallel.
pub fn softmax_backward(y: &[f32], grad: &[f32], n: usize, scale: f64) -> Vec<f32> {
    let chunk = rows_per_task(n) * n;
    let mut out = vec![0f32; y.len()];
    let ins = y.par_chunks(chunk).zip(grad.par_chunks(chunk));
    out.par_chunks_mut(chunk).zip(ins).for_each(|(out, (y, grad))| {
        for (out, (y, grad)) in out.chunks_mut(n).zip(y.chunks(n).zip(grad.chunks(n))) {
            softmax_backward_row(out, y, grad, scale);
        }
    });
    out
}

/// One row of softmax's backward pass into `out`: `(g - sum(g y)) y`, then `affine(scale, 0)`
/// (attention's logit scale; 1 for a plain softmax).
pub(crate) fn softmax_backward_row(out: &mut [f32], y: &[f32], grad: &[f32], scale: f64) {
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(grad) {
        *o = g * y;
    }
    let dot = row_sum(out);
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(grad) {
        *o = (g - dot) * y;
    }
    if scale != 1.0 {
        for o in out.iter_mut() {
            *o = affine(*o, scale, 0.0);
        }
    }
}

/// Log-softmax over rows of length `n` of `x * scale` (the affine left out at scale 1), as the
/// composition computes it: `z - max`, `exp`, the row sum, its `ln`, the difference.
pub fn log_softmax(x: &[f32], n: usize, scale: f64) -> Vec<f32> {
    let chunk = rows_per_task(n) * n;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| {
        let mut exp = vec![0f32; n];
        for (out, x) in out.chunks_mut(n).zip(x.chunks(n)) {
            let log_sum = shifted_and_exp(x, scale, out, &mut exp).ln();
            for o in out.iter_mut() {
                *o -= log_sum;
            }
        }
    });
    out
}

/// The composition's backward of [`log_softmax`] from its input and the output gradient `g`: the
/// log's `-sum(g) / s` spread over the row times `exp(z - max)`, plus `g`, then the affine's
/// `scale`; each gradient accumulated onto candle's zeros (`0 + ...`) as its backward pass does.
pub fn log_softmax_backward(x: &[f32], grad: &[f32], n: usize, scale: f64) -> Vec<f32> {
    let chunk = rows_per_task(n) * n;
    let mut out = vec![0f32; x.len()];
    let ins = x.par_chunks(chunk).zip(grad.par_chunks(chunk));
    out.par_chunks_mut(chunk).zip(ins).for_each(|(out, (x, grad))| {
        let (mut exp, mut negated) = (vec![0f32; n], vec![0f32; n]);
        for (out, (x, grad)) in out.chunks_mut(n).zip(x.chunks(n).zip(grad.chunks(n))) {
            let sum = shifted_and_exp(x, scale, out, &mut exp);
            for (m, &g) in negated.iter_mut().zip(grad) {
                *m = 0.0 - g;
            }
            let grad_sum = 0.0 + row_sum(&negated) / sum;
            for ((o, &e), &g) in out.iter_mut().zip(&exp).zip(grad) {
                let shifted = (0.0 + g) + grad_sum * e;
                *o = if scale == 1.0 { 0.0 + shifted } else { 0.0 + affine(shifted, scale, 0.0) };
            }
        }
    });
    out
}

/// One row of log-softmax's shared part: `shifted = z - max(z)` into `shifted`, `exp(shifted)`
/// into `exp`; returns the sum of the exponentials.
fn shifted_and_exp(x: &[f32], scale: f64, shifted: &mut [f32], exp: &mut [f32]) -> f32 {
    for (s, &v) in shifted.iter_mut().zip(x) {
        *s = if scale == 1.0 { v } else { affine(v, scale, 0.0) };
    }
    let max = row_max(shifted);
    for s in shifted.iter_mut() {
        *s -= max;
    }
    exp.copy_from_slice(shifted);
    super::vexp::exp_shifted(exp, 0.0);
    row_sum(exp)
}

/// Exact GELU element-wise (candle's `gelu_erf` kernel, `(erf(x / sqrt 2) + 1) * 0.5 * x`), `erf`
/// eight at a time.
pub fn gelu_erf(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(GRAIN).zip(x.par_chunks(GRAIN)).for_each(|(out, x)| gelu_erf_into(out, x));
    out
}

/// Exact GELU of bf16 values computed in f32 ([`gelu_erf`]), rounded to bf16.
fn gelu_erf_bf16(x: &[bf16]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    out.par_chunks_mut(GRAIN).zip(x.par_chunks(GRAIN)).for_each(|(out, x)| {
        let mut wide = vec![0f32; x.len()];
        widen_into(&mut wide, x);
        let mut ys = vec![0f32; x.len()];
        gelu_erf_into(&mut ys, &wide);
        narrow_into(out, &ys);
    });
    out
}

/// [`gelu_erf`] of one chunk, into `out`.
fn gelu_erf_into(out: &mut [f32], x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * std::f32::consts::FRAC_1_SQRT_2;
    }
    super::verf::erf(out);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (*o + 1.0) * 0.5 * v;
    }
}

/// GELU's backward pass (`GeluErf::bwd` in f32): `g * (0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x / sqrt 2))`,
/// rounded step by step as the composition of tensor ops; `exp` and `erf` eight at a time.
pub fn gelu_erf_backward(x: &[f32], grad: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let ins = x.par_chunks(GRAIN).zip(grad.par_chunks(GRAIN));
    out.par_chunks_mut(GRAIN).zip(ins).for_each(|(out, (x, grad))| {
        let mut exp: Vec<f32> = x.iter().map(|&x| affine(-(x * x), 1.0 / 2.0, 0.0)).collect();
        super::vexp::exp_shifted(&mut exp, 0.0);
        for (o, &x) in out.iter_mut().zip(x) {
            *o = affine(x, 1.0 / 2f64.sqrt(), 0.0);
        }
        super::verf::erf(out);
        for ((o, &x), (&g, &exp)) in out.iter_mut().zip(x).zip(grad.iter().zip(&exp)) {
            let scaled_exp_arg = affine(exp, 0.398942, 0.0) * x;
            let erf_scaled_sqrt = affine(*o, 0.5, 0.0);
            let derivative = affine(scaled_exp_arg, 1.0, 0.5) + erf_scaled_sqrt;
            *o = g * derivative;
        }
    });
    out
}

/// A batch of images `[B, C, H, W]` cut into `p x p` patches as `[B * gh * gw, C * p * p]`
/// (`gh = H / p`, `gw = W / p`, the rest of each image left out): rows in (image, row, column)
/// order, each row in (channel, y, x) order, what `reshape`, `permute` and `contiguous` produce,
/// in parallel over rows. `None` for tensors that need gradients or are not contiguous f32 CPU
/// tensors (the composition runs).
pub fn patchify(xs: &Tensor, p: usize) -> Option<candle_core::Result<Tensor>> {
    let (b, c, h, w) = xs.dims4().ok()?;
    let (gh, gw) = (h / p, w / p);
    if xs.track_op() || p == 0 {
        return None;
    }
    let out = with_f32([xs], |[x]| {
        let mut out = vec![0f32; b * gh * gw * c * p * p];
        out.par_chunks_mut(c * p * p).enumerate().for_each(|(row, out)| {
            let (image, gy, gx) = (row / (gh * gw), row / gw % gh, row % gw);
            for (run, out) in out.chunks_exact_mut(p).enumerate() {
                let (channel, y) = (run / p, gy * p + run % p);
                let start = ((image * c + channel) * h + y) * w + gx * p;
                copy_run(out, &x[start..start + p]);
            }
        });
        out
    })?;
    Some(Tensor::from_vec(out, (b * gh * gw, c * p * p), xs.device()))
}

/// `out.copy_from_slice(x)`, inlined for the usual patch sizes (a library call per 8 values
/// costs more than the copy).
fn copy_run(out: &mut [f32], x: &[f32]) {
    if let (Ok(out), Ok(x)) = (<&mut [f32; 8]>::try_from(&mut *out), <&[f32; 8]>::try_from(x)) {
        *out = *x;
        return;
    }
    if let (Ok(out), Ok(x)) = (<&mut [f32; 16]>::try_from(&mut *out), <&[f32; 16]>::try_from(x)) {
        *out = *x;
        return;
    }
    out.copy_from_slice(x);
}

/// The contiguous f32 data of `tensors` on the CPU, handed to `f`; `None` (and `f` not called)
/// when one is on another device, in another dtype or strided.
pub fn with_f32<const K: usize, R>(tensors: [&Tensor; K], f: impl FnOnce([&[f32]; K]) -> R) -> Option<R> {
    if !fused() || tensors.iter().any(|t| !t.device().is_cpu() || t.dtype() != DType::F32) {
        return None;
    }
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices = [&[][..]; K];
    for (slice, (storage, layout)) in slices.iter_mut().zip(&guards) {
        *slice = contiguous_f32(storage, layout)?;
    }
    Some(f(slices))
}

/// The elements of a contiguous f32 CPU storage under `layout`.
fn contiguous_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(storage) => cpu_f32(storage, layout),
        _ => None,
    }
}

/// The f32 elements of a CPU storage under a contiguous layout (for custom ops' `cpu_fwd`).
pub(crate) fn contiguous_cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    if fused() { cpu_f32(storage, layout) } else { None }
}

/// The f32 elements of a CPU storage under a contiguous layout.
fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => {
            let (start, end) = layout.contiguous_offsets()?;
            Some(&data[start..end])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_equals_reshape_permute_contiguous() {
        // Patch sizes 8 and 16 (the inlined copies) and 5, images whose sides are not multiples.
        for (p, (b, c, h, w)) in [(8, (2, 3, 20, 17)), (16, (1, 2, 33, 40)), (5, (2, 1, 11, 10))] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &candle_core::Device::Cpu).unwrap();
            let ours = patchify(&x, p).unwrap().unwrap();
            let (gh, gw) = (h / p, w / p);
            let cropped = x.narrow(2, 0, gh * p).unwrap().narrow(3, 0, gw * p).unwrap();
            let theirs = cropped.reshape((b, c, gh, p, gw, p)).unwrap().permute((0, 2, 4, 1, 3, 5)).unwrap();
            let theirs = theirs.contiguous().unwrap().reshape((b * gh * gw, c * p * p)).unwrap();
            assert_eq!(ours.to_vec2::<f32>().unwrap(), theirs.to_vec2::<f32>().unwrap(), "patch {p}");
        }
    }

    #[test]
    fn bf16_conversions_equal_the_half_crates() {
        // Every 4099th bit pattern, the rounding ties around 1, NaNs and infinities.
        let ties = (0x3f80_7ff0..0x3f81_8010).map(f32::from_bits);
        let special = [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::INFINITY, f32::NEG_INFINITY];
        let xs: Vec<f32> =
            (0..=u32::MAX).step_by(4099).map(f32::from_bits).chain(ties).chain(special).collect();
        let ours = narrow(&xs);
        for (x, y) in xs.iter().zip(&ours) {
            assert_eq!(y.to_bits(), bf16::from_f32(*x).to_bits(), "{x:e}");
        }
        let wide = widen(&ours);
        for (y, w) in ours.iter().zip(&wide) {
            assert_eq!(w.to_bits(), y.to_f32().to_bits());
        }
        let storage = CpuStorage::F32(xs.clone());
        let (rounded, _) = rounded_to_bf16(&storage, &Layout::contiguous(xs.len())).unwrap();
        assert_eq!(
            rounded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn column_sums_add_each_column_in_row_order() {
        // 1e8 + 1 - 1e8 is 0 in f32 from the top, 1 in another order.
        let x = [1e8f32, 1.0, 1.0, 2.0, -1e8, 3.0];
        let [sums] = column_sums([&x], 2);
        assert_eq!(sums, vec![0.0, 6.0]);
    }
}
