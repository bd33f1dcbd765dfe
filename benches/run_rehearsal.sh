#!/usr/bin/env bash
# Rehearsal throughput: `dinostream serve` with no new tiles (replay-only batches after the first
# few) against `dinostream train` on the same tiles, preset, batch and machine, in one run, twice
# in turn (train, serve, train, serve) so that both sides see the same load. Steady state only: the
# first WARM steps of each run (start-up, ingest, the fresh batches) are left out.
#   benches/run_rehearsal.sh [TILES_DIR] [STEPS] [BATCH] [PRESET] [TILES] [WARM] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/eurosat-ms}; steps=${2:-300}; batch=${3:-8}; preset=${4:-vit-micro-p8}; n=${5:-20}
warm=${6:-40}; rounds=${7:-2}
cargo build --release --locked
bin=$PWD/target/release/dinostream
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tiles"
mapfile -t tiles < <(find "$data" -name '*.tif' | sort)
cp "${tiles[@]:0:$n}" "$work/tiles/"
cat >"$work/config.toml" <<EOF
[tile]
layout = "eurosat13"
[model]
preset = "$preset"
[train]
batch_size = $batch
[stream]
settle_ms = 0
[serve]
status_every_steps = 10
checkpoint_every_steps = 100000
checkpoint_every_secs = 3600
[export]
enabled = false
EOF
cd "$work"
echo "uptime before: $(uptime)"
for round in $(seq "$rounds"); do
  rm -rf ckpt metrics.jsonl
  "$bin" --config config.toml -q train --data tiles --steps "$steps" --checkpoint ckpt --metrics metrics.jsonl >/dev/null
  python3 - "$warm" "$batch" "$round" <<'PY'
import json, sys
warm, batch, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open("metrics.jsonl")]
a, b = rows[warm - 1], rows[-1]
print(f"round {run} train: {(b['step'] - a['step']) * batch / (b['elapsed_s'] - a['elapsed_s']):.1f} samples/s "
      f"(steps {a['step']}..{b['step']})")
PY
  rm -rf state
  RUST_LOG=info "$bin" --config config.toml serve --watch tiles --max-steps "$steps" 2>serve.log
  python3 - "$warm" "$batch" "$round" <<'PY'
import re, sys
warm, batch, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lines = [l for l in open("serve.log") if re.search(r"step \d+ loss", l)]
rows = [(int(re.search(r"step (\d+) loss", l).group(1)), float(re.search(r"([\d.]+) samples/s", l).group(1)),
         re.search(r"replay-only (\d+)", l).group(1)) for l in lines]
seconds = steps = 0
prev = None
for step, rate, _ in rows:
    if prev is not None and prev >= warm and rate > 0:
        seconds += (step - prev) * batch / rate
        steps += step - prev
    prev = step
print(f"round {run} serve: {steps * batch / seconds:.1f} samples/s (steps {warm}..{rows[-1][0]}, "
      f"replay-only steps {rows[-1][2]})")
PY
done
echo "uptime after: $(uptime)"
