//! Watching the incoming folder: a [`Watcher`] reports each complete file or BigEarthNet patch
//! folder once, as a [`Candidate`] on a bounded channel.
//!
//! inotify (through notify) says *that* something happened; this module decides *when* a file is
//! complete. A path is a candidate after its writer closed it (`Close(Write)`) or it was renamed
//! in (`Name(To)`), and its size and mtime then stayed the same for `settle_ms`. Writes reset the
//! clock, so a slow writer is never taken half-way. Dot-files, `*.tmp` and `*.part` are ignored.
//!
//! inotify drops events when its queue overflows (and we drop them ourselves when our bounded
//! event queue is full), so the folder is rescanned on start, every `rescan_secs`, and soon after
//! any overflow or error (logged once per interval). A rescanned path without a close event is
//! taken once it has not changed between two rescans.
//!
//! A BigEarthNet patch folder (band files named `*_B02.tif` and so on) is one candidate, reported
//! once all its files have settled. Without `recursive`, other subfolders are ignored; with it,
//! their files are candidates and patch folders anywhere below are found.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{Event, RecursiveMode, Watcher as _};

use crate::config::StreamConfig;
use crate::stream::{PROCESSED_DIR, REJECTED_DIR};

/// Whether a candidate is a single file or a BigEarthNet patch folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// One file (a stacked TIFF, or anything else the ingest stage will judge).
    File,
    /// A folder of per-band files.
    Folder,
}

/// A complete file or patch folder, ready to be ingested.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Where it is.
    pub path: PathBuf,
    /// What it is.
    pub kind: CandidateKind,
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The folder could not be created or read.
    #[error("{path}: cannot watch this folder: {source}")]
    Folder { path: PathBuf, source: std::io::Error },
    /// inotify refused the watch.
    #[error(
        "{path}: cannot watch this folder: {source}; if the inotify limits are reached, raise fs.inotify.max_user_watches / max_user_instances (sysctl)"
    )]
    Notify { path: PathBuf, source: notify::Error },
}

/// Knobs tests turn to provoke overflows and speed things up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Events buffered between notify's thread and ours; more are dropped and trigger a rescan.
    pub event_capacity: usize,
    /// How often pending paths are checked for a stable size.
    pub tick: Duration,
}

impl Tuning {
    fn for_settle(settle: Duration) -> Tuning {
        let tick = (settle / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        Tuning { event_capacity: 4096, tick }
    }
}

/// The folder watcher. It owns one thread (plus notify's); [`Watcher::stop`] or dropping it ends
/// both, and the candidate channel's sender is dropped with them.
pub struct Watcher {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _notify: notify::RecommendedWatcher,
    troubles: Arc<AtomicU64>,
}

impl Watcher {
    /// Watch `cfg.watch_dir` (created when missing) and send candidates to `out`, starting with
    /// what is already there. Blocks on `out` when it is full (backpressure).
    pub fn start(cfg: &StreamConfig, out: Sender<Candidate>) -> Result<Watcher, WatchError> {
        let settle = Duration::from_millis(cfg.settle_ms);
        Watcher::start_tuned(cfg, out, Tuning::for_settle(settle))
    }

    pub(crate) fn start_tuned(
        cfg: &StreamConfig,
        out: Sender<Candidate>,
        tuning: Tuning,
    ) -> Result<Watcher, WatchError> {
        let root = prepare_root(&cfg.watch_dir)?;
        let (event_tx, event_rx) = crossbeam_channel::bounded(tuning.event_capacity);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&overflowed);
        let handler = move |event: notify::Result<Event>| {
            if event_tx.try_send(event).is_err() {
                flag.store(true, Ordering::Relaxed);
            }
        };
        let notify_err = |source| WatchError::Notify { path: root.clone(), source };
        let mut inotify = notify::recommended_watcher(handler).map_err(notify_err)?;
        inotify.watch(&root, RecursiveMode::Recursive).map_err(notify_err)?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let tracker = Tracker::new(root, cfg, tuning);
        let troubles = Arc::clone(&tracker.trouble.total);
        let lp = Loop { tracker, events: event_rx, overflowed, stop: stop_rx, out };
        let thread = std::thread::Builder::new()
            .name("dinostream-watch".into())
            .spawn(move || lp.run())
            .map_err(|source| WatchError::Folder { path: cfg.watch_dir.clone(), source })?;
        Ok(Watcher { stop: Some(stop_tx), thread: Some(thread), _notify: inotify, troubles })
    }

