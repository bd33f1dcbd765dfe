//! Inference on exported models through ONNX Runtime (`ort`, loaded at run time).
//!
//! - [`runtime`]: find `libonnxruntime`, open a model, run batches; typed errors that say how to
//!   install the library when it is missing.
//! - [`embed`]: patches (any size, any band order) to model inputs and embeddings.
//! - [`knn`]: DINO's weighted k-NN classifier, a linear probe and the band-statistics baseline.
//! - [`features`]: one feature row per labelled file, from a model or the band statistics.
//!
//! [`ModelMetadata`] is the contract between an exported file and its consumers: `export` writes it
//! into `metadata_props`, everything here reads it back.

pub mod embed;
pub mod features;
pub mod knn;
pub mod runtime;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Name of the model input: `[batch, C, H, W]` f32.
pub const INPUT_NAME: &str = "pixels";
/// Name of the cls-embedding output: `[batch, D]` f32.
pub const CLS_OUTPUT: &str = "cls";
/// Name of the optional patch-token output: `[batch, tokens, D]` f32.
pub const PATCH_TOKENS_OUTPUT: &str = "patch_tokens";

/// What the model input holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputContract {
    /// Reflectance (DN / 10000); the graph normalises with the per-band mean/std it carries.
    #[default]
    Reflectance,
    /// Already normalised: `(reflectance - mean) / std` per band, done by the caller.
    Normalized,
}

impl fmt::Display for InputContract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputContract::Reflectance => "reflectance",
            InputContract::Normalized => "normalized",
        })
    }
}

impl FromStr for InputContract {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reflectance" => Ok(InputContract::Reflectance),
            "normalized" => Ok(InputContract::Normalized),
            other => Err(format!("input contract `{other}`: expected `reflectance` or `normalized`")),
        }
    }
}

/// What an exported model says about itself (its `metadata_props`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// dinostream version that wrote the file.
    pub dinostream_version: String,
    /// Model preset name (`vit-tiny-p8`).
    pub preset: String,
    /// Training step of the exported teacher.
    pub training_step: u64,
    /// RFC 3339 UTC time of the export.
    pub created: String,
    /// Band names in input channel order.
    pub bands: Vec<String>,
    /// Per-band mean (reflectance) the model was trained with, in input order.
    pub band_mean: Vec<f32>,
    /// Per-band standard deviation (reflectance), in input order.
    pub band_std: Vec<f32>,
    /// What the input holds.
    pub input_contract: InputContract,
    /// Patch size in pixels.
    pub patch_size: usize,
    /// Input height and width in pixels.
    pub image_size: usize,
    /// Length of the cls embedding.
    pub embed_dim: usize,
}

impl ModelMetadata {
    /// The `metadata_props` entries, keys as written into the ONNX file.
    pub fn to_props(&self) -> Vec<(String, String)> {
        let floats = |v: &[f32]| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(",");
        [
            ("dinostream_version", self.dinostream_version.clone()),
            ("preset", self.preset.clone()),
            ("training_step", self.training_step.to_string()),
            ("created", self.created.clone()),
            ("bands", self.bands.join(",")),
            ("band_mean", floats(&self.band_mean)),
            ("band_std", floats(&self.band_std)),
            ("input_contract", self.input_contract.to_string()),
            ("patch_size", self.patch_size.to_string()),
            ("image_size", self.image_size.to_string()),
            ("embed_dim", self.embed_dim.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Read the entries back; the error names the missing or malformed key.
    pub fn from_props(props: &BTreeMap<String, String>) -> Result<ModelMetadata, String> {
        let get = |key: &str| props.get(key).ok_or_else(|| format!("metadata key `{key}` is missing"));
        let num = |key: &str| -> Result<usize, String> {
            get(key)?.parse().map_err(|e| format!("metadata key `{key}`: {e}"))
        };
        let floats = |key: &str| -> Result<Vec<f32>, String> {
            get(key)?
                .split(',')
                .map(|x| x.parse().map_err(|e| format!("metadata key `{key}`: {e}")))
                .collect()
        };
        let meta = ModelMetadata {
            dinostream_version: get("dinostream_version")?.clone(),
            preset: get("preset")?.clone(),
            training_step: get("training_step")?
                .parse()
                .map_err(|e| format!("metadata key `training_step`: {e}"))?,
            created: get("created")?.clone(),
            bands: get("bands")?.split(',').map(str::to_string).collect(),
            band_mean: floats("band_mean")?,
            band_std: floats("band_std")?,
            input_contract: get("input_contract")?.parse()?,
            patch_size: num("patch_size")?,
            image_size: num("image_size")?,
            embed_dim: num("embed_dim")?,
        };
        if meta.band_mean.len() != meta.bands.len() || meta.band_std.len() != meta.bands.len() {
            return Err(format!(
                "metadata: {} bands but {} means and {} stds",
                meta.bands.len(),
                meta.band_mean.len(),
                meta.band_std.len()
            ));
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ModelMetadata {
        ModelMetadata {
            dinostream_version: "0.1.0".into(),
            preset: "vit-tiny-p8".into(),
            training_step: 42,
            created: "2026-11-27T20:00:00Z".into(),
            bands: vec!["B02".into(), "B03".into()],
            band_mean: vec![0.1, 0.25],
            band_std: vec![0.05, 0.125],
            input_contract: InputContract::Reflectance,
            patch_size: 8,
            image_size: 120,
            embed_dim: 192,
        }
    }

    #[test]
    fn metadata_survives_a_round_trip_through_props() {
        let meta = sample();
        let props = meta.to_props().into_iter().collect();
        assert_eq!(ModelMetadata::from_props(&props).unwrap(), meta);
    }

    #[test]
    fn metadata_with_a_missing_key_names_it() {
        let mut props: BTreeMap<_, _> = sample().to_props().into_iter().collect();
        props.remove("band_std");
        assert!(ModelMetadata::from_props(&props).unwrap_err().contains("band_std"));
    }
}
