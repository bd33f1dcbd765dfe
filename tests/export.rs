//! ONNX export checked against the PyTorch reference without candle: the golden ViT
//! (`tests/golden/vit_weights.safetensors`, made by `shared/reference/dino_ref.py golden`) exported
//! by `export::graph`, run in ONNX Runtime through `infer::runtime`, must reproduce `cls120` from
//! `vit_io.safetensors` within 1e-4. ONNX Runtime missing = the test says so and passes (CI installs
//! it with scripts/setup-python.sh).

use std::path::{Path, PathBuf};
use std::process::Command;

use dinostream::export::publish::{self, Probe, PublishError};
use dinostream::export::{ExportSpec, NamedTensors, export_bytes};
use dinostream::infer::embed::{self, resize_bilinear};
use dinostream::infer::runtime::{LibrarySearch, Runtime, RuntimeError};
use dinostream::infer::{InputContract, PATCH_TOKENS_OUTPUT};

use crate::util::root;

const BANDS: [&str; 10] = dinostream::config::SEED_BANDS;

fn golden(name: &str) -> NamedTensors {
    let bytes = std::fs::read(root().join("tests/golden").join(name)).expect("golden file is committed");
    NamedTensors::from_safetensors(&bytes, "").expect("golden file is valid safetensors")
}

/// `x120 [2,10,120,120]` and `cls120 [2,48]`.
fn golden_io() -> (Vec<f32>, Vec<f32>) {
    let io = golden("vit_io.safetensors");
    (
        io.get("x120", &[2, 10, 120, 120]).unwrap().data.clone(),
        io.get("cls120", &[2, 48]).unwrap().data.clone(),
    )
}

/// The golden config (index.json) with the seed's bands.
fn spec(contract: InputContract, opset: i64) -> ExportSpec {
    let bands: Vec<String> = BANDS.iter().map(|b| b.to_string()).collect();
    let (band_mean, band_std) = ExportSpec::band_statistics(&bands).unwrap();
    ExportSpec {
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        patch_size: 8,
        img_size: 120,
        in_chans: 10,
        layernorm_eps: 1e-6,
        bands,
        band_mean,
        band_std,
        input_contract: contract,
        preset: "golden".into(),
        step: 7,
        patch_tokens: false,
        opset,
        created: Some("2026-11-27T00:00:00Z".into()),
    }
}

/// The shared runtime, or `None` (with a message) where ONNX Runtime is not installed.
fn runtime() -> Option<Runtime> {
    match Runtime::get(&LibrarySearch::standard(None)) {
        Ok(rt) => Some(rt),
        Err(e @ (RuntimeError::NotFound { .. } | RuntimeError::BadPath { .. })) => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn write_model(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Rows `rows` of `[n, per_row]` data, in that order (repeats allowed).
fn take_rows(data: &[f32], per_row: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| data[r * per_row..(r + 1) * per_row].iter().copied()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Run the export on rows `rows` of x120 (after `to_input`) and compare with the same rows of cls120.
fn check_rows(rt: &Runtime, model: &Path, rows: &[usize], to_input: impl Fn(&mut [f32])) -> f32 {
    let (x, cls) = golden_io();
    let per_image = 10 * 120 * 120;
    let mut pixels = take_rows(&x, per_image, rows);
    to_input(&mut pixels);
    let mut session = rt.open(model, false).unwrap();
    let out = session.run(&pixels, [rows.len(), 10, 120, 120]).unwrap();
    let diff = max_abs_diff(&out.cls, &take_rows(&cls, 48, rows));
    eprintln!("{}: batch {}: max abs diff {diff:.3e}", model.display(), rows.len());
    diff
}

#[test]
fn normalized_export_reproduces_the_pytorch_cls_at_batch_1_2_and_7() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bytes =
        export_bytes(&spec(InputContract::Normalized, 17), &golden("vit_weights.safetensors")).unwrap();
    let model = write_model(dir.path(), "m.onnx", &bytes);
    for rows in [&[0, 1][..], &[1], &[0, 1, 1, 0, 0, 1, 0]] {
        assert!(check_rows(&rt, &model, rows, |_| ()) <= 1e-4);
    }
}

#[test]
fn reflectance_export_normalises_inside_the_graph() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(InputContract::Reflectance, 17);
    let bytes = export_bytes(&spec, &golden("vit_weights.safetensors")).unwrap();
    let model = write_model(dir.path(), "m.onnx", &bytes);
    let to_reflectance = |x: &mut [f32]| {
        for (c, plane) in x.chunks_mut(120 * 120).enumerate() {
            let (mean, std) = (spec.band_mean[c % 10], spec.band_std[c % 10]);
            plane.iter_mut().for_each(|v| *v = *v * std + mean);
        }
    };
    assert!(check_rows(&rt, &model, &[0, 1], to_reflectance) <= 1e-4);
    // Fed normalised values instead, the same graph must be far off: the normalisation is really there.
    assert!(check_rows(&rt, &model, &[0, 1], |_| ()) > 1e-2);
}

#[test]
fn opset_20_export_with_the_gelu_op_and_patch_tokens_matches_too() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(InputContract::Normalized, 20);
    spec.patch_tokens = true;
    let bytes = export_bytes(&spec, &golden("vit_weights.safetensors")).unwrap();
    let model = write_model(dir.path(), "m.onnx", &bytes);
    assert!(check_rows(&rt, &model, &[0, 1], |_| ()) <= 1e-4);
    let (x, _) = golden_io();
    let out = rt.open(&model, false).unwrap().run(&x, [2, 10, 120, 120]).unwrap();
    let tokens = out.patch_tokens.unwrap_or_else(|| panic!("no {PATCH_TOKENS_OUTPUT} output"));
    assert_eq!(tokens.len(), 2 * 225 * 48);
}

#[test]
fn metadata_is_read_back_through_onnx_runtime() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(InputContract::Reflectance, 17);
    let model =
        write_model(dir.path(), "m.onnx", &export_bytes(&spec, &golden("vit_weights.safetensors")).unwrap());
    let meta = rt.open(&model, false).unwrap().metadata().unwrap();
    assert_eq!(meta, spec.metadata());
    assert_eq!(meta.bands[6], "B11");
}