    /// How often events were lost (inotify or our queue overflowed) or notify reported an error;
    /// each one led to a rescan. For status counters.
    pub fn troubles(&self) -> u64 {
        self.troubles.load(Ordering::Relaxed)
    }

    /// Stop watching and wait for the thread to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the folder watcher thread panicked; new files are no longer noticed");
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn prepare_root(dir: &Path) -> Result<PathBuf, WatchError> {
    let folder_err = |source| WatchError::Folder { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(folder_err)?;
    dir.canonicalize().map_err(folder_err)
}

/// The watcher thread: events in, candidates out.
struct Loop {
    tracker: Tracker,
    events: Receiver<notify::Result<Event>>,
    overflowed: Arc<AtomicBool>,
    stop: Receiver<()>,
    out: Sender<Candidate>,
}

impl Loop {
    fn run(mut self) {
        self.tracker.rescan(Instant::now());
        let mut next_poll = Instant::now();
        loop {
            crossbeam_channel::select! {
                recv(self.stop) -> _ => return,
                recv(self.events) -> event => match event {
                    Ok(event) => self.tracker.on_event(event, Instant::now()),
                    Err(_) => return,
                },
                default(self.tracker.tuning.tick) => {}
            }
            let now = Instant::now();
            if self.overflowed.swap(false, Ordering::Relaxed) {
                self.tracker.trouble.note("event queue overflowed", now);
                self.tracker.rescan_due = true;
            }
            if now >= next_poll {
                self.tracker.maybe_rescan(now);
                self.tracker.poll(now);
                next_poll = now + self.tracker.tuning.tick;
            }
            if !self.flush() {
                return;
            }
        }
    }

    /// Hand ready candidates to `out` without blocking; false when the receiver is gone.
    fn flush(&mut self) -> bool {
        while let Some(candidate) = self.tracker.ready.pop_front() {
            match self.out.try_send(candidate) {
                Ok(()) => {}
                Err(TrySendError::Full(candidate)) => {
                    self.tracker.ready.push_front(candidate);
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        true
    }
}

/// What we compare to decide that a path stopped changing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    size: u64,
    mtime: Option<SystemTime>,
    /// Status change time: a `chmod` that makes an unreadable file readable is a change too.
    ctime_ns: i128,
    files: u64,
}

/// A path seen but not reported yet.
#[derive(Debug)]
struct Pending {
    kind: CandidateKind,
    /// Its writer closed it (or it was renamed in, or found by a scan).
    closed: bool,
    /// The signature last looked at, and since when it has not changed.
    sig: Option<Signature>,
    since: Instant,
    /// The signature at the last rescan (an unclosed path unchanged across two rescans is taken).
    scan_sig: Option<Signature>,
}

/// Logs a repeating environmental problem once per interval with a count.
struct Throttled {
    interval: Duration,
    last: Option<Instant>,
    count: u64,
    total: Arc<AtomicU64>,
}

impl Throttled {
    fn note(&mut self, what: &str, now: Instant) {
        self.count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.last.is_none_or(|t| now.duration_since(t) >= self.interval) {
            log::warn!(
                "watcher: {what} ({} time(s) since the last report); rescanning the folder",
                self.count
            );
            self.last = Some(now);
            self.count = 0;
        }
    }
}

/// The watcher's bookkeeping: pending paths, what was reported, and when to rescan.
struct Tracker {
    root: PathBuf,
    recursive: bool,
    settle: Duration,
    rescan_every: Duration,
    tuning: Tuning,
    pending: HashMap<PathBuf, Pending>,
    reported: HashMap<PathBuf, Signature>,
    ready: VecDeque<Candidate>,
    /// Folders that are neither patch folders nor empty, already warned about.
    ignored_folders: std::collections::HashSet<PathBuf>,
    last_rescan: Instant,
    rescan_due: bool,
    trouble: Throttled,
}

impl Tracker {
    fn new(root: PathBuf, cfg: &StreamConfig, tuning: Tuning) -> Tracker {
        let rescan_every = Duration::from_secs(cfg.rescan_secs.max(1));
        Tracker {
            root,
            recursive: cfg.recursive,
            settle: Duration::from_millis(cfg.settle_ms),
            rescan_every,
            tuning,
            pending: HashMap::new(),
            reported: HashMap::new(),
            ready: VecDeque::new(),
            ignored_folders: Default::default(),
            last_rescan: Instant::now(),
            rescan_due: false,
            trouble: Throttled { interval: rescan_every, last: None, count: 0, total: Arc::default() },
        }
    }

    fn on_event(&mut self, event: notify::Result<Event>, now: Instant) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                self.trouble.note(&format!("notify error: {e}"), now);
                self.rescan_due = true;
                return;
            }
        };
        if event.need_rescan() {
            self.trouble.note("inotify queue overflowed", now);
            self.rescan_due = true;
        }
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                self.touch_all(&event.paths, Some(true), now)
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                self.touch_all(&event.paths, Some(true), now)
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                let (from, to) = event.paths.split_at(1.min(event.paths.len()));
                self.forget(from, now);
                self.touch_all(to, Some(true), now);
            }
            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => self.forget(&event.paths, now),
            EventKind::Modify(ModifyKind::Metadata(_)) => self.touch_all(&event.paths, None, now),
            EventKind::Create(_) | EventKind::Modify(_) => self.touch_all(&event.paths, Some(false), now),
            _ => {}
        }
    }

    fn touch_all(&mut self, paths: &[PathBuf], closed: Option<bool>, now: Instant) {
        for path in paths {
            if let Some((unit, kind)) = self.unit_of(path) {
                let entry = self.pending.entry(unit.clone()).or_insert_with(|| Pending {
                    kind,
                    closed: false,
                    sig: None,
                    since: now,
                    scan_sig: None,
                });
                entry.closed = closed.unwrap_or(entry.closed);
                entry.since = now;
                // the size to compare with once the settle time is over
                entry.sig = if entry.closed { signature(&unit, entry.kind) } else { None };
            }
        }
    }

    /// A path went away (deleted, renamed out): a later file under that name is reported anew.
    fn forget(&mut self, paths: &[PathBuf], now: Instant) {
        for path in paths {
            self.reported.remove(path);
            self.pending.remove(path);
            // a file leaving a patch folder changes the folder
            if let Some((unit, _)) = self.unit_of(path)
                && unit != *path
            {
                self.touch_all(&[unit], None, now);
            }
        }
    }

    /// The candidate a path belongs to: itself, or the patch folder (or, non-recursive, the
    /// top-level folder) it lies in. `None` for ignored paths.
    fn unit_of(&self, path: &Path) -> Option<(PathBuf, CandidateKind)> {
        let rel = path.strip_prefix(&self.root).ok()?;
        let names: Vec<&str> = rel.iter().map(|c| c.to_str().unwrap_or(".")).collect();
        let first = *names.first()?;
        if first == PROCESSED_DIR || first == REJECTED_DIR || names.iter().any(|n| is_ignored_name(n)) {
            return None;
        }
        if !self.recursive {
            let unit = self.root.join(first);
            let kind =
                if names.len() > 1 || unit.is_dir() { CandidateKind::Folder } else { CandidateKind::File };
            return Some((unit, kind));
        }
        let mut dir = self.root.clone();
        for name in &names[..names.len() - 1] {
            dir.push(name);
            if is_patch_folder(&dir) {
                return Some((dir, CandidateKind::Folder));
            }
        }
        if path.is_dir() {
            return is_patch_folder(path).then(|| (path.to_path_buf(), CandidateKind::Folder));
        }
        Some((path.to_path_buf(), CandidateKind::File))
    }

    fn maybe_rescan(&mut self, now: Instant) {
        let forced_ok = now.duration_since(self.last_rescan) >= self.settle.max(Duration::from_millis(200));
        if (self.rescan_due && forced_ok) || now.duration_since(self.last_rescan) >= self.rescan_every {
            self.rescan(now);
        }
    }

    /// List the folder: new paths become pending (as closed), gone paths are forgotten, and an
    /// unclosed path that did not change since the last rescan is taken as closed.
    fn rescan(&mut self, now: Instant) {
        self.rescan_due = false;
        self.last_rescan = now;
        let mut found = Vec::new();
        if let Err(e) = self.list(&self.root.clone(), 0, &mut found) {
            self.trouble.note(&format!("{}: cannot list: {e}", self.root.display()), now);
        }
        let present: std::collections::HashSet<&PathBuf> = found.iter().map(|(p, _)| p).collect();
        self.reported.retain(|p, _| present.contains(p));
        self.pending.retain(|p, _| present.contains(p) || p.exists());
        for (path, kind) in &found {
            let sig = signature(path, *kind);
            if sig.is_some() && self.reported.get(path) == sig.as_ref() {
                continue;
            }
            let entry = self.pending.entry(path.clone()).or_insert_with(|| Pending {
                kind: *kind,
                closed: true,
                sig,
                since: now,
                scan_sig: None,
            });
            if !entry.closed && entry.scan_sig.is_some() && entry.scan_sig == sig {
                entry.closed = true;
            }
            entry.scan_sig = sig;
        }
    }

    fn list(
        &self,
        dir: &Path,
        depth: usize,
        found: &mut Vec<(PathBuf, CandidateKind)>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if is_ignored_name(&name) || (depth == 0 && (name == PROCESSED_DIR || name == REJECTED_DIR)) {
                continue;
            }
            let path = entry.path();
            if !entry.file_type()?.is_dir() {
                found.push((path, CandidateKind::File));
            } else if is_patch_folder(&path) || (!self.recursive && depth == 0) {
                found.push((path, CandidateKind::Folder));
            } else if self.recursive {
                self.list(&path, depth + 1, found)?;
            }
        }
        Ok(())
    }

    /// Move every closed path whose signature held still for `settle` to `ready`. Only paths
    /// whose settle time is over are looked at (one `stat` each), so a burst of pending files
    /// costs little per tick; writes in between arrive as events and restart the clock.
    fn poll(&mut self, now: Instant) {
        let mut done = Vec::new();
        let due = |p: &Pending| p.closed && now.duration_since(p.since) >= self.settle;
        for (path, p) in self.pending.iter_mut().filter(|(_, p)| due(p)) {
            let sig = signature(path, p.kind);
            if sig.is_some() && sig == p.sig {
                done.push(path.clone());
            } else {
                (p.sig, p.since) = (sig, now);
            }
        }
        done.sort();
        for path in done {
            self.settled(path);
        }
    }

    fn settled(&mut self, path: PathBuf) {
        let Some(p) = self.pending.remove(&path) else { return };
        let Some(sig) = p.sig else { return };
        if p.kind == CandidateKind::Folder && !is_patch_folder(&path) {
            self.note_ignored_folder(path, sig);
            return;
        }
        if let Some((unit, kind)) = self.unit_of(&path)
            && unit != path
        {
            // the file turned out to belong to a patch folder: settle the folder instead
            let since = Instant::now();
            self.pending.insert(unit, Pending { kind, closed: true, sig: None, since, scan_sig: None });
            return;
        }
        if self.reported.insert(path.clone(), sig) != Some(sig) {
            log::debug!("{}: complete, handing it to ingest", path.display());
            self.ready.push_back(Candidate { path, kind: p.kind });
        }
    }
}

