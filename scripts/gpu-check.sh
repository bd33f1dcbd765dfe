#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu/ carried (made by scripts/gpu-pack.sh):
#  1. the golden training steps on CUDA against the same steps on the CPU (max abs diff <= 1e-4),
#  2. `dinostream train --device cuda` on real tiles, loss per step in metrics.jsonl,
#  3. the training-step benchmark, dinostream then PyTorch (`dino_ref.py bench`), same GPU, same run,
#     in f32, TF32 and bf16, each with its peak GPU memory read by nvidia-smi every 100 ms, and
#     dinostream's time and memory per stage (forward, backward, update),
#  4. the Jetson setup's step (deploy/jetson.toml: vit-small-p8-jetson, bf16, batch 16), peak memory.
# Everything it prints also lands in $OUT (the device tool brings that folder back).
#   bash scripts/gpu-check.sh [golden] [train] [bench] [jetson]      (all when none is named)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out"
steps=${*:-golden train bench jetson}
with_libs() { bash .gpu/with-cuda-libs.sh "$@"; }

# Run a command while nvidia-smi samples the GPU's used memory; prints the peak above the idle level.
with_peak_memory() {
  local name=$1; shift
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/$name.mem" &
  local sampler=$!
  "$@"; local rc=$?
  kill "$sampler"; wait "$sampler" 2>/dev/null
  local peak; peak=$(sort -n "$out/$name.mem" | tail -1)
  echo "{\"what\": \"peak_gpu_memory\", \"run\": \"$name\", \"idle_MiB\": $idle, \"peak_MiB\": $peak, \"peak_above_idle_MiB\": $((peak - idle))}" \
    | tee -a "$out/bench.jsonl"
  return $rc
}

for packed in .gpu/bin/*.xz; do
  [ -e "$packed" ] || continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$packed" "${packed%.xz}" && chmod +x "${packed%.xz}" && rm "$packed"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for step in $steps; do
  case $step in
    golden)
      DINOSTREAM_TEST_ROOT=$PWD with_libs .gpu/bin/integration cuda_ --nocapture --test-threads 1 \
        2>&1 | tee "$out/golden.log" ;;
    train)
      with_libs .gpu/bin/dinostream train --device cuda --data .gpu/data/bigearthnet-s2 --steps 200 --time-limit 90s \
        --model vit-small-p8 --batch-size 64 --checkpoint "$out/ck" --metrics "$out/train-metrics.jsonl" \
        2>&1 | tail -40 | tee "$out/train.log" ;;
    bench)
      # Warm-up first: the first CUDA launch JIT-compiles candle's PTX (about 11 s).
      with_libs .gpu/bin/train_step --device cuda --steps 2 --warmup 1 > /dev/null
      for mode in "f32 " "tf32 --tf32" "bf16 --amp bf16"; do
        set -- $mode
        with_peak_memory "candle-$1" with_libs .gpu/bin/train_step --device cuda --precision "$1" --stages \
          | tee -a "$out/bench.jsonl"
        with_peak_memory "torch-$1" python3 .gpu/reference/dino_ref.py bench --arch small --batch 64 \
          --out-dim 65536 ${2:-} ${3:-} | tee -a "$out/bench.jsonl"
      done ;;
    jetson)
      with_peak_memory candle-jetson with_libs .gpu/bin/train_step --device cuda --precision bf16 \
        --preset vit-small-p8-jetson --out-dim 16384 --batch 16 --steps 10 --warmup 2 --stages \
        | tee -a "$out/bench.jsonl" ;;
    *) echo "unknown step $step (golden, train, bench, jetson)" >&2; exit 2 ;;
  esac
done
