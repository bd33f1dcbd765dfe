//! Reading a pretrained weight file into named state dicts: PyTorch zip pickles (`.pth`/`.pt`,
//! read by candle's pickle reader) and safetensors, flat or holding DINO's training-checkpoint
//! groups (`student`, `teacher`), with DDP's `module.` and the wrapper's `backbone.` prefixes
//! stripped, and the keys sorted into backbone, DINO head and ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

/// The container format of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` zip archive (PyTorch >= 1.6).
    PyTorch,
    /// safetensors.
    Safetensors,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::PyTorch => "PyTorch zip pickle",
            Format::Safetensors => "safetensors",
        })
    }
}

/// Top-level keys under which checkpoints nest their state dicts, in order of preference.
const NESTED_KEYS: [&str; 4] = ["teacher", "student", "state_dict", "model"];

/// One state dict of a file, its keys sorted by role (prefixes stripped).
#[derive(Debug, Default)]
pub struct StateDict {
    /// Where it sat in the file: `""` (top level), `teacher`, `student`, `state_dict`, `model`.
    pub group: String,
    /// ViT backbone tensors under DINO's names (`cls_token`, `blocks.0.attn.qkv.weight`, ...).
    pub backbone: BTreeMap<String, Tensor>,
    /// DINO head tensors (`mlp.0.weight`, `last_layer.weight_v`, ...), without `head.`.
    pub head: BTreeMap<String, Tensor>,
    /// Keys that are neither (a timm classifier's `head.weight`, `fc_norm.*`, ...), as stored.
    pub ignored: Vec<String>,
}

/// A weight file read into its state dicts.
#[derive(Debug)]
pub struct WeightFile {
    /// The file.
    pub path: PathBuf,
    /// Its container format.
    pub format: Format,
    /// Its state dicts: one for backbone files, `student` and `teacher` for DINO checkpoints.
    pub dicts: Vec<StateDict>,
}

impl WeightFile {
    /// Read `path`, telling the format from its first bytes.
    pub fn read(path: &Path) -> Result<WeightFile> {
        let mut magic = [0u8; 8];
        {
            use std::io::Read;
            let mut f =
                std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            let n = f.read(&mut magic).with_context(|| format!("{}: cannot read", path.display()))?;
            if n < magic.len() {
                bail!("{}: {n} bytes, too short for a weight file", path.display());
            }
        }
        let (format, groups) = if magic.starts_with(b"PK\x03\x04") {
            (Format::PyTorch, read_pytorch(path)?)
        } else if magic[0] == 0x80 {
            bail!(
                "{}: a legacy (pre-zip) PyTorch pickle; load it in Python and save it again with \
                 `torch.save(torch.load(f), g)` (PyTorch >= 1.6), or convert it to safetensors",
                path.display()
            )
        } else {
            (Format::Safetensors, read_safetensors(path)?)
        };
        let dicts = groups.into_iter().map(|(group, tensors)| StateDict::sort(group, tensors)).collect();
        Ok(WeightFile { path: path.to_path_buf(), format, dicts })
    }

    /// The state dict called `group`.
    pub fn dict(&self, group: &str) -> Option<&StateDict> {
        self.dicts.iter().find(|d| d.group == group)
    }
}

/// Tensors of a torch zip: the top-level state dict, or the nested ones DINO and others use.
fn read_pytorch(path: &Path) -> Result<Vec<(String, HashMap<String, Tensor>)>> {
    let top = load_pth(path, None)?;
    if !top.is_empty() {
        return Ok(vec![(String::new(), top)]);
    }
    let mut groups = Vec::new();
    for key in NESTED_KEYS {
        // candle reports a missing key as an error; a present one is a state dict.
        if let Ok(tensors) = load_pth(path, Some(key))
            && !tensors.is_empty()
        {
            groups.push((key.to_string(), tensors));
        }
    }
    if groups.is_empty() {
        bail!(
            "{}: no tensors at the top level nor under {}; is it a model checkpoint?",
            path.display(),
            NESTED_KEYS.map(|k| format!("`{k}`")).join(", ")
        );
    }
    Ok(groups)
}

