//! A small TIFF writer for tests and benches: any band count, u8/u16/i16/u32/f32, chunky or
//! planar, strips or tiles, none/deflate/LZW/zstd, GDAL descriptions and nodata, streamed chunk by
//! chunk (a 10980 x 10980 x 12 scene never sits in memory). `overrides` rewrites a tag's declared
//! value without changing the data, which is how the broken-file corpus is made.

#![allow(dead_code)]

use std::io::{Seek, SeekFrom, Write};

/// Sample type of the written file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sample {
    U8,
    U16,
    I16,
    U32,
    F32,
}

impl Sample {
    fn bytes(self) -> usize {
        match self {
            Sample::U8 => 1,
            Sample::U16 | Sample::I16 => 2,
            Sample::U32 | Sample::F32 => 4,
        }
    }
    fn format(self) -> u32 {
        match self {
            Sample::U8 | Sample::U16 | Sample::U32 => 1,
            Sample::I16 => 2,
            Sample::F32 => 3,
        }
    }
    fn put(self, v: f64, out: &mut Vec<u8>) {
        match self {
            Sample::U8 => out.push(v as u8),
            Sample::U16 => out.extend((v as u16).to_le_bytes()),
            Sample::I16 => out.extend((v as i16).to_le_bytes()),
            Sample::U32 => out.extend((v as u32).to_le_bytes()),
            Sample::F32 => out.extend((v as f32).to_le_bytes()),
        }
    }
}

/// Compression of strips/tiles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Codec {
    None,
    Deflate,
    Lzw,
    Zstd,
}

impl Codec {
    fn code(self) -> u32 {
        match self {
            Codec::None => 1,
            Codec::Lzw => 5,
            Codec::Deflate => 8,
            Codec::Zstd => 50000,
        }
    }
    fn encode(self, raw: Vec<u8>) -> Vec<u8> {
        match self {
            Codec::None => raw,
            Codec::Deflate => {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&raw).unwrap();
                e.finish().unwrap()
            }
            Codec::Lzw => {
                weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8).encode(&raw).unwrap()
            }
            Codec::Zstd => zstd::encode_all(&raw[..], 1).unwrap(),
        }
    }
}

/// What to write.
#[derive(Clone, Debug)]
pub struct TiffSpec {
    pub width: u32,
    pub height: u32,
    pub bands: u16,
    pub sample: Sample,
    pub planar: bool,
    /// Square tiles of this side; strips when `None`.
    pub tile: Option<u32>,
    pub rows_per_strip: u32,
    pub codec: Codec,
    /// GDAL_NODATA text.
    pub nodata: Option<String>,
    /// GDAL band descriptions (empty: none written).
    pub descriptions: Vec<String>,
    /// (tag, value): declare this value instead of the true one (bits, sample format, sizes, ...).
    pub overrides: Vec<(u16, u32)>,
}

impl Default for TiffSpec {
    fn default() -> Self {
        TiffSpec {
            width: 8,
            height: 8,
            bands: 1,
            sample: Sample::U16,
            planar: false,
            tile: None,
            rows_per_strip: 4,
            codec: Codec::None,
            nodata: None,
            descriptions: Vec::new(),
            overrides: Vec::new(),
        }
    }
}

/// The file as bytes; `value(band, y, x)` gives each sample.
pub fn tiff_bytes(spec: &TiffSpec, value: impl Fn(usize, usize, usize) -> f64) -> Vec<u8> {
    let mut cur = std::io::Cursor::new(Vec::new());
    write_tiff(&mut cur, spec, value).unwrap();
    cur.into_inner()
}

/// Write the file to `out`, one compressed chunk at a time.
pub fn write_tiff<W: Write + Seek>(
    mut out: W,
    spec: &TiffSpec,
    value: impl Fn(usize, usize, usize) -> f64,
) -> std::io::Result<()> {
    out.write_all(b"II*\0\0\0\0\0")?;
    let (cw, ch) = match spec.tile {
        Some(t) => (t as usize, t as usize),
        None => (spec.width as usize, spec.rows_per_strip as usize),
    };
    let (w, h) = (spec.width as usize, spec.height as usize);
    let planes = if spec.planar { spec.bands as usize } else { 1 };
    let mut offsets = Vec::new();
    let mut counts = Vec::new();
    let mut pos = 8u64;
    for plane in 0..planes {
        for cy in (0..h).step_by(ch) {
            for cx in (0..w).step_by(cw) {
                let rows = if spec.tile.is_some() { ch } else { ch.min(h - cy) };
                let mut raw = Vec::with_capacity(cw * rows * spec.sample.bytes());
                for y in cy..cy + rows {
                    for x in cx..cx + cw {
                        let bands: Vec<usize> =
                            if spec.planar { vec![plane] } else { (0..spec.bands as usize).collect() };
                        for b in bands {
                            let v = if y < h && x < w { value(b, y, x) } else { 0.0 };
                            spec.sample.put(v, &mut raw);
                        }
                    }
                }
                let data = spec.codec.encode(raw);
                out.write_all(&data)?;
                offsets.push(pos as u32);
                counts.push(data.len() as u32);
                pos += data.len() as u64;
            }
        }
    }
    if pos % 2 == 1 {
        out.write_all(&[0])?;
        pos += 1;
    }
    let ifd = build_ifd(spec, offsets, counts, pos as u32);
    out.write_all(&ifd)?;
    out.seek(SeekFrom::Start(4))?;
    out.write_all(&(pos as u32).to_le_bytes())?;
    out.seek(SeekFrom::End(0))?;
    Ok(())
}

