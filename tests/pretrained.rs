//! Starting from pretrained weights (`--init`, `model.init`): the fixtures in
//! `tests/fixtures/pretrained/` were written by `make_pretrained.py` there with PyTorch and the
//! reference ViT (`shared/reference/dino_ref.py`); the imported backbones must reproduce its cls
//! outputs, by band name, and bad files must be reported with the file and what differs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Module, Tensor};
use dinostream::config::{AugmentConfig, MissingBands, ModelConfig, TrainConfig};
use dinostream::dino::init::begin;
use dinostream::dino::schedule::ScheduleSpan;
use dinostream::dino::{Trainer, TrainerSetup};

use crate::util;

/// The fixture's band names, in its input channel order.
const FILE_BANDS: &str = "B02,B03,B04,B08";

fn fixture(name: &str) -> PathBuf {
    util::root().join("tests/fixtures/pretrained").join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

/// A trainer for the fixture preset on `bands`, started from `init`.
fn imported(init: &Path, bands: &[&str], missing: MissingBands) -> anyhow::Result<Trainer> {
    imported_with_preset(init, bands, missing, &fixture("vit-fixture-p8.toml"))
}

fn imported_with_preset(
    init: &Path,
    bands: &[&str],
    missing: MissingBands,
    preset: &Path,
) -> anyhow::Result<Trainer> {
    let model = ModelConfig {
        preset: preset.display().to_string(),
        init: Some(init.to_path_buf()),
        init_bands: Some(FILE_BANDS.into()),
        init_missing_bands: missing,
        ..ModelConfig::default()
    };
    let bands: Vec<String> = bands.iter().map(|b| b.to_string()).collect();
    let span = ScheduleSpan { epochs: 1, niter_per_ep: 1 };
    let setup = TrainerSetup::new(&model, &TrainConfig::default(), &bands, 2, span)?;
    begin(setup, &AugmentConfig::default(), &Device::Cpu)
}

fn cls(trainer: &Trainer, teacher: bool, x: &Tensor) -> Tensor {
    let net = if teacher { trainer.teacher() } else { trainer.student() };
    net.backbone.forward(x).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Within 1e-5 of PyTorch.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_within(got, want, 1e-5, what);
}

fn assert_within(got: &Tensor, want: &Tensor, tolerance: f32, what: &str) {
    let diff = max_abs_diff(got, want);
    assert!(diff <= tolerance, "{what}: max abs diff {diff:e} > {tolerance:e}\ngot {got}\nwant {want}");
}

/// `x`'s channels (in FILE_BANDS order) rearranged into the order of `bands`.
fn in_band_order(x: &Tensor, bands: &[&str]) -> Tensor {
    let file: Vec<&str> = FILE_BANDS.split(',').collect();
    let channels: Vec<Tensor> = bands
        .iter()
        .map(|b| {
            let j = file.iter().position(|f| f == b).unwrap();
            x.i((.., j..j + 1)).unwrap()
        })
        .collect();
    Tensor::cat(&channels, 1).unwrap()
}

// PyTorch (make_pretrained.py): teacher.backbone(x), student.backbone(x) of the reference ViT with
// the checkpoint's weights; the 40 px input makes it resize the 4x4 position grid to 5x5.
#[test]
fn a_dino_training_checkpoint_gives_the_teacher_and_student_pytorch_cls_outputs() {
    let e = expected();
    let bands: Vec<&str> = FILE_BANDS.split(',').collect();
    let trainer = imported(&fixture("dino_checkpoint.pth"), &bands, MissingBands::Mean).unwrap();
    assert_close(&cls(&trainer, true, &e["x"]), &e["dino_teacher_cls"], "teacher");
    assert_close(&cls(&trainer, false, &e["x"]), &e["dino_student_cls"], "student");
    // The file's DINO head came along (same sizes as the preset).
    let v = trainer.teacher_params().get("head.last_layer.weight_v").unwrap().as_tensor().clone();
    assert_eq!(v.dims(), [64, 16]);
}

#[test]
fn timm_files_as_pth_and_safetensors_give_the_pytorch_cls_output_to_both_networks() {
    let e = expected();
    let bands: Vec<&str> = FILE_BANDS.split(',').collect();
    for file in ["timm_vit.pth", "timm_vit.safetensors"] {
        let trainer = imported(&fixture(file), &bands, MissingBands::Mean).unwrap();
        assert_close(&cls(&trainer, true, &e["x"]), &e["timm_cls"], file);
        assert_close(&cls(&trainer, false, &e["x"]), &e["timm_cls"], file);
    }
}

#[test]
fn a_permuted_band_list_equals_pytorch_on_the_permuted_input() {
    let e = expected();
    let ours = ["B08", "B04", "B02", "B03"];
    let trainer = imported(&fixture("timm_vit.safetensors"), &ours, MissingBands::Mean).unwrap();
    assert_close(&cls(&trainer, true, &in_band_order(&e["x"], &ours)), &e["timm_cls"], "permuted");
    // The unpermuted input no longer gives the same output: the mapping is by name.
    assert!(max_abs_diff(&cls(&trainer, true, &e["x"]), &e["timm_cls"]) > 1e-2);
}

#[test]
fn a_band_the_file_lacks_starts_from_zeros_or_from_the_mean_filter() {
    let e = expected();
    let x = &e["x"];
    let extra = (x.i((.., 0..1)).unwrap() * 3.0).unwrap().sin().unwrap();
    let with_extra = Tensor::cat(&[x, &extra], 1).unwrap();
    let ours = ["B02", "B03", "B04", "B08", "B11"];
    let zeros = imported(&fixture("timm_vit.pth"), &ours, MissingBands::Zeros).unwrap();
    assert_close(&cls(&zeros, true, &with_extra), &e["timm_cls"], "zero filter: B11 adds nothing");
    // The mean filter sees B11 as a quarter of it added to each of the file's four channels.
    let mean = imported(&fixture("timm_vit.pth"), &ours, MissingBands::Mean).unwrap();
    let four: Vec<&str> = FILE_BANDS.split(',').collect();
    let plain = imported(&fixture("timm_vit.pth"), &four, MissingBands::Mean).unwrap();
    let spread = x.broadcast_add(&(extra / 4.0).unwrap()).unwrap();
    // Two f32 computations of the same sum in different orders (5 filters vs 4 spread inputs).
    assert_within(&cls(&mean, true, &with_extra), &cls(&plain, true, &spread), 1e-4, "mean filter");
}

#[test]
fn an_architecture_mismatch_names_the_file_and_both_sizes() {
    let bands: Vec<&str> = FILE_BANDS.split(',').collect();
    let micro = util::root().join("models/vit-micro-p8.toml");
    let err = imported_with_preset(&fixture("timm_vit.pth"), &bands, MissingBands::Mean, &micro)
        .err()
        .expect("a 24-wide file cannot fill a 48-wide model");
    let msg = format!("{err:#}");
    assert!(msg.contains("timm_vit.pth") && msg.contains("embed_dim 24 vs 48"), "{msg}");
    assert!(msg.contains("vit-micro-p8"), "{msg}");
}

#[test]
fn an_unknown_key_layout_names_the_file_and_the_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf_vit.safetensors");
    let t = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensors = HashMap::from([
        ("vit.embeddings.cls_token".to_string(), t.clone()),
        ("vit.encoder.layer.0.attention.query.weight".to_string(), t),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = imported(&path, &["B02"], MissingBands::Mean).err().expect("not a DINO/timm layout");
    let msg = format!("{err:#}");
    assert!(msg.contains("hf_vit.safetensors") && msg.contains("unknown key layout"), "{msg}");
    assert!(msg.contains("`cls_token`") && msg.contains("vit.embeddings.cls_token"), "{msg}");
}

#[test]
fn init_bands_that_do_not_count_the_file_channels_are_an_error_naming_both() {
    let model = ModelConfig {
        preset: fixture("vit-fixture-p8.toml").display().to_string(),
        init: Some(fixture("timm_vit.pth")),
        init_bands: Some("rgb".into()),
        ..ModelConfig::default()
    };
    let bands = vec!["B04".to_string(), "B03".to_string(), "B02".to_string()];
    let setup =
        TrainerSetup::new(&model, &TrainConfig::default(), &bands, 2, ScheduleSpan::for_steps(1, 1, 1))
            .unwrap();
    let msg = format!("{:#}", begin(setup, &AugmentConfig::default(), &Device::Cpu).err().unwrap());
    assert!(
        msg.contains("timm_vit.pth") && msg.contains("4 input channels") && msg.contains("B04,B03,B02"),
        "{msg}"
    );
}

/// A /16 file becomes /8 through FlexiViT's PI-resize, its position grid resized as DINO does.
#[test]
fn a_patch16_file_imports_into_a_patch8_preset() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(fixture("timm_vit.safetensors"), &Device::Cpu).unwrap();
    let w16 = Tensor::randn(0f32, 0.1, (24, 4, 16, 16), &Device::Cpu).unwrap();
    tensors.insert("patch_embed.proj.weight".into(), w16.clone());
    let pos = tensors["pos_embed"].i((.., 0..5, ..)).unwrap().contiguous().unwrap(); // 1 + 2x2 grid
    tensors.insert("pos_embed".into(), pos);
    let path = dir.path().join("vit_p16.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let bands: Vec<&str> = FILE_BANDS.split(',').collect();
    let trainer = imported(&path, &bands, MissingBands::Mean).unwrap();
    let w8 = trainer.teacher_params().get("backbone.patch_embed.proj.weight").unwrap().as_tensor().clone();
    assert_eq!(w8.dims(), [24, 4, 8, 8]);
    let want = dinostream::model::pretrained::flexi::resize_kernels(
        &w16.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        16,
        8,
    )
    .unwrap();
    assert_eq!(w8.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    assert_eq!(trainer.teacher_params().get("backbone.pos_embed").unwrap().dims(), [1, 26, 24]);
}

#[test]
fn train_with_init_and_zero_steps_writes_the_import_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let preset = fixture("vit-fixture-p8.toml");
    let init = fixture("dino_checkpoint.pth");
    let config = "[tile]\nbands = [\"B02\", \"B03\", \"B04\", \"B08\"]\npatch_px = 32\nstride_px = 32\n\
                  [augment]\nglobal_px = 32\nlocal_px = 16\nlocal_crops = 2\nworkers = 1\n[train]\nbatch_size = 2\n";
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let data = util::data("bigearthnet-s2");
    let out = util::run_in(
        dir.path(),
        &[
            "--config",
            "config.toml",
            "train",
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "0",
            "--model",
            preset.to_str().unwrap(),
            "--init",
            init.to_str().unwrap(),
            "--init-bands",
            FILE_BANDS,
            "--checkpoint",
            "ckpt",
        ],
    );
    util::assert_ok(&out);
    let bytes = std::fs::read(dir.path().join("ckpt/model.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["init"], init.display().to_string());
    let ckpt = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let e = expected();
    let trainer = dinostream::dino::checkpoint::load(&dir.path().join("ckpt"), &Device::Cpu).unwrap();
    assert_close(&cls(&trainer, true, &e["x"]), &e["dino_teacher_cls"], "checkpointed teacher");
    assert!(ckpt.contains_key("teacher.backbone.cls_token"));
}

#[test]
fn inspect_checkpoint_shows_the_layout_architecture_and_bands() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        util::run_in(dir.path(), &["inspect-checkpoint", fixture("dino_checkpoint.pth").to_str().unwrap()]);
    util::assert_ok(&out);
    let text = util::stdout(&out);
    assert!(
        text.contains("PyTorch zip pickle") && text.contains("student") && text.contains("teacher"),
        "{text}"
    );
    assert!(text.contains("embed_dim 24, depth 2") && text.contains("patch 8, 4 input channels"), "{text}");
    assert!(text.contains("--init-bands"), "{text}");
    let out =
        util::run_in(dir.path(), &["inspect-checkpoint", fixture("timm_vit.safetensors").to_str().unwrap()]);
    util::assert_ok(&out);
    let text = util::stdout(&out);
    assert!(text.contains("safetensors") && text.contains("head.bias, head.weight"), "{text}");
}

#[test]
fn a_patch16_preset_refuses_crops_that_16_does_not_divide() {
    let model = ModelConfig { preset: "vit-small-p16".into(), ..ModelConfig::default() };
    let bands = vec!["B04".to_string()];
    let setup =
        TrainerSetup::new(&model, &TrainConfig::default(), &bands, 2, ScheduleSpan::for_steps(1, 1, 1))
            .unwrap();
    let msg = format!("{:#}", begin(setup, &AugmentConfig::default(), &Device::Cpu).err().unwrap());
    assert!(msg.contains("augment.global_px = 120") && msg.contains("augment.local_px = 56"), "{msg}");
    assert!(msg.contains("global_px = 112"), "{msg}");
}
