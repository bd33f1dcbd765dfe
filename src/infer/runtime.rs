//! ONNX Runtime through `ort` with `load-dynamic`: find `libonnxruntime`, open a model, run it.
//!
//! The library is looked up in order: `ORT_DYLIB_PATH`, a path from the config, the Python
//! `onnxruntime` wheel in `./.venv`, `$VIRTUAL_ENV` or `/opt/torch/.venv`, then whatever
//! `python3 -c 'import onnxruntime'` finds. A missing library is a [`RuntimeError::NotFound`] that
//! lists every place tried and says how to install it; nothing here panics on a missing library
//! (ort itself would, if asked to open a session before it is initialised).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor as OrtTensor;

use super::{CLS_OUTPUT, INPUT_NAME, ModelMetadata, PATCH_TOKENS_OUTPUT};

/// The install hint every "library missing" message carries.
const INSTALL_HINT: &str = "install it with `pip install onnxruntime==1.30.0` (scripts/setup-python.sh puts it in \
     ./.venv) or set ORT_DYLIB_PATH to the libonnxruntime.so.1.* file";

/// Why ONNX Runtime could not be used. Callers branch on these (skip a test, fail a publish).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// No library anywhere we looked.
    #[error("ONNX Runtime library not found (looked in: {}); {INSTALL_HINT}", looked.join(", "))]
    NotFound {
        /// Every candidate path or lookup, in order.
        looked: Vec<String>,
    },
    /// An explicitly configured path that is not a file.
    #[error("{}: set by {setting} but no such file; {INSTALL_HINT}", path.display())]
    BadPath {
        /// `ORT_DYLIB_PATH` or the config key.
        setting: String,
        /// The configured path.
        path: PathBuf,
    },
    /// The library exists but would not load (wrong version, wrong architecture).
    #[error("{}: cannot load ONNX Runtime: {reason}", path.display())]
    Load {
        /// The library file.
        path: PathBuf,
        /// What ort or the loader said.
        reason: String,
    },
    /// ONNX Runtime refused the model file.
    #[error("{}: ONNX Runtime cannot open the model: {reason}", path.display())]
    Model {
        /// The model file.
        path: PathBuf,
        /// What ONNX Runtime said.
        reason: String,
    },
    /// CUDA was requested and could not be used (no silent CPU fallback).
    #[error("{}: the CUDA execution provider was requested but cannot be used: {reason}; run without --cuda or install onnxruntime-gpu", path.display())]
    Cuda {
        /// The model file.
        path: PathBuf,
        /// What ONNX Runtime said.
        reason: String,
    },
    /// A run failed (bad input shape, out of memory).
    #[error("{}: inference failed: {reason}", path.display())]
    Run {
        /// The model file.
        path: PathBuf,
        /// What ONNX Runtime said.
        reason: String,
    },
}

/// Where to look for `libonnxruntime`.
#[derive(Debug, Clone, Default)]
pub struct LibrarySearch {
    /// `ORT_DYLIB_PATH`, when set.
    pub env_path: Option<PathBuf>,
    /// A path from the configuration, when set.
    pub config_path: Option<PathBuf>,
    /// Virtual environments whose `lib/python3*/site-packages/onnxruntime` may hold the wheel.
    pub venvs: Vec<PathBuf>,
    /// Python interpreters to ask where `onnxruntime` is installed.
    pub pythons: Vec<PathBuf>,
}

impl LibrarySearch {
    /// The standard search: `ORT_DYLIB_PATH`, `config_path`, `./.venv`, `$VIRTUAL_ENV`,
    /// `/opt/torch/.venv`, then `python3`.
    pub fn standard(config_path: Option<PathBuf>) -> Self {
        let env_path = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(PathBuf::from);
        let mut venvs = vec![PathBuf::from(".venv")];
        venvs.extend(std::env::var_os("VIRTUAL_ENV").map(PathBuf::from));
        venvs.push(PathBuf::from("/opt/torch/.venv"));
        let mut pythons: Vec<PathBuf> =
            venvs.iter().map(|v| v.join("bin/python")).filter(|p| p.exists()).collect();
        pythons.push(PathBuf::from("python3"));
        LibrarySearch { env_path, config_path, venvs, pythons }
    }

