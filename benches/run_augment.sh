#!/usr/bin/env bash
# Augmentation throughput, Rust and both Python baselines in one run (see BENCHMARKS.md, "Augment").
#   benches/run_augment.sh [SECONDS]
# Needs: the reference at ../shared/reference (or $REF), a venv with albumentations 2.0.8 + OpenCV 5
# ($PY_REF) and one with albumentations 1.3.1 + OpenCV 4.10 + numpy 1.26 ($PY_SEED).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
REF=${REF:-../shared/reference/augment_ref.py}
DATA=${DATA:-../shared/data/bigearthnet-s2}
PY_REF=${PY_REF:-/work/venvs/augment-ref/bin/python}
PY_SEED=${PY_SEED:-/work/venvs/augment-seed1x/bin/python}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --bench augment -- "$SECONDS_PER_RUN"
echo "== python --sem v1 (albumentations 2.0.8 + 1.x semantics, lean ops), 1 thread"
"$PY_REF" "$REF" bench --sem v1 --tif "$DATA" --seconds "$SECONDS_PER_RUN" --threads 1 2>/dev/null
echo "== python --sem seed1x (the seed code on albumentations 1.3.1), 1 thread"
"$PY_SEED" "$REF" bench --sem seed1x --tif "$DATA" --seconds "$SECONDS_PER_RUN" --threads 1 2>/dev/null
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
