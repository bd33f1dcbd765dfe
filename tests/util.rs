//! Test helpers: a temporary folder and a command runner for the real binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the `dinostream` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dinostream"))
}

/// The repository root (where `tests/data` lives).
pub fn root() -> PathBuf {
    // A test binary carried to another machine (scripts/gpu-check.sh) finds the checkout there.
    std::env::var_os("DINOSTREAM_TEST_ROOT")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// Bundled real sample tiles.
pub fn data(rel: &str) -> PathBuf {
    root().join("tests/data").join(rel)
}

/// `../shared/data` when it exists beside the checkout (heavier tests use it, and say so when they skip).
pub fn shared_data() -> Option<PathBuf> {
    let p = root().join("../shared/data");
    p.is_dir().then_some(p)
}

/// Run `dinostream ARGS` in `dir`; returns the output whatever the exit status.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).current_dir(dir).output().expect("spawn dinostream")
}

/// Stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Panic with both streams shown unless the command succeeded.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// The ONNX Runtime library, or `None` after saying why the calling test skips.
pub fn onnxruntime_or_skip() -> Option<PathBuf> {
    match dinostream::infer::runtime::LibrarySearch::standard(None).find() {
        Ok(path) => Some(path),
        Err(_) => {
            eprintln!(
                "skipping: ONNX Runtime not installed (scripts/setup-python.sh installs it into .venv)"
            );
            None
        }
    }
}
