//! The teacher backbone as an ONNX graph, built from a description: an [`ExportSpec`] (sizes, bands,
//! input contract) and the weights by their DINO names ([`NamedTensors`]), never from live modules.
//!
//! Graph: `pixels [N,C,H,W]` -> (reflectance contract: `(x - mean) / std`) -> patch-embed `Conv` ->
//! tokens `[N,L,D]` -> cls token prepended -> `+ pos_embed` (baked for the export size) -> `depth`
//! pre-norm blocks (`LayerNormalization`, `MatMul`/`Add`, `Softmax` attention, exact GELU) -> final
//! norm -> `cls [N,D]` (and optionally `patch_tokens [N,L,D]`). The batch axis is symbolic.
//!
//! One emitter per ONNX op, named after it; node names follow the parameter path
//! (`blocks.3.attn.qkv/MatMul`) and each node's output carries the node's name.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

use super::onnx_pb::{
    AttributeProto, AttributeType, DataType, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto,
    type_proto,
};
use crate::infer::{CLS_OUTPUT, INPUT_NAME, InputContract, ModelMetadata, PATCH_TOKENS_OUTPUT};

/// Everything about the exported model except its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSpec {
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block (divides `embed_dim`).
    pub num_heads: usize,
    /// Patch size in pixels.
    pub patch_size: usize,
    /// Export input height and width in pixels (a multiple of `patch_size`).
    pub img_size: usize,
    /// Input channels (= `bands.len()`).
    pub in_chans: usize,
    /// LayerNorm epsilon.
    pub layernorm_eps: f32,
    /// Band names in input order.
    pub bands: Vec<String>,
    /// Per-band mean (reflectance), input order.
    pub band_mean: Vec<f32>,
    /// Per-band std (reflectance), input order.
    pub band_std: Vec<f32>,
    /// What the input holds.
    pub input_contract: InputContract,
    /// Preset name, for the metadata.
    pub preset: String,
    /// Training step of the weights, for the metadata.
    pub step: u64,
    /// Also output the patch tokens.
    pub patch_tokens: bool,
    /// ONNX opset (17 or newer; from 20 on GELU is the `Gelu` op, before it `Erf`).
    pub opset: i64,
    /// RFC 3339 export time for the metadata; `None` = now.
    pub created: Option<String>,
}

