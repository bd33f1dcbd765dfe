//! Streaming: everything between the watched folder and training that needs no model.
//!
//! - [`watch`]: a [`Watcher`] turns the incoming folder into a deduplicated stream of complete
//!   [`Candidate`]s (files and BigEarthNet patch folders).
//! - [`ledger`]: the [`Ledger`] remembers every tile, its identity and its state across restarts.
//! - [`replay`]: the [`Mixer`] builds each batch from fresh patches and a bounded replay buffer;
//!   [`redundancy`]: the teacher embeddings its `min-redundancy` policy evicts by; [`store`]: the
//!   content-addressed files on disk that hold the buffer's patches.
//! - [`dispose_trained`] / [`dispose_rejected`]: what happens to a file once it was handled.

pub mod ledger;
pub mod redundancy;
pub mod replay;
pub mod store;
pub mod watch;

pub use ledger::{Counts, Identity, Ledger, LedgerError, Observation, TileId, TileState};
pub use replay::{
    BatchCounts, Embedded, LegacyMixerState, MixedBatch, Mixer, MixerExtra, MixerState, Pushed,
};
pub use store::{BlobId, PatchStore, StoreError, StoreStats};
pub use watch::{Candidate, CandidateKind, WatchError, Watcher};

use std::io;
use std::path::{Path, PathBuf};

use crate::config::{HandledPolicy, RejectedPolicy, StreamConfig};
use crate::fsio;

/// Subfolder of the watched folder that trained tiles move to (`stream.handled = "move"`).
pub const PROCESSED_DIR: &str = "processed";
/// Subfolder of the watched folder that rejected tiles move to (`stream.rejected = "move"`).
pub const REJECTED_DIR: &str = "rejected";

/// Where a handled tile is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Left in place.
    Kept(PathBuf),
    /// Moved to this path.
    Moved(PathBuf),
    /// Deleted.
    Deleted,
}

/// A handling step failed; the tile's file is still where it was (or, for the reason file, already
/// moved to `rejected/`).
#[derive(Debug, thiserror::Error)]
#[error("{path}: could not {action}: {source}; the file is left at {path}")]
pub struct DisposeError {
    /// The tile's file or folder as it is now.
    pub path: PathBuf,
    /// What was tried.
    pub action: String,
    /// The I/O error.
    pub source: io::Error,
}

/// Apply `stream.handled` to a trained tile's `path`.
pub fn dispose_trained(cfg: &StreamConfig, path: &Path) -> Result<Disposition, DisposeError> {
    match cfg.handled {
        HandledPolicy::Keep => Ok(Disposition::Kept(path.to_path_buf())),
        HandledPolicy::Move => move_to(&cfg.watch_dir.join(PROCESSED_DIR), path).map(Disposition::Moved),
        HandledPolicy::Delete => delete(path),
    }
}

/// Apply `stream.rejected` to a rejected tile's `path`: move it to `rejected/` and write
/// `<name>.reason.txt` beside it (atomically), or leave it in place.
pub fn dispose_rejected(cfg: &StreamConfig, path: &Path, reason: &str) -> Result<Disposition, DisposeError> {
    if cfg.rejected == RejectedPolicy::Record {
        return Ok(Disposition::Kept(path.to_path_buf()));
    }
    let target = move_to(&cfg.watch_dir.join(REJECTED_DIR), path)?;
    let mut note = target.clone().into_os_string();
    note.push(".reason.txt");
    fsio::write_atomic(Path::new(&note), format!("{reason}\n").as_bytes()).map_err(|source| {
        DisposeError { path: target.clone(), action: format!("write {}", Path::new(&note).display()), source }
    })?;
    Ok(Disposition::Moved(target))
}

fn move_to(dir: &Path, path: &Path) -> Result<PathBuf, DisposeError> {
    fsio::move_into(dir, path).map_err(|source| DisposeError {
        path: path.to_path_buf(),
        action: format!("move it into {}", dir.display()),
        source,
    })
}

fn delete(path: &Path) -> Result<Disposition, DisposeError> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    result.map(|()| Disposition::Deleted).map_err(|source| DisposeError {
        path: path.to_path_buf(),
        action: "delete it".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn cfg(dir: &Path, handled: HandledPolicy, rejected: RejectedPolicy) -> StreamConfig {
        StreamConfig { watch_dir: dir.to_path_buf(), handled, rejected, ..StreamConfig::default() }
    }

    fn tile(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, name).unwrap();
        path
    }

    #[test]
    fn trained_tile_is_kept_moved_or_deleted_per_policy() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let keep = cfg(d, HandledPolicy::Keep, RejectedPolicy::Move);
        let a = tile(d, "a.tif");
        assert_eq!(dispose_trained(&keep, &a).unwrap(), Disposition::Kept(a.clone()));
        assert!(a.exists());
        let moved = dispose_trained(&cfg(d, HandledPolicy::Move, RejectedPolicy::Move), &a).unwrap();
        assert_eq!(moved, Disposition::Moved(d.join("processed/a.tif")));
        assert!(!a.exists() && d.join("processed/a.tif").exists());
        let b = tile(d, "b.tif");
        assert_eq!(
            dispose_trained(&cfg(d, HandledPolicy::Delete, RejectedPolicy::Move), &b).unwrap(),
            Disposition::Deleted
        );
        assert!(!b.exists());
    }

    #[test]
    fn rejected_tile_moves_with_its_reason_or_stays_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bad = tile(d, "bad.tif");
        let record = cfg(d, HandledPolicy::Keep, RejectedPolicy::Record);
        assert_eq!(dispose_rejected(&record, &bad, "x").unwrap(), Disposition::Kept(bad.clone()));
        let moved =
            dispose_rejected(&cfg(d, HandledPolicy::Keep, RejectedPolicy::Move), &bad, "not a TIFF").unwrap();
        assert_eq!(moved, Disposition::Moved(d.join("rejected/bad.tif")));
        assert_eq!(fs::read_to_string(d.join("rejected/bad.tif.reason.txt")).unwrap(), "not a TIFF\n");
    }

    #[test]
    fn failed_move_names_the_file_and_leaves_it_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join(PROCESSED_DIR), b"a file where the folder should be").unwrap();
        let a = tile(d, "a.tif");
        let err = dispose_trained(&cfg(d, HandledPolicy::Move, RejectedPolicy::Move), &a).unwrap_err();
        assert!(a.exists());
        let msg = err.to_string();
        assert!(msg.contains("a.tif") && msg.contains("processed"), "{msg}");
    }
}
