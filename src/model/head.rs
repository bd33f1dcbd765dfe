//! The DINO projection head (facebookresearch/dino `DINOHead`): an MLP (Linear-GELU-...-Linear to
//! the bottleneck), l2 normalisation, and a weight-normed linear layer without bias to K prototypes.
//!
//! Names: `mlp.0`, `mlp.2`, `mlp.4` (the GELUs sit at the odd indices of PyTorch's Sequential),
//! `last_layer.weight_g` `[K, 1]` and `last_layer.weight_v` `[K, bottleneck]`. With
//! `norm_last_layer` the gain `g` stays 1: it is excluded from the optimiser (see `dino::optim`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::HeadConfig;
use super::ops::{self, Linear};

/// The head; see the module doc.
#[derive(Debug, Clone)]
pub struct DinoHead {
    mlp: Vec<Linear>,
    weight_g: Tensor,
    weight_v: Tensor,
    matmul: DType,
}

impl DinoHead {
    /// Build the head for `in_dim` input features under `vb`, its matrix products in `matmul`.
    pub fn new(in_dim: usize, cfg: &HeadConfig, matmul: DType, vb: VarBuilder) -> Result<DinoHead> {
        let mut widths = vec![in_dim];
        widths.extend(std::iter::repeat_n(cfg.hidden_dim, cfg.nlayers - 1));
        widths.push(cfg.bottleneck_dim);
        let mlp = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(w[0], w[1], true, matmul, vb.pp("mlp").pp(2 * i)))
            .collect::<Result<_>>()?;
        let last = vb.pp("last_layer");
        // nn.Linear's default init for v: U(-1/sqrt(in), 1/sqrt(in)).
        let bound = 1.0 / (cfg.bottleneck_dim as f64).sqrt();
        let weight_v = last.get_with_hints(
            (cfg.out_dim, cfg.bottleneck_dim),
            "weight_v",
            Init::Uniform { lo: -bound, up: bound },
        )?;
        let weight_g = last.get_with_hints((cfg.out_dim, 1), "weight_g", Init::Const(1.0))?;
        Ok(DinoHead { mlp, weight_g, weight_v, matmul })
    }

    /// The MLP part: `[N, in_dim]` -> `[N, bottleneck]`.
    pub fn mlp(&self, xs: &Tensor) -> Result<Tensor> {
        let (last, hidden) = self.mlp.split_last().expect("the head has at least two layers");
        let mut xs = xs.clone();
        for layer in hidden {
            xs = ops::gelu_erf(&layer.forward(&xs)?)?;
        }
        last.forward(&xs)
    }

    /// [`Module::forward`]; without `train_last_layer` the last layer's weights enter the pass
    /// detached, so the backward pass computes no gradient for them (DINO drops those in its
    /// first `freeze_last_layer` epochs) and skips that `[K, bottleneck]` product.
    pub fn forward_t(&self, xs: &Tensor, train_last_layer: bool) -> Result<Tensor> {
        let xs = ops::l2_normalize(&self.mlp(xs)?.to_dtype(self.weight_v.dtype())?)?;
        let (v, g) = match train_last_layer {
            true => (self.weight_v.clone(), self.weight_g.clone()),
            false => (self.weight_v.detach(), self.weight_g.detach()),
        };
        ops::weight_norm_linear(&xs, &v, &g, self.matmul)
    }
}

impl Module for DinoHead {
    /// `[N, in_dim]` -> `[N, K]` logits.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, true)
    }
}