impl ExportSpec {
    /// Per-band mean/std for `bands` from [`crate::tile::band_stats`]; an unknown band is an error.
    pub fn band_statistics(bands: &[String]) -> Result<(Vec<f32>, Vec<f32>)> {
        let stats = bands
            .iter()
            .map(|b| {
                crate::tile::band_stats(b).with_context(|| format!("band `{b}`: no normalisation statistics"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((stats.iter().map(|s| s.mean).collect(), stats.iter().map(|s| s.std).collect()))
    }

    /// Tokens per side of the export grid.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// The metadata written into the file.
    pub fn metadata(&self) -> ModelMetadata {
        ModelMetadata {
            dinostream_version: env!("CARGO_PKG_VERSION").to_string(),
            preset: self.preset.clone(),
            training_step: self.step,
            created: self.created.clone().unwrap_or_else(now_rfc3339),
            bands: self.bands.clone(),
            band_mean: self.band_mean.clone(),
            band_std: self.band_std.clone(),
            input_contract: self.input_contract,
            patch_size: self.patch_size,
            image_size: self.img_size,
            embed_dim: self.embed_dim,
        }
    }

    /// Every inconsistency, so one message lists them all.
    fn validate(&self) -> Result<()> {
        let mut errors = Vec::new();
        if self.num_heads == 0 || self.embed_dim % self.num_heads != 0 {
            errors.push(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.patch_size == 0 || self.img_size % self.patch_size != 0 || self.img_size == 0 {
            errors.push(format!(
                "img_size {} is not a multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        for (what, n) in [
            ("bands", self.bands.len()),
            ("band_mean", self.band_mean.len()),
            ("band_std", self.band_std.len()),
        ] {
            if n != self.in_chans {
                errors.push(format!("{what} has {n} entries but in_chans is {}", self.in_chans));
            }
        }
        if self.band_std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            errors.push(format!("band_std {:?} must be positive", self.band_std));
        }
        if self.opset < 17 {
            errors.push(format!("opset {} is older than 17 (LayerNormalization)", self.opset));
        }
        if errors.is_empty() { Ok(()) } else { bail!("export spec: {}", errors.join("; ")) }
    }
}

/// An f32 tensor: row-major values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Weights by their DINO backbone names (`blocks.0.attn.qkv.weight`, torch layouts).
#[derive(Debug, Clone, Default)]
pub struct NamedTensors(BTreeMap<String, Tensor>);

impl NamedTensors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace `name`.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) {
        self.0.insert(name.into(), Tensor { shape, data });
    }

    /// The f32 tensors of a safetensors file whose names start with `prefix`, with the prefix cut
    /// off (`teacher.backbone.` turns `teacher.backbone.norm.weight` into `norm.weight`).
    pub fn from_safetensors(bytes: &[u8], prefix: &str) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).context("reading safetensors")?;
        let mut out = NamedTensors::new();
        for (name, view) in st.tensors() {
            let Some(short) = name.strip_prefix(prefix) else { continue };
            if view.dtype() != safetensors::Dtype::F32 {
                bail!("tensor `{name}`: dtype {:?}, expected F32", view.dtype());
            }
            let data =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            out.insert(short, view.shape().to_vec(), data);
        }
        Ok(out)
    }

    /// `name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.0.get(name).with_context(|| format!("tensor `{name}` is missing"))?;
        if t.shape != shape {
            bail!("tensor `{name}`: shape {:?}, expected {shape:?}", t.shape);
        }
        Ok(t)
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.0.get(name).with_context(|| format!("tensor `{name}` is missing"))?.shape)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No tensors at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Build the ONNX model for `spec` with `weights`.
pub fn build_model(spec: &ExportSpec, weights: &NamedTensors) -> Result<ModelProto> {
    spec.validate()?;
    let mut g = Graph::new(spec.opset);
    let x = input_normalization(&mut g, spec);
    let x = patch_embed(&mut g, spec, weights, &x)?;
    let x = prepend_cls_token(&mut g, spec, weights, &x)?;
    let mut x = add_pos_embed(&mut g, spec, weights, &x)?;
    for i in 0..spec.depth {
        x = block(&mut g, spec, weights, i, &x).with_context(|| format!("building block {i}"))?;
    }
    let x = layer_norm(&mut g, spec, weights, "norm", &x)?;
    let mut outputs = vec![(CLS_OUTPUT, vec![Dim::Batch, Dim::Fixed(spec.embed_dim)])];
    let cls_index = g.const_i64("const/zero", &[], &[0]);
    let cls = g.gather("cls/Gather", &x, &cls_index, 1);
    g.identity(CLS_OUTPUT, &cls);
    if spec.patch_tokens {
        let tokens = spec.grid() * spec.grid();
        patch_token_output(&mut g, &x);
        outputs.push((PATCH_TOKENS_OUTPUT, vec![Dim::Batch, Dim::Fixed(tokens), Dim::Fixed(spec.embed_dim)]));
    }
    let input = [Dim::Batch, Dim::Fixed(spec.in_chans), Dim::Fixed(spec.img_size), Dim::Fixed(spec.img_size)];
    Ok(model_proto(spec, g, value_info(INPUT_NAME, &input), outputs))
}

/// [`build_model`] encoded as ONNX bytes.
pub fn export_bytes(spec: &ExportSpec, weights: &NamedTensors) -> Result<Vec<u8>> {
    Ok(prost::Message::encode_to_vec(&build_model(spec, weights)?))
}

/// Wrap the graph with opset, IR version and metadata.
fn model_proto(
    spec: &ExportSpec,
    g: Graph,
    input: ValueInfoProto,
    outputs: Vec<(&str, Vec<Dim>)>,
) -> ModelProto {
    let graph = GraphProto {
        node: g.nodes,
        name: format!("dinostream {} teacher backbone", spec.preset),
        initializer: g.initializers,
        input: vec![input],
        output: outputs.iter().map(|(name, dims)| value_info(name, dims)).collect(),
        ..Default::default()
    };
    let metadata_props = spec
        .metadata()
        .to_props()
        .into_iter()
        .map(|(key, value)| StringStringEntryProto { key, value })
        .collect();
    ModelProto {
        ir_version: ir_version(spec.opset),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: spec.opset }],
        producer_name: "dinostream".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "DINO teacher backbone; see metadata_props for the input contract".into(),
        graph: Some(graph),
        metadata_props,
        ..Default::default()
    }
}

/// The IR version that goes with an opset (onnx/helper.py's VERSION_TABLE).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        _ => 11,
    }
}

