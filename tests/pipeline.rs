//! The commands chained as a user runs them on the bundled real tiles: preview, train a micro model,
//! load its checkpoint back, export it to ONNX, embed tiles with it, evaluate on a EuroSAT split.

use std::path::{Path, PathBuf};

use dinostream::infer::runtime::LibrarySearch;

use crate::util::*;

/// `train` of the micro preset, batch 2, on all bundled tiles into `dir/ck`, with `extra` flags.
fn train_micro_with(dir: &Path, steps: &str, extra: &[&str]) -> std::process::Output {
    let data = data("");
    let mut args = vec!["train", "--data", data.to_str().unwrap(), "--layout", "eurosat13", "--steps", steps];
    args.extend(["--model", "vit-micro-p8", "--batch-size", "2", "--checkpoint", "ck"]);
    args.extend(extra);
    run_in(dir, &args)
}

/// Train the micro preset for 2 steps into `dir/ck`, metrics in `dir/metrics.jsonl`.
fn train_micro(dir: &Path) -> PathBuf {
    let out = train_micro_with(dir, "2", &["--metrics", "metrics.jsonl"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("step 2: loss"), "{}", stdout(&out));
    dir.join("ck")
}

/// The lines of a `--metrics` file.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn preview_writes_the_view_grid_png() {
    let dir = tempfile::tempdir().unwrap();
    let tile = data("bigearthnet-s2/S2A_MSIL2A_20170617T113321_4_55");
    let out = run_in(dir.path(), &["preview", "--input", tile.to_str().unwrap(), "--out", "v.png"]);
    assert_ok(&out);
    let png = std::fs::read(dir.path().join("v.png")).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let info = decoder.read_info().unwrap().info().clone();
    assert!(info.width > info.height && info.height > 2 * 120, "{}x{}", info.width, info.height);
}

