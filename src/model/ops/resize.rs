//! The bicubic resize of the positional embedding as fixed matrices, exactly PyTorch's
//! `F.interpolate(mode="bicubic", align_corners=False)`, so gradients flow through a matmul.

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
}
