//! The single augmentation operations, each with OpenCV's semantics, on planar `[C, H, W]` images.
//!
//! These run the views in the reference order (flip, warp, crop, resize, blur, solarize,
//! normalize), one full image per step. They are the ground truth the unit tests compare with
//! OpenCV fixtures, and the `TwoStep` path of the augmenter; the fast path (`resample.rs`) fuses
//! flip, shift-scale-rotate and the resized crop into one resampling and reuses the blur, solarize
//! and normalize steps from here.

use crate::tile::BandStats;

/// A planar `[C, H, W]` f32 image (not necessarily square).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Row-major `[C, H, W]` values.
    pub data: Vec<f32>,
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl Image {
    /// An image of zeros.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Image {
        Image { data: vec![0.0; channels * height * width], channels, height, width }
    }

    /// The `H * W` values of channel `c`.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }
}

/// A crop rectangle in pixels: columns `x..x + width`, rows `y..y + height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First column.
    pub x: usize,
    /// First row.
    pub y: usize,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

/// A 2x3 affine matrix `[a, b, c, d, e, f]`: `x' = a x + b y + c`, `y' = d x + e y + f`.
pub type Affine = [f64; 6];

/// OpenCV's `BORDER_REFLECT_101` index: `-1 -> 1`, `n -> n - 2` (`gfedcb|abcdefgh|gfedcba`).
/// Inside and one reflection away (every blur tap, nearly every resampling tap) without the
/// division of the general periodic case.
pub fn reflect_101(i: isize, n: usize) -> usize {
    let last = n as isize - 1;
    if (0..=last).contains(&i) {
        i as usize
    } else if last == 0 {
        0
    } else if (-last..0).contains(&i) {
        (-i) as usize
    } else if (last..=2 * last).contains(&i) {
        (2 * last - i) as usize
    } else {
        let period = 2 * last;
        let i = i.rem_euclid(period);
        if i <= last { i as usize } else { (period - i) as usize }
    }
}

/// Mirror every row (albumentations `HorizontalFlip`).
pub fn flip_horizontal(img: &Image) -> Image {
    let mut out = img.clone();
    for row in out.data.chunks_exact_mut(img.width) {
        row.reverse();
    }
    out
}

/// `cv2.getRotationMatrix2D((w/2 - .5, h/2 - .5), angle_deg, scale)` with the shift
/// `(dx * w, dy * h)` added, exactly as albumentations 1.x `ShiftScaleRotate` builds it.
pub fn ssr_matrix(angle_deg: f64, scale: f64, dx: f64, dy: f64, width: usize, height: usize) -> Affine {
    let (cx, cy) = (width as f64 / 2.0 - 0.5, height as f64 / 2.0 - 0.5);
    let angle = angle_deg.to_radians();
    let (alpha, beta) = (scale * angle.cos(), scale * angle.sin());
    [
        alpha,
        beta,
        (1.0 - alpha) * cx - beta * cy + dx * width as f64,
        -beta,
        alpha,
        beta * cx + (1.0 - alpha) * cy + dy * height as f64,
    ]
}

/// The inverse of an affine map (`cv2.invertAffineTransform`); a singular matrix maps to zero.
pub fn invert_affine(m: &Affine) -> Affine {
    let det = m[0] * m[4] - m[1] * m[3];
    let inv = if det != 0.0 { 1.0 / det } else { 0.0 };
    let (a, b, d, e) = (m[4] * inv, -m[1] * inv, -m[3] * inv, m[0] * inv);
    [a, b, -a * m[2] - b * m[5], d, e, -d * m[2] - e * m[5]]
}

/// `x.floor()` without the libm call that baseline x86-64 (no SSE4.1 `roundsd`) makes of it; the
/// hot loops call this once per output pixel. Exact for |x| < 2^52.
#[inline]
pub fn fast_floor(x: f64) -> f64 {
    let t = x as i64 as f64;
    if t > x { t - 1.0 } else { t }
}

/// Bilinear sample of one plane at `(x, y)` with `BORDER_REFLECT_101` outside.
pub fn bilinear_reflect(plane: &[f32], width: usize, height: usize, x: f64, y: f64) -> f32 {
    let (xf, yf) = (fast_floor(x), fast_floor(y));
    let (tx, ty) = ((x - xf) as f32, (y - yf) as f32);
    let (x0, y0) = (xf as isize, yf as isize);
    let (xa, xb) = (reflect_101(x0, width), reflect_101(x0 + 1, width));
    let (ya, yb) = (reflect_101(y0, height) * width, reflect_101(y0 + 1, height) * width);
    let top = plane[ya + xa] * (1.0 - tx) + plane[ya + xb] * tx;
    let bottom = plane[yb + xa] * (1.0 - tx) + plane[yb + xb] * tx;
    top * (1.0 - ty) + bottom * ty
}

