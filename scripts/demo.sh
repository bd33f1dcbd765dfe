#!/usr/bin/env bash
# The main job on a fresh machine, CPU only: build dinostream, then run the streaming service on the
# bundled real Sentinel-2 sample tiles (tests/data): the tiles are dropped into a watched folder and
# `dinostream serve` trains the ViT-tiny DINO model on them, logging one status line per step, and
# stops cleanly after DEMO_STEPS steps with a checkpoint in ./demo-out/state/checkpoints/ and a
# published, ONNX-Runtime-checked ./demo-out/exports/latest.onnx, which `embed` then uses.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
STEPS=${DEMO_STEPS:-6}
mkdir -p "$OUT"
./scripts/setup-python.sh            # ONNX Runtime (its shared library checks every export) into .venv
cargo build --release --locked
BIN=target/release/dinostream

echo "== inspect: bundled BigEarthNet folders and EuroSAT tiles"
"$BIN" inspect tests/data/bigearthnet-s2
"$BIN" inspect --layout eurosat13 tests/data/eurosat-ms

echo "== preview: the 8 DINO views of one tile -> $OUT/crops.png"
"$BIN" preview --input "$(ls -d tests/data/bigearthnet-s2/*/ | head -n 1)" --out "$OUT/crops.png" --seed 7

echo "== serve: watch $OUT/incoming, train ViT-tiny/8 for $STEPS steps on the CPU"
rm -rf "$OUT/incoming" "$OUT/state" && mkdir -p "$OUT/incoming"
cp -r tests/data/bigearthnet-s2/S2A_* "$OUT/incoming/"
"$BIN" --config scripts/demo.toml serve --watch "$OUT/incoming" --state "$OUT/state" \
    --exports "$OUT/exports" --model vit-tiny-p8 --device cpu --max-steps "$STEPS"
echo "status: $OUT/state/status.json; checkpoints: $OUT/state/checkpoints/"

echo "== the published model, as a consumer sees it"
cat "$OUT/exports/latest.json"
"$BIN" embed --model "$OUT/exports/latest.onnx" --input tests/data/eurosat-ms --layout eurosat13 \
    --out "$OUT/embeddings.npy"
