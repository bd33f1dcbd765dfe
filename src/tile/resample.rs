//! Bicubic resampling as OpenCV's `cv2.resize(..., interpolation=INTER_CUBIC)` does it: Keys
//! kernel with A = -0.75, pixel centres at half-integers, source indices clamped at the border
//! (replicate). Used to bring BigEarthNet's 20 m and 60 m bands onto the 10 m grid.

/// OpenCV's cubic coefficient.
const A: f32 = -0.75;

/// The four source indices and weights for one output coordinate.
struct Taps {
    index: [usize; 4],
    weight: [f32; 4],
}

/// Taps for every output position of one axis (`src` source samples to `dst` output samples).
fn taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = (d as f64 + 0.5) * scale - 0.5;
            let i = f.floor();
            let t = (f - i) as f32;
            let i = i as isize;
            let clamp = |k: isize| k.clamp(0, src as isize - 1) as usize;
            Taps { index: [clamp(i - 1), clamp(i), clamp(i + 1), clamp(i + 2)], weight: cubic_weights(t) }
        })
        .collect()
}

/// OpenCV's `interpolateCubic` for fraction `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let w2 = ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

/// Resize a row-major `h x w` plane to `dst_h x dst_w`: rows first, then columns, as OpenCV.
pub fn resize_bicubic(src: &[f32], w: usize, h: usize, dst_w: usize, dst_h: usize) -> Vec<f32> {
    let tx = taps(w, dst_w);
    let ty = taps(h, dst_h);
    let mut rows = Vec::with_capacity(h * dst_w);
    for src_row in src.chunks_exact(w) {
        rows.extend(tx.iter().map(|t| {
            let [a, b, c, d] = t.index.map(|i| src_row[i]);
            a * t.weight[0] + b * t.weight[1] + c * t.weight[2] + d * t.weight[3]
        }));
    }
    let mut out = Vec::with_capacity(dst_h * dst_w);
    for t in &ty {
        let [r0, r1, r2, r3] = t.index.map(|i| &rows[i * dst_w..(i + 1) * dst_w]);
        let [w0, w1, w2, w3] = t.weight;
        out.extend((0..dst_w).map(|x| r0[x] * w0 + r1[x] * w1 + r2[x] * w2 + r3[x] * w3));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_interpolate_at_zero() {
        let w = cubic_weights(0.0);
        assert_eq!(w, [0.0, 1.0, 0.0, 0.0]);
        let w = cubic_weights(0.3);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn constant_plane_stays_constant() {
        let out = resize_bicubic(&[7.0; 4 * 3], 4, 3, 8, 6);
        assert!(out.iter().all(|&v| (v - 7.0).abs() < 1e-5), "{out:?}");
    }
}
