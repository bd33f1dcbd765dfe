//! Ingest: a path becomes [`Patch`]es.
//!
//! A patch is `[C, H, W]` f32 reflectance (DN / 10000) with the configured band list, the source
//! path and the pixel window it came from. Formats: stacked multi-band GeoTIFFs, BigEarthNet
//! per-band patch folders and large scenes cut into patches. Every failure is a [`TileError`] that
//! names the file and the reason; TIFF decoding runs behind a panic boundary in this module only.
//!
//! # Brief overview
//!
//! - [`list_inputs`] finds what a folder holds: stacked TIFFs and BigEarthNet patch folders
//!   (dot-files, `*.tmp` and `*.part` are skipped).
//! - [`for_each_patch`] streams the patches of one [`Input`] to a callback; [`read_patches`]
//!   collects them.
//! - [`PatchCache`] keeps decoded patches in memory up to a budget in bytes.
//! - [`PatchIndex`] lists the usable windows of many inputs without keeping their pixels;
//!   [`IndexedPatches`] reads them back one window (or one patch row) at a time through a
//!   [`PatchCache`] (`train` over folders larger than memory).
//! - [`inspect()`] describes an input: format, size, bands, layout, georeference, statistics.
//!
//! Images larger than `tile.patch_px` are cut into `patch_px` windows every `stride_px` (partial
//! windows at the right and bottom edges are dropped). An image smaller than `patch_px` along an
//! axis (EuroSAT's 64 px) gives one window as large as the image along that axis: the augmenter's
//! random-resized crop resamples it to the training size. Values are DN / 10000 whatever the sample
//! type; NaN, infinities and the nodata value become 0 and count, with all-zero pixels, towards
//! `nodata_fraction`; windows above `tile.max_nodata_fraction` are skipped.

mod bands;
mod bigearthnet;
mod cache;
mod chunks;
mod cut;
mod error;
mod index;
mod inspect;
mod raw_strips;
mod resample;
mod stacked;
mod tiff_file;

pub use bands::{BandStats, band_stats};
pub use cache::{PatchCache, patch_bytes};
pub use error::TileError;
pub use index::{IndexEntry, IndexedPatches, PatchIndex};
pub use inspect::{BandInfo, InputInfo, inspect};
pub use resample::resize_bicubic;
pub use tiff_file::Georef;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::config::TileConfig;

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

/// What kind of input a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputKind {
    /// One multi-band TIFF (any size; large ones are cut into patches).
    Stacked,
    /// A BigEarthNet patch folder with one TIFF per band.
    BigEarthNet,
}

/// One ingestible input: a stacked TIFF file or a BigEarthNet patch folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The file or folder.
    pub path: PathBuf,
    /// How it will be read.
    pub kind: InputKind,
}

impl Input {
    /// Classify `path`: a folder with `*_Bxx.tif` files is a BigEarthNet folder, a file is a
    /// stacked TIFF (its header is checked when it is read).
    pub fn detect(path: &Path) -> Result<Input, TileError> {
        let meta = crate::fsio::input_metadata(path).map_err(|e| TileError::io(path, e))?;
        let kind = if !meta.is_dir() {
            InputKind::Stacked
        } else if bigearthnet::is_patch_folder(path) {
            InputKind::BigEarthNet
        } else {
            return Err(TileError::NotAnInput {
                path: path.to_path_buf(),
                detail: "a folder without *_B02.tif-style band files; list its contents with `list_inputs`"
                    .into(),
            });
        };
        Ok(Input { path: path.to_path_buf(), kind })
    }
}

/// How many patches an input gave and how many were skipped for nodata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PatchCount {
    /// Patches handed to the callback.
    pub yielded: usize,
    /// Windows over `tile.max_nodata_fraction`.
    pub skipped: usize,
}

/// Whether a file name is something a writer is still producing or hides (skipped by listings).
fn is_hidden_or_partial(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// Every input under `dir`, sorted by path: `*.tif`/`*.tiff` files and BigEarthNet folders (whose
/// band files are not listed again). Dot-files, `*.tmp` and `*.part` are skipped.
pub fn list_inputs(dir: &Path) -> Result<Vec<Input>, TileError> {
    let mut out = Vec::new();
    collect_inputs(dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn collect_inputs(dir: &Path, out: &mut Vec<Input>) -> Result<(), TileError> {
    if bigearthnet::is_patch_folder(dir) {
        out.push(Input { path: dir.to_path_buf(), kind: InputKind::BigEarthNet });
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| TileError::io(dir, e))? {
        let path = entry.map_err(|e| TileError::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if is_hidden_or_partial(name) {
            continue;
        }
        if path.is_dir() {
            collect_inputs(&path, out)?;
        } else if name.ends_with(".tif") || name.ends_with(".tiff") {
            out.push(Input { path, kind: InputKind::Stacked });
        }
    }
    Ok(())
}

/// Stream the patches of `input` to `sink` (return [`ControlFlow::Break`] to stop early).
///
/// Large scenes are read one patch row at a time; nothing proportional to the whole image is
/// held. Patches already handed over stay valid when a later read fails.
pub fn for_each_patch(
    input: &Input,
    cfg: &TileConfig,
    mut sink: impl FnMut(Patch) -> ControlFlow<()>,
) -> Result<PatchCount, TileError> {
    let mut source = open_source(input, cfg)?;
    cut::cut_patches(source.as_mut(), &cfg.bands, &input.path, cfg, &mut sink)
}

/// The rows of `input`'s configured bands, ready to be cut.
fn open_source(input: &Input, cfg: &TileConfig) -> Result<Box<dyn cut::RowSource + Send>, TileError> {
    Ok(match input.kind {
        InputKind::Stacked => Box::new(stacked::open(&input.path, cfg)?),
        InputKind::BigEarthNet => Box::new(bigearthnet::open(&input.path, cfg)?),
    })
}

/// All patches of `input` (convenient for small inputs; large scenes should use [`for_each_patch`]).
pub fn read_patches(input: &Input, cfg: &TileConfig) -> Result<Vec<Patch>, TileError> {
    let mut out = Vec::new();
    for_each_patch(input, cfg, |p| {
        out.push(p);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// The labels stored beside a BigEarthNet folder's bands (`*_labels_metadata.json`), or none.
pub fn labels(input: &Input) -> Vec<String> {
    match input.kind {
        InputKind::BigEarthNet => bigearthnet::labels(&input.path),
        InputKind::Stacked => Vec::new(),
    }
}
