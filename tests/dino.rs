//! Golden numerics of the DINO core: every expected number comes from
//! `shared/reference/dino_ref.py golden` (PyTorch 2.11, CPU, f32), copied into `tests/golden/`, and
//! each test names the reference function behind it. Tolerances are those of `index.json`:
//! forward values rtol 1e-4 + atol 1e-5; parameters after AdamW atol 1e-6. The exception, as
//! `index.json` notes: Adam's first update is `lr * g / (|g| + eps)`, whose slope
//! `lr * eps / (|g| + eps)^2` turns f32 rounding in a tiny gradient into a visible change. Elements
//! whose gradient is below [`TINY_GRAD`] (where eps is over 1% of |g|; the gradient is our own,
//! which matches the reference's to 1e-6, see the raw-gradient test) are counted and only held to
//! the Adam steps taken so far (the sum of the lrs). Among them are the
//! attention key biases, whose true gradient is exactly 0 (softmax ignores a per-row constant):
//! there both PyTorch and we follow rounding noise.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use dinostream::config::{ModelConfig, Precision, TrainConfig};
use dinostream::dino::loss::DinoLoss;
use dinostream::dino::schedule::{ScheduleSpan, StepSettings, cosine_scheduler, teacher_temp_schedule};
use dinostream::dino::step::Gradients;
use dinostream::dino::{Trainer, TrainerSetup};
use dinostream::model::config::{HeadConfig, Preset};
use dinostream::model::head::DinoHead;
use dinostream::model::params::Params;
use dinostream::model::vit::VisionTransformer;
use serde_json::Value;

use crate::util::root;

fn golden(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join("tests/golden").join(file), &Device::Cpu).unwrap()
}

fn index() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("tests/golden/index.json")).unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap()
}

/// Assert `|got - want| <= atol + rtol |want|` elementwise (NaN in `want` = skip); returns the
/// max abs diff and prints it (`cargo test -- --nocapture` shows the table).
fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (values(got), values(want));
    let mut max = 0.0f64;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if b.is_nan() {
            continue;
        }
        let d = (a - b).abs();
        assert!(d <= atol + rtol * b.abs(), "{what}[{i}]: got {a}, want {b} (diff {d:e})");
        max = max.max(d);
    }
    eprintln!("{what}: max abs diff {max:.3e}");
    max
}

const FWD_ATOL: f64 = 1e-5;
const FWD_RTOL: f64 = 1e-4;

/// The golden architecture: `vit-micro-p8` (dim 48, depth 2, 3 heads) with the golden head sizes.
fn golden_preset() -> Preset {
    let mut p = Preset::load("vit-micro-p8", 10).unwrap();
    p.head =
        HeadConfig { out_dim: 128, hidden_dim: 64, bottleneck_dim: 32, nlayers: 3, norm_last_layer: true };
    p
}

// Source: dino_ref.py DINOLoss.forward + update_center, cases from cmd_golden (i).
#[test]
fn dino_loss_and_center_update_match_the_reference() {
    let t = golden("loss.safetensors");
    for case in index()["files"]["loss.safetensors"]["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let at = |k: &str| &t[&format!("{name}.{k}")];
        let temps = teacher_temp_schedule(
            case["warmup_teacher_temp"].as_f64().unwrap(),
            case["teacher_temp"].as_f64().unwrap(),
            case["warmup_teacher_temp_epochs"].as_u64().unwrap() as usize,
            case["nepochs"].as_u64().unwrap() as usize,
        );
        let temp = temps[case["epoch"].as_u64().unwrap() as usize];
        assert_eq!(temp, case["teacher_temp_used"].as_f64().unwrap(), "{name}: teacher temperature");
        let ncrops = case["ncrops"].as_u64().unwrap() as usize;
        let loss = DinoLoss::new(ncrops, 0.1, 0.9, &Device::Cpu).unwrap();
        let out =
            loss.forward(at("student_output"), at("teacher_output"), at("center_before"), temp).unwrap();
        assert_close(&format!("{name}.loss"), &out.loss.reshape(1).unwrap(), at("loss"), FWD_ATOL, FWD_RTOL);
        assert_close(&format!("{name}.center_after"), &out.center, at("center_after"), FWD_ATOL, FWD_RTOL);
        assert_close(&format!("{name}.pair_losses"), &out.pair_losses, at("pair_losses"), FWD_ATOL, FWD_RTOL);
    }
}