fn load_pth(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let pth = candle_core::pickle::PthTensors::new(path, key)
        .with_context(|| format!("{}: not a readable PyTorch zip pickle", path.display()))?;
    let mut out = HashMap::new();
    for name in pth.tensor_infos().keys() {
        let tensor = pth
            .get(name)
            .with_context(|| format!("{}: tensor `{name}`", path.display()))?
            .expect("the name comes from the file's own index");
        out.insert(name.clone(), tensor.to_dtype(DType::F32)?);
    }
    Ok(out)
}

/// Tensors of a safetensors file; `student.`/`teacher.` prefixes become groups.
fn read_safetensors(path: &Path) -> Result<Vec<(String, HashMap<String, Tensor>)>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: neither a PyTorch zip nor a safetensors file", path.display()))?;
    let mut groups: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
    for (name, tensor) in tensors {
        let (group, rest) = match name.split_once('.') {
            Some((g @ ("student" | "teacher"), rest)) => (g.to_string(), rest.to_string()),
            _ => (String::new(), name),
        };
        groups.entry(group).or_default().insert(rest, tensor.to_dtype(DType::F32)?);
    }
    // A flat file that merely has a key starting with `student.` is not a training checkpoint.
    if groups.contains_key("") && groups.len() > 1 {
        let mut flat = HashMap::new();
        for (group, tensors) in std::mem::take(&mut groups) {
            let prefix = if group.is_empty() { String::new() } else { format!("{group}.") };
            flat.extend(tensors.into_iter().map(|(n, t)| (format!("{prefix}{n}"), t)));
        }
        groups.insert(String::new(), flat);
    }
    Ok(groups.into_iter().collect())
}

impl StateDict {
    /// Strip `module.` (DDP) and `backbone.` (MultiCropWrapper) and sort the keys by role.
    fn sort(group: String, tensors: HashMap<String, Tensor>) -> StateDict {
        let mut dict = StateDict { group, ..StateDict::default() };
        for (key, tensor) in tensors {
            let name = key.strip_prefix("module.").unwrap_or(&key);
            if let Some(name) = name.strip_prefix("backbone.") {
                dict.backbone.insert(name.to_string(), tensor);
            } else if let Some(name) = name.strip_prefix("head.").filter(|n| is_dino_head(n)) {
                dict.head.insert(name.to_string(), tensor);
            } else if is_backbone(name) {
                dict.backbone.insert(name.to_string(), tensor);
            } else {
                dict.ignored.push(key);
            }
        }
        dict.ignored.sort();
        dict
    }
}

/// DINO `DINOHead` names: `mlp.N.*`, `last_layer.*` (timm's classifier is `head.weight`/`head.bias`).
fn is_dino_head(name: &str) -> bool {
    name.starts_with("mlp.") || name.starts_with("last_layer.")
}

/// DINO/timm `VisionTransformer` names.
fn is_backbone(name: &str) -> bool {
    ["cls_token", "pos_embed"].contains(&name)
        || ["patch_embed.", "blocks.", "norm."].iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Tensor {
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn legacy_pickles_and_other_files_are_errors_that_name_the_file_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("old.pth");
        std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20]).unwrap();
        let err = format!("{:#}", WeightFile::read(&legacy).unwrap_err());
        assert!(err.contains("old.pth") && err.contains("legacy") && err.contains("torch.save"), "{err}");
        let text = dir.path().join("notes.pth");
        std::fs::write(&text, "not a checkpoint at all").unwrap();
        let err = format!("{:#}", WeightFile::read(&text).unwrap_err());
        assert!(
            err.contains("notes.pth") && err.contains("neither a PyTorch zip nor a safetensors"),
            "{err}"
        );
    }

    #[test]
    fn prefixes_are_stripped_and_keys_sorted_by_role() {
        let keys = [
            "module.backbone.cls_token",
            "module.backbone.blocks.0.norm1.weight",
            "module.head.mlp.0.weight",
            "module.head.last_layer.weight_g",
            "head.weight",
            "fc_norm.bias",
            "norm.weight",
        ];
        let tensors = keys.iter().map(|k| (k.to_string(), t())).collect();
        let dict = StateDict::sort("student".into(), tensors);
        let backbone: Vec<_> = dict.backbone.keys().cloned().collect();
        assert_eq!(backbone, ["blocks.0.norm1.weight", "cls_token", "norm.weight"]);
        let head: Vec<_> = dict.head.keys().cloned().collect();
        assert_eq!(head, ["last_layer.weight_g", "mlp.0.weight"]);
        assert_eq!(dict.ignored, ["fc_norm.bias", "head.weight"]);
    }
}
