//! The preview figure: the views of one sample as one PNG, a grid of 4 columns (2 x 4 for the
//! seed's 8 views), each view labelled ("global 1", "local 3").
//!
//! Values are de-normalised back to reflectance and stretched per view and display channel from
//! the 2nd to the 98th percentile, so every view is readable: a Channelaug view (one band copied
//! everywhere) shows as grey, a solarized one with inverted bright areas. A stretch shared by all
//! views left Channelaug views of a bright band (B8A, B07) white. Colour is B04/B03/B02 false
//! colour, or one band in grey. Views are enlarged by whole factors (nearest neighbour) to one cell size, so a local
//! crop shows its pixels.

use anyhow::{Context, Result, bail};

use super::Views;
use crate::tile::band_stats;

/// Cell side in pixels of the figure (a 120 px global view is drawn 2x).
const CELL_PX: usize = 240;
/// Space between cells and around the figure.
const MARGIN_PX: usize = 8;
/// Glyph scale of the labels (5 x 7 glyphs drawn as 2 x 2 blocks).
const FONT_SCALE: usize = 2;
/// Height of the label strip above each cell.
const LABEL_PX: usize = 7 * FONT_SCALE + 6;
/// Columns of the grid.
const COLUMNS: usize = 4;
/// Background grey.
const BACKGROUND: u8 = 24;

/// An RGB8 canvas.
struct Canvas {
    rgb: Vec<u8>,
    width: usize,
    height: usize,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas { rgb: vec![BACKGROUND; width * height * 3], width, height }
    }

    fn put(&mut self, x: usize, y: usize, px: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.rgb[i..i + 3].copy_from_slice(&px);
        }
    }
}

/// Render `views` (normalised, channels named by `bands`) as a labelled PNG: false colour from
/// B04/B03/B02, or the single band `band` in grey.
pub fn render_png(views: &Views, bands: &[String], band: Option<&str>) -> Result<Vec<u8>> {
    let channels = display_channels(bands, band)?;
    let images: Vec<Vec<Vec<f32>>> = views
        .views
        .iter()
        .map(|v| channels.iter().map(|&c| reflectance(v, c, &bands[c])).collect())
        .collect();
    let rows = views.views.len().div_ceil(COLUMNS);
    let width = COLUMNS * (CELL_PX + MARGIN_PX) + MARGIN_PX;
    let height = rows * (CELL_PX + LABEL_PX + MARGIN_PX) + MARGIN_PX;
    let mut canvas = Canvas::new(width, height);
    for (i, (view, img)) in views.views.iter().zip(&images).enumerate() {
        let x0 = MARGIN_PX + (i % COLUMNS) * (CELL_PX + MARGIN_PX);
        let y0 = MARGIN_PX + (i / COLUMNS) * (CELL_PX + LABEL_PX + MARGIN_PX);
        draw_text(&mut canvas, x0, y0 + 2, &label(i));
        let ranges: Vec<(f32, f32)> = img.iter().map(|plane| stretch(plane)).collect();
        draw_view(&mut canvas, x0, y0 + LABEL_PX, view.size, img, &ranges);
    }
    encode(&canvas)
}

/// The channels shown: `band` alone, or B04, B03, B02.
fn display_channels(bands: &[String], band: Option<&str>) -> Result<Vec<usize>> {
    let find = |name: &str| {
        bands.iter().position(|b| b == name).with_context(|| {
            format!(
                "preview: band {name} is not among the patch bands {bands:?}; pass --band with one of them"
            )
        })
    };
    match band {
        Some(name) => Ok(vec![find(name)?]),
        None => ["B04", "B03", "B02"].into_iter().map(find).collect(),
    }
}

/// Channel `c` of `view` back in reflectance.
fn reflectance(view: &super::View, c: usize, band: &str) -> Vec<f32> {
    let stats = band_stats(band).expect("the augmenter refuses bands without statistics");
    let n = view.size * view.size;
    view.data[c * n..(c + 1) * n].iter().map(|v| v * stats.std + stats.mean).collect()
}

/// The 2nd and 98th percentile of a plane.
fn stretch(plane: &[f32]) -> (f32, f32) {
    let mut all: Vec<f32> = plane.iter().copied().filter(|v| v.is_finite()).collect();
    if all.is_empty() {
        return (0.0, 1.0);
    }
    all.sort_by(f32::total_cmp);
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (at(0.02), at(0.98));
    if hi > lo { (lo, hi) } else { (lo, lo + 1e-6) }
}