/// A tag value: SHORTs, LONGs, DOUBLEs or ASCII.
enum Value {
    Short(Vec<u32>),
    Long(Vec<u32>),
    Ascii(String),
}

fn build_ifd(spec: &TiffSpec, offsets: Vec<u32>, counts: Vec<u32>, at: u32) -> Vec<u8> {
    let n = spec.bands as usize;
    let mut tags: Vec<(u16, Value)> = vec![
        (256, Value::Long(vec![spec.width])),
        (257, Value::Long(vec![spec.height])),
        (258, Value::Short(vec![spec.sample.bytes() as u32 * 8; n])),
        (259, Value::Short(vec![spec.codec.code()])),
        (262, Value::Short(vec![1])),
        (277, Value::Short(vec![n as u32])),
        (284, Value::Short(vec![if spec.planar { 2 } else { 1 }])),
        (339, Value::Short(vec![spec.sample.format(); n])),
    ];
    match spec.tile {
        Some(t) => tags.extend([
            (322, Value::Long(vec![t])),
            (323, Value::Long(vec![t])),
            (324, Value::Long(offsets)),
            (325, Value::Long(counts)),
        ]),
        None => tags.extend([
            (273, Value::Long(offsets)),
            (278, Value::Long(vec![spec.rows_per_strip])),
            (279, Value::Long(counts)),
        ]),
    }
    if n > 1 {
        tags.push((338, Value::Short(vec![0; n - 1])));
    }
    if !spec.descriptions.is_empty() {
        let items: String = spec
            .descriptions
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!("<Item name=\"DESCRIPTION\" sample=\"{i}\" role=\"description\">{d}</Item>")
            })
            .collect();
        tags.push((42112, Value::Ascii(format!("<GDALMetadata>{items}</GDALMetadata>"))));
    }
    if let Some(nd) = &spec.nodata {
        tags.push((42113, Value::Ascii(nd.clone())));
    }
    for &(tag, v) in &spec.overrides {
        if let Some((_, Value::Short(vals) | Value::Long(vals))) = tags.iter_mut().find(|(t, _)| *t == tag) {
            vals.iter_mut().for_each(|x| *x = v);
        }
    }
    tags.sort_by_key(|(t, _)| *t);
    encode_ifd(&tags, at)
}

fn encode_ifd(tags: &[(u16, Value)], at: u32) -> Vec<u8> {
    let mut dir = Vec::new();
    let mut extra = Vec::new();
    let extra_at = at + 2 + 12 * tags.len() as u32 + 4;
    dir.extend((tags.len() as u16).to_le_bytes());
    for (tag, value) in tags {
        let (ty, count, bytes) = match value {
            Value::Short(v) => {
                (3u16, v.len(), v.iter().flat_map(|x| (*x as u16).to_le_bytes()).collect::<Vec<u8>>())
            }
            Value::Long(v) => (4, v.len(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Value::Ascii(s) => {
                let mut b = s.as_bytes().to_vec();
                b.push(0);
                (2, b.len(), b)
            }
        };
        dir.extend(tag.to_le_bytes());
        dir.extend(ty.to_le_bytes());
        dir.extend((count as u32).to_le_bytes());
        if bytes.len() <= 4 {
            let mut inline = bytes.clone();
            inline.resize(4, 0);
            dir.extend(inline);
        } else {
            dir.extend((extra_at + extra.len() as u32).to_le_bytes());
            extra.extend(&bytes);
            if extra.len() % 2 == 1 {
                extra.push(0);
            }
        }
    }
    dir.extend(0u32.to_le_bytes());
    dir.extend(extra);
    dir
}
