//! DINO self-distillation training on top of [`crate::model`]: the loss ([`loss`]), schedules
//! ([`schedule`]), the optimiser ([`optim`]), the teacher EMA ([`ema`]), one training step with
//! its state ([`step`]), a fresh run's start, random or pretrained ([`init`]), checkpoints
//! ([`checkpoint`]) and collapse indicators ([`monitor`]).
//!
//! Semantics follow facebookresearch/dino `main_dino.py` and `utils.py` as pinned by
//! `shared/reference/dino_ref.py`; the golden tests in `tests/dino.rs` hold them to it.

pub mod checkpoint;
pub mod ema;
pub mod init;
mod inplace;
pub mod loss;
pub mod monitor;
pub mod optim;
pub mod schedule;
pub mod step;

pub use step::{StepReport, TrainState, Trainer, TrainerSetup};
