#!/usr/bin/env bash
# Brings a CUDA 13.4 toolkit (nvcc, ptxas, fatbinary, cicc, libdevice, the runtime headers and CCCL) that is
# enough to *compile* graft with `--features cuda`, from NVIDIA's wheels on PyPI: no system install, nothing
# installed into the user's Python. The wheels are fetched with `pip download --no-deps` and unzipped into
#   ${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}/cuda-13.4
# whose `nvidia/cu13` folder is the toolkit root. A second run finds the stamp file and does nothing.
#
# Prints, on stdout, the environment that candle's build scripts read, so that
#   eval "$(scripts/cuda-toolkit.sh)"
# sets it in the calling shell: PATH (nvcc first), CUDA_ROOT/CUDA_PATH/CUDA_HOME (the root, for cudarc and
# cudaforge), CUDARC_CUDA_VERSION (cudarc otherwise asks `nvcc --version`, and refuses CUDA > 13.4),
# CUDA_COMPUTE_CAP (cudaforge otherwise asks `nvidia-smi`; keeps an existing value, default 80),
# LD_LIBRARY_PATH (the toolkit's lib, for the runtime; the driver's libcuda.so is not in the wheels).
# Progress goes to stderr.
#
# Linking and running need the NVIDIA driver (libcuda.so), which no wheel provides: a machine without one can
# `cargo check`/`clippy` the cuda feature but not build a binary with it.
#
# Environment: PYTHON (default python3) runs pip; GRAFT_CACHE / XDG_CACHE_HOME choose the cache.
set -euo pipefail

# The 13.4 series (cudarc 0.19 knows CUDA up to 13.4). CCCL publishes no 13.4 wheel; its newest 13.x wheel
# (headers only: thrust, cub, libcu++) is used.
WHEELS=(
    nvidia-cuda-nvcc==13.4.92
    nvidia-nvvm==13.4.92
    nvidia-cuda-runtime==13.4.92
    nvidia-cuda-crt==13.4.92
    nvidia-cuda-cccl==13.3.5.0.6
)
CUDA_VERSION_CODE=13040

PYTHON=${PYTHON:-python3}
CACHE=${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}
DEST=$CACHE/cuda-13.4
ROOT=$DEST/nvidia/cu13
STAMP=$DEST/.complete

# The stamp names the wheels, so changing the pins above fetches again.
want=$(printf '%s\n' "${WHEELS[@]}")
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
    echo "fetching the CUDA 13.4 toolkit wheels into $DEST" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # Linux x86_64 wheels, whatever the Python running pip.
    "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$tmp/wheels" "${WHEELS[@]}" >&2
    rm -rf "$DEST.partial"
    mkdir -p "$DEST.partial"
    "$PYTHON" - "$DEST.partial" "$tmp"/wheels/*.whl <<'PY'
import os, stat, sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if ".dist-info/" in info.filename or info.filename.endswith("/"):
                continue
            path = z.extract(info, dest)
            # zipfile drops the executable bit; wheels record it in the high bits of external_attr.
            mode = info.external_attr >> 16
            if mode & stat.S_IXUSR or "/bin/" in info.filename or "/nvvm/bin/" in info.filename:
                os.chmod(path, 0o755)
PY
    [[ -x "$DEST.partial/nvidia/cu13/bin/nvcc" ]] || { echo "error: no nvidia/cu13/bin/nvcc in the wheels" >&2; exit 1; }
    rm -rf "$DEST"
    mv "$DEST.partial" "$DEST"
    printf '%s\n' "$want" >"$STAMP"
fi

# nvcc finds cicc and libdevice through nvcc.profile relative to its own folder; the wheels' libraries sit in
# lib (the runtime) beside bin.
cat <<EOF
export CUDA_ROOT='$ROOT'
export CUDA_PATH='$ROOT'
export CUDA_HOME='$ROOT'
export PATH='$ROOT/bin':"\$PATH"
export LD_LIBRARY_PATH='$ROOT/lib'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=$CUDA_VERSION_CODE
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
EOF
