//! Pretrained weights as the starting point: a DINO, DINO training-checkpoint or timm ViT file
//! ([`file`]) becomes the initial values of our parameters, by name.
//!
//! - The architecture read from the tensors (width, depth, MLP width, qkv bias, patch size) must
//!   equal the preset's; `num_heads` is not stored in weights, so the preset's is used.
//! - Bands by name: the file's input channels are named by the user (`model.init_bands`); each
//!   configured band takes its channel of the patch embedding, a band the file lacks starts from
//!   the mean of the file's filters or from zeros (`model.init_missing_bands`).
//! - A different patch size is bridged by FlexiViT's pseudo-inverse resize ([`flexi`]).
//! - The positional embedding is resized to the preset's grid with DINO's bicubic
//!   `interpolate_pos_encoding` (scale `(g + 0.1) / N`), the same matrices training uses.
//! - The DINO head is imported when the file has one of the preset's shape, else it starts fresh.

pub mod file;
pub mod flexi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, IndexOp, Tensor};

use super::config::Preset;
use super::ops::bicubic_grid;
use super::params::Params;
use crate::config::MissingBands;
pub use file::{Format, StateDict, WeightFile};

/// What to import and how (`model.init*`).
#[derive(Debug, Clone)]
pub struct InitSpec {
    /// The weight file.
    pub path: PathBuf,
    /// Names of its input channels, in order.
    pub bands: Vec<String>,
    /// How bands the file lacks start.
    pub missing: MissingBands,
}

/// The architecture a state dict's tensors describe.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// Token width (`cls_token` `[1, 1, D]`).
    pub embed_dim: usize,
    /// Number of `blocks.N`.
    pub depth: usize,
    /// MLP hidden width (`blocks.0.mlp.fc1.weight` `[H, D]`).
    pub mlp_hidden: usize,
    /// Whether `blocks.0.attn.qkv.bias` exists.
    pub qkv_bias: bool,
    /// Patch side (`patch_embed.proj.weight` `[D, C, p, p]`).
    pub patch_size: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Side of the positional embedding's square grid.
    pub grid: usize,
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "embed_dim {}, depth {}, mlp {}, qkv_bias {}, patch {}, {} input channels, {}x{} position grid",
            self.embed_dim,
            self.depth,
            self.mlp_hidden,
            self.qkv_bias,
            self.patch_size,
            self.in_chans,
            self.grid,
            self.grid
        )
    }
}

/// Initial values by our parameter names (`backbone.*`, `head.*`), for each network.
pub struct Imported {
    /// The student's.
    pub student: HashMap<String, Tensor>,
    /// The teacher's.
    pub teacher: HashMap<String, Tensor>,
}

/// Read `spec.path` and map it onto `params` (the names and shapes of a model built from
/// `preset` for `bands`). Logs what was mapped, filled, resized and ignored.
pub fn import(spec: &InitSpec, preset: &Preset, bands: &[String], params: &Params) -> Result<Imported> {
    let file = WeightFile::read(&spec.path)?;
    let (student, teacher) = pick_dicts(&file);
    let student_values = map_dict(&file.path, student, spec, preset, bands, params)?;
    let teacher_values = if std::ptr::eq(student, teacher) {
        student_values.clone()
    } else {
        map_dict(&file.path, teacher, spec, preset, bands, params)?
    };
    log::info!(
        "{}: {} ({}); the student starts from `{}`, the teacher from `{}`",
        file.path.display(),
        file.format,
        Architecture::of(&file.path, teacher)?,
        group_name(student),
        group_name(teacher)
    );
    Ok(Imported { student: student_values, teacher: teacher_values })
}

fn group_name(dict: &StateDict) -> &str {
    if dict.group.is_empty() { "the top-level state dict" } else { &dict.group }
}

/// DINO checkpoints: student and teacher; anything else: its one (preferred) dict for both.
fn pick_dicts(file: &WeightFile) -> (&StateDict, &StateDict) {
    match (file.dict("student"), file.dict("teacher")) {
        (Some(s), Some(t)) => (s, t),
        _ => (&file.dicts[0], &file.dicts[0]),
    }
}

