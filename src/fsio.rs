//! Crash-safe file writes and never-blocking input opens.
//!
//! Writes: a reader of `path` sees either the old content or the complete new content, never a
//! partial file: write a sibling temp file, fsync it, rename it over `path`, fsync the directory.
//! This is the only place in the crate that renames files.
//!
//! Reads of inputs ([`open_regular`]): only regular files are ever opened, and never with a
//! blocking open, so a FIFO, socket or device dropped among the tiles cannot hang a thread.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Open an input file for reading, refusing anything but a regular file without blocking on it.
///
/// The file type is checked first (following symbolic links, whose loops and dangling targets are
/// refused), then the file is opened with `O_NONBLOCK` (a FIFO swapped in after the check cannot
/// block the open) and checked again on the open descriptor. Refusals are
/// [`io::ErrorKind::InvalidInput`] errors that say what the path is instead.
pub fn open_regular(path: &Path) -> io::Result<File> {
    if input_metadata(path)?.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a folder, not a regular file"));
    }
    let file = open_nonblocking(path)?;
    refuse_non_regular(&file.metadata()?)?;
    Ok(file)
}

/// The metadata of an input (a regular file or a folder; symbolic links followed), refusing
/// everything else as [`open_regular`] does.
pub fn input_metadata(path: &Path) -> io::Result<fs::Metadata> {
    let meta = fs::metadata(path).map_err(|e| not_openable(path, e))?;
    if meta.is_dir() {
        return Ok(meta);
    }
    refuse_non_regular(&meta)?;
    Ok(meta)
}

/// What `meta` is, when it is not a regular file or a folder (`None` for those two).
pub fn special_kind(meta: &fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_file() || t.is_dir() {
        return None;
    } else {
        "not a regular file"
    };
    Some(kind)
}

fn refuse_non_regular(meta: &fs::Metadata) -> io::Result<()> {
    let Some(kind) = special_kind(meta) else { return Ok(()) };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{kind}, not a regular file; only regular files are read"),
    ))
}

/// A failed `stat`: dangling symbolic links and symbolic link loops say so (they are not "gone").
fn not_openable(path: &Path, e: io::Error) -> io::Error {
    const ELOOP: i32 = libc::ELOOP;
    if e.raw_os_error() == Some(ELOOP) {
        return io::Error::new(
            io::ErrorKind::InvalidInput,
            "a symbolic link loop; only regular files are read",
        );
    }
    if e.kind() == io::ErrorKind::NotFound
        && let Ok(target) = fs::read_link(path)
    {
        let msg = format!("a dangling symbolic link (to {}, which does not exist)", target.display());
        return io::Error::new(io::ErrorKind::InvalidInput, msg);
    }
    e
}

fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

/// Write `bytes` to `path` atomically (see the module doc).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_through_temp(path, bytes, true)
}

/// Write `bytes` to `path` through a temp sibling and a rename, without fsync: readers never see a
/// partial file while the system runs, but after a crash the file may be empty or cut short until
/// the caller fsynced it and its folder. For content-addressed files that are checked on read and
/// synced in bulk before anything durable refers to them (the replay store).
pub fn write_new_deferred(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_through_temp(path, bytes, false)
}

/// Write a temp sibling of `path` and rename it over `path`; `durable` fsyncs the file before and
/// the folder after the rename. The temp file is removed when anything fails.
fn write_through_temp(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        if durable { rename_durable(&tmp, path) } else { fs::rename(&tmp, path) }
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

/// Flush everything written to the filesystem that holds `path` (`syncfs`: one call instead of
/// an fsync per file when thousands of new files must become durable at once).
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path)?;
    // SAFETY: `dir` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fsync a directory (makes renames and creations in it durable). No-op where unsupported.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    match File::open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(e) => Err(e),
    }
}

/// Remove the temp files [`write_atomic`] writes in `dir` (`.<name>.tmp.<pid>`) that a killed
/// process left behind; call it at start-up, before this process writes there. Returns how many.
pub fn sweep_temp_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with('.')
            && name.rsplit_once(".tmp.").is_some_and(|(_, pid)| pid.bytes().all(|b| b.is_ascii_digit()));
        if ours && entry.file_type().is_ok_and(|t| t.is_file()) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
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
    fn only_regular_files_are_opened_and_the_rest_is_refused_with_what_it_is() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("tile.tif"), b"II*\0").unwrap();
        symlink(d.join("tile.tif"), d.join("link.tif")).unwrap();
        symlink(d.join("nowhere.tif"), d.join("dangling.tif")).unwrap();
        symlink(d.join("loop-b.tif"), d.join("loop-a.tif")).unwrap();
        symlink(d.join("loop-a.tif"), d.join("loop-b.tif")).unwrap();
        symlink("/dev/urandom", d.join("device.tif")).unwrap();
        let fifo = d.join("pipe.tif");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let _socket = std::os::unix::net::UnixListener::bind(d.join("socket.tif")).unwrap();
        assert!(open_regular(&d.join("tile.tif")).is_ok());
        assert!(open_regular(&d.join("link.tif")).is_ok(), "a link to a regular file is read");
        for (name, says) in [
            ("pipe.tif", "FIFO"),
            ("socket.tif", "socket"),
            ("device.tif", "character device"),
            ("dangling.tif", "dangling symbolic link"),
            ("loop-a.tif", "symbolic link loop"),
            ("", "a folder"),
        ] {
            let err = open_regular(&d.join(name)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name}: {err}");
            assert!(err.to_string().contains(says), "{name}: {err}");
        }
        assert_eq!(open_regular(&d.join("gone.tif")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

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
    fn stale_temp_files_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".status.json.tmp.123", "status.json", ".hidden", "x.tmp.12"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(sweep_temp_files(dir.path()), 1);
        assert!(!dir.path().join(".status.json.tmp.123").exists() && dir.path().join(".hidden").exists());
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