/// `cv2.warpAffine(img, m, (w, h), INTER_LINEAR, BORDER_REFLECT_101)` with exact bilinear weights
/// (OpenCV quantises coordinates to 1/32 pixel on some paths; see the reference README).
pub fn warp_affine(img: &Image, m: &Affine) -> Image {
    let inv = invert_affine(m);
    let (w, h) = (img.width, img.height);
    let mut out = Image::zeros(img.channels, h, w);
    for c in 0..img.channels {
        let src = img.plane(c);
        let dst = &mut out.data[c * w * h..(c + 1) * w * h];
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f64, y as f64);
                let sx = inv[0] * xf + inv[1] * yf + inv[2];
                let sy = inv[3] * xf + inv[4] * yf + inv[5];
                dst[y * w + x] = bilinear_reflect(src, w, h, sx, sy);
            }
        }
    }
    out
}

/// Cut `crop` out of `img`.
pub fn crop(img: &Image, crop: CropBox) -> Image {
    let mut out = Image::zeros(img.channels, crop.height, crop.width);
    let rows = (0..img.channels).flat_map(|c| (0..crop.height).map(move |r| (c, r)));
    for (row, (c, r)) in out.data.chunks_exact_mut(crop.width).zip(rows) {
        let start = (c * img.height + crop.y + r) * img.width + crop.x;
        row.copy_from_slice(&img.data[start..start + crop.width]);
    }
    out
}

/// Source coordinate of output index `i` for `cv2.resize(INTER_LINEAR)` from `src` to `dst`
/// samples: `(i + .5) * src / dst - .5`, clamped to the image (OpenCV replicates the edge).
pub fn resize_coordinate(i: usize, src: usize, dst: usize) -> f64 {
    let x = (i as f64 + 0.5) * (src as f64 / dst as f64) - 0.5;
    x.clamp(0.0, (src - 1) as f64)
}

/// `cv2.resize(img, (width, height), interpolation=INTER_LINEAR)`.
pub fn resize_bilinear(img: &Image, width: usize, height: usize) -> Image {
    let mut out = Image::zeros(img.channels, height, width);
    for c in 0..img.channels {
        let src = img.plane(c);
        let dst = &mut out.data[c * width * height..(c + 1) * width * height];
        for y in 0..height {
            let sy = resize_coordinate(y, img.height, height);
            for x in 0..width {
                let sx = resize_coordinate(x, img.width, width);
                dst[y * width + x] = bilinear_reflect(src, img.width, img.height, sx, sy);
            }
        }
    }
    out
}

/// OpenCV's fixed Gaussian kernel for `ksize` in {1, 3, 5, 7} with sigma 0
/// (`cv2.getGaussianKernel(k, 0)`), or `None` for another size.
pub fn gaussian_kernel(ksize: usize) -> Option<&'static [f32]> {
    const K1: [f32; 1] = [1.0];
    const K3: [f32; 3] = [0.25, 0.5, 0.25];
    const K5: [f32; 5] = [0.0625, 0.25, 0.375, 0.25, 0.0625];
    const K7: [f32; 7] = [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125];
    match ksize {
        1 => Some(&K1),
        3 => Some(&K3),
        5 => Some(&K5),
        7 => Some(&K7),
        _ => None,
    }
}

/// `cv2.GaussianBlur(plane, (k, k), 0)` in place on one `height x width` plane: the separable
/// fixed kernel, rows then columns, `BORDER_REFLECT_101`. `tmp` is scratch of any size.
pub fn gaussian_blur_plane(
    plane: &mut [f32],
    width: usize,
    height: usize,
    kernel: &[f32],
    tmp: &mut Vec<f32>,
) {
    let r = kernel.len() / 2;
    tmp.resize(width * height + width + 2 * r, 0.0);
    let (rows, padded) = tmp.split_at_mut(width * height);
    for (src, dst) in plane.chunks_exact(width).zip(rows.chunks_exact_mut(width)) {
        pad_reflected(src, r, padded);
        weighted_sum(dst, kernel, |k| &padded[k..k + width]);
    }
    for (y, out) in plane.chunks_exact_mut(width).enumerate() {
        weighted_sum(out, kernel, |k| {
            let sy = reflect_101(y as isize + k as isize - r as isize, height);
            &rows[sy * width..(sy + 1) * width]
        });
    }
}