impl Architecture {
    /// Read the architecture from a state dict's tensors; a missing key is an unknown layout.
    pub fn of(path: &Path, dict: &StateDict) -> Result<Architecture> {
        const REQUIRED: [&str; 6] = [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.0.attn.qkv.weight",
            "blocks.0.mlp.fc1.weight",
            "norm.weight",
        ];
        let missing: Vec<_> = REQUIRED.iter().filter(|k| !dict.backbone.contains_key(**k)).collect();
        if !missing.is_empty() {
            let found: Vec<_> =
                dict.backbone.keys().chain(&dict.ignored).take(6).map(String::as_str).collect();
            bail!(
                "{}: unknown key layout{}: no {} (keys found: {}{}); expected the DINO/timm ViT names \
                 cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.* (optionally under \
                 `module.`/`backbone.`, or in `student`/`teacher`)",
                path.display(),
                if dict.group.is_empty() { String::new() } else { format!(" in `{}`", dict.group) },
                missing.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
                found.join(", "),
                if dict.backbone.len() + dict.ignored.len() > found.len() { ", ..." } else { "" }
            );
        }
        let dims = |k: &str| dict.backbone[k].dims().to_vec();
        let (pe, pos, cls, fc1) = (
            dims("patch_embed.proj.weight"),
            dims("pos_embed"),
            dims("cls_token"),
            dims("blocks.0.mlp.fc1.weight"),
        );
        if pe.len() != 4 || pe[2] != pe[3] || pos.len() != 3 || pos[1] < 2 || cls.len() != 3 || fc1.len() != 2
        {
            bail!(
                "{}: patch_embed.proj.weight {pe:?}, pos_embed {pos:?}, cls_token {cls:?}, blocks.0.mlp.fc1.weight \
                 {fc1:?} are not the shapes of a ViT",
                path.display()
            );
        }
        let n = pos[1] - 1;
        let grid = (n as f64).sqrt().round() as usize;
        if grid * grid != n {
            bail!("{}: pos_embed has {n} patch positions, not a square grid", path.display());
        }
        let depth =
            (0..).take_while(|i| dict.backbone.contains_key(&format!("blocks.{i}.attn.qkv.weight"))).count();
        Ok(Architecture {
            embed_dim: cls[2],
            depth,
            mlp_hidden: fc1[0],
            qkv_bias: dict.backbone.contains_key("blocks.0.attn.qkv.bias"),
            patch_size: pe[2],
            in_chans: pe[1],
            grid,
        })
    }

    /// The same sizes, as a model built from `preset` has them (patch and channels aside).
    fn differences(&self, preset: &Preset) -> Vec<String> {
        let pairs = [
            ("embed_dim", self.embed_dim, preset.embed_dim),
            ("depth", self.depth, preset.depth),
            ("mlp hidden width", self.mlp_hidden, preset.mlp_hidden()),
            ("qkv_bias", self.qkv_bias as usize, preset.qkv_bias as usize),
        ];
        pairs.iter().filter(|(_, a, b)| a != b).map(|(k, a, b)| format!("{k} {a} vs {b}")).collect()
    }
}

/// One state dict mapped onto our parameter names.
fn map_dict(
    path: &Path,
    dict: &StateDict,
    spec: &InitSpec,
    preset: &Preset,
    bands: &[String],
    params: &Params,
) -> Result<HashMap<String, Tensor>> {
    let arch = Architecture::of(path, dict)?;
    let diffs = arch.differences(preset);
    if !diffs.is_empty() {
        bail!(
            "{}: the file's architecture ({arch}) does not match preset `{}` (embed_dim {}, depth {}, \
             mlp {}, qkv_bias {}, patch {}): {}; choose a preset of the file's size ({})",
            path.display(),
            preset.name,
            preset.embed_dim,
            preset.depth,
            preset.mlp_hidden(),
            preset.qkv_bias,
            preset.patch_size,
            diffs.join(", "),
            matching_presets(&arch)
        );
    }
    if !dict.ignored.is_empty() {
        log::info!("{}: ignored (not part of a DINO ViT): {}", path.display(), dict.ignored.join(", "));
    }
    let mut out = HashMap::new();
    for (name, var) in params.iter() {
        let value = if let Some(key) = name.strip_prefix("backbone.") {
            Some(backbone_value(path, dict, key, &arch, spec, preset, bands)?)
        } else {
            None
        };
        if let Some(value) = value {
            check_shape(path, name, &value, var.dims())?;
            out.insert(name.to_string(), value);
        }
    }
    out.extend(head_values(path, dict, params));
    Ok(out)
}