/// "global 1", "global 2", "local 1", ...
fn label(i: usize) -> String {
    if i < 2 { format!("global {}", i + 1) } else { format!("local {}", i - 1) }
}

/// Draw one view enlarged by the largest whole factor that fits the cell, centred.
fn draw_view(
    canvas: &mut Canvas,
    x0: usize,
    y0: usize,
    size: usize,
    img: &[Vec<f32>],
    ranges: &[(f32, f32)],
) {
    let factor = (CELL_PX / size).max(1);
    let offset = (CELL_PX.saturating_sub(size * factor)) / 2;
    for y in 0..size * factor {
        for x in 0..size * factor {
            let i = (y / factor) * size + x / factor;
            let level = |k: usize| {
                let (lo, hi) = ranges[k];
                ((img[k][i] - lo) / (hi - lo) * 255.0).clamp(0.0, 255.0) as u8
            };
            let px = if img.len() == 3 { [level(0), level(1), level(2)] } else { [level(0); 3] };
            canvas.put(x0 + offset + x, y0 + offset + y, px);
        }
    }
}

/// Draw `text` in the built-in 5 x 7 font, white.
fn draw_text(canvas: &mut Canvas, x0: usize, y0: usize, text: &str) {
    for (k, ch) in text.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for (dx, dy) in (0..FONT_SCALE).flat_map(|dx| (0..FONT_SCALE).map(move |dy| (dx, dy))) {
                    let x = x0 + (k * 6 + col) * FONT_SCALE + dx;
                    canvas.put(x, y0 + row * FONT_SCALE + dy, [235, 235, 235]);
                }
            }
        }
    }
}

/// The 5 x 7 glyph of `ch` (rows top-down, bit 4 = left column); only the characters the labels
/// use, anything else is blank.
fn glyph(ch: char) -> [u8; 7] {
    match ch {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        'a' => [0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e],
        'c' => [0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e],
        'g' => [0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e],
        'l' => [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'o' => [0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e],
        _ => [0; 7],
    }
}

/// The canvas as an 8-bit RGB PNG.
fn encode(canvas: &Canvas) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, canvas.width as u32, canvas.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("preview: writing the PNG header")?;
    writer.write_image_data(&canvas.rgb).context("preview: writing the PNG pixels")?;
    writer.finish().context("preview: finishing the PNG")?;
    if bytes.is_empty() {
        bail!("preview: the PNG encoder produced nothing");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::View;

    fn views(bands: usize) -> Views {
        let view = |size: usize| View {
            data: (0..bands * size * size).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect(),
            channels: bands,
            size,
        };
        Views {
            views: vec![view(120), view(120), view(56), view(56), view(56), view(56), view(56), view(56)],
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|b| b.to_string()).collect()
    }

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info.width, info.height, buf)
    }

    #[test]
    fn eight_views_make_a_labelled_two_by_four_grid() {
        let png_bytes = render_png(&views(3), &names(&["B02", "B03", "B04"]), None).unwrap();
        let (w, h, rgb) = decode(&png_bytes);
        assert_eq!((w as usize, h as usize), (4 * 248 + 8, 2 * (240 + LABEL_PX + 8) + 8));
        // The label "global 1" puts white pixels into the first label strip.
        let strip = &rgb[(8 * w as usize) * 3..(8 + LABEL_PX) * w as usize * 3];
        assert!(strip.chunks_exact(3).any(|px| px == [235, 235, 235]));
    }

    #[test]
    fn one_band_is_drawn_in_grey() {
        let png_bytes = render_png(&views(3), &names(&["B02", "B03", "B08"]), Some("B08")).unwrap();
        let (_, _, rgb) = decode(&png_bytes);
        assert!(rgb.chunks_exact(3).all(|px| px[0] == px[1] && px[1] == px[2]));
    }

    #[test]
    fn false_colour_without_b04_asks_for_a_band() {
        let err = render_png(&views(2), &names(&["B02", "B03"]), None).unwrap_err();
        assert!(err.to_string().contains("band B04 is not among the patch bands"), "{err}");
        assert!(err.to_string().contains("--band"), "{err}");
    }
}
