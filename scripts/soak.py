#!/usr/bin/env python3
"""Soak test of `dinostream serve` against hostile files, kills and full disks (issue #12).

Not part of CI: it takes 10-20 minutes, needs root (tmpfs mounts, dropping capabilities) and a
release build. It runs the micro preset on real tiles (tests/data, plus ../shared/data when present)
through many service lifetimes, each ended at a random moment by `kill -9` or SIGTERM, some aimed at
the moment a checkpoint's `.partial` folder or an export's `.onnx.tmp` file exists. Among the good
tiles it drops FIFOs, sockets, symbolic links to devices, dangling links and link loops, mode-000
files (the service runs without CAP_DAC_OVERRIDE, so root cannot read them either) and copies of
tiles already dropped. The state and exports folders are small tmpfs mounts that are filled up
completely (checkpoints, ledger appends and exports fail) and freed again; the state disk
is freed once per ten cycles while a service runs, which must then recover by itself.

At the end the disks are freed, the service trains what is left and stops with SIGTERM, and the
script prints: tiles dropped / trained / rejected with a reason, lost (must be 0), trained twice as
new (must be 0), hangs (0), exits other than by signal (0), leftover partial or temp files (0),
the service's peak RSS.

    cargo build --release --locked
    sudo scripts/soak.py [--cycles 50] [--seed 1] [--bin target/release/dinostream]
"""
import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACEFUL_SECS = 30


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def content_hash(path):
    h = hashlib.sha1()
    for f in sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]:
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def good_tiles():
    """Real tiles: EuroSAT-MS files and BigEarthNet folders, bundled and (if present) shared, each
    content once (the bundled tiles are copies of shared ones)."""
    found, seen = [], set()
    for base in [os.path.join(ROOT, "tests/data"), os.path.join(ROOT, "../shared/data")]:
        paths = sorted(glob.glob(os.path.join(base, "eurosat-ms/*/*.tif")))
        paths += sorted(p for p in glob.glob(os.path.join(base, "bigearthnet-s2/*")) if os.path.isdir(p))
        for p in paths:
            digest = content_hash(p)
            if digest not in seen:
                seen.add(digest)
                found.append(p)
    return found


def find_onnxruntime():
    pats = [os.path.join(ROOT, ".venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1*"),
            os.path.expanduser("~/.venvs/*/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1*")]
    for pat in pats:
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[-1]
    return None


def mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path]).returncode == 0
    if not ok:
        log(f"cannot mount a tmpfs on {path}: full-disk cycles are skipped")
    return ok


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path, leave):
    """Fill the file system of `path` until `leave` bytes are free (a filler file)."""
    filler = os.path.join(path, ".filler")
    with open(filler, "ab", buffering=0) as f:  # unbuffered: a failed last write leaves nothing to flush
        chunk = b"\0" * (1 << 20)
        while free_bytes(path) > leave + len(chunk):
            f.write(chunk)
            f.flush()
        rest = max(0, free_bytes(path) - leave)
        try:
            f.write(b"\0" * rest)
        except OSError:
            pass


def unfill(path):
    try:
        os.remove(os.path.join(path, ".filler"))
    except FileNotFoundError:
        pass


