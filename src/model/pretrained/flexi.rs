//! FlexiViT's pseudo-inverse resize of a patch embedding (Beyer et al., "FlexiViT: One Model for
//! All Patch Sizes", CVPR 2023, section 3.4; big_vision `resample_patchemb`).
//!
//! With `B` the bilinear resize of a `p x p` patch to `q x q` (FlexiViT uses `jax.image.resize`,
//! which antialiases when shrinking), PI-resize picks the new kernel `w' = pinv(B^T) w`, the least
//! squares solution of `<x, w> = <B x, w'>`. Growing (`q >= p`) this holds exactly for every patch
//! `x`; shrinking (`/16 -> /8`) it holds exactly for patches in the range of `B^T` and in the least
//! squares sense otherwise. `B` is separable, so `pinv(B^T) = pinv(B1^T) (x) pinv(B1^T)` for the
//! one-axis matrix `B1`, and `w' = P w P^T` with the `q x p` matrix `P = pinv(B1^T)`.

use anyhow::{Result, bail};

/// One axis of a bilinear resize from `src` to `dst` samples as a `[dst, src]` row-major matrix:
/// half-pixel centres, a triangle filter widened by `src / dst` when shrinking (antialias, as
/// `jax.image.resize` and PyTorch's `antialias=True`), weights renormalised at the borders.
pub fn bilinear_axis(src: usize, dst: usize) -> Vec<f64> {
    let scale = dst as f64 / src as f64;
    let support = (1.0 / scale).max(1.0);
    let mut m = vec![0.0; dst * src];
    for d in 0..dst {
        let centre = (d as f64 + 0.5) / scale - 0.5;
        let row = &mut m[d * src..(d + 1) * src];
        for (j, w) in row.iter_mut().enumerate() {
            *w = (1.0 - ((j as f64 - centre) / support).abs()).max(0.0);
        }
        let sum: f64 = row.iter().sum();
        row.iter_mut().for_each(|w| *w /= sum);
    }
    m
}

/// `P = pinv(B1^T)` as a `[dst, src]` row-major matrix, for the bilinear `B1` from `src` to `dst`.
pub fn pinv_resize_axis(src: usize, dst: usize) -> Result<Vec<f64>> {
    let b = bilinear_axis(src, dst);
    let at = |r: usize, c: usize| b[r * src + c];
    if dst <= src {
        // B1^T is tall with full column rank: pinv = (B1 B1^T)^-1 B1.
        let gram = gram(dst, |i, j| (0..src).map(|k| at(i, k) * at(j, k)).sum());
        solve_spd(&gram, dst, &b, src)
    } else {
        // B1^T is wide with full row rank: pinv = B1 (B1^T B1)^-1, i.e. P^T = (B1^T B1)^-1 B1^T.
        let gram = gram(src, |i, j| (0..dst).map(|k| at(k, i) * at(k, j)).sum());
        let bt: Vec<f64> =
            (0..src).flat_map(|i| (0..dst).map(move |k| (i, k))).map(|(i, k)| at(k, i)).collect();
        let pt = solve_spd(&gram, src, &bt, dst)?;
        Ok((0..dst).flat_map(|r| (0..src).map(move |c| (r, c))).map(|(r, c)| pt[c * dst + r]).collect())
    }
}

/// Resize a convolution kernel `[n, p, p]` (row-major, `n` filters) to `[n, q, q]`: `P w P^T`.
pub fn resize_kernels(kernels: &[f32], p: usize, q: usize) -> Result<Vec<f32>> {
    let pm = pinv_resize_axis(p, q)?;
    let mut out = Vec::with_capacity(kernels.len() / (p * p) * q * q);
    for w in kernels.chunks(p * p) {
        // t = P w: [q, p]; then t P^T: [q, q].
        let t: Vec<f64> =
            (0..q * p).map(|i| (0..p).map(|k| pm[(i / p) * p + k] * w[k * p + i % p] as f64).sum()).collect();
        out.extend(
            (0..q * q).map(|i| (0..p).map(|k| t[(i / q) * p + k] * pm[(i % q) * p + k]).sum::<f64>() as f32),
        );
    }
    Ok(out)
}

/// The symmetric `n x n` matrix with entries `f(i, j)`.
fn gram(n: usize, f: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    (0..n * n).map(|i| f(i / n, i % n)).collect()
}