impl Tracker {
    /// A folder without band files: said once at warn level (unless it is empty), then ignored.
    fn note_ignored_folder(&mut self, path: PathBuf, sig: Signature) {
        if sig.files == 0 {
            log::debug!("{}: an empty folder; ignored until band files arrive", path.display());
        } else if self.ignored_folders.insert(path.clone()) {
            let hint =
                if self.recursive { "" } else { "; set stream.recursive = true to train on the files in it" };
            log::warn!(
                "{}: a folder that is not a BigEarthNet patch folder (no *_B02.tif-style band files); ignored{hint}",
                path.display()
            );
        }
    }
}

/// Dot-files and names writers use while a file is incomplete.
fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// A folder holding at least one per-band file (`<anything>_B02.tif`, `_B8A.tiff`, ...).
pub fn is_patch_folder(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        !is_ignored_name(&name) && is_band_file_name(&name)
    })
}

fn is_band_file_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let Some(stem) = lower.strip_suffix(".tif").or_else(|| lower.strip_suffix(".tiff")) else { return false };
    let Some((_, band)) = stem.rsplit_once("_b") else { return false };
    band.len() == 2 && (band == "8a" || band.bytes().all(|b| b.is_ascii_digit()))
}

/// Size, mtime and file count of a file, or summed over a folder's files (`None` if gone).
fn signature(path: &Path, kind: CandidateKind) -> Option<Signature> {
    if kind == CandidateKind::File {
        // symlink_metadata: a dangling link is still something to report (and reject)
        let meta = std::fs::metadata(path).or_else(|_| std::fs::symlink_metadata(path)).ok()?;
        return Some(Signature {
            size: meta.len(),
            mtime: meta.modified().ok(),
            ctime_ns: ctime_ns(&meta),
            files: 1,
        });
    }
    let mut sig = Signature { size: 0, mtime: None, ctime_ns: 0, files: 0 };
    for entry in std::fs::read_dir(path).ok()?.flatten() {
        if let Ok(meta) = entry.metadata() {
            sig.size += meta.len();
            sig.mtime = sig.mtime.max(meta.modified().ok());
            sig.ctime_ns = sig.ctime_ns.max(ctime_ns(&meta));
            sig.files += 1;
        }
    }
    Some(sig)
}