/// Reflectance contract: `(x - mean) / std` per band; normalized contract: the input as is.
fn input_normalization(g: &mut Graph, spec: &ExportSpec) -> String {
    match spec.input_contract {
        InputContract::Normalized => INPUT_NAME.to_string(),
        InputContract::Reflectance => {
            let shape = [1, spec.in_chans, 1, 1];
            let mean = g.weight("input.band_mean", &shape, &spec.band_mean);
            let std = g.weight("input.band_std", &shape, &spec.band_std);
            let centred = g.sub("input/Sub", INPUT_NAME, &mean);
            g.div("input/Div", &centred, &std)
        }
    }
}

/// `[N,C,H,W]` -> Conv -> `[N,D,h,w]` -> `[N,h*w,D]`.
fn patch_embed(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, x: &str) -> Result<String> {
    let (d, p) = (spec.embed_dim, spec.patch_size);
    let weight = w.get("patch_embed.proj.weight", &[d, spec.in_chans, p, p])?;
    let bias = w.get("patch_embed.proj.bias", &[d])?;
    let weight = g.weight("patch_embed.proj.weight", &weight.shape, &weight.data);
    let bias = g.weight("patch_embed.proj.bias", &[d], &bias.data);
    let conv = g.conv("patch_embed.proj/Conv", x, &weight, &bias, p);
    let shape = g.const_i64("patch_embed/shape", &[3], &[0, d as i64, -1]);
    let flat = g.reshape("patch_embed/Reshape", &conv, &shape);
    Ok(g.transpose("patch_embed/Transpose", &flat, &[0, 2, 1]))
}

/// `cls_token [1,1,D]` expanded to `[N,1,D]` and concatenated in front of the patch tokens.
fn prepend_cls_token(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, x: &str) -> Result<String> {
    let d = spec.embed_dim;
    let cls = w.get("cls_token", &[1, 1, d])?;
    let cls = g.weight("cls_token", &[1, 1, d], &cls.data);
    let batch = g.shape("cls_token/Shape", x, 0, 1);
    let rest = g.const_i64("cls_token/rest", &[2], &[1, d as i64]);
    let shape = g.concat("cls_token/Concat_shape", &[&batch, &rest], 0);
    let cls = g.expand("cls_token/Expand", &cls, &shape);
    Ok(g.concat("cls_token/Concat", &[&cls, x], 1))
}

/// `+ pos_embed [1, 1+h*w, D]`, already at the export size.
fn add_pos_embed(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, x: &str) -> Result<String> {
    let shape = [1, 1 + spec.grid() * spec.grid(), spec.embed_dim];
    let pos = w.get("pos_embed", &shape).context(
        "pos_embed must match the export size: interpolate it for the export img_size first (model module)",
    )?;
    let pos = g.weight("pos_embed", &shape, &pos.data);
    Ok(g.add("pos_embed/Add", x, &pos))
}

/// Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
fn block(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, i: usize, x: &str) -> Result<String> {
    let p = format!("blocks.{i}");
    let h = layer_norm(g, spec, w, &format!("{p}.norm1"), x)?;
    let h = attention(g, spec, w, &format!("{p}.attn"), &h)?;
    let x = g.add(&format!("{p}/Add_attn"), x, &h);
    let h = layer_norm(g, spec, w, &format!("{p}.norm2"), &x)?;
    let h = mlp(g, spec, w, &format!("{p}.mlp"), &h)?;
    Ok(g.add(&format!("{p}/Add_mlp"), &x, &h))
}

/// Multi-head self-attention: `softmax(q k^T * head_dim^-0.5) v`, heads split as
/// `qkv.reshape(N, T, 3, H, D/H)`.
fn attention(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, p: &str, x: &str) -> Result<String> {
    let (d, heads) = (spec.embed_dim, spec.num_heads);
    let head_dim = d / heads;
    let qkv = linear(g, w, &format!("{p}.qkv"), x, d, 3 * d)?;
    let split = g.const_i64(&format!("{p}/qkv_shape"), &[5], &[0, 0, 3, heads as i64, head_dim as i64]);
    let qkv = g.reshape(&format!("{p}/Reshape_qkv"), &qkv, &split);
    let qkv = g.transpose(&format!("{p}/Transpose_qkv"), &qkv, &[2, 0, 3, 1, 4]);
    let [q, k, v] = ["q", "k", "v"].map(|name| {
        let index = ["q", "k", "v"].iter().position(|n| *n == name).expect("name is one of q, k, v") as i64;
        let index = g.const_i64(&format!("{p}/{name}_index"), &[], &[index]);
        g.gather(&format!("{p}/Gather_{name}"), &qkv, &index, 0)
    });
    let k_t = g.transpose(&format!("{p}/Transpose_k"), &k, &[0, 1, 3, 2]);
    let scores = g.mat_mul(&format!("{p}/MatMul_qk"), &q, &k_t);
    let scale = g.weight(&format!("{p}/scale"), &[], &[(head_dim as f32).powf(-0.5)]);
    let scores = g.mul(&format!("{p}/Mul_scale"), &scores, &scale);
    let probs = g.softmax(&format!("{p}/Softmax"), &scores);
    let out = g.mat_mul(&format!("{p}/MatMul_v"), &probs, &v);
    let out = g.transpose(&format!("{p}/Transpose_out"), &out, &[0, 2, 1, 3]);
    let merge = g.const_i64(&format!("{p}/out_shape"), &[3], &[0, 0, d as i64]);
    let out = g.reshape(&format!("{p}/Reshape_out"), &out, &merge);
    linear(g, w, &format!("{p}.proj"), &out, d, d)
}

