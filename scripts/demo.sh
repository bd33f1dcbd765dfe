#!/usr/bin/env bash
# The main job on a fresh machine, CPU only: build dinostream, then run it on the bundled real
# Sentinel-2 sample tiles (tests/data): inspect them, render the multi-crop preview, and train the
# ViT-tiny DINO model on them for a few steps, writing a checkpoint to ./demo-out/.
# (The streaming service replaces the training step here once `serve` lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
STEPS=${DEMO_STEPS:-20}
mkdir -p "$OUT"
cargo build --release --locked
BIN=target/release/dinostream

echo "== inspect: bundled BigEarthNet folders and EuroSAT tiles"
"$BIN" inspect tests/data/bigearthnet-s2
"$BIN" inspect --layout eurosat13 tests/data/eurosat-ms

echo "== preview: the 8 DINO views of one tile -> $OUT/crops.png"
"$BIN" preview --input "$(ls -d tests/data/bigearthnet-s2/*/ | head -n 1)" --out "$OUT/crops.png" --seed 7

echo "== train: ViT-tiny/8 DINO on the bundled tiles, $STEPS steps on the CPU"
"$BIN" train --data tests/data/bigearthnet-s2 --steps "$STEPS" --model vit-tiny-p8 \
    --batch-size 8 --checkpoint "$OUT/checkpoint"
echo "checkpoint written to $OUT/checkpoint"
