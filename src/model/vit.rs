//! The DINO Vision Transformer backbone (facebookresearch/dino `vision_transformer.py`;
//! Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294).
//!
//! Patch embedding (a stride-`p` convolution, computed as one matmul over flattened patches), a cls
//! token, a learned positional embedding resized bicubically for other crop sizes, pre-norm blocks
//! (LayerNorm eps 1e-6, multi-head attention with qkv bias, MLP with exact GELU) and a final norm;
//! the output is the cls token. Parameter names are DINO's: `patch_embed.proj.weight`, `cls_token`,
//! `pos_embed`, `blocks.{i}.attn.qkv.weight`, ..., `norm.bias`.
//!
//! `forward_t(x, Some(rng))` is the training pass with stochastic depth drawn from `rng`;
//! `forward_t(x, None)` (and [`Module::forward`]) is the deterministic pass. candle's `ModuleT`
//! takes only a flag, which cannot carry the seeded RNG that makes resumed runs bit-identical.

use std::collections::HashMap;
use std::sync::RwLock;

use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand_chacha::ChaCha8Rng;

use super::config::Preset;
use super::ops::{self, LayerNorm, Linear, TRUNC_NORMAL_02};

/// `PatchEmbed`: Conv2d(in_chans, D, p, stride p), flattened row-major (y, then x).
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// `[D, C, p, p]`, the convolution layout (`patch_embed.proj.weight`).
    weight: Tensor,
    bias: Tensor,
    patch: usize,
    matmul: DType,
}

impl PatchEmbed {
    fn new(cfg: &Preset, matmul: DType, vb: VarBuilder) -> Result<PatchEmbed> {
        let (d, c, p) = (cfg.embed_dim, cfg.in_chans, cfg.patch_size);
        // PyTorch's default Conv2d init (DINO leaves it): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / ((c * p * p) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((d, c, p, p), "weight", init)?;
        let bias = vb.get_with_hints(d, "bias", init)?;
        Ok(PatchEmbed { weight, bias, patch: p, matmul })
    }
}

impl Module for PatchEmbed {
    /// `[B, C, H, W]` -> `[B, (H/p)(W/p), D]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = match ops::cpu::patchify(xs, p) {
            Some(patches) => patches?,
            None => {
                let xs = if gh * p != h || gw * p != w {
                    xs.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?
                } else {
                    xs.clone()
                };
                xs.reshape((b, c, gh, p, gw, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .contiguous()?
                    .reshape((b * gh * gw, c * p * p))?
            }
        };
        let d = self.weight.dim(0)?;
        let kernel = self.weight.reshape((d, c * p * p))?;
        ops::linear(&patches, &kernel, Some(&self.bias), self.matmul)?.reshape((b, gh * gw, d))
    }
}

/// Multi-head self-attention with a fused qkv projection.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    matmul: DType,
}

impl Attention {
    fn new(cfg: &Preset, matmul: DType, vb: VarBuilder) -> Result<Attention> {
        let d = cfg.embed_dim;
        Ok(Attention {
            qkv: Linear::new(d, 3 * d, cfg.qkv_bias, matmul, vb.pp("qkv"))?,
            proj: Linear::new(d, d, true, matmul, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            scale: ((d / cfg.num_heads) as f64).powf(-0.5),
            matmul,
        })
    }
}

impl Attention {
    /// The cls token's row of [`Module::forward`] alone, `[B, 1, D]`
    /// ([`ops::first_token_attention`]; the last block, whose other rows nothing reads).
    fn forward_cls(&self, xs: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        self.proj.forward(&ops::first_token_attention(&qkv, self.num_heads, self.scale, self.matmul)?)
    }

    /// The attention core between `qkv` and `proj` as a residual branch's stage.
    fn core(&self) -> ops::Stage {
        ops::Stage::attention(self.num_heads, self.scale, self.matmul)
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        self.proj.forward(&ops::attention(&qkv, self.num_heads, self.scale, self.matmul)?)
    }
}

/// The block MLP: fc1 - exact GELU - fc2.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, matmul: DType, vb: VarBuilder) -> Result<Mlp> {
        Ok(Mlp {
            fc1: Linear::new(dim, hidden, true, matmul, vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, true, matmul, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward_gelu(&self.fc1.forward(xs)?)
    }
}

/// A pre-norm transformer block with stochastic depth on both residual branches.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: f64,
}

impl Block {
    fn new(cfg: &Preset, drop_path: f64, matmul: DType, vb: VarBuilder) -> Result<Block> {
        Ok(Block {
            norm1: LayerNorm::new(cfg.embed_dim, cfg.layernorm_eps, matmul, vb.pp("norm1"))?,
            attn: Attention::new(cfg, matmul, vb.pp("attn"))?,
            norm2: LayerNorm::new(cfg.embed_dim, cfg.layernorm_eps, matmul, vb.pp("norm2"))?,
            mlp: Mlp::new(cfg.embed_dim, cfg.mlp_hidden(), matmul, vb.pp("mlp"))?,
            drop_path,
        })
    }

