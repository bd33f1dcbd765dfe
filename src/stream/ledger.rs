//! The tile ledger: every tile ever seen, its identity and its state, kept in an append-only log so
//! that a restart never trains a tile twice as new and never forgets one.
//!
//! On disk (`<dir>/ledger.bin`): an 8-byte magic, then records, each `[len: u32 LE][crc32: u32 LE]
//! [postcard payload]`. A crash can leave a torn last record; opening detects it by length or
//! checksum and truncates it (the tile is then simply seen again). Once the log holds
//! `compact_records` more records than there are tiles, it is rewritten as one record per tile
//! with [`fsio::write_atomic`] and appending continues on the new file.
//!
//! A full or failing state disk never corrupts the log nor ends the service: a failed append is cut
//! off again (no torn record stays in the middle), a new tile is then not recorded (the caller
//! tries it again later), and a state change of a known tile (trained, rejected, requeued, seen
//! elsewhere) is applied in memory and kept until a later append or [`Ledger::sync`] writes it.
//! `sync` fails while such changes are unwritten, so no checkpoint covers a step whose marks are
//! not on disk; a process killed before they are written resumes from a checkpoint that predates
//! them, so the tiles are trained again there as new, once.
//!
//! A tile's identity is its content: size plus a hash of its first and last 64 KiB (the header and
//! the tail; for a BigEarthNet folder, of every band file). The same content under another name
//! (renamed, re-dropped) is known; changed content at the same path is new.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::fsio;

/// File name of the ledger inside its folder.
pub const LEDGER_FILE: &str = "ledger.bin";
const MAGIC: &[u8; 8] = b"DSLEDG01";
/// Bytes hashed at each end of a file.
const HASH_SPAN_BYTES: u64 = 64 * 1024;
/// Longest rejection reason kept (longer ones are cut at a character boundary).
pub const REASON_MAX_BYTES: usize = 256;
/// A record longer than this cannot be one we wrote: the rest of the log is damaged.
const RECORD_MAX_BYTES: u32 = 1 << 20;

/// A tile's number in the ledger, assigned in the order tiles were first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TileId(pub u64);

/// What identifies a tile: where it is, and what it contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The file or BigEarthNet folder, as last seen.
    pub path: PathBuf,
    /// Size in bytes (for a folder: the sum over its files).
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch (for a folder: the newest file's).
    pub mtime_ns: i128,
    /// xxh3-128 of the first and last 64 KiB (for a folder: of each file's, with its name).
    pub hash: u128,
}

/// Where a tile is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TileState {
    /// Seen, not trained yet (survives restarts).
    Pending,
    /// Trained; `step` is the training step it was first used at.
    Trained {
        /// First training step.
        step: u64,
    },
    /// Could not be used.
    Rejected {
        /// Why, as logged (at most [`REASON_MAX_BYTES`]).
        reason: String,
    },
}

/// What [`Ledger::observe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Never seen: recorded as pending under this id.
    New(TileId),
    /// The same content was seen before (perhaps under another name).
    Known {
        /// Its id.
        id: TileId,
        /// Its current state.
        state: TileState,
    },
}

/// Tile counts for status lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Tiles ever seen.
    pub seen: u64,
    /// Tiles trained.
    pub trained: u64,
    /// Tiles rejected.
    pub rejected: u64,
    /// Tiles waiting for training.
    pub pending: u64,
}

/// Why a ledger could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading, writing or creating the ledger failed.
    #[error("{path}: ledger I/O failed: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The file exists but is not a dinostream ledger.
    #[error(
        "{path}: not a dinostream ledger (it does not start with the ledger magic); move it away or point the state folder elsewhere, and a new ledger is started"
    )]
    NotALedger { path: PathBuf },
    /// An id that this ledger never handed out.
    #[error("tile id {0} is not in the ledger")]
    UnknownTile(u64),
}

/// One log record.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    /// A tile with its whole state (new tiles, and every tile after a compaction).
    Tile { id: TileId, identity: StoredIdentity, state: TileState },
    /// Known content seen again, perhaps under another path.
    Seen { id: TileId, path: Vec<u8>, mtime_ns: i128 },
    /// Trained at `step`.
    Trained { id: TileId, step: u64 },
    /// Rejected with a reason.
    Rejected { id: TileId, reason: heapless::String<REASON_MAX_BYTES> },
    /// Back to pending (its training was rolled back).
    Requeued { id: TileId },
}