// Source: dino_ref.py cosine_scheduler and teacher_temp_schedule (numpy float64), cmd_golden (ii).
#[test]
fn schedules_match_numpy_to_the_last_bits() {
    let t = golden("schedules.safetensors");
    for case in index()["files"]["schedules.safetensors"]["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let f = |k: &str| case[k].as_f64().unwrap();
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let got = if name.starts_with("cosine") {
            let args =
                (f("base_value"), f("final_value"), u("epochs"), u("niter_per_ep"), u("warmup_epochs"));
            cosine_scheduler(args.0, args.1, args.2, args.3, args.4, f("start_warmup_value"))
        } else {
            teacher_temp_schedule(
                f("warmup_teacher_temp"),
                f("teacher_temp"),
                u("warmup_teacher_temp_epochs"),
                u("nepochs"),
            )
        };
        let want = values(&t[name]);
        assert_eq!(got.len(), want.len(), "{name}: length");
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        eprintln!("{name}: max abs diff {max:.3e}");
        assert!(max <= 1e-15, "{name}: max abs diff {max:e}");
    }
}

fn golden_vit() -> VisionTransformer {
    let w = golden("vit_weights.safetensors");
    let (vit, params) =
        Params::build(0, &Device::Cpu, |vb| VisionTransformer::new(&golden_preset(), 0.0, DType::F32, vb))
            .unwrap();
    assert_eq!(params.len(), w.len(), "every golden tensor has a parameter and back");
    params.assign("", |k| w.get(k).cloned()).unwrap();
    vit
}

// Source: dino_ref.py VisionTransformer.forward / prepare_tokens / interpolate_pos_encoding,
// Block.forward; cmd_golden (iii).
#[test]
fn vit_forward_matches_the_reference_at_120_and_56_px() {
    let io = golden("vit_io.safetensors");
    let vit = golden_vit();
    let tokens = vit.prepare_tokens(&io["x120"]).unwrap();
    assert_close("tokens120_prepared", &tokens, &io["tokens120_prepared"], FWD_ATOL, FWD_RTOL);
    let block0 = vit.block(0).forward_t(&io["tokens120_prepared"], None).unwrap();
    assert_close("tokens120_block0", &block0, &io["tokens120_block0"], FWD_ATOL, FWD_RTOL);
    let pos56 = vit.interpolate_pos_encoding(56, 56).unwrap();
    assert_close("pos_embed56", &pos56, &io["pos_embed56"], FWD_ATOL, FWD_RTOL);
    assert_close("cls120", &vit.forward(&io["x120"]).unwrap(), &io["cls120"], FWD_ATOL, FWD_RTOL);
    assert_close("cls56", &vit.forward(&io["x56"]).unwrap(), &io["cls56"], FWD_ATOL, FWD_RTOL);
}

// Source: dino_ref.py DINOHead.forward (mlp, F.normalize, weight-normed last layer); cmd_golden (iv).
#[test]
fn dino_head_forward_matches_the_reference() {
    let w = golden("head_weights.safetensors");
    let io = golden("head_io.safetensors");
    let (head, params) =
        Params::build(0, &Device::Cpu, |vb| DinoHead::new(48, &golden_preset().head, DType::F32, vb))
            .unwrap();
    assert_eq!(params.len(), w.len());
    params.assign("", |k| w.get(k).cloned()).unwrap();
    let mlp = head.mlp(&io["x"]).unwrap();
    assert_close("head.mlp_out", &mlp, &io["mlp_out"], FWD_ATOL, FWD_RTOL);
    let normalized = dinostream::model::ops::l2_normalize(&mlp).unwrap();
    assert_close("head.normalized", &normalized, &io["normalized"], FWD_ATOL, FWD_RTOL);
    assert_close("head.out", &head.forward(&io["x"]).unwrap(), &io["out"], FWD_ATOL, FWD_RTOL);
}

/// The golden run: student = teacher = golden ViT + head, DINOLoss(128, 8, .04, .07, 30, 100).
fn golden_trainer() -> Trainer {
    golden_trainer_with(&Device::Cpu, Precision::F32)
}

