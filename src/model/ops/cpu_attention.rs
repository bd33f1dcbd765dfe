//! Multi-head attention on the CPU, one (image, head) at a time: gather that head's q, k and v,
//! form its `[N, N]` logits, softmax them in place and multiply by v, all in per-thread buffers
//! that stay in cache, with the images spread over rayon's pool. The composition in
//! `attention.rs` instead gathers q, k and v for the whole batch, writes the `[B, H, N, N]`
//! logits and probabilities to memory (39 MB per block for 64 images of 226 tokens) and runs each
//! head's small product as a separate multi-threaded GEMM, one after the other.
//!
//! The arithmetic is the composition's, bit for bit: every product is the same `gemm` call candle
//! makes (same sizes and strides, the same kernel; only the caller's threads differ), the softmax
//! and its backward are `cpu.rs`'s row functions, and with bf16 products every operand and product
//! is rounded to bf16 where the composition's bf16 product rounds it.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::cpu::{fused, narrow, softmax_backward_row, softmax_row};

/// The attention problem's sizes: `qkv` is `[b, n, 3 * h * d]`.
#[derive(Clone, Copy)]
struct Sizes {
    b: usize,
    n: usize,
    h: usize,
    d: usize,
}

impl Sizes {
    fn of(dims: &[usize], heads: usize) -> Option<Sizes> {
        let &[b, n, width] = dims else { return None };
        (heads > 0 && width % (3 * heads) == 0 && width > 0 && n > 0).then(|| Sizes {
            b,
            n,
            h: heads,
            d: width / (3 * heads),
        })
    }

    /// Elements of one image's `qkv` rows.
    fn qkv_image(&self) -> usize {
        self.n * 3 * self.h * self.d
    }

    /// Elements of one image's output rows (`[n, h * d]`).
    fn out_image(&self) -> usize {
        self.n * self.h * self.d
    }
}

/// Contiguous CPU elements in f32 or bf16, read as f32.
#[derive(Clone, Copy)]
enum Elems<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
}