def config(work, ort):
    export = (f'[export]\nonnxruntime = "{ort}"\nevery_steps = 10\nkeep = 2\nprobe_patches = 4\n'
              if ort else "[export]\nenabled = false\n")
    return f"""[tile]
layout = "eurosat13"
patch_px = 64
stride_px = 64
[augment]
local_crops = 2
workers = 1
[model]
preset = "{ROOT}/models/vit-micro-p8.toml"
[train]
batch_size = 8
log_every_steps = 5
[stream]
watch_dir = "{work}/incoming"
settle_ms = 200
rescan_secs = 2
handled = "move"
rejected = "move"
replay_capacity_patches = 64
[serve]
state_dir = "{work}/state"
exports_dir = "{work}/exports"
warmup_steps = 10
teacher_temp_warmup_steps = 10
freeze_last_layer_steps = 1
checkpoint_every_steps = 5
checkpoint_every_secs = 6
keep_checkpoints = 2
pause_after_unsaved_steps = 8
status_every_steps = 5
graceful_shutdown_limit_secs = {GRACEFUL_SECS}
{export}"""


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = tempfile.mkdtemp(prefix="dinostream-soak-")
        self.incoming = os.path.join(self.work, "incoming")
        self.state = os.path.join(self.work, "state")
        self.exports = os.path.join(self.work, "exports")
        os.makedirs(self.incoming)
        self.tmpfs = mount_tmpfs(self.state, args.state_size) and mount_tmpfs(self.exports, args.exports_size)
        self.ort = find_onnxruntime()
        with open(os.path.join(self.work, "config.toml"), "w") as f:
            f.write(config(self.work, self.ort))
        self.pool = good_tiles()
        self.rng.shuffle(self.pool)
        self.good = []            # names of good tiles dropped
        self.hostile = []         # (name, kind) of items that must be rejected with a reason
        self.sockets = []
        self.counts = {"hangs": 0, "bad_exits": 0, "kill9": 0, "kill9_checkpoint": 0,
                       "kill9_export": 0, "term": 0, "state_full": 0, "exports_full": 0}
        self.peak_rss_kb = 0
        self.proc = None
        self.run_no = 0
        self.earlier = 0

    # ---------------------------------------------------------------- the service

    def start(self):
        self.run_no += 1
        self.log_path = os.path.join(self.work, f"log-{self.run_no:03}.txt")
        cmd = [self.args.bin, "--config", os.path.join(self.work, "config.toml"), "serve"]
        if os.geteuid() == 0 and shutil.which("capsh"):
            # root reads mode-000 files; without these capabilities it cannot
            cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$0" "$@"'] + cmd
        env = dict(os.environ, RUST_LOG="info")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), env=env)
        deadline = time.time() + 90
        while "serving" not in self.read_log():
            if self.proc.poll() is not None:
                self.bad_exit("during start-up")
                return False
            if time.time() > deadline:
                self.hang("never reached serving")
                return False
            time.sleep(0.05)
        return True

    def read_log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def note_rss(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass

    def alive_for(self, secs):
        """Wait `secs` while dropping things; False if the service exited by itself."""
        end = time.time() + secs
        while time.time() < end:
            if self.proc.poll() is not None:
                self.bad_exit("while running")
                return False
            self.note_rss()
            time.sleep(0.1)
        return True

    def kill9_when(self, predicate, timeout):
        end = time.time() + timeout
        while time.time() < end and not predicate():
            if self.proc.poll() is not None:
                self.bad_exit("while waiting for a kill moment")
                return
            time.sleep(0.002)
        self.kill9()

    def kill9(self):
        self.note_rss()
        if self.proc.poll() is not None:
            self.bad_exit("before kill -9")
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def term(self):
        self.note_rss()
        if self.proc.poll() is not None:
            self.bad_exit("before SIGTERM")
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(GRACEFUL_SECS + 15)
        except subprocess.TimeoutExpired:
            self.hang("SIGTERM did not end it")
            return
        if code != 0:
            self.bad_exit(f"SIGTERM ended it with {code}")

    def hang(self, what):
        self.counts["hangs"] += 1
        log(f"HANG run {self.run_no}: {what} (log {self.log_path})")
        self.proc.kill()
        self.proc.wait()

    def bad_exit(self, when):
        self.counts["bad_exits"] += 1
        code = self.proc.poll()
        tail = "\n".join(self.read_log().splitlines()[-5:])
        log(f"EXIT run {self.run_no} {when}: status {code} (log {self.log_path})\n{tail}")

    # ---------------------------------------------------------------- what is dropped

    def drop_good(self, n):
        for _ in range(n):
            if not self.pool:
                return
            src = self.pool.pop()
            name = f"g{len(self.good):04}-{os.path.basename(src)}"
            part = os.path.join(self.incoming, "." + name + ".part")
            if os.path.isdir(src):
                shutil.copytree(src, part)
                os.chmod(part, 0o755)  # the data set's folders are read-only; moving a folder needs write
            else:
                shutil.copy(src, part)
            os.rename(part, os.path.join(self.incoming, name))
            self.good.append((name, src))

    def drop_hostile(self):
        kind = self.rng.choice(["fifo", "socket", "device", "dangling", "loop", "unreadable", "duplicate",
                                "fifo_band"])
        n = len(self.hostile)
        name = f"h{n:04}-{kind}.tif"
        path = os.path.join(self.incoming, name)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            self.sockets.append(s)
        elif kind == "device":
            os.symlink(self.rng.choice(["/dev/zero", "/dev/urandom", "/dev/null"]), path)
        elif kind == "dangling":
            os.symlink(os.path.join(self.incoming, "no-such-tile.tif"), path)
        elif kind == "loop":
            other = os.path.join(self.incoming, f"h{n:04}-loop-partner.tif")
            os.symlink(other, path)
            os.symlink(path, other)
            self.hostile.append((os.path.basename(other), "loop"))
        elif kind == "unreadable":
            files = [p for p in self.pool if os.path.isfile(p)]
            if not files:
                return
            self.pool.remove(files[0])
            shutil.copy(files[0], path)
            os.chmod(path, 0)
        elif kind == "duplicate":
            if not self.earlier:
                return
            # a tile of an earlier cycle: already identified, so the copy is the duplicate
            src = self.good[self.rng.randrange(self.earlier)][1]
            if os.path.isdir(src):
                return
            shutil.copy(src, path)
        elif kind == "fifo_band":
            folders = [p for p in self.pool if os.path.isdir(p)]
            if not folders:
                return
            self.pool.remove(folders[0])
            name = f"h{n:04}-fifo-band"
            path = os.path.join(self.incoming, name)
            part = os.path.join(self.incoming, "." + name + ".part")
            shutil.copytree(folders[0], part)
            os.chmod(part, 0o755)
            band = next(f for f in os.listdir(part) if f.endswith("_B02.tif"))
            os.remove(os.path.join(part, band))
            os.mkfifo(os.path.join(part, band))
            os.rename(part, path)
        self.hostile.append((name, kind))

    # ---------------------------------------------------------------- one cycle

    def partial_exists(self):
        try:
            return any(e.name.startswith(".partial-") for e in os.scandir(os.path.join(self.state, "checkpoints")))
        except FileNotFoundError:
            return False

    def export_tmp_exists(self):
        try:
            return any(e.name.endswith(".onnx.tmp") for e in os.scandir(self.exports))
        except FileNotFoundError:
            return False

    def disks(self, cycle):
        if not self.tmpfs:
            return
        phase = cycle % 10
        if phase == 3:
            fill(self.state, 0)  # checkpoints, the ledger and status.json all hit the full disk
            self.counts["state_full"] += 1
        elif phase == 7:
            fill(self.exports, 0)
            self.counts["exports_full"] += 1
        elif phase == 9:
            unfill(self.exports)

    def cycle(self, i):
        self.earlier = len(self.good)
        self.disks(i)
        if not self.start():
            return
        if self.tmpfs and i % 10 == 4:
            # space comes back while this lifetime runs: it must recover by itself, then stop cleanly
            threading.Timer(self.rng.uniform(8, 12), unfill, [self.state]).start()
            self.drop_good(16)
            self.counts["term"] += 1
            if self.alive_for(25):
                self.term()
            return
        self.drop_good(self.rng.randint(3, 8))
        for _ in range(self.rng.randint(0, 3)):
            self.drop_hostile()
        mode = self.rng.choices(["kill9", "kill9_checkpoint", "kill9_export", "term"],
                                weights=[35, 20, 15 if self.ort else 0, 30])[0]
        self.counts[mode] += 1
        if mode == "kill9":
            if self.alive_for(self.rng.uniform(0.5, 12)):
                self.kill9()
        elif mode == "kill9_checkpoint":
            self.kill9_when(self.partial_exists, 20)
        elif mode == "kill9_export":
            self.kill9_when(self.export_tmp_exists, 20)
        else:
            if self.alive_for(self.rng.uniform(0.5, 12)):
                self.term()

    def finish(self):
        """Free the disks, train what is left, stop with SIGTERM."""
        if self.tmpfs:
            unfill(self.state)
            unfill(self.exports)
        if not self.start():
            return
        deadline = time.time() + 300
        while time.time() < deadline:
            status = self.status()
            pending = status.get("tiles_pending", 1)
            if pending == 0 and status.get("patch_queue", 1) == 0:
                break
            if not self.alive_for(1):
                return
        time.sleep(3)
        self.term()

    def status(self):
        try:
            with open(os.path.join(self.state, "status.json")) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    # ---------------------------------------------------------------- the verdict

    def report(self, started):
        processed = os.path.join(self.incoming, "processed")
        rejected = os.path.join(self.incoming, "rejected")
        done = set(os.listdir(processed)) if os.path.isdir(processed) else set()
        rej = set(os.listdir(rejected)) if os.path.isdir(rejected) else set()
        good_names = [n for n, _ in self.good]
        lost = [n for n in good_names if n not in done]
        twice = [n for n in done if n.rsplit(".", 1)[-1].isdigit()]
        with_reason = [n for n, _ in self.hostile if n in rej and f"{n}.reason.txt" in rej]
        without = [(n, k) for n, k in self.hostile if n not in with_reason]
        good_rejected = [n for n in good_names if n in rej]
        leftovers = glob.glob(os.path.join(self.state, "checkpoints/.partial-*"))
        leftovers += [p for d in (self.state, self.exports) for p in glob.glob(os.path.join(d, ".*.tmp.*"))]
        leftovers += glob.glob(os.path.join(self.exports, "*.onnx.tmp"))
        status = self.status()
        logs = ""
        for path in sorted(glob.glob(os.path.join(self.work, "log-*.txt"))):
            with open(path, errors="replace") as f:
                logs += f.read()
        seen = {what: len(re.findall(pattern, logs)) for what, pattern in [
            ("failed checkpoints", r"checkpoint of step \d+ failed"),
            ("recoveries", r"the service is healthy again"),
            ("training paused", r"training paused:"),
            ("exports not published", r"not published:"),
            ("start-ups that swept leftovers", r"an interrupted run left behind"),
            ("resumes", r"resuming from"),
            ("panics", r"panicked"),
        ]}
        kinds = {}
        for _, k in self.hostile:
            kinds[k] = kinds.get(k, 0) + 1
        load = open("/proc/loadavg").read().split()[:3]
        lines = [
            f"soak: {self.args.cycles} cycles in {(time.time() - started) / 60:.1f} min, seed {self.args.seed}, "
            f"load average {' '.join(load)}, micro preset, batch 8, {os.path.relpath(self.args.bin, ROOT)}",
            f"service lifetimes: {self.run_no} (kill -9 at random moments {self.counts['kill9']}, at a checkpoint's "
            f".partial {self.counts['kill9_checkpoint']}, at an export's .onnx.tmp {self.counts['kill9_export']}, "
            f"SIGTERM {self.counts['term']}); state disk filled {self.counts['state_full']}x, exports disk filled "
            f"{self.counts['exports_full']}x" + ("" if self.tmpfs else " (no tmpfs: disks never filled)"),
            f"good tiles dropped:             {len(good_names)}",
            f"trained (ledger):               {status.get('tiles_trained')}",
            f"good tiles moved to processed/: {len([n for n in good_names if n in done])}",
            f"good tiles rejected:            {len(good_rejected)} {good_rejected[:5]}",
            f"lost:                           {len(lost)} {lost[:5]}",
            f"trained twice as new:           {len(twice)} {twice[:5]}",
            f"hostile items dropped:          {len(self.hostile)} {json.dumps(kinds, sort_keys=True)}",
            f"rejected with a reason:         {len(with_reason)}",
            f"hostile items without a reason: {len(without)} {without[:5]}",
            f"hangs:                          {self.counts['hangs']}",
            f"exits other than by signal:     {self.counts['bad_exits']}",
            f"leftover partial/temp files:    {len(leftovers)} {leftovers[:5]}",
            f"peak RSS:                       {self.peak_rss_kb / 1024:.0f} MiB",
            f"final step {status.get('step')}, checkpoint failures now {status.get('checkpoint_failures')}",
            "in the logs: " + ", ".join(f"{k} {v}" for k, v in seen.items()),
        ]
        print("\n".join(lines), flush=True)
        ok = not lost and not twice and not without and not good_rejected and not leftovers \
            and self.counts["hangs"] == 0 and self.counts["bad_exits"] == 0
        return ok

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for s in self.sockets:
            s.close()
        if self.tmpfs:
            subprocess.run(["umount", self.state])
            subprocess.run(["umount", self.exports])
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/dinostream"))
    p.add_argument("--state-size", default="64m")
    p.add_argument("--exports-size", default="4m")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) afterwards")
    args = p.parse_args()
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"{args.bin}: no binary; run `cargo build --release --locked` first")
    soak = Soak(args)
    started = time.time()
    log(f"work folder {soak.work}; {len(soak.pool)} real tiles available; onnxruntime {soak.ort or 'not found'}")
    ok = False
    try:
        for i in range(args.cycles):
            soak.cycle(i)
            if (i + 1) % 10 == 0:
                log(f"{i + 1} cycles, {len(soak.good)} good tiles and {len(soak.hostile)} hostile items dropped")
        soak.finish()
        ok = soak.report(started)
    finally:
        soak.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
