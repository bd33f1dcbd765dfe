#!/usr/bin/env bash
# Augmentation throughput, Rust and both Python baselines in one run (see BENCHMARKS.md, "Augment").
#   benches/run_augment.sh [SECONDS]
# Needs: the reference at ../shared/reference (or $REF), a venv with albumentations 2.0.8 + OpenCV 5
# ($PY_REF) and one with albumentations 1.3.1 + OpenCV 4.10 + numpy 1.26 ($PY_SEED).
# --sem v1 is the lean Python anchor, --sem seed1x the seed code as written.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
REF=${REF:-../shared/reference/augment_ref.py}
DATA=${DATA:-../shared/data/bigearthnet-s2}
PY_REF=${PY_REF:-/work/venvs/augment-ref/bin/python}
PY_SEED=${PY_SEED:-/work/venvs/augment-seed1x/bin/python}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load: $(cut -d' ' -f1-3 /proc/loadavg)"
# (cargo honours CARGO_TARGET_DIR as usual)
cargo bench --bench augment -- "$SECONDS_PER_RUN"
# The same Python run on the process CPU clock: augment_ref times with time.perf_counter, so
# pointing that at time.process_time turns its samples/s into samples per CPU second (what the
# Rust bench reports as samples_per_cpu_s), which a busy machine distorts far less.
cpu_clock() {
    local py=$1; shift
    "$py" -c 'import runpy, sys, time; time.perf_counter = time.process_time; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' "$@"
}
for sem in v1 seed1x; do
    py=$PY_REF; [ "$sem" = seed1x ] && py=$PY_SEED
    echo "== python --sem $sem, 1 thread, wall clock"
    "$py" "$REF" bench --sem "$sem" --tif "$DATA" --seconds "$SECONDS_PER_RUN" --threads 1 2>/dev/null | grep "^samples/s"
    echo "== python --sem $sem, 1 thread, CPU clock (samples/s = samples per CPU second)"
    cpu_clock "$py" "$REF" bench --sem "$sem" --tif "$DATA" --seconds "$SECONDS_PER_RUN" --threads 1 2>/dev/null | grep "^samples/s"
done
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
