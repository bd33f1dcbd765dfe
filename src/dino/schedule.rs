//! DINO's schedules in float64, exactly as `utils.cosine_scheduler` and
//! `DINOLoss.teacher_temp_schedule` compute them with numpy, and the per-step values a training
//! step uses.
//!
//! **Schedule span.** DINO indexes its schedules by iteration over `epochs * niter_per_ep`
//! iterations and its teacher temperature by epoch. A `train --steps N` run has no natural
//! epoch, so [`ScheduleSpan::for_steps`] takes `niter_per_ep = max(1, dataset_len / batch_size)`
//! (DINO's DataLoader drops the last partial batch) and `epochs = ceil(N / niter_per_ep)`. A
//! learning-rate warmup that does not fit the run becomes a tenth of it (DINO's 10 of 100 epochs);
//! a teacher-temperature warmup is cut at the run's end. Past the end, every schedule holds its
//! last value.

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

/// `numpy.linspace(start, stop, num)` (endpoint included), bit for bit.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        // numpy: with one point the step is undefined and the value is `start`.
        return vec![start; num];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

/// DINO `utils.cosine_scheduler`: a linear warmup from `start_warmup_value` (endpoint included),
/// then `final + 0.5 (base - final)(1 + cos(pi i / n))` over the `n` remaining iterations.
pub fn cosine_scheduler(
    base_value: f64,
    final_value: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> Vec<f64> {
    let warmup_iters = warmup_epochs * niter_per_ep;
    let mut schedule = linspace(start_warmup_value, base_value, warmup_iters);
    let n = epochs * niter_per_ep - warmup_iters;
    let amplitude = 0.5 * (base_value - final_value);
    schedule.extend(
        (0..n).map(|i| final_value + amplitude * (1.0 + (std::f64::consts::PI * i as f64 / n as f64).cos())),
    );
    schedule
}

/// `DINOLoss.teacher_temp_schedule`: `linspace(warmup, final, warmup_epochs)` then `final`.
pub fn teacher_temp_schedule(
    warmup: f64,
    final_value: f64,
    warmup_epochs: usize,
    nepochs: usize,
) -> Vec<f64> {
    let mut schedule = linspace(warmup, final_value, warmup_epochs);
    schedule.extend(std::iter::repeat_n(final_value, nepochs.saturating_sub(warmup_epochs)));
    schedule
}

/// How many epochs the schedules span and how many steps an epoch has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpan {
    /// Epochs the schedules cover.
    pub epochs: usize,
    /// Steps per epoch.
    pub niter_per_ep: usize,
}

impl ScheduleSpan {
    /// DINO's span: `epochs` passes over `dataset_len` samples in batches of `batch_size`.
    pub fn for_epochs(epochs: usize, dataset_len: usize, batch_size: usize) -> ScheduleSpan {
        ScheduleSpan { epochs: epochs.max(1), niter_per_ep: (dataset_len / batch_size.max(1)).max(1) }
    }

    /// A `--steps N` run (see the module doc).
    pub fn for_steps(steps: usize, dataset_len: usize, batch_size: usize) -> ScheduleSpan {
        let niter_per_ep = (dataset_len / batch_size.max(1)).max(1);
        ScheduleSpan { epochs: steps.div_ceil(niter_per_ep).max(1), niter_per_ep }
    }
}

/// Everything that varies from step to step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// Epoch index of the step.
    pub epoch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay of the decayed group.
    pub weight_decay: f64,
    /// Teacher EMA momentum.
    pub momentum: f64,
    /// Teacher softmax temperature.
    pub teacher_temp: f64,
    /// Per-tensor gradient clipping threshold (0 = off).
    pub clip_grad: f64,
    /// Drop the head's last-layer gradients (DINO's first `freeze_last_layer` epochs).
    pub freeze_last_layer: bool,
}

/// The precomputed schedules of one run.
#[derive(Debug, Clone)]
pub struct Schedules {
    span: ScheduleSpan,
    lr: Vec<f64>,
    weight_decay: Vec<f64>,
    momentum: Vec<f64>,
    teacher_temp: Vec<f64>,
    clip_grad: f64,
    freeze_last_layer: usize,
}

