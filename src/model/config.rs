//! Model presets: backbone and head sizes, read from `models/*.toml`.
//!
//! Keys are the DINO argument names (`embed_dim`, `depth`, `num_heads`, `patch_size`, `out_dim`,
//! `norm_last_layer`, ...), as in facebookresearch/dino `vision_transformer.py`. The known presets are
//! compiled into the binary, so `vit-tiny-p8` works from any directory; a path to a TOML file works too.
//! `in_chans` is not a preset key: it is the number of configured bands.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The presets shipped in `models/`, by name.
const KNOWN: [(&str, &str); 6] = [
    ("vit-micro-p8", include_str!("../../models/vit-micro-p8.toml")),
    ("vit-tiny-p8", include_str!("../../models/vit-tiny-p8.toml")),
    ("vit-small-p8", include_str!("../../models/vit-small-p8.toml")),
    ("vit-base-p8", include_str!("../../models/vit-base-p8.toml")),
    ("vit-small-p8-jetson", include_str!("../../models/vit-small-p8-jetson.toml")),
    ("vit-small-p16", include_str!("../../models/vit-small-p16.toml")),
];

/// A ViT backbone with its DINO head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Preset name, e.g. `vit-tiny-p8`.
    pub name: String,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// MLP hidden width as a multiple of `embed_dim`.
    pub mlp_ratio: f64,
    /// Whether the qkv projection has a bias.
    pub qkv_bias: bool,
    /// LayerNorm epsilon.
    pub layernorm_eps: f64,
    /// Side of the crops the learned positional embedding is sized for.
    pub img_size: usize,
    /// Input channels: the number of configured bands (set by [`Preset::load`], not in the file).
    #[serde(default)]
    pub in_chans: usize,
    /// The DINO projection head.
    pub head: HeadConfig,
}

/// DINO head sizes (`DINOHead` arguments).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Prototypes K (softmax width).
    pub out_dim: usize,
    /// Hidden width of the MLP.
    pub hidden_dim: usize,
    /// Width before the weight-normed last layer.
    pub bottleneck_dim: usize,
    /// Linear layers in the MLP (at least 2).
    pub nlayers: usize,
    /// Keep the last layer's weight-norm gain `g` fixed at 1.
    pub norm_last_layer: bool,
}

/// Why a preset could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    /// Neither a known name nor a readable file.
    #[error(
        "model preset `{spec}`: not a known preset ({known}) and no such file {path}; pass one of the names or a path to a preset TOML"
    )]
    Unknown { spec: String, known: String, path: PathBuf },
    /// The file exists but cannot be read.
    #[error("{path}: cannot read model preset: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML is malformed or has unknown keys.
    #[error("model preset `{origin}`: {message}")]
    Parse { origin: String, message: String },
    /// The sizes do not fit together.
    #[error("model preset `{origin}`: {message}")]
    Invalid { origin: String, message: String },
}

impl Preset {
    /// Resolve a preset name (`vit-tiny-p8`) or a path to a preset TOML, for `in_chans` input bands.
    pub fn load(spec: &str, in_chans: usize) -> Result<Preset, PresetError> {
        let text = match KNOWN.iter().find(|(name, _)| *name == spec) {
            Some((_, text)) => text.to_string(),
            None => read_preset_file(spec)?,
        };
        Preset::from_toml(&text, spec, in_chans)
    }

