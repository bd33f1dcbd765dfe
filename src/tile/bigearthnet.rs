//! BigEarthNet patch folders: one single-band TIFF per band (`<patch>_B02.tif`, v1 and v2 names
//! alike), 10 m bands at 120 px, 20 m at 60 px, 60 m at 20 px. Coarser bands are resampled to the
//! 10 m grid with OpenCV-compatible bicubic; `<patch>_labels_metadata.json` is optional metadata.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::TileError;
use super::cut::RowSource;
use super::resample::resize_bicubic;
use super::tiff_file::TiffFile;
use crate::config::{S2_BANDS, TileConfig};

/// The band files of a folder, by band name, in the order of [`S2_BANDS`].
pub(crate) fn band_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, TileError> {
    let entries = std::fs::read_dir(dir).map_err(|e| TileError::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| TileError::io(dir, e))?.path();
        if let Some(band) = band_of(&path) {
            found.push((band, path));
        }
    }
    found.sort_by_key(|(b, _)| S2_BANDS.iter().position(|s| s == b));
    Ok(found)
}

/// `..._B8A.tif` -> `B8A`; `None` for other names (dot-files and temporaries included).
fn band_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    let stem = name.strip_suffix(".tif").or_else(|| name.strip_suffix(".tiff"))?;
    let band = stem.rsplit('_').next()?.to_uppercase();
    (stem.contains('_') && S2_BANDS.contains(&band.as_str())).then_some(band)
}

/// Whether `dir` looks like a BigEarthNet patch folder (holds at least one `*_Bxx.tif`).
pub(crate) fn is_patch_folder(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| band_of(&e.path()).is_some()))
        .unwrap_or(false)
}

/// `bigearthnet-v2` for reBEN names (`..._N9999_R022_T33UUP_26_57`), else `bigearthnet-v1`.
pub(crate) fn version(dir: &Path) -> &'static str {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.split('_').count() >= 7 { "bigearthnet-v2" } else { "bigearthnet-v1" }
}

/// The `labels` of `*_labels_metadata.json`, empty when there is no such file or it is unreadable.
pub(crate) fn labels(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let Some(json) = entries.flatten().map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("_labels_metadata.json"))
    }) else {
        return Vec::new();
    };
    let parsed = std::fs::read(&json).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let Some(value) = parsed else {
        log::debug!("{}: labels metadata unreadable, ignored", json.display());
        return Vec::new();
    };
    value["labels"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// A folder's selected bands, decoded and on the 10 m grid, as raw DN (NaN for nodata).
pub(crate) struct FolderSource {
    pub width: usize,
    pub height: usize,
    /// `[C, H, W]`.
    pub data: Vec<f32>,
}

impl RowSource for FolderSource {
    fn width(&self) -> usize {
        self.width
    }
    fn height(&self) -> usize {
        self.height
    }
    fn read_rows(&mut self, rows: Range<usize>, out: &mut [f32]) -> Result<(), TileError> {
        let (w, n) = (self.width, rows.len());
        let plane = self.width * self.height;
        for (c, dst) in out.chunks_exact_mut(n * w).enumerate() {
            dst.copy_from_slice(&self.data[c * plane + rows.start * w..][..n * w]);
        }
        Ok(())
    }
    fn resident(&self) -> Option<&[f32]> {
        Some(&self.data)
    }
}

/// One band file decoded whole (these are at most 120 x 120 px).
pub(crate) struct BandPlane {
    pub file: TiffFile,
    pub values: Vec<f32>,
}

/// Open and decode one single-band file.
pub(crate) fn read_band(path: &Path, cfg: &TileConfig) -> Result<BandPlane, TileError> {
    let mut file = TiffFile::open(path, cfg)?;
    if file.meta.samples != 1 {
        return Err(TileError::BandSizes {
            path: path.to_path_buf(),
            detail: format!("{} samples in a per-band file; expected 1", file.meta.samples),
        });
    }
    let mut values = vec![0f32; file.meta.width * file.meta.height];
    file.read_rows(0..file.meta.height, &[0], &mut values)?;
    Ok(BandPlane { file, values })
}

/// Decode `cfg.bands` of the folder and resample them to the finest band's grid.
pub(crate) fn open(dir: &Path, cfg: &TileConfig) -> Result<FolderSource, TileError> {
    let files = band_files(dir)?;
    let available: Vec<String> = files.iter().map(|(b, _)| b.clone()).collect();
    let mut planes = Vec::with_capacity(cfg.bands.len());
    for band in &cfg.bands {
        let (_, path) = files.iter().find(|(b, _)| b == band).ok_or_else(|| TileError::MissingBand {
            path: dir.to_path_buf(),
            band: band.clone(),
            available: available.clone(),
        })?;
        planes.push(read_band(path, cfg)?);
    }
    let (width, height) = grid(&files, &planes, cfg)?;
    let mut data = Vec::with_capacity(planes.len() * width * height);
    for plane in planes {
        data.extend(to_grid(plane, width, height)?);
    }
    Ok(FolderSource { width, height, data })
}

/// Size of the 10 m grid: the largest selected band, or a 10 m band file's size when only coarser
/// bands are selected.
fn grid(
    files: &[(String, PathBuf)],
    planes: &[BandPlane],
    cfg: &TileConfig,
) -> Result<(usize, usize), TileError> {
    let selected = planes.iter().map(|p| (p.file.meta.width, p.file.meta.height)).max().unwrap_or((0, 0));
    if planes
        .iter()
        .any(|p| TEN_METRE.iter().any(|b| p.file.path.to_string_lossy().ends_with(&format!("_{b}.tif"))))
    {
        return Ok(selected);
    }
    match files.iter().find(|(b, _)| TEN_METRE.contains(&b.as_str())) {
        Some((_, path)) => {
            let meta = &TiffFile::open(path, cfg)?.meta;
            Ok((meta.width, meta.height).max(selected))
        }
        None => Ok(selected),
    }
}

/// The bands Sentinel-2 records at 10 m.
const TEN_METRE: [&str; 4] = ["B02", "B03", "B04", "B08"];

/// The band on the `width x height` grid; its size must divide the grid evenly with one factor.
fn to_grid(plane: BandPlane, width: usize, height: usize) -> Result<Vec<f32>, TileError> {
    let (w, h) = (plane.file.meta.width, plane.file.meta.height);
    if (w, h) == (width, height) {
        return Ok(plane.values);
    }
    if width % w != 0 || height % h != 0 || width / w != height / h {
        return Err(TileError::BandSizes {
            path: plane.file.path.clone(),
            detail: format!(
                "{w}x{h} px does not divide the {width}x{height} px grid of the finest band evenly"
            ),
        });
    }
    Ok(resize_bicubic(&plane.values, w, h, width, height))
}
