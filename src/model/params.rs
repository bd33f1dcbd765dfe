//! Named trainable parameters: a candle `VarBuilder` backend that creates each variable once, with
//! a seeded initialisation, and remembers it under its DINO name.
//!
//! candle's `VarMap` draws initial values from the device RNG, which cannot be seeded on the CPU;
//! here every tensor gets its own ChaCha stream derived from (seed, name), so a model's initial
//! weights depend only on the seed, not on construction order or device.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Parameters in creation order, each with its full name (`blocks.0.attn.qkv.weight`).
#[derive(Clone, Default)]
pub struct Params {
    vars: Vec<(String, Var)>,
}

impl Params {
    /// Build a module with `build`, creating its variables with seeded values on `device`.
    pub fn build<M>(
        seed: u64,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> Result<M>,
    ) -> Result<(M, Params)> {
        let store = SeededStore { seed, vars: Arc::new(Mutex::new(Vec::new())) };
        let vars = store.vars.clone();
        let module = build(VarBuilder::from_backend(Box::new(store), DType::F32, device.clone()))?;
        let vars = std::mem::take(&mut *vars.lock().expect("no builder panicked while holding the lock"));
        Ok((module, Params { vars }))
    }

    /// Build a module that reads (and shares storage with) these parameters without tracking
    /// gradients: the teacher, which changes only through [`Var::set`].
    pub fn build_frozen<M>(&self, device: &Device, build: impl FnOnce(VarBuilder) -> Result<M>) -> Result<M> {
        let tensors = self.vars.iter().map(|(n, v)| (n.clone(), v.as_detached_tensor())).collect();
        build(VarBuilder::from_tensors(tensors, DType::F32, device))
    }

    /// A deep copy (new storage) with the same names.
    pub fn deep_copy(&self) -> Result<Params> {
        let vars = self
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<Result<_>>()?;
        Ok(Params { vars })
    }

    /// Every (name, variable), in creation order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The variable called `name`.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Overwrite every parameter with `lookup(prefix + name)`; a missing name is an error.
    pub fn assign(&self, prefix: &str, lookup: impl Fn(&str) -> Option<Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let key = format!("{prefix}{name}");
            let Some(t) = lookup(&key) else {
                candle_core::bail!("tensor `{key}` is missing from the source");
            };
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "tensor `{key}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// The `VarBuilder` backend behind [`Params::build`].
struct SeededStore {
    seed: u64,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for SeededStore {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.vars.lock().expect("no builder panicked while holding the lock");
        if let Some((_, var)) = vars.iter().find(|(n, _)| n == name) {
            if var.shape() != &shape {
                candle_core::bail!("parameter `{name}` requested as {shape:?} and as {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let values = initial_values(&shape, &init, stream_seed(self.seed, name))?;
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        vars.push((name.to_string(), var.clone()));
        Ok(var.into_inner())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter `{name}` must be requested with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.lock().expect("no builder panicked while holding the lock").iter().any(|(n, _)| n == name)
    }
}

/// FNV-1a of the name mixed into the seed: one independent stream per parameter.
fn stream_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325_u64 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Host-side initial values for the hints the model uses (constants, normal, uniform).
fn initial_values(shape: &Shape, init: &Init, seed: u64) -> Result<Vec<f32>> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values = match *init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        // DINO's trunc_normal_ cuts at +-2 absolute: redraw the (astronomically rare) outliers.
        Init::Randn { mean, stdev } => {
            (0..n).map(|_| truncated_normal(&mut rng, mean, stdev) as f32).collect()
        }
        Init::Kaiming { .. } => candle_core::bail!("Kaiming init is not used by the DINO models"),
    };
    Ok(values)
}

fn truncated_normal(rng: &mut ChaCha8Rng, mean: f64, stdev: f64) -> f64 {
    loop {
        // Box-Muller; 1 - u keeps the logarithm finite.
        let (u, v): (f64, f64) = (rng.random(), rng.random());
        let x = mean + stdev * (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        if (-2.0..=2.0).contains(&x) {
            return x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_vars(vb: VarBuilder) -> Result<(Tensor, Tensor)> {
        let a = vb.get_with_hints((3, 4), "a.weight", Init::Randn { mean: 0.0, stdev: 0.02 })?;
        let b = vb.pp("b").get_with_hints(5, "bias", Init::Const(0.5))?;
        Ok((a, b))
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_names() {
        let (_, p1) = Params::build(7, &Device::Cpu, two_vars).unwrap();
        let (_, p2) = Params::build(7, &Device::Cpu, two_vars).unwrap();
        let names: Vec<_> = p1.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["a.weight", "b.bias"]);
        let a1: Vec<f32> = p1.get("a.weight").unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let a2: Vec<f32> = p2.get("a.weight").unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a1, a2);
        let (_, p3) = Params::build(8, &Device::Cpu, two_vars).unwrap();
        let a3: Vec<f32> = p3.get("a.weight").unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(a1, a3);
    }

    #[test]
    fn a_frozen_copy_follows_updates_of_its_source() {
        let (_, params) = Params::build(1, &Device::Cpu, two_vars).unwrap();
        let (_, b) = params.build_frozen(&Device::Cpu, two_vars).unwrap();
        params.get("b.bias").unwrap().set(&Tensor::ones(5, DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), [1.0; 5]);
        assert!(!b.is_variable());
    }
}
