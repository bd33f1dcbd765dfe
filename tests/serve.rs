//! `dinostream serve` end to end: the real binary on temporary folders with the micro preset.
//! Files dropped while running (slow writes, renames, garbage, broken TIFFs), a burst, SIGTERM,
//! kill -9 and restart, and the bit-exact resume; rehearsal between arrivals and the duty cycle.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::tiff_writer::{TiffSpec, tiff_bytes};
use crate::util;

/// A service folder: `incoming/`, `state/`, `config.toml` and the service's log.
pub(crate) struct Service {
    dir: tempfile::TempDir,
    child: Option<Child>,
    runs: usize,
    /// `RUST_LOG` of the runs.
    rust_log: &'static str,
}

/// The micro test configuration; the extras are appended to `[serve]` and `[stream]`.
pub(crate) fn config(serve_extra: &str, batch_size: usize, stream_extra: &str) -> String {
    format!(
        "[tile]\npatch_px = 32\nstride_px = 32\n\
         [augment]\nglobal_px = 32\nlocal_px = 16\nlocal_crops = 2\nworkers = 1\n\
         [model]\npreset = \"{}\"\n\
         [train]\nbatch_size = {batch_size}\nlog_every_steps = 1\n\
         [stream]\nwatch_dir = \"incoming\"\nsettle_ms = 100\nrescan_secs = 2\n{stream_extra}\n\
         [serve]\nwarmup_steps = 2\nteacher_temp_warmup_steps = 2\nfreeze_last_layer_steps = 1\n\
         status_every_steps = 1\ngraceful_shutdown_limit_secs = 60\n{serve_extra}\n\
         [export]\nenabled = false\n",
        util::root().join("models/vit-micro-p8.toml").display()
    )
}

impl Service {
    pub(crate) fn new(config: &str) -> Service {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("incoming")).unwrap();
        fs::write(dir.path().join("config.toml"), config).unwrap();
        Service { dir, child: None, runs: 0, rust_log: "info" }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Start `dinostream serve` with `args`; its stderr goes to `log-<n>.txt`.
    pub(crate) fn start(&mut self, args: &[&str]) {
        self.start_wrapped(&[], args);
    }