fn golden_trainer_with(device: &Device, precision: Precision) -> Trainer {
    let model = ModelConfig { preset: "vit-micro-p8".into(), drop_path_rate: 0.0, ..ModelConfig::default() };
    let train = TrainConfig {
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.07,
        warmup_teacher_temp_epochs: 30,
        epochs: 100,
        precision,
        // Read every step's loss (by default the trainer reads it every 10 steps).
        log_every_steps: 1,
        ..TrainConfig::default()
    };
    let bands: Vec<String> = dinostream::config::SEED_BANDS.iter().map(|b| b.to_string()).collect();
    let mut setup =
        TrainerSetup::new(&model, &train, &bands, 6, ScheduleSpan { epochs: 100, niter_per_ep: 1 }).unwrap();
    setup.preset = golden_preset();
    let trainer = Trainer::new(setup, device).unwrap();
    let (vit, head) = (golden("vit_weights.safetensors"), golden("head_weights.safetensors"));
    let lookup = |k: &str| match k.split_once('.') {
        Some(("backbone", rest)) => vit.get(rest).cloned(),
        Some(("head", rest)) => head.get(rest).cloned(),
        _ => None,
    };
    trainer.student_params().assign("", lookup).unwrap();
    trainer.teacher_params().assign("", lookup).unwrap();
    trainer
}

/// global1 = x120, global2 = x120 with H and W swapped, locals = 56 px slices at `local_offsets`.
fn golden_crops() -> Vec<Tensor> {
    let x120 = golden("vit_io.safetensors")["x120"].clone();
    let globals = [x120.clone(), x120.transpose(2, 3).unwrap().contiguous().unwrap()];
    let mut crops = globals.to_vec();
    for off in index()["training"]["local_offsets"].as_array().unwrap() {
        let o: Vec<usize> = off.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let crop = globals[o[0]].i((.., .., o[1]..o[1] + 56, o[2]..o[2] + 56)).unwrap().contiguous().unwrap();
        crops.push(crop);
    }
    crops
}

/// [`golden_settings`] with the last layer in the backward pass: the reference's raw gradients
/// (`loss.backward()`) include the last layer's, which it cancels only afterwards, while our
/// trainer leaves a frozen layer out of the backward pass.
fn raw_gradient_settings(step: &Value) -> StepSettings {
    StepSettings { freeze_last_layer: false, ..golden_settings(step) }
}

fn golden_settings(step: &Value) -> StepSettings {
    let f = |k: &str| step[k].as_f64().unwrap();
    StepSettings {
        epoch: step["epoch"].as_u64().unwrap() as usize,
        lr: f("lr"),
        weight_decay: f("weight_decay"),
        momentum: f("momentum"),
        teacher_temp: f("teacher_temp"),
        clip_grad: f("clip"),
        freeze_last_layer: step["last_layer_frozen"].as_bool().unwrap(),
    }
}

// Source: dino_ref.py cmd_golden (v): loss.backward() raw gradients ("grad.<name>" in step1).
#[test]
fn raw_gradients_of_the_first_step_match_the_reference() {
    let mut trainer = golden_trainer();
    let step = &index()["training"]["steps"][0];
    let g = trainer.gradients(&golden_crops(), &raw_gradient_settings(step)).unwrap();
    let want = golden("step1.safetensors");
    let mut worst = 0.0f64;
    for name in trainer.trainable() {
        let var = trainer.student_params().get(&name).unwrap();
        let got = g.grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
        let expected = &want[&format!("grad.{name}")];
        worst = worst.max(assert_close(&format!("grad.{name}"), got, expected, 1e-6, 1e-3));
    }
    eprintln!("raw gradients: worst max abs diff {worst:.3e}");
}

/// See the module doc.
const TINY_GRAD: f64 = 1e-6;

/// Mark the elements of each trainable tensor whose gradient in this step is below
/// [`TINY_GRAD`] (marks accumulate over steps: a noisy first update stays in the moments).
fn mark_tiny(trainer: &Trainer, g: &Gradients, tiny: &mut HashMap<String, Vec<bool>>) {
    for name in trainer.trainable() {
        let grad = g.grads.get(trainer.student_params().get(&name).unwrap()).unwrap();
        let marks = tiny.entry(name).or_insert_with(|| vec![false; grad.elem_count()]);
        for (m, v) in marks.iter_mut().zip(values(grad)) {
            *m |= v.abs() < TINY_GRAD;
        }
    }
}

