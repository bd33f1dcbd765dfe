//! Patches to embeddings: pick the model's bands by name, bring each patch to the export size
//! (bilinear resize when smaller, non-overlapping windows when larger), apply the input contract,
//! run in batches, and write `embeddings.npy` plus an index CSV (source path and window per row).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::runtime::OnnxModel;
use super::{InputContract, ModelMetadata};
use crate::tile::{Patch, Window};

/// One model input: `[C, S, S]` values in the model's band order and input contract.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    /// Row-major `[C, S, S]`.
    pub data: Vec<f32>,
    /// Where it came from.
    pub source: PathBuf,
    /// Its window in the source (before any resize).
    pub window: Window,
}

/// Embeddings of many inputs, one row each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embeddings {
    /// Embedding length.
    pub dim: usize,
    /// `[rows, dim]` row-major.
    pub values: Vec<f32>,
    /// Source and window of each row.
    pub index: Vec<(PathBuf, Window)>,
}

impl Embeddings {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.index.len()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// The channels of `patch` named by `bands`, in that order; the error names the missing bands.
pub fn select_bands(patch: &Patch, bands: &[String]) -> Result<Vec<f32>> {
    let missing: Vec<&str> = bands.iter().filter(|b| !patch.bands.contains(b)).map(String::as_str).collect();
    if !missing.is_empty() {
        bail!(
            "{}: the model needs bands {} but the patch has only {}; pass `--layout` naming the file's band order",
            patch.source.display(),
            missing.join(","),
            patch.bands.join(",")
        );
    }
    Ok(bands
        .iter()
        .flat_map(|b| patch.plane(patch.bands.iter().position(|x| x == b).expect("checked above")))
        .copied()
        .collect())
}

/// Bilinear resize of one `[h, w]` plane to `[out_h, out_w]` (half-pixel centres, edge clamp:
/// PyTorch's `interpolate(mode="bilinear", align_corners=False)` without antialiasing).
pub fn resize_bilinear(plane: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let x = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (x.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, x - i0 as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, out_h), axis(w, out_w));
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, ty) in &ys {
        for &(x0, x1, tx) in &xs {
            let top = plane[y0 * w + x0] * (1.0 - tx) + plane[y0 * w + x1] * tx;
            let bottom = plane[y1 * w + x0] * (1.0 - tx) + plane[y1 * w + x1] * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    out
}

/// Window origins along an axis of length `n` for windows of `size`: a grid with stride `size`,
/// the last window moved back to end at the edge so every pixel is covered.
pub fn window_starts(n: usize, size: usize) -> Vec<usize> {
    let mut starts: Vec<usize> = (0..n.saturating_sub(size) + 1).step_by(size.max(1)).collect();
    if n > size && starts.last().is_some_and(|&s| s + size < n) {
        starts.push(n - size);
    }
    starts
}

/// `patch` as model inputs: one resized input when it is smaller than the export size, else one
/// per window.
pub fn prepare(patch: &Patch, meta: &ModelMetadata) -> Result<Vec<ModelInput>> {
    let s = meta.image_size;
    let data = select_bands(patch, &meta.bands)?;
    let (h, w) = (patch.height, patch.width);
    if h == 0 || w == 0 {
        bail!("{}: empty patch", patch.source.display());
    }
    let plane = |c: usize| &data[c * h * w..(c + 1) * h * w];
    let mut inputs = Vec::new();
    if h < s || w < s {
        let values = (0..meta.bands.len()).flat_map(|c| resize_bilinear(plane(c), h, w, s, s)).collect();
        inputs.push(ModelInput { data: values, source: patch.source.clone(), window: patch.window });
    } else {
        for y in window_starts(h, s) {
            for x in window_starts(w, s) {
                let values = (0..meta.bands.len())
                    .flat_map(|c| {
                        (y..y + s).flat_map(move |r| plane(c)[r * w + x..r * w + x + s].iter().copied())
                    })
                    .collect();
                let window = sub_window(patch.window, x, y, s);
                inputs.push(ModelInput { data: values, source: patch.source.clone(), window });
            }
        }
    }
    if meta.input_contract == InputContract::Normalized {
        inputs.iter_mut().for_each(|input| normalize(&mut input.data, meta));
    }
    Ok(inputs)
}

/// The `size`-square window at `(x, y)` inside `outer`.
fn sub_window(outer: Window, x: usize, y: usize, size: usize) -> Window {
    Window { x: outer.x + x as u32, y: outer.y + y as u32, width: size as u32, height: size as u32 }
}

/// `(x - mean) / std` per band, in place on `[C, ...]` data.
pub fn normalize(data: &mut [f32], meta: &ModelMetadata) {
    let per_band = data.len() / meta.bands.len().max(1);
    for (c, chunk) in data.chunks_mut(per_band.max(1)).enumerate() {
        let (mean, std) = (meta.band_mean[c], meta.band_std[c]);
        chunk.iter_mut().for_each(|v| *v = (*v - mean) / std);
    }
}

/// Run `inputs` through `model` in batches of `batch`, calling `progress(rows_done)` after each.
pub fn embed_inputs(
    model: &mut OnnxModel,
    meta: &ModelMetadata,
    inputs: &[ModelInput],
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Embeddings> {
    let s = meta.image_size;
    let mut out = Embeddings { dim: meta.embed_dim, ..Default::default() };
    for chunk in inputs.chunks(batch.max(1)) {
        let pixels: Vec<f32> = chunk.iter().flat_map(|i| i.data.iter().copied()).collect();
        let shape = [chunk.len(), meta.bands.len(), s, s];
        let result = model.run(&pixels, shape)?;
        if result.dim != meta.embed_dim {
            bail!(
                "{}: output has {} values per row, metadata says {}",
                model.path().display(),
                result.dim,
                meta.embed_dim
            );
        }
        out.values.extend_from_slice(&result.cls);
        out.index.extend(chunk.iter().map(|i| (i.source.clone(), i.window)));
        progress(out.rows());
    }
    Ok(out)
}

/// Prepare and embed `patches` (see [`prepare`] and [`embed_inputs`]).
pub fn embed_patches(
    model: &mut OnnxModel,
    meta: &ModelMetadata,
    patches: &[Patch],
    batch: usize,
    progress: impl FnMut(usize),
) -> Result<Embeddings> {
    let mut inputs = Vec::new();
    for patch in patches {
        inputs.extend(prepare(patch, meta)?);
    }
    embed_inputs(model, meta, &inputs, batch, progress)
}

/// Write `[rows, cols]` f32 as a NumPy `.npy` (format 1.0, little-endian).
pub fn write_npy(path: &Path, values: &[f32], rows: usize, cols: usize) -> Result<()> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
    let pad = 64 - (10 + header.len() + 1) % 64;
    header.push_str(&" ".repeat(pad % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    crate::fsio::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Write the index CSV: `row,source,x,y,width,height`.
pub fn write_index_csv(path: &Path, index: &[(PathBuf, Window)]) -> Result<()> {
    let mut text = Vec::new();
    writeln!(text, "row,source,x,y,width,height")?;
    for (row, (source, w)) in index.iter().enumerate() {
        let source = source.display().to_string().replace('"', "\"\"");
        writeln!(text, "{row},\"{source}\",{},{},{},{}", w.x, w.y, w.width, w.height)?;
    }
    crate::fsio::write_atomic(path, &text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(bands: &[&str], h: usize, w: usize) -> Patch {
        let n = h * w;
        Patch {
            data: (0..bands.len() * n).map(|i| (i / n) as f32 * 100.0 + (i % n) as f32).collect(),
            bands: bands.iter().map(|b| b.to_string()).collect(),
            height: h,
            width: w,
            source: "t.tif".into(),
            window: Window { x: 10, y: 20, width: w as u32, height: h as u32 },
            nodata_fraction: 0.0,
        }
    }

    fn meta(bands: &[&str], size: usize) -> ModelMetadata {
        ModelMetadata {
            dinostream_version: "0".into(),
            preset: "p".into(),
            training_step: 0,
            created: String::new(),
            bands: bands.iter().map(|b| b.to_string()).collect(),
            band_mean: vec![0.0; bands.len()],
            band_std: vec![1.0; bands.len()],
            input_contract: InputContract::Reflectance,
            patch_size: 2,
            image_size: size,
            embed_dim: 4,
        }
    }

    #[test]
    fn bands_are_picked_by_name_in_model_order() {
        let p = patch(&["B02", "B03", "B04"], 1, 2);
        let names = ["B04".to_string(), "B02".to_string()];
        assert_eq!(select_bands(&p, &names).unwrap(), vec![200.0, 201.0, 0.0, 1.0]);
        let err = select_bands(&p, &["B8A".to_string()]).unwrap_err().to_string();
        assert!(err.contains("B8A") && err.contains("--layout"), "{err}");
    }

    #[test]
    fn bilinear_resize_matches_torch_on_a_ramp() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=4,
        //     mode="bilinear", align_corners=False)[0, 0, 0] == [0.0, 0.25, 0.75, 1.0]
        let out = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        assert_eq!(&out[..4], &[0.0, 0.25, 0.75, 1.0]);
        assert_eq!(&out[12..], &[2.0, 2.25, 2.75, 3.0]);
    }

    #[test]
    fn window_starts_cover_the_edge() {
        assert_eq!(window_starts(120, 120), vec![0]);
        assert_eq!(window_starts(250, 120), vec![0, 120, 130]);
        assert_eq!(window_starts(240, 120), vec![0, 120]);
    }

    #[test]
    fn small_patches_are_resized_and_large_ones_cut() {
        let m = meta(&["B02"], 4);
        let small = prepare(&patch(&["B02"], 2, 2), &m).unwrap();
        assert_eq!(small.len(), 1);
        assert_eq!(small[0].data.len(), 16);
        let large = prepare(&patch(&["B02"], 8, 6), &m).unwrap();
        assert_eq!(large.len(), 4);
        assert_eq!(large[3].window, Window { x: 12, y: 24, width: 4, height: 4 });
        assert_eq!(large[3].data[0], (4 * 6 + 2) as f32);
    }

    #[test]
    fn npy_header_is_aligned_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.npy");
        write_npy(&path, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + header_len]).unwrap().contains("'shape': (2, 3)"));
        assert_eq!(bytes.len(), 10 + header_len + 24);
    }
}
