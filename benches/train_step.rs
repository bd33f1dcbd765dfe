//! DINO training-step throughput on synthetic crops already on the device: the Rust side of
//! `shared/reference/dino_ref.py bench` (same defaults: ViT-S/8, batch 64, K = 65536,
//! 2 x 120 px + 6 x 56 px crops, no stochastic depth, last layer trained, 5 warm-up steps excluded).
//! Not a test: `scripts/gpu-check.sh` runs it beside the PyTorch baseline on the GPU machine.
//!
//! ```sh
//! cargo bench --bench train_step -- [--device cuda] [--preset vit-small-p8] [--batch 64] [--steps 30]
//! ```
//!
//! Prints one JSON line with the same keys as the reference (`ms_per_iter`, `images_per_s`, ...).
//! Peak GPU memory is read outside the process (`nvidia-smi`), the same way for both sides. On the
//! CPU the bench counts its heap instead: `peak_heap_MiB` is the most bytes live at once during
//! the timed steps (tensors are heap allocations there), free of the allocator's caching.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use dinostream::config::{ModelConfig, Precision, SEED_BANDS, TrainConfig};
use dinostream::dino::schedule::{ScheduleSpan, StepSettings};
use dinostream::dino::{Trainer, TrainerSetup};

#[derive(Parser)]
struct Args {
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model preset (`models/<name>.toml`).
    #[arg(long, default_value = "vit-small-p8")]
    preset: String,
    /// Samples per step (each 2 global + `local_crops` local crops).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Head output dimension K.
    #[arg(long, default_value_t = 65536)]
    out_dim: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Untimed steps first (PTX JIT, allocator warm-up).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 120)]
    img: usize,
    #[arg(long, default_value_t = 56)]
    local: usize,
    #[arg(long, default_value_t = 6)]
    local_crops: usize,
    /// Matrix-product arithmetic: f32, tf32 (CUDA) or bf16.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    /// After the timed steps, time one more step stage by stage (forward, loss, backward, update),
    /// with a device sync between stages, and report the memory after the forward pass.
    #[arg(long)]
    stages: bool,
    /// cargo bench passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dinostream::model::keep_freed_memory();
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    };
    let mut trainer = trainer(&args, &device)?;
    let crops = synthetic_crops(&args, &device)?;
    let warm = Instant::now();
    for step in 0..args.warmup {
        run_step(&mut trainer, &crops, step)?;
    }
    device.synchronize()?;
    let warm_s = warm.elapsed().as_secs_f64();
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let start = Instant::now();
    for step in args.warmup..args.warmup + args.steps {
        run_step(&mut trainer, &crops, step)?;
    }
    device.synchronize()?;
    let loss = trainer.flush_loss()?.unwrap_or(f32::NAN);
    let ms = 1000.0 * start.elapsed().as_secs_f64() / args.steps.max(1) as f64;
    let result = serde_json::json!({
        "what": "dinostream_train_bench", "preset": args.preset, "batch": args.batch, "out_dim": args.out_dim,
        "crops": format!("2x{}+{}x{}", args.img, args.local_crops, args.local),
        "steps": args.steps, "warmup": args.warmup, "device": args.device, "precision": args.precision,
        "ms_per_iter": round3(ms), "images_per_s": round3(args.batch as f64 * 1000.0 / ms),
        "crops_per_s": round3((args.batch * (2 + args.local_crops)) as f64 * 1000.0 / ms),
        "warmup_s": round3(warm_s), "final_loss": loss,
        "student_params": trainer.student_params().iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        "peak_heap_MiB": mib(PEAK.load(Ordering::Relaxed)),
    });
    let result = match args.stages {
        true => with_stages(result, &mut trainer, &crops, args.warmup + args.steps)?,
        false => result,
    };
    println!("{result}");
    Ok(())
}

/// The reference bench's run: `lr = 5e-4 * B / 256`, cosine schedules over 100 epochs of
/// `warmup + steps` iterations, teacher temperature 0.04, epoch 1 (last layer not frozen).
fn trainer(args: &Args, device: &Device) -> anyhow::Result<Trainer> {
    let model = ModelConfig { preset: args.preset.clone(), drop_path_rate: 0.0, ..ModelConfig::default() };
    let train = TrainConfig {
        batch_size: args.batch,
        warmup_epochs: 0,
        epochs: 100,
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.04,
        log_every_steps: usize::MAX,
        precision: args.precision,
        ..TrainConfig::default()
    };
    let bands: Vec<String> = SEED_BANDS.iter().map(|b| b.to_string()).collect();
    let span = ScheduleSpan { epochs: 100, niter_per_ep: (args.warmup + args.steps).max(1) };
    let mut setup = TrainerSetup::new(&model, &train, &bands, args.local_crops, span)?;
    setup.preset.head.out_dim = args.out_dim;
    Trainer::new(setup, device)
}

fn synthetic_crops(args: &Args, device: &Device) -> anyhow::Result<Vec<Tensor>> {
    let bands = SEED_BANDS.len();
    let sizes = [args.img; 2].into_iter().chain(std::iter::repeat_n(args.local, args.local_crops));
    sizes.map(|px| Ok(Tensor::randn(0f32, 1.0, (args.batch, bands, px, px), device)?)).collect()
}

/// One step; the loss stays on the device (`log_every_steps` is off), as PyTorch's bench.
fn run_step(trainer: &mut Trainer, crops: &[Tensor], step: usize) -> anyhow::Result<()> {
    let settings = settings_at(trainer, step);
    trainer.step_with(crops, &settings)?;
    Ok(())
}

/// The reference bench's settings at `step`: epoch 1, last layer trained.
fn settings_at(trainer: &Trainer, step: usize) -> StepSettings {
    let mut settings = trainer.schedules().at(step as u64);
    settings.epoch = 1;
    settings.freeze_last_layer = false;
    settings
}

/// `result` plus `"stages"`: milliseconds and peak live heap (CPU) of one more step's forward
/// passes with the loss, backward pass and update (clipping, AdamW, EMA), each device-synchronised,
/// and the heap live after the forward pass.
fn with_stages(
    mut result: serde_json::Value,
    trainer: &mut Trainer,
    crops: &[Tensor],
    step: usize,
) -> anyhow::Result<serde_json::Value> {
    let settings = settings_at(trainer, step);
    let device = trainer.device().clone();
    let (forward, forward_ms, forward_peak) = timed(&device, || trainer.forward(crops, &settings))?;
    let live_after_forward = mib(LIVE.load(Ordering::Relaxed));
    let (gradients, backward_ms, backward_peak) = timed(&device, || Trainer::backward(forward))?;
    let (_, update_ms, update_peak) = timed(&device, || trainer.apply(gradients, &settings))?;
    result["stages"] = serde_json::json!({
        "forward_and_loss_ms": forward_ms, "backward_ms": backward_ms, "update_ms": update_ms,
        "peak_forward_MiB": forward_peak, "live_after_forward_MiB": live_after_forward,
        "peak_backward_MiB": backward_peak, "peak_update_MiB": update_peak,
    });
    Ok(result)
}

/// `f()`, its milliseconds (device synchronised) and the peak live heap while it ran, in MiB.
fn timed<T>(device: &Device, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64, f64)> {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let start = Instant::now();
    let value = f()?;
    device.synchronize()?;
    let ms = round3(1000.0 * start.elapsed().as_secs_f64());
    Ok((value, ms, mib(PEAK.load(Ordering::Relaxed))))
}

fn mib(bytes: usize) -> f64 {
    round3(bytes as f64 / (1 << 20) as f64)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