// Source: dino_ref.py train order in cmd_golden (v): teacher/student forward, DINOLoss (+center),
// backward, clip_gradients, cancel_gradients_last_layer, torch AdamW, ema_update; two steps.
#[test]
fn two_training_steps_match_the_reference_in_every_tensor() {
    let mut trainer = golden_trainer();
    let crops = golden_crops();
    let mut tiny_marks = HashMap::new();
    let mut lr_sum = 0.0;
    for (i, meta) in index()["training"]["steps"].as_array().unwrap().iter().enumerate() {
        let want = golden(meta["file"].as_str().unwrap());
        let settings = golden_settings(meta);
        lr_sum += settings.lr;
        let g = trainer.gradients(&crops, &raw_gradient_settings(meta)).unwrap();
        // MultiCropWrapper rows are crop-major: these compare row for row.
        let step = format!("step{}", i + 1);
        assert_close(
            &format!("{step}.student_output"),
            &g.student.logits,
            &want["student_output"],
            FWD_ATOL,
            FWD_RTOL,
        );
        assert_close(
            &format!("{step}.teacher_output"),
            &g.teacher.logits,
            &want["teacher_output"],
            FWD_ATOL,
            FWD_RTOL,
        );
        mark_tiny(&trainer, &g, &mut tiny_marks);
        let report = trainer.step_with(&crops, &settings).unwrap();
        let loss = Tensor::new(&[report.loss.expect("read every step")], &Device::Cpu).unwrap();
        assert_close(&format!("step{}.loss", i + 1), &loss, &want["loss"], FWD_ATOL, FWD_RTOL);
        let center = &trainer.state().center;
        assert_close(
            &format!("step{}.center_after", i + 1),
            center,
            &want["center_after"],
            FWD_ATOL,
            FWD_RTOL,
        );
        for side in ["student", "teacher"] {
            let params = if side == "student" { trainer.student_params() } else { trainer.teacher_params() };
            let (mut worst, mut tiny, mut total) = (0.0f64, 0, 0);
            for (name, var) in params.iter() {
                let skip = tiny_marks.get(name).cloned().unwrap_or_default();
                let got = values(var.as_tensor());
                let expected = values(&want[&format!("{side}.{name}")]);
                assert_eq!(got.len(), expected.len(), "{side}.{name}");
                total += got.len();
                for (j, (a, b)) in got.iter().zip(&expected).enumerate() {
                    let d = (a - b).abs();
                    if skip.get(j).copied().unwrap_or(false) {
                        tiny += 1;
                        assert!(
                            d <= lr_sum,
                            "step{} {side}.{name}[{j}]: got {a}, want {b}: beyond the steps taken",
                            i + 1
                        );
                        continue;
                    }
                    assert!(d <= 1e-6, "step{} {side}.{name}[{j}]: got {a}, want {b} (diff {d:e})", i + 1);
                    worst = worst.max(d);
                }
            }
            eprintln!(
                "step{} {side}: max abs diff {worst:.3e} ({tiny} of {total} tiny-gradient elements)",
                i + 1
            );
            assert!(tiny * 100 < total, "too many tiny-gradient elements: {tiny} of {total}");
        }
    }
}

