//! The random decisions of one view, drawn up front: which channel Channelaug copies, flip or not,
//! the shift-scale-rotate parameters, the RandomResizedCrop box, the blur kernel, solarize or not.
//!
//! Drawing everything first and applying it afterwards lets the fused and the two-step paths
//! render the very same view, and keeps the random stream independent of how a view is computed.

use rand::{Rng, RngExt};

use super::ops::CropBox;

/// Shift-scale-rotate parameters (albumentations 1.x `ShiftScaleRotate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ssr {
    /// Rotation in degrees, counter-clockwise in OpenCV's convention.
    pub angle_deg: f64,
    /// Isotropic scale.
    pub scale: f64,
    /// Shift as a fraction of the width.
    pub dx: f64,
    /// Shift as a fraction of the height.
    pub dy: f64,
}

/// Everything random about one view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// Channelaug: the channel copied into all channels.
    pub channel: Option<usize>,
    /// Horizontal flip.
    pub flip: bool,
    /// Shift-scale-rotate, when applied.
    pub ssr: Option<Ssr>,
    /// The RandomResizedCrop box on the (flipped, warped) input.
    pub crop: CropBox,
    /// Side of the output view.
    pub size: usize,
    /// Gaussian blur kernel size, when applied.
    pub blur: Option<usize>,
    /// Solarize.
    pub solarize: bool,
}

/// The probabilities and ranges of one kind of view (global 1, global 2, local).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewRecipe {
    /// Output side.
    pub size: usize,
    /// RandomResizedCrop area fraction range.
    pub scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub ratio: [f64; 2],
    /// Channelaug probability.
    pub channelaug_p: f64,
    /// Flip probability.
    pub flip_p: f64,
    /// Shift-scale-rotate probability.
    pub ssr_p: f64,
    /// Rotation limit in degrees.
    pub ssr_angle_deg: f64,
    /// Scale limit (scale in `1 ± limit`).
    pub ssr_scale: f64,
    /// Shift limit as a fraction of the side.
    pub ssr_shift: f64,
    /// Blur probability.
    pub blur_p: f64,
    /// Solarize probability.
    pub solarize_p: f64,
}

/// `U(lo, hi)`, also for an empty range (`lo == hi`), which `random_range` refuses.
fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

impl ViewRecipe {
    /// Draw one view's parameters for a `channels x height x width` input.
    pub fn draw<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        channels: usize,
        height: usize,
        width: usize,
    ) -> ViewParams {
        let channel = rng.random_bool(self.channelaug_p).then(|| rng.random_range(0..channels));
        let flip = rng.random_bool(self.flip_p);
        let ssr = rng.random_bool(self.ssr_p).then(|| Ssr {
            angle_deg: uniform(rng, -self.ssr_angle_deg, self.ssr_angle_deg),
            scale: uniform(rng, 1.0 - self.ssr_scale, 1.0 + self.ssr_scale),
            dx: uniform(rng, -self.ssr_shift, self.ssr_shift),
            dy: uniform(rng, -self.ssr_shift, self.ssr_shift),
        });
        let crop = random_resized_crop(rng, height, width, self.scale, self.ratio);
        let blur = rng.random_bool(self.blur_p).then(|| blur_ksize(rng));
        let solarize = rng.random_bool(self.solarize_p);
        ViewParams { channel, flip, ssr, crop, size: self.size, blur, solarize }
    }
}

/// albumentations 1.x `GaussianBlur` kernel choice: `k = randrange(3, 8)`, an even `k` becomes
/// `k + 1`, so P(3) = .2, P(5) = .4, P(7) = .4.
pub fn blur_ksize<R: Rng + ?Sized>(rng: &mut R) -> usize {
    let k = rng.random_range(3..8usize);
    if k % 2 == 0 { k + 1 } else { k }
}

/// Python's `int(round(x))`: halves go to the even neighbour.
fn round_half_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// torchvision's `RandomResizedCrop.get_params` as albumentations implements it: up to 10 tries of
/// area `U(scale) * H * W` and log-uniform aspect ratio; a box that fits is placed uniformly,
/// otherwise a centre crop clamped to the ratio range.
pub fn random_resized_crop<R: Rng + ?Sized>(
    rng: &mut R,
    height: usize,
    width: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> CropBox {
    let area = (height * width) as f64;
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target_area = uniform(rng, scale[0], scale[1]) * area;
        let aspect = uniform(rng, log_ratio[0], log_ratio[1]).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if 0 < w && w <= width && 0 < h && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return CropBox { x, y, width: w, height: h };
        }
    }
    centre_crop(height, width, ratio)
}

/// The fallback of [`random_resized_crop`].
fn centre_crop(height: usize, width: usize, ratio: [f64; 2]) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, round_half_even(width as f64 / ratio[0]).clamp(1, height))
    } else if in_ratio > ratio[1] {
        (round_half_even(height as f64 * ratio[1]).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { x: (width - w) / 2, y: (height - h) / 2, width: w, height: h }
}
