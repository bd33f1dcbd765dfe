//! DINO's optimiser: PyTorch `AdamW` over two parameter groups, with DINO's per-tensor gradient
//! clipping and frozen last layer applied to the gradients first.
//!
//! Shaped like `candle_nn::optim::AdamW` (a `Config`, `step` over a `GradStore`,
//! `set_learning_rate`) but over *named* variables: the decay group and the freeze are chosen by
//! name, and the moments live in an [`AdamWState`] (part of the training state) keyed by name.
//!
//! The update is torch's single-tensor AdamW, step counted per parameter:
//! `p *= 1 - lr wd; m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2;
//! p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, bias corrections in f64.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor, Var, backprop::GradStore};

use crate::dino::inplace;
use crate::model::ops::cpu::affine;
use crate::model::params::Params;

/// AdamW hyper-parameters (torch defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay of the decayed group.
    pub weight_decay: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// One parameter's Adam moments and step count.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment (`exp_avg`).
    pub exp_avg: Tensor,
    /// Second moment (`exp_avg_sq`).
    pub exp_avg_sq: Tensor,
    /// Updates applied so far.
    pub step: u64,
}

/// The moments of every parameter that has been updated at least once, by name.
#[derive(Debug, Clone, Default)]
pub struct AdamWState {
    /// Moments by parameter name.
    pub moments: BTreeMap<String, Moments>,
}

/// One optimised variable.
struct Param {
    name: String,
    var: Var,
    decay: bool,
}

/// The optimiser: the trainable variables and the hyper-parameters.
pub struct AdamW {
    params: Vec<Param>,
    config: Config,
}

impl AdamW {
    /// Optimise every variable of `params` except `frozen` ones. DINO's groups: weight decay on
    /// tensors with more than one dim (including `cls_token` and `pos_embed`), none on biases
    /// and 1-D tensors.
    pub fn new(params: &Params, frozen: impl Fn(&str) -> bool, config: Config) -> AdamW {
        let params = params
            .iter()
            .filter(|(name, _)| !frozen(name))
            .map(|(name, var)| Param {
                name: name.to_string(),
                var: var.clone(),
                decay: !name.ends_with(".bias") && var.rank() > 1,
            })
            .collect();
        AdamW { params, config }
    }

    /// Set the learning rate of both groups.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Set the weight decay of the decayed group.
    pub fn set_weight_decay(&mut self, weight_decay: f64) {
        self.config.weight_decay = weight_decay;
    }

