//! One TIFF file: header checks, the metadata dinostream needs (size, sample type, layout, GDAL band
//! descriptions, nodata, georeference) and reading rows of chosen bands chunk by chunk.
//!
//! Nothing here allocates in proportion to the whole image: the declared size is checked against
//! the limits before decoding, and rows are read one strip or tile at a time into the caller's
//! buffer. Every call into the `tiff` crate goes through [`guard`], the crate's only panic boundary.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;

use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

use super::TileError;
use super::chunks;
use super::raw_strips::{RawStrips, StripLayout};
use crate::config::TileConfig;

/// The largest strip or tile the decoder may inflate at once. Files with bigger chunks (one strip
/// for a whole scene) are refused: reading them would mean holding the scene in memory.
const MAX_CHUNK_BYTES: usize = 256 << 20;

/// Files up to this size are read into memory with one read; larger ones are read as needed.
const SMALL_FILE_BYTES: u64 = 8 << 20;

/// The bytes of a file: all in memory when small (one `read` instead of one per strip), else a
/// buffered reader.
pub(crate) enum FileReader {
    Memory(std::io::Cursor<Vec<u8>>),
    Disk(BufReader<File>),
}

impl FileReader {
    /// The whole file, when it is in memory.
    fn in_memory(&self) -> Option<&[u8]> {
        match self {
            FileReader::Memory(c) => Some(c.get_ref()),
            FileReader::Disk(_) => None,
        }
    }

    fn new(mut file: File, len: u64) -> std::io::Result<FileReader> {
        if len > SMALL_FILE_BYTES {
            return Ok(FileReader::Disk(BufReader::new(file)));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes)?;
        Ok(FileReader::Memory(std::io::Cursor::new(bytes)))
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            FileReader::Memory(c) => c.read(buf),
            FileReader::Disk(r) => r.read(buf),
        }
    }
}

impl Seek for FileReader {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            FileReader::Memory(c) => c.seek(pos),
            FileReader::Disk(r) => r.seek(pos),
        }
    }
}

/// Compression codes the decoder handles: none, LZW, deflate (both codes), packbits, zstd.
const SUPPORTED_COMPRESSION: [u16; 6] = [1, 5, 8, 32946, 32773, 50000];

/// Georeference from the GeoTIFF tags.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Georef {
    /// Pixel size (x, y) in CRS units (ModelPixelScale).
    pub pixel_size: Option<[f64; 2]>,
    /// CRS coordinates of the top-left corner of pixel (0, 0) (ModelTiepoint).
    pub origin: Option<[f64; 2]>,
    /// EPSG code from the GeoKeyDirectory (ProjectedCSTypeGeoKey, else GeographicTypeGeoKey).
    pub epsg: Option<u16>,
}

/// What the header says about one image.
#[derive(Debug, Clone)]
pub(crate) struct TiffMeta {
    pub width: usize,
    pub height: usize,
    pub samples: usize,
    /// `u8`, `u16`, `i16`, `u32`, `f32`, ...
    pub data_type: String,
    /// `none`, `deflate`, `lzw`, `zstd`, ...
    pub compression: String,
    pub planar: bool,
    pub tiled: bool,
    /// Strip or tile size (width, height).
    pub chunk: (usize, usize),
    /// Bytes per sample.
    pub sample_bytes: usize,
    /// GDAL band descriptions by sample index (empty when the file has none).
    pub descriptions: Vec<Option<String>>,
    pub nodata: Option<f64>,
    pub georef: Option<Georef>,
}

/// An open TIFF file ready to read rows.
pub(crate) struct TiffFile {
    pub path: PathBuf,
    pub meta: TiffMeta,
    decoder: Decoder<FileReader>,
    compression_code: u16,
    /// Chunks decoded by the last [`TiffFile::read_rows`] call, by chunk index: consecutive patch
    /// rows share strips and tiles, and each is decoded once. Holds at most the chunk rows one call
    /// touches (raw samples, not f32).
    cache: Vec<(u32, DecodingResult)>,
    /// File offset and byte count of every chunk, read once for deflate files (bomb check).
    chunk_ranges: Option<(Vec<u64>, Vec<u64>)>,
    /// Rows read straight from the file bytes (raw u16 strips), see [`RawStrips`].
    raw: Option<RawStrips>,
}