/// `out = kernel[0] * taps(0) + kernel[1] * taps(1) + ...`, added up in kernel order, one
/// multiply-add pass per tap that the compiler vectorises.
fn weighted_sum<'a>(out: &mut [f32], kernel: &[f32], taps: impl Fn(usize) -> &'a [f32]) {
    for (o, &v) in out.iter_mut().zip(taps(0)) {
        *o = kernel[0] * v;
    }
    for (k, &wk) in kernel.iter().enumerate().skip(1) {
        for (o, &v) in out.iter_mut().zip(taps(k)) {
            *o += wk * v;
        }
    }
}

/// `src` with `r` reflect-101 values on each side, into the first `src.len() + 2 r` values of
/// `padded`, so that every output of a row reads its taps in a straight run.
fn pad_reflected(src: &[f32], r: usize, padded: &mut [f32]) {
    let n = src.len();
    let (left, rest) = padded.split_at_mut(r);
    let (middle, right) = rest.split_at_mut(n);
    middle.copy_from_slice(src);
    for (j, p) in left.iter_mut().enumerate() {
        *p = src[reflect_101(j as isize - r as isize, n)];
    }
    for (j, p) in right.iter_mut().enumerate() {
        *p = src[reflect_101((n + j) as isize, n)];
    }
}

/// Albumentations `Solarize` on float images: `x >= threshold` becomes `1 - x`.
pub fn solarize(data: &mut [f32], threshold: f32) {
    for v in data.iter_mut().filter(|v| **v >= threshold) {
        *v = 1.0 - *v;
    }
}

/// Albumentations 1.x `normalize_numpy` on one plane: `(x - mean) * float32(1 / std)`.
pub fn normalize_plane(plane: &mut [f32], stats: BandStats) {
    let inv_std = 1.0 / stats.std;
    for v in plane.iter_mut() {
        *v = (*v - stats.mean) * inv_std;
    }
}

/// [`normalize_plane`] of `src` written into `dst` (same length).
pub fn normalize_into(dst: &mut [f32], src: &[f32], stats: BandStats) {
    let inv_std = 1.0 / stats.std;
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = (v - stats.mean) * inv_std;
    }
}

/// Channelaug: channel `band` copied into every channel.
pub fn channelaug(img: &Image, band: usize) -> Image {
    let mut out = img.clone();
    let plane = img.plane(band);
    for dst in out.data.chunks_exact_mut(plane.len()) {
        dst.copy_from_slice(plane);
    }
    out
}

#[cfg(test)]
mod tests {
    //! Expected values come from OpenCV (`tests/fixtures/gen_augment.py`, stored in
    //! `tests/fixtures/augment_ops.json`).

    use super::*;

    fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/augment_ops.json")).expect("fixture is JSON")
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
    }

    fn fixture_image() -> Image {
        let data = floats(&fixture()["image_7x9"]).iter().map(|&v| v as f32).collect();
        Image { data, channels: 1, height: 7, width: 9 }
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= tol, "value {i}: got {g}, OpenCV {w}");
        }
    }

    #[test]
    fn fast_floor_is_floor() {
        for x in [-3.5, -3.0, -0.25, -0.0, 0.0, 0.75, 2.0, 119.999, 1e9 + 0.5, -1e9 - 0.5] {
            assert_eq!(fast_floor(x), f64::floor(x), "{x}");
        }
    }

    #[test]
    fn reflect_101_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (-4..9).map(|i| reflect_101(i, 5)).collect();
        assert_eq!(got, [4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]);
        assert_eq!(reflect_101(-7, 1), 0);
    }

    #[test]
    fn reflect_101_equals_the_periodic_mirror_everywhere() {
        for n in 2..9usize {
            let period = 2 * (n - 1);
            for i in -40..40isize {
                let folded = i.rem_euclid(period as isize) as usize;
                let want = if folded < n { folded } else { period - folded };
                assert_eq!(reflect_101(i, n), want, "i {i}, n {n}");
            }
        }
    }

    #[test]
    fn horizontal_flip_mirrors_each_row_of_each_channel() {
        let img = Image { data: (0..12).map(|v| v as f32).collect(), channels: 2, height: 2, width: 3 };
        let got = flip_horizontal(&img).data;
        assert_eq!(got, [2., 1., 0., 5., 4., 3., 8., 7., 6., 11., 10., 9.]);
    }

    #[test]
    fn ssr_matrix_matches_get_rotation_matrix_2d_plus_shift() {
        for case in fixture()["ssr_matrix"].as_array().expect("cases") {
            let f = |k: &str| case[k].as_f64().expect("number");
            let (w, h) = (f("w") as usize, f("h") as usize);
            let got = ssr_matrix(f("angle"), f("scale"), f("dx"), f("dy"), w, h);
            for (g, want) in got.iter().zip(floats(&case["m"])) {
                assert!((g - want).abs() < 1e-9, "{case}: got {got:?}");
            }
        }
    }

    #[test]
    fn inverse_affine_undoes_the_matrix() {
        let m = ssr_matrix(33.0, 1.07, 0.05, -0.02, 64, 48);
        let inv = invert_affine(&m);
        let (x, y) = (12.5, 40.25);
        let (u, v) = (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]);
        let (bx, by) = (inv[0] * u + inv[1] * v + inv[2], inv[3] * u + inv[4] * v + inv[5]);
        assert!((bx - x).abs() < 1e-9 && (by - y).abs() < 1e-9);
    }

    #[test]
    fn warp_affine_matches_opencv_bilinear_reflect_101() {
        let fx = fixture();
        let m: Affine = floats(&fx["ssr_matrix"][2]["m"]).try_into().expect("6 values");
        assert_close(&warp_affine(&fixture_image(), &m).data, &floats(&fx["warp_7x9"]), 1e-5);
    }

    #[test]
    fn warp_affine_reflects_far_outside_the_image_like_opencv() {
        let fx = fixture();
        let m: Affine = floats(&fx["warp_far_m"]).try_into().expect("6 values");
        assert_close(&warp_affine(&fixture_image(), &m).data, &floats(&fx["warp_far_7x9"]), 1e-5);
    }

    #[test]
    fn resize_matches_opencv_inter_linear_up_and_down() {
        let fx = fixture();
        assert_close(&resize_bilinear(&fixture_image(), 11, 13).data, &floats(&fx["resize_up_13x11"]), 1e-5);
        assert_close(&resize_bilinear(&fixture_image(), 5, 4).data, &floats(&fx["resize_down_4x5"]), 1e-5);
    }

    #[test]
    fn crop_takes_the_box_of_every_channel() {
        let img = Image { data: (0..24).map(|v| v as f32).collect(), channels: 2, height: 3, width: 4 };
        let got = crop(&img, CropBox { x: 1, y: 1, width: 2, height: 2 }).data;
        assert_eq!(got, [5., 6., 9., 10., 17., 18., 21., 22.]);
    }

    #[test]
    fn blur_kernels_are_opencvs_sigma_zero_kernels() {
        let fx = fixture();
        for k in [3, 5, 7] {
            let want = floats(&fx[format!("kernel{k}")]);
            assert_close(gaussian_kernel(k).expect("known size"), &want, 0.0);
        }
        assert!(gaussian_kernel(9).is_none());
    }

    #[test]
    fn gaussian_blur_matches_opencv_for_each_kernel() {
        let fx = fixture();
        for k in [3, 5, 7] {
            let mut img = fixture_image();
            gaussian_blur_plane(&mut img.data, 9, 7, gaussian_kernel(k).expect("known"), &mut Vec::new());
            assert_close(&img.data, &floats(&fx[format!("blur{k}_7x9")]), 1e-6);
        }
    }

    #[test]
    fn solarize_inverts_values_at_or_above_the_threshold() {
        let mut v = [0.1, 0.49, 0.5, 0.8, 1.2];
        solarize(&mut v, 0.5);
        assert_eq!(v, [0.1, 0.49, 0.5, 1.0 - 0.8, 1.0 - 1.2]);
    }

    #[test]
    fn normalize_subtracts_the_mean_and_multiplies_by_the_reciprocal_std() {
        let stats = BandStats { mean: 0.2, std: 0.4 };
        let mut v = [0.2f32, 0.6, 0.0];
        normalize_plane(&mut v, stats);
        let inv = 1.0f32 / 0.4;
        assert_eq!(v, [0.0, (0.6f32 - 0.2) * inv, (0.0f32 - 0.2) * inv]);
    }

    #[test]
    fn channelaug_copies_the_chosen_channel_everywhere() {
        let img = Image { data: (0..12).map(|v| v as f32).collect(), channels: 3, height: 2, width: 2 };
        assert_eq!(channelaug(&img, 1).data, [4., 5., 6., 7., 4., 5., 6., 7., 4., 5., 6., 7.]);
    }
}
