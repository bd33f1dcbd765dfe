//! Crash-safe file writes. A reader of `path` sees either the old content or the complete new
//! content, never a partial file: write a sibling temp file, fsync it, rename it over `path`, fsync
//! the directory. This is the only place in the crate that renames files.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically (see the module doc).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        rename_durable(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Rename `from` to `to` and fsync the destination directory so the rename survives a crash.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Move `path` (a file or a folder) into `dir`, creating `dir` when missing, and return the new
/// path. An existing entry is never overwritten: the name gets a `.1`, `.2`, ... suffix instead. On
/// failure (e.g. `dir` on another filesystem) `path` stays where it was.
pub fn move_into(dir: &Path, path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{}: has no file name", path.display()))
    })?;
    fs::create_dir_all(dir)?;
    let mut target = dir.join(name);
    let mut n = 0;
    while fs::symlink_metadata(&target).is_ok() {
        n += 1;
        target = dir.join(format!("{}.{n}", name.to_string_lossy()));
    }
    rename_durable(path, &target)?;
    if let Some(from_dir) = path.parent() {
        sync_dir(from_dir)?;
    }
    Ok(target)
}

/// fsync a directory (makes renames and creations in it durable). No-op where unsupported.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    match File::open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(e) => Err(e),
    }
}

/// `dir/.name.tmp.<pid>`: hidden, so folder watchers and globbing consumers skip it.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new content").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "left behind: {names:?}");
    }

    #[test]
    fn write_atomic_into_missing_folder_fails_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(&dir.path().join("no/such/dir/x"), b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn move_into_keeps_the_name_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a/x.tif"), dir.path().join("b/x.tif"));
        for p in [&a, &b] {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, p.to_string_lossy().as_bytes()).unwrap();
        }
        let done = dir.path().join("done");
        assert_eq!(move_into(&done, &a).unwrap(), done.join("x.tif"));
        assert_eq!(move_into(&done, &b).unwrap(), done.join("x.tif.1"));
        assert!(!a.exists() && !b.exists());
        assert_eq!(fs::read(done.join("x.tif.1")).unwrap(), b.to_string_lossy().as_bytes());
    }

    #[test]
    fn failed_move_leaves_the_file_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.tif");
        fs::write(&file, b"x").unwrap();
        let blocker = dir.path().join("blocker");
        fs::write(&blocker, b"not a folder").unwrap();
        assert!(move_into(&blocker, &file).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"x");
    }
}