impl TiffFile {
    /// Open `path`, check its header and its declared size against `cfg`'s limits.
    pub fn open(path: &Path, cfg: &TileConfig) -> Result<TiffFile, TileError> {
        let mut reader = open_checked(path)?;
        let peeked = peek_dimensions(&mut reader);
        if let Some(p) = &peeked {
            check_limits(path, p.width, p.height, p.samples, cfg)?;
        }
        let file_len = reader.seek(SeekFrom::End(0)).map_err(|e| TileError::io(path, e))?;
        reader.seek(SeekFrom::Start(0)).map_err(|e| TileError::io(path, e))?;
        let mut limits = Limits::default();
        limits.decoding_buffer_size = MAX_CHUNK_BYTES;
        limits.intermediate_buffer_size = MAX_CHUNK_BYTES;
        let mut decoder = guard(path, || Decoder::new(reader))?.with_limits(limits);
        let (meta, compression_code) = read_meta(path, &mut decoder, cfg)?;
        let mut file = TiffFile {
            path: path.to_path_buf(),
            meta,
            decoder,
            compression_code,
            cache: Vec::new(),
            chunk_ranges: None,
            raw: None,
        };
        if let Some(p) = peeked {
            file.check_chunks(file_len, p.reserved)?;
        }
        if compression_code == 1 && raw_candidate(&file.meta) {
            file.raw = detect_raw_strips(&mut file.decoder, &file.meta);
        }
        Ok(file)
    }

    /// Every strip or tile must lie inside the file, clear of the header and the first IFD, and
    /// (uncompressed) hold exactly its pixels' bytes: see [`chunks`].
    fn check_chunks(&mut self, file_len: u64, reserved: [std::ops::Range<u64>; 2]) -> Result<(), TileError> {
        self.load_chunk_ranges()?;
        let (offsets, counts) = self.chunk_ranges.as_ref().expect("loaded just above");
        let m = &self.meta;
        let ch = m.chunk.1;
        let strips_per_plane = m.height.div_ceil(ch);
        let full = self.chunk_bytes(ch, m.sample_bytes);
        let raw_bytes = |i: usize| match m.tiled {
            true => (full, full),
            false => (self.chunk_bytes(ch.min(m.height - (i % strips_per_plane) * ch), m.sample_bytes), full),
        };
        let layout = chunks::ChunkLayout {
            noun: if m.tiled { "tile" } else { "strip" },
            offsets,
            counts,
            file_len,
            reserved,
            raw_bytes: (self.compression_code == 1).then_some(&raw_bytes as &dyn Fn(usize) -> (u64, u64)),
        };
        chunks::check(&self.path, &layout)
    }

    /// The offsets and byte counts of every chunk (read from the tags once).
    fn load_chunk_ranges(&mut self) -> Result<(), TileError> {
        if self.chunk_ranges.is_none() {
            let (offsets, counts) = match self.meta.tiled {
                true => (Tag::TileOffsets, Tag::TileByteCounts),
                false => (Tag::StripOffsets, Tag::StripByteCounts),
            };
            let decoder = &mut self.decoder;
            let offsets = guard(&self.path, || decoder.get_tag_u64_vec(offsets))?;
            let counts = guard(&self.path, || decoder.get_tag_u64_vec(counts))?;
            self.chunk_ranges = Some((offsets, counts));
        }
        Ok(())
    }

    /// Read every row through the `tiff` crate, as files without the fast path do (tests that
    /// compare both paths).
    #[cfg(test)]
    pub fn disable_fast_path(&mut self) {
        self.raw = None;
    }

    /// Whether rows are read straight from the file bytes.
    #[cfg(test)]
    pub fn has_fast_path(&self) -> bool {
        self.raw.is_some()
    }

