#!/usr/bin/env bash
# Brings Fashion-MNIST and writes it as an image folder for `graft finetune --data OUT`.
#
#   scripts/fashion-mnist.sh OUT [--per-class 100] [--size 96] [--rgb] [--seed 0] [--test-per-class N]
#
# Debian/Ubuntu: installs the package `dataset-fashion-mnist` (gzipped IDX files under
# /usr/share/datasets/fashion-mnist/). Elsewhere: downloads the upstream files into
# ${XDG_CACHE_HOME:-~/.cache}/graft/fashion-mnist. Set FASHION_MNIST_DIR to use files you already have.
# OUT/train holds the chosen training images, OUT/test the official test images; they never mix.
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,9p' "$0"
    exit 2
fi
out=$1
shift

has_files() { [ -e "$1/train-images-idx3-ubyte.gz" ] || [ -e "$1/train-images-idx3-ubyte" ]; }

src=${FASHION_MNIST_DIR:-}
if [ -z "$src" ]; then
    src=/usr/share/datasets/fashion-mnist
    if ! has_files "$src" && command -v apt-get >/dev/null; then
        sudo=""
        [ "$(id -u)" -ne 0 ] && sudo=sudo
        $sudo apt-get update
        $sudo apt-get install -y dataset-fashion-mnist
    fi
    if ! has_files "$src"; then
        src=${XDG_CACHE_HOME:-$HOME/.cache}/graft/fashion-mnist
        mkdir -p "$src"
        base=http://fashion-mnist.s3-website.eu-central-1.amazonaws.com
        for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
            [ -e "$src/$f.gz" ] || curl -fL -o "$src/$f.gz" "$base/$f.gz"
        done
    fi
fi

cd "$(dirname "$0")/.."
cargo run --release --example fashion_mnist_folder -- --src "$src" --out "$out" "$@"
