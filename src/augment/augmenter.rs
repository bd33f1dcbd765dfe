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

/// How the geometric steps are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resample {
    /// Flip, shift-scale-rotate and resized crop as one bilinear resampling of the output pixels
    /// (one interpolation; see `resample.rs`). The default.
    #[default]
    Fused,
    /// The reference order, one full image per step (two interpolations when SSR applies); for
    /// tests against OpenCV and the reference.
    TwoStep,
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
            resample: Resample::Fused,
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
        let mut tmp = Vec::new();
        for (p, out) in params.iter().zip(outs.iter_mut()) {
            match self.resample {
                Resample::Fused => {
                    resample_view(&patch.data, patch.channels(), patch.height, patch.width, p, out)
                }
                Resample::TwoStep => out.copy_from_slice(&geometry_two_step(patch, p).data),
            }
            self.finish(p, out, &mut tmp);
        }
        Ok(())
    }

    /// Blur, solarize and normalize one resampled view in place, plane by plane.
    fn finish(&self, p: &ViewParams, out: &mut [f32], tmp: &mut Vec<f32>) {
        let kernel = p.blur.map(|k| ops::gaussian_kernel(k).expect("blur_ksize draws 3, 5 or 7"));
        for (plane, stats) in out.chunks_exact_mut(p.size * p.size).zip(&self.stats) {
            if let Some(kernel) = kernel {
                ops::gaussian_blur_plane(plane, p.size, p.size, kernel, tmp);
            }
            if p.solarize {
                ops::solarize(plane, self.solarize_threshold);
            }
            ops::normalize_plane(plane, *stats);
        }
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

/// The geometric steps in the reference order: Channelaug, flip, warp, crop, resize.
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
