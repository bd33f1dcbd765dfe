#!/usr/bin/env bash
# Here, on the build machine: build the CUDA binaries for the GPU checks and pack them with what
# they need into .gpu/ (git-ignored), which the device tool carries to the GPU machine, where
# scripts/gpu-check.sh runs them. Needs the CUDA toolkit environment (README "Building with CUDA");
# by default it sources $SHARED/cuda/env.sh (SHARED=../shared, compute capability 90 = H100/H200).
#   scripts/gpu-pack.sh            build, then pack binaries + reference + a subset of the data
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
if [ -z "${CUDA_ROOT:-}" ]; then
  # shellcheck disable=SC1091
  source "$shared/cuda/env.sh"
fi
# A separate target folder: switching the cuda feature on and off would rebuild candle each time.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}

# The executable cargo builds for `cargo ARGS...` (a release build with the cuda feature).
executable() {
  local exe
  exe=$(cargo "$@" --features cuda --locked --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1)
  [ -n "$exe" ] || { echo "cargo $*: no executable built" >&2; exit 1; }
  echo "$exe"
}

rm -rf .gpu && mkdir -p .gpu/bin
# Stripped and xz-compressed (candle's PTX makes each ~60 MB, ~8 MB packed); gpu-check.sh unpacks.
for target in "build --release --bin dinostream" "test --release --no-run --test integration" \
              "bench --no-run --bench train_step"; do
  # shellcheck disable=SC2086
  exe=$(executable $target)
  name=$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')
  strip -o ".gpu/bin/$name" "$exe"
  xz -T2 -6 ".gpu/bin/$name"
done
cp -r "$shared/reference" .gpu/reference
cp "$shared/cuda/with-cuda-libs.sh" .gpu/
# Real tiles for `train --device cuda`: all BigEarthNet patches and EUROSAT_PER_CLASS (12) EuroSAT
# tiles per class (the device tool carries 64 MiB in all).
mkdir -p .gpu/data/eurosat-ms
cp -r "$shared/data/bigearthnet-s2" .gpu/data/
cp "$shared"/data/eurosat-ms/{labels.csv,LICENSE,SOURCE.md} .gpu/data/eurosat-ms/
for class in "$shared"/data/eurosat-ms/*/; do
  mkdir -p ".gpu/data/eurosat-ms/$(basename "$class")"
  find "$class" -name '*.tif' | sort | head -"${EUROSAT_PER_CLASS:-12}" \
    | xargs -I{} cp {} ".gpu/data/eurosat-ms/$(basename "$class")/"
done
du -sh .gpu .gpu/bin/* .gpu/data
echo "carry .gpu to the GPU machine and run: bash scripts/gpu-check.sh"