/// `A^-1 R` for a symmetric positive definite `A` (`n x n`) and `R` (`n x m`), by Cholesky.
fn solve_spd(a: &[f64], n: usize, r: &[f64], m: usize) -> Result<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s = a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            if i == j {
                if s <= 1e-12 {
                    bail!("the resize matrix of the patch embedding is rank-deficient");
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut x = r.to_vec();
    for col in 0..m {
        for i in 0..n {
            let s = x[i * m + col] - (0..i).map(|k| l[i * n + k] * x[k * m + col]).sum::<f64>();
            x[i * m + col] = s / l[i * n + i];
        }
        for i in (0..n).rev() {
            let s = x[i * m + col] - (i + 1..n).map(|k| l[k * n + i] * x[k * m + col]).sum::<f64>();
            x[i * m + col] = s / l[i * n + i];
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// The 2-D bilinear resize of a `p x p` patch to `q x q`: `B1 x B1^T`.
    fn resize_patch(x: &[f64], p: usize, q: usize) -> Vec<f64> {
        let b = bilinear_axis(p, q);
        let t: Vec<f64> =
            (0..q * p).map(|i| (0..p).map(|k| b[(i / p) * p + k] * x[k * p + i % p]).sum()).collect();
        (0..q * q).map(|i| (0..p).map(|k| t[(i / q) * p + k] * b[(i % q) * p + k]).sum()).collect()
    }

    fn dot(a: &[f64], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * *y as f64).sum()
    }

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f64>() - 0.5).collect()
    }

    #[test]
    fn rows_of_the_resize_sum_to_one_and_halving_averages_four_taps() {
        for (src, dst) in [(16, 8), (8, 16), (7, 3)] {
            for row in bilinear_axis(src, dst).chunks(src) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        let half = bilinear_axis(16, 8);
        assert_eq!(&half[16 * 3 + 5..16 * 3 + 9], [0.125, 0.375, 0.375, 0.125]);
    }

    /// FlexiViT's defining property: the `/q` embedding of the resized patch equals the `/p`
    /// embedding of the original, here growing 8 -> 16 (and 16 -> 24), for random patches.
    #[test]
    fn a_grown_kernel_embeds_the_resized_patch_exactly_as_the_original_kernel_embeds_the_patch() {
        for (p, q) in [(8, 16), (16, 24)] {
            let w: Vec<f32> = random(p * p, 1).into_iter().map(|v| v as f32).collect();
            let w_new = resize_kernels(&w, p, q).unwrap();
            for seed in 2..6 {
                let x = random(p * p, seed);
                let (orig, resized) = (dot(&x, &w), dot(&resize_patch(&x, p, q), &w_new));
                assert!((orig - resized).abs() < 1e-5 * orig.abs().max(1.0), "{p}->{q}: {orig} vs {resized}");
            }
        }
    }

    /// Shrinking /16 -> /8: exact for 16 x 16 patches in the range of `B^T` (`x = B^T z`), and
    /// least squares in general: the residual `B^T w' - w` is orthogonal to that range.
    #[test]
    fn a_shrunk_kernel_is_exact_on_the_range_of_the_resize_adjoint_and_least_squares_elsewhere() {
        let (p, q) = (16, 8);
        let w: Vec<f32> = random(p * p, 7).into_iter().map(|v| v as f32).collect();
        let w_new = resize_kernels(&w, p, q).unwrap();
        let b = bilinear_axis(p, q);
        // B^T z for a q x q patch z: the adjoint of resize_patch.
        let adjoint = |z: &[f64]| -> Vec<f64> {
            let t: Vec<f64> =
                (0..p * q).map(|i| (0..q).map(|k| b[k * p + i / q] * z[k * q + i % q]).sum()).collect();
            (0..p * p).map(|i| (0..q).map(|k| t[(i / p) * q + k] * b[k * p + i % p]).sum()).collect()
        };
        for seed in 8..12 {
            let x = adjoint(&random(q * q, seed));
            let (orig, resized) = (dot(&x, &w), dot(&resize_patch(&x, p, q), &w_new));
            assert!((orig - resized).abs() < 1e-5 * orig.abs().max(1.0), "{orig} vs {resized}");
        }
        let w_new64: Vec<f64> = w_new.iter().map(|&v| v as f64).collect();
        let residual: Vec<f64> = adjoint(&w_new64).iter().zip(&w).map(|(a, b)| a - *b as f64).collect();
        let projected = resize_patch(&residual, p, q);
        assert!(projected.iter().all(|v| v.abs() < 1e-6), "{projected:?}");
    }
}
