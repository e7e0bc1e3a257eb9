#!/usr/bin/env bash
# Compiles graft with `--features cuda` on a machine without a GPU: `cargo check` and `cargo clippy -D warnings`
# over every target. Build scripts run (so nvcc compiles candle's CUDA kernels), nothing is linked (linking
# needs the NVIDIA driver's libcuda.so). The toolkit comes from scripts/cuda-toolkit.sh (PyPI wheels, cached)
# unless nvcc is already on PATH with CUDA_ROOT set.
#
# The cuda build shares the target directory with the CPU build: its features differ, so cargo keeps the two
# sets of artifacts side by side and neither invalidates the other. The first run compiles candle-kernels
# with nvcc (the slow part, see README "GPU (CUDA)"); later runs are incremental.
#
# Environment: CARGO (default cargo); GRAFT_SKIP_CUDA_CHECK=1 skips it (prints why); CUDA_COMPUTE_CAP
# (default 80) is the architecture nvcc compiles for.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

if [[ "${GRAFT_SKIP_CUDA_CHECK:-}" == 1 ]]; then
    echo "check-cuda: skipped (GRAFT_SKIP_CUDA_CHECK=1)"
    exit 0
fi
if ! command -v nvcc >/dev/null || [[ -z "${CUDA_ROOT:-}" ]]; then
    eval "$(scripts/cuda-toolkit.sh)"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
echo "check-cuda: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"

start=$SECONDS
"$CARGO" check --features cuda --all-targets
echo "check-cuda: cargo check --features cuda took $((SECONDS - start)) s"
start=$SECONDS
"$CARGO" clippy --features cuda --all-targets -- -D warnings
echo "check-cuda: cargo clippy --features cuda took $((SECONDS - start)) s"