    /// Fill `out` (`[bands.len(), rows.len(), width]`, sample values as f32 with NaN for nodata)
    /// with rows `rows` of the file samples `bands`.
    pub fn read_rows(
        &mut self,
        rows: std::ops::Range<usize>,
        bands: &[usize],
        out: &mut [f32],
    ) -> Result<(), TileError> {
        if let (Some(raw), Some(bytes)) = (&self.raw, self.decoder.inner().in_memory()) {
            let nodata = self.meta.nodata.map(|v| v as f32);
            if raw.read_rows(bytes, rows.clone(), bands, nodata, out) {
                return Ok(());
            }
        }
        let (cw, ch) = self.meta.chunk;
        let across = self.meta.width.div_ceil(cw);
        let down = self.meta.height.div_ceil(ch);
        let planes: Vec<usize> = if self.meta.planar { bands.to_vec() } else { vec![0] };
        // Chunks not used by this call are dropped: rows only move down between calls.
        let mut previous = std::mem::take(&mut self.cache);
        for plane in planes {
            for cy in rows.start / ch..=(rows.end - 1) / ch {
                for cx in 0..across {
                    let index = (plane * down * across + cy * across + cx) as u32;
                    let place = ChunkPlace { x0: cx * cw, y0: cy * ch, plane };
                    let chunk = match previous.iter().position(|(i, _)| *i == index) {
                        Some(k) => previous.swap_remove(k).1,
                        None => self.read_chunk(index, place)?,
                    };
                    self.copy_chunk(&chunk, place, &rows, bands, out)?;
                    self.cache.push((index, chunk));
                }
            }
        }
        Ok(())
    }

    fn read_chunk(&mut self, index: u32, place: ChunkPlace) -> Result<DecodingResult, TileError> {
        let decoder = &mut self.decoder;
        let chunk = guard(&self.path, || decoder.read_chunk(index))?;
        if self.compression_code == 8 || self.compression_code == 32946 {
            let declared = self.declared_bytes(place, sample_bytes(&chunk));
            let range = self.chunk_range(index)?;
            check_inflated_size(&self.path, self.decoder.inner(), range, index, declared)?;
        }
        Ok(chunk)
    }

    /// File offset and compressed length of chunk `index`.
    fn chunk_range(&mut self, index: u32) -> Result<Option<(u64, u64)>, TileError> {
        self.load_chunk_ranges()?;
        let (offsets, counts) = self.chunk_ranges.as_ref().expect("loaded just above");
        let i = index as usize;
        Ok(offsets.get(i).copied().zip(counts.get(i).copied()))
    }

    /// Bytes a chunk decompresses to: whole tiles (edge tiles are padded), strips cut at the bottom.
    fn declared_bytes(&self, place: ChunkPlace, sample_bytes: usize) -> u64 {
        let ch = self.meta.chunk.1;
        let rows = if self.meta.tiled { ch } else { ch.min(self.meta.height - place.y0) };
        self.chunk_bytes(rows, sample_bytes)
    }

    /// Bytes of `rows` rows of one chunk (all samples of a pixel, or one plane's when planar).
    fn chunk_bytes(&self, rows: usize, sample_bytes: usize) -> u64 {
        let spp = if self.meta.planar { 1 } else { self.meta.samples };
        (self.meta.chunk.0 * rows * spp * sample_bytes) as u64
    }

