//! The DINO multi-crop augmenter: one [`Patch`](crate::tile::Patch) becomes [`Views`] (2 global
//! crops and N local crops, normalised per band), and a worker pool turns patches into ready
//! training [`Batch`]es. Plain f32 buffers only: this stage knows nothing of candle.
//!
//! - [`Augmenter`] (`augmenter.rs`): patch + sample index -> [`Views`], deterministic per sample.
//! - `params.rs`: the random decisions of a view; `ops.rs`: each operation with OpenCV semantics;
//!   `resample.rs`: the geometric steps computed only where the output needs them.
//! - [`AugmentPool`] (`pool.rs`): worker threads, bounded queue, batches in sample order.
//! - [`preview`]: the labelled PNG of one sample's views.

mod augmenter;
pub mod ops;
pub mod params;
mod pool;
pub mod preview;
mod resample;

pub use augmenter::{AugmentError, Augmenter, Resample, geometry_two_step};
pub use pool::{AugmentPool, Sample, build_batch};

/// One view: `[C, H, W]` f32, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Row-major `[C, H, W]` values.
    pub data: Vec<f32>,
    /// Channels.
    pub channels: usize,
    /// Side length in pixels (views are square).
    pub size: usize,
}

/// All views of one sample, in DINO order: global 1, global 2, then the local crops.
#[derive(Debug, Clone, PartialEq)]
pub struct Views {
    /// `views[0..2]` are the global crops, `views[2..]` the local crops.
    pub views: Vec<View>,
}

/// One crop position of a batch: `[B, C, H, W]` f32, sample-major inside.
#[derive(Debug, Clone, PartialEq)]
pub struct CropBatch {
    /// Row-major `[B, C, H, W]` values.
    pub data: Vec<f32>,
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
}

/// A training batch, crop-major as MultiCropWrapper consumes it: `crops[0]` is global 1 of every
/// sample, `crops[1]` global 2, `crops[2..]` the local crops.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// One entry per crop position.
    pub crops: Vec<CropBatch>,
    /// Global sample indices the batch was drawn from (for determinism checks and logging).
    pub sample_ids: Vec<u64>,
}
