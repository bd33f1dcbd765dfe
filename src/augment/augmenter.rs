//! [`Augmenter`]: one patch and a sample index become the DINO views.
//!
//! The random stream of a sample is ChaCha8 seeded with `augment.seed` on stream `sample_id`, so a
//! sample's views depend only on `(seed, sample_id)` and the patch, never on which worker thread
//! computes it or in which order.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::ops::{self, Image};
use super::params::{ViewParams, ViewRecipe};
use super::resample::resample_view;
use super::{View, Views};
use crate::config::AugmentConfig;
use crate::tile::{BandStats, Patch, band_stats};

/// What can go wrong when building or running the augmenter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AugmentError {
    /// A configured band has no normalisation statistics.
    #[error(
        "augment: band {band} has no normalisation statistics (known: B02-B08, B8A, B11, B12); \
         remove it from tile.bands"
    )]
    NoBandStats {
        /// The band.
        band: String,
    },
    /// The augmenter was built without bands.
    #[error("augment: the band list is empty; set tile.bands")]
    NoBands,
    /// A patch's bands differ from the augmenter's.
    #[error("{path}: patch bands {got:?} differ from the augmenter's {expected:?}")]
    BandMismatch {
        /// The patch's source file.
        path: std::path::PathBuf,
        /// The augmenter's bands.
        expected: Vec<String>,
        /// The patch's bands.
        got: Vec<String>,
    },
    /// A patch whose pixel buffer does not match its shape, or with no pixels.
    #[error("{path}: patch is {channels}x{height}x{width} but holds {len} values")]
    BadShape {
        /// The patch's source file.
        path: std::path::PathBuf,
        /// Channels.
        channels: usize,
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// Values in the buffer.
        len: usize,
    },
}

/// How the geometric steps (flip, shift-scale-rotate, resized crop) are computed; see
/// `resample.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resample {
    /// The reference's result: warp, then resize (two interpolations when SSR applies), with the
    /// warp computed only inside the crop box. Equal to [`geometry_two_step`] up to rounding.
    #[default]
    Exact,
    /// One interpolation from the input to the output pixels: faster, and a little sharper than
    /// the reference when SSR applies (a measured deviation, so not the default).
    Fused,
}

/// The multi-crop augmenter of the seed recipe, for one band list.
#[derive(Debug, Clone)]
pub struct Augmenter {
    recipes: Vec<ViewRecipe>,
    stats: Vec<BandStats>,
    bands: Vec<String>,
    solarize_threshold: f32,
    seed: u64,
    resample: Resample,
}