    /// [`Service::start`] under `wrapper` (a command that runs the rest of its arguments).
    pub(crate) fn start_wrapped(&mut self, wrapper: &[&str], args: &[&str]) {
        self.runs += 1;
        let log = fs::File::create(self.log_path(self.runs)).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(util::bin());
                c
            }
            None => Command::new(util::bin()),
        };
        let child = command
            .args(["--config", "config.toml", "serve"])
            .args(args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", self.rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dinostream");
        self.child = Some(child);
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.path(&format!("log-{run}.txt"))
    }

    /// This run's log so far.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.log_path(self.runs)).unwrap_or_default()
    }

    /// Wait until `cond` holds (checked every 50 ms); panics with the log after `secs`.
    pub(crate) fn wait_until(&mut self, what: &str, secs: u64, mut cond: impl FnMut(&Service) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("service exited ({status}) while waiting for {what}\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// status.json as JSON (null when not written yet).
    pub(crate) fn status(&self) -> serde_json::Value {
        fs::read(self.path("state/status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub(crate) fn stat(&self, key: &str) -> u64 {
        self.status()[key].as_u64().unwrap_or(0)
    }

    /// The running service's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Send `signal` (TERM or KILL) to the running service.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success();
        assert!(ok, "kill -{signal} {pid} failed");
    }

    /// Wait for the service to exit (at most `secs`).
    pub(crate) fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("service did not exit within {secs} s\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run to completion (`--max-steps`) and assert exit 0.
    pub(crate) fn run_to_end(&mut self, args: &[&str]) {
        self.start(args);
        let status = self.wait_exit(90);
        assert!(status.success(), "exit {status}\n{}", self.log());
    }

    /// The checkpoint folders, oldest first.
    pub(crate) fn checkpoints(&self) -> Vec<PathBuf> {
        let mut all: Vec<PathBuf> = fs::read_dir(self.path("state/checkpoints"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        all.sort();
        all
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A 32x32 10-band u16 stacked TIFF of seeded noise (one 32 px patch).
pub(crate) fn tile_bytes(seed: u64) -> Vec<u8> {
    let spec = TiffSpec { width: 32, height: 32, bands: 10, rows_per_strip: 32, ..TiffSpec::default() };
    tiff_bytes(&spec, |b, y, x| {
        let h = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((b * 1024 + y * 32 + x) as u64))
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        200.0 + (h >> 52) as f64
    })
}

/// Write tile `seed` as `<dir>/<name>` via a `.part` file and a rename (as a careful writer does).
pub(crate) fn drop_tile(dir: &Path, name: &str, seed: u64) {
    let part = dir.join(format!("{name}.part"));
    fs::write(&part, tile_bytes(seed)).unwrap();
    fs::rename(&part, dir.join(name)).unwrap();
}

/// The bundled real BigEarthNet patch folders copied into `dir` (9 patches of 32 px each).
pub(crate) fn drop_bigearthnet(dir: &Path) {
    let root = util::data("bigearthnet-s2");
    for entry in fs::read_dir(&root).unwrap().flatten().filter(|e| e.path().is_dir()) {
        let to = dir.join(entry.file_name());
        fs::create_dir_all(&to).unwrap();
        for file in fs::read_dir(entry.path()).unwrap().flatten() {
            fs::copy(file.path(), to.join(file.file_name())).unwrap();
        }
    }
}

/// Every tensor of a checkpoint's safetensors file, by name, as raw bytes.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> =
        st.tensors().into_iter().map(|(name, view)| (name, view.data().to_vec())).collect();
    out.sort();
    out
}

#[test]
fn a_resumed_run_ends_with_bit_identical_weights_to_a_straight_one() {
    let cfg = config("checkpoint_every_steps = 100\ncheckpoint_every_secs = 3600\n", 4, "");
    let runs: Vec<Service> = [vec![5], vec![2, 5]]
        .into_iter()
        .map(|stops| {
            let mut s = Service::new(&cfg);
            drop_bigearthnet(&s.path("incoming"));
            for i in 0..4 {
                drop_tile(&s.path("incoming"), &format!("t{i:02}.tif"), i);
            }
            for stop in stops {
                s.run_to_end(&["--max-steps", &stop.to_string()]);
            }
            s
        })
        .collect();
    let last = |s: &Service| s.checkpoints().last().cloned().expect("a checkpoint");
    let (straight, resumed) = (last(&runs[0]), last(&runs[1]));
    assert!(straight.ends_with("step-000000000005") && resumed.ends_with("step-000000000005"));
    assert!(runs[1].log().contains("resuming from"), "{}", runs[1].log());
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (tensors(&straight.join(file)), tensors(&resumed.join(file)));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(x == y, "{file}: {name} differs between the straight and the resumed run");
        }
    }
}

#[test]
fn files_dropped_while_running_are_trained_and_bad_ones_rejected_with_reasons() {
    let mut s = Service::new(&config("checkpoint_every_steps = 2\n", 4, ""));
    s.start(&[]);
    s.wait_until("start-up", 30, |s| s.log().contains("serving"));
    let incoming = s.path("incoming");
    // A slow writer: half the file, a pause longer than the settle time, the rest.
    let bytes = tile_bytes(100);
    let mut slow = fs::File::create(incoming.join("slow.tif")).unwrap();
    slow.write_all(&bytes[..bytes.len() / 2]).unwrap();
    slow.flush().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    slow.write_all(&bytes[bytes.len() / 2..]).unwrap();
    drop(slow);
    for i in 0..6 {
        drop_tile(&incoming, &format!("r{i}.tif"), 200 + i);
    }
    fs::write(incoming.join("garbage.tif"), b"this is not a TIFF").unwrap();
    fs::write(incoming.join("notes.txt"), b"hello").unwrap();
    let tiff = tile_bytes(300);
    fs::write(incoming.join("broken.tif"), &tiff[..tiff.len() / 3]).unwrap();
    s.wait_until("7 trained and 3 rejected", 60, |s| {
        s.stat("tiles_trained") >= 7 && s.stat("tiles_rejected") == 3
    });
    for bad in ["garbage.tif", "notes.txt", "broken.tif"] {
        let reason = fs::read_to_string(s.path("incoming/rejected").join(format!("{bad}.reason.txt")))
            .unwrap_or_else(|e| panic!("{bad}: no reason file: {e}\n{}", s.log()));
        assert!(!reason.trim().is_empty());
        assert!(s.log().contains(&format!("{bad}: rejected")), "{}", s.log());
    }
    s.signal("TERM");
    let status = s.wait_exit(60);
    assert!(status.success(), "exit {status}\n{}", s.log());
    assert!(!s.checkpoints().is_empty());
}

#[test]
fn sigterm_during_training_finishes_the_step_checkpoints_and_exits_0() {
    let mut s = Service::new(&config("checkpoint_every_steps = 1000\ncheckpoint_every_secs = 3600\n", 4, ""));
    drop_bigearthnet(&s.path("incoming"));
    s.start(&[]);
    s.wait_until("the first step", 60, |s| s.stat("step") >= 1);
    s.signal("TERM");
    let status = s.wait_exit(60);
    assert!(status.success(), "exit {status}\n{}", s.log());
    let last = s.checkpoints().last().cloned().unwrap_or_else(|| panic!("no checkpoint\n{}", s.log()));
    let step = s.stat("step");
    assert!(last.ends_with(format!("step-{step:012}")), "{} vs step {step}", last.display());
}

#[test]
fn after_kill_9_a_restart_resumes_from_the_last_checkpoint_and_loses_no_tile() {
    let mut s = Service::new(&config("checkpoint_every_steps = 2\n", 4, ""));
    for i in 0..14 {
        drop_tile(&s.path("incoming"), &format!("k{i:02}.tif"), 400 + i);
    }
    s.start(&[]);
    s.wait_until("step 3", 60, |s| s.stat("step") >= 3);
    s.signal("KILL");
    s.wait_exit(10);
    assert!(!s.checkpoints().is_empty(), "{}", s.log());
    s.start(&[]);
    s.wait_until("resume", 30, |s| s.log().contains("resuming from"));
    s.wait_until("every tile trained", 60, |s| s.stat("tiles_trained") == 14 && s.stat("tiles_pending") == 0);
    assert_eq!((s.stat("tiles_seen"), s.stat("tiles_rejected")), (14, 0));
    s.signal("TERM");
    assert!(s.wait_exit(60).success(), "{}", s.log());
}

#[test]
fn a_burst_of_many_small_tiles_is_all_trained() {
    let n = 120;
    let mut s = Service::new(&config("checkpoint_every_steps = 10\n", 8, "fresh_fraction = 1.0\n"));
    s.start(&[]);
    s.wait_until("start-up", 30, |s| s.log().contains("serving"));
    for i in 0..n {
        drop_tile(&s.path("incoming"), &format!("b{i:03}.tif"), 1000 + i);
    }
    s.wait_until("every tile trained", 90, |s| s.stat("tiles_trained") == n);
    assert_eq!((s.stat("tiles_seen"), s.stat("tiles_rejected"), s.stat("tiles_pending")), (n, 0, 0));
    s.signal("TERM");
    assert!(s.wait_exit(60).success(), "{}", s.log());
}

#[test]
fn checkpoints_publish_a_checked_latest_onnx_and_keep_the_previous() {
    let Some(ort) = util::onnxruntime_or_skip() else { return };
    let cfg = config("checkpoint_every_steps = 2\n", 2, "")
        .replace("[export]\nenabled = false\n", &format!("[export]\nonnxruntime = {:?}\nkeep = 2\n", ort));
    let mut s = Service::new(&cfg);
    drop_bigearthnet(&s.path("incoming"));
    s.run_to_end(&["--max-steps", "4"]);
    let latest: serde_json::Value =
        serde_json::from_slice(&fs::read(s.path("exports/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["metadata"]["training_step"], 4, "{latest}\n{}", s.log());
    assert!(s.path("exports/latest.onnx").is_file() && s.path("exports/dinostream-step4.onnx").is_file());
    assert!(s.path("exports/dinostream-step2.onnx").is_file(), "the previous export is kept (keep = 2)");
    assert!(s.log().contains("published"), "{}", s.log());
}

#[test]
fn kill_9_during_export_never_leaves_a_partial_latest_onnx() {
    let Some(ort) = util::onnxruntime_or_skip() else { return };
    let cfg = config("checkpoint_every_steps = 1\n", 2, "")
        .replace("[export]\nenabled = false\n", &format!("[export]\nonnxruntime = {:?}\nkeep = 50\n", ort));
    let mut s = Service::new(&cfg);
    drop_bigearthnet(&s.path("incoming"));
    s.start(&[]);
    s.wait_until("a first export", 90, |s| s.path("exports/latest.onnx").is_file());
    // Kill the moment an export is being written (a temporary file exists), or after 20 s anyway.
    let exporting = |s: &Service| {
        fs::read_dir(s.path("exports"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exporting(&s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    s.signal("KILL");
    s.wait_exit(10);
    let latest = fs::read(s.path("exports/latest.onnx")).unwrap();
    let published: Vec<Vec<u8>> = fs::read_dir(s.path("exports"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("dinostream-step"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx"))
        .map(|e| fs::read(e.path()).unwrap())
        .collect();
    assert!(published.contains(&latest), "latest.onnx is not one of the complete, checked exports");
    let runtime = dinostream::infer::runtime::Runtime::get(
        &dinostream::infer::runtime::LibrarySearch::standard(Some(ort.clone())),
    )
    .unwrap();
    runtime.open(&s.path("exports/latest.onnx"), false).expect("latest.onnx loads in ONNX Runtime");
}

/// `serve --init`: the pretrained start is checkpointed and published (checked in ONNX Runtime)
/// before the first step, training goes on from it, and a restart resumes from the checkpoint
/// without reading the file again (here: a path that no longer exists).
#[test]
fn serve_with_init_publishes_the_import_before_any_step_and_a_restart_resumes_from_the_checkpoint() {
    let Some(ort) = util::onnxruntime_or_skip() else { return };
    let fixtures = util::root().join("tests/fixtures/pretrained");
    let micro = util::root().join("models/vit-micro-p8.toml").display().to_string();
    let cfg = config("checkpoint_every_steps = 2\n", 2, "")
        .replace(&micro, &fixtures.join("vit-fixture-p8.toml").display().to_string())
        .replace("[export]\nenabled = false\n", &format!("[export]\nonnxruntime = {:?}\nkeep = 10\n", ort));
    let mut s = Service::new(&cfg);
    drop_bigearthnet(&s.path("incoming"));
    let init = fixtures.join("timm_vit.safetensors");
    let bands = ["--init-bands", "B02,B03,B04,B08"];
    s.run_to_end(&[&["--max-steps", "2", "--init", init.to_str().unwrap()][..], &bands].concat());
    assert!(s.path("exports/dinostream-step0.onnx").is_file(), "no step-0 export\n{}", s.log());
    let log = s.log();
    let first = log.find("published").expect("an export was published");
    assert!(log[first..].lines().next().unwrap().contains("dinostream-step0.onnx"), "{log}");
    // The step-0 checkpoint holds the file's tensors; step 2 has moved on from them.
    let file: Vec<(String, Vec<u8>)> = tensors(&init);
    let qkv = |t: &[(String, Vec<u8>)], name: &str| t.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let [step0, step2] = [0, 1].map(|i| tensors(&s.checkpoints()[i].join("model.safetensors")));
    assert!(s.checkpoints()[1].ends_with("step-000000000002"), "{:?}", s.checkpoints());
    let name = "teacher.backbone.blocks.1.attn.qkv.weight";
    assert_eq!(qkv(&step0, name), qkv(&file, "blocks.1.attn.qkv.weight"));
    assert_ne!(qkv(&step2, name), qkv(&step0, name));
    let gone = s.path("moved-away.safetensors");
    s.run_to_end(&[&["--max-steps", "4", "--init", gone.to_str().unwrap()][..], &bands].concat());
    let log = s.log();
    assert!(log.contains("resuming from") && log.contains("not imported again"), "{log}");
    assert!(s.path("exports/dinostream-step4.onnx").is_file(), "{log}");
}

/// Longer than `stream.settle_ms`: files dropped this long before a start are found by its scan
/// (in sorted order), not reported one by one by the watcher.
const SETTLED: Duration = Duration::from_millis(300);

/// The step in the first log line `<prefix><step>` (e.g. "tile 3: trained at step ").
fn step_after(log: &str, prefix: &str) -> Option<u64> {
    let rest = &log[log.find(prefix)? + prefix.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn between_arrivals_rehearsal_trains_replay_only_batches_and_a_new_tile_goes_in_within_two_batches() {
    // 3 one-patch tiles and batches of 8: fewer patches than a batch still train.
    let mut s = Service::new(&config("checkpoint_every_steps = 1000\n", 8, ""));
    s.rust_log = "info,dinostream::service=debug";
    for i in 0..3 {
        drop_tile(&s.path("incoming"), &format!("a{i}.tif"), 500 + i);
    }
    std::thread::sleep(SETTLED);
    s.start(&[]);
    s.wait_until("replay-only steps", 60, |s| s.stat("replay_only_steps") >= 3);
    let status = s.status();
    assert_eq!(status["fresh_steps"], 1, "one batch held the 3 fresh patches: {status}");
    assert_eq!((s.stat("tiles_trained"), s.stat("patch_queue")), (3, 0), "{status}");
    let replayed = s.stat("replay_only_steps");
    drop_tile(&s.path("incoming"), "new.tif", 600);
    s.wait_until("the new tile trained", 60, |s| s.stat("tiles_trained") == 4);
    let log = s.log();
    let queued_line =
        log.lines().rev().find(|l| l.contains("patch(es) queued at step")).expect("queued line");
    let tile = queued_line.split("tile ").nth(1).and_then(|t| t.split(':').next()).expect("tile id");
    let queued = step_after(queued_line, "queued at step ").expect("queued step");
    let trained = step_after(&log, &format!("tile {tile}: trained at step ")).expect("trained step");
    assert!(
        trained <= queued + 2,
        "queued at step {queued}, trained as fresh at step {trained}: more than two batches later\n{log}"
    );
    s.wait_until("rehearsal again", 60, |s| {
        s.stat("fresh_steps") == 2 && s.stat("replay_only_steps") > replayed
    });
    s.signal("TERM");
    assert!(s.wait_exit(60).success(), "{}", s.log());
}

#[test]
fn with_rehearsal_off_fewer_patches_than_a_batch_train_once_and_the_service_idles() {
    let mut s = Service::new(&config("checkpoint_every_steps = 1000\nrehearsal = \"off\"\n", 8, ""));
    for i in 0..2 {
        drop_tile(&s.path("incoming"), &format!("o{i}.tif"), 700 + i);
    }
    std::thread::sleep(SETTLED);
    s.start(&[]);
    s.wait_until("both tiles trained", 60, |s| s.stat("tiles_trained") == 2);
    let steps = s.stat("step");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        (s.stat("step"), s.stat("fresh_steps"), s.stat("replay_only_steps")),
        (steps, steps, 0),
        "{}",
        s.log()
    );
    s.signal("TERM");
    assert!(s.wait_exit(60).success(), "{}", s.log());
}

#[test]
fn the_rehearsal_cap_stops_replay_only_steps_until_more_patches_arrive() {
    let cfg = config("checkpoint_every_steps = 1000\nmax_rehearsal_steps_per_patch = 2.0\n", 8, "");
    let mut s = Service::new(&cfg);
    for i in 0..2 {
        drop_tile(&s.path("incoming"), &format!("c{i}.tif"), 800 + i);
    }
    std::thread::sleep(SETTLED);
    s.start(&[]);
    let idle = |s: &mut Service, replay_only: u64| {
        s.wait_until("the capped replay-only steps", 60, |s| s.stat("replay_only_steps") >= replay_only);
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(s.stat("replay_only_steps"), replay_only, "2 per fresh patch\n{}", s.log());
    };
    idle(&mut s, 4);
    drop_tile(&s.path("incoming"), "c2.tif", 802);
    idle(&mut s, 6);
    s.signal("TERM");
    assert!(s.wait_exit(60).success(), "{}", s.log());
}

#[test]
fn the_duty_cycle_pauses_between_steps_and_sigterm_still_stops_a_pausing_service() {
    let cfg = config("checkpoint_every_steps = 1000\nduty_cycle = 0.25\n", 4, "")
        .replace("status_every_steps = 1\n", "status_every_steps = 8\n");
    let mut s = Service::new(&cfg);
    drop_bigearthnet(&s.path("incoming"));
    s.start(&[]);
    s.wait_until("two status intervals", 120, |s| s.stat("step") >= 16);
    let busy = s.status()["busy_fraction"].as_f64().unwrap();
    assert!((busy - 0.25).abs() <= 0.025, "busy {busy} with serve.duty_cycle = 0.25\n{}", s.log());
    let asked = Instant::now();
    s.signal("TERM");
    assert!(s.wait_exit(60).success(), "{}", s.log());
    assert!(asked.elapsed() < Duration::from_secs(20), "{:?} to stop\n{}", asked.elapsed(), s.log());
}

#[test]
fn after_kill_9_during_rehearsal_a_resumed_run_ends_bit_identical_to_a_straight_one() {
    kill_9_during_rehearsal_then_resume_matches_a_straight_run("");
}

#[test]
fn with_min_redundancy_replacement_a_run_killed_during_rehearsal_also_resumes_bit_identically() {
    // 22 patches through 12 slots: evictions by the teacher embeddings of the steps.
    kill_9_during_rehearsal_then_resume_matches_a_straight_run(
        "replay_policy = \"min-redundancy\"\nreplay_capacity_patches = 12\n",
    );
}

#[test]
fn a_run_killed_after_the_replay_store_evicted_and_collected_resumes_bit_identically_and_keeps_only_named_patches()
 {
    // 22 patches through 8 slots of the disk store, one checkpoint kept: evicted patches are
    // deleted once the only checkpoint left no longer names them, before and after the kill.
    let runs = kill_9_during_rehearsal_then_resume_matches_a_straight_run_with(
        "keep_checkpoints = 1\n",
        "replay_policy = \"fifo\"\nreplay_capacity_patches = 8\nreplay_memory_mb = 1\n",
    );
    for run in &runs {
        let blobs = patch_files(&run.path("state/replay"));
        assert_eq!(run.stat("replay_patches"), 8);
        assert_eq!(blobs.len(), 8, "only the 8 patches the buffer names are left: {blobs:?}\n{}", run.log());
    }
}

/// The blob files under a replay store folder.
fn patch_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for shard in fs::read_dir(dir).unwrap().flatten() {
        for entry in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "patch") {
                found.push(entry.path());
            }
        }
    }
    found
}

/// A straight run and one killed during rehearsal (then resumed) with `stream_extra`, both to
/// step 30: same weights, bit for bit.
fn kill_9_during_rehearsal_then_resume_matches_a_straight_run(stream_extra: &str) {
    kill_9_during_rehearsal_then_resume_matches_a_straight_run_with("", stream_extra);
}

/// [`kill_9_during_rehearsal_then_resume_matches_a_straight_run`] with `serve_extra` too; returns
/// the straight and the resumed run.
fn kill_9_during_rehearsal_then_resume_matches_a_straight_run_with(
    serve_extra: &str,
    stream_extra: &str,
) -> Vec<Service> {
    // 22 patches in batches of 4: ten batches with fresh patches, then replay-only ones.
    let serve = format!("checkpoint_every_steps = 3\ncheckpoint_every_secs = 3600\n{serve_extra}");
    let cfg = config(&serve, 4, stream_extra);
    let runs: Vec<Service> = [false, true]
        .into_iter()
        .map(|kill| {
            let mut s = Service::new(&cfg);
            drop_bigearthnet(&s.path("incoming"));
            for i in 0..4 {
                drop_tile(&s.path("incoming"), &format!("t{i:02}.tif"), i);
            }
            std::thread::sleep(SETTLED);
            if kill {
                s.start(&[]);
                s.wait_until("rehearsal past a checkpoint", 90, |s| {
                    s.stat("replay_only_steps") >= 3 && s.stat("step") >= 13
                });
                s.signal("KILL");
                s.wait_exit(10);
            }
            s.run_to_end(&["--max-steps", "30"]);
            s
        })
        .collect();
    let last = |s: &Service| s.checkpoints().last().cloned().expect("a checkpoint");
    let (straight, resumed) = (last(&runs[0]), last(&runs[1]));
    assert!(straight.ends_with("step-000000000030") && resumed.ends_with("step-000000000030"));
    let from = step_after(&runs[1].log(), "(step ").unwrap_or_else(|| panic!("no resume\n{}", runs[1].log()));
    assert!(from >= 11, "resumed from step {from}, before rehearsal began at step 11\n{}", runs[1].log());
    for run in &runs {
        assert_eq!((run.stat("fresh_steps"), run.stat("replay_only_steps")), (10, 20), "{}", run.log());
    }
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (tensors(&straight.join(file)), tensors(&resumed.join(file)));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(x == y, "{file}: {name} differs between the straight and the resumed run");
        }
    }
    runs
}
