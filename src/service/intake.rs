//! What the owner thread decides about a reported path before the ledger records it: paths that
//! are there but cannot be read (permissions, FIFOs, sockets, devices, broken symbolic links) and
//! copies of content the ledger already knows are rejected with a reason, without a ledger entry
//! of their own (the ledger is keyed by content, and an unreadable file has none).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::HandledPolicy;
use crate::stream::{Identity, TileState};

/// Whether an identification error means the path went away (renamed or deleted meanwhile), as
/// opposed to a path that is there but cannot be read.
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Why `seen` is not trained although it reads fine: it holds the same content as `known`, a
/// tile the ledger has under another path that is still there, or one that was trained and
/// handled or rejected. `None` when it is the tile itself, or the tile renamed.
pub fn duplicate_reason(
    known: &Identity,
    state: &TileState,
    seen: &Path,
    handled: HandledPolicy,
) -> Option<String> {
    if known.path == seen || same_file(&known.path, seen) {
        return None;
    }
    let original_there = std::fs::symlink_metadata(&known.path).is_ok();
    let what = match state {
        TileState::Pending if !original_there => return None,
        TileState::Trained { .. } if !original_there && handled == HandledPolicy::Keep => return None,
        TileState::Pending => "which waits to be trained".to_string(),
        TileState::Trained { step } => format!("trained at step {step}"),
        TileState::Rejected { reason } => format!("rejected: {reason}"),
    };
    Some(format!("same content as {}, {what}", known.path.display()))
}

/// Whether `a` and `b` are the same directory entry's file (one path relative, one absolute).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// Paths rejected without a ledger entry, with the reason last logged: each is logged (and
/// `stream.rejected` applied) once per reason, however often the watcher reports it again.
#[derive(Debug, Default)]
pub struct Untracked {
    noted: HashMap<PathBuf, String>,
    refused: u64,
}

impl Untracked {
    /// Note `reason` for `path`; true when it is new for this path (log it, apply the policy).
    pub fn note(&mut self, path: &Path, reason: &str) -> bool {
        let new = self.noted.insert(path.to_path_buf(), reason.to_string()).as_deref() != Some(reason);
        self.refused += u64::from(new);
        new
    }

    /// `path` no longer needs remembering (moved away, or readable after all).
    pub fn forget(&mut self, path: &Path) {
        self.noted.remove(path);
    }

    /// How many times a path was refused (each path once per reason), for status.json.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_duplicates_and_renames_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.tif"), dir.path().join("b.tif"));
        std::fs::write(&a, b"x").unwrap();
        let known = Identity { path: a.clone(), size: 1, mtime_ns: 0, hash: 7 };
        let trained = TileState::Trained { step: 9 };
        let reason = duplicate_reason(&known, &trained, &b, HandledPolicy::Keep).unwrap();
        assert!(reason.contains("a.tif") && reason.contains("trained at step 9"), "{reason}");
        assert_eq!(duplicate_reason(&known, &trained, &a, HandledPolicy::Move), None, "itself");
        let relative = Identity {
            path: a.strip_prefix(std::env::current_dir().unwrap()).unwrap_or(&a).to_path_buf(),
            ..known.clone()
        };
        assert_eq!(
            duplicate_reason(&relative, &trained, &a.canonicalize().unwrap(), HandledPolicy::Move),
            None,
            "itself, another spelling"
        );
        std::fs::remove_file(&a).unwrap();
        assert_eq!(duplicate_reason(&known, &TileState::Pending, &b, HandledPolicy::Move), None, "renamed");
        assert_eq!(duplicate_reason(&known, &trained, &b, HandledPolicy::Keep), None, "renamed, kept");
        assert!(duplicate_reason(&known, &trained, &b, HandledPolicy::Move).is_some(), "dropped again");
        let rejected = TileState::Rejected { reason: "file is empty".into() };
        assert!(
            duplicate_reason(&known, &rejected, &b, HandledPolicy::Keep).unwrap().contains("file is empty")
        );
    }

    #[test]
    fn an_unreadable_path_is_noted_once_per_reason() {
        let mut u = Untracked::default();
        let p = Path::new("in/x.tif");
        assert!(u.note(p, "Permission denied"));
        assert!(!u.note(p, "Permission denied"));
        assert!(u.note(p, "a FIFO"));
        u.forget(p);
        assert!(u.note(p, "a FIFO"));
        assert_eq!(u.refused(), 3);
    }
}