#[test]
fn a_wrong_weight_shape_names_the_tensor() {
    let mut weights = golden("vit_weights.safetensors");
    weights.insert("blocks.1.attn.qkv.weight", vec![48, 48], vec![0.0; 48 * 48]);
    let err = format!("{:#}", export_bytes(&spec(InputContract::Normalized, 17), &weights).unwrap_err());
    assert!(err.contains("blocks.1.attn.qkv.weight") && err.contains("[144, 48]"), "{err}");
}

/// A Python with `onnx` importable (`$DINOSTREAM_VENV`, as scripts/setup-python.sh names it, then
/// ./.venv, then python3), or `None`.
fn python_with_onnx() -> Option<PathBuf> {
    let venv = std::env::var_os("DINOSTREAM_VENV").map_or_else(|| root().join(".venv"), PathBuf::from);
    let candidates = [venv.join("bin/python"), PathBuf::from("python3")];
    candidates
        .into_iter()
        .find(|py| Command::new(py).args(["-c", "import onnx"]).output().is_ok_and(|o| o.status.success()))
}

#[test]
fn exports_pass_the_full_onnx_checker() {
    let Some(python) = python_with_onnx() else {
        eprintln!("skipping: Python `onnx` not installed (scripts/setup-python.sh installs it into .venv)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let weights = golden("vit_weights.safetensors");
    for (contract, opset, tokens) in
        [(InputContract::Reflectance, 17, false), (InputContract::Normalized, 20, true)]
    {
        let mut spec = spec(contract, opset);
        spec.patch_tokens = tokens;
        let model =
            write_model(dir.path(), &format!("m{opset}.onnx"), &export_bytes(&spec, &weights).unwrap());
        let script = "import onnx, sys; onnx.checker.check_model(sys.argv[1], full_check=True)";
        let out = Command::new(&python).args(["-c", script]).arg(&model).output().unwrap();
        assert!(out.status.success(), "opset {opset}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn probe(spec: &ExportSpec) -> Probe {
    let (x, cls) = golden_io();
    assert_eq!(spec.input_contract, InputContract::Normalized);
    Probe { pixels: x, shape: [2, 10, 120, 120], expected_cls: cls }
}

#[test]
fn publish_replaces_latest_only_after_the_check_passes() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let weights = golden("vit_weights.safetensors");
    let mut spec = spec(InputContract::Normalized, 17);
    let good = export_bytes(&spec, &weights).unwrap();
    let first = publish::publish(&rt, dir.path(), 7, &good, &spec.metadata(), &probe(&spec), 2).unwrap();
    assert!(first.check.passed && first.check.max_abs_diff <= 1e-4, "{:?}", first.check);
    assert_eq!(std::fs::read(dir.path().join("latest.onnx")).unwrap(), good);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("latest.json")).unwrap()).unwrap();
    assert_eq!(json["metadata"]["training_step"], 7);
    assert_eq!(json["check"]["passed"], true);

    // A reference that disagrees by 1e-3 forces the check to fail: step 8 must not be published.
    spec.step = 8;
    let next = export_bytes(&spec, &weights).unwrap();
    let mut bad_probe = probe(&spec);
    bad_probe.expected_cls[5] += 1e-3;
    let err = publish::publish(&rt, dir.path(), 8, &next, &spec.metadata(), &bad_probe, 2).unwrap_err();
    assert!(matches!(err, PublishError::Rejected { .. }), "{err}");
    assert!(err.to_string().contains("rejected"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("latest.onnx")).unwrap(), good);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["dinostream-step7.onnx", "latest.json", "latest.onnx"]);
}

