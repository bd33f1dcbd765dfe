//! `inspect`: what an input is (format, size, bands, sample type, compression, layout,
//! georeference, nodata) and per-band reflectance statistics, computed by streaming rows.

use std::path::{Path, PathBuf};

use super::bigearthnet;
use super::tiff_file::{Georef, TiffFile};
use super::{Input, InputKind, TileError};
use crate::config::TileConfig;

/// Everything `dinostream inspect` reports about one input.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InputInfo {
    /// The file or folder.
    pub path: PathBuf,
    /// `geotiff`, `bigearthnet-v1` or `bigearthnet-v2`.
    pub format: String,
    /// Width in pixels (the finest band's grid for folders).
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Sample type: `u8`, `u16`, `i16`, `u32`, `f32`, ...
    pub data_type: String,
    /// `none`, `deflate`, `lzw`, `zstd`, ...
    pub compression: String,
    /// `chunky` (pixel-interleaved) or `planar`.
    pub interleave: String,
    /// `strips WxH` or `tiles WxH`.
    pub chunking: String,
    /// GeoTIFF georeference, when the file has one.
    pub georef: Option<Georef>,
    /// The nodata value in effect (GDAL_NODATA, else `tile.nodata`).
    pub nodata: Option<f64>,
    /// Labels from BigEarthNet's `*_labels_metadata.json` (empty otherwise).
    pub labels: Vec<String>,
    /// Every band of the input, in file order.
    pub bands: Vec<BandInfo>,
    /// Set when the bands could not be named (they are then named by index, `#1`, `#2 (GDAL
    /// description)`, ...): why, and which `--layout` would name them.
    pub band_names_note: Option<String>,
}

/// One band's size and reflectance statistics over its valid (not nodata) pixels.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BandInfo {
    /// Band name (`B04`).
    pub name: String,
    /// Native width of this band.
    pub width: usize,
    /// Native height of this band.
    pub height: usize,
    /// Smallest reflectance.
    pub min: f64,
    /// Mean reflectance.
    pub mean: f64,
    /// Largest reflectance.
    pub max: f64,
    /// Pixels that were not nodata.
    pub valid_px: u64,
}

/// Running min / sum / max of one band.
#[derive(Clone)]
struct Accumulator {
    min: f64,
    max: f64,
    sum: f64,
    n: u64,
}

impl Accumulator {
    fn new() -> Self {
        Accumulator { min: f64::INFINITY, max: f64::NEG_INFINITY, sum: 0.0, n: 0 }
    }

    fn add(&mut self, values: &[f32]) {
        for &v in values.iter().filter(|v| !v.is_nan()) {
            let r = (v / 10000.0) as f64;
            self.min = self.min.min(r);
            self.max = self.max.max(r);
            self.sum += r;
            self.n += 1;
        }
    }

    fn finish(&self, name: &str, width: usize, height: usize) -> BandInfo {
        let (min, mean, max) =
            if self.n == 0 { (0.0, 0.0, 0.0) } else { (self.min, self.sum / self.n as f64, self.max) };
        BandInfo { name: name.to_string(), width, height, min, mean, max, valid_px: self.n }
    }
}

/// Describe one input.
pub fn inspect(input: &Input, cfg: &TileConfig) -> Result<InputInfo, TileError> {
    match input.kind {
        InputKind::Stacked => inspect_stacked(&input.path, cfg),
        InputKind::BigEarthNet => inspect_folder(&input.path, cfg),
    }
}

fn inspect_stacked(path: &Path, cfg: &TileConfig) -> Result<InputInfo, TileError> {
    let mut file = TiffFile::open(path, cfg)?;
    let (names, note) = match super::stacked::band_names(&file, &cfg.layout) {
        Ok(names) => (names, None),
        Err(TileError::BandCount { found, layout, expected, hint, .. }) => {
            let note = format!(
                "{found} bands but layout `{layout}` has {expected}; `--layout {hint}` would name them"
            );
            (names_by_index(&file), Some(note))
        }
        Err(e) => return Err(e),
    };
    let (w, h) = (file.meta.width, file.meta.height);
    let all: Vec<usize> = (0..names.len()).collect();
    let step = file.meta.chunk.1.clamp(1, h);
    let mut acc = vec![Accumulator::new(); names.len()];
    let mut buf = vec![0f32; names.len() * step * w];
    for y in (0..h).step_by(step) {
        let rows = y..(y + step).min(h);
        let n = rows.len() * w;
        file.read_rows(rows, &all, &mut buf[..names.len() * n])?;
        for (a, plane) in acc.iter_mut().zip(buf.chunks_exact(n)) {
            a.add(plane);
        }
    }
    let bands = names.iter().zip(&acc).map(|(n, a)| a.finish(n, w, h)).collect();
    let mut info = describe(&file, "geotiff".into(), bands, Vec::new());
    info.band_names_note = note;
    Ok(info)
}

/// `#1`, `#2 (B03)`, ...: each band's number, with its GDAL description when it has one.
fn names_by_index(file: &TiffFile) -> Vec<String> {
    (0..file.meta.samples)
        .map(|i| match file.meta.descriptions.get(i).cloned().flatten() {
            Some(d) => format!("#{} ({d})", i + 1),
            None => format!("#{}", i + 1),
        })
        .collect()
}

fn inspect_folder(dir: &Path, cfg: &TileConfig) -> Result<InputInfo, TileError> {
    let files = bigearthnet::band_files(dir)?;
    let mut bands = Vec::with_capacity(files.len());
    let mut finest: Option<TiffFile> = None;
    for (name, path) in &files {
        let plane = bigearthnet::read_band(path, cfg)?;
        let mut acc = Accumulator::new();
        acc.add(&plane.values);
        bands.push(acc.finish(name, plane.file.meta.width, plane.file.meta.height));
        if finest.as_ref().is_none_or(|f| f.meta.width < plane.file.meta.width) {
            finest = Some(plane.file);
        }
    }
    let file = finest
        .ok_or_else(|| TileError::NotAnInput { path: dir.to_path_buf(), detail: "no band files".into() })?;
    let mut info = describe(&file, bigearthnet::version(dir).into(), bands, bigearthnet::labels(dir));
    info.path = dir.to_path_buf();
    Ok(info)
}

fn describe(file: &TiffFile, format: String, bands: Vec<BandInfo>, labels: Vec<String>) -> InputInfo {
    let m = &file.meta;
    let chunk_kind = if m.tiled { "tiles" } else { "strips" };
    InputInfo {
        path: file.path.clone(),
        format,
        width: m.width,
        height: m.height,
        data_type: m.data_type.clone(),
        compression: m.compression.clone(),
        interleave: if m.planar { "planar" } else { "chunky" }.into(),
        chunking: format!("{chunk_kind} {}x{}", m.chunk.0, m.chunk.1),
        georef: m.georef.clone(),
        nodata: m.nodata,
        labels,
        bands,
        band_names_note: None,
    }
}