/// `fc2(gelu(fc1(x)))`.
fn mlp(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, p: &str, x: &str) -> Result<String> {
    let d = spec.embed_dim;
    // The hidden width is whatever fc1 has: mlp_ratio is not part of the spec.
    let fc1 = format!("{p}.fc1.weight");
    let hidden = w.shape(&fc1)?.first().copied().with_context(|| format!("tensor `{fc1}` is a scalar"))?;
    let h = linear(g, w, &format!("{p}.fc1"), x, d, hidden)?;
    let h = gelu(g, &format!("{p}.act"), &h);
    linear(g, w, &format!("{p}.fc2"), &h, hidden, d)
}

/// `x @ W^T + b` with torch's `[out, in]` weight stored transposed for MatMul.
fn linear(g: &mut Graph, w: &NamedTensors, p: &str, x: &str, d_in: usize, d_out: usize) -> Result<String> {
    let weight = w.get(&format!("{p}.weight"), &[d_out, d_in])?;
    let bias = w.get(&format!("{p}.bias"), &[d_out])?;
    let transposed = transpose_2d(&weight.data, d_out, d_in);
    let weight = g.weight(&format!("{p}.weight"), &[d_in, d_out], &transposed);
    let bias = g.weight(&format!("{p}.bias"), &[d_out], &bias.data);
    let y = g.mat_mul(&format!("{p}/MatMul"), x, &weight);
    Ok(g.add(&format!("{p}/Add"), &y, &bias))
}

/// LayerNormalization over the last axis with `{p}.weight` and `{p}.bias`.
fn layer_norm(g: &mut Graph, spec: &ExportSpec, w: &NamedTensors, p: &str, x: &str) -> Result<String> {
    let d = spec.embed_dim;
    let scale = w.get(&format!("{p}.weight"), &[d])?;
    let bias = w.get(&format!("{p}.bias"), &[d])?;
    let scale = g.weight(&format!("{p}.weight"), &[d], &scale.data);
    let bias = g.weight(&format!("{p}.bias"), &[d], &bias.data);
    Ok(g.layer_normalization(&format!("{p}/LayerNormalization"), x, &scale, &bias, spec.layernorm_eps))
}

/// Exact GELU: the `Gelu` op from opset 20, else `0.5 x (1 + erf(x / sqrt 2))`.
fn gelu(g: &mut Graph, p: &str, x: &str) -> String {
    if g.opset >= 20 {
        return g.node(&format!("{p}/Gelu"), "Gelu", &[x], vec![attr_string("approximate", "none")]);
    }
    let sqrt2 = g.weight(&format!("{p}/sqrt2"), &[], &[std::f32::consts::SQRT_2]);
    let one = g.weight(&format!("{p}/one"), &[], &[1.0]);
    let half = g.weight(&format!("{p}/half"), &[], &[0.5]);
    let scaled = g.div(&format!("{p}/Div"), x, &sqrt2);
    let erf = g.node(&format!("{p}/Erf"), "Erf", &[&scaled], vec![]);
    let shifted = g.add(&format!("{p}/Add"), &erf, &one);
    let gated = g.mul(&format!("{p}/Mul"), x, &shifted);
    g.mul(&format!("{p}/Mul_half"), &gated, &half)
}

