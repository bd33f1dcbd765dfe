//! One DINO training iteration (facebookresearch/dino `train_one_epoch` body), split the way tract
//! splits a plan from its state: [`Trainer`] holds what a run is (models, schedules, settings) and
//! [`TrainState`] what it has done (step, centre, Adam moments, RNG). A checkpoint stores both.
//!
//! Order, as the reference: teacher pass on the 2 global crops, student pass on all crops, loss and
//! centre update, backward, per-tensor clipping, last-layer freeze, AdamW, teacher EMA. A step
//! does not wait for the device: the loss is summed on the device and read, with the collapse
//! indicators, every `log_every_steps` steps only (PyTorch's `loss.item()` per step is a host sync).

use candle_core::{DType, Device, Tensor, backprop::GradStore};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::Batch;
use crate::config::{ModelConfig, Precision, TrainConfig};
use crate::dino::ema::ema_update;
use crate::dino::loss::{DinoLoss, LossOutput};
use crate::dino::monitor::{self, Collapse};
use crate::dino::optim::{self, AdamW, AdamWState};
use crate::dino::schedule::{ScheduleSpan, Schedules, StepSettings};
use crate::model::config::Preset;
use crate::model::multicrop::{MultiCropOutput, MultiCropWrapper};
use crate::model::params::Params;

/// Everything that defines a run; stored in the checkpoint's `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerSetup {
    /// Backbone and head sizes (`in_chans` = number of bands).
    pub preset: Preset,
    /// Band names in channel order.
    pub bands: Vec<String>,
    /// `[model]` section.
    pub model: ModelConfig,
    /// `[train]` section.
    pub train: TrainConfig,
    /// Crops per sample (2 global + locals).
    pub ncrops: usize,
    /// What the schedules span.
    pub span: ScheduleSpan,
}

impl TrainerSetup {
    /// Resolve the model preset for `bands` and collect the settings of a run.
    pub fn new(
        model: &ModelConfig,
        train: &TrainConfig,
        bands: &[String],
        local_crops: usize,
        span: ScheduleSpan,
    ) -> anyhow::Result<TrainerSetup> {
        Ok(TrainerSetup {
            preset: Preset::load(&model.preset, bands.len())?,
            bands: bands.to_vec(),
            model: model.clone(),
            train: train.clone(),
            ncrops: 2 + local_crops,
            span,
        })
    }
}

/// What a run has done so far.
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    /// The loss centre `[1, K]`.
    pub center: Tensor,
    /// Adam moments and step counts.
    pub optimizer: AdamWState,
    /// Source of the student's stochastic depth.
    pub rng: ChaCha8Rng,
}

/// What one step reports (one line of `train --metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepReport {
    /// The step just done (1-based: the first step reports 1).
    pub step: u64,
    /// Its epoch.
    pub epoch: usize,
    /// The mean loss of the steps since the previous report that had one: on every
    /// `log_every_steps`-th step only (reading it waits for the device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f32>,
    /// Learning rate used.
    pub lr: f64,
    /// Weight decay used.
    pub weight_decay: f64,
    /// Teacher momentum used.
    pub momentum: f64,
    /// Teacher temperature used.
    pub teacher_temp: f64,
    /// Collapse indicators, every `log_every_steps` steps.
    #[serde(flatten)]
    pub collapse: Option<Collapse>,
}

/// The forward pass of one step: both networks' outputs and the loss, with the autograd graph.
pub struct Forward {
    /// Teacher pass on the global crops.
    pub teacher: MultiCropOutput,
    /// Student pass on all crops.
    pub student: MultiCropOutput,
    /// Loss, new centre, teacher probabilities.
    pub loss: LossOutput,
}

/// The forward and backward pass of one step, before any update.
pub struct Gradients {
    /// Teacher pass on the global crops.
    pub teacher: MultiCropOutput,
    /// Student pass on all crops.
    pub student: MultiCropOutput,
    /// Loss, new centre, teacher probabilities.
    pub loss: LossOutput,
    /// Raw gradients of the student's variables.
    pub grads: GradStore,
}