    /// `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`, each residual
    /// branch one autograd node while training ([`ops::residual_branch`]).
    pub fn forward_t(&self, xs: &Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let attention =
            [self.norm1.stage(), self.attn.qkv.stage(false), self.attn.core(), self.attn.proj.stage(false)];
        let scale = self.drop_scale(xs, rng.as_deref_mut())?;
        let xs = ops::residual_branch(xs, &attention, scale.as_ref())?;
        let mlp = [self.norm2.stage(), self.mlp.fc1.stage(false), self.mlp.fc2.stage(true)];
        ops::residual_branch(&xs, &mlp, self.drop_scale(&xs, rng)?.as_ref())
    }

    /// [`Block::forward_t`]'s cls token alone, `[B, 1, D]`: the last block, whose other rows
    /// nothing reads, spends a quarter of a block's work (the keys and values of every token)
    /// instead of all of it. The same operations on the same rows; the products of one row may
    /// round differently from those of all rows (f32 rounding, not bit for bit).
    pub fn forward_cls(&self, xs: &Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let scale = self.drop_scale(xs, rng.as_deref_mut())?;
        let cls = xs.narrow(1, 0, 1)?.contiguous()?;
        let cls = ops::residual(&cls, &self.attn.forward_cls(&self.norm1.forward(xs)?)?, scale.as_ref())?;
        let branch = self.mlp.forward(&self.norm2.forward(&cls)?)?;
        ops::residual(&cls, &branch, self.drop_scale(&cls, rng)?.as_ref())
    }

    /// Stochastic depth's per-sample factor for a branch added to `xs` (training only).
    fn drop_scale(&self, xs: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Option<Tensor>> {
        match rng {
            Some(rng) => ops::drop_path_scale(xs.dim(0)?, xs.rank(), self.drop_path, rng, xs.device()),
            None => Ok(None),
        }
    }
}

/// The backbone; see the module doc.
pub struct VisionTransformer {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: usize,
    /// Bicubic resize matrices of the positional grid, per output grid (rows, cols).
    resize: RwLock<HashMap<(usize, usize), Tensor>>,
}

impl VisionTransformer {
    /// Build the backbone under `vb`; block `i` drops paths with rate `drop_path_rate * i / (depth - 1)`.
    /// Matrix products run in `matmul` (`F32`, or `BF16` for mixed precision).
    pub fn new(
        cfg: &Preset,
        drop_path_rate: f64,
        matmul: DType,
        vb: VarBuilder,
    ) -> Result<VisionTransformer> {
        let d = cfg.embed_dim;
        let tokens = cfg.grid() * cfg.grid() + 1;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let rate = linspace_at(drop_path_rate, cfg.depth, i);
                Block::new(cfg, rate, matmul, vb.pp("blocks").pp(i))
            })
            .collect::<Result<_>>()?;
        Ok(VisionTransformer {
            patch_embed: PatchEmbed::new(cfg, matmul, vb.pp("patch_embed").pp("proj"))?,
            cls_token: vb.get_with_hints((1, 1, d), "cls_token", TRUNC_NORMAL_02)?,
            pos_embed: vb.get_with_hints((1, tokens, d), "pos_embed", TRUNC_NORMAL_02)?,
            blocks,
            norm: LayerNorm::new(d, cfg.layernorm_eps, vb.dtype(), vb.pp("norm"))?,
            patch: cfg.patch_size,
            resize: RwLock::new(HashMap::new()),
        })
    }

    /// Token width D.
    pub fn embed_dim(&self) -> usize {
        self.cls_token.dim(2).expect("cls_token is [1, 1, D]")
    }

