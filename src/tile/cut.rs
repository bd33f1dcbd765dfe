//! Cutting an image into patches: the rows of one patch row are read into a small buffer
//! (`[C, patch_px, width]`, never the whole image), then each window is masked, scaled to
//! reflectance and handed on, or skipped when too much of it is nodata.

use std::ops::{ControlFlow, Range};
use std::path::Path;

use super::{Patch, PatchCount, TileError, Window};
use crate::config::TileConfig;

/// Something that can fill rows of its selected bands: raw sample values as f32, NaN for nodata.
pub(crate) trait RowSource {
    fn width(&self) -> usize;
    fn height(&self) -> usize;
    /// Fill `out` (`[bands, rows.len(), width]`) with rows `rows`.
    fn read_rows(&mut self, rows: Range<usize>, out: &mut [f32]) -> Result<(), TileError>;
    /// The whole `[bands, height, width]` image when it is already in memory (BigEarthNet
    /// folders), so windows are cut from it without a row-buffer copy.
    fn resident(&self) -> Option<&[f32]> {
        None
    }
}

/// A `[bands, height, width]` buffer holding image rows `y0..y0 + height`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    values: &'a [f32],
    width: usize,
    height: usize,
    y0: usize,
}

/// Patch origins along one axis: a side of `min(patch_px, dim)` stepped by `stride`, so an image
/// smaller than the patch (EuroSAT's 64 px) is one patch of its own size.
fn origins(dim: usize, side: usize, stride: usize) -> impl Iterator<Item = usize> {
    (0..=dim - side).step_by(stride)
}

/// Cut `source` into patches per `cfg` and hand each to `sink`; stops early when `sink` breaks.
pub(crate) fn cut_patches(
    source: &mut dyn RowSource,
    bands: &[String],
    path: &Path,
    cfg: &TileConfig,
    sink: &mut dyn FnMut(Patch) -> ControlFlow<()>,
) -> Result<PatchCount, TileError> {
    let mut cutter = Cutter::new(source, bands, path, cfg);
    let mut count = PatchCount::default();
    for y in origins(cutter.height, cutter.side_h, cfg.stride_px) {
        if cutter.cut_row(y, None, &mut count, sink)?.is_break() {
            break;
        }
    }
    Ok(count)
}

/// The patches of one patch row (windows whose top row is `y`; only the one at column `x` when
/// given), to `sink`, in the order [`cut_patches`] gives them. A `y` or `x` that is not a window
/// origin under `cfg` gives no patch.
pub(crate) fn cut_row(
    source: &mut dyn RowSource,
    bands: &[String],
    path: &Path,
    cfg: &TileConfig,
    (y, x): (usize, Option<usize>),
    sink: &mut dyn FnMut(Patch) -> ControlFlow<()>,
) -> Result<PatchCount, TileError> {
    let mut cutter = Cutter::new(source, bands, path, cfg);
    let mut count = PatchCount::default();
    if origins(cutter.height, cutter.side_h, cfg.stride_px).any(|o| o == y) {
        // The only row: whether the sink wants more does not matter.
        let _ = cutter.cut_row(y, x, &mut count, sink)?;
    }
    Ok(count)
}

/// What cutting one image needs between patch rows: the source, its window sides and the buffer
/// of one patch row.
struct Cutter<'a> {
    source: &'a mut dyn RowSource,
    bands: &'a [String],
    path: &'a Path,
    cfg: &'a TileConfig,
    width: usize,
    height: usize,
    side_w: usize,
    side_h: usize,
    buffer: Vec<f32>,
}

impl<'a> Cutter<'a> {
    fn new(source: &'a mut dyn RowSource, bands: &'a [String], path: &'a Path, cfg: &'a TileConfig) -> Self {
        let (width, height) = (source.width(), source.height());
        let (side_w, side_h) = (cfg.patch_px.min(width), cfg.patch_px.min(height));
        Cutter { source, bands, path, cfg, width, height, side_w, side_h, buffer: Vec::new() }
    }