/// A DINO run: student, teacher, schedules, optimiser, and its [`TrainState`].
pub struct Trainer {
    setup: TrainerSetup,
    device: Device,
    schedules: Schedules,
    student: MultiCropWrapper,
    teacher: MultiCropWrapper,
    student_params: Params,
    teacher_params: Params,
    loss: DinoLoss,
    optimizer: AdamW,
    state: TrainState,
    /// Losses of the steps not reported yet, summed on the device.
    unreported: LossWindow,
}

/// A sum of step losses kept on the device, read (one host sync) when reported.
#[derive(Default)]
struct LossWindow {
    sum: Option<Tensor>,
    steps: u32,
}

impl LossWindow {
    fn add(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        self.sum = Some(match self.sum.take() {
            Some(sum) => (sum + loss)?,
            None => loss.clone(),
        });
        self.steps += 1;
        Ok(())
    }

    /// The mean of the window (waits for the device), emptying it; `None` when empty.
    fn take_mean(&mut self) -> candle_core::Result<Option<f32>> {
        let steps = std::mem::take(&mut self.steps);
        match self.sum.take() {
            Some(sum) => Ok(Some(sum.to_scalar::<f32>()? / steps as f32)),
            None => Ok(None),
        }
    }
}

/// The dtype of the models' matrix products for `precision`. TF32 is a switch of candle's CUDA
/// GEMMs (process-wide; this sets it either way, so the last trainer built decides).
fn matmul_dtype(precision: Precision, device: &Device) -> DType {
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
    }
    match precision {
        Precision::F32 | Precision::Tf32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// `grads` with every gradient detached. candle detaches the gradients it propagates, not the
/// ones it leaves for the variables: a weight's gradient `x^T g` still references its input
/// activation `x`, and the store would keep the step's activations alive through the update.
fn detached(mut grads: GradStore) -> GradStore {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(grad) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, grad);
        }
    }
    grads
}

/// The head's last layer, frozen in the first `freeze_last_layer` epochs.
fn is_last_layer(name: &str) -> bool {
    name.starts_with("head.last_layer.")
}

impl Trainer {
    /// A fresh run: student initialised from `train.seed`, teacher a copy of it, centre 0.
    pub fn new(setup: TrainerSetup, device: &Device) -> anyhow::Result<Trainer> {
        let TrainerSetup { preset, model, train, .. } = &setup;
        let matmul = matmul_dtype(train.precision, device);
        let (student, student_params) = Params::build(train.seed, device, |vb| {
            MultiCropWrapper::new(preset, model.drop_path_rate, matmul, vb)
        })?;
        let teacher_params = student_params.deep_copy()?;
        let teacher =
            teacher_params.build_frozen(device, |vb| MultiCropWrapper::new(preset, 0.0, matmul, vb))?;
        let norm_last_layer = preset.head.norm_last_layer;
        let frozen = move |name: &str| norm_last_layer && name == "head.last_layer.weight_g";
        let optimizer = AdamW::new(&student_params, frozen, optim::Config::default());
        let state = TrainState {
            step: 0,
            center: Tensor::zeros((1, preset.head.out_dim), DType::F32, device)?,
            optimizer: AdamWState::default(),
            rng: ChaCha8Rng::seed_from_u64(train.seed ^ 0x5eed_d1a0),
        };
        Ok(Trainer {
            schedules: Schedules::new(train, setup.span),
            loss: DinoLoss::new(setup.ncrops, train.student_temp, train.center_momentum, device)?,
            device: device.clone(),
            setup,
            student,
            teacher,
            student_params,
            teacher_params,
            optimizer,
            state,
            unreported: LossWindow::default(),
        })
    }

    /// One step on a batch from the augmenter, with the scheduled settings.
    pub fn step(&mut self, batch: &Batch) -> anyhow::Result<StepReport> {
        let crops = self.upload(batch)?;
        self.step_crops(&crops)
    }

    /// One step on a batch from the augmenter with explicit settings (the service's continual
    /// schedules).
    pub fn step_batch_with(&mut self, batch: &Batch, settings: &StepSettings) -> anyhow::Result<StepReport> {
        let crops = self.upload(batch)?;
        self.step_with(&crops, settings)
    }