#[test]
fn publish_keeps_the_last_k_exports() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let weights = golden("vit_weights.safetensors");
    let mut spec = spec(InputContract::Normalized, 17);
    for step in [1, 2, 3] {
        spec.step = step;
        let bytes = export_bytes(&spec, &weights).unwrap();
        publish::publish(&rt, dir.path(), step, &bytes, &spec.metadata(), &probe(&spec), 2).unwrap();
    }
    assert!(!dir.path().join("dinostream-step1.onnx").exists());
    assert!(
        dir.path().join("dinostream-step2.onnx").exists()
            && dir.path().join("dinostream-step3.onnx").exists()
    );
    let meta = rt.open(&dir.path().join("latest.onnx"), false).unwrap().metadata().unwrap();
    assert_eq!(meta.training_step, 3);
}

/// Golden image `row` as a reflectance [`Patch`] holding the model's bands in another order plus
/// two extra bands, as an ingested EuroSAT tile would.
fn golden_patch(spec: &ExportSpec, row: usize) -> dinostream::tile::Patch {
    let (x, _) = golden_io();
    let plane = 120 * 120;
    let file_order = ["B01", "B12", "B11", "B10", "B8A", "B08", "B07", "B06", "B05", "B04", "B03", "B02"];
    let mut data = Vec::new();
    for band in file_order {
        match spec.bands.iter().position(|b| b == band) {
            Some(c) => {
                let normalized = &x[(row * 10 + c) * plane..(row * 10 + c + 1) * plane];
                data.extend(normalized.iter().map(|v| v * spec.band_std[c] + spec.band_mean[c]));
            }
            None => data.extend(std::iter::repeat_n(0.5, plane)),
        }
    }
    dinostream::tile::Patch {
        data,
        bands: file_order.iter().map(|b| b.to_string()).collect(),
        height: 120,
        width: 120,
        source: format!("golden{row}.tif").into(),
        window: dinostream::tile::Window { x: 0, y: 0, width: 120, height: 120 },
        nodata_fraction: 0.0,
    }
}

#[test]
fn embed_picks_bands_by_name_and_reproduces_the_reference() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(InputContract::Reflectance, 17);
    let model =
        write_model(dir.path(), "m.onnx", &export_bytes(&spec, &golden("vit_weights.safetensors")).unwrap());
    let mut session = rt.open(&model, false).unwrap();
    let meta = session.metadata().unwrap();
    let patches = [golden_patch(&spec, 0), golden_patch(&spec, 1)];
    let mut progress = Vec::new();
    let out = embed::embed_patches(&mut session, &meta, &patches, 1, |done| progress.push(done)).unwrap();
    assert_eq!(progress, [1, 2]);
    let (_, cls) = golden_io();
    assert!(max_abs_diff(&out.values, &cls) <= 1e-4);
    assert_eq!(out.index[1].0, PathBuf::from("golden1.tif"));
}

#[test]
fn embed_resizes_small_tiles_and_cuts_large_ones() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(InputContract::Normalized, 17);
    let model =
        write_model(dir.path(), "m.onnx", &export_bytes(&spec, &golden("vit_weights.safetensors")).unwrap());
    let mut session = rt.open(&model, false).unwrap();
    let meta = session.metadata().unwrap();
    let mut small = golden_patch(&spec, 0);
    let bands = small.bands.len();
    small.data = (0..bands).flat_map(|c| resize_bilinear(small.plane(c), 120, 120, 64, 64)).collect();
    (small.height, small.width) = (64, 64);
    let mut large = golden_patch(&spec, 1);
    large.data = (0..bands).flat_map(|c| resize_bilinear(large.plane(c), 120, 120, 250, 130)).collect();
    (large.height, large.width) = (250, 130);
    let out = embed::embed_patches(&mut session, &meta, &[small, large], 4, |_| ()).unwrap();
    assert_eq!(out.rows(), 1 + 3 * 2);
    assert_eq!(out.index[6].1, dinostream::tile::Window { x: 10, y: 130, width: 120, height: 120 });
    assert!(out.values.iter().all(|v| v.is_finite()));
}