fn check_shape(path: &Path, name: &str, value: &Tensor, want: &[usize]) -> Result<()> {
    if value.dims() != want {
        bail!("{}: `{name}` becomes {:?}, the model needs {want:?}", path.display(), value.dims());
    }
    Ok(())
}

/// The initial value of backbone parameter `key`: the file's, with bands, patch size and
/// position grid adapted.
fn backbone_value(
    path: &Path,
    dict: &StateDict,
    key: &str,
    arch: &Architecture,
    spec: &InitSpec,
    preset: &Preset,
    bands: &[String],
) -> Result<Tensor> {
    let tensor = dict.backbone.get(key).with_context(|| {
        format!("{}: `{key}` is missing (the model needs every backbone tensor)", path.display())
    })?;
    match key {
        "patch_embed.proj.weight" => patch_weight(path, tensor, arch, spec, preset, bands),
        "pos_embed" => pos_embed(tensor, arch.grid, preset.grid()),
        _ => Ok(tensor.clone()),
    }
}

/// The patch embedding for our bands (by name) and our patch size.
fn patch_weight(
    path: &Path,
    weight: &Tensor,
    arch: &Architecture,
    spec: &InitSpec,
    preset: &Preset,
    bands: &[String],
) -> Result<Tensor> {
    if spec.bands.len() != arch.in_chans {
        bail!(
            "{}: {} input channels, but the init bands name {} ({}); name one band per channel (model.init_bands, --init-bands)",
            path.display(),
            arch.in_chans,
            spec.bands.len(),
            spec.bands.join(",")
        );
    }
    let weight = select_bands(path, weight, &spec.bands, bands, spec.missing)?;
    if arch.patch_size == preset.patch_size {
        return Ok(weight);
    }
    log::info!(
        "{}: patch embedding resized from /{} to /{} (FlexiViT pseudo-inverse resize)",
        path.display(),
        arch.patch_size,
        preset.patch_size
    );
    let (d, c, p, _) = weight.dims4()?;
    let q = preset.patch_size;
    let resized = flexi::resize_kernels(&weight.flatten_all()?.to_vec1::<f32>()?, p, q)?;
    Ok(Tensor::from_vec(resized, (d, c, q, q), &Device::Cpu)?)
}