    /// [`Trainer::step_batch_with`], also returning the teacher's cls embedding of each sample's
    /// first global view as computed in this step (`[B][D]`, f32): what the `min-redundancy`
    /// replay policy compares patches by.
    pub fn step_batch_embedding(
        &mut self,
        batch: &Batch,
        settings: &StepSettings,
    ) -> anyhow::Result<(StepReport, Vec<Vec<f32>>)> {
        let crops = self.upload(batch)?;
        let gradients = self.gradients(&crops, settings)?;
        let samples = crops[0].dim(0)?;
        let cls = gradients.teacher.features.narrow(0, 0, samples)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok((self.apply(gradients, settings)?, cls))
    }

    /// One step on crops already on the device (`[B, C, H, W]` each, globals first).
    pub fn step_crops(&mut self, crops: &[Tensor]) -> anyhow::Result<StepReport> {
        let settings = self.schedules.at(self.state.step);
        self.step_with(crops, &settings)
    }

    /// One step with explicit settings (the golden tests pin them).
    pub fn step_with(&mut self, crops: &[Tensor], settings: &StepSettings) -> anyhow::Result<StepReport> {
        let gradients = self.gradients(crops, settings)?;
        self.apply(gradients, settings)
    }

    /// The update half of a step: clipping, last-layer freeze, AdamW, teacher EMA, centre.
    pub fn apply(&mut self, gradients: Gradients, settings: &StepSettings) -> anyhow::Result<StepReport> {
        let Gradients { teacher, student, loss, mut grads } = gradients;
        // The loss tensor holds the student's autograd graph, every activation of the step: free
        // it before the update allocates, keeping the value only.
        let (loss_value, graph) = (loss.loss.detach(), loss.loss);
        drop((graph, student));
        self.optimizer.clip_gradients(&mut grads, settings.clip_grad)?;
        if settings.freeze_last_layer {
            self.optimizer.drop_gradients(&mut grads, is_last_layer);
        }
        self.optimizer.set_learning_rate(settings.lr);
        self.optimizer.set_weight_decay(settings.weight_decay);
        self.optimizer.step(&grads, &mut self.state.optimizer)?;
        ema_update(&self.teacher_params, &self.student_params, settings.momentum)?;
        self.state.center = loss.center;
        self.state.step += 1;
        self.unreported.add(&loss_value)?;
        self.report(settings, &loss_value, &loss.teacher_probs, &teacher.features)
    }

    /// The mean loss of the steps not reported yet (waits for the device), `None` if there are
    /// none: what a run reads after its last step.
    pub fn flush_loss(&mut self) -> anyhow::Result<Option<f32>> {
        Ok(self.unreported.take_mean()?)
    }

    /// Forward passes, loss and backward of one step, without updating anything but the RNG.
    pub fn gradients(&mut self, crops: &[Tensor], settings: &StepSettings) -> anyhow::Result<Gradients> {
        let forward = self.forward(crops, settings)?;
        Self::backward(forward)
    }

    /// The backward pass of a step's [`Forward`] (the second part of [`Trainer::gradients`]).
    pub fn backward(forward: Forward) -> anyhow::Result<Gradients> {
        let Forward { teacher, student, loss } = forward;
        let grads = detached(loss.loss.backward()?);
        Ok(Gradients { teacher, student, loss, grads })
    }

    /// Forward passes and loss of one step (the first part of [`Trainer::gradients`]).
    pub fn forward(&mut self, crops: &[Tensor], settings: &StepSettings) -> anyhow::Result<Forward> {
        if crops.len() != self.setup.ncrops {
            anyhow::bail!(
                "batch has {} crops per sample, the run was set up for {}",
                crops.len(),
                self.setup.ncrops
            );
        }
        let teacher = self.teacher.forward_t(&crops[..2], None, false)?;
        let student =
            self.student.forward_t(crops, Some(&mut self.state.rng), !settings.freeze_last_layer)?;
        let loss =
            self.loss.forward(&student.logits, &teacher.logits, &self.state.center, settings.teacher_temp)?;
        Ok(Forward { teacher, student, loss })
    }

