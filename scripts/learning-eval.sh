#!/usr/bin/env bash
# Does it learn? Train for a fixed time on every tile under DATA, then compare k-NN and linear-probe
# accuracy on EuroSAT-MS with a group-wise split (bank vs query by `spatial_group`, every 5th
# group is query) for: the trained teacher, the same architecture at its random initialisation,
# and the per-band mean/std baseline. Writes everything under OUT, plots the run. With --stream
# first, the same evaluation of a running `serve` fed tiles in order (scripts/learning-stream.sh).
#   scripts/learning-eval.sh DATA OUT [TIME] [STEPS] [extra train flags...]
#   e.g. on the GPU machine: scripts/learning-eval.sh ../shared/data out 5m 3000 --device cuda --model vit-small-p8
#   scripts/learning-eval.sh --stream DATA OUT [--time 3m] [--order shuffled|class|scene] [--rate 60] ...
# DATA must hold eurosat-ms/ (with labels.csv); the BigEarthNet folders beside it train too.
# Env: DINOSTREAM (the binary, default target/release/dinostream), PYTHON (for the split and plot).
set -euo pipefail
here=$(dirname "$0")
if [[ ${1:-} == --stream ]]; then
  shift
  exec "$here/learning-stream.sh" "$@"
fi
data=${1:?DATA folder}; out=${2:?OUT folder}; time=${3:-5m}; steps=${4:-3000}
shift $(( $# < 4 ? $# : 4 ))
bin=${DINOSTREAM:-target/release/dinostream}
py=${PYTHON:-python3}
mkdir -p "$out"
# shellcheck source=learning-lib.sh
source "$here/learning-lib.sh"

learning_split

"$bin" train --data "$data" --layout eurosat13 --steps "$steps" --time-limit "$time" \
  --checkpoint "$out/trained" --metrics "$out/metrics.jsonl" "$@" 2>&1 | tee "$out/train.log"
"$bin" train --data "$data" --layout eurosat13 --steps 0 --checkpoint "$out/random" "$@" > /dev/null
for run in trained random; do
  "$bin" export --checkpoint "$out/$run" --out "$out/$run.onnx"
done

learning_evaluate trained --model "$out/trained.onnx"
learning_evaluate random --model "$out/random.onnx"
learning_evaluate band-stats --baseline band-stats
learning_table trained random band-stats
"$py" "$here/plot_metrics.py" "$out/metrics.jsonl" "$out/curve.png" || echo "(no plot: matplotlib missing?)"
