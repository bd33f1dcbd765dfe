#!/bin/sh
# Ingest benchmark: dinostream (Rust, release) and tifffile/OpenCV on the same files, one after the other.
# Usage: benches/run_ingest.sh [DATA_DIR] [PYTHON]   (PYTHON needs numpy, tifffile, opencv-python-headless)
set -eu
cd "$(dirname "$0")/.."
DATA="${1:-$(pwd)/../shared/data}"
PY="${2:-python3}"
echo "machine: $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
cargo bench --bench ingest -- "$DATA" 2>/dev/null | grep '^rust'
"$PY" benches/ingest_ref.py "$DATA"