#[test]
fn trained_checkpoint_loads_back_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let ck = train_micro(dir.path());
    let trainer = dinostream::dino::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    assert_eq!(trainer.state().step, 2);
    assert_eq!(trainer.setup().bands.len(), 10);
    let lines = metrics(dir.path());
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2]);
    // The loss is read every `train.log_every_steps` steps and after the last one.
    assert!(lines[0].get("loss").is_none(), "{}", lines[0]);
    assert!(lines[1]["loss"].as_f64().unwrap().is_finite(), "{}", lines[1]);
    for line in &lines {
        assert!(line["samples_per_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["data_wait_s"].as_f64().unwrap() >= 0.0, "{line}");
        // Collapse indicators are logged every `train.log_every_steps` (default 10) steps only.
        assert!(line.get("teacher_entropy_ratio").is_none(), "{line}");
    }
}

#[test]
fn zero_steps_write_the_initial_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = train_micro_with(dir.path(), "0", &[]);
    assert_ok(&out);
    assert!(stdout(&out).contains("step 0 (initial weights)"), "{}", stdout(&out));
    let trainer =
        dinostream::dino::checkpoint::load(&dir.path().join("ck"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(trainer.state().step, 0);
    let (s, t) = (trainer.student_params(), trainer.teacher_params());
    let norm = |p: &dinostream::model::params::Params| {
        let w = p.get("backbone.blocks.0.attn.qkv.weight").unwrap().as_tensor();
        w.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert!(norm(s) > 0.0 && norm(s) == norm(t), "teacher = student = the seeded init");
}

#[test]
fn a_time_limit_ends_the_run_early_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = train_micro_with(dir.path(), "1000", &["--time-limit", "0s", "--metrics", "metrics.jsonl"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("step 1: loss"), "{}", stdout(&out));
    let trainer =
        dinostream::dino::checkpoint::load(&dir.path().join("ck"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(trainer.state().step, 1);
    assert_eq!(metrics(dir.path()).len(), 1);
}

#[test]
fn train_on_a_folder_without_tiles_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let out = run_in(dir.path(), &["train", "--data", "empty", "--steps", "1", "--model", "vit-micro-p8"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no usable patches"), "{}", stderr(&out));
}

#[test]
fn exported_model_embeds_and_evaluates_the_bundled_tiles() {
    let Some(ort) = onnxruntime_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ck = train_micro(dir.path());
    let ort = ort.to_str().unwrap();
    assert_ok(&run_in(dir.path(), &["export", "--checkpoint", ck.to_str().unwrap(), "--out", "m.onnx"]));

    let eurosat = data("eurosat-ms");
    let ben = data("bigearthnet-s2");
    let args =
        ["embed", "--model", "m.onnx", "--out", "e.npy", "--layout", "eurosat13", "--onnxruntime", ort];
    let out = run_in(
        dir.path(),
        &[&args[..], &["--input", eurosat.to_str().unwrap(), ben.to_str().unwrap()]].concat(),
    );
    assert_ok(&out);
    let npy = std::fs::read(dir.path().join("e.npy")).unwrap();
    assert!(npy.starts_with(b"\x93NUMPY"));
    let index = std::fs::read_to_string(dir.path().join("e.csv")).unwrap();
    assert_eq!(index.lines().count(), 1 + 4 + 2, "{index}"); // header, 4 EuroSAT tiles, 2 BigEarthNet patches

    let eurosat_dir = eurosat.to_str().unwrap();
    let eval = |bank: &str, query: &str| {
        let args =
            ["eval", "--model", "m.onnx", "--bank", eurosat_dir, "--labels", bank, "--query", eurosat_dir];
        let rest = ["--query-labels", query, "--layout", "eurosat13", "--onnxruntime", ort];
        run_in(dir.path(), &[&args[..], &rest].concat())
    };
    let labels = eurosat.join("labels.csv");
    let labels = labels.to_str().unwrap();
    let out = eval(labels, labels);
    assert_ok(&out);
    // The query is the bank itself, so k-NN finds each tile at similarity 1.
    let overall = stdout(&out).lines().find(|l| l.starts_with("overall")).map(str::to_owned);
    assert!(overall.as_deref().is_some_and(|l| l.contains("100.0%")), "{}", stdout(&out));

    // A split: the first two tiles are the bank, the other two the query.
    let text = std::fs::read_to_string(eurosat.join("labels.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(dir.path().join("bank.csv"), [lines[0], lines[1], lines[2]].join("\n")).unwrap();
    std::fs::write(dir.path().join("query.csv"), [lines[0], lines[3], lines[4]].join("\n")).unwrap();
    let out = eval("bank.csv", "query.csv");
    assert_ok(&out);
    assert!(stdout(&out).contains("bank 2 files, query 2 files"), "{}", stdout(&out));
}

#[test]
fn a_trained_teacher_is_published_only_after_onnx_runtime_reproduces_it() {
    if onnxruntime_or_skip().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ck = train_micro(dir.path());
    let trainer = dinostream::dino::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    let cfg = dinostream::config::Config::default();
    let mut probe = Vec::new();
    for input in dinostream::tile::list_inputs(&data("bigearthnet-s2")).unwrap() {
        probe.extend(
            dinostream::tile::read_patches(&input, &cfg.tile).unwrap().into_iter().map(std::sync::Arc::new),
        );
    }
    let exports = dir.path().join("exports");
    let published =
        dinostream::service::publish::publish_checkpoint(&cfg.export, &exports, &ck, &trainer, &probe)
            .unwrap();
    assert!(published.check.passed && published.check.batch == 2, "{:?}", published.check);
    assert!(published.check.max_abs_diff <= 1e-4 && published.check.min_cosine >= 0.99999);
    assert!(exports.join("latest.onnx").is_file() && exports.join("dinostream-step2.onnx").is_file());
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exports.join("latest.json")).unwrap()).unwrap();
    assert_eq!(latest["metadata"]["training_step"], 2, "{latest}");
}

#[test]
fn an_export_at_56_px_matches_the_candle_teacher_at_56_px() {
    let Some(ort) = onnxruntime_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ck = train_micro(dir.path());
    let args = ["--out", "m56.onnx", "--image-size", "56", "--input-contract", "normalized"];
    assert_ok(&run_in(dir.path(), &[&["export", "--checkpoint", ck.to_str().unwrap()][..], &args].concat()));

    let shape = [2, 10, 56, 56];
    let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| ((i as f32) * 0.37).sin()).collect();
    let trainer = dinostream::dino::checkpoint::load(&ck, &candle_core::Device::Cpu).unwrap();
    let t = candle_core::Tensor::from_slice(&x, shape.to_vec(), &candle_core::Device::Cpu).unwrap();
    let want = trainer
        .teacher()
        .backbone
        .forward_t(&t, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let runtime = dinostream::infer::runtime::Runtime::get(&LibrarySearch::standard(Some(ort))).unwrap();
    let got = runtime.open(&dir.path().join("m56.onnx"), false).unwrap().run(&x, shape).unwrap().cls;
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert_eq!(got.len(), want.len());
    assert!(diff <= 1e-4, "max abs diff {diff}");
}
