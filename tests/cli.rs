//! The command line as a user meets it: help, config errors and exit codes.

use crate::util::*;

#[test]
fn invalid_config_exits_78_and_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), "[tile]\npatch_px = 0\n[augment]\nflip_p = 2.0\n").unwrap();
    let out = run_in(dir.path(), &["--config", "c.toml", "config"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("tile.patch_px") && err.contains("augment.flip_p"), "{err}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["--config", "nope.toml", "config"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("nope.toml: cannot read config file"), "{}", stderr(&out));
}

#[test]
fn config_prints_the_effective_values() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), "[train]\nbatch_size = 8\n").unwrap();
    let out = run_in(dir.path(), &["--config", "c.toml", "config"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("batch_size = 8"));
    assert!(stdout(&out).contains("patch_px = 120"));
}
