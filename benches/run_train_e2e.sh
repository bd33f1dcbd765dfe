#!/usr/bin/env bash
# End to end training throughput, dinostream `train` against the PyTorch reference trainer
# (ref_train.py through benches/ref_train_preset.py: augmentation in Python on the training
# thread, 2 threads), on the same tiles, presets, batch and step count, one after the other, with
# the load average before and after each side. Prints one JSON line per run and the ratio.
#   benches/run_train_e2e.sh PYTHON_WITH_TORCH [DATA] [REFERENCE_DIR]
# Defaults: DATA ../shared/data, REFERENCE_DIR ../shared/reference. Runs micro at batch 32 for 100
# steps and tiny at batch 8 for 20 steps (STEPS_MICRO, STEPS_TINY override). Build first
# (`cargo build --release`): the build is not part of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?python with torch}; data=${2:-../shared/data}; ref=${3:-../shared/reference}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
bin=${DINOSTREAM:-target/release/dinostream}
load() { cut -d' ' -f1-3 /proc/loadavg; }

ours() { # preset batch steps
  local before; before=$(load)
  "$bin" train --data "$data" --layout eurosat13 --model "vit-$1-p8" --batch-size "$2" --steps "$3" \
    --checkpoint "$out/ours-$1" --metrics "$out/ours-$1.jsonl" -q > /dev/null
  "$py" - "$out/ours-$1.jsonl" "$1" "$2" "$before" "$(load)" <<'EOF'
import json, sys
last = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(json.dumps({"what": "dinostream_train", "preset": sys.argv[2], "batch": int(sys.argv[3]),
                  "steps": last["step"], "wall_s": round(last["elapsed_s"], 1),
                  "samples_per_s": round(last["samples_per_s"], 2), "data_wait_s": round(last["data_wait_s"], 1),
                  "load_before": sys.argv[4], "load_after": sys.argv[5]}))
EOF
}

reference() { # preset batch steps
  local before; before=$(load)
  "$py" benches/ref_train_preset.py --preset "$1" --ref "$ref" train --data "$data" --steps "$3" \
    --batch "$2" --threads 2 --out "$out/ref-$1" > /dev/null
  "$py" - "$out/ref-$1/summary.json" "$1" "$before" "$(load)" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"what": "pytorch_ref_train", "preset": sys.argv[2], "batch": s["batch"], "steps": s["steps"],
                  "wall_s": s["wall_s"], "samples_per_s": s["samples_per_s"], "data_wait_s": s["data_wait_s"],
                  "torch": s["torch"], "threads": s["threads"], "load_before": sys.argv[3], "load_after": sys.argv[4]}))
EOF
}

for run in "micro 32 ${STEPS_MICRO:-100}" "tiny 8 ${STEPS_TINY:-20}"; do
  read -r preset batch steps <<< "$run"
  a=$(ours "$preset" "$batch" "$steps"); echo "$a"
  b=$(reference "$preset" "$batch" "$steps"); echo "$b"
  "$py" -c 'import json,sys; a,b=(json.loads(x) for x in sys.argv[2:]); print(json.dumps({"what": "ratio", "preset": sys.argv[1], "dinostream_over_pytorch_samples_per_s": round(a["samples_per_s"]/b["samples_per_s"], 3)}))' "$preset" "$a" "$b"
done