    /// Parse and check a preset's TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str, in_chans: usize) -> Result<Preset, PresetError> {
        let mut preset: Preset = toml::from_str(text).map_err(|e| PresetError::Parse {
            origin: origin.into(),
            message: e.to_string().trim_end().into(),
        })?;
        preset.in_chans = in_chans;
        preset.check().map_err(|message| PresetError::Invalid { origin: origin.into(), message })?;
        Ok(preset)
    }

    /// The names of the compiled-in presets.
    pub fn known() -> Vec<&'static str> {
        KNOWN.iter().map(|(name, _)| *name).collect()
    }

    /// The preset as TOML (stored in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a preset contains only TOML-representable values")
    }

    /// Patch tokens per side at `img_size`.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Check that every crop side (`(config key, px)`) is a multiple of the patch size: the patch
    /// embedding would silently drop the remainder.
    pub fn check_crop_sizes(&self, crops: &[(&str, usize)]) -> Result<(), String> {
        let p = self.patch_size;
        let bad: Vec<_> =
            crops.iter().filter(|(_, px)| px % p != 0).map(|(k, px)| format!("{k} = {px}")).collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(format!(
            "model preset `{}` has patch size {p}, which does not divide {}; use crop sizes that are multiples of {p} (e.g. global_px = {}, local_px = {})",
            self.name,
            bad.join(", "),
            (120 / p).max(1) * p,
            (56 / p).max(1) * p
        ))
    }

    /// MLP hidden width of a block.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("patch_size", self.patch_size),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("in_chans", self.in_chans),
            ("head.out_dim", self.head.out_dim),
            ("head.hidden_dim", self.head.hidden_dim),
            ("head.bottleneck_dim", self.head.bottleneck_dim),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{key} is 0; must be at least 1"));
        }
        if self.embed_dim % self.num_heads != 0 {
            return Err(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.grid() == 0 {
            return Err(format!("img_size {} is smaller than patch_size {}", self.img_size, self.patch_size));
        }
        if self.head.nlayers < 2 {
            return Err(format!("head.nlayers is {}; must be at least 2", self.head.nlayers));
        }
        Ok(())
    }
}

fn read_preset_file(spec: &str) -> Result<String, PresetError> {
    let path = Path::new(spec);
    if !path.exists() {
        return Err(PresetError::Unknown {
            spec: spec.into(),
            known: Preset::known().join(", "),
            path: path.to_path_buf(),
        });
    }
    std::fs::read_to_string(path).map_err(|source| PresetError::Read { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_preset_parses_with_the_band_count() {
        for name in Preset::known() {
            let p = Preset::load(name, 10).unwrap();
            assert_eq!(p.name, name);
            assert_eq!(p.in_chans, 10);
        }
        let tiny = Preset::load("vit-tiny-p8", 12).unwrap();
        assert_eq!((tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.grid()), (192, 12, 3, 15));
    }

    #[test]
    fn a_preset_path_is_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        let text = KNOWN[0].1.replace("embed_dim = 48", "embed_dim = 96");
        std::fs::write(&path, text).unwrap();
        let p = Preset::load(path.to_str().unwrap(), 3).unwrap();
        assert_eq!(p.embed_dim, 96);
    }

    #[test]
    fn an_unknown_preset_lists_the_known_ones() {
        let err = Preset::load("vit-huge", 10).unwrap_err().to_string();
        assert!(err.contains("vit-small-p8"), "{err}");
    }

    #[test]
    fn heads_that_do_not_divide_the_width_are_rejected() {
        let text = KNOWN[0].1.replace("num_heads = 3", "num_heads = 5");
        let err = Preset::from_toml(&text, "x", 10).unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");
    }

    #[test]
    fn crop_sizes_must_be_multiples_of_the_patch_size() {
        let p16 = Preset::load("vit-small-p16", 13).unwrap();
        assert_eq!((p16.patch_size, p16.grid()), (16, 7));
        p16.check_crop_sizes(&[("augment.global_px", 112), ("augment.local_px", 48)]).unwrap();
        let err = p16.check_crop_sizes(&[("augment.global_px", 120), ("augment.local_px", 48)]).unwrap_err();
        assert!(err.contains("augment.global_px = 120") && err.contains("global_px = 112"), "{err}");
        Preset::load("vit-small-p8", 10)
            .unwrap()
            .check_crop_sizes(&[("augment.global_px", 120), ("augment.local_px", 56)])
            .unwrap();
    }

    #[test]
    fn a_preset_survives_a_round_trip_through_toml() {
        let p = Preset::load("vit-small-p8", 10).unwrap();
        assert_eq!(Preset::from_toml(&p.to_toml(), "x", 10).unwrap(), p);
    }

    #[test]
    fn jetson_config_is_valid_and_trains_its_preset_in_bf16_on_cuda() {
        use crate::config::{Config, Device, Precision};
        let cfg = Config::from_toml(include_str!("../../deploy/jetson.toml")).unwrap();
        cfg.validate().unwrap();
        assert_eq!((cfg.train.device, cfg.train.precision), (Device::Cuda, Precision::Bf16));
        let preset = Preset::load(&cfg.model.preset, cfg.tile.bands.len()).unwrap();
        assert_eq!((preset.embed_dim, preset.patch_size, preset.head.out_dim), (384, 8, 16384));
    }
}
