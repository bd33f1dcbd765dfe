//! A residual branch, `x + drop_path(f(x))` with `f` a chain of stages (LayerNorm, linear layers,
//! attention), as one autograd node while training.
//!
//! Each op of the chain is a node of its own in candle's graph, and candle's backward pass sums
//! every node's input gradient onto a fresh zero tensor, even where a single node consumes that
//! input: per ViT block sixteen activation-wide buffers zeroed and added, about 7 % of a CPU
//! training step. [`residual_branch`] runs the chain on detached inputs, keeps each stage's input,
//! and records one node `x + scale * branch` whose backward hands the gradient from stage to stage
//! itself (each stage's own backward, as its op's node would run it) and sums the two gradients
//! of `x`. The parameters enter the node as one concatenated tensor, so candle routes each
//! parameter's gradient back to it as for any other op. The values are those of the per-op graph
//! (a gradient summed onto zeros is itself; the two gradients of `x` are added in either order).

use std::sync::Mutex;

use candle_core::{CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

use super::attention::Attention;
use super::matmul::LinearOp;
use super::norm::LayerNormOp;
use super::pointwise::Residual;
use super::{Fused, attention, gelu_linear, linear, residual};

/// One step of a residual branch: the op and its parameters (the model's tensors). Made by
/// `LayerNorm::stage`, `Linear::stage` and [`Stage::attention`].
#[derive(Debug, Clone)]
pub struct Stage(Kind);

#[derive(Debug, Clone)]
enum Kind {
    LayerNorm { weight: Tensor, bias: Tensor, op: LayerNormOp },
    Linear { weight: Tensor, bias: Option<Tensor>, op: LinearOp },
    Attention(Attention),
}

impl Stage {
    /// Multi-head attention's core (see [`attention`]).
    pub fn attention(num_heads: usize, scale: f64, matmul: DType) -> Stage {
        Stage(Kind::Attention(Attention { num_heads, scale, matmul }))
    }

    pub(super) fn layer_norm(weight: Tensor, bias: Tensor, op: LayerNormOp) -> Stage {
        Stage(Kind::LayerNorm { weight, bias, op })
    }

    pub(super) fn linear(weight: Tensor, bias: Option<Tensor>, op: LinearOp) -> Stage {
        Stage(Kind::Linear { weight, bias, op })
    }

    /// The stage on `xs` with `params` (the stage's own, or detached copies of them).
    fn forward_with(&self, xs: &Tensor, params: &[Tensor]) -> Result<Tensor> {
        match (&self.0, params) {
            (Kind::LayerNorm { op, .. }, [weight, bias]) => xs.apply_op3(weight, bias, *op),
            (Kind::Linear { op, .. }, [weight, rest @ ..]) => match op.gelu_input {
                true => gelu_linear(xs, weight, rest.first(), op.matmul),
                false => linear(xs, weight, rest.first(), op.matmul),
            },
            (Kind::Attention(op), []) => attention(xs, op.num_heads, op.scale, op.matmul),
            _ => candle_core::bail!("residual branch: a stage got {} parameters", params.len()),
        }
    }

    /// The gradient of the stage's input and of its parameters (in [`Stage::params`]'s order) for
    /// the output gradient `grad`; an error for a stage without [`Stage::has_backward`].
    fn backward(&self, xs: &Tensor, grad: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut grads = match &self.0 {
            Kind::LayerNorm { weight, op, .. } => Vec::from(op.backward(xs, &weight.detach(), grad)?),
            Kind::Linear { weight, bias: Some(bias), op } => {
                Vec::from(op.backward(xs, &weight.detach(), &bias.detach(), grad)?)
            }
            Kind::Linear { bias: None, .. } => {
                candle_core::bail!("residual branch: a linear stage without a bias has no backward here")
            }
            Kind::Attention(op) => vec![op.backward(xs, grad)?],
        };
        let input = grads.remove(0);
        Ok((input, grads))
    }

    /// The parameters, in the order of the gradients [`Stage::backward`] returns.
    fn params(&self) -> Vec<Tensor> {
        match &self.0 {
            Kind::LayerNorm { weight, bias, .. } => vec![weight.clone(), bias.clone()],
            Kind::Linear { weight, bias, .. } => {
                [Some(weight), bias.as_ref()].into_iter().flatten().cloned().collect()
            }
            Kind::Attention(_) => Vec::new(),
        }
    }

    /// Whether [`Stage::backward`] covers this stage (a linear layer needs its bias).
    fn has_backward(&self) -> bool {
        !matches!(self.0, Kind::Linear { bias: None, .. })
    }
}

/// `xs + branch * scale` with `branch` the `stages` applied in turn to `xs` (see [`residual`];
/// `scale` a per-sample factor from `drop_path_scale`). While training (`xs` or a parameter
/// tracked) one autograd node, see the module doc; otherwise, and for stages without a written-out
/// backward, the chain of ops.
pub fn residual_branch(xs: &Tensor, stages: &[Stage], scale: Option<&Tensor>) -> Result<Tensor> {
    let params: Vec<Tensor> = stages.iter().flat_map(Stage::params).collect();
    let training = xs.track_op() || params.iter().any(Tensor::track_op);
    if !training || !stages.iter().all(Stage::has_backward) {
        return chain_of_ops(xs, stages, scale);
    }
    let mut inputs = vec![xs.detach()];
    for stage in stages {
        let detached: Vec<Tensor> = stage.params().iter().map(Tensor::detach).collect();
        let output = stage.forward_with(inputs.last().expect("starts with xs"), &detached)?;
        inputs.push(output);
    }
    let branch = inputs.pop().expect("one output per stage");
    if xs.dims() != branch.dims() {
        candle_core::bail!("residual: stream {:?} and branch {:?} differ", xs.dims(), branch.dims());
    }
    let flat: Vec<Tensor> = params.iter().map(Tensor::flatten_all).collect::<Result<_>>()?;
    let node = BranchNode {
        stages: stages.to_vec(),
        inputs,
        branch_dtype: branch.dtype(),
        branch: Mutex::new(Some(branch)),
        scale: scale.cloned(),
    };
    xs.apply_op2(&Tensor::cat(&flat, 0)?, node)
}

/// [`residual_branch`] as a node per op.
fn chain_of_ops(xs: &Tensor, stages: &[Stage], scale: Option<&Tensor>) -> Result<Tensor> {
    let branch = stages.iter().try_fold(xs.clone(), |x, stage| stage.forward_with(&x, &stage.params()))?;
    residual(xs, &branch, scale)
}

/// The node of a residual branch: its forward adds the branch computed by [`residual_branch`]
/// (handed over once, then dropped), its backward runs the stages' backward passes.
struct BranchNode {
    stages: Vec<Stage>,
    /// Each stage's input (the first is the node's `xs`).
    inputs: Vec<Tensor>,
    branch: Mutex<Option<Tensor>>,
    branch_dtype: DType,
    scale: Option<Tensor>,
}

impl BranchNode {
    /// `xs + branch * scale` at the storage level ([`residual`]'s kernels), on any backend.
    fn forward<S: Fused>(&self, xs: (&S, &Layout), _params: (&S, &Layout)) -> Result<(S, Shape)> {
        let poisoned =
            |_| candle_core::Error::Msg("residual branch: a panic poisoned the node's lock".into());
        let branch = self.branch.lock().map_err(poisoned)?.take();
        let Some(branch) = branch else {
            candle_core::bail!("residual branch: the node was evaluated twice");
        };
        let (branch_storage, branch_layout) = branch.storage_and_layout();
        let scale = self.scale.as_ref().map(Tensor::storage_and_layout);
        let scale = match &scale {
            Some((storage, layout)) => Some((same_backend::<S>(storage)?, *layout)),
            None => None,
        };
        Residual::forward(xs, (same_backend::<S>(&branch_storage)?, branch_layout), scale)
    }
}

/// `storage` as the backend storage `S` of the op's inputs.
fn same_backend<S: Fused>(storage: &Storage) -> Result<&S> {
    S::of(storage).ok_or_else(|| candle_core::Error::Msg("residual branch: tensors on two devices".into()))
}

impl CustomOp2 for BranchNode {
    fn name(&self) -> &'static str {
        "residual-branch"
    }

    backend_forward!(2, forward);

    /// The residual's backward, then each stage's from the last to the first; the gradient of
    /// `xs` is the residual's plus the first stage's, the parameters' gradients concatenated.
    fn bwd(
        &self,
        _xs: &Tensor,
        _params: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, mut grad) = Residual::backward(self.branch_dtype, self.scale.as_ref(), grad)?;
        let mut param_grads = Vec::new();
        for (stage, input) in self.stages.iter().zip(&self.inputs).rev() {
            let (grad_input, grads) = stage.backward(input, &grad)?;
            grad = grad_input;
            param_grads.extend(grads.into_iter().rev());
        }
        let flat: Vec<Tensor> = param_grads.iter().rev().map(Tensor::flatten_all).collect::<Result<_>>()?;
        Ok((Some((grad_xs + grad)?.detach()), Some(Tensor::cat(&flat, 0)?.detach())))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::ops::{LayerNorm, Linear};

    /// The output and every gradient (of `x`, then of each variable by name) of a ViT block's two
    /// branches under a fixed random linear loss.
    fn block(matmul: DType, scale: Option<&Tensor>, fused: bool) -> Vec<Vec<f32>> {
        let (dev, (b, n, d, heads)) = (Device::Cpu, (3, 7, 12, 2));
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut uniform = |shape: &Shape| {
            let values: Vec<f32> = (0..shape.elem_count()).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            Tensor::from_vec(values, shape, &dev).unwrap()
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let norm1 = LayerNorm::new(d, 1e-6, matmul, vb.pp("norm1")).unwrap();
        let qkv = Linear::new(d, 3 * d, true, matmul, vb.pp("qkv")).unwrap();
        let proj = Linear::new(d, d, true, matmul, vb.pp("proj")).unwrap();
        let norm2 = LayerNorm::new(d, 1e-6, matmul, vb.pp("norm2")).unwrap();
        let fc1 = Linear::new(d, 4 * d, true, matmul, vb.pp("fc1")).unwrap();
        let fc2 = Linear::new(4 * d, d, true, matmul, vb.pp("fc2")).unwrap();
        let mut named: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (_, var)) in named.iter().enumerate() {
            var.set(&(uniform(var.shape()) + (i % 2) as f64).unwrap()).unwrap();
        }
        let attention =
            [norm1.stage(), qkv.stage(false), Stage::attention(heads, 0.4, matmul), proj.stage(false)];
        let mlp = [norm2.stage(), fc1.stage(false), fc2.stage(true)];
        let x = Var::from_tensor(&uniform(&(b, n, d).into())).unwrap();
        let apply = |xs: &Tensor, stages: &[Stage]| match fused {
            true => residual_branch(xs, stages, scale).unwrap(),
            false => chain_of_ops(xs, stages, scale).unwrap(),
        };
        let ys = apply(&apply(x.as_tensor(), &attention), &mlp);
        let weights = uniform(&(b, n, d).into());
        let grads = (&ys * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let flat =
            |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let mut values = vec![flat(&ys), flat(grads.get(x.as_tensor()).expect("x has a gradient"))];
        for (name, var) in &named {
            values.push(flat(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"))));
        }
        values
    }

    #[test]
    fn a_branch_node_equals_the_chain_of_ops_bit_for_bit_in_both_passes() {
        let scale = Tensor::new(&[1.25f32, 0.0, 1.25], &Device::Cpu).unwrap().reshape((3, 1, 1)).unwrap();
        for matmul in [DType::F32, DType::BF16] {
            for scale in [None, Some(&scale)] {
                let (fused, chain) = (block(matmul, scale, true), block(matmul, scale, false));
                for (i, (a, b)) in fused.iter().zip(&chain).enumerate() {
                    assert!(a.iter().any(|v| *v != 0.0), "{matmul:?}, tensor {i} is all zeros");
                    let same =
                        a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                    assert!(same, "{matmul:?}, scale {}: tensor {i} differs", scale.is_some());
                }
            }
        }
    }
}
