//! Stacked multi-band GeoTIFFs: naming the file's bands (GDAL descriptions, else the configured
//! layout) and streaming rows of the selected bands.

use std::ops::Range;
use std::path::Path;

use super::TileError;
use super::cut::RowSource;
use super::tiff_file::TiffFile;
use crate::config::{LAYOUT_PRESETS, TileConfig, check_band_name, parse_layout};

/// A stacked file with the file samples to read, one per output channel.
pub(crate) struct StackedSource {
    pub file: TiffFile,
    pub samples: Vec<usize>,
}

impl RowSource for StackedSource {
    fn width(&self) -> usize {
        self.file.meta.width
    }
    fn height(&self) -> usize {
        self.file.meta.height
    }
    fn read_rows(&mut self, rows: Range<usize>, out: &mut [f32]) -> Result<(), TileError> {
        self.file.read_rows(rows, &self.samples, out)
    }
}

/// Band names of the file's samples: GDAL band descriptions when every sample has a valid one,
/// else the layout `cfg.tile.layout`, which must have as many names as the file has bands.
pub(crate) fn band_names(file: &TiffFile, layout: &str) -> Result<Vec<String>, TileError> {
    let described: Option<Vec<String>> = file
        .meta
        .descriptions
        .iter()
        .map(|d| d.as_ref().map(|s| s.trim().to_uppercase()).filter(|s| check_band_name(s).is_ok()))
        .collect();
    if let Some(names) = described.filter(|n| n.len() == file.meta.samples) {
        return Ok(names);
    }
    let names = parse_layout(layout)
        .map_err(|reason| TileError::NotAnInput { path: file.path.clone(), detail: reason })?;
    if names.len() != file.meta.samples {
        return Err(TileError::BandCount {
            path: file.path.clone(),
            found: file.meta.samples,
            layout: layout.to_string(),
            expected: names.len(),
            hint: layout_hint(file.meta.samples),
        });
    }
    Ok(names)
}

/// A preset with `n` bands, or the shape of an explicit list.
fn layout_hint(n: usize) -> String {
    LAYOUT_PRESETS
        .iter()
        .find(|(_, bands)| bands.len() == n)
        .map(|(name, _)| name.to_string())
        .unwrap_or_else(|| format!("<{n} band names, e.g. B02,B03,...>"))
}

/// Positions of `wanted` in `names`, or which band is missing.
pub(crate) fn select(path: &Path, names: &[String], wanted: &[String]) -> Result<Vec<usize>, TileError> {
    wanted
        .iter()
        .map(|band| {
            names.iter().position(|n| n == band).ok_or_else(|| TileError::MissingBand {
                path: path.to_path_buf(),
                band: band.clone(),
                available: names.to_vec(),
            })
        })
        .collect()
}

/// Open a stacked file and pick `cfg.bands` from it.
pub(crate) fn open(path: &Path, cfg: &TileConfig) -> Result<StackedSource, TileError> {
    let file = TiffFile::open(path, cfg)?;
    let names = band_names(&file, &cfg.layout)?;
    let samples = select(path, &names, &cfg.bands)?;
    Ok(StackedSource { file, samples })
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use super::*;
    use crate::tile::Patch;
    use crate::tile::cut::cut_patches;

    fn patches(source: &mut StackedSource, path: &Path, cfg: &TileConfig) -> Vec<Patch> {
        let mut out = Vec::new();
        cut_patches(source, &cfg.bands, path, cfg, &mut |p| {
            out.push(p);
            ControlFlow::Continue(())
        })
        .expect("bundled tile decodes");
        out
    }

    /// Two paths that must agree get the same input (ripgrep's `SearcherTester` idea): the raw
    /// strip path and the `tiff` crate path must give identical patches, for the whole tile and
    /// for windows whose rows start and end inside strips.
    #[test]
    fn raw_strip_path_and_decoder_path_give_identical_patches_on_real_tiles() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eurosat-ms");
        let whole = TileConfig { layout: "eurosat13".into(), ..TileConfig::default() };
        let windows = TileConfig { patch_px: 24, stride_px: 13, max_nodata_fraction: 1.0, ..whole.clone() };
        for name in ["AnnualCrop/AnnualCrop_1.tif", "Forest/Forest_1.tif", "SeaLake/SeaLake_8.tif"] {
            let path = data.join(name);
            for cfg in [&whole, &windows] {
                let mut fast = open(&path, cfg).expect("bundled tile opens");
                assert!(fast.file.has_fast_path(), "{name} should take the raw strip path");
                let mut slow = open(&path, cfg).expect("bundled tile opens");
                slow.file.disable_fast_path();
                let (a, b) = (patches(&mut fast, &path, cfg), patches(&mut slow, &path, cfg));
                assert!(!a.is_empty() && a.iter().any(|p| p.data.iter().any(|&v| v > 0.0)), "{name}");
                assert_eq!(a, b, "{name} with patch_px {}", cfg.patch_px);
            }
        }
    }
}