    /// The step's report; on logging steps with the loss and the collapse indicators, which
    /// wait for the device.
    fn report(
        &mut self,
        s: &StepSettings,
        step_loss: &Tensor,
        teacher_probs: &Tensor,
        teacher_features: &Tensor,
    ) -> anyhow::Result<StepReport> {
        let every = self.setup.train.log_every_steps.max(1) as u64;
        let (loss, collapse) = if self.state.step % every == 0 {
            let step_loss = step_loss.to_scalar::<f32>()?;
            let collapse = monitor::collapse(teacher_probs, teacher_features, step_loss)?;
            (self.unreported.take_mean()?, Some(collapse))
        } else {
            (None, None)
        };
        Ok(StepReport {
            step: self.state.step,
            epoch: s.epoch,
            loss,
            lr: s.lr,
            weight_decay: s.weight_decay,
            momentum: s.momentum,
            teacher_temp: s.teacher_temp,
            collapse,
        })
    }

    /// One device tensor per crop position.
    fn upload(&self, batch: &Batch) -> anyhow::Result<Vec<Tensor>> {
        let in_chans = self.setup.preset.in_chans;
        batch
            .crops
            .iter()
            .map(|crop| {
                if crop.shape[1] != in_chans {
                    anyhow::bail!("batch crop has {} channels, the model takes {in_chans}", crop.shape[1]);
                }
                Ok(Tensor::from_slice(&crop.data, crop.shape.as_slice(), &self.device)?)
            })
            .collect()
    }