/// A checkpoint folder as training writes it: golden weights under `teacher.backbone.` with the
/// preset, band list and step in the safetensors metadata.
fn golden_checkpoint(dir: &Path) -> PathBuf {
    let bytes = std::fs::read(root().join("tests/golden/vit_weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<_> =
        st.tensors().into_iter().map(|(name, view)| (format!("teacher.backbone.{name}"), view)).collect();
    let preset = "name = \"golden\"\npatch_size = 8\nembed_dim = 48\ndepth = 2\nnum_heads = 3\nmlp_ratio = 4.0\nlayernorm_eps = 1e-6\nimg_size = 120\n";
    let meta = [("preset", preset.to_string()), ("bands", BANDS.join(",")), ("step", "1234".to_string())];
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let meta = meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    safetensors::serialize_to_file(tensors, Some(meta), &ckpt.join("model.safetensors")).unwrap();
    ckpt
}

#[test]
fn export_command_turns_a_checkpoint_into_a_matching_model() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = golden_checkpoint(dir.path());
    let out = crate::util::run_in(
        dir.path(),
        &[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            "m.onnx",
            "--input-contract",
            "normalized",
        ],
    );
    crate::util::assert_ok(&out);
    let model = dir.path().join("m.onnx");
    assert_eq!(rt.open(&model, false).unwrap().metadata().unwrap().training_step, 1234);
    assert!(check_rows(&rt, &model, &[0, 1], |_| ()) <= 1e-4);
}

#[test]
fn export_command_refuses_an_image_size_off_the_patch_grid() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = golden_checkpoint(dir.path());
    let args = ["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", "m.onnx", "--image-size", "60"];
    let out = crate::util::run_in(dir.path(), &args);
    assert!(!out.status.success());
    let err = crate::util::stderr(&out);
    assert!(err.contains("--image-size 60") && err.contains("multiple of the patch size 8"), "{err}");
    assert!(!dir.path().join("m.onnx").exists());
}

#[test]
fn embed_without_the_onnx_runtime_library_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "embed",
        "--model",
        "m.onnx",
        "--input",
        "x.tif",
        "--out",
        "e.npy",
        "--onnxruntime",
        "/no/such/libonnxruntime.so.1.30.0",
    ];
    let out = Command::new(crate::util::bin())
        .args(args)
        .current_dir(dir.path())
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    let stderr = crate::util::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/no/such/libonnxruntime.so.1.30.0")
            && stderr.contains("pip install onnxruntime==1.30.0"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_reader_polling_latest_only_ever_sees_complete_checked_files() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let weights = golden("vit_weights.safetensors");
    let mut spec = spec(InputContract::Normalized, 17);
    let versions: Vec<Vec<u8>> = (1..=4)
        .map(|step| {
            spec.step = step;
            export_bytes(&spec, &weights).unwrap()
        })
        .collect();
    let latest = dir.path().join("latest.onnx");
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut seen = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(bytes) = std::fs::read(&latest) {
                    assert!(versions.contains(&bytes), "partial latest.onnx of {} bytes", bytes.len());
                    seen += 1;
                }
            }
            seen
        });
        for (i, bytes) in versions.iter().enumerate() {
            spec.step = i as u64 + 1;
            publish::publish(&rt, dir.path(), spec.step, bytes, &spec.metadata(), &probe(&spec), 2).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    assert_eq!(std::fs::read(&latest).unwrap(), versions[3]);
}

#[test]
fn a_requested_cuda_provider_that_cannot_run_is_an_error_not_a_cpu_fallback() {
    let Some(rt) = runtime() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(InputContract::Normalized, 17);
    let model =
        write_model(dir.path(), "m.onnx", &export_bytes(&spec, &golden("vit_weights.safetensors")).unwrap());
    match rt.open(&model, true) {
        Ok(mut session) => {
            eprintln!("CUDA execution provider available: checking it against the reference instead");
            let (x, cls) = golden_io();
            assert!(max_abs_diff(&session.run(&x, [2, 10, 120, 120]).unwrap().cls, &cls) <= 1e-4);
        }
        Err(e) => assert!(matches!(e, RuntimeError::Cuda { .. }), "{e}"),
    }
}
