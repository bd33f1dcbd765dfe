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
    let mut rows = vec![0f32; h * dst_w];
    for (src_row, out_row) in src.chunks_exact(w).zip(rows.chunks_exact_mut(dst_w)) {
        for (o, t) in out_row.iter_mut().zip(&tx) {
            *o = (0..4).map(|k| src_row[t.index[k]] * t.weight[k]).sum();
        }
    }
    let mut out = vec![0f32; dst_h * dst_w];
    for (out_row, t) in out.chunks_exact_mut(dst_w).zip(&ty) {
        for (x, o) in out_row.iter_mut().enumerate() {
            *o = (0..4).map(|k| rows[t.index[k] * dst_w + x] * t.weight[k]).sum();
        }
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
