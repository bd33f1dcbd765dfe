//! The source tree's one-way data flow, checked: a module may use only modules of lower rank
//! (`fsio, config < tile < stream < augment < model < dino < infer < export < service < cli`).

use std::path::Path;

const RANKS: [(&str, usize); 11] = [
    ("fsio", 0),
    ("config", 0),
    ("tile", 1),
    ("stream", 2),
    ("augment", 3),
    ("model", 4),
    ("dino", 5),
    ("infer", 6),
    ("export", 7),
    ("service", 8),
    ("cli", 9),
];

fn rank(module: &str) -> Option<usize> {
    RANKS.iter().find(|(name, _)| *name == module).map(|&(_, r)| r)
}

/// Every `crate::NAME` mentioned in a source text.
fn crate_refs(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            text[i + m.len()..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
        })
        .collect()
}

fn check_module(path: &Path, module: &str, violations: &mut Vec<String>) {
    let own = rank(module).unwrap_or_else(|| panic!("module `{module}` has no rank in tests/layering.rs"));
    let files: Vec<_> = if path.is_dir() {
        std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect()
    } else {
        vec![path.to_path_buf()]
    };
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
        let text = std::fs::read_to_string(file).unwrap();
        for used in crate_refs(&text) {
            if rank(&used).is_some_and(|r| r > own) {
                violations.push(format!("{} uses crate::{used}", file.display()));
            }
        }
    }
}

#[test]
fn modules_only_use_modules_upstream_of_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if !matches!(name.as_str(), "lib" | "main") {
            check_module(&path, &name, &mut violations);
        }
    }
    assert!(violations.is_empty(), "layering violations:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_references() {
    assert_eq!(crate_refs("use crate::tile::Patch; crate::fsio::x"), ["tile", "fsio"]);
}
