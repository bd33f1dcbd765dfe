//! The update's element-wise work on the CPU as in-place passes: AdamW's moments and parameter
//! step and the teacher's EMA each overwrite their tensor in one multi-threaded pass over the f32
//! buffer (candle's `InplaceOp2`/`InplaceOp3`), where the composition of tensor ops runs about ten
//! kernels per tensor, each allocating and filling a fresh buffer of the tensor's size (27 M
//! parameters for ViT-tiny with K = 65536: page faults and single-threaded passes).
//!
//! The closures do the composition's arithmetic element for element (`affine` as candle rounds its
//! constants), so the results are bit-identical. Only contiguous f32 tensors on the CPU take this
//! path ([`applies`]); the callers keep the composition for every other case (CUDA included).

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::model::ops::cpu::{GRAIN, fused};

/// Whether `tensors` are all contiguous f32 tensors on the CPU of one shape.
pub fn applies(tensors: &[&Tensor]) -> bool {
    fused()
        && tensors.iter().all(|t| {
            t.device().is_cpu()
                && t.dtype() == DType::F32
                && t.is_contiguous()
                && t.dims() == tensors[0].dims()
        })
}

/// `dst = f(dst, a)` element-wise, in place (see [`applies`] for what the tensors must be).
pub fn update_with(dst: &Tensor, a: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<()> {
    dst.inplace_op2(a, &Pass(f))
}

/// `dst = f(dst, a, b)` element-wise, in place (see [`applies`]).
pub fn update_with2(
    dst: &Tensor,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Result<()> {
    dst.inplace_op3(a, b, &Pass(f))
}

/// An element-wise closure as an in-place op.
struct Pass<F>(F);

/// The f32 elements of a contiguous storage, for writing.
fn slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("in-place update: expected a contiguous f32 tensor"),
    }
}

/// The f32 elements of a contiguous storage, `len` of them.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) if end - start == len => Ok(&data[start..end]),
        _ => candle_core::bail!("in-place update: expected a contiguous f32 tensor of {len} elements"),
    }
}

impl<F: Fn(f32, f32) -> f32 + Sync> InplaceOp2 for Pass<F> {
    fn name(&self) -> &'static str {
        "in-place-update"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, a: &CpuStorage, a_l: &Layout) -> Result<()> {
        let dst = slice_mut(dst, dst_l)?;
        let a = slice(a, a_l, dst.len())?;
        dst.par_chunks_mut(GRAIN).zip(a.par_chunks(GRAIN)).for_each(|(dst, a)| {
            for (d, &a) in dst.iter_mut().zip(a) {
                *d = (self.0)(*d, a);
            }
        });
        Ok(())
    }
}

impl<F: Fn(f32, f32, f32) -> f32 + Sync> InplaceOp3 for Pass<F> {
    fn name(&self) -> &'static str {
        "in-place-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<()> {
        let dst = slice_mut(dst, dst_l)?;
        let (a, b) = (slice(a, a_l, dst.len())?, slice(b, b_l, dst.len())?);
        let ins = a.par_chunks(GRAIN).zip(b.par_chunks(GRAIN));
        dst.par_chunks_mut(GRAIN).zip(ins).for_each(|(dst, (a, b))| {
            for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                *d = (self.0)(*d, a, b);
            }
        });
        Ok(())
    }
}