impl<'a> Elems<'a> {
    fn of(storage: &'a CpuStorage, layout: &Layout) -> Option<Elems<'a>> {
        let (start, end) = layout.contiguous_offsets()?;
        match storage {
            CpuStorage::F32(data) => Some(Elems::F32(&data[start..end])),
            CpuStorage::BF16(data) => Some(Elems::BF16(&data[start..end])),
            _ => None,
        }
    }

    fn len(&self) -> usize {
        match self {
            Elems::F32(xs) => xs.len(),
            Elems::BF16(xs) => xs.len(),
        }
    }

    /// Elements `start..start + out.len()` as f32 into `out`.
    fn read(&self, start: usize, out: &mut [f32]) {
        let span = start..start + out.len();
        match self {
            Elems::F32(xs) => out.copy_from_slice(&xs[span]),
            Elems::BF16(xs) => {
                for (o, x) in out.iter_mut().zip(&xs[span]) {
                    *o = x.to_f32();
                }
            }
        }
    }
}

/// How products round: bf16 products see their operands and return their result rounded to bf16.
#[derive(Clone, Copy)]
struct Rounding(bool);

impl Rounding {
    fn apply(self, xs: &mut [f32]) {
        if self.0 {
            for x in xs {
                *x = bf16::from_f32(*x).to_f32();
            }
        }
    }
}

/// The forward pass for `qkv` `[B, N, 3 H d]` (contiguous, f32 or bf16): `[B, N, H d]` in qkv's
/// dtype, products in `matmul` (F32 or BF16). `None` for other inputs (the composition runs).
pub fn forward(
    qkv: &CpuStorage,
    layout: &Layout,
    heads: usize,
    scale: f64,
    matmul: DType,
) -> Option<CpuStorage> {
    let rounding = rounding(matmul)?;
    let sizes = Sizes::of(layout.dims(), heads)?;
    let qkv = Elems::of(qkv, layout)?;
    let mut out = vec![0f32; sizes.b * sizes.out_image()];
    out.par_chunks_mut(sizes.out_image()).enumerate().for_each(|(image, out)| {
        for head in 0..sizes.h {
            let at = HeadAt { qkv, sizes, image, head, scale, rounding };
            with_scratch(|s| at.forward(s, out));
        }
    });
    Some(match qkv {
        Elems::F32(_) => CpuStorage::F32(out),
        Elems::BF16(_) => CpuStorage::BF16(narrow(&out)),
    })
}

/// The backward pass: the gradient of `qkv` (same shape and dtype) from `qkv` and the output's
/// gradient `grad` `[B, N, H d]`. `None` for inputs the kernel does not take.
pub fn backward(
    qkv: &Tensor,
    grad: &Tensor,
    heads: usize,
    scale: f64,
    matmul: DType,
) -> Option<candle_core::Result<Tensor>> {
    let rounding = rounding(matmul)?;
    let sizes = Sizes::of(qkv.dims(), heads)?;
    if !qkv.device().is_cpu() || grad.dims() != [sizes.b, sizes.n, sizes.h * sizes.d] {
        return None;
    }
    let (qkv_storage, qkv_layout) = qkv.storage_and_layout();
    let (grad_storage, grad_layout) = grad.storage_and_layout();
    let (Storage::Cpu(qkv_cpu), Storage::Cpu(grad_cpu)) = (&*qkv_storage, &*grad_storage) else {
        return None;
    };
    let (qkv_elems, grad_elems) = (Elems::of(qkv_cpu, qkv_layout)?, Elems::of(grad_cpu, grad_layout)?);
    let mut out = vec![0f32; qkv_elems.len()];
    out.par_chunks_mut(sizes.qkv_image()).enumerate().for_each(|(image, out)| {
        for head in 0..sizes.h {
            let at = HeadAt { qkv: qkv_elems, sizes, image, head, scale, rounding };
            with_scratch(|s| at.backward(grad_elems, s, out));
        }
    });
    let shape = qkv.shape().clone();
    Some(match qkv_elems {
        Elems::F32(_) => Tensor::from_vec(out, shape, qkv.device()),
        Elems::BF16(_) => Tensor::from_vec(narrow(&out), shape, qkv.device()),
    })
}

fn rounding(matmul: DType) -> Option<Rounding> {
    if !fused() {
        return None;
    }
    match matmul {
        DType::F32 => Some(Rounding(false)),
        DType::BF16 => Some(Rounding(true)),
        _ => None,
    }
}

/// One thread's buffers, kept between heads and steps.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    probs: Vec<f32>,
    square: Vec<f32>,
    dq: Vec<f32>,
    dk_t: Vec<f32>,
    dv: Vec<f32>,
    row: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `f` with this thread's buffers. Nothing inside `f` runs on rayon, so it never re-enters.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// Resized to `len` (contents unspecified: every user overwrites what it reads).
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// One (image, head) of the problem: where its q, k and v sit in `qkv` and how its products round.
#[derive(Clone, Copy)]
struct HeadAt<'a> {
    qkv: Elems<'a>,
    sizes: Sizes,
    image: usize,
    head: usize,
    scale: f64,
    rounding: Rounding,
}

