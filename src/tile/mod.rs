//! Ingest: a path becomes [`Patch`]es.
//!
//! A patch is `[C, H, W]` f32 reflectance (DN / 10000) with the configured band list, the source
//! path and the pixel window it came from. Formats: stacked multi-band GeoTIFFs, BigEarthNet
//! per-band patch folders and large scenes cut into patches. Every failure is a [`TileError`] that
//! names the file and the reason; TIFF decoding runs behind a panic boundary in this module only.

mod bands;

pub use bands::{BandStats, band_stats};

use std::path::PathBuf;

/// A pixel window in the source image, on the 10 m grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Column of the top-left pixel.
    pub x: u32,
    /// Row of the top-left pixel.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// One training patch: `[C, H, W]` f32 reflectance, channel `c` holding band `bands[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// Row-major `[C, H, W]` reflectance values; nodata pixels are 0.
    pub data: Vec<f32>,
    /// Band name of each channel, in channel order.
    pub bands: Vec<String>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// The file or folder the patch was read from.
    pub source: PathBuf,
    /// Where in the source the patch lies.
    pub window: Window,
    /// Fraction of pixels that were nodata (NaN, inf, the nodata value, or all-zero).
    pub nodata_fraction: f32,
}

impl Patch {
    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.bands.len()
    }

    /// The `H * W` values of channel `c`.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }
}
