//! The fast path: flip, shift-scale-rotate and the resized crop as one bilinear resampling of
//! only the output pixels.
//!
//! Each output pixel `(u, v)` is followed back through the three steps: the `cv2.resize` source
//! coordinate inside the crop box (clamped to the box, as OpenCV replicates the crop's edge), the
//! inverse shift-scale-rotate matrix, and the mirror `x -> W - 1 - x` of the flip. The input is
//! then sampled once, bilinearly, with `BORDER_REFLECT_101` (the flip commutes with that border).
//!
//! Without shift-scale-rotate this is exactly the two-step result (up to float rounding): the flip
//! is a mirror of the coordinates, and the crop + resize already interpolates only once. With it,
//! the reference interpolates twice (warp, then resize) and this path once, so its views are a
//! little sharper; the statistics test in `tests/augment.rs` shows the view statistics still agree
//! with the reference within two standard errors.

use super::ops::{Affine, invert_affine, reflect_101, resize_coordinate, ssr_matrix};
use super::params::ViewParams;

/// The four source taps and weights of one output pixel, as offsets into a plane.
#[derive(Debug, Clone, Copy, Default)]
struct Tap {
    index: [u32; 4],
    weight: [f32; 4],
}

/// The output-to-input map of one view: output pixel -> continuous input coordinate.
struct ViewMap {
    /// Composite of the inverse shift-scale-rotate matrix and the flip mirror.
    affine: Affine,
    /// Input x of each output column inside the crop box, before `affine`.
    crop_x: Vec<f64>,
    /// Input y of each output row inside the crop box, before `affine`.
    crop_y: Vec<f64>,
}

impl ViewMap {
    fn new(p: &ViewParams, height: usize, width: usize) -> ViewMap {
        let inverse_ssr = match p.ssr {
            Some(s) => invert_affine(&ssr_matrix(s.angle_deg, s.scale, s.dx, s.dy, width, height)),
            None => [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        };
        let affine = if p.flip { mirror_x(&inverse_ssr, width) } else { inverse_ssr };
        let crop_x =
            (0..p.size).map(|u| p.crop.x as f64 + resize_coordinate(u, p.crop.width, p.size)).collect();
        let crop_y =
            (0..p.size).map(|v| p.crop.y as f64 + resize_coordinate(v, p.crop.height, p.size)).collect();
        ViewMap { affine, crop_x, crop_y }
    }
}

/// `m` followed by `x -> width - 1 - x`.
fn mirror_x(m: &Affine, width: usize) -> Affine {
    [-m[0], -m[1], (width - 1) as f64 - m[2], m[3], m[4], m[5]]
}

/// The bilinear taps of input point `(x, y)` on a `width x height` plane, reflect-101 outside.
fn tap(x: f64, y: f64, width: usize, height: usize) -> Tap {
    let (xf, yf) = (x.floor(), y.floor());
    let (tx, ty) = ((x - xf) as f32, (y - yf) as f32);
    let (x0, y0) = (xf as isize, yf as isize);
    let inside = x0 >= 0 && y0 >= 0 && x0 + 1 < width as isize && y0 + 1 < height as isize;
    let (xa, xb, ya, yb) = if inside {
        (x0 as usize, x0 as usize + 1, y0 as usize, y0 as usize + 1)
    } else {
        (
            reflect_101(x0, width),
            reflect_101(x0 + 1, width),
            reflect_101(y0, height),
            reflect_101(y0 + 1, height),
        )
    };
    let index = [ya * width + xa, ya * width + xb, yb * width + xa, yb * width + xb].map(|i| i as u32);
    let weight = [(1.0 - tx) * (1.0 - ty), tx * (1.0 - ty), (1.0 - tx) * ty, tx * ty];
    Tap { index, weight }
}

/// Render the geometric part of one view (flip, shift-scale-rotate, resized crop) from the
/// `[C, height, width]` input `src` into `out` (`[C, size, size]`). With Channelaug only the chosen
/// channel is resampled and then copied.
pub fn resample_view(
    src: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    p: &ViewParams,
    out: &mut [f32],
) {
    let map = ViewMap::new(p, height, width);
    let plane_in = height * width;
    let plane_out = p.size * p.size;
    let sources: Vec<usize> = match p.channel {
        Some(c) => vec![c],
        None => (0..channels).collect(),
    };
    let mut taps = vec![Tap::default(); p.size];
    let a = map.affine;
    for (v, &cy) in map.crop_y.iter().enumerate() {
        for (t, &cx) in taps.iter_mut().zip(&map.crop_x) {
            *t = tap(a[0] * cx + a[1] * cy + a[2], a[3] * cx + a[4] * cy + a[5], width, height);
        }
        for (k, &c) in sources.iter().enumerate() {
            let plane = &src[c * plane_in..(c + 1) * plane_in];
            let row = &mut out[k * plane_out + v * p.size..k * plane_out + (v + 1) * p.size];
            gather_row(plane, &taps, row);
        }
    }
    if p.channel.is_some() {
        let (first, rest) = out.split_at_mut(plane_out);
        for dst in rest.chunks_exact_mut(plane_out) {
            dst.copy_from_slice(first);
        }
    }
}

/// One output row of one channel from its taps.
fn gather_row(plane: &[f32], taps: &[Tap], row: &mut [f32]) {
    for (o, t) in row.iter_mut().zip(taps) {
        let [i0, i1, i2, i3] = t.index.map(|i| i as usize);
        *o = plane[i0] * t.weight[0]
            + plane[i1] * t.weight[1]
            + plane[i2] * t.weight[2]
            + plane[i3] * t.weight[3];
    }
}
