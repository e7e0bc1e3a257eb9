#!/usr/bin/env bash
# Unsupervised pretraining on Fashion-MNIST, then fine-tuning with few labels, beside the same classifier
# from random initialisation: the table in README.md ("Unsupervised pretraining").
#
#   scripts/pretrain-fashion-mnist.sh [OUT]      (default OUT: runs/pretrain-fmnist)
#
# 1. Writes Fashion-MNIST as 28x28 grey image folders: all 60,000 training images (labels ignored by
#    pretraining) and 50 labelled images per class (seed 0), both with the 10,000 test images.
# 2. For each stack (dense autoencoder, convolutional autoencoder, RBM): `graft pretrain`, then
#    `graft finetune --base ae:RUN` and `graft finetune --base ARCH` (random init) with the same flags and
#    budget on the 500 labelled images, then `graft eval` of both on the 10,000 test images.
# Environment: EPOCHS_DENSE, EPOCHS_CONV, EPOCHS_RBM (epochs per stage), CONV_IMAGES (images used to
# pretrain the conv stack), FT_EPOCHS (fine-tuning epochs), GRAFT (the binary; default: build --release).
set -euo pipefail

out=${1:-runs/pretrain-fmnist}
cd "$(dirname "$0")/.."
EPOCHS_DENSE=${EPOCHS_DENSE:-3}
EPOCHS_CONV=${EPOCHS_CONV:-2}
EPOCHS_RBM=${EPOCHS_RBM:-3}
CONV_IMAGES=${CONV_IMAGES:-20000}
FT_EPOCHS=${FT_EPOCHS:-30}
if [ -z "${GRAFT:-}" ]; then
    cargo build --release --bin graft
    GRAFT=${CARGO_TARGET_DIR:-target}/release/graft
fi

mkdir -p "$out"
[ -d "$out/all/train" ] || scripts/fashion-mnist.sh "$out/all" --size 28
[ -d "$out/few/train" ] || scripts/fashion-mnist.sh "$out/few" --per-class 50 --size 28 --seed 0

# Two recipes, the same for both starts, no validation split (all 50 images per class train), a fixed
# budget: `all` = 2 head-only epochs then everything at one rate; `probe` = the encoder frozen, head only.
finetune_and_eval() { # BASE NAME
    local run
    for recipe in all probe; do
        run="$out/ft-$2-$recipe"
        rm -rf "$run"
        if [ $recipe = all ]; then
            flags=(--freeze-epochs 2 --epochs "$FT_EPOCHS" --lr 1e-3 --lr-mult 1)
        else
            flags=(--freeze-epochs "$FT_EPOCHS" --epochs 0 --lr 1e-2 --schedule constant)
        fi
        "$GRAFT" finetune --base "$1" --data "$out/few" --val-split 0 --batch-size 32 "${flags[@]}" \
            --seed 0 --quiet --run-dir "$run" >"$run.log" 2>&1
        "$GRAFT" export "$run" --out "$run/model.safetensors" >/dev/null
        "$GRAFT" eval --model "$run/model.safetensors" --data "$out/few" --split test >"$run/eval.txt"
        echo "$2 $recipe: $(grep -o -m1 'accuracy [0-9.]*%' "$run/eval.txt")"
    done
}

# A finished pretraining run is kept; an interrupted one is resumed.
pretrain() { # NAME ARGS...
    local name=$1
    shift
    local run="$out/pt-$name"
    if [ -f "$run/encoder.safetensors" ]; then
        echo "pretraining $name: kept $run"
    elif [ -f "$run/last.safetensors" ]; then
        "$GRAFT" pretrain --resume "$run" --quiet
    else
        rm -rf "$run"
        "$GRAFT" pretrain --data "$out/all/train" --quiet --run-dir "$run" "$@"
    fi
}

pretrain dense --arch dense:784,300,150:selu --stage-epochs "$EPOCHS_DENSE" --finetune-epochs 1
finetune_and_eval "ae:$out/pt-dense" dense-pretrained
finetune_and_eval dense:784,300,150:selu dense-random

pretrain conv --arch conv:32,64,128:relu:flat28 --stage-epochs "$EPOCHS_CONV" --max-images "$CONV_IMAGES"
finetune_and_eval "ae:$out/pt-conv" conv-pretrained
finetune_and_eval conv:32,64,128:relu:flat28 conv-random

pretrain rbm --arch dense:784,300,150:sigmoid --method rbm --stage-epochs "$EPOCHS_RBM"
finetune_and_eval "ae:$out/pt-rbm" rbm-pretrained
finetune_and_eval dense:784,300,150:sigmoid rbm-random