/// [`Identity`] with the path as raw bytes (paths need not be UTF-8).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredIdentity {
    path: Vec<u8>,
    size: u64,
    mtime_ns: i128,
    hash: u128,
}

/// The ledger: the in-memory state plus the open log it appends to.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    log: File,
    tiles: Vec<(Identity, TileState)>,
    by_content: HashMap<(u64, u128), TileId>,
    records: usize,
    compact_records: usize,
    /// State changes applied in memory that the log could not take yet, oldest first.
    unrecorded: Vec<Record>,
    /// Length to cut the log back to before the next write (a failed write could not be undone).
    torn_at: Option<u64>,
    /// A write failed since the last successful sync (warned once until then).
    failing: bool,
    /// Test seam: bytes the log still takes before writes fail as on a full disk.
    #[cfg(test)]
    room: Option<usize>,
}

impl Identity {
    /// Read the identity of a file or a BigEarthNet folder (its non-hidden files, by name).
    pub fn read(path: &Path) -> io::Result<Identity> {
        let meta = fsio::input_metadata(path)?;
        let mut hasher = Xxh3::new();
        let (size, mtime_ns) = if meta.is_dir() {
            hash_folder(path, &mut hasher)?
        } else {
            hash_file(path, meta.len(), &mut hasher)?;
            (meta.len(), mtime_ns(&meta))
        };
        Ok(Identity { path: path.to_path_buf(), size, mtime_ns, hash: hasher.digest128() })
    }
}

fn hash_folder(dir: &Path, hasher: &mut Xxh3) -> io::Result<(u64, i128)> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with('.') && entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    let (mut size, mut newest) = (0, i128::MIN);
    for file in files {
        let meta = fs::metadata(&file)?;
        hasher.update(path_bytes(Path::new(file.file_name().unwrap_or_default())).as_slice());
        hash_file(&file, meta.len(), hasher)?;
        size += meta.len();
        newest = newest.max(mtime_ns(&meta));
    }
    Ok((size, newest))
}