    fn copy_chunk(
        &self,
        chunk: &DecodingResult,
        place: ChunkPlace,
        rows: &std::ops::Range<usize>,
        bands: &[usize],
        out: &mut [f32],
    ) -> Result<(), TileError> {
        let index_dims = chunk_len(chunk);
        let (cw, ch) = self.meta.chunk;
        let w = cw.min(self.meta.width - place.x0);
        let h = ch.min(self.meta.height - place.y0);
        let spp = if self.meta.planar { 1 } else { self.meta.samples };
        if index_dims < w * h * spp {
            return Err(TileError::Truncated {
                path: self.path.clone(),
                detail: format!("a chunk holds {index_dims} samples, expected {}", w * h * spp),
            });
        }
        let geo = CopyGeometry {
            w,
            h,
            spp,
            place,
            width: self.meta.width,
            rows: rows.clone(),
            nodata: self.meta.nodata,
        };
        match chunk {
            DecodingResult::U8(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::U16(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::U32(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::I8(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::I16(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::I32(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::F32(v) => geo.copy(v, bands, self.meta.planar, out),
            DecodingResult::F64(v) => geo.copy(v, bands, self.meta.planar, out),
            _ => return Err(self.unsupported("64-bit integer or 16-bit float samples")),
        }
        Ok(())
    }

    fn unsupported(&self, what: &str) -> TileError {
        TileError::Unsupported { path: self.path.clone(), detail: what.to_string() }
    }
}

/// Where a chunk lies in the image.
#[derive(Clone, Copy)]
struct ChunkPlace {
    x0: usize,
    y0: usize,
    plane: usize,
}

/// How one decoded chunk maps onto the caller's row buffer.
struct CopyGeometry {
    w: usize,
    h: usize,
    spp: usize,
    place: ChunkPlace,
    width: usize,
    rows: std::ops::Range<usize>,
    nodata: Option<f64>,
}

impl CopyGeometry {
    fn copy<T: Sample>(&self, chunk: &[T], bands: &[usize], planar: bool, out: &mut [f32]) {
        let n_rows = self.rows.len();
        let y_lo = self.rows.start.max(self.place.y0);
        let y_hi = self.rows.end.min(self.place.y0 + self.h);
        let nodata = self.nodata.map(|v| v as f32);
        // Integer samples without a nodata value cannot be nodata: plain conversion.
        let masked = T::FLOAT || nodata.is_some();
        if !masked && !planar {
            return self.copy_chunky(chunk, bands, out);
        }
        for (c, &band) in bands.iter().enumerate() {
            let (sample, stride) = match planar {
                true if band != self.place.plane => continue,
                true => (0, 1),
                false => (band, self.spp),
            };
            for y in y_lo..y_hi {
                let src = &chunk[(y - self.place.y0) * self.w * stride..][..self.w * stride];
                let dst_row = (c * n_rows + (y - self.rows.start)) * self.width + self.place.x0;
                let dst = &mut out[dst_row..dst_row + self.w];
                let values = src[sample..].iter().step_by(stride).map(|&v| v.to_f32());
                if masked {
                    for (d, v) in dst.iter_mut().zip(values) {
                        *d = if !v.is_finite() || Some(v) == nodata { f32::NAN } else { v };
                    }
                } else {
                    for (d, v) in dst.iter_mut().zip(values) {
                        *d = v;
                    }
                }
            }
        }
    }
}

impl CopyGeometry {
    /// Pixel-interleaved integer samples: one pass over each row, scattering the chosen bands.
    fn copy_chunky<T: Sample>(&self, chunk: &[T], bands: &[usize], out: &mut [f32]) {
        let n_rows = self.rows.len();
        let y_lo = self.rows.start.max(self.place.y0);
        let y_hi = self.rows.end.min(self.place.y0 + self.h);
        let plane = n_rows * self.width;
        for y in y_lo..y_hi {
            let src = &chunk[(y - self.place.y0) * self.w * self.spp..][..self.w * self.spp];
            let row = (y - self.rows.start) * self.width + self.place.x0;
            for (x, px) in src.chunks_exact(self.spp).enumerate() {
                for (c, &band) in bands.iter().enumerate() {
                    out[c * plane + row + x] = px[band].to_f32();
                }
            }
        }
    }
}

/// A sample type the decoder returns.
trait Sample: Copy {
    /// Whether the type can hold NaN and infinities.
    const FLOAT: bool = false;
    fn to_f32(self) -> f32;
}

macro_rules! integer_sample {
    ($($t:ty),*) => {$(
        impl Sample for $t {
            fn to_f32(self) -> f32 {
                self as f32
            }
        }
    )*};
}
integer_sample!(u8, u16, u32, i8, i16, i32);

impl Sample for f32 {
    const FLOAT: bool = true;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Sample for f64 {
    const FLOAT: bool = true;
    fn to_f32(self) -> f32 {
        self as f32
    }
}

fn chunk_len(chunk: &DecodingResult) -> usize {
    match chunk {
        DecodingResult::U8(v) => v.len(),
        DecodingResult::U16(v) => v.len(),
        DecodingResult::U32(v) => v.len(),
        DecodingResult::U64(v) => v.len(),
        DecodingResult::F16(v) => v.len(),
        DecodingResult::F32(v) => v.len(),
        DecodingResult::F64(v) => v.len(),
        DecodingResult::I8(v) => v.len(),
        DecodingResult::I16(v) => v.len(),
        DecodingResult::I32(v) => v.len(),
        DecodingResult::I64(v) => v.len(),
    }
}

fn sample_bytes(chunk: &DecodingResult) -> usize {
    match chunk {
        DecodingResult::U8(_) | DecodingResult::I8(_) => 1,
        DecodingResult::U16(_) | DecodingResult::I16(_) | DecodingResult::F16(_) => 2,
        DecodingResult::U32(_) | DecodingResult::I32(_) | DecodingResult::F32(_) => 4,
        _ => 8,
    }
}

/// A deflate chunk must inflate to exactly the bytes its strip or tile declares. The `tiff` crate
/// stops reading at the declared size, so a bomb costs no memory there; re-inflating into a
/// counting sink (capped one byte past the declared size) tells the user the file is malicious or broken.
/// This second pass costs one more inflate per deflate chunk (chunks are decoded once, see the cache).
fn check_inflated_size(
    path: &Path,
    reader: &mut FileReader,
    range: Option<(u64, u64)>,
    index: u32,
    decoded_bytes: u64,
) -> Result<(), TileError> {
    let Some((offset, count)) = range else { return Ok(()) };
    reader.seek(SeekFrom::Start(offset)).map_err(|e| TileError::io(path, e))?;
    let compressed = reader.take(count);
    let mut inflated = flate2::read::ZlibDecoder::new(compressed).take(decoded_bytes + 1);
    let total = std::io::copy(&mut inflated, &mut std::io::sink()).map_err(|e| TileError::Truncated {
        path: path.to_path_buf(),
        detail: format!("the deflate stream of chunk {index} is cut short or damaged ({e})"),
    })?;
    if total < decoded_bytes {
        return Err(TileError::Truncated {
            path: path.to_path_buf(),
            detail: format!("chunk {index} inflates to {total} bytes, {decoded_bytes} expected"),
        });
    }
    if total > decoded_bytes {
        return Err(TileError::DecompressionBomb {
            path: path.to_path_buf(),
            chunk: index,
            declared_bytes: decoded_bytes,
        });
    }
    Ok(())
}

/// Whether the header allows the raw strip path: pixel-interleaved u16 strips (the codec is
/// checked by the caller).
fn raw_candidate(meta: &TiffMeta) -> bool {
    !meta.planar && !meta.tiled && meta.data_type == "u16"
}

/// The raw strip path for an uncompressed file in memory, when no decoder step would change the
/// bytes (no predictor, BlackIsZero, a colour type the decoder reads at 16 bits) and the strips
/// check out (see [`RawStrips::detect`]). Any tag the decoder cannot read means no fast path: the
/// decoder path then reports it.
fn detect_raw_strips(d: &mut Decoder<FileReader>, meta: &TiffMeta) -> Option<RawStrips> {
    let plain = |d: &mut Decoder<FileReader>| -> tiff::TiffResult<bool> {
        let predictor = d.find_tag_unsigned::<u16>(Tag::Predictor)?.unwrap_or(1);
        let photometric = d.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation)?;
        Ok(predictor == 1 && photometric == Some(1) && d.colortype()?.bit_depth() == 16)
    };
    let quiet = Path::new("");
    if !guard(quiet, || plain(d)).unwrap_or(false) {
        return None;
    }
    let offsets = guard(quiet, || d.get_tag_u64_vec(Tag::StripOffsets)).ok()?;
    let byte_counts = guard(quiet, || d.get_tag_u64_vec(Tag::StripByteCounts)).ok()?;
    let layout = StripLayout {
        width: meta.width,
        height: meta.height,
        spp: meta.samples,
        rows_per_strip: meta.chunk.1,
        offsets: &offsets,
        byte_counts: &byte_counts,
    };
    RawStrips::detect(d.inner().in_memory()?, &layout)
}

/// Open the file and reject empty and non-TIFF files before the decoder sees them.
fn open_checked(path: &Path) -> Result<FileReader, TileError> {
    let file = crate::fsio::open_regular(path).map_err(|e| TileError::io(path, e))?;
    let len = file.metadata().map_err(|e| TileError::io(path, e))?.len();
    if len == 0 {
        return Err(TileError::Empty { path: path.to_path_buf() });
    }
    let mut file = FileReader::new(file, len).map_err(|e| TileError::io(path, e))?;
    let mut header = [0u8; 4];
    let n = read_up_to(&mut file, &mut header).map_err(|e| TileError::io(path, e))?;
    let header = &header[..n];
    let magics: [&[u8]; 4] = [b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"];
    let is_prefix = magics.iter().any(|m| m.starts_with(header));
    if is_prefix && (n < 4 || len < 8) {
        return Err(TileError::Truncated { path: path.to_path_buf(), detail: format!("only {len} bytes") });
    }
    if !magics.contains(&header) {
        let header = header.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        return Err(TileError::NotTiff { path: path.to_path_buf(), header });
    }
    Ok(file)
}

/// What [`peek_dimensions`] reads from the first IFD without the decoder.
struct Peeked {
    width: usize,
    height: usize,
    samples: usize,
    /// The header and the first IFD's bytes: no strip or tile may lie there.
    reserved: [std::ops::Range<u64>; 2],
}

/// Width, height and samples per pixel from the first IFD, read without the decoder, so that an
/// oversized image is refused before the decoder builds anything for it. `None` when the IFD
/// cannot be read this way (the decoder then reports why).
fn peek_dimensions(file: &mut FileReader) -> Option<Peeked> {
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut header = [0u8; 16];
    read_up_to(file, &mut header).ok()?;
    let le = &header[..2] == b"II";
    let u16_at =
        |b: &[u8]| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) };
    let u32_at = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let big = u16_at(&header[2..]) == 43;
    let ifd = if big {
        u64::from(u32_at(&header[8..])) | (u64::from(u32_at(&header[12..])) << 32)
    } else {
        u64::from(u32_at(&header[4..]))
    };
    file.seek(SeekFrom::Start(ifd)).ok()?;
    let (count_len, entry_len) = if big { (8, 20) } else { (2, 12) };
    let mut count = [0u8; 8];
    read_up_to(file, &mut count[..count_len]).ok()?;
    let n = if big {
        let (a, b) = (u64::from(u32_at(&count)), u64::from(u32_at(&count[4..])));
        if le { a | (b << 32) } else { (a << 32) | b }
    } else {
        u64::from(u16_at(&count))
    };
    let ifd_len = count_len as u64 + n.saturating_mul(entry_len as u64) + if big { 8 } else { 4 };
    let reserved = [0..if big { 16 } else { 8 }, ifd..ifd.saturating_add(ifd_len)];
    let n = (n as usize).min(4096);
    let mut entries = vec![0u8; n * entry_len];
    read_up_to(file, &mut entries).ok()?;
    let (mut w, mut h, mut spp) = (None, None, 1usize);
    for e in entries.chunks_exact(entry_len) {
        let value = match u16_at(&e[2..]) {
            3 => u16_at(&e[if big { 12 } else { 8 }..]) as usize,
            4 => u32_at(&e[if big { 12 } else { 8 }..]) as usize,
            _ => continue,
        };
        match u16_at(e) {
            256 => w = Some(value),
            257 => h = Some(value),
            277 => spp = value,
            _ => {}
        }
    }
    Some(Peeked { width: w?, height: h?, samples: spp, reserved })
}

fn read_up_to(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_meta(
    path: &Path,
    d: &mut Decoder<FileReader>,
    cfg: &TileConfig,
) -> Result<(TiffMeta, u16), TileError> {
    let width = guard(path, || d.get_tag_u32(Tag::ImageWidth))? as usize;
    let height = guard(path, || d.get_tag_u32(Tag::ImageLength))? as usize;
    let samples = guard(path, || d.find_tag_unsigned::<u16>(Tag::SamplesPerPixel))?.unwrap_or(1) as usize;
    check_limits(path, width, height, samples, cfg)?;
    let bits = guard(path, || d.find_tag_unsigned_vec::<u16>(Tag::BitsPerSample))?.unwrap_or_else(|| vec![1]);
    let format =
        guard(path, || d.find_tag_unsigned_vec::<u16>(Tag::SampleFormat))?.unwrap_or_else(|| vec![1]);
    let data_type = sample_type(path, &bits, &format)?;
    let compression_code = guard(path, || d.find_tag_unsigned::<u16>(Tag::Compression))?.unwrap_or(1);
    if !SUPPORTED_COMPRESSION.contains(&compression_code) {
        return Err(TileError::Unsupported {
            path: path.to_path_buf(),
            detail: format!(
                "{} compression; supported: none, deflate, lzw, zstd, packbits",
                compression_name(compression_code)
            ),
        });
    }
    let planar = guard(path, || d.find_tag_unsigned::<u16>(Tag::PlanarConfiguration))?.unwrap_or(1) == 2;
    let tiled = d.get_chunk_type() == tiff::decoder::ChunkType::Tile;
    let (cw, ch) = guard(path, || Ok(d.chunk_dimensions()))?;
    let chunk = (cw.max(1) as usize, (ch.max(1) as usize).min(height.max(1)));
    let spp = if planar { 1 } else { samples };
    let sample_bytes = bits.first().copied().unwrap_or(8).div_ceil(8) as usize;
    if chunk.0 * chunk.1 * spp * sample_bytes > MAX_CHUNK_BYTES {
        return Err(TileError::TooLarge {
            path: path.to_path_buf(),
            detail: format!(
                "one strip/tile of {}x{} px exceeds {} MiB",
                chunk.0,
                chunk.1,
                MAX_CHUNK_BYTES >> 20
            ),
        });
    }
    let descriptions = guard(path, || d.find_tag(Tag::Unknown(42112)))?
        .and_then(|v| v.into_string().ok())
        .map(|xml| gdal_descriptions(&xml, samples))
        .unwrap_or_default();
    let nodata = guard(path, || d.find_tag(Tag::GdalNodata))?
        .and_then(|v| v.into_string().ok())
        .and_then(|s| s.trim_matches(|c: char| c == '\0' || c.is_whitespace()).parse::<f64>().ok())
        .or(cfg.nodata);
    let georef = read_georef(path, d)?;
    let compression = compression_name(compression_code);
    let meta = TiffMeta {
        width,
        height,
        samples,
        data_type,
        compression,
        planar,
        tiled,
        chunk,
        sample_bytes,
        descriptions,
        nodata,
        georef,
    };
    Ok((meta, compression_code))
}

fn check_limits(
    path: &Path,
    width: usize,
    height: usize,
    samples: usize,
    cfg: &TileConfig,
) -> Result<(), TileError> {
    let too_large = |detail: String| Err(TileError::TooLarge { path: path.to_path_buf(), detail });
    if width == 0 || height == 0 || samples == 0 {
        return Err(TileError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("declares {width}x{height} px with {samples} bands"),
        });
    }
    if width > cfg.max_width_px as usize || height > cfg.max_height_px as usize {
        return too_large(format!(
            "{width}x{height} px is beyond the limit {}x{}",
            cfg.max_width_px, cfg.max_height_px
        ));
    }
    if samples > cfg.max_bands as usize {
        return too_large(format!("{samples} bands is beyond the limit {}", cfg.max_bands));
    }
    Ok(())
}

fn sample_type(path: &Path, bits: &[u16], format: &[u16]) -> Result<String, TileError> {
    let b = bits.first().copied().unwrap_or(1);
    let f = format.first().copied().unwrap_or(1);
    let name = match (f, b) {
        (1, 8 | 16 | 32) => format!("u{b}"),
        (2, 8 | 16 | 32) => format!("i{b}"),
        (3, 32 | 64) => format!("f{b}"),
        _ => {
            let kind = match f {
                1 => "unsigned",
                2 => "signed",
                3 => "float",
                _ => "unknown-format",
            };
            return Err(TileError::Unsupported {
                path: path.to_path_buf(),
                detail: format!(
                    "{b}-bit {kind} samples (SampleFormat {f}); supported: u8/u16/u32/i8/i16/i32/f32/f64"
                ),
            });
        }
    };
    if bits.iter().any(|&x| x != b) || format.iter().any(|&x| x != f) {
        return Err(TileError::Unsupported {
            path: path.to_path_buf(),
            detail: "bands with different sample types".into(),
        });
    }
    Ok(name)
}

fn compression_name(code: u16) -> String {
    match code {
        1 => "none".into(),
        5 => "lzw".into(),
        7 => "jpeg".into(),
        8 | 32946 => "deflate".into(),
        32773 => "packbits".into(),
        50000 => "zstd".into(),
        other => format!("code {other}"),
    }
}

/// `<Item name="DESCRIPTION" sample="N" role="description">B04</Item>` entries of GDAL_METADATA.
fn gdal_descriptions(xml: &str, samples: usize) -> Vec<Option<String>> {
    let mut out = vec![None; samples];
    for item in xml.split("<Item").skip(1) {
        let Some((attrs, rest)) = item.split_once('>') else { continue };
        if !attrs.contains("name=\"DESCRIPTION\"") || !attrs.contains("role=\"description\"") {
            continue;
        }
        let sample = attrs
            .split("sample=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse::<usize>().ok());
        let value = rest.split("</Item>").next().unwrap_or("").trim();
        if let Some(slot) = sample.and_then(|s| out.get_mut(s)) {
            *slot = Some(value.to_string());
        }
    }
    out
}

fn read_georef(path: &Path, d: &mut Decoder<FileReader>) -> Result<Option<Georef>, TileError> {
    let scale = guard(path, || d.find_tag(Tag::ModelPixelScaleTag))?.and_then(|v| v.into_f64_vec().ok());
    let tie = guard(path, || d.find_tag(Tag::ModelTiepointTag))?.and_then(|v| v.into_f64_vec().ok());
    let keys = guard(path, || d.find_tag(Tag::GeoKeyDirectoryTag))?.and_then(|v| v.into_u16_vec().ok());
    if scale.is_none() && tie.is_none() && keys.is_none() {
        return Ok(None);
    }
    let pixel_size = scale.as_ref().filter(|s| s.len() >= 2).map(|s| [s[0], s[1]]);
    let origin = tie.as_ref().filter(|t| t.len() >= 6).map(|t| {
        let [sx, sy] = pixel_size.unwrap_or([0.0, 0.0]);
        [t[3] - t[0] * sx, t[4] + t[1] * sy]
    });
    let epsg = keys.as_deref().and_then(|k| geo_key(k, 3072).or_else(|| geo_key(k, 2048)));
    Ok(Some(Georef { pixel_size, origin, epsg }))
}

/// The inline value of `key` in a GeoKeyDirectory (header of 4 shorts, then 4 shorts per key).
fn geo_key(dir: &[u16], key: u16) -> Option<u16> {
    dir.get(4..)?.chunks_exact(4).find(|e| e[0] == key && e[1] == 0).map(|e| e[3])
}

/// Run one call into the `tiff` crate, turning its errors and panics into [`TileError`]s.
///
/// The `tiff` crate panics on some valid files (tiled planar images with partial edge tiles,
/// image-tiff#403). The panic is caught here, and the hook installed by [`quiet_decoder_panics`]
/// keeps it off stderr; the decoder is not used again after a panic.
pub(crate) fn guard<T>(path: &Path, f: impl FnOnce() -> tiff::TiffResult<T>) -> Result<T, TileError> {
    quiet_decoder_panics();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(TileError::tiff(path, e)),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(TileError::DecoderPanic { path: path.to_path_buf(), message })
        }
    }
}

/// Install (once) a panic hook that stays silent for panics raised inside the `tiff` crate and
/// passes every other panic to the previous hook.
fn quiet_decoder_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tiff = info.location().is_some_and(|l| l.file().contains("tiff-"));
            if !in_tiff {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_panic_becomes_a_tile_error() {
        let err = guard(Path::new("x.tif"), || -> tiff::TiffResult<()> { panic!("index out of bounds") })
            .unwrap_err();
        assert_eq!(err.kind(), "decoder_panic");
        assert!(err.to_string().starts_with("x.tif: TIFF decoder failed"), "{err}");
    }

    #[test]
    fn gdal_descriptions_are_read_by_sample_index() {
        let xml = r#"<GDALMetadata><Item name="OFFSET" sample="0" role="offset">0</Item>
            <Item name="DESCRIPTION" sample="1" role="description">B03</Item>
            <Item name="DESCRIPTION" sample="0" role="description">B02</Item></GDALMetadata>"#;
        assert_eq!(gdal_descriptions(xml, 3), [Some("B02".into()), Some("B03".into()), None]);
    }

    #[test]
    fn raw_strip_path_and_decoder_path_read_the_same_bigearthnet_bands() {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/bigearthnet-s2/S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57");
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&folder).expect("bundled folder").flatten().map(|e| e.path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "tif"));
        assert!(files.len() >= 10, "{}", folder.display());
        for path in files {
            let cfg = TileConfig::default();
            let mut fast = TiffFile::open(&path, &cfg).expect("bundled band opens");
            assert!(fast.has_fast_path(), "{} should take the raw strip path", path.display());
            let mut slow = TiffFile::open(&path, &cfg).expect("bundled band opens");
            slow.disable_fast_path();
            let (w, h) = (fast.meta.width, fast.meta.height);
            for rows in [0..h, 1..h - 1, h - 1..h] {
                let mut a = vec![-1f32; rows.len() * w];
                let mut b = vec![-2f32; rows.len() * w];
                fast.read_rows(rows.clone(), &[0], &mut a).expect("fast path reads");
                slow.read_rows(rows.clone(), &[0], &mut b).expect("decoder path reads");
                assert_eq!(a, b, "{} rows {rows:?}", path.display());
            }
        }
    }

    #[test]
    fn epsg_comes_from_the_projected_key_before_the_geographic_one() {
        let dir = [1, 1, 0, 3, 1024, 0, 1, 1, 2048, 0, 1, 4326, 3072, 0, 1, 32633];
        assert_eq!(geo_key(&dir, 3072), Some(32633));
        assert_eq!(geo_key(&dir, 2048), Some(4326));
        assert_eq!(geo_key(&dir[..12], 3072), None);
    }
}