    /// The library file, or a typed error listing where it looked.
    pub fn find(&self) -> Result<PathBuf, RuntimeError> {
        for (setting, path) in
            [("ORT_DYLIB_PATH", &self.env_path), ("the configured ONNX Runtime path", &self.config_path)]
        {
            if let Some(path) = path {
                return if path.is_file() {
                    Ok(path.clone())
                } else {
                    Err(RuntimeError::BadPath { setting: setting.into(), path: path.clone() })
                };
            }
        }
        let mut looked = Vec::new();
        for venv in &self.venvs {
            looked.push(format!("{}/lib/python3*/site-packages/onnxruntime/capi", venv.display()));
            if let Some(lib) = site_packages(venv).iter().find_map(|sp| library_in(&sp.join("onnxruntime"))) {
                return Ok(lib);
            }
        }
        for python in &self.pythons {
            looked.push(format!("`{} -c 'import onnxruntime'`", python.display()));
            if let Some(lib) = python_package_dir(python).and_then(|dir| library_in(&dir)) {
                return Ok(lib);
            }
        }
        Err(RuntimeError::NotFound { looked })
    }
}

/// `venv/lib/python3*/site-packages` folders.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .collect()
}

/// The `onnxruntime` package folder as `python` reports it.
fn python_package_dir(python: &Path) -> Option<PathBuf> {
    let out = Command::new(python)
        .args(["-c", "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))"])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !dir.trim().is_empty()).then(|| PathBuf::from(dir.trim()))
}

/// `package/capi/libonnxruntime.so.1.*` (or the macOS/Windows names), the newest by name.
fn library_in(package: &Path) -> Option<PathBuf> {
    let capi = package.join("capi");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("libonnxruntime.so.")
                || (name.starts_with("libonnxruntime.") && name.ends_with(".dylib"))
                || name == "onnxruntime.dll"
        })
        .collect();
    libs.sort();
    libs.pop()
}

/// The loaded library and the process's one ONNX Runtime environment.
#[derive(Clone)]
pub struct Runtime {
    env: Environment,
    library: PathBuf,
}

/// ort allows one environment per process and loads the library once: every caller shares this.
static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

impl Runtime {
    /// Load the library found by `search` (once per process) and return the shared runtime.
    pub fn get(search: &LibrarySearch) -> Result<Runtime, RuntimeError> {
        let mut slot = RUNTIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(rt) = slot.as_ref() {
            return Ok(rt.clone());
        }
        let library = search.find()?;
        let library = std::fs::canonicalize(&library).unwrap_or(library);
        let load_error = |reason: String| RuntimeError::Load { path: library.clone(), reason };
        let builder = ort::init_from(&library).map_err(|e| load_error(e.to_string()))?;
        let env = builder.with_name("dinostream").build().map_err(|e| load_error(e.to_string()))?;
        log::debug!("ONNX Runtime loaded from {}", library.display());
        let rt = Runtime { env, library };
        *slot = Some(rt.clone());
        Ok(rt)
    }