/// Input channels of `weight` `[D, C_file, p, p]` for `ours` by name; bands the file lacks get
/// the mean filter or zeros.
fn select_bands(
    path: &Path,
    weight: &Tensor,
    theirs: &[String],
    ours: &[String],
    missing: MissingBands,
) -> Result<Tensor> {
    let fill = match missing {
        MissingBands::Mean => weight.mean_keepdim(1)?,
        MissingBands::Zeros => weight.i((.., 0..1))?.zeros_like()?,
    };
    let mut taken = Vec::new();
    let mut filled = Vec::new();
    let channels = ours
        .iter()
        .map(|band| match theirs.iter().position(|t| t == band) {
            Some(j) => {
                taken.push(format!("{band}<-{j}"));
                weight.i((.., j..j + 1))
            }
            None => {
                filled.push(band.as_str());
                Ok(fill.clone())
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let unused: Vec<_> = theirs.iter().filter(|t| !ours.contains(t)).map(String::as_str).collect();
    log::info!("{}: bands from the file's channels: {}", path.display(), taken.join(" "));
    if !filled.is_empty() {
        let how = match missing {
            MissingBands::Mean => "the mean of the imported filters",
            MissingBands::Zeros => "zeros",
        };
        log::warn!("{}: bands not in the file start from {how}: {}", path.display(), filled.join(","));
    }
    if !unused.is_empty() {
        log::info!(
            "{}: the file's channels {} are not configured and dropped",
            path.display(),
            unused.join(",")
        );
    }
    Ok(Tensor::cat(&channels, 1)?)
}

/// `pos_embed` `[1, 1 + src^2, D]` on a `dst x dst` grid, as DINO's `interpolate_pos_encoding`
/// resizes it for a `dst * p` pixel input (bicubic, scale `(dst + 0.1) / src`).
fn pos_embed(pos: &Tensor, src: usize, dst: usize) -> Result<Tensor> {
    if src == dst {
        return Ok(pos.clone());
    }
    let scale = (dst as f64 + 0.1) / src as f64;
    let m = bicubic_grid(src, (dst, dst), (scale, scale));
    let m = Tensor::from_vec(m, (dst * dst, src * src), &Device::Cpu)?;
    let grid = pos.i((0, 1.., ..))?.to_dtype(DType::F64)?;
    let resized = m.matmul(&grid)?.to_dtype(DType::F32)?.unsqueeze(0)?;
    Ok(Tensor::cat(&[&pos.narrow(1, 0, 1)?, &resized], 1)?)
}

/// The DINO head's tensors when the file has all of ours in our shapes; else none (fresh head).
fn head_values(path: &Path, dict: &StateDict, params: &Params) -> HashMap<String, Tensor> {
    if dict.head.is_empty() {
        log::info!("{}: no DINO head in the file; the head starts fresh", path.display());
        return HashMap::new();
    }
    let mut out = HashMap::new();
    for (name, var) in params.iter().filter(|(n, _)| n.starts_with("head.")) {
        let key = &name["head.".len()..];
        match dict.head.get(key) {
            Some(t) if t.dims() == var.dims() => {
                out.insert(name.to_string(), t.clone());
            }
            found => {
                let what = found.map_or("missing".to_string(), |t| {
                    format!("{:?}, the preset's {:?}", t.dims(), var.dims())
                });
                log::warn!("{}: DINO head `{key}` {what}; the head starts fresh", path.display());
                return HashMap::new();
            }
        }
    }
    out
}

/// What `inspect-checkpoint` prints about a weight file: format, state dicts, keys by role, the
/// architecture found, the presets of its size and the bands it expects.
pub fn describe(file: &WeightFile) -> Result<Vec<String>> {
    let mut lines = vec![format!("{}: {}", file.path.display(), file.format)];
    for dict in &file.dicts {
        lines.push(format!(
            "  {}: {} backbone tensors, {} DINO head tensors, {} other keys{}",
            group_name(dict),
            dict.backbone.len(),
            dict.head.len(),
            dict.ignored.len(),
            list_some(&dict.ignored)
        ));
        let arch = match Architecture::of(&file.path, dict) {
            Ok(arch) => arch,
            Err(e) => {
                lines.push(format!("    {e:#}"));
                continue;
            }
        };
        lines.push(format!("    architecture: {arch} (num_heads is not stored in weights)"));
        lines.push(format!("    presets of this size: {}", matching_presets(&arch)));
        if let Some((k, bottleneck)) = dict.head.get("last_layer.weight_v").and_then(|v| v.dims2().ok()) {
            lines.push(format!("    DINO head: {k} prototypes, bottleneck {bottleneck}"));
        }
        lines.push(format!(
            "    bands: {} input channels, not named in the file: pass --init-bands ({})",
            arch.in_chans,
            band_hint(arch.in_chans)
        ));
    }
    Ok(lines)
}

/// The known presets `arch` fits (patch size aside: PI-resize bridges it), or what to do instead.
fn matching_presets(arch: &Architecture) -> String {
    let names: Vec<_> = Preset::known()
        .into_iter()
        .filter(|name| Preset::load(name, arch.in_chans).is_ok_and(|p| arch.differences(&p).is_empty()))
        .collect();
    if names.is_empty() {
        "none of the known presets; write a preset TOML".to_string()
    } else {
        names.join(", ")
    }
}

fn list_some(keys: &[String]) -> String {
    match keys.len() {
        0 => String::new(),
        1..=4 => format!(" ({})", keys.join(", ")),
        n => format!(" ({}, ... {} more)", keys[..4].join(", "), n - 4),
    }
}

fn band_hint(channels: usize) -> &'static str {
    match channels {
        3 => "`rgb` for ImageNet-style RGB weights: B04,B03,B02",
        13 => "`ssl4eo-s12-13` for SSL4EO-S12: B01..B08,B8A,B09..B12",
        _ => "a comma list in the file's channel order",
    }
}