// bf16 mixed precision (issue 7): the golden steps with bf16 matrix products against the f32
// golden files. The yardstick is PyTorch's own bf16 autocast on the same steps
// (`benches/bf16_reference.py`, torch 2.11 CPU): raw gradients of step 1 off by 1.3e-2 relative;
// after step 1 / step 2: loss off by 5.2e-3 / 1.2e-2, centre by 2.4e-4 / 5.6e-4, parameters by
// 4.0e-3 / 5.6e-3 (Adam's first steps are about lr * sign(g), and bf16 flips the sign of tiny
// gradients), student update relative error 0.14 / 0.12. Documented tolerance: one pass (the raw
// gradients) within twice PyTorch's deviation, 2.6e-2; after the steps, where Adam amplifies
// those sign flips chaotically, loss 5e-2, centre 1.2e-3, parameters 1.2e-2, update 0.3.
// Measured here (candle's CPU bf16 GEMM, bf16 activations between the products as autocast keeps
// them): gradients 1.2e-2; loss 6.6e-5 / 4.9e-3, centre 4.9e-4 / 7.8e-4, parameters 4.0e-3 /
// 5.9e-3, update 0.15 / 0.12.
#[test]
fn bf16_training_steps_stay_within_the_documented_tolerance_of_f32() {
    let mut trainer = golden_trainer_with(&Device::Cpu, Precision::Bf16);
    let before = snapshot(trainer.student_params());
    let crops = golden_crops();
    let first = &index()["training"]["steps"][0];
    let g = trainer.gradients(&crops, &raw_gradient_settings(first)).unwrap();
    let want = golden("step1.safetensors");
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for name in trainer.trainable() {
        let got = values(g.grads.get(trainer.student_params().get(&name).unwrap()).unwrap());
        for (a, b) in got.iter().zip(values(&want[&format!("grad.{name}")])) {
            (err, norm) = (err + (a - b).powi(2), norm + b * b);
        }
    }
    let gradient_rel_err = (err / norm).sqrt();
    eprintln!("step1 bf16 raw gradients vs f32: relative error {gradient_rel_err:.2e}");
    assert!(gradient_rel_err <= 2.6e-2, "raw gradients off by {gradient_rel_err:e} relative");
    for (i, meta) in index()["training"]["steps"].as_array().unwrap().iter().enumerate() {
        let want = golden(meta["file"].as_str().unwrap());
        let report = trainer.step_with(&crops, &golden_settings(meta)).unwrap();
        let loss = (report.loss.expect("read every step") as f64 - meta["loss"].as_f64().unwrap()).abs();
        let center = max_abs_diff(&trainer.state().center, &want["center_after"]);
        let (mut params, mut err, mut update) = (0.0f64, 0.0, 0.0);
        for (side, vars) in [("student", trainer.student_params()), ("teacher", trainer.teacher_params())] {
            for (name, var) in vars.iter() {
                let (got, f32_run) = (values(var.as_tensor()), values(&want[&format!("{side}.{name}")]));
                for (j, (a, b)) in got.iter().zip(&f32_run).enumerate() {
                    params = params.max((a - b).abs());
                    if side == "student" {
                        err += (a - b).powi(2);
                        update += (b - before[name][j]).powi(2);
                    }
                }
            }
        }
        let update_rel_err = (err / update).sqrt();
        eprintln!(
            "step{} bf16 vs f32: loss {loss:.2e}, centre {center:.2e}, parameters {params:.2e}, update {update_rel_err:.3}",
            i + 1
        );
        assert!(loss <= 5e-2 && center <= 1.2e-3, "loss off by {loss:e}, centre by {center:e}");
        assert!(
            params <= 1.2e-2 && update_rel_err <= 0.3,
            "parameters off by {params:e}, update {update_rel_err}"
        );
        assert!(update_rel_err > 1e-4, "bf16 changed nothing: is the precision applied?");
    }
}

/// Every variable's values.
fn snapshot(params: &Params) -> HashMap<String, Vec<f64>> {
    params.iter().map(|(name, var)| (name.to_string(), values(var.as_tensor()))).collect()
}

/// Largest absolute difference between two runs' student and teacher parameters.
#[cfg(feature = "cuda")]
fn params_max_abs_diff(x: &Trainer, y: &Trainer) -> f64 {
    let sides = [(x.student_params(), y.student_params()), (x.teacher_params(), y.teacher_params())];
    sides
        .iter()
        .flat_map(|(a, b)| {
            a.iter().map(|(name, var)| max_abs_diff(var.as_tensor(), b.get(name).unwrap().as_tensor()))
        })
        .fold(0.0, f64::max)
}

/// Largest absolute difference between two tensors of the same shape, on any devices.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

// The CUDA check of issue 4: the golden training steps on GPU 0 against the same steps on the CPU.
// Built only with `--features cuda`; run with `cargo test --release --features cuda cuda_`.
#[cfg(feature = "cuda")]
#[test]
fn cuda_training_steps_match_the_cpu_run() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let (mut cpu_run, mut gpu_run) = (golden_trainer(), golden_trainer_with(&gpu, Precision::F32));
    let crops = golden_crops();
    let gpu_crops: Vec<Tensor> = crops.iter().map(|c| c.to_device(&gpu).unwrap()).collect();
    for (i, meta) in index()["training"]["steps"].as_array().unwrap().iter().enumerate() {
        let settings = golden_settings(meta);
        let (a, b) = (
            cpu_run.step_with(&crops, &settings).unwrap(),
            gpu_run.step_with(&gpu_crops, &settings).unwrap(),
        );
        let worst = [
            ("loss", (a.loss.expect("read every step") - b.loss.expect("read every step")).abs() as f64),
            ("center", max_abs_diff(&cpu_run.state().center, &gpu_run.state().center)),
            ("parameters", params_max_abs_diff(&cpu_run, &gpu_run)),
        ];
        eprintln!("step{} CUDA vs CPU max abs diff: {worst:?}", i + 1);
        for (what, d) in worst {
            assert!(d <= 1e-4, "step{} {what}: CUDA differs from CPU by {d:e}", i + 1);
        }
    }
}
