//! The fast path for the commonest small input (EuroSAT): uncompressed, unpredicted,
//! pixel-interleaved u16 strips of a file already read into memory. Their bytes are the samples,
//! so rows are converted straight from the file bytes into the caller's planes, without the `tiff`
//! crate's per-strip buffer.
//!
//! [`RawStrips::detect`] enables the path only when every strip lies whole inside the file and is
//! exactly as long as its rows; anything else (other codecs, predictors, WhiteIsZero, short or
//! overlong strips, offsets past the end) stays on the decoder path, so broken files fail there
//! with the same errors as before.

use std::ops::Range;

/// Where the rows of a raw u16 strip image lie in the file bytes.
#[derive(Debug)]
pub(crate) struct RawStrips {
    /// File offset of each strip.
    offsets: Vec<usize>,
    rows_per_strip: usize,
    width: usize,
    height: usize,
    /// Samples per pixel.
    spp: usize,
    big_endian: bool,
}

/// What the header says about the image, as far as the fast path needs it.
pub(crate) struct StripLayout<'a> {
    pub width: usize,
    pub height: usize,
    pub spp: usize,
    pub rows_per_strip: usize,
    pub offsets: &'a [u64],
    pub byte_counts: &'a [u64],
}

impl RawStrips {
    /// The fast path for `layout` within `file` (the whole file), or `None` when a strip is
    /// missing, misplaced or not exactly `rows * width * spp * 2` bytes long.
    pub fn detect(file: &[u8], layout: &StripLayout) -> Option<RawStrips> {
        let StripLayout { width, height, spp, rows_per_strip, offsets, byte_counts } = *layout;
        if width == 0 || spp == 0 || rows_per_strip == 0 {
            return None;
        }
        let strips = height.div_ceil(rows_per_strip);
        if offsets.len() != strips || byte_counts.len() != strips {
            return None;
        }
        let row_bytes = width.checked_mul(spp)?.checked_mul(2)?;
        let mut starts = Vec::with_capacity(strips);
        for (i, (&offset, &count)) in offsets.iter().zip(byte_counts).enumerate() {
            let rows = rows_per_strip.min(height - i * rows_per_strip);
            let expected = row_bytes.checked_mul(rows)?;
            let offset = usize::try_from(offset).ok()?;
            let end = offset.checked_add(expected)?;
            if usize::try_from(count).ok()? != expected || end > file.len() {
                return None;
            }
            starts.push(offset);
        }
        let big_endian = file.starts_with(b"MM");
        Some(RawStrips { offsets: starts, rows_per_strip, width, height, spp, big_endian })
    }

    /// Fill `out` (`[bands.len(), rows.len(), width]`) with rows `rows` of the samples `bands`
    /// as f32, `nodata` becoming NaN. `false` (and nothing written) when `rows` or `bands` lie
    /// outside the image or `out` is too short, so the caller can take the decoder path.
    pub fn read_rows(
        &self,
        file: &[u8],
        rows: Range<usize>,
        bands: &[usize],
        nodata: Option<f32>,
        out: &mut [f32],
    ) -> bool {
        let plane = rows.len() * self.width;
        if rows.end > self.height || bands.iter().any(|&b| b >= self.spp) || out.len() < bands.len() * plane {
            return false;
        }
        let row_bytes = self.width * self.spp * 2;
        for (i, y) in rows.enumerate() {
            let start = self.offsets[y / self.rows_per_strip] + (y % self.rows_per_strip) * row_bytes;
            let Some(row) = file.get(start..start + row_bytes) else { return false };
            for (c, &band) in bands.iter().enumerate() {
                let dst = &mut out[c * plane + i * self.width..][..self.width];
                self.convert(row, band, dst);
                if let Some(nodata) = nodata {
                    mask(dst, nodata);
                }
            }
        }
        true
    }

