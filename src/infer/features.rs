//! Per-file features for evaluation: each labelled file's patches through an exported model (or
//! the band-statistics baseline), averaged into one row, and class indices for the labels.

use std::path::Path;

use anyhow::{Result, bail};

use super::embed;
use super::knn;
use super::runtime::OnnxModel;
use crate::config::TileConfig;
use crate::tile;

/// Where per-file features come from: the model's cls embedding or the band statistics.
pub enum FeatureSource {
    /// An exported model's embedding, averaged over the file's patches.
    Model(Box<OnnxModel>),
    /// Per-band mean and std of reflectance ([`knn::band_stat_features`]), averaged likewise.
    BandStats,
}

impl FeatureSource {
    /// What the features are, for the report.
    pub fn name(&self) -> String {
        match self {
            FeatureSource::Model(m) => m.path().display().to_string(),
            FeatureSource::BandStats => "band-stats baseline".into(),
        }
    }

    /// `[files, d]` features, one row per labelled file under `dir` (the mean over its patches),
    /// and `d`.
    pub fn of(
        &mut self,
        dir: &Path,
        files: &[knn::LabelledFile],
        tile: &TileConfig,
        batch: usize,
    ) -> Result<(Vec<f32>, usize)> {
        let mut rows = Vec::new();
        let mut dim = 0;
        for file in files {
            let path = dir.join(&file.filename);
            let patches = tile::read_patches(&tile::Input::detect(&path)?, tile)?;
            let row = match self {
                FeatureSource::Model(model) => {
                    let meta = model.metadata()?;
                    let e = embed::embed_patches(model, &meta, &patches, batch, |_| ())?;
                    mean_row(&e.values, e.dim)
                }
                FeatureSource::BandStats => {
                    let per_patch: Vec<Vec<f32>> =
                        patches.iter().map(|p| knn::band_stat_features(&p.data, p.channels())).collect();
                    mean_row(&per_patch.concat(), per_patch.first().map_or(0, Vec::len))
                }
            };
            if row.is_empty() {
                bail!("{}: no patches", path.display());
            }
            dim = row.len();
            rows.extend(row);
        }
        Ok((rows, dim))
    }
}

/// The mean of the rows of `[n, dim]` values.
fn mean_row(values: &[f32], dim: usize) -> Vec<f32> {
    let n = (values.len() / dim.max(1)).max(1) as f32;
    (0..dim).map(|j| values.chunks(dim).map(|r| r[j]).sum::<f32>() / n).collect()
}

/// Class indices of single-label files.
pub fn class_indices(files: &[knn::LabelledFile], classes: &[String]) -> Vec<usize> {
    files
        .iter()
        .map(|f| classes.iter().position(|c| *c == f.labels[0]).expect("classes collected from these files"))
        .collect()
}
