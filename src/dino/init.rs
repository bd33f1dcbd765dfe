//! How a fresh run starts: the seeded random initialisation, or a pretrained file
//! (`model.init`, [`crate::model::pretrained`]) loaded into both the student and the teacher.
//! Only runs without a checkpoint begin here; a checkpoint (which records `model.init` in its
//! settings) resumes through [`crate::dino::checkpoint`] and never imports again.

use anyhow::{Context, Result};
use candle_core::Device;

use crate::config::{AugmentConfig, parse_init_bands};
use crate::dino::step::{Trainer, TrainerSetup};
use crate::model::params::Params;
use crate::model::pretrained::{self, InitSpec};

/// A new trainer for `setup` with crops of `augment`'s sizes: random, or from `setup.model.init`
/// when set.
pub fn begin(setup: TrainerSetup, augment: &AugmentConfig, device: &Device) -> Result<Trainer> {
    let crops = [("augment.global_px", augment.global_px), ("augment.local_px", augment.local_px)];
    setup.preset.check_crop_sizes(&crops).map_err(anyhow::Error::msg)?;
    let spec = init_spec(&setup)?;
    let trainer = Trainer::new(setup, device)?;
    if let Some(spec) = spec {
        let setup = trainer.setup();
        let imported = pretrained::import(&spec, &setup.preset, &setup.bands, trainer.student_params())
            .with_context(|| format!("model.init {}: cannot start from it", spec.path.display()))?;
        assign(trainer.student_params(), &imported.student)?;
        assign(trainer.teacher_params(), &imported.teacher)?;
    }
    Ok(trainer)
}

/// `model.init*` as an import request, `None` without `model.init`.
fn init_spec(setup: &TrainerSetup) -> Result<Option<InitSpec>> {
    let Some(path) = &setup.model.init else { return Ok(None) };
    let names = setup.model.init_bands.as_deref().context(
        "model.init_bands is unset: name the input channels of model.init (--init-bands rgb, ssl4eo-s12-13 or a list)",
    )?;
    let bands = parse_init_bands(names).map_err(|e| anyhow::anyhow!("model.init_bands: {e}"))?;
    Ok(Some(InitSpec { path: path.clone(), bands, missing: setup.model.init_missing_bands }))
}

/// Overwrite the named variables of `params` with `values` (the rest keep their random values).
fn assign(params: &Params, values: &std::collections::HashMap<String, candle_core::Tensor>) -> Result<()> {
    for (name, var) in params.iter() {
        if let Some(value) = values.get(name) {
            var.set(&value.to_device(var.device())?)
                .with_context(|| format!("parameter `{name}`: cannot take the imported value"))?;
        }
    }
    Ok(())
}
