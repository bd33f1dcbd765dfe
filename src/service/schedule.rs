//! Continual schedules: the per-step settings of a run that has no epochs. Every value is a pure
//! function of the step number, so the checkpoint's step is the whole schedule state and a resumed
//! run continues on exactly the same curve.
//!
//! - learning rate: linear warmup from 0 to `train.lr * batch_size / 256` over
//!   `serve.warmup_steps`, then constant; with `serve.max_steps`, an optional half-cosine down to
//!   `train.min_lr` over the last `serve.cooldown_steps`.
//! - weight decay and teacher momentum: constant, or a half-cosine over `serve.horizon_steps`
//!   (to `train.weight_decay_end`, to 1), DINO's shapes without the epoch count.
//! - teacher temperature: linear from `train.warmup_teacher_temp` to `train.teacher_temp` over
//!   `serve.teacher_temp_warmup_steps`.
//! - the head's last layer is frozen for the first `serve.freeze_last_layer_steps` steps.

use std::f64::consts::PI;

use crate::config::{ServeConfig, Shape, TrainConfig};
use crate::dino::schedule::StepSettings;

/// The step-indexed schedules of a continual run.
#[derive(Debug, Clone, PartialEq)]
pub struct ContinualSchedule {
    serve: ServeConfig,
    train: TrainConfig,
    peak_lr: f64,
}

impl ContinualSchedule {
    /// The schedules for `serve` with start values from `train`.
    pub fn new(serve: &ServeConfig, train: &TrainConfig) -> ContinualSchedule {
        let peak_lr = train.lr * train.batch_size as f64 / 256.0;
        ContinualSchedule { serve: serve.clone(), train: train.clone(), peak_lr }
    }

    /// The settings of 0-based step `step`.
    pub fn at(&self, step: u64) -> StepSettings {
        let (s, t) = (&self.serve, &self.train);
        StepSettings {
            epoch: 0,
            lr: self.lr(step),
            weight_decay: shaped(
                s.weight_decay_schedule,
                t.weight_decay,
                t.weight_decay_end,
                step,
                s.horizon_steps,
            ),
            momentum: shaped(s.momentum_schedule, t.momentum_teacher, 1.0, step, s.horizon_steps),
            teacher_temp: linear(t.warmup_teacher_temp, t.teacher_temp, step, s.teacher_temp_warmup_steps),
            clip_grad: t.clip_grad,
            freeze_last_layer: step < s.freeze_last_layer_steps,
        }
    }

    fn lr(&self, step: u64) -> f64 {
        let warm = linear(0.0, self.peak_lr, step, self.serve.warmup_steps);
        let Some(max) = self.serve.max_steps else { return warm };
        let cooldown = self.serve.cooldown_steps;
        let start = max.saturating_sub(cooldown);
        if cooldown == 0 || step < start {
            return warm;
        }
        cosine(warm, self.train.min_lr, step - start, cooldown)
    }
}

/// `from` + (`to` - `from`) * i / n, holding `to` from step n on (n = 0: always `to`).
fn linear(from: f64, to: f64, i: u64, n: u64) -> f64 {
    if i >= n { to } else { from + (to - from) * i as f64 / n as f64 }
}

/// DINO's half-cosine from `from` (step 0) towards `to` (step n), holding `to` from step n on.
fn cosine(from: f64, to: f64, i: u64, n: u64) -> f64 {
    if i >= n {
        return to;
    }
    to + 0.5 * (from - to) * (1.0 + (PI * i as f64 / n as f64).cos())
}

fn shaped(shape: Shape, from: f64, to: f64, i: u64, n: u64) -> f64 {
    match shape {
        Shape::Constant => from,
        Shape::Cosine => cosine(from, to, i, n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(edit: impl FnOnce(&mut ServeConfig)) -> ContinualSchedule {
        let mut serve =
            ServeConfig { warmup_steps: 10, teacher_temp_warmup_steps: 4, ..ServeConfig::default() };
        edit(&mut serve);
        let train = TrainConfig {
            batch_size: 256,
            lr: 1e-3,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            ..TrainConfig::default()
        };
        ContinualSchedule::new(&serve, &train)
    }

    #[test]
    fn learning_rate_warms_up_linearly_then_stays_constant() {
        let s = schedule(|_| {});
        assert_eq!(s.at(0).lr, 0.0);
        assert!((s.at(5).lr - 5e-4).abs() < 1e-15);
        assert_eq!(s.at(10).lr, 1e-3);
        assert_eq!(s.at(1_000_000).lr, 1e-3);
    }

    #[test]
    fn cooldown_falls_to_min_lr_over_the_last_steps_before_max_steps() {
        let s = schedule(|c| {
            c.max_steps = Some(100);
            c.cooldown_steps = 20;
        });
        assert_eq!(s.at(79).lr, 1e-3);
        assert_eq!(s.at(80).lr, 1e-3);
        assert!(s.at(90).lr < 1e-3 && s.at(90).lr > 1e-6);
        assert_eq!(s.at(100).lr, 1e-6);
    }

    #[test]
    fn momentum_and_weight_decay_are_constant_or_follow_a_cosine_over_the_horizon() {
        let constant = schedule(|_| {});
        assert_eq!((constant.at(500).momentum, constant.at(500).weight_decay), (0.996, 0.04));
        let cosine = schedule(|c| {
            c.momentum_schedule = Shape::Cosine;
            c.weight_decay_schedule = Shape::Cosine;
            c.horizon_steps = 100;
        });
        assert_eq!(cosine.at(0).momentum, 0.996);
        assert!((cosine.at(50).momentum - 0.998).abs() < 1e-12);
        assert_eq!((cosine.at(100).momentum, cosine.at(7_000).weight_decay), (1.0, 0.4));
    }

    #[test]
    fn teacher_temperature_warms_up_and_the_last_layer_thaws_after_its_steps() {
        let s = schedule(|c| c.freeze_last_layer_steps = 3);
        assert_eq!(s.at(0).teacher_temp, 0.04);
        assert!((s.at(2).teacher_temp - 0.055).abs() < 1e-12);
        assert_eq!(s.at(4).teacher_temp, 0.07);
        assert!(s.at(2).freeze_last_layer && !s.at(3).freeze_last_layer);
    }
}
