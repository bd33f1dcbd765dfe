#!/usr/bin/env bash
# Augmentation throughput, Rust and both Python baselines in one run (see BENCHMARKS.md, "Augment").
#   benches/run_augment.sh [SECONDS] [ROUNDS]
# Needs: the reference at ../shared/reference (or $REF), a venv with albumentations 2.0.8 + OpenCV 5
# ($PY_REF) and one with albumentations 1.3.1 + OpenCV 4.10 + numpy 1.26 ($PY_SEED).
# --sem v1 is the lean Python anchor, --sem seed1x the seed code as written.
# First the whole Rust bench once (pool scaling, ablation), then ROUNDS (default 3) rounds of
# Rust exact 1 thread, lean Python, seed code, each SECONDS on its CPU clock, back to back: on a
# shared VM the speed of all three drifts by tens of percent within minutes, so each round's
# ratios compare runs seconds apart. Ends with every round's ratios of issue 15 (Rust per CPU
# second vs each Python baseline per CPU second), their medians, the pool scaling and the load
# average around the run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
REF=${REF:-../shared/reference/augment_ref.py}
DATA=${DATA:-../shared/data/bigearthnet-s2}
PY_REF=${PY_REF:-/work/venvs/augment-ref/bin/python}
PY_SEED=${PY_SEED:-/work/venvs/augment-seed1x/bin/python}
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load: $LOAD_BEFORE"
# (cargo honours CARGO_TARGET_DIR as usual; AUGMENT_BENCH=path runs an already built bench binary)
if [ -z "${AUGMENT_BENCH:-}" ]; then
    cargo bench --bench augment --no-run
    AUGMENT_BENCH=$(cargo bench --bench augment --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print(next(j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable") and j["target"]["name"] == "augment"))')
fi
"$AUGMENT_BENCH" "$SECONDS_PER_RUN" | tee -a "$LOG"
# Python on the process CPU clock: augment_ref times with time.perf_counter, so pointing that at
# time.process_time turns its samples/s into samples per CPU second (what the Rust bench reports
# as samples_per_cpu_s), which a busy machine distorts far less.
cpu_clock() {
    local py=$1; shift
    "$py" -c 'import runpy, sys, time; time.perf_counter = time.process_time; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' "$@"
}
for round in $(seq "${2:-3}"); do
    echo "== round $round: Rust exact 1 thread, lean Python, seed code (CPU clock)"
    "$AUGMENT_BENCH" "$SECONDS_PER_RUN" --single | sed "s/^/round $round /" | tee -a "$LOG"
    for sem in v1 seed1x; do
        py=$PY_REF; [ "$sem" = seed1x ] && py=$PY_SEED
        cpu_clock "$py" "$REF" bench --sem "$sem" --tif "$DATA" --seconds "$SECONDS_PER_RUN" --threads 1 2>/dev/null \
            | grep "^samples/s" | sed "s/^/round $round python $sem cpu /" | tee -a "$LOG"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== load after: $LOAD_AFTER"
python3 - "$LOG" "$LOAD_BEFORE" "$LOAD_AFTER" <<'PY'
import json, re, statistics, sys
text = open(sys.argv[1]).read()
runs = [json.loads(l) for l in text.splitlines() if l.startswith('{"what":"augment_bench"')]
def rate(run, key, resample="Exact"):
    return next(r[key] for r in runs if r["resample"] == resample and r["run"] == run)
rounds = sorted({int(r) for r in re.findall(r"^round (\d+) ", text, re.M)})
seed_ratios, lean_ratios = [], []
print(f"== issue 15 ratios (load average before {sys.argv[2]}, after {sys.argv[3]})")
for k in rounds:
    rust = json.loads(re.search(rf"^round {k} (\{{.*)$", text, re.M).group(1))["samples_per_cpu_s"]
    lean, seed = (float(re.search(rf"^round {k} python {sem} cpu samples/s\D*([0-9.]+)", text, re.M).group(1))
                  for sem in ("v1", "seed1x"))
    seed_ratios.append(rust / seed)
    lean_ratios.append(rust / lean)
    print(f"round {k}: Rust exact, 1 thread {rust:.0f} samples/CPU-s; lean Python {lean:.0f}; seed code {seed:.0f}; "
          f"vs seed {rust / seed:.2f}x, vs lean {rust / lean:.2f}x")
print(f"vs seed code per CPU-s, median of {len(rounds)} rounds:   {statistics.median(seed_ratios):.2f}x (target >= 10)")
print(f"vs lean Python per CPU-s, median of {len(rounds)} rounds: {statistics.median(lean_ratios):.2f}x (target >= 3)")
many = [r for r in runs if r["resample"] == "Exact" and r["run"].startswith("pool, ") and r["threads"] > 1]
for r in many:
    one = rate("pool, 1 worker", "samples_per_s")
    eff = r["samples_per_cpu_s"] / rate("pool, 1 worker", "samples_per_cpu_s")
    print(f"pool {r['threads']} workers vs 1 worker: {r['samples_per_s'] / one:.2f}x wall clock "
          f"(target >= 1.6 with 2 workers on an idle 2-core machine); CPU efficiency {eff:.2f}")
PY