impl Augmenter {
    /// The augmenter for patches with `bands` (in channel order). Fails for a band without
    /// normalisation statistics.
    pub fn new(cfg: &AugmentConfig, bands: &[String]) -> Result<Augmenter, AugmentError> {
        if bands.is_empty() {
            return Err(AugmentError::NoBands);
        }
        let stats = bands
            .iter()
            .map(|b| band_stats(b).ok_or_else(|| AugmentError::NoBandStats { band: b.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Augmenter {
            recipes: recipes(cfg),
            stats,
            bands: bands.to_vec(),
            solarize_threshold: cfg.solarize_threshold,
            seed: cfg.seed,
            resample: Resample::Exact,
        })
    }

    /// The same augmenter computing the geometry with `resample`.
    pub fn with_resample(mut self, resample: Resample) -> Augmenter {
        self.resample = resample;
        self
    }

    /// Band names, in channel order.
    pub fn bands(&self) -> &[String] {
        &self.bands
    }

    /// Normalisation statistics per channel.
    pub fn stats(&self) -> &[BandStats] {
        &self.stats
    }

    /// Number of views per sample (2 global + the local crops).
    pub fn view_count(&self) -> usize {
        self.recipes.len()
    }

    /// Side of view `i`.
    pub fn view_size(&self, i: usize) -> usize {
        self.recipes[i].size
    }

    /// The random decisions of every view of sample `sample_id` on a `c x h x w` input.
    pub fn draw(&self, sample_id: u64, channels: usize, height: usize, width: usize) -> Vec<ViewParams> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(sample_id);
        self.recipes.iter().map(|r| r.draw(&mut rng, channels, height, width)).collect()
    }

    /// All views of `patch` as sample `sample_id`.
    pub fn views(&self, patch: &Patch, sample_id: u64) -> Result<Views, AugmentError> {
        let c = patch.channels();
        let mut views: Vec<View> = self
            .recipes
            .iter()
            .map(|r| View { data: vec![0.0; c * r.size * r.size], channels: c, size: r.size })
            .collect();
        let mut outs: Vec<&mut [f32]> = views.iter_mut().map(|v| v.data.as_mut_slice()).collect();
        self.write_views(patch, sample_id, &mut outs)?;
        Ok(Views { views })
    }

    /// Write the views of `patch` as sample `sample_id` into `outs` (one `[C, S, S]` slice per
    /// view, e.g. this sample's slot in each [`CropBatch`](super::CropBatch)).
    pub fn write_views(
        &self,
        patch: &Patch,
        sample_id: u64,
        outs: &mut [&mut [f32]],
    ) -> Result<(), AugmentError> {
        self.check(patch)?;
        let params = self.draw(sample_id, patch.channels(), patch.height, patch.width);
        let (mut tmp, mut scratch) = (Vec::new(), Vec::new());
        for (p, out) in params.iter().zip(outs.iter_mut()) {
            resample_view(patch, p, self.resample, out, &mut scratch);
            self.finish(p, out, &mut tmp);
        }
        Ok(())
    }

    /// Blur, solarize and normalize one resampled view in place, each plane start to finish
    /// while it is in cache. After Channelaug only the first plane was resampled: it is blurred
    /// and solarized once, then written normalized into every plane.
    fn finish(&self, p: &ViewParams, out: &mut [f32], tmp: &mut Vec<f32>) {
        let kernel = p.blur.map(|k| ops::gaussian_kernel(k).expect("blur_ksize draws 3, 5 or 7"));
        let blur_and_solarize = |plane: &mut [f32], tmp: &mut Vec<f32>| {
            if let Some(kernel) = kernel {
                ops::gaussian_blur_plane(plane, p.size, p.size, kernel, tmp);
            }
            if p.solarize {
                ops::solarize(plane, self.solarize_threshold);
            }
        };
        let (first, rest) = out.split_at_mut(p.size * p.size);
        let rest = rest.chunks_exact_mut(first.len()).zip(&self.stats[1..]);
        blur_and_solarize(first, tmp);
        if p.channel.is_some() {
            rest.for_each(|(plane, stats)| ops::normalize_into(plane, first, *stats));
        } else {
            for (plane, stats) in rest {
                blur_and_solarize(plane, tmp);
                ops::normalize_plane(plane, *stats);
            }
        }
        ops::normalize_plane(first, self.stats[0]);
    }

    fn check(&self, patch: &Patch) -> Result<(), AugmentError> {
        if patch.bands != self.bands {
            return Err(AugmentError::BandMismatch {
                path: patch.source.clone(),
                expected: self.bands.clone(),
                got: patch.bands.clone(),
            });
        }
        let n = patch.channels() * patch.height * patch.width;
        if n == 0 || patch.data.len() != n {
            return Err(AugmentError::BadShape {
                path: patch.source.clone(),
                channels: patch.channels(),
                height: patch.height,
                width: patch.width,
                len: patch.data.len(),
            });
        }
        Ok(())
    }
}

/// The geometric steps in the reference order, one full image per step: Channelaug, flip, warp,
/// crop, resize. The ground truth for [`Resample::Exact`] in tests; too slow for training.
pub fn geometry_two_step(patch: &Patch, p: &ViewParams) -> Image {
    let mut img = Image {
        data: patch.data.clone(),
        channels: patch.channels(),
        height: patch.height,
        width: patch.width,
    };
    if let Some(c) = p.channel {
        img = ops::channelaug(&img, c);
    }
    if p.flip {
        img = ops::flip_horizontal(&img);
    }
    if let Some(s) = p.ssr {
        img =
            ops::warp_affine(&img, &ops::ssr_matrix(s.angle_deg, s.scale, s.dx, s.dy, img.width, img.height));
    }
    let img = ops::crop(&img, p.crop);
    ops::resize_bilinear(&img, p.size, p.size)
}

/// The view recipes of the seed: global 1, global 2, then the local crops.
fn recipes(cfg: &AugmentConfig) -> Vec<ViewRecipe> {
    let common = ViewRecipe {
        size: cfg.global_px,
        scale: cfg.global_scale,
        ratio: cfg.ratio,
        channelaug_p: 0.0,
        flip_p: cfg.flip_p,
        ssr_p: cfg.ssr_p,
        ssr_angle_deg: cfg.ssr_angle_deg,
        ssr_scale: cfg.ssr_scale,
        ssr_shift: cfg.ssr_shift,
        blur_p: 0.0,
        solarize_p: 0.0,
    };
    let global1 = ViewRecipe { channelaug_p: cfg.channelaug_p, blur_p: cfg.global1_blur_p, ..common };
    let global2 = ViewRecipe { blur_p: cfg.global2_blur_p, solarize_p: cfg.solarize_p, ..common };
    let local = ViewRecipe { size: cfg.local_px, scale: cfg.local_scale, blur_p: cfg.local_blur_p, ..common };
    [global1, global2].into_iter().chain(std::iter::repeat_n(local, cfg.local_crops)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tile::Window;

    fn bands(names: &[&str]) -> Vec<String> {
        names.iter().map(|b| b.to_string()).collect()
    }

    /// A smooth, asymmetric `c x h x w` patch in reflectance range.
    pub(crate) fn patch(names: &[&str], height: usize, width: usize) -> Patch {
        let c = names.len();
        let data = (0..c * height * width)
            .map(|i| {
                let (ch, y, x) = (i / (height * width), (i / width) % height, i % width);
                0.05 + 0.02 * ch as f32
                    + 0.3 * ((x as f32 * 0.21).sin() * (y as f32 * 0.13 + 0.5).cos()).abs()
                    + 0.002 * x as f32
            })
            .collect();
        Patch {
            data,
            bands: bands(names),
            height,
            width,
            source: "synthetic".into(),
            window: Window { x: 0, y: 0, width: width as u32, height: height as u32 },
            nodata_fraction: 0.0,
        }
    }

    const RGB: [&str; 3] = ["B02", "B03", "B04"];

    #[test]
    fn a_band_without_statistics_is_refused_by_name() {
        let err = Augmenter::new(&AugmentConfig::default(), &bands(&["B02", "B01"])).unwrap_err();
        assert!(err.to_string().contains("band B01 has no normalisation statistics"), "{err}");
    }

    #[test]
    fn a_patch_with_other_bands_is_an_error_naming_its_source() {
        let aug = Augmenter::new(&AugmentConfig::default(), &bands(&RGB)).unwrap();
        let err = aug.views(&patch(&["B02", "B03", "B08"], 20, 20), 0).unwrap_err();
        assert!(err.to_string().starts_with("synthetic: patch bands"), "{err}");
    }

    #[test]
    fn views_have_the_seed_shapes_also_from_a_small_patch() {
        let aug = Augmenter::new(&AugmentConfig::default(), &bands(&RGB)).unwrap();
        let views = aug.views(&patch(&RGB, 64, 64), 3).unwrap();
        let sizes: Vec<usize> = views.views.iter().map(|v| v.size).collect();
        assert_eq!(sizes, [120, 120, 56, 56, 56, 56, 56, 56]);
        assert!(views.views.iter().all(|v| v.channels == 3 && v.data.len() == 3 * v.size * v.size));
        assert!(views.views.iter().flat_map(|v| &v.data).all(|x| x.is_finite()));
    }

    #[test]
    fn the_same_seed_and_sample_give_the_same_views_and_others_differ() {
        let aug = Augmenter::new(&AugmentConfig::default(), &bands(&RGB)).unwrap();
        let p = patch(&RGB, 40, 48);
        assert_eq!(aug.views(&p, 7).unwrap(), aug.views(&p, 7).unwrap());
        assert_ne!(aug.views(&p, 7).unwrap(), aug.views(&p, 8).unwrap());
        let other_seed =
            Augmenter::new(&AugmentConfig { seed: 1, ..AugmentConfig::default() }, &bands(&RGB)).unwrap();
        assert_ne!(aug.views(&p, 7).unwrap(), other_seed.views(&p, 7).unwrap());
    }

    #[test]
    fn channelaug_draws_from_the_configured_channel_count() {
        let aug = Augmenter::new(&AugmentConfig::default(), &bands(&RGB)).unwrap();
        let mut seen = [0usize; 3];
        for id in 0..300 {
            let c = aug.draw(id, 3, 32, 32)[0].channel.expect("channelaug_p is 1");
            seen[c] += 1;
        }
        assert!(seen.iter().all(|&n| n > 70), "{seen:?}");
        assert!(aug.draw(0, 3, 32, 32)[1..].iter().all(|p| p.channel.is_none()));
    }

    #[test]
    fn global_1_after_channelaug_is_one_band_normalised_per_channel() {
        let aug = Augmenter::new(&AugmentConfig::default(), &bands(&RGB)).unwrap();
        let v = &aug.views(&patch(&RGB, 30, 30), 11).unwrap().views[0];
        let n = v.size * v.size;
        let raw = |c: usize| -> Vec<f32> {
            let s = aug.stats()[c];
            v.data[c * n..(c + 1) * n].iter().map(|x| x * s.std + s.mean).collect()
        };
        for (a, b) in raw(0).iter().zip(raw(2)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// The geometry of every view of sample `id`, from the augmenter and from the full-image
    /// reference steps, both before blur and normalisation.
    fn geometry_both_ways(aug: &Augmenter, p: &Patch, id: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
        let (c, h, w) = (p.channels(), p.height, p.width);
        let mut scratch = Vec::new();
        aug.draw(id, c, h, w)
            .iter()
            .map(|v| {
                let mut out = vec![0.0; c * v.size * v.size];
                resample_view(p, v, aug.resample, &mut out, &mut scratch);
                let n = v.size * v.size;
                let planes = if v.channel.is_some() { 1 } else { c };
                (out[..planes * n].to_vec(), geometry_two_step(p, v).data[..planes * n].to_vec())
            })
            .collect()
    }

    fn worst_difference(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn exact_geometry_equals_the_full_image_reference_steps_with_every_op_on() {
        let cfg = AugmentConfig { ssr_p: 1.0, flip_p: 0.5, ..AugmentConfig::default() };
        let aug = Augmenter::new(&cfg, &bands(&RGB)).unwrap();
        for (id, (h, w)) in [(40, 52), (64, 64), (120, 120)].into_iter().enumerate() {
            for (got, want) in geometry_both_ways(&aug, &patch(&RGB, h, w), id as u64) {
                assert!(worst_difference(&got, &want) < 1e-5, "sample {id}");
            }
        }
    }

    #[test]
    fn fused_geometry_equals_the_reference_without_shift_scale_rotate() {
        let cfg = AugmentConfig { ssr_p: 0.0, ..AugmentConfig::default() };
        let aug = Augmenter::new(&cfg, &bands(&RGB)).unwrap().with_resample(Resample::Fused);
        for (id, (h, w)) in [(40, 52), (64, 64), (120, 120)].into_iter().enumerate() {
            for (got, want) in geometry_both_ways(&aug, &patch(&RGB, h, w), id as u64) {
                assert!(worst_difference(&got, &want) < 1e-5, "sample {id}");
            }
        }
    }

    #[test]
    fn fused_geometry_differs_from_the_reference_with_shift_scale_rotate() {
        let cfg = AugmentConfig { ssr_p: 1.0, ..AugmentConfig::default() };
        let aug = Augmenter::new(&cfg, &bands(&RGB)).unwrap().with_resample(Resample::Fused);
        for (got, want) in geometry_both_ways(&aug, &patch(&RGB, 48, 48), 5) {
            let mean = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).sum::<f32>() / got.len() as f32;
            assert!(mean > 1e-5 && mean < 0.02, "mean difference {mean}");
        }
    }
}
