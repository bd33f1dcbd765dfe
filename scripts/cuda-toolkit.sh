#!/usr/bin/env bash
# Installs a CUDA 13.0 *build* toolkit from PyPI wheels (no GPU, NVIDIA driver or apt CUDA needed), so
# that `cargo build --release --features cuda` compiles and links on a CPU-only machine, and writes
# the environment to source before building.
#   usage:  scripts/cuda-toolkit.sh [DEST] [COMPUTE_CAP]
#           DEST defaults to $HOME/.cache/cuda13-pip; COMPUTE_CAP to 90 (H100/H200, emits sm_90a,
#           Hopper only); 89 = Ada/L4, 80 = A100. (Jetson Orin: JetPack's own CUDA 12.6, see README.)
#   then:   source DEST/env.sh && cargo build --release --features cuda
# Everything is pinned to 13.0: NVIDIA driver 580 is CUDA 13.0, and it refuses PTX from a newer nvcc.
# nvidia-cuda-nvcc does not pin nvidia-nvvm, so each wheel is installed with --no-deps and pinned.
set -euo pipefail
DEST=${1:-$HOME/.cache/cuda13-pip}
CAP=${2:-90}
C="$DEST/nvidia/cu13"
if [ ! -x "$C/bin/nvcc" ]; then
  python3 -m pip install -q --no-cache-dir --no-deps --target "$DEST" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
# cudarc links -lcublas -lcublasLt -lcurand -lnvrtc -lcuda and candle-kernels -lcudart; the wheels
# ship only versioned sonames, so add unversioned links.
(cd "$C/lib" && for l in cublas cublasLt curand nvrtc cudart; do ln -sf "$(ls lib$l.so.[0-9]* | head -1)" "lib$l.so"; done)
# No wheel ships the driver's libcuda: build a link-time stub (SONAME libcuda.so.1) exporting every cu*
# entry point of cuda.h. At run time the real driver library of the GPU machine is used instead.
mkdir -p "$C/lib/stubs"
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$C/include/cuda.h" | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' > "$C/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$C/lib/stubs/libcuda_stub.c"
# Changing any of these variables later rebuilds cudarc/candle (and the kernels): always source the
# same file before building, and keep the target folder.
cat > "$DEST/env.sh" <<ENV
export CUDA_ROOT=$C
export CUDA_PATH=$C CUDA_HOME=$C
export NVCC=$C/bin/nvcc
export PATH=$C/bin:\$PATH
export CUDA_COMPUTE_CAP=$CAP
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$C/lib:$C/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
ENV
"$C/bin/nvcc" --version | tail -2
echo "CUDA 13.0 build toolkit ready in $C; now: source $DEST/env.sh && cargo build --release --features cuda"