    /// The run's settings.
    pub fn setup(&self) -> &TrainerSetup {
        &self.setup
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The schedules.
    pub fn schedules(&self) -> &Schedules {
        &self.schedules
    }

    /// What the run has done.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Replace the run's progress (checkpoint loading).
    pub fn set_state(&mut self, state: TrainState) {
        self.state = state;
    }

    /// The student's variables (`backbone.*`, `head.*`).
    pub fn student_params(&self) -> &Params {
        &self.student_params
    }

    /// The teacher's variables (same names).
    pub fn teacher_params(&self) -> &Params {
        &self.teacher_params
    }

    /// The student network.
    pub fn student(&self) -> &MultiCropWrapper {
        &self.student
    }

    /// The teacher network (what gets exported).
    pub fn teacher(&self) -> &MultiCropWrapper {
        &self.teacher
    }

    /// Names of the variables the optimiser trains.
    pub fn trainable(&self) -> Vec<String> {
        self.optimizer.names().map(str::to_string).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::augment::CropBatch;
    use rand::RngExt;

    /// A `vit-micro-p8` run on 10 bands with 2 local crops, stochastic depth on.
    pub(crate) fn micro_trainer() -> Trainer {
        let model =
            ModelConfig { preset: "vit-micro-p8".into(), drop_path_rate: 0.1, ..ModelConfig::default() };
        let train = TrainConfig { batch_size: 2, log_every_steps: 1, ..TrainConfig::default() };
        let bands: Vec<String> = crate::config::SEED_BANDS.iter().map(|b| b.to_string()).collect();
        let setup = TrainerSetup::new(&model, &train, &bands, 2, ScheduleSpan::for_steps(4, 4, 2)).unwrap();
        Trainer::new(setup, &Device::Cpu).unwrap()
    }

    /// Two samples: 2 global 40 px crops and 2 local 24 px crops of seeded noise.
    pub(crate) fn noise_batch(seed: u64) -> Batch {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let crops = [40, 40, 24, 24]
            .into_iter()
            .map(|px| {
                let shape = [2, 10, px, px];
                let data = (0..shape.iter().product()).map(|_| rng.random::<f32>() - 0.5).collect();
                CropBatch { data, shape }
            })
            .collect();
        Batch { crops, sample_ids: vec![0, 1] }
    }

    #[test]
    fn after_one_step_every_trainable_variable_has_a_nonzero_gradient() {
        let mut trainer = micro_trainer();
        let crops = trainer.upload(&noise_batch(1)).unwrap();
        let mut settings = trainer.schedules().at(0);
        settings.freeze_last_layer = false;
        let g = trainer.gradients(&crops, &settings).unwrap();
        let trainable = trainer.trainable();
        assert_eq!(trainable.len() + 1, trainer.student_params().len(), "all but weight_g are trained");
        assert!(!trainable.iter().any(|n| n.ends_with("weight_g")));
        for name in &trainable {
            let var = trainer.student_params().get(name).unwrap();
            let grad = g.grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
            let size = grad.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(size > 0.0 && size.is_finite(), "{name}: gradient magnitude {size}");
        }
    }

    #[test]
    fn while_the_last_layer_is_frozen_it_gets_no_gradient_and_the_rest_the_same() {
        let gradients = |freeze: bool| {
            let mut trainer = micro_trainer();
            let crops = trainer.upload(&noise_batch(1)).unwrap();
            let mut settings = trainer.schedules().at(0);
            settings.freeze_last_layer = freeze;
            let grads = trainer.gradients(&crops, &settings).unwrap().grads;
            let of = |name: &String| {
                let var = trainer.student_params().get(name).unwrap();
                grads.get(var).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            trainer.trainable().iter().map(|name| (name.clone(), of(name))).collect::<Vec<_>>()
        };
        let (frozen, trained) = (gradients(true), gradients(false));
        for ((name, frozen), (_, trained)) in frozen.iter().zip(&trained) {
            match is_last_layer(name) {
                true => assert!(frozen.is_none() && trained.is_some(), "{name}"),
                false => assert_eq!(frozen, trained, "{name}"),
            }
        }
    }

    #[test]
    fn a_step_moves_the_student_and_reports_the_schedule() {
        let mut trainer = micro_trainer();
        let before = trainer.student_params().get("backbone.pos_embed").unwrap().as_tensor().copy().unwrap();
        trainer.step(&noise_batch(2)).unwrap();
        let report = trainer.step(&noise_batch(3)).unwrap();
        assert_eq!((report.step, report.epoch), (2, 0));
        assert!(report.loss.expect("logged every step").is_finite());
        assert!(report.lr > 0.0 && report.momentum > 0.996, "{report:?}");
        let collapse = report.collapse.expect("logged every step");
        assert!((0.0..=1.0).contains(&collapse.teacher_entropy_ratio), "{collapse:?}");
        let after = trainer.student_params().get("backbone.pos_embed").unwrap().as_tensor();
        let moved = (after - before).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 0.0);
        assert_eq!(trainer.state().step, 2);
    }

    #[test]
    fn a_step_that_returns_the_teacher_embeddings_trains_exactly_like_a_plain_step() {
        let (mut plain, mut embedding) = (micro_trainer(), micro_trainer());
        let batch = noise_batch(4);
        let settings = plain.schedules().at(0);
        let a = plain.step_batch_with(&batch, &settings).unwrap();
        let (b, cls) = embedding.step_batch_embedding(&batch, &settings).unwrap();
        assert_eq!(a, b);
        let dim = plain.teacher_params().get("backbone.cls_token").unwrap().as_tensor().dim(2).unwrap();
        assert_eq!((cls.len(), cls[0].len()), (2, dim), "one embedding per sample");
        assert_ne!(cls[0], cls[1]);
        let weights = |t: &Trainer| {
            let var =
                t.student_params().get("backbone.pos_embed").unwrap().as_tensor().flatten_all().unwrap();
            var.to_vec1::<f32>().unwrap()
        };
        assert_eq!(weights(&plain), weights(&embedding));
    }

    #[test]
    fn a_batch_with_the_wrong_band_count_is_rejected_with_both_counts() {
        let mut trainer = micro_trainer();
        let mut batch = noise_batch(3);
        batch.crops[0].shape[1] = 5;
        let err = trainer.step(&batch).unwrap_err().to_string();
        assert!(err.contains("5 channels") && err.contains("10"), "{err}");
    }
}