/// Tokens after the cls token: `x[:, 1:, :]`.
fn patch_token_output(g: &mut Graph, x: &str) {
    let starts = g.const_i64("patch_tokens/starts", &[1], &[1]);
    let ends = g.const_i64("patch_tokens/ends", &[1], &[i64::MAX]);
    let axes = g.const_i64("patch_tokens/axes", &[1], &[1]);
    let tokens = g.node("patch_tokens/Slice", "Slice", &[x, &starts, &ends, &axes], vec![]);
    g.identity(PATCH_TOKENS_OUTPUT, &tokens);
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transpose_2d(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// A graph under construction: nodes in topological order and initializers.
struct Graph {
    opset: i64,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl Graph {
    fn new(opset: i64) -> Self {
        Graph { opset, nodes: Vec::new(), initializers: Vec::new() }
    }

    /// Add node `name`; its single output is also called `name`.
    fn node(&mut self, name: &str, op_type: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.to_string()],
            name: name.to_string(),
            op_type: op_type.to_string(),
            attribute,
            ..Default::default()
        });
        name.to_string()
    }

    /// An f32 initializer.
    fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, DataType::Float, raw)
    }

    /// An int64 initializer (shapes, indices).
    fn const_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, DataType::Int64, raw)
    }

    fn initializer(&mut self, name: &str, dims: &[usize], data_type: DataType, raw: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            name: name.to_string(),
            raw_data: Some(raw),
            ..Default::default()
        });
        name.to_string()
    }

    fn add(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node(name, "Add", &[a, b], vec![])
    }

    fn sub(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node(name, "Sub", &[a, b], vec![])
    }

    fn mul(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node(name, "Mul", &[a, b], vec![])
    }

    fn div(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node(name, "Div", &[a, b], vec![])
    }

    fn mat_mul(&mut self, name: &str, a: &str, b: &str) -> String {
        self.node(name, "MatMul", &[a, b], vec![])
    }

    fn identity(&mut self, name: &str, x: &str) -> String {
        self.node(name, "Identity", &[x], vec![])
    }

    fn reshape(&mut self, name: &str, x: &str, shape: &str) -> String {
        self.node(name, "Reshape", &[x, shape], vec![])
    }

    fn expand(&mut self, name: &str, x: &str, shape: &str) -> String {
        self.node(name, "Expand", &[x, shape], vec![])
    }

    fn transpose(&mut self, name: &str, x: &str, perm: &[i64]) -> String {
        self.node(name, "Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    fn gather(&mut self, name: &str, x: &str, indices: &str, axis: i64) -> String {
        self.node(name, "Gather", &[x, indices], vec![attr_int("axis", axis)])
    }

    fn concat(&mut self, name: &str, inputs: &[&str], axis: i64) -> String {
        self.node(name, "Concat", inputs, vec![attr_int("axis", axis)])
    }

    /// `Shape` of `x`, dims `start..end`.
    fn shape(&mut self, name: &str, x: &str, start: i64, end: i64) -> String {
        self.node(name, "Shape", &[x], vec![attr_int("start", start), attr_int("end", end)])
    }

    fn softmax(&mut self, name: &str, x: &str) -> String {
        self.node(name, "Softmax", &[x], vec![attr_int("axis", -1)])
    }

    /// Square kernel, stride = kernel, no padding.
    fn conv(&mut self, name: &str, x: &str, w: &str, b: &str, kernel: usize) -> String {
        let k = kernel as i64;
        let attrs = vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[k, k])];
        self.node(name, "Conv", &[x, w, b], attrs)
    }

    fn layer_normalization(&mut self, name: &str, x: &str, scale: &str, bias: &str, eps: f32) -> String {
        let attrs = vec![attr_int("axis", -1), attr_float("epsilon", eps)];
        self.node(name, "LayerNormalization", &[x, scale, bias], attrs)
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: Some(i), ..Default::default() }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: Some(f),
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_string(name: &str, s: &str) -> AttributeProto {
    let s = Some(s.as_bytes().to_vec());
    AttributeProto { name: name.into(), r#type: AttributeType::String as i32, s, ..Default::default() }
}

/// One axis of a graph input or output.
#[derive(Debug, Clone, Copy)]
enum Dim {
    Batch,
    Fixed(usize),
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => Value::DimParam("batch".into()),
                Dim::Fixed(n) => Value::DimValue(*n as i64),
            }),
        })
        .collect();
    let tensor =
        type_proto::Tensor { elem_type: DataType::Float as i32, shape: Some(TensorShapeProto { dim }) };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)) }),
        ..Default::default()
    }
}

/// Now as RFC 3339 UTC (`2026-11-27T20:41:05Z`).
fn now_rfc3339() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, H. Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn transpose_2d_swaps_rows_and_columns() {
        assert_eq!(transpose_2d(&[1., 2., 3., 4., 5., 6.], 2, 3), vec![1., 4., 2., 5., 3., 6.]);
    }
}
