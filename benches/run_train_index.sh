#!/bin/sh
# `train` over a folder larger than its cache (issue 14). Writes a synthetic 4000 x 4000 x 10 uint16
# scene (320 MB) that `tile.patch_px = 32`, `tile.stride_px = 4` cut into 986,049 overlapping
# windows (40 GB as f32 patches), runs the train_index bench (index build, a shuffled walk through
# caches of 1024 and 128 MB, VmHWM), then `train` with the micro preset under /usr/bin/time -v, and
# deletes the scene. Usage: benches/run_train_index.sh [WORK_DIR] [STEPS]   (default: a temp dir, 40)
set -eu
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d)}"
STEPS="${2:-40}"
mkdir -p "$WORK/data"
trap 'rm -rf "$WORK/data"' EXIT
echo "start: load average $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --bench train_index --bin dinostream 2>/dev/null
BENCH=$(ls -t target/release/deps/train_index-* | grep -v '\.d$' | head -1)
"$BENCH" "$WORK/data/scene.tif" --write --samples 20000
/usr/bin/time -v "$BENCH" "$WORK/data/scene.tif" --cache-mb 128 --samples 5000 2>&1 |
    grep -E '^(index|walk)|Maximum resident'
printf '[tile]\npatch_px = 32\nstride_px = 4\n\n[train]\ncache_mb = 1024\n' >"$WORK/train.toml"
/usr/bin/time -v target/release/dinostream --config "$WORK/train.toml" train --data "$WORK/data" \
    --steps "$STEPS" --model vit-micro-p8 --batch-size 16 --checkpoint "$WORK/ckpt" \
    --metrics "$WORK/metrics.jsonl" 2>&1 | grep -E 'indexed|waiting|Maximum resident|Elapsed|User time'
tail -1 "$WORK/metrics.jsonl"
echo "end: load average $(cut -d' ' -f1-3 /proc/loadavg)"