    /// Cut the windows of patch row `y` (only column `x` when given), counting and skipping those
    /// over the nodata threshold.
    fn cut_row(
        &mut self,
        y: usize,
        x: Option<usize>,
        count: &mut PatchCount,
        sink: &mut dyn FnMut(Patch) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, TileError> {
        let mut emit = |patch: Patch| {
            if patch.nodata_fraction > self.cfg.max_nodata_fraction {
                count.skipped += 1;
                return ControlFlow::Continue(());
            }
            count.yielded += 1;
            sink(patch)
        };
        let (width, side_w, side_h) = (self.width, self.side_w, self.side_h);
        let columns: Vec<usize> = match x {
            Some(x) => origins(width, side_w, self.cfg.stride_px).filter(|&o| o == x).collect(),
            None => origins(width, side_w, self.cfg.stride_px).collect(),
        };
        let window =
            |x: usize| Window { x: x as u32, y: y as u32, width: side_w as u32, height: side_h as u32 };
        let resident = self.source.resident().is_some();
        if !resident && (side_w, side_h) == (width, self.height) {
            // One window covers the image (EuroSAT): read straight into the patch.
            let mut data = vec![0f32; self.bands.len() * width * side_h];
            self.source.read_rows(0..side_h, &mut data)?;
            return Ok(emit(finish(data, window(0), self.bands, self.path)));
        }
        if !resident {
            self.buffer.resize(self.bands.len() * side_h * width, 0.0);
            self.source.read_rows(y..y + side_h, &mut self.buffer)?;
        }
        let rows = match self.source.resident() {
            Some(values) => Rows { values, width, height: self.height, y0: 0 },
            None => Rows { values: &self.buffer, width, height: side_h, y0: y },
        };
        for x in columns {
            if emit(extract(rows, window(x), self.bands, self.path)).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// One window of the row buffer as a patch.
fn extract(rows: Rows, window: Window, bands: &[String], path: &Path) -> Patch {
    let (w, h) = (window.width as usize, window.height as usize);
    let mut data = Vec::with_capacity(bands.len() * h * w);
    for c in 0..bands.len() {
        for r in 0..h {
            let start = (c * rows.height + window.y as usize - rows.y0 + r) * rows.width + window.x as usize;
            data.extend_from_slice(&rows.values[start..start + w]);
        }
    }
    finish(data, window, bands, path)
}

/// Raw `[C, H, W]` values of `window` to reflectance, in place: NaN becomes 0 and, like all-zero
/// pixels, counts towards the nodata fraction.
fn finish(mut data: Vec<f32>, window: Window, bands: &[String], path: &Path) -> Patch {
    let (w, h) = (window.width as usize, window.height as usize);
    let plane = h * w;
    // Per pixel: bit 0 = some band is nodata, bit 1 = some band is a non-zero value. u32 like the
    // samples, so the pass vectorises lane for lane.
    let mut flags = vec![0u32; plane];
    for channel in data.chunks_exact_mut(plane) {
        scale_channel(channel, &mut flags);
    }
    let nodata = flags.iter().filter(|&&f| f != 2).count();
    Patch {
        data,
        bands: bands.to_vec(),
        height: h,
        width: w,
        source: path.to_path_buf(),
        window,
        nodata_fraction: nodata as f32 / plane as f32,
    }
}

/// One channel to reflectance (NaN to 0), marking its nodata and non-zero pixels in `flags`.
/// Branch-free so that it vectorises.
fn scale_channel(channel: &mut [f32], flags: &mut [u32]) {
    for (v, f) in channel.iter_mut().zip(flags.iter_mut()) {
        let x = *v;
        let nodata = x.is_nan();
        // `abs() > 0` is false for NaN and zero alike.
        *f |= u32::from(nodata) | (u32::from(x.abs() > 0.0) << 1);
        *v = if nodata { 0.0 } else { x / 10000.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ramp {
        width: usize,
        height: usize,
    }

    impl RowSource for Ramp {
        fn width(&self) -> usize {
            self.width
        }
        fn height(&self) -> usize {
            self.height
        }
        fn read_rows(&mut self, rows: Range<usize>, out: &mut [f32]) -> Result<(), TileError> {
            let n = rows.len();
            for (i, y) in rows.enumerate() {
                for x in 0..self.width {
                    // Left half nodata in the first band, zero everywhere in the top row.
                    out[i * self.width + x] =
                        if x < self.width / 2 { f32::NAN } else { (y * 100 + x) as f32 };
                    out[(n + i) * self.width + x] = if y == 0 { 0.0 } else { 5000.0 };
                }
            }
            Ok(())
        }
    }

    fn cut(width: usize, height: usize, cfg: &TileConfig) -> (Vec<Patch>, PatchCount) {
        let mut out = Vec::new();
        let bands = ["B02".to_string(), "B03".to_string()];
        let mut src = Ramp { width, height };
        let count = cut_patches(&mut src, &bands, Path::new("x"), cfg, &mut |p| {
            out.push(p);
            ControlFlow::Continue(())
        })
        .unwrap();
        (out, count)
    }

    #[test]
    fn image_smaller_than_the_patch_is_one_patch_of_its_own_size() {
        let cfg = TileConfig { max_nodata_fraction: 1.0, ..TileConfig::default() };
        let (patches, _) = cut(64, 64, &cfg);
        assert_eq!(patches.len(), 1);
        assert_eq!((patches[0].width, patches[0].height), (64, 64));
    }

    #[test]
    fn windows_follow_the_stride_and_drop_partial_edges() {
        let cfg = TileConfig { patch_px: 4, stride_px: 3, max_nodata_fraction: 1.0, ..TileConfig::default() };
        let (patches, count) = cut(10, 8, &cfg);
        let origins: Vec<_> = patches.iter().map(|p| (p.window.x, p.window.y)).collect();
        assert_eq!(origins, [(0, 0), (3, 0), (6, 0), (0, 3), (3, 3), (6, 3)]);
        assert_eq!(count.yielded, 6);
    }

    #[test]
    fn nodata_becomes_zero_and_is_counted() {
        let cfg = TileConfig { patch_px: 4, stride_px: 4, max_nodata_fraction: 1.0, ..TileConfig::default() };
        let (patches, _) = cut(8, 8, &cfg);
        let left = &patches[0];
        assert!(left.plane(0).iter().all(|&v| v == 0.0));
        assert_eq!(left.nodata_fraction, 1.0);
        let right = &patches[1];
        // Only the first row (band 2 zero, band 1 valid) is fine: valid band 1 keeps it a data pixel.
        assert_eq!(right.nodata_fraction, 0.0);
        assert!((right.plane(0)[5] - 105.0 / 10000.0).abs() < 1e-9, "{}", right.plane(0)[5]);
    }

    #[test]
    fn patches_above_the_nodata_threshold_are_skipped() {
        let cfg = TileConfig { patch_px: 4, stride_px: 4, max_nodata_fraction: 0.5, ..TileConfig::default() };
        let (patches, count) = cut(8, 8, &cfg);
        assert_eq!((patches.len(), count.skipped), (2, 2));
        assert!(patches.iter().all(|p| p.window.x == 4));
    }
}