    /// The optimised variables' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The optimised (name, variable) pairs.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// DINO `utils.clip_gradients`, per tensor: `g *= min(1, clip / (||g|| + 1e-6))`, computed on
    /// the device (no host sync). `clip == 0` leaves the gradients alone.
    pub fn clip_gradients(&self, grads: &mut GradStore, clip: f64) -> Result<()> {
        if clip == 0.0 {
            return Ok(());
        }
        for p in &self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            let norm = g.sqr()?.sum_all()?.sqrt()?;
            // torch evaluates `clip / (norm + 1e-6)` as reciprocal times clip.
            let coef = ((norm + 1e-6)?.recip()? * clip)?.minimum(1.0)?;
            let clipped = g.broadcast_mul(&coef)?;
            grads.insert(&p.var, clipped);
        }
        Ok(())
    }

    /// Drop the gradients of the variables `which` selects (DINO `cancel_gradients_last_layer`):
    /// they get no update, no decay and no moments this step.
    pub fn drop_gradients(&self, grads: &mut GradStore, which: impl Fn(&str) -> bool) {
        for p in self.params.iter().filter(|p| which(&p.name)) {
            grads.remove(&p.var);
        }
    }

    /// One AdamW update of every variable that has a gradient in `grads`.
    pub fn step(&self, grads: &GradStore, state: &mut AdamWState) -> Result<()> {
        for p in &self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            let moments = match state.moments.remove(&p.name) {
                Some(m) => m,
                // Fresh buffers: the update may overwrite them in place.
                None => Moments { exp_avg: g.zeros_like()?, exp_avg_sq: g.zeros_like()?, step: 0 },
            };
            let moments = self.update(p, g, moments)?;
            state.moments.insert(p.name.clone(), moments);
        }
        Ok(())
    }

    fn update(&self, p: &Param, g: &Tensor, m: Moments) -> Result<Moments> {
        let Config { lr, beta1, beta2, eps, weight_decay } = self.config;
        let step = m.step + 1;
        let wd = if p.decay { weight_decay } else { 0.0 };
        let bias_correction1 = 1.0 - beta1.powi(step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        if inplace::applies(&[p.var.as_tensor(), g, &m.exp_avg, &m.exp_avg_sq]) {
            // The composition below, element for element, in three passes that overwrite the
            // moments and the parameter (the moments are this state's own buffers).
            inplace::update_with(&m.exp_avg, g, |m, g| m + affine(g - m, 1.0 - beta1, 0.0))?;
            inplace::update_with(&m.exp_avg_sq, g, |v, g| {
                affine(v, beta2, 0.0) + affine(g * g, 1.0 - beta2, 0.0)
            })?;
            let step_theta = |theta: f32, m: f32, v: f32| {
                let theta = if wd != 0.0 { affine(theta, 1.0 - lr * wd, 0.0) } else { theta };
                let denom = affine(affine(v.sqrt(), 1.0 / bias_correction2_sqrt, 0.0), 1.0, eps);
                theta + affine(m, -step_size, 0.0) / denom
            };
            inplace::update_with2(p.var.as_tensor(), &m.exp_avg, &m.exp_avg_sq, step_theta)?;
            return Ok(Moments { step, ..m });
        }
        let mut theta = p.var.as_detached_tensor();
        if wd != 0.0 {
            theta = theta.affine(1.0 - lr * wd, 0.0)?;
        }
        let exp_avg = (&m.exp_avg + ((g - &m.exp_avg)? * (1.0 - beta1))?)?;
        let exp_avg_sq = ((&m.exp_avg_sq * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
        let denom = ((exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + eps)?;
        let theta = (theta + ((&exp_avg * -step_size)? / denom)?)?;
        p.var.set(&theta)?;
        // Detached: the gradients carry the step's autograd graph, and moments chained across
        // steps would keep every step's activations alive (memory grows with each step).
        Ok(Moments { exp_avg: exp_avg.detach(), exp_avg_sq: exp_avg_sq.detach(), step })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::cpu::COMPOSED_ONLY;
    use candle_core::{DType, Device};
    use candle_nn::Init;

    /// Parameters, Adam moments and a teacher after three AdamW steps and EMA updates, as bits.
    fn three_steps(composed: bool) -> Vec<Vec<u32>> {
        COMPOSED_ONLY.with(|c| c.set(composed));
        let build = |vb: candle_nn::VarBuilder| {
            vb.get_with_hints((40, 70), "w", Init::Randn { mean: 0.0, stdev: 1.0 })?;
            vb.get_with_hints(70, "b", Init::Randn { mean: 0.0, stdev: 1.0 })
        };
        let (_, student) = Params::build(1, &Device::Cpu, build).unwrap();
        let (_, teacher) = Params::build(2, &Device::Cpu, build).unwrap();
        let config = Config { lr: 0.3, weight_decay: 0.2, ..Config::default() };
        let optimizer = AdamW::new(&student, |_| false, config);
        let mut state = AdamWState::default();
        for step in 0..3 {
            // Gradients with zeros in them, so that the sign of zero is compared too.
            let loss =
                student.iter().map(|(_, v)| (v.as_tensor().relu()? * (step + 1) as f64)?.sqr()?.sum_all());
            let loss = loss.reduce(|a, b| a? + b?).unwrap().unwrap();
            optimizer.step(&loss.backward().unwrap(), &mut state).unwrap();
            crate::dino::ema::ema_update(&teacher, &student, 0.9).unwrap();
        }
        COMPOSED_ONLY.with(|c| c.set(false));
        let moments = state.moments.values().flat_map(|m| [&m.exp_avg, &m.exp_avg_sq]);
        let params = student.iter().chain(teacher.iter()).map(|(_, v)| v.as_tensor());
        let bits = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        moments.chain(params).map(bits).collect()
    }

    #[test]
    fn in_place_update_and_ema_equal_the_composition_bit_for_bit() {
        assert_eq!(three_steps(false), three_steps(true));
    }
}
