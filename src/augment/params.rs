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

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn resized_crop_area_and_aspect_follow_the_torchvision_distributions() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 20_000;
        let boxes: Vec<CropBox> =
            (0..n).map(|_| random_resized_crop(&mut rng, 120, 120, [0.4, 1.0], [0.75, 4.0 / 3.0])).collect();
        let area: f64 = boxes.iter().map(|b| (b.width * b.height) as f64 / 14400.0).sum::<f64>() / n as f64;
        let log_aspect: Vec<f64> = boxes.iter().map(|b| (b.width as f64 / b.height as f64).ln()).collect();
        let mean_log_aspect = log_aspect.iter().sum::<f64>() / n as f64;
        // albumentations 2.0.8 `A.RandomResizedCrop(size=(120, 120), scale=(.4, 1))
        // .get_params_dependent_on_data` over 40000 draws on 120x120: mean area fraction 0.6444
        // (SE 0.0007; U(.4, 1) has mean .7, the tries that do not fit remove large non-square boxes),
        // mean log aspect -0.0001 (std 0.155).
        assert!((area - 0.6444).abs() < 0.006, "mean area fraction {area}");
        assert!(mean_log_aspect.abs() < 0.01, "mean log aspect {mean_log_aspect}");
        assert!(log_aspect.iter().all(|a| a.abs() <= (4.0f64 / 3.0).ln() + 0.03), "aspect outside the range");
        assert!(boxes.iter().all(|b| b.x + b.width <= 120 && b.y + b.height <= 120 && b.width > 0));
        // Placement is uniform on 0..=120-w: the relative offset averages one half.
        let room: Vec<f64> =
            boxes.iter().filter(|b| b.width <= 100).map(|b| b.x as f64 / (120 - b.width) as f64).collect();
        let offset = room.iter().sum::<f64>() / room.len() as f64;
        assert!((offset - 0.5).abs() < 0.01, "placement is not uniform: {offset}");
    }

    #[test]
    fn local_crop_areas_stay_in_their_scale_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut sum = 0.0;
        for _ in 0..5000 {
            let b = random_resized_crop(&mut rng, 64, 64, [0.05, 0.4], [0.75, 4.0 / 3.0]);
            let area = (b.width * b.height) as f64 / 4096.0;
            assert!((0.035..0.43).contains(&area), "{b:?}");
            sum += area;
        }
        // albumentations 2.0.8, scale (.05, .4) on 64x64, 40000 draws: mean 0.2249 (SE 0.0005).
        assert!((sum / 5000.0 - 0.2249).abs() < 0.005, "mean area fraction {}", sum / 5000.0);
    }

    #[test]
    fn resized_crop_falls_back_to_a_centre_crop_with_the_largest_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // A 3:1 strip cannot hold a full-area crop with aspect <= 4/3.
        let b = random_resized_crop(&mut rng, 40, 120, [1.0, 1.0], [0.75, 4.0 / 3.0]);
        assert_eq!(b, CropBox { x: 33, y: 0, width: 53, height: 40 });
    }

    #[test]
    fn blur_kernel_sizes_are_3_5_7_with_probabilities_20_40_40() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut counts = [0usize; 8];
        for _ in 0..50_000 {
            counts[blur_ksize(&mut rng)] += 1;
        }
        let p = |k: usize| counts[k] as f64 / 50_000.0;
        assert_eq!(counts[3] + counts[5] + counts[7], 50_000);
        assert!(
            (p(3) - 0.2).abs() < 0.01 && (p(5) - 0.4).abs() < 0.01 && (p(7) - 0.4).abs() < 0.01,
            "{counts:?}"
        );
    }

    #[test]
    fn zero_ranges_and_probabilities_draw_no_augmentation() {
        let recipe = ViewRecipe {
            size: 8,
            scale: [1.0, 1.0],
            ratio: [1.0, 1.0],
            channelaug_p: 0.0,
            flip_p: 0.0,
            ssr_p: 1.0,
            ssr_angle_deg: 0.0,
            ssr_scale: 0.0,
            ssr_shift: 0.0,
            blur_p: 0.0,
            solarize_p: 0.0,
        };
        let p = recipe.draw(&mut ChaCha8Rng::seed_from_u64(5), 3, 16, 16);
        assert_eq!(p.ssr, Some(Ssr { angle_deg: 0.0, scale: 1.0, dx: 0.0, dy: 0.0 }));
        assert_eq!((p.channel, p.flip, p.blur, p.solarize), (None, false, None, false));
        assert_eq!(p.crop, CropBox { x: 0, y: 0, width: 16, height: 16 });
    }
}
