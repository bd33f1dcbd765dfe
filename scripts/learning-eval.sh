#!/usr/bin/env bash
# Does it learn? Train for a fixed time on every tile under DATA, then compare k-NN and linear-probe
# accuracy on EuroSAT-MS with a group-wise split (bank vs query by `spatial_group`, every 5th
# group is query) for: the trained teacher, the same architecture at its random initialisation,
# and the per-band mean/std baseline. Writes everything under OUT, plots the run.
#   scripts/learning-eval.sh DATA OUT [TIME] [STEPS] [extra train flags...]
#   e.g. on the GPU machine: scripts/learning-eval.sh ../shared/data out 5m 3000 --device cuda --model vit-small-p8
# DATA must hold eurosat-ms/ (with labels.csv); the BigEarthNet folders beside it train too.
# Env: DINOSTREAM (the binary, default target/release/dinostream), PYTHON (for the split and plot).
set -euo pipefail
data=${1:?DATA folder}; out=${2:?OUT folder}; time=${3:-5m}; steps=${4:-3000}
shift $(( $# < 4 ? $# : 4 ))
bin=${DINOSTREAM:-target/release/dinostream}
py=${PYTHON:-python3}
mkdir -p "$out"

"$py" - "$data/eurosat-ms/labels.csv" "$out" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
split = {"bank": [], "query": []}
for r in rows:
    split["query" if int(r["spatial_group"]) % 5 == 0 else "bank"].append(r)
for name, part in split.items():
    with open(f"{sys.argv[2]}/{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows([r["filename"], r["label"]] for r in part)
groups = {n: len({r["spatial_group"] for r in p}) for n, p in split.items()}
print(f"split: bank {len(split['bank'])} tiles in {groups['bank']} groups, "
      f"query {len(split['query'])} tiles in {groups['query']} groups")
PY

"$bin" train --data "$data" --layout eurosat13 --steps "$steps" --time-limit "$time" \
  --checkpoint "$out/trained" --metrics "$out/metrics.jsonl" "$@" 2>&1 | tee "$out/train.log"
"$bin" train --data "$data" --layout eurosat13 --steps 0 --checkpoint "$out/random" "$@" > /dev/null
for run in trained random; do
  "$bin" export --checkpoint "$out/$run" --out "$out/$run.onnx"
done

evaluate() {
  local name=$1; shift
  "$bin" eval --bank "$data/eurosat-ms" --labels "$out/bank.csv" --query "$data/eurosat-ms" \
    --query-labels "$out/query.csv" --layout eurosat13 "$@" | tee "$out/eval-$name.txt"
}
evaluate trained --model "$out/trained.onnx"
evaluate random --model "$out/random.onnx"
evaluate band-stats --baseline band-stats

echo "| features | k-NN | linear |" | tee "$out/learning.md"
echo "| --- | --- | --- |" | tee -a "$out/learning.md"
for name in trained random band-stats; do
  awk -v n="$name" '$1 == "overall" {printf "| %s | %s | %s |\n", n, $2, $3}' "$out/eval-$name.txt" \
    | tee -a "$out/learning.md"
done
"$py" "$(dirname "$0")/plot_metrics.py" "$out/metrics.jsonl" "$out/curve.png" || echo "(no plot: matplotlib missing?)"