    /// Sample `band` of each pixel of `row` into `dst`.
    fn convert(&self, row: &[u8], band: usize, dst: &mut [f32]) {
        let pixels = row.chunks_exact(self.spp * 2);
        let at = 2 * band;
        if self.big_endian {
            for (d, px) in dst.iter_mut().zip(pixels) {
                *d = f32::from(u16::from_be_bytes([px[at], px[at + 1]]));
            }
        } else {
            for (d, px) in dst.iter_mut().zip(pixels) {
                *d = f32::from(u16::from_le_bytes([px[at], px[at + 1]]));
            }
        }
    }
}

/// The nodata value becomes NaN.
fn mask(values: &mut [f32], nodata: f32) {
    for v in values {
        if *v == nodata {
            *v = f32::NAN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian 2x3 image, 2 samples per pixel, 2 rows per strip, strips at 8 and 40.
    fn file() -> (Vec<u8>, Vec<u64>, Vec<u64>) {
        let mut bytes = vec![0u8; 8];
        let values: Vec<u16> = (0..12).map(|v| v * 1000 + 1).collect();
        for v in &values[..8] {
            bytes.extend(v.to_le_bytes());
        }
        bytes.resize(40, 0);
        for v in &values[8..] {
            bytes.extend(v.to_le_bytes());
        }
        (bytes, vec![8, 40], vec![16, 8])
    }

    fn layout<'a>(offsets: &'a [u64], counts: &'a [u64]) -> StripLayout<'a> {
        StripLayout { width: 2, height: 3, spp: 2, rows_per_strip: 2, offsets, byte_counts: counts }
    }

    #[test]
    fn rows_come_straight_from_the_strip_bytes() {
        let (bytes, offsets, counts) = file();
        let raw = RawStrips::detect(&bytes, &layout(&offsets, &counts)).expect("a valid layout");
        let mut out = vec![0f32; 2 * 2 * 2];
        assert!(raw.read_rows(&bytes, 1..3, &[1, 0], Some(8001.0), &mut out));
        // Band 1 of rows 1 and 2, then band 0; 8001 is nodata.
        assert_eq!(out[..4], [5001.0, 7001.0, 9001.0, 11001.0]);
        assert_eq!(out[4..6], [4001.0, 6001.0]);
        assert!(out[6].is_nan() && out[7] == 10001.0);
    }

    #[test]
    fn big_endian_files_are_read_in_their_byte_order() {
        let mut bytes = b"MM\0*\0\0\0\0".to_vec();
        for v in [1u16, 258, 513, 65535] {
            bytes.extend(v.to_be_bytes());
        }
        let layout =
            StripLayout { width: 2, height: 1, spp: 2, rows_per_strip: 1, offsets: &[8], byte_counts: &[8] };
        let raw = RawStrips::detect(&bytes, &layout).expect("a valid layout");
        let mut out = [0f32; 2];
        assert!(raw.read_rows(&bytes, 0..1, &[1], None, &mut out));
        assert_eq!(out, [258.0, 65535.0]);
    }

    #[test]
    fn strips_that_are_short_long_or_past_the_end_are_left_to_the_decoder() {
        let (bytes, offsets, counts) = file();
        for (offsets, counts) in [
            (offsets.clone(), vec![16, 7]),
            (offsets.clone(), vec![16, 16]),
            (vec![8, 41], counts.clone()),
            (vec![8, u64::MAX], counts.clone()),
            (vec![8], vec![16]),
        ] {
            assert!(
                RawStrips::detect(&bytes, &layout(&offsets, &counts)).is_none(),
                "{offsets:?} {counts:?}"
            );
        }
    }

    #[test]
    fn bands_or_rows_outside_the_image_are_refused_without_writing() {
        let (bytes, offsets, counts) = file();
        let raw = RawStrips::detect(&bytes, &layout(&offsets, &counts)).expect("a valid layout");
        let mut out = vec![0f32; 8];
        assert!(!raw.read_rows(&bytes, 0..2, &[2], None, &mut out));
        assert!(!raw.read_rows(&bytes, 2..4, &[0], None, &mut out));
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
