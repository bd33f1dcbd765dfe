#!/usr/bin/env bash
# The training-step bench on the CPU, dinostream (f32 and bf16) and PyTorch (f32) in one go (same
# machine, same run), with the load average before and after each side:
# ViT-tiny/8, batch 8, K = 65536, 2 x 120 px + 6 x 56 px synthetic crops, 1 warm-up + 3 timed steps.
# A proxy for the GPU comparison (scripts/gpu-check.sh): same model, same step, same sizes.
#   benches/run_train_step_cpu.sh PYTHON_WITH_TORCH [REFERENCE_DIR]
# Build first (`cargo bench --bench train_step --no-run`): the build is not part of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?python with torch}; ref=${2:-../shared/reference}
args=(--batch 8 --out-dim 65536 --steps 3 --warmup 1)
load() { echo "{\"what\": \"load_average\", \"at\": \"$1\", \"loadavg\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"; }
load start
cargo bench --bench train_step -- --preset vit-tiny-p8 "${args[@]}"
load after_dinostream_f32
cargo bench --bench train_step -- --preset vit-tiny-p8 --precision bf16 "${args[@]}"
load after_dinostream_bf16
/usr/bin/time -f '{"what": "torch_process", "max_rss_KiB": %M}' \
  "$py" "$ref/dino_ref.py" bench --arch tiny --device cpu "${args[@]}" 2>&1 | grep "^{"
load after_torch
/usr/bin/time -f '{"what": "python_torch_import_only", "max_rss_KiB": %M}' "$py" -c "import torch" 2>&1 | grep '^{'