fn ctime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    const WAIT: Duration = Duration::from_secs(20);

    fn config(dir: &Path, recursive: bool, settle_ms: u64) -> StreamConfig {
        StreamConfig {
            watch_dir: dir.to_path_buf(),
            recursive,
            settle_ms,
            rescan_secs: 1,
            ..StreamConfig::default()
        }
    }

    fn start(cfg: &StreamConfig, event_capacity: usize) -> (Watcher, Receiver<Candidate>) {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let tuning = Tuning { event_capacity, tick: Duration::from_millis(10) };
        (Watcher::start_tuned(cfg, tx, tuning).unwrap(), rx)
    }

    /// Receive until `want` candidates arrived (or [`WAIT`] passed), then `quiet` more to catch
    /// duplicates.
    fn collect(rx: &Receiver<Candidate>, want: usize, quiet: Duration) -> Vec<Candidate> {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < want {
            match rx.recv_deadline(deadline) {
                Ok(c) => got.push(c),
                Err(_) => break,
            }
        }
        while let Ok(c) = rx.recv_timeout(quiet) {
            got.push(c);
        }
        got
    }

    fn names(got: &[Candidate]) -> Vec<String> {
        let mut names: Vec<_> =
            got.iter().map(|c| c.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn root(dir: &Path) -> PathBuf {
        dir.canonicalize().unwrap()
    }

    #[test]
    fn files_already_there_are_reported_and_hidden_or_partial_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.tif", ".hidden.tif", "b.tif.tmp", "c.tif.part", "notes.txt"] {
            fs::write(dir.path().join(name), name).unwrap();
        }
        let (_w, rx) = start(&config(dir.path(), false, 50), 4096);
        let got = collect(&rx, 2, Duration::from_millis(500));
        assert_eq!(names(&got), ["a.tif", "notes.txt"]);
        assert!(got.iter().all(|c| c.kind == CandidateKind::File));
    }

    #[test]
    fn dropped_file_is_reported_once_after_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let (_w, rx) = start(&config(dir.path(), false, 50), 4096);
        fs::write(dir.path().join("new.tif"), b"tile").unwrap();
        let got = collect(&rx, 1, Duration::from_millis(500));
        assert_eq!(got, [Candidate { path: root(dir.path()).join("new.tif"), kind: CandidateKind::File }]);
    }

    #[test]
    fn slow_partial_write_is_not_reported_before_it_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (_w, rx) = start(&config(dir.path(), false, 50), 4096);
        let path = dir.path().join("slow.tif");
        let mut file = fs::File::create(&path).unwrap();
        for _ in 0..4 {
            file.write_all(&[7u8; 10_000]).unwrap();
            file.flush().unwrap();
            // pauses well past settle_ms: only the close may release the file
            assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "reported while being written");
        }
        drop(file);
        let got = collect(&rx, 1, Duration::from_millis(300));
        assert_eq!(names(&got), ["slow.tif"]);
        assert_eq!(fs::metadata(&path).unwrap().len(), 40_000);
    }

    #[test]
    fn rename_into_the_folder_is_reported_under_the_new_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (_w, rx) = start(&config(dir.path(), false, 50), 4096);
        let tmp = dir.path().join("x.tif.part");
        fs::write(&tmp, b"written under a temp name").unwrap();
        fs::rename(&tmp, dir.path().join("x.tif")).unwrap();
        fs::write(outside.path().join("y.tif"), b"from elsewhere").unwrap();
        fs::rename(outside.path().join("y.tif"), dir.path().join("y.tif")).unwrap();
        let got = collect(&rx, 2, Duration::from_millis(500));
        assert_eq!(names(&got), ["x.tif", "y.tif"]);
    }

    #[test]
    fn burst_of_2000_files_is_reported_exactly_once_each_despite_overflow() {
        let dir = tempfile::tempdir().unwrap();
        // a zero-capacity event queue (an event is taken only while the watcher thread waits for
        // one) forces overflows even on an idle machine: the rescan has to find what was missed
        let (w, rx) = start(&config(dir.path(), false, 50), 0);
        for n in 0..2000 {
            fs::write(dir.path().join(format!("t{n:04}.tif")), n.to_string()).unwrap();
        }
        let got = collect(&rx, 2000, Duration::from_millis(1500));
        assert!(w.troubles() > 0, "the test meant to overflow the event queue");
        let unique: std::collections::HashSet<_> = got.iter().map(|c| c.path.clone()).collect();
        assert_eq!(unique.len(), 2000);
        assert_eq!(got.len(), 2000, "duplicates reported");
    }

    #[test]
    fn bigearthnet_folder_is_one_candidate_once_all_band_files_settled() {
        let dir = tempfile::tempdir().unwrap();
        let (_w, rx) = start(&config(dir.path(), false, 300), 4096);
        let folder = dir.path().join("S2A_MSIL2A_20170613T101031_34_81");
        fs::create_dir(&folder).unwrap();
        let bands = ["B02", "B03", "B04", "B08"];
        for band in bands {
            fs::write(folder.join(format!("S2A_MSIL2A_20170613T101031_34_81_{band}.tif")), band).unwrap();
            std::thread::sleep(Duration::from_millis(60));
        }
        let got = collect(&rx, 1, Duration::from_millis(800));
        assert_eq!(
            got,
            [Candidate {
                path: root(dir.path()).join(folder.file_name().unwrap()),
                kind: CandidateKind::Folder
            }]
        );
        assert_eq!(fs::read_dir(&folder).unwrap().count(), bands.len());
    }

    #[test]
    fn patch_folder_renamed_in_is_one_candidate_in_both_modes() {
        for recursive in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (watch, outside) = (dir.path().join("in"), dir.path().join("staging/S2B_y_3_4"));
            fs::create_dir_all(&outside).unwrap();
            fs::write(outside.join("S2B_y_3_4_B02.tif"), b"b02").unwrap();
            fs::write(outside.join("S2B_y_3_4_labels_metadata.json"), b"{}").unwrap();
            let (_w, rx) = start(&config(&watch, recursive, 50), 4096);
            fs::rename(&outside, watch.join("S2B_y_3_4")).unwrap();
            let got = collect(&rx, 1, Duration::from_millis(400));
            assert_eq!(names(&got), ["S2B_y_3_4"], "recursive = {recursive}");
            assert_eq!(got[0].kind, CandidateKind::Folder);
        }
    }

    #[test]
    fn recursive_mode_finds_files_and_patch_folders_in_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("2024/05");
        fs::create_dir_all(deep.join("S2B_x_1_2")).unwrap();
        fs::write(deep.join("S2B_x_1_2/S2B_x_1_2_B8A.tif"), b"band").unwrap();
        fs::write(deep.join("scene.tif"), b"scene").unwrap();
        fs::create_dir_all(dir.path().join("processed")).unwrap();
        fs::write(dir.path().join("processed/old.tif"), b"done").unwrap();
        let (_w, rx) = start(&config(dir.path(), true, 50), 4096);
        fs::write(dir.path().join("2024/late.tif"), b"late").unwrap();
        let got = collect(&rx, 3, Duration::from_millis(500));
        assert_eq!(names(&got), ["S2B_x_1_2", "late.tif", "scene.tif"]);
    }

    #[test]
    fn non_recursive_mode_ignores_plain_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/scene.tif"), b"scene").unwrap();
        fs::write(dir.path().join("top.tif"), b"top").unwrap();
        let (_w, rx) = start(&config(dir.path(), false, 50), 4096);
        assert_eq!(names(&collect(&rx, 1, Duration::from_millis(500))), ["top.tif"]);
    }

    #[test]
    fn a_file_moved_away_and_dropped_again_is_reported_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_w, rx) = start(&config(dir.path(), false, 50), 4096);
        let path = dir.path().join("again.tif");
        fs::write(&path, b"one").unwrap();
        assert_eq!(collect(&rx, 1, Duration::ZERO).len(), 1);
        crate::fsio::move_into(&dir.path().join("processed"), &path).unwrap();
        fs::write(&path, b"one").unwrap();
        assert_eq!(names(&collect(&rx, 1, Duration::from_millis(300))), ["again.tif"]);
    }

    #[test]
    fn stopping_the_watcher_ends_its_thread_and_closes_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let (w, rx) = start(&config(dir.path(), false, 50), 4096);
        w.stop();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn band_file_names_are_recognised() {
        for yes in ["S2A_x_B02.tif", "a_B8A.TIF", "x_b12.tiff"] {
            assert!(is_band_file_name(yes), "{yes}");
        }
        for no in ["B02.tif", "x_B2.tif", "x_B02.jp2", "x_labels_metadata.json", "x_BAB.tif"] {
            assert!(!is_band_file_name(no), "{no}");
        }
    }
}