fn hash_file(path: &Path, len: u64, hasher: &mut Xxh3) -> io::Result<()> {
    let mut file = fsio::open_regular(path)?;
    hasher.update(&len.to_le_bytes());
    let mut buf = vec![0u8; HASH_SPAN_BYTES.min(len) as usize];
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    let tail_start = len.saturating_sub(HASH_SPAN_BYTES).max(HASH_SPAN_BYTES);
    if tail_start < len {
        buf.resize((len - tail_start) as usize, 0);
        file.seek(SeekFrom::Start(tail_start))?;
        file.read_exact(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(())
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    match meta.modified().map(|t| t.duration_since(UNIX_EPOCH)) {
        Ok(Ok(d)) => d.as_nanos() as i128,
        Ok(Err(before)) => -(before.duration().as_nanos() as i128),
        Err(_) => 0,
    }
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().as_bytes().to_vec()
}

#[cfg(unix)]
fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[cfg(not(unix))]
fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
}

impl From<&Identity> for StoredIdentity {
    fn from(id: &Identity) -> Self {
        StoredIdentity { path: path_bytes(&id.path), size: id.size, mtime_ns: id.mtime_ns, hash: id.hash }
    }
}

impl From<StoredIdentity> for Identity {
    fn from(s: StoredIdentity) -> Self {
        Identity { path: path_from_bytes(&s.path), size: s.size, mtime_ns: s.mtime_ns, hash: s.hash }
    }
}

/// Cut `reason` to at most [`REASON_MAX_BYTES`] at a character boundary.
pub fn short_reason(reason: &str) -> heapless::String<REASON_MAX_BYTES> {
    let mut end = reason.len().min(REASON_MAX_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = heapless::String::new();
    out.push_str(&reason[..end]).expect("cut to the capacity above");
    out
}

impl Ledger {
    /// Open (or create) the ledger in `dir` and replay its log. A torn last record is truncated
    /// with a warning; a file that is not a ledger is [`LedgerError::NotALedger`].
    pub fn open(dir: &Path, compact_records: usize) -> Result<Ledger, LedgerError> {
        let path = dir.join(LEDGER_FILE);
        let io_err = |source| LedgerError::Io { path: path.clone(), source };
        fs::create_dir_all(dir).map_err(io_err)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(e)),
        };
        let mut ledger = Ledger {
            log: open_log(&path, &bytes).map_err(io_err)?,
            path: path.clone(),
            tiles: Vec::new(),
            by_content: HashMap::new(),
            records: 0,
            compact_records: compact_records.max(1),
            unrecorded: Vec::new(),
            torn_at: None,
            failing: false,
            #[cfg(test)]
            room: None,
        };
        let good_len = ledger.replay(&bytes)?;
        if good_len < bytes.len() {
            ledger.drop_damaged_tail(&bytes, good_len).map_err(io_err)?;
        }
        Ok(ledger)
    }

    /// Apply every intact record of `bytes`; return the length of the intact prefix.
    fn replay(&mut self, bytes: &[u8]) -> Result<usize, LedgerError> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if !bytes.starts_with(MAGIC) {
            if MAGIC.starts_with(bytes) {
                return Ok(0); // torn while the magic was being written
            }
            return Err(LedgerError::NotALedger { path: self.path.clone() });
        }
        let mut at = MAGIC.len();
        while let Some((record, next)) = decode_record(bytes, at) {
            self.apply(record);
            self.records += 1;
            at = next;
        }
        Ok(at)
    }

    fn drop_damaged_tail(&mut self, bytes: &[u8], good_len: usize) -> io::Result<()> {
        if intact_record_after(bytes, good_len) {
            // not a torn tail: damage in the middle. Keep the whole file for the operator.
            let mut copy = self.path.clone().into_os_string();
            copy.push(".damaged");
            fs::write(&copy, bytes)?;
            log::error!(
                "{}: damaged record in the middle of the ledger; records after it are dropped (tiles in them are seen again as new); the original is kept as {}",
                self.path.display(),
                Path::new(&copy).display()
            );
        }
        log::warn!(
            "{}: dropping {} damaged bytes at the end of the ledger (torn by a crash?); tiles in them are seen again",
            self.path.display(),
            bytes.len() - good_len
        );
        if good_len < MAGIC.len() {
            return self.rewrite();
        }
        self.log.set_len(good_len as u64)?;
        self.log.seek(SeekFrom::End(0))?;
        self.log.sync_all()
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Tile { id, identity, state } => {
                let identity = Identity::from(identity);
                self.by_content.insert((identity.size, identity.hash), id);
                let slot = id.0 as usize;
                if slot >= self.tiles.len() {
                    self.tiles.resize(slot + 1, (identity.clone(), TileState::Pending));
                }
                self.tiles[slot] = (identity, state);
            }
            Record::Seen { id, path, mtime_ns } => {
                if let Some((identity, _)) = self.tiles.get_mut(id.0 as usize) {
                    identity.path = path_from_bytes(&path);
                    identity.mtime_ns = mtime_ns;
                }
            }
            Record::Trained { id, step } => self.set_state(id, TileState::Trained { step }),
            Record::Rejected { id, reason } => {
                self.set_state(id, TileState::Rejected { reason: reason.as_str().into() })
            }
            Record::Requeued { id } => self.set_state(id, TileState::Pending),
        }
    }

    fn set_state(&mut self, id: TileId, state: TileState) {
        if let Some((_, s)) = self.tiles.get_mut(id.0 as usize) {
            *s = state;
        }
    }

    /// Look `identity` up: same content (size and hash) is [`Observation::Known`], wherever it is
    /// now (the new path is recorded); anything else is recorded as a new pending tile. Fails only
    /// for a new tile the log cannot take (nothing is recorded: observe it again later).
    pub fn observe(&mut self, identity: &Identity) -> Result<Observation, LedgerError> {
        if let Some(&id) = self.by_content.get(&(identity.size, identity.hash)) {
            let (known, state) = &self.tiles[id.0 as usize];
            let state = state.clone();
            if known.path != identity.path || known.mtime_ns != identity.mtime_ns {
                let path = path_bytes(&identity.path);
                self.mark(Record::Seen { id, path, mtime_ns: identity.mtime_ns });
            }
            return Ok(Observation::Known { id, state });
        }
        let id = TileId(self.tiles.len() as u64);
        self.append(Record::Tile { id, identity: identity.into(), state: TileState::Pending })?;
        Ok(Observation::New(id))
    }

    /// The tile with the same content (size and hash) as `identity`, if any; records nothing.
    pub fn lookup(&self, identity: &Identity) -> Option<(TileId, &Identity, &TileState)> {
        let &id = self.by_content.get(&(identity.size, identity.hash))?;
        let (known, state) = &self.tiles[id.0 as usize];
        Some((id, known, state))
    }

    /// Record that tile `id` was trained at `step` (the first step is kept if it already was).
    /// Fails only for an unknown id; a mark the log cannot take yet is kept (see the module doc).
    pub fn mark_trained(&mut self, id: TileId, step: u64) -> Result<(), LedgerError> {
        if matches!(self.state(id)?, TileState::Trained { .. }) {
            return Ok(());
        }
        self.mark(Record::Trained { id, step });
        Ok(())
    }

    /// Record that tile `id` could not be used, and why (kept like [`Ledger::mark_trained`]).
    pub fn mark_rejected(&mut self, id: TileId, reason: &str) -> Result<(), LedgerError> {
        self.state(id)?;
        self.mark(Record::Rejected { id, reason: short_reason(reason) });
        Ok(())
    }

    /// Put every tile first trained after `step` back to pending (after resuming from the
    /// checkpoint of `step`, their training is undone). Returns how many. Requeues the log cannot
    /// take yet are kept like marks: until they are written no checkpoint is taken, and a
    /// restart requeues the same tiles again.
    pub fn requeue_trained_after(&mut self, step: u64) -> usize {
        let ids: Vec<TileId> = (0..self.tiles.len() as u64)
            .map(TileId)
            .filter(|&id| matches!(self.tiles[id.0 as usize].1, TileState::Trained { step: s } if s > step))
            .collect();
        for &id in &ids {
            self.mark(Record::Requeued { id });
        }
        ids.len()
    }

    /// The state of tile `id`.
    pub fn state(&self, id: TileId) -> Result<&TileState, LedgerError> {
        self.tiles.get(id.0 as usize).map(|(_, s)| s).ok_or(LedgerError::UnknownTile(id.0))
    }

    /// The identity of tile `id` (its path as last seen).
    pub fn identity(&self, id: TileId) -> Result<&Identity, LedgerError> {
        self.tiles.get(id.0 as usize).map(|(i, _)| i).ok_or(LedgerError::UnknownTile(id.0))
    }

    /// Tiles waiting for training, oldest first.
    pub fn pending(&self) -> Vec<(TileId, &Identity)> {
        self.tiles
            .iter()
            .enumerate()
            .filter(|(_, (_, s))| *s == TileState::Pending)
            .map(|(i, (identity, _))| (TileId(i as u64), identity))
            .collect()
    }

    /// How many tiles are in each state.
    pub fn counts(&self) -> Counts {
        let mut c = Counts { seen: self.tiles.len() as u64, ..Counts::default() };
        for (_, state) in &self.tiles {
            match state {
                TileState::Pending => c.pending += 1,
                TileState::Trained { .. } => c.trained += 1,
                TileState::Rejected { .. } => c.rejected += 1,
            }
        }
        c
    }

    /// Write the state changes kept in memory, then flush the log to disk (fsync). Records are
    /// written to the OS as they happen, so a killed process loses none; call this before a
    /// checkpoint to survive a power loss too. Fails while kept changes cannot be written.
    pub fn sync(&mut self) -> Result<(), LedgerError> {
        self.flush_unrecorded()?;
        self.log.sync_data().map_err(|source| LedgerError::Io { path: self.path.clone(), source })?;
        if std::mem::take(&mut self.failing) {
            log::info!("{}: the ledger can be written again; nothing it kept is lost", self.path.display());
        }
        Ok(())
    }

    /// Rewrite the log as one record per tile now (also done automatically, see the module doc).
    pub fn compact(&mut self) -> Result<(), LedgerError> {
        self.rewrite().map_err(|source| LedgerError::Io { path: self.path.clone(), source })
    }

    /// Apply a state change of a known tile now, and write it now or, when the log cannot take
    /// it, with the next append or [`Ledger::sync`].
    fn mark(&mut self, record: Record) {
        if self.append(record.clone()).is_err() {
            self.apply(record.clone());
            self.unrecorded.push(record);
        }
    }

    /// Write the kept state changes and then `record`, and apply it; on failure nothing of it is
    /// applied or left in the log.
    fn append(&mut self, record: Record) -> Result<(), LedgerError> {
        self.flush_unrecorded()?;
        self.write(&encode_record(&record))?;
        self.apply(record);
        self.records += 1;
        if self.records > self.tiles.len() + self.compact_records
            && let Err(e) = self.compact()
        {
            // the log stays valid, only longer: try again after another `compact_records` appends
            log::debug!("{e}; the ledger is compacted later");
            self.records = self.tiles.len();
        }
        Ok(())
    }

    /// Write the state changes kept in memory (already applied), all or none.
    fn flush_unrecorded(&mut self) -> Result<(), LedgerError> {
        if self.unrecorded.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = self.unrecorded.iter().flat_map(encode_record).collect();
        self.write(&bytes)?;
        log::info!("{}: {} kept ledger record(s) written", self.path.display(), self.unrecorded.len());
        self.records += self.unrecorded.len();
        self.unrecorded.clear();
        Ok(())
    }

    /// Append `bytes` to the log; warn once per spell of failures (it ends at the next successful
    /// [`Ledger::sync`], so a nearly full disk that takes small records and refuses larger ones
    /// does not warn at every append).
    fn write(&mut self, bytes: &[u8]) -> Result<(), LedgerError> {
        let result = self.write_or_cut(bytes);
        if let Err(e) = &result
            && !std::mem::replace(&mut self.failing, true)
        {
            log::warn!(
                "{}: cannot write the ledger: {e}; new tiles wait until it can, trained and rejected tiles are kept in memory and no checkpoint is written until they are on disk: free space in the state folder (serve.state_dir)",
                self.path.display()
            );
        }
        result.map_err(|source| LedgerError::Io { path: self.path.clone(), source })
    }

    /// Append `bytes`; after a failed (perhaps partial) write, cut the log back to its length
    /// before, so a later record never follows a torn one.
    fn write_or_cut(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(len) = self.torn_at {
            self.cut_to(len)?;
        }
        let len = self.log.seek(SeekFrom::End(0))?;
        let written = self.write_log(bytes);
        if written.is_err() {
            self.torn_at = Some(len);
            // failing here too leaves `torn_at` set: the next write cuts first
            let _ = self.cut_to(len);
        }
        written
    }

    fn cut_to(&mut self, len: u64) -> io::Result<()> {
        self.log.set_len(len)?;
        self.log.seek(SeekFrom::End(0))?;
        self.torn_at = None;
        Ok(())
    }

    #[cfg(not(test))]
    fn write_log(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.log.write_all(bytes)
    }

    /// As on a full disk once `room` is used up: what fits is written, then ENOSPC.
    #[cfg(test)]
    fn write_log(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(room) = self.room else { return self.log.write_all(bytes) };
        let fits = room.min(bytes.len());
        self.log.write_all(&bytes[..fits])?;
        self.room = Some(room - fits);
        if fits < bytes.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    fn rewrite(&mut self) -> io::Result<()> {
        let mut bytes = MAGIC.to_vec();
        for (i, (identity, state)) in self.tiles.iter().enumerate() {
            let record =
                Record::Tile { id: TileId(i as u64), identity: identity.into(), state: state.clone() };
            bytes.extend_from_slice(&encode_record(&record));
        }
        fsio::write_atomic(&self.path, &bytes)?;
        self.log = OpenOptions::new().append(true).open(&self.path)?;
        self.records = self.tiles.len();
        // the rewrite holds every state change kept in memory, and no torn record
        self.unrecorded.clear();
        self.torn_at = None;
        Ok(())
    }
}