impl HeadAt<'_> {
    /// q (0), k (1) or v (2) as `[N, d]` into `out`, rounded as products see it.
    fn gather(&self, part: usize, out: &mut [f32]) {
        let Sizes { h, d, .. } = self.sizes;
        for (token, row) in out.chunks_mut(d).enumerate() {
            let start = self.image * self.sizes.qkv_image() + token * 3 * h * d + (part * h + self.head) * d;
            self.qkv.read(start, row);
        }
        self.rounding.apply(out);
    }

    /// q, k and v into the scratch, and the probabilities `softmax(q k^T * scale)` (the product
    /// rounded as a product, the probabilities not) into `s.probs`.
    fn probabilities(&self, s: &mut Scratch) {
        let Sizes { n, d, .. } = self.sizes;
        let (q, k, v) = (sized(&mut s.q, n * d), sized(&mut s.k, n * d), sized(&mut s.v, n * d));
        self.gather(0, q);
        self.gather(1, k);
        self.gather(2, v);
        let probs = sized(&mut s.probs, n * n);
        product(Mat::rows(q, n, d), Mat::rows(k, n, d).t(), probs);
        self.rounding.apply(probs);
        for row in probs.chunks_mut(n) {
            softmax_row(row, self.scale);
        }
    }

    /// The forward pass, written into `out` (the image's `[N, H d]` rows).
    fn forward(&self, s: &mut Scratch, out: &mut [f32]) {
        let Sizes { n, h, d, .. } = self.sizes;
        self.probabilities(s);
        let probs = &mut s.probs[..n * n];
        self.rounding.apply(probs);
        let head_out = sized(&mut s.dv, n * d);
        product(Mat::rows(probs, n, n), Mat::rows(&s.v[..n * d], n, d), head_out);
        self.rounding.apply(head_out);
        for (token, row) in head_out.chunks(d).enumerate() {
            out[token * h * d + self.head * d..][..d].copy_from_slice(row);
        }
    }

    /// The backward pass, as the composition: `p` the recomputed probabilities, `dv = p^T g`,
    /// `dp = g v^T`, `ds = softmax_backward(p, dp)`, `dq = ds k`, `dk = (q^T ds)^T`, from the output
    /// gradient `grad` into `out` (the image's `[N, 3 H d]` gradient rows).
    fn backward(&self, grad: Elems, s: &mut Scratch, out: &mut [f32]) {
        let Sizes { n, h, d, .. } = self.sizes;
        self.probabilities(s);
        let (q, k, v) = (&s.q[..n * d], &s.k[..n * d], &s.v[..n * d]);
        let g = sized(&mut s.g, n * d);
        for (token, row) in g.chunks_mut(d).enumerate() {
            grad.read(self.image * self.sizes.out_image() + token * h * d + self.head * d, row);
        }
        self.rounding.apply(g);
        let (probs, square) = (&s.probs[..n * n], sized(&mut s.square, n * n));
        let dv = sized(&mut s.dv, n * d);
        if self.rounding.0 {
            // The product sees the probabilities rounded, the softmax backward below does not.
            square.copy_from_slice(probs);
            self.rounding.apply(square);
            product(Mat::rows(square, n, n).t(), Mat::rows(g, n, d), dv);
        } else {
            product(Mat::rows(probs, n, n).t(), Mat::rows(g, n, d), dv);
        }
        self.rounding.apply(dv);
        product(Mat::rows(g, n, d), Mat::rows(v, n, d).t(), square);
        self.rounding.apply(square);
        let row = sized(&mut s.row, n);
        for (p, dp) in probs.chunks(n).zip(square.chunks_mut(n)) {
            softmax_backward_row(row, p, dp, self.scale);
            dp.copy_from_slice(row);
        }
        self.rounding.apply(square);
        let (dq, dk_t) = (sized(&mut s.dq, n * d), sized(&mut s.dk_t, d * n));
        product(Mat::rows(square, n, n), Mat::rows(k, n, d), dq);
        product(Mat::rows(q, n, d).t(), Mat::rows(square, n, n), dk_t);
        self.rounding.apply(dq);
        self.rounding.apply(dk_t);
        for token in 0..n {
            let row = &mut out[token * 3 * h * d..][..3 * h * d];
            row[self.head * d..][..d].copy_from_slice(&dq[token * d..][..d]);
            for (j, o) in row[(h + self.head) * d..][..d].iter_mut().enumerate() {
                *o = dk_t[j * n + token];
            }
            row[(2 * h + self.head) * d..][..d].copy_from_slice(&dv[token * d..][..d]);
        }
    }
}

/// A matrix read from a slice: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows x cols`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose (a view).
    fn t(self) -> Mat<'a> {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn fits(&self) -> bool {
        self.rows > 0
            && self.cols > 0
            && (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `out = a @ b` (row-major `[a.rows, b.cols]`) on this thread: the `gemm` call candle's CPU matmul
/// makes for these operands (same sizes and strides, accumulate off), without gemm's own threads.
fn product(a: Mat, b: Mat, out: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(a.fits() && b.fits() && b.rows == k && out.len() == m * n, "attention: product sizes do not fit");
    // SAFETY: `fits` and the length check above keep every index gemm reads or writes inside the
    // slices; `out` does not overlap the operands (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
