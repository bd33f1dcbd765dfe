//! The streaming parts together, driven as the serve loop drives them: watched folder -> ledger ->
//! handling policy, across restarts.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use dinostream::config::{HandledPolicy, RejectedPolicy, StreamConfig};
use dinostream::stream::{
    Candidate, Identity, Ledger, Observation, TileState, Watcher, dispose_rejected, dispose_trained,
};

fn config(watch: &Path, handled: HandledPolicy, rejected: RejectedPolicy) -> StreamConfig {
    StreamConfig {
        watch_dir: watch.to_path_buf(),
        settle_ms: 50,
        rescan_secs: 1,
        handled,
        rejected,
        ..StreamConfig::default()
    }
}

/// Candidates until `want` arrived (or 20 s passed), then 300 ms more to catch extras.
fn candidates(cfg: &StreamConfig, want: usize) -> Vec<Candidate> {
    let patience = if want == 0 { Duration::from_millis(1500) } else { Duration::from_secs(20) };
    let (tx, rx) = crossbeam_channel::bounded(8);
    let watcher = Watcher::start(cfg, tx).unwrap();
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    while got.len() < want.max(1) {
        match rx.recv_deadline(deadline) {
            Ok(c) => got.push(c),
            Err(_) => break,
        }
    }
    got.extend(rx.recv_timeout(Duration::from_millis(300)));
    watcher.stop();
    got
}

/// One service run: observe each candidate; "train" new ones (reject those named `bad*`) and apply
/// the handling policy. Returns what the ledger said, by file name.
fn serve_once(cfg: &StreamConfig, state: &Path, want: usize, step: u64) -> Vec<(String, Observation)> {
    let mut ledger = Ledger::open(state, cfg.ledger_compact_records).unwrap();
    let mut seen = Vec::new();
    for c in candidates(cfg, want) {
        let obs = ledger.observe(&Identity::read(&c.path).unwrap()).unwrap();
        if let Observation::New(id) = obs {
            if c.path.file_name().unwrap().to_string_lossy().starts_with("bad") {
                ledger.mark_rejected(id, "not a TIFF").unwrap();
                dispose_rejected(cfg, &c.path, "not a TIFF").unwrap();
            } else {
                ledger.mark_trained(id, step).unwrap();
                dispose_trained(cfg, &c.path).unwrap();
            }
        }
        seen.push((c.path.file_name().unwrap().to_string_lossy().into_owned(), obs));
    }
    ledger.sync().unwrap();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    seen
}

fn drop_tiles(watch: &Path) {
    fs::create_dir_all(watch).unwrap();
    fs::write(watch.join("a.tif"), b"tile a").unwrap();
    fs::write(watch.join("bad.tif"), b"garbage").unwrap();
    let folder = watch.join("S2A_MSIL2A_20170613T101031_34_81");
    fs::create_dir_all(&folder).unwrap();
    for band in ["B02", "B03", "B04"] {
        fs::write(folder.join(format!("S2A_MSIL2A_20170613T101031_34_81_{band}.tif")), band).unwrap();
    }
}

#[test]
fn restart_never_trains_a_tile_twice_as_new() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, state) = (dir.path().join("incoming"), dir.path().join("state"));
    drop_tiles(&watch);
    let cfg = config(&watch, HandledPolicy::Keep, RejectedPolicy::Record);
    let first = serve_once(&cfg, &state, 3, 1);
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(first.iter().all(|(_, o)| matches!(o, Observation::New(_))), "{first:?}");

    fs::copy(watch.join("a.tif"), watch.join("a-copy.tif")).unwrap();
    let second = serve_once(&cfg, &state, 4, 2);
    let states: Vec<_> = second
        .iter()
        .map(|(name, o)| match o {
            Observation::Known { state, .. } => (name.as_str(), state.clone()),
            Observation::New(_) => panic!("{name} trained again as new: {second:?}"),
        })
        .collect();
    assert_eq!(states.len(), 4, "{second:?}");
    assert!(states.contains(&("a-copy.tif", TileState::Trained { step: 1 })), "{states:?}");
    assert!(states.iter().any(|(n, s)| *n == "bad.tif" && matches!(s, TileState::Rejected { .. })));
}

#[test]
fn moved_tiles_are_not_seen_again_and_rejected_ones_carry_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, state) = (dir.path().join("incoming"), dir.path().join("state"));
    drop_tiles(&watch);
    let cfg = config(&watch, HandledPolicy::Move, RejectedPolicy::Move);
    assert_eq!(serve_once(&cfg, &state, 3, 1).len(), 3);
    assert!(watch.join("processed/a.tif").is_file());
    assert!(watch.join("processed/S2A_MSIL2A_20170613T101031_34_81").is_dir());
    assert_eq!(fs::read_to_string(watch.join("rejected/bad.tif.reason.txt")).unwrap(), "not a TIFF\n");
    assert_eq!(serve_once(&cfg, &state, 0, 2), [], "processed/ and rejected/ are not watched");
    let counts = Ledger::open(&state, 100).unwrap().counts();
    assert_eq!((counts.seen, counts.trained, counts.rejected, counts.pending), (3, 2, 1, 0));
}

#[test]
fn a_tile_seen_but_not_trained_before_a_crash_is_still_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, state) = (dir.path().join("incoming"), dir.path().join("state"));
    fs::create_dir_all(&watch).unwrap();
    fs::write(watch.join("late.tif"), b"late").unwrap();
    let cfg = config(&watch, HandledPolicy::Keep, RejectedPolicy::Move);
    {
        let mut ledger = Ledger::open(&state, 100).unwrap();
        let c = &candidates(&cfg, 1)[0];
        ledger.observe(&Identity::read(&c.path).unwrap()).unwrap();
        // the process dies here, before training
    }
    let ledger = Ledger::open(&state, 100).unwrap();
    let pending: Vec<_> =
        ledger.pending().into_iter().map(|(_, i)| i.path.file_name().unwrap().to_owned()).collect();
    assert_eq!(pending, ["late.tif"]);
}