/// Open the log for appending, writing the magic first when the file is new or empty.
fn open_log(path: &Path, existing: &[u8]) -> io::Result<File> {
    let mut log = OpenOptions::new().create(true).append(true).open(path)?;
    if existing.is_empty() {
        log.write_all(MAGIC)?;
        log.sync_all()?;
        fsio::sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(log)
}

fn encode_record(record: &Record) -> Vec<u8> {
    let payload = postcard::to_stdvec(record).expect("ledger records always serialise");
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The record at `at` and the offset after it, or `None` at the end or at a damaged record.
fn decode_record(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > RECORD_MAX_BYTES {
        return None;
    }
    let payload = bytes.get(at + 8..at + 8 + len as usize)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let record = postcard::from_bytes(payload).ok()?;
    Some((record, at + 8 + len as usize))
}

/// Whether an intact record starts somewhere in the 64 KiB after the damaged one at `from`.
fn intact_record_after(bytes: &[u8], from: usize) -> bool {
    let end = bytes.len().min(from + 64 * 1024);
    (from.max(MAGIC.len()) + 1..end).any(|at| decode_record(bytes, at).is_some_and(|(_, next)| next > at + 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(path: &str, size: u64, hash: u128) -> Identity {
        Identity { path: PathBuf::from(path), size, mtime_ns: 7, hash }
    }

    fn new_id(obs: Observation) -> TileId {
        match obs {
            Observation::New(id) => id,
            other => panic!("expected a new tile, got {other:?}"),
        }
    }

    /// Three tiles: trained at step 5, rejected, pending.
    fn filled(dir: &Path, compact_records: usize) -> Ledger {
        let mut ledger = Ledger::open(dir, compact_records).unwrap();
        let a = new_id(ledger.observe(&identity("in/a.tif", 10, 1)).unwrap());
        let b = new_id(ledger.observe(&identity("in/b.tif", 20, 2)).unwrap());
        new_id(ledger.observe(&identity("in/c.tif", 30, 3)).unwrap());
        ledger.mark_trained(a, 5).unwrap();
        ledger.mark_rejected(b, "not a TIFF").unwrap();
        ledger
    }

    fn snapshot(ledger: &Ledger) -> (Vec<(Identity, TileState)>, Counts) {
        (ledger.tiles.clone(), ledger.counts())
    }

    #[test]
    fn reopened_ledger_has_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let before = snapshot(&filled(dir.path(), 100));
        let reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(snapshot(&reopened), before);
        assert_eq!(before.1, Counts { seen: 3, trained: 1, rejected: 1, pending: 1 });
        let pending: Vec<_> = reopened.pending().into_iter().map(|(id, i)| (id, i.path.clone())).collect();
        assert_eq!(pending, [(TileId(2), PathBuf::from("in/c.tif"))]);
    }

    #[test]
    fn renamed_identical_file_is_known_and_changed_file_at_same_path_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 100);
        let obs = ledger.observe(&identity("in/renamed.tif", 10, 1)).unwrap();
        assert_eq!(obs, Observation::Known { id: TileId(0), state: TileState::Trained { step: 5 } });
        assert_eq!(ledger.identity(TileId(0)).unwrap().path, Path::new("in/renamed.tif"));
        assert_eq!(ledger.observe(&identity("in/a.tif", 10, 99)).unwrap(), Observation::New(TileId(3)));
        let reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.identity(TileId(0)).unwrap().path, Path::new("in/renamed.tif"));
        assert_eq!(reopened.counts().seen, 4);
    }

    #[test]
    fn torn_tail_record_is_dropped_and_the_ledger_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let before = snapshot(&filled(dir.path(), 100));
        let path = dir.path().join(LEDGER_FILE);
        let mut ledger = Ledger::open(dir.path(), 100).unwrap();
        ledger.observe(&identity("in/d.tif", 40, 4)).unwrap();
        drop(ledger);
        let len = fs::metadata(&path).unwrap().len();
        File::options().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let mut reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(snapshot(&reopened), before, "the torn record is gone, the rest intact");
        // appending after the truncation yields a clean log again
        reopened.observe(&identity("in/d.tif", 40, 4)).unwrap();
        assert_eq!(Ledger::open(dir.path(), 100).unwrap().counts().seen, 4);
    }

    #[test]
    fn flipped_byte_in_last_record_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 100);
        let path = dir.path().join(LEDGER_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        fs::write(&path, &bytes).unwrap();
        let reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.counts().rejected, 0, "the damaged rejection record is dropped");
        assert_eq!(reopened.counts().seen, 3);
    }

    #[test]
    fn compaction_preserves_state_and_shrinks_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 1000);
        for n in 0..50 {
            ledger.observe(&identity(&format!("in/moved{n}.tif"), 10, 1)).unwrap();
        }
        let before = snapshot(&ledger);
        let path = dir.path().join(LEDGER_FILE);
        let long = fs::metadata(&path).unwrap().len();
        ledger.compact().unwrap();
        assert!(fs::metadata(&path).unwrap().len() < long / 4);
        ledger.mark_trained(TileId(2), 9).unwrap();
        let reopened = Ledger::open(dir.path(), 1000).unwrap();
        assert_eq!(reopened.tiles[..2], before.0[..2]);
        assert_eq!(reopened.state(TileId(2)).unwrap(), &TileState::Trained { step: 9 });
    }

    #[test]
    fn log_compacts_itself_past_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 4);
        for n in 0..20 {
            ledger.observe(&identity(&format!("in/moved{n}.tif"), 10, 1)).unwrap();
        }
        assert!(ledger.records <= ledger.tiles.len() + 4, "{} records", ledger.records);
        let reopened = Ledger::open(dir.path(), 4).unwrap();
        assert_eq!(reopened.identity(TileId(0)).unwrap().path, Path::new("in/moved19.tif"));
        assert_eq!(snapshot(&reopened), snapshot(&ledger));
    }

    #[test]
    fn garbage_file_is_a_clear_error_naming_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LEDGER_FILE), b"{\"this\": \"is json\"}").unwrap();
        let err = Ledger::open(dir.path(), 100).unwrap_err().to_string();
        assert!(err.contains(&dir.path().join(LEDGER_FILE).display().to_string()), "{err}");
        assert!(err.contains("not a dinostream ledger") && err.contains("move it away"), "{err}");
    }

    #[test]
    fn requeue_puts_tiles_trained_after_the_checkpoint_back_to_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 100);
        ledger.mark_trained(TileId(2), 12).unwrap();
        assert_eq!(ledger.requeue_trained_after(10), 1);
        let reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.state(TileId(2)).unwrap(), &TileState::Pending);
        assert_eq!(reopened.state(TileId(0)).unwrap(), &TileState::Trained { step: 5 });
    }

    #[test]
    fn first_training_step_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 100);
        ledger.mark_trained(TileId(0), 50).unwrap();
        assert_eq!(ledger.state(TileId(0)).unwrap(), &TileState::Trained { step: 5 });
        assert!(matches!(ledger.mark_trained(TileId(9), 1), Err(LedgerError::UnknownTile(9))));
    }

    #[test]
    fn identity_follows_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.tif"), dir.path().join("b.tif"));
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&a, &big).unwrap();
        fs::write(&b, &big).unwrap();
        let (ia, ib) = (Identity::read(&a).unwrap(), Identity::read(&b).unwrap());
        assert_eq!((ia.size, ia.hash), (ib.size, ib.hash));
        let mut changed_tail = big.clone();
        *changed_tail.last_mut().unwrap() ^= 1;
        fs::write(&b, &changed_tail).unwrap();
        assert_ne!(Identity::read(&b).unwrap().hash, ia.hash, "the tail is hashed too");
    }

    #[test]
    fn folder_identity_covers_its_band_files() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("S2A_x_1_2");
        fs::create_dir(&folder).unwrap();
        fs::write(folder.join("S2A_x_1_2_B02.tif"), b"two").unwrap();
        fs::write(folder.join(".hidden"), b"ignored").unwrap();
        let one = Identity::read(&folder).unwrap();
        assert_eq!(one.size, 3);
        fs::write(folder.join("S2A_x_1_2_B03.tif"), b"three").unwrap();
        let two = Identity::read(&folder).unwrap();
        assert_eq!(two.size, 8);
        assert_ne!(one.hash, two.hash);
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let reason = "é".repeat(200);
        let short = short_reason(&reason);
        assert!(short.len() <= REASON_MAX_BYTES && reason.starts_with(short.as_str()));
    }

    #[test]
    fn damage_in_the_middle_keeps_a_copy_of_the_original() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 100);
        let path = dir.path().join(LEDGER_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let first_payload = MAGIC.len() + 8;
        bytes[first_payload + 2] ^= 0x55;
        fs::write(&path, &bytes).unwrap();
        let reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(reopened.counts().seen, 0);
        assert_eq!(fs::read(dir.path().join("ledger.bin.damaged")).unwrap(), bytes);
    }

    fn log_len(dir: &Path) -> u64 {
        fs::metadata(dir.join(LEDGER_FILE)).unwrap().len()
    }

    #[test]
    fn a_failed_append_is_cut_off_and_the_new_tile_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 100);
        let (before, len) = (snapshot(&ledger), log_len(dir.path()));
        ledger.room = Some(5); // the record's header is half written, then the disk is full
        let err = ledger.observe(&identity("in/d.tif", 40, 4)).unwrap_err().to_string();
        assert!(err.contains("No space left") && err.contains(LEDGER_FILE), "{err}");
        assert_eq!(log_len(dir.path()), len, "the torn record is cut off");
        assert_eq!(snapshot(&ledger), before, "nothing recorded");
        ledger.room = None;
        assert_eq!(ledger.observe(&identity("in/d.tif", 40, 4)).unwrap(), Observation::New(TileId(3)));
        let reopened = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(snapshot(&reopened), snapshot(&ledger));
        assert!(!dir.path().join("ledger.bin.damaged").exists());
    }

    #[test]
    fn marks_the_log_cannot_take_are_kept_until_it_can_and_sync_fails_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 100);
        new_id(ledger.observe(&identity("in/d.tif", 40, 4)).unwrap());
        let (on_disk, len) = (snapshot(&ledger), log_len(dir.path()));
        ledger.room = Some(3);
        ledger.mark_trained(TileId(2), 7).unwrap();
        ledger.mark_rejected(TileId(3), "no usable patch").unwrap();
        ledger.observe(&identity("in/moved.tif", 10, 1)).unwrap();
        assert_eq!(ledger.counts(), Counts { seen: 4, trained: 2, rejected: 2, pending: 0 });
        assert_eq!(ledger.identity(TileId(0)).unwrap().path, Path::new("in/moved.tif"));
        assert!(ledger.sync().is_err(), "no checkpoint while marks are not on disk");
        assert_eq!(log_len(dir.path()), len, "no torn record");
        assert_eq!(ledger.unrecorded.len(), 3);
        assert_eq!(
            snapshot(&Ledger::open(dir.path(), 100).unwrap()),
            on_disk,
            "a kill now loses only the marks"
        );
        ledger.room = None;
        ledger.sync().unwrap();
        assert!(ledger.unrecorded.is_empty());
        assert_eq!(snapshot(&Ledger::open(dir.path(), 100).unwrap()), snapshot(&ledger));
    }

    #[test]
    fn requeues_the_log_cannot_take_are_kept_and_a_restart_requeues_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = filled(dir.path(), 100);
        ledger.mark_trained(TileId(2), 12).unwrap();
        drop(ledger);
        let mut restarted = Ledger::open(dir.path(), 100).unwrap();
        restarted.room = Some(0);
        assert_eq!(restarted.requeue_trained_after(10), 1);
        assert_eq!(restarted.state(TileId(2)).unwrap(), &TileState::Pending);
        assert!(restarted.sync().is_err());
        drop(restarted); // killed before the requeue was written
        let mut again = Ledger::open(dir.path(), 100).unwrap();
        assert_eq!(again.requeue_trained_after(10), 1);
        assert_eq!(Ledger::open(dir.path(), 100).unwrap().state(TileId(2)).unwrap(), &TileState::Pending);
    }

    #[test]
    fn torn_tail_leaves_no_damaged_copy() {
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), 100);
        let path = dir.path().join(LEDGER_FILE);
        let len = fs::metadata(&path).unwrap().len();
        File::options().write(true).open(&path).unwrap().set_len(len - 1).unwrap();
        Ledger::open(dir.path(), 100).unwrap();
        assert!(!dir.path().join("ledger.bin.damaged").exists());
    }
}