    /// The library file in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Open `path` on the CPU, or with the CUDA execution provider (an error if it cannot be used).
    pub fn open(&self, path: &Path, cuda: bool) -> Result<OnnxModel, RuntimeError> {
        let model_error = |e: &dyn std::fmt::Display| RuntimeError::Model {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut builder = Session::builder(&self.env).map_err(|e| model_error(&e))?;
        if cuda {
            let ep = ort::ep::CUDA::default().build().error_on_failure();
            builder = builder
                .with_execution_providers([ep])
                .map_err(|e| RuntimeError::Cuda { path: path.to_path_buf(), reason: e.to_string() })?;
        }
        let session = builder.commit_from_file(path).map_err(|e| model_error(&e))?;
        let props = custom_metadata(&session).map_err(|e| model_error(&e))?;
        Ok(OnnxModel { session, path: path.to_path_buf(), props })
    }
}

/// All `metadata_props` of an open session.
fn custom_metadata(session: &Session) -> ort::Result<BTreeMap<String, String>> {
    let meta = session.metadata()?;
    let keys = meta.custom_keys()?;
    Ok(keys.into_iter().filter_map(|k| meta.custom(&k).map(|v| (k, v))).collect())
}

/// What one run returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// `[batch, dim]` cls embeddings, row-major.
    pub cls: Vec<f32>,
    /// Embedding length.
    pub dim: usize,
    /// `[batch, tokens, dim]` patch tokens when the model has that output.
    pub patch_tokens: Option<Vec<f32>>,
}

/// An open model.
pub struct OnnxModel {
    session: Session,
    path: PathBuf,
    props: BTreeMap<String, String>,
}

impl OnnxModel {
    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raw `metadata_props`.
    pub fn props(&self) -> &BTreeMap<String, String> {
        &self.props
    }

    /// The dinostream metadata, or an error naming the missing key (a foreign model).
    pub fn metadata(&self) -> Result<ModelMetadata, RuntimeError> {
        ModelMetadata::from_props(&self.props)
            .map_err(|reason| RuntimeError::Model { path: self.path.clone(), reason })
    }

    /// Run `[n, c, h, w]` f32 `pixels`.
    pub fn run(&mut self, pixels: &[f32], shape: [usize; 4]) -> Result<Outputs, RuntimeError> {
        let path = self.path.clone();
        let run_error =
            |e: &dyn std::fmt::Display| RuntimeError::Run { path: path.clone(), reason: e.to_string() };
        let has_tokens = self.session.outputs().iter().any(|o| o.name() == PATCH_TOKENS_OUTPUT);
        let input = OrtTensor::from_array((shape, pixels.to_vec())).map_err(|e| run_error(&e))?;
        let outputs = self.session.run(ort::inputs![INPUT_NAME => input]).map_err(|e| run_error(&e))?;
        let cls = outputs.get(CLS_OUTPUT).ok_or_else(|| run_error(&format!("no `{CLS_OUTPUT}` output")))?;
        let (cls_shape, cls) = cls.try_extract_tensor::<f32>().map_err(|e| run_error(&e))?;
        let dim = cls_shape.last().copied().unwrap_or(0) as usize;
        let patch_tokens = match (has_tokens, outputs.get(PATCH_TOKENS_OUTPUT)) {
            (true, Some(v)) => Some(v.try_extract_tensor::<f32>().map_err(|e| run_error(&e))?.1.to_vec()),
            _ => None,
        };
        Ok(Outputs { cls: cls.to_vec(), dim, patch_tokens })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_lists_where_it_looked_and_how_to_install() {
        let search = LibrarySearch {
            venvs: vec![PathBuf::from("/nonexistent/venv")],
            pythons: vec![PathBuf::from("/nonexistent/python")],
            ..Default::default()
        };
        let msg = search.find().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/venv/lib/python3*"), "{msg}");
        assert!(msg.contains("/nonexistent/python"), "{msg}");
        assert!(msg.contains("pip install onnxruntime==1.30.0"), "{msg}");
    }

    #[test]
    fn a_configured_path_that_does_not_exist_is_an_error_not_a_fallback() {
        let search = LibrarySearch {
            env_path: Some("/no/such/libonnxruntime.so.1.30.0".into()),
            ..Default::default()
        };
        assert!(matches!(search.find(), Err(RuntimeError::BadPath { .. })));
    }

    #[test]
    fn the_wheel_library_is_found_in_a_venv() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join("lib/python3.12/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.30.0"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let search = LibrarySearch { venvs: vec![dir.path().to_path_buf()], ..Default::default() };
        assert_eq!(search.find().unwrap(), capi.join("libonnxruntime.so.1.30.0"));
    }
}