    /// Patch embedding, cls token and positional embedding: `[B, C, H, W]` -> `[B, 1 + n, D]`.
    pub fn prepare_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        // The residual stream is in the parameters' dtype (f32), whatever the products' dtype.
        let patches = self.patch_embed.forward(xs)?.to_dtype(self.cls_token.dtype())?;
        let d = patches.dim(2)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        tokens.broadcast_add(&self.interpolate_pos_encoding(h, w)?)
    }

    /// DINO `interpolate_pos_encoding` for an `h x w` pixel input: `[1, 1 + (h/p)(w/p), D]`.
    /// The learned grid is used as is when the token count matches and `h == w`; otherwise it is
    /// resized bicubically with scale factor `((h/p + 0.1) / N, (w/p + 0.1) / N)` through a fixed
    /// matrix, so gradients reach `pos_embed`.
    pub fn interpolate_pos_encoding(&self, h: usize, w: usize) -> Result<Tensor> {
        let (gh, gw) = (h / self.patch, w / self.patch);
        let n = self.pos_embed.dim(1)? - 1;
        if gh * gw == n && h == w {
            return Ok(self.pos_embed.clone());
        }
        let d = self.pos_embed.dim(2)?;
        let grid = self.pos_embed.i((0, 1.., ..))?;
        let resized = self.resize_matrix(n, gh, gw)?.matmul(&grid)?.unsqueeze(0)?;
        Tensor::cat(&[&self.pos_embed.narrow(1, 0, 1)?, &resized], 1)?.reshape((1, gh * gw + 1, d))
    }

    fn resize_matrix(&self, n: usize, gh: usize, gw: usize) -> Result<Tensor> {
        if let Some(m) = self.resize.read().expect("resize cache lock is never poisoned").get(&(gh, gw)) {
            return Ok(m.clone());
        }
        let src = (n as f64).sqrt().round() as usize;
        if src * src != n {
            candle_core::bail!("pos_embed has {n} patch tokens, not a square grid");
        }
        let scale = |g: usize| (g as f64 + 0.1) / src as f64;
        let m = ops::bicubic_grid(src, (gh, gw), (scale(gh), scale(gw)));
        let m = Tensor::from_vec(m, (gh * gw, n), self.pos_embed.device())?.to_dtype(DType::F32)?;
        self.resize.write().expect("resize cache lock is never poisoned").insert((gh, gw), m.clone());
        Ok(m)
    }

    /// The normalised cls token `[B, D]`; `rng` switches on stochastic depth (training). The last
    /// block computes the cls token's row only ([`Block::forward_cls`]).
    pub fn forward_t(&self, xs: &Tensor, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let mut tokens = self.prepare_tokens(xs)?;
        let Some((last, blocks)) = self.blocks.split_last() else {
            return self.norm.forward(&tokens.i((.., 0, ..))?);
        };
        for block in blocks {
            tokens = block.forward_t(&tokens, rng.as_deref_mut())?;
        }
        self.norm.forward(&last.forward_cls(&tokens, rng)?.squeeze(1)?)
    }

    /// Block `i` (for tests and inspection).
    pub fn block(&self, i: usize) -> &Block {
        &self.blocks[i]
    }
}

impl Module for VisionTransformer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, None)
    }
}

/// `torch.linspace(0, rate, depth)[i]`.
fn linspace_at(rate: f64, depth: usize, i: usize) -> f64 {
    if depth <= 1 { 0.0 } else { rate * i as f64 / (depth - 1) as f64 }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use rand::{RngExt, SeedableRng};

    use super::*;

    #[test]
    fn the_last_blocks_cls_row_alone_equals_the_whole_block_within_f32_rounding_in_both_passes() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let preset = Preset::load("vit-micro-p8", 4).unwrap();
        for matmul in [DType::F32, DType::BF16] {
            let varmap = VarMap::new();
            let vit = VisionTransformer::new(
                &preset,
                0.1,
                matmul,
                VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            )
            .unwrap();
            let values: Vec<f32> = (0..2 * 4 * 40 * 40).map(|_| rng.random::<f32>() - 0.5).collect();
            let x = Var::from_tensor(&Tensor::from_vec(values, (2, 4, 40, 40), &dev).unwrap()).unwrap();
            let weights: Vec<f32> = (0..2 * preset.embed_dim).map(|_| rng.random::<f32>() - 0.5).collect();
            let weights = Tensor::from_vec(weights, (2, preset.embed_dim), &dev).unwrap();
            let run = |whole: bool| {
                let mut drop = ChaCha8Rng::seed_from_u64(9);
                let tokens = vit.prepare_tokens(x.as_tensor()).unwrap();
                let (last, blocks) = vit.blocks.split_last().unwrap();
                let tokens = blocks.iter().fold(tokens, |t, b| b.forward_t(&t, Some(&mut drop)).unwrap());
                let cls = match whole {
                    true => last.forward_t(&tokens, Some(&mut drop)).unwrap().narrow(1, 0, 1).unwrap(),
                    false => last.forward_cls(&tokens, Some(&mut drop)).unwrap(),
                };
                let ys = vit.norm.forward(&cls.squeeze(1).unwrap()).unwrap();
                let grads = (&ys * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                let mut all = vec![ys, grads.get(x.as_tensor()).unwrap().clone()];
                for var in varmap.all_vars() {
                    all.push(grads.get(var.as_tensor()).expect("every parameter has a gradient").clone());
                }
                all
            };
            let (alone, whole) = (run(false), run(true));
            let tolerance = if matmul == DType::F32 { 1e-5 } else { 2e-2 };
            let mut worst = 0f32;
            for (i, (a, b)) in alone.iter().zip(&whole).enumerate() {
                let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-3);
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff <= tolerance * scale, "{matmul:?} tensor {i}: off by {diff} (scale {scale})");
                worst = worst.max(diff / scale);
            }
            eprintln!("{matmul:?}: worst difference {worst:.1e} of the tensor's largest value");
        }
    }
}