impl Schedules {
    /// DINO's schedules for `cfg` over `span` (peak lr = `lr * batch_size / 256`).
    pub fn new(cfg: &TrainConfig, span: ScheduleSpan) -> Schedules {
        // An empty span would leave nothing to index: every run has at least one step.
        let span = ScheduleSpan { epochs: span.epochs.max(1), niter_per_ep: span.niter_per_ep.max(1) };
        let ScheduleSpan { epochs, niter_per_ep } = span;
        let peak_lr = cfg.lr * cfg.batch_size as f64 / 256.0;
        let warmup = if cfg.warmup_epochs < epochs { cfg.warmup_epochs } else { epochs / 10 };
        let temp_warmup = cfg.warmup_teacher_temp_epochs.min(epochs);
        Schedules {
            span,
            lr: cosine_scheduler(peak_lr, cfg.min_lr, epochs, niter_per_ep, warmup, 0.0),
            weight_decay: cosine_scheduler(
                cfg.weight_decay,
                cfg.weight_decay_end,
                epochs,
                niter_per_ep,
                0,
                0.0,
            ),
            momentum: cosine_scheduler(cfg.momentum_teacher, 1.0, epochs, niter_per_ep, 0, 0.0),
            teacher_temp: teacher_temp_schedule(
                cfg.warmup_teacher_temp,
                cfg.teacher_temp,
                temp_warmup,
                epochs,
            ),
            clip_grad: cfg.clip_grad,
            freeze_last_layer: cfg.freeze_last_layer,
        }
    }

    /// The span these schedules cover.
    pub fn span(&self) -> ScheduleSpan {
        self.span
    }

    /// The settings of (0-based) step `step`.
    pub fn at(&self, step: u64) -> StepSettings {
        let it = step as usize;
        let epoch = it / self.span.niter_per_ep;
        StepSettings {
            epoch,
            lr: clamped(&self.lr, it),
            weight_decay: clamped(&self.weight_decay, it),
            momentum: clamped(&self.momentum, it),
            teacher_temp: clamped(&self.teacher_temp, epoch),
            clip_grad: self.clip_grad,
            freeze_last_layer: epoch < self.freeze_last_layer,
        }
    }
}

fn clamped(values: &[f64], i: usize) -> f64 {
    values[i.min(values.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_ends_exactly_at_both_values() {
        assert_eq!(linspace(0.04, 0.07, 4)[0], 0.04);
        assert_eq!(linspace(0.04, 0.07, 4)[3], 0.07);
        assert_eq!(linspace(1.0, 1.0, 3), [1.0, 1.0, 1.0]);
        assert_eq!(linspace(2.0, 5.0, 1), [2.0]);
    }

    #[test]
    fn a_steps_run_covers_every_step_with_whole_epochs() {
        let span = ScheduleSpan::for_steps(50, 300, 64);
        assert_eq!(span, ScheduleSpan { epochs: 13, niter_per_ep: 4 });
        assert_eq!(ScheduleSpan::for_steps(5, 10, 64), ScheduleSpan { epochs: 5, niter_per_ep: 1 });
    }

    #[test]
    fn a_warmup_longer_than_the_run_becomes_a_tenth_of_it() {
        let cfg = TrainConfig { batch_size: 256, warmup_epochs: 10, lr: 1e-3, ..TrainConfig::default() };
        let s = Schedules::new(&cfg, ScheduleSpan { epochs: 5, niter_per_ep: 3 });
        assert_eq!(s.at(0).lr, 1e-3, "5 epochs: no warmup");
        let s = Schedules::new(&cfg, ScheduleSpan { epochs: 10, niter_per_ep: 3 });
        assert_eq!((s.at(0).lr, s.at(2).lr), (0.0, 1e-3), "10 epochs: 1 epoch of warmup");
    }

    #[test]
    fn the_step_settings_follow_the_dino_defaults() {
        let cfg = TrainConfig { batch_size: 64, warmup_epochs: 2, ..TrainConfig::default() };
        let s = Schedules::new(&cfg, ScheduleSpan { epochs: 10, niter_per_ep: 5 });
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let first = s.at(0);
        assert_eq!((first.epoch, first.lr), (0, 0.0));
        assert!(close(first.weight_decay, 0.04) && close(first.momentum, 0.996), "{first:?}");
        assert!(first.freeze_last_layer);
        assert!(close(s.at(10).lr, 5e-4 * 64.0 / 256.0), "{:?}", s.at(10));
        assert!(!s.at(5).freeze_last_layer);
        assert_eq!(s.at(1_000).momentum, s.at(49).momentum);
    }
}
